"""server/reporter.py against a real PostgreSQL: conflation, the interval flush, terminal states
written at once and on exit, and a killed connection that loses nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import asyncpg
import pytest

from server.reporter import Reporter, ReporterClosed, SyncReporter
from tests.conftest import create_task

pytestmark = pytest.mark.timeout(60)


async def row(sql: asyncpg.Connection, task_id: str) -> asyncpg.Record:
    return await sql.fetchrow("SELECT * FROM taskstream.tasks WHERE id = $1", task_id)


async def eventually(check: Any, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_progress_is_conflated_and_written_by_the_interval_flush(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "a")
    await create_task(sql, "b")
    versions: list[int] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(
        "taskstream", lambda *args: versions.append(json.loads(args[3])["version"])
    )
    try:
        async with Reporter(database_url, interval=0.5) as report:
            for step in range(1, 101):
                report.progress("a", progress=float(step) / 2, state="working")
                report.progress("b", progress=float(step))
            assert report.pending == 2
            # Nothing is written before the interval (nor does any call block).
            await asyncio.sleep(0.1)
            assert (await row(sql, "a"))["version"] == 1

            async def written() -> bool:
                return bool((await row(sql, "b"))["progress"] == 100.0)

            await eventually(written)
            a = await row(sql, "a")
            assert (a["state"], a["progress"], a["version"]) == ("working", 50.0, 2)
            assert report.rows_written == 2 and report.flushes == 1
        both = await sql.fetch("SELECT DISTINCT xmin::text FROM taskstream.tasks")
        assert len(both) == 1  # one transaction for both tasks
        await asyncio.sleep(0.1)
        assert versions == [2, 2]  # one notification per task, not one per step
    finally:
        await listener.close()


async def test_terminal_state_is_written_at_once(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t")
    async with Reporter(database_url, interval=60) as report:
        report.progress("t", progress=40)
        started = time.monotonic()
        await report.finish("t", "success")
        assert time.monotonic() - started < 2
        r = await row(sql, "t")
        assert (r["state"], r["progress"]) == ("success", 100.0)
        # A terminal state sticks: a later progress report does not reopen the task.
        report.progress("t", state="running", progress=1)
        await report.flush()
    r = await row(sql, "t")
    assert (r["state"], r["progress"]) == ("success", 100.0)


async def test_exit_writes_everything_pending(database_url: str, sql: asyncpg.Connection) -> None:
    ids = [f"e{i}" for i in range(200)]
    for task_id in ids:
        await create_task(sql, task_id)
    async with Reporter(database_url, interval=60) as report:
        for task_id in ids:
            report.progress(task_id, progress=7, estimated_time=30)
        report.progress("e0", state="failed", error="boom")
    rows = await sql.fetch("SELECT id, progress, state FROM taskstream.tasks")
    assert {r["id"]: r["progress"] for r in rows} == {t: 7.0 for t in ids}
    assert {r["state"] for r in rows if r["id"] != "e0"} == {"pending"}
    assert (await row(sql, "e0"))["error"] == "boom"
    with pytest.raises(ReporterClosed):
        report.progress("e1", progress=8)


async def test_a_killed_connection_loses_no_terminal_state(
    database_url: str, sql: asyncpg.Connection
) -> None:
    ids = [f"k{i}" for i in range(20)]
    for task_id in ids:
        await create_task(sql, task_id)
    async with Reporter(database_url, interval=60, max_backoff=0.2) as report:
        for task_id in ids:
            report.progress(task_id, progress=10)
        await report.flush()
        for round_ in range(3):
            assert report._conn is not None
            pid = report._conn.get_server_pid()
            assert await sql.fetchval("SELECT pg_terminate_backend($1)", pid)
            for task_id in ids:
                report.progress(task_id, progress=20 + round_)
            # The first attempt meets the dead connection; the states are written after the
            # reconnect, and finish() returns only then.
            await asyncio.wait_for(report.finish(ids[round_], "failed", error="lost"), 10)
            assert (await row(sql, ids[round_]))["state"] == "failed"
        assert report.reconnects == 3
    rows = await sql.fetch("SELECT id, state, progress FROM taskstream.tasks ORDER BY id")
    states = {r["id"]: (r["state"], r["progress"]) for r in rows}
    assert [states[f"k{i}"] for i in range(3)] == [
        ("failed", 20.0),
        ("failed", 21.0),
        ("failed", 22.0),
    ]
    assert {states[t] for t in ids[3:]} == {("pending", 22.0)}


async def test_a_refused_task_does_not_stop_the_others(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await sql.execute(
        """
        CREATE FUNCTION public.refuse_13() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'progress 13 refused'; END $$;
        CREATE TRIGGER refuse_13 BEFORE UPDATE ON taskstream.tasks
            FOR EACH ROW WHEN (NEW.progress = 13) EXECUTE FUNCTION public.refuse_13();
        """
    )
    for task_id in ("ok1", "bad", "ok2"):
        await create_task(sql, task_id)
    async with Reporter(database_url, interval=60) as report:
        report.progress("ok1", progress=50)
        report.progress("bad", progress=13)
        report.progress("ok2", progress=50)
        await report.flush()
        assert report.refused == 1
    rows = await sql.fetch("SELECT id, progress FROM taskstream.tasks")
    assert {r["id"]: r["progress"] for r in rows} == {"ok1": 50, "bad": 0, "ok2": 50}


async def test_bad_values_are_refused_before_the_batch(database_url: str) -> None:
    async with Reporter(database_url, interval=60) as report:
        for bad in ({"progress": 101}, {"progress": float("nan")}, {"state": ""}, {"error": 5}):
            with pytest.raises(ValueError):
                report.progress("x", **bad)
        with pytest.raises(ValueError):
            await report.finish("x", "running")
        assert report.pending == 0


def test_sync_reporter(database_url: str) -> None:
    async def setup() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await create_task(conn, "s")
        finally:
            await conn.close()

    async def read() -> tuple[str, float]:
        conn = await asyncpg.connect(database_url)
        try:
            r = await conn.fetchrow("SELECT state, progress FROM taskstream.tasks WHERE id = 's'")
            return r["state"], r["progress"]
        finally:
            await conn.close()

    asyncio.run(setup())
    with SyncReporter(database_url, interval=60) as report:
        report.progress("s", progress=30, state="busy")
        report.flush()
        assert asyncio.run(read()) == ("busy", 30.0)
        report.progress("s", progress=60)
    assert asyncio.run(read()) == ("busy", 60.0)
    with SyncReporter(database_url, interval=60) as report:
        report.finish("s", "success")
        assert asyncio.run(read()) == ("success", 100.0)


def test_reporter_imports_without_the_server() -> None:
    code = (
        "import sys, server.reporter; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('quart', 'hypercorn', 'h11')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
