"""Operations: every metric moves on real traffic, and /readyz follows the LISTEN connection.

Metrics live in process-wide objects shared by every server this test session starts, so each
test compares a scrape of ``/metrics`` before and after, never absolute values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable

import asyncpg
import httpx
import pytest

from server.auth import issue_token
from tests.conftest import SECRET, LiveServer, create_task
from tests.scrape import Samples, scrape, value
from tests.sse_client import open_stream
from tests.test_cli import _clean_env, start_serve


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def moved(
    client: httpx.AsyncClient,
    server: LiveServer,
    before: Samples,
    name: str,
    by: float = 1,
    **labels: str,
) -> Samples:
    """Wait until sample ``name`` rose by at least ``by`` over ``before``; return that scrape."""
    latest: Samples = {}

    async def check() -> bool:
        nonlocal latest
        latest = await scrape(client, server.url)
        return value(latest, name, **labels) - value(before, name, **labels) >= by

    try:
        await eventually(check)
    except AssertionError:
        raise AssertionError(
            f"{name}{labels} went from {value(before, name, **labels)} "
            f"to {value(latest, name, **labels)}, expected +{by}"
        ) from None
    return latest


async def test_healthz_and_readyz_answer_200(server: LiveServer, client: httpx.AsyncClient) -> None:
    assert (await client.get(f"{server.url}/healthz")).json() == {"status": "ok"}
    r = await client.get(f"{server.url}/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


async def test_stream_metrics_follow_a_stream_from_open_to_complete(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    before = await scrape(client, server.url)
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        assert (await s.next()).event == "progress"
        during = await moved(client, server, before, "taskstream_streams_open")
        await moved(client, server, before, "taskstream_events_sent_total", type="progress")
        assert value(during, "taskstream_events_sent_total", type="retry") > value(
            before, "taskstream_events_sent_total", type="retry"
        )

        await sql.execute("UPDATE taskstream.tasks SET progress = 50 WHERE id = 't1'")
        assert (await s.next()).json()["progress"] == 50
        await moved(client, server, before, "taskstream_notifications_received_total")
        # The update came through NOTIFY, so its commit-to-socket latency was observed.
        pushed = await moved(client, server, before, "taskstream_push_latency_seconds_count")
        latency = value(pushed, "taskstream_push_latency_seconds_sum") - value(
            before, "taskstream_push_latency_seconds_sum"
        )
        assert 0 < latency < 2, latency

        await sql.execute("UPDATE taskstream.tasks SET state = 'success' WHERE id = 't1'")
        assert (await s.next()).event == "progress"
        assert (await s.next()).event == "complete"
        await s.wait_closed()
    after = await moved(client, server, before, "taskstream_stream_duration_seconds_count")
    assert value(after, "taskstream_events_sent_total", type="complete") > value(
        before, "taskstream_events_sent_total", type="complete"
    )
    assert value(after, "taskstream_streams_open") == value(before, "taskstream_streams_open")


async def test_snapshot_is_not_counted_as_push_latency(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """Push latency is commit-to-socket: a state read from the table has no commit stamp."""
    await create_task(sql, "t1")
    await asyncio.sleep(0.2)  # the INSERT's own notification reaches nobody
    before = await scrape(client, server.url)
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        await moved(client, server, before, "taskstream_events_sent_total", type="progress")
    after = await scrape(client, server.url)
    assert value(after, "taskstream_push_latency_seconds_count") == value(
        before, "taskstream_push_latency_seconds_count"
    )


async def test_conflated_states_are_counted(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1")
    # Over HTTP/2 (h2c): an HTTP/1.1 stream whose socket has drained writes each state on the spot
    # (server/stream/session.py, direct_write) and conflates only for a slow client; an HTTP/2
    # stream always takes the mailbox, where states that arrive together are conflated.
    url = f"{server.url}/api/v1/sse/tasks?ids=t1"
    async with (
        httpx.AsyncClient(http1=False, http2=True, timeout=10) as h2c,
        open_stream(h2c, url, token=server.token()) as s,
    ):
        assert s.response.http_version == "HTTP/2"
        await s.next()
        before = await scrape(client, server.url)
        # One transaction: its three notifications arrive together, before the stream runs, so
        # the mailbox keeps only the newest.
        async with sql.transaction():
            for p in (10, 20, 30):
                await sql.execute("UPDATE taskstream.tasks SET progress = $1 WHERE id = 't1'", p)
        assert (await s.next()).json()["progress"] == 30
        await s.expect_nothing(0.2)
        await moved(client, server, before, "taskstream_events_conflated_total", by=2)


@pytest.mark.parametrize("settings_overrides", [{"max_streams_per_user": 1, "stream_timeout": 0.6}])
async def test_stream_errors_are_counted_by_reason(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    name = "taskstream_stream_errors_total"
    await create_task(sql, "t1")
    before = await scrape(client, server.url)

    r = await client.get(server.stream_url("t1"))
    assert r.status_code == 401
    await moved(client, server, before, name, reason="auth")

    async with open_stream(client, server.stream_url("nope"), token=server.token()) as s:
        assert (await s.next()).event == "error"
        await s.wait_closed()
    await moved(client, server, before, name, reason="not_found")

    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        await s.next()
        second = await client.get(server.stream_url("t1"), headers=_bearer(server.token()))
        assert second.status_code == 429
        await moved(client, server, before, name, reason="limit")
        assert (await s.next(timeout=3)).event == "timeout"
        await s.wait_closed()
    await moved(client, server, before, name, reason="timeout")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("settings_overrides", [{"send_timeout": 0.5, "heartbeat": 0.05}])
async def test_send_timeout_is_counted(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """A client that stops reading: its socket fills, the send stalls, the server cuts it off."""
    ids = [f"{i:03d}" + "x" * 190 for i in range(100)]
    for tid in ids:
        await create_task(sql, tid)
    before = await scrape(client, server.url)
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    # A tiny receive window, never read: the server's writes back up quickly.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, int(port)))
        request = (
            f"GET /api/v1/sse/tasks?ids={','.join(ids)} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {server.token()}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())

        async def cut_off() -> bool:
            await sql.execute(
                "UPDATE taskstream.tasks SET progress = mod(progress::int + 1, 100)"
                " WHERE owner_id = 'alice'"
            )
            latest = await scrape(client, server.url)
            return value(latest, "taskstream_stream_errors_total", reason="send_timeout") > value(
                before, "taskstream_stream_errors_total", reason="send_timeout"
            )

        await eventually(cut_off, timeout=20)
    finally:
        sock.close()


@pytest.mark.parametrize("settings_overrides", [{"listener_check_interval": 0.2}])
async def test_readyz_flips_to_503_while_the_listener_is_down_and_back(
    server: LiveServer,
    client: httpx.AsyncClient,
    sql: asyncpg.Connection,
    pg_cluster: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="server.stream.listener")
    ready = f"{server.url}/readyz"
    before = await scrape(client, server.url)
    assert value(before, "taskstream_listener_connected") == 1
    db = await sql.fetchval("SELECT current_database()")
    # Keep it from coming straight back (it reconnects within milliseconds otherwise): the
    # database refuses new connections, superusers included, while the pool keeps its own.
    admin = await asyncpg.connect(pg_cluster)  # a database cannot lock itself out
    await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
    try:
        killed = await sql.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'taskstream-listener' AND datname = current_database()"
        )
        assert killed == 1

        async def not_ready() -> bool:
            r = await client.get(ready)
            return r.status_code == 503 and "LISTEN connection is down" in r.json()["reasons"]

        await eventually(not_ready)
        r = await client.get(ready)
        assert r.headers["retry-after"] == "2"
        down = await scrape(client, server.url)
        assert value(down, "taskstream_listener_connected") == 0
    finally:
        await admin.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        await admin.close()

    async def is_ready() -> bool:
        return (await client.get(ready)).status_code == 200

    await eventually(is_ready, timeout=15)
    after = await moved(client, server, before, "taskstream_listener_reconnects_total")
    assert value(after, "taskstream_listener_connected") == 1
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "listener_lost" in events and "listener_restored" in events


@pytest.mark.parametrize("settings_overrides", [{"metrics_sample_interval": 0.1}])
async def test_notification_queue_usage_is_sampled(
    server: LiveServer, client: httpx.AsyncClient, database_url: str
) -> None:
    """A LISTEN session stuck in a transaction holds the queue's tail, so usage climbs."""
    stuck = await asyncpg.connect(database_url)
    sender = await asyncpg.connect(database_url)
    try:
        await stuck.execute("LISTEN taskstream_test_stuck")
        before = await scrape(client, server.url)
        async with stuck.transaction():
            await stuck.execute("SELECT 1")
            payload = "y" * 7000
            for _ in range(40):
                await sender.execute("SELECT pg_notify('taskstream_test_fill', $1)", payload)

            async def sampled_up() -> bool:
                latest = await scrape(client, server.url)
                name = "taskstream_notification_queue_usage"
                return value(latest, name) > value(before, name)

            await eventually(sampled_up)
    finally:
        await stuck.close()
        await sender.close()


async def test_metrics_add_up_across_workers(database_url: str, sql: asyncpg.Connection) -> None:
    """`serve --workers 2`: whichever worker answers /metrics reports the streams of both."""
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    serve = await start_serve(env, "--workers", "2")
    metrics_dir = ""
    try:
        await serve.wait_ready(ready_lines=2)
        m = re.search(r"merged through (\S+?)\"", "".join(serve.output))
        assert m, "".join(serve.output)
        metrics_dir = m.group(1)
        token = issue_token(SECRET, "alice", ttl=60)
        n = 6
        for i in range(n):
            await create_task(sql, f"t{i}")
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
            for i in range(n):
                url = f"{serve.url}/api/v1/sse/tasks/t{i}/progress"
                s = await stack.enter_async_context(open_stream(client, url, token=token))
                await s.next(5)
            # A new connection per scrape, so the kernel may hand each to either worker.
            for _ in range(6):
                async with httpx.AsyncClient(timeout=10) as fresh:
                    samples = await scrape(fresh, serve.url)
                assert value(samples, "taskstream_streams_open") == n
                assert value(samples, "taskstream_listener_connected") == 2
    finally:
        code = await serve.stop()
    assert code == 0, "".join(serve.output)
    # One stat of a local path after the server exited: nothing to wait for.
    gone = not os.path.exists(metrics_dir)  # noqa: ASYNC240
    assert metrics_dir and gone, "metrics directory left behind"


def test_a_coalesced_write_is_counted_event_by_event() -> None:
    # The kinds and the close reason are recorded where the events are made, never parsed back
    # out of the bytes written (rewording a message cannot change a metric label).
    from types import SimpleNamespace

    from server.stream.mailbox import Subscription
    from server.stream.observe import CloseReason
    from server.stream.session import StreamSession
    from server.tasks import TaskState

    # StreamSession has __slots__: its resume id comes from a real mailbox, not a patched method.
    lease = SimpleNamespace(sub=Subscription("alice", {"t1", "t2"}, None))
    stream = StreamSession(None, lease, None, open_ids={"t1", "t2"}, multi=True, order=["t1", "t2"])  # type: ignore[arg-type]
    state = TaskState(id="t1", owner_id="alice", version=2, state="success")
    chunk = b"".join(stream.finish(state))
    assert chunk.count(b"\n\n") == 2
    assert stream.kinds == ["progress", "complete"]
    assert stream.ending.reason == CloseReason.COMPLETE == "complete"
    stream.finish(TaskState.gone("t2"))
    assert stream.kinds == ["progress", "complete", "error"]
    assert stream.ending.reason == CloseReason.NOT_FOUND == "not_found"
    assert CloseReason.TOKEN_EXPIRED == "token_expired" and CloseReason.TIMEOUT == "timeout"
    assert stream.done


async def test_multi_task_snapshot_counts_every_event(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    for tid in ("a", "b", "c"):
        await create_task(sql, tid)
    before = await scrape(client, server.url)
    url = f"{server.url}/api/v1/sse/tasks?ids=a,b,c"
    async with open_stream(client, url, token=server.token()) as s:
        for _ in range(3):
            assert (await s.next()).event == "progress"
        await moved(client, server, before, "taskstream_events_sent_total", by=3, type="progress")
