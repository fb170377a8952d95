"""Every SSE byte the server writes, made here: the wire encoding and the events of a stream.

Field values are sanitised so that no content can start a new field or event: ``data`` is split
on every line break into several ``data:`` lines (the client joins them back with ``\\n``), and
CR, LF and NUL are removed from ``event`` and ``id``, which must be a single line.

The events a state produces are encoded once per state (cached on the
:class:`~server.tasks.TaskState`), however many streams send them. The HTTP/1.1 framing of a
chunk is not here: it belongs to the server (:mod:`server.hypercorn_internals`).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from server.tasks import TaskState

__all__ = [
    "END_OF_STREAM_ID",
    "HEARTBEAT",
    "comment",
    "complete_event",
    "encode",
    "group_complete_event",
    "group_not_found_event",
    "multi_progress_event",
    "not_found_event",
    "progress_event",
    "retry",
    "retry_field",
    "timeout_event",
    "token_expired_event",
]

# The ``id`` of a final not-found event: a client that reconnects anyway sends it back as
# Last-Event-ID and gets 204, which makes every EventSource implementation stop for good.
END_OF_STREAM_ID = "end"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_UNSAFE_SINGLE_LINE = re.compile(r"[\r\n\0]")


def _single_line(value: str) -> str:
    return _UNSAFE_SINGLE_LINE.sub("", value)


def encode(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one event. An event with no field at all encodes to an empty bytes string."""
    parts: list[str] = []
    if event is not None:
        parts.append(f"event: {_single_line(event)}\n")
    if id is not None:
        parts.append(f"id: {_single_line(str(id))}\n")
    if retry is not None:
        if retry < 0:
            raise ValueError("retry must be a non-negative number of milliseconds")
        parts.append(f"retry: {int(retry)}\n")
    if data is not None:
        for line in _LINE_BREAK.split(data):
            parts.append(f"data: {line}\n")
    if not parts:
        return b""
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def comment(text: str = "") -> bytes:
    """An SSE comment line (ignored by clients), used as a heartbeat to keep proxies open."""
    lines = _LINE_BREAK.split(text) if text else [""]
    return "".join(f": {line}\n" if line else ":\n" for line in lines).encode("utf-8") + b"\n"


def retry(milliseconds: int) -> bytes:
    """A lone ``retry:`` field: sets the reconnection delay without dispatching an event."""
    return encode(retry=milliseconds)


def retry_field(base_ms: int) -> bytes:
    """The ``retry:`` line a stream starts and ends with."""
    # Jitter spreads the reconnects of many clients that lost the same server at the same moment.
    return retry(int(base_ms * random.uniform(1.0, 1.5)))


HEARTBEAT = comment("heartbeat")


def progress_event(state: TaskState) -> bytes:
    """The whole single-task ``progress`` event (``id`` is the version), cached on the state."""
    event = state.memo_event
    if event is None:
        event = state.memo_event = encode(state.progress_json(), event="progress", id=state.version)
    return event


def multi_progress_event(state: TaskState, resume_id: str | None) -> bytes:
    """A multi-task stream's ``progress`` event: its ``id`` is the stream's resume id."""
    return encode(state.progress_json(), event="progress", id=resume_id)


def complete_event(task: TaskState, *, with_task_id: bool = False) -> bytes:
    """The ``complete`` event for a terminal state, encoded once per state and variant."""
    cached = task.memo_complete.get(with_task_id)
    if cached is None:
        cached = task.memo_complete[with_task_id] = _encode_complete(task, with_task_id)
    return cached


def _encode_complete(task: TaskState, with_task_id: bool) -> bytes:
    body: dict[str, Any] = {"task_id": task.id} if with_task_id else {}
    body["state"] = task.state
    if task.state == "failed":
        body["error"] = task.error
    return encode(json.dumps(body), event="complete")


def group_complete_event(group_id: str, tasks: int, *, event_id: str | None) -> bytes:
    """The last event of a group stream: the group is closed and every task in it is terminal.
    Its ``id`` is the final resume id, which a reconnect turns into 204."""
    body = {"group_id": group_id, "tasks": tasks}
    return encode(json.dumps(body), event="group_complete", id=event_id)


def group_not_found_event() -> bytes:
    """The one event of a stream on a group that does not exist or is not the caller's."""
    return encode(json.dumps({"error": "Group not found"}), event="error", id=END_OF_STREAM_ID)


def not_found_event(task_id: str | None = None, *, event_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": "Task not found"}
    if task_id is not None:
        body["task_id"] = task_id
    return encode(json.dumps(body), event="error", id=event_id)


def token_expired_event() -> bytes:
    return encode(json.dumps({"error": "Token expired"}), event="error")


def timeout_event() -> bytes:
    return encode(json.dumps({"message": "Stream timeout"}), event="timeout")
