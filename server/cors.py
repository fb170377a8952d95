"""Cross-origin access for browser frontends on another origin, applied to the whole app.

quart-cors adds an ``after_request`` hook on the app, so every route (streams, the API, and
routes registered later) and every error response (a 401 included, so a frontend can read it)
gets the same headers. Preflight ``OPTIONS`` is answered by Quart's automatic OPTIONS response,
which never runs a view and therefore never asks for a token.

Only exact origins from ``TASKSTREAM_CORS_ORIGINS`` are allowed; there is no wildcard.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar
from urllib.parse import urlsplit

from quart import Quart
from quart_cors import cors

__all__ = [
    "ALLOW_HEADERS",
    "ALLOW_METHODS",
    "EXPOSE_HEADERS",
    "PREFLIGHT_MAX_AGE",
    "apply_cors",
    "parse_origins",
]

# Authorization for the polyfill and fetch(), Last-Event-ID for clients that resume with the
# header, Content-Type for JSON bodies of the API, If-None-Match for ETag polling.
ALLOW_HEADERS = ("Authorization", "Last-Event-ID", "Content-Type", "If-None-Match")
ALLOW_METHODS = ("GET", "POST", "PATCH", "OPTIONS")
# Readable by frontend code on 401/429/503 answers, to tell auth failures from back-off; ETag so
# a cross-origin poller can send it back in If-None-Match.
EXPOSE_HEADERS = ("Retry-After", "WWW-Authenticate", "ETag")
# The polyfill sends a preflight before every (re)connect; caching it saves one round trip each.
PREFLIGHT_MAX_AGE = timedelta(minutes=10)

_App = TypeVar("_App", bound=Quart)


def parse_origins(raw: str) -> tuple[str, ...]:
    """Parse a comma-separated list of exact origins (``scheme://host[:port]``).

    Raises ValueError with a message that says what to write instead. A browser sends the
    ``Origin`` header without a path or trailing slash, so a value with one would never match;
    it is refused here rather than silently blocking the frontend.
    """
    origins: list[str] = []
    for item in raw.split(","):
        origin = item.strip()
        if not origin:
            continue
        if origin == "*" or "*" in origin:
            raise ValueError(
                "wildcards are not allowed; list each frontend origin exactly, "
                "e.g. https://app.example.com"
            )
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            raise ValueError(
                f"{origin!r} is not an origin; write scheme://host[:port] with no path or "
                "trailing slash, e.g. http://localhost:3000"
            )
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


def apply_cors(app: _App, origins: tuple[str, ...]) -> _App:
    """Send CORS headers for ``origins`` on every response of ``app`` (none when empty).

    ``Vary: Origin`` is sent on every response, allowed origin or not, so a shared cache never
    serves one origin's answer to another.
    """
    # No Access-Control-Allow-Credentials: tokens travel in Authorization or the query string.
    # So another origin's fetch() cannot use the TASKSTREAM_JWT_COOKIE cookie either, and a
    # cookie-authenticated change must prove it is same-site anyway (server/csrf.py).
    return cors(
        app,
        allow_origin=list(origins),
        allow_credentials=False,
        allow_headers=list(ALLOW_HEADERS),
        allow_methods=list(ALLOW_METHODS),
        expose_headers=list(EXPOSE_HEADERS),
        max_age=PREFLIGHT_MAX_AGE,
        send_origin_wildcard=False,
    )
