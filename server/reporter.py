"""Progress reporting for Python workers that write to PostgreSQL directly, batched.

A worker that runs ``UPDATE taskstream.tasks SET progress = ...`` after every step pays one
notifying transaction per step, and PostgreSQL's commit-time NOTIFY lock caps those at a few
thousand per second for the whole database (docs/scaling.md). :class:`Reporter` keeps only each
task's latest state in memory and writes every pending task in one transaction over one
connection every ``interval`` seconds; terminal states (``success``, ``failed``, ``cancelled``)
are written at once, and everything pending is written on exit. A lost connection is
re-opened and the pending states are written again: a terminal state is never dropped.

Importable without the server (no Quart): it needs only asyncpg::

    async with Reporter(DATABASE_URL, interval=0.1) as report:
        for step in range(100):
            report.progress("task_abc123", progress=step, state="transcribing")
        await report.finish("task_abc123", "success")

:class:`SyncReporter` is the same for threaded code (it runs the reporter on its own loop in a
background thread).

Like the task API, a task that is already finished is left alone (a cancelled task stays
cancelled); the version, ``updated_at`` and the notification come from the table's triggers as
for any other write.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import asyncpg

from server.tasks import MAX_ERROR, MAX_ETA, MAX_STATE, TERMINAL_ORDER

__all__ = ["Reporter", "ReporterClosed", "ReporterError", "SyncReporter"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TERMINAL = frozenset(TERMINAL_ORDER)
_TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in TERMINAL_ORDER) + ")"

# One statement for every pending task: each task appears once (states are conflated).
_FLUSH = (
    "UPDATE taskstream.tasks AS t SET"
    " state = CASE WHEN u.set_state THEN u.state ELSE t.state END,"
    " progress = CASE WHEN u.set_progress THEN u.progress ELSE t.progress END,"
    " estimated_time = CASE WHEN u.set_eta THEN u.eta ELSE t.estimated_time END,"
    " error = CASE WHEN u.set_error THEN u.error ELSE t.error END"
    " FROM unnest($1::text[], $2::bool[], $3::text[], $4::bool[], $5::double precision[],"
    " $6::bool[], $7::integer[], $8::bool[], $9::text[])"
    " AS u(id, set_state, state, set_progress, progress, set_eta, eta, set_error, error)"
    f" WHERE t.id = u.id AND t.state NOT IN {_TERMINAL_SQL}"
)

# Connection trouble: reconnect and write again. Anything else from PostgreSQL is a refusal.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionFailureError,
    # A backend killed while the connection is idle can leave asyncpg's protocol waiting for
    # a ReadyForQuery that never comes; the next query then fails with this. A new connection
    # is the cure, as for any other lost one.
    asyncpg.exceptions.InternalClientError,
)
_UNSET: Any = object()


class ReporterError(RuntimeError):
    """States could not be written before the reporter closed (the database stayed away)."""


class ReporterClosed(RuntimeError):
    """The reporter is closed (or was never started); use it as ``async with``."""


class _Entry:
    __slots__ = ("fields", "waiters")

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.waiters: list[asyncio.Future[None]] = []

    @property
    def terminal(self) -> bool:
        return self.fields.get("state") in _TERMINAL

    def merge(self, fields: dict[str, Any]) -> None:
        if self.terminal and fields.get("state", self.fields["state"]) not in _TERMINAL:
            fields = {k: v for k, v in fields.items() if k != "state"}
        self.fields.update(fields)

    def absorb_newer(self, newer: _Entry) -> None:
        """This entry failed to commit and ``newer`` came meanwhile: newer fields win, except
        that a terminal state is never replaced by a later non-terminal one."""
        self.merge(newer.fields)
        self.waiters.extend(newer.waiters)


def _check(
    task_id: str, state: Any, progress: Any, estimated_time: Any, error: Any
) -> dict[str, Any]:
    # The table's CHECKs, raised here (ValueError), so a bad value never spoils a batch.
    if not isinstance(task_id, str) or not task_id:
        raise ValueError("task_id must be a non-empty string")
    fields: dict[str, Any] = {}
    if state is not _UNSET:
        if not isinstance(state, str) or not 1 <= len(state) <= MAX_STATE:
            raise ValueError(f"state must be 1 to {MAX_STATE} characters")
        fields["state"] = state
    if progress is not _UNSET:
        if isinstance(progress, bool) or not isinstance(progress, int | float):
            raise ValueError("progress must be a number")
        if not math.isfinite(progress) or not 0 <= progress <= 100:
            raise ValueError("progress must be 0 to 100")
        fields["progress"] = float(progress)
    if estimated_time is not _UNSET:
        if estimated_time is not None and (
            isinstance(estimated_time, bool)
            or not isinstance(estimated_time, int)
            or not 0 <= estimated_time <= MAX_ETA
        ):
            raise ValueError(f"estimated_time must be None or 0 to {MAX_ETA}")
        fields["estimated_time"] = estimated_time
    if error is not _UNSET:
        if error is not None and (not isinstance(error, str) or len(error) > MAX_ERROR):
            raise ValueError(f"error must be None or at most {MAX_ERROR} characters")
        fields["error"] = error
    return fields


class Reporter:
    """Conflating, batching progress writer over one asyncpg connection (see module doc)."""

    def __init__(
        self,
        dsn: str,
        *,
        interval: float = 0.1,
        close_timeout: float = 30.0,
        max_backoff: float = 2.0,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0 seconds")
        self.dsn = dsn
        self.interval = interval
        self.close_timeout = close_timeout
        self.max_backoff = max_backoff
        self._pending: dict[str, _Entry] = {}
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._urgent = asyncio.Event()
        self._closing = False
        self.flushes = 0
        self.rows_written = 0
        self.reconnects = 0
        self.refused = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Reporter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._task is not None:
            return
        self._closing = False
        self._conn = await asyncpg.connect(self.dsn, timeout=5)
        self._task = asyncio.create_task(self._run(), name="taskstream-reporter")

    async def close(self) -> None:
        """Write everything pending (retrying a lost connection for up to ``close_timeout``
        seconds), then close the connection. :class:`ReporterError` if states remain."""
        if self._task is None:
            return
        self._closing = True
        self._urgent.set()
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(task, self.close_timeout)
        except TimeoutError:
            pass
        finally:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                await _close(conn)
        if self._pending:
            left = sorted(self._pending)
            for entry in self._pending.values():
                for waiter in entry.waiters:
                    if not waiter.done():
                        waiter.set_exception(ReporterError(f"not written: {left}"))
            self._pending.clear()
            raise ReporterError(f"the database stayed unreachable; not written: {left}")

    # -- reporting -------------------------------------------------------------------------

    def progress(
        self,
        task_id: str,
        *,
        progress: float = _UNSET,
        state: str = _UNSET,
        estimated_time: int | None = _UNSET,
        error: str | None = _UNSET,
    ) -> None:
        """Record a task's new state; it is written with the next flush. Returns at once. A
        terminal ``state`` starts a flush now (use :meth:`finish` to wait for it)."""
        self._record(task_id, _check(task_id, state, progress, estimated_time, error))

    async def finish(
        self,
        task_id: str,
        state: str = "success",
        *,
        progress: float = _UNSET,
        error: str | None = _UNSET,
    ) -> None:
        """Write a terminal state now and return once it is committed."""
        if state not in _TERMINAL:
            raise ValueError(f"state must be one of {sorted(_TERMINAL)}")
        if progress is _UNSET and state == "success":
            progress = 100.0
        entry = self._record(task_id, _check(task_id, state, progress, _UNSET, error))
        waiter = asyncio.get_running_loop().create_future()
        entry.waiters.append(waiter)
        await waiter

    async def flush(self) -> None:
        """Write everything recorded so far now, and return once it is committed."""
        if self._task is None:
            raise ReporterClosed("the reporter is not started")
        loop = asyncio.get_running_loop()
        waiters = []
        for entry in self._pending.values():
            waiter = loop.create_future()
            entry.waiters.append(waiter)
            waiters.append(waiter)
        self._urgent.set()
        await asyncio.gather(*waiters)

    @property
    def pending(self) -> int:
        """Tasks with a state not yet written."""
        return len(self._pending)

    def _record(self, task_id: str, fields: dict[str, Any]) -> _Entry:
        if self._task is None or self._closing:
            raise ReporterClosed("the reporter is closed (use it as `async with Reporter(...)`)")
        entry = self._pending.get(task_id)
        if entry is None:
            entry = self._pending[task_id] = _Entry()
            entry.fields.update(fields)
        else:
            entry.merge(fields)
        if entry.terminal:
            self._urgent.set()
        return entry

    # -- the writer ------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as exc:
            # A bug, not the database: nobody may wait forever for a state that will not come.
            logger.exception("reporter stopped")
            for entry in self._pending.values():
                for waiter in entry.waiters:
                    if not waiter.done():
                        waiter.set_exception(ReporterError(f"reporter stopped: {exc!r}"))
            raise

    async def _loop(self) -> None:
        backoff = 0.05
        while True:
            if not self._urgent.is_set() and not self._closing:
                try:
                    await asyncio.wait_for(self._urgent.wait(), self.interval)
                except TimeoutError:
                    pass
            self._urgent.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            batch, self._pending = self._pending, {}
            try:
                await self._write(batch)
            except _CONNECTION_ERRORS as exc:
                self._requeue(batch)
                logger.warning("reporter lost its connection (%s); retrying", type(exc).__name__)
                await self._reconnect(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                self._urgent.set()
                continue
            except BaseException:
                self._requeue(batch)  # cancelled mid-write (close timed out): keep the states
                raise
            backoff = 0.05
            for entry in batch.values():
                for waiter in entry.waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    def _requeue(self, batch: dict[str, _Entry]) -> None:
        for task_id, entry in batch.items():
            newer = self._pending.get(task_id)
            if newer is not None:
                entry.absorb_newer(newer)
            self._pending[task_id] = entry

    async def _reconnect(self, delay: float) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await _close(conn)
        await asyncio.sleep(delay)
        try:
            self._conn = await asyncpg.connect(self.dsn, timeout=5)
            self.reconnects += 1
        except _CONNECTION_ERRORS as exc:
            logger.warning("reporter cannot reconnect yet (%s)", type(exc).__name__)

    async def _write(self, batch: dict[str, _Entry]) -> None:
        if self._conn is None or self._conn.is_closed():
            raise ConnectionResetError("no connection")
        try:
            # One statement: one transaction, one NOTIFY-lock commit for every task in it.
            await self._conn.execute(_FLUSH, *_columns(batch))
        except asyncpg.PostgresError as exc:
            if isinstance(exc, _CONNECTION_ERRORS):
                raise
            # Refused (a trigger, a constraint): write each task alone, so only the task at
            # fault is dropped (retrying a refused row would never end).
            for task_id, entry in batch.items():
                try:
                    await self._conn.execute(_FLUSH, *_columns({task_id: entry}))
                except asyncpg.PostgresError as own:
                    if isinstance(own, _CONNECTION_ERRORS):
                        raise
                    self.refused += 1
                    logger.error("reporter: the database refused task %r: %s", task_id, own)
        self.flushes += 1
        self.rows_written += len(batch)


def _columns(batch: dict[str, _Entry]) -> list[list[Any]]:
    entries = [e.fields for e in batch.values()]
    return [
        list(batch),
        ["state" in f for f in entries],
        [f.get("state") for f in entries],
        ["progress" in f for f in entries],
        [f.get("progress") for f in entries],
        ["estimated_time" in f for f in entries],
        [f.get("estimated_time") for f in entries],
        ["error" in f for f in entries],
        [f.get("error") for f in entries],
    ]


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2)
    except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
        conn.terminate()


class SyncReporter:
    """:class:`Reporter` for threaded code: its own event loop in a daemon thread.

    ``progress`` returns at once; ``finish`` and ``flush`` block until committed; leaving the
    ``with`` block writes everything pending."""

    def __init__(self, dsn: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="taskstream-reporter", daemon=True
        )
        self._reporter = Reporter(dsn, **kwargs)

    def __enter__(self) -> SyncReporter:
        self._thread.start()
        try:
            self._call(self._reporter.start())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def progress(self, task_id: str, **fields: Any) -> None:
        _check(task_id, **{k: fields.get(k, _UNSET) for k in _FIELD_NAMES})  # raise here
        unknown = set(fields) - set(_FIELD_NAMES)
        if unknown:
            raise TypeError(f"unknown fields: {sorted(unknown)}")
        self._loop.call_soon_threadsafe(lambda: self._reporter.progress(task_id, **fields))

    def finish(self, task_id: str, state: str = "success", **fields: Any) -> None:
        self._call(self._reporter.finish(task_id, state, **fields))

    def flush(self) -> None:
        self._call(self._call_flush())

    async def _call_flush(self) -> None:
        await self._reporter.flush()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._reporter.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


_FIELD_NAMES = ("state", "progress", "estimated_time", "error")
