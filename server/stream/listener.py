"""The change listener: where committed task states enter a server process.

:class:`ChangeSource` is what the registry needs from any source of changes; :class:`PgListener`
is the default one, a dedicated LISTEN connection on PostgreSQL (trigger ->
``pg_notify('taskstream', ...)`` -> its callback). The other is the NATS bus
(:mod:`server.stream.bus`), for fleets that outgrow one LISTEN connection per process; the
registry and routes are the same for both. The registry tells its source which tasks and owners
are watched (``watch_task`` and friends): the bus subscribes to exactly those, the LISTEN
connection receives everything anyway and ignores the hints.

The callback is synchronous and only parses the payload once and hands the state on, so a
notification costs the same whether one client or ten thousand watch the task.

LISTEN/NOTIFY loses every notification sent while the listener is disconnected, so a supervisor
checks the connection actively, reconnects with jittered backoff, asks for a resync (the registry
re-reads the watched tasks) every ``fallback_poll`` seconds while it is down, and once more when
it is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

import asyncpg

from server import db, metrics
from server.tasks import Change, parse_notification

__all__ = [
    "CHANNEL",
    "ChangeSource",
    "ListenerSelfCheckFailed",
    "OnChange",
    "OnResync",
    "PgListener",
]

logger = logging.getLogger(__name__)

CHANNEL = "taskstream"
SELFCHECK_CHANNEL = "taskstream_selfcheck"
# Shown in pg_stat_activity, so operators (and tests) can find each process's LISTEN connection.
LISTENER_APP_NAME = "taskstream-listener"

# One committed state (or a group's closing), handed over synchronously (it must not block: it
# runs per change).
OnChange = Callable[[Change], None]


class OnResync(Protocol):
    """Called when changes may have been missed: re-read what is watched (all of it, or only
    the given tasks and owners' new tasks when a source knows which ones were affected)."""

    def __call__(
        self, task_ids: Collection[str] | None = None, owners: Collection[str] | None = None
    ) -> Awaitable[None]: ...


class ListenerSelfCheckFailed(RuntimeError):
    """A NOTIFY sent at start-up never came back to the LISTEN connection."""


class ChangeSource(Protocol):
    """A source of committed task states for one server process."""

    @property
    def connected(self) -> asyncio.Event:
        """Set while changes arrive live; clear while they may be missed."""
        ...

    async def start(self, on_change: OnChange, on_resync: OnResync) -> None:
        """Connect (raising if that fails), then call ``on_change`` per change and
        ``on_resync`` whenever changes may have been missed, until :meth:`stop`."""
        ...

    async def stop(self) -> None: ...

    # Interest: the registry calls these when the first stream starts watching a task (or an
    # owner's new tasks) and when the last one stops. They must not block.
    def watch_task(self, task_id: str) -> None: ...

    def unwatch_task(self, task_id: str) -> None: ...

    def watch_owner(self, owner_id: str) -> None: ...

    def unwatch_owner(self, owner_id: str) -> None: ...


async def _no_resync(
    task_ids: Collection[str] | None = None, owners: Collection[str] | None = None
) -> None:
    return None


class PgListener:
    """Owns one process's LISTEN connection and keeps it alive.

    ``check_interval``: seconds between liveness checks (TASKSTREAM_LISTENER_CHECK);
    ``fallback_poll``: seconds between resyncs while the connection is down.
    """

    # Seconds the start-up NOTIFY round trip may take.
    selfcheck_timeout = 5.0

    def __init__(self, dsn: str, *, check_interval: float = 5, fallback_poll: float = 2) -> None:
        self._dsn, self.check_interval, self.fallback_poll = dsn, check_interval, fallback_poll
        self._on_change: OnChange = lambda _state: None
        self._on_resync: OnResync = _no_resync
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        # Mirrored into the taskstream_listener_connected gauge wherever it is set or cleared.
        self._connected: asyncio.Event = metrics.GaugedEvent(metrics.LISTENER_CONNECTED)
        # Counters read by tests and by the metrics module.
        self.notifications = 0
        self.reconnects = 0
        # Notifications of tasks no stream here watches (decoded, then dropped).
        self.unwatched = 0
        # What the registry watches (server/stream/registry.py tells each first and last).
        self._tasks: set[str] = set()
        self._owners: set[str] = set()

    @property
    def connected(self) -> asyncio.Event:
        return self._connected

    # LISTEN receives every change whatever is watched; the interest only spares the work of
    # building a state nobody here will read (see parse_notification).
    def watch_task(self, task_id: str) -> None:
        self._tasks.add(task_id)

    def unwatch_task(self, task_id: str) -> None:
        self._tasks.discard(task_id)

    def watch_owner(self, owner_id: str) -> None:
        self._owners.add(owner_id)

    def unwatch_owner(self, owner_id: str) -> None:
        self._owners.discard(owner_id)

    def _wanted(self, task_id: Any, owner_id: Any) -> bool:
        return task_id in self._tasks or owner_id in self._owners

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        metrics.NOTIFICATIONS.inc()
        try:
            state = parse_notification(payload, self._wanted)
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed notification on channel %s", CHANNEL)
            return
        if state is None:
            self.unwatched += 1
            return
        self._on_change(state)

    def _on_termination(self, _conn: Any) -> None:
        self._lost.set()

    async def _connect_listener(self) -> None:
        conn = await db.connect(self._dsn, server_settings={"application_name": LISTENER_APP_NAME})
        try:
            conn.add_termination_listener(self._on_termination)
            await conn.add_listener(CHANNEL, self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        self._lost.clear()
        self._connected.set()

    async def selfcheck(self) -> None:
        """Prove that a NOTIFY reaches our LISTEN connection (it does not behind a pooler in
        transaction mode, where LISTEN silently binds to a server connection we never see again).
        """
        assert self._conn is not None
        token = uuid.uuid4().hex
        arrived = asyncio.Event()

        def _cb(_c: Any, _p: int, _ch: str, payload: str) -> None:
            if payload == token:
                arrived.set()

        await self._conn.add_listener(SELFCHECK_CHANNEL, _cb)
        try:
            sender = await db.connect(self._dsn)
            try:
                await sender.execute("SELECT pg_notify($1, $2)", SELFCHECK_CHANNEL, token)
            finally:
                await sender.close()
            try:
                await asyncio.wait_for(arrived.wait(), self.selfcheck_timeout)
            except TimeoutError:
                raise ListenerSelfCheckFailed(
                    "a NOTIFY sent at start-up did not reach the LISTEN connection within "
                    f"{self.selfcheck_timeout:g} s. taskstream needs a direct or session-pooled "
                    "PostgreSQL connection: PgBouncer in transaction or statement pooling mode "
                    "drops LISTEN. Point DATABASE_URL at PostgreSQL itself or a session-mode pool."
                ) from None
        finally:
            await self._conn.remove_listener(SELFCHECK_CHANNEL, _cb)

    async def start(self, on_change: OnChange, on_resync: OnResync) -> None:
        self._on_change = on_change
        self._on_resync = on_resync
        await self._connect_listener()
        try:
            await self.selfcheck()
        except BaseException:
            await self._close_listener()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="taskstream-listener")

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
            self._supervisor = None
        await self._close_listener()

    async def _close_listener(self) -> None:
        conn, self._conn = self._conn, None
        self._connected.clear()
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:
                # Closing politely failed (peer gone): drop the socket instead.
                conn.terminate()

    async def _alive(self) -> bool:
        """Active liveness check: a dead TCP peer is not noticed by the driver on its own."""
        conn = self._conn
        if conn is None or conn.is_closed() or self._lost.is_set():
            return False
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=max(1.0, self.check_interval))
        except db.DATABASE_ERRORS:  # TimeoutError (the wait above) is one of them
            return False
        return True

    async def _supervise(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._lost.wait(), self.check_interval)
            except TimeoutError:
                pass
            if await self._alive():
                continue
            await self._recover()

    async def _recover(self) -> None:
        logger.warning(
            "LISTEN connection lost; polling subscribed tasks until it is back",
            extra={"event": "listener_lost"},
        )
        lost_at = time.monotonic()
        self._connected.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
        poller = asyncio.create_task(self._fallback_poll(), name="taskstream-fallback-poll")
        delay = 0.1
        try:
            while not self._stopping:
                try:
                    await self._connect_listener()
                    # Counted before the next await, so whoever sees `connected` set again
                    # also sees this reconnect counted.
                    self.reconnects += 1
                    metrics.LISTENER_RECONNECTS.inc()
                    break
                except db.DATABASE_ERRORS as exc:
                    logger.debug("listener reconnect failed: %s", type(exc).__name__)
                # Full jitter: many processes losing one database do not reconnect in lockstep.
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)
        finally:
            poller.cancel()
            try:
                await poller
            except asyncio.CancelledError:
                pass
        if self._conn is None:
            return  # stopping before the database came back
        await self._on_resync()
        logger.warning(
            "LISTEN connection restored (reconnect #%d); resynced",
            self.reconnects,
            extra={
                "event": "listener_restored",
                "down_s": round(time.monotonic() - lost_at, 3),
            },
        )

    async def _fallback_poll(self) -> None:
        while True:
            await asyncio.sleep(self.fallback_poll)
            await self._on_resync()
