"""The task API's request and response models: the validation rules, and (through quart-schema)
the OpenAPI schemas of :mod:`server.api`'s routes."""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.tasks import (
    MAX_ERROR,
    MAX_ETA,
    MAX_GROUP_TASKS,
    MAX_METADATA,
    MAX_STATE,
    MAX_TASK_ID,
    metadata_problem,
)

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_WAIT",
    "BulkItemResult",
    "BulkPatch",
    "BulkResults",
    "ListQuery",
    "Task",
    "TaskCreate",
    "TaskPage",
    "TaskPatch",
    "TaskQuery",
    "TaskUpdate",
]

MAX_WAIT = 60
MAX_LIMIT = 100
DEFAULT_LIMIT = 20

# -- request models: the validation rules, and (through quart-schema) the OpenAPI schemas -----

_NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"

TaskId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_TASK_ID,
        pattern=_NO_CONTROL,
        strict=True,
        description=f"1 to {MAX_TASK_ID} characters, no control characters.",
        examples=["task_abc123"],
    ),
]
OwnerId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TASK_ID, pattern=_NO_CONTROL, strict=True),
]
State = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_STATE,
        pattern=_NO_CONTROL,
        strict=True,
        description=(
            "Free-form state name. `success`, `failed` and `cancelled` are terminal: the task "
            "cannot change after them."
        ),
        examples=["transcribing"],
    ),
]
Progress = Annotated[
    float,
    Field(ge=0, le=100, allow_inf_nan=False, strict=True, description="Percent, 0 to 100."),
]
Eta = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_ETA,
        strict=True,
        description="Seconds left, a non-negative integer. `null`: the server derives it.",
    ),
]
ErrorText = Annotated[str, Field(max_length=MAX_ERROR, strict=True)]
GroupId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_TASK_ID,
        pattern=_NO_CONTROL,
        strict=True,
        description=(
            f"The task's group (batch or parent): 1 to {MAX_TASK_ID} characters, no control "
            "characters. Set at creation only. The first task names a new group, owned by its "
            f"owner; a group takes at most {MAX_GROUP_TASKS} tasks, all of that owner's, until "
            "it is closed."
        ),
        examples=["batch_2026_12_02"],
    ),
]
METADATA_DESCRIPTION = (
    f"A JSON object of your own (at most {MAX_METADATA} bytes as compact UTF-8 JSON), carried "
    "in `progress` events; null: none."
)


def _check_metadata(value: Any) -> Any:
    if value is not None and (problem := metadata_problem(value)) is not None:
        raise ValueError(problem)
    return value


class TaskCreate(BaseModel):
    """A new task. Every field is optional; an empty body creates a `pending` task."""

    model_config = ConfigDict(extra="forbid")

    id: TaskId | None = Field(
        default=None, description="The task id; omitted: the server makes `task_<random>`."
    )
    owner_id: OwnerId | None = Field(
        default=None,
        description="Owner of the task; another user than the caller needs scope `tasks:write`.",
    )
    state: State = "pending"
    progress: Progress = 0.0
    estimated_time: Eta | None = None
    group_id: GroupId | None = None
    metadata: dict[str, Any] | None = Field(default=None, description=METADATA_DESCRIPTION)

    @field_validator("metadata")
    @classmethod
    def _metadata_fits(cls, value: Any) -> Any:
        return _check_metadata(value)


class TaskPatch(BaseModel):
    """Fields to change; absent fields stay as they are. At least one is required."""

    model_config = ConfigDict(extra="forbid")

    state: State | None = None
    progress: Progress | None = None
    estimated_time: Eta | None = None
    error: ErrorText | None = Field(
        default=None,
        description=f"Why the task failed (at most {MAX_ERROR} characters), or null.",
    )
    metadata: dict[str, Any] | None = Field(default=None, description=METADATA_DESCRIPTION)

    @field_validator("metadata")
    @classmethod
    def _metadata_fits(cls, value: Any) -> Any:
        return _check_metadata(value)

    @field_validator("state", "progress")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.model_fields_set:
            raise ValueError(
                "give at least one of state, progress, estimated_time, error, metadata"
            )
        return self


class TaskUpdate(TaskPatch):
    """One item of a bulk update: the task's id and the fields to change, as in a PATCH."""

    id: TaskId

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.model_fields_set - {"id"}:
            raise ValueError("give at least one of state, progress, estimated_time, error")
        return self


class BulkPatch(BaseModel):
    """Many task updates in one request. Each item is validated and answered on its own; items
    for the same task are applied in the order given."""

    model_config = ConfigDict(extra="forbid")

    updates: list[TaskUpdate] = Field(
        min_length=1,
        description="The updates, 1 to `TASKSTREAM_BULK_MAX_ITEMS` (default 1000) of them.",
    )


class TaskQuery(BaseModel):
    """Query parameters of `GET /api/v1/tasks/{task_id}`."""

    model_config = ConfigDict(extra="ignore")

    wait: float | None = Field(
        default=None,
        gt=0,
        le=MAX_WAIT,
        allow_inf_nan=False,
        description=(
            "Long poll: wait up to this many seconds (at most 60) for a version above "
            "`after_version`; 304 if none comes."
        ),
    )
    after_version: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Long poll: the version the client has. Defaults to the `If-None-Match` ETag. "
            "Required with `wait` if that header is absent."
        ),
    )


class ListQuery(BaseModel):
    """Query parameters of `GET /api/v1/tasks`."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="Page size.")
    cursor: str | None = Field(
        default=None, max_length=1000, description="`next_cursor` of the previous page."
    )
    state: State | None = Field(default=None, description="Only tasks in this state.")


# -- response models (documentation only: handlers build the JSON themselves) ---------------


class Task(BaseModel):
    """A task: the fields of the `progress` event plus `error`, `owner_id` and timestamps."""

    task_id: str
    state: str
    progress: float
    estimated_time: int | None = Field(
        description=(
            "Seconds left: null once the task is finished; else the writer's value, else "
            "derived from the progress rate since the task started (see the README), else null."
        )
    )
    updated_at: str = Field(description="ISO 8601, UTC.")
    version: int = Field(description="Bumped by every committed change; also the ETag.")
    error: str | None
    owner_id: str
    created_at: str
    started_at: str | None = Field(
        description="When the task was first seen at work (the anchor of the derived ETA)."
    )
    group_id: str | None = Field(description="The task's group, or null.")
    metadata: dict[str, Any] | None = Field(description="The task's metadata, or null.")


class BulkItemResult(BaseModel):
    """One item's answer: `status` and body fields as the single `PATCH` of that task would
    give them (`task` for 200; `error` and maybe `detail` otherwise)."""

    id: str | None = Field(description="The item's task id (null if the item had none).")
    status: int = Field(description="200, 400, 404, 409, 422 or 503, as a single PATCH.")
    task: Task | None = None
    error: str | None = None
    detail: Any = None


class BulkResults(BaseModel):
    """One result per item, in the order of the request."""

    results: list[BulkItemResult]


class TaskPage(BaseModel):
    """One page of the caller's tasks, newest first."""

    tasks: list[Task]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last.")
