"""Open-loop writer: plain-SQL UPDATEs at a fixed rate, one autocommit statement each.

Each UPDATE fires the table's trigger, which sets ``updated_at = clock_timestamp()``:
that is the timestamp the client subtracts from its receive time.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import numpy as np

__all__ = ["WriteStats", "Writer"]

UPDATE = "UPDATE taskstream.tasks SET progress = $2, state = $3 WHERE id = $1"
FINISH = "UPDATE taskstream.tasks SET progress = 100, state = $2 WHERE id = ANY($1::text[])"


@dataclass(frozen=True)
class WriteStats:
    """What one writing window did."""

    target_rate: float
    updates: int
    errors: int
    t_start: float  # wall clock
    t_end: float
    max_lag: float  # worst delay behind schedule, s
    rtt: array[float] = field(default_factory=lambda: array("d"))  # per UPDATE, s

    def rtt_ms(self) -> dict[str, float]:
        """Round trip of one UPDATE incl. commit: how long a commit waited (NOTIFY lock, fsync)."""
        if not self.rtt:
            return {}
        v = np.frombuffer(self.rtt, dtype=np.float64) * 1000
        p50, p99 = np.percentile(v, [50, 99])
        return {"writer_rtt_p50_ms": float(p50), "writer_rtt_p99_ms": float(p99)}

    @property
    def achieved_rate(self) -> float:
        span = self.t_end - self.t_start
        return self.updates / span if span > 0 else 0.0


class Writer:
    """A few dedicated connections that write on a schedule."""

    def __init__(self, url: str, connections: int = 4, synchronous_commit: str = "on") -> None:
        self.url = url
        self.n = connections
        self.synchronous_commit = synchronous_commit
        self.conns: list[asyncpg.Connection] = []
        self.counters: dict[str, int] = {}

    async def open(self) -> None:
        settings = {"synchronous_commit": self.synchronous_commit}
        self.conns = [
            await asyncpg.connect(self.url, server_settings=settings) for _ in range(self.n)
        ]

    async def close(self) -> None:
        for c in self.conns:
            await c.close()
        self.conns = []

    def _next_progress(self, task_id: str) -> float:
        c = self.counters.get(task_id, 0) + 1
        self.counters[task_id] = c
        # 1..99 cycling: consecutive values always differ, so every UPDATE is a real change.
        return float(c % 99 + 1)

    async def run(
        self, rate: float, duration: float, task_ids: Sequence[str], state: str = "running"
    ) -> WriteStats:
        """Write ``rate`` updates/s for ``duration`` s, round-robin over ``task_ids``."""
        if rate <= 0 or duration <= 0 or not task_ids:
            raise ValueError("rate, duration and task_ids must be positive/non-empty")
        loop = asyncio.get_running_loop()
        total = int(rate * duration)
        conns = self.conns[: max(1, min(len(self.conns), total))]
        step = 1.0 / rate
        t0 = loop.time() + 0.01
        wall0 = time.time() + 0.01
        done = 0
        errors = 0
        max_lag = 0.0
        seq = 0
        rtt = array("d")

        async def lane(k: int, conn: asyncpg.Connection) -> None:
            nonlocal done, errors, max_lag, seq
            i = k
            while i < total:
                due = t0 + i * step
                now = loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    max_lag = max(max_lag, now - due)
                task_id = task_ids[seq % len(task_ids)]
                seq += 1
                try:
                    t = loop.time()
                    await conn.execute(UPDATE, task_id, self._next_progress(task_id), state)
                    rtt.append(loop.time() - t)
                    done += 1
                except asyncpg.PostgresError:
                    errors += 1
                i += len(conns)

        await asyncio.gather(*(lane(k, c) for k, c in enumerate(conns)))
        return WriteStats(rate, done, errors, wall0, time.time(), max_lag, rtt)

    async def finish(
        self, task_ids: Sequence[str], state: str = "success", batch: int = 500
    ) -> int:
        """Move every task to a terminal state, ``batch`` rows per transaction."""
        n = 0
        conn = self.conns[0]
        for i in range(0, len(task_ids), batch):
            chunk = list(task_ids[i : i + batch])
            res = await conn.execute(FINISH, chunk, state)
            n += int(res.split()[-1])
        return n
