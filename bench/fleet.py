"""``python -m bench.fleet``: what a fleet of instances costs PostgreSQL, LISTEN vs the NATS bus.

For 1, 4, 16 and 50 instances it measures PostgreSQL's notifying-transaction ceiling (pgbench,
single-row ``UPDATE``s of random tasks among 1,000 with the NOTIFY trigger, as fast as 4 clients
go) and PostgreSQL's CPU per update, once per mode:

- **listen**: every instance holds its own LISTEN connection (the server's ``PgListener``), as
  ``taskstream serve`` does without ``TASKSTREAM_NATS_URL``;
- **nats**: every instance runs the server's ``NatsBus`` against a real ``nats-server``; they
  elect one relay (advisory lock) that holds the one LISTEN connection, and each instance
  subscribes to its share of the tasks (as if a load balancer had spread the streams).

The instances are lightweight: several share one Python process (at most 4 processes), each
with its own connections, so PostgreSQL sees exactly what N server processes would show it. The
database is a fresh embedded PostgreSQL whose process tree is measured alone (the machine's
shared PostgreSQL would count other people's work). It runs with ``synchronous_commit = off``
by default so that the shared disk's flush time does not hide the notification cost; pass
``--synchronous-commit on`` for durable commits.

Figures vary with what else runs on the machine: the report prints the load average and the
machine's CPU use during each run. ``--smoke`` (1 and 4 instances, 3 s each) only proves the
machinery and fails on lost deliveries, never on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.database import BenchDatabase
from bench.procs import ProcTree, free_port
from bench.report import machine

__all__ = ["main"]

logger = logging.getLogger("bench.fleet")

TASKS = 1000
MAX_PROCS = 4
LISTENER_APP = "taskstream-listener"
# Every update adds one to its row's version: the sum counts updates exactly (the transaction
# counters also count each LISTEN connection's reads of the notification queue).
SUM_VERSIONS = "SELECT sum(version)::bigint FROM taskstream.tasks"


def _task_ids() -> list[str]:
    return [f"f{i}" for i in range(TASKS)]


# -- one instance process (several instances) ----------------------------------------------------


async def _instance_proc(args: argparse.Namespace) -> None:
    """Run ``args.count`` lightweight instances until stdin closes; print what each received.

    An instance is what PostgreSQL (or NATS) sees of a server process, and no more: in LISTEN
    mode one LISTEN connection on the channel, in NATS mode one NATS connection subscribed to
    its share of the tasks' subjects; each only counts what arrives (a real server would parse
    and dispatch it, which costs the instance, not the database). Process 0 of NATS mode also
    runs the server's own ``NatsBus``, whose election makes it the relay: the real relay code
    with its one LISTEN connection.
    """
    import nats

    from server.stream.bus import NatsBus
    from server.stream.listener import CHANNEL
    from server.stream.subjects import Subjects

    received = [0] * args.count
    drops = [0]
    closers: list[Any] = []

    async def on_error(exc: Exception) -> None:
        drops[0] += 1  # a slow consumer (or a lost connection): what a server would resync

    async def on_disconnect() -> None:
        drops[0] += 1

    relay: NatsBus | None = None

    async def no_resync(*_a: object, **_k: object) -> None:
        return None

    if args.mode == "nats" and args.first == 0:
        # A long liveness check: under this bench's overload a 5 s SELECT 1 can queue behind
        # the notification backlog and make the relay reconnect (a server then resyncs).
        relay = NatsBus(args.dsn, [args.nats], prefix="fleetbench", check_interval=30)
        await relay.start(lambda _state: None, no_resync)
    subjects = Subjects("fleetbench")
    for k in range(args.count):
        g = args.first + k  # this instance's place in the fleet

        if args.mode == "listen":
            conn = await asyncpg.connect(
                args.dsn, server_settings={"application_name": LISTENER_APP}
            )

            def on_notify(*_a: object, k: int = k) -> None:
                received[k] += 1

            await conn.add_listener(CHANNEL, on_notify)
            closers.append(conn.close)
        else:
            nc = await nats.connect(args.nats, error_cb=on_error, disconnected_cb=on_disconnect)

            async def on_msg(_msg: object, k: int = k) -> None:
                received[k] += 1

            for i in range(g, TASKS, args.fleet):  # its share of the tasks
                await nc.subscribe(subjects.task(f"f{i}"), cb=on_msg)
            await nc.flush()
            closers.append(nc.close)
    print("READY", flush=True)
    loop = asyncio.get_running_loop()

    def report() -> None:
        print(json.dumps({"received": received, "drops": drops[0]}), flush=True)

    # Commands on stdin: COUNT prints what arrived so far; STOP (or end of input) stops.
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "COUNT":
        report()
    drops_before_close = drops[0]
    for close in closers:
        await close()
    drops[0] = drops_before_close
    if relay is not None:
        await relay.stop()
    report()


# -- the parent -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    mode: str
    instances: int
    updates_per_s: float
    pg_cpu_us_per_update: float
    instances_cpu_us_per_update: float
    delivered: float  # received / expected (1.0: every change reached its instances)
    drops: int  # NATS slow-consumer drops (a server resyncs; this bench only counts them)
    machine_cpu_percent: float
    load_avg: float
    listen_connections: int


class Fleet:
    def __init__(self, mode: str, n: int, dsn: str, nats_url: str, logdir: Path) -> None:
        self.mode, self.n, self.dsn, self.nats_url, self.logdir = mode, n, dsn, nats_url, logdir
        self.procs: list[subprocess.Popen[str]] = []
        self.pin: set[int] | None = None

    async def start(self) -> None:
        nprocs = min(self.n, MAX_PROCS)
        per = [self.n // nprocs + (1 if i < self.n % nprocs else 0) for i in range(nprocs)]
        first = 0
        for i, count in enumerate(per):
            argv = [
                sys.executable, "-m", "bench.fleet", "_instances",
                "--mode", self.mode, "--dsn", self.dsn, "--nats", self.nats_url,
                "--first", str(first), "--count", str(count), "--fleet", str(self.n),
            ]  # fmt: skip
            err = open(self.logdir / f"{self.mode}-{self.n}-{i}.log", "w")  # noqa: SIM115, ASYNC230
            self.procs.append(
                subprocess.Popen(  # noqa: ASYNC220 - started once per run, before measuring
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
                )
            )
            err.close()
            if self.pin is not None:
                _pin(self.procs[-1].pid, self.pin)
            first += count
        for p in self.procs:
            assert p.stdout is not None
            line = await asyncio.to_thread(p.stdout.readline)
            if line.strip() != "READY":
                raise RuntimeError(f"an instance process did not start (see {self.logdir})")

    async def count(self) -> tuple[int, int]:
        """(changes received, slow-consumer drops) over every instance, now."""
        received = drops = 0
        for p in self.procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("COUNT\n")
            p.stdin.flush()
            data = json.loads(await asyncio.to_thread(p.stdout.readline))
            received += sum(data["received"])
            drops += data["drops"]
        return received, drops

    async def stop(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
            await asyncio.to_thread(p.wait, 30)
        self.procs = []

    def kill(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.kill()
                p.wait(5)
        self.procs = []

    def cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = psutil.Process(p.pid).cpu_times()
                total += t.user + t.system
        return total


async def _wait_listeners(conn: asyncpg.Connection, want: int, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while True:
        n = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", LISTENER_APP
        )
        if n == want:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected {want} LISTEN connections, found {n}")
        await asyncio.sleep(0.1)


async def _measure(
    db: BenchDatabase,
    mode: str,
    n: int,
    nats_url: str,
    seconds: float,
    logdir: Path,
    pin: tuple[set[int], set[int]] | None,
) -> RunResult:
    dsn = db.url
    conn = await asyncpg.connect(dsn)
    fleet = Fleet(mode, n, dsn, nats_url, logdir)
    fleet.pin = pin[1] if pin else None
    try:
        await fleet.start()
        listeners = n if mode == "listen" else 1
        await _wait_listeners(conn, listeners)
        await asyncio.sleep(0.5)  # the relay's first epoch and the subscriptions settle
        v0 = await conn.fetchval(SUM_VERSIONS)
        script = logdir / "update.sql"
        script.write_text(
            "\\set id random(0, 999)\n"
            "UPDATE taskstream.tasks SET progress = CASE WHEN progress >= 99 THEN 1 "
            "ELSE progress + 1 END WHERE id = 'f' || :id;\n"
        )
        pgbench = await asyncio.create_subprocess_exec(
            shutil.which("pgbench") or "pgbench",
            "-n", "-c", "4", "-j", "2", "-M", "prepared", "-T", str(int(seconds) + 2),
            "-f", str(script), dsn,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert db.postmaster_pid is not None
        if pin:
            _pin(pgbench.pid, pin[0])
            _pin(db.postmaster_pid, pin[0], tree=True)
        tree = ProcTree(db.postmaster_pid)
        await asyncio.sleep(1.0)  # past pgbench's connects
        psutil.cpu_percent()
        a_pg, a_inst, a_t = tree.sample().cpu, fleet.cpu(), time.monotonic()
        a_v = await conn.fetchval(SUM_VERSIONS)
        await asyncio.sleep(seconds)
        b_v = await conn.fetchval(SUM_VERSIONS)
        b_pg, b_inst, b_t = tree.sample().cpu, fleet.cpu(), time.monotonic()
        busy = psutil.cpu_percent()
        load = os.getloadavg()[0]
        await pgbench.wait()
        total = await conn.fetchval(SUM_VERSIONS) - v0
        # Until the last changes have reached the instances (slow ones still have a backlog).
        expected = total * (n if mode == "listen" else 1)
        received, drops, still = 0, 0, 0
        for _ in range(1200):
            now, drops = await fleet.count()
            still = still + 1 if now == received else 0
            received = now
            if received >= expected or still >= 30:
                break
            await asyncio.sleep(0.1)
        await fleet.stop()
    finally:
        fleet.kill()
        await conn.close()
    updates = max(1, b_v - a_v)
    return RunResult(
        mode=mode,
        instances=n,
        updates_per_s=updates / (b_t - a_t),
        pg_cpu_us_per_update=(b_pg - a_pg) / updates * 1e6,
        instances_cpu_us_per_update=(b_inst - a_inst) / updates * 1e6,
        delivered=received / expected if expected else 1.0,
        drops=drops,
        machine_cpu_percent=busy,
        load_avg=load,
        listen_connections=listeners,
    )


def _cpus() -> tuple[set[int], set[int]]:
    """(PostgreSQL's and pgbench's cores, everything else's): on a small machine, instances that
    would run on other hosts in production must not take the database's CPU away."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(cores), set(cores)
    return {cores[0]}, set(cores[1:])


def _pin(pid: int, cpus: set[int], *, tree: bool = False) -> None:
    with contextlib.suppress(psutil.Error, OSError):
        proc = psutil.Process(pid)
        for p in [proc, *(proc.children(recursive=True) if tree else [])]:
            p.cpu_affinity(sorted(cpus))


def _nats_server(port: int, logdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    log = open(logdir / "nats-server.log", "wb")  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
    finally:
        log.close()


def _table(results: list[RunResult], ns: list[int]) -> str:
    by = {(r.mode, r.instances): r for r in results}
    head = (
        f"{'instances':>9} | {'LISTEN upd/s':>12} {'PG µs/upd':>9} {'LISTENs':>7} | "
        f"{'NATS upd/s':>10} {'PG µs/upd':>9} {'LISTENs':>7} | {'machine CPU %':>13}"
    )
    lines = [head, "-" * len(head)]
    for n in ns:
        row = f"{n:>9} |"
        busy = []
        for mode in ("listen", "nats"):
            r = by.get((mode, n))
            w = 12 if mode == "listen" else 10
            if r is None:
                row += f" {'-':>{w}} {'-':>9} {'-':>7} |"
                continue
            row += (
                f" {r.updates_per_s:>{w},.0f} {r.pg_cpu_us_per_update:>9,.0f} "
                f"{r.listen_connections:>7} |"
            )
            busy.append(f"{r.machine_cpu_percent:.0f}")
        lines.append(row + f" {'/'.join(busy):>13}")
    for mode in ("listen", "nats"):
        first, last = by.get((mode, ns[0])), by.get((mode, ns[-1]))
        if first and last:
            ceiling = (last.updates_per_s / first.updates_per_s - 1) * 100
            cpu = (last.pg_cpu_us_per_update / first.pg_cpu_us_per_update - 1) * 100
            lines.append(
                f"{mode}: {ns[0]} -> {ns[-1]} instances: ceiling {ceiling:+.0f} %, "
                f"PG CPU per update {cpu:+.0f} %"
            )
    return "\n".join(lines)


async def _run(args: argparse.Namespace) -> int:
    ns = [1, 4] if args.smoke else args.instances
    seconds = 3.0 if args.smoke else args.seconds
    modes = args.modes
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    logdir = Path(tempfile.mkdtemp(prefix="taskstream-fleet-"))
    db = await BenchDatabase.open(None)
    nats_proc = None
    results: list[RunResult] = []
    try:
        from server import db as server_db

        admin = await asyncpg.connect(db.admin_url)
        try:
            setting = "on" if args.synchronous_commit == "on" else "off"
            await admin.execute(
                f"ALTER DATABASE taskstream_bench SET synchronous_commit = {setting}"
            )
        finally:
            await admin.close()
        await server_db.migrate(db.url)
        await db.reset_tasks([(t, "bench") for t in _task_ids()])
        nats_port = free_port()
        nats_proc = _nats_server(nats_port, logdir)
        pin = _cpus() if args.pin else None
        if pin:
            _pin(db.postmaster_pid or 0, pin[0], tree=True)
            _pin(nats_proc.pid, pin[1])
        nats_url = f"nats://127.0.0.1:{nats_port}"
        await asyncio.sleep(0.3)
        load_before = os.getloadavg()
        print(f"machine: {machine()}; load average before: {load_before}", flush=True)
        for _ in range(args.repeat):
            for n in ns:
                for mode in modes:
                    r = await _measure(db, mode, n, nats_url, seconds, logdir, pin)
                    results.append(r)
                    print(
                        f"  {mode:6} {n:>3} instances: {r.updates_per_s:8,.0f} updates/s, "
                        f"PG {r.pg_cpu_us_per_update:6,.0f} µs/update, instances "
                        f"{r.instances_cpu_us_per_update:7,.0f} µs/update, delivered "
                        f"{r.delivered:.3f} (drops {r.drops}), machine CPU "
                        f"{r.machine_cpu_percent:.0f} %, load {r.load_avg:.2f}",
                        flush=True,
                    )
    finally:
        if nats_proc is not None:
            nats_proc.terminate()
            nats_proc.wait(10)
        await db.close()
    print()
    print(
        f"fleet cost (PostgreSQL {db.server_version}, synchronous_commit="
        f"{args.synchronous_commit}, pgbench 4 clients, {seconds:g} s per run, "
        f"{'pinned' if args.pin else 'not pinned'}; load average "
        f"before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}):"
    )
    print(_table(results[-len(ns) * len(modes) :], ns))
    (out / "fleet.json").write_text(
        json.dumps({"machine": machine(), "results": [asdict(r) for r in results]}, indent=2)
    )
    shutil.rmtree(logdir, ignore_errors=True)
    lost = [r for r in results if r.delivered < 0.999]
    if lost:
        print(f"FAILED: changes lost in {[(r.mode, r.instances) for r in lost]}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure the fleet cost")
    r.add_argument("--smoke", action="store_true", help="1 and 4 instances, 3 s each")
    r.add_argument(
        "--instances",
        type=lambda s: [int(x) for x in re.split(r"[, ]+", s) if x],
        default=[1, 4, 16, 50],
    )
    r.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    r.add_argument("--modes", type=lambda s: s.split(","), default=["listen", "nats"])
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--synchronous-commit", choices=["on", "off"], default="off")
    r.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="do not pin PostgreSQL and pgbench to the first core and the instances and "
        "nats-server to the others (pinning stands in for separate hosts)",
    )
    r.add_argument("--out", type=Path, default=Path("bench/results"))
    i = sub.add_parser("_instances", help=argparse.SUPPRESS)
    i.add_argument("--mode", choices=["listen", "nats"], required=True)
    i.add_argument("--dsn", required=True)
    i.add_argument("--nats", required=True)
    i.add_argument("--first", type=int, required=True)
    i.add_argument("--count", type=int, required=True)
    i.add_argument("--fleet", type=int, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "_instances":
        asyncio.run(_instance_proc(args))
        return 0
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
