"""``python -m bench attach``: an attached table against taskstream.tasks, in one run.

Two figures, each measured on both paths in the same run, interleaved so that a machine shared
with other work slows both alike:

- **Trigger cost per update**: pgbench, one client (``synchronous_commit=off``, so the disk's
  flush does not hide CPU cost), autocommit ``UPDATE`` of a random row's
  progress, for ``--seconds`` per round and ``--rounds`` rounds in turn on three tables with the
  same columns: a plain table with no trigger (the floor), ``taskstream.tasks`` (its BEFORE and
  AFTER triggers) and an attached table (its generated trigger). The cost of each path's
  triggers is its mean latency minus the plain table's.
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
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

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
    p.add_argument("--seconds", type=float, default=5.0, help="pgbench seconds per round")
    p.add_argument("--rounds", type=int, default=3, help="pgbench rounds per table")
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


def _pgbench(url: str, table: str, id_column: str, progress_column: str, seconds: float) -> float:
    """Mean latency of one autocommit UPDATE, in microseconds."""
    script = (
        f"\\set i random(1, {ROWS})\n"
        f"UPDATE {table} SET {progress_column} = random() * 100 WHERE {id_column} = 'r' || :i;\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    # synchronous_commit off: the WAL flush at commit (milliseconds on a busy disk) would hide
    # the triggers' CPU cost, which is what differs between the paths.
    env = dict(os.environ, PGOPTIONS="-c synchronous_commit=off")
    try:
        done = subprocess.run(
            ["pgbench", "-n", "-c", "1", "-T", str(int(seconds)), "-f", f.name, url],
            capture_output=True, text=True, check=True, timeout=seconds + 60, env=env,
        )  # fmt: skip
    finally:
        Path(f.name).unlink()
    match = re.search(r"latency average = ([0-9.]+) ms", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1)) * 1000


def trigger_cost(url: str, seconds: float, rounds: int) -> dict[str, list[float]]:
    tables = {
        "plain table (no trigger)": ("app.plain", "id", "progress"),
        "taskstream.tasks": ("taskstream.tasks", "id", "progress"),
        "attached table": ("app.jobs", "id", "progress"),
    }
    out: dict[str, list[float]] = {name: [] for name in tables}
    for _ in range(rounds):
        for name, spec in tables.items():
            out[name].append(_pgbench(url, *spec, seconds))
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
    if shutil.which("pgbench") is None:
        print("pgbench is missing (Debian: postgresql-client or postgresql)", file=sys.stderr)
        return 1
    if not args.database_url:
        print("give --database-url (or BENCH_DATABASE_URL): pgbench needs one", file=sys.stderr)
        return 2
    # A database of its own, never another run's taskstream_bench: the machine may be shared.
    name = "taskstream_bench_attach_" + secrets.token_hex(4)
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f"CREATE DATABASE {name}")
    url = urlunsplit(urlsplit(args.database_url)._replace(path="/" + name))
    try:
        await _prepare(url)
        costs = trigger_cost(url, args.seconds, args.rounds)
        lat = await delivery_latency(url, args.streams, args.rate, args.latency_seconds)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    print(f"\nTrigger cost per UPDATE (pgbench, 1 client, {args.rounds} x {args.seconds:g} s"
          " per table, interleaved; mean latency per round, microseconds)")  # fmt: skip
    floor = statistics.median(costs["plain table (no trigger)"])
    for name, values in costs.items():
        med = statistics.median(values)
        rounds = ", ".join(f"{v:.0f}" for v in values)
        extra = "" if name.startswith("plain") else f"  triggers: {med - floor:+.0f} us"
        print(f"  {name:<26} median {med:7.0f} us  (rounds: {rounds}){extra}")
    native = statistics.median(costs["taskstream.tasks"])
    attached = statistics.median(costs["attached table"])
    ratio = (attached - floor) / (native - floor)
    print(f"  attached / native UPDATE: {attached / native:.2f}x;"
          f" trigger cost attached / native: {ratio:.2f}x")  # fmt: skip
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
