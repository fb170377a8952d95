"""Per-stream observation: metrics and one log line when a stream opens and when it closes.

It wraps a stream's body from the outside, so the stream logic in :mod:`server.stream.routes`
stays about delivery. The producer counts the events it writes (it knows their kinds, so nothing
is parsed per chunk) and records why it ended in an :class:`Ending` where it ends; this wrapper
keeps the open-streams gauge, the duration and the close reason. A body closed before its end
means the client went away (or was cut off by the send timeout, which
:mod:`server.sendtimeout` counts).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from server import metrics

if TYPE_CHECKING:
    from server.tasks import TaskState

__all__ = ["CloseReason", "Ending", "observe_push", "observed"]

logger = logging.getLogger(__name__)


class CloseReason(enum.StrEnum):
    """Why a stream ended: the ``reason`` of its close log line and of the error metric."""

    COMPLETE = "complete"  # its (last) task reached a terminal state
    NOT_FOUND = "not_found"  # its (last) task is gone, or not the caller's
    TIMEOUT = "timeout"  # TASKSTREAM_STREAM_TIMEOUT
    TOKEN_EXPIRED = "token_expired"
    SHUTDOWN = "shutdown"  # the final retry: of a draining server
    ENDED = "ended"  # the body ended without saying why
    DISCONNECTED = "disconnected"  # the client went away (or the send timeout cut it off)


# Close reasons that are errors, as counted in taskstream_stream_errors_total.
_ERROR_REASONS = frozenset({CloseReason.NOT_FOUND, CloseReason.TIMEOUT, CloseReason.TOKEN_EXPIRED})


class Ending:
    """Set by a stream's body where it ends; read when the body has run to its end."""

    __slots__ = ("reason",)

    def __init__(self, reason: CloseReason = CloseReason.ENDED) -> None:
        self.reason = reason


async def observed(
    body: AsyncIterator[bytes], *, path: str, ending: Ending
) -> AsyncIterator[bytes]:
    """Yield ``body`` unchanged while keeping the stream metrics and logs."""
    started = time.monotonic()
    metrics.STREAMS_OPEN.inc()
    logger.info("stream open", extra={"event": "stream_open", "path": path})
    reason = CloseReason.DISCONNECTED
    try:
        async for chunk in body:
            yield chunk
        reason = ending.reason
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
                "reason": str(reason),
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
