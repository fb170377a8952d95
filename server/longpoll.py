"""The answers a task read gives (ETag, 304, 404), and the long poll.

Long poll (``?wait=S&after_version=N``) waits on the registry, like a stream: it subscribes a
mailbox *first*, then reads the row, so no change can fall in between, and the process's one
change listener wakes it. No waiting client ever queries the database again.
"""

from __future__ import annotations

import asyncio

from quart import Response, jsonify, request

from server import db
from server.auth import Principal
from server.http import json_error, runtime, unavailable
from server.stream.registry import StreamLimitExceeded
from server.tasks import TaskState

__all__ = [
    "if_none_match_version",
    "long_poll",
    "matches",
    "not_found",
    "not_modified",
    "task_response",
    "visible",
]


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


# A version is a PostgreSQL bigint: at most 19 digits.
_MAX_VERSION_DIGITS = 19


def if_none_match_version() -> int | None:
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


def matches(version: int) -> bool:
    etags = request.if_none_match
    return bool(etags) and etags.contains_weak(str(version))


def visible(task: TaskState | None, user_id: str) -> bool:
    return task is not None and not task.deleted and task.owner_id == user_id


async def long_poll(caller: Principal, task_id: str, after: int, wait: float) -> Response:
    rt = runtime()
    if rt.draining:
        return json_error(503, "Server is shutting down", Retry_After="1")
    if not rt.broker.connected.is_set():
        return unavailable()
    try:
        async with rt.broker.open(caller.user_id, [task_id]) as sub:
            current = await db.fetch_task(rt.pool, task_id)
            if current is None or not visible(current, caller.user_id):
                return not_found()
            # Versions up to the one read are in hand: the mailbox keeps only newer ones (and a
            # deletion, which the registry's resync reports only for tasks marked like this).
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
                if not visible(current, caller.user_id):
                    return not_found()  # the owner changed to someone else
                if current.version > after:
                    return task_response(current)
                if sub.closing is not None:
                    return json_error(503, "Server is shutting down", Retry_After="1")
                if loop.time() >= deadline:
                    return not_modified(current.version)
                # No await between take() and wait(): a notification cannot slip in unseen.
                await sub.wait(deadline)
    except StreamLimitExceeded as exc:
        return json_error(429, "Too many open streams", exc.scope, Retry_After="5")
