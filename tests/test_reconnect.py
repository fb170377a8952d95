"""Reconnects after a stream ended for good get 204 (which stops every EventSource); after a
timeout they resume. The client libraries send the last id either as the ``Last-Event-ID`` header
(native EventSource, Node's eventsource) or as the ``lastEventId`` query parameter (the polyfill).
"""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.conftest import LiveServer, create_task
from tests.sse_client import open_stream

RESUME_STYLES = [
    pytest.param(lambda v: ({"Last-Event-ID": v}, {}), id="header"),
    pytest.param(lambda v: ({}, {"lastEventId": v}), id="query"),
]


def _assert_told_to_stop(r: httpx.Response, resumed_by_query: bool) -> None:
    if resumed_by_query:
        # event-source-polyfill's fetch transport reconnects forever on a 204 (it has no body to
        # read); a 410 with a body stops it.
        assert r.status_code == 410
        assert r.json() == {
            "error": "Stream ended",
            "detail": "this stream has ended for good; do not reconnect",
        }
    else:
        assert r.status_code == 204 and r.content == b""


@pytest.mark.parametrize("resume", RESUME_STYLES)
async def test_reconnect_after_complete_gets_204(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection, resume: object
) -> None:
    await create_task(sql, "t1")
    await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 't1'")
    headers, params = resume("2")  # type: ignore[operator]
    r = await client.get(
        server.stream_url("t1"),
        headers={"Authorization": f"Bearer {server.token()}", **headers},
        params=params,
    )
    _assert_told_to_stop(r, bool(params))


@pytest.mark.parametrize("resume", RESUME_STYLES)
async def test_reconnect_after_not_found_gets_204(
    server: LiveServer, client: httpx.AsyncClient, resume: object
) -> None:
    first = await client.get(server.stream_url("gone"), params={"access_token": server.token()})
    assert b"id: end\n" in first.content
    headers, params = resume("end")  # type: ignore[operator]
    r = await client.get(
        server.stream_url("gone"),
        headers=headers,
        params={"access_token": server.token(), **params},
    )
    _assert_told_to_stop(r, bool(params))


async def test_header_wins_when_both_header_and_query_carry_an_id(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.get(
        server.stream_url("gone"),
        headers={"Last-Event-ID": "end"},
        params={"access_token": server.token(), "lastEventId": "end"},
    )
    assert r.status_code == 204


async def test_reconnect_with_older_id_gets_the_terminal_version(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """A client that missed the ending (it saw version 1 only) still learns how the task ended."""
    await create_task(sql, "t1")
    await sql.execute("UPDATE taskstream.tasks SET state = 'failed', error = 'x' WHERE id = 't1'")
    async with open_stream(
        client, server.stream_url("t1"), token=server.token(), headers={"Last-Event-ID": "1"}
    ) as s:
        ev = await s.next()
        assert ev.event == "progress" and ev.id == "2"
        assert (await s.next()).event == "complete"
        await s.wait_closed()


async def test_reconnect_with_garbage_id_is_a_first_connection(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    for bad in ("-1", "abc", "1.5", ""):
        async with open_stream(
            client, server.stream_url("t1"), token=server.token(), headers={"Last-Event-ID": bad}
        ) as s:
            assert s.response.status_code == 200
            assert (await s.next()).event == "progress"
            assert (await s.next()).event == "complete"


@pytest.mark.parametrize("settings_overrides", [{"stream_timeout": 0.4}])
async def test_reconnect_after_timeout_resumes(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    first = await client.get(server.stream_url("t1"), params={"access_token": server.token()})
    # The timeout event has no id of its own, so the client resumes from the last progress.
    blocks = first.content.decode().split("\n\n")
    assert "id: 1" in blocks[1]
    assert blocks[2].startswith("event: timeout") and "id:" not in blocks[2]
    async with open_stream(
        client, server.stream_url("t1"), token=server.token(), headers={"Last-Event-ID": "1"}
    ) as s:
        assert s.response.status_code == 200
        await sql.execute("UPDATE taskstream.tasks SET progress = 50 WHERE id = 't1'")
        ev = await s.next()  # version 1 is not repeated: the next event is the new version
        assert ev.event == "progress" and ev.id == "2"
