"""Open-loop writers for the ``update_rate`` scenario: the same schedule as :mod:`bench.writer`,
but through the task API (one ``PATCH`` per update, or ``PATCH /api/v1/tasks`` with every update
due in a 10 ms tick) or through :class:`server.reporter.Reporter`.

The HTTP client is a few lines of raw HTTP/1.1 over keep-alive sockets: httpx would spend more
CPU per request than the server, on a machine whose two cores both sides share.
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from collections.abc import Sequence

from bench.writer import WriteStats
from server.reporter import Reporter

__all__ = ["ApiWriter", "ReporterWriter"]

TICK = 0.01  # bulk and reporter modes: updates due within a tick go together


class _Conn:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status_line = await self.reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)


class ApiWriter:
    """``mode="patch"``: one PATCH per update over ``connections`` keep-alive connections.
    ``mode="bulk"``: every tick, the updates due go as one ``PATCH /api/v1/tasks``."""

    def __init__(self, host: str, port: int, token: str, mode: str, connections: int = 64):
        if mode not in ("patch", "bulk"):
            raise ValueError(f"unknown mode {mode!r}")
        self.host, self.port, self.token, self.mode = host, port, token, mode
        self.n = connections if mode == "patch" else 8
        self.conns: list[_Conn] = []
        self.counters: dict[str, int] = {}

    async def open(self) -> None:
        for _ in range(self.n):
            self.conns.append(_Conn(*await asyncio.open_connection(self.host, self.port)))

    async def close(self) -> None:
        for c in self.conns:
            c.writer.close()
        self.conns = []

    def _next_progress(self, task_id: str) -> float:
        c = self.counters.get(task_id, 0) + 1
        self.counters[task_id] = c
        return float(c % 99 + 1)

    def _head(self, path: str) -> bytes:
        return (
            f"PATCH {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
        ).encode()

    async def run(
        self, rate: float, duration: float, task_ids: Sequence[str], state: str = "running"
    ) -> WriteStats:
        loop = asyncio.get_running_loop()
        total = int(rate * duration)
        t0 = loop.time() + 0.01
        wall0 = time.time() + 0.01
        done = errors = seq = 0
        max_lag = 0.0
        rtt = array("d")

        def next_item() -> tuple[str, float]:
            nonlocal seq
            task_id = task_ids[seq % len(task_ids)]
            seq += 1
            return task_id, self._next_progress(task_id)

        if self.mode == "patch":
            step = 1.0 / rate

            async def lane(k: int, conn: _Conn) -> None:
                nonlocal done, errors, max_lag
                i = k
                while i < total:
                    due = t0 + i * step
                    now = loop.time()
                    if due > now:
                        await asyncio.sleep(due - now)
                    else:
                        max_lag = max(max_lag, now - due)
                    task_id, progress = next_item()
                    body = json.dumps({"progress": progress, "state": state}).encode()
                    t = loop.time()
                    code, _ = await conn.request(self._head(f"/api/v1/tasks/{task_id}"), body)
                    rtt.append(loop.time() - t)
                    if code == 200:
                        done += 1
                    else:
                        errors += 1
                    i += len(self.conns)

            await asyncio.gather(*(lane(k, c) for k, c in enumerate(self.conns)))
        else:
            free: asyncio.Queue[_Conn] = asyncio.Queue()
            for c in self.conns:
                free.put_nowait(c)
            head = self._head("/api/v1/tasks")
            in_flight: set[asyncio.Task[None]] = set()

            async def send(items: list[dict[str, object]]) -> None:
                nonlocal done, errors
                conn = await free.get()
                try:
                    t = loop.time()
                    code, body = await conn.request(head, json.dumps({"updates": items}).encode())
                    rtt.append(loop.time() - t)
                finally:
                    free.put_nowait(conn)
                if code != 200:
                    errors += len(items)
                    return
                for r in json.loads(body)["results"]:
                    if r["status"] == 200:
                        done += 1
                    else:
                        errors += 1

            sent = 0
            tick = 0
            while sent < total:
                tick += 1
                due_until = min(total, int(tick * TICK * rate))
                wait = t0 + tick * TICK - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    max_lag = max(max_lag, -wait)
                while sent < due_until:
                    chunk = min(due_until - sent, 1000)
                    items: list[dict[str, object]] = []
                    for _ in range(chunk):
                        task_id, progress = next_item()
                        items.append({"id": task_id, "progress": progress, "state": state})
                    sent += chunk
                    task = asyncio.create_task(send(items))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.gather(*in_flight)
        return WriteStats(rate, done, errors, wall0, time.time(), max_lag, rtt)


class ReporterWriter:
    """Workers writing SQL through :class:`server.reporter.Reporter` (one connection)."""

    def __init__(self, dsn: str, interval: float = 0.05) -> None:
        self.dsn = dsn
        self.interval = interval
        self.counters: dict[str, int] = {}
        self.rows_written = 0
        self.flushes = 0

    async def run(
        self, rate: float, duration: float, task_ids: Sequence[str], state: str = "running"
    ) -> WriteStats:
        loop = asyncio.get_running_loop()
        total = int(rate * duration)
        t0 = loop.time() + 0.01
        wall0 = time.time() + 0.01
        max_lag = 0.0
        sent = seq = tick = 0
        async with Reporter(self.dsn, interval=self.interval) as report:
            while sent < total:
                tick += 1
                due_until = min(total, int(tick * TICK * rate))
                wait = t0 + tick * TICK - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    max_lag = max(max_lag, -wait)
                for _ in range(due_until - sent):
                    task_id = task_ids[seq % len(task_ids)]
                    seq += 1
                    c = self.counters.get(task_id, 0) + 1
                    self.counters[task_id] = c
                    report.progress(task_id, progress=float(c % 99 + 1), state=state)
                sent = due_until
            await report.flush()
            self.rows_written += report.rows_written
            self.flushes += report.flushes
        return WriteStats(rate, sent, 0, wall0, time.time(), max_lag, array("d"))
