"""Server-Sent Events wire encoding: pure functions, tested on exact bytes.

Field values are sanitised so that no content can start a new field or event: ``data`` is split
on every line break into several ``data:`` lines (the client joins them back with ``\\n``), and
CR, LF and NUL are removed from ``event`` and ``id``, which must be a single line.
"""

from __future__ import annotations

import re

__all__ = ["comment", "encode", "retry"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_UNSAFE_SINGLE_LINE = re.compile(r"[\r\n\0]")


def _single_line(value: str) -> str:
    return _UNSAFE_SINGLE_LINE.sub("", value)


def encode(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one event. An event with no field at all encodes to an empty bytes string."""
    parts: list[str] = []
    if event is not None:
        parts.append(f"event: {_single_line(event)}\n")
    if id is not None:
        parts.append(f"id: {_single_line(str(id))}\n")
    if retry is not None:
        if retry < 0:
            raise ValueError("retry must be a non-negative number of milliseconds")
        parts.append(f"retry: {int(retry)}\n")
    if data is not None:
        for line in _LINE_BREAK.split(data):
            parts.append(f"data: {line}\n")
    if not parts:
        return b""
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def comment(text: str = "") -> bytes:
    """An SSE comment line (ignored by clients), used as a heartbeat to keep proxies open."""
    lines = _LINE_BREAK.split(text) if text else [""]
    return "".join(f": {line}\n" if line else ":\n" for line in lines).encode("utf-8") + b"\n"


def retry(milliseconds: int) -> bytes:
    """A lone ``retry:`` field: sets the reconnection delay without dispatching an event."""
    return encode(retry=milliseconds)
