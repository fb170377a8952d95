"""``python -m bench heap``: where the bytes of one open stream live, layer by layer.

A real ``taskstream`` app is served by Hypercorn (uvloop, the same adapter and settings as
``taskstream serve``) inside this process, so tracemalloc and the garbage collector can see
it; the streams come from the bench's load generator in other processes, over real sockets.

1. A warm-up batch of streams, so that caches, code paths and the registry's tables exist.
2. RSS per stream: ``--streams`` more streams with tracing off (tracemalloc's own bookkeeping
   would inflate the resident size).
3. Bytes per stream: tracemalloc on, a snapshot, ``--streams`` more streams, a snapshot. Each
   allocation that grew is put in a layer by the innermost frame outside the standard library
   (an allocation on a line that creates a task, and the coroutine it wraps, count as tasks).
4. Objects per stream by type: the garbage collector's census before and after step 3.

Allocations that the C parts of uvloop make with the C allocator (libuv handles, read
buffers) are not Python allocations: they show in the RSS figure, not in the layers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import linecache
import logging
import os
import secrets
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.database import BenchDatabase
from bench.loadgen import LoadGen, WorkerJob, raise_nofile
from bench.procs import probe_401

__all__ = ["LAYERS", "HeapProfile", "classify", "main"]

logger = logging.getLogger("bench.heap")

HOST = "127.0.0.1"
USERS = 100

# Innermost non-standard-library frame -> layer (first match wins, tasks are found first).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("subscription and mailbox", ("server/stream/mailbox.py", "server/stream/registry.py")),
    (
        "stream session and body iterator",
        (
            "server/stream/session.py",
            "server/stream/routes.py",
            "server/stream/observe.py",
            "server/stream/encoder.py",
            "server/stream/snapshots.py",
        ),
    ),
    ("app middleware (auth, send timeout, CORS, logs)", ("/server/",)),
    (
        "request and response objects (Quart, Werkzeug)",
        ("/quart/", "/werkzeug/", "/quart_cors/", "/quart_schema/", "/flask/"),
    ),
    (
        "HTTP state (h11, h2, Hypercorn protocol)",
        ("/h11/", "/h2/", "/hpack/", "/hyperframe/", "/hypercorn/protocol/"),
    ),
    ("connection (Hypercorn TCPServer, task group)", ("/hypercorn/",)),
)
TASKS = "asyncio tasks and their coroutines"
LOOP = "socket and transport (uvloop / asyncio, no app frame)"
OTHER = "other"
ORDER = (TASKS, *(name for name, _ in LAYERS), LOOP, OTHER)

_STDLIB = (os.path.dirname(os.__file__) + os.sep,)
_SPAWNS = ("create_task(", "ensure_future(", ".spawn(", "run_coroutine_threadsafe(")


def _innermost_app_frame(frames: list[tracemalloc.Frame]) -> tracemalloc.Frame | None:
    # tracemalloc lists the oldest frame first.
    for frame in reversed(frames):
        name = frame.filename
        if name.startswith(_STDLIB) and "site-packages" not in name:
            continue
        if name.startswith("<") or name.endswith("uvloop/__init__.py") or "/bench/" in name:
            continue  # the runner's frames: the allocation came from the loop's C code
        return frame
    return None


def classify(frames: list[tracemalloc.Frame]) -> tuple[str, str]:
    """(layer, site) of one allocation's traceback."""
    frame = _innermost_app_frame(frames)
    if frame is None:
        return LOOP, frames[-1].filename.rsplit("/", 1)[-1] if frames else "<no frame>"
    path = frame.filename.replace(os.sep, "/")
    short = "/".join(path.split("/")[-3:])
    site = f"{short}:{frame.lineno}"
    line = linecache.getline(frame.filename, frame.lineno)
    if any(s in line for s in _SPAWNS):
        return TASKS, site
    for name, needles in LAYERS:
        if any(n in path for n in needles):
            return name, site
    return OTHER, site


@dataclass
class HeapProfile:
    """The figures of one run."""

    streams: int
    warm: int
    http: str = "http1"
    rss_per_stream_kb: float = 0.0
    traced_per_stream_b: float = 0.0
    layers: dict[str, float] = field(default_factory=dict)  # bytes per stream
    layer_blocks: dict[str, float] = field(default_factory=dict)  # allocations per stream
    sites: list[tuple[str, str, float]] = field(default_factory=list)
    types: list[tuple[str, float, float]] = field(default_factory=list)  # name, objs, bytes
    tasks_per_stream: float = 0.0
    gc_objects_per_stream: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def markdown(self, title: str = "Heap profile of one open stream") -> str:
        out = [
            f"### {title}",
            "",
            f"{self.streams:,} single-task streams over "
            f"{'HTTP/1.1' if self.http == 'http1' else 'HTTP/2 (h2c, one connection each)'} "
            f"added to {self.warm:,} open "
            f"ones, one process (`{self.meta.get('command', 'python -m bench heap')}`).",
            "",
            "- RSS per stream (tracing off; the census below is from the same step): "
            f"**{self.rss_per_stream_kb:.1f} KB**",
            f"- Python allocations per stream (tracemalloc): "
            f"**{self.traced_per_stream_b / 1024:.1f} KB**",
            f"- objects tracked by the garbage collector per stream: "
            f"{self.gc_objects_per_stream:.0f}; asyncio tasks per stream: "
            f"{self.tasks_per_stream:.2f}",
            "",
            "| layer | bytes/stream | allocations/stream |",
            "|---|---:|---:|",
        ]
        for name in ORDER:
            if name in self.layers:
                out.append(
                    f"| {name} | {self.layers[name]:,.0f} | {self.layer_blocks.get(name, 0):.1f} |"
                )
        out.append(f"| **total** | **{self.traced_per_stream_b:,.0f}** | |")
        out += ["", "Top allocation sites (innermost frame outside the standard library):", ""]
        out += ["| site | layer | bytes/stream |", "|---|---|---:|"]
        for site, layer, size in self.sites:
            out.append(f"| `{site}` | {layer} | {size:,.0f} |")
        out += ["", "Objects per stream by type (garbage collector census, shallow sizes):", ""]
        out += ["| type | objects/stream | bytes/stream |", "|---|---:|---:|"]
        for name, count, size in self.types:
            out.append(f"| `{name}` | {count:.2f} | {size:,.0f} |")
        return "\n".join(out) + "\n"


def _census() -> tuple[Counter[str], Counter[str]]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        t = type(obj)
        name = f"{t.__module__}.{t.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return counts, sizes


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _migrate(url: str, secret: str) -> None:
    env = dict(os.environ, DATABASE_URL=url, TASKSTREAM_JWT_SECRET=secret)
    subprocess.run(
        [sys.executable, "-m", "server", "migrate"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=120,
    )


async def _serve(app: Any, port: int, stop: asyncio.Event) -> None:
    from server import hypercorn_internals
    from server.hypercorn_internals import Config
    from server.logs import AccessLogger

    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.keep_alive_timeout = 75
    config.backlog = 4096
    config.accesslog = None
    config.logger_class = AccessLogger
    sockets = config.create_sockets()
    try:
        await hypercorn_internals.serve(app, config, sockets=sockets, shutdown_trigger=stop.wait)
    finally:
        for s in sockets.insecure_sockets:
            s.close()


async def run(
    streams: int, warm: int, database_url: str | None, http: str = "http1"
) -> HeapProfile:
    from bench.procs import free_port

    raise_nofile()
    db = await BenchDatabase.open(database_url)
    secret = secrets.token_urlsafe(32)
    result = HeapProfile(streams, warm, http=http)
    stop = asyncio.Event()
    server_task: asyncio.Task[None] | None = None
    lg: LoadGen | None = None
    try:
        await asyncio.get_running_loop().run_in_executor(None, _migrate, db.url, secret)
        total = warm + 2 * streams
        assignments = [(f"t{i}", f"u{i % USERS}") for i in range(total)]
        await db.reset_tasks(assignments)
        os.environ.update(
            DATABASE_URL=db.url,
            TASKSTREAM_JWT_SECRET=secret,
            TASKSTREAM_MAX_STREAMS="1000000",
            TASKSTREAM_MAX_STREAMS_PER_USER="1000000",
            TASKSTREAM_STREAM_TIMEOUT="3600",
            TASKSTREAM_LOG_LEVEL="WARNING",
        )
        from server import gctuning, hypercorn_internals
        from server.app import create_app
        from server.config import Settings
        from server.logs import setup_logging

        settings = Settings.from_env()
        setup_logging(settings.log_level)
        hypercorn_internals.install_peerclose()
        app = create_app(settings)
        gctuning.apply(settings.gc_thresholds)
        port = free_port()
        server_task = asyncio.create_task(_serve(app, port, stop))
        for _ in range(200):
            if await probe_401(port):
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the in-process server did not answer")
        procs = 2
        jobs = [
            WorkerJob(
                HOST,
                port,
                f"127.0.9.{2 + w}",
                secret,
                assignments[w::procs],
                http2=http == "h2c",
            )
            for w in range(procs)
        ]
        lg = LoadGen(jobs)
        await lg.start()

        opened = [0]

        async def connect(n: int) -> None:
            # Generous: under tracemalloc the server runs several times slower.
            c = await lg.connect(n, 256, 600 + n / 10)
            logger.info("open streams: %d (failed %d)", c["open"], c["failed"])
            if c["failed"] or c["open"] < opened[0] + n:
                raise RuntimeError(
                    f"{n} more streams asked, {c['open']} open, {c['failed']} failed"
                )
            opened[0] = c["open"]
            await asyncio.sleep(1.0)
            gc.collect()

        await connect(warm)
        counts0, sizes0 = _census()
        gc.collect()
        rss0 = _rss()
        await connect(streams)
        result.rss_per_stream_kb = (_rss() - rss0) / streams / 1024
        counts1, sizes1 = _census()

        tracemalloc.start(16)
        gc.collect()
        before = tracemalloc.take_snapshot()
        await connect(streams)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()

        layers: Counter[str] = Counter()
        blocks: Counter[str] = Counter()
        sites: Counter[tuple[str, str]] = Counter()
        for stat in after.compare_to(before, "traceback"):
            if stat.size_diff <= 0:
                continue
            layer, site = classify(list(stat.traceback))
            layers[layer] += stat.size_diff
            blocks[layer] += max(stat.count_diff, 0)
            sites[(site, layer)] += stat.size_diff
        result.layers = {k: v / streams for k, v in layers.items()}
        result.layer_blocks = {k: v / streams for k, v in blocks.items()}
        result.traced_per_stream_b = sum(layers.values()) / streams
        result.sites = [(s, lay, v / streams) for (s, lay), v in sites.most_common(25)]
        grown = [
            (
                name,
                (counts1[name] - counts0[name]) / streams,
                (sizes1[name] - sizes0[name]) / streams,
            )
            for name in counts1
            if counts1[name] - counts0[name] >= streams // 2
        ]
        grown.sort(key=lambda t: -t[2])
        result.types = grown[:30]
        result.gc_objects_per_stream = (sum(counts1.values()) - sum(counts0.values())) / streams
        result.tasks_per_stream = (
            sum(v for k, v in counts1.items() if k.endswith(".Task"))
            - sum(v for k, v in counts0.items() if k.endswith(".Task"))
        ) / streams
    finally:
        if lg is not None:
            await lg.close()
        stop.set()
        if server_task is not None:
            try:
                await asyncio.wait_for(server_task, 30)
            except (TimeoutError, asyncio.CancelledError):
                server_task.cancel()
        await db.close()
    return result


def add_parser(sub: Any) -> None:
    h = sub.add_parser("heap", help="heap profile of one open stream, per layer")
    h.add_argument("--streams", type=int, default=2000, help="streams per measured step")
    h.add_argument("--warm", type=int, default=500, help="streams opened before measuring")
    h.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="a PostgreSQL server for the database taskstream_bench (default: embedded)",
    )
    h.add_argument(
        "--http", choices=("http1", "h2c"), default="http1", help="how the streams connect"
    )
    h.add_argument("--title", default="Heap profile of one open stream")
    h.add_argument("--out", type=Path, help="append the markdown table to this file")
    h.add_argument("--json", type=Path, help="write the figures as JSON")


def main(args: argparse.Namespace) -> int:
    import uvloop

    t0 = time.time()
    profile = uvloop.run(run(args.streams, args.warm, args.database_url, args.http))
    profile.meta = {
        "command": " ".join(["python", "-m", "bench", *sys.argv[1:]]),
        "wall_s": round(time.time() - t0, 1),
        "python": sys.version.split()[0],
    }
    text = profile.markdown(args.title)
    print(text)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n" + text)
    if args.json is not None:
        args.json.write_text(json.dumps(profile.__dict__, indent=1, default=str))
    return 0
