"""This process's file descriptors against its limit: gauges, ``/readyz`` and one log line per
episode of pressure.

Every connection costs a descriptor. At the soft ``RLIMIT_NOFILE`` the kernel refuses new ones:
accepting fails, connections wait in the listen backlog until the client gives up, and nothing in
Hypercorn says so. :class:`DescriptorWatch` samples the count (about once a second, and on every
``/readyz``), exports it, and calls the process *under pressure* from :data:`HIGH` of the limit
until it is back below :data:`LOW` (the gap keeps a count hovering at the line from flapping the
readiness check and the log).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource

from server import metrics

__all__ = [
    "HIGH",
    "LOW",
    "SAMPLE_INTERVAL",
    "WATCH",
    "DescriptorWatch",
    "open_count",
    "raise_soft_limit",
    "soft_limit",
]

logger = logging.getLogger(__name__)

HIGH = 0.9
LOW = 0.8
# Often enough to log pressure while a connection storm is still on; one sample is a stat of
# /proc/self/fd on Linux 6.2+.
SAMPLE_INTERVAL = 1.0

_FD_DIRS = ("/proc/self/fd", "/dev/fd")


def open_count() -> int | None:
    """Descriptors this process has open, or None where the platform does not tell."""
    for path in _FD_DIRS:
        try:
            # Linux 6.2+ reports the count as the directory's size: a stat instead of listing
            # 20,000 entries. Older kernels say 0 there, so count the entries.
            size = os.stat(path).st_size
            if size > 0 and path == "/proc/self/fd":
                return size
            # The listing opens one descriptor of its own, which it includes.
            return len(os.listdir(path)) - 1
        except OSError:
            continue
    return None


def soft_limit() -> int | None:
    """The soft ``RLIMIT_NOFILE``, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return (before, after).

    Every stream holds a descriptor, and many systems start processes at a soft limit of 1,024
    while allowing far more: without this, a worker refuses connections at about a thousand
    streams whatever memory it has left. Workers inherit the limit (it survives fork and exec).
    An unlimited hard limit is capped at the kernel's ``fs.nr_open``, the most setrlimit takes.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


class DescriptorWatch:
    """The descriptor count of this process, its gauges and its pressure state."""

    def __init__(self, high: float = HIGH, low: float = LOW) -> None:
        if not 0 < low <= high <= 1:
            raise ValueError(f"need 0 < low <= high <= 1 (got low={low}, high={high})")
        self.high = high
        self.low = low
        self.pressure = False
        self.open: int | None = None
        self.limit: int | None = None

    def sample(self) -> bool:
        """Count now, update the gauges and the pressure state; True while under pressure."""
        self.open, self.limit = open_count(), soft_limit()
        if self.open is None:
            return self.pressure
        metrics.OPEN_FDS.set(self.open)
        if self.limit is None:
            return self.pressure
        metrics.MAX_FDS.set(self.limit)
        used = self.open / self.limit
        if not self.pressure and used >= self.high:
            self.pressure = True
            logger.warning(
                "file descriptors near the limit: %d of %d open; new connections will be "
                "refused at the limit. Raise it (ulimit -n, systemd LimitNOFILE=) or add "
                "instances",
                self.open,
                self.limit,
                extra={"event": "fd_pressure", "open_fds": self.open, "max_fds": self.limit},
            )
        elif self.pressure and used < self.low:
            self.pressure = False
            logger.info(
                "file descriptors back below %d%% of the limit: %d of %d open",
                round(self.low * 100),
                self.open,
                self.limit,
                extra={"event": "fd_pressure_over", "open_fds": self.open, "max_fds": self.limit},
            )
        return self.pressure

    async def run(self, interval: float) -> None:
        """Sample every ``interval`` seconds (a background task of the runtime)."""
        while True:
            self.sample()
            await asyncio.sleep(interval)


# Descriptors belong to the process, so there is one watch per process (sampled by the runtime's
# background task, read by /readyz).
WATCH = DescriptorWatch()
