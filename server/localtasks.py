"""The server's side of ``taskstream create`` and ``update``: the API's validation rules, and
writes straight to the database (DATABASE_URL, else the embedded PostgreSQL of
``TASKSTREAM_DATA_DIR``, started for the command and stopped after it).

It implements :class:`server.client.local.LocalTasks` for the terminal client, which imports no
server module itself (``server.cli`` hands this in).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ValidationError

from server import db
from server.api import TaskCreate, TaskPatch, new_task_id
from server.client.local import DatabaseUnreachable, InvalidInput, TaskRefused
from server.config import Settings
from server.openapi import field_errors

__all__ = ["ServerTasks"]


def _validated(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{e['field']}: {e['message']}" for e in field_errors(exc))
        raise InvalidInput(problems) from None


class _Database:
    """A connection from DATABASE_URL, or to the embedded PostgreSQL (started if need be)."""

    def __init__(self) -> None:
        self.embedded: Any = None
        self.conn: Any = None

    async def __aenter__(self) -> Any:
        settings = Settings.from_env()
        url = settings.database_url
        if url is None:
            from server.embedded import EmbeddedPostgres

            self.embedded = EmbeddedPostgres(settings.data_dir)
            url = await asyncio.to_thread(self.embedded.start)
            assert url is not None
            await db.migrate(url)
        try:
            self.conn = await db.connect(url)
        except BaseException:
            await self._stop_embedded()
            raise
        return self.conn

    async def _stop_embedded(self) -> None:
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.conn is not None:
                await self.conn.close()
        finally:
            await self._stop_embedded()


class ServerTasks:
    """The terminal client's :class:`~server.client.local.LocalTasks`, backed by this server."""

    def check_create(self, fields: dict[str, Any]) -> None:
        _validated(TaskCreate, fields)

    def check_update(self, fields: dict[str, Any]) -> None:
        _validated(TaskPatch, fields)

    async def create(self, fields: dict[str, Any]) -> str:
        data = _validated(TaskCreate, fields)
        try:
            async with _Database() as conn:
                state = await db.insert_task(
                    conn,
                    data.id or new_task_id(),
                    data.owner_id,
                    state=data.state,
                    progress=data.progress,
                    estimated_time=data.estimated_time,
                )
        except db.CONNECTION_ERRORS as exc:
            raise DatabaseUnreachable(f"{type(exc).__name__}: {exc}") from None
        if state is None:
            raise TaskRefused(f"task already exists: {data.id}")
        return str(state.id)

    async def update(self, task_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        data = _validated(TaskPatch, fields)
        change = db.TaskChange(**{name: getattr(data, name) for name in data.model_fields_set})
        try:
            async with _Database() as conn:
                outcome, state = await db.update_task(conn, task_id, change)
        except db.CONNECTION_ERRORS as exc:
            raise DatabaseUnreachable(f"{type(exc).__name__}: {exc}") from None
        if outcome == "not_found" or state is None:
            raise TaskRefused(f"task not found: {task_id}")
        if outcome == "terminal":
            raise TaskRefused(f"task is finished ({state.state})")
        result: dict[str, Any] = state.api_data()
        return result
