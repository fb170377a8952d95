"""Run settings for the bench, and the ``--smoke`` preset."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = [
    "HTTP_VERSIONS",
    "SCENARIOS",
    "SERVERS",
    "TARGETS",
    "TASKSTREAM_ONLY",
    "BenchConfig",
    "smoke",
]

SCENARIOS = (
    "many_tasks",
    "group_stream",
    "fanout",
    "connect_storm",
    "idle",
    "max_rate",
    "update_rate",
)
# Scenarios the polling baseline has no counterpart for (update_rate compares ways of writing
# on taskstream alone).
TASKSTREAM_ONLY = frozenset({"group_stream", "update_rate"})
# "baseline" is taskstream served from another source tree (--baseline DIR), e.g. main's.
TARGETS = ("taskstream", "polling", "baseline")
SERVERS = ("taskstream", "baseline")
# How the load generator speaks: HTTP/1.1, or HTTP/2 in cleartext with prior knowledge.
HTTP_VERSIONS = ("http1", "h2c")

DEFAULT_RATES = (500, 1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000)
UPDATE_MODE_NAMES = ("api_unbatched", "api_batched", "api_bulk", "reporter")
UPDATE_RATES = (1000, 2000, 5000, 10000, 15000, 20000, 25000, 30000, 40000)


@dataclass(frozen=True)
class BenchConfig:
    """Everything one ``python -m bench run`` does."""

    connections: int = 2000
    rate: float = 500.0
    duration: float = 30.0
    scenarios: tuple[str, ...] = SCENARIOS
    targets: tuple[str, ...] = ("taskstream", "polling")
    # The source tree the "baseline" target serves from (a checkout of another commit).
    baseline: Path | None = None
    out: Path = field(default_factory=lambda: Path(__file__).resolve().parent / "results")
    database_url: str | None = None
    server_workers: int = 2
    # Run every scenario once per worker count (--workers 1,2,3); empty: server_workers only.
    workers_sweep: tuple[int, ...] = ()
    # Run every scenario once per HTTP version (--http http1,h2c); the one being run is `http`.
    http_versions: tuple[str, ...] = ("http1",)
    http: str = "http1"
    client_procs: int = 0  # 0: enough processes to stay well under the per-process fd limit
    users: int = 100
    connect_concurrency: int = 512
    idle_seconds: float = 60.0
    ramp_steps: int = 5
    ramp_hold: float = 2.0
    fanout_interval: float = 2.0
    max_rate_streams: int = 1000
    max_rate_steps: tuple[float, ...] = DEFAULT_RATES
    max_rate_step_seconds: float = 5.0
    max_rate_p99_ms: float = 50.0
    update_rate_steps: tuple[float, ...] = UPDATE_RATES
    update_modes: tuple[str, ...] = UPDATE_MODE_NAMES
    reporter_interval: float = 0.05
    writer_connections: int = 8
    synchronous_commit: str = "on"  # the writer's setting; "off" shortens the NOTIFY commit lock
    heartbeat: float = 15.0
    profile: bool = False
    keep_db: bool = False
    smoke: bool = False

    def procs_for(self, streams: int) -> int:
        if self.client_procs > 0:
            return self.client_procs
        # <= 9,000 streams per process: far below the 20,000 open files one process may hold.
        return max(2, math.ceil(streams / 9000))


def smoke(base: BenchConfig) -> BenchConfig:
    """300 streams, 10 s: every scenario, short; fails only on lost terminal events or crashes."""
    return replace(
        base,
        connections=300,
        rate=200.0,
        duration=10.0,
        idle_seconds=5.0,
        ramp_steps=3,
        ramp_hold=1.0,
        max_rate_streams=300,
        max_rate_steps=(200.0, 1000.0),
        max_rate_step_seconds=3.0,
        update_rate_steps=(300.0,),
        # Enough to catch a lost terminal event or a crash on both batched paths.
        update_modes=("api_batched", "reporter"),
        smoke=True,
    )
