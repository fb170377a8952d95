"""Helpers for driving real SSE client libraries against the live server.

- :class:`RequestLog` is an ASGI middleware wrapped around the running app: it counts the requests
  each client really makes (the server-side view of reconnect loops) and serves the browser test
  page and the polyfill's browser build on the server's own origin.
- :class:`NodeClient` runs ``tests/node/client.mjs`` (Node's ``eventsource`` or
  ``event-source-polyfill``) and reads the JSON lines it prints.
- :class:`StaticSite` serves the same page from another port: a second origin.

Missing Node packages or Chromium make these helpers raise, so the tests fail instead of skipping:
``.ci/run`` installs both (scripts/setup-node-clients.sh, scripts/setup-browser.sh).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tests.conftest import LiveServer

NODE_DIR = Path(__file__).parent / "node"
PAGE = NODE_DIR / "sse_page.html"
POLYFILL_JS = NODE_DIR / "node_modules" / "event-source-polyfill" / "src" / "eventsource.js"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
STATIC_PREFIX = "/__test__/"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def require_node_clients() -> None:
    if shutil.which("node") is None:
        raise AssertionError("node is not installed: run scripts/setup-node-clients.sh")
    if not (NODE_DIR / "node_modules" / "eventsource").is_dir() or not POLYFILL_JS.is_file():
        raise AssertionError("tests/node has no node_modules: run scripts/setup-node-clients.sh")


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        raise AssertionError(f"{CHROMIUM} is missing: run scripts/setup-browser.sh")


def static_files() -> dict[str, Path]:
    """What the test sites serve, by file name."""
    require_node_clients()
    return {"sse_page.html": PAGE, "eventsource.js": POLYFILL_JS}


@dataclass(frozen=True)
class Hit:
    """One HTTP request as the server saw it."""

    t: float
    method: str
    path: str
    query: str
    last_event_id: str | None
    origin: str | None
    status: int | None


@dataclass
class RequestLog:
    """ASGI middleware: records every request and serves the test files under /__test__/."""

    app: Callable[..., Any]
    files: dict[str, Path] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith(STATIC_PREFIX):
            await self._serve_file(path[len(STATIC_PREFIX) :], send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status: list[int] = []

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        started = time.monotonic()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.hits.append(
                Hit(
                    t=started,
                    method=scope["method"],
                    path=path,
                    query=scope["query_string"].decode("latin-1"),
                    last_event_id=headers.get("last-event-id"),
                    origin=headers.get("origin"),
                    status=status[0] if status else None,
                )
            )

    async def _serve_file(self, name: str, send: Any) -> None:
        file = self.files.get(unquote(name))
        if file is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        ctype = CONTENT_TYPES.get(file.suffix, "application/octet-stream")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", ctype.encode()), (b"cache-control", b"no-store")],
            }
        )
        await send({"type": "http.response.body", "body": file.read_bytes()})

    def stream_gets(self, task_id: str) -> list[Hit]:
        """GETs of one task's stream (the requests an EventSource makes, not preflights)."""
        suffix = f"/tasks/{task_id}/progress"
        return [h for h in self.hits if h.method == "GET" and h.path.endswith(suffix)]

    def preflights(self, task_id: str) -> list[Hit]:
        suffix = f"/tasks/{task_id}/progress"
        return [h for h in self.hits if h.method == "OPTIONS" and h.path.endswith(suffix)]


def install_request_log(server: LiveServer) -> RequestLog:
    """Wrap the running app: Quart's ``__call__`` looks up ``asgi_app`` on every request."""
    log = RequestLog(server.app.asgi_app, files=static_files())
    server.app.asgi_app = log  # type: ignore[method-assign]
    return log


def page_url(origin: str, stream_url: str, token: str, lib: str, *, close_on_end: bool) -> str:
    from urllib.parse import urlencode

    query = urlencode(
        {"url": stream_url, "token": token, "lib": lib, "close": "1" if close_on_end else "0"}
    )
    return f"{origin}{STATIC_PREFIX}sse_page.html?{query}"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@dataclass
class StaticSite:
    """The test page on another port of 127.0.0.1: a different origin from the server."""

    origin: str
    httpd: ThreadingHTTPServer


@contextlib.contextmanager
def static_site(directory: Path) -> Iterator[StaticSite]:
    """Serve ``directory`` under /__test__/ on an ephemeral port, in a thread, until exit."""
    root = directory / "root"
    (root / STATIC_PREFIX.strip("/")).mkdir(parents=True, exist_ok=True)
    for name, src in static_files().items():
        shutil.copyfile(src, root / STATIC_PREFIX.strip("/") / name)
    handler = partial(_QuietHandler, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield StaticSite(origin=f"http://127.0.0.1:{httpd.server_address[1]}", httpd=httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@dataclass
class NodeClient:
    """One ``node client.mjs`` process and the records it printed."""

    proc: asyncio.subprocess.Process
    records: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.records.append(json.loads(line))
            self.changed.set()

    def events(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == "event"]

    async def wait_for(self, predicate: Callable[[NodeClient], bool], timeout: float) -> None:
        async def loop() -> None:
            while not predicate(self):
                if self.reader is not None and self.reader.done():
                    raise AssertionError(f"client exited early: {self.records}")
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.5)

        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise AssertionError(f"condition not met in {timeout}s: {self.records}") from None

    async def wait_exit(self, timeout: float) -> None:
        await asyncio.wait_for(self.proc.wait(), timeout)
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 5)


@contextlib.asynccontextmanager
async def node_client(
    url: str,
    token: str,
    lib: str,
    *,
    close_on_end: bool = False,
    linger_ms: int = 10_000,
    max_ms: int = 100_000,
) -> AsyncIterator[NodeClient]:
    """Run one Node client; it is killed on exit if it has not finished by itself."""
    require_node_clients()
    args = ["client.mjs", url, token, "--lib", lib, "--linger-ms", str(linger_ms)]
    args += ["--max-ms", str(max_ms)]
    if close_on_end:
        args.append("--close-on-end")
    proc = await asyncio.create_subprocess_exec(
        "node", *args, cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE
    )
    client = NodeClient(proc)
    client.reader = asyncio.create_task(client._read())
    try:
        yield client
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
        client.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await client.reader
