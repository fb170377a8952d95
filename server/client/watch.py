"""``taskstream watch``'s SSE loop: follow one task's stream (or a group's, ``--group``) to its
end and say how it ended.

A real SSE client (httpx + httpx-sse, the ``client`` extra, imported only when a watch runs): it
resumes with ``Last-Event-ID`` after a dropped connection or a server restart, backs off on 429
and 503, and re-reads a token file when the server ends the stream at the token's expiry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from server.client.display import Display, clean

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_SUCCESS",
    "Outcome",
    "TokenSource",
    "TokenUnavailable",
    "error_text",
    "token_file",
    "watch",
    "watch_group",
]

EXIT_SUCCESS, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
# Consecutive failed (re)connections before watch gives up.
MAX_RECONNECTS = 5
# No byte for this long (heartbeats come every 15 s by default) means the connection is dead.
READ_TIMEOUT = 60.0


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
    # Group watch: how each task of the group ended ("success", "failed", "not found"...).
    ended: dict[str, str] = field(default_factory=dict)


def error_text(response: httpx.Response) -> str:
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


TokenSource = Callable[[], str]


def token_file(path: str) -> TokenSource:
    """A token source that reads ``path`` anew before each connection, so whatever renews the
    token (a sidecar, a cron job, ``taskstream token > file``) is picked up without a restart."""

    def read() -> str:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise TokenUnavailable(f"cannot read the token file {path}: {exc.strerror}") from None
        if not token:
            raise TokenUnavailable(f"the token file {path} is empty")
        return token

    return read


class TokenUnavailable(Exception):
    """The token source cannot give a token (the file is missing or empty)."""


# How long a token source may stay unreadable before the watch gives up. A renewer that
# rewrites the file in place (`taskstream token > file`, `write_text`) truncates it first, so a
# read can land on an empty or, with rm-then-create, a missing file for a moment.
TOKEN_GRACE = 1.0
_TOKEN_RETRY = 0.05


async def _read_token(token: str | TokenSource) -> str:
    if not callable(token):
        return token
    deadline = asyncio.get_running_loop().time() + TOKEN_GRACE
    while True:
        try:
            return token()
        except TokenUnavailable:
            if asyncio.get_running_loop().time() >= deadline:
                raise
        await asyncio.sleep(_TOKEN_RETRY)


async def watch(
    url: str,
    token: str | TokenSource,
    task_id: str,
    display: Display,
    *,
    give_up_after: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Outcome:
    """Follow one task's stream until it ends; the outcome says how (and which exit code)."""
    stream_url = f"{url.rstrip('/')}/api/v1/sse/tasks/{quote(task_id, safe='')}/progress"
    try:
        async with asyncio.timeout(give_up_after):
            return await _watch(url, token, stream_url, display, transport, _handle, _final)
    except TimeoutError:
        return Outcome(EXIT_ERROR, f"timeout: no final state within {give_up_after:g} s")


async def watch_group(
    url: str,
    token: str | TokenSource,
    group_id: str,
    display: Display,
    *,
    give_up_after: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Outcome:
    """Follow every task of a group until the group is closed and all its tasks have ended:
    exit 0 if every task succeeded, 1 if any failed, was cancelled or was not found."""
    stream_url = f"{url.rstrip('/')}/api/v1/sse/groups/{quote(group_id, safe='')}/progress"
    try:
        async with asyncio.timeout(give_up_after):
            return await _watch(
                url, token, stream_url, display, transport, _handle_group, _final_group
            )
    except TimeoutError:
        return Outcome(EXIT_ERROR, f"timeout: the group did not end within {give_up_after:g} s")


_Handler = Callable[[str, str, _WatchState, Display], "Outcome | None"]


async def _watch(
    url: str,
    token: str | TokenSource,
    stream_url: str,
    display: Display,
    transport: httpx.AsyncBaseTransport | None,
    handle: _Handler,
    final: Callable[[_WatchState], Outcome],
) -> Outcome:
    from httpx_sse import SSEError, aconnect_sse

    # A fixed token that expires ends the watch; a source that is read again gets another chance.
    renewable = callable(token)

    st = _WatchState()
    limits = httpx.Timeout(10.0, read=READ_TIMEOUT)
    async with httpx.AsyncClient(timeout=limits, transport=transport) as client:
        while True:
            renewed = False
            try:
                current = await _read_token(token)
            except TokenUnavailable as exc:
                return Outcome(EXIT_ERROR, f"error: {exc}")
            headers = {"Authorization": f"Bearer {current}"}
            if st.last_id is not None:
                headers["Last-Event-ID"] = st.last_id
            delay = st.retry_ms / 1000
            try:
                async with aconnect_sse(client, "GET", stream_url, headers=headers) as source:
                    response = source.response
                    if response.status_code == 204:
                        # The server says there is nothing more: we already saw the end.
                        return final(st)
                    if response.status_code != 200:
                        await response.aread()
                        if response.status_code in (429, 503) and st.failures < MAX_RECONNECTS:
                            st.failures += 1
                            await asyncio.sleep(_retry_after(response, delay))
                            continue
                        return Outcome(
                            EXIT_ERROR,
                            f"error: HTTP {response.status_code}: {clean(error_text(response))}",
                        )
                    st.connected = True
                    st.news = False
                    async for event in source.aiter_sse():
                        if event.retry is not None:
                            st.retry_ms = event.retry
                        if event.id:
                            st.last_id = event.id
                        outcome = handle(event.event, event.data, st, display)
                        if outcome is not None and renewable and _token_expired(event.data):
                            # The server ended the stream at the token's expiry: read the
                            # source again and resume from the last version.
                            st.news = renewed = True
                            break
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
                        f"error: cannot reach {url}: {clean(exc) or type(exc).__name__}",
                    )
            # The stream ended without a final event (server restart, proxy, network): resume
            # after the server's retry delay. A renewed token resumes at once.
            if not renewed:
                await asyncio.sleep(st.retry_ms / 1000)


def _token_expired(raw: str) -> bool:
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("error") == "Token expired"


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
            return Outcome(EXIT_FAILED, f"failed: {clean(data.get('error') or 'no error given')}")
        if state == "cancelled":
            return Outcome(EXIT_FAILED, "cancelled")
        return Outcome(EXIT_ERROR, f"error: unknown final state {clean(state)}")
    if kind == "error":
        return Outcome(EXIT_ERROR, f"error: {clean(data.get('error', 'stream error'))}")
    if kind == "timeout":
        return Outcome(EXIT_ERROR, f"timeout: {clean(data.get('message', 'Stream timeout'))}")
    return None


def _group_summary(st: _WatchState) -> Outcome:
    counts: dict[str, int] = {}
    for how in st.ended.values():
        counts[how] = counts.get(how, 0) + 1
    parts = ", ".join(f"{n} {how}" for how, n in sorted(counts.items()))
    reason = f"group complete: {len(st.ended)} tasks" + (f" ({parts})" if parts else "")
    ok = all(how == "success" for how in st.ended.values())
    return Outcome(EXIT_SUCCESS if ok else EXIT_FAILED, reason)


def _final_group(st: _WatchState) -> Outcome:
    # 204 on a resume: the group had ended, and this watch saw its end before the reconnect.
    if st.last.get("group_complete"):
        return _group_summary(st)
    return Outcome(EXIT_ERROR, "error: the server ended the stream")


def _handle_group(kind: str, raw: str, st: _WatchState, display: Display) -> Outcome | None:
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    task_id = data.get("task_id")
    if kind == "progress" and isinstance(task_id, str):
        st.failures = 0
        st.news = True
        display.show(data, label=task_id)
        return None
    if kind == "complete" and isinstance(task_id, str):
        st.ended[task_id] = clean(data.get("state"))
        return None
    if kind == "error" and isinstance(task_id, str):
        st.news = True
        st.ended[task_id] = "not found"
        return None
    if kind == "group_complete":
        st.last = {"group_complete": True}
        return _group_summary(st)
    if kind == "error":
        return Outcome(EXIT_ERROR, f"error: {clean(data.get('error', 'stream error'))}")
    if kind == "timeout":
        return Outcome(EXIT_ERROR, f"timeout: {clean(data.get('message', 'Stream timeout'))}")
    return None
