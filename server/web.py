"""The browser side: the demo page at ``/`` and the JavaScript client under ``/static/``.

``/static/taskstream.js`` (watchTask, watchTasks) and ``/static/react.js`` (useTaskProgress) are
plain ES modules with no build step, so an application can import them straight from here or copy
them. The page at ``/`` uses them; with ``serve --demo`` it also gets a token and can start
simulated tasks (see :mod:`server.demo`), otherwise it asks for a token and a task id.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory
from quart_schema.extension import hide

__all__ = ["STATIC_DIR", "blueprint"]

STATIC_DIR = Path(__file__).resolve().parent / "static"


class _WebBlueprint(Blueprint):
    # The page and its files are not part of the API: kept out of /openapi.json.
    @hide
    async def send_static_file(self, filename: str) -> Response:
        # Revalidate every time (ETag/Last-Modified make that cheap): a page must never run a
        # cached taskstream.js against a newer server. Quart's default caches for 12 hours.
        assert self.static_folder is not None
        return await send_from_directory(self.static_folder, filename, cache_timeout=0)


blueprint = _WebBlueprint("web", __name__, static_folder=str(STATIC_DIR), static_url_path="/static")

# The page loads nothing but its own origin's files and talks to nothing else.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@blueprint.get("/")
@hide
async def index() -> Response:
    """The demo page: live progress bars for several tasks and a connection indicator."""
    response = await blueprint.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
