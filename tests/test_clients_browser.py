"""Real Chromium (Debian's, driven by Playwright): native EventSource and the polyfill's browser
build, from the server's own origin, from an allowed second origin and from an unlisted one.

Also the one slow test: every client library stays connected through 60 s of silence with the
default 15 s heartbeat (event-source-polyfill drops a connection after 45 s without data).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from tests.clients import (
    CHROMIUM,
    CHROMIUM_ARGS,
    RequestLog,
    StaticSite,
    install_request_log,
    node_client,
    page_url,
    require_chromium,
    static_site,
)
from tests.conftest import LiveServer, create_task

LINGER_S = 10


@pytest.fixture
def allowed_site(tmp_path: Path) -> Iterator[StaticSite]:
    with static_site(tmp_path / "allowed") as site:
        yield site


@pytest.fixture
def unlisted_site(tmp_path: Path) -> Iterator[StaticSite]:
    with static_site(tmp_path / "unlisted") as site:
        yield site


@pytest.fixture
def settings_overrides(allowed_site: StaticSite) -> dict[str, Any]:
    return {"cors_origins": (allowed_site.origin,)}


@pytest.fixture
async def browser(server: LiveServer) -> AsyncIterator[Browser]:
    """Depends on ``server`` so the browser (and its streams) closes before the server checks
    for leaked subscriptions."""
    require_chromium()
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def _open(browser: Browser, url: str) -> Page:
    # One context per page: separate connection pools, like separate users' browsers.
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(url)
    return page


async def _records(page: Page) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = await page.evaluate("window.__records")
    return records


async def _events(page: Page) -> list[dict[str, Any]]:
    return [r for r in await _records(page) if r["type"] == "event"]


async def _wait_events(page: Page, count: int, timeout: float = 10) -> None:
    try:
        await page.wait_for_function(
            "n => window.__records.filter(r => r.type === 'event').length >= n",
            arg=count,
            timeout=timeout * 1000,
        )
    except PlaywrightTimeoutError:
        raise AssertionError(f"{count} events not seen: {await _records(page)}") from None


def _reconnects_told_to_stop(log: RequestLog, task_id: str, label: str) -> int:
    gets = log.stream_gets(task_id)
    assert gets and gets[0].status == 200, (label, gets)
    again = gets[1:]
    assert len(again) <= 1, f"{label} reconnect loop: {again}"
    for hit in again:
        assert hit.status == (410 if "lastEventId=" in hit.query else 204), (label, hit)
    return len(again)


async def test_browser_clients_see_progress_then_complete_and_stop(
    server: LiveServer, browser: Browser, sql: asyncpg.Connection, allowed_site: StaticSite
) -> None:
    log = install_request_log(server)
    token = server.token()
    pages: dict[tuple[str, str], Page] = {}
    for lib in ("native", "polyfill"):
        for where, origin in (("same", server.url), ("cross", allowed_site.origin)):
            task_id = f"web-{lib}-{where}"
            await create_task(sql, task_id)
            url = page_url(origin, server.stream_url(task_id), token, lib, close_on_end=False)
            pages[(lib, where)] = await _open(browser, url)
    for page in pages.values():
        await _wait_events(page, 1)
    # Each update waits for the previous one to arrive: updates that land together may be
    # merged into the latest by design (conflation), and this test wants every version.
    for seen, progress in ((2, 30), (3, 60)):
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'running', progress = $1 WHERE id LIKE 'web-%'",
            progress,
        )
        for page in pages.values():
            await _wait_events(page, seen)
    await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id LIKE 'web-%'")
    for page in pages.values():
        await _wait_events(page, 5)
    # The pages never call close(): watch what they do for LINGER_S after `complete`.
    await asyncio.sleep(LINGER_S)

    for (lib, where), page in pages.items():
        label = f"{lib}/{where}-origin"
        evs = await _events(page)
        assert [e["event"] for e in evs] == ["progress"] * 4 + ["complete"], (label, evs)
        assert [e["id"] for e in evs[:4]] == ["1", "2", "3", "4"], label
        assert [e["data"]["version"] for e in evs[:4]] == [1, 2, 3, 4], label
        assert [e["data"]["progress"] for e in evs[:3]] == [0, 30, 60], label
        assert evs[4]["data"] == {"state": "success"}, label
        assert await page.evaluate("window.__source.readyState") == 2, label  # CLOSED
        n = _reconnects_told_to_stop(log, f"web-{lib}-{where}", label)
        print(f"{label}: {n} reconnect(s) in {LINGER_S}s after complete")
        gets = log.stream_gets(f"web-{lib}-{where}")
        if where == "cross":
            assert all(h.origin == allowed_site.origin for h in gets), label
        if lib == "polyfill" and where == "cross":
            # The Authorization header makes each request preflighted.
            assert log.preflights(f"web-{lib}-{where}"), label


async def test_browser_clients_stop_after_task_not_found(
    server: LiveServer, browser: Browser, allowed_site: StaticSite
) -> None:
    log = install_request_log(server)
    token = server.token()
    pages = {
        lib: await _open(
            browser,
            page_url(
                allowed_site.origin,
                server.stream_url(f"missing-{lib}"),
                token,
                lib,
                close_on_end=False,
            ),
        )
        for lib in ("native", "polyfill")
    }
    for page in pages.values():
        await _wait_events(page, 1)
    await asyncio.sleep(LINGER_S)
    for lib, page in pages.items():
        evs = await _events(page)
        assert [(e["event"], e["id"], e["data"]) for e in evs] == [
            ("error", "end", {"error": "Task not found"})
        ], lib
        assert await page.evaluate("window.__source.readyState") == 2, lib
        n = _reconnects_told_to_stop(log, f"missing-{lib}", lib)
        print(f"{lib}: {n} reconnect(s) in {LINGER_S}s after not-found")


async def test_browser_clients_are_blocked_from_an_unlisted_origin(
    server: LiveServer, browser: Browser, sql: asyncpg.Connection, unlisted_site: StaticSite
) -> None:
    log = install_request_log(server)
    token = server.token()
    pages = {}
    for lib in ("native", "polyfill"):
        await create_task(sql, f"blocked-{lib}")
        url = page_url(
            unlisted_site.origin,
            server.stream_url(f"blocked-{lib}"),
            token,
            lib,
            close_on_end=False,
        )
        pages[lib] = await _open(browser, url)
    await asyncio.sleep(3)
    for lib, page in pages.items():
        records = await _records(page)
        assert not [r for r in records if r["type"] in ("event", "open")], (lib, records)
        assert [r for r in records if r["type"] == "error"], (lib, records)
    # Native EventSource gives up on a CORS failure; the polyfill's preflight is refused, so its
    # GET (and its token) never reaches the server.
    assert await pages["native"].evaluate("window.__source.readyState") == 2
    assert log.preflights("blocked-polyfill")
    assert log.stream_gets("blocked-polyfill") == []
    for page in pages.values():
        await page.evaluate("window.__source.close()")


async def test_every_client_stays_connected_through_60s_of_silence(
    server: LiveServer, browser: Browser, sql: asyncpg.Connection, allowed_site: StaticSite
) -> None:
    """The default heartbeat (15 s) keeps every client's connection through 60 s without data;
    the polyfill alone would drop it after 45 s. One request per client, then the update."""
    assert server.settings.heartbeat == 15
    log = install_request_log(server)
    token = server.token()
    async with contextlib.AsyncExitStack() as stack:
        nodes = {}
        for lib in ("eventsource", "polyfill"):
            await create_task(sql, f"quiet-node-{lib}")
            nodes[lib] = await stack.enter_async_context(
                node_client(
                    server.stream_url(f"quiet-node-{lib}"),
                    token,
                    lib,
                    close_on_end=True,
                    linger_ms=100,
                )
            )
        pages = {}
        for lib in ("native", "polyfill"):
            await create_task(sql, f"quiet-web-{lib}")
            url = page_url(
                allowed_site.origin,
                server.stream_url(f"quiet-web-{lib}"),
                token,
                lib,
                close_on_end=True,
            )
            pages[lib] = await _open(browser, url)
        for node in nodes.values():
            await node.wait_for(lambda c: len(c.events()) >= 1, 10)
        for page in pages.values():
            await _wait_events(page, 1)
        await asyncio.sleep(62)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id LIKE 'quiet-%'")
        for node in nodes.values():
            await node.wait_exit(10)
        for page in pages.values():
            await _wait_events(page, 3)

    results = {f"node {lib}": node.records for lib, node in nodes.items()}
    results.update({f"chromium {lib}": await _records(page) for lib, page in pages.items()})
    for label, records in results.items():
        events = [r["event"] for r in records if r["type"] == "event"]
        assert events == ["progress", "progress", "complete"], (label, records)
        assert not [r for r in records if r["type"] == "error"], (label, records)
    for task_id in (
        "quiet-node-eventsource",
        "quiet-node-polyfill",
        "quiet-web-native",
        "quiet-web-polyfill",
    ):
        # One request each: nobody dropped the silent connection and reconnected.
        assert len(log.stream_gets(task_id)) == 1, (task_id, log.stream_gets(task_id))
