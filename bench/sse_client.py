"""A lean SSE client: one asyncio Protocol per stream, HTTP/1.1 and SSE parsed by hand.

All streams of one load-generator process share one :class:`Tally`, so a received
event costs a few slices and two appends, not an object per event.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable
from typing import Any

__all__ = ["H2SSEStream", "SSEStream", "Tally", "build_h2_headers", "build_request"]

TERMINAL_EVENT = b"complete"


def build_request(host: str, port: int, task_id: str, token: str, *, group: bool = False) -> bytes:
    """The exact bytes of one authenticated stream request (``group``: the stream of the group
    named ``task_id``)."""
    path = (
        f"/api/v1/sse/groups/{task_id}/progress"
        if group
        else f"/api/v1/sse/tasks/{task_id}/progress"
    )
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n"
        "Cache-Control: no-cache\r\n"
        "\r\n"
    ).encode()


class Tally:
    """Counters and samples shared by every stream of one process."""

    __slots__ = (
        "started",
        "ready",
        "failed",
        "closed",
        "completed",
        "bad_terminal",
        "lost",
        "error_events",
        "timeouts",
        "updates",
        "out_of_order",
        "heartbeats",
        "recv",
        "stamps",
        "connect_lat",
        "first_start",
        "last_ready",
        "status_codes",
        "waiters",
    )

    def __init__(self) -> None:
        self.started = 0
        self.ready = 0
        self.failed = 0
        self.closed = 0
        self.completed = 0
        self.bad_terminal = 0
        self.lost = 0
        self.error_events = 0
        self.timeouts = 0
        self.updates = 0
        self.out_of_order = 0
        self.heartbeats = 0
        self.recv = array("d")
        self.stamps: list[bytes] = []
        self.connect_lat = array("d")
        self.first_start = 0.0
        self.last_ready = 0.0
        self.status_codes: dict[int, int] = {}
        # (predicate, future) pairs woken when a counter moves.
        self.waiters: list[tuple[Callable[[Tally], bool], asyncio.Future[None]]] = []

    def poke(self) -> None:
        if not self.waiters:
            return
        keep = []
        for pred, fut in self.waiters:
            if fut.done():
                continue
            if pred(self):
                fut.set_result(None)
            else:
                keep.append((pred, fut))
        self.waiters = keep

    async def wait_for(self, pred: Callable[[Tally], bool], limit: float) -> bool:
        if pred(self):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append((pred, fut))
        try:
            await asyncio.wait_for(fut, limit)
        except TimeoutError:
            return pred(self)
        return True


def _field(data: bytes, key: bytes) -> bytes | None:
    """The string value of ``key`` in a flat JSON object, without decoding all of it."""
    i = data.find(key)
    if i < 0:
        return None
    k = data.find(b'"', i + len(key))
    if k < 0:
        return None
    e = data.find(b'"', k + 1)
    return data[k + 1 : e] if e > 0 else None


class SSEStream(asyncio.Protocol):
    """One SSE stream; the first ``progress`` event counts as connected."""

    __slots__ = (
        "tally",
        "request",
        "expect_state",
        "transport",
        "head",
        "status",
        "chunked",
        "cbuf",
        "need",
        "crlf",
        "sbuf",
        "seen",
        "last_version",
        "done",
        "t_start",
        "gate",
    )

    def __init__(self, tally: Tally, request: bytes, expect_state: bytes) -> None:
        self.tally = tally
        self.request = request
        self.expect_state = expect_state
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.status = 0
        self.chunked = False
        self.cbuf = bytearray()
        self.need = 0
        self.crlf = False
        self.sbuf = bytearray()
        self.seen = 0
        self.last_version = -1
        self.done = False
        self.t_start = 0.0
        # Resolved at the first event or at close: lets the opener bound connects in flight.
        self.gate: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack like one.
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.status == 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.head[:end]).lower()
            rest = bytes(self.head[end + 4 :])
            self.head = bytearray()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.status = 999
            codes = self.tally.status_codes
            codes[self.status] = codes.get(self.status, 0) + 1
            if self.status != 200:
                self._fail()
                return
            self.chunked = b"transfer-encoding: chunked" in head
            if not rest:
                return
            data = rest
        if self.chunked:
            self._dechunk(data)
        else:
            self._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        t = self.tally
        t.closed += 1
        if not self.done:
            self.done = True
            if self.seen:
                t.lost += 1
            else:
                t.failed += 1
        self._open_gate()
        t.poke()

    # -- internals ---------------------------------------------------------
    def _open_gate(self) -> None:
        gate = self.gate
        if gate is not None:
            self.gate = None
            if not gate.done():
                gate.set_result(None)

    def _fail(self) -> None:
        if not self.done:
            self.done = True
            self.tally.failed += 1
        if self.transport is not None:
            self.transport.close()

    def _dechunk(self, data: bytes) -> None:
        buf = self.cbuf
        buf += data
        pos = 0
        n = len(buf)
        while pos < n:
            if self.need:
                take = min(self.need, n - pos)
                self._feed(bytes(buf[pos : pos + take]))
                pos += take
                self.need -= take
                if self.need:
                    break
                self.crlf = True
            if self.crlf:
                if n - pos < 2:
                    break
                pos += 2
                self.crlf = False
                continue
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(bytes(buf[pos:nl]).split(b";", 1)[0], 16)
            pos = nl + 2
            if size == 0:
                # Last chunk: the server ends the response.
                if self.transport is not None:
                    self.transport.close()
                break
            self.need = size
        del buf[:pos]

    def _feed(self, data: bytes) -> None:
        sbuf = self.sbuf
        sbuf += data
        if b"\r" in sbuf:
            sbuf = self.sbuf = bytearray(sbuf.replace(b"\r\n", b"\n"))
        while True:
            end = sbuf.find(b"\n\n")
            if end < 0:
                return
            block = bytes(sbuf[:end])
            del sbuf[: end + 2]
            self._event(block)

    def _event(self, block: bytes) -> None:
        now = time.time()
        t = self.tally
        event = b"message"
        data = b""
        vid = b""
        has_field = False
        for line in block.split(b"\n"):
            if not line or line[0] == 58:  # ":" comment (heartbeat)
                continue
            has_field = True
            if line.startswith(b"data:"):
                v = line[5:]
                v = v[1:] if v[:1] == b" " else v
                data = data + b"\n" + v if data else v
            elif line.startswith(b"event:"):
                event = line[6:].strip()
            elif line.startswith(b"id:"):
                vid = line[3:].strip()
        if not has_field:
            t.heartbeats += 1
            return
        if event == b"progress":
            self.seen += 1
            try:
                version = int(vid)
            except ValueError:
                version = self.last_version + 1
            if version <= self.last_version:
                t.out_of_order += 1
            self.last_version = version
            if self.seen == 1:
                t.ready += 1
                t.connect_lat.append(now - self.t_start)
                if now > t.last_ready:
                    t.last_ready = now
                self._open_gate()
                t.poke()
                return
            t.updates += 1
            stamp = _field(data, b'"updated_at"')
            if stamp is not None:
                t.recv.append(now)
                t.stamps.append(stamp)
        elif event == TERMINAL_EVENT:
            if not self.done:
                self.done = True
                t.completed += 1
                if _field(data, b'"state"') != self.expect_state:
                    t.bad_terminal += 1
                t.poke()
        elif event == b"error":
            t.error_events += 1
        elif event == b"timeout":
            t.timeouts += 1


def build_h2_headers(
    host: str, port: int, task_id: str, token: str, *, group: bool = False
) -> list[tuple[bytes, bytes]]:
    """The request headers of one authenticated stream over HTTP/2 (``group``: as in
    :func:`build_request`)."""
    kind = "groups" if group else "tasks"
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", f"{host}:{port}".encode()),
        (b":path", f"/api/v1/sse/{kind}/{task_id}/progress".encode()),
        (b"authorization", f"Bearer {token}".encode()),
        (b"accept", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
    ]


class H2SSEStream(SSEStream):
    """One SSE stream over HTTP/2 in cleartext with prior knowledge (h2c), one connection each.

    The h2 library keeps the framing and flow control; every DATA frame is acknowledged at once,
    so the server's window never closes on a client that keeps up.
    """

    __slots__ = ("h2", "headers")

    def __init__(
        self, tally: Tally, headers: list[tuple[bytes, bytes]], expect_state: bytes
    ) -> None:
        super().__init__(tally, b"", expect_state)
        self.headers = headers
        self.h2: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import h2.config
        import h2.connection

        self.transport = transport  # type: ignore[assignment]
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        conn.initiate_connection()
        conn.send_headers(1, self.headers, end_stream=True)
        self.h2 = conn
        transport.write(conn.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        conn = self.h2
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._fail()
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers).get(b":status", b"999")
                self.status = int(status)
                codes = self.tally.status_codes
                codes[self.status] = codes.get(self.status, 0) + 1
                if self.status != 200:
                    self._fail()
                    return
            elif isinstance(ev, h2.events.DataReceived):
                if ev.flow_controlled_length:
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self._feed(ev.data)
            elif isinstance(
                ev,
                h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated,
            ):
                if self.transport is not None:
                    self.transport.close()
        out = conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)
