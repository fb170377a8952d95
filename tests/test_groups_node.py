"""The npm package's watchGroup in Node (fetch transport): every task of a group, including
tasks created while it watches, every version once across token refreshes, until the group is
closed and all its tasks are terminal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.clients import NODE_DIR, install_request_log
from tests.conftest import LiveServer, create_task


@pytest.mark.timeout(90)
async def test_package_watch_group_in_node_across_token_refreshes(
    server: LiveServer, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    server.runtime.verifier.leeway = 0
    log = install_request_log(server)
    await create_task(sql, "ng0", state="queued", group_id="ng")
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
        "group:ng",
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            records.append(json.loads(line))

    reader = asyncio.create_task(read())
    last: dict[str, int] = {"ng0": 1}
    try:
        for _ in range(200):
            if any(r["type"] == "ready" for r in records):
                break
            await asyncio.sleep(0.05)
        assert any(r["type"] == "ready" for r in records), records
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 5:
            n += 1
            if n % 10 == 0:  # a new task joins the group every 1.2 s
                tid = f"ng{n // 10}"
                await create_task(sql, tid, state="queued", group_id="ng", metadata='{"n": 1}')
                last[tid] = 1
            for tid in last:
                last[tid] = await sql.fetchval(
                    "UPDATE taskstream.tasks SET state = 'running', progress = progress + 1"
                    " WHERE id = $1 RETURNING version",
                    tid,
                )
            await asyncio.sleep(0.12)
        await asyncio.sleep(0.5)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success'")
        await sql.execute("UPDATE taskstream.groups SET closed_at = now()")
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
    assert len(last) >= 4
    for tid in last:
        seen = [r["version"] for r in records if r["type"] == "progress" and r["task_id"] == tid]
        assert seen == list(range(1, last[tid] + 2)), (tid, seen)
    assert any(r.get("metadata") == {"n": 1} for r in records if r["type"] == "progress")
    statuses = [(r["status"], r["reason"]) for r in records if r["type"] == "status"]
    assert statuses == [("connecting", None), ("live", None), ("closed", "complete")], statuses
    assert [r for r in records if r["type"] == "all_done"] == [
        {"type": "all_done", "tasks": sorted(last)}
    ]
    streams = [h for h in log.hits if h.method == "GET" and h.path.startswith("/api/v1/sse/")]
    assert len(streams) >= 2, streams  # at least one refresh in 5 s of 3-second tokens
    assert records[-1] == {"type": "exit"}
