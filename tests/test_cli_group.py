"""``taskstream watch --group`` as a user runs it: a real process against the real server."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.conftest import LiveServer, create_task
from tests.test_cli_client import cli, finish, first_progress, start_cli


def group_args(server: LiveServer, group_id: str, user: str = "alice") -> list[str]:
    return ["watch", "--group", group_id, "--url", server.url, "--token", server.token(user)]


async def test_watch_group_follows_new_tasks_until_closed(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "w1", state="queued", group_id="batch")
    proc = await start_cli(*group_args(server, "batch"))
    seen = await first_progress(proc)
    assert seen.startswith("w1  ") and "queued" in seen
    # Joins after the watch started; its metadata shows beside the bar.
    await create_task(sql, "w2", state="queued", group_id="batch", metadata='{"file": "b.wav"}')
    await asyncio.sleep(0.2)
    await sql.execute("UPDATE taskstream.tasks SET state = 'success', progress = 100")
    await asyncio.sleep(0.2)
    await sql.execute("UPDATE taskstream.groups SET closed_at = now() WHERE id = 'batch'")
    r = await finish(proc, seen=seen)
    assert r.code == 0, r
    assert r.last_line == "group complete: 2 tasks (2 success)"
    assert "w2  [" in r.stderr and '{"file":"b.wav"}' in r.stderr
    assert "w1  [##############################] 100.0%  success" in r.stderr


async def test_watch_group_with_a_failed_task_exits_1(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "f1", state="success", group_id="g2")
    await create_task(sql, "f2", state="failed", error="x", group_id="g2")
    await sql.execute("UPDATE taskstream.groups SET closed_at = now()")
    r = await cli(*group_args(server, "g2"))
    assert (r.code, r.last_line) == (1, "group complete: 2 tasks (1 failed, 1 success)"), r


async def test_watch_group_not_found_and_usage(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "b1", owner="bob", group_id="bobs")
    for group_id in ("nope", "bobs"):
        r = await cli(*group_args(server, group_id))
        assert (r.code, r.last_line) == (2, "error: Group not found"), r
    r = await cli("watch", "t1", "--group", "g", "--url", server.url, "--token", "x")
    assert r.code == 2 and "one of the two" in r.stdout
