"""Node's `eventsource` (4.x) and `event-source-polyfill`, run as real Node processes.

Each client gets its own task so the server-side request log tells their requests apart; the
clients run concurrently so the 10-second "no reconnect loop" window is paid once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.clients import NODE_DIR, RequestLog, install_request_log, node_client
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


PACKAGE_DIR = Path(__file__).resolve().parent.parent / "clients" / "js"


def test_package_is_the_served_client_at_the_api_version() -> None:
    """clients/js is the npm package: what the server serves, typed, pinned to API v1."""
    manifest = json.loads((PACKAGE_DIR / "package.json").read_text())
    assert manifest["name"] == "taskstream-client" and manifest["type"] == "module"
    assert manifest["version"].split(".")[0] == "1"  # speaks /api/v1
    static = Path(__file__).resolve().parent.parent / "server" / "static"
    assert "/api/v1/" in (static / "taskstream.js").read_text()
    for entry in manifest["exports"].values():
        if isinstance(entry, dict):
            for file in entry.values():
                name = file.removeprefix("./")
                assert name in manifest["files"], name
                assert (static / name).is_file(), name
    # The installed copy (npm ci via scripts/setup-node-clients.sh) matches the served files.
    installed = NODE_DIR / "node_modules" / "taskstream-client"
    for name in ("taskstream.js", "react.js", "shared.js", "taskstream.d.ts"):
        assert (installed / name).read_bytes() == (static / name).read_bytes(), (
            f"{name}: run scripts/build-js-package.sh"
        )


@pytest.mark.parametrize("ids", [["pk"], ["pk", "pk2"]], ids=["watchTask", "watchTasks"])
async def test_package_in_node_refreshes_tokens_with_every_version(
    server: LiveServer, sql: asyncpg.Connection, tmp_path: Path, ids: list[str]
) -> None:
    """`import { watchTask } from "taskstream-client"` in Node (fetch transport): 3-second
    tokens renewed in a file, a change every 120 ms for 7 s without waiting for the client.
    Refresh ahead opens each new stream before the old token expires: every version arrives
    once, and the status never leaves `live`."""
    server.runtime.verifier.leeway = 0
    log = install_request_log(server)
    for tid in ids:
        await create_task(sql, tid, state="queued", progress=0.0)
    token_file = tmp_path / "token"

    async def renew() -> None:
        while True:
            # Atomically, as a sidecar should: getToken() here reads without retrying.
            token_file.with_suffix(".new").write_text(server.token("alice", ttl=3))
            token_file.with_suffix(".new").replace(token_file)
            await asyncio.sleep(0.5)

    renewer = asyncio.create_task(renew())
    records: list[dict[str, Any]] = []
    proc = await asyncio.create_subprocess_exec(
        "node",
        "package_client.mjs",
        server.url,
        str(token_file),
        ",".join(ids),
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            records.append(json.loads(line))

    reader = asyncio.create_task(read())
    try:
        for _ in range(200):
            if any(r["type"] == "ready" for r in records):
                break
            await asyncio.sleep(0.05)
        assert any(r["type"] == "ready" for r in records), records
        last = dict.fromkeys(ids, 1)
        started = time.monotonic()
        while time.monotonic() - started < 7:
            for tid in ids:
                last[tid] = await sql.fetchval(
                    "UPDATE taskstream.tasks SET state = 'running', progress = progress + 1"
                    " WHERE id = $1 RETURNING version",
                    tid,
                )
            await asyncio.sleep(0.12)
        await asyncio.sleep(0.5)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success'")
        await asyncio.wait_for(proc.wait(), 15)
        await asyncio.wait_for(reader, 5)
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    assert records[0] == {"type": "package", "name": "taskstream-client", "version": "1.0.0"}
    for tid in ids:
        seen = [r["version"] for r in records if r["type"] == "progress" and r["task_id"] == tid]
        assert seen == list(range(1, last[tid] + 2)), (tid, seen)
    statuses = [(r["status"], r["reason"]) for r in records if r["type"] == "status"]
    assert statuses == [("connecting", None), ("live", None), ("closed", "complete")], statuses
    assert {r["transport"] for r in records if r["type"] == "status"} == {None, "fetch"}
    streams = [h for h in log.hits if h.method == "GET" and h.path.startswith("/api/v1/sse/")]
    assert len(streams) >= 3, streams  # at least two refreshes in 7 s of 3-second tokens
    assert records[-1] == {"type": "exit"}
