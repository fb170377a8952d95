"""Disconnect stream clients whose socket accepts nothing for ``TASKSTREAM_SEND_TIMEOUT``.

A client that stops reading costs only its mailbox (one pending state per task, see
:class:`server.broker.Subscription`), but its connection would stay open for ever. This ASGI
middleware bounds every ``send`` of a stream response; when one stalls past the limit it aborts
the TCP connection (discarding what is buffered) and the stream's cleanup runs as for any
disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["SendTimedOut", "SendTimeoutMiddleware"]

logger = logging.getLogger(__name__)

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class SendTimedOut(Exception):
    """A stream's client accepted no data for the configured send timeout."""


def _abort_transport(send: Any) -> bool:
    """Find the connection's transport behind Hypercorn's ``send`` and abort it.

    Closing politely would wait for the stuck buffer to drain, which never happens. Hypercorn
    does not expose the transport, so walk the bound-method chain (stream -> protocol ->
    TCP server); if its shape ever changes, the stream still ends and only the socket lingers.
    """
    obj: Any = send
    for _ in range(8):
        owner = getattr(obj, "__self__", None)
        if owner is None:
            return False
        writer = getattr(owner, "writer", None)
        transport = getattr(writer, "transport", None)
        if transport is not None:
            transport.abort()
            return True
        obj = getattr(owner, "send", None)
    return False


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

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").startswith(self.prefix):
            await self.app(scope, receive, send)
            return

        async def timed_send(message: dict[str, Any]) -> None:
            try:
                async with asyncio.timeout(self.timeout):
                    await send(message)
            except TimeoutError:
                _abort_transport(send)
                raise SendTimedOut from None

        try:
            await self.app(scope, receive, timed_send)
        except SendTimedOut:
            logger.info("stream client accepted nothing for %.1f s; disconnected", self.timeout)
            if self.on_timeout is not None:
                self.on_timeout()
