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

This module holds the commands and their arguments; the SSE loop is :mod:`server.client.watch`,
the progress bar and ETA :mod:`server.client.display`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from server.client.display import (
    TERMINAL_STATES,
    Display,
    clean,
    format_eta,
    progress_line,
    render_bar,
)
from server.client.local import DatabaseUnreachable, InvalidInput, LocalTasks, TaskRefused
from server.client.watch import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_SUCCESS,
    TokenSource,
    error_text,
    token_file,
    watch,
    watch_group,
)

__all__ = ["TERMINAL_STATES", "add_commands", "format_eta", "progress_line", "render_bar"]

DEFAULT_URL = "http://127.0.0.1:8000"
# The extra that brings what the watch command needs beyond the server's dependencies.
CLIENT_EXTRA_HINT = "install taskstream[client] (pip install 'taskstream[client]')"

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


def _api_token(args: argparse.Namespace) -> str:
    """The token for an API call; without one, create and update cannot use the API."""
    token = _token(args)
    if token is None:
        raise CommandError(EXIT_ERROR, "error: no token (--token or TASKSTREAM_TOKEN)")
    return token


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
        raise CommandError(EXIT_ERROR, f"error: cannot reach {url}: {clean(exc)}") from None
    if response.status_code in (200, 201):
        result: dict[str, Any] = response.json()
        return result
    code = EXIT_FAILED if response.status_code in (404, 409) else EXIT_ERROR
    reason = f"HTTP {response.status_code}: {clean(error_text(response))}"
    raise CommandError(code, reason)


def _given(args: argparse.Namespace, **options: str) -> dict[str, Any]:
    """The options given on the command line, keyed by the API field each one sets
    (``field="option"``); an option left out sends nothing."""
    return {
        name: getattr(args, option)
        for name, option in options.items()
        if getattr(args, option) is not None
    }


async def _create(args: argparse.Namespace, local: Callable[[], LocalTasks]) -> str:
    fields = _given(args, id="id", owner_id="owner", state="state", estimated_time="eta")
    tasks = local()
    _validated(tasks.check_create, fields)
    if _use_api(args):
        task = await _api_call("POST", f"{_url(args)}/api/v1/tasks", _api_token(args), fields)
        return str(task["task_id"])
    if fields.get("owner_id") is None:
        raise CommandError(EXIT_ERROR, "error: --owner is required when writing the database")
    try:
        return await tasks.create(fields)
    except TaskRefused as exc:
        raise CommandError(EXIT_FAILED, clean(exc)) from None


async def _update(args: argparse.Namespace, local: Callable[[], LocalTasks]) -> str:
    fields = _given(args, state="state", progress="progress", estimated_time="eta", error="error")
    if fields.get("estimated_time") == "auto":
        fields["estimated_time"] = None  # the server derives it
    tasks = local()
    _validated(tasks.check_update, fields)
    if _use_api(args):
        task_url = f"{_url(args)}/api/v1/tasks/{quote(args.task_id, safe='')}"
        task = await _api_call("PATCH", task_url, _api_token(args), fields)
        return json.dumps(task)
    try:
        return json.dumps(await tasks.update(args.task_id, fields))
    except TaskRefused as exc:
        raise CommandError(EXIT_FAILED, clean(exc)) from None


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
    token: str | TokenSource | None = _token(args)
    if args.token_file:
        token = token_file(args.token_file)
    if token is None:
        print("error: no token (--token, --token-file or TASKSTREAM_TOKEN; see `taskstream token`)")
        return EXIT_ERROR
    if (args.task_id is None) == (args.group is None):
        print("error: give a task id or --group GROUP_ID (one of the two)")
        return EXIT_ERROR
    display = Display(sys.stderr, tty=sys.stderr.isatty())
    started = time.monotonic()
    try:
        if args.group is not None:
            outcome = asyncio.run(
                watch_group(_url(args), token, args.group, display, give_up_after=args.timeout)
            )
        else:
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
        help="follow a task (or a group) live; exit 0 success, 1 failed/cancelled, 2 error/timeout",
        description=(
            "Follow a task's SSE stream with a progress bar (on stderr). The last line on stdout "
            "says how it ended. Exit 0 on success, 1 on failed or cancelled, 2 on an error "
            "event, a timeout or any other error. With --group, follow every task of a group "
            "(one line per change, each named) until the group is closed and all its tasks "
            "ended: exit 0 if all succeeded, else 1."
        ),
    )
    watch_p.add_argument("task_id", nargs="?")
    watch_p.add_argument("--group", help="follow every task of this group instead of one task")
    _client_options(watch_p, db_option=False)
    watch_p.add_argument(
        "--token-file",
        help=(
            "read the bearer token from this file before each connection; when the server ends "
            "the stream because the token expired, the file is read again and the watch resumes"
        ),
    )
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
