"""Load generator: streams spread over worker processes and source addresses.

The controller talks to each worker process over a ``multiprocessing`` pipe with
small commands (connect, drain, stats, finish, abort); each worker runs uvloop and
holds its streams as :class:`bench.sse_client.SSEStream` protocols.
"""

from __future__ import annotations

import asyncio
import heapq
import multiprocessing as mp
import resource
import socket
import time
from array import array
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

from bench.sse_client import H2SSEStream, SSEStream, Tally, build_h2_headers, build_request
from bench.tokens import mint

__all__ = ["LoadGen", "WorkerJob", "raise_nofile"]

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process streams: (task_id, owner) pairs and where from."""

    host: str
    port: int
    src_ip: str
    secret: str
    assignments: list[tuple[str, str]]
    expect_state: str = "success"
    # Open each stream on the group of the same name (group_stream) instead of on the task.
    group_streams: bool = False
    # HTTP/2 in cleartext with prior knowledge (h2c), one connection per stream.
    http2: bool = False


def _stamp_epoch(stamp: bytes, cache: dict[bytes, float]) -> float:
    v = cache.get(stamp)
    if v is None:
        v = datetime.fromisoformat(stamp.decode()).timestamp()
        cache[stamp] = v
    return v


class _Worker:
    def __init__(self, job: WorkerJob) -> None:
        self.job = job
        self.tally = Tally()
        self.streams: list[SSEStream] = []
        self.next = 0
        self.tokens: dict[str, bytes] = {}
        self.cache: dict[bytes, float] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def _token(self, owner: str) -> str:
        tok = self.tokens.get(owner)
        if tok is None:
            tok = mint(self.job.secret, owner, ttl=7200).encode()
            self.tokens[owner] = tok
        return tok.decode()

    def _stream(self, task_id: str, owner: str, state: bytes) -> SSEStream:
        job = self.job
        if job.http2:
            headers = build_h2_headers(
                job.host, job.port, task_id, self._token(owner), group=job.group_streams
            )
            return H2SSEStream(self.tally, headers, state)
        request = build_request(
            job.host, job.port, task_id, self._token(owner), group=job.group_streams
        )
        return SSEStream(self.tally, request, state)

    async def _open(self, stream: SSEStream, sem: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with sem:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            stream.gate = loop.create_future()
            gate = stream.gate
            stream.t_start = time.time()
            t = self.tally
            t.started += 1
            if t.first_start == 0.0:
                t.first_start = stream.t_start
            try:
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.job.src_ip, 0))
                await loop.sock_connect(sock, (self.job.host, self.job.port))
                await loop.create_connection(lambda: stream, sock=sock)
            except OSError:
                sock.close()
                stream.gate = None
                stream.done = True
                t.failed += 1
                t.closed += 1
                t.poke()
                return
            # Hold the slot until the initial state arrives: "in flight" means a whole connect.
            await gate

    async def connect(self, count: int, concurrency: int, limit: float) -> dict[str, Any]:
        sem = asyncio.Semaphore(max(1, concurrency))
        begin = len(self.streams)
        end = min(begin + count, len(self.job.assignments))
        state = self.job.expect_state.encode()
        t0 = time.time()
        for i in range(begin, end):
            task_id, owner = self.job.assignments[i]
            s = self._stream(task_id, owner, state)
            self.streams.append(s)
            task = asyncio.create_task(self._open(s, sem))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        target = end

        def settled(t: Tally) -> bool:
            return t.ready + t.failed >= target

        await self.tally.wait_for(settled, limit)
        return {"requested": end - begin, "elapsed": time.time() - t0, **self.stats()}

    def stats(self) -> dict[str, Any]:
        t = self.tally
        return {
            "started": t.started,
            "ready": t.ready,
            "failed": t.failed,
            "closed": t.closed,
            "open": t.ready - (t.closed - t.failed),
            "completed": t.completed,
            "updates": t.updates,
            "heartbeats": t.heartbeats,
            "first_start": t.first_start,
            "last_ready": t.last_ready,
        }

    def drain(self) -> dict[str, Any]:
        t = self.tally
        stamps = array("d", (_stamp_epoch(s, self.cache) for s in t.stamps))
        lat = array("d", (r - s for r, s in zip(t.recv, stamps, strict=True)))
        t.recv = array("d")
        t.stamps = []
        conn_lat = t.connect_lat
        t.connect_lat = array("d")
        return {"stamps": stamps.tobytes(), "lat": lat.tobytes(), "connect_lat": conn_lat.tobytes()}

    async def finish(self, limit: float) -> dict[str, Any]:
        n = len(self.streams)

        def all_closed(t: Tally) -> bool:
            return t.completed + t.failed + t.lost >= n

        await self.tally.wait_for(all_closed, limit)
        self.abort()
        await asyncio.sleep(0.05)
        t = self.tally
        never_done = sum(1 for s in self.streams if not s.done)
        return {
            **self.stats(),
            "streams": n,
            "bad_terminal": t.bad_terminal,
            "lost": t.lost + never_done,
            "error_events": t.error_events,
            "timeouts": t.timeouts,
            "out_of_order": t.out_of_order,
            "status_codes": dict(t.status_codes),
            **self.drain(),
        }

    def abort(self) -> None:
        for s in self.streams:
            if s.transport is not None and not s.transport.is_closing():
                s.transport.abort()
        for task in list(self.tasks):
            task.cancel()


async def _serve(conn: Connection, job: WorkerJob) -> None:
    loop = asyncio.get_running_loop()
    w = _Worker(job)
    conn.send(("hello", {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
    while True:
        cmd, arg = await loop.run_in_executor(None, conn.recv)
        if cmd == "connect":
            count, concurrency, limit = arg
            conn.send(("connected", await w.connect(count, concurrency, limit)))
        elif cmd == "stats":
            conn.send(("stats", w.stats()))
        elif cmd == "drain":
            conn.send(("drain", w.drain()))
        elif cmd == "finish":
            conn.send(("result", await w.finish(float(arg))))
            return
        else:  # "abort" or anything unknown
            w.abort()
            return


def _worker_main(conn: Connection, job: WorkerJob) -> None:
    raise_nofile()
    try:
        import uvloop

        uvloop.run(_serve(conn, job))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(conn, job))
    finally:
        conn.close()


def _split(total: int, room: list[int]) -> list[int]:
    """Spread ``total`` as evenly as possible over workers with ``room`` left each.

    An even split that ignores ``room`` asked a worker for more than it had left and left
    another's last streams unasked (20,000 over three workers in steps of 4,000 opened 19,997).
    """
    per = [0] * len(room)
    # One stream at a time to the worker that has the fewest so far and room left (20,000
    # steps at most, a few milliseconds).
    heap = [(0, i) for i, r in enumerate(room) if r > 0]
    heapq.heapify(heap)
    for _ in range(min(total, sum(room))):
        k, i = heapq.heappop(heap)
        per[i] = k + 1
        if per[i] < room[i]:
            heapq.heappush(heap, (k + 1, i))
    return per


class LoadGen:
    """Controller-side handle on the worker processes of one run."""

    def __init__(self, jobs: list[WorkerJob]) -> None:
        self.jobs = jobs
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        # Streams asked of each worker so far: a worker can open only its own assignments.
        self.requested = [0] * len(jobs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    async def start(self, limit: float = 30.0) -> None:
        ctx = mp.get_context("spawn")
        for job in self.jobs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, job), daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        await self._gather("hello", limit)

    async def _recv(self, conn: Connection, expect: str, limit: float) -> Any:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, conn.poll, limit)
        if not ok:
            raise TimeoutError(f"load generator worker did not answer {expect!r} in {limit}s")
        kind, payload = conn.recv()
        if kind != expect:
            raise RuntimeError(f"load generator worker answered {kind!r}, expected {expect!r}")
        return payload

    async def _gather(self, expect: str, limit: float) -> list[Any]:
        return list(await asyncio.gather(*(self._recv(c, expect, limit) for c in self.conns)))

    async def connect(self, total: int, concurrency: int, limit: float) -> dict[str, Any]:
        """Open ``total`` more streams split over the workers; wait for their initial state."""
        n = len(self.conns)
        room = [len(j.assignments) - r for j, r in zip(self.jobs, self.requested, strict=True)]
        per = _split(total, room)
        self.requested = [r + k for r, k in zip(self.requested, per, strict=True)]
        conc = [max(1, concurrency // n)] * n
        t0 = time.time()
        for c, k, cc in zip(self.conns, per, conc, strict=True):
            c.send(("connect", (k, cc, limit)))
        replies = await self._gather("connected", limit + 30)
        elapsed = time.time() - t0
        firsts = [r["first_start"] for r in replies if r["first_start"]]
        lasts = [r["last_ready"] for r in replies if r["last_ready"]]
        return {
            "elapsed": elapsed,
            "ready": sum(r["ready"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "open": sum(r["open"] for r in replies),
            "first_start": min(firsts) if firsts else 0.0,
            "last_ready": max(lasts) if lasts else 0.0,
        }

    async def stats(self) -> dict[str, int]:
        for c in self.conns:
            c.send(("stats", None))
        replies = await self._gather("stats", 30)
        keys = ("ready", "failed", "closed", "open", "completed", "updates", "heartbeats")
        return {k: sum(r[k] for r in replies) for k in keys}

    async def drain(self) -> tuple[array[float], array[float], array[float]]:
        """Latency samples since the last drain: (updated_at epoch, latency s, connect s)."""
        for c in self.conns:
            c.send(("drain", None))
        return _merge(await self._gather("drain", 60))

    async def finish(self, limit: float) -> dict[str, Any]:
        """Wait for every stream to end (terminal event or loss), then collect results."""
        for c in self.conns:
            c.send(("finish", limit))
        replies = await self._gather("result", limit + 60)
        stamps, lat, conn_lat = _merge(replies)
        out: dict[str, Any] = {"stamps": stamps, "lat": lat, "connect_lat": conn_lat}
        for k in (
            "streams",
            "ready",
            "failed",
            "completed",
            "bad_terminal",
            "lost",
            "error_events",
            "timeouts",
            "out_of_order",
            "updates",
            "heartbeats",
        ):
            out[k] = sum(r[k] for r in replies)
        codes: dict[int, int] = {}
        for r in replies:
            for code, cnt in r["status_codes"].items():
                codes[code] = codes.get(code, 0) + cnt
        out["status_codes"] = codes
        return out

    async def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("abort", None))
            except (OSError, ValueError):
                pass
        loop = asyncio.get_running_loop()
        for p in self.procs:
            await loop.run_in_executor(None, p.join, 5)
            if p.is_alive():
                p.terminate()
                await loop.run_in_executor(None, p.join, 5)
            if p.is_alive():
                p.kill()
                await loop.run_in_executor(None, p.join, 5)
        for c in self.conns:
            c.close()
        self.procs.clear()
        self.conns.clear()


def _merge(replies: list[dict[str, Any]]) -> tuple[array[float], array[float], array[float]]:
    stamps, lat, conn_lat = array("d"), array("d"), array("d")
    for r in replies:
        stamps.frombytes(r["stamps"])
        lat.frombytes(r["lat"])
        conn_lat.frombytes(r["connect_lat"])
    return stamps, lat, conn_lat
