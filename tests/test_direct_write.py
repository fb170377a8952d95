"""The direct fan-out write (server/stream/session.py, direct_write; server/hypercorn_internals.py).

A single-task stream over HTTP/1.1 whose socket has drained gets each progress event written
straight to its socket from the broker's dispatch. These tests prove the path is taken on the
pinned Hypercorn (if a release changes what server/hypercorn_internals.py walks, the first test
fails instead of the server silently falling back), and that what it writes is the same stream.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from server import metrics
from tests.conftest import LiveServer, create_task
from tests.sse_client import open_stream


async def test_each_version_of_one_transaction_reaches_a_client_that_keeps_up(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "d1")
    async with open_stream(client, server.stream_url("d1"), token=server.token()) as s:
        first = await s.next()
        assert first.event == "progress" and first.id == "1"
        before = metrics.TALLY.direct_writes
        async with sql.transaction():
            for p in (10, 20, 30):
                await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id = 'd1'", p)
        got = [await s.next(2) for _ in range(3)]
        assert [(e.event, e.id, e.json()["progress"]) for e in got] == [
            ("progress", "2", 10),
            ("progress", "3", 20),
            ("progress", "4", 30),
        ]
        assert metrics.TALLY.direct_writes - before == 3
        # The terminal state takes the ordinary path: progress, complete, then the end.
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'd1'")
        last = [await s.next(2), await s.next(2)]
        assert [e.event for e in last] == ["progress", "complete"] and last[0].id == "5"
        await s.wait_closed(2)
    assert metrics.TALLY.direct_writes - before == 3


async def _raw_stream(
    server: LiveServer, task_id: str, version: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    u = urlsplit(server.url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    path = urlsplit(server.stream_url(task_id)).path
    writer.write(
        b"GET " + path.encode() + b" HTTP/" + version + b"\r\nHost: x\r\n"
        b"Authorization: Bearer " + server.token().encode() + b"\r\n\r\n"
    )
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("settings_overrides", [{"heartbeat": 0.3}])
async def test_http_1_0_client_is_served_without_chunks_on_the_ordinary_path(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    """HTTP/1.0 has no chunked encoding: h11 writes the body raw, so must everything else,
    heartbeats included."""
    await create_task(sql, "d2")
    before = (metrics.TALLY.direct_writes, metrics.TALLY.direct_heartbeats)
    reader, writer = await _raw_stream(server, "d2", b"1.0")
    try:
        await asyncio.wait_for(reader.readuntil(b"data: "), 5)
        for _ in range(2):
            beat = await asyncio.wait_for(reader.readuntil(b": heartbeat\n\n"), 5)
            assert b"\r\n" not in beat.split(b"\n\n", 1)[1], beat  # no chunk framing
        await sql.execute("UPDATE taskstream.tasks SET progress = 40 WHERE id = 'd2'")
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'd2'")
        body = await asyncio.wait_for(reader.read(), 5)  # close-delimited: read to the end
    finally:
        writer.close()
    assert b"id: 2\n" in body and b"event: complete\n" in body
    assert b"\r\n" not in body.split(b"event: complete")[0]  # no chunk framing anywhere
    assert (metrics.TALLY.direct_writes, metrics.TALLY.direct_heartbeats) == before


async def test_http_1_1_raw_bytes_are_well_formed_chunks(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "d3")
    reader, writer = await _raw_stream(server, "d3", b"1.1")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"transfer-encoding: chunked" in head.lower()

        async def chunk() -> bytes:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5))[:-2], 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), 5)
            assert data.endswith(b"\r\n")
            return data[:-2]

        first = await chunk()
        assert b"event: progress\nid: 1\n" in first
        before = metrics.TALLY.direct_writes
        await sql.execute("UPDATE taskstream.tasks SET progress = 50 WHERE id = 'd3'")
        second = await chunk()
        assert second.startswith(b"event: progress\nid: 2\n") and second.endswith(b"\n\n")
        assert metrics.TALLY.direct_writes == before + 1
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'd3'")
        rest = b""
        while (part := await chunk()) != b"":  # the zero-length chunk ends the body
            rest += part
        assert b"event: complete\n" in rest
    finally:
        writer.close()


async def test_multi_task_and_owner_wide_streams_take_the_direct_write_with_their_own_ids(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    # A multi-task stream's event carries its resume id (one version per listed task), so the
    # direct write encodes it per stream: the bytes must be those the mailbox path would send.
    await create_task(sql, "m1")
    await create_task(sql, "m2")
    url = f"{server.url}/api/v1/sse/tasks"
    async with (
        open_stream(client, f"{url}?ids=m1,m2", token=server.token()) as multi,
        open_stream(client, url, token=server.token()) as owner,
    ):
        assert [(await multi.next()).id for _ in range(2)] == ["1.1", "1.1"]
        snapshot = [await owner.next(), await owner.next()]
        assert {e.json()["task_id"] for e in snapshot} == {"m1", "m2"}
        before = metrics.TALLY.direct_writes
        await sql.execute("UPDATE taskstream.tasks SET progress = 10 WHERE id = 'm2'")
        await sql.execute("UPDATE taskstream.tasks SET progress = 20 WHERE id = 'm1'")
        got = [await multi.next(2), await multi.next(2)]
        assert [(e.event, e.id, e.json()["task_id"], e.json()["progress"]) for e in got] == [
            ("progress", "1.2", "m2", 10),
            ("progress", "2.2", "m1", 20),
        ]
        seen = [await owner.next(2), await owner.next(2)]
        # No id on an owner-wide stream, on either path.
        assert [(e.event, e.id, e.json()["task_id"]) for e in seen] == [
            ("progress", snapshot[0].id, "m2"),
            ("progress", snapshot[0].id, "m1"),
        ]
        assert metrics.TALLY.direct_writes - before == 4
        # Terminal states still take the mailbox path: progress, then complete, per task.
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id IN ('m1', 'm2')")
        ends = [await multi.next(2) for _ in range(4)]
        assert [e.event for e in ends] == ["progress", "complete", "progress", "complete"]
        await multi.wait_closed(2)


@pytest.mark.parametrize("settings_overrides", [{"heartbeat": 0.3}])
async def test_heartbeats_of_a_parked_stream_are_written_by_the_shared_timer(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    """A parked HTTP/1.1 stream's heartbeats go out from the loop's Deadlines timer, the same
    bytes the stream's task would write, without waking the task; a progress event in between
    and the stream's end are unchanged."""
    await create_task(sql, "d3")
    before = metrics.TALLY.direct_heartbeats
    reader, writer = await _raw_stream(server, "d3", b"1.1")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"transfer-encoding: chunked" in head.lower()
        body = b""
        while body.count(b": heartbeat\n\n") < 3:
            body += await asyncio.wait_for(reader.read(4096), 5)
        await sql.execute("UPDATE taskstream.tasks SET progress = 40 WHERE id = 'd3'")
        while b'"progress":40.0' not in body:
            body += await asyncio.wait_for(reader.read(4096), 5)
        while body.count(b": heartbeat\n\n") < 5:
            body += await asyncio.wait_for(reader.read(4096), 5)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'd3'")
        while not body.endswith(b"0\r\n\r\n"):
            data = await asyncio.wait_for(reader.read(4096), 5)
            assert data, body
            body += data
    finally:
        writer.close()
    beats = metrics.TALLY.direct_heartbeats - before
    assert beats >= 5, beats
    # Every heartbeat is its own chunk, framed exactly as h11 frames the task's writes.
    assert body.count(b"d\r\n: heartbeat\n\n\r\n") == body.count(b": heartbeat")
    assert b"event: complete\n" in body
