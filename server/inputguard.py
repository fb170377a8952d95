"""Refuse requests whose URL does not decode to UTF-8, before any route sees them.

Hypercorn and Werkzeug decode a bad percent-escape (``%FF``, a UTF-16 surrogate ``%ED%A0%80``)
into U+FFFD or leave it as text, so a task id like ``%FF%FE`` would silently become two U+FFFD
characters and be looked up. A 400 that says what is wrong beats a confusing "Task not found".
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

__all__ = ["Utf8GuardMiddleware"]

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def _decodes(raw: bytes) -> bool:
    try:
        unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Utf8GuardMiddleware:
    """400 ``{"error": "Invalid URL", ...}`` for a path or query string that is not UTF-8."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")
            if not _decodes(raw_path) or not _decodes(scope.get("query_string", b"")):
                body = json.dumps(
                    {"error": "Invalid URL", "detail": "the path and query must be UTF-8"}
                ).encode()
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
