"""Group commit of the task API's writes (server/writebatch.py), end to end: a real server on a
socket, real PostgreSQL, rows and transactions checked with SQL.

To put chosen writes into one batch without relying on timing, a test holds a row lock on a
"blocker" task: the PATCH of that task is flushed alone and waits on the lock, every write sent
meanwhile queues behind it, and releasing the lock lets the queue go as one flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import httpx
import pytest

from server import db
from server.writebatch import WriteBatcher
from tests.conftest import LiveServer, create_task, make_settings, run_server
from tests.sse_client import open_stream

pytestmark = pytest.mark.timeout(60)

WRITE = ["tasks:write"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def wait_until(check: Any, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def blocked(
    database_url: str, batcher: WriteBatcher, first: Awaitable[Any]
) -> AsyncIterator[asyncio.Task[Any]]:
    """Hold task 'blocker' locked; ``first`` (a write to it) becomes the flush in flight, so
    every write started in the body queues. Leaving the body releases the lock."""
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1 FROM taskstream.tasks WHERE id = 'blocker' FOR UPDATE")
        flushes = batcher.stats.flushes
        head = asyncio.ensure_future(first)
        await wait_until(lambda: batcher.stats.flushes == flushes + 1)
        try:
            yield head
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def xmins(sql: asyncpg.Connection, ids: list[str]) -> set[str]:
    rows = await sql.fetch(
        "SELECT xmin::text AS x FROM taskstream.tasks WHERE id = ANY($1::text[])", ids
    )
    return {r["x"] for r in rows}


def patch(client: httpx.AsyncClient, server: LiveServer, task_id: str, body: Any) -> Any:
    return client.patch(
        f"{server.url}/api/v1/tasks/{task_id}",
        json=body,
        headers=auth(server.token("worker", scopes=WRITE)),
    )


# -- coalescing -----------------------------------------------------------------------------


async def test_concurrent_patches_share_transactions(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    ids = [f"t{i}" for i in range(40)]
    for task_id in ids:
        await create_task(sql, task_id)
    writes = server.runtime.writes
    before = writes.stats.flushes
    answers = await asyncio.gather(*(patch(client, server, t, {"progress": 10}) for t in ids))
    assert [a.status_code for a in answers] == [200] * 40
    assert {a.json()["version"] for a in answers} == {2}
    # Fewer commits than writes: rows written by one transaction share its xmin.
    assert writes.stats.flushes - before < 40
    assert len(await xmins(sql, ids)) < 40


async def test_queued_writes_commit_as_one_transaction(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, database_url: str
) -> None:
    ids = [f"q{i}" for i in range(10)]
    for task_id in [*ids, "blocker"]:
        await create_task(sql, task_id)
    writes = server.runtime.writes
    async with blocked(database_url, writes, patch(client, server, "blocker", {"progress": 1})):
        pending = [asyncio.ensure_future(patch(client, server, t, {"progress": 5})) for t in ids]
        await wait_until(lambda: writes.queued == 10)
        flushes = writes.stats.flushes
    answers = await asyncio.gather(*pending)
    assert [a.status_code for a in answers] == [200] * 10
    assert writes.stats.flushes == flushes + 1
    assert len(await xmins(sql, ids)) == 1
    scraped = (await client.get(f"{server.url}/metrics")).text
    assert "taskstream_write_batch_size_bucket" in scraped


# -- per-request answers -------------------------------------------------------------------


async def test_each_member_of_a_batch_gets_its_own_answer(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, database_url: str
) -> None:
    await create_task(sql, "blocker")
    await create_task(sql, "open", progress=3.0)
    await create_task(sql, "done", state="success")
    await create_task(sql, "bobs", owner="bob")
    alice = auth(server.token("alice"))
    base = f"{server.url}/api/v1/tasks"
    writes = server.runtime.writes
    async with blocked(database_url, writes, patch(client, server, "blocker", {"progress": 1})):
        calls = {
            "update": patch(client, server, "open", {"state": "running", "progress": 50}),
            "missing": patch(client, server, "nope", {"progress": 1}),
            "finished": patch(client, server, "done", {"progress": 1}),
            "invalid": patch(client, server, "open", {"progress": 101}),
            "cancel_foreign": client.post(f"{base}/bobs/cancel", headers=alice),
            "create": client.post(base, json={"id": "fresh", "progress": 7}, headers=alice),
            "create_taken": client.post(base, json={"id": "done"}, headers=alice),
            "patch_fresh": patch(client, server, "fresh", {"progress": 8}),
        }
        futures = {}
        for name, call in calls.items():
            futures[name] = asyncio.ensure_future(call)
            if name != "invalid":  # refused before it reaches the batcher
                queued = len([n for n in futures if n != "invalid"])
                await wait_until(lambda q=queued: writes.queued == q)
            else:
                await futures[name]
    r = {name: await f for name, f in futures.items()}
    assert r["update"].status_code == 200
    body = r["update"].json()
    assert (body["state"], body["progress"], body["version"]) == ("running", 50.0, 2)
    assert r["update"].headers["etag"] == '"2"'
    assert (r["missing"].status_code, r["missing"].json()) == (404, {"error": "Task not found"})
    assert r["finished"].status_code == 409
    assert r["finished"].json() == {"error": "Task is finished", "detail": {"state": "success"}}
    assert r["invalid"].status_code == 422
    assert r["cancel_foreign"].status_code == 404
    assert r["create"].status_code == 201 and r["create"].json()["version"] == 1
    assert r["create"].headers["location"] == "/api/v1/tasks/fresh"
    assert r["create_taken"].status_code == 409
    assert r["create_taken"].json() == {"error": "Task already exists", "detail": "done"}
    # Created and then patched in the same transaction, in that order.
    assert r["patch_fresh"].status_code == 200 and r["patch_fresh"].json()["version"] == 2
    assert await sql.fetchval("SELECT state FROM taskstream.tasks WHERE id = 'bobs'") == "pending"
    assert len(await xmins(sql, ["open", "fresh"])) == 1


async def test_a_database_error_fails_only_its_own_write(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, database_url: str
) -> None:
    # A real refusal from PostgreSQL for one row: a trigger that raises on progress 13.
    await sql.execute(
        """
        CREATE FUNCTION public.refuse_13() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'progress 13 refused'; END $$;
        CREATE TRIGGER refuse_13 BEFORE UPDATE ON taskstream.tasks
            FOR EACH ROW WHEN (NEW.progress = 13) EXECUTE FUNCTION public.refuse_13();
        """
    )
    ids = ["a", "b", "poison", "c"]
    for task_id in [*ids, "blocker"]:
        await create_task(sql, task_id)
    writes = server.runtime.writes
    retried = writes.stats.retried_batches
    async with blocked(database_url, writes, patch(client, server, "blocker", {"progress": 1})):
        futures = []
        for n, task_id in enumerate(ids, 1):
            body = {"progress": 13 if task_id == "poison" else 20}
            futures.append(asyncio.ensure_future(patch(client, server, task_id, body)))
            await wait_until(lambda n=n: writes.queued == n)
    answers = await asyncio.gather(*futures)
    assert [a.status_code for a in answers] == [200, 200, 503, 200]
    assert answers[2].json() == {"error": "Database unavailable"}
    assert "refused" not in answers[2].text
    assert writes.stats.retried_batches == retried + 1
    rows = await sql.fetch("SELECT id, progress FROM taskstream.tasks WHERE id = ANY($1)", ids)
    assert {r["id"]: r["progress"] for r in rows} == {"a": 20, "b": 20, "poison": 0, "c": 20}


async def test_updates_to_one_task_keep_their_order_and_every_version_is_notified(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, database_url: str
) -> None:
    await create_task(sql, "blocker")
    await create_task(sql, "x")
    seen: list[tuple[int, float]] = []
    listener = await asyncpg.connect(database_url)

    def on_notify(*args: Any) -> None:
        data = json.loads(args[3])
        if data["id"] == "x":
            seen.append((data["version"], data["progress"]))

    await listener.add_listener("taskstream", on_notify)
    try:
        writes = server.runtime.writes
        token = server.token("alice")
        async with open_stream(client, server.stream_url("x"), token=token) as stream:
            initial = await stream.next()
            assert json.loads(initial.data)["version"] == 1
            async with blocked(
                database_url, writes, patch(client, server, "blocker", {"progress": 1})
            ):
                futures = []
                for k in range(1, 21):
                    body: dict[str, Any] = {"progress": float(k)}
                    if k == 20:
                        body["state"] = "success"
                    futures.append(asyncio.ensure_future(patch(client, server, "x", body)))
                    await wait_until(lambda k=k: writes.queued == k)
            answers = await asyncio.gather(*futures)
            assert [a.json()["version"] for a in answers] == list(range(2, 22))
            assert [a.json()["progress"] for a in answers] == [float(k) for k in range(1, 21)]
            versions = []
            while (event := await stream.next(timeout=5)).event != "complete":
                versions.append(json.loads(event.data)["version"])
            assert json.loads(event.data)["state"] == "success"
            # Intermediate states may be conflated, but versions only go up, to the last one.
            assert versions == sorted(set(versions)) and versions[-1] == 21
        await wait_until(lambda: len(seen) == 20)
        assert seen == [(v, float(v - 1)) for v in range(2, 22)]
    finally:
        await listener.close()


# -- lifecycle -----------------------------------------------------------------------------


async def test_stop_flushes_every_queued_write(database_url: str, sql: asyncpg.Connection) -> None:
    ids = [f"s{i}" for i in range(30)]
    for task_id in [*ids, "blocker"]:
        await create_task(sql, task_id)
    pool = await db.create_pool(database_url)
    batcher = WriteBatcher(lambda: pool, max_size=8)
    await batcher.start()
    try:
        change = db.TaskChange(progress=42.0)
        async with blocked(
            database_url, batcher, batcher.update("blocker", db.TaskChange(progress=1.0))
        ):
            futures = [asyncio.ensure_future(batcher.update(t, change)) for t in ids]
            await wait_until(lambda: batcher.queued == 30)
            # A caller that gives up (a client that disconnected) does not drop its write.
            futures[0].cancel()
            stopping = asyncio.ensure_future(batcher.stop())
            await asyncio.sleep(0.05)
            assert not stopping.done()
        await asyncio.wait_for(stopping, 10)
        results = await asyncio.gather(*futures[1:])
        assert all(outcome == "updated" for outcome, _ in results)
        assert batcher.stats.largest == 8  # the size cap holds
        # After stop, a write still goes through, alone.
        assert (await batcher.update("s0", db.TaskChange(progress=43.0)))[0] == "updated"
    finally:
        await batcher.stop()
        await pool.close()
    progress = await sql.fetch("SELECT id, progress FROM taskstream.tasks WHERE id = ANY($1)", ids)
    assert {r["id"]: r["progress"] for r in progress} == {t: 42.0 for t in ids} | {"s0": 43.0}


async def test_server_shutdown_commits_queued_writes(
    database_url: str, sql: asyncpg.Connection
) -> None:
    ids = [f"d{i}" for i in range(5)]
    for task_id in [*ids, "blocker"]:
        await create_task(sql, task_id)
    lock = await asyncpg.connect(database_url)
    tx = lock.transaction()
    await tx.start()
    await lock.execute("SELECT 1 FROM taskstream.tasks WHERE id = 'blocker' FOR UPDATE")
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            async with run_server(make_settings(database_url)) as live:
                writes = live.runtime.writes
                head = asyncio.ensure_future(patch(client, live, "blocker", {"progress": 1}))
                await wait_until(lambda: writes.stats.flushes == 1)
                futures = [head]
                for n, task_id in enumerate(ids, 1):
                    futures.append(
                        asyncio.ensure_future(patch(client, live, task_id, {"progress": 9}))
                    )
                    await wait_until(lambda n=n: writes.queued == n)
                # The server shuts down while the writes wait; the lock goes soon after.
                asyncio.get_running_loop().call_later(
                    0.3, lambda: asyncio.ensure_future(tx.rollback())
                )
            answers = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await lock.close()
    assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), answers
    rows = await sql.fetch("SELECT progress FROM taskstream.tasks WHERE id = ANY($1)", ids)
    assert [r["progress"] for r in rows] == [9.0] * 5


@pytest.mark.parametrize("settings_overrides", [{"write_batch": False}])
async def test_batching_can_be_turned_off(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    ids = [f"o{i}" for i in range(10)]
    for task_id in ids:
        await create_task(sql, task_id)
    answers = await asyncio.gather(*(patch(client, server, t, {"progress": 3}) for t in ids))
    assert [a.status_code for a in answers] == [200] * 10
    assert server.runtime.writes.stats.flushes == 0
    assert len(await xmins(sql, ids)) == 10


async def test_metadata_rides_in_a_batch(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, database_url: str
) -> None:
    await create_task(sql, "blocker")
    await create_task(sql, "m1")
    alice = auth(server.token("alice"))
    base = f"{server.url}/api/v1/tasks"
    writes = server.runtime.writes
    async with blocked(database_url, writes, patch(client, server, "blocker", {"progress": 1})):
        first = asyncio.ensure_future(patch(client, server, "m1", {"metadata": {"k": [1, "x"]}}))
        await wait_until(lambda: writes.queued == 1)
        second = asyncio.ensure_future(
            client.post(base, json={"id": "m2", "metadata": {"a": 1}}, headers=alice)
        )
        await wait_until(lambda: writes.queued == 2)
    r1, r2 = await first, await second
    assert r1.status_code == 200 and r2.status_code == 201, (r1.text, r2.text)
    rows = await sql.fetch(
        "SELECT id, metadata::text AS m FROM taskstream.tasks WHERE id LIKE 'm%'"
    )
    assert {r["id"]: json.loads(r["m"]) for r in rows} == {"m1": {"k": [1, "x"]}, "m2": {"a": 1}}
    assert len(await xmins(sql, ["m1", "m2"])) == 1
