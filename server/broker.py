"""The broker: one dedicated LISTEN connection per process, fanned out to per-client mailboxes.

Data path: trigger -> ``pg_notify('taskstream', ...)`` -> this connection's callback ->
:meth:`Subscription.offer` for each subscriber of that task -> the stream writes SSE.

The callback is synchronous and only parses the payload once and drops it into mailboxes, so a
notification costs the same whether one client or ten thousand watch the task.

LISTEN/NOTIFY loses every notification sent while the listener is disconnected, so a supervisor
checks the connection actively, reconnects with jittered backoff, polls the subscribed tasks
while it is down, and resyncs them from the table once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import asyncpg

from server import db, metrics
from server.events import TaskState

__all__ = [
    "CHANNEL",
    "Broker",
    "ListenerSelfCheckFailed",
    "StreamLimitExceeded",
    "Subscription",
    "is_new_for_owner_stream",
]

logger = logging.getLogger(__name__)

CHANNEL = "taskstream"
SELFCHECK_CHANNEL = "taskstream_selfcheck"
# Shown in pg_stat_activity, so operators (and tests) can find each process's LISTEN connection.
LISTENER_APP_NAME = "taskstream-listener"


class ListenerSelfCheckFailed(RuntimeError):
    """A NOTIFY sent at start-up never came back to the LISTEN connection."""


class StreamLimitExceeded(RuntimeError):
    """Opening another stream would pass a per-user or per-process limit."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"too many open streams ({scope})")
        self.scope = scope


class Subscription:
    """One client's mailbox: at most one pending state per task, so memory is bounded.

    A newer version replaces an older pending one (conflation: a client that falls behind skips
    intermediate progress). A pending terminal state or deletion is never replaced, because the
    stream ends there exactly as it would have for a client that kept up.
    """

    __slots__ = (
        "closing",
        "conflated",
        "created_after",
        "direct",
        "owner_id",
        "pending",
        "sent",
        "task_ids",
        "user_id",
        "_timer",
        "_timer_at",
        "_waiter",
        "__weakref__",
    )

    def __init__(self, user_id: str, task_ids: set[str], owner_id: str | None) -> None:
        self.user_id = user_id
        self.task_ids = task_ids
        # Set for a stream that follows every task of this owner, including tasks created later.
        self.owner_id = owner_id
        self.pending: dict[str, TaskState] = {}
        # Highest version handed to the client per task; older or equal versions are dropped.
        self.sent: dict[str, int] = {}
        # The stream's wait: a bare future, made only while it waits. An asyncio.Event per
        # mailbox cost more than the socket write when one update woke thousands of streams.
        self._waiter: asyncio.Future[None] | None = None
        # One timer per stream for its next deadline (heartbeat, timeout, token expiry), kept
        # across waits: re-armed when that deadline moves, not once per event.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Set by a stream that can write an event to its socket on the spot (see
        # server/streams.py, _direct_write): called only while the stream is parked in wait()
        # with nothing pending, so it never overtakes a state the stream still has to write.
        # Returns False to decline (terminal state, socket not drained...): the mailbox path
        # then takes the state as usual.
        self.direct: Callable[[TaskState], bool] | None = None
        self.conflated = 0
        self.closing: str | None = None
        # Owner-wide streams: tasks created before this instant join only via the snapshot.
        self.created_after: datetime | None = None

    def offer(self, state: TaskState) -> None:
        if not state.deleted:
            if state.owner_id != self.user_id:
                # Not (or no longer) this user's task: whatever path brought it (NOTIFY, resync,
                # fallback poll), it reads exactly as a deletion, before the direct writer or the
                # mailbox sees anything of the new owner's state.
                state = TaskState.gone(state.id)
            elif state.version <= self.sent.get(state.id, 0):
                return
        if (
            self.direct is not None
            and self._waiter is not None
            and not self.pending
            and self.direct(state)
        ):
            return
        current = self.pending.get(state.id)
        if current is not None:
            if current.deleted or current.terminal:
                return
            if not state.deleted and state.version <= current.version:
                return  # the same state from NOTIFY and from resync, or an older one
            self.conflated += 1
            metrics.TALLY.conflated += 1
        self.pending[state.id] = state
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None  # fired (maybe a millisecond early): the next wait arms it again
        self._wake()

    async def wait(self, until: float) -> None:
        """Sleep until something is offered, :meth:`close` is called, or the loop clock reaches
        ``until``. The caller checks ``pending`` first: there is no await between that check
        and this call, so nothing offered in between can be missed."""
        loop = asyncio.get_running_loop()
        if self._timer is None or self._timer_at != until:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(until, self._on_timer)
            self._timer_at = until
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def release(self) -> None:
        """Drop the timer and the direct writer (the broker calls this when the mailbox is
        removed)."""
        self.direct = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def take(self) -> list[TaskState]:
        """Everything pending, oldest version first, and mark it as handed over."""
        if not self.pending:
            return []
        states = sorted(self.pending.values(), key=lambda s: s.version)
        self.pending.clear()
        out = []
        for s in states:
            sent = self.sent.get(s.id, 0)
            if s.deleted:
                out.append(s)
            elif s.version > sent:
                # A state may have been offered before the stream marked its snapshot as sent.
                self.sent[s.id] = s.version
                out.append(s)
        return out

    def mark_sent(self, state: TaskState) -> None:
        if state.version > self.sent.get(state.id, 0):
            self.sent[state.id] = state.version

    def close(self, reason: str) -> None:
        """Ask the stream to end (server shutdown); it sends a final ``retry:`` and closes."""
        self.closing = reason
        self._wake()


def is_new_for_owner_stream(state: TaskState, cutoff: datetime | None) -> bool:
    """Whether a task first seen by an owner-wide stream is new: it became the owner's (was
    created for them, or given to them) after the stream's snapshot."""
    joined = state.owner_since or state.created_at
    if state.deleted or joined is None:
        return False
    if cutoff is None:
        return True  # the snapshot is still being read: keep it, the stream dedups by version
    try:
        return datetime.fromisoformat(joined) > cutoff
    except ValueError:
        return True


class Broker:
    """Owns the LISTEN connection and the subscription registry of one server process."""

    def __init__(
        self,
        dsn: str,
        *,
        pool: asyncpg.Pool | None = None,
        max_streams: int = 10_000,
        max_streams_per_user: int = 100,
        check_interval: float = 5.0,
        fallback_poll: float = 2.0,
        selfcheck_timeout: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self.pool = pool
        self.max_streams = max_streams
        self.max_streams_per_user = max_streams_per_user
        self.check_interval = check_interval
        self.fallback_poll = fallback_poll
        self.selfcheck_timeout = selfcheck_timeout
        self._by_task: dict[str, set[Subscription]] = {}
        self._by_owner: dict[str, set[Subscription]] = {}
        self._per_user: dict[str, int] = {}
        self._all: set[Subscription] = set()
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        # Mirrored into the taskstream_listener_connected gauge wherever it is set or cleared.
        self.connected: asyncio.Event = metrics.GaugedEvent(metrics.LISTENER_CONNECTED)
        # Counters read by tests and by the metrics module.
        self.notifications = 0
        self.reconnects = 0
        self.resyncs = 0
        self.listeners: list[Callable[[TaskState], None]] = []

    # -- registry ---------------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return len(self._all)

    def user_stream_count(self, user_id: str) -> int:
        return self._per_user.get(user_id, 0)

    @property
    def subscriptions(self) -> frozenset[Subscription]:
        return frozenset(self._all)

    def subscribe(
        self, user_id: str, task_ids: Iterable[str] = (), *, owner_id: str | None = None
    ) -> Subscription:
        """Register a mailbox *before* the caller reads the current rows (no gap is possible)."""
        if len(self._all) >= self.max_streams:
            raise StreamLimitExceeded("process")
        if self._per_user.get(user_id, 0) >= self.max_streams_per_user:
            raise StreamLimitExceeded("user")
        sub = Subscription(user_id, set(task_ids), owner_id)
        self._all.add(sub)
        self._per_user[user_id] = self._per_user.get(user_id, 0) + 1
        for tid in sub.task_ids:
            self._by_task.setdefault(tid, set()).add(sub)
        if owner_id is not None:
            self._by_owner.setdefault(owner_id, set()).add(sub)
        return sub

    def watch(self, sub: Subscription, task_id: str) -> None:
        """Add a task to an owner-wide subscription (a task the owner created after it opened)."""
        sub.task_ids.add(task_id)
        self._by_task.setdefault(task_id, set()).add(sub)

    def unwatch(self, sub: Subscription, task_id: str) -> None:
        sub.task_ids.discard(task_id)
        subs = self._by_task.get(task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_task[task_id]

    def unsubscribe(self, sub: Subscription) -> None:
        """Remove a mailbox. Idempotent, so every exit path may call it."""
        if sub not in self._all:
            return
        self._all.discard(sub)
        sub.release()
        left = self._per_user.get(sub.user_id, 1) - 1
        if left > 0:
            self._per_user[sub.user_id] = left
        else:
            self._per_user.pop(sub.user_id, None)
        for tid in list(sub.task_ids):
            self.unwatch(sub, tid)
        if sub.owner_id is not None:
            owners = self._by_owner.get(sub.owner_id)
            if owners is not None:
                owners.discard(sub)
                if not owners:
                    del self._by_owner[sub.owner_id]

    def dispatch(self, state: TaskState) -> None:
        """Hand one committed state to every mailbox that wants it."""
        subs = self._by_task.get(state.id)
        if subs:
            foreign: list[Subscription] = []
            for sub in subs:
                sub.offer(state)
                if sub.user_id != state.owner_id and not state.deleted:
                    foreign.append(sub)
            # offer() gave them the task's not-found ending. They stop watching it, so nothing of
            # the new owner's reaches them again; if it comes back to them, their owner-wide
            # streams pick it up below like a new task, and a stream that ended stays ended.
            for sub in foreign:
                self.unwatch(sub, state.id)
        owners = self._by_owner.get(state.owner_id)
        if owners:
            for sub in owners:
                if state.id not in sub.task_ids and is_new_for_owner_stream(
                    state, sub.created_after
                ):
                    self.watch(sub, state.id)
                    sub.offer(state)
        for listener in self.listeners:
            listener(state)

    # -- the LISTEN connection --------------------------------------------------------------

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        metrics.NOTIFICATIONS.inc()
        try:
            state = TaskState.from_notification(payload)
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed notification on channel %s", CHANNEL)
            return
        self.dispatch(state)

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
        self.connected.set()

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

    async def start(self) -> None:
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
        self.connected.clear()
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
        except (TimeoutError, *db.CONNECTION_ERRORS, asyncpg.PostgresError):
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
        self.connected.clear()
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
                except (*db.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
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
        await self.resync()
        logger.warning(
            "LISTEN connection restored (reconnect #%d); resynced",
            self.reconnects,
            extra={
                "event": "listener_restored",
                "down_s": round(time.monotonic() - lost_at, 3),
            },
        )

    async def resync(self) -> None:
        """Read every subscribed task and hand over whatever moved (or vanished), and every task
        that joined an owner after one of their owner-wide streams took its snapshot (created
        for them, or given to them, while no notification could say so)."""
        ids = list(self._by_task)
        since = self._owner_cutoffs()
        if not ids and not since:
            return
        try:
            rows, joined = await self._fetch(ids, since)
        except (*db.CONNECTION_ERRORS, asyncpg.PostgresError):
            return
        self.resyncs += 1
        for tid in ids:
            state = rows.get(tid)
            if state is not None:
                # dispatch() compares the owner: a task given away ends as if deleted.
                self.dispatch(state)
            else:
                for sub in list(self._by_task.get(tid, ())):
                    if tid in sub.sent:
                        sub.offer(TaskState.gone(tid))
        for state in joined:
            if state.id not in rows:
                self.dispatch(state)  # its owner's owner-wide streams watch it from now on

    def _owner_cutoffs(self) -> dict[str, datetime]:
        """Per owner, the earliest snapshot of its owner-wide streams (those still reading their
        snapshot get everything they need from it)."""
        since: dict[str, datetime] = {}
        for owner, subs in self._by_owner.items():
            cutoffs = [s.created_after for s in subs if s.created_after is not None]
            if cutoffs:
                since[owner] = min(cutoffs)
        return since

    async def _fetch(
        self, ids: list[str], since: dict[str, datetime]
    ) -> tuple[dict[str, TaskState], list[TaskState]]:
        if self.pool is not None:
            return await self._read(self.pool, ids, since)
        conn = await db.connect(self._dsn)
        try:
            return await self._read(conn, ids, since)
        finally:
            await conn.close()

    @staticmethod
    async def _read(
        conn: asyncpg.Pool | asyncpg.Connection, ids: list[str], since: dict[str, datetime]
    ) -> tuple[dict[str, TaskState], list[TaskState]]:
        rows = await db.fetch_tasks(conn, ids) if ids else {}
        return rows, await db.fetch_joined_tasks(conn, since)

    async def _fallback_poll(self) -> None:
        while True:
            await asyncio.sleep(self.fallback_poll)
            await self.resync()
