"""The JavaScript client and the demo page in a real headless Chromium (Debian's, via Playwright).

Each test opens the page of a real server, writes task rows with plain SQL the way a worker would,
and reads what a person would see: the bar, the state, the ETA, the connection indicator.
Network failures are made with ``page.route``, in the browser, so the server stays honest.

Needs ``scripts/setup-browser.sh`` (chromium and tests/browser/node_modules); `.ci/run` calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from server.demo import DEMO_USER
from tests import conftest
from tests.conftest import LiveServer, create_task, run_server

CHROMIUM = os.environ.get("TASKSTREAM_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
NODE_MODULES = ROOT / "tests" / "browser" / "node_modules"

expect.set_options(timeout=10_000)

# Recorded in the page before any of its scripts run: every value the connection indicator
# takes, and how many EventSource objects the client creates.
INSTRUMENT = """
window.__statusLog = [];
window.__eventSources = 0;
if (window.EventSource) {
  const Native = window.EventSource;
  window.EventSource = class extends Native {
    constructor(...args) { super(...args); window.__eventSources += 1; }
  };
}
document.addEventListener("DOMContentLoaded", () => {
  const el = document.getElementById("connection");
  if (!el) return;
  new MutationObserver(() => window.__statusLog.push(el.dataset.status))
    .observe(el, { attributes: true, attributeFilter: ["data-status"] });
});
"""


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        try:
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
            b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except Exception as exc:
            raise RuntimeError(f"cannot start {CHROMIUM}: run scripts/setup-browser.sh") from exc
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Demo mode for the page's token; a short retry so reconnects happen within a test.
    return {"demo": True, "demo_speed": 5.0, "retry_ms": 300}


class PageWatcher:
    """A browser page plus what it sent and what went wrong in it."""

    def __init__(self, page: Page, server: LiveServer) -> None:
        self.page = page
        self.server = server
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("request", lambda req: self.requests.append(req.url))

    def card(self, task_id: str) -> Any:
        return self.page.locator(f'li.task[data-task-id="{task_id}"]')

    def stream_requests(self, fragment: str = "/api/v1/sse/") -> list[str]:
        return [u for u in self.requests if fragment in u]

    async def open(self, query: str = "", mode: str = "multi") -> None:
        """Open the demo page; mode "single" makes it use one watchTask per task."""
        if mode == "single":
            query = (query + "&" if query else "?") + "stream=single"
        await self.page.goto(f"{self.server.url}/{query}")
        await expect(self.page.locator("body")).to_have_attribute("data-ready", "true")

    async def status_log(self) -> list[str]:
        log: list[str] = await self.page.evaluate("window.__statusLog")
        return log

    async def bar_fill_ratio(self, task_id: str) -> float:
        ratio: float = (
            await self.card(task_id)
            .locator(".fill")
            .evaluate(
                "el => el.getBoundingClientRect().width"
                " / el.parentElement.getBoundingClientRect().width"
            )
        )
        return ratio

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@contextlib.asynccontextmanager
async def page_for(browser: Browser, server: LiveServer) -> AsyncIterator[PageWatcher]:
    context = await browser.new_context(viewport={"width": 1000, "height": 760})
    try:
        page = await context.new_page()
        await page.add_init_script(INSTRUMENT)
        watcher = PageWatcher(page, server)
        yield watcher
        assert watcher.errors == [], f"uncaught errors in the page: {watcher.errors}"
    finally:
        await context.close()


@pytest.fixture
async def web(browser: Browser, server: LiveServer) -> AsyncIterator[PageWatcher]:
    async with page_for(browser, server) as watcher:
        yield watcher


async def set_task(sql: asyncpg.Connection, task_id: str, **fields: Any) -> None:
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
    await sql.execute(
        f"UPDATE taskstream.tasks SET {assignments} WHERE id = $1", task_id, *fields.values()
    )


async def run_to_success(web: PageWatcher, sql: asyncpg.Connection, task_id: str) -> None:
    """Advance the task like a worker and check every step on screen, through to complete."""
    card = web.card(task_id)
    await set_task(sql, task_id, state="downloading", progress=12.5, estimated_time=90)
    await expect(card.locator(".state")).to_have_text("downloading")
    await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "12")
    await set_task(sql, task_id, state="transcribing", progress=40.0, estimated_time=71)
    await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "40")
    await expect(card.locator(".percent")).to_have_text("40%")
    await expect(card.locator(".eta")).to_have_text("ETA 1m 11s")
    await set_task(sql, task_id, state="success", progress=100.0, estimated_time=0)
    await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "100")
    await expect(card).to_have_attribute("data-state", "success")
    await expect(card.locator(".outcome")).to_have_text("✓ complete")
    # The bar is drawn full, not just labelled so (the width animates for 0.3 s).
    for _ in range(40):
        if await web.bar_fill_ratio(task_id) > 0.995:
            break
        await asyncio.sleep(0.05)
    assert await web.bar_fill_ratio(task_id) > 0.995


# The page shares one connection for all its tasks (watchTasks, the multi-task stream) unless told
# to use one watchTask per task; the tests that matter run both ways.
MODES = pytest.mark.parametrize("mode", ["multi", "single"])


# ---- the main path ------------------------------------------------------------------------------


@MODES
async def test_page_shows_live_progress_until_complete(
    web: PageWatcher, sql: asyncpg.Connection, mode: str
) -> None:
    await create_task(sql, "job_live", owner=DEMO_USER, state="queued")
    await web.open("?watch=job_live", mode)
    card = web.card("job_live")
    await expect(card.locator(".state")).to_have_text("queued")
    await expect(web.page.locator("#connection")).to_have_attribute("data-status", "live")
    await expect(web.page.locator("#connection-text")).to_have_text("live · 1 task, 1 connection")
    await expect(card.locator(".transport")).to_have_text("eventsource · live")
    await run_to_success(web, sql, "job_live")
    # The stream ended with `complete`: the client closed it, nothing is open any more.
    await expect(web.page.locator("#connection")).to_have_attribute("data-status", "idle")
    await web.screenshot(f"complete-{mode}.png")
    assert len(web.stream_requests()) == 1


async def test_failed_task_shows_its_error(web: PageWatcher, sql: asyncpg.Connection) -> None:
    await create_task(sql, "job_bad", owner=DEMO_USER, state="transcribing", progress=55.0)
    await web.open("?watch=job_bad")
    card = web.card("job_bad")
    await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "55")
    await set_task(sql, "job_bad", state="failed", error="decoder crashed")
    await expect(card).to_have_attribute("data-state", "failed")
    await expect(card.locator(".outcome")).to_have_text("✗ failed: decoder crashed")


async def test_demo_button_runs_several_tasks_at_once(
    web: PageWatcher, sql: asyncpg.Connection
) -> None:
    # Tasks in every kind of state, for the screenshot, next to ones the button starts.
    await create_task(sql, "import_2026_q3", owner=DEMO_USER, state="queued")
    await create_task(
        sql,
        "export_report",
        owner=DEMO_USER,
        state="transcribing",
        progress=40.0,
        estimated_time=71,
    )
    await create_task(sql, "nightly_backup", owner=DEMO_USER, state="failed", error="disk full")
    await create_task(sql, "video_0042", owner=DEMO_USER, state="success", progress=100.0)
    await web.open("?watch=video_0042,nightly_backup,export_report,import_2026_q3")
    await expect(web.card("export_report").locator(".eta")).to_have_text("ETA 1m 11s")
    # Two tasks still running, on one shared connection.
    await expect(web.page.locator("#connection-text")).to_have_text("live · 2 tasks, 1 connection")
    await expect(web.card("nightly_backup").locator(".outcome")).to_have_text("✗ failed: disk full")
    await web.screenshot("demo-page.png")

    for _ in range(3):
        await web.page.click("#start-demo")
    demo_cards = web.page.locator('li.task[data-task-id^="demo_"]')
    await expect(demo_cards).to_have_count(3)
    # The simulated worker (5x speed here) takes each through its states to an end.
    for i in range(3):
        await expect(demo_cards.nth(i)).to_have_attribute(
            "data-state", re.compile("^(success|failed)$"), timeout=20_000
        )
    states = await demo_cards.evaluate_all("els => els.map(el => el.dataset.state)")
    assert set(states) <= {"success", "failed"}, states
    rows = await sql.fetch(
        "SELECT owner_id, state, version FROM taskstream.tasks WHERE id LIKE 'demo\\_%'"
    )
    assert len(rows) == 3
    assert all(r["owner_id"] == DEMO_USER and r["version"] >= 4 for r in rows), rows


async def test_page_without_demo_mode_takes_a_pasted_token(
    browser: Browser, database_url: str, sql: asyncpg.Connection
) -> None:
    async with run_server(conftest.make_settings(database_url)) as server:
        async with page_for(browser, server) as web:
            await create_task(sql, "job_paste", owner="alice", state="transcribing", progress=30.0)
            await web.open()
            await expect(web.page.locator("#start-demo")).to_be_hidden()
            await web.page.fill("#token", server.token("alice"))
            await web.page.fill("#task-id", "job_paste")
            await web.page.click("#watch-form button[type=submit]")
            card = web.card("job_paste")
            await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "30")
            await set_task(sql, "job_paste", state="success", progress=100.0)
            await expect(card.locator(".outcome")).to_have_text("✓ complete")


# ---- fallbacks ----------------------------------------------------------------------------------


@MODES
async def test_fetch_fallback_when_eventsource_fails(
    web: PageWatcher, sql: asyncpg.Connection, mode: str
) -> None:
    # EventSource carries the token in the URL; fetch() sends the Authorization header instead.
    await web.page.route(lambda url: "access_token=" in url, lambda route: route.abort())
    await create_task(sql, "job_fetch", owner=DEMO_USER, state="queued")
    await web.open("?watch=job_fetch", mode)
    card = web.card("job_fetch")
    await expect(card.locator(".transport")).to_have_text("fetch · live")
    await expect(web.page.locator("#connection")).to_have_attribute("data-status", "live")
    await run_to_success(web, sql, "job_fetch")
    streams = web.stream_requests()
    assert len(streams) == 2 and "access_token=" in streams[0] and "access_token" not in streams[1]


@MODES
async def test_polling_fallback_completes_when_sse_fails(
    web: PageWatcher, sql: asyncpg.Connection, mode: str
) -> None:
    await web.page.route("**/api/v1/sse/**", lambda route: route.abort())
    await create_task(sql, "job_poll", owner=DEMO_USER, state="queued")
    await web.open("?watch=job_poll", mode)
    card = web.card("job_poll")
    await expect(web.page.locator("#connection")).to_have_attribute("data-status", "polling")
    await expect(card.locator(".transport")).to_have_text("poll · polling")
    await web.screenshot(f"polling-fallback-{mode}.png")
    await run_to_success(web, sql, "job_poll")
    polls = web.stream_requests("/api/v1/tasks/job_poll")
    assert polls and all("wait=25" in u for u in polls)


# ---- no close on transient errors; close on the real ends ---------------------------------------


@MODES
@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
async def test_dropped_stream_reconnects_instead_of_closing(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer, transport: str, mode: str
) -> None:
    if transport == "fetch":
        await web.page.route(lambda url: "access_token=" in url, lambda route: route.abort())
    await create_task(sql, "job_drop", owner=DEMO_USER, state="transcribing", progress=10.0)
    await web.open("?watch=job_drop", mode)
    card = web.card("job_drop")
    await expect(card.locator(".transport")).to_have_text(f"{transport} · live")
    await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "10")

    # The server ends the stream without a final event, as a restart or a proxy would.
    for sub in server.runtime.broker.subscriptions:
        sub.close("test: drop")
    for _ in range(100):
        if "reconnecting" in await web.status_log():
            break
        await asyncio.sleep(0.05)
    assert "reconnecting" in await web.status_log()
    await expect(card.locator(".transport")).to_have_text(f"{transport} · live")

    await set_task(sql, "job_drop", progress=20.0)
    await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "20")
    await run_to_success(web, sql, "job_drop")
    log = await web.status_log()
    assert log.index("reconnecting") < len(log) - 1 - log[::-1].index("live"), log
    if transport == "eventsource":
        # The browser's own reconnect, on the same EventSource: the client did not close it.
        assert await web.page.evaluate("window.__eventSources") == 1
    # One stream before the drop and one after it; resumed with the last id, not the snapshot.
    assert len(web.stream_requests()) == 2 + (transport == "fetch")


@MODES
async def test_not_found_closes_without_a_reconnect_loop(web: PageWatcher, mode: str) -> None:
    await web.open("?watch=no_such_task", mode)
    card = web.card("no_such_task")
    await expect(card).to_have_attribute("data-state", "not_found")
    await expect(card.locator(".outcome")).to_have_text("✗ Task not found")
    await expect(web.page.locator("#connection")).to_have_attribute("data-status", "idle")
    # retry is 300 ms here: a client that reconnected would have made about ten requests.
    await asyncio.sleep(3)
    assert len(web.stream_requests()) == 1


@MODES
async def test_rejected_token_is_fatal_and_stops(
    web: PageWatcher, server: LiveServer, mode: str
) -> None:
    expired = server.token(DEMO_USER, ttl=-120)

    async def stale_token(route: Route) -> None:
        body = {"token": expired, "user_id": DEMO_USER, "expires_in": 3600}
        await route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

    await web.page.route("**/demo/token", stale_token)
    await web.open("?watch=job_auth", mode)
    card = web.card("job_auth")
    await expect(card).to_have_attribute("data-state", "error")
    await expect(card.locator(".state")).to_have_text("auth")
    await expect(card.locator(".outcome")).to_have_text("✗ Token expired")
    await expect(web.page.locator("#connection")).to_have_attribute("data-status", "idle")
    await asyncio.sleep(2)
    # EventSource (cannot see the 401), fetch (sees it), fetch with a fresh token: then it stops.
    assert len(web.stream_requests()) == 3


@MODES
async def test_stream_timeout_resumes_by_itself(
    browser: Browser, database_url: str, sql: asyncpg.Connection, mode: str
) -> None:
    settings = conftest.make_settings(database_url, demo=True, retry_ms=200, stream_timeout=1.0)
    async with run_server(settings) as server, page_for(browser, server) as web:
        await create_task(sql, "job_long", owner=DEMO_USER, state="transcribing", progress=5.0)
        await web.open("?watch=job_long", mode)
        card = web.card("job_long")
        await expect(card.locator(".transport")).to_contain_text("resumed after timeout ×1")
        await set_task(sql, "job_long", progress=66.0)
        await expect(card.locator(".bar")).to_have_attribute("aria-valuenow", "66")
        await expect(card.locator(".transport")).to_contain_text("eventsource · live · resumed")
        assert await web.page.evaluate("window.__eventSources") == 1
        await set_task(sql, "job_long", state="success", progress=100.0)
        await expect(card).to_have_attribute("data-state", "success")


# ---- the client API driven directly -----------------------------------------------------------

# Starts a watch in the page and records every callback in window.__events.
START_WATCH = """async ([fn, ids, extra]) => {
  const mod = await import("/static/taskstream.js");
  window.__events = [];
  const log = (kind) => (value) => window.__events.push([kind, value instanceof Error
    ? { kind: value.kind, message: value.message, taskId: value.taskId } : value]);
  const options = {
    getToken: () => window.nextToken(),
    onProgress: log("progress"), onComplete: log("complete"), onError: log("error"),
    onTimeout: log("timeout"), onStatus: log("status"), onAllDone: log("done"),
    ...extra,
  };
  if (extra.staticToken) { delete options.getToken; options.token = await window.nextToken(); }
  window.__handle = fn === "watchTasks"
    ? mod.watchTasks(ids, options) : mod.watchTask(ids[0], options);
}"""


async def events_of(web: PageWatcher, kind: str | None = None) -> list[Any]:
    events: list[list[Any]] = await web.page.evaluate("window.__events")
    return [v for k, v in events if k == kind] if kind else events


async def wait_for_event(web: PageWatcher, kind: str, count: int = 1, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.05)):
        if len(await events_of(web, kind)) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} event: {await events_of(web)}")


async def test_watch_tasks_shares_one_connection_and_ends_per_task(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    await create_task(sql, "m_a", owner=DEMO_USER, state="queued")
    await create_task(sql, "m_b", owner=DEMO_USER, state="queued")
    await create_task(sql, "m_other", owner="mallory", state="queued")  # not the caller's
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER))
    await web.open()
    await web.page.evaluate(START_WATCH, ["watchTasks", ["m_a", "m_b", "m_other", "m_gone"], {}])
    await wait_for_event(web, "progress", 2)
    errors = await events_of(web, "error")
    assert sorted(e["taskId"] for e in errors) == ["m_gone", "m_other"]
    assert {e["kind"] for e in errors} == {"not_found"}

    await set_task(sql, "m_a", state="transcribing", progress=50.0)
    # (The server keeps only the latest state per task in a mailbox: wait, or it may coalesce.)
    await wait_for_event(web, "progress", 3)
    await set_task(sql, "m_a", state="success", progress=100.0)
    await wait_for_event(web, "complete", 1)
    assert await web.page.evaluate("window.__handle.status") == "live"  # m_b still open
    await set_task(sql, "m_b", state="failed", error="no audio track")
    await wait_for_event(web, "done")
    completes = await events_of(web, "complete")
    assert completes == [
        {"task_id": "m_a", "state": "success"},
        {"task_id": "m_b", "state": "failed", "error": "no audio track"},
    ]
    progress = [(p["task_id"], p["state"]) for p in await events_of(web, "progress")]
    assert progress == [
        ("m_a", "queued"),
        ("m_b", "queued"),
        ("m_a", "transcribing"),
        ("m_a", "success"),
        ("m_b", "failed"),
    ]
    [results] = await events_of(web, "done")
    assert set(results) == {"m_a", "m_b", "m_other", "m_gone"}
    assert (await events_of(web, "status"))[-1] == "closed"
    await asyncio.sleep(1.5)  # retry is 300 ms: a reconnect would show by now
    streams = web.stream_requests()
    assert len(streams) == 1 and "/api/v1/sse/tasks?ids=m_a%2Cm_b%2Cm_other%2Cm_gone" in streams[0]


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
@pytest.mark.parametrize("fn", ["watchTask", "watchTasks"])
async def test_token_expiry_mid_stream_reconnects_with_a_fresh_token(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer, transport: str, fn: str
) -> None:
    server.runtime.verifier.leeway = 0  # so a 2-second token ends the stream in 2 seconds
    issued: list[str] = []

    def next_token() -> str:
        issued.append(server.token(DEMO_USER, ttl=2 if not issued else 600))
        return issued[-1]

    await web.page.expose_function("nextToken", next_token)
    await create_task(sql, "job_exp", owner=DEMO_USER, state="transcribing", progress=10.0)
    await web.open()
    # refreshAhead 0: no refresh before expiry, so the server ends the stream (the path tested
    # here; refreshing ahead is tested in test_browser_day.py).
    extra = {"transports": [transport, "poll"], "refreshAhead": 0}
    await web.page.evaluate(START_WATCH, [fn, ["job_exp"], extra])
    await wait_for_event(web, "progress")
    await asyncio.sleep(3)  # the first token expires; the server ends that stream
    await set_task(sql, "job_exp", progress=70.0)
    await wait_for_event(web, "progress", 2)
    await set_task(sql, "job_exp", state="success", progress=100.0)
    await wait_for_event(web, "complete")
    assert await events_of(web, "error") == []
    assert [p["progress"] for p in await events_of(web, "progress")] == [10, 70, 100]
    statuses = await events_of(web, "status")
    assert "reconnecting" in statuses and statuses[-1] == "closed"
    assert len(issued) >= 2
    if transport == "eventsource":
        # The stale URL was replaced by a new EventSource; it resumed from the last id.
        assert await web.page.evaluate("window.__eventSources") == 2


async def test_token_expiry_with_a_fixed_token_is_the_end(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    server.runtime.verifier.leeway = 0
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER, ttl=2))
    await create_task(sql, "job_fixed", owner=DEMO_USER, state="queued")
    await web.open()
    await web.page.evaluate(START_WATCH, ["watchTask", ["job_fixed"], {"staticToken": True}])
    await wait_for_event(web, "progress")
    await wait_for_event(web, "error", timeout=6)
    [error] = await events_of(web, "error")
    assert error["kind"] == "auth" and error["message"] == "Token expired"
    await asyncio.sleep(1)
    assert len(web.stream_requests()) == 1


async def test_long_poll_waits_on_the_server_instead_of_hammering_it(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    await create_task(sql, "lp", owner=DEMO_USER, state="transcribing", progress=5.0)
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER))
    await web.open()
    await web.page.evaluate(START_WATCH, ["watchTask", ["lp"], {"transports": ["poll"]}])
    await wait_for_event(web, "progress")
    await asyncio.sleep(3)  # nothing changes: one request is held open the whole time
    polls = web.stream_requests("/api/v1/tasks/lp")
    assert len(polls) == 2 and "wait=25&after_version=1" in polls[1], polls
    await set_task(sql, "lp", progress=60.0)  # answers the held request at once
    await wait_for_event(web, "progress", 2)
    await set_task(sql, "lp", state="cancelled")
    await wait_for_event(web, "complete")
    assert await events_of(web, "complete") == [{"task_id": "lp", "state": "cancelled"}]
    assert "polling" in await events_of(web, "status")


async def test_watch_tasks_polls_with_etags_when_streaming_fails(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    await web.page.route("**/api/v1/sse/**", lambda route: route.abort())
    await create_task(sql, "p_a", owner=DEMO_USER, state="queued")
    await create_task(sql, "p_b", owner=DEMO_USER, state="queued")
    conditional: list[str] = []
    web.page.on(
        "request",
        lambda req: conditional.append(req.url) if "if-none-match" in req.headers else None,
    )
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER))
    await web.open()
    await web.page.evaluate(
        START_WATCH, ["watchTasks", ["p_a", "p_b", "p_gone"], {"pollInterval": 300}]
    )
    await wait_for_event(web, "progress", 2)
    await wait_for_event(web, "error")
    [gone] = await events_of(web, "error")
    assert gone == {"kind": "not_found", "message": "Task not found", "taskId": "p_gone"}
    await set_task(sql, "p_a", state="success", progress=100.0)
    await set_task(sql, "p_b", state="failed", error="codec")
    await wait_for_event(web, "done")
    assert sorted(c["task_id"] for c in await events_of(web, "complete")) == ["p_a", "p_b"]
    assert "polling" in await events_of(web, "status")
    assert conditional, "rounds of polling send If-None-Match"


@pytest.mark.parametrize(
    ("task", "token_ttl", "kind", "message"),
    [
        ("no_such_task", 600, "not_found", "Task not found"),
        ("pa", -120, "auth", "Token expired"),
    ],
)
async def test_polling_ends_on_not_found_and_on_a_refused_token(
    web: PageWatcher,
    sql: asyncpg.Connection,
    server: LiveServer,
    task: str,
    token_ttl: int,
    kind: str,
    message: str,
) -> None:
    await create_task(sql, "pa", owner=DEMO_USER, state="queued")
    await web.page.expose_function("nextToken", lambda: server.token(DEMO_USER, ttl=token_ttl))
    await web.open()
    await web.page.evaluate(START_WATCH, ["watchTask", [task], {"transports": ["poll"]}])
    await wait_for_event(web, "error")
    [error] = await events_of(web, "error")
    assert (error["kind"], error["message"]) == (kind, message)
    await asyncio.sleep(1)
    # Not found: one request. A refused token: one more with a fresh one, then it stops.
    assert len(web.stream_requests(f"/api/v1/tasks/{task}")) == (1 if kind == "not_found" else 2)


# ---- the module's own pieces --------------------------------------------------------------------


async def test_sse_parser_follows_the_event_stream_format(web: PageWatcher) -> None:
    await web.open()
    result = await web.page.evaluate(
        """async () => {
          const { SSEParser } = await import("/static/taskstream.js");
          const run = (chunks) => {
            const events = []; const retries = [];
            const p = new SSEParser((e) => events.push(e), (ms) => retries.push(ms));
            for (const c of chunks) p.push(c);
            p.end();
            return { events, retries };
          };
          const whole = "\\ufeffretry: 3412\\n\\n: heartbeat\\n\\nevent: progress\\nid: 7\\n" +
            "data: {\\"a\\":1}\\n\\ndata: line one\\ndata:line two\\n\\nevent: complete\\n" +
            "data: x\\r\\n\\r\\nevent: error\\rdata: y\\r\\rdata: unfinished";
          const bySize = [1, 2, 3, 7, whole.length].map((n) => {
            const chunks = [];
            for (let i = 0; i < whole.length; i += n) chunks.push(whole.slice(i, i + n));
            return JSON.stringify(run(chunks));
          });
          return { one: run([whole]), same: bySize.every((r) => r === bySize[0]) };
        }"""
    )
    assert result["same"], "the result must not depend on how the bytes were chunked"
    assert result["one"]["retries"] == [3412]
    assert result["one"]["events"] == [
        {"type": "progress", "data": '{"a":1}', "id": "7"},
        {"type": "message", "data": "line one\nline two", "id": "7"},
        {"type": "complete", "data": "x", "id": "7"},
        {"type": "error", "data": "y", "id": "7"},
    ]


async def test_watch_task_validates_its_arguments(web: PageWatcher) -> None:
    await web.open()
    errors = await web.page.evaluate(
        """async () => {
          const { watchTask, watchTasks } = await import("/static/taskstream.js");
          const attempts = [
            () => watchTask("", { token: "t" }),
            () => watchTask("t1", {}),
            () => watchTask("t1", { token: "t", transports: ["websocket"] }),
            () => watchTasks([], { token: "t" }),
            () => watchTasks(["a,b"], { token: "t" }),
          ];
          return attempts.map((f) => { try { f(); return null; } catch (e) { return e.name; } });
        }"""
    )
    assert errors == ["TypeError"] * 5


REACT_PAGE = """<!doctype html>
<html><head><meta charset="utf-8">
<script src="/vendor/react.production.min.js"></script>
<script src="/vendor/react-dom.production.min.js"></script>
<script type="importmap">{"imports": {"react": "/vendor/react-shim.js"}}</script>
<script type="module">
  import { createElement as h, useState } from "react";
  import { useTaskProgress } from "/static/react.js";
  const tokenResponse = await fetch("/demo/token");
  const { token } = await tokenResponse.json();
  function View({ taskId }) {
    const { progress, isComplete, result, error, status } = useTaskProgress(taskId, token);
    return h("pre", { id: "out" }, JSON.stringify({
      state: progress?.state ?? null, percent: progress?.progress ?? null,
      isComplete, result: result?.state ?? null, error, status }));
  }
  function App() {
    const [shown, setShown] = useState(true);
    window.unmount = () => setShown(false);
    return shown ? h(View, { taskId: new URLSearchParams(location.search).get("task") }) : null;
  }
  ReactDOM.createRoot(document.getElementById("root")).render(h(App));
</script></head><body><div id="root"></div></body></html>
"""

REACT_SHIM = (
    "export const { createElement, useEffect, useRef, useState } = window.React;\n"
    "export default window.React;\n"
)


async def test_react_hook_with_real_react(
    web: PageWatcher, sql: asyncpg.Connection, server: LiveServer
) -> None:
    umd = {
        "react.production.min.js": NODE_MODULES / "react" / "umd" / "react.production.min.js",
        "react-dom.production.min.js": NODE_MODULES
        / "react-dom"
        / "umd"
        / "react-dom.production.min.js",
    }
    for path in umd.values():
        assert path.exists(), f"{path} missing: run scripts/setup-browser.sh"

    async def serve_test_files(route: Route) -> None:
        name = route.request.url.rsplit("/", 1)[-1].split("?")[0]
        if name.startswith("react-test.html"):
            await route.fulfill(status=200, content_type="text/html", body=REACT_PAGE)
        elif name == "react-shim.js":
            await route.fulfill(status=200, content_type="text/javascript", body=REACT_SHIM)
        else:
            await route.fulfill(
                status=200, content_type="text/javascript", body=umd[name].read_text()
            )

    await web.page.route("**/react-test.html*", serve_test_files)
    await web.page.route("**/vendor/*", serve_test_files)
    await create_task(sql, "job_react", owner=DEMO_USER, state="queued")
    await web.page.goto(f"{server.url}/react-test.html?task=job_react")

    async def rendered() -> dict[str, Any]:
        text = await web.page.locator("#out").text_content()
        value: dict[str, Any] = json.loads(text or "null")
        return value

    out = web.page.locator("#out")
    await expect(out).to_contain_text('"status":"live"')
    assert (await rendered())["state"] == "queued"
    await set_task(sql, "job_react", state="transcribing", progress=40.0)
    await expect(out).to_contain_text('"percent":40')
    await set_task(sql, "job_react", state="success", progress=100.0)
    await expect(out).to_contain_text('"isComplete":true')
    assert await rendered() == {
        "state": "success",
        "percent": 100,
        "isComplete": True,
        "result": "success",
        "error": None,
        "status": "closed",
    }

    # Unmounting closes the stream (the server fixture also checks that none leaked).
    await create_task(sql, "job_react2", owner=DEMO_USER, state="queued")
    await web.page.goto(f"{server.url}/react-test.html?task=job_react2")
    await expect(out).to_contain_text('"status":"live"')
    assert server.runtime.broker.subscriber_count == 1
    await web.page.evaluate("window.unmount()")
    for _ in range(50):
        if server.runtime.broker.subscriber_count == 0:
            break
        await asyncio.sleep(0.05)
    assert server.runtime.broker.subscriber_count == 0


def test_type_declarations_compile() -> None:
    tsc = NODE_MODULES / ".bin" / "tsc"
    assert tsc.exists(), f"{tsc} missing: run scripts/setup-browser.sh"
    r = subprocess.run(
        [str(tsc), "-p", str(ROOT / "tests" / "browser" / "tsconfig.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
