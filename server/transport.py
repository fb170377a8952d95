"""What Hypercorn holds behind an ASGI ``send``: the connection's transport, and for HTTP/1.1 its
h11 state.

Hypercorn does not expose the transport. Two things need it: the send-timeout watchdog
(:mod:`server.sendtimeout`), which must abort a connection whose buffer never drains, and the
direct fan-out write (:func:`chunked_writer`). Both walk the bound-method chain Hypercorn builds
(HTTP stream -> protocol -> TCP server -> writer -> transport). If a Hypercorn release changes that
shape, the walk finds nothing and both fall back to the ordinary path: the watchdog logs that it
could not abort, and streams write through Quart as before. ``tests/test_direct_write.py`` fails
if the direct path stops being taken on the pinned Hypercorn.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["chunked_writer", "find_transport"]


def _owners(send: Any) -> list[Any]:
    """The objects along ``send``'s bound-method chain, innermost first (at most 8)."""
    out: list[Any] = []
    obj: Any = send
    for _ in range(8):
        owner = getattr(obj, "__self__", None)
        if owner is None:
            break
        out.append(owner)
        obj = getattr(owner, "send", None)
    return out


def find_transport(send: Any) -> asyncio.WriteTransport | None:
    """The transport of the connection behind Hypercorn's ``send``, if it can be found."""
    for owner in _owners(send):
        transport = getattr(getattr(owner, "writer", None), "transport", None)
        if transport is not None:
            return transport  # type: ignore[no-any-return]
    return None


def chunked_writer(send: Any) -> asyncio.WriteTransport | None:
    """The transport of an HTTP/1.1 response whose body h11 frames with chunked encoding, or None.

    Only then may a caller write body bytes to the transport itself, framed as chunks: h11 keeps
    no count of a chunked body, so its own later writes (the next chunk, the final ``0``) stay
    valid. HTTP/2, HTTP/1.0 (close-delimited) and anything unrecognised get None.
    """
    owners = _owners(send)
    for owner in owners:
        connection = getattr(owner, "connection", None)
        if connection is None or type(connection).__module__.split(".")[0] != "h11":
            continue
        writer = getattr(connection, "_writer", None)
        if type(writer).__name__ != "ChunkedWriter":
            return None
        return find_transport(send)
    return None
