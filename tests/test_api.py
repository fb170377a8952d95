"""The task REST API end to end: real Hypercorn, real HTTP, rows checked and written with SQL."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import asyncpg
import httpx
import pytest

from server import db
from server.tasks import TERMINAL_STATES
from tests.conftest import LiveServer, create_task
from tests.sse_client import open_stream

WRITE = ["tasks:write"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tasks_url(server: LiveServer, task_id: str = "", suffix: str = "") -> str:
    base = f"{server.url}/api/v1/tasks"
    return f"{base}/{task_id}{suffix}" if task_id else base


def assert_error_shape(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert set(body) <= {"error", "detail"} and isinstance(body["error"], str)
    return body


def fields_of(r: httpx.Response) -> set[str]:
    return {e["field"] for e in assert_error_shape(r, 422)["detail"]}


# -- POST /api/v1/tasks -------------------------------------------------------------------


async def test_create_generates_an_id_and_is_owned_by_the_caller(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    r = await client.post(tasks_url(server), headers=auth(server.token("alice")))
    assert r.status_code == 201
    body = r.json()
    assert body["task_id"].startswith("task_") and len(body["task_id"]) > 12
    assert body["owner_id"] == "alice" and body["state"] == "pending"
    assert body["progress"] == 0.0 and body["version"] == 1 and body["error"] is None
    assert body["estimated_time"] is None and body["created_at"].endswith("+00:00")
    assert r.headers["etag"] == '"1"'
    assert r.headers["location"] == f"/api/v1/tasks/{body['task_id']}"
    row = await sql.fetchrow("SELECT * FROM taskstream.tasks WHERE id = $1", body["task_id"])
    assert row["owner_id"] == "alice"
    again = await client.post(tasks_url(server), headers=auth(server.token("alice")))
    assert again.json()["task_id"] != body["task_id"]


async def test_create_with_id_and_fields(server: LiveServer, client: httpx.AsyncClient) -> None:
    r = await client.post(
        tasks_url(server),
        json={"id": "job-1", "state": "queued", "progress": 5, "estimated_time": 90},
        headers=auth(server.token()),
    )
    assert r.status_code == 201
    body = r.json()
    assert (body["task_id"], body["state"], body["progress"], body["estimated_time"]) == (
        "job-1",
        "queued",
        5.0,
        90,
    )


async def test_create_existing_id_is_409_whoever_owns_it(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "taken", owner="bob")
    r = await client.post(tasks_url(server), json={"id": "taken"}, headers=auth(server.token()))
    assert_error_shape(r, 409)
    owner = await sql.fetchval("SELECT owner_id FROM taskstream.tasks WHERE id = 'taken'")
    assert owner == "bob"


async def test_create_for_another_owner_needs_tasks_write(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    body = {"id": "for-bob", "owner_id": "bob"}
    r = await client.post(tasks_url(server), json=body, headers=auth(server.token("alice")))
    assert "tasks:write" in str(assert_error_shape(r, 403))
    r = await client.post(
        tasks_url(server), json=body, headers=auth(server.token("svc", scopes=WRITE))
    )
    assert r.status_code == 201 and r.json()["owner_id"] == "bob"
    # Naming yourself needs no scope.
    r = await client.post(
        tasks_url(server),
        json={"owner_id": "alice"},
        headers=auth(server.token("alice")),
    )
    assert r.status_code == 201 and r.json()["owner_id"] == "alice"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"progress": 101}, {"progress"}),
        ({"progress": -1}, {"progress"}),
        ({"progress": "40"}, {"progress"}),
        ({"estimated_time": -5}, {"estimated_time"}),
        ({"estimated_time": 1.5}, {"estimated_time"}),
        ({"state": "x" * 65}, {"state"}),
        ({"state": ""}, {"state"}),
        ({"id": "a" * 201}, {"id"}),
        ({"id": "bad\nid"}, {"id"}),
        ({"owner_id": ""}, {"owner_id"}),
        ({"color": "red"}, {"color"}),
        ({"progress": 101, "estimated_time": -1}, {"progress", "estimated_time"}),
        ([1, 2], {"body"}),
    ],
)
async def test_create_validation_is_422_with_field_errors(
    server: LiveServer, client: httpx.AsyncClient, body: Any, fields: set[str]
) -> None:
    r = await client.post(tasks_url(server), json=body, headers=auth(server.token()))
    assert fields_of(r) == fields
    assert r.json()["error"] == "Invalid request"


async def test_create_body_errors(server: LiveServer, client: httpx.AsyncClient) -> None:
    headers = auth(server.token())
    r = await client.post(
        tasks_url(server), content=b"{nope", headers={**headers, "Content-Type": "application/json"}
    )
    assert_error_shape(r, 400)
    r = await client.post(
        tasks_url(server), content=b"id=x", headers={**headers, "Content-Type": "text/plain"}
    )
    assert_error_shape(r, 415)


async def test_auth_comes_before_validation(server: LiveServer, client: httpx.AsyncClient) -> None:
    r = await client.post(tasks_url(server), json={"progress": 500})
    assert_error_shape(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    r = await client.post(tasks_url(server), json={"progress": 500}, headers=auth("not-a-token"))
    assert_error_shape(r, 401)
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# -- GET /api/v1/tasks/{id} ------------------------------------------------------------------


async def test_get_returns_progress_fields_plus_details(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="transcribing", progress=40, estimated_time=71)
    await sql.execute("UPDATE taskstream.tasks SET error = 'warn' WHERE id = 't1'")
    r = await client.get(tasks_url(server, "t1"), headers=auth(server.token()))
    assert r.status_code == 200
    body = r.json()
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        event = (await s.next()).json()
    # Every field of the progress event, with the same values, plus the details.
    assert {k: body[k] for k in event} == event
    assert set(body) == set(event) | {
        "error",
        "created_at",
        "owner_id",
        "started_at",
        "group_id",
        "metadata",
    }
    assert body["error"] == "warn" and body["version"] == 2
    assert r.headers["etag"] == '"2"'
    assert r.headers["cache-control"] == "private, no-cache"


async def test_etag_polling_304(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    headers = auth(server.token())
    first = await client.get(tasks_url(server, "t1"), headers=headers)
    etag = first.headers["etag"]
    for value in (etag, f"W/{etag}", f'"99", {etag}', "*"):
        r = await client.get(tasks_url(server, "t1"), headers={**headers, "If-None-Match": value})
        assert r.status_code == 304, value
        assert r.content == b"" and r.headers["etag"] == etag
    await sql.execute("UPDATE taskstream.tasks SET progress = 10 WHERE id = 't1'")
    r = await client.get(tasks_url(server, "t1"), headers={**headers, "If-None-Match": etag})
    assert r.status_code == 200 and r.headers["etag"] == '"2"' and r.json()["progress"] == 10


async def test_someone_elses_task_is_exactly_like_a_missing_one(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "bobs", owner="bob")
    headers = auth(server.token("alice"))
    requests = [
        ("GET", ""),
        ("GET", "?wait=0.2&after_version=0"),
        ("POST", "/cancel"),
    ]
    for method, suffix in requests:
        theirs = await client.request(method, tasks_url(server, "bobs") + suffix, headers=headers)
        missing = await client.request(method, tasks_url(server, "nope") + suffix, headers=headers)
        assert theirs.status_code == missing.status_code == 404, (method, suffix)
        assert theirs.content == missing.content
        drop = {"date"}
        assert {k: v for k, v in theirs.headers.items() if k not in drop} == {
            k: v for k, v in missing.headers.items() if k not in drop
        }
    assert (await client.get(tasks_url(server, "bobs"), headers=headers)).json() == {
        "error": "Task not found"
    }


# -- long poll -----------------------------------------------------------------------------


async def test_long_poll_answers_at_once_when_already_newer(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    await sql.execute("UPDATE taskstream.tasks SET progress = 10 WHERE id = 't1'")
    started = time.monotonic()
    r = await client.get(
        tasks_url(server, "t1"),
        params={"wait": 30, "after_version": 1},
        headers=auth(server.token()),
    )
    assert r.status_code == 200 and r.json()["version"] == 2
    assert time.monotonic() - started < 2


async def test_long_poll_answers_as_soon_as_the_version_moves(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    poll = asyncio.create_task(
        client.get(
            tasks_url(server, "t1"),
            params={"wait": 30, "after_version": 1},
            headers=auth(server.token()),
        )
    )
    await asyncio.sleep(0.3)
    assert not poll.done()
    assert server.runtime.broker.subscriber_count == 1
    changed = time.monotonic()
    await sql.execute("UPDATE taskstream.tasks SET state = 'downloading' WHERE id = 't1'")
    r = await asyncio.wait_for(poll, 5)
    assert time.monotonic() - changed < 2
    assert r.status_code == 200
    assert r.json()["state"] == "downloading" and r.headers["etag"] == '"2"'
    assert server.runtime.broker.subscriber_count == 0


async def test_long_poll_304_after_wait(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    started = time.monotonic()
    r = await client.get(
        tasks_url(server, "t1"),
        params={"wait": 0.5, "after_version": 1},
        headers=auth(server.token()),
    )
    elapsed = time.monotonic() - started
    assert r.status_code == 304 and r.headers["etag"] == '"1"' and r.content == b""
    assert 0.45 <= elapsed < 3
    assert server.runtime.broker.subscriber_count == 0


async def test_long_poll_uses_if_none_match_as_the_version(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    headers = {**auth(server.token()), "If-None-Match": '"1"'}
    r = await client.get(tasks_url(server, "t1"), params={"wait": 0.3}, headers=headers)
    assert r.status_code == 304


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"wait": 61, "after_version": 0}, "wait"),
        ({"wait": 0, "after_version": 0}, "wait"),
        ({"wait": "soon", "after_version": 0}, "wait"),
        ({"wait": 5, "after_version": -1}, "after_version"),
        ({"wait": 5}, "after_version"),
    ],
)
async def test_long_poll_parameters_are_validated(
    server: LiveServer,
    client: httpx.AsyncClient,
    sql: asyncpg.Connection,
    params: dict[str, Any],
    field: str,
) -> None:
    await create_task(sql, "t1")
    r = await client.get(tasks_url(server, "t1"), params=params, headers=auth(server.token()))
    assert fields_of(r) == {field}


async def test_long_poll_does_not_query_per_waiter(
    server: LiveServer,
    client: httpx.AsyncClient,
    sql: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twenty waiters: one row read each when they start, then only the broker wakes them."""
    await create_task(sql, "t1")
    reads = 0
    real = db.fetch_task

    async def counting(pool: Any, task_id: str) -> Any:
        nonlocal reads
        reads += 1
        return await real(pool, task_id)

    monkeypatch.setattr(db, "fetch_task", counting)
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=50)) as many:
        polls = [
            asyncio.create_task(
                many.get(
                    tasks_url(server, "t1"),
                    params={"wait": 20, "after_version": 1},
                    headers=auth(server.token()),
                )
            )
            for _ in range(20)
        ]
        for _ in range(100):
            if server.runtime.broker.subscriber_count == 20:
                break
            await asyncio.sleep(0.05)
        assert server.runtime.broker.subscriber_count == 20
        await asyncio.sleep(1.5)  # longer than the broker's check interval in tests
        assert reads == 20
        await sql.execute("UPDATE taskstream.tasks SET progress = 50 WHERE id = 't1'")
        answers = await asyncio.wait_for(asyncio.gather(*polls), 5)
    assert [r.status_code for r in answers] == [200] * 20
    assert {r.json()["progress"] for r in answers} == {50.0}
    assert reads == 20


async def test_long_poll_releases_its_mailbox_when_the_client_leaves(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with httpx.AsyncClient(timeout=10) as c:
        poll = asyncio.create_task(
            c.get(
                tasks_url(server, "t1"),
                params={"wait": 30, "after_version": 1},
                headers=auth(server.token()),
            )
        )
        for _ in range(50):
            if server.runtime.broker.subscriber_count == 1:
                break
            await asyncio.sleep(0.05)
        assert server.runtime.broker.subscriber_count == 1
        poll.cancel()
        with pytest.raises(asyncio.CancelledError):
            await poll
    for _ in range(100):
        if server.runtime.broker.subscriber_count == 0:
            break
        await asyncio.sleep(0.05)
    assert server.runtime.broker.subscriber_count == 0


async def test_long_poll_sees_a_deleted_task_as_404(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    poll = asyncio.create_task(
        client.get(
            tasks_url(server, "t1"),
            params={"wait": 30, "after_version": 1},
            headers=auth(server.token()),
        )
    )
    await asyncio.sleep(0.3)
    await sql.execute("DELETE FROM taskstream.tasks WHERE id = 't1'")
    r = await asyncio.wait_for(poll, 5)
    assert_error_shape(r, 404)


async def test_long_poll_of_a_task_given_away_is_404(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    poll = asyncio.create_task(
        client.get(
            tasks_url(server, "t1"),
            params={"wait": 30, "after_version": 1},
            headers=auth(server.token()),
        )
    )
    await asyncio.sleep(0.3)
    await sql.execute("UPDATE taskstream.tasks SET owner_id = 'bob' WHERE id = 't1'")
    assert_error_shape(await asyncio.wait_for(poll, 5), 404)


@pytest.mark.parametrize("settings_overrides", [{"max_streams_per_user": 1}])
async def test_long_poll_counts_against_the_stream_limit(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    params = {"wait": 5, "after_version": 1}
    first = asyncio.create_task(
        client.get(tasks_url(server, "t1"), params=params, headers=auth(server.token()))
    )
    await asyncio.sleep(0.3)
    r = await client.get(tasks_url(server, "t1"), params=params, headers=auth(server.token()))
    assert_error_shape(r, 429)
    assert r.headers["retry-after"] == "5"
    await sql.execute("UPDATE taskstream.tasks SET progress = 1 WHERE id = 't1'")
    assert (await asyncio.wait_for(first, 5)).status_code == 200


# -- GET /api/v1/tasks -----------------------------------------------------------------------


async def test_list_is_newest_first_with_cursor_pages_and_state_filter(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    for i in range(7):
        await create_task(sql, f"a{i}", state="success" if i % 2 else "queued")
    await create_task(sql, "bob1", owner="bob")
    headers = auth(server.token("alice"))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        r = await client.get(tasks_url(server), params=params, headers=headers)
        assert r.status_code == 200
        body = r.json()
        seen += [t["task_id"] for t in body["tasks"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [f"a{i}" for i in reversed(range(7))]
    r = await client.get(tasks_url(server), params={"state": "success"}, headers=headers)
    assert [t["task_id"] for t in r.json()["tasks"]] == ["a5", "a3", "a1"]
    assert r.json()["next_cursor"] is None
    r = await client.get(tasks_url(server), headers=auth(server.token("carol")))
    assert r.json() == {"tasks": [], "next_cursor": None}


async def test_list_pages_stay_stable_with_equal_timestamps(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """Ties on created_at are broken by id, so no task is skipped or repeated."""
    await sql.execute("ALTER TABLE taskstream.tasks DISABLE TRIGGER tasks_bump_version")
    await sql.execute(
        "INSERT INTO taskstream.tasks (id, owner_id, created_at, updated_at)"
        " SELECT 't' || g, 'alice', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z'"
        " FROM generate_series(1, 5) g"
    )
    await sql.execute("ALTER TABLE taskstream.tasks ENABLE TRIGGER tasks_bump_version")
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = (
            await client.get(tasks_url(server), params=params, headers=auth(server.token()))
        ).json()
        seen += [t["task_id"] for t in body["tasks"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ["t5", "t4", "t3", "t2", "t1"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "garbage!"}, "cursor"),
        ({"cursor": "WyJ4IiwgInkiXQ"}, "cursor"),  # ["x", "y"]: not a timestamp
        ({"state": "s" * 65}, "state"),
    ],
)
async def test_list_parameters_are_validated(
    server: LiveServer, client: httpx.AsyncClient, params: dict[str, Any], field: str
) -> None:
    r = await client.get(tasks_url(server), params=params, headers=auth(server.token()))
    assert fields_of(r) == {field}


async def test_list_queries_walk_the_owner_index(sql: asyncpg.Connection) -> None:
    """Both list queries are answered from (owner_id, created_at DESC, id DESC), no sort."""
    await sql.execute(
        "INSERT INTO taskstream.tasks (id, owner_id)"
        " SELECT 't' || g, 'u' || (g % 50) FROM generate_series(1, 2000) g"
    )
    await sql.execute("ANALYZE taskstream.tasks")
    queries = [
        (
            f"SELECT {db.TASK_COLUMNS} FROM taskstream.tasks"
            " WHERE owner_id = $1 AND ($2::text IS NULL OR state = $2)"
            " ORDER BY created_at DESC, id DESC LIMIT $3",
            ["u1", None, 21],
        ),
        (
            f"SELECT {db.TASK_COLUMNS} FROM taskstream.tasks"
            " WHERE owner_id = $1 AND ($2::text IS NULL OR state = $2)"
            " AND (created_at, id) < ($3::timestamptz, $4::text)"
            " ORDER BY created_at DESC, id DESC LIMIT $5",
            ["u1", None, "2100-01-01T00:00:00Z", "z", 21],
        ),
    ]
    # Generic plans are what a prepared statement ends up with after a few runs. Sorting and
    # bitmap scans are priced out: if the plan still had a Sort, the index could not give the
    # order (on a table this small the planner would rightly prefer a sort otherwise).
    await sql.execute(
        "SET plan_cache_mode = force_generic_plan; SET enable_sort = off;"
        " SET enable_bitmapscan = off; SET enable_seqscan = off"
    )
    for query, args in queries:
        stmt = await sql.prepare(f"EXPLAIN {query}")
        plan = "\n".join(r[0] for r in await stmt.fetch(*[_arg(a) for a in args]))
        assert "Index Scan using tasks_owner_created_idx" in plan, plan
        assert "Sort" not in plan, plan
        if "$3::timestamptz" in query:
            cond = next(line for line in plan.splitlines() if "Index Cond" in line)
            assert "created_at" in cond and "id" in cond, plan


def _arg(value: Any) -> Any:
    from datetime import datetime

    if isinstance(value, str) and value.startswith("2100-"):
        return datetime.fromisoformat(value)
    return value


# -- PATCH /api/v1/tasks/{id} ----------------------------------------------------------------


async def test_patch_needs_tasks_write(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    r = await client.patch(
        tasks_url(server, "t1"), json={"progress": 10}, headers=auth(server.token("alice"))
    )
    assert "tasks:write" in str(assert_error_shape(r, 403))
    # 403 comes before validation.
    r = await client.patch(
        tasks_url(server, "t1"), json={"progress": 1000}, headers=auth(server.token("alice"))
    )
    assert_error_shape(r, 403)


async def test_patch_updates_given_fields_only(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", owner="alice", estimated_time=99)
    worker = auth(server.token("worker", scopes=WRITE))
    async with open_stream(client, server.stream_url("t1"), token=server.token("alice")) as s:
        assert (await s.next()).json()["version"] == 1
        r = await client.patch(
            tasks_url(server, "t1"),
            json={"state": "transcribing", "progress": 40},
            headers=worker,
        )
        assert r.status_code == 200
        body = r.json()
        assert (body["state"], body["progress"], body["estimated_time"]) == (
            "transcribing",
            40.0,
            99,
        )
        assert body["version"] == 2 and r.headers["etag"] == '"2"'
        pushed = (await s.next()).json()
        assert pushed["state"] == "transcribing" and pushed["version"] == 2

        r = await client.patch(
            tasks_url(server, "t1"), json={"estimated_time": 71, "error": "slow"}, headers=worker
        )
        assert r.json()["estimated_time"] == 71 and r.json()["state"] == "transcribing"
        r = await client.patch(
            tasks_url(server, "t1"), json={"estimated_time": None, "error": None}, headers=worker
        )
        row = await sql.fetchrow("SELECT estimated_time, error FROM taskstream.tasks")
        assert row["estimated_time"] is None and row["error"] is None

        r = await client.patch(
            tasks_url(server, "t1"),
            json={"state": "success", "progress": 100},
            headers=worker,
        )
        assert r.status_code == 200
        events = [await s.next() for _ in range(4)]
        assert [e.json()["version"] for e in events[:3]] == [3, 4, 5]
        assert events[-1].event == "complete" and events[-1].json() == {"state": "success"}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"progress": 100.5}, {"progress"}),
        ({"progress": -0.1}, {"progress"}),
        ({"progress": None}, {"progress"}),
        ({"progress": True}, {"progress"}),
        ({"estimated_time": -1}, {"estimated_time"}),
        ({"estimated_time": 7.5}, {"estimated_time"}),
        ({"estimated_time": "71"}, {"estimated_time"}),
        ({"estimated_time": 2**31}, {"estimated_time"}),
        ({"state": None}, {"state"}),
        ({"state": "s" * 65}, {"state"}),
        ({"state": "two\nlines"}, {"state"}),
        ({"error": "e" * 1001}, {"error"}),
        ({"owner_id": "bob"}, {"owner_id"}),
        ({}, {"body"}),
        ({"progress": 200, "state": ""}, {"progress", "state"}),
    ],
)
async def test_patch_validation_is_422_with_field_errors(
    server: LiveServer,
    client: httpx.AsyncClient,
    sql: asyncpg.Connection,
    body: dict[str, Any],
    fields: set[str],
) -> None:
    await create_task(sql, "t1")
    r = await client.patch(
        tasks_url(server, "t1"), json=body, headers=auth(server.token("w", scopes=WRITE))
    )
    assert fields_of(r) == fields
    assert await sql.fetchval("SELECT version FROM taskstream.tasks") == 1


async def test_patch_limits_are_inclusive(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    worker = auth(server.token("w", scopes=WRITE))
    for body in (
        {"progress": 0},
        {"progress": 100},
        {"estimated_time": 0},
        {"state": "s" * 64},
        {"error": "e" * 1000},
    ):
        r = await client.patch(tasks_url(server, "t1"), json=body, headers=worker)
        assert r.status_code == 200, (body, r.text)


async def test_patch_missing_is_404_and_terminal_is_409(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    worker = auth(server.token("w", scopes=WRITE))
    r = await client.patch(tasks_url(server, "nope"), json={"progress": 1}, headers=worker)
    assert_error_shape(r, 404)
    for state in sorted(TERMINAL_STATES):
        await create_task(sql, f"done-{state}", state=state)
        r = await client.patch(
            tasks_url(server, f"done-{state}"), json={"progress": 1}, headers=worker
        )
        assert assert_error_shape(r, 409)["detail"] == {"state": state}
    assert await sql.fetchval("SELECT max(version) FROM taskstream.tasks") == 1


def test_terminal_states_match_the_sql() -> None:
    assert set(re.findall(r"'(\w+)'", db.TERMINAL_SQL)) == set(TERMINAL_STATES)


# -- POST /api/v1/tasks/{id}/cancel ----------------------------------------------------------


async def test_cancel(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="transcribing", progress=30)
    alice = auth(server.token("alice"))
    async with open_stream(client, server.stream_url("t1"), token=server.token("alice")) as s:
        await s.next()
        r = await client.post(tasks_url(server, "t1", "/cancel"), headers=alice)
        assert r.status_code == 200
        assert r.json()["state"] == "cancelled" and r.json()["progress"] == 30
        assert (await s.next()).json()["state"] == "cancelled"
        assert (await s.next()).json() == {"state": "cancelled"}
    r = await client.post(tasks_url(server, "t1", "/cancel"), headers=alice)
    assert assert_error_shape(r, 409)["detail"] == {"state": "cancelled"}
    r = await client.post(tasks_url(server, "nope", "/cancel"), headers=alice)
    assert_error_shape(r, 404)
    r = await client.post(tasks_url(server, "t1", "/cancel"))
    assert_error_shape(r, 401)


async def test_cancel_is_for_the_owner_only(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", owner="bob")
    for token in (server.token("alice"), server.token("alice", scopes=WRITE)):
        r = await client.post(tasks_url(server, "t1", "/cancel"), headers=auth(token))
        assert_error_shape(r, 404)
    assert await sql.fetchval("SELECT state FROM taskstream.tasks") == "pending"


# -- everything else is JSON too -----------------------------------------------------------


async def test_unknown_route_and_method_are_json(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    assert_error_shape(await client.get(f"{server.url}/api/v1/nothing"), 404)
    r = await client.delete(tasks_url(server, "t1"), headers=auth(server.token()))
    assert_error_shape(r, 405)


ROUTES = [
    ("POST", "/api/v1/tasks", {}),
    ("GET", "/api/v1/tasks", None),
    ("GET", "/api/v1/tasks/t1", None),
    ("GET", "/api/v1/tasks/t1?wait=5&after_version=0", None),
    ("PATCH", "/api/v1/tasks/t1", {"progress": 5}),
    ("POST", "/api/v1/tasks/t1/cancel", None),
]


async def test_every_route_needs_a_token(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    for method, path, body in ROUTES:
        r = await client.request(method, server.url + path, json=body)
        assert_error_shape(r, 401)
        assert r.headers["www-authenticate"] == "Bearer", (method, path)


async def test_database_down_is_503_everywhere(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    token = server.token("alice", scopes=WRITE)
    await server.runtime.pool.close()
    try:
        for method, path, body in ROUTES:
            r = await client.request(method, server.url + path, json=body, headers=auth(token))
            assert_error_shape(r, 503)
            assert r.headers["retry-after"] == "2", (method, path)
    finally:
        server.runtime.pool = await db.create_pool(server.settings.database_url or "")
    assert server.runtime.broker.subscriber_count == 0


async def test_long_poll_while_draining_is_503(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """Shutdown: a waiting long poll is let go at once, and new ones are refused."""
    await create_task(sql, "t1")
    params = {"wait": 30, "after_version": 1}
    poll = asyncio.create_task(
        client.get(tasks_url(server, "t1"), params=params, headers=auth(server.token()))
    )
    for _ in range(50):
        if server.runtime.broker.subscriber_count == 1:
            break
        await asyncio.sleep(0.05)
    await server.runtime.drain()
    r = await asyncio.wait_for(poll, 5)
    assert_error_shape(r, 503)
    assert r.headers["retry-after"] == "1"
    r = await client.get(tasks_url(server, "t1"), params=params, headers=auth(server.token()))
    assert_error_shape(r, 503)
    server.runtime.draining = False
