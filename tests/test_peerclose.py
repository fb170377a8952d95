"""A connection's socket goes when its peer does (server/peerclose.py, issue 14 items 2 and 3).

Run against a real ``taskstream serve`` (uvloop, the 75 s keep-alive), because that is where a
closed peer held its descriptor for the whole keep-alive and a pipelined request kept its
connection task until shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import hypercorn.asyncio.run as hypercorn_run

from server import peerclose
from server.auth import issue_token
from tests.conftest import SECRET, create_task
from tests.test_cli import ServeProcess, _clean_env, start_serve


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def close_wait_count(port: int) -> int:
    """Sockets on the server's port whose peer has closed and which the server still holds."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "08":  # TCP_CLOSE_WAIT
                    count += 1
    return count


@contextlib.asynccontextmanager
async def serve(database_url: str, **env: str) -> AsyncIterator[ServeProcess]:
    """``taskstream serve`` whose output is read all along (an unread pipe would fill up after a
    few hundred access-log lines and block the server)."""
    proc = await start_serve(
        _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET, **env)
    )
    drain: asyncio.Task[None] | None = None
    try:
        await proc.wait_ready()

        async def read() -> None:
            assert proc.proc.stdout is not None
            while line := await proc.proc.stdout.readline():
                proc.output.append(line.decode())

        drain = asyncio.create_task(read())
        # "ready" is logged just before Hypercorn starts listening.
        await healthz_within(proc.url, 10)
        yield proc
    finally:
        if proc.proc.returncode is None:
            proc.proc.send_signal(signal.SIGTERM)
        if drain is not None:
            await asyncio.wait_for(drain, 30)
        await asyncio.wait_for(proc.proc.wait(), 30)


def port_of(proc: ServeProcess) -> int:
    return int(proc.url.rsplit(":", 1)[1])


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


async def get_and_close(port: int, head: bytes = HEALTHZ) -> None:
    """One keep-alive request, then the client closes (the server would keep the connection)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    try:
        if head:
            writer.write(head)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def healthz_within(url: str, seconds: float) -> float:
    """Seconds until ``/healthz`` answered 200 (fails after ``seconds``)."""
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            try:
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            assert time.monotonic() - start < seconds, f"/healthz refused for {seconds} s"
            await asyncio.sleep(0.1)


def test_hypercorn_has_the_shape_peerclose_relies_on() -> None:
    """Fails when a Hypercorn release changes the internals server/peerclose.py works around:
    then re-read hypercorn/asyncio/tcp_server.py and check whether the workaround is needed."""
    assert peerclose.shape_problems() == []
    assert peerclose.install()
    assert hypercorn_run.TCPServer is peerclose.PromptCloseTCPServer  # type: ignore[attr-defined]


async def test_connect_request_close_loop_does_not_exhaust_descriptors(
    database_url: str,
) -> None:
    async with serve(database_url) as proc:
        pid, port = proc.proc.pid, port_of(proc)
        baseline = fd_count(pid)
        # A low limit, so that 400 leaked sockets would use up every descriptor.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
        deadline = time.monotonic() + 30
        for _ in range(400):
            if time.monotonic() > deadline:
                break
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                await get_and_close(port)
        await healthz_within(proc.url, 3)
        for _ in range(50):
            if fd_count(pid) <= baseline + 5:
                break
            await asyncio.sleep(0.1)
        assert fd_count(pid) <= baseline + 5, (baseline, fd_count(pid))


async def test_closed_connections_leave_close_wait_within_seconds(database_url: str) -> None:
    async with serve(database_url) as proc:
        port = port_of(proc)
        # Idle after a response, and idle from the start (a client that sends nothing).
        await asyncio.gather(*(get_and_close(port) for _ in range(20)))
        await asyncio.gather(*(get_and_close(port, b"") for _ in range(5)))
        for _ in range(30):
            if close_wait_count(port) == 0:
                break
            await asyncio.sleep(0.1)
        assert close_wait_count(port) == 0


async def test_requests_pipelined_behind_a_stream_go_with_their_client(
    database_url: str, sql: asyncpg.Connection
) -> None:
    """The client closes; the stream notices on its next heartbeat. The connection (its task
    and socket) must go too, so SIGTERM is fast and logs no traceback."""
    await create_task(sql, "p1")
    async with serve(database_url, TASKSTREAM_HEARTBEAT="0.2") as proc:
        port = port_of(proc)
        baseline = fd_count(proc.proc.pid)
        token = issue_token(SECRET, "alice")
        head = (
            b"GET /api/v1/sse/tasks/p1/progress HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        writers = []
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # the stream's head
            writers.append(writer)
        for writer in writers:
            writer.close()  # with unread data: the server's next write fails at once
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        # The heartbeats find the clients gone and the streams end.
        for _ in range(50):
            if fd_count(proc.proc.pid) <= baseline + 5 and "stream closed" in "".join(proc.output):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.proc.wait(), 30)
        took = time.monotonic() - started
    output = "".join(proc.output)
    assert code == 0, output
    assert took < 3.0, f"SIGTERM took {took:.1f} s"
    assert "Traceback" not in output and '"level": "error"' not in output, output[-3000:]
