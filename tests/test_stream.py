"""The single-task stream end to end: real Hypercorn, real SSE client, rows written with SQL."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from tests.conftest import SECRET, LiveServer, create_task
from tests.sse_client import open_stream


async def test_stream_headers_and_initial_progress(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="queued", progress=12.5, estimated_time=30)
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        assert s.response.status_code == 200
        assert s.response.headers["content-type"].startswith("text/event-stream")
        assert s.response.headers["cache-control"] == "no-cache"
        assert s.response.headers["x-accel-buffering"] == "no"
        first = await s.next()
        assert first.event == "progress"
        assert first.id == "1"
        data = first.json()
        assert data["task_id"] == "t1" and data["state"] == "queued"
        assert data["progress"] == 12.5 and isinstance(data["progress"], float)
        assert data["estimated_time"] == 30
        assert data["updated_at"].endswith("+00:00")


async def test_each_committed_change_is_pushed_in_order(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        assert (await s.next()).id == "1"
        for p in (10, 20, 30):
            await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id = 't1'", p)
            ev = await s.next()
            assert ev.event == "progress" and ev.json()["progress"] == p
        # An UPDATE that changes nothing sends nothing.
        await sql.execute("UPDATE taskstream.tasks SET progress = 30 WHERE id = 't1'")
        await s.expect_nothing(0.3)


async def test_terminal_state_sends_complete_and_closes(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'success', progress = 100 WHERE id = 't1'"
        )
        last = await s.next()
        assert last.event == "progress" and last.json()["state"] == "success"
        done = await s.next()
        assert done.event == "complete" and done.json() == {"state": "success"}
        await s.wait_closed()


async def test_failed_task_complete_carries_error(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'failed', error = 'disk full' WHERE id = 't1'"
        )
        await s.next()
        done = await s.next()
        assert done.json() == {"state": "failed", "error": "disk full"}
        await s.wait_closed()


@pytest.mark.parametrize("state", ["success", "failed", "cancelled"])
async def test_already_terminal_task_gets_progress_complete_close(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, state: str
) -> None:
    await create_task(sql, "t1", state=state, progress=100.0)
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        assert (await s.next()).event == "progress"
        assert (await s.next()).json()["state"] == state
        await s.wait_closed()
        assert s.drain() == []


async def test_missing_task_gets_one_error_event_then_close(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    async with open_stream(client, server.stream_url("nope"), token=server.token()) as s:
        assert s.response.status_code == 200
        ev = await s.next()
        assert ev.event == "error" and ev.json() == {"error": "Task not found"}
        await s.wait_closed()
        assert s.drain() == []


async def test_other_users_task_looks_exactly_like_a_missing_one(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "secret-task", owner="bob")
    bodies = []
    for task_id in ("secret-task", "no-such-task"):
        r = await client.get(server.stream_url(task_id), headers=_bearer(server.token("alice")))
        assert r.status_code == 200
        bodies.append(r.content)
    assert bodies[0] == bodies[1]
    assert b"event: error\n" in bodies[0] and b'{"error": "Task not found"}' in bodies[0]


async def test_task_deleted_while_streaming_gets_not_found(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        await sql.execute("DELETE FROM taskstream.tasks WHERE id = 't1'")
        ev = await s.next()
        assert ev.event == "error" and ev.json() == {"error": "Task not found"}
        await s.wait_closed()


@pytest.mark.parametrize("settings_overrides", [{"stream_timeout": 0.5}])
async def test_stream_times_out(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        started = time.monotonic()
        ev = await s.next(timeout=3)
        assert ev.event == "timeout" and ev.json() == {"message": "Stream timeout"}
        assert time.monotonic() - started < 2.5
        await s.wait_closed()


@pytest.mark.parametrize("settings_overrides", [{"heartbeat": 0.2}])
async def test_heartbeat_comments_are_sent(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    raw = b""
    async with client.stream("GET", server.stream_url("t1"), headers=_bearer(server.token())) as r:

        async def read() -> None:
            nonlocal raw
            async for chunk in r.aiter_raw():
                raw += chunk
                if raw.count(b": heartbeat\n\n") >= 2:
                    return

        await asyncio.wait_for(read(), 3)
    assert raw.startswith(b"retry: ")
    assert raw.count(b": heartbeat\n\n") >= 2


async def test_client_disconnect_frees_subscription(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    broker = server.runtime.broker
    for _ in range(3):
        async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
            await s.next()
            assert broker.subscriber_count == 1
    for _ in range(40):
        if broker.subscriber_count == 0:
            break
        await asyncio.sleep(0.05)
    assert broker.subscriber_count == 0
    assert broker._by_task == {} and broker._per_user == {}


async def test_one_megabyte_error_streams_cut(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        huge = "x" * (1024 * 1024)
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'failed', error = $1 WHERE id = 't1'", huge
        )
        assert (await s.next()).json()["state"] == "failed"
        done = (await s.next()).json()
        assert done["state"] == "failed" and done["error"] == "x" * 1000


async def test_field_values_cannot_inject_events(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        evil = "x\n\nevent: complete\ndata: {}\n\n"
        await sql.execute(
            "UPDATE taskstream.tasks SET state = $1, error = $1 WHERE id = 't1'", evil[:60]
        )
        ev = await s.next()
        assert ev.event == "progress" and ev.json()["state"] == evil[:60]
        await s.expect_nothing(0.3)


async def test_snapshot_and_subscription_have_no_gap(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """Updates race the connect; the client still ends on the last version, in order."""
    await create_task(sql, "t1")

    async def writer() -> None:
        for p in range(1, 60):
            await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id = 't1'", p)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 't1'")

    w = asyncio.create_task(writer())
    versions: list[int] = []
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        while True:
            ev = await s.next(timeout=5)
            if ev.event == "complete":
                break
            versions.append(int(ev.id))
    await w
    assert versions == sorted(set(versions))
    assert versions[-1] == 61


# -- authentication --------------------------------------------------------------------------


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(secret.encode()))


async def test_missing_token_is_401_with_bare_challenge(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.get(server.stream_url("t1"))
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"].startswith("application/json")
    assert "error" in r.json()


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    return {
        "malformed": "not-a-jwt",
        "bad_signature": _token({"sub": "alice", "exp": now + 60}, secret="another-" * 5),
        "expired": _token({"sub": "alice", "exp": now - 600}),
        "not_yet_valid": _token({"sub": "alice", "exp": now + 600, "nbf": now + 300}),
        "no_exp": _token({"sub": "alice"}),
        "no_sub": _token({"exp": now + 60}),
    }


@pytest.mark.parametrize("kind", list(_bad_tokens()))
@pytest.mark.parametrize("where", ["header", "query"])
async def test_bad_token_is_401_invalid_token(
    server: LiveServer, client: httpx.AsyncClient, kind: str, where: str
) -> None:
    token = _bad_tokens()[kind]
    if where == "header":
        r = await client.get(server.stream_url("t1"), headers=_bearer(token))
    else:
        r = await client.get(server.stream_url("t1"), params={"access_token": token})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    body = r.json()
    assert set(body) <= {"error", "detail"} and body["error"]
    assert token not in r.text


async def test_query_token_works(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    r = await client.get(server.stream_url("t1"), params={"access_token": server.token()})
    assert r.status_code == 200
    events = [b for b in r.content.split(b"\n\n") if b.startswith(b"event:")]
    assert [e.split(b"\n")[0] for e in events] == [b"event: progress", b"event: complete"]
    assert json.loads(events[1].split(b"data: ")[1]) == {"state": "success"}
