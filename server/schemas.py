"""The documented JSON shapes that no route module owns: error bodies, health, and SSE event data.

These models are documentation only: the server builds its bodies and events elsewhere (the
SSE events in :mod:`server.stream.encoder`). ``tests/test_openapi_events.py`` reads real streams
from a real server and checks every event's ``data`` against the schemas served at
``/openapi.json``, both ways, so what is documented here and what goes on the wire cannot
drift apart.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "GROUP_EVENTS",
    "MULTI_TASK_EVENTS",
    "SINGLE_TASK_EVENTS",
    "CompleteEventData",
    "ErrorBody",
    "ErrorEventData",
    "FieldError",
    "GroupClosedBody",
    "GroupCompleteEventData",
    "Health",
    "MultiCompleteEventData",
    "MultiErrorEventData",
    "ProgressEventData",
    "Readiness",
    "TimeoutEventData",
    "ValidationErrorBody",
]


class ErrorBody(BaseModel):
    """The one error shape of the API."""

    error: str = Field(description="What went wrong, for people.", examples=["Task not found"])
    detail: Any = Field(default=None, description="More about it, when there is more.")


class FieldError(BaseModel):
    field: str = Field(description="The field, dotted for nested ones; `body` for the whole.")
    message: str


class ValidationErrorBody(BaseModel):
    """A request that does not validate: one entry per field."""

    error: str = Field(examples=["Invalid request"])
    detail: list[FieldError]


class Health(BaseModel):
    """The process is up."""

    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    """Whether this instance can serve streams: database answering, LISTEN connection up."""

    status: str = Field(examples=["ready", "unavailable"])
    reasons: list[str] | None = Field(default=None, description="Why not (only when unavailable).")


# -- SSE event data: one JSON object per event ------------------------------------------------


class ProgressEventData(BaseModel):
    """The task's state. First the current one, then one per change."""

    task_id: str
    state: str
    progress: float = Field(description="Percent, 0 to 100.")
    estimated_time: int | None = Field(
        description="Seconds left: null once the task is finished; else the writer's value, "
        "else derived (see README), else null."
    )
    updated_at: str = Field(description="ISO 8601, UTC.")
    version: int
    metadata: dict[str, Any] | None = Field(
        default=None,
        description="The task's metadata (a JSON object of at most 2048 bytes); absent when "
        "the task has none.",
    )


class CompleteEventData(BaseModel):
    """The task reached a terminal state (after its last `progress`)."""

    state: str = Field(description="`success`, `failed` or `cancelled`.")
    error: str | None = Field(default=None, description="Present when `failed`.")


class MultiCompleteEventData(CompleteEventData):
    """A listed task reached a terminal state (after its last `progress`)."""

    task_id: str


class ErrorEventData(BaseModel):
    """The task does not exist or is not yours, or the token expired."""

    error: str = Field(examples=["Task not found", "Token expired"])


class MultiErrorEventData(ErrorEventData):
    """A task does not exist or is not yours (`task_id` says which), or the token expired."""

    task_id: str | None = Field(default=None, description="Absent when the token expired.")


class GroupCompleteEventData(BaseModel):
    """The group is closed and every task in it is terminal: the last event of a group stream."""

    group_id: str
    tasks: int = Field(description="How many of the group's tasks the stream showed.")


class GroupClosedBody(BaseModel):
    """A closed group."""

    group_id: str
    owner_id: str
    closed_at: str = Field(description="When it was closed (ISO 8601).")
    tasks: int = Field(description="How many tasks joined it.")


class TimeoutEventData(BaseModel):
    """The stream reached TASKSTREAM_STREAM_TIMEOUT; reconnect to go on."""

    message: str = Field(examples=["Stream timeout"])


# What each SSE route sends, by event type.
SINGLE_TASK_EVENTS: dict[str, type[BaseModel]] = {
    "progress": ProgressEventData,
    "complete": CompleteEventData,
    "error": ErrorEventData,
    "timeout": TimeoutEventData,
}
MULTI_TASK_EVENTS: dict[str, type[BaseModel]] = {
    "progress": ProgressEventData,
    "complete": MultiCompleteEventData,
    "error": MultiErrorEventData,
    "timeout": TimeoutEventData,
}
GROUP_EVENTS: dict[str, type[BaseModel]] = {
    **MULTI_TASK_EVENTS,
    "group_complete": GroupCompleteEventData,
}
