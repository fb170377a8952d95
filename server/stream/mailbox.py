"""The mailbox: one stream's (or long poll's) pending states, one slot per task.

The registry (:mod:`server.stream.registry`) offers every change of a watched task; the stream
takes what is pending when it wakes. Memory per client stays bounded however slowly it reads.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from collections.abc import Callable
from datetime import datetime

from server import metrics
from server.tasks import TaskState

__all__ = ["Deadlines", "Subscription"]


class Deadlines:
    """One timer per event loop for the next deadline of every waiting mailbox.

    A timer per stream (a loop ``TimerHandle`` and uvloop's timer behind it) cost about 1.2 KB
    of every open stream (bench/heapprofile.py). Here a heap holds (deadline, sequence, mailbox)
    and one loop timer is armed for the earliest. An entry whose mailbox has since moved its
    deadline, or was released, is skipped when it comes up: a stream's deadline only moves
    after it passed (a heartbeat was written), so the heap holds about one entry per stream.
    """

    __slots__ = ("__weakref__", "_heap", "_loop", "_seq", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Subscription]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Deadlines:
        """The deadlines of ``loop`` (made on first use, gone with the loop)."""
        found = _DEADLINES.get(loop)
        if found is None:
            found = _DEADLINES[loop] = cls(loop)
        return found

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, sub: Subscription, when: float) -> None:
        """Wake ``sub`` at ``when`` unless it has armed another deadline by then."""
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, sub))
        if self._timer is None or _tick(when) < self._timer_at:
            self._schedule(when)

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        at = _tick(when)
        self._timer = self._loop.call_at(at, self._fire)
        self._timer_at = at

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            when, _, sub = heapq.heappop(heap)
            if sub._deadline == when:
                beat = sub.beat
                if beat is not None and sub._waiter is not None and not sub.pending:
                    # A parked stream that can write its own heartbeat does so here, and its
                    # task sleeps on: at 50,000 idle streams, waking each task for a heartbeat
                    # was most of the server's idle CPU.
                    later = beat(now)
                    if later is not None:
                        self._seq += 1
                        sub._deadline = later
                        heapq.heappush(heap, (later, self._seq, sub))
                        continue
                sub._deadline = 0.0  # fired: the next wait arms again, even at the same time
                sub._wake()
        if heap:
            # A timer that fires a fraction of a millisecond early finds nothing due yet and
            # comes back at once.
            self._schedule(heap[0][0])


# Deadlines fire on a 20 ms grid, a little late, never early. Heartbeats are jittered so that
# streams opened together do not beat together; fired one by one, 10,000 streams' heartbeats
# were 667 timer (re)arms a second per process, as much CPU in the fan-out bench's profile as
# the heartbeats' writes. On the grid each timer serves every deadline due in its tick.
TICK = 0.02


def _tick(when: float) -> float:
    return math.ceil(when / TICK) * TICK


_DEADLINES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = (
    weakref.WeakKeyDictionary()
)


class Subscription:
    """One client's mailbox: at most one pending state per task, so memory is bounded.

    A newer version replaces an older pending one (conflation: a client that falls behind skips
    intermediate progress). A pending terminal state or deletion is never replaced, because the
    stream ends there exactly as it would have for a client that kept up.
    """

    __slots__ = (
        "beat",
        "closing",
        "conflated",
        "created_after",
        "direct",
        "group_closed",
        "group_id",
        "owner_id",
        "pending",
        "sent",
        "task_ids",
        "user_id",
        "_deadline",
        "_waiter",
        "__weakref__",
    )

    def __init__(
        self,
        user_id: str,
        task_ids: set[str],
        owner_id: str | None,
        group_id: str | None = None,
    ) -> None:
        self.user_id = user_id
        self.task_ids = task_ids
        # Set for a stream that follows every task of this owner, including tasks created later.
        self.owner_id = owner_id
        # Set for a stream that follows every task of this group, including tasks created later;
        # group_closed once its owner closed it (no task joins it any more).
        self.group_id = group_id
        self.group_closed = False
        self.pending: dict[str, TaskState] = {}
        # Highest version handed to the client per task; older or equal versions are dropped.
        self.sent: dict[str, int] = {}
        # The stream's wait: a bare future, made only while it waits. An asyncio.Event per
        # mailbox cost more than the socket write when one update woke thousands of streams.
        self._waiter: asyncio.Future[None] | None = None
        # The stream's next deadline (heartbeat, timeout, token expiry) as armed in the loop's
        # shared Deadlines, kept across waits: armed again when it moves, not once per event.
        # 0.0: none armed (or fired); -1.0: released.
        self._deadline = 0.0
        # Set by a stream that can write an event to its socket on the spot (see
        # server/stream/session.py, direct_write): called only while the stream is parked in
        # wait() with nothing pending, so it never overtakes a state the stream still has to
        # write. Returns False to decline (terminal state, socket not drained...): the mailbox
        # path then takes the state as usual.
        self.direct: Callable[[TaskState], bool] | None = None
        # Set with ``direct``: called by the loop's Deadlines when the stream's deadline comes
        # while it is parked with nothing pending. Writes the heartbeat on the spot and returns
        # the stream's next deadline, or returns None (not a heartbeat, or the socket has not
        # drained) to wake the stream as usual.
        self.beat: Callable[[float], float | None] | None = None
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

    async def wait(self, until: float) -> None:
        """Sleep until something is offered, :meth:`close` is called, or the loop clock reaches
        ``until``. The caller checks ``pending`` first: there is no await between that check
        and this call, so nothing offered in between can be missed."""
        loop = asyncio.get_running_loop()
        if self._deadline != until:
            self._deadline = until
            Deadlines.of(loop).arm(self, until)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def attach_direct(
        self,
        write: Callable[[TaskState], bool],
        beat: Callable[[float], float | None] | None = None,
    ) -> None:
        """Let ``write`` take states, and ``beat`` write heartbeats, on the spot while the
        stream waits (see ``direct`` and ``beat``)."""
        self.direct = write
        self.beat = beat

    def sent_version(self, task_id: str) -> int:
        """The highest version of ``task_id`` handed to the client (0: none yet)."""
        return self.sent.get(task_id, 0)

    def release(self) -> None:
        """Drop the deadline and the direct writer (the registry calls this when the mailbox is
        removed)."""
        self.direct = None
        self.beat = None
        self._deadline = -1.0  # its entry in the loop's Deadlines is skipped when it comes up

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

    def mark_group_closed(self) -> None:
        """The group this stream follows was closed: wake the stream so it can tell whether it
        is done."""
        self.group_closed = True
        self._wake()

    def close(self, reason: str) -> None:
        """Ask the stream to end (server shutdown); it sends a final ``retry:`` and closes."""
        self.closing = reason
        self._wake()
