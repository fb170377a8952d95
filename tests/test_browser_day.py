"""The JS client through a real day, in Chromium: tokens that expire mid-stream, offline and back,
a connection that stalls the way a sleeping laptop's does. Every test checks versions: each one
delivered exactly once, in order, none missing.

Tokens here live two or three seconds and the server's JWT leeway is zero, so a stream of a few
seconds crosses several expiries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser

from server.demo import DEMO_USER
from tests.conftest import LiveServer, create_task
from tests.test_browser import PageWatcher, browser, page_for  # noqa: F401 - browser is a fixture

# Starts a watch (or several) in the page; records each callback with its arguments.
START = """async ([fn, ids, extra]) => {
  const mod = await import("/static/taskstream.js");
  window.__log = window.__log ?? [];
  const log = (kind) => (value, detail) => window.__log.push([kind, value instanceof Error
    ? { kind: value.kind, message: value.message } : value, detail ?? null]);
  const options = {
    getToken: () => window.nextToken(),
    onProgress: log("progress"), onComplete: log("complete"), onError: log("error"),
    onStatus: (status, detail) => window.__log.push(["status", status, detail.reason]),
    onReady: log("ready"), onAllDone: log("done"),
    ...extra,
  };
  window.__handle = fn === "watchTasks"
    ? mod.watchTasks(ids, options) : mod.watchTask(ids[0], options);
}"""


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"demo": True, "retry_ms": 300}


@pytest.fixture
async def web(browser: Browser, server: LiveServer) -> AsyncIterator[PageWatcher]:  # noqa: F811
    async with page_for(browser, server) as watcher:
        yield watcher


async def log_of(web: PageWatcher, kind: str) -> list[Any]:
    entries: list[list[Any]] = await web.page.evaluate("window.__log ?? []")
    return [e[1:] if kind == "status" else e[1] for e in entries if e[0] == kind]


async def versions_seen(web: PageWatcher, task_id: str | None = None) -> list[int]:
    return [
        p["version"]
        for p in await log_of(web, "progress")
        if task_id is None or p["task_id"] == task_id
    ]


async def wait_until(check: Callable[[], Any], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


async def bump(sql: asyncpg.Connection, task_id: str) -> int:
    version: int = await sql.fetchval(
        "UPDATE taskstream.tasks SET state = 'running', progress = progress + 1"
        " WHERE id = $1 RETURNING version",
        task_id,
    )
    return version


def short_tokens(server: LiveServer, ttl: int) -> Callable[[], str]:
    server.runtime.verifier.leeway = 0  # a token of `ttl` seconds ends its stream on time
    issued: list[str] = []

    def next_token() -> str:
        issued.append(server.token(DEMO_USER, ttl=ttl))
        return issued[-1]

    next_token.issued = issued  # type: ignore[attr-defined]
    return next_token


def assert_each_version_once(seen: list[int], first: int, last: int) -> None:
    assert seen == list(range(first, last + 1)), f"missed or repeated: {seen}"


# ---- 1. token refresh -------------------------------------------------------------------------

TRANSPORTS = pytest.mark.parametrize(
    "extra",
    [
        {"transports": ["eventsource"]},
        {"transports": ["fetch"]},
        {"transports": ["eventsource"], "tickets": True},
    ],
    ids=["eventsource", "fetch", "ticket"],
)


@TRANSPORTS
async def test_stream_ended_by_token_expiry_resumes_with_every_version(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer, extra: dict[str, Any]
) -> None:
    """No refresh ahead: the server ends the stream at each expiry (2 s tokens, 7 s of changes)
    and the client comes back with a fresh token, resuming from the last version it delivered.
    The writer waits for each version to arrive before the next, as the server conflates what a
    client has not taken yet: so every version must arrive, exactly once."""
    tokens = short_tokens(server, ttl=2)
    await web.page.expose_function("nextToken", tokens)
    await create_task(sql, "exp", owner=DEMO_USER, state="queued", progress=0.0)
    await web.open()
    await web.page.evaluate(START, ["watchTask", ["exp"], {**extra, "refreshAhead": 0}])
    await wait_until(lambda: versions_seen(web), "the snapshot")
    last = 1
    started = time.monotonic()
    while time.monotonic() - started < 7:
        last = await bump(sql, "exp")
        await wait_until(lambda v=last: _has(web, v), f"version {last}", timeout=10)
        await asyncio.sleep(0.1)
    await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'exp'")
    await wait_until(lambda: log_of(web, "complete"), "complete")
    assert_each_version_once(await versions_seen(web), 1, last + 1)
    statuses = await log_of(web, "status")
    expiries = [s for s in statuses if s == ["reconnecting", "token_expired"]]
    assert len(expiries) >= 2, statuses
    assert await log_of(web, "error") == []
    assert statuses[-1] == ["closed", "complete"]
    streams = web.stream_requests("/api/v1/sse/tasks/exp/progress")
    assert len(streams) >= 3, streams
    if extra.get("tickets"):
        assert all("ticket=" in u and "access_token" not in u for u in streams), streams
        assert len(web.stream_requests("/api/v1/sse/tickets")) == len(streams)


async def _has(web: PageWatcher, version: int) -> bool:
    return version in await versions_seen(web)


@TRANSPORTS
async def test_refresh_before_expiry_never_waits_on_an_ending(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer, extra: dict[str, Any]
) -> None:
    """With refresh ahead (the default), a new stream with a fresh token opens before the old
    token runs out, and the old one closes once the new one is open. A writer that does not wait
    for the client (a change every 120 ms for 8 s, through three or more 3 s tokens) still has
    every version delivered once: no ending, no reconnect, no gap for changes to merge in."""
    tokens = short_tokens(server, ttl=3)
    await web.page.expose_function("nextToken", tokens)
    await create_task(sql, "ahead", owner=DEMO_USER, state="queued", progress=0.0)
    await web.open()
    await web.page.evaluate(START, ["watchTask", ["ahead"], extra])
    await wait_until(lambda: versions_seen(web), "the snapshot")
    last = 1
    started = time.monotonic()
    while time.monotonic() - started < 8:
        last = await bump(sql, "ahead")
        await asyncio.sleep(0.12)
    await wait_until(lambda v=last: _has(web, v), f"version {last}")
    await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'ahead'")
    await wait_until(lambda: log_of(web, "complete"), "complete")
    assert_each_version_once(await versions_seen(web), 1, last + 1)
    statuses = await log_of(web, "status")
    assert statuses == [["connecting", None], ["live", None], ["closed", "complete"]], statuses
    streams = web.stream_requests("/api/v1/sse/tasks/ahead/progress")
    assert len(streams) >= 3, streams
    assert len(tokens.issued) >= 3  # type: ignore[attr-defined]
    # Never two streams for long: each old one closed once its successor was open.
    await wait_until(
        lambda: _zero(server.runtime.broker.subscriber_count), "streams closed after complete"
    )


async def _zero(n: int) -> bool:
    return n == 0


async def test_watch_tasks_refresh_resumes_each_task_from_its_version(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    """The multi-task stream over three 3 s tokens, both refresh paths at once: ahead for fetch
    (positional resume id computed from the versions delivered), and by expiry for the stream
    that could not refresh in time is covered by the single-task tests."""
    tokens = short_tokens(server, ttl=3)
    await web.page.expose_function("nextToken", tokens)
    for tid in ("ma", "mb"):
        await create_task(sql, tid, owner=DEMO_USER, state="queued", progress=0.0)
    await web.open()
    await web.page.evaluate(START, ["watchTasks", ["ma", "mb"], {"transports": ["fetch"]}])
    await wait_until(lambda: log_of(web, "ready"), "ready")
    last = {"ma": 1, "mb": 1}
    started = time.monotonic()
    while time.monotonic() - started < 8:
        for tid in last:
            last[tid] = await bump(sql, tid)
        await asyncio.sleep(0.15)
    for tid in last:
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = $1", tid)
    await wait_until(lambda: log_of(web, "done"), "all done")
    for tid, v in last.items():
        assert_each_version_once(await versions_seen(web, tid), 1, v + 1)
    assert len(web.stream_requests("/api/v1/sse/tasks?ids=")) >= 3
    assert "reconnecting" not in [s[0] for s in await log_of(web, "status")]


# ---- 3. offline, a stalled connection ---------------------------------------------------------


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
async def test_offline_then_online_resumes_without_a_gap(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer, transport: str
) -> None:
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER))
    await create_task(sql, "off", owner=DEMO_USER, state="queued", progress=0.0)
    await web.open()
    await web.page.evaluate(START, ["watchTask", ["off"], {"transports": [transport]}])
    await wait_until(lambda: versions_seen(web), "the snapshot")
    await web.page.context.set_offline(True)
    await wait_until(
        lambda: _status_is(web, ["reconnecting", "offline"]), "offline shown", timeout=5
    )
    for _ in range(3):
        await bump(sql, "off")
    await asyncio.sleep(1)
    await web.page.context.set_offline(False)
    await wait_until(lambda: _has(web, 4), "the state written while offline")
    last = await bump(sql, "off")
    await wait_until(lambda: _has(web, last), "a change after coming back")
    seen = await versions_seen(web)
    # Offline, changes merge (the server keeps the latest); none repeats, none goes back.
    assert seen == sorted(set(seen)) and seen[0] == 1 and seen[-1] == last, seen

    async def live() -> bool:
        statuses = await log_of(web, "status")
        return bool(statuses) and statuses[-1][0] == "live"

    # The browser's `online` event may arrive after the transport's own retry got through and
    # restart the stream once more: the status ends live, not necessarily at this instant, and
    # the restart repeats nothing.
    await wait_until(live, "live again", timeout=5)
    assert await versions_seen(web) == seen
    await web.page.evaluate("window.__handle.close()")


async def _status_is(web: PageWatcher, want: list[Any]) -> bool:
    statuses = await log_of(web, "status")
    return bool(statuses) and statuses[-1] == want


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
async def test_hidden_and_frozen_tab_keeps_its_stream_and_catches_up(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer, transport: str
) -> None:
    """The policy for hidden tabs is not to pause. Chromium freezes background tabs (no task of
    the page runs); the CDP call below is the same freeze. While frozen, changes are written;
    once thawed, the page has the latest version, with none repeated or out of order, on the
    same stream (no reconnect) when the connection survived, as it does here."""
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER))
    await create_task(sql, "frz", owner=DEMO_USER, state="queued", progress=0.0)
    await web.open()
    await web.page.evaluate(START, ["watchTask", ["frz"], {"transports": [transport]}])
    await wait_until(lambda: versions_seen(web), "the snapshot")
    cdp = await web.page.context.new_cdp_session(web.page)
    await cdp.send("Page.setWebLifecycleState", {"state": "frozen"})
    for _ in range(5):
        last = await bump(sql, "frz")
        await asyncio.sleep(0.2)
    await cdp.send("Page.setWebLifecycleState", {"state": "active"})
    await wait_until(lambda v=last: _has(web, v), "the latest version after the thaw")
    seen = await versions_seen(web)
    assert seen == sorted(set(seen)) and seen[0] == 1 and seen[-1] == last, seen
    assert len(web.stream_requests("/api/v1/sse/tasks/frz/progress")) == 1
    last = await bump(sql, "frz")
    await wait_until(lambda v=last: _has(web, v), "live after the thaw")
    await web.page.evaluate("window.__handle.close()")
    await cdp.detach()


class StallingProxy:
    """A TCP proxy on 127.0.0.1 that can freeze its open connections: no byte moves either way
    and no socket closes, as with a laptop that slept. New connections pass normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def __aenter__(self) -> StallingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def freeze(self) -> None:
        for flowing in self.frozen:
            flowing.clear()
        self.frozen = []  # connections opened from now on flow

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        flowing = asyncio.Event()
        flowing.set()
        self.frozen.append(flowing)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    await flowing.wait()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.tasks.discard(task)
            for w in (writer, up_writer):
                w.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.wait_closed()


@pytest.mark.parametrize("settings_overrides", [{"demo": True, "heartbeat": 0.5}])
async def test_stalled_connection_is_noticed_by_the_missing_heartbeat(
    browser: Browser,  # noqa: F811
    sql: asyncpg.Connection,
    server: LiveServer,
) -> None:
    """The page talks to the server through a proxy that then freezes the stream's connection:
    the socket stays open, nothing arrives, not even the heartbeat (every 0.5 s here). The client
    drops it after idleTimeout (2 s) and resumes on a new connection from its last version."""
    async with StallingProxy(int(server.url.rsplit(":", 1)[1])) as proxy:
        origin = f"http://127.0.0.1:{proxy.port}"
        async with page_for(browser, server) as web:
            await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER))
            await create_task(sql, "nap", owner=DEMO_USER, state="queued", progress=0.0)
            await web.page.goto(f"{origin}/")
            await web.page.evaluate(
                START, ["watchTask", ["nap"], {"transports": ["fetch"], "idleTimeout": 2000}]
            )
            await wait_until(lambda: versions_seen(web), "the snapshot")
            await bump(sql, "nap")
            await wait_until(lambda: _has(web, 2), "version 2")
            proxy.freeze()
            frozen_at = time.monotonic()
            await bump(sql, "nap")
            await bump(sql, "nap")
            await wait_until(
                lambda: _saw_status(web, ["reconnecting", "heartbeat"]),
                "a stall noticed",
                timeout=8,
            )
            noticed = time.monotonic() - frozen_at
            await wait_until(lambda: _has(web, 4), "the latest state after the stall")
            last = await bump(sql, "nap")
            await wait_until(lambda: _has(web, last), "live again")
            seen = await versions_seen(web)
            assert seen == sorted(set(seen)) and seen[:2] == [1, 2] and seen[-1] == last, seen
            assert 1.5 < noticed < 6, noticed
            await web.page.evaluate("window.__handle.close()")
            print(f"stall noticed after {noticed:.1f}s")


async def _saw_status(web: PageWatcher, want: list[Any]) -> bool:
    return want in await log_of(web, "status")


# ---- 4. the React hook ------------------------------------------------------------------------

HOOK_PAGE = """<!doctype html>
<html><head><meta charset="utf-8">
<script src="/vendor/react.production.min.js"></script>
<script src="/vendor/react-dom.production.min.js"></script>
<script type="importmap">{"imports": {"react": "/vendor/react-shim.js"}}</script>
<script type="module">
  import { createElement as h, useState } from "react";
  import { useTaskProgress } from "/static/react.js";
  const params = new URLSearchParams(location.search);
  const options = JSON.parse(params.get("options") || "{}");
  window.__renders = [];
  function View({ taskId }) {
    const s = useTaskProgress(taskId, () => window.nextToken(), options);
    window.__renders.push({ version: s.progress?.version ?? null, state: s.progress?.state ?? null,
      ready: s.ready, status: s.status, reason: s.reason, transport: s.transport,
      isComplete: s.isComplete, result: s.result?.state ?? null, error: s.error });
    window.cancelTask = () => s.cancel().then((t) => ({ ok: t.state }),
      (e) => ({ kind: e.kind, status: e.status, message: e.message }));
    return h("pre", { id: "out" }, JSON.stringify(window.__renders.at(-1)));
  }
  function App() {
    const [shown, setShown] = useState(true);
    window.unmount = () => setShown(false);
    return shown ? h(View, { taskId: params.get("task") }) : null;
  }
  ReactDOM.createRoot(document.getElementById("root")).render(h(App));
</script></head><body><div id="root"></div></body></html>
"""

HOOK_SHIM = (
    "export const { createElement, useEffect, useRef, useState } = window.React;\n"
    "export default window.React;\n"
)


async def open_hook_page(
    web: PageWatcher, server: LiveServer, task_id: str, options: dict[str, Any] | None = None
) -> None:
    from urllib.parse import urlencode

    from tests.test_browser import NODE_MODULES

    umd = {
        "react.production.min.js": NODE_MODULES / "react/umd/react.production.min.js",
        "react-dom.production.min.js": NODE_MODULES / "react-dom/umd/react-dom.production.min.js",
    }
    for path in umd.values():
        assert path.exists(), f"{path} missing: run scripts/setup-browser.sh"

    async def serve(route: Any) -> None:
        name = route.request.url.rsplit("/", 1)[-1].split("?")[0]
        if name == "hook.html":
            await route.fulfill(status=200, content_type="text/html", body=HOOK_PAGE)
        elif name == "react-shim.js":
            await route.fulfill(status=200, content_type="text/javascript", body=HOOK_SHIM)
        else:
            await route.fulfill(
                status=200, content_type="text/javascript", body=umd[name].read_text()
            )

    await web.page.route("**/hook.html*", serve)
    await web.page.route("**/vendor/*", serve)
    query = urlencode({"task": task_id, "options": json.dumps(options or {})})
    await web.page.goto(f"{server.url}/hook.html?{query}")


async def renders(web: PageWatcher) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = await web.page.evaluate("window.__renders")
    return out


async def rendered_versions(web: PageWatcher) -> list[int]:
    seen: list[int] = []
    for r in await renders(web):
        if r["version"] is not None and (not seen or seen[-1] != r["version"]):
            seen.append(r["version"])
    return seen


async def _rendered(web: PageWatcher, version: int) -> bool:
    return version in await rendered_versions(web)


@pytest.mark.parametrize("refresh_ahead", [0, 10000], ids=["on-expiry", "ahead"])
async def test_hook_runs_through_token_expiries_with_every_version(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer, refresh_ahead: int
) -> None:
    await web.page.expose_function("nextToken", short_tokens(server, ttl=2))
    await create_task(sql, "hk", owner=DEMO_USER, state="queued", progress=0.0)
    await open_hook_page(web, server, "hk", {"refreshAhead": refresh_ahead})
    await wait_until(lambda: _rendered(web, 1), "the snapshot")
    last = 1
    started = time.monotonic()
    while time.monotonic() - started < 6:
        last = await bump(sql, "hk")
        await wait_until(lambda v=last: _rendered(web, v), f"version {last}")
        await asyncio.sleep(0.1)
    await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'hk'")
    await wait_until(lambda: _last_render_has(web, isComplete=True, status="closed"), "closed")
    assert_each_version_once(await rendered_versions(web), 1, last + 1)
    reasons = [(r["status"], r["reason"]) for r in await renders(web)]
    if refresh_ahead:
        assert ("reconnecting", "token_expired") not in reasons, reasons
    else:
        assert ("reconnecting", "token_expired") in reasons, reasons
    assert (await renders(web))[-1]["reason"] == "complete"
    assert len(web.stream_requests("/api/v1/sse/tasks/hk/progress")) >= 3


async def _last_render_has(web: PageWatcher, **want: Any) -> bool:
    rs = await renders(web)
    return bool(rs) and all(rs[-1][k] == v for k, v in want.items())


async def test_hook_ready_status_cancel_and_no_request_after_the_end(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER))
    await create_task(sql, "hc", owner=DEMO_USER, state="running", progress=5.0)
    await open_hook_page(web, server, "hc")
    await wait_until(lambda: _last_render_has(web, ready=True), "ready")
    # The change written the moment `ready` shows must arrive: nothing falls in between.
    await bump(sql, "hc")
    await wait_until(lambda: _rendered(web, 2), "the change right after ready")
    rs = await renders(web)
    first_ready = next(i for i, r in enumerate(rs) if r["ready"])
    assert all(r["version"] is None for r in rs[:first_ready] if not r["ready"])
    assert rs[first_ready]["version"] == 1 and rs[first_ready]["status"] == "live", rs
    assert rs[0]["status"] == "connecting" and rs[0]["ready"] is False

    assert await web.page.evaluate("window.cancelTask()") == {"ok": "cancelled"}
    await wait_until(lambda: _last_render_has(web, status="closed"), "closed")
    last = (await renders(web))[-1]
    assert last["isComplete"] and last["result"] == "cancelled" and last["reason"] == "complete"
    assert await rendered_versions(web) == [1, 2, 3]
    requests_at_end = len(web.requests)
    again = await web.page.evaluate("window.cancelTask()")
    assert again == {"kind": "server", "status": 409, "message": "Task is finished"}
    await asyncio.sleep(2)  # retry is 300 ms here: a reconnect or a poll would show
    assert web.requests[requests_at_end:] == [f"{server.url}/api/v1/tasks/hc/cancel"]
    assert server.runtime.broker.subscriber_count == 0


async def test_hook_reports_the_polling_fallback(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    await web.page.route("**/api/v1/sse/**", lambda route: route.abort())
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER))
    await create_task(sql, "hp", owner=DEMO_USER, state="queued", progress=0.0)
    await open_hook_page(web, server, "hp")
    await wait_until(lambda: _last_render_has(web, status="polling", ready=True), "polling")
    await bump(sql, "hp")
    await wait_until(lambda: _rendered(web, 2), "a change by long poll")
    assert (await renders(web))[-1]["transport"] == "poll"
    await web.page.evaluate("window.unmount()")


# ---- 2. one connection for all tabs -----------------------------------------------------------

HUB_START = """async ([ids]) => {
  const { shareConnection } = await import("/static/shared.js");
  window.__seen = {}; window.__ends = {}; window.__leader = false;
  window.__hub = shareConnection({
    getToken: () => window.nextToken(),
    onLeader: (v) => { window.__leader = v; },
  });
  window.watchOne = (id) => {
    window.__seen[id] = window.__seen[id] ?? [];
    window.__hub.watch(id, {
      onProgress: (p) => window.__seen[id].push(p.version),
      onComplete: (c) => { window.__ends[id] = c.state; },
      onError: (e) => { window.__ends[id] = e.kind; },
    });
  };
  for (const id of ids) window.watchOne(id);
  return window.__hub.shared;
}"""


@contextlib.asynccontextmanager
async def tabs(
    browser: Browser,  # noqa: F811
    server: LiveServer,
    count: int,
    init_script: str | None = None,
) -> AsyncIterator[list[Any]]:
    """``count`` pages of one browser context (one origin, one profile), on the server's page."""
    context = await browser.new_context()
    try:
        if init_script:
            await context.add_init_script(init_script)
        await context.expose_function("nextToken", lambda: server.token(DEMO_USER))
        pages = []
        for _ in range(count):
            page = await context.new_page()
            await page.goto(f"{server.url}/")
            pages.append(page)
        yield pages
    finally:
        await context.close()


async def seen_by(page: Any, task_id: str) -> list[int]:
    seen: list[int] = await page.evaluate("id => window.__seen[id] ?? []", task_id)
    return seen


async def all_see(pages: list[Any], task_id: str, version: int) -> None:
    async def check() -> bool:
        for page in pages:
            if version not in await seen_by(page, task_id):
                return False
        return True

    await wait_until(check, f"every page sees {task_id} v{version}", timeout=15)


async def one_stream(server: LiveServer) -> None:
    # A replaced stream closes once its successor is open: wait for that, then it must stay one.
    await wait_until(
        lambda: _eq(server.runtime.broker.subscriber_count, 1), "exactly one stream", timeout=5
    )


async def _eq(a: int, b: int) -> bool:
    return a == b


async def test_ten_tabs_share_one_stream_and_survive_the_leader_closing(
    browser: Browser,  # noqa: F811
    sql: asyncpg.Connection,
    server: LiveServer,
) -> None:
    for tid in ("s1", "s2", "p3"):
        await create_task(sql, tid, owner=DEMO_USER, state="queued", progress=0.0)
    async with tabs(browser, server, 10) as pages:
        stream_requests: list[str] = []
        for page in pages:
            page.on(
                "request",
                lambda req: stream_requests.append(req.url) if "/api/v1/sse/" in req.url else None,
            )
        for page in pages:
            assert await page.evaluate(HUB_START, [["s1", "s2"]]) is True
        last = {"s1": 1, "s2": 1}
        for tid in last:
            await all_see(pages, tid, 1)
        await one_stream(server)
        leaders = [p for p in pages if await p.evaluate("window.__leader")]
        assert len(leaders) == 1
        # Every tab shows the leader's connection status.
        await wait_until(lambda: _all_live(pages), "every tab's status live")
        assert len(stream_requests) == 1, stream_requests

        async def round_of(tids: list[str], live: list[Any]) -> None:
            for tid in tids:
                last[tid] = await bump(sql, tid)
            for tid in tids:
                await all_see(live if tid != "p3" else [follower], tid, last[tid])

        follower = next(p for p in pages if p is not leaders[0])
        for _ in range(3):
            await round_of(["s1", "s2"], pages)
        # A follower adds a task: the leader's one stream changes its id set, resuming.
        await follower.evaluate("window.watchOne('p3')")
        last["p3"] = 1
        await all_see([follower], "p3", 1)
        await round_of(["s1", "p3"], pages)
        await one_stream(server)
        # The leader's page closes while a change is on its way.
        last["s1"] = await bump(sql, "s1")
        await leaders[0].close()
        rest = [p for p in pages if p is not leaders[0]]
        await wait_until(lambda: _count_leaders(rest, 1), "a new leader")
        await all_see(rest, "s1", last["s1"])
        for _ in range(3):
            await round_of(["s1", "s2", "p3"], rest)
        await one_stream(server)
        # A tab opened now, with nothing changing: it gets the last state at once from the tabs.
        late = await rest[0].context.new_page()
        await late.goto(f"{server.url}/")
        await late.evaluate(HUB_START, [["s2"]])
        await all_see([late], "s2", last["s2"])
        assert await seen_by(late, "s2") == [last["s2"]]
        await late.close()
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'success' WHERE owner_id = $1", DEMO_USER
        )
        for tid in last:
            last[tid] += 1
            await all_see(rest if tid != "p3" else [follower], tid, last[tid])
        for page in rest:
            for tid in ("s1", "s2"):
                assert_each_version_once(await seen_by(page, tid), 1, last[tid])
            assert await page.evaluate("window.__ends") == (
                {"s1": "success", "s2": "success", "p3": "success"}
                if page is follower
                else {"s1": "success", "s2": "success"}
            )
        assert_each_version_once(await seen_by(follower, "p3"), 1, last["p3"])
        # One stream at a time: the first leader's, its replacement for the new id set, the new
        # leader's (token refreshes would add one each; these tokens last an hour).
        assert len(stream_requests) == 3, stream_requests
        print(f"stream requests from 10 tabs: {len(stream_requests)}")


async def _all_live(pages: list[Any]) -> bool:
    return all([await p.evaluate("window.__hub.status") == "live" for p in pages])


async def _count_leaders(pages: list[Any], n: int) -> bool:
    return sum([await p.evaluate("window.__leader") for p in pages]) == n


async def test_tabs_without_web_locks_each_stream_alone(
    browser: Browser,  # noqa: F811
    sql: asyncpg.Connection,
    server: LiveServer,
) -> None:
    await create_task(sql, "f1", owner=DEMO_USER, state="queued", progress=0.0)
    no_locks = "Object.defineProperty(Navigator.prototype, 'locks', { get: () => undefined });"
    async with tabs(browser, server, 3, init_script=no_locks) as pages:
        for page in pages:
            assert await page.evaluate(HUB_START, [["f1"]]) is False
        await all_see(pages, "f1", 1)
        assert server.runtime.broker.subscriber_count == 3
        v = await bump(sql, "f1")
        await all_see(pages, "f1", v)
        for page in pages:
            assert await seen_by(page, "f1") == [1, 2]
            assert await page.evaluate("window.__leader") is True
