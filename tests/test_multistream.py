"""The multi-task stream: one connection for many tasks."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from tests.conftest import LiveServer, create_task
from tests.sse_client import open_stream


def multi_url(server: LiveServer, ids: str | None = None) -> str:
    url = f"{server.url}/api/v1/sse/tasks"
    return url if ids is None else f"{url}?ids={ids}"


async def test_events_carry_task_id_and_stream_closes_when_all_terminal(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "a")
    await create_task(sql, "b", state="transcribing", progress=50.0)
    async with open_stream(client, multi_url(server, "a,b"), token=server.token()) as s:
        first = [await s.next(), await s.next()]
        assert {e.json()["task_id"] for e in first} == {"a", "b"}
        assert all(e.event == "progress" for e in first)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'a'")
        assert (await s.next()).json()["task_id"] == "a"
        done = await s.next()
        assert done.event == "complete" and done.json() == {"task_id": "a", "state": "success"}
        await s.expect_nothing(0.3)  # b is still running: the stream stays open
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'failed', error = 'x' WHERE id = 'b'"
        )
        assert (await s.next()).json()["state"] == "failed"
        assert (await s.next()).json() == {"task_id": "b", "state": "failed", "error": "x"}
        await s.wait_closed()


async def test_missing_and_foreign_tasks_get_error_events(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "mine")
    await create_task(sql, "theirs", owner="bob")
    async with open_stream(
        client, multi_url(server, "mine,theirs,ghost"), token=server.token()
    ) as s:
        evs = [await s.next() for _ in range(3)]
        errors = {e.json()["task_id"]: e.json() for e in evs if e.event == "error"}
        assert errors == {
            "theirs": {"error": "Task not found", "task_id": "theirs"},
            "ghost": {"error": "Task not found", "task_id": "ghost"},
        }
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'mine'")
        assert (await s.next()).event == "progress"
        assert (await s.next()).event == "complete"
        await s.wait_closed()


async def test_resume_id_lists_versions_and_skips_unchanged_tasks(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "a")
    await create_task(sql, "b")
    async with open_stream(client, multi_url(server, "a,b"), token=server.token()) as s:
        await s.next()
        second = await s.next()
        assert second.id == "1.1"
    await sql.execute("UPDATE taskstream.tasks SET progress = 9 WHERE id = 'b'")
    async with open_stream(
        client, multi_url(server, "a,b"), token=server.token(), headers={"Last-Event-ID": "1.1"}
    ) as s:
        ev = await s.next()
        assert ev.json()["task_id"] == "b" and ev.id == "1.2"
        await s.expect_nothing(0.3)


async def test_reconnect_after_every_task_finished_gets_204(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "a", state="success")
    await create_task(sql, "b", state="cancelled")
    headers = {"Authorization": f"Bearer {server.token()}"}
    r = await client.get(multi_url(server, "a,b"), headers=headers)
    ids = [line for line in r.text.splitlines() if line.startswith("id: ")]
    assert ids[-1] == "id: 1.1"
    r = await client.get(multi_url(server, "a,b"), headers={**headers, "Last-Event-ID": "1.1"})
    assert r.status_code == 204


@pytest.mark.parametrize("settings_overrides", [{"stream_timeout": 1.5}])
async def test_without_ids_streams_open_tasks_and_new_ones(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "running")
    await create_task(sql, "finished", state="success")
    await create_task(sql, "someone-elses", owner="bob")
    async with open_stream(client, multi_url(server), token=server.token()) as s:
        first = await s.next()
        assert first.json()["task_id"] == "running" and first.id is None or first.id == ""
        await s.expect_nothing(0.2)
        await create_task(sql, "later")
        assert (await s.next()).json()["task_id"] == "later"
        await create_task(sql, "bobs-later", owner="bob")
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'later'")
        assert (await s.next()).json()["state"] == "success"
        assert (await s.next()).json() == {"task_id": "later", "state": "success"}
        # Still open for the caller's other work, until the timeout.
        assert (await s.next(timeout=3)).event == "timeout"
        await s.wait_closed()


@pytest.mark.parametrize(
    "query",
    [
        "ids=a&ids=b",
        "ids=" + ",".join(f"t{i}" for i in range(101)),
        "ids=a,%01b",
        "ids=" + "x" * 201,
    ],
)
async def test_bad_ids_are_400(server: LiveServer, client: httpx.AsyncClient, query: str) -> None:
    r = await client.get(
        f"{server.url}/api/v1/sse/tasks?{query}",
        headers={"Authorization": f"Bearer {server.token()}"},
    )
    assert r.status_code == 400 and r.json()["error"] == "Invalid ids"


async def test_multi_stream_frees_subscription_on_disconnect(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "a")
    async with open_stream(client, multi_url(server), token=server.token()) as s:
        await s.next()
        assert server.runtime.broker.subscriber_count == 1
    async with asyncio.timeout(2):
        while server.runtime.broker.subscriber_count:
            await asyncio.sleep(0.02)
    assert server.runtime.broker._by_owner == {} and server.runtime.broker._by_task == {}
