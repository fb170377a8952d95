"""The ASGI connection a stream request runs in: the view and the body in the request's own task.

Quart runs every HTTP request as two tasks of its own (``ASGIHTTPConnection``): one for the
handler, one that reads the request body and watches for the disconnect, and a wait on both,
all inside the task the server already started for the request. For a stream that lives for
minutes, that is a task, a coroutine, a context and a wait's futures held for its whole life
(about 2 KB of every open stream, bench/heapprofile.py), only to run code that could run in
the server's task.

:class:`StreamHTTPConnection` runs the handler in the server's task and keeps one watcher task:
when the client disconnects, it cancels the handler there, exactly where Quart would have
cancelled its handler task, and the request ends as it did before. Other paths go through
Quart's own connection unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from quart.asgi import ASGIHTTPConnection

__all__ = ["StreamHTTPConnection"]


class StreamHTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection, with the handler run in the request's task under ``prefix``."""

    prefix = "/api/v1/sse/"

    async def __call__(self, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        if task is None or not self.scope["path"].startswith(self.prefix):
            await super().__call__(receive, send)
            return
        request = self._create_request_from_scope(send)
        watcher = asyncio.ensure_future(self._watch(request, receive, task))
        try:
            await self.handle_request(request, send)
            if watcher.done() and not watcher.cancelled() and task.cancelling():
                task.uncancel()  # the handler absorbed the watcher's cancel on its way out
        except asyncio.CancelledError:
            # The watcher's cancel, and only the watcher's: a cancel from elsewhere (shutdown)
            # goes on, as would a second one.
            if not watcher.done() or watcher.cancelled() or task.uncancel() > 0:
                raise
            error = watcher.exception()
            if error is not None:
                raise error from None
        finally:
            if not watcher.done():
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self, request: Any, receive: Any, handler: asyncio.Task[Any]) -> None:
        """Read the request until the client disconnects (or reading fails), then cancel the
        handler, which runs in ``handler``'s task."""
        try:
            await self.handle_messages(request, receive)
        finally:
            # Not when this watcher is cancelled itself (the handler ended first).
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                handler.cancel()
