"""The task REST API under ``/api/v1/tasks``: create, read (with ETag and long poll), list, update,
cancel. JSON in and out; every error is ``{"error": ..., "detail"?: ...}``.

Ownership is the stream's rule: a task that is not the caller's answers exactly like a missing
one (404). The one exception is scope ``tasks:write`` (a worker's or service's token): it may
create tasks for any owner and PATCH any task. Reads and cancel stay owner-only for every token.

Long poll (``?wait=S&after_version=N``) waits on the broker, like a stream: it subscribes a
mailbox *first*, then reads the row, so no change can fall in between, and the process's one
LISTEN connection wakes it. No waiting client ever queries the database again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import wraps
from typing import Annotated, Any, Self, TypeVar
from urllib.parse import quote

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from quart import Blueprint, Response, g, jsonify, request
from quart_schema import document_request, validate_querystring
from quart_schema.conversion import model_load
from quart_schema.validation import RequestSchemaValidationError

from server import db
from server.auth import Principal
from server.broker import StreamLimitExceeded
from server.events import TaskState
from server.http import authenticate, json_error, runtime
from server.openapi import (
    ERROR_RESPONSES,
    parameters,
    responds,
)
from server.streams import validate_task_id

__all__ = [
    "MAX_ERROR",
    "MAX_STATE",
    "MAX_WAIT",
    "SCOPE_WRITE",
    "TaskCreate",
    "TaskPatch",
    "blueprint",
]

blueprint = Blueprint("api", __name__)
TASKS_PREFIX = "/api/v1/tasks/"
CANCEL_ALLOW = "OPTIONS, POST"

SCOPE_WRITE = "tasks:write"
MAX_ID = 200
MAX_STATE = 64
MAX_ERROR = 1000
MAX_ETA = 2_147_483_647
MAX_WAIT = 60
MAX_LIMIT = 100
DEFAULT_LIMIT = 20

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# -- request models: the validation rules, and (through quart-schema) the OpenAPI schemas -----

_NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"

TaskId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_ID,
        pattern=_NO_CONTROL,
        strict=True,
        description="1 to 200 characters, no control characters.",
        examples=["task_abc123"],
    ),
]
OwnerId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_ID, pattern=_NO_CONTROL, strict=True),
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


class TaskPatch(BaseModel):
    """Fields to change; absent fields stay as they are. At least one is required."""

    model_config = ConfigDict(extra="forbid")

    state: State | None = None
    progress: Progress | None = None
    estimated_time: Eta | None = None
    error: ErrorText | None = Field(
        default=None, description="Why the task failed (at most 1000 characters), or null."
    )

    @field_validator("state", "progress")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("give at least one of state, progress, estimated_time, error")
        return self


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


class TaskPage(BaseModel):
    """One page of the caller's tasks, newest first."""

    tasks: list[Task]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last.")


# -- helpers -------------------------------------------------------------------------------


def authenticated(scope: str | None = None) -> Callable[[F], F]:
    """Authenticate before anything else (so a bad token is 401 even with a bad body), then
    require ``scope`` if given (403). The principal is in ``g.principal``."""

    def decorator(func: F) -> F:
        @wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = await authenticate()
            if scope is not None and scope not in principal.scopes:
                return json_error(403, "Forbidden", f"this needs scope {scope}")
            g.principal = principal
            return await func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def json_body(model: type[BaseModel]) -> Callable[[F], F]:
    """Validate a JSON body with ``model`` (quart-schema's loader and error type, so the app's
    one handler turns failures into 422). An empty body counts as ``{}``."""

    def decorator(func: F) -> F:
        func = document_request(model)(func)

        @wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            raw = await request.get_data(as_text=False)
            data: Any = {}
            if raw.strip():
                if not request.is_json:
                    return json_error(415, "Unsupported media type", "send application/json")
                try:
                    data = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    return json_error(400, "Invalid JSON")
            loaded = model_load(data, model, RequestSchemaValidationError)
            return await func(*args, data=loaded, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def principal() -> Principal:
    p: Principal = g.principal
    return p


def _etag(version: int) -> str:
    return f'"{version}"'


def task_response(task: TaskState, status: int = 200, **headers: str) -> Response:
    response = jsonify(task.api_data())
    response.status_code = status
    response.headers["ETag"] = _etag(task.version)
    # Private: the body depends on the token. no-cache: revalidate (cheaply, with the ETag).
    response.headers["Cache-Control"] = "private, no-cache"
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def not_modified(version: int) -> Response:
    response = Response("", status=304)
    response.headers["ETag"] = _etag(version)
    response.headers["Cache-Control"] = "private, no-cache"
    return response


def not_found() -> Response:
    return json_error(404, "Task not found")


def invalid_task_id(problem: str) -> Response:
    """400, as on the stream route: no task can have this id, so there is nothing to hide."""
    return json_error(400, "Invalid task id", problem)


def _unavailable() -> Response:
    return json_error(503, "Database unavailable", Retry_After="2")


# A version is a PostgreSQL bigint: at most 19 digits.
_MAX_VERSION_DIGITS = 19


def _version_from_if_none_match() -> int | None:
    """The version named by ``If-None-Match`` (the lowest tag that is a version), or None.

    Hostile tags are not versions: ``""`` parses to None, ``"²"`` passes ``isdigit()`` but not
    ``int()``, and 4,400 digits pass both checks and then exceed ``int()``'s digit limit.
    """
    versions = [
        int(tag)
        for tag in request.if_none_match.as_set(include_weak=True)
        if tag and tag.isascii() and tag.isdigit() and len(tag) <= _MAX_VERSION_DIGITS
    ]
    return min(versions) if versions else None


def _matches(version: int) -> bool:
    etags = request.if_none_match
    return bool(etags) and etags.contains_weak(str(version))


def _visible(task: TaskState | None, user_id: str) -> bool:
    return task is not None and not task.deleted and task.owner_id == user_id


def _encode_cursor(task: TaskState) -> str:
    raw = json.dumps([task.created_at, task.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, task_id = json.loads(raw)
        if not isinstance(created, str) or not isinstance(task_id, str):
            return None
        when = datetime.fromisoformat(created)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        return None
    if when.tzinfo is None:
        return None
    return when, task_id


def _invalid(field: str, message: str) -> Response:
    return json_error(422, "Invalid request", [{"field": field, "message": message}])


def new_task_id() -> str:
    """``task_`` and 16 URL-safe random characters (96 bits)."""
    return "task_" + secrets.token_urlsafe(12)


# -- routes --------------------------------------------------------------------------------


def is_cancel_url() -> bool:
    """Whether this request's URL is ``/api/v1/tasks/{id}/cancel``, which takes only POST.

    ``<path:task_id>`` also matches ``x/cancel``, so the router alone would send a ``GET`` of
    the cancel URL to the read of a task named ``x/cancel`` (404), and list GET and PATCH in a
    405's ``Allow``. The literal suffix in the raw path is the cancel route; an id that contains
    ``/`` is sent as ``%2F`` (the clients do), so such a task stays readable.
    """
    if not request.path.startswith(TASKS_PREFIX):
        return False
    raw = request.scope.get("raw_path") or request.path.encode()
    return bool(raw.split(b"?", 1)[0].endswith(b"/cancel"))


@blueprint.before_request
async def _cancel_is_post_only() -> Response | None:
    if request.method in ("GET", "HEAD", "PATCH") and is_cancel_url():
        return json_error(405, "Method Not Allowed", Allow=CANCEL_ALLOW)
    return None


@blueprint.post("/api/v1/tasks")
@responds(201, "Created.", Task, headers={"ETag": "The version", "Location": "The task's URL"})
@responds(*ERROR_RESPONSES[401])
@responds(403, "`owner_id` names another user and the token lacks scope `tasks:write`.")
@responds(409, "A task with this id exists (whoever owns it).")
@responds(*ERROR_RESPONSES[422])
@responds(*ERROR_RESPONSES[503])
@authenticated()
@json_body(TaskCreate)
async def create_task(data: TaskCreate) -> Response:
    """Create a task.

    Owned by the caller, or by `owner_id` when the token has scope `tasks:write`. Without `id`
    the server generates `task_<random>`.
    """
    caller = principal()
    owner = data.owner_id or caller.user_id
    if owner != caller.user_id and SCOPE_WRITE not in caller.scopes:
        return json_error(
            403, "Forbidden", f"creating a task for another owner needs scope {SCOPE_WRITE}"
        )
    rt = runtime()
    for _ in range(3):
        task_id = data.id or new_task_id()
        try:
            task = await db.insert_task(
                rt.pool,
                task_id,
                owner,
                state=data.state,
                progress=data.progress,
                estimated_time=data.estimated_time,
            )
        except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
            return _unavailable()
        if task is not None:
            return task_response(task, 201, Location=f"/api/v1/tasks/{quote(task.id, safe='')}")
        if data.id is not None:
            return json_error(409, "Task already exists", task_id)
    return json_error(409, "Task already exists")  # three random ids taken: never in practice


@blueprint.get("/api/v1/tasks")
@responds(200, "A page of the caller's tasks.", TaskPage)
@responds(*ERROR_RESPONSES[401])
@responds(*ERROR_RESPONSES[422])
@responds(*ERROR_RESPONSES[503])
@authenticated()
@validate_querystring(ListQuery)
async def list_tasks(query_args: ListQuery) -> Response:
    """List the caller's tasks, newest first.

    Cursor pagination: pass `next_cursor` back as `cursor` until it is null. `state` filters.
    """
    before = None
    if query_args.cursor is not None:
        before = _decode_cursor(query_args.cursor)
        if before is None:
            return _invalid("cursor", "not a cursor from this API")
    try:
        tasks = await db.list_tasks(
            runtime().pool,
            principal().user_id,
            limit=query_args.limit + 1,
            state=query_args.state,
            before=before,
        )
    except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
        return _unavailable()
    page = tasks[: query_args.limit]
    more = len(tasks) > query_args.limit
    body = {
        "tasks": [t.api_data() for t in page],
        "next_cursor": _encode_cursor(page[-1]) if more else None,
    }
    response = jsonify(body)
    response.headers["Cache-Control"] = "private, no-cache"
    return response


@blueprint.get("/api/v1/tasks/<path:task_id>")
@responds(200, "The task.", Task, headers={"ETag": 'The version, e.g. `"3"`'})
@responds(
    304,
    "`If-None-Match` names the current version, or a long poll saw no newer version in time.",
    headers={"ETag": "The current version"},
)
@responds(*ERROR_RESPONSES[401])
@responds(400, "The task id is not valid (1 to 200 characters, no control characters).")
@responds(404, "No such task, or not yours: the two are indistinguishable.")
@responds(*ERROR_RESPONSES[422])
@responds(429, "Too many waiting long polls for this user or process (`wait` only).")
@responds(*ERROR_RESPONSES[503])
@parameters(
    {
        "name": "If-None-Match",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "An ETag from an earlier answer: 304 if the task is still at it.",
    }
)
@authenticated()
@validate_querystring(TaskQuery)
async def get_task(task_id: str, query_args: TaskQuery) -> Response:
    """Read a task (ETag polling, or a long poll with `wait`).

    `ETag` is the version: send it back in `If-None-Match` for a cheap 304. With
    `wait=S&after_version=N` the answer comes as soon as the version exceeds N, or is 304 after
    S seconds (S at most 60): the server waits on its LISTEN connection, not by polling.
    """
    caller = principal()
    if (problem := validate_task_id(task_id)) is not None:
        return invalid_task_id(problem)
    if query_args.wait is not None:
        after = query_args.after_version
        if after is None:
            after = _version_from_if_none_match()
        if after is None:
            return _invalid("after_version", "required with wait (or send If-None-Match)")
        return await _long_poll(caller, task_id, after, query_args.wait)
    try:
        task = await db.fetch_task(runtime().pool, task_id)
    except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
        return _unavailable()
    if task is None or not _visible(task, caller.user_id):
        return not_found()
    if _matches(task.version):
        return not_modified(task.version)
    return task_response(task)


async def _long_poll(caller: Principal, task_id: str, after: int, wait: float) -> Response:
    rt = runtime()
    if rt.draining:
        return json_error(503, "Server is shutting down", Retry_After="1")
    if not rt.broker.connected.is_set():
        return _unavailable()
    try:
        sub = rt.broker.subscribe(caller.user_id, [task_id])
    except StreamLimitExceeded as exc:
        return json_error(429, "Too many open streams", exc.scope, Retry_After="5")
    try:
        try:
            current = await db.fetch_task(rt.pool, task_id)
        except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
            return _unavailable()
        if current is None or not _visible(current, caller.user_id):
            return not_found()
        # Versions up to the one read are in hand: the mailbox keeps only newer ones (and a
        # deletion, which the broker's resync reports only for tasks marked like this).
        sub.mark_sent(current)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            for state in sub.take():
                if state.id != task_id:
                    continue
                if state.deleted:
                    return not_found()
                if state.version > current.version:
                    current = state
            if not _visible(current, caller.user_id):
                return not_found()  # the owner changed to someone else
            if current.version > after:
                return task_response(current)
            if sub.closing is not None:
                return json_error(503, "Server is shutting down", Retry_After="1")
            if loop.time() >= deadline:
                return not_modified(current.version)
            # No await between take() and wait(): a notification cannot slip in unseen.
            await sub.wait(deadline)
    finally:
        rt.broker.unsubscribe(sub)


@blueprint.patch("/api/v1/tasks/<path:task_id>")
@responds(200, "The updated task.", Task, headers={"ETag": "The new version"})
@responds(*ERROR_RESPONSES[401])
@responds(403, "The token lacks scope `tasks:write`.")
@responds(400, "The task id is not valid (1 to 200 characters, no control characters).")
@responds(404, "No such task.")
@responds(409, "The task is finished (`success`, `failed` or `cancelled`) and cannot change.")
@responds(*ERROR_RESPONSES[422])
@responds(*ERROR_RESPONSES[503])
@authenticated(scope=SCOPE_WRITE)
@json_body(TaskPatch)
async def update_task(task_id: str, data: TaskPatch) -> Response:
    """Update a task's state, progress, ETA or error (scope `tasks:write`).

    For workers and services: a `tasks:write` token may update any owner's task. Progress is
    0 to 100, the ETA a non-negative integer (null lets the server derive it), `state` at most
    64 characters and `error` at most 1000; anything else is 422 with one entry per field.
    """
    if (problem := validate_task_id(task_id)) is not None:
        return invalid_task_id(problem)
    change = db.TaskChange(**{name: getattr(data, name) for name in data.model_fields_set})
    try:
        outcome, task = await db.update_task(runtime().pool, task_id, change)
    except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
        return _unavailable()
    return _change_response(outcome, task)


@blueprint.post("/api/v1/tasks/<path:task_id>/cancel")
@responds(200, "The cancelled task.", Task, headers={"ETag": "The new version"})
@responds(*ERROR_RESPONSES[401])
@responds(400, "The task id is not valid (1 to 200 characters, no control characters).")
@responds(404, "No such task, or not yours.")
@responds(409, "The task is already finished.")
@responds(*ERROR_RESPONSES[503])
@authenticated()
async def cancel_task(task_id: str) -> Response:
    """Cancel one of your tasks that has not finished.

    Sets `state` to `cancelled`; streams and long polls see it like any other change.
    """
    if (problem := validate_task_id(task_id)) is not None:
        return invalid_task_id(problem)
    try:
        outcome, task = await db.update_task(
            runtime().pool,
            task_id,
            db.TaskChange(state="cancelled"),
            owner_id=principal().user_id,
        )
    except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
        return _unavailable()
    return _change_response(outcome, task)


def _change_response(outcome: str, task: TaskState | None) -> Response:
    if outcome == "not_found" or task is None:
        return not_found()
    if outcome == "terminal":
        return json_error(409, "Task is finished", {"state": task.state})
    return task_response(task)
