"""Release a connection as soon as its peer is gone: a workaround for Hypercorn's asyncio server.

Hypercorn (0.17, 0.18) serves each connection in ``TCPServer.run``: the read loop runs inside a
task group with the app's tasks and a keep-alive timer, and the socket is closed only once that
group is empty. Two of its tasks can outlive the peer:

1. **The keep-alive timer.** After a response the connection is idle, and a timer task waits
   ``keep_alive_timeout`` (75 s under ``taskstream serve``) for the next request. When the peer
   closes an idle connection, the read loop sees EOF (or a reset) and ends, but the group still
   waits for the timer, so the socket sits in CLOSE_WAIT holding a descriptor for the whole
   timeout. A client that connects, asks ``/healthz`` and closes, in a loop, used up a 256
   descriptor limit in 2 s and every new connection was refused for 75 s. A connection that
   closes before sending anything holds its descriptor the same way.
2. **The read loop.** A request pipelined behind a streaming response makes h11 answer
   ``PAUSED``, and the read loop waits for ``can_read``, which only a recycled connection sets.
   When the peer goes, the stream ends on its next write (Hypercorn treats the failed write as
   ``Closed``), but nothing wakes the read loop, and h11 would answer ``PAUSED`` again anyway
   (the pipelined bytes are still buffered and the peer's side is ``DONE``). The connection's task
   stays until shutdown, where Hypercorn waits ``graceful_timeout`` for it and the loop then
   destroys it with a traceback.

:class:`PromptCloseTCPServer` ends both. It runs the read loop as a task of its own and cancels it
once the connection is closed (Hypercorn sent ``Closed``, or a failed write left the transport
closing); once reading has ended, for any reason, nothing more can arrive, so the keep-alive
timer is stopped and never started again. The group then ends with the app's tasks and
Hypercorn's own close releases the socket.

This belongs in Hypercorn; until it is fixed there, :func:`install` puts the subclass where
``worker_serve`` looks the class up for each connection. It relies on private names
(:data:`REQUIRED`), checks them first and logs the result; with another shape it leaves Hypercorn
alone. ``tests/test_peerclose.py`` fails if the shape changes or the behaviour is lost.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from importlib import metadata

import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import AsyncioSingleTask
from hypercorn.events import Closed, Event, Updated

__all__ = ["REQUIRED", "PromptCloseTCPServer", "install", "shape_problems"]

logger = logging.getLogger(__name__)

# The TCPServer members this subclass uses or overrides, with the parameters they must take.
REQUIRED: dict[str, tuple[str, ...]] = {
    "run": ("self",),
    "_read_data": ("self",),
    "protocol_send": ("self", "event"),
    "_close": ("self",),
}
# Attributes set in TCPServer.__init__ (and ``protocol`` in ``run``) that the subclass reads.
REQUIRED_ATTRIBUTES = ("idle_task", "writer", "loop")


def shape_problems() -> list[str]:
    """What differs from the Hypercorn internals this module relies on (empty when all match)."""
    problems: list[str] = []
    if getattr(hypercorn_run, "TCPServer", None) not in (TCPServer, PromptCloseTCPServer):
        problems.append("hypercorn.asyncio.run.TCPServer is not tcp_server.TCPServer")
    for name, params in REQUIRED.items():
        member = getattr(TCPServer, name, None)
        if member is None or not inspect.iscoroutinefunction(member):
            problems.append(f"TCPServer.{name} is not a coroutine function")
        elif tuple(inspect.signature(member).parameters) != params:
            problems.append(f"TCPServer.{name} does not take {params}")
    try:
        init_source = inspect.getsource(TCPServer.__init__)
        run_source = inspect.getsource(TCPServer.run)
    except (OSError, TypeError):
        return [*problems, "Hypercorn's source is not installed, so its shape cannot be checked"]
    problems.extend(
        f"TCPServer.__init__ does not set self.{attribute}"
        for attribute in REQUIRED_ATTRIBUTES
        if f"self.{attribute} =" not in init_source
    )
    if "self.protocol = ProtocolWrapper(" not in run_source:
        problems.append("TCPServer.run does not set self.protocol")
    if "self.idle_task = AsyncioSingleTask()" not in init_source or not (
        inspect.iscoroutinefunction(getattr(AsyncioSingleTask, "stop", None))
    ):
        problems.append("the keep-alive timer is not an AsyncioSingleTask with stop()")
    return problems


class PromptCloseTCPServer(TCPServer):
    """Hypercorn's TCPServer, closing the socket when the peer has gone (see the module doc)."""

    _reading: asyncio.Task[None] | None = None
    _read_done = False

    async def _read_data(self) -> None:
        reading = self.loop.create_task(super()._read_data())
        self._reading = reading
        try:
            await asyncio.wait({reading})
        finally:
            # Our own cancellation (shutdown) must stop the reader too.
            if not reading.done():
                reading.cancel()
                await asyncio.wait({reading})
        self._read_done = True
        if reading.cancelled():
            # Cut off mid-way: let the protocol close its streams as the loop's end would have
            # (idempotent: a closed stream is not closed twice).
            await self.protocol.handle(Closed())
        else:
            reading.result()  # an error the read loop did not handle propagates as before
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated) and event.idle and self._read_done:
            # Idle with nothing left to read: no reason to keep the socket for the keep-alive.
            await self._close()
            return
        await super().protocol_send(event)
        if isinstance(event, Closed) or self.writer.is_closing():
            self._stop_reading()

    def _stop_reading(self) -> None:
        reading = self._reading
        # Not from inside the read loop itself: it is running, so it is not stuck, and it ends
        # by itself once the closed transport reports EOF.
        if reading is not None and not reading.done() and reading is not asyncio.current_task():
            reading.cancel()


def install() -> bool:
    """Make Hypercorn's asyncio worker serve connections with :class:`PromptCloseTCPServer`.

    Idempotent. False (and a warning) when the installed Hypercorn does not have the expected
    shape; then connections behave as in plain Hypercorn.
    """
    version = _hypercorn_version()
    problems = shape_problems()
    if problems:
        logger.warning(
            "hypercorn %s: closed connections may hold their socket until the keep-alive "
            "timeout (server/peerclose.py not applied: %s)",
            version,
            "; ".join(problems),
        )
        return False
    if getattr(hypercorn_run, "TCPServer", None) is not PromptCloseTCPServer:
        # worker_serve looks this name up for every connection it accepts.
        setattr(hypercorn_run, "TCPServer", PromptCloseTCPServer)  # noqa: B010
        logger.info(
            "hypercorn %s: a connection's socket is released as soon as its peer closes "
            "(server/peerclose.py)",
            version,
        )
    return True


def _hypercorn_version() -> str:
    try:
        return metadata.version("hypercorn")
    except metadata.PackageNotFoundError:
        return "(unknown version)"
