"""Delivery guarantees: nothing is lost when the listener, the database or a client falters.

The rule under test: every client ends up with the latest committed state of its task, and every
client whose task reaches a terminal state receives ``complete``, whatever fails in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest

from tests.conftest import LiveServer, create_task, make_settings, run_server
from tests.sse_client import Stream, open_stream

KILL_LISTENER = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
 WHERE application_name = 'taskstream-listener' AND datname = current_database()
"""


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.fixture
async def refuse_connections(
    pg_cluster: str, sql: asyncpg.Connection
) -> AsyncIterator[Callable[[], contextlib.AbstractAsyncContextManager[None]]]:
    """New connections to the test database fail (as in an outage); open ones keep working."""
    name = await sql.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(pg_cluster)

    @contextlib.asynccontextmanager
    async def refused() -> AsyncIterator[None]:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            yield
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    try:
        yield refused
    finally:
        await admin.close()


async def collect_until_complete(s: Stream, timeout: float = 10.0) -> list[int]:
    """Versions of every progress event until ``complete``; fails if complete never comes."""
    versions: list[int] = []
    async with asyncio.timeout(timeout):
        while True:
            ev = await s.next(timeout)
            if ev.event == "complete":
                return versions
            assert ev.event == "progress", ev
            versions.append(int(ev.id))


async def test_listener_killed_while_terminal_states_commit(
    server: LiveServer,
    client: httpx.AsyncClient,
    sql: asyncpg.Connection,
    refuse_connections: Callable[[], contextlib.AbstractAsyncContextManager[None]],
) -> None:
    n = 50
    for i in range(n):
        await create_task(sql, f"t{i}")
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(
                open_stream(client, server.stream_url(f"t{i}"), token=server.token())
            )
            for i in range(n)
        ]
        for s in streams:
            assert (await s.next()).id == "1"
        broker = server.runtime.broker
        async with refuse_connections():
            assert await sql.fetchval(KILL_LISTENER) == 1
            await wait_until(lambda: not broker.connected.is_set())
            await sql.execute("UPDATE taskstream.tasks SET state = 'success', progress = 100")
            await asyncio.sleep(0.2)
        results = await asyncio.gather(*(collect_until_complete(s) for s in streams))
        assert all(versions == [2] for versions in results), results
        await wait_until(broker.connected.is_set)
        assert broker.source.reconnects >= 1


async def test_repeated_listener_kills_lose_nothing(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, database_url: str
) -> None:
    n = 8
    for i in range(n):
        await create_task(sql, f"t{i}")
    broker = server.runtime.broker
    writer_conn = await asyncpg.connect(database_url)
    stop = asyncio.Event()

    async def writer() -> None:
        p = 0
        while not stop.is_set():
            p = (p + 1) % 100
            await writer_conn.execute(
                "UPDATE taskstream.tasks SET progress = $1 WHERE id = $2",
                p,
                f"t{random.randrange(n)}",
            )
            await asyncio.sleep(0.002)

    async def killer() -> int:
        kills = 0
        for _ in range(20):
            await wait_until(broker.connected.is_set)
            kills += await sql.fetchval(KILL_LISTENER)
            await asyncio.sleep(random.uniform(0.02, 0.12))
        return kills

    try:
        async with contextlib.AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(
                    open_stream(client, server.stream_url(f"t{i}"), token=server.token())
                )
                for i in range(n)
            ]
            collectors = [asyncio.create_task(collect_until_complete(s, 60)) for s in streams]
            w = asyncio.create_task(writer())
            kills = await killer()
            stop.set()
            await w
            await sql.execute("UPDATE taskstream.tasks SET state = 'success'")
            finals = {
                r["id"]: r["version"]
                for r in await sql.fetch("SELECT id, version FROM taskstream.tasks")
            }
            results = await asyncio.gather(*collectors)
    finally:
        await writer_conn.close()
    assert kills == 20
    assert broker.source.reconnects >= 20
    for i, versions in enumerate(results):
        assert versions == sorted(set(versions)), f"t{i}: out of order or duplicated: {versions}"
        assert versions[-1] == finals[f"t{i}"], f"t{i}: ended on {versions[-1]}"


async def test_fallback_poll_delivers_while_listener_cannot_reconnect(
    server: LiveServer,
    client: httpx.AsyncClient,
    sql: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    refuse_connections: Callable[[], contextlib.AbstractAsyncContextManager[None]],
) -> None:
    await create_task(sql, "t1")
    broker = server.runtime.broker
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        with caplog.at_level(logging.WARNING, logger="server.stream.listener"):
            async with refuse_connections():
                await sql.fetchval(KILL_LISTENER)
                await wait_until(lambda: not broker.connected.is_set())
                for p in (10, 20):
                    await sql.execute("UPDATE taskstream.tasks SET progress = $1", p)
                    # Delivered by the poll (every 0.5 s here) through the pool's open connection.
                    ev = await s.next(timeout=3)
                    assert ev.json()["progress"] == p
                await asyncio.sleep(1.2)  # several more poll ticks while still down
                assert not broker.connected.is_set()
            lost = [r for r in caplog.records if "lost" in r.getMessage()]
            assert len(lost) == 1, [r.getMessage() for r in caplog.records]
        await wait_until(broker.connected.is_set)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success'")
        assert (await s.next(timeout=3)).json()["state"] == "success"
        assert (await s.next()).event == "complete"


async def test_last_event_id_with_unchanged_task_sends_nothing(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    await sql.execute("UPDATE taskstream.tasks SET progress = 5")
    async with open_stream(
        client, server.stream_url("t1"), token=server.token(), headers={"Last-Event-ID": "2"}
    ) as s:
        await s.expect_nothing(0.4)
        assert s.retries, "a resumed stream still starts with retry:"
        await sql.execute("UPDATE taskstream.tasks SET progress = 6")
        ev = await s.next()
        assert ev.id == "3" and ev.json()["progress"] == 6


async def test_last_event_id_with_moved_task_sends_current_state(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    for p in (5, 6, 7):
        await sql.execute("UPDATE taskstream.tasks SET progress = $1", p)
    async with open_stream(
        client, server.stream_url("t1"), token=server.token(), headers={"Last-Event-ID": "2"}
    ) as s:
        ev = await s.next()
        assert ev.id == "4" and ev.json()["progress"] == 7
        await s.expect_nothing(0.3)


async def test_last_event_id_moved_to_terminal_sends_state_and_complete(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    await sql.execute("UPDATE taskstream.tasks SET state = 'success'")
    async with open_stream(
        client, server.stream_url("t1"), token=server.token(), headers={"Last-Event-ID": "1"}
    ) as s:
        assert (await s.next()).json()["state"] == "success"
        assert (await s.next()).event == "complete"
        await s.wait_closed()


async def test_reconnect_after_terminal_gets_204(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    r = await client.get(
        server.stream_url("t1"),
        headers={"Authorization": f"Bearer {server.token()}", "Last-Event-ID": "1"},
    )
    assert r.status_code == 204
    r = await client.get(
        server.stream_url("t1"), params={"lastEventId": "1", "access_token": server.token()}
    )
    # The polyfill (the client that resumes with ?lastEventId=) loops on a bodiless 204; a 410
    # with a body stops it (tests/test_clients_node.py, tests/test_clients_browser.py).
    assert r.status_code == 410


@pytest.mark.parametrize("settings_overrides", [{"max_streams_per_user": 2}])
async def test_per_user_stream_limit_is_429(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with (
        open_stream(client, server.stream_url("t1"), token=server.token()) as a,
        open_stream(client, server.stream_url("t1"), token=server.token()) as b,
    ):
        await a.next()
        await b.next()
        r = await client.get(
            server.stream_url("t1"), headers={"Authorization": f"Bearer {server.token()}"}
        )
        assert r.status_code == 429
        assert r.json()["error"] == "Too many open streams" and "retry-after" in r.headers
        # Another user is not affected by alice's limit.
        await create_task(sql, "t2", owner="bob")
        async with open_stream(client, server.stream_url("t2"), token=server.token("bob")) as c:
            assert (await c.next()).event == "progress"


@pytest.mark.parametrize("settings_overrides", [{"max_streams": 1}])
async def test_per_process_stream_limit_is_429(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as a:
        await a.next()
        r = await client.get(
            server.stream_url("t1"), headers={"Authorization": f"Bearer {server.token('bob')}"}
        )
        assert r.status_code == 429 and r.json()["detail"] == "process"


# -- slow and stuck clients ------------------------------------------------------------------


async def _raw_stream(url: str, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 client whose socket has a tiny receive buffer, so it can stop reading."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    # A small limit: the StreamReader itself stops pulling from the socket past 2 x limit, so
    # "not reading" here really leaves the bytes in the kernel and pushes back on the server.
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def _read_chunks_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    """Read whole HTTP chunks until one contains ``marker`` (the body is chunk-encoded)."""
    seen = b""
    async with asyncio.timeout(5):
        while marker not in seen:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            seen += (await reader.readexactly(size + 2))[:-2]
    return seen


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


async def test_stuck_client_costs_bounded_memory_and_resumes_with_latest(
    database_url: str, sql: asyncpg.Connection
) -> None:
    settings = make_settings(database_url, send_timeout=120)
    async with run_server(settings, sndbuf=4096) as server:
        await create_task(sql, "t1")
        reader, writer = await _raw_stream(server.stream_url("t1"), server.token())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"event: progress\nid: 1\n" in await _read_chunks_until(reader, b"id: 1\n")
            sub = next(iter(server.runtime.broker.subscriptions))
            # The client now reads nothing while 10,000 updates are committed.
            await sql.execute(
                "DO $$ BEGIN FOR i IN 1..10000 LOOP"
                " UPDATE taskstream.tasks SET progress = (i % 100) WHERE id = 't1';"
                " COMMIT; END LOOP; END $$"
            )
            await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 't1'")
            final = await sql.fetchval("SELECT version FROM taskstream.tasks")
            await wait_until(lambda: server.runtime.broker.source.notifications >= 10_000, 20)
            # Memory for this client is one pending state, however many updates arrived.
            assert len(sub.pending) <= 1
            # Once the socket pushed back, intermediate states were merged, not queued.
            assert sub.conflated > 9000, sub.conflated
            # Reading again: everything buffered, then the latest state, then complete.
            body = await asyncio.wait_for(reader.read(-1), 20)
        finally:
            writer.close()
    events = [e for e in _dechunk(body).split(b"\n\n") if e.startswith(b"event:")]
    assert events[-1].startswith(b"event: complete\n")
    assert events[-2].startswith(f"event: progress\nid: {final}\n".encode())
    ids = [int(e.split(b"\n")[1][4:]) for e in events[:-1]]
    assert ids == sorted(set(ids))
    assert len(ids) < final  # some versions were conflated away, and never the last one


async def test_client_that_accepts_nothing_is_disconnected(
    database_url: str, sql: asyncpg.Connection
) -> None:
    settings = make_settings(database_url, send_timeout=0.5)
    async with run_server(settings, sndbuf=4096) as server:
        await create_task(sql, "t1")
        reader, writer = await _raw_stream(server.stream_url("t1"), server.token())
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            await _read_chunks_until(reader, b"id: 1\n")
            await sql.execute(
                "DO $$ BEGIN FOR i IN 1..3000 LOOP"
                " UPDATE taskstream.tasks SET progress = (i % 100) WHERE id = 't1';"
                " COMMIT; END LOOP; END $$"
            )
            broker = server.runtime.broker
            await wait_until(lambda: broker.subscriber_count == 0, 10)
            assert server.runtime.send_timeouts == 1
            # The connection was aborted, not closed politely after a flush that never comes.
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                async with asyncio.timeout(10):
                    while True:
                        chunk = await reader.read(65536)
                        if not chunk:
                            raise asyncio.IncompleteReadError(b"", None)
        finally:
            writer.close()
