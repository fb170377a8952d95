"""The browser side: the demo page at ``/`` and the JavaScript client under ``/static/``.

``/static/taskstream.js`` (watchTask, watchTasks) and ``/static/react.js`` (useTaskProgress) are
plain ES modules with no build step, so an application can import them straight from here or copy
them. The page at ``/`` uses them; with ``serve --demo`` it also gets a token and can start
simulated tasks (see :mod:`server.demo`), otherwise it asks for a token and a task id.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from quart import Blueprint, Response, request
from quart_schema.extension import hide
from werkzeug.exceptions import NotFound
from werkzeug.security import safe_join

__all__ = ["STATIC_DIR", "blueprint"]

STATIC_DIR = Path(__file__).resolve().parent / "static"


def _read_packaged(folder: str, filename: str) -> bytes | None:
    """A packaged file's bytes (a few KB, read in one go), or None outside the folder or absent."""
    joined = safe_join(folder, filename)
    if joined is None or not Path(joined).is_file():
        return None
    return Path(joined).read_bytes()


class _WebBlueprint(Blueprint):
    # The page and its files are not part of the API: kept out of /openapi.json.
    @hide
    async def send_static_file(self, filename: str) -> Response:
        # Revalidate every time (the ETag makes that cheap): a page must never run a cached
        # taskstream.js against a newer server. Quart's default caches for 12 hours.
        # The files are small and read whole: Quart's file body opens them in a worker thread
        # and could leave a handle to the garbage collector when a client went away early.
        assert self.static_folder is not None
        data = _read_packaged(self.static_folder, filename)
        if data is None:
            raise NotFound()
        mimetype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        response = Response(data, mimetype=mimetype)
        response.cache_control.public = True
        response.cache_control.max_age = 0
        response.set_etag(hashlib.sha256(data).hexdigest()[:32])
        await response.make_conditional(request)
        return response


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
