"""A task given to another owner leaves its old owner's streams exactly as a deleted task does.

Ownership is not only checked when a stream opens: every change of a watched task is compared
with the stream's user, on every delivery path (NOTIFY, the direct write, the fallback poll while
the listener is down, the resync after it is back). The old owner's single-task stream ends with
the same bytes as a stream on a task that never existed, a multi-task stream gets the same
per-task not-found event as for a foreign task, an owner-wide stream drops the task as it would a
deleted one, and the new owner's owner-wide streams pick it up as they would a new task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from server import metrics
from server.events import TaskState
from tests.conftest import LiveServer, create_task
from tests.sse_client import Stream, open_stream
from tests.test_delivery import KILL_LISTENER, refuse_connections, wait_until

__all__ = ["refuse_connections"]  # a fixture, imported for its registration

GIVE_TO_BOB = "UPDATE taskstream.tasks SET owner_id = 'bob', progress = 55 WHERE id = 'own1'"
NOT_FOUND = {"error": "Task not found"}


def multi_url(server: LiveServer, ids: str | None = None) -> str:
    url = f"{server.url}/api/v1/sse/tasks"
    return url if ids is None else f"{url}?ids={ids}"


def auth(server: LiveServer, user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(user)}"}


async def body_of(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> bytes:
    r = await asyncio.wait_for(client.get(url, headers=headers), 5)
    assert r.status_code == 200
    return r.content


async def assert_released(server: LiveServer) -> None:
    """Every subscription, and every index entry of the registry, is gone."""
    broker = server.runtime.broker
    await wait_until(lambda: broker.subscriber_count == 0, 3)
    assert broker._by_task == {} and broker._by_owner == {}


async def until_event(s: Stream, event: str, timeout: float = 5.0) -> dict[str, object]:
    ev = await s.next(timeout)
    assert ev.event == event, ev
    data: dict[str, object] = ev.json()
    return data


async def test_single_task_stream_of_a_task_given_away_ends_with_the_not_found_bytes(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """The ending is byte for byte the one of a task that never existed, and it is the end:
    nothing of Bob's state, then or later, reaches Alice. Alice's own update before the move
    goes through the direct write, so that path is the one that must refuse Bob's."""
    await create_task(sql, "own1")
    ghost = await body_of(client, server.stream_url("never-existed"), auth(server))
    assert ghost.startswith(b"event: error\n")
    url = server.stream_url("own1")
    async with client.stream("GET", url, headers=auth(server)) as r:
        assert r.status_code == 200
        chunks = r.aiter_raw()
        body = b""
        async with asyncio.timeout(5):
            while b"id: 1\n" not in body:
                body += await anext(chunks)
            before = metrics.TALLY.direct_writes
            await sql.execute("UPDATE taskstream.tasks SET progress = 20 WHERE id = 'own1'")
            while b"id: 2\n" not in body:
                body += await anext(chunks)
            assert metrics.TALLY.direct_writes == before + 1  # the direct path is live
            await sql.execute(GIVE_TO_BOB)
            await sql.execute("UPDATE taskstream.tasks SET progress = 66 WHERE id = 'own1'")
            async for chunk in chunks:  # to the end of the body: the stream must close
                body += chunk
    assert body.endswith(ghost), body
    # Bob's values as JSON fields (a bare b"55" also matched digits of updated_at: flaky).
    assert b"id: 3" not in body and b'"progress":55' not in body and b'"progress":66' not in body
    assert b'"progress":20' in body  # the form checked above is the encoder's
    assert metrics.TALLY.direct_writes == before + 1
    await assert_released(server)
    # The stream ended for good: given back to Alice, the task does not revive it, and the
    # client's reconnect with the not-found event's id is told to stop.
    await sql.execute("UPDATE taskstream.tasks SET owner_id = 'alice' WHERE id = 'own1'")
    r2 = await client.get(url, headers={**auth(server), "Last-Event-ID": "end"})
    assert r2.status_code == 204


async def test_multi_task_stream_reports_a_task_given_away_as_foreign_and_carries_on(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "own1")
    await create_task(sql, "own2")
    async with open_stream(client, multi_url(server, "own1,own2"), token=server.token()) as s:
        first = [await s.next(), await s.next()]
        assert {e.json()["task_id"] for e in first} == {"own1", "own2"}
        resume = first[-1].id
        await sql.execute(GIVE_TO_BOB)
        gone = await s.next()
        # Bob's task, read fresh by a stream that never saw it as Alice's.
        async with open_stream(client, multi_url(server, "own1"), token=server.token()) as f:
            foreign = await f.next()
            await f.wait_closed()
        assert (gone.event, gone.data) == (foreign.event, foreign.data)
        assert gone.json() == {**NOT_FOUND, "task_id": "own1"}
        await sql.execute("UPDATE taskstream.tasks SET progress = 66 WHERE id = 'own1'")
        await s.expect_nothing(0.4)
        await sql.execute("UPDATE taskstream.tasks SET progress = 30 WHERE id = 'own2'")
        ev = await s.next()
        assert ev.json()["task_id"] == "own2" and ev.json()["progress"] == 30
        await s.expect_nothing(0.2)
        # Given back, own1 stays closed on this stream, like a deleted task would.
        await sql.execute("UPDATE taskstream.tasks SET owner_id = 'alice' WHERE id = 'own1'")
        await s.expect_nothing(0.4)
        await sql.execute("UPDATE taskstream.tasks SET owner_id = 'bob' WHERE id = 'own1'")
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'own2'")
        assert (await s.next()).json()["task_id"] == "own2"
        assert (await s.next()).event == "complete"
        await s.wait_closed()
    # Resumed from before the move: own1 is Bob's now and is skipped, own2 is finished.
    r = await client.get(
        multi_url(server, "own1,own2"), headers={**auth(server), "Last-Event-ID": resume}
    )
    assert r.status_code == 200 and b"own1" not in r.content and b'"own2"' in r.content
    await assert_released(server)


@pytest.mark.parametrize("settings_overrides", [{"stream_timeout": 30}])
async def test_owner_wide_streams_follow_the_task_to_its_new_owner(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "own1")
    await create_task(sql, "own2")
    async with (
        open_stream(client, multi_url(server), token=server.token()) as alice,
        open_stream(client, multi_url(server), token=server.token("bob")) as bob,
    ):
        assert {(await alice.next()).json()["task_id"] for _ in range(2)} == {"own1", "own2"}
        await sql.execute(GIVE_TO_BOB)
        # Alice's stream drops it exactly as it drops a deleted task ...
        dropped = await until_event(alice, "error")
        await sql.execute("DELETE FROM taskstream.tasks WHERE id = 'own2'")
        deleted = await until_event(alice, "error")
        assert dropped == {**NOT_FOUND, "task_id": "own1"}
        assert deleted == {**NOT_FOUND, "task_id": "own2"}
        # ... and Bob's picks it up as it would a new task.
        picked = await until_event(bob, "progress")
        assert picked["task_id"] == "own1" and picked["progress"] == 55
        await sql.execute("UPDATE taskstream.tasks SET progress = 66 WHERE id = 'own1'")
        assert (await until_event(bob, "progress"))["progress"] == 66
        await alice.expect_nothing(0.4)
        # Given back: Bob's stream drops it, Alice's picks it up again.
        await sql.execute("UPDATE taskstream.tasks SET owner_id = 'alice' WHERE id = 'own1'")
        assert await until_event(bob, "error") == {**NOT_FOUND, "task_id": "own1"}
        back = await until_event(alice, "progress")
        assert back["task_id"] == "own1" and back["version"] == 4
        await sql.execute("UPDATE taskstream.tasks SET progress = 77 WHERE id = 'own1'")
        assert (await until_event(alice, "progress"))["progress"] == 77
        await bob.expect_nothing(0.4)
    await assert_released(server)


@contextlib.asynccontextmanager
async def four_streams(
    server: LiveServer, client: httpx.AsyncClient
) -> AsyncIterator[tuple[Stream, Stream, Stream, Stream]]:
    """Alice's single-task, multi-task and owner-wide streams on own1, and Bob's owner-wide."""
    async with (
        open_stream(client, server.stream_url("own1"), token=server.token()) as single,
        open_stream(client, multi_url(server, "own1,own2"), token=server.token()) as multi,
        open_stream(client, multi_url(server), token=server.token()) as wide,
        open_stream(client, multi_url(server), token=server.token("bob")) as bob,
    ):
        assert (await single.next()).id == "1"
        assert {(await multi.next()).json()["task_id"] for _ in range(2)} == {"own1", "own2"}
        assert {(await wide.next()).json()["task_id"] for _ in range(2)} == {"own1", "own2"}
        await bob.expect_nothing(0.2)
        yield single, multi, wide, bob


@pytest.mark.parametrize(
    "settings_overrides, path",
    [
        ({"stream_timeout": 30}, "fallback-poll"),
        # The poll never ticks during the outage: only the resync after it can tell.
        ({"stream_timeout": 30, "fallback_poll": 60}, "resync"),
    ],
    ids=["fallback-poll", "resync"],
)
async def test_task_given_away_during_a_listener_outage_leaves_alice_and_joins_bob(
    server: LiveServer,
    client: httpx.AsyncClient,
    sql: asyncpg.Connection,
    refuse_connections: Callable[[], contextlib.AbstractAsyncContextManager[None]],
    path: str,
) -> None:
    await create_task(sql, "own1")
    await create_task(sql, "own2")
    ghost = await body_of(client, server.stream_url("never-existed"), auth(server))
    broker = server.runtime.broker
    async with four_streams(server, client) as (single, multi, wide, bob):
        async with refuse_connections():
            assert await sql.fetchval(KILL_LISTENER) == 1
            await wait_until(lambda: not broker.connected.is_set())
            await sql.execute(GIVE_TO_BOB)
            if path == "fallback-poll":
                events = await asyncio.gather(
                    single.next(3), multi.next(3), wide.next(3), bob.next(3)
                )
                assert not broker.connected.is_set()  # delivered by the poll
        if path == "resync":
            await wait_until(broker.connected.is_set)
            events = await asyncio.gather(single.next(3), multi.next(3), wide.next(3), bob.next(3))
        gone_single, gone_multi, gone_wide, picked = events
        assert gone_single.event == "error" and gone_single.id == "end"
        await single.wait_closed()
        assert ghost == b"event: error\nid: end\ndata: " + gone_single.data.encode() + b"\n\n"
        assert gone_multi.json() == {**NOT_FOUND, "task_id": "own1"}
        assert gone_wide.json() == {**NOT_FOUND, "task_id": "own1"}
        assert picked.event == "progress" and picked.json()["task_id"] == "own1"
        assert picked.json()["progress"] == 55
        await wait_until(broker.connected.is_set)
        await sql.execute("UPDATE taskstream.tasks SET progress = 66 WHERE id = 'own1'")
        assert (await until_event(bob, "progress"))["progress"] == 66
        await multi.expect_nothing(0.3)
        await wide.expect_nothing(0.1)
        # A resync now (as after another outage) re-reads the rows and still sends Alice nothing.
        await broker.resync()
        await multi.expect_nothing(0.3)
        await wide.expect_nothing(0.1)
        await bob.expect_nothing(0.1)
    await assert_released(server)


async def test_owner_since_belongs_to_the_server_and_travels_in_the_payload(
    database_url: str, sql: asyncpg.Connection
) -> None:
    """The column the owner-wide pick-up is decided on: set by the trigger on a change of owner
    only, whatever a writer puts there, and sent with every notification."""
    listener = await asyncpg.connect(database_url)
    try:
        queue: asyncio.Queue[str] = asyncio.Queue()
        await listener.add_listener("taskstream", lambda *a: queue.put_nowait(a[3]))
        await create_task(sql, "own1", owner_since=datetime(2000, 1, 1, tzinfo=UTC))
        await sql.execute("UPDATE taskstream.tasks SET progress = 5, owner_since = now()")
        assert await sql.fetchval("SELECT owner_since FROM taskstream.tasks") is None
        await sql.execute(GIVE_TO_BOB)
        row = await sql.fetchrow("SELECT owner_since, updated_at FROM taskstream.tasks")
        assert row["owner_since"] == row["updated_at"]
        payloads = [json.loads(await asyncio.wait_for(queue.get(), 2)) for _ in range(3)]
        assert [p["owner_since"] for p in payloads[:2]] == [None, None]
        moved = TaskState.from_notification(json.dumps(payloads[2]))
        assert moved.owner_id == "bob" and moved.owner_since == row["owner_since"].isoformat()
    finally:
        await listener.close()
