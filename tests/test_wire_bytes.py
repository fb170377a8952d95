"""The exact bytes of representative streams, read off a raw socket (status line, headers, chunk
framing and every SSE byte), so that restructuring the streaming core cannot change the wire.

Only what is inherently variable is normalised, and nothing else:
- the ``retry:`` value (the base of 3000 ms times a random jitter of 1.0 to 1.5), as ``R``;
- ``updated_at`` timestamps (the trigger's clock), as ``T``;
- the ``date`` response header.
Chunk sizes are checked against the raw chunk they frame before normalising, so the framing is
pinned too (the single-task stream's progress events take the direct socket write, the rest go
through h11).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.conftest import LiveServer, create_task

NO_CONTENT_HEAD = [
    "HTTP/1.1 204 ",
    "content-type: text/html; charset=utf-8",
    "content-length: 0",
    "vary: Origin",
    "server: hypercorn-h11",
]
SSE_HEAD = [
    "HTTP/1.1 200 ",
    "content-type: text/event-stream",
    "cache-control: no-cache",
    "x-accel-buffering: no",
    "vary: Origin",
    "server: hypercorn-h11",
    "Transfer-Encoding: chunked",
]

_RETRY = re.compile(rb"retry: (\d+)\n")
_UPDATED = re.compile(rb'"updated_at":"[^"]*"')


def _normalise(chunk: bytes) -> bytes:
    for m in _RETRY.finditer(chunk):
        assert 3000 <= int(m.group(1)) <= 4500, chunk  # jitter stays within 1.0 to 1.5 x base
    chunk = _RETRY.sub(b"retry: R\n", chunk)
    return _UPDATED.sub(b'"updated_at":"T"', chunk)


class RawStream:
    """One HTTP/1.1 GET on a plain socket; the body is kept chunk by chunk, as framed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.head: list[str] = []
        self.chunks: list[bytes] = []
        self.ended = False

    async def read_head(self) -> None:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = raw.decode("latin-1").split("\r\n")[:-2]
        self.head = [line for line in lines if not line.lower().startswith("date:")]

    async def read_chunk(self) -> bytes:
        size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 5)
        size = int(size_line[:-2], 16)
        assert size_line == b"%x\r\n" % size, size_line  # lower-case hex, no extensions
        data = await asyncio.wait_for(self.reader.readexactly(size + 2), 5)
        assert data.endswith(b"\r\n"), data
        if size == 0:
            self.ended = True
            return b""
        chunk = _normalise(data[:-2])
        self.chunks.append(chunk)
        return chunk

    async def read_to_end(self) -> list[bytes]:
        """The chunks from here to the final zero-length one."""
        start = len(self.chunks)
        while not self.ended:
            await self.read_chunk()
        return self.chunks[start:]

    async def read_body(self) -> bytes:
        """A body with Content-Length (a JSON error, an empty 204)."""
        length = 0
        for line in self.head:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return await asyncio.wait_for(self.reader.readexactly(length), 5)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def _open(server: LiveServer, path: str, token: str, **headers: str) -> RawStream:
    url = urlsplit(server.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    lines = [f"GET {path} HTTP/1.1", f"Host: {url.netloc}", f"Authorization: Bearer {token}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    stream = RawStream(reader, writer)
    await stream.read_head()
    return stream


def resume(last_event_id: str) -> dict[str, str]:
    return {"Last-Event-ID": last_event_id}


def _progress(task_id: str, state: str, progress: float, eta: Any, version: int) -> bytes:
    eta_json = "null" if eta is None else str(eta)
    return (
        b"event: progress\nid: %d\ndata: "
        b'{"task_id":"%s","state":"%s","progress":%s,"estimated_time":%s,'
        b'"updated_at":"T","version":%d}\n\n'
    ) % (
        version,
        task_id.encode(),
        state.encode(),
        repr(progress).encode(),
        eta_json.encode(),
        version,
    )


async def test_single_task_stream_to_success_bytes(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="queued", progress=12.5, estimated_time=30)
    s = await _open(server, "/api/v1/sse/tasks/t1/progress", server.token())
    try:
        assert s.head == SSE_HEAD
        first = await s.read_chunk()
        assert first == b"retry: R\n\n" + _progress("t1", "queued", 12.5, 30, 1)
        await sql.execute("UPDATE taskstream.tasks SET state='running', progress=50 WHERE id='t1'")
        assert await s.read_chunk() == _progress("t1", "running", 50.0, 30, 2)
        await sql.execute(
            "UPDATE taskstream.tasks SET state='success', progress=100, estimated_time=NULL"
            " WHERE id='t1'"
        )
        rest = b"".join(await s.read_to_end())
        assert rest == (
            _progress("t1", "success", 100.0, None, 3)
            + b'event: complete\ndata: {"state": "success"}\n\n'
        )
    finally:
        await s.close()


async def test_single_task_stream_failed_with_error_bytes(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    s = await _open(server, "/api/v1/sse/tasks/t1/progress", server.token())
    try:
        assert await s.read_chunk() == b"retry: R\n\n" + _progress("t1", "pending", 0.0, None, 1)
        await sql.execute(
            "UPDATE taskstream.tasks SET state='failed', error=$1 WHERE id='t1'", 'disk "full"\nx'
        )
        rest = b"".join(await s.read_to_end())
        assert rest == (
            _progress("t1", "failed", 0.0, None, 2)
            + b'event: complete\ndata: {"state": "failed", "error": "disk \\"full\\"\\nx"}\n\n'
        )
    finally:
        await s.close()


async def test_not_found_and_resume_bytes(server: LiveServer, sql: asyncpg.Connection) -> None:
    s = await _open(server, "/api/v1/sse/tasks/nope/progress", server.token())
    try:
        assert s.head == SSE_HEAD
        assert await s.read_to_end() == [
            b'event: error\nid: end\ndata: {"error": "Task not found"}\n\n'
        ]
    finally:
        await s.close()
    # The client reconnects with the final id: 204, nothing else.
    s = await _open(server, "/api/v1/sse/tasks/nope/progress", server.token(), **resume("end"))
    try:
        assert s.head == NO_CONTENT_HEAD
    finally:
        await s.close()
    # Resumed at the current version of a finished task: 204, nothing re-sent.
    await create_task(sql, "t2", state="success", progress=100)
    s = await _open(server, "/api/v1/sse/tasks/t2/progress", server.token(), **resume("1"))
    try:
        assert s.head == NO_CONTENT_HEAD
    finally:
        await s.close()
    # Resumed at the current version of an open task: only the retry line until it moves.
    await create_task(sql, "t3", state="running", progress=5, estimated_time=9)
    s = await _open(server, "/api/v1/sse/tasks/t3/progress", server.token(), **resume("1"))
    try:
        assert await s.read_chunk() == b"retry: R\n\n"
        await sql.execute("UPDATE taskstream.tasks SET progress=6 WHERE id='t3'")
        assert await s.read_chunk() == _progress("t3", "running", 6.0, 9, 2)
    finally:
        await s.close()


@pytest.mark.parametrize("settings_overrides", [{"jwt_leeway": 0}])
async def test_token_expired_bytes(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1")
    s = await _open(server, "/api/v1/sse/tasks/t1/progress", server.token(ttl=1))
    try:
        assert await s.read_to_end() == [
            b"retry: R\n\n" + _progress("t1", "pending", 0.0, None, 1),
            b'event: error\ndata: {"error": "Token expired"}\n\n',
        ]
    finally:
        await s.close()


@pytest.mark.parametrize("settings_overrides", [{"stream_timeout": 0.6, "heartbeat": 0.2}])
async def test_heartbeat_and_timeout_bytes(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1")
    s = await _open(server, "/api/v1/sse/tasks/t1/progress", server.token())
    try:
        chunks = await s.read_to_end()
        assert chunks[0] == b"retry: R\n\n" + _progress("t1", "pending", 0.0, None, 1)
        assert chunks[-1] == b'event: timeout\ndata: {"message": "Stream timeout"}\n\n'
        beats = chunks[1:-1]
        assert beats and all(c == b": heartbeat\n\n" for c in beats)
    finally:
        await s.close()


async def test_multi_task_stream_bytes(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "a", state="running", progress=10)
    await create_task(sql, "b", state="success", progress=100)
    await create_task(sql, "c", owner="bob")
    s = await _open(server, "/api/v1/sse/tasks?ids=a,b,c,d", server.token())
    try:
        assert s.head == SSE_HEAD
        first = await s.read_chunk()
        assert first == (
            b"retry: R\n\n"
            b'event: progress\nid: 1.1.0.0\ndata: {"task_id":"a","state":"running","progress":10.0,'
            b'"estimated_time":null,"updated_at":"T","version":1}\n\n'
            b'event: progress\nid: 1.1.0.0\ndata: {"task_id":"b","state":"success",'
            b'"progress":100.0,'
            b'"estimated_time":null,"updated_at":"T","version":1}\n\n'
            b'event: complete\ndata: {"task_id": "b", "state": "success"}\n\n'
            b'event: error\nid: 1.1.0.0\ndata: {"error": "Task not found", "task_id": "c"}\n\n'
            b'event: error\nid: 1.1.0.0\ndata: {"error": "Task not found", "task_id": "d"}\n\n'
        )
        await sql.execute("UPDATE taskstream.tasks SET state='cancelled' WHERE id='a'")
        rest = b"".join(await s.read_to_end())
        assert rest == (
            b'event: progress\nid: 2.1.0.0\ndata: {"task_id":"a","state":"cancelled",'
            b'"progress":10.0,'
            b'"estimated_time":null,"updated_at":"T","version":2}\n\n'
            b'event: complete\ndata: {"task_id": "a", "state": "cancelled"}\n\n'
        )
    finally:
        await s.close()
    # Resume with the positional id: only what moved since.
    await create_task(sql, "e", state="running", progress=1, estimated_time=7)
    await sql.execute("UPDATE taskstream.tasks SET progress=2 WHERE id='e'")
    s = await _open(server, "/api/v1/sse/tasks?ids=e,b", server.token(), **resume("1.1"))
    try:
        assert await s.read_chunk() == (
            b"retry: R\n\n"
            b'event: progress\nid: 2.1\ndata: {"task_id":"e","state":"running","progress":2.0,'
            b'"estimated_time":7,"updated_at":"T","version":2}\n\n'
        )
    finally:
        await s.close()
    # Resumed where everything had ended: 204.
    s = await _open(server, "/api/v1/sse/tasks?ids=a,b", server.token(), **resume("2.1"))
    try:
        assert s.head == NO_CONTENT_HEAD
    finally:
        await s.close()


async def test_owner_wide_stream_bytes(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "a", state="running", progress=10, estimated_time=5)
    await create_task(sql, "done", state="success", progress=100)
    s = await _open(server, "/api/v1/sse/tasks", server.token())
    try:
        assert s.head == SSE_HEAD
        assert await s.read_chunk() == (
            b"retry: R\n\n"
            b'event: progress\ndata: {"task_id":"a","state":"running","progress":10.0,'
            b'"estimated_time":5,"updated_at":"T","version":1}\n\n'
        )
        await create_task(sql, "new")
        assert await s.read_chunk() == (
            b'event: progress\ndata: {"task_id":"new","state":"pending","progress":0.0,'
            b'"estimated_time":null,"updated_at":"T","version":1}\n\n'
        )
        await sql.execute("DELETE FROM taskstream.tasks WHERE id='a'")
        assert await s.read_chunk() == (
            b'event: error\ndata: {"error": "Task not found", "task_id": "a"}\n\n'
        )
    finally:
        await s.close()


async def test_refusals_bytes(server: LiveServer) -> None:
    s = await _open(server, "/api/v1/sse/tasks/%01/progress", server.token())
    try:
        assert s.head[0] == "HTTP/1.1 400 "
        assert await s.read_body() == (
            b'{"detail":"task id must not contain control characters","error":"Invalid task id"}\n'
        )
    finally:
        await s.close()
    s = await _open(server, "/api/v1/sse/tasks/t1/progress", "not-a-token")
    try:
        assert s.head[0] == "HTTP/1.1 401 "
    finally:
        await s.close()
