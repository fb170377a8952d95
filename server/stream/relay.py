"""The relay: the one process of a bus-mode fleet that holds the LISTEN connection.

Every instance runs a :class:`RelayElection`. It asks PostgreSQL for a session-level advisory
lock on a dedicated connection (never pooled: a pool would hand the lock to whoever takes that
connection next); the instance that gets it becomes the relay. When the relay dies, its
connection closes, PostgreSQL releases the lock, and the next instance to ask takes over within
one check interval.

The relay runs a :class:`RelayListener` (a :class:`~server.stream.listener.PgListener`, with its
self-check, liveness check and reconnects) that publishes each notification's payload, unchanged,
to the task's subject and its owner's (:mod:`server.stream.subjects`). Only after its LISTEN is
up does it announce a new **epoch** on the control subject; every instance resyncs once on a new
epoch, which recovers whatever was committed while no relay was listening. It repeats the epoch
as a heartbeat, asks for a fleet-wide resync while its own LISTEN connection is down (as a
process's listener polls for itself), and starts a new epoch when its own NATS connection comes
back (what it published meanwhile may be lost).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import asyncpg

from server import db, metrics
from server.stream.listener import PgListener
from server.stream.subjects import Subjects

__all__ = ["Publish", "RelayElection", "RelayListener", "relay_lock_key"]

logger = logging.getLogger(__name__)

# Shown in pg_stat_activity next to the relay's LISTEN connection.
RELAY_LOCK_APP_NAME = "taskstream-relay-lock"

# Sends one message; the bus's NATS connection (nats-py buffers while it reconnects).
Publish = Callable[[str, bytes], Awaitable[None]]


def relay_lock_key(prefix: str) -> int:
    """The advisory lock's key: one relay per database and subject prefix."""
    digest = hashlib.sha256(f"taskstream-relay:{prefix}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class RelayListener(PgListener):
    """A LISTEN connection whose notifications go to NATS instead of a registry.

    The callback stays synchronous (it runs per change): it reads the ids and queues the payload;
    one task publishes in commit order.
    """

    def __init__(
        self, dsn: str, subjects: Subjects, *, check_interval: float, fallback_poll: float
    ) -> None:
        super().__init__(dsn, check_interval=check_interval, fallback_poll=fallback_poll)
        self.subjects = subjects
        self.queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        metrics.NOTIFICATIONS.inc()
        try:
            head = json.loads(payload)
            task_id, owner_id = str(head["id"]), str(head["owner_id"])
        except (ValueError, KeyError, TypeError):
            logger.warning("relay ignored a malformed notification")
            return
        self.queue.put_nowait(
            (self.subjects.task(task_id), self.subjects.owner(owner_id), payload.encode())
        )


class RelayElection:
    """Compete for the relay role and run it while this process holds it."""

    def __init__(
        self,
        dsn: str,
        subjects: Subjects,
        publish: Publish,
        *,
        check_interval: float,
        fallback_poll: float,
    ) -> None:
        self._dsn = dsn
        self.subjects = subjects
        self._publish = publish
        self.check_interval = check_interval
        self.fallback_poll = fallback_poll
        self.key = relay_lock_key(subjects.prefix)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.epoch: str | None = None
        self.is_relay = False
        # Counters read by tests.
        self.terms = 0
        self.published = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="taskstream-relay-election")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def new_epoch(self) -> None:
        """Start a new epoch (every instance resyncs once). Only while relay."""
        if self.is_relay:
            self.epoch = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
            await self._announce(resync=False)

    async def _announce(self, *, resync: bool) -> None:
        body = {"epoch": self.epoch, "relay": self.name, "resync": resync}
        await self._publish(self.subjects.control, json.dumps(body).encode())

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._compete()
                delay = 0.1
            except db.DATABASE_ERRORS as exc:
                logger.debug("relay election: database error %s", type(exc).__name__)
            except Exception as exc:
                # E.g. the LISTEN self-check failed: log it, keep competing (another instance
                # may be able to listen), never let the election end silently.
                logger.warning(
                    "relay: could not act as relay (%s: %s)",
                    type(exc).__name__,
                    exc,
                    extra={"event": "relay_failed"},
                )
            # Full jitter, as the listener: instances losing one database do not retry in step.
            await asyncio.sleep(random.uniform(0, delay) + self.check_interval / 2)
            delay = min(delay * 2, 5.0)

    async def _compete(self) -> None:
        conn = await db.connect(
            self._dsn, server_settings={"application_name": RELAY_LOCK_APP_NAME}
        )
        try:
            while True:
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key):
                    await self._lead(conn)
                    return
                await asyncio.sleep(self.check_interval)
        finally:
            # Closing the session releases the lock, also when we stop being relay on an error.
            conn.terminate()

    async def _lead(self, lock_conn: asyncpg.Connection) -> None:
        listener = RelayListener(
            self._dsn,
            self.subjects,
            check_interval=self.check_interval,
            fallback_poll=self.fallback_poll,
        )

        async def resync_fleet(
            task_ids: Collection[str] | None = None, owners: Collection[str] | None = None
        ) -> None:
            # The relay's own LISTEN was down: every instance may have missed changes.
            await self._announce(resync=True)

        await listener.start(lambda _state: None, resync_fleet)
        publisher = asyncio.create_task(self._pump(listener), name="taskstream-relay-publish")
        self.is_relay = True
        self.terms += 1
        metrics.BUS_RELAY.set(1)
        try:
            # LISTEN is up: whatever committed before now, instances read in their resync.
            await self.new_epoch()
            logger.warning(
                "this process is now the bus relay (epoch %s)",
                self.epoch,
                extra={"event": "relay_acquired", "epoch": self.epoch},
            )
            while True:
                await asyncio.sleep(self.check_interval)
                # The lock lives exactly as long as this session: if it is gone, so is the role.
                await asyncio.wait_for(lock_conn.fetchval("SELECT 1"), self.check_interval)
                await self._announce(resync=False)  # heartbeat: late joiners learn the epoch
        finally:
            self.is_relay = False
            metrics.BUS_RELAY.set(0)
            publisher.cancel()
            try:
                await publisher
            except asyncio.CancelledError:
                pass
            await listener.stop()
            logger.warning(
                "this process stopped being the bus relay", extra={"event": "relay_lost"}
            )

    async def _pump(self, listener: RelayListener) -> None:
        queue = listener.queue
        while True:
            task_subject, owner_subject, payload = await queue.get()
            await self._publish(task_subject, payload)
            await self._publish(owner_subject, payload)
            self.published += 2
            metrics.BUS_PUBLISHED.inc(2)
