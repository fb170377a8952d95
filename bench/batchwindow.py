"""``python -m bench.batchwindow --database-url URL``: the write batcher alone, to choose its
window and size cap.

Closed loop, no HTTP: C concurrent callers each submit one ``PATCH``-like update to
:class:`server.writebatch.WriteBatcher`, wait for the answer, and submit the next, for a few
seconds per setting. Prints updates/s, the callers' p50/p99 wait and the mean batch size for each
window and concurrency, plus the unbatched baseline (each update alone on the pool, as before
batching). Runs in a fresh database on the given server, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import numpy as np

from server import db
from server.writebatch import WriteBatcher

__all__ = ["main"]


def _with_db(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _closed_loop(
    write: Callable[[str, float], Awaitable[object]], callers: int, seconds: float, tasks: int
) -> tuple[float, float, float]:
    lat: list[float] = []
    done = 0
    end = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < end:
            task_id = f"t{(k * 7919 + n) % tasks}"
            n += 1
            t = time.perf_counter()
            await write(task_id, float(n % 99 + 1))
            lat.append(time.perf_counter() - t)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    span = time.perf_counter() - t0
    p50, p99 = np.percentile(np.array(lat) * 1000, [50, 99])
    return done / span, float(p50), float(p99)


async def _run(
    url: str, windows: Sequence[float], concurrency: Sequence[int], seconds: float, cap: int
) -> None:
    name = f"ts_batchwin_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = _with_db(url, name)
    try:
        await db.migrate(dsn)
        pool = await db.create_pool(dsn)
        try:
            tasks = 2000
            await pool.execute(
                "INSERT INTO taskstream.tasks (id, owner_id)"
                " SELECT 't' || g, 'u' FROM generate_series(0, $1 - 1) g",
                tasks,
            )
            print(
                f"{'setting':<16} {'callers':>7} {'updates/s':>10} {'p50 ms':>7} {'p99 ms':>7}"
                f" {'per flush':>9}"
            )
            for c in concurrency:

                async def alone(task_id: str, progress: float) -> object:
                    return await db.update_task(pool, task_id, db.TaskChange(progress=progress))

                rate, p50, p99 = await _closed_loop(alone, c, seconds, tasks)
                print(f"{'unbatched':<16} {c:>7} {rate:>10,.0f} {p50:>7.1f} {p99:>7.1f} {1:>9}")
                for window in windows:
                    batcher = WriteBatcher(lambda: pool, window=window, max_size=cap)
                    await batcher.start()

                    async def batched(
                        task_id: str, progress: float, batcher: WriteBatcher = batcher
                    ) -> object:
                        return await batcher.update(task_id, db.TaskChange(progress=progress))

                    try:
                        rate, p50, p99 = await _closed_loop(batched, c, seconds, tasks)
                    finally:
                        await batcher.stop()
                    per = batcher.stats.writes / max(batcher.stats.flushes, 1)
                    label = f"window {window * 1000:g} ms"
                    print(f"{label:<16} {c:>7} {rate:>10,.0f} {p50:>7.1f} {p99:>7.1f} {per:>9.1f}")
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.batchwindow", description=__doc__)
    p.add_argument("--database-url", required=True, help="a server to create a scratch db on")
    p.add_argument("--windows", default="0,0.001,0.002,0.005", help="seconds, comma-separated")
    p.add_argument("--concurrency", default="1,8,64,256", help="callers, comma-separated")
    p.add_argument("--seconds", type=float, default=3.0, help="per setting")
    p.add_argument("--cap", type=int, default=500, help="TASKSTREAM_WRITE_BATCH_MAX")
    a = p.parse_args(argv)
    asyncio.run(
        _run(
            a.database_url,
            [float(x) for x in a.windows.split(",")],
            [int(x) for x in a.concurrency.split(",")],
            a.seconds,
            a.cap,
        )
    )


if __name__ == "__main__":
    main()
