"""The NATS fan-out bus: a :class:`~server.stream.listener.ChangeSource` for large fleets.

With per-process LISTEN, every listening backend reads every notification, so PostgreSQL's cost
grows with the number of server processes times the update rate. With ``TASKSTREAM_NATS_URL``
set, one process of the fleet, the **relay** (:mod:`server.stream.relay`, chosen by an advisory
lock), holds the only LISTEN connection and publishes each change to NATS; every process
subscribes only to the subjects of the tasks and owners its clients watch
(:mod:`server.stream.subjects`), so it receives nothing for the rest.

Nothing is lost, as with the listener; each way a change can be missed leads to a resync from
PostgreSQL (the registry re-reads the affected tasks; versions make repeats harmless):

- a new relay (failover) announces a new epoch: every process resyncs once;
- this process's NATS connection drops: it polls PostgreSQL every ``fallback_poll`` seconds
  until it is back, then resyncs (now and once more after ``settle``);
- NATS drops messages for a slow consumer: resync;
- a watched task's version skips one: resync of that task;
- a new subscription may not yet be known across the NATS cluster when a change is published
  (routes spread interest asynchronously): the newly watched tasks are read again ``settle``
  seconds after their subscription reached the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Collection, Sequence
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import Error as NatsError
from nats.errors import SlowConsumerError

from server import metrics
from server.stream.listener import OnChange, OnResync
from server.stream.relay import RelayElection
from server.stream.subjects import Subjects
from server.tasks import TaskState

__all__ = ["BusUnavailable", "NatsBus", "check_reachable"]

logger = logging.getLogger(__name__)


async def _no_resync(
    task_ids: Collection[str] | None = None, owners: Collection[str] | None = None
) -> None:
    return None


class BusUnavailable(ConnectionError):
    """No NATS server in ``TASKSTREAM_NATS_URL`` answered at start-up."""


def _without_credentials(url: str) -> str:
    """A URL fit for a log line: any user and password dropped."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}{sep}{host.rsplit('@', 1)[-1]}{slash}{path}"


async def check_reachable(servers: Sequence[str], connect_timeout: float = 2.0) -> None:
    """Connect to NATS once and close, or raise :class:`BusUnavailable` (``taskstream serve``
    calls it before starting workers, so a wrong URL is one clear line, not a traceback)."""

    async def quiet(_exc: Exception) -> None:
        return None

    try:
        nc = await nats.connect(
            servers=list(servers),
            connect_timeout=max(1, round(connect_timeout)),
            allow_reconnect=True,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=quiet,
        )
    except (NatsError, OSError, TimeoutError) as exc:
        shown = ", ".join(_without_credentials(u) for u in servers)
        raise BusUnavailable(
            f"no NATS server answered at {shown} ({type(exc).__name__}); check TASKSTREAM_NATS_URL"
        ) from None
    await nc.close()


def _server_label(client: NatsClient) -> str:
    url = client.connected_url
    return f"nats://{url.hostname}:{url.port}" if url is not None else ""


class NatsBus:
    """One process's side of the bus: its NATS connection, its interest, its relay candidacy.

    ``servers``: NATS URLs (any node of the cluster; nats-py learns the others);
    ``check_interval``: relay election and heartbeat period; ``fallback_poll``: seconds between
    resyncs while NATS is unreachable; ``settle``: the catch-up delay after subscribing.
    """

    connect_timeout = 2.0
    # Messages one subject may have waiting in this process before NATS counts it a slow
    # consumer and drops (nats-py's default; tests lower it to provoke a drop).
    pending_msgs_limit = 512 * 1024

    def __init__(
        self,
        dsn: str,
        servers: Sequence[str],
        *,
        prefix: str = "taskstream",
        check_interval: float = 5.0,
        fallback_poll: float = 2.0,
        settle: float = 0.5,
    ) -> None:
        self._dsn = dsn
        self.servers = list(servers)
        self.subjects = Subjects(prefix)
        self.check_interval, self.fallback_poll, self.settle = check_interval, fallback_poll, settle
        self._on_change: OnChange = lambda _state: None
        self._on_resync: OnResync = _no_resync
        self._nc: NatsClient | None = None
        self._connected: asyncio.Event = metrics.GaugedEvent(metrics.BUS_CONNECTED)
        self._server = ""
        # Interest: what the registry watches, and the NATS subscriptions that follow it.
        self._want: dict[str, tuple[str, str]] = {}  # subject -> (kind, id)
        self._subs: dict[str, NatsSubscription] = {}
        self._interest_changed = asyncio.Event()
        # The last (version, deleted) handed on per watched task: a change arrives once on the
        # task's subject and once more on its owner's when both are watched.
        self._last: dict[str, tuple[int, bool]] = {}
        self._epoch: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._interest_worker: asyncio.Task[None] | None = None
        self._stopping = False
        self.election = RelayElection(
            dsn,
            self.subjects,
            self._publish,
            check_interval=check_interval,
            fallback_poll=fallback_poll,
        )
        # Counters read by tests (and mirrored into metrics).
        self.messages = 0
        self.resyncs: dict[str, int] = {}
        self.reconnects = 0
        self.drops = 0

    # -- ChangeSource ----------------------------------------------------------------------------

    @property
    def connected(self) -> asyncio.Event:
        return self._connected

    @property
    def server(self) -> str:
        """The NATS server this process is connected to now ('' while disconnected)."""
        return self._server

    @property
    def is_relay(self) -> bool:
        return self.election.is_relay

    @property
    def subject_count(self) -> int:
        return len(self._subs)

    async def start(self, on_change: OnChange, on_resync: OnResync) -> None:
        self._on_change, self._on_resync = on_change, on_resync
        try:
            self._nc = await nats.connect(
                servers=self.servers,
                name=f"taskstream-{socket.gethostname()}-{os.getpid()}",
                connect_timeout=max(1, round(self.connect_timeout)),
                allow_reconnect=True,
                # Bounded at start-up (nats-py would retry forever and the server would hang
                # instead of saying what is wrong); unbounded once connected, below.
                max_reconnect_attempts=2,
                reconnect_time_wait=1,
                ping_interval=max(1, round(self.check_interval)),
                max_outstanding_pings=2,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
            )
        except (NatsError, OSError, TimeoutError) as exc:
            shown = ", ".join(_without_credentials(u) for u in self.servers)
            raise BusUnavailable(
                f"no NATS server answered at {shown} "
                f"({type(exc).__name__}); check TASKSTREAM_NATS_URL"
            ) from None
        nc = self._nc
        nc.options["max_reconnect_attempts"] = -1  # from now on, never give up on NATS
        await nc.subscribe(self.subjects.control, cb=self._on_control)
        await nc.flush(timeout=max(1, round(self.connect_timeout)))
        self._set_server()
        self._connected.set()
        self._interest_worker = asyncio.create_task(self._follow_interest(), name="taskstream-bus")
        self.election.start()
        logger.info(
            "bus connected to %s",
            self._server,
            extra={"event": "bus_connected", "server": self._server},
        )

    async def stop(self) -> None:
        self._stopping = True
        await self.election.stop()
        for task in [self._interest_worker, self._poller, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._interest_worker = self._poller = None
        self._tasks.clear()
        self._connected.clear()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await asyncio.wait_for(nc.close(), 2)
        self._subs.clear()
        metrics.BUS_SUBJECTS.set(0)
        self._set_server()

    def watch_task(self, task_id: str) -> None:
        self._want[self.subjects.task(task_id)] = ("task", task_id)
        self._interest_changed.set()

    def unwatch_task(self, task_id: str) -> None:
        self._want.pop(self.subjects.task(task_id), None)
        self._last.pop(task_id, None)
        self._interest_changed.set()

    def watch_owner(self, owner_id: str) -> None:
        self._want[self.subjects.owner(owner_id)] = ("owner", owner_id)
        self._interest_changed.set()

    def unwatch_owner(self, owner_id: str) -> None:
        self._want.pop(self.subjects.owner(owner_id), None)
        self._interest_changed.set()

    # -- interest --------------------------------------------------------------------------------

    async def _follow_interest(self) -> None:
        """Bring the NATS subscriptions in line with what is watched, in batches; then read the
        new ones again once the cluster has surely learnt of them."""
        while True:
            await self._interest_changed.wait()
            self._interest_changed.clear()
            nc = self._nc
            if nc is None:
                continue
            added: list[tuple[str, str]] = []
            try:
                for subject in [s for s in self._subs if s not in self._want]:
                    await self._subs.pop(subject).unsubscribe()
                for subject, what in list(self._want.items()):
                    if subject not in self._subs:
                        self._subs[subject] = await nc.subscribe(
                            subject, cb=self._on_msg, pending_msgs_limit=self.pending_msgs_limit
                        )
                        added.append(what)
                metrics.BUS_SUBJECTS.set(len(self._subs))
                if added and nc.is_connected:
                    await nc.flush(timeout=max(1, round(self.check_interval)))
            except (NatsError, OSError, TimeoutError) as exc:
                # Disconnected meanwhile: nats-py replays every subscription on reconnect, and
                # the reconnect resyncs everything watched.
                logger.debug("bus interest update deferred: %s", type(exc).__name__)
            if added:
                ids = [i for kind, i in added if kind == "task"]
                owners = [i for kind, i in added if kind == "owner"]
                self._later(self.settle, "interest", ids, owners)

    # -- receiving -------------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        try:
            state = TaskState.from_notification(msg.data.decode())
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            logger.warning("bus ignored a malformed message")
            return
        self.messages += 1
        metrics.BUS_MESSAGES.inc()
        if self.subjects.task(state.id) in self._want:
            last = self._last.get(state.id)
            if last is not None:
                # The same change again (through the owner's subject too), or an older one: a
                # deletion repeats the last version, a task created again starts at 1.
                if state.deleted:
                    if last[1]:
                        return
                elif not last[1] and state.version <= last[0]:
                    return
            self._last[state.id] = (state.version, state.deleted)
            if last is not None and not last[1] and state.version > last[0] + 1:
                logger.info(
                    "bus: a task's version skipped (%d -> %d); resyncing it",
                    last[0],
                    state.version,
                    extra={"event": "bus_gap"},
                )
                self._later(0, "gap", [state.id], [])
        self._on_change(state)

    async def _on_control(self, msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            epoch = str(body["epoch"])
            resync = bool(body.get("resync", False))
        except (ValueError, KeyError, TypeError):
            logger.warning("bus ignored a malformed control message")
            return
        if epoch != self._epoch:
            first = self._epoch is None
            self._epoch = epoch
            logger.info(
                "bus: relay %s announced epoch %s; resyncing",
                body.get("relay"),
                epoch,
                extra={"event": "bus_epoch", "epoch": epoch, "first": first},
            )
            self._later(0, "epoch")
        elif resync:
            self._later(0, "relay")

    # -- losing and regaining NATS ---------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            self.drops += 1
            metrics.BUS_DROPS.inc()
            logger.warning(
                "bus: NATS dropped messages (slow consumer); resyncing",
                extra={"event": "bus_drop"},
            )
            self._later(0, "slow_consumer")
        else:
            logger.debug("bus: NATS error %s", type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self._stopping:
            return
        self._connected.clear()
        self._set_server()
        logger.warning(
            "bus: NATS connection lost; polling watched tasks until it is back",
            extra={"event": "bus_lost"},
        )
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._fallback_poll(), name="taskstream-bus-poll")

    async def _on_reconnected(self) -> None:
        if self._stopping:
            return
        self.reconnects += 1
        metrics.BUS_RECONNECTS.inc()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._set_server()
        self._connected.set()
        logger.warning(
            "bus: NATS connection restored (%s); resyncing",
            self._server,
            extra={"event": "bus_restored", "server": self._server},
        )
        # Now for what was missed while down; once more when the replayed subscriptions have
        # spread over the cluster.
        self._later(0, "reconnect")
        self._later(self.settle, "reconnect")
        if self.election.is_relay:
            # What the relay published while it was away may be lost: a new epoch.
            self._spawn(self.election.new_epoch())

    async def _on_closed(self) -> None:
        self._connected.clear()

    async def _fallback_poll(self) -> None:
        while True:
            await asyncio.sleep(self.fallback_poll)
            await self._resync("poll")

    # -- helpers ---------------------------------------------------------------------------------

    def _set_server(self) -> None:
        old = self._server
        nc = self._nc
        new = _server_label(nc) if nc is not None and nc.is_connected else ""
        if old and old != new:
            metrics.BUS_SERVER.labels(old).set(0)
        if new:
            metrics.BUS_SERVER.labels(new).set(1)
        self._server = new

    async def _publish(self, subject: str, payload: bytes) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            await nc.publish(subject, payload)
        except (NatsError, OSError) as exc:
            # Lost: the relay's next epoch (on reconnect) makes every instance resync.
            logger.debug("bus publish failed: %s", type(exc).__name__)

    def _later(
        self,
        delay: float,
        reason: str,
        task_ids: Collection[str] | None = None,
        owners: Collection[str] | None = None,
    ) -> None:
        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            await self._resync(reason, task_ids, owners)

        self._spawn(run())

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resync(
        self,
        reason: str,
        task_ids: Collection[str] | None = None,
        owners: Collection[str] | None = None,
    ) -> None:
        if task_ids is not None and not task_ids and not owners:
            return
        self.resyncs[reason] = self.resyncs.get(reason, 0) + 1
        metrics.BUS_RESYNCS.labels(reason).inc()
        started = time.monotonic()
        await self._on_resync(task_ids, owners)
        logger.debug("bus resync (%s) took %.3f s", reason, time.monotonic() - started)
