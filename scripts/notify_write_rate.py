"""Measure how many single-row task UPDATEs per second PostgreSQL commits, with and without the
NOTIFY trigger, to size what one primary allows (docs/scaling.md).

    python scripts/notify_write_rate.py --dsn postgresql://postgres@127.0.0.1:5432/test

It creates a scratch database (dropped at the end), applies taskstream's migrations, fills
``taskstream.tasks`` with rows, keeps one LISTEN connection reading (as a server would), and runs
pgbench with a script of single-row UPDATEs on random rows: once with the triggers as shipped and
once with the NOTIFY trigger disabled, for several client counts. Needs ``pgbench`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server import db  # noqa: E402

ROWS = 1000
SCRIPT = (
    f"\\set id random(1, {ROWS})\n"
    "UPDATE taskstream.tasks SET progress = random() * 100 WHERE id = 'b' || :id;\n"
)


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def _pgbench(url: str, clients: int, seconds: int, sync_commit: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(SCRIPT)
    env = dict(os.environ, PGOPTIONS=f"-c synchronous_commit={sync_commit}")
    try:
        out = subprocess.run(
            ["pgbench", "-n", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds)]
            + ["-f", f.name, url],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"tps = ([\d.]+)", out)
    assert m, out
    return float(m.group(1))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--sync-commit", default="on,off")
    args = parser.parse_args()
    if shutil.which("pgbench") is None:
        sys.exit("pgbench not found (Debian: postgresql-client)")

    name = f"ts_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(args.dsn, name)
    received = 0

    def on_notify(*_: object) -> None:
        nonlocal received
        received += 1

    try:
        await db.migrate(url)
        conn = await asyncpg.connect(url)
        await conn.execute(
            "INSERT INTO taskstream.tasks (id, owner_id) "
            f"SELECT 'b' || g, 'bench' FROM generate_series(1, {ROWS}) g"
        )
        listener = await asyncpg.connect(url)
        await listener.add_listener("taskstream", on_notify)
        version = await conn.fetchval("SHOW server_version")
        print(f"PostgreSQL {version}, {os.cpu_count()} CPUs, {args.seconds} s per run")
        print("sync_commit clients  notify_trigger  updates/s")
        for sync in args.sync_commit.split(","):
            for clients in (int(c) for c in args.clients.split(",")):
                for notify in (True, False):
                    action = "ENABLE" if notify else "DISABLE"
                    await conn.execute(
                        f"ALTER TABLE taskstream.tasks {action} TRIGGER tasks_notify_update"
                    )
                    # pgbench blocks; the listener must keep reading meanwhile.
                    tps = await asyncio.to_thread(_pgbench, url, clients, args.seconds, sync)
                    on = "on" if notify else "off"
                    print(f"{sync:>11} {clients:>7}  {on:>14}  {tps:>9.0f}", flush=True)
        print(f"notifications received by the listener: {received}")
        await listener.close()
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
