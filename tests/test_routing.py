"""Status codes a route gives for a wrong method or an impossible id: 405 with Allow, and 400."""

from __future__ import annotations

import re

import asyncpg
import httpx
import pytest

from tests.conftest import LiveServer, create_task

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _auth(server: LiveServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(scopes=['tasks:write'])}"}


async def test_every_405_carries_allow(server: LiveServer, client: httpx.AsyncClient) -> None:
    """RFC 9110: a 405 names the methods the resource allows. Every route, every wrong method."""
    checked = 0
    for rule in server.app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.methods is None:
            continue
        path = re.sub(r"<[^>]+>", "t1", rule.rule)
        for method in METHODS:
            if method in rule.methods:
                continue
            r = await client.request(method, server.url + path, headers=_auth(server))
            if r.status_code != 405:
                continue  # another rule on the same path takes this method
            allow = {m.strip() for m in r.headers.get("allow", "").split(",") if m.strip()}
            assert allow, f"{method} {path}: 405 without Allow"
            assert method not in allow and allow & rule.methods, (method, path, allow)
            assert r.json()["error"] == "Method Not Allowed"
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("method", ["GET", "HEAD", "PATCH", "PUT", "DELETE"])
async def test_cancel_url_takes_only_post(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, method: str
) -> None:
    await create_task(sql, "t1")
    body = {"progress": 5} if method == "PATCH" else None
    r = await client.request(
        method, f"{server.url}/api/v1/tasks/t1/cancel", json=body, headers=_auth(server)
    )
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == "OPTIONS, POST"
    assert await sql.fetchval("SELECT progress FROM taskstream.tasks") == 0


async def test_an_id_with_a_slash_stays_readable_when_encoded(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1/cancel")
    r = await client.get(f"{server.url}/api/v1/tasks/t1%2Fcancel", headers=_auth(server))
    assert r.status_code == 200 and r.json()["task_id"] == "t1/cancel", r.text


@pytest.mark.parametrize("task_id", ["a" * 201, "a%00b", "a%1Fb"])
@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "", None),
        ("GET", "?wait=5&after_version=0", None),
        ("PATCH", "", {"progress": 5}),
        ("POST", "/cancel", None),
    ],
)
async def test_an_impossible_task_id_is_400_as_on_the_stream(
    server: LiveServer,
    client: httpx.AsyncClient,
    task_id: str,
    method: str,
    suffix: str,
    body: dict[str, int] | None,
) -> None:
    url = f"{server.url}/api/v1/tasks/{task_id}{suffix}"
    r = await client.request(method, url, json=body, headers=_auth(server))
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "Invalid task id"
    stream = await client.get(
        f"{server.url}/api/v1/sse/tasks/{task_id}/progress", headers=_auth(server)
    )
    assert (stream.status_code, stream.json()["error"]) == (400, "Invalid task id")
