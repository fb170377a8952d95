"""The registry: which mailboxes watch which task (and which owner), and the limits on them.

Data path: a :class:`~server.stream.listener.ChangeSource` hands each committed state to
:meth:`Registry.dispatch`, which offers it to every :class:`~server.stream.mailbox.Subscription`
of that task (and to the owner-wide streams of its owner, for a task new to them).

A stream's hold on the registry is a :class:`Lease`, the one owner of its subscription: it
subscribes before the caller reads the current rows (so no change can fall in between), applies
the owner-wide rules, and releases on every exit path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING

import asyncpg

from server import db
from server.stream.mailbox import Subscription
from server.tasks import TaskState

if TYPE_CHECKING:
    from server.stream.listener import ChangeSource

__all__ = ["Lease", "Registry", "StreamLimitExceeded", "is_new_for_owner_stream"]


class StreamLimitExceeded(RuntimeError):
    """Opening another stream would pass a per-user or per-process limit."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"too many open streams ({scope})")
        self.scope = scope


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


class Registry:
    """The subscription registry of one server process, fed by one change source."""

    def __init__(
        self,
        source: ChangeSource,
        pool: asyncpg.Pool,
        *,
        max_streams: int = 10_000,
        max_streams_per_user: int = 100,
    ) -> None:
        self.source = source
        self.pool = pool
        self.max_streams = max_streams
        self.max_streams_per_user = max_streams_per_user
        self._by_task: dict[str, set[Subscription]] = {}
        self._by_owner: dict[str, set[Subscription]] = {}
        self._per_user: dict[str, int] = {}
        self._all: set[Subscription] = set()
        # Counter read by tests.
        self.resyncs = 0

    async def start(self) -> None:
        await self.source.start(self.dispatch, self.resync)

    async def stop(self) -> None:
        await self.source.stop()

    @property
    def connected(self) -> asyncio.Event:
        """Set while changes arrive live (a stream opened otherwise would miss them)."""
        return self.source.connected

    @property
    def subscriber_count(self) -> int:
        return len(self._all)

    @property
    def subscriptions(self) -> frozenset[Subscription]:
        return frozenset(self._all)

    def open(
        self, user_id: str, task_ids: Iterable[str] = (), *, owner_wide: bool = False
    ) -> Lease:
        """A stream's (or long poll's) hold on the registry: ``async with registry.open(...)``."""
        return Lease(self, user_id, task_ids, owner_wide)

    # -- the indexes (used by Lease and dispatch only) -----------------------------------------

    def _subscribe(
        self, user_id: str, task_ids: Iterable[str], owner_id: str | None
    ) -> Subscription:
        if len(self._all) >= self.max_streams:
            raise StreamLimitExceeded("process")
        if self._per_user.get(user_id, 0) >= self.max_streams_per_user:
            raise StreamLimitExceeded("user")
        sub = Subscription(user_id, set(task_ids), owner_id)
        self._all.add(sub)
        self._per_user[user_id] = self._per_user.get(user_id, 0) + 1
        for tid in sub.task_ids:
            self._add_task(tid, sub)
        if owner_id is not None:
            owners = self._by_owner.get(owner_id)
            if owners is None:
                owners = self._by_owner[owner_id] = set()
                self.source.watch_owner(owner_id)
            owners.add(sub)
        return sub

    def _add_task(self, task_id: str, sub: Subscription) -> None:
        subs = self._by_task.get(task_id)
        if subs is None:
            subs = self._by_task[task_id] = set()
            # The first watcher of this task in the process: the source starts receiving it.
            self.source.watch_task(task_id)
        subs.add(sub)

    def _watch(self, sub: Subscription, task_id: str) -> None:
        """Add a task to an owner-wide subscription (a task the owner created after it opened)."""
        sub.task_ids.add(task_id)
        self._add_task(task_id, sub)

    def _unwatch(self, sub: Subscription, task_id: str) -> None:
        sub.task_ids.discard(task_id)
        subs = self._by_task.get(task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_task[task_id]
                self.source.unwatch_task(task_id)

    def _unsubscribe(self, sub: Subscription) -> None:
        """Remove a mailbox. Idempotent."""
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
            self._unwatch(sub, tid)
        if sub.owner_id is not None:
            owners = self._by_owner.get(sub.owner_id)
            if owners is not None:
                owners.discard(sub)
                if not owners:
                    del self._by_owner[sub.owner_id]
                    self.source.unwatch_owner(sub.owner_id)

    # -- the data path ---------------------------------------------------------------------------

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
                self._unwatch(sub, state.id)
        owners = self._by_owner.get(state.owner_id)
        if owners:
            for sub in owners:
                if state.id not in sub.task_ids and is_new_for_owner_stream(
                    state, sub.created_after
                ):
                    self._watch(sub, state.id)
                    sub.offer(state)

    async def resync(
        self, task_ids: Collection[str] | None = None, owners: Collection[str] | None = None
    ) -> None:
        """Read every subscribed task and hand over whatever moved (or vanished), and every task
        that joined an owner after one of their owner-wide streams took its snapshot (created
        for them, or given to them, while no notification could say so).

        With ``task_ids`` or ``owners`` (a source that knows what it may have missed), only
        those of them that are still watched."""
        ids = list(self._by_task)
        since = self._owner_cutoffs()
        if task_ids is not None or owners is not None:
            wanted = set(task_ids or ())
            ids = [tid for tid in ids if tid in wanted]
            keep = set(owners or ())
            since = {owner: cut for owner, cut in since.items() if owner in keep}
        if not ids and not since:
            return
        try:
            rows = await db.fetch_tasks(self.pool, ids) if ids else {}
            joined = await db.fetch_joined_tasks(self.pool, since)
        except db.DATABASE_ERRORS:
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


class Lease:
    """One stream's subscription, from subscribe to release: the only code that releases it.

    ``async with registry.open(user, ids) as lease`` subscribes (raising
    :class:`StreamLimitExceeded` past a limit) and releases on leaving the block, whatever ends
    it. A streaming response outlives the view that opened it: :meth:`keep` hands the lease to
    the response body, which enters it again (``async with lease``) and releases it when it
    ends; if the body never starts (the client left before it), the end of the request task
    releases it.
    """

    __slots__ = ("_kept", "_owner_wide", "_registry", "_task_ids", "_user_id", "sub")

    def __init__(
        self, registry: Registry, user_id: str, task_ids: Iterable[str], owner_wide: bool
    ) -> None:
        self._registry = registry
        self._user_id = user_id
        self._task_ids = task_ids
        self._owner_wide = owner_wide
        self._kept = False
        self.sub: Subscription | None = None

    async def __aenter__(self) -> Subscription:
        if self.sub is None:
            self.sub = self._registry._subscribe(
                self._user_id, self._task_ids, self._user_id if self._owner_wide else None
            )
        else:
            self._kept = False  # the response body holds it now: its exit releases
        return self.sub

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._kept:
            self.release()

    def keep(self) -> None:
        """Keep the subscription past the view's ``async with``, for the response body."""
        self._kept = True
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _task: self.release())

    def release(self) -> None:
        """Remove the mailbox from the registry. Idempotent."""
        if self.sub is not None:
            self._registry._unsubscribe(self.sub)

    async def owner_snapshot(self) -> dict[str, TaskState]:
        """Read an owner-wide stream's snapshot (the owner's open tasks) and watch those tasks.

        Changes that arrived for tasks that existed but were not open at the snapshot are
        dropped; tasks that joined the owner after it stay, the stream picks them up as new.
        """
        sub = self.sub
        assert sub is not None and sub.owner_id is not None
        registry = self._registry
        rows, sub.created_after = await db.fetch_open_tasks(registry.pool, sub.owner_id)
        for tid in rows:
            registry._watch(sub, tid)
        for tid in [t for t in sub.pending if t not in rows]:
            if not is_new_for_owner_stream(sub.pending[tid], sub.created_after):
                del sub.pending[tid]
                registry._unwatch(sub, tid)
        return rows
