"""Group commit for the task API's writes: concurrent creates, PATCHes and cancels of one process
share a transaction.

Every notifying transaction takes PostgreSQL's global NOTIFY lock at commit, so the write ceiling
is per *transaction*, not per row (docs/scaling.md). :class:`WriteBatcher` queues each write with
its own future. A write that finds the batcher idle is sent at once, alone, as the plain query it
always was (no added latency); writes that arrive while a flush is in flight wait for it, then go
together, up to ``max_size`` per transaction, optionally after ``window`` seconds more to gather
(classic group commit: the window only opens under load).

One flush is one pooled connection and, when it writes more than one statement, one transaction.
Inside it the writes are grouped into rounds with at most one write per task, in arrival order,
and each round is one set-based ``INSERT`` and one ``UPDATE ... FROM unnest(...)``: updates to
the same task keep their order, and each caller gets its own row back with its new version, or
its own "not found", "finished" or "exists". If the database refuses the batch (a constraint, a
trigger, a deadlock with another process), each member is retried alone, in order, so one bad
write fails only its own request. Flushes run one at a time, which is what keeps same-task order
across batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from server import db, metrics
from server.tasks import TaskState

__all__ = ["Outcome", "WriteBatcher", "WriterClosed"]

logger = logging.getLogger(__name__)

# "updated" / "terminal" / "not_found" as db.update_task; "created" / "exists" for inserts.
Outcome = tuple[str, TaskState | None]

_COLUMNS = ", ".join(f"t.{c.strip()}" for c in db.TASK_COLUMNS.split(","))

_UPDATE_MANY = (
    "UPDATE taskstream.tasks AS t SET"
    " state = CASE WHEN u.set_state THEN u.state ELSE t.state END,"
    " progress = CASE WHEN u.set_progress THEN u.progress ELSE t.progress END,"
    " estimated_time = CASE WHEN u.set_eta THEN u.eta ELSE t.estimated_time END,"
    " error = CASE WHEN u.set_error THEN u.error ELSE t.error END,"
    " metadata = CASE WHEN u.set_meta THEN u.meta::jsonb ELSE t.metadata END"
    " FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[], $5::bool[],"
    " $6::double precision[], $7::bool[], $8::integer[], $9::bool[], $10::text[],"
    " $11::bool[], $12::text[])"
    " AS u(id, owner_filter, set_state, state, set_progress, progress, set_eta, eta,"
    " set_error, error, set_meta, meta)"
    " WHERE t.id = u.id AND (u.owner_filter IS NULL OR t.owner_id = u.owner_filter)"
    f" AND t.state NOT IN {db.TERMINAL_SQL}"
    f" RETURNING {_COLUMNS}"
)
_READ_MANY = f"SELECT {_COLUMNS} FROM taskstream.tasks AS t WHERE t.id = ANY($1::text[])"
_INSERT_MANY = (
    "INSERT INTO taskstream.tasks AS t (id, owner_id, state, progress, estimated_time, metadata)"
    " SELECT i, o, s, p, e, m::jsonb FROM unnest($1::text[], $2::text[], $3::text[],"
    " $4::double precision[], $5::integer[], $6::text[]) AS u(i, o, s, p, e, m)"
    " ON CONFLICT (id) DO NOTHING"
    f" RETURNING {_COLUMNS}"
)


class WriterClosed(RuntimeError):
    """The batcher was used before :meth:`WriteBatcher.start`."""


@dataclass(slots=True)
class _Write:
    kind: Literal["insert", "update"]
    task_id: str
    future: asyncio.Future[Outcome]
    owner_id: str | None = None  # insert: the owner; update: the owner filter (cancel)
    change: db.TaskChange | None = None
    state: str = "pending"
    progress: float = 0.0
    estimated_time: int | None = None
    metadata: dict[str, Any] | None = None
    group_id: str | None = None

    def settle(self, outcome: Outcome) -> None:
        # A caller that went away (client disconnect) cancelled its future; the write stands.
        if not self.future.done():
            self.future.set_result(outcome)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class _Stats:
    flushes: int = 0
    writes: int = 0
    retried_batches: int = 0
    largest: int = 0


class WriteBatcher:
    """Per-process group commit of task writes. ``enabled=False`` sends every write alone, as
    before batching existed (the bench's baseline, and an operator's way back)."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        *,
        window: float = 0.0,
        max_size: int = 500,
        enabled: bool = True,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if window < 0:
            raise ValueError("window must be >= 0")
        self._pool = pool
        self.window = window
        self.max_size = max_size
        self.enabled = enabled
        self._pending: list[_Write] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = _Stats()

    # -- public API ------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Writes waiting for the next flush (not counting the one in flight)."""
        return len(self._pending)

    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="taskstream-write-batcher")

    async def stop(self) -> None:
        """Flush every queued write, then stop. Writes that come later go alone."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            self._wake.set()
            self._full.set()
            await task

    async def insert(
        self,
        task_id: str,
        owner_id: str,
        *,
        state: str = "pending",
        progress: float = 0.0,
        estimated_time: int | None = None,
        group_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> TaskState | None:
        """Create a task; None if the id is taken (as :func:`server.db.insert_task`, which
        also raises its :class:`~server.db.GroupClosedError`)."""
        write = _Write(
            "insert",
            task_id,
            asyncio.get_running_loop().create_future(),
            owner_id=owner_id,
            state=state,
            progress=progress,
            estimated_time=estimated_time,
            metadata=metadata,
            group_id=group_id,
        )
        # Validate before the batch: an owner the table's CHECK refuses goes alone, so it
        # fails its own request (503, as before batching) without costing the others a retry.
        # A task joining a group goes alone too: the group's own rules (open, not full, the
        # owner's) are checked by the table and refuse it with their own error.
        alone = not 1 <= len(owner_id) <= 200 or group_id is not None
        _, task = await self._submit(write, alone=alone)
        return task

    async def update(
        self, task_id: str, change: db.TaskChange, *, owner_id: str | None = None
    ) -> Outcome:
        """Apply ``change`` as :func:`server.db.update_task` does, sharing a transaction."""
        write = _Write(
            "update",
            task_id,
            asyncio.get_running_loop().create_future(),
            owner_id=owner_id,
            change=change,
        )
        return await self._submit(write)

    async def update_many(
        self, items: Sequence[tuple[str, db.TaskChange]]
    ) -> list[Outcome | BaseException]:
        """Apply many updates in the order given (same-task order kept); each item's outcome,
        or the database error that item alone ended with."""
        if self._task is None:
            if self.enabled and not self._closing:
                raise WriterClosed("the write batcher is not started")
            results: list[Outcome | BaseException] = []
            for task_id, change in items:
                write = _Write("update", task_id, asyncio.get_running_loop().create_future())
                write.change = change
                try:
                    results.append(await self._one(write))
                except db.DATABASE_ERRORS as exc:
                    results.append(exc)
            return results
        loop = asyncio.get_running_loop()
        writes = [_Write("update", tid, loop.create_future(), change=ch) for tid, ch in items]
        self._pending.extend(writes)
        self._wake.set()
        if len(self._pending) >= self.max_size:
            self._full.set()
        return await asyncio.gather(*(w.future for w in writes), return_exceptions=True)

    # -- the flusher -----------------------------------------------------------------------

    async def _submit(self, write: _Write, *, alone: bool = False) -> Outcome:
        if self._task is None or alone:
            if self.enabled and not self._closing and not alone:
                raise WriterClosed("the write batcher is not started")
            return await self._one(write)
        self._pending.append(write)
        self._wake.set()
        if len(self._pending) >= self.max_size:
            self._full.set()
        return await write.future

    async def _run(self) -> None:
        loaded = False  # writes arrived while the last flush was in flight
        while True:
            while not self._pending:
                if self._closing:
                    return
                loaded = False
                self._wake.clear()
                await self._wake.wait()
            if loaded and self.window > 0 and len(self._pending) < self.max_size:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), self.window)
                except TimeoutError:
                    pass
            batch = self._pending[: self.max_size]
            del self._pending[: self.max_size]
            try:
                await self._flush(batch)
            except asyncio.CancelledError:
                for write in batch + self._pending:
                    write.fail(asyncio.CancelledError())
                raise
            except Exception as exc:  # never leave a caller waiting forever
                logger.exception("write batch failed")
                for write in batch:
                    write.fail(exc)
            loaded = bool(self._pending)

    async def _flush(self, batch: list[_Write]) -> None:
        self.stats.flushes += 1
        self.stats.writes += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        metrics.WRITE_BATCH_SIZE.observe(len(batch))
        if len(batch) == 1:
            write = batch[0]
            try:
                write.settle(await self._one(write))
            except db.DATABASE_ERRORS as exc:
                write.fail(exc)
            return
        try:
            async with self._pool().acquire() as conn:
                outcomes = await _apply(conn, batch)
        except db.DATABASE_ERRORS as exc:
            # One member (or a deadlock, or the connection) spoilt the transaction: each member
            # alone, in order, so only the write at fault fails.
            self.stats.retried_batches += 1
            metrics.WRITE_BATCH_RETRIES.inc()
            logger.info("write batch of %d refused (%s); retrying one by one", len(batch), exc)
            for write in batch:
                try:
                    write.settle(await self._one(write))
                except Exception as own:  # each member's own error goes to its own caller
                    write.fail(own)
            return
        for write, outcome in zip(batch, outcomes, strict=True):
            write.settle(outcome)

    async def _one(self, write: _Write) -> Outcome:
        """One write alone, in its own transaction: exactly the queries of before batching."""
        pool = self._pool()
        if write.kind == "insert":
            assert write.owner_id is not None
            task = await db.insert_task(
                pool,
                write.task_id,
                write.owner_id,
                state=write.state,
                progress=write.progress,
                estimated_time=write.estimated_time,
                group_id=write.group_id,
                metadata=write.metadata,
            )
            return ("created", task) if task is not None else ("exists", None)
        assert write.change is not None
        return await db.update_task(pool, write.task_id, write.change, owner_id=write.owner_id)


def _rounds(batch: Sequence[_Write]) -> list[list[int]]:
    """Indexes of ``batch`` in rounds with at most one write per task, arrival order kept."""
    rounds: list[list[int]] = []
    depth: dict[str, int] = {}
    for i, write in enumerate(batch):
        r = depth.get(write.task_id, -1) + 1
        depth[write.task_id] = r
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(i)
    return rounds


async def _apply(conn: asyncpg.Connection, batch: Sequence[_Write]) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(batch)
    async with conn.transaction():
        for indexes in _rounds(batch):
            # Rows in id order: two processes' batches then lock shared rows in the same order
            # and cannot deadlock on them (within a round; each round has one write per task).
            indexes.sort(key=lambda i: batch[i].task_id)
            inserts = [i for i in indexes if batch[i].kind == "insert"]
            updates = [i for i in indexes if batch[i].kind == "update"]
            if inserts:
                await _insert_round(conn, batch, inserts, outcomes)
            if updates:
                await _update_round(conn, batch, updates, outcomes)
    return [o if o is not None else ("not_found", None) for o in outcomes]


async def _insert_round(
    conn: asyncpg.Connection,
    batch: Sequence[_Write],
    indexes: list[int],
    outcomes: list[Outcome | None],
) -> None:
    writes = [batch[i] for i in indexes]
    rows = await conn.fetch(
        _INSERT_MANY,
        [w.task_id for w in writes],
        [w.owner_id for w in writes],
        [w.state for w in writes],
        [w.progress for w in writes],
        [w.estimated_time for w in writes],
        [db._metadata_json(w.metadata) for w in writes],
    )
    created = {r["id"]: TaskState.from_row(dict(r)) for r in rows}
    for i in indexes:
        task = created.get(batch[i].task_id)
        outcomes[i] = ("created", task) if task is not None else ("exists", None)


async def _update_round(
    conn: asyncpg.Connection,
    batch: Sequence[_Write],
    indexes: list[int],
    outcomes: list[Outcome | None],
) -> None:
    writes = [batch[i] for i in indexes]
    changes = [w.change for w in writes]
    assert all(c is not None for c in changes)
    rows = await conn.fetch(
        _UPDATE_MANY,
        [w.task_id for w in writes],
        [w.owner_id for w in writes],
        ["state" in c.fields for c in changes if c],
        [c.state for c in changes if c],
        ["progress" in c.fields for c in changes if c],
        [c.progress for c in changes if c],
        ["estimated_time" in c.fields for c in changes if c],
        [c.estimated_time for c in changes if c],
        ["error" in c.fields for c in changes if c],
        [c.error for c in changes if c],
        ["metadata" in c.fields for c in changes if c],
        [db._metadata_json(c.metadata) for c in changes if c],
    )
    updated = {r["id"]: TaskState.from_row(dict(r)) for r in rows}
    missing = [w.task_id for w in writes if w.task_id not in updated]
    # Not updated: tell a finished task from a missing (or someone else's) one, as update_task.
    existing: dict[str, TaskState] = {}
    if missing:
        existing = {
            r["id"]: TaskState.from_row(dict(r)) for r in await conn.fetch(_READ_MANY, missing)
        }
    for i in indexes:
        w = batch[i]
        if (task := updated.get(w.task_id)) is not None:
            outcomes[i] = ("updated", task)
        elif (row := existing.get(w.task_id)) is not None and (
            w.owner_id is None or row.owner_id == w.owner_id
        ):
            outcomes[i] = ("terminal", row)
        else:
            outcomes[i] = ("not_found", None)
