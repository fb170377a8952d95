"""The per-process runtime every request handler reads: settings, pool, registry, verifier.

Each server process (each Hypercorn worker) builds one :class:`Runtime` at start-up (see
:mod:`server.app`); handlers reach it through :func:`server.http.runtime`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg

from server import metrics
from server.auth import TokenVerifier
from server.config import Settings
from server.ratelimit import RateLimiter
from server.stream.registry import Registry
from server.stream.snapshots import SnapshotReader
from server.writebatch import WriteBatcher

__all__ = ["Runtime"]


@dataclass
class Runtime:
    """Everything a request handler needs, created in ``before_serving``."""

    settings: Settings
    dsn: str
    verifier: TokenVerifier
    pool: asyncpg.Pool = field(init=False)
    # The subscription registry and, behind it, this process's change listener.
    broker: Registry = field(init=False)
    draining: bool = False
    send_timeouts: int = 0
    snapshots: SnapshotReader = field(init=False)
    ticket_limiter: RateLimiter = field(init=False)
    # Group commit of the task API's writes (create, PATCH, cancel, bulk PATCH).
    writes: WriteBatcher = field(init=False)
    # Periodic work of this process: the NOTIFY-queue sample and the metrics tally flush.
    background: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.snapshots = SnapshotReader(lambda: self.pool)
        self.ticket_limiter = RateLimiter(self.settings.ticket_rate)
        self.writes = WriteBatcher(
            lambda: self.pool,
            window=self.settings.write_batch_window,
            max_size=self.settings.write_batch_max,
            enabled=self.settings.write_batch,
        )

    def count_send_timeout(self) -> None:
        self.send_timeouts += 1
        metrics.STREAM_ERRORS.labels("send_timeout").inc()

    async def drain(self) -> None:
        """Graceful shutdown, step one: refuse new streams and ask open ones to close.

        Each open stream sends a final ``retry:`` (with jitter, so thousands of clients do not
        come back in the same second) and ends; Hypercorn then waits for the sockets to close.
        """
        self.draining = True
        for sub in self.broker.subscriptions:
            sub.close("shutdown")
