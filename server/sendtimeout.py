"""Disconnect stream clients whose socket accepts nothing for ``TASKSTREAM_SEND_TIMEOUT``.

A client that stops reading costs only its mailbox (one pending state per task, see
:class:`server.stream.mailbox.Subscription`), but its connection would stay open for ever. This ASGI
middleware notes when each ``send`` of a stream response starts and ends; one watchdog per process
looks for sends stuck past the limit and aborts their TCP connection (discarding what is
buffered). Hypercorn then reports the disconnect and the stream's clean-up runs as for any other.

A watchdog, rather than a timer around every send, keeps the per-event cost to two attribute
writes: with thousands of streams receiving one notification, per-send timers showed up in the
profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from server import hypercorn_internals
from server.hypercorn_internals import Connection

__all__ = ["CONNECTION", "SendTimeoutMiddleware", "connection_of"]

# The scope key of the request's resolved connection (server/hypercorn_internals.py), or None.
CONNECTION = "taskstream.connection"

logger = logging.getLogger(__name__)


def connection_of(scope: Any) -> Connection | None:
    """The connection this middleware resolved for a stream request, if any."""
    connection: Connection | None = scope.get(CONNECTION)
    return connection


ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class _Sending:
    """One stream response: when its current send started (0.0 when none is in progress)."""

    __slots__ = ("aborted", "connection", "since")

    def __init__(self, connection: Connection | None) -> None:
        self.connection = connection
        self.since = 0.0
        self.aborted = False


class SendTimeoutMiddleware:
    """Wraps the app; applies to paths under ``prefix`` (the SSE routes)."""

    def __init__(
        self,
        app: ASGIApp,
        timeout: float,
        *,
        prefix: str = "/api/v1/sse/",
        on_timeout: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.prefix = prefix
        self.on_timeout = on_timeout
        self._active: set[_Sending] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch(), name="taskstream-send-watchdog")
        # Resolved once per request, for the abort below and the stream's direct fan-out write
        # (server/stream/session.py).
        connection = hypercorn_internals.resolve(send)
        entry = _Sending(connection)
        scope[CONNECTION] = connection

        async def tracked_send(message: Any) -> None:
            entry.since = loop.time()
            try:
                await send(message)
            finally:
                entry.since = 0.0

        self._active.add(entry)
        try:
            await self.app(scope, receive, tracked_send)
        finally:
            self._active.discard(entry)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for entry in list(self._active):
                if entry.since and not entry.aborted and now - entry.since > self.timeout:
                    entry.aborted = True
                    # Abort: closing politely would wait for the stuck buffer to drain.
                    if entry.connection is not None:
                        entry.connection.abort()
                        logger.info(
                            "stream client accepted nothing for %.1f s; disconnected", self.timeout
                        )
                    else:
                        logger.warning("could not abort a stuck stream connection")
                    if self.on_timeout is not None:
                        self.on_timeout()

    async def close(self) -> None:
        """Stop the watchdog (called at shutdown so no task outlives the server)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
