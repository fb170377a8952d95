"""Task metadata: a small JSON object per task, in the task API and in `progress` events, and
the notification that leaves a large one out ("fetch": true) for the server to read the row."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest

from server.tasks import MAX_METADATA
from tests.conftest import LiveServer, create_task
from tests.sse_client import open_stream
from tests.test_delivery import wait_until

# Error text that JSON-escapes to 6 bytes a character (\u0001): with it, the notification
# without metadata is about 6.5 kB, so any metadata above ~500 bytes pushes it past the
# 7000-byte budget and the trigger sends "fetch": true instead.
WIDE_ERROR = "\x01" * 1000


def write_headers(server: LiveServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token('worker', scopes=['tasks:write'])}"}


def auth(server: LiveServer, user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token(user)}"}


async def test_metadata_round_trips_through_the_api(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    base = f"{server.url}/api/v1/tasks"
    meta = {"file": "a.wav", "step": 2, "tags": ["x", None, 1.5], "ü": {"deep": True}}
    r = await client.post(base, json={"id": "m1", "metadata": meta}, headers=auth(server))
    assert r.status_code == 201 and r.json()["metadata"] == meta
    assert (await client.get(f"{base}/m1", headers=auth(server))).json()["metadata"] == meta
    listed = (await client.get(base, headers=auth(server))).json()["tasks"]
    assert listed[0]["metadata"] == meta and listed[0]["group_id"] is None
    r = await client.patch(
        f"{base}/m1", json={"metadata": {"step": 3}}, headers=write_headers(server)
    )
    assert r.status_code == 200 and r.json()["metadata"] == {"step": 3}
    assert r.json()["version"] == 2  # a metadata change is a change
    r = await client.patch(f"{base}/m1", json={"metadata": None}, headers=write_headers(server))
    assert r.json()["metadata"] is None and r.json()["version"] == 3


@pytest.mark.parametrize(
    "body",
    [
        '{"metadata": [1, 2]}',
        '{"metadata": "text"}',
        '{"metadata": 3}',
        json.dumps({"metadata": {"k": "x" * MAX_METADATA}}),
        '{"metadata": {"n": 1e400}}',
        '{"metadata": {"n": 1e300}}',
        '{"metadata": {"s": "a\\u0000b"}}',
        '{"metadata": {"s": "\\ud800"}}',
        '{"metadata": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}",
    ],
)
async def test_bad_metadata_is_422(
    server: LiveServer, client: httpx.AsyncClient, body: str
) -> None:
    headers = {**auth(server), "Content-Type": "application/json"}
    r = await client.post(f"{server.url}/api/v1/tasks", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "Invalid request"
    await create_task_via_api(server, client, "p1")
    r = await client.patch(
        f"{server.url}/api/v1/tasks/p1",
        content=body,
        headers={**write_headers(server), "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text


async def create_task_via_api(server: LiveServer, client: httpx.AsyncClient, task_id: str) -> None:
    r = await client.post(f"{server.url}/api/v1/tasks", json={"id": task_id}, headers=auth(server))
    assert r.status_code in (201, 409)


async def test_metadata_at_the_cap_is_accepted(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    meta = {"k": "x" * (MAX_METADATA - len('{"k":""}'))}
    r = await client.post(
        f"{server.url}/api/v1/tasks", json={"metadata": meta}, headers=auth(server)
    )
    assert r.status_code == 201 and r.json()["metadata"] == meta


async def test_schema_refuses_oversized_or_non_object_metadata(sql: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await create_task(sql, "s1", metadata=json.dumps({"k": "x" * 5000}))
    with pytest.raises(asyncpg.CheckViolationError):
        await create_task(sql, "s2", metadata="[1]")


async def test_progress_events_carry_metadata_only_when_set(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "e1")
    async with open_stream(client, server.stream_url("e1"), token=server.token()) as s:
        assert "metadata" not in (await s.next()).json()
        await sql.execute(
            "UPDATE taskstream.tasks SET metadata = '{\"file\": \"b.wav\"}' WHERE id = 'e1'"
        )
        ev = await s.next()
        assert ev.json()["metadata"] == {"file": "b.wav"} and ev.json()["version"] == 2
        assert server.runtime.broker.fetches == 0


async def test_large_payload_is_fetched_and_only_it(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    broker = server.runtime.broker
    await create_task(sql, "f1", error=WIDE_ERROR)
    big = {"k": "y" * 1500}
    async with open_stream(client, server.stream_url("f1"), token=server.token()) as s:
        await s.next()
        # Small metadata fits the notification: no read.
        await sql.execute("UPDATE taskstream.tasks SET metadata = '{\"a\": 1}' WHERE id = 'f1'")
        assert (await s.next()).json()["metadata"] == {"a": 1}
        assert broker.fetches == 0
        # Too large for the notification beside that error: the trigger flags it and the
        # registry reads the row; the next two (small) changes queue behind the read.
        async with sql.transaction():
            await sql.execute(
                "UPDATE taskstream.tasks SET metadata = $1 WHERE id = 'f1'", json.dumps(big)
            )
        await sql.execute(
            "UPDATE taskstream.tasks SET metadata = '{\"b\": 2}', progress = 10 WHERE id = 'f1'"
        )
        await sql.execute("UPDATE taskstream.tasks SET progress = 20 WHERE id = 'f1'")
        got = []
        while not got or got[-1]["version"] < 5:
            got.append((await s.next()).json())
        versions = [e["version"] for e in got]
        assert versions == sorted(versions) and versions[-1] == 5
        by_version = {e["version"]: e for e in got}
        if 3 in by_version:  # unless conflated away by a newer state
            assert by_version[3]["metadata"] == big
        assert by_version[5]["metadata"] == {"b": 2}
        assert broker.fetches == 1


async def test_large_metadata_payload_is_flagged_by_the_trigger(sql: asyncpg.Connection) -> None:
    payloads: list[str] = []
    await sql.add_listener("taskstream", lambda *args: payloads.append(args[-1]))
    await create_task(sql, "n1", error=WIDE_ERROR, metadata=json.dumps({"k": "z" * 1500}))
    await create_task(sql, "n2", metadata=json.dumps({"k": "z" * 3000}))
    await wait_until(lambda: len(payloads) == 2, 5)
    first, second = (json.loads(p) for p in payloads)
    assert first["fetch"] is True and "metadata" not in first
    assert all(len(p.encode()) <= 7000 for p in payloads)
    assert second["metadata"] == {"k": "z" * 3000} and "fetch" not in second


async def test_group_stream_carries_metadata(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "gm1", group_id="gm", metadata='{"step": "upload"}')
    url = f"{server.url}/api/v1/sse/groups/gm/progress"
    async with open_stream(client, url, token=server.token()) as s:
        assert (await s.next()).json()["metadata"] == {"step": "upload"}


async def test_deeply_nested_body_is_a_clear_error(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    # Nested past json's recursion limit: a 4xx with a JSON error, never a 500.
    body = '{"metadata": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"
    headers = {**auth(server), "Content-Type": "application/json"}
    r = await client.post(f"{server.url}/api/v1/tasks", content=body, headers=headers)
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


async def test_metadata_nested_too_deep_for_python_still_streams(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """An SQL writer may store metadata nested deeper than Python's JSON parser goes (the schema
    bounds its size, not its depth): the task streams and reads without it, nothing breaks."""
    deep = '{"a": ' + "[" * 1800 + "]" * 1800 + "}"
    await create_task(sql, "d1")
    async with open_stream(client, server.stream_url("d1"), token=server.token()) as s:
        await s.next()
        await sql.execute("UPDATE taskstream.tasks SET metadata = $1 WHERE id = 'd1'", deep)
        ev = (await s.next()).json()
        assert ev["version"] == 2 and "metadata" not in ev
    r = await client.get(f"{server.url}/api/v1/tasks/d1", headers=auth(server))
    assert r.status_code == 200 and r.json()["metadata"] is None


async def test_large_payload_of_an_unwatched_task_is_not_read(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    broker = server.runtime.broker
    listener = broker.source
    before = listener.notifications  # type: ignore[attr-defined]
    await create_task(sql, "u1", error=WIDE_ERROR, metadata=json.dumps({"k": "y" * 1500}))
    await wait_until(lambda: listener.notifications > before, 5)  # type: ignore[attr-defined]
    await asyncio.sleep(0.2)
    assert broker.fetches == 0
