"""Task state as it travels from a NOTIFY payload or a table row to the SSE events of a stream.

A :class:`TaskState` is built once per notification and shared by every subscriber of that task,
and its encoded ``progress`` event is cached on it, so fan-out to N clients encodes JSON once.

It is also where a missing ``estimated_time`` is derived (:func:`derive_eta`): once per state, in
:meth:`TaskState.progress_data`, the one place task state becomes an event or an API body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server import sse

__all__ = [
    "TERMINAL_STATES",
    "TaskState",
    "complete_event",
    "derive_eta",
    "not_found_event",
    "timeout_event",
    "token_expired_event",
]

TERMINAL_STATES = frozenset({"success", "failed", "cancelled"})

# The largest ETA reported (the writer's column is a PostgreSQL integer, so is the derived value).
MAX_ETA = 2_147_483_647


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


def _utc(value: str | None) -> str | None:
    """A timestamp from a NOTIFY payload (in the writer's session time zone), in the same UTC
    ISO 8601 form as one read from a row, so every event and body formats times alike."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).astimezone(UTC).isoformat()
    except ValueError:
        return value


def _epoch(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def derive_eta(
    progress: float,
    updated_at: str | None,
    started_at: str | None,
    start_progress: float | None,
) -> int | None:
    """Seconds left at the observed rate since the task started, or None if it cannot be told.

    With the start anchor ``(t0, p0)`` = (``started_at``, ``start_progress``) and the current
    observation ``(t, p)`` = (``updated_at``, ``progress``)::

        rate = (p - p0) / (t - t0)            # percent per second since the task started
        eta  = (100 - p) / rate = (t - t0) * (100 - p) / (p - p0)

    rounded to whole seconds. It is None when there is no anchor yet, when no time has passed or
    no progress was made since it (``t <= t0`` or ``p <= p0``), and at 100 %, so it is never
    negative and never a division by zero. The value is as of ``updated_at``: a client that wants a
    countdown subtracts the time elapsed since then.
    """
    if start_progress is None or progress >= 100 or progress <= start_progress:
        return None
    t0, t = _epoch(started_at), _epoch(updated_at)
    if t0 is None or t is None or t <= t0:
        return None
    eta = (t - t0) * (100.0 - progress) / (progress - start_progress)
    return min(MAX_ETA, max(0, round(eta)))


@dataclass(slots=True)
class TaskState:
    """One committed version of a task (or its deletion)."""

    id: str
    owner_id: str
    version: int
    state: str = "pending"
    progress: float = 0.0
    estimated_time: int | None = None
    error: str | None = None
    error_truncated: bool = False
    created_at: str | None = None
    updated_at: str | None = None
    deleted: bool = False
    # Epoch seconds stamped by the trigger (clock_timestamp()), for push-latency measurements.
    committed_ts: float | None = None
    # The ETA anchor kept by the trigger (sql/002_task_started.sql): when work was first seen.
    started_at: str | None = None
    start_progress: float | None = None
    # When the task passed to this owner (sql/004_owner_since.sql); None: since it was created.
    owner_since: str | None = None
    # The memo of `eta`; init=False so that dataclasses.replace() never copies a stale one.
    _eta: int | None = field(default=None, init=False, repr=False, compare=False)
    _eta_known: bool = field(default=False, init=False, repr=False, compare=False)
    _progress_json: str | None = field(default=None, repr=False, compare=False)
    _progress_bytes: bytes | None = field(default=None, repr=False, compare=False)
    _progress_chunk: bytes | None = field(default=None, init=False, repr=False, compare=False)
    # The encoded ``complete`` events (single-task, multi-task), shared by every watcher.
    _complete_bytes: dict[bool, bytes] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_notification(cls, payload: str) -> TaskState:
        d = json.loads(payload)
        return cls(
            id=d["id"],
            owner_id=d["owner_id"],
            version=int(d["version"]),
            state=d.get("state", "pending"),
            progress=float(d.get("progress", 0.0)),
            estimated_time=d.get("estimated_time"),
            error=d.get("error"),
            error_truncated=bool(d.get("error_truncated", False)),
            created_at=_utc(d.get("created_at")),
            updated_at=_utc(d.get("updated_at")),
            deleted=bool(d.get("deleted", False)),
            committed_ts=d.get("ts"),
            started_at=_utc(d.get("started_at")),
            start_progress=_float_or_none(d.get("start_progress")),
            owner_since=_utc(d.get("owner_since")),
        )

    @classmethod
    def from_row(cls, row: dict[str, Any], *, error_max_chars: int = 1000) -> TaskState:
        error = row.get("error")
        truncated = error is not None and len(error) > error_max_chars
        return cls(
            id=row["id"],
            owner_id=row["owner_id"],
            version=int(row["version"]),
            state=row["state"],
            progress=float(row["progress"]),
            estimated_time=row["estimated_time"],
            error=error[:error_max_chars] if truncated and error is not None else error,
            error_truncated=truncated,
            created_at=_iso(row.get("created_at")),
            updated_at=_iso(row.get("updated_at")),
            started_at=_iso(row.get("started_at")),
            start_progress=_float_or_none(row.get("start_progress")),
            owner_since=_iso(row.get("owner_since")),
        )

    @classmethod
    def gone(cls, task_id: str) -> TaskState:
        """What a subscriber gets for a task that was deleted or is not (or no longer) theirs:
        the two read the same, so a stream never tells another owner's task from a missing one."""
        return cls(id=task_id, owner_id="", version=0, deleted=True)

    @property
    def eta(self) -> int | None:
        """None for a finished (or deleted) task, else the writer's ``estimated_time`` if set,
        else the derived one.

        A finished task has no time left to estimate: null, not 0, because 0 would read as
        "done any second now" on a task that failed or was cancelled. Writers often leave their
        last ``estimated_time`` in the row when they set the final state, so it must not leak.
        Computed at most once per state, however many clients and requests read it.
        """
        if not self._eta_known:
            if self.terminal or self.deleted:
                self._eta = None
            elif self.estimated_time is not None:
                self._eta = self.estimated_time
            else:
                self._eta = derive_eta(
                    self.progress, self.updated_at, self.started_at, self.start_progress
                )
            self._eta_known = True
        return self._eta

    def progress_data(self) -> dict[str, Any]:
        """The ``progress`` event's JSON object (also the core of the REST representation)."""
        return {
            "task_id": self.id,
            "state": self.state,
            "progress": self.progress,
            "estimated_time": self.eta,
            "updated_at": self.updated_at,
            "version": self.version,
        }

    def api_data(self) -> dict[str, Any]:
        """The REST representation: the ``progress`` event's fields plus the task's details."""
        data = self.progress_data()
        data["error"] = self.error
        data["owner_id"] = self.owner_id
        data["created_at"] = self.created_at
        data["started_at"] = self.started_at
        return data

    def progress_json(self) -> str:
        """The ``progress`` data, encoded once per state however many clients receive it."""
        if self._progress_json is None:
            self._progress_json = json.dumps(self.progress_data(), separators=(",", ":"))
        return self._progress_json

    def progress_event(self) -> bytes:
        """The whole single-task ``progress`` event (``id`` is the version), cached."""
        if self._progress_bytes is None:
            self._progress_bytes = sse.encode(
                self.progress_json(), event="progress", id=self.version
            )
        return self._progress_bytes

    def progress_chunk(self) -> bytes:
        """:meth:`progress_event` framed as one HTTP/1.1 chunk (for the direct write), cached."""
        if self._progress_chunk is None:
            event = self.progress_event()
            self._progress_chunk = b"%x\r\n%b\r\n" % (len(event), event)
        return self._progress_chunk


def complete_event(task: TaskState, *, with_task_id: bool = False) -> bytes:
    """The ``complete`` event for a terminal state, encoded once per state and variant."""
    cached = task._complete_bytes.get(with_task_id)
    if cached is None:
        cached = task._complete_bytes[with_task_id] = _encode_complete(task, with_task_id)
    return cached


def _encode_complete(task: TaskState, with_task_id: bool) -> bytes:
    body: dict[str, Any] = {"task_id": task.id} if with_task_id else {}
    body["state"] = task.state
    if task.state == "failed":
        body["error"] = task.error
    return sse.encode(json.dumps(body), event="complete")


def not_found_event(task_id: str | None = None, *, event_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": "Task not found"}
    if task_id is not None:
        body["task_id"] = task_id
    return sse.encode(json.dumps(body), event="error", id=event_id)


def token_expired_event() -> bytes:
    return sse.encode(json.dumps({"error": "Token expired"}), event="error")


def timeout_event() -> bytes:
    return sse.encode(json.dumps({"message": "Stream timeout"}), event="timeout")
