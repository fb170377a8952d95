from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config
from hypercorn.utils import wrap_app
from quart import Quart

from server import hypercorn_internals
from server.app import Runtime, create_app
from server.auth import issue_token
from server.config import Settings
from tests import pg

# One secret per test session, never a constant in the repo.
SECRET = secrets.token_urlsafe(32)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[str]:
    with pg.cluster() as url:
        yield url


@pytest.fixture
async def database_url(pg_cluster: str) -> AsyncIterator[str]:
    async with pg.fresh_database(pg_cluster) as url:
        yield url


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for writing rows the way any worker or script would."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@dataclass
class LiveServer:
    """A real Hypercorn serving the app on a real ephemeral port, in this test's event loop."""

    app: Quart
    url: str
    settings: Settings

    @property
    def runtime(self) -> Runtime:
        rt: Runtime = self.app.extensions["taskstream"]
        return rt

    def token(self, sub: str = "alice", **kwargs: Any) -> str:
        return issue_token(SECRET, sub, **kwargs)

    def stream_url(self, task_id: str) -> str:
        return f"{self.url}/api/v1/sse/tasks/{task_id}/progress"


@contextlib.asynccontextmanager
async def run_server(settings: Settings, *, sndbuf: int | None = None) -> AsyncIterator[LiveServer]:
    hypercorn_internals.install_peerclose()  # as `taskstream serve` does
    app = create_app(settings)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 2
    config.accesslog = None
    sockets = config.create_sockets()
    if sndbuf is not None:
        # Accepted sockets inherit the listener's send buffer: a tiny one makes a client that
        # stops reading push back on the server quickly (instead of after megabytes).
        for s in sockets.insecure_sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    port = sockets.insecure_sockets[0].getsockname()[1]
    stop = asyncio.Event()

    async def trigger() -> None:
        await stop.wait()
        await app.extensions["taskstream"].drain()

    ready = asyncio.Event()

    @app.before_serving
    async def _ready() -> None:
        ready.set()

    task = asyncio.create_task(
        worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),
            config,
            sockets=sockets,
            shutdown_trigger=trigger,
        )
    )
    waiter = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
    assert waiter in done, "server did not start"
    # before_serving runs before Hypercorn starts accepting on the socket: wait until it does,
    # or a test that connects at once races the listener and gets "connection refused".
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        await writer.wait_closed()
        break
    try:
        yield LiveServer(app=app, url=f"http://127.0.0.1:{port}", settings=settings)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        for s in sockets.insecure_sockets:
            s.close()


def make_settings(database_url: str, **overrides: Any) -> Settings:
    base = Settings(
        database_url=database_url,
        jwt_secret=SECRET,
        heartbeat=15,
        listener_check_interval=1.0,
        fallback_poll=0.5,
        shutdown_grace=1.0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module (or with parametrize indirect) to change server settings."""
    return {}


@pytest.fixture
async def server(
    database_url: str, settings_overrides: dict[str, Any]
) -> AsyncIterator[LiveServer]:
    async with run_server(make_settings(database_url, **settings_overrides)) as live:
        yield live
        # Every stream a test opened must be gone once its client is gone.
        for _ in range(50):
            if live.runtime.broker.subscriber_count == 0:
                break
            await asyncio.sleep(0.05)
        assert live.runtime.broker.subscriber_count == 0, "a subscription leaked"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as c:
        yield c


async def create_task(
    conn: asyncpg.Connection, task_id: str, owner: str = "alice", **fields: Any
) -> None:
    cols = ["id", "owner_id", *fields]
    params = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
    await conn.execute(
        f"INSERT INTO taskstream.tasks ({', '.join(cols)}) VALUES ({params})",
        task_id,
        owner,
        *fields.values(),
    )


def env_with(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


@pytest.fixture
def nats_cluster() -> Iterator[Any]:
    """A real three-node NATS cluster on free loopback ports, routes between the nodes
    (tests/natscluster.py); stopped at the end of the test."""
    from tests.natscluster import nats_cluster as start_cluster

    with start_cluster(3) as cluster:
        yield cluster
