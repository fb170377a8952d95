"""CORS on the real server: exact origins only, preflight without auth, Vary: Origin always."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from server.config import ConfigError, Settings
from server.cors import parse_origins
from tests.conftest import LiveServer, create_task

ALLOWED = "http://app.example.test:3000"
OTHER = "http://evil.example.test"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"cors_origins": (ALLOWED, "https://admin.example.test")}


def _preflight(origin: str, headers: str = "authorization,last-event-id") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": headers,
    }


async def test_preflight_from_allowed_origin_needs_no_token(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.options(server.stream_url("t1"), headers=_preflight(ALLOWED))
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    allowed_headers = {
        h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")
    }
    assert allowed_headers == {"authorization", "last-event-id"}
    methods = {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert methods == {"GET", "POST", "PATCH", "OPTIONS"}
    assert "origin" in r.headers["vary"].lower()
    assert "access-control-allow-credentials" not in r.headers
    assert int(r.headers["access-control-max-age"]) > 0


async def test_preflight_allows_content_type_and_patch(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    headers = _preflight(ALLOWED, "content-type,authorization")
    headers["Access-Control-Request-Method"] = "PATCH"
    r = await client.options(f"{server.url}/healthz", headers=headers)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "content-type" in r.headers["access-control-allow-headers"].lower()


async def test_preflight_from_unknown_origin_gets_no_allow_header(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.options(server.stream_url("t1"), headers=_preflight(OTHER))
    assert r.status_code != 401
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-headers" not in r.headers
    assert "origin" in r.headers["vary"].lower()


async def test_stream_response_carries_allow_origin_and_vary(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success", progress=100.0)
    r = await client.get(
        server.stream_url("t1"),
        params={"access_token": server.token()},
        headers={"Origin": ALLOWED},
    )
    assert r.status_code == 200 and b"event: complete" in r.content
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert r.headers["access-control-expose-headers"]
    assert "origin" in r.headers["vary"].lower()
    # The reconnect that ends the loop (204) must be readable cross-origin too.
    r = await client.get(
        server.stream_url("t1"),
        params={"access_token": server.token()},
        headers={"Origin": ALLOWED, "Last-Event-ID": "1"},
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == ALLOWED


async def test_error_responses_carry_allow_origin(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    """A frontend must be able to read a 401 to tell "log in again" from a network failure."""
    r = await client.get(server.stream_url("t1"), headers={"Origin": ALLOWED})
    assert r.status_code == 401 and r.json() == {"error": "Missing bearer token"}
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "www-authenticate" in r.headers["access-control-expose-headers"].lower()
    r = await client.get(f"{server.url}/no/such/route", headers={"Origin": ALLOWED})
    assert r.status_code == 404 and r.headers["access-control-allow-origin"] == ALLOWED


async def test_unknown_origin_and_same_origin_get_no_allow_header(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    for headers in ({"Origin": OTHER}, {"Origin": ALLOWED + "/"}, {}):
        r = await client.get(f"{server.url}/healthz", headers=headers)
        assert r.status_code == 200
        assert "access-control-allow-origin" not in r.headers
        assert "origin" in r.headers["vary"].lower()


@pytest.mark.parametrize("settings_overrides", [{}])
async def test_no_origins_configured_allows_none(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.options(server.stream_url("t1"), headers=_preflight(ALLOWED))
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    assert "origin" in r.headers["vary"].lower()


def test_origins_setting_parses_exact_origins() -> None:
    env = {"TASKSTREAM_CORS_ORIGINS": " http://localhost:3000, https://app.example.com ,,"}
    assert Settings.from_env(env).cors_origins == (
        "http://localhost:3000",
        "https://app.example.com",
    )
    assert Settings.from_env({}).cors_origins == ()
    assert parse_origins("") == ()


@pytest.mark.parametrize(
    "value",
    [
        "*",
        "https://*.example.com",
        "http://localhost:3000/",
        "localhost:3000",
        "ftp://x",
        "http://",
    ],
)
def test_origins_setting_rejects_wildcards_and_non_origins(value: str) -> None:
    with pytest.raises(ConfigError, match="TASKSTREAM_CORS_ORIGINS"):
        Settings.from_env({"TASKSTREAM_CORS_ORIGINS": value})


async def test_etag_polling_works_cross_origin(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """The polling fallback sends If-None-Match and must read ETag from another origin."""
    r = await client.options(
        f"{server.url}/api/v1/tasks/t1", headers=_preflight(ALLOWED, "authorization,if-none-match")
    )
    assert "if-none-match" in r.headers["access-control-allow-headers"].lower()
    await create_task(sql, "t1")
    r = await client.get(
        f"{server.url}/api/v1/tasks/t1",
        headers={"Origin": ALLOWED, "Authorization": f"Bearer {server.token()}"},
    )
    assert r.status_code == 200 and r.headers["etag"]
    assert "etag" in r.headers["access-control-expose-headers"].lower()
