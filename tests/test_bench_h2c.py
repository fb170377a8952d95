"""The bench drives HTTP/2 in cleartext (bench/sse_client.py, H2SSEStream): against a real
server, over a real socket, a stream opens, gets its updates in order, and ends on `complete`."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg

from bench.sse_client import H2SSEStream, Tally, build_h2_headers
from tests.conftest import LiveServer, create_task


async def _drive(server: LiveServer, sql: asyncpg.Connection) -> Tally:
    u = urlsplit(server.url)
    assert u.hostname is not None and u.port is not None
    await create_task(sql, "h1")
    tally = Tally()
    token = server.token()
    stream = H2SSEStream(tally, build_h2_headers(u.hostname, u.port, "h1", token), b"success")
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(lambda: stream, u.hostname, u.port)
    try:
        assert await tally.wait_for(lambda t: t.ready == 1, 5), tally.status_codes
        for p in (10, 20, 30):
            await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id = 'h1'", p)
        assert await tally.wait_for(lambda t: t.updates == 3, 5)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'h1'")
        assert await tally.wait_for(lambda t: t.completed == 1 and t.closed == 1, 5)
    finally:
        transport.close()
    return tally


async def test_the_bench_streams_over_h2c_as_over_http_1_1(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    tally = await _drive(server, sql)
    assert tally.status_codes == {200: 1}
    assert tally.out_of_order == 0 and tally.bad_terminal == 0 and tally.failed == 0
    assert tally.updates == 4  # three progress updates and the terminal state's progress
    assert len(tally.stamps) == 4


async def test_the_bench_counts_a_refused_h2c_stream_as_failed(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    u = urlsplit(server.url)
    assert u.hostname is not None and u.port is not None
    tally = Tally()
    headers = build_h2_headers(u.hostname, u.port, "h1", "not-a-token")
    stream = H2SSEStream(tally, headers, b"success")
    transport, _ = await asyncio.get_running_loop().create_connection(
        lambda: stream, u.hostname, u.port
    )
    try:
        assert await tally.wait_for(lambda t: t.failed == 1, 5)
    finally:
        transport.close()
    assert tally.status_codes == {401: 1}
