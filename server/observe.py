"""Per-stream observation: metrics and one log line when a stream opens and when it closes.

It wraps a stream's body from the outside, so the stream logic in :mod:`server.streams` stays
about delivery. Every chunk is counted *after* the server wrote it (Quart asks for the next chunk
only once ``send`` of the previous one returned), and the reason a stream ended is read off the
last event it wrote; a body closed before its end means the client went away (or was cut off by
the send timeout, which :mod:`server.sendtimeout` counts itself).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from server import metrics

__all__ = ["observe_push", "observed"]

logger = logging.getLogger(__name__)

# Close reasons that are errors, as counted in taskstream_stream_errors_total.
_ERROR_REASONS = frozenset({"not_found", "timeout", "token_expired"})


def _close_reason(last: bytes) -> str:
    kind = metrics.event_type(last)
    if kind == "complete":
        return "complete"
    if kind == "timeout":
        return "timeout"
    if kind == "error":
        return metrics.error_reason(last)
    if kind == "retry":
        return "shutdown"  # the final retry: of a draining server
    return "ended"


async def observed(body: AsyncIterator[bytes], *, path: str) -> AsyncIterator[bytes]:
    """Yield ``body`` unchanged while keeping the stream metrics and logs."""
    started = time.monotonic()
    metrics.STREAMS_OPEN.inc()
    logger.info("stream open", extra={"event": "stream_open", "path": path})
    last = b""
    reason = "disconnected"
    try:
        async for chunk in body:
            yield chunk
            metrics.EVENTS_SENT.labels(metrics.event_type(chunk)).inc()
            last = chunk
        reason = _close_reason(last)
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
        duration = time.monotonic() - started
        metrics.STREAMS_OPEN.dec()
        metrics.STREAM_DURATION.observe(duration)
        if reason in _ERROR_REASONS:
            metrics.STREAM_ERRORS.labels(reason).inc()
        logger.info(
            "stream closed",
            extra={
                "event": "stream_close",
                "path": path,
                "reason": reason,
                "duration_s": round(duration, 3),
            },
        )


def observe_push(committed_ts: float | None) -> None:
    """Record commit-to-socket latency for a state that came from a notification.

    ``committed_ts`` is the trigger's ``clock_timestamp()`` (PostgreSQL's clock, epoch seconds);
    states read from the table (snapshots, resyncs) have none and are not observed.
    """
    if committed_ts is not None:
        metrics.PUSH_LATENCY.observe(max(0.0, time.time() - committed_ts))
