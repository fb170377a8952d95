"""Batched snapshot reads: streams that open together share one query.

In a reconnect storm (a deploy, a network blip) thousands of streams each need their task's
current row. One query per stream would queue on the pool; instead, every request made in the
same event-loop turn joins one ``WHERE id = ANY($1)`` read, and requests that arrive while it
runs join the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from server import db
from server.tasks import TaskState

__all__ = ["SnapshotReader"]

MAX_BATCH = 500


class SnapshotReader:
    """Reads current task rows for many concurrent callers with few queries."""

    def __init__(self, pool_getter: Callable[[], asyncpg.Pool]) -> None:
        self._pool_getter = pool_getter
        self._waiting: dict[str, list[asyncio.Future[TaskState | None]]] = {}
        self._scheduled = False
        self.queries = 0

    async def get(self, task_id: str) -> TaskState | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TaskState | None] = loop.create_future()
        self._waiting.setdefault(task_id, []).append(future)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._waiting:
            ids = list(self._waiting)[:MAX_BATCH]
            batch = {tid: self._waiting.pop(tid) for tid in ids}
            asyncio.get_running_loop().create_task(self._read(batch))

    async def _read(self, batch: dict[str, list[asyncio.Future[TaskState | None]]]) -> None:
        try:
            self.queries += 1
            rows = await db.fetch_tasks(self._pool_getter(), list(batch))
        except BaseException as exc:
            for futures in batch.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for tid, futures in batch.items():
            for f in futures:
                if not f.done():
                    f.set_result(rows.get(tid))
