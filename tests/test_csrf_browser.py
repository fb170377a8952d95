"""Cross-site request forgery in cookie mode, attempted by a real Chromium.

The victim's session cookie is set for 127.0.0.1. The attacker's page is served by a second
server on another port of the same host: another origin, but the same *site*, so the browser
sends even a ``SameSite=Strict`` cookie along (sibling subdomains are in the same position).
That is the case the cookie's SameSite attribute cannot cover and the Origin check must.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from playwright.async_api import Browser, BrowserContext

from tests.conftest import LiveServer, create_task
from tests.test_browser import browser  # noqa: F401  (the session's Chromium)

COOKIE = "ts_token"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"jwt_cookie": COOKIE}


@contextlib.asynccontextmanager
async def attacker_site(html: str) -> AsyncIterator[str]:
    """A plain HTTP server on 127.0.0.1 that answers every request with ``html``."""
    body = html.encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/"
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.fixture
async def victim(browser: Browser, server: LiveServer) -> AsyncIterator[BrowserContext]:  # noqa: F811
    """A browser profile logged in to taskstream through the cookie."""
    context = await browser.new_context()
    try:
        await context.add_cookies(
            [
                {
                    "name": COOKIE,
                    "value": server.token(),
                    "domain": "127.0.0.1",
                    "path": "/",
                    "httpOnly": True,
                    "sameSite": "Strict",
                }
            ]
        )
        yield context
    finally:
        await context.close()


async def _state(sql: asyncpg.Connection, task_id: str) -> str:
    state: str = await sql.fetchval("SELECT state FROM taskstream.tasks WHERE id = $1", task_id)
    return state


async def test_a_form_on_another_origin_cannot_cancel_a_task(
    server: LiveServer, victim: BrowserContext, sql: asyncpg.Connection
) -> None:
    """Regression: this form cancelled the task (200)."""
    await create_task(sql, "t1", state="running")
    attack = f"""<!doctype html>
    <form id="f" method="POST" enctype="text/plain"
          action="{server.url}/api/v1/tasks/t1/cancel"></form>
    <script>document.getElementById("f").submit()</script>"""
    async with attacker_site(attack) as url:
        page = await victim.new_page()
        async with page.expect_response(lambda r: r.url.endswith("/cancel")) as answer:
            await page.goto(url)
        response = await answer.value
        sent = await response.request.all_headers()
        assert sent["cookie"].startswith(f"{COOKIE}=")  # SameSite did not stop it
        assert response.status == 403
        assert json.loads(await response.body())["error"] == "Cross-site request refused"
    assert await _state(sql, "t1") == "running"


async def test_a_no_cors_fetch_from_another_origin_cannot_create_a_task(
    server: LiveServer, victim: BrowserContext, sql: asyncpg.Connection
) -> None:
    """Regression: an empty text/plain POST (what a no-cors fetch may send) created a task."""
    async with attacker_site("<!doctype html><title>cats</title>") as url:
        page = await victim.new_page()
        await page.goto(url)
        async with page.expect_response(lambda r: r.url.endswith("/api/v1/tasks")) as answer:
            await page.evaluate(
                """url => fetch(url, {method: "POST", mode: "no-cors", credentials: "include",
                                      headers: {"Content-Type": "text/plain"}, body: ""})""",
                f"{server.url}/api/v1/tasks",
            )
        response = await answer.value
        # 403, not 401 "Missing bearer token": the cookie went along.
        assert response.status == 403
    assert await sql.fetchval("SELECT count(*) FROM taskstream.tasks") == 0


async def test_the_sites_own_page_can_cancel_with_the_cookie(
    server: LiveServer, victim: BrowserContext, sql: asyncpg.Connection
) -> None:
    """The browser's own Origin and Sec-Fetch-Site headers pass for a same-origin JSON call."""
    await create_task(sql, "t1", state="running")
    page = await victim.new_page()
    await page.goto(server.url + "/healthz")
    status = await page.evaluate(
        """async () => (await fetch("/api/v1/tasks/t1/cancel",
              {method: "POST", headers: {"Content-Type": "application/json"}})).status"""
    )
    assert status == 200
    assert await _state(sql, "t1") == "cancelled"
