"""The LISTEN connection receives every change on the channel; the listener builds a state only
for the tasks and owners its streams watch (server/stream/listener.py, parse_notification)."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from server.stream.listener import PgListener
from tests.conftest import LiveServer, create_task
from tests.sse_client import open_stream
from tests.test_delivery import wait_until
from tests.test_multistream import multi_url


def _listener(server: LiveServer) -> PgListener:
    source = server.runtime.broker.source
    assert isinstance(source, PgListener)
    return source


async def test_changes_of_unwatched_tasks_are_dropped_and_watched_ones_all_arrive(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    listener = _listener(server)
    await create_task(sql, "w1", state="queued")
    await create_task(sql, "other", owner="bob", state="queued")
    async with (
        open_stream(client, server.stream_url("w1"), token=server.token()) as one,
        open_stream(client, multi_url(server), token=server.token("carol")) as everything,
    ):
        await one.next()
        # Carol has no task yet: her owner-wide stream has no event to send before the first.
        await wait_until(lambda: server.runtime.broker.subscriber_count == 2, 5)
        before = listener.unwatched
        for p in range(1, 6):
            await sql.execute(
                "UPDATE taskstream.tasks SET state = 'running', progress = $1 WHERE id = 'other'",
                p * 10,
            )
        # A task of carol's created after her owner-wide stream opened: watched through the
        # owner, not the id.
        await create_task(sql, "c1", owner="carol", state="queued")
        for p in range(1, 4):
            await sql.execute(
                "UPDATE taskstream.tasks SET state = 'running', progress = $1 WHERE id = 'w1'",
                p * 10,
            )
        assert [(await one.next()).json()["progress"] for _ in range(3)] == [10, 20, 30]
        first = (await everything.next()).json()
        assert (first["task_id"], first["state"]) == ("c1", "queued")
        await wait_until(lambda: listener.unwatched - before >= 5, 5)
        assert listener.unwatched - before == 5  # bob's five updates, and nothing else

    # Closed streams take their interest with them: nothing is watched, nothing is built.
    await wait_until(lambda: server.runtime.broker.subscriber_count == 0, 5)
    assert listener._tasks == set() and listener._owners == set()
    before = listener.unwatched
    await sql.execute("UPDATE taskstream.tasks SET progress = 50 WHERE id = 'w1'")
    await wait_until(lambda: listener.unwatched > before, 5)
    await asyncio.sleep(0.1)
    assert listener.unwatched == before + 1
