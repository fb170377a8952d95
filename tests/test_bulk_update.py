"""PATCH /api/v1/tasks: many task updates in one request, each answered on its own."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import LiveServer, create_task

pytestmark = pytest.mark.timeout(60)

WRITE = ["tasks:write"]


def headers(server: LiveServer, sub: str = "worker", scopes: list[str] | None = WRITE) -> Any:
    token = server.token(sub, scopes=scopes) if scopes else server.token(sub)
    return {"Authorization": f"Bearer {token}"}


def bulk(client: httpx.AsyncClient, server: LiveServer, body: Any, **kw: Any) -> Any:
    return client.patch(
        f"{server.url}/api/v1/tasks", json=body, headers=kw.pop("headers", None) or headers(server)
    )


async def test_each_item_gets_the_answer_its_single_patch_would(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "a")
    await create_task(sql, "done", state="success")
    await create_task(sql, "bobs", owner="bob")
    items: list[Any] = [
        {"id": "a", "progress": 10},
        {"id": "missing", "progress": 1},
        {"id": "done", "progress": 1},
        {"id": "a", "progress": 101},
        {"progress": 5},
        "not an object",
        {"id": "bad\u0001id", "progress": 1},
        {"id": "a"},
        {"id": "bobs", "state": "running"},  # tasks:write may update any owner's task
        {"id": "a", "progress": 20, "state": "success"},
        {"id": "a", "progress": 30},
    ]
    r = await bulk(client, server, {"updates": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 404, 409, 422, 422, 422, 422, 422, 200, 200, 409]
    assert results[0]["id"] == "a" and results[0]["task"]["version"] == 2
    assert results[0]["task"]["progress"] == 10.0
    single = await client.get(
        f"{server.url}/api/v1/tasks/a", headers=headers(server, "alice", None)
    )
    assert set(results[0]["task"]) == set(single.json())
    assert results[1] == {"id": "missing", "status": 404, "error": "Task not found"}
    assert results[2] == {
        "id": "done",
        "status": 409,
        "error": "Task is finished",
        "detail": {"state": "success"},
    }
    assert results[3]["detail"] == [
        {"field": "progress", "message": "Input should be less than or equal to 100"}
    ]
    assert results[4]["id"] is None and results[4]["detail"][0]["field"] == "id"
    assert results[5]["id"] is None
    assert results[7]["detail"][0]["message"].startswith("give at least one of")
    assert results[8]["task"]["owner_id"] == "bob" and results[8]["task"]["state"] == "running"
    # Items for one task apply in order: 10, then success, then the finished task refuses 30.
    assert results[9]["task"]["version"] == 3 and results[9]["task"]["state"] == "success"
    assert results[10]["detail"] == {"state": "success"}
    row = await sql.fetchrow("SELECT progress, version FROM taskstream.tasks WHERE id = 'a'")
    assert (row["progress"], row["version"]) == (20.0, 3)


async def test_bulk_needs_a_write_token(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "mine", owner="alice")
    body = {"updates": [{"id": "mine", "progress": 5}]}
    r = await client.patch(f"{server.url}/api/v1/tasks", json=body)
    assert r.status_code == 401
    # Without tasks:write, even one's own task: exactly as the single PATCH.
    r = await bulk(client, server, body, headers=headers(server, "alice", None))
    assert r.status_code == 403 and r.json()["error"] == "Forbidden"
    assert await sql.fetchval("SELECT progress FROM taskstream.tasks WHERE id = 'mine'") == 0


@pytest.mark.parametrize("settings_overrides", [{"bulk_max_items": 5}])
async def test_bulk_limits(server: LiveServer, client: httpx.AsyncClient) -> None:
    url = f"{server.url}/api/v1/tasks"
    h = headers(server)
    six = {"updates": [{"id": f"t{i}", "progress": 1} for i in range(6)]}
    for body in (six, {"updates": []}, {"updates": {}}, [], {"updates": [], "more": 1}):
        r = await client.patch(url, json=body, headers=h)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"] == "Invalid request"
    r = await client.patch(url, json={"updates": [{"id": "nope", "progress": 1}] * 5}, headers=h)
    assert r.status_code == 200 and len(r.json()["results"]) == 5
    r = await client.patch(url, content=b"{", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400
    r = await client.patch(url, content=b"x", headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 415
    big = json.dumps({"updates": [{"id": "x" * 200, "error": "e" * 1000}] * 70})
    r = await client.patch(url, content=big, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "Request Entity Too Large"


async def test_bulk_route_is_in_the_openapi_document(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    spec = (await client.get(f"{server.url}/openapi.json")).json()
    op = spec["paths"]["/api/v1/tasks"]["patch"]
    assert set(op["responses"]) >= {"200", "401", "403", "413", "422", "503"}
    assert op["requestBody"]["content"]["application/json"]["schema"]["title"] == "BulkPatch"
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BulkResults"
    }
