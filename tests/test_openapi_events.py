"""The SSE events on the wire are the events ``/openapi.json`` documents, both ways.

A real server and real streams of every event kind on both SSE routes (snapshot and live
``progress``, ``complete`` with and without ``error``, ``error`` for a missing task and for an
expired token, ``timeout``). Each event's JSON ``data`` must validate against the schema served for
its route and type, and against the model in :mod:`server.schemas` that schema is made from; it
must send no field the schema leaves out; and every event type and field a route documents must
show up on that route's wire at least once, so the docs promise nothing the server never sends.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import httpx
import pytest
from httpx_sse import ServerSentEvent
from openapi_schema_validator import OAS31Validator
from pydantic import BaseModel

from server.schemas import GROUP_EVENTS, MULTI_TASK_EVENTS, SINGLE_TASK_EVENTS
from tests.conftest import LiveServer, create_task
from tests.sse_client import Stream, open_stream

SINGLE = "/api/v1/sse/tasks/{task_id}/progress"
MULTI = "/api/v1/sse/tasks"
GROUP = "/api/v1/sse/groups/{group_id}/progress"

# A token of 2 s (no leeway) expires on its stream well before the stream's own timeout.
pytestmark = pytest.mark.parametrize(
    "settings_overrides", [{"stream_timeout": 3.5, "jwt_leeway": 0}]
)


async def _rest(stream: Stream) -> list[ServerSentEvent]:
    """Every event until the server closes the stream."""
    out: list[ServerSentEvent] = []
    while True:
        try:
            out.append(await stream.next(timeout=8))
        except EOFError:
            return out


async def _left_alone(client: httpx.AsyncClient, url: str, token: str) -> list[ServerSentEvent]:
    """A stream nothing happens on: it ends by its timeout, or by its token's expiry."""
    async with open_stream(client, url, token=token) as s:
        assert s.response.status_code == 200
        return await _rest(s)


async def _single_task(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> list[ServerSentEvent]:
    token = server.token()
    await create_task(sql, "s-fail")
    await create_task(sql, "s-ok", progress=10.0, metadata='{"step": "decode"}')
    events = []
    async with open_stream(client, server.stream_url("s-fail"), token=token) as s:
        events.append(await s.next())  # the snapshot
        await sql.execute("UPDATE taskstream.tasks SET progress = 40 WHERE id = 's-fail'")
        events.append(await s.next())  # a live change
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'failed', error = 'disk full' WHERE id = 's-fail'"
        )
        events += await _rest(s)
    async with open_stream(client, server.stream_url("s-ok"), token=token) as s:
        events.append(await s.next())
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 's-ok'")
        events += await _rest(s)
    async with open_stream(client, server.stream_url("s-ghost"), token=token) as s:
        events += await _rest(s)
    return events


async def _multi_task(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> list[ServerSentEvent]:
    token = server.token()
    await create_task(sql, "m-fail")
    await create_task(sql, "m-ok", metadata='{"file": "a.wav"}')
    await create_task(sql, "m-bobs", owner="bob")
    url = f"{server.url}{MULTI}?ids=m-fail,m-ok,m-ghost,m-bobs"
    async with open_stream(client, url, token=token) as s:
        events = [await s.next() for _ in range(4)]  # two snapshots, two errors
        await sql.execute("UPDATE taskstream.tasks SET progress = 70 WHERE id = 'm-ok'")
        events.append(await s.next())
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'm-ok'")
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'failed', error = 'oops' WHERE id = 'm-fail'"
        )
        events += await _rest(s)
    return events


async def _owner_wide(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> list[ServerSentEvent]:
    # Its own user, so the other scenarios' tasks do not show up here.
    await create_task(sql, "o-open", owner="carol")
    async with open_stream(client, f"{server.url}{MULTI}", token=server.token("carol")) as s:
        events = [await s.next()]
        await create_task(sql, "o-new", owner="carol")
        events.append(await s.next())
        await sql.execute("UPDATE taskstream.tasks SET state = 'cancelled' WHERE id = 'o-new'")
        events += await _rest(s)  # ... until the timeout: o-open stays open
    return events


async def _group(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> list[ServerSentEvent]:
    # Its own user, so the other scenarios' tasks do not show up here.
    await create_task(sql, "g-fail", owner="dave", group_id="g-docs")
    await create_task(sql, "g-away", owner="dave", group_id="g-docs")
    url = f"{server.url}/api/v1/sse/groups/g-docs/progress"
    async with open_stream(client, url, token=server.token("dave")) as s:
        events = [await s.next(), await s.next()]
        await create_task(sql, "g-new", owner="dave", group_id="g-docs", metadata='{"n": 1}')
        events.append(await s.next())
        await sql.execute("UPDATE taskstream.tasks SET owner_id = 'erin' WHERE id = 'g-away'")
        events.append(await s.next())
        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 'g-new'")
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'failed', error = 'no' WHERE id = 'g-fail'"
        )
        await sql.execute("UPDATE taskstream.groups SET closed_at = now() WHERE id = 'g-docs'")
        events += await _rest(s)
    async with open_stream(
        client, f"{server.url}/api/v1/sse/groups/g-none/progress", token=server.token("dave")
    ) as s:
        events += await _rest(s)
    return events


def _documented(spec: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    ok = spec["paths"][path]["get"]["responses"]["200"]
    events: dict[str, dict[str, Any]] = ok["content"]["text/event-stream"]["x-sse-events"]
    return events


def _check_route(
    spec: dict[str, Any],
    path: str,
    models: dict[str, type[BaseModel]],
    events: list[ServerSentEvent],
) -> None:
    documented = _documented(spec, path)
    schemas = spec["components"]["schemas"]
    assert set(documented) == set(models), path
    sent_fields: dict[str, set[str]] = {}
    for event in events:
        assert event.event in documented, (path, "undocumented event type", event.event)
        ref = documented[event.event]["data"]["$ref"]
        name = ref.rsplit("/", 1)[-1]
        assert name == models[event.event].__name__, (path, event.event, name)
        data = json.loads(event.data)
        # The served schema, as OpenAPI 3.1 clients read it (refs resolved in the document).
        validator = OAS31Validator({"$ref": ref, "components": spec["components"]})
        problems = [e.message for e in validator.iter_errors(data)]
        assert not problems, (path, event.event, data, problems)
        models[event.event].model_validate_json(event.data, strict=True)
        undocumented = set(data) - set(schemas[name]["properties"])
        assert not undocumented, (path, event.event, "sends undocumented", undocumented)
        sent_fields.setdefault(event.event, set()).update(data)
    assert set(sent_fields) == set(documented), (path, "never sent", set(documented))
    for kind, fields in sent_fields.items():
        name = documented[kind]["data"]["$ref"].rsplit("/", 1)[-1]
        never = set(schemas[name]["properties"]) - fields
        assert not never, (path, kind, "documented but never sent", never)


async def test_sse_events_on_the_wire_are_the_documented_ones(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    r = await client.get(f"{server.url}/openapi.json")
    assert r.status_code == 200
    spec: dict[str, Any] = r.json()
    await create_task(sql, "w-single")
    await create_task(sql, "w-multi")
    await create_task(sql, "w-group", group_id="w-g")
    group_url = f"{server.url}/api/v1/sse/groups/w-g/progress"
    short = server.token(ttl=2)

    async def driven() -> tuple[list[ServerSentEvent], list[ServerSentEvent]]:
        # One after the other: they share the one `sql` connection.
        single = await _single_task(server, client, sql)
        multi = await _multi_task(server, client, sql)
        return single, multi + await _owner_wide(server, client, sql)

    async def group_driven() -> list[ServerSentEvent]:
        conn = await asyncpg.connect(server.settings.database_url)
        try:
            return await _group(server, client, conn)
        finally:
            await conn.close()

    async with asyncio.timeout(30):
        (
            (single, multi),
            single_timeout,
            single_expired,
            multi_timeout,
            multi_expired,
            group,
            group_timeout,
            group_expired,
        ) = await asyncio.gather(
            driven(),
            _left_alone(client, server.stream_url("w-single"), server.token()),
            _left_alone(client, server.stream_url("w-single"), short),
            _left_alone(client, f"{server.url}{MULTI}?ids=w-multi", server.token()),
            _left_alone(client, f"{server.url}{MULTI}?ids=w-multi", short),
            group_driven(),
            _left_alone(client, group_url, server.token()),
            _left_alone(client, group_url, short),
        )
    # Each left-alone stream ended the way it was meant to, so every kind is really covered.
    assert single_timeout[-1].event == multi_timeout[-1].event == "timeout"
    assert json.loads(single_expired[-1].data) == {"error": "Token expired"}
    assert json.loads(multi_expired[-1].data) == {"error": "Token expired"}
    _check_route(spec, SINGLE, SINGLE_TASK_EVENTS, [*single, *single_timeout, *single_expired])
    _check_route(spec, MULTI, MULTI_TASK_EVENTS, [*multi, *multi_timeout, *multi_expired])
    assert group[-1].event == "error" and group[-2].event == "group_complete"
    _check_route(spec, GROUP, GROUP_EVENTS, [*group, *group_timeout, *group_expired])
