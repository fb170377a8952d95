"""Group streams: every task of a group on one stream, including tasks created after it opened,
until the group is closed and all its tasks are terminal (sql/005_groups_metadata.sql)."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from server import metrics
from server.tasks import MAX_GROUP_TASKS, MAX_METADATA, MAX_METADATA_SQL
from tests.conftest import LiveServer, create_task
from tests.sse_client import Stream, open_stream
from tests.test_delivery import KILL_LISTENER, wait_until


def group_url(server: LiveServer, group_id: str = "g1") -> str:
    return f"{server.url}/api/v1/sse/groups/{group_id}/progress"


def auth(server: LiveServer, user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(user)}"}


async def progress_of(s: Stream, task_id: str) -> dict[str, object]:
    """The next event, which must be a progress event of ``task_id``."""
    ev = await s.next()
    assert ev.event == "progress", ev
    data = ev.json()
    assert data["task_id"] == task_id, data
    return data


async def test_group_stream_follows_new_tasks_and_ends_when_closed_and_all_terminal(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", group_id="g1")
    async with open_stream(client, group_url(server), token=server.token()) as s:
        await progress_of(s, "t1")
        # Created after the stream opened: it joins the stream.
        await create_task(sql, "t2", group_id="g1", state="running", progress=10.0)
        assert (await progress_of(s, "t2"))["progress"] == 10.0
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 't1'")
        await progress_of(s, "t1")
        assert (await s.next()).json() == {"task_id": "t1", "state": "success"}
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 't2'")
        await progress_of(s, "t2")
        assert (await s.next()).event == "complete"
        # Every task is terminal, but the group is open: another task may still join.
        await s.expect_nothing(0.3)
        r = await client.post(f"{server.url}/api/v1/groups/g1/close", headers=auth(server))
        assert r.status_code == 200, r.text
        assert r.json()["tasks"] == 2 and r.json()["group_id"] == "g1"
        end = await s.next()
        assert end.event == "group_complete"
        assert end.json() == {"group_id": "g1", "tasks": 2}
        assert end.id == "2.2"
        await s.wait_closed()
    # The end's id sent back: nothing more will come.
    r = await client.get(group_url(server), headers={**auth(server), "Last-Event-ID": "2.2"})
    assert r.status_code == 204


async def test_closed_group_waits_for_open_tasks(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "a1", group_id="g1", state="running")
    await sql.execute("UPDATE taskstream.groups SET closed_at = now() WHERE id = 'g1'")
    async with open_stream(client, group_url(server), token=server.token()) as s:
        await progress_of(s, "a1")
        await s.expect_nothing(0.3)
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'failed', error = 'x' WHERE id = 'a1'"
        )
        await progress_of(s, "a1")
        assert (await s.next()).json() == {"task_id": "a1", "state": "failed", "error": "x"}
        assert (await s.next()).event == "group_complete"
        await s.wait_closed()


async def test_closed_group_refuses_new_tasks(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    r = await client.post(
        f"{server.url}/api/v1/tasks", json={"id": "c1", "group_id": "g1"}, headers=auth(server)
    )
    assert r.status_code == 201 and r.json()["group_id"] == "g1"
    assert (
        await client.post(f"{server.url}/api/v1/groups/g1/close", headers=auth(server))
    ).status_code == 200
    # Closing twice is harmless.
    assert (
        await client.post(f"{server.url}/api/v1/groups/g1/close", headers=auth(server))
    ).status_code == 200
    r = await client.post(
        f"{server.url}/api/v1/tasks", json={"id": "c2", "group_id": "g1"}, headers=auth(server)
    )
    assert r.status_code == 409 and r.json()["error"] == "Group unavailable"
    with pytest.raises(asyncpg.CheckViolationError):
        await create_task(sql, "c3", group_id="g1")


async def test_group_of_another_owner_is_not_found_and_not_joinable(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "b1", owner="bob", group_id="gb")
    async with open_stream(client, group_url(server, "gb"), token=server.token("alice")) as s:
        ev = await s.next()
        assert ev.event == "error" and ev.json() == {"error": "Group not found"}
        assert ev.id == "end"
        await s.wait_closed()
    r = await client.post(f"{server.url}/api/v1/groups/gb/close", headers=auth(server))
    assert r.status_code == 404
    r = await client.post(f"{server.url}/api/v1/groups/nope/close", headers=auth(server))
    assert r.status_code == 404
    # alice cannot put a task into bob's group.
    r = await client.post(
        f"{server.url}/api/v1/tasks", json={"id": "a9", "group_id": "gb"}, headers=auth(server)
    )
    assert r.status_code == 409


async def test_group_stream_never_shows_another_owners_task(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "m1", group_id="g1")
    await create_task(sql, "m2", group_id="g1")
    await sql.execute("UPDATE taskstream.tasks SET owner_id = 'bob' WHERE id = 'm2'")
    async with open_stream(client, group_url(server), token=server.token()) as s:
        await progress_of(s, "m1")
        await s.expect_nothing(0.3)  # m2 is bob's now: not shown
        # bob's changes to it never reach alice's group stream.
        await sql.execute("UPDATE taskstream.tasks SET progress = 70 WHERE id = 'm2'")
        await s.expect_nothing(0.3)
        # alice's task given to bob while she watches: it ends as a not-found, then nothing.
        await sql.execute("UPDATE taskstream.tasks SET owner_id = 'bob' WHERE id = 'm1'")
        ev = await s.next()
        assert ev.event == "error" and ev.json() == {"error": "Task not found", "task_id": "m1"}
        await sql.execute("UPDATE taskstream.tasks SET progress = 80 WHERE id = 'm1'")
        await s.expect_nothing(0.3)
        await sql.execute("UPDATE taskstream.groups SET closed_at = now() WHERE id = 'g1'")
        assert (await s.next()).event == "group_complete"
        await s.wait_closed()


async def test_group_stream_resumes_from_last_event_id(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "r1", group_id="g1")
    await create_task(sql, "r2", group_id="g1")
    async with open_stream(client, group_url(server), token=server.token()) as s:
        await progress_of(s, "r1")
        ev = await s.next()
        assert ev.json()["task_id"] == "r2" and ev.id == "1.1"
    # While disconnected: r1 moves, r3 joins.
    await sql.execute("UPDATE taskstream.tasks SET progress = 50 WHERE id = 'r1'")
    await create_task(sql, "r3", group_id="g1")
    async with open_stream(
        client, group_url(server), token=server.token(), headers={"Last-Event-ID": "1.1"}
    ) as s:
        first = await progress_of(s, "r1")
        assert first["version"] == 2
        assert (await s.next()).id == "2.1.1"  # r3's event: r2 (unchanged) was not repeated
        await s.expect_nothing(0.3)


async def test_group_stream_conflates_a_slow_reader(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "q1", group_id="g1")
    async with open_stream(client, group_url(server), token=server.token()) as s:
        await progress_of(s, "q1")
        sub = next(iter(server.runtime.broker.subscriptions))
        # Many commits in a row: a mailbox holds at most one state per task.
        for p in range(1, 30):
            await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id = 'q1'", float(p))
        seen = []
        while not seen or seen[-1] != 29.0:
            seen.append((await progress_of(s, "q1"))["progress"])
        assert len(sub.pending) == 0
        assert seen == sorted(seen)  # versions only go up, whatever was skipped


async def test_group_stream_recovers_after_listener_outage(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "o1", group_id="g1")
    async with open_stream(client, group_url(server), token=server.token()) as s:
        await progress_of(s, "o1")
        listener = server.runtime.broker.source
        before = listener.reconnects  # type: ignore[attr-defined]
        await sql.execute(KILL_LISTENER)
        await wait_until(lambda: listener.reconnects > before, 10)  # type: ignore[attr-defined]
        await create_task(sql, "o2", group_id="g1")
        await progress_of(s, "o2")


async def test_subscriber_count_back_to_zero(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "z1", group_id="g1")
    broker = server.runtime.broker
    async with open_stream(client, group_url(server), token=server.token()) as s:
        await progress_of(s, "z1")
        assert broker.subscriber_count == 1
        assert "g1" in broker._by_group
    await wait_until(lambda: broker.subscriber_count == 0, 5)
    assert broker._by_group == {} and broker._by_task == {}


async def test_bad_group_id_is_400(server: LiveServer, client: httpx.AsyncClient) -> None:
    r = await client.get(group_url(server, "x" * 201), headers=auth(server))
    assert r.status_code == 400 and r.json()["error"] == "Invalid group id"
    r = await client.post(f"{server.url}/api/v1/groups/{'x' * 201}/close", headers=auth(server))
    assert r.status_code == 400
    r = await client.post(f"{server.url}/api/v1/tasks", json={"group_id": ""}, headers=auth(server))
    assert r.status_code == 422


async def test_group_id_cannot_change(sql: asyncpg.Connection) -> None:
    await create_task(sql, "i1", group_id="g1")
    await sql.execute("UPDATE taskstream.tasks SET group_id = 'g2', group_seq = 9 WHERE id = 'i1'")
    row = await sql.fetchrow("SELECT group_id, group_seq FROM taskstream.tasks WHERE id = 'i1'")
    assert (row["group_id"], row["group_seq"]) == ("g1", 1)


@pytest.mark.timeout(60)
async def test_group_stream_sees_concurrent_creators(
    server: LiveServer, client: httpx.AsyncClient, database_url: str
) -> None:
    """Writers creating tasks in one group at once: every task reaches the stream once."""
    pool = await asyncpg.create_pool(database_url, min_size=4, max_size=4)
    try:
        await pool.execute(
            "INSERT INTO taskstream.tasks (id, owner_id, group_id) VALUES ('w0', 'alice', 'g1')"
        )
        async with open_stream(client, group_url(server), token=server.token()) as s:
            await progress_of(s, "w0")
            await asyncio.gather(
                *(
                    pool.execute(
                        "INSERT INTO taskstream.tasks (id, owner_id, group_id, state)"
                        " VALUES ($1, 'alice', 'g1', 'success')",
                        f"w{i}",
                    )
                    for i in range(1, 21)
                )
            )
            ids = set()
            while len(ids) < 20:
                ev = await s.next()
                if ev.event == "progress":
                    ids.add(ev.json()["task_id"])
            assert ids == {f"w{i}" for i in range(1, 21)}
            seqs = await pool.fetch("SELECT group_seq FROM taskstream.tasks ORDER BY group_seq")
            assert [r["group_seq"] for r in seqs] == list(range(1, 22))
    finally:
        await pool.close()


async def test_group_is_full_at_its_cap(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "cap1", group_id="gcap")
    # As if 999 more tasks had joined (inserting them all would only slow the test down).
    await sql.execute(
        f"UPDATE taskstream.groups SET last_seq = {MAX_GROUP_TASKS} WHERE id = 'gcap'"
    )
    r = await client.post(
        f"{server.url}/api/v1/tasks", json={"group_id": "gcap"}, headers=auth(server)
    )
    assert r.status_code == 409 and r.json()["error"] == "Group unavailable"


async def test_sql_and_python_agree_on_group_and_metadata_limits(sql: asyncpg.Connection) -> None:
    defs = {
        r["conname"]: r["def"]
        for r in await sql.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint"
            " WHERE conrelid IN ('taskstream.tasks'::regclass, 'taskstream.groups'::regclass)"
        )
    }
    assert f"<= {MAX_METADATA_SQL}" in defs["tasks_metadata_object"]
    assert MAX_METADATA_SQL >= 2 * MAX_METADATA  # jsonb's text form of an API-sized object fits
    last_seq = next(d for d in defs.values() if "last_seq" in d)
    assert f"{MAX_GROUP_TASKS}" in last_seq


async def test_group_stream_progress_takes_the_direct_write(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "d1", group_id="g1")
    await create_task(sql, "d2", group_id="g1")
    async with open_stream(client, group_url(server), token=server.token()) as s:
        await progress_of(s, "d1")
        await progress_of(s, "d2")
        await asyncio.sleep(0.3)  # let the stream park after writing its snapshot
        before = metrics.TALLY.direct_writes
        for p in (10.0, 20.0):
            await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id = 'd2'", p)
            ev = await s.next()
            # Straight to the socket, with this stream's own resume id.
            assert ev.json()["progress"] == p and ev.id == f"1.{2 if p == 10.0 else 3}"
        assert metrics.TALLY.direct_writes == before + 2
        # A terminal state takes the mailbox path: its complete follows it.
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'd2'")
        assert (await progress_of(s, "d2"))["state"] == "success"
        assert (await s.next()).event == "complete"
