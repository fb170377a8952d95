"""The six scenarios, each run against one target (taskstream or the polling baseline).

A run owns a fresh server process and fresh load-generator processes, so memory figures
of one scenario do not inherit the heap of another.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.apiwriter import ApiWriter, ReporterWriter
from bench.config import SERVERS, BenchConfig
from bench.database import BenchDatabase
from bench.loadgen import LoadGen, WorkerJob
from bench.procs import ProcTree, ServerProcess, free_port
from bench.profiling import Profiler
from bench.tokens import mint
from bench.writer import Writer

__all__ = ["Context", "RunResult", "run_scenario"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


@dataclass
class Context:
    """Shared by every run of one bench invocation."""

    cfg: BenchConfig
    db: BenchDatabase
    secret: str
    out: Path
    run_index: int = 0


@dataclass
class RunResult:
    """One scenario against one target."""

    scenario: str
    target: str
    streams: int
    workers: int = 0
    http: str = "http1"
    # Set when a run sweeps workers or HTTP versions: the label then names them.
    variant: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    latencies_ms: np.ndarray | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The target, with the worker count and HTTP version when the run varies them."""
        if not self.variant:
            return self.target
        return f"{self.target} w{self.workers} {self.http}"


def taskstream_command() -> list[str]:
    exe = shutil.which("taskstream")
    return [exe] if exe else [sys.executable, "-m", "server"]


def _server(
    ctx: Context, target: str, port: int, extra_env: dict[str, str] | None = None
) -> ServerProcess:
    cfg = ctx.cfg
    env = dict(os.environ)
    env.update(extra_env or {})
    env.update(
        DATABASE_URL=ctx.db.url,
        TASKSTREAM_JWT_SECRET=ctx.secret,
        TASKSTREAM_MAX_STREAMS="1000000",
        TASKSTREAM_MAX_STREAMS_PER_USER="1000000",
        TASKSTREAM_STREAM_TIMEOUT="3600",
        TASKSTREAM_HEARTBEAT=str(cfg.heartbeat),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    )
    log = ctx.out / "logs" / f"{ctx.run_index:02d}-{target}.log"
    if target == "baseline":
        # The same command from another source tree: its `server` package comes first.
        assert cfg.baseline is not None
        env["PYTHONPATH"] = os.pathsep.join([str(cfg.baseline), env["PYTHONPATH"]])
    if target in SERVERS:
        argv = [
            *(taskstream_command() if target == "taskstream" else [sys.executable, "-m", "server"]),
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(cfg.server_workers),
        ]
    else:
        argv = [
            sys.executable,
            "-m",
            "hypercorn",
            "bench.polling_app:app",
            "--bind",
            f"{HOST}:{port}",
            "--workers",
            str(cfg.server_workers),
            "--worker-class",
            "uvloop",
            "--backlog",
            "4096",
        ]
    # `python -m` puts the working directory first on sys.path: the baseline runs from its tree.
    return ServerProcess(
        target, argv, env, port, log, cwd=cfg.baseline if target == "baseline" else None
    )


def listen_overflows() -> float:
    """Kernel count of connections dropped because a listen (accept) queue was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0.0
    heads = [ln.split() for ln in lines if ln.startswith("TcpExt:")]
    if len(heads) < 2:
        return 0.0
    row = dict(zip(heads[0], heads[1], strict=False))
    return float(row.get("ListenOverflows", 0))


class Meter:
    """CPU of the server tree, PostgreSQL and the load generator; DB transactions."""

    def __init__(self, ctx: Context, server: ServerProcess, loadgen: LoadGen) -> None:
        self.ctx = ctx
        self.server = ProcTree(server.pid)
        self.pg = ProcTree(ctx.db.postmaster_pid) if ctx.db.postmaster_pid else None
        self.clients = [ProcTree(pid) for pid in loadgen.pids]

    async def snap(self) -> dict[str, float]:
        s = self.server.sample()
        counters = await self.ctx.db.counters()
        return {
            "t": time.time(),
            "server_cpu": s.cpu,
            "server_rss": float(s.rss),
            "pg_cpu": self.pg.sample().cpu if self.pg else 0.0,
            "client_cpu": sum(c.sample().cpu for c in self.clients),
            "xacts": float(counters.xacts),
            "scans": float(counters.task_scans),
            "listen_overflows": listen_overflows(),
            "statements": float(counters.statements) if counters.statements is not None else -1.0,
        }

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float], writer_txns: int = 0) -> dict[str, float]:
        secs = max(b["t"] - a["t"], 1e-9)
        # Each writer UPDATE is one transaction and one index scan; the rest is the server's.
        server_xacts = b["xacts"] - a["xacts"] - writer_txns
        server_scans = b["scans"] - a["scans"] - writer_txns
        out = {
            "window_s": secs,
            "server_cpu_s": b["server_cpu"] - a["server_cpu"],
            "pg_cpu_s": b["pg_cpu"] - a["pg_cpu"],
            "client_cpu_s": b["client_cpu"] - a["client_cpu"],
            "server_cpu_pct": 100 * (b["server_cpu"] - a["server_cpu"]) / secs,
            "pg_cpu_pct": 100 * (b["pg_cpu"] - a["pg_cpu"]) / secs,
            "client_cpu_pct": 100 * (b["client_cpu"] - a["client_cpu"]) / secs,
            "db_xact_per_s": max(server_xacts, 0.0) / secs,
            "db_queries_per_s": max(server_scans, 0.0) / secs,
            "server_rss_mb": b["server_rss"] / 2**20,
            "listen_overflows": b["listen_overflows"] - a["listen_overflows"],
        }
        if a["statements"] >= 0 and b["statements"] >= 0:
            out["db_statements_per_s"] = (b["statements"] - a["statements"]) / secs
        return out


def _latency(stamps: array[float], lat: array[float], t0: float, t1: float) -> np.ndarray:
    s = np.frombuffer(stamps, dtype=np.float64) if len(stamps) else np.empty(0)
    v = np.frombuffer(lat, dtype=np.float64) if len(lat) else np.empty(0)
    keep = (s >= t0) & (s <= t1)
    return v[keep] * 1000.0


def summarize_ms(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"samples": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "samples": int(values.size),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(values.max()),
        "mean_ms": float(values.mean()),
    }


def _connect_metrics(c: dict[str, Any]) -> dict[str, float]:
    span = c["last_ready"] - c["first_start"] if c["ready"] else 0.0
    return {
        "connected": c["ready"],
        "connect_failed": c["failed"],
        "connect_s": span,
        "connect_per_s": c["ready"] / span if span > 0 else 0.0,
    }


class Run:
    """The plumbing every scenario shares: server, load generator, writer, meters."""

    def __init__(self, ctx: Context, scenario: str, target: str) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.scenario = scenario
        self.target = target
        self.server: ServerProcess | None = None
        self.loadgen: LoadGen | None = None
        self.writer = Writer(ctx.db.url, ctx.cfg.writer_connections, ctx.cfg.synchronous_commit)
        self.meter: Meter | None = None
        # Extra environment of the server process (update_rate turns write batching off).
        self.server_env: dict[str, str] = {}

    async def start(self, assignments: list[tuple[str, str]], *, groups: bool = False) -> None:
        cfg = self.cfg
        tasks = sorted(set(assignments))
        await self.ctx.db.reset_tasks(tasks, groups=groups)
        self.server = _server(self.ctx, self.target, free_port(), self.server_env)
        ready = "ready" if self.target in SERVERS else None
        await self.server.start(ready, cfg.server_workers)
        procs = cfg.procs_for(len(assignments))
        # A fresh /24 per run: no TIME_WAIT left by an earlier run can collide.
        net = self.ctx.run_index % 250 + 1
        jobs = [
            WorkerJob(
                HOST,
                self.server.port,
                f"127.0.{net}.{2 + w}",
                self.ctx.secret,
                assignments[w::procs],
                group_streams=groups,
                http2=cfg.http == "h2c",
            )
            for w in range(procs)
        ]
        self.loadgen = LoadGen(jobs)
        await self.loadgen.start()
        await self.writer.open()
        self.meter = Meter(self.ctx, self.server, self.loadgen)

    @property
    def lg(self) -> LoadGen:
        assert self.loadgen is not None
        return self.loadgen

    @property
    def m(self) -> Meter:
        assert self.meter is not None
        return self.meter

    async def stop(self) -> int | None:
        code = None
        if self.loadgen is not None:
            await self.loadgen.close()
        await self.writer.close()
        if self.server is not None:
            code = await self.server.stop()
        return code

    def connect_timeout(self, n: int) -> float:
        return 60.0 + n / 200.0

    def grace(self) -> float:
        # Polling needs up to one interval (plus queueing) to see the last change.
        return 0.5 if self.target in SERVERS else 2.5


def _check_terminals(res: RunResult, fin: dict[str, Any]) -> None:
    m = res.metrics
    m["terminal_received"] = fin["completed"]
    m["terminal_expected"] = fin["streams"]
    m["terminal_wrong_state"] = fin["bad_terminal"]
    m["streams_lost"] = fin["lost"]
    m["connect_failed_total"] = fin["failed"]
    m["error_events"] = fin["error_events"]
    m["out_of_order"] = fin["out_of_order"]
    m["status_codes"] = {str(k): v for k, v in fin["status_codes"].items()}
    if fin["completed"] != fin["streams"]:
        res.problems.append(
            f"terminal events: {fin['completed']} of {fin['streams']} "
            f"(lost {fin['lost']}, connect failures {fin['failed']}, codes {fin['status_codes']})"
        )
    if fin["bad_terminal"]:
        res.problems.append(f"{fin['bad_terminal']} terminal events had the wrong state")
    if fin["out_of_order"]:
        res.problems.append(f"{fin['out_of_order']} progress events with a non-increasing id")


async def _finish(run: Run, res: RunResult, task_ids: list[str]) -> dict[str, Any]:
    await run.writer.finish(task_ids)
    fin = await run.lg.finish(30.0 + len(task_ids) / 500.0)
    _check_terminals(res, fin)
    return fin


def _many(n: int, users: int) -> list[tuple[str, str]]:
    return [(f"t{i}", f"u{i % users}") for i in range(n)]


async def many_tasks(run: Run, res: RunResult) -> None:
    await _many_streams(run, res, groups=False)


async def group_stream(run: Run, res: RunResult) -> None:
    """many_tasks with every stream on a group stream instead (each task in a group of its own):
    the same tasks, rate and streams, through the group path (group index, group resume id,
    no direct write)."""
    await _many_streams(run, res, groups=True)


async def _many_streams(run: Run, res: RunResult, *, groups: bool) -> None:
    cfg = run.cfg
    n = res.streams
    assignments = _many(n, cfg.users)
    task_ids = [t for t, _ in assignments]
    await run.start(assignments, groups=groups)
    rss0 = run.m.server.sample().rss
    c = await run.lg.connect(n, cfg.connect_concurrency, run.connect_timeout(n))
    res.metrics.update(_connect_metrics(c))
    await asyncio.sleep(1.0)
    rss1 = run.m.server.sample().rss
    res.metrics["rss_per_stream_kb"] = (rss1 - rss0) / max(c["open"], 1) / 1024
    res.metrics["server_rss_mb_idle"] = rss0 / 2**20
    a = await run.m.snap()
    async with Profiler.maybe(run, run.scenario, cfg.duration):
        ws = await run.writer.run(cfg.rate, cfg.duration, task_ids)
        b = await run.m.snap()
    res.metrics.update(Meter.delta(a, b, ws.updates + ws.errors))
    res.metrics.update(ws.rtt_ms())
    res.metrics.update(
        target_rate=cfg.rate,
        writes=ws.updates,
        write_errors=ws.errors,
        achieved_rate=ws.achieved_rate,
        writer_max_lag_ms=ws.max_lag * 1000,
    )
    await asyncio.sleep(run.grace())
    fin = await _finish(run, res, task_ids)
    lat = _latency(fin["stamps"], fin["lat"], ws.t_start - 0.01, ws.t_end)
    res.latencies_ms = lat
    res.metrics.update(summarize_ms(lat))
    res.metrics["delivered"] = fin["updates"]
    res.metrics["expected"] = ws.updates + n


async def fanout(run: Run, res: RunResult) -> None:
    cfg = run.cfg
    n = res.streams
    await run.start([("fan", "u0")] * n)
    c = await run.lg.connect(n, cfg.connect_concurrency, run.connect_timeout(n))
    res.metrics.update(_connect_metrics(c))
    a = await run.m.snap()
    async with Profiler.maybe(run, "fanout", cfg.duration):
        ws = await run.writer.run(1.0 / cfg.fanout_interval, cfg.duration, ["fan"])
        await asyncio.sleep(run.grace())
        b = await run.m.snap()
    res.metrics.update(Meter.delta(a, b, ws.updates + ws.errors))
    res.metrics.update(writes=ws.updates, update_interval_s=cfg.fanout_interval)
    fin = await _finish(run, res, ["fan"])
    lat = _latency(fin["stamps"], fin["lat"], ws.t_start - 0.01, ws.t_end)
    res.latencies_ms = lat
    res.metrics.update(summarize_ms(lat))
    # How long until one update had reached every watcher (the slowest watcher), worst update.
    s = np.frombuffer(fin["stamps"], dtype=np.float64)
    v = np.frombuffer(fin["lat"], dtype=np.float64)
    keep = (s >= ws.t_start - 0.01) & (s <= ws.t_end)
    if keep.any():
        order = np.argsort(s[keep], kind="stable")
        ss, vv = s[keep][order], v[keep][order]
        _, starts = np.unique(ss, return_index=True)
        res.metrics["all_watchers_reached_ms"] = float(np.maximum.reduceat(vv, starts).max() * 1000)
        ends = [*starts[1:], vv.size]
        res.steps = [
            {
                "update_at": float(ss[i]),
                "watchers": int(j - i),
                "min_ms": float(vv[i:j].min() * 1000),
                "p50_ms": float(np.percentile(vv[i:j], 50) * 1000),
                "max_ms": float(vv[i:j].max() * 1000),
            }
            for i, j in zip(starts, ends, strict=True)
        ]
    res.metrics["delivered"] = fin["updates"]
    res.metrics["expected"] = n * (ws.updates + 1)


async def connect_storm(run: Run, res: RunResult) -> None:
    n = res.streams
    assignments = _many(n, run.cfg.users)
    await run.start(assignments)
    a = await run.m.snap()
    # Everything at once: every stream is started without a limit on connects in flight.
    async with Profiler.maybe(run, "connect_storm", 10.0):
        c = await run.lg.connect(n, n, run.connect_timeout(n))
    b = await run.m.snap()
    res.metrics.update(_connect_metrics(c))
    res.metrics.update(Meter.delta(a, b))
    _, _, conn_lat = await run.lg.drain()
    cl = np.frombuffer(conn_lat, dtype=np.float64) * 1000 if len(conn_lat) else np.empty(0)
    res.latencies_ms = cl
    res.metrics.update({f"connect_{k}": v for k, v in summarize_ms(cl).items()})
    fin = await _finish(run, res, [t for t, _ in assignments])
    res.metrics["delivered"] = fin["updates"]
    res.metrics["expected"] = n


STATS_SETTLE_S = 11.0


async def idle(run: Run, res: RunResult) -> None:
    cfg = run.cfg
    n = res.streams
    assignments = _many(n, cfg.users)
    await run.start(assignments)

    async def point(open_streams: int) -> None:
        a = await run.m.snap()
        await asyncio.sleep(cfg.ramp_hold)
        b = await run.m.snap()
        d = Meter.delta(a, b)
        res.curve.append({"open": open_streams, **d})

    await point(0)
    opened = 0
    for k in range(1, cfg.ramp_steps + 1):
        want = n * k // cfg.ramp_steps - opened
        c = await run.lg.connect(want, cfg.connect_concurrency, run.connect_timeout(want))
        opened += want
        if k == 1:
            res.metrics.update(_connect_metrics(c))
        await asyncio.sleep(1.0)
        await point(c["open"])
    rss_open = res.curve[-1]["server_rss_mb"] - res.curve[0]["server_rss_mb"]
    res.metrics["rss_per_stream_kb"] = rss_open * 1024 / max(res.curve[-1]["open"], 1)
    res.metrics["open_streams"] = res.curve[-1]["open"]
    # PostgreSQL (15+) backends publish their table statistics late: a backend that flushed less
    # than a second ago defers the next flush by PGSTAT_IDLE_INTERVAL (10 s) once idle. Without
    # this wait, the initial-state reads of the ramp (all done before the window, as a
    # log_statement=all run showed) were counted as about 10 queries/s of idle cost.
    await asyncio.sleep(STATS_SETTLE_S)
    a = await run.m.snap()
    async with Profiler.maybe(run, "idle", cfg.idle_seconds):
        await asyncio.sleep(cfg.idle_seconds)
    b = await run.m.snap()
    res.metrics.update(Meter.delta(a, b))
    st = await run.lg.stats()
    res.metrics["still_open_after_idle"] = st["open"]
    fin = await _finish(run, res, [t for t, _ in assignments])
    res.metrics["delivered"] = fin["updates"]
    res.metrics["expected"] = n


async def max_rate(run: Run, res: RunResult) -> None:
    cfg = run.cfg
    n = res.streams
    assignments = _many(n, cfg.users)
    task_ids = [t for t, _ in assignments]
    await run.start(assignments)
    c = await run.lg.connect(n, cfg.connect_concurrency, run.connect_timeout(n))
    res.metrics.update(_connect_metrics(c))
    await run.lg.drain()
    passed: float | None = None
    stop_reason = "all steps passed"
    samples: list[np.ndarray] = []
    for rate in cfg.max_rate_steps:
        a = await run.m.snap()
        async with Profiler.maybe(run, f"max_rate_{int(rate)}", cfg.max_rate_step_seconds):
            ws = await run.writer.run(rate, cfg.max_rate_step_seconds, task_ids)
            b = await run.m.snap()
        await asyncio.sleep(run.grace())
        stamps, lat_all, _ = await run.lg.drain()
        lat = _latency(stamps, lat_all, ws.t_start - 0.01, ws.t_end)
        samples.append(lat)
        step = {"rate": rate, "achieved_rate": ws.achieved_rate, **summarize_ms(lat)}
        step.update(Meter.delta(a, b, ws.updates + ws.errors))
        step["writer_max_lag_ms"] = ws.max_lag * 1000
        step.update(ws.rtt_ms())
        res.steps.append(step)
        logger.info("max_rate %s %s: %s", run.target, rate, step)
        if ws.achieved_rate < 0.9 * rate:
            stop_reason = (
                f"writer reached only {ws.achieved_rate:.0f}/s of {rate:.0f}/s "
                f"(server {step['server_cpu_pct']:.0f}% CPU, PostgreSQL {step['pg_cpu_pct']:.0f}%, "
                f"load generator {step['client_cpu_pct']:.0f}% of 200%)"
            )
            break
        if step.get("p99_ms", 1e9) > cfg.max_rate_p99_ms:
            stop_reason = f"p99 {step.get('p99_ms', float('nan')):.1f} ms at {rate:.0f}/s"
            break
        passed = rate
    res.metrics["max_rate_p99_ok"] = passed or 0.0
    res.metrics["max_rate_stop"] = stop_reason
    if samples:
        res.latencies_ms = samples[-1]
        res.metrics.update(summarize_ms(samples[-1]))
    fin = await _finish(run, res, task_ids)
    res.metrics["delivered"] = fin["updates"]
    res.metrics["expected_terminal"] = n


# update_rate: how task updates reach PostgreSQL. (name, server environment, writer)
UPDATE_MODES: tuple[tuple[str, dict[str, str], str], ...] = (
    ("api_unbatched", {"TASKSTREAM_WRITE_BATCH": "false"}, "patch"),
    ("api_batched", {}, "patch"),
    ("api_bulk", {}, "bulk"),
    ("reporter", {}, "reporter"),
)


async def _update_rate_mode(
    ctx: Context, res: RunResult, mode: str, env: dict[str, str], how: str
) -> None:
    cfg = ctx.cfg
    run = Run(ctx, "update_rate", "taskstream")
    run.server_env = env
    n = res.streams
    assignments = _many(n, cfg.users)
    task_ids = [t for t, _ in assignments]
    passed = 0.0
    stop_reason = "all steps passed"
    writer: ApiWriter | ReporterWriter | None = None
    try:
        await run.start(assignments)
        assert run.server is not None
        if how == "reporter":
            writer = ReporterWriter(ctx.db.url, interval=cfg.reporter_interval)
        else:
            token = mint(ctx.secret, "bench-worker", scope="tasks:write")
            writer = ApiWriter(HOST, run.server.port, token, how)
            await writer.open()
        c = await run.lg.connect(n, cfg.connect_concurrency, run.connect_timeout(n))
        if c["ready"] < n:
            res.problems.append(f"{mode}: only {c['ready']} of {n} streams connected")
        await run.lg.drain()
        for rate in cfg.update_rate_steps:
            a = await run.m.snap()
            ws = await writer.run(rate, cfg.max_rate_step_seconds, task_ids)
            b = await run.m.snap()
            await asyncio.sleep(run.grace())
            stamps, lat_all, _ = await run.lg.drain()
            lat = _latency(stamps, lat_all, ws.t_start - 0.01, ws.t_end + 1.0)
            window = max(ws.t_end - ws.t_start, 1e-9)
            step: dict[str, Any] = {
                "mode": mode,
                "rate": rate,
                "achieved_rate": ws.achieved_rate,
                "write_errors": ws.errors,
                "delivered_per_s": lat.size / window,
                **summarize_ms(lat),
            }
            # Every write's transactions count here (no writer_txns): that is the point.
            step.update(Meter.delta(a, b))
            step["writer_max_lag_ms"] = ws.max_lag * 1000
            step.update(ws.rtt_ms())
            res.steps.append(step)
            logger.info("update_rate %s %s: %s", mode, rate, step)
            if ws.errors:
                res.problems.append(f"{mode}: {ws.errors} writes failed at {rate:.0f}/s")
            if ws.achieved_rate < 0.9 * rate:
                stop_reason = (
                    f"writer reached only {ws.achieved_rate:.0f}/s of {rate:.0f}/s "
                    f"(server {step['server_cpu_pct']:.0f}% CPU, PostgreSQL "
                    f"{step['pg_cpu_pct']:.0f}%, load generator {step['client_cpu_pct']:.0f}%, "
                    f"{step['db_xact_per_s']:.0f} transactions/s)"
                )
                break
            if step.get("p99_ms", 1e9) > cfg.max_rate_p99_ms:
                stop_reason = f"p99 {step.get('p99_ms', float('nan')):.1f} ms at {rate:.0f}/s"
                break
            passed = rate
        fin = await _finish(run, res, task_ids)
        res.metrics[f"{mode}_terminal"] = f"{fin['completed']}/{fin['streams']}"
    except Exception as exc:
        logger.exception("update_rate %s crashed", mode)
        res.problems.append(f"{mode} crashed: {type(exc).__name__}: {exc}")
    finally:
        if isinstance(writer, ApiWriter):
            await writer.close()
        code = await run.stop()
        if code not in (0, None):
            res.problems.append(f"{mode}: taskstream exited with code {code} on SIGTERM")
    res.metrics[f"{mode}_max_rate"] = passed
    res.metrics[f"{mode}_stop"] = stop_reason


async def update_rate(run: Run, res: RunResult) -> None:
    """Unbatched vs batched API writes vs the reporter, each at rising rates until p99
    commit-to-client latency passes the limit or the writer falls behind."""
    if run.target != "taskstream":
        return  # it compares ways of writing on this tree's server; nothing to compare against
    for mode, env, how in UPDATE_MODES:
        if mode not in run.cfg.update_modes:
            continue
        await _update_rate_mode(run.ctx, res, mode, env, how)
        run.ctx.run_index += 1
    res.metrics["delivered"] = int(sum(s["samples"] for s in res.steps if "samples" in s))


SCENARIO_FUNCS: dict[str, Callable[[Run, RunResult], Awaitable[None]]] = {
    "many_tasks": many_tasks,
    "group_stream": group_stream,
    "fanout": fanout,
    "connect_storm": connect_storm,
    "idle": idle,
    "max_rate": max_rate,
    "update_rate": update_rate,
}


async def run_scenario(ctx: Context, scenario: str, target: str) -> RunResult:
    """Run one scenario against one target; problems are recorded, not raised."""
    cfg = ctx.cfg
    streams = cfg.connections
    if scenario in ("max_rate", "update_rate"):
        streams = min(cfg.connections, cfg.max_rate_streams)
    res = RunResult(scenario, target, streams, workers=cfg.server_workers, http=cfg.http)
    res.variant = len(cfg.workers_sweep) > 1 or len(cfg.http_versions) > 1
    run = Run(ctx, scenario, target)
    t0 = time.monotonic()
    try:
        await SCENARIO_FUNCS[scenario](run, res)
    except Exception as exc:
        logger.exception("%s/%s crashed", scenario, target)
        res.problems.append(f"crashed: {type(exc).__name__}: {exc}")
    finally:
        code = await run.stop()
        res.metrics["server_exit_code"] = code
        res.metrics["run_seconds"] = time.monotonic() - t0
        if code not in (0, None) and target in SERVERS:
            res.problems.append(f"{target} exited with code {code} on SIGTERM")
    return res
