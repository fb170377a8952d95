"""The OpenAPI document and the docs pages, as served."""

from __future__ import annotations

import re
from typing import Any

import httpx
from openapi_spec_validator import validate

from tests.conftest import LiveServer

# The demo page and its files (server/web.py) are not API either.
HIDDEN = {"/openapi.json", "/docs", "/docs/swagger", "/static/<path:filename>", "/"}


async def _spec(server: LiveServer, client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get(f"{server.url}/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    spec: dict[str, Any] = r.json()
    return spec


async def test_document_is_valid_openapi_3(server: LiveServer, client: httpx.AsyncClient) -> None:
    spec = await _spec(server, client)
    assert spec["openapi"].startswith("3.")
    validate(spec)  # raises on any schema violation


async def test_every_route_is_documented_with_its_responses(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    spec = await _spec(server, client)
    documented = {
        (method.upper(), path) for path, methods in spec["paths"].items() for method in methods
    }
    expected = set()
    for rule in server.app.url_map.iter_rules():
        if rule.rule in HIDDEN:
            continue
        path = re.sub(r"<(?:[^:>]*:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                expected.add((method, path))
    assert expected == documented
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert op.get("summary"), (method, path)
            assert op["responses"], (method, path)
            for status, response in op["responses"].items():
                assert response["description"], (method, path, status)


async def test_task_routes_and_statuses(server: LiveServer, client: httpx.AsyncClient) -> None:
    paths = (await _spec(server, client))["paths"]
    statuses = {
        ("post", "/api/v1/tasks"): {"201", "401", "403", "409", "422", "503"},
        ("get", "/api/v1/tasks"): {"200", "401", "422", "503"},
        ("get", "/api/v1/tasks/{task_id}"): {
            "200",
            "304",
            "400",
            "401",
            "404",
            "422",
            "429",
            "503",
        },
        ("patch", "/api/v1/tasks/{task_id}"): {
            "200",
            "400",
            "401",
            "403",
            "404",
            "409",
            "422",
            "503",
        },
        ("post", "/api/v1/tasks/{task_id}/cancel"): {"200", "400", "401", "404", "409", "503"},
    }
    for (method, path), codes in statuses.items():
        assert set(paths[path][method]["responses"]) == codes, (method, path)
    get_task = paths["/api/v1/tasks/{task_id}"]["get"]
    names = {p["name"] for p in get_task["parameters"]}
    assert {"task_id", "wait", "after_version", "If-None-Match"} <= names
    assert "ETag" in get_task["responses"]["200"]["headers"]
    assert "content" not in get_task["responses"]["304"]
    patch = paths["/api/v1/tasks/{task_id}"]["patch"]
    body = patch["requestBody"]["content"]["application/json"]["schema"]
    progress = body["properties"]["progress"]["anyOf"][0]
    assert (progress["minimum"], progress["maximum"]) == (0, 100)
    eta = body["properties"]["estimated_time"]["anyOf"][0]
    assert eta["type"] == "integer" and eta["minimum"] == 0
    listing = paths["/api/v1/tasks"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"limit", "cursor", "state"}


async def test_sse_routes_document_their_events(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    spec = await _spec(server, client)
    schemas = spec["components"]["schemas"]
    for path in (
        "/api/v1/sse/tasks/{task_id}/progress",
        "/api/v1/sse/tasks",
        "/api/v1/sse/groups/{group_id}/progress",
    ):
        op = spec["paths"][path]["get"]
        media = op["responses"]["200"]["content"]["text/event-stream"]
        events = media["x-sse-events"]
        extra = {"group_complete"} if "groups" in path else set()
        assert set(events) == {"progress", "complete", "error", "timeout"} | extra
        for event in events.values():
            name = event["data"]["$ref"].rsplit("/", 1)[-1]
            assert name in schemas
        assert {"bearerAuth": []} in op["security"] and {"accessToken": []} in op["security"]
        assert "Last-Event-ID" in {p["name"] for p in op["parameters"]}
    progress = schemas["ProgressEventData"]["properties"]
    assert set(progress) == {
        "task_id",
        "state",
        "progress",
        "estimated_time",
        "updated_at",
        "version",
        "metadata",
    }
    multi = spec["paths"]["/api/v1/sse/tasks"]["get"]
    assert "ids" in {p["name"] for p in multi["parameters"]}
    assert spec["components"]["securitySchemes"]["accessToken"] == {
        "type": "apiKey",
        "in": "query",
        "name": "access_token",
    }


async def test_docs_page_renders_offline(server: LiveServer, client: httpx.AsyncClient) -> None:
    spec = await _spec(server, client)
    r = await client.get(f"{server.url}/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    # Nothing is loaded from anywhere: no script, no stylesheet link, no external source.
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)
    for path, methods in spec["paths"].items():
        for method in methods:
            assert f"{method.upper()}</span> {path}" in page.replace("&#x27;", "'")
    for event in ("event: progress", "event: complete", "event: error", "event: timeout"):
        assert event in page
    assert 'id="schema-Task"' in page


async def test_swagger_ui_is_served_and_says_what_it_loads(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.get(f"{server.url}/docs/swagger")
    assert r.status_code == 200
    assert "/openapi.json" in r.text
    assert "cdnjs.cloudflare.com/ajax/libs/swagger-ui/5.4.2/" in r.text


async def test_schema_validation_errors_are_422_json(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    headers = {"Authorization": f"Bearer {server.token()}"}
    r = await client.get(f"{server.url}/api/v1/tasks", params={"limit": "x"}, headers=headers)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {
        "error": "Invalid request",
        "detail": [{"field": "limit", "message": r.json()["detail"][0]["message"]}],
    }
    assert "integer" in r.json()["detail"][0]["message"]


async def test_docs_say_which_routes_need_no_jwt(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    """What the docs promise about tokens is what the routes do."""
    page = (await client.get(f"{server.url}/docs")).text
    assert "Every route but" not in page
    assert (
        "`/healthz`, `/readyz` and `/metrics` need no JWT"
        in (await _spec(server, client))["info"]["description"]
    )
    for path in ("/healthz", "/readyz", "/metrics"):
        assert path in page
        r = await client.get(server.url + path)
        assert r.status_code == 200, (path, r.status_code)
    r = await client.get(f"{server.url}/api/v1/tasks")
    assert r.status_code == 401
