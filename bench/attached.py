"""``python -m bench attach``: an attached table against taskstream.tasks, in one run.

Two figures, each measured on both paths in the same run, interleaved so that a machine shared
with other work slows both alike:

- **Trigger cost per update**: a pgbench-like loop, one connection (``synchronous_commit=off``,
  so the disk's flush does not hide the CPU cost), ``--updates`` autocommit ``UPDATE``\ s of a
  random row's progress per round, ``--rounds`` rounds in turn on three tables with the same
  columns: a plain table with no trigger (the floor), ``taskstream.tasks`` (its BEFORE and AFTER
  triggers) and an attached table (its generated trigger). Measured as the backend process's
  CPU time (the database must run on this machine) and as wall time; each path's trigger cost
  is its figure minus the plain table's.
- **Delivery latency at the same load**: a ``taskstream serve`` with ``--streams`` SSE streams
  on native tasks and as many on attached rows; a writer updates both, alternating, at
  ``--rate`` updates/s in total for ``--latency-seconds``. Latency is the time an event is
  read minus its ``updated_at`` (``clock_timestamp()`` in the trigger; same machine, same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psutil

from bench.scenarios import taskstream_command
from server.auth import issue_token

__all__ = ["add_arguments", "run"]

ROWS = 1000
MAPPING = [
    "--id", "id", "--owner", "owner", "--state", "status", "--progress", "progress",
    "--terminal", "success,failed", "--success", "success",
]  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"))
    p.add_argument("--updates", type=int, default=3000, help="updates per table per round")
    p.add_argument("--rounds", type=int, default=8, help="rounds, the tables in turn")
    p.add_argument("--streams", type=int, default=50, help="streams per path")
    p.add_argument("--rate", type=float, default=200.0, help="updates/s, both paths together")
    p.add_argument("--latency-seconds", type=float, default=10.0)


def _taskstream(url: str, *args: str) -> None:
    env = dict(os.environ, DATABASE_URL=url, TASKSTREAM_JWT_SECRET=secrets.token_urlsafe(32))
    subprocess.run([*taskstream_command(), *args], env=env, check=True, timeout=120,
                   stdout=subprocess.DEVNULL)  # fmt: skip


async def _prepare(url: str) -> None:
    _taskstream(url, "migrate")
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """
            CREATE SCHEMA app;
            CREATE TABLE app.plain (id text PRIMARY KEY, owner text NOT NULL,
                                    status text NOT NULL, progress double precision NOT NULL);
            CREATE TABLE app.jobs (LIKE app.plain INCLUDING ALL);
            INSERT INTO app.plain SELECT 'r' || i, 'u' || (i % 100), 'running', 0
              FROM generate_series(1, $1) AS i;
            INSERT INTO app.jobs SELECT * FROM app.plain;
            INSERT INTO taskstream.tasks (id, owner_id, state)
              SELECT id, owner, status FROM app.plain;
            """.replace("$1", str(ROWS))
        )
    finally:
        await conn.close()
    _taskstream(url, "attach", "jobs", "--table", "app.jobs", *MAPPING)


async def _update_loop(url: str, table: str, updates: int) -> tuple[float, float]:
    """Per autocommit UPDATE of a random row's progress: the database backend's CPU time and the
    wall time, in microseconds. CPU time is read from the backend process (same machine), so
    another process's load on a shared machine changes it far less than the wall time."""
    conn = await asyncpg.connect(url)
    try:
        # synchronous_commit off: the WAL flush at commit (milliseconds on a busy disk) would
        # hide the triggers' cost, which is what differs between the paths.
        await conn.execute("SET synchronous_commit = off")
        backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
        statement = await conn.prepare(f"UPDATE {table} SET progress = $1 WHERE id = $2")
        rng = random.Random(7)
        for _ in range(100):  # warm the plan and the caches
            await statement.fetch(rng.random() * 100, f"r{rng.randint(1, ROWS)}")
        cpu0, wall0 = backend.cpu_times(), time.perf_counter()
        for _ in range(updates):
            await statement.fetch(rng.random() * 100, f"r{rng.randint(1, ROWS)}")
        cpu1, wall1 = backend.cpu_times(), time.perf_counter()
    finally:
        await conn.close()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return cpu / updates * 1e6, (wall1 - wall0) / updates * 1e6


TABLES = {
    "plain table (no trigger)": "app.plain",
    "taskstream.tasks": "taskstream.tasks",
    "attached table": "app.jobs",
}


async def trigger_cost(url: str, updates: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in TABLES}
    for _ in range(rounds):
        for name, table in TABLES.items():
            out[name].append(await _update_loop(url, table, updates))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _watch(
    client: httpx.AsyncClient, url: str, token: str, latencies: list[float], ready: asyncio.Event
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    first = True
    async with client.stream("GET", url, headers=headers) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if first:
                first = False
                ready.set()
                continue
            if "updated_at" in data:
                sent = datetime.fromisoformat(data["updated_at"]).timestamp()
                latencies.append((time.time() - sent) * 1000)


async def delivery_latency(
    url: str, streams: int, rate: float, seconds: float
) -> dict[str, list[float]]:
    secret = secrets.token_urlsafe(32)
    port = _free_port()
    env = dict(os.environ, DATABASE_URL=url, TASKSTREAM_JWT_SECRET=secret)
    server = await asyncio.create_subprocess_exec(
        *taskstream_command(), "serve", "--port", str(port),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    latencies: dict[str, list[float]] = {"taskstream.tasks": [], "attached table": []}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
            for _ in range(300):
                try:
                    if (await client.get(f"{base}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            # Rows r1..rN belong to owners u0..u99: a token per owner.
            ids = [f"r{i}" for i in range(1, streams + 1)]
            watchers = []
            readies = []
            for i in ids:
                token = issue_token(secret, f"u{int(i[1:]) % 100}")
                for path, task_id in (("taskstream.tasks", i), ("attached table", f"jobs:{i}")):
                    ready = asyncio.Event()
                    readies.append(ready)
                    url_ = f"{base}/api/v1/sse/tasks/{task_id}/progress"
                    watchers.append(
                        asyncio.create_task(_watch(client, url_, token, latencies[path], ready))
                    )
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
            conn = await asyncpg.connect(url)
            try:
                interval = 1.0 / rate
                start = time.monotonic()
                n = 0
                while time.monotonic() - start < seconds:
                    task = ids[(n // 2) % len(ids)]
                    # A new value on each pass over the tasks: an unchanged row sends nothing.
                    value = (n // (2 * len(ids))) % 100 + 0.5
                    if n % 2 == 0:
                        await conn.execute(
                            "UPDATE taskstream.tasks SET progress = $2 WHERE id = $1", task, value
                        )
                    else:
                        await conn.execute(
                            "UPDATE app.jobs SET progress = $2 WHERE id = $1", task, value
                        )
                    n += 1
                    delay = start + n * interval - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
            finally:
                await conn.close()
            await asyncio.sleep(1.0)
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
    return latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _main(args: argparse.Namespace) -> int:
    if not args.database_url:
        print("give --database-url (or BENCH_DATABASE_URL), on this machine", file=sys.stderr)
        return 2
    # A database of its own, never another run's taskstream_bench: the machine may be shared.
    name = "taskstream_bench_attach_" + secrets.token_hex(4)
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = urlunsplit(urlsplit(args.database_url)._replace(path="/" + name))
    try:
        await _prepare(url)
        costs = await trigger_cost(url, args.updates, args.rounds)
        lat = await delivery_latency(url, args.streams, args.rate, args.latency_seconds)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    print(f"\nCost per autocommit UPDATE ({args.rounds} rounds x {args.updates} updates per table,"
          " tables in turn; microseconds; trigger = path - plain table)")  # fmt: skip
    floor_cpu = statistics.median(c for c, _ in costs["plain table (no trigger)"])
    floor_wall = statistics.median(w for _, w in costs["plain table (no trigger)"])
    for name, values in costs.items():
        cpu = statistics.median(c for c, _ in values)
        wall = statistics.median(w for _, w in values)
        spread = f"{min(c for c, _ in values):.0f}-{max(c for c, _ in values):.0f}"
        trig = (
            ""
            if name.startswith("plain")
            else (f"  trigger: cpu {cpu - floor_cpu:+.0f}, wall {wall - floor_wall:+.0f}")
        )
        print(f"  {name:<26} backend cpu {cpu:5.0f} (rounds {spread})  wall {wall:6.0f}{trig}")
    # Per round, the two paths ran one after the other: their ratio is the least noisy figure.
    ratios = [
        (a[0] - p[0]) / (n[0] - p[0])
        for p, n, a in zip(*costs.values(), strict=True)
        if n[0] > p[0]
    ]
    totals = [a[0] / n[0] for _, n, a in zip(*costs.values(), strict=True)]
    print(f"  attached / native, median of per-round ratios:"
          f" UPDATE cpu {statistics.median(totals):.2f}x,"
          f" trigger cpu {statistics.median(ratios):.2f}x"
          f" (rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    print(f"\nDelivery latency (update commit -> SSE event read), {args.streams} streams per path,"
          f" {args.rate:g} updates/s in total for {args.latency_seconds:g} s")  # fmt: skip
    for name, values in lat.items():
        print(f"  {name:<18} n={len(values):5d}  p50 {_pct(values, 0.5):6.2f} ms"
              f"  p90 {_pct(values, 0.9):6.2f} ms  p99 {_pct(values, 0.99):6.2f} ms")  # fmt: skip
    print("\nThe machine may be shared: compare paths within one run, not across runs.")
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.attached", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
