"""Node's `eventsource` (4.x) and `event-source-polyfill`, run as real Node processes.

Each client gets its own task so the server-side request log tells their requests apart; the
clients run concurrently so the 10-second "no reconnect loop" window is paid once.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from tests.clients import RequestLog, install_request_log, node_client
from tests.conftest import LiveServer, create_task

LIBS = ("eventsource", "polyfill")
LINGER_S = 10


def _assert_at_most_one_reconnect_and_told_to_stop(
    log: RequestLog, task_id: str, label: str
) -> int:
    """The client came back at most once, and that reconnect was told to stop: 204, or 410 for
    the polyfill (its fetch transport cannot take a 204; see server/stream/routes.py)."""
    gets = log.stream_gets(task_id)
    assert gets, f"{label}: no request seen"
    assert gets[0].status == 200, f"{label}: {gets}"
    again = gets[1:]
    assert len(again) <= 1, f"{label} reconnect loop: {len(again)} more requests {again}"
    for hit in again:
        expected = 410 if "lastEventId=" in hit.query else 204
        assert hit.status == expected, f"{label}: reconnect answered {hit.status}"
    return len(again)


async def test_node_clients_see_progress_in_order_then_complete_and_stop(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    log = install_request_log(server)
    token = server.token()
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for lib in LIBS:
            task_id = f"node-{lib}"
            await create_task(sql, task_id)
            clients[lib] = await stack.enter_async_context(
                node_client(server.stream_url(task_id), token, lib, linger_ms=LINGER_S * 1000)
            )
        for c in clients.values():
            await c.wait_for(lambda c: len(c.events()) >= 1, 10)
        # Each update waits until both clients have it: the server conflates a state that is
        # still pending when a newer one commits (by design), so back-to-back writes could
        # legitimately merge and this test is about the clients, not about conflation.
        for n, progress in enumerate((25, 50, 75), start=2):
            await sql.execute(
                "UPDATE taskstream.tasks SET state = 'running', progress = $1"
                " WHERE id LIKE 'node-%'",
                progress,
            )
            for c in clients.values():
                await c.wait_for(lambda c, n=n: len(c.events()) >= n, 10)
        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'success', progress = 100 WHERE id LIKE 'node-%'"
        )
        # Neither client calls close(): each lingers LINGER_S after `complete`, then exits.
        await asyncio.gather(*(c.wait_exit(LINGER_S + 15) for c in clients.values()))

    for lib, c in clients.items():
        evs = c.events()
        assert [e["event"] for e in evs] == ["progress"] * 5 + ["complete"], (lib, c.records)
        progress = evs[:5]
        assert [e["id"] for e in progress] == ["1", "2", "3", "4", "5"], lib
        assert [e["data"]["version"] for e in progress] == [1, 2, 3, 4, 5], lib
        assert [e["data"]["progress"] for e in progress] == [0, 25, 50, 75, 100], lib
        assert evs[-1]["data"] == {"state": "success"}, lib
        assert c.records[-1] == {**c.records[-1], "type": "done", "readyState": 2}, lib  # CLOSED
        n = _assert_at_most_one_reconnect_and_told_to_stop(log, f"node-{lib}", lib)
        print(f"{lib}: {n} reconnect(s) in {LINGER_S}s after complete")
    # The polyfill resumes with ?lastEventId=, Node's eventsource with the Last-Event-ID header.
    resumed = {lib: log.stream_gets(f"node-{lib}")[1:] for lib in LIBS}
    for hit in resumed["eventsource"]:
        assert hit.last_event_id == "5"
    for hit in resumed["polyfill"]:
        assert "lastEventId=5" in hit.query


async def test_node_clients_stop_after_task_not_found(server: LiveServer) -> None:
    log = install_request_log(server)
    token = server.token()
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            lib: await stack.enter_async_context(
                node_client(
                    server.stream_url(f"missing-{lib}"), token, lib, linger_ms=LINGER_S * 1000
                )
            )
            for lib in LIBS
        }
        await asyncio.gather(*(c.wait_exit(LINGER_S + 15) for c in clients.values()))
    for lib, c in clients.items():
        evs = c.events()
        assert [e["event"] for e in evs] == ["error"], (lib, c.records)
        assert evs[0]["data"] == {"error": "Task not found"} and evs[0]["id"] == "end"
        assert c.records[-1] == {**c.records[-1], "type": "done", "readyState": 2}, lib  # CLOSED
        n = _assert_at_most_one_reconnect_and_told_to_stop(log, f"missing-{lib}", lib)
        print(f"{lib}: {n} reconnect(s) in {LINGER_S}s after not-found")
