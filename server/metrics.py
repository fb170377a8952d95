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
process samples, so the largest recent sample is reported.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

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
    "CONTENT_TYPE_LATEST",
    "EVENTS_CONFLATED",
    "EVENTS_SENT",
    "LISTENER_CONNECTED",
    "LISTENER_RECONNECTS",
    "NOTIFICATIONS",
    "NOTIFY_QUEUE_USAGE",
    "PUSH_LATENCY",
    "STREAMS_OPEN",
    "STREAM_DURATION",
    "STREAM_ERRORS",
    "GaugedEvent",
    "count_sent",
    "error_reason",
    "event_type",
    "split_events",
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

# Stream-ending error events, told apart by their (fixed, server-written) data.
_ERROR_REASONS = ((b"Token expired", "token_expired"), (b"Task not found", "not_found"))


_sent_by_type: dict[str, Any] = {}


def count_sent(kind: str) -> None:
    """``EVENTS_SENT.labels(kind).inc()``, with the labelled child cached: this runs once per
    event per client, on the fan-out path."""
    child = _sent_by_type.get(kind)
    if child is None:
        child = _sent_by_type[kind] = EVENTS_SENT.labels(kind)
    child.inc()


def split_events(chunk: bytes) -> list[bytes]:
    """The events in one written chunk (each :mod:`server.sse` event ends with a blank line)."""
    return [part + b"\n\n" for part in chunk.split(b"\n\n") if part]


def event_type(chunk: bytes) -> str:
    """The kind of one encoded SSE chunk, as :mod:`server.sse` writes it."""
    if chunk.startswith(b"event: "):
        return chunk[7 : chunk.index(b"\n")].decode("utf-8", "replace")
    if chunk.startswith(b":"):
        return "heartbeat"
    if chunk.startswith(b"retry:"):
        return "retry"
    return "message"


def error_reason(chunk: bytes) -> str:
    """Why a stream-ending ``error`` event was sent."""
    for marker, reason in _ERROR_REASONS:
        if marker in chunk:
            return reason
    return "error"


class GaugedEvent(asyncio.Event):
    """An :class:`asyncio.Event` mirrored into a 0/1 gauge, so ``broker.connected`` needs no
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
    if multiprocess_dir() is not None:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
