"""The one module that touches Hypercorn's and h11's internals (and the only one importing them).

Everything else in ``server/`` goes through the names exported here. Speed and resource
hygiene need three things Hypercorn does not expose:

1. **The connection behind an ASGI ``send``** (:func:`resolve`): the send-timeout watchdog
   (:mod:`server.sendtimeout`) must abort a connection whose buffer never drains, and the direct
   fan-out write (:mod:`server.stream.session`) writes already-framed HTTP/1.1 chunks to the
   transport of a response whose body h11 frames with chunked encoding. Both walk the
   bound-method chain Hypercorn builds (HTTP stream -> protocol -> protocol wrapper -> TCP server
   -> writer -> transport), resolved once per request.
2. **HTTP/1.1 chunk framing** (:func:`progress_chunk`), for that direct write.
3. **A TCPServer that lets go of a socket whose peer has gone** (:class:`PromptCloseTCPServer`).

These rely on private names, so the versions are pinned exactly in ``pyproject.toml``
(:data:`PINNED`, the versions the tests prove). :func:`check` looks at the shape once at start-up
and logs one warning naming what differs; then the direct write and the watchdog's abort stay
off quietly (streams write through Quart as before) and Hypercorn serves connections unchanged.
``tests/test_hypercorn_internals.py`` and ``tests/test_peerclose.py`` fail if the shape changes.

Why :class:`PromptCloseTCPServer`: Hypercorn (0.17, 0.18) serves each connection in
``TCPServer.run``: the read loop runs inside a task group with the app's tasks and a keep-alive
timer, and the socket is closed only once that group is empty. Two of its tasks can outlive
the peer:

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

This belongs in Hypercorn; until it is fixed there, :func:`install_peerclose` puts the subclass
where ``worker_serve`` looks the class up for each connection. It relies on private names
(:data:`PEERCLOSE_REQUIRED`), checks them first and logs the result; with another shape it leaves
Hypercorn alone. ``tests/test_peerclose.py`` fails if the shape changes or the behaviour is lost.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

import h11
import h11._connection as h11_connection
import h11._writers as h11_writers
import hypercorn.asyncio.run as hypercorn_run
import hypercorn.protocol as hypercorn_protocol
import hypercorn.protocol.h11 as hypercorn_h11
import hypercorn.protocol.http_stream as hypercorn_http_stream
from hypercorn.asyncio.run import worker_serve
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import AsyncioSingleTask
from hypercorn.config import Config
from hypercorn.events import Closed, Event, Updated
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.middleware import ProxyFixMiddleware
from hypercorn.utils import wrap_app

from server.tasks import TaskState

__all__ = [
    "PINNED",
    "Config",
    "Connection",
    "HypercornLogger",
    "PromptCloseTCPServer",
    "ProxyFixMiddleware",
    "check",
    "frame_chunk",
    "install_peerclose",
    "peerclose_problems",
    "progress_chunk",
    "resolve",
    "serve",
    "shape_problems",
]

logger = logging.getLogger(__name__)

# The versions whose internals this module was written against (pyproject.toml pins them).
PINNED = {"hypercorn": "0.18.0", "h11": "0.16.0"}

# Set by check(): whether the connection walk may be trusted. Off until the first check.
_shape_ok = False


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(unknown version)"


def _sets(cls: type, attribute: str) -> bool:
    """Whether ``cls.__init__`` assigns ``self.<attribute>`` (annotated or not)."""
    try:
        source = inspect.getsource(cls.__init__)  # type: ignore[misc]
    except (OSError, TypeError):
        return False
    return re.search(rf"self\.{attribute}\s*(:[^=\n]*)?=[^=]", source) is not None


def shape_problems() -> list[str]:
    """What differs from the internals :func:`resolve` walks (empty when all match)."""
    problems: list[str] = []
    stream = getattr(hypercorn_http_stream, "HTTPStream", None)
    protocol = getattr(hypercorn_h11, "H11Protocol", None)
    wrapper = getattr(hypercorn_protocol, "ProtocolWrapper", None)
    connection = getattr(h11_connection, "Connection", None)
    if stream is None or not inspect.iscoroutinefunction(getattr(stream, "app_send", None)):
        problems.append("HTTPStream.app_send (the ASGI send) is missing")
    elif not _sets(stream, "send"):
        problems.append("HTTPStream does not keep its protocol's send")
    if protocol is None or not (_sets(protocol, "send") and _sets(protocol, "connection")):
        problems.append("H11Protocol does not keep its send and its h11 connection")
    if wrapper is None or not _sets(wrapper, "send"):
        problems.append("ProtocolWrapper does not keep its send")
    if not _sets(TCPServer, "writer"):
        problems.append("TCPServer does not keep its writer")
    if connection is None or not _sets(connection, "_writer"):
        problems.append("h11.Connection does not keep its body writer in _writer")
    if not isinstance(getattr(h11_writers, "ChunkedWriter", None), type):
        problems.append("h11._writers.ChunkedWriter is missing")
    return problems


def check() -> bool:
    """Check once, at start-up, that the internals are shaped as expected; one warning if not.

    Until it passes, :func:`resolve` finds nothing: no direct write, and the send timeout
    cannot abort a stuck connection (it logs that when it happens).
    """
    global _shape_ok
    problems = shape_problems()
    _shape_ok = not problems
    if problems:
        logger.warning(
            "hypercorn %s / h11 %s (pinned: %s / %s): the direct stream write and the "
            "send-timeout abort are off: %s",
            _version("hypercorn"),
            _version("h11"),
            PINNED["hypercorn"],
            PINNED["h11"],
            "; ".join(problems),
            extra={"event": "server_internals_changed"},
        )
    return _shape_ok


class Connection:
    """What a stream needs of the connection behind one request's ASGI ``send``."""

    __slots__ = ("_h11", "transport")

    def __init__(self, transport: asyncio.WriteTransport, h11_conn: Any) -> None:
        self.transport = transport
        self._h11 = h11_conn

    def abort(self) -> None:
        """Drop the connection at once (closing politely would wait for a stuck buffer)."""
        self.transport.abort()

    def chunked_transport(self) -> asyncio.WriteTransport | None:
        """The transport, if the response has started and h11 frames its body as chunks.

        Only then may a caller write body bytes to the transport itself, framed as chunks
        (:func:`progress_chunk`): h11 keeps no count of a chunked body, so its own later writes
        (the next chunk, the final ``0``) stay valid. HTTP/2, HTTP/1.0 (close-delimited) and
        anything unrecognised get None.
        """
        if self._h11 is None or type(self._h11._writer) is not h11_writers.ChunkedWriter:
            return None
        return self.transport


def resolve(send: Any) -> Connection | None:
    """The connection behind Hypercorn's ``send``, or None (shape unknown, or not found)."""
    if not _shape_ok:
        return None
    transport: asyncio.WriteTransport | None = None
    h11_conn: Any = None
    obj: Any = send
    for _ in range(8):  # the chain is four deep today
        owner = getattr(obj, "__self__", None)
        if owner is None:
            break
        connection = getattr(owner, "connection", None)
        if h11_conn is None and isinstance(connection, h11.Connection):
            h11_conn = connection
        found = getattr(getattr(owner, "writer", None), "transport", None)
        if found is not None:
            transport = found
            break
        obj = getattr(owner, "send", None)
    if transport is None:
        return None
    return Connection(transport, h11_conn)


def frame_chunk(data: bytes) -> bytes:
    """``data`` framed as one HTTP/1.1 chunk (h11's ChunkedWriter frames the same way)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def progress_chunk(state: TaskState, event: bytes) -> bytes:
    """``event`` (the state's progress event) framed as one HTTP/1.1 chunk, cached on the state."""
    chunk = state.memo_chunk
    if chunk is None:
        chunk = state.memo_chunk = frame_chunk(event)
    return chunk


async def serve(
    app: Any,
    config: Config,
    *,
    sockets: Any,
    shutdown_trigger: Callable[[], Awaitable[None]],
) -> None:
    """Serve ``app`` (an ASGI app) on ``sockets`` in this process until ``shutdown_trigger``."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    await worker_serve(wrapped, config, sockets=sockets, shutdown_trigger=shutdown_trigger)


# The TCPServer members this subclass uses or overrides, with the parameters they must take.
PEERCLOSE_REQUIRED: dict[str, tuple[str, ...]] = {
    "run": ("self",),
    "_read_data": ("self",),
    "protocol_send": ("self", "event"),
    "_close": ("self",),
}
# Attributes set in TCPServer.__init__ (and ``protocol`` in ``run``) that the subclass reads.
PEERCLOSE_ATTRIBUTES = ("idle_task", "writer", "loop")


def peerclose_problems() -> list[str]:
    """What differs from the Hypercorn internals :class:`PromptCloseTCPServer` relies on."""
    problems: list[str] = []
    if getattr(hypercorn_run, "TCPServer", None) not in (TCPServer, PromptCloseTCPServer):
        problems.append("hypercorn.asyncio.run.TCPServer is not tcp_server.TCPServer")
    for name, params in PEERCLOSE_REQUIRED.items():
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
        for attribute in PEERCLOSE_ATTRIBUTES
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
    """Hypercorn's TCPServer, closing the socket when the peer has gone (see below)."""

    # The connection's own task while it runs the read loop (None outside it), and whether
    # _stop_reading has cancelled it. The read loop runs in that task rather than in a task of
    # its own: a task per connection (with its coroutine, context and the wait on it) cost
    # about 2 KB of every open stream (bench/heapprofile.py).
    _read_task: asyncio.Task[Any] | None = None
    _stop_requested = False
    _read_done = False

    async def _read_data(self) -> None:
        task = asyncio.current_task()
        self._read_task = task
        try:
            await super()._read_data()
        except asyncio.CancelledError:
            # Ours (_stop_reading), and only ours: any other cancellation (shutdown) goes on.
            if not self._stop_requested or task is None or task.uncancel() > 0:
                raise
            # Cut off mid-way: let the protocol close its streams as the loop's end would have
            # (idempotent: a closed stream is not closed twice).
            await self.protocol.handle(Closed())
        finally:
            self._read_task = None
        if self._stop_requested and task is not None and task.cancelling():
            task.uncancel()  # our cancel was absorbed on the way (Hypercorn's _close swallows it)
        self._read_done = True
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
        task = self._read_task
        # Not from inside the read loop itself: it is running, so it is not stuck, and it ends
        # by itself once the closed transport reports EOF. Cancelled once: the connection's task
        # is parked in the read loop (it is not the current task), so the cancellation lands
        # there, where _read_data takes it back.
        if (
            task is not None
            and not self._stop_requested
            and not task.done()
            and task is not asyncio.current_task()
        ):
            self._stop_requested = True
            task.cancel()


def install_peerclose() -> bool:
    """Make Hypercorn's asyncio worker serve connections with :class:`PromptCloseTCPServer`.

    Idempotent. False (and a warning) when the installed Hypercorn does not have the expected
    shape; then connections behave as in plain Hypercorn.
    """
    version = _version("hypercorn")
    problems = peerclose_problems()
    if problems:
        logger.warning(
            "hypercorn %s: closed connections may hold their socket until the keep-alive "
            "timeout (PromptCloseTCPServer not applied: %s)",
            version,
            "; ".join(problems),
        )
        return False
    if getattr(hypercorn_run, "TCPServer", None) is not PromptCloseTCPServer:
        # worker_serve looks this name up for every connection it accepts.
        setattr(hypercorn_run, "TCPServer", PromptCloseTCPServer)  # noqa: B010
        logger.info(
            "hypercorn %s: a connection's socket is released as soon as its peer closes "
            "(server/hypercorn_internals.py, PromptCloseTCPServer)",
            version,
        )
    return True
