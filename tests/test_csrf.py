"""Cookie mode (TASKSTREAM_JWT_COOKIE) refuses cross-site changes; bearer requests are unaffected.

The requests carry the headers a browser would add: ``Origin`` on every POST, ``Sec-Fetch-Site``
on every request of a current browser, and the content type an HTML form or a ``no-cors`` fetch
can send (``text/plain``) or that only a preflighted fetch can send (``application/json``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import LiveServer, create_task

COOKIE = "ts_token"
ALLOWED = "http://app.example.test:3000"
EVIL = "http://evil.example.test"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"jwt_cookie": COOKIE, "cors_origins": (ALLOWED,)}


@pytest.fixture
async def browser(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    """A client holding the user's session cookie, as the victim's browser does."""
    async with httpx.AsyncClient(
        cookies={COOKIE: server.token()}, timeout=httpx.Timeout(10.0)
    ) as c:
        yield c


def _cancel(server: LiveServer, task_id: str) -> str:
    return f"{server.url}/api/v1/tasks/{task_id}/cancel"


async def _state(sql: asyncpg.Connection, task_id: str) -> str:
    state: str = await sql.fetchval("SELECT state FROM taskstream.tasks WHERE id = $1", task_id)
    return state


async def test_cross_origin_cancel_with_the_cookie_is_refused(
    server: LiveServer, browser: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """Regression: a form on another site POSTed to .../cancel and the task was cancelled."""
    await create_task(sql, "t1", state="running")
    for headers in (
        {"Origin": EVIL, "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
        {"Origin": EVIL, "Content-Type": "application/json"},  # a JSON type does not help
        {"Origin": "null", "Content-Type": "application/json"},  # sandboxed frame
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
        {"Sec-Fetch-Site": "same-site", "Content-Type": "application/json"},  # a sibling host
        {"Content-Type": "application/json"},  # neither header proves anything
    ):
        r = await browser.post(_cancel(server, "t1"), headers=headers)
        assert r.status_code == 403, (headers, r.text)
        assert r.json()["error"] == "Cross-site request refused"
        assert "Authorization: Bearer" in r.json()["detail"]
    assert await _state(sql, "t1") == "running"


async def test_two_origin_headers_are_refused(
    server: LiveServer, browser: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="running")
    r = await browser.post(
        _cancel(server, "t1"),
        headers=[  # type: ignore[arg-type]
            ("Origin", server.url),
            ("Origin", EVIL),
            ("Content-Type", "application/json"),
        ],
    )
    assert r.status_code == 403
    assert await _state(sql, "t1") == "running"


async def test_cross_origin_text_plain_create_with_the_cookie_is_refused(
    server: LiveServer, browser: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """Regression: an empty text/plain POST (what a no-cors fetch sends) created a task."""
    url = f"{server.url}/api/v1/tasks"
    r = await browser.post(url, content=b"", headers={"Origin": EVIL, "Content-Type": "text/plain"})
    assert r.status_code == 403, r.text
    # Same origin still needs the JSON type: a form cannot send it, an empty body or not.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Origin": server.url}
        if content_type is not None:
            headers["Content-Type"] = content_type
        r = await browser.post(url, content=b"", headers=headers)
        assert r.status_code == 415, (content_type, r.text)
        assert r.json()["error"] == "Unsupported media type"
    assert await sql.fetchval("SELECT count(*) FROM taskstream.tasks") == 0


async def test_same_origin_json_with_the_cookie_is_allowed(
    server: LiveServer, browser: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="running")
    await create_task(sql, "t2", state="running")
    await create_task(sql, "t3", state="running")
    json_type = {"Content-Type": "application/json"}
    r = await browser.post(_cancel(server, "t1"), headers={"Origin": server.url, **json_type})
    assert r.status_code == 200, r.text
    # An https origin for the same host: the browser's view behind a proxy that ends TLS.
    https_origin = server.url.replace("http://", "https://")
    r = await browser.post(_cancel(server, "t2"), headers={"Origin": https_origin, **json_type})
    assert r.status_code == 200, r.text
    # No Origin (a proxy dropped it), but the browser says it is the same origin.
    r = await browser.post(
        _cancel(server, "t3"), headers={"Sec-Fetch-Site": "same-origin", **json_type}
    )
    assert r.status_code == 200, r.text
    r = await browser.post(
        f"{server.url}/api/v1/tasks",
        json={"id": "mine"},
        headers={"Origin": ALLOWED, "Sec-Fetch-Site": "cross-site"},  # a configured frontend
    )
    assert r.status_code == 201, r.text
    assert r.json()["owner_id"] == "alice"


async def test_reads_with_the_cookie_need_no_origin(
    server: LiveServer, browser: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    r = await browser.get(f"{server.url}/api/v1/tasks/t1", headers={"Origin": EVIL})
    assert r.status_code == 200
    assert (await browser.get(server.stream_url("t1"))).status_code == 200


async def test_bearer_requests_are_not_checked(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """Not CSRF-able: a page on another site cannot make the browser send the header."""
    await create_task(sql, "t1", state="running")
    auth = {"Authorization": f"Bearer {server.token()}"}
    r = await client.post(_cancel(server, "t1"), headers={**auth, "Origin": EVIL})
    assert r.status_code == 200, r.text
    r = await client.post(f"{server.url}/api/v1/tasks", headers=auth)  # no body, no type
    assert r.status_code == 201, r.text


async def test_bearer_header_wins_over_the_cookie(
    server: LiveServer, browser: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="running")
    auth = {"Authorization": f"Bearer {server.token()}"}
    r = await browser.post(_cancel(server, "t1"), headers={**auth, "Origin": EVIL})
    assert r.status_code == 200, r.text


async def test_ticket_endpoint_does_not_take_the_cookie(
    server: LiveServer, browser: httpx.AsyncClient
) -> None:
    """Buying a ticket needs the Authorization header, so a cookie cannot buy one, same origin
    or not."""
    r = await browser.post(
        f"{server.url}/api/v1/sse/tickets", json={"task_id": "t1"}, headers={"Origin": server.url}
    )
    assert r.status_code == 401
    assert r.json()["error"] == "Missing bearer token"
