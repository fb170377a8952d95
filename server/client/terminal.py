"""The terminal client: ``taskstream watch``, ``taskstream create`` and ``taskstream update``.

``watch`` is a real SSE client (httpx + httpx-sse): it follows the single-task stream, resumes with
``Last-Event-ID`` after a dropped connection or a server restart, and draws a progress bar with the
state and ETA. Exit codes: 0 ``success``; 1 ``failed`` or ``cancelled``; 2 an ``error`` event, a
``timeout`` (the server's, or ``--timeout``), or any other error (HTTP, network, usage). The last
line on stdout is a one-line reason, e.g. ``failed: disk full``.

``create`` and ``update`` talk to the API when a URL or token is given (``--url``/``--token`` or
``TASKSTREAM_URL``/``TASKSTREAM_TOKEN``), and otherwise write the database directly
(``DATABASE_URL``, else the embedded PostgreSQL of ``TASKSTREAM_DATA_DIR``); ``--db`` forces the
database. Both paths apply the same validation and the same rule that a finished task cannot
change. Exit codes: 0 done; 1 refused because of the task (the id exists, no such task, the task is
finished); 2 invalid input or any other error. The validation rules and the database writes are
the server's, handed in as a :class:`~server.client.local.LocalTasks` (``server.localtasks``), so
this module imports no server module; ``watch`` needs the ``client`` extra (httpx-sse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import quote

import httpx

from server.client.local import DatabaseUnreachable, InvalidInput, LocalTasks, TaskRefused

__all__ = ["TERMINAL_STATES", "add_commands", "format_eta", "render_bar"]

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_SUCCESS, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
# Consecutive failed (re)connections before watch gives up.
MAX_RECONNECTS = 5
# No byte for this long (heartbeats come every 15 s by default) means the connection is dead.
READ_TIMEOUT = 60.0

# The server's terminal states (server.events.TERMINAL_STATES), copied so that the client imports
# no server module; tests/test_client_package.py proves the two agree.
TERMINAL_STATES = frozenset({"success", "failed", "cancelled"})
# The extra that brings what the watch command needs beyond the server's dependencies.
CLIENT_EXTRA_HINT = "install taskstream[client] (pip install 'taskstream[client]')"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(text: Any) -> str:
    """Make server-provided text safe to print: no escape sequences into the terminal."""
    return _CONTROL.sub("?", str(text))


def format_eta(seconds: int | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render_bar(progress: float, width: int = 30) -> str:
    progress = min(100.0, max(0.0, float(progress)))
    filled = int(round(width * progress / 100))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(data: dict[str, Any]) -> str:
    progress = float(data.get("progress") or 0.0)
    state = data.get("state", "?")
    line = f"{render_bar(progress)} {progress:5.1f}%  {_clean(state)}"
    # A finished task has no time left: no "ETA", even from a server that sends the writer's
    # last estimate with the final state.
    if state in TERMINAL_STATES:
        return line
    return f"{line}  ETA {format_eta(data.get('estimated_time'))}"


@dataclass
class Display:
    """The live bar: redrawn in place on a terminal, one line per change otherwise."""

    out: TextIO
    tty: bool
    drawn: bool = False

    def show(self, data: dict[str, Any]) -> None:
        line = progress_line(data)
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self.drawn = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


@dataclass
class Outcome:
    code: int
    reason: str


@dataclass
class _WatchState:
    last_id: str | None = None
    retry_ms: int = 3000
    failures: int = 0
    news: bool = False
    connected: bool = False
    last: dict[str, Any] = field(default_factory=dict)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "error"
    if isinstance(body, dict) and "error" in body:
        detail = body.get("detail")
        text = str(body["error"])
        if detail is not None:
            text += f" ({detail if isinstance(detail, str) else json.dumps(detail)})"
        return text
    return response.reason_phrase or "error"


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return default


async def watch(
    url: str,
    token: str,
    task_id: str,
    display: Display,
    *,
    give_up_after: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Outcome:
    """Follow one task's stream until it ends; the outcome says how (and which exit code)."""
    try:
        async with asyncio.timeout(give_up_after):
            return await _watch(url, token, task_id, display, transport)
    except TimeoutError:
        return Outcome(EXIT_ERROR, f"timeout: no final state within {give_up_after:g} s")


async def _watch(
    url: str,
    token: str,
    task_id: str,
    display: Display,
    transport: httpx.AsyncBaseTransport | None,
) -> Outcome:
    from httpx_sse import SSEError, aconnect_sse

    stream_url = f"{url.rstrip('/')}/api/v1/sse/tasks/{quote(task_id, safe='')}/progress"
    st = _WatchState()
    limits = httpx.Timeout(10.0, read=READ_TIMEOUT)
    async with httpx.AsyncClient(timeout=limits, transport=transport) as client:
        while True:
            headers = {"Authorization": f"Bearer {token}"}
            if st.last_id is not None:
                headers["Last-Event-ID"] = st.last_id
            delay = st.retry_ms / 1000
            try:
                async with aconnect_sse(client, "GET", stream_url, headers=headers) as source:
                    response = source.response
                    if response.status_code == 204:
                        # The server says there is nothing more: we already saw the end.
                        return _final(st)
                    if response.status_code != 200:
                        await response.aread()
                        if response.status_code in (429, 503) and st.failures < MAX_RECONNECTS:
                            st.failures += 1
                            await asyncio.sleep(_retry_after(response, delay))
                            continue
                        return Outcome(
                            EXIT_ERROR,
                            f"error: HTTP {response.status_code}: {_clean(_error_text(response))}",
                        )
                    st.connected = True
                    st.news = False
                    async for event in source.aiter_sse():
                        if event.retry is not None:
                            st.retry_ms = event.retry
                        if event.id:
                            st.last_id = event.id
                        outcome = _handle(event.event, event.data, st, display)
                        if outcome is not None:
                            return outcome
                    if not st.news:
                        # Closed with no news: count it, so a server that keeps hanging up
                        # ends the watch instead of looping forever.
                        st.failures += 1
                        if st.failures > MAX_RECONNECTS:
                            return Outcome(EXIT_ERROR, "error: the server keeps closing the stream")
            except SSEError:
                return Outcome(EXIT_ERROR, f"error: {url} did not answer with an event stream")
            except httpx.TransportError as exc:
                st.failures += 1
                # Never connected at all: a wrong URL or a server that is not up; say so now.
                if st.failures > MAX_RECONNECTS or not st.connected:
                    return Outcome(
                        EXIT_ERROR,
                        f"error: cannot reach {url}: {_clean(exc) or type(exc).__name__}",
                    )
            # The stream ended without a final event (server restart, proxy, network): resume.
            await asyncio.sleep(st.retry_ms / 1000)


def _final(st: _WatchState) -> Outcome:
    state = st.last.get("state")
    if state == "success":
        return Outcome(EXIT_SUCCESS, "success")
    if state in ("failed", "cancelled"):
        return Outcome(EXIT_FAILED, f"{state}")
    return Outcome(EXIT_ERROR, "error: the server ended the stream")


def _handle(kind: str, raw: str, st: _WatchState, display: Display) -> Outcome | None:
    if kind == "message" and raw == "":
        return None  # a block with only `retry:`; not an event
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if kind == "progress":
        st.failures = 0
        st.news = True
        st.last = data
        display.show(data)
        return None
    if kind == "complete":
        state = data.get("state")
        if state == "success":
            return Outcome(EXIT_SUCCESS, "success")
        if state == "failed":
            return Outcome(EXIT_FAILED, f"failed: {_clean(data.get('error') or 'no error given')}")
        if state == "cancelled":
            return Outcome(EXIT_FAILED, "cancelled")
        return Outcome(EXIT_ERROR, f"error: unknown final state {_clean(state)}")
    if kind == "error":
        return Outcome(EXIT_ERROR, f"error: {_clean(data.get('error', 'stream error'))}")
    if kind == "timeout":
        return Outcome(EXIT_ERROR, f"timeout: {_clean(data.get('message', 'Stream timeout'))}")
    return None


# -- create / update -------------------------------------------------------------------------


class CommandError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _url(args: argparse.Namespace) -> str:
    return str(args.url or os.environ.get("TASKSTREAM_URL") or DEFAULT_URL).rstrip("/")


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("TASKSTREAM_TOKEN") or None


def _use_api(args: argparse.Namespace) -> bool:
    if args.db:
        return False
    return bool(
        args.url
        or args.token
        or os.environ.get("TASKSTREAM_URL")
        or os.environ.get("TASKSTREAM_TOKEN")
    )


def _validated(check: Callable[[dict[str, Any]], None], data: dict[str, Any]) -> None:
    try:
        check(data)
    except InvalidInput as exc:
        raise CommandError(EXIT_ERROR, f"invalid: {exc}") from None


async def _api_call(
    method: str,
    url: str,
    token: str,
    body: dict[str, Any],
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(timeout=30.0, transport=transport) as client:
            response = await client.request(
                method, url, json=body, headers={"Authorization": f"Bearer {token}"}
            )
    except httpx.TransportError as exc:
        raise CommandError(EXIT_ERROR, f"error: cannot reach {url}: {_clean(exc)}") from None
    if response.status_code in (200, 201):
        result: dict[str, Any] = response.json()
        return result
    code = EXIT_FAILED if response.status_code in (404, 409) else EXIT_ERROR
    reason = f"HTTP {response.status_code}: {_clean(_error_text(response))}"
    raise CommandError(code, reason)


async def _create(args: argparse.Namespace, local: Callable[[], LocalTasks]) -> str:
    fields: dict[str, Any] = {}
    if args.id is not None:
        fields["id"] = args.id
    if args.owner is not None:
        fields["owner_id"] = args.owner
    if args.state is not None:
        fields["state"] = args.state
    if args.eta is not None:
        fields["estimated_time"] = args.eta
    tasks = local()
    _validated(tasks.check_create, fields)
    if _use_api(args):
        token = _token(args)
        if token is None:
            raise CommandError(EXIT_ERROR, "error: no token (--token or TASKSTREAM_TOKEN)")
        task = await _api_call("POST", f"{_url(args)}/api/v1/tasks", token, fields)
        return str(task["task_id"])
    if fields.get("owner_id") is None:
        raise CommandError(EXIT_ERROR, "error: --owner is required when writing the database")
    try:
        return await tasks.create(fields)
    except TaskRefused as exc:
        raise CommandError(EXIT_FAILED, _clean(exc)) from None


async def _update(args: argparse.Namespace, local: Callable[[], LocalTasks]) -> str:
    fields: dict[str, Any] = {}
    if args.state is not None:
        fields["state"] = args.state
    if args.progress is not None:
        fields["progress"] = args.progress
    if args.eta is not None:
        fields["estimated_time"] = None if args.eta == "auto" else args.eta
    if args.error is not None:
        fields["error"] = args.error
    tasks = local()
    _validated(tasks.check_update, fields)
    if _use_api(args):
        token = _token(args)
        if token is None:
            raise CommandError(EXIT_ERROR, "error: no token (--token or TASKSTREAM_TOKEN)")
        task_url = f"{_url(args)}/api/v1/tasks/{quote(args.task_id, safe='')}"
        task = await _api_call("PATCH", task_url, token, fields)
        return json.dumps(task)
    try:
        return json.dumps(await tasks.update(args.task_id, fields))
    except TaskRefused as exc:
        raise CommandError(EXIT_FAILED, _clean(exc)) from None


def _run_command(coro_factory: Callable[[], Any]) -> int:
    try:
        print(asyncio.run(coro_factory()))
    except CommandError as exc:
        print(f"taskstream: {exc.reason}", file=sys.stderr)
        return exc.code
    except DatabaseUnreachable as exc:
        print(f"taskstream: cannot reach PostgreSQL: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_SUCCESS


def _missing_client_extra() -> str | None:
    """The name of a module the watch command needs that is not installed, if any."""
    try:
        import httpx_sse  # noqa: F401
    except ImportError:
        return "httpx-sse"
    return None


def _with_client_extra(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Run ``command``, or, without the ``client`` extra, say in one line (the watch's last line
    on stdout, exit 2) what to install."""

    def run(args: argparse.Namespace) -> int:
        missing = _missing_client_extra()
        if missing is not None:
            print(f"error: taskstream {args.command} needs {missing}: {CLIENT_EXTRA_HINT}")
            return EXIT_ERROR
        return command(args)

    return run


def _cmd_watch(args: argparse.Namespace) -> int:
    token = _token(args)
    if token is None:
        print("error: no token (--token or TASKSTREAM_TOKEN; see `taskstream token`)")
        return EXIT_ERROR
    display = Display(sys.stderr, tty=sys.stderr.isatty())
    started = time.monotonic()
    try:
        outcome = asyncio.run(
            watch(_url(args), token, args.task_id, display, give_up_after=args.timeout)
        )
    except KeyboardInterrupt:
        display.close()
        print(f"interrupted after {time.monotonic() - started:.0f} s")
        return 130
    display.close()
    print(outcome.reason, flush=True)
    return outcome.code


def _eta_arg(raw: str) -> int | str:
    if raw == "auto":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("a whole number of seconds, or 'auto'") from None


def _client_options(parser: argparse.ArgumentParser, *, db_option: bool) -> None:
    parser.add_argument("--url", help=f"server URL (default: TASKSTREAM_URL, else {DEFAULT_URL})")
    parser.add_argument(
        "--token", help="bearer token (default: TASKSTREAM_TOKEN; the variable keeps it out of ps)"
    )
    if db_option:
        parser.add_argument(
            "--db",
            action="store_true",
            help="write the database (DATABASE_URL, else embedded) even if a URL/token is set",
        )


def add_commands(sub: Any, local_tasks: Callable[[], LocalTasks]) -> None:
    """Add ``watch``, ``create`` and ``update`` to the ``taskstream`` parser.

    ``local_tasks`` gives the server's validation rules and its direct database writes; it is
    called only when ``create`` or ``update`` runs, so the other commands never import them.
    """
    watch_p = sub.add_parser(
        "watch",
        help="follow a task live; exit 0 success, 1 failed/cancelled, 2 error/timeout",
        description=(
            "Follow a task's SSE stream with a progress bar (on stderr). The last line on stdout "
            "says how it ended. Exit 0 on success, 1 on failed or cancelled, 2 on an error "
            "event, a timeout or any other error."
        ),
    )
    watch_p.add_argument("task_id")
    _client_options(watch_p, db_option=False)
    watch_p.add_argument(
        "--timeout", type=float, default=None, help="give up (exit 2) after this many seconds"
    )
    watch_p.set_defaults(func=_with_client_extra(_cmd_watch))

    create_p = sub.add_parser(
        "create",
        help="create a task and print its id (API with --url/--token, else the database)",
    )
    create_p.add_argument("--id", help="task id (default: task_<random>)")
    create_p.add_argument(
        "--owner", help="owner (API: needs scope tasks:write unless it is you; database: required)"
    )
    create_p.add_argument("--state", help="initial state (default: pending)")
    create_p.add_argument("--eta", type=int, help="initial estimated_time in seconds")
    _client_options(create_p, db_option=True)
    create_p.set_defaults(func=lambda a: _run_command(lambda: _create(a, local_tasks)))

    update_p = sub.add_parser(
        "update",
        help="update a task and print it as JSON (API with --url/--token, else the database)",
    )
    update_p.add_argument("task_id")
    update_p.add_argument("--state")
    update_p.add_argument("--progress", type=float, help="percent, 0 to 100")
    update_p.add_argument(
        "--eta", type=_eta_arg, help="seconds left, or 'auto' to let the server derive it"
    )
    update_p.add_argument("--error", help="error text (at most 1000 characters)")
    _client_options(update_p, db_option=True)
    update_p.set_defaults(func=lambda a: _run_command(lambda: _update(a, local_tasks)))
