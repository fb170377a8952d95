"""Structured logs: JSON lines on stdout, stream and listener events, and never a token."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from typing import Any

import asyncpg
import httpx

from server.auth import issue_token
from server.logs import JsonFormatter, redact, setup_logging
from tests.conftest import SECRET, create_task
from tests.sse_client import open_stream
from tests.test_cli import _clean_env, start_serve


def _json_lines(output: str) -> list[dict[str, Any]]:
    records = []
    for line in output.splitlines():
        if not line.strip() or line.startswith("taskstream listening on "):
            continue  # the one plain line: the URL printed for humans and scripts
        records.append(json.loads(line))  # every other line is one JSON object
    return records


def test_formatter_writes_one_json_object_with_extra_fields() -> None:
    record = logging.LogRecord("server.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.event = "stream_close"
    record.duration_s = 1.5
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "hello you" and out["level"] == "info" and out["logger"] == "server.x"
    assert out["event"] == "stream_close" and out["duration_s"] == 1.5
    assert out["ts"].endswith("+00:00")


def test_redact_masks_tokens_wherever_they_appear() -> None:
    jwt = issue_token(SECRET, "alice")
    assert jwt not in redact(f"GET /x?a=1&access_token={jwt}&b=2")
    assert "&b=2" in redact(f"GET /x?access_token={jwt}&b=2")
    assert "s3cr3t" not in redact("Authorization: Bearer s3cr3t")
    assert jwt not in redact(f"token was {jwt}")


def test_log_level_comes_from_the_setting() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging("warning")
        assert root.level == logging.WARNING
        buf = io.StringIO()
        root.handlers[0].setStream(buf)  # type: ignore[attr-defined]
        logging.getLogger("server.stream.routes").info("not shown")
        logging.getLogger("server.stream.listener").warning(
            "shown", extra={"event": "listener_lost"}
        )
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert [x["msg"] for x in lines] == ["shown"]
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


async def test_serve_logs_json_events_and_never_a_token(database_url: str) -> None:
    """A real `taskstream serve`, at DEBUG, with tokens in the query string and the header."""
    env = _clean_env(
        DATABASE_URL=database_url,
        TASKSTREAM_JWT_SECRET=SECRET,
        TASKSTREAM_LOG_LEVEL="DEBUG",
        TASKSTREAM_LISTENER_CHECK="0.2",
    )
    query_token = issue_token(SECRET, "alice", ttl=60)
    header_token = issue_token(SECRET, "alice", ttl=120)
    forged_query = "forged.query-token-SENTINEL-1"
    forged_header = "forged-header-token-SENTINEL-2"
    secrets = [query_token, header_token, forged_query, forged_header]

    serve = await start_serve(env)
    conn = await asyncpg.connect(database_url)
    try:
        await serve.wait_ready()
        await create_task(conn, "t1")
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{serve.url}/api/v1/sse/tasks/t1/progress"
            async with open_stream(client, f"{url}?access_token={query_token}") as s:
                assert (await s.next(5)).event == "progress"
                await conn.execute("UPDATE taskstream.tasks SET state='success' WHERE id='t1'")
                assert (await s.next(5)).event == "progress"
                assert (await s.next(5)).event == "complete"
                await s.wait_closed(5)
            missing = f"{serve.url}/api/v1/sse/tasks/nope/progress"
            async with open_stream(client, missing, token=header_token) as s:
                assert (await s.next(5)).event == "error"
                await s.wait_closed(5)
            r = await client.get(f"{url}?access_token={forged_query}")
            assert r.status_code == 401
            r = await client.get(url, headers={"Authorization": f"Bearer {forged_header}"})
            assert r.status_code == 401

            # Listener loss and recovery are logged too.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'taskstream-listener'"
                " AND datname = current_database()"
            )
            deadline = time.monotonic() + 10
            while (await client.get(f"{serve.url}/readyz")).status_code != 200 or not any(
                "listener_restored" in line for line in serve.output
            ):
                assert time.monotonic() < deadline, "listener did not come back"
                await asyncio.sleep(0.1)
                await _read_available(serve)
    finally:
        await conn.close()
        code = await serve.stop()
    output = "".join(serve.output)
    assert code == 0, output
    for secret in secrets:
        assert secret not in output, "a token reached the logs"
    assert "access_token=" not in output

    records = _json_lines(output)
    access = [r for r in records if r.get("event") == "access"]
    by_status = {(r["path"], r["status"]) for r in access}
    assert ("/api/v1/sse/tasks/t1/progress", 200) in by_status
    assert ("/api/v1/sse/tasks/t1/progress", 401) in by_status
    assert all("?" not in r["path"] for r in access)

    closes = {r["path"]: r for r in records if r.get("event") == "stream_close"}
    assert closes["/api/v1/sse/tasks/t1/progress"]["reason"] == "complete"
    assert closes["/api/v1/sse/tasks/nope/progress"]["reason"] == "not_found"
    assert all(isinstance(r["duration_s"], float) for r in closes.values())
    opens = [r for r in records if r.get("event") == "stream_open"]
    assert len(opens) == 2
    events = {r.get("event") for r in records}
    assert {"listener_lost", "listener_restored"} <= events
    assert any("taskstream ready" in r["msg"] for r in records)


async def _read_available(serve: Any) -> None:
    """Pull whatever the server printed so far into ``serve.output`` (without waiting)."""
    stdout = serve.proc.stdout
    while True:
        try:
            line = await asyncio.wait_for(stdout.readline(), 0.01)
        except TimeoutError:
            return
        if not line:
            return
        serve.output.append(line.decode())
