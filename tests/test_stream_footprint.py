"""What one open stream holds in the server's event loop (issue 17, bench/heapprofile.py): three
tasks (the connection, the request, the disconnect watcher), and when the client leaves, none.

Before, Quart ran each request as a handler task and a reader task inside the request's task,
and the prompt-close server read in a task of its own: five tasks per open stream.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg

from tests.conftest import LiveServer, create_task

STREAMS = 10


async def _open(
    server: LiveServer, task_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    u = urlsplit(server.url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(
        f"GET /api/v1/sse/tasks/{task_id}/progress HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {server.token()}\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"event: progress"), 5)
    return reader, writer


async def _settle(predicate: object, limit: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not predicate() and loop.time() < end:  # type: ignore[operator]
        await asyncio.sleep(0.02)


async def test_an_open_stream_holds_three_tasks_and_a_closed_one_none(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    for i in range(STREAMS):
        await create_task(sql, f"f{i}")
    # One stream first, closed again: whatever the server starts on its first stream (the
    # send-timeout watchdog) is up before the count.
    _, first = await _open(server, "f0")
    first.close()
    await _settle(lambda: server.runtime.broker.subscriber_count == 0)
    await asyncio.sleep(0.2)
    before = asyncio.all_tasks()
    baseline = len(before)
    conns = [await _open(server, f"f{i}") for i in range(STREAMS)]
    broker = server.runtime.broker
    try:
        await asyncio.sleep(0.2)
        per_stream = (len(asyncio.all_tasks()) - baseline) / STREAMS
        # Three per stream; a background task of the server may start meanwhile (one in all).
        assert 3 <= per_stream <= 3.1, f"{per_stream} tasks per open stream"
        assert broker.subscriber_count == STREAMS
        # An update still reaches them, and the disconnect of each still ends its stream.
        await sql.execute("UPDATE taskstream.tasks SET progress = 50 WHERE id = 'f0'")
        await asyncio.wait_for(conns[0][0].readuntil(b"event: progress"), 5)
    finally:
        for _, writer in conns:
            writer.close()
    await _settle(lambda: broker.subscriber_count == 0 and not (asyncio.all_tasks() - before))
    assert broker.subscriber_count == 0
    left = [t for t in asyncio.all_tasks() if t not in before]
    assert not left, f"tasks outlived their clients: {left}"
