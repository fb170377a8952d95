"""Task state as it travels from a NOTIFY payload or a table row to the SSE events of a stream.

A :class:`TaskState` is built once per notification and shared by every subscriber of that task,
and its encoded ``progress`` event is cached on it, so fan-out to N clients encodes JSON once.
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
    "not_found_event",
    "timeout_event",
    "token_expired_event",
]

TERMINAL_STATES = frozenset({"success", "failed", "cancelled"})


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return str(value)


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
    _progress_json: str | None = field(default=None, repr=False, compare=False)
    _progress_bytes: bytes | None = field(default=None, repr=False, compare=False)

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
            created_at=d.get("created_at"),
            updated_at=d.get("updated_at"),
            deleted=bool(d.get("deleted", False)),
            committed_ts=d.get("ts"),
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
        )

    def progress_data(self) -> dict[str, Any]:
        """The ``progress`` event's JSON object (also the core of the REST representation)."""
        return {
            "task_id": self.id,
            "state": self.state,
            "progress": self.progress,
            "estimated_time": self.estimated_time,
            "updated_at": self.updated_at,
            "version": self.version,
        }

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


def complete_event(task: TaskState, *, with_task_id: bool = False) -> bytes:
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
