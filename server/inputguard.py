"""Refuse requests whose URL does not decode to UTF-8, or whose Host Quart cannot route on,
before any route sees them.

Hypercorn and Werkzeug decode a bad percent-escape (``%FF``, a UTF-16 surrogate ``%ED%A0%80``)
into U+FFFD or leave it as text, so a task id like ``%FF%FE`` would silently become two U+FFFD
characters and be looked up. A 400 that says what is wrong beats a confusing "Task not found".

Quart binds its URL map to the Host header before any error handler exists: a host name with
an empty label or one over 63 characters makes the IDNA codec fail there, and the client got a
500 from Hypercorn. The same check runs here first.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from werkzeug.sansio.utils import get_host

__all__ = ["Utf8GuardMiddleware"]

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def _decodes(raw: bytes) -> bool:
    try:
        unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _routable_host(scope: Any) -> bool:
    """Whether Werkzeug's ``MapAdapter`` can IDNA-encode the host Quart will bind to."""
    values = [v for k, v in scope.get("headers", ()) if k.lower() == b"host"]
    if not values:
        return True
    # As Quart builds it: the header decoded as Latin-1, the default port dropped, lower case.
    host = get_host(scope.get("scheme", "http"), values[0].decode("latin-1"), None, None)
    try:
        host.lower().partition(":")[0].encode("idna")
    except UnicodeError:
        return False
    return True


class Utf8GuardMiddleware:
    """400 ``{"error": "Invalid URL", ...}`` for a path or query string that is not UTF-8, and
    ``{"error": "Invalid Host header"}`` for a host name that is not one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")
            problem = None
            if not _decodes(raw_path) or not _decodes(scope.get("query_string", b"")):
                problem = {"error": "Invalid URL", "detail": "the path and query must be UTF-8"}
            elif not _routable_host(scope):
                problem = {
                    "error": "Invalid Host header",
                    "detail": "each dot-separated label must be 1 to 63 characters",
                }
            if problem is not None:
                body = json.dumps(problem).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
