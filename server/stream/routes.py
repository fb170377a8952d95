"""The SSE endpoints.

- ``GET /api/v1/sse/tasks/{task_id}/progress``: one task.
- ``GET /api/v1/sse/tasks?ids=a,b,c``: many tasks on one connection (browsers allow only six
  HTTP/1.1 connections per origin); without ``ids``, every non-terminal task of the caller and
  the tasks they create later, until the timeout.
- ``GET /api/v1/sse/groups/{group_id}/progress``: every task of one of the caller's groups,
  including tasks created later, until the group is closed and all its tasks are terminal.

Order matters for correctness: subscribe first, then read the rows, so a change committed between
the two is in the mailbox rather than lost; versions at or below the last one sent are dropped.
Once a stream opens, :mod:`server.stream.session` runs it to its close.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from quart import Blueprint, Quart, Response, request
from quart.blueprints import BlueprintSetupState

from server import db, metrics
from server.http import authenticate, json_error, runtime, unavailable
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
from server.runtime import Runtime
from server.schemas import GROUP_EVENTS, MULTI_TASK_EVENTS, SINGLE_TASK_EVENTS
from server.sendtimeout import connection_of
from server.stream import encoder
from server.stream.asgi import StreamHTTPConnection
from server.stream.encoder import END_OF_STREAM_ID
from server.stream.observe import CloseReason, Ending, observed
from server.stream.registry import StreamLimitExceeded
from server.stream.session import StreamSession, run, single_event
from server.tasks import MAX_GROUP_TASKS, MAX_TASKS_PER_STREAM, TaskState, validate_task_id

__all__ = ["blueprint"]

logger = logging.getLogger(__name__)

blueprint = Blueprint("streams", __name__)


@blueprint.record_once
def _streams_run_in_the_request_task(state: BlueprintSetupState) -> None:
    # One task fewer per open stream (server/stream/asgi.py); other paths are unchanged.
    app = state.app
    if isinstance(app, Quart):
        app.asgi_http_class = StreamHTTPConnection


SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


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


def _stream_response(body: AsyncIterator[bytes], ending: Ending) -> Response:
    # observed(): stream metrics and open/close logs (server/stream/observe.py).
    response = Response(
        observed(body, path=request.path, ending=ending), status=200, headers=SSE_HEADERS
    )
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


def _refusal(rt: Runtime) -> Response | None:
    """Why no stream can open now, if it cannot: the server drains, or the listener is down."""
    if rt.draining:
        return json_error(503, "Server is shutting down", Retry_After="1")
    if not rt.broker.connected.is_set():
        return unavailable()
    return None


def _too_many(exc: StreamLimitExceeded) -> Response:
    metrics.STREAM_ERRORS.labels("limit").inc()
    return json_error(429, "Too many open streams", exc.scope, Retry_After="5")


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
    refused = _refusal(rt)
    if refused is not None:
        return refused
    try:
        lease = rt.broker.open(principal.user_id, [task_id])
        async with lease as sub:
            # Database errors here become 503 (server/http.py, unavailable).
            snapshot = await rt.snapshots.get(task_id)
            if snapshot is None or snapshot.owner_id != principal.user_id:
                return _stream_response(
                    single_event(encoder.not_found_event(event_id=END_OF_STREAM_ID), "error"),
                    Ending(CloseReason.NOT_FOUND),
                )
            seen = _parse_version(last_id)
            if snapshot.terminal and seen is not None and seen >= snapshot.version:
                # The client saw the final state: 204 ends EventSource's reconnect loop.
                return _no_content()
            stream = StreamSession(
                rt, lease, principal, open_ids={task_id}, connection=connection_of(request.scope)
            )
            sub.mark_sent(snapshot)
            if seen is None or seen < snapshot.version:
                stream.preamble = stream.finish(snapshot)
            # else: resumed and nothing moved since: send nothing until something does.
            lease.keep()
            return _stream_response(run(stream), stream.ending)
    except StreamLimitExceeded as exc:
        return _too_many(exc)


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
    refused = _refusal(rt)
    if refused is not None:
        return refused
    try:
        lease = rt.broker.open(principal.user_id, ids, owner_wide=owner_wide)
        async with lease as sub:
            # Database errors here become 503 (server/http.py, unavailable).
            if owner_wide:
                rows = await lease.owner_snapshot()
            else:
                rows = await db.fetch_tasks(rt.pool, ids)
            order = ids if not owner_wide else list(rows)
            seen = _parse_positional(_last_event_id(), order) if not owner_wide else None
            stream = StreamSession(
                rt,
                lease,
                principal,
                open_ids=set(order),
                multi=True,
                owner_wide=owner_wide,
                order=order,
                connection=connection_of(request.scope),
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
                return _no_content()
            for state in snapshots:
                stream.preamble.extend(stream.finish(state))
            lease.keep()
            return _stream_response(run(stream), stream.ending)
    except StreamLimitExceeded as exc:
        return _too_many(exc)


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


def _parse_group_resume(raw: str | None) -> dict[int, int] | None:
    """Parse a group stream's resume id: one version per sequence number of the group, from 1,
    dot-separated (0: not seen)."""
    if raw is None:
        return None
    parts = raw.split(".")
    if len(parts) > MAX_GROUP_TASKS or not all(
        p.isascii() and p.isdigit() and len(p) <= 18 for p in parts
    ):
        return None
    return {n: int(p) for n, p in enumerate(parts, start=1)}


@blueprint.get("/api/v1/sse/groups/<path:group_id>/progress")
@summarize(
    "Stream every task of a group (Server-Sent Events).",
    "Every task of one of your groups, as on a multi-task stream (each event carries its "
    "`task_id`, `complete` per task), including tasks that join the group after the stream "
    "opened. When the group is closed (`POST /api/v1/groups/{group_id}/close`) and every task "
    "in it is terminal, a `group_complete` event ends the stream. A group that does not exist "
    "or is not yours gives one `error` event (`Group not found`) with `id: end`. The `id` of "
    "an event lists the versions seen, one per task of the group in the order they joined it, "
    "for resuming. Tickets do not open group streams. " + SSE_AUTH,
)
@sse_responds("The event stream; every event about a task has its `task_id`.", GROUP_EVENTS)
@responds(204, "Resumed, and the group had already ended.")
@responds(400, "The group id is not valid (1 to 200 characters, no control characters).")
@sse_refusals("A ticket was given: tickets do not open group streams.")
@parameters(*SSE_PARAMETERS)
@security({"bearerAuth": []}, {"accessToken": []})
async def group_progress(group_id: str) -> Response:
    # No ticket fits (None): a ticket names task ids, and a group grows after it was bought.
    principal = await authenticate(None)
    problem = validate_task_id(group_id)
    if problem is not None:
        return json_error(400, "Invalid group id", problem.replace("task id", "group id"))
    last_id = _last_event_id()
    if last_id == END_OF_STREAM_ID:
        return _no_content()
    rt = runtime()
    refused = _refusal(rt)
    if refused is not None:
        return refused
    try:
        lease = rt.broker.open(principal.user_id, group_id=group_id)
        async with lease as sub:
            # Database errors here become 503 (server/http.py, unavailable).
            view = await lease.group_snapshot()
            if view is None:
                return _stream_response(
                    single_event(encoder.group_not_found_event(), "error"),
                    Ending(CloseReason.NOT_FOUND),
                )
            seen = _parse_group_resume(last_id)
            stream = StreamSession(
                rt,
                lease,
                principal,
                open_ids=set(),
                multi=True,
                group_id=group_id,
                connection=connection_of(request.scope),
            )
            snapshots: list[TaskState] = []
            for state in view.tasks.values():
                if state.owner_id != principal.user_id or state.group_seq is None:
                    continue  # given to someone else: not shown (authorization is per task)
                stream.seqs[state.group_seq] = state.id
                sub.mark_sent(state)
                already = seen.get(state.group_seq, 0) if seen is not None else 0
                if already >= state.version:
                    if not state.terminal:
                        stream.open_ids.add(state.id)
                    continue
                snapshots.append(state)
            if seen is not None and not snapshots and stream.done:
                return _no_content()
            for state in snapshots:
                stream.preamble.extend(stream.finish(state))
            lease.keep()
            return _stream_response(run(stream), stream.ending)
    except StreamLimitExceeded as exc:
        return _too_many(exc)
