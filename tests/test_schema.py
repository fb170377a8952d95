"""The table and its triggers, driven by plain SQL as any writer would."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from server import db
from tests.conftest import create_task


async def _listen(conn: asyncpg.Connection) -> asyncio.Queue[str]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener("taskstream", lambda *a: queue.put_nowait(a[3]))
    return queue


async def test_insert_sets_version_and_notifies(database_url: str, sql: asyncpg.Connection) -> None:
    listener = await asyncpg.connect(database_url)
    try:
        q = await _listen(listener)
        await create_task(sql, "t1", version=99)
        payload = json.loads(await asyncio.wait_for(q.get(), 2))
        assert payload["id"] == "t1" and payload["version"] == 1 and payload["state"] == "pending"
        assert payload["owner_id"] == "alice"
        assert "+" in payload["updated_at"] or payload["updated_at"].endswith("Z")
    finally:
        await listener.close()


async def test_update_bumps_version_and_no_op_update_sends_nothing(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    listener = await asyncpg.connect(database_url)
    try:
        q = await _listen(listener)
        await sql.execute("UPDATE taskstream.tasks SET progress = 10 WHERE id = 't1'")
        assert json.loads(await asyncio.wait_for(q.get(), 2))["version"] == 2
        before = await sql.fetchrow("SELECT version, updated_at FROM taskstream.tasks")
        await sql.execute("UPDATE taskstream.tasks SET progress = 10 WHERE id = 't1'")
        await sql.execute("UPDATE taskstream.tasks SET version = 1 WHERE id = 't1'")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(q.get(), 0.3)
        after = await sql.fetchrow("SELECT version, updated_at FROM taskstream.tasks")
        assert after == before
    finally:
        await listener.close()


async def test_one_megabyte_error_keeps_the_payload_small(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    listener = await asyncpg.connect(database_url)
    try:
        q = await _listen(listener)
        huge = 'é\n"\\' * (1024 * 1024 // 4)
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'failed', error = $1 WHERE id = 't1'", huge
        )
        raw = await asyncio.wait_for(q.get(), 2)
        assert len(raw.encode()) < 8000
        payload = json.loads(raw)
        assert payload["error_truncated"] is True
        assert huge.startswith(payload["error"]) and 0 < len(payload["error"]) <= 1000
        stored = await sql.fetchval("SELECT error FROM taskstream.tasks WHERE id = 't1'")
        assert stored == huge
    finally:
        await listener.close()


async def test_progress_out_of_range_is_rejected(sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1")
    with pytest.raises(asyncpg.CheckViolationError):
        await sql.execute("UPDATE taskstream.tasks SET progress = 101 WHERE id = 't1'")
    with pytest.raises(asyncpg.CheckViolationError):
        await sql.execute("UPDATE taskstream.tasks SET estimated_time = -1 WHERE id = 't1'")


async def test_delete_notifies(database_url: str, sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1")
    listener = await asyncpg.connect(database_url)
    try:
        q = await _listen(listener)
        await sql.execute("DELETE FROM taskstream.tasks WHERE id = 't1'")
        assert json.loads(await asyncio.wait_for(q.get(), 2))["deleted"] is True
    finally:
        await listener.close()


async def test_two_processes_migrating_at_once(pg_cluster: str) -> None:
    """Two separate OS processes run `taskstream migrate` on an empty database at once."""
    import os
    import sys

    from tests import pg

    admin = await asyncpg.connect(pg_cluster)
    name = "ts_test_concurrent_migrate"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = pg.with_database(pg_cluster, name)
    try:
        env = dict(os.environ, DATABASE_URL=url, TASKSTREAM_JWT_SECRET="x" * 32)
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "server",
                "migrate",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        results = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results
        conn = await asyncpg.connect(url)
        try:
            names = [
                r["name"]
                for r in await conn.fetch(
                    "SELECT name FROM taskstream.schema_migrations ORDER BY name"
                )
            ]
        finally:
            await conn.close()
        assert names == [n for n, _ in db.migration_files()]
        outputs = b"".join(out for out, _ in results).decode()
        # Exactly one of the two applied the files; the other found nothing left to do.
        files = [n for n, _ in db.migration_files()]
        applied = f"applied {len(files)} migration(s): {', '.join(files)}"
        assert outputs.count(applied) == 1
        assert outputs.count("applied 0 migration(s)") == 1
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
