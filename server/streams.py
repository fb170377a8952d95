"""The SSE endpoints.

- ``GET /api/v1/sse/tasks/{task_id}/progress``: one task.
- ``GET /api/v1/sse/tasks?ids=a,b,c``: many tasks on one connection (browsers allow only six
  HTTP/1.1 connections per origin); without ``ids``, every non-terminal task of the caller and
  the tasks they create later, until the timeout.

Order matters for correctness: subscribe first, then read the rows, so a change committed between
the two is in the mailbox rather than lost; versions at or below the last one sent are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
from quart import Blueprint, Response, request

from server import db, events, metrics, sse
from server.auth import Principal
from server.broker import StreamLimitExceeded, Subscription, is_new_for_owner_stream
from server.events import TaskState
from server.http import authenticate, json_error, runtime
from server.observe import observe_push, observed
from server.openapi import (
    SSE_AUTH,
    SSE_PARAMETERS,
    optional_parameter,
    parameters,
    responds,
    security,
    sse_refusals,
    sse_responds,
    summarize,
)
from server.schemas import MULTI_TASK_EVENTS, SINGLE_TASK_EVENTS
from server.sendtimeout import RAW_SEND
from server.transport import chunked_writer

if TYPE_CHECKING:
    from server.app import Runtime

__all__ = ["blueprint", "validate_task_id"]

logger = logging.getLogger(__name__)

blueprint = Blueprint("streams", __name__)

MAX_TASK_ID = 200
MAX_TASKS_PER_STREAM = 100
_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")

# The ``id`` of a final not-found event: a client that reconnects anyway sends it back as
# Last-Event-ID and gets 204, which makes every EventSource implementation stop for good.
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


def _last_event_id() -> str | None:
    """The id the client last saw: native EventSource sends a header, the polyfill a parameter."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("lastEventId")
    return raw.strip() if raw else None


def _parse_version(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _stream_response(body: AsyncIterator[bytes]) -> Response:
    # observed(): stream metrics and open/close logs (server/observe.py).
    response = Response(observed(body, path=request.path), status=200, headers=SSE_HEADERS)
    response.timeout = None  # a stream lives until it ends, not until Quart's response timeout
    return response


def _no_content() -> Response:
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


def _unavailable() -> Response:
    metrics.STREAM_ERRORS.labels("unavailable").inc()
    return json_error(503, "Database unavailable", Retry_After="2")


def _open_subscription(
    rt: Runtime, principal: Principal, task_ids: list[str], *, owner_wide: bool = False
) -> Subscription | Response:
    if rt.draining:
        return json_error(503, "Server is shutting down", Retry_After="1")
    if not rt.broker.connected.is_set():
        return _unavailable()
    try:
        sub = rt.broker.subscribe(
            principal.user_id, task_ids, owner_id=principal.user_id if owner_wide else None
        )
    except StreamLimitExceeded as exc:
        metrics.STREAM_ERRORS.labels("limit").inc()
        return json_error(429, "Too many open streams", exc.scope, Retry_After="5")
    # Whatever happens next (a disconnect before the body starts included), the end of the
    # request task releases the mailbox; unsubscribe() is idempotent, so other paths may too.
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(lambda _t: rt.broker.unsubscribe(sub))
    return sub


@dataclass
class _Stream:
    """What one open stream needs to remember between events."""

    rt: Runtime
    sub: Subscription
    principal: Principal
    # Tasks still open on this stream; the stream ends when this empties (unless owner-wide).
    open_ids: set[str]
    multi: bool = False
    owner_wide: bool = False
    # Order of ``ids`` for the multi-task resume id (a positional list of versions).
    order: list[str] = field(default_factory=list)
    # Leading events (snapshots) computed by the view before the response started.
    preamble: list[bytes] = field(default_factory=list)
    # Kinds of the events made by finish() and not yet counted as sent (counted after the write).
    kinds: list[str] = field(default_factory=list)
    # Hypercorn's own ASGI send for this request, for the direct write (see _direct_write).
    raw_send: Any = None

    def resume_id(self) -> str | None:
        if not self.multi or self.owner_wide:
            return None
        return ".".join(str(self.sub.sent.get(tid, 0)) for tid in self.order)

    def progress(self, state: TaskState) -> bytes:
        if not self.multi:
            return state.progress_event()
        return sse.encode(state.progress_json(), event="progress", id=self.resume_id())

    def finish(self, state: TaskState) -> list[bytes]:
        """Events for a state; marks the task closed when it is terminal or gone."""
        if state.deleted:
            self.open_ids.discard(state.id)
            self.kinds.append("error")
            if self.multi:
                return [events.not_found_event(state.id, event_id=self.resume_id())]
            return [events.not_found_event(event_id=END_OF_STREAM_ID)]
        out = [self.progress(state)]
        self.kinds.append("progress")
        if state.terminal:
            self.open_ids.discard(state.id)
            out.append(events.complete_event(state, with_task_id=self.multi))
            self.kinds.append("complete")
        return out

    def count_sent(self, extra: str | None = None) -> None:
        """Count what was just written: the events finish() made, and one ``extra`` kind."""
        tally = metrics.TALLY
        for kind in self.kinds:
            tally.count_sent(kind)
        self.kinds.clear()
        if extra is not None:
            tally.count_sent(extra)

    @property
    def done(self) -> bool:
        return not self.open_ids and not self.owner_wide


@blueprint.get("/api/v1/sse/tasks/<path:task_id>/progress")
@summarize(
    "Stream one task's progress (Server-Sent Events).",
    "The current state as a `progress` event (its `id` is the version), then one per "
    "committed change; after a terminal state a `complete` event, then the server "
    "closes. A missing task and another user's task both give one `error` event "
    "(`Task not found`) with `id: end`; a reconnect sending that id gets 204. " + SSE_AUTH,
)
@sse_responds("The event stream.", SINGLE_TASK_EVENTS)
@responds(204, "Nothing more will come (the client already saw the end); stop.")
@responds(400, "The task id is not valid.")
@sse_refusals("The ticket does not cover this task (it is spent anyway).")
@parameters(*SSE_PARAMETERS)
@security({"bearerAuth": []}, {"accessToken": []})
async def task_progress(task_id: str) -> Response:
    principal = await authenticate([task_id])
    problem = validate_task_id(task_id)
    if problem is not None:
        return json_error(400, "Invalid task id", problem)
    last_id = _last_event_id()
    if last_id == END_OF_STREAM_ID:
        return _no_content()
    rt = runtime()
    opened = _open_subscription(rt, principal, [task_id])
    if isinstance(opened, Response):
        return opened
    sub = opened
    try:
        snapshot = await rt.snapshots.get(task_id)
    except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
        rt.broker.unsubscribe(sub)
        return _unavailable()
    if snapshot is None or snapshot.owner_id != principal.user_id:
        rt.broker.unsubscribe(sub)
        return _stream_response(_single(events.not_found_event(event_id=END_OF_STREAM_ID), "error"))
    seen = _parse_version(last_id)
    if snapshot.terminal and seen is not None and seen >= snapshot.version:
        # The client saw the final state: 204 ends EventSource's reconnect loop.
        rt.broker.unsubscribe(sub)
        return _no_content()
    stream = _Stream(rt, sub, principal, open_ids={task_id}, raw_send=request.scope.get(RAW_SEND))
    if seen is None or seen < snapshot.version:
        sub.mark_sent(snapshot)
        stream.preamble = stream.finish(snapshot)
    else:
        # Resumed and nothing moved since: send nothing until something does.
        sub.mark_sent(snapshot)
    return _stream_response(_run(stream))


def _parse_ids(raw_values: list[str]) -> list[str] | str:
    if len(raw_values) > 1:
        return "give ids once, comma-separated"
    ids: list[str] = []
    for tid in raw_values[0].split(","):
        tid = tid.strip()
        problem = validate_task_id(tid)
        if problem is not None:
            return problem
        if tid not in ids:
            ids.append(tid)
    if len(ids) > MAX_TASKS_PER_STREAM:
        return f"at most {MAX_TASKS_PER_STREAM} task ids per stream"
    return ids


@blueprint.get("/api/v1/sse/tasks")
@summarize(
    "Stream many tasks on one connection (Server-Sent Events).",
    "With `ids=a,b,c` (at most 100): every event about a task carries its `task_id`, "
    "`complete` is sent per task and the stream closes when every listed task is terminal; "
    "a missing or foreign task gives an `error` event for that id. Without `ids`: all of "
    "the caller's non-terminal tasks and the tasks they create later, until the timeout. "
    "The `id` of an event lists the versions seen, one per listed task, for resuming. " + SSE_AUTH,
)
@sse_responds("The event stream; every event about a task has its `task_id`.", MULTI_TASK_EVENTS)
@responds(204, "Resumed, and every listed task had already finished.")
@responds(400, "`ids` is not valid (at most 100 ids, each 1 to 200 characters).")
@sse_refusals("The ticket does not cover these tasks (it is spent anyway).")
@parameters(
    optional_parameter(
        "ids", "query", "Comma-separated task ids; omitted: all of your open tasks."
    ),
    *SSE_PARAMETERS,
)
@security({"bearerAuth": []}, {"accessToken": []})
async def tasks_stream() -> Response:
    raw_ids = request.args.getlist("ids")
    owner_wide = not raw_ids
    ids: list[str] = []
    if raw_ids:
        parsed = _parse_ids(raw_ids)
        if isinstance(parsed, str):
            return json_error(400, "Invalid ids", parsed)
        ids = parsed
    # After parsing: a ticket must cover exactly these ids (an owner-wide stream takes none).
    principal = await authenticate(None if owner_wide else ids)
    rt = runtime()
    opened = _open_subscription(rt, principal, ids, owner_wide=owner_wide)
    if isinstance(opened, Response):
        return opened
    sub = opened
    try:
        if owner_wide:
            rows, sub.created_after = await db.fetch_open_tasks(rt.pool, principal.user_id)
            for tid in rows:
                rt.broker.watch(sub, tid)
            # Drop what arrived for tasks that existed but were not open at the snapshot.
            for tid in [t for t in sub.pending if t not in rows]:
                if not is_new_for_owner_stream(sub.pending[tid], sub.created_after):
                    del sub.pending[tid]
                    rt.broker.unwatch(sub, tid)
        else:
            rows = await db.fetch_tasks(rt.pool, ids)
    except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
        rt.broker.unsubscribe(sub)
        return _unavailable()

    order = ids if not owner_wide else list(rows)
    seen = _parse_positional(_last_event_id(), order) if not owner_wide else None
    stream = _Stream(
        rt, sub, principal, open_ids=set(order), multi=True, owner_wide=owner_wide, order=order
    )
    snapshots: list[TaskState] = []
    for tid in order:
        state = rows.get(tid)
        if state is None or state.owner_id != principal.user_id:
            stream.open_ids.discard(tid)
            if seen is None:
                snapshots.append(TaskState.gone(tid))
            continue
        already = seen.get(tid, -1) if seen is not None else -1
        sub.mark_sent(state)
        if already >= state.version:
            if state.terminal:
                stream.open_ids.discard(tid)
            continue
        snapshots.append(state)
    if seen is not None and stream.done:
        rt.broker.unsubscribe(sub)
        return _no_content()
    for state in snapshots:
        stream.preamble.extend(stream.finish(state))
    return _stream_response(_run(stream))


def _parse_positional(raw: str | None, order: list[str]) -> dict[str, int] | None:
    """Parse a multi-task resume id: one version per listed id, dot-separated, in order."""
    if raw is None:
        return None
    parts = raw.split(".")
    # isascii(): str.isdigit() also accepts "²", which int() refuses; 18 digits fit a bigint and
    # stay below int()'s 4300-digit limit, past which it raises instead of parsing.
    if len(parts) != len(order) or not all(
        p.isascii() and p.isdigit() and len(p) <= 18 for p in parts
    ):
        return None
    return {tid: int(p) for tid, p in zip(order, parts, strict=True)}


async def _single(chunk: bytes, kind: str) -> AsyncIterator[bytes]:
    yield chunk
    metrics.TALLY.count_sent(kind)


def _direct_write(
    stream: _Stream, transport: asyncio.WriteTransport
) -> Callable[[TaskState], bool]:
    """Write a single-task stream's ``progress`` events to its socket from the broker's dispatch.

    The ordinary path wakes the stream's task, which hands the event to Quart, Hypercorn and h11
    before it reaches the socket. With one update watched by thousands of streams that path was
    most of the CPU per watcher beyond the ``send()`` system call itself (bench fan-out profile).
    Here the event, already framed as an HTTP/1.1 chunk once per state, is written on the spot.

    The broker calls this only while the stream is parked in ``wait()`` with nothing pending, so
    nothing the stream still has to write can be overtaken. It declines (returns False, and the
    mailbox path takes over with its conflation and the send timeout) for terminal states and
    deletions, which end the stream, and whenever the socket has not drained what it was given:
    a slow client never gets more than the kernel accepts. It never sees another owner's state:
    :meth:`Subscription.offer` turns a task given to someone else into its deletion first.
    """
    sub = stream.sub
    tally = metrics.TALLY

    def write(state: TaskState) -> bool:
        if state.terminal or state.deleted or state.id not in stream.open_ids:
            return False
        if transport.is_closing() or transport.get_write_buffer_size():
            return False
        transport.write(state.progress_chunk())
        sub.mark_sent(state)
        tally.count_sent("progress")
        tally.direct_writes += 1
        observe_push((state,))
        return True

    return write


async def _run(stream: _Stream) -> AsyncIterator[bytes]:
    # Runs after the view returned, outside the request context: everything comes in `stream`.
    rt, sub = stream.rt, stream.sub
    settings = rt.settings
    loop = asyncio.get_running_loop()
    now = loop.time()
    deadline = now + settings.stream_timeout
    # The token's own end, mapped onto the loop clock (leeway as accepted at verification).
    token_deadline = now + (stream.principal.expires_at + rt.verifier.leeway - time.time())
    # Streams opened together (a reconnect storm) would otherwise beat in lockstep.
    next_beat = now + settings.heartbeat * random.uniform(0.5, 1.0)
    try:
        # Everything ready at once goes out as one write: each write costs a trip through
        # Quart, Hypercorn and h11, which dominates fan-out to thousands of streams.
        yield b"".join([_retry_field(settings.retry_ms), *stream.preamble])
        stream.count_sent("retry")
        # The response has started: from now on, progress may go straight to the socket.
        if stream.raw_send is not None and not stream.multi and not stream.owner_wide:
            transport = chunked_writer(stream.raw_send)
            if transport is not None:
                sub.direct = _direct_write(stream, transport)
        while not stream.done:
            if sub.pending:
                chunks: list[bytes] = []
                pushed: list[TaskState] = []
                for state in sub.take():
                    if state.id in stream.open_ids or stream.owner_wide:
                        chunks.extend(stream.finish(state))
                        pushed.append(state)
                if chunks:
                    yield b"".join(chunks) if len(chunks) > 1 else chunks[0]
                    stream.count_sent()
                    observe_push(pushed)  # after the write: commit -> socket
                continue
            if sub.closing is not None:
                yield _retry_field(settings.retry_ms)
                stream.count_sent("retry")
                return
            now = loop.time()
            if now >= token_deadline:
                yield events.token_expired_event()
                stream.count_sent("error")
                return
            if now >= deadline:
                yield events.timeout_event()
                stream.count_sent("timeout")
                return
            if now >= next_beat:
                yield sse.comment("heartbeat")
                stream.count_sent("heartbeat")
                next_beat = now + settings.heartbeat
                continue
            # No await since the check of sub.pending above, so no offer can be missed.
            await sub.wait(min(deadline, next_beat, token_deadline))
    finally:
        rt.broker.unsubscribe(sub)
