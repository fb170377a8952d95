"""Prometheus metrics: the metric objects, thin hooks for the data path, and the exposition.

Under ``taskstream serve --workers N`` (N > 1) every worker is its own process with its own
counters, and a scrape reaches only one of them. The CLI therefore sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers start: prometheus-client then keeps each value
in a memory-mapped file per process, and :func:`render` merges them, so any worker answers
``/metrics`` for all of them. With one process the default registry is used (it also exports
process CPU and memory). prometheus-client picks its storage when it is first imported, so the
variable must be set before that, which the CLI does.

Gauges say how their per-process values combine: open streams and connected listeners are
summed over live processes; the notification queue usage is one cluster-wide number that every
process samples, so the largest recent sample is reported; open descriptors and their limit are
per process, so each live process's value is kept (with a ``pid`` label).
"""

from __future__ import annotations

import asyncio
import bisect
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

__all__ = [
    "BUS_CONNECTED",
    "BUS_DROPS",
    "BUS_MESSAGES",
    "BUS_PUBLISHED",
    "BUS_RECONNECTS",
    "BUS_RELAY",
    "BUS_RESYNCS",
    "BUS_SERVER",
    "BUS_SUBJECTS",
    "CONTENT_TYPE_LATEST",
    "EVENTS_CONFLATED",
    "EVENTS_SENT",
    "LISTENER_CONNECTED",
    "LISTENER_RECONNECTS",
    "MAX_FDS",
    "NOTIFICATIONS",
    "NOTIFY_QUEUE_USAGE",
    "OPEN_FDS",
    "PUSH_LATENCY",
    "STREAMS_OPEN",
    "STREAM_DURATION",
    "STREAM_ERRORS",
    "TALLY",
    "WRITE_BATCH_RETRIES",
    "WRITE_BATCH_SIZE",
    "GaugedEvent",
    "Tally",
    "render",
]

STREAMS_OPEN = Gauge(
    "taskstream_streams_open",
    "SSE streams open now.",
    multiprocess_mode="livesum",
)
STREAM_DURATION = Histogram(
    "taskstream_stream_duration_seconds",
    "How long SSE streams stayed open, observed when they close.",
    buckets=(0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600),
)
EVENTS_SENT = Counter(
    "taskstream_events_sent",
    "SSE events written to clients, by type (progress, complete, error, timeout, heartbeat, "
    "retry).",
    ["type"],
)
STREAM_ERRORS = Counter(
    "taskstream_stream_errors",
    "Streams refused or ended by an error, by reason (auth, not_found, limit, timeout, "
    "token_expired, send_timeout, unavailable).",
    ["reason"],
)
PUSH_LATENCY = Histogram(
    "taskstream_push_latency_seconds",
    "From the trigger's clock_timestamp() (the row change, just before COMMIT) to the event "
    "written to the client socket, for states that came from a notification.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
NOTIFICATIONS = Counter(
    "taskstream_notifications_received",
    "Notifications received on the LISTEN connection.",
)
EVENTS_CONFLATED = Counter(
    "taskstream_events_conflated",
    "Task states a slow client skipped because a newer one replaced them in its mailbox.",
)
LISTENER_RECONNECTS = Counter(
    "taskstream_listener_reconnects",
    "Times the LISTEN connection was lost and re-established.",
)
LISTENER_CONNECTED = Gauge(
    "taskstream_listener_connected",
    "1 while this process's LISTEN connection is up (summed over processes).",
    multiprocess_mode="livesum",
)
NOTIFY_QUEUE_USAGE = Gauge(
    "taskstream_notification_queue_usage",
    "pg_notification_queue_usage(): fraction of PostgreSQL's NOTIFY queue in use (sampled).",
    multiprocess_mode="livemax",
)
# The NATS fan-out bus (server/stream/bus.py, relay.py); all zero without TASKSTREAM_NATS_URL.
BUS_CONNECTED = Gauge(
    "taskstream_bus_connected",
    "1 while this process is connected to NATS (summed over processes).",
    multiprocess_mode="livesum",
)
BUS_SERVER = Gauge(
    "taskstream_bus_server",
    "1 for the NATS server this process is connected to now (label: its URL).",
    ["server"],
    multiprocess_mode="liveall",
)
BUS_RELAY = Gauge(
    "taskstream_bus_relay",
    "1 while this process is the fleet's relay, holding the one LISTEN connection (summed "
    "over processes; the fleet's total should be 1).",
    multiprocess_mode="livesum",
)
BUS_SUBJECTS = Gauge(
    "taskstream_bus_subjects",
    "NATS subjects this process subscribes to: one per watched task and per owner with an "
    "owner-wide stream.",
    multiprocess_mode="livesum",
)
BUS_MESSAGES = Counter(
    "taskstream_bus_messages_received",
    "Task changes received from NATS.",
)
BUS_PUBLISHED = Counter(
    "taskstream_bus_messages_published",
    "Task changes the relay published to NATS (one per subject: the task's and its owner's).",
)
BUS_RESYNCS = Counter(
    "taskstream_bus_resyncs",
    "Resyncs from PostgreSQL the bus asked for, by reason (epoch: a new relay; reconnect; "
    "interest: catch-up after subscribing; gap: a version was skipped; slow_consumer; relay: "
    "the relay's LISTEN was down; poll: while NATS is unreachable).",
    ["reason"],
)
BUS_DROPS = Counter(
    "taskstream_bus_drops",
    "Times NATS dropped messages for this process (slow consumer); each leads to a resync.",
)
BUS_RECONNECTS = Counter(
    "taskstream_bus_reconnects",
    "Times this process's NATS connection was lost and re-established.",
)
# Per process (a `pid` label under several workers): each worker has its own descriptors and limit.
OPEN_FDS = Gauge(
    "taskstream_open_fds",
    "File descriptors this process has open (sampled about once a second).",
    multiprocess_mode="liveall",
)
MAX_FDS = Gauge(
    "taskstream_max_fds",
    "This process's soft RLIMIT_NOFILE: at it, new connections are refused.",
    multiprocess_mode="liveall",
)
# Group commit of the task API's writes (server/writebatch.py): one observation per flush.
WRITE_BATCH_SIZE = Histogram(
    "taskstream_write_batch_size",
    "Task writes (create, PATCH, cancel, bulk items) committed per flush of the write batcher.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
WRITE_BATCH_RETRIES = Counter(
    "taskstream_write_batch_retries",
    "Write batches the database refused and that were retried one write at a time.",
)


class Tally:
    """The per-event metrics of the data path, counted in plain Python and flushed into
    prometheus-client about once a second (and before every scrape this process answers).

    One update watched by 10,000 streams means 10,000 ``events_sent`` increments and 10,000
    push-latency observations; through prometheus-client each is a lock and, under several
    workers, a write to a memory-mapped file, which the fan-out profile showed. Here each is an
    integer addition. A scrape that another worker answers may lag this one by up to a second.
    """

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.conflated = 0
        self._bounds = PUSH_LATENCY._upper_bounds  # ends with +Inf
        self.push_counts = [0] * len(self._bounds)
        self.push_sum = 0.0
        # Progress events written straight to the socket (server/stream/session.py, direct_write);
        # cumulative, not exported: tests read it to prove the direct path is taken.
        self.direct_writes = 0
        # Heartbeats written the same way by the loop's shared timer (direct_heartbeat).
        self.direct_heartbeats = 0

    def count_sent(self, kind: str, n: int = 1) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + n

    def observe_push(self, seconds: float) -> None:
        self.push_counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self.push_sum += seconds

    def flush(self) -> None:
        sent, self.sent = self.sent, {}
        for kind, n in sent.items():
            EVENTS_SENT.labels(kind).inc(n)
        if self.conflated:
            EVENTS_CONFLATED.inc(self.conflated)
            self.conflated = 0
        if any(self.push_counts):
            counts, self.push_counts = self.push_counts, [0] * len(self._bounds)
            # Histogram.observe() has no batch form; this adds to the same per-bucket values
            # it would (one bucket per observation, `le` is cumulative only on exposition).
            # tests/test_metrics_tally.py checks the result against observe() itself.
            PUSH_LATENCY._sum.inc(self.push_sum)
            self.push_sum = 0.0
            for bucket, n in zip(PUSH_LATENCY._buckets, counts, strict=True):
                if n:
                    bucket.inc(n)


TALLY = Tally()


class GaugedEvent(asyncio.Event):
    """An :class:`asyncio.Event` mirrored into a 0/1 gauge, so ``listener.connected`` needs no
    separate bookkeeping at each place that sets or clears it."""

    def __init__(self, gauge: Gauge) -> None:
        super().__init__()
        self._gauge = gauge
        gauge.set(0)

    def set(self) -> None:
        super().set()
        self._gauge.set(1)

    def clear(self) -> None:
        super().clear()
        self._gauge.set(0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render() -> bytes:
    """The exposition text: every worker's values in multiprocess mode, else this process's."""
    TALLY.flush()
    if multiprocess_dir() is not None:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
