"""The SSE endpoint: ``GET /api/v1/sse/tasks/{task_id}/progress``.

Order matters for correctness: subscribe first, then read the row, so a change committed between
the two is in the mailbox rather than lost; versions at or below the last one sent are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg
from quart import Blueprint, Response, request

from server import db, events, sse
from server.broker import StreamLimitExceeded, Subscription
from server.events import TaskState
from server.http import authenticate, json_error, runtime

if TYPE_CHECKING:
    from server.app import Runtime

__all__ = ["blueprint", "validate_task_id"]

logger = logging.getLogger(__name__)

blueprint = Blueprint("streams", __name__)

MAX_TASK_ID = 200
_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")

# Sent as the ``id`` of the not-found event, so a client that reconnects after it anyway says so.
END_OF_STREAM_ID = "end"

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def validate_task_id(task_id: str) -> str | None:
    """Return why ``task_id`` cannot name a task, or None if it can."""
    if not task_id or len(task_id) > MAX_TASK_ID:
        return f"task id must be 1 to {MAX_TASK_ID} characters"
    if _BAD_ID.search(task_id):
        return "task id must not contain control characters"
    return None


def _retry_field(base_ms: int) -> bytes:
    # Jitter spreads the reconnects of many clients that lost the same server at the same moment.
    return sse.retry(int(base_ms * random.uniform(1.0, 1.5)))


def _last_event_id() -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.args.get("lastEventId")
    if raw is None:
        return None
    raw = raw.strip()
    if raw == END_OF_STREAM_ID:
        return -1
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _stream_ended() -> Response:
    """The answer to a reconnect after the stream ended for good: it must stop the client.

    204 is the SSE standard's signal, and native EventSource and Node's ``eventsource`` stop on
    it. event-source-polyfill (1.0.31) does not: with its fetch transport (every current browser,
    and Node) a 204 has no body, ``response.body.getReader()`` throws, and the polyfill treats
    that as a network error and reconnects, with back-off, forever. It stops on any other
    non-200 status that has a body, and it is the client that resumes with the ``lastEventId``
    query parameter, so that reconnect gets ``410 Gone`` with the usual JSON error body.
    """
    if "Last-Event-ID" not in request.headers and "lastEventId" in request.args:
        return json_error(410, "Stream ended", "this stream has ended for good; do not reconnect")
    return Response("", status=204)


def _stream_response(body: AsyncIterator[bytes]) -> Response:
    response = Response(body, status=200, headers=SSE_HEADERS)
    response.timeout = None  # a stream lives until it ends, not until Quart's response timeout
    return response


@blueprint.get("/api/v1/sse/tasks/<path:task_id>/progress")
async def task_progress(task_id: str) -> Response:
    principal = authenticate()
    problem = validate_task_id(task_id)
    if problem is not None:
        return json_error(400, "Invalid task id", problem)
    rt = runtime()
    last_id = _last_event_id()
    if last_id == -1:
        # The client already received the final not-found event of this stream.
        return _stream_ended()
    if rt.draining:
        return json_error(503, "Server is shutting down", Retry_After="1")
    if not rt.broker.connected.is_set():
        return json_error(503, "Database unavailable", Retry_After="2")
    try:
        sub = rt.broker.subscribe(principal.user_id, [task_id])
    except StreamLimitExceeded as exc:
        return json_error(429, "Too many open streams", exc.scope, Retry_After="5")
    # Whatever happens next (a disconnect before the body starts included), the request task's
    # end releases the mailbox. unsubscribe() is idempotent, so the generator's finally can too.
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(lambda _t: rt.broker.unsubscribe(sub))
    try:
        snapshot = await db.fetch_task(rt.pool, task_id)
    except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
        rt.broker.unsubscribe(sub)
        return json_error(503, "Database unavailable", Retry_After="2")

    if snapshot is None or snapshot.owner_id != principal.user_id:
        rt.broker.unsubscribe(sub)
        return _stream_response(_single(events.not_found_event_with_id(END_OF_STREAM_ID)))
    sub.mark_sent(snapshot)
    if snapshot.terminal and last_id is not None and last_id >= snapshot.version:
        rt.broker.unsubscribe(sub)
        return _stream_ended()
    send_snapshot = last_id is None or last_id < snapshot.version
    return _stream_response(_run(rt, sub, snapshot, send_snapshot, principal.expires_at))


async def _single(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk


async def _run(
    rt: Runtime,
    sub: Subscription,
    snapshot: TaskState,
    send_snapshot: bool,
    token_expires_at: float,
) -> AsyncIterator[bytes]:
    # Runs outside the request context (Quart iterates the body after the view returned).
    settings = rt.settings
    loop = asyncio.get_running_loop()
    try:
        yield _retry_field(settings.retry_ms)
        if send_snapshot:
            yield snapshot.progress_event()
        if snapshot.terminal:
            yield events.complete_event(snapshot)
            return
        deadline = loop.time() + settings.stream_timeout
        next_beat = loop.time() + settings.heartbeat
        while True:
            if sub.pending:
                for state in sub.take():
                    if state.deleted:
                        yield events.not_found_event_with_id(END_OF_STREAM_ID)
                        return
                    yield state.progress_event()
                    if state.terminal:
                        yield events.complete_event(state)
                        return
                continue
            if sub.closing is not None:
                yield _retry_field(settings.retry_ms)
                return
            now = loop.time()
            if now >= deadline:
                yield events.timeout_event()
                return
            if now >= next_beat:
                yield sse.comment("heartbeat")
                next_beat = now + settings.heartbeat
                continue
            sub.wakeup.clear()
            try:
                async with asyncio.timeout_at(min(deadline, next_beat)):
                    await sub.wakeup.wait()
            except TimeoutError:
                pass
    finally:
        rt.broker.unsubscribe(sub)
