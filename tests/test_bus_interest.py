"""Subscription interest: in bus mode an instance receives the changes of the tasks and owners
its clients watch, and nothing else; when its streams end, its subscriptions go too."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import httpx
import pytest
from httpx_sse import EventSource

from server.auth import issue_token
from tests.conftest import SECRET, create_task
from tests.natscluster import NatsCluster
from tests.test_bus import fleet, metric, one_relay
from tests.test_nginx import _wait

pytestmark = pytest.mark.timeout(90)

RECEIVED = "taskstream_bus_messages_received_total"
SUBJECTS = "taskstream_bus_subjects"


async def _follow(client: httpx.AsyncClient, url: str, token: str, seen: list[str]) -> None:
    async with client.stream("GET", url, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status_code == 200
        async for ev in EventSource(r).aiter_sse():
            seen.append(ev.event)
            if ev.event == "complete" and "/progress" in url:
                return


async def test_an_instance_receives_only_the_tasks_and_owners_it_watches(
    database_url: str, sql: asyncpg.Connection, nats_cluster: NatsCluster
) -> None:
    alice, bob = issue_token(SECRET, "alice", ttl=300), issue_token(SECRET, "bob", ttl=300)
    await create_task(sql, "a.1", owner="alice", state="running")
    await create_task(sql, "b.1", owner="bob", state="running")
    async with (
        # Exact counts below: a relaxed liveness check keeps a loaded machine from making the
        # relay reconnect its LISTEN (and resync instead of publishing) in the middle.
        fleet(database_url, nats_cluster, 2, TASKSTREAM_LISTENER_CHECK="5") as f,
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as client,
        httpx.AsyncClient(timeout=5) as direct,
    ):
        await one_relay(direct, f)
        a, b = f.urls

        async def counts() -> tuple[float, float]:
            return await metric(direct, a, RECEIVED), await metric(direct, b, RECEIVED)

        assert await counts() == (0, 0)
        seen_a: list[str] = []
        seen_b: list[str] = []
        streams = [
            asyncio.create_task(
                _follow(client, f"{a}/api/v1/sse/tasks/a.1/progress", alice, seen_a)
            ),
            asyncio.create_task(_follow(client, f"{b}/api/v1/sse/tasks/b.1/progress", bob, seen_b)),
        ]
        try:

            async def subscribed() -> bool:
                return all([await metric(direct, u, SUBJECTS) == 1 for u in (a, b)])

            await _wait(subscribed, "one subject per instance")
            await _wait(lambda: seen_a and seen_b, "snapshots")
            for p in range(10):
                await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id='b.1'", p + 1)
            for p in range(3):
                await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id='a.1'", p + 1)
            await sql.execute("UPDATE taskstream.tasks SET state = 'success'")
            await asyncio.wait_for(asyncio.gather(*streams), 15)
        finally:
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        # A got a.1's 4 changes and none of b.1's 11; B the other way round.
        assert seen_a.count("progress") == 5 and seen_b.count("progress") == 12
        assert await counts() == (4, 11)

        # Streams gone: so are the subscriptions, and later changes reach neither instance.
        async def unsubscribed() -> bool:
            return all([await metric(direct, u, SUBJECTS) == 0 for u in (a, b)])

        await _wait(unsubscribed, "subjects back to 0")
        await sql.execute("UPDATE taskstream.tasks SET error = 'late'")
        await asyncio.sleep(0.5)
        assert await counts() == (4, 11)

        # An owner-wide stream subscribes to its owner: alice's new task reaches A, bob's not.
        seen_owner: list[str] = []
        owner_stream = asyncio.create_task(
            _follow(client, f"{a}/api/v1/sse/tasks", alice, seen_owner)
        )
        try:

            async def owner_subscribed() -> bool:
                return await metric(direct, a, SUBJECTS) == 1

            await _wait(owner_subscribed, "the owner's subject")
            await create_task(sql, "b.2", owner="bob", state="running")
            await asyncio.sleep(0.5)
            assert await counts() == (4, 11)
            await create_task(sql, "a.2", owner="alice", state="running")
            await _wait(lambda: "progress" in seen_owner, "alice's new task on her stream")
            assert (await counts())[0] >= 5
        finally:
            owner_stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await owner_stream
        await _wait(unsubscribed, "subjects back to 0 after the owner-wide stream")
