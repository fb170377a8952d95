"""Table, JSON and PNG plots of one bench invocation."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.scenarios import RunResult

__all__ = ["group_side_by_side", "machine", "plots", "ratios", "table", "write_json"]


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


COLUMNS: list[tuple[str, str, int]] = [
    ("streams", "streams", 0),
    ("connect/s", "connect_per_s", 0),
    ("p50 ms", "p50_ms", 1),
    ("p95 ms", "p95_ms", 1),
    ("p99 ms", "p99_ms", 1),
    ("max ms", "max_ms", 1),
    ("delivered/expected", "_delivered", 0),
    ("terminal", "_terminal", 0),
    ("RSS KB/stream", "rss_per_stream_kb", 1),
    ("srv CPU s", "server_cpu_s", 1),
    ("PG CPU s", "pg_cpu_s", 1),
    ("DB q/s", "db_queries_per_s", 1),
    ("DB xact/s", "db_xact_per_s", 1),
]


def _row(r: RunResult) -> list[str]:
    m = dict(r.metrics)
    m["streams"] = r.streams
    if r.scenario == "connect_storm":
        for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            m[k] = m.get(f"connect_{k}")
    if "expected" in m:
        m["_delivered"] = f"{m.get('delivered', 0):,}/{m['expected']:,}"
    else:
        m["_delivered"] = f"{m.get('delivered', 0):,}/-"
    m["_terminal"] = f"{m.get('terminal_received', 0):,}/{m.get('terminal_expected', r.streams):,}"
    return [r.scenario, r.label] + [_fmt(m.get(key), d) for _, key, d in COLUMNS]


def update_rate_table(r: RunResult) -> str:
    """update_rate side by side: per rate and mode, updates/s written, events/s delivered, p99."""
    modes = list(dict.fromkeys(s["mode"] for s in r.steps))
    rates = sorted({s["rate"] for s in r.steps})
    cell = {(s["mode"], s["rate"]): s for s in r.steps}
    head = ["rate/s"] + modes
    rows = [head]
    for rate in rates:
        row = [f"{rate:,.0f}"]
        for mode in modes:
            s = cell.get((mode, rate))
            row.append(
                "-"
                if s is None
                else f"{s['achieved_rate']:,.0f} w {s['delivered_per_s']:,.0f} d "
                f"p99 {_fmt(s.get('p99_ms'))} xact {s.get('db_xact_per_s', 0):,.0f}"
            )
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "update rate (w: updates/s written, d: progress events/s delivered to clients, p99 ms "
        "commit to client, xact: database transactions/s):"
    ]
    for row in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    for mode in modes:
        lines.append(
            f"  {mode}: {_fmt(r.metrics.get(f'{mode}_max_rate'), 0)}/s with p99 <= 50 ms; "
            f"stopped: {r.metrics.get(f'{mode}_stop')}; terminal events "
            f"{r.metrics.get(f'{mode}_terminal', '-')}"
        )
    return "\n".join(lines)


def table(results: list[RunResult]) -> str:
    """A plain-text table, one row per scenario and target."""
    head = ["scenario", "target"] + [c for c, _, _ in COLUMNS]
    rows = [head] + [_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.rjust(w) if i > 1 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    extra = []
    for r in results:
        if r.scenario == "connect_storm":
            extra.append(
                f"{r.label} connect storm: latency columns are time to the initial event "
                f"(connect + auth + initial state); kernel listen-queue overflows: "
                f"{_fmt(r.metrics.get('listen_overflows'), 0)}"
            )
        if r.scenario == "max_rate":
            extra.append(
                f"{r.label} max rate with p99 <= 50 ms: "
                f"{_fmt(r.metrics.get('max_rate_p99_ok'), 0)}/s; "
                f"stopped: {r.metrics.get('max_rate_stop')}"
            )
        if r.scenario == "fanout" and "all_watchers_reached_ms" in r.metrics:
            extra.append(
                f"{r.label} fan-out: one update reached all {r.streams:,} watchers in "
                f"<= {r.metrics['all_watchers_reached_ms']:.1f} ms (worst update)"
            )
        if r.scenario == "idle":
            extra.append(
                f"{r.label} idle {r.metrics.get('window_s', 0):.0f}s with "
                f"{_fmt(r.metrics.get('open_streams'), 0)} streams: server "
                f"{_fmt(r.metrics.get('server_cpu_pct'))}% CPU, PostgreSQL "
                f"{_fmt(r.metrics.get('pg_cpu_pct'))}% CPU, "
                f"{_fmt(r.metrics.get('db_queries_per_s'))} DB queries/s "
                f"({_fmt(r.metrics.get('db_xact_per_s'))} transactions/s)"
            )
        if r.scenario == "update_rate":
            extra.append(update_rate_table(r))
        for p in r.problems:
            extra.append(f"PROBLEM {r.scenario}/{r.label}: {p}")
    for scenario, rat in ratios(results).items():
        parts = [f"{k} {v:,.1f}x" for k, v in rat.items()]
        extra.append(f"polling / taskstream, {scenario}: " + ", ".join(parts))
    return "\n".join(lines + [""] + extra)


def ratios(results: list[RunResult]) -> dict[str, dict[str, float]]:
    """polling / taskstream for latency, DB queries/s and CPU, per scenario."""
    by: dict[str, dict[str, RunResult]] = {}
    for r in results:
        by.setdefault(r.scenario, {})[r.label] = r
    out: dict[str, dict[str, float]] = {}
    keys = {
        "p50 latency": "p50_ms",
        "p99 latency": "p99_ms",
        "DB q/s": "db_queries_per_s",
        "server CPU": "server_cpu_s",
        "PostgreSQL CPU": "pg_cpu_s",
    }
    for scenario, pair in by.items():
        if "taskstream" not in pair or "polling" not in pair:
            continue
        ts, po = pair["taskstream"].metrics, pair["polling"].metrics
        rat = {}
        for label, key in keys.items():
            a, b = ts.get(key), po.get(key)
            if isinstance(a, float) and isinstance(b, float) and a > 0:
                rat[label] = b / a
            elif isinstance(b, float) and b > 0 and a is not None and a <= 0:
                rat[label] = math.inf
        if rat:
            out[scenario] = rat
    return out


def group_side_by_side(results: list[RunResult]) -> str:
    """The group stream beside the per-task stream at the same load (taskstream only): latency
    percentiles, server CPU and the group / per-task ratio (target: within 10 %)."""
    by = {r.scenario: r for r in results if r.target == "taskstream"}
    per_task, group = by.get("many_tasks"), by.get("group_stream")
    if per_task is None or group is None:
        return ""
    lines = [
        "group stream vs per-task stream, same tasks, streams and update rate:",
        f"  {'':12}{'per-task':>12}{'group':>12}{'group/per-task':>16}",
    ]
    for label, key in (
        ("p50 ms", "p50_ms"),
        ("p95 ms", "p95_ms"),
        ("p99 ms", "p99_ms"),
        ("max ms", "max_ms"),
        ("srv CPU s", "server_cpu_s"),
    ):
        a, b = per_task.metrics.get(key), group.metrics.get(key)
        ratio = f"{b / a:.2f}x" if isinstance(a, float) and isinstance(b, float) and a > 0 else "-"
        lines.append(f"  {label:12}{_fmt(a, 2):>12}{_fmt(b, 2):>12}{ratio:>16}")
    return "\n".join(lines)


def _cdf_points(values: np.ndarray, n: int = 201) -> list[list[float]]:
    if values.size == 0:
        return []
    q = np.linspace(0, 100, n)
    return [[float(p), float(v)] for p, v in zip(q, np.percentile(values, q), strict=True)]


def write_json(
    path: Path, cfg: dict[str, Any], meta: dict[str, Any], results: list[RunResult]
) -> None:
    doc = {
        "config": cfg,
        "meta": meta,
        "ratios_polling_over_taskstream": {
            s: {k: (v if math.isfinite(v) else "inf") for k, v in r.items()}
            for s, r in ratios(results).items()
        },
        "runs": [
            {
                "scenario": r.scenario,
                "target": r.target,
                "label": r.label,
                "workers": r.workers,
                "http": r.http,
                "streams": r.streams,
                "metrics": r.metrics,
                "problems": r.problems,
                "latency_cdf_ms": _cdf_points(r.latencies_ms) if r.latencies_ms is not None else [],
                "curve": r.curve,
                "steps": r.steps,
            }
            for r in results
        ],
    }
    path.write_text(json.dumps(doc, indent=2, default=str))


def plots(out: Path, results: list[RunResult]) -> list[Path]:
    """latency CDFs (taskstream vs polling) and RSS/CPU vs open connections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    colors = {"taskstream": "tab:blue", "polling": "tab:red", "baseline": "tab:gray"}
    lat_scen = [
        s
        for s in ("many_tasks", "fanout", "max_rate")
        if any(
            r.scenario == s and r.latencies_ms is not None and r.latencies_ms.size for r in results
        )
    ]
    if lat_scen:
        fig, axes = plt.subplots(
            1, len(lat_scen), figsize=(5.5 * len(lat_scen), 4.2), squeeze=False
        )
        for ax, s in zip(axes[0], lat_scen, strict=True):
            for r in results:
                if r.scenario != s or r.latencies_ms is None or not r.latencies_ms.size:
                    continue
                v = np.sort(np.clip(r.latencies_ms, 1e-3, None))
                y = np.arange(1, v.size + 1) / v.size
                label = f"{r.label} (p50 {np.percentile(v, 50):.1f} ms)"
                ax.plot(v, y, color=colors.get(r.target), label=label)
            ax.set_xscale("log")
            ax.set_xlabel("commit-to-receive latency (ms, log)")
            ax.set_ylabel("fraction of events")
            title = {
                "many_tasks": "many tasks",
                "fanout": "fan-out",
                "max_rate": "max rate (last step)",
            }[s]
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(loc="lower right", fontsize=8)
        fig.suptitle("Latency CDF: taskstream (NOTIFY push) vs 1-second polling")
        fig.tight_layout()
        p = out / "latency_cdf.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    curves = [r for r in results if r.curve]
    if curves:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
        for r in curves:
            x = [c["open"] for c in r.curve]
            base = r.curve[0]["server_rss_mb"]
            ax1.plot(
                x,
                [c["server_rss_mb"] - base for c in r.curve],
                "o-",
                color=colors.get(r.target),
                label=r.label,
            )
            ax2.plot(
                x,
                [c["server_cpu_pct"] for c in r.curve],
                "o-",
                color=colors.get(r.target),
                label=f"{r.label} server",
            )
            ax2.plot(
                x,
                [c["pg_cpu_pct"] for c in r.curve],
                "s--",
                color=colors.get(r.target),
                alpha=0.6,
                label=f"{r.label} PostgreSQL",
            )
            ax3.plot(
                x,
                [c["db_queries_per_s"] for c in r.curve],
                "o-",
                color=colors.get(r.target),
                label=r.label,
            )
        ax1.set_title("server RSS growth vs open streams")
        ax1.set_ylabel("MiB above 0 streams")
        ax2.set_title("CPU vs open streams (idle, no updates)")
        ax2.set_ylabel("% of one core")
        ax3.set_title("DB queries/s vs open streams (idle)")
        ax3.set_ylabel("queries/s (scans of taskstream.tasks)")
        for ax in (ax1, ax2, ax3):
            ax.set_xlabel("open streams")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "rss_cpu_vs_connections.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    steps = [r for r in results if r.steps and r.scenario == "max_rate"]
    if steps:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in steps:
            ax.plot(
                [s["rate"] for s in r.steps],
                [s.get("p99_ms", np.nan) for s in r.steps],
                "o-",
                color=colors.get(r.target),
                label=f"{r.label} p99",
            )
            ax.plot(
                [s["rate"] for s in r.steps],
                [s.get("p50_ms", np.nan) for s in r.steps],
                "s--",
                color=colors.get(r.target),
                alpha=0.6,
                label=f"{r.label} p50",
            )
        ax.axhline(50, color="gray", ls=":", label="50 ms")
        ax.set_yscale("log")
        ax.set_xlabel("target updates/s")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title("Latency vs update rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "latency_vs_rate.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    for r in results:
        if r.scenario == "update_rate" and r.steps:
            written.append(_update_rate_plot(plt, out, r))
    return written


def _update_rate_plot(plt: Any, out: Path, r: RunResult) -> Path:
    """update_rate: delivered events/s and p99 against the offered rate, one line per mode."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for mode in dict.fromkeys(s["mode"] for s in r.steps):
        mine = [s for s in r.steps if s["mode"] == mode]
        x = [s["rate"] for s in mine]
        ax1.plot(x, [s["delivered_per_s"] for s in mine], "o-", label=mode)
        ax2.plot(x, [s.get("p99_ms", np.nan) for s in mine], "o-", label=mode)
    top = max(s["rate"] for s in r.steps)
    ax1.plot([0, top], [0, top], color="gray", ls=":", label="offered")
    ax1.set_ylabel("progress events/s delivered to clients")
    ax1.set_title("Delivered vs offered task updates")
    ax2.axhline(50, color="gray", ls=":", label="50 ms")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 commit to client (ms, log)")
    ax2.set_title("p99 latency vs offered rate")
    for ax in (ax1, ax2):
        ax.set_xlabel("offered task updates/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "update_rate.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
