"""HTTP/2: several task streams share one connection, over TLS (h2) and over cleartext (h2c).

Browsers allow six HTTP/1.1 connections per origin, and each open EventSource holds one; over
HTTP/2 every stream is a multiplexed stream of one connection. The client below is limited to a
single connection, so getting both streams at once proves they share it.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import trustme

from server.auth import issue_token
from tests.conftest import SECRET, LiveServer, create_task
from tests.sse_client import Stream, open_stream
from tests.test_cli import _clean_env, start_serve

ONE_CONNECTION = httpx.Limits(max_connections=1, max_keepalive_connections=1)


async def _two_streams_on_one_connection(
    client: httpx.AsyncClient, base: str, token: str, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "a")
    await create_task(sql, "b")
    url_a = f"{base}/api/v1/sse/tasks/a/progress"
    url_b = f"{base}/api/v1/sse/tasks/b/progress"
    async with (
        open_stream(client, url_a, token=token) as a,
        open_stream(client, url_b, token=token) as b,
    ):
        streams: dict[str, Stream] = {"a": a, "b": b}
        for tid, s in streams.items():
            assert s.response.http_version == "HTTP/2"
            assert (await s.next(5)).json()["task_id"] == tid
        # Interleaved updates reach the right stream while both stay open.
        for p in (10, 20):
            for tid in ("b", "a"):
                await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id = $2", p, tid)
        for tid, s in streams.items():
            assert [(await s.next(5)).json()["progress"] for _ in range(2)] == [10, 20], tid
        await sql.execute("UPDATE taskstream.tasks SET state = 'success'")
        for s in streams.values():
            assert (await s.next(5)).event == "progress"
            assert (await s.next(5)).event == "complete"
            await s.wait_closed(5)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    ca_file, cert_file, key_file = d / "ca.pem", d / "cert.pem", d / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    yield ca_file, cert_file, key_file


async def test_serve_with_certfile_multiplexes_streams_over_h2(
    database_url: str, sql: asyncpg.Connection, tls_files: tuple[Path, Path, Path]
) -> None:
    ca_file, cert_file, key_file = tls_files
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    serve = await start_serve(env, "--certfile", str(cert_file), "--keyfile", str(key_file))
    try:
        await serve.wait_ready()
        base = _listening(serve.output)
        assert base.startswith("https://127.0.0.1:")
        verify = ssl.create_default_context(cafile=str(ca_file))
        async with httpx.AsyncClient(
            http2=True, verify=verify, limits=ONE_CONNECTION, timeout=10
        ) as client:
            await _two_streams_on_one_connection(
                client, base, issue_token(SECRET, "alice", ttl=60), sql
            )
    finally:
        code = await serve.stop()
    assert code == 0, "".join(serve.output)


def _listening(output: list[str]) -> str:
    for line in output:
        if line.startswith("taskstream listening on "):
            return line.split()[-1]
    raise AssertionError("no URL printed:\n" + "".join(output))


async def test_cleartext_h2c_multiplexes_streams(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    """HTTP/2 with prior knowledge on a plain socket (behind a proxy that speaks h2c)."""
    async with httpx.AsyncClient(
        http1=False, http2=True, limits=ONE_CONNECTION, timeout=10
    ) as client:
        await _two_streams_on_one_connection(client, server.url, server.token(), sql)
