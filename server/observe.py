"""Per-stream observation: metrics and one log line when a stream opens and when it closes.

It wraps a stream's body from the outside, so the stream logic in :mod:`server.streams` stays
about delivery. The producer counts the events it writes (it knows their kinds, so nothing is
parsed per chunk); this wrapper keeps the open-streams gauge, the duration and the close reason,
read off the last event written. A body closed before its end means the client went away (or was
cut off by the send timeout, which :mod:`server.sendtimeout` counts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from server import metrics

if TYPE_CHECKING:
    from server.events import TaskState

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
            last = chunk
        # The last chunk may hold several events (the stream coalesces); the last one counts.
        reason = _close_reason(metrics.split_events(last)[-1] if last else b"")
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


def observe_push(states: Iterable[TaskState]) -> None:
    """Record commit-to-socket latency for states just written that came from a notification.

    ``committed_ts`` is the trigger's ``clock_timestamp()`` (PostgreSQL's clock, epoch seconds);
    states read from the table (snapshots, resyncs) have none and are not observed.
    """
    now = time.time()
    tally = metrics.TALLY
    for state in states:
        if state.committed_ts is not None:
            tally.observe_push(max(0.0, now - state.committed_ts))
