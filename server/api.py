"""The task REST API under ``/api/v1/tasks``: create, read (with ETag and long poll), list, update,
cancel. JSON in and out; every error is ``{"error": ..., "detail"?: ...}``.

Ownership is the stream's rule: a task that is not the caller's answers exactly like a missing
one (404). The one exception is scope ``tasks:write`` (a worker's or service's token): it may
create tasks for any owner and PATCH any task. Reads and cancel stay owner-only for every token.

The models are in :mod:`server.task_models`; the long poll and the read answers (ETag, 304,
404) in :mod:`server.longpoll`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, g, jsonify, request
from quart_schema import document_request, validate_querystring
from quart_schema.conversion import model_load
from quart_schema.validation import RequestSchemaValidationError

from server import db
from server.auth import Principal
from server.http import authenticate, json_error, runtime
from server.longpoll import (
    if_none_match_version,
    long_poll,
    matches,
    not_found,
    not_modified,
    task_response,
    visible,
)
from server.openapi import (
    ERROR_RESPONSES,
    field_errors,
    parameters,
    responds,
)
from server.schemas import GroupClosedBody
from server.task_models import (
    BulkPatch,
    BulkResults,
    ListQuery,
    Task,
    TaskCreate,
    TaskPage,
    TaskPatch,
    TaskQuery,
    TaskUpdate,
)
from server.tasks import TaskState, new_task_id, validate_task_id
from server.writebatch import Outcome

__all__ = ["CANCEL_ALLOW", "SCOPE_WRITE", "blueprint", "is_cancel_url"]

blueprint = Blueprint("api", __name__)
TASKS_PREFIX = "/api/v1/tasks/"
CANCEL_ALLOW = "OPTIONS, POST"

SCOPE_WRITE = "tasks:write"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# -- helpers -------------------------------------------------------------------------------


def task_change_responses(done: str, *, not_found: str, finished: str) -> Callable[[F], F]:
    """The answers every route that changes one task can give: the task with its new ETag
    (``done``), or 400, 401, 404 (``not_found``), 409 (``finished``) or 503."""

    def decorator(func: F) -> F:
        responds(200, done, Task, headers={"ETag": "The new version"})(func)
        responds(*ERROR_RESPONSES[401])(func)
        responds(400, "The task id is not valid (1 to 200 characters, no control characters).")(
            func
        )
        responds(404, not_found)(func)
        responds(409, finished)(func)
        return responds(*ERROR_RESPONSES[503])(func)

    return decorator


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
                except RecursionError:
                    # Nesting deeper than the parser's recursion limit (metadata is an object).
                    return json_error(400, "Invalid JSON", "nested too deeply")
            loaded = model_load(data, model, RequestSchemaValidationError)
            return await func(*args, data=loaded, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def principal() -> Principal:
    p: Principal = g.principal
    return p


def invalid_task_id(problem: str) -> Response:
    """400, as on the stream route: no task can have this id, so there is nothing to hide."""
    return json_error(400, "Invalid task id", problem)


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
@responds(
    409,
    "A task with this id exists (whoever owns it), or `group_id` names a group that is closed, "
    "full or another owner's.",
)
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
            task = await rt.writes.insert(
                task_id,
                owner,
                state=data.state,
                progress=data.progress,
                estimated_time=data.estimated_time,
                group_id=data.group_id,
                metadata=data.metadata,
            )
        except db.GroupClosedError:
            return json_error(
                409,
                "Group unavailable",
                "the group is closed, full, or another owner's: start a new group",
            )
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
    tasks = await db.list_tasks(
        runtime().pool,
        principal().user_id,
        limit=query_args.limit + 1,
        state=query_args.state,
        before=before,
    )
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
            after = if_none_match_version()
        if after is None:
            return _invalid("after_version", "required with wait (or send If-None-Match)")
        return await long_poll(caller, task_id, after, query_args.wait)
    task = await db.fetch_task(runtime().pool, task_id)
    if task is None or not visible(task, caller.user_id):
        return not_found()
    if matches(task.version):
        return not_modified(task.version)
    return task_response(task)


@blueprint.patch("/api/v1/tasks/<path:task_id>")
@task_change_responses(
    "The updated task.",
    not_found="No such task.",
    finished="The task is finished (`success`, `failed` or `cancelled`) and cannot change.",
)
@responds(403, "The token lacks scope `tasks:write`.")
@responds(*ERROR_RESPONSES[422])
@authenticated(scope=SCOPE_WRITE)
@json_body(TaskPatch)
async def update_task(task_id: str, data: TaskPatch) -> Response:
    """Update a task's state, progress, ETA, error or metadata (scope `tasks:write`).

    For workers and services: a `tasks:write` token may update any owner's task. Progress is
    0 to 100, the ETA a non-negative integer (null lets the server derive it), `state` at most
    64 characters, `error` at most 1000 characters and `metadata` a JSON object of at most 2048
    bytes (it replaces the old one; null removes it); anything else is 422 with one entry per
    field.
    """
    if (problem := validate_task_id(task_id)) is not None:
        return invalid_task_id(problem)
    change = db.TaskChange(**{name: getattr(data, name) for name in data.model_fields_set})
    outcome, task = await runtime().writes.update(task_id, change)
    return _change_response(outcome, task)


@blueprint.patch("/api/v1/tasks")
@responds(200, "One result per item, in order (each with its own status).", BulkResults)
@responds(*ERROR_RESPONSES[401])
@responds(403, "The token lacks scope `tasks:write`.")
@responds(413, "The body is larger than 64 KiB.")
@responds(422, 'The body is not `{"updates": [...]}` with 1 to the item cap of items.')
@responds(*ERROR_RESPONSES[503])
@authenticated(scope=SCOPE_WRITE)
@document_request(BulkPatch)
async def bulk_update_tasks() -> Response:
    """Update many tasks in one request (scope `tasks:write`).

    Each item is `{"id": ..., ...fields of PATCH}` and is checked, applied and answered on its
    own, exactly as `PATCH /api/v1/tasks/{id}` would: one bad item never fails the others, and
    items for the same task are applied in the order given. The updates share the server's
    batched transactions (see `docs/protocol.md`). At most `TASKSTREAM_BULK_MAX_ITEMS` (default
    1000) items and 64 KiB.
    """
    data = await _bulk_body()
    if isinstance(data, Response):
        return data
    results: list[dict[str, Any] | None] = [None] * len(data)
    valid: list[tuple[int, TaskUpdate]] = []
    for i, item in enumerate(data):
        item_id = item.get("id") if isinstance(item, dict) else None
        ident = item_id if isinstance(item_id, str) else None
        try:
            update = TaskUpdate.model_validate(item, strict=True)
        except ValidationError as exc:
            detail = field_errors(exc)
            results[i] = {"id": ident, "status": 422, "error": "Invalid request", "detail": detail}
            continue
        if (problem := validate_task_id(update.id)) is not None:
            results[i] = {"id": ident, "status": 400, "error": "Invalid task id", "detail": problem}
            continue
        valid.append((i, update))
    changes = [
        (
            u.id,
            db.TaskChange(**{n: getattr(u, n) for n in u.model_fields_set if n != "id"}),
        )
        for _, u in valid
    ]
    outcomes = await runtime().writes.update_many(changes)
    for (i, update), outcome in zip(valid, outcomes, strict=True):
        results[i] = {"id": update.id, **_change_result(outcome)}
    response = jsonify({"results": results})
    response.headers["Cache-Control"] = "private, no-cache"
    return response


async def _bulk_body() -> list[Any] | Response:
    raw = await request.get_data(as_text=False)
    if not request.is_json:
        return json_error(415, "Unsupported media type", "send application/json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return json_error(400, "Invalid JSON")
    limit = runtime().settings.bulk_max_items
    if not isinstance(body, dict) or set(body) != {"updates"}:
        return _invalid("body", 'must be {"updates": [...]}')
    updates = body["updates"]
    if not isinstance(updates, list) or not 1 <= len(updates) <= limit:
        return _invalid("updates", f"must be a list of 1 to {limit} items")
    return updates


def _change_result(outcome: Outcome | BaseException) -> dict[str, Any]:
    """A bulk item's answer: the status and body its single PATCH would have."""
    if isinstance(outcome, BaseException):
        if isinstance(outcome, db.DATABASE_ERRORS):
            return {"status": 503, "error": "Database unavailable"}
        raise outcome
    state, task = outcome
    if state == "not_found" or task is None:
        return {"status": 404, "error": "Task not found"}
    if state == "terminal":
        return {"status": 409, "error": "Task is finished", "detail": {"state": task.state}}
    return {"status": 200, "task": task.api_data()}


@blueprint.post("/api/v1/tasks/<path:task_id>/cancel")
@task_change_responses(
    "The cancelled task.",
    not_found="No such task, or not yours.",
    finished="The task is already finished.",
)
@authenticated()
async def cancel_task(task_id: str) -> Response:
    """Cancel one of your tasks that has not finished.

    Sets `state` to `cancelled`; streams and long polls see it like any other change.
    """
    if (problem := validate_task_id(task_id)) is not None:
        return invalid_task_id(problem)
    outcome, task = await runtime().writes.update(
        task_id,
        db.TaskChange(state="cancelled"),
        owner_id=principal().user_id,
    )
    return _change_response(outcome, task)


def _change_response(outcome: str, task: TaskState | None) -> Response:
    if outcome == "not_found" or task is None:
        return not_found()
    if outcome == "terminal":
        return json_error(409, "Task is finished", {"state": task.state})
    return task_response(task)


@blueprint.post("/api/v1/groups/<path:group_id>/close")
@responds(200, "The group is closed (also when it already was).", GroupClosedBody)
@responds(*ERROR_RESPONSES[401])
@responds(400, "The group id is not valid (1 to 200 characters, no control characters).")
@responds(404, "No such group, or not yours: the two are indistinguishable.")
@responds(*ERROR_RESPONSES[503])
@authenticated()
async def close_group(group_id: str) -> Response:
    """Close one of your groups.

    No task joins a closed group any more (creating one in it is 409), and its group streams
    end once every task in it is terminal. Closing twice is harmless.
    """
    if (problem := validate_task_id(group_id)) is not None:
        return json_error(400, "Invalid group id", problem.replace("task id", "group id"))
    closed = await db.close_group(runtime().pool, group_id, principal().user_id)
    if closed is None:
        return json_error(404, "Group not found")
    return jsonify(closed)
