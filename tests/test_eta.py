"""The server-derived ETA: the formula, the start anchor the trigger keeps, and where it shows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from server import events
from server.events import TaskState, derive_eta
from tests.conftest import LiveServer, create_task
from tests.sse_client import open_stream

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


@pytest.mark.parametrize(
    ("progress", "elapsed", "p0", "expected"),
    [
        (40, 40, 0.0, 60),  # 1 %/s, 60 % left
        (50, 10, 0.0, 10),
        (25, 100, 0.0, 300),
        (60, 30, 30.0, 40),  # anchored at 30 %: 30 % in 30 s, 40 % left
        (99.9, 999, 0.0, 1),  # rounded to whole seconds
        (0.001, 1, 0.0, 99999),
    ],
)
def test_formula(progress: float, elapsed: float, p0: float, expected: int) -> None:
    assert derive_eta(progress, at(elapsed), at(0), p0) == expected


@pytest.mark.parametrize(
    ("progress", "updated", "started", "p0"),
    [
        (40, at(10), None, None),  # no anchor: the task never started
        (40, at(10), at(0), None),
        (40, at(0), at(0), 0.0),  # no time has passed
        (40, at(0), at(5), 0.0),  # clock went backwards
        (0, at(10), at(0), 0.0),  # no progress since the start
        (20, at(10), at(0), 30.0),  # progress went back below the anchor
        (100, at(10), at(0), 0.0),  # done: nothing left to estimate
        (40, "not a time", at(0), 0.0),
        (40, None, at(0), 0.0),
    ],
)
def test_null_when_it_cannot_be_estimated(
    progress: float, updated: str | None, started: str | None, p0: float | None
) -> None:
    assert derive_eta(progress, updated, started, p0) is None


def test_never_negative_and_bounded() -> None:
    assert derive_eta(1e-12, at(10**9), at(0), 0.0) == events.MAX_ETA
    for p in (0.5, 10, 50, 99.999):
        for elapsed in (0.001, 1, 1000):
            eta = derive_eta(p, at(elapsed), at(0), 0.0)
            assert eta is not None and eta >= 0


def _state(**kw: Any) -> TaskState:
    base: dict[str, Any] = {
        "id": "t",
        "owner_id": "a",
        "version": 2,
        "state": "running",
        "progress": 40.0,
        "updated_at": at(40),
        "started_at": at(0),
        "start_progress": 0.0,
    }
    base.update(kw)
    return TaskState(**base)


def test_writer_value_wins_and_terminal_is_null() -> None:
    assert _state().progress_data()["estimated_time"] == 60
    assert _state(estimated_time=5).progress_data()["estimated_time"] == 5
    assert _state(estimated_time=0).progress_data()["estimated_time"] == 0
    assert _state(state="failed").progress_data()["estimated_time"] is None
    # A finished task has no ETA, even when the writer left its last estimate in the row.
    assert _state(state="success", estimated_time=3).eta is None
    assert _state(state="cancelled", estimated_time=0).progress_data()["estimated_time"] is None


def test_computed_once_per_state(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = events.derive_eta

    def counting(*args: Any) -> int | None:
        nonlocal calls
        calls += 1
        return real(*args)

    monkeypatch.setattr(events, "derive_eta", counting)
    state = _state()
    for _ in range(5):
        state.progress_data()
        state.api_data()
    state.progress_event()
    assert calls == 1


def test_notification_times_are_normalised_to_utc() -> None:
    payload = (
        '{"id":"t","owner_id":"a","version":2,"state":"x","progress":40,'
        '"updated_at":"2026-01-01T02:00:40+02:00","started_at":"2026-01-01T00:00:00+00:00",'
        '"start_progress":0,"created_at":"2026-01-01T01:00:00+01:00"}'
    )
    state = TaskState.from_notification(payload)
    assert state.updated_at == "2026-01-01T00:00:40+00:00"
    assert state.created_at == "2026-01-01T00:00:00+00:00"
    assert state.eta == 60


# -- the anchor, kept by the trigger -----------------------------------------------------------


async def _anchor(sql: asyncpg.Connection, task_id: str = "t1") -> tuple[Any, Any]:
    row = await sql.fetchrow(
        "SELECT started_at, start_progress, updated_at FROM taskstream.tasks WHERE id = $1",
        task_id,
    )
    return row["started_at"], row["start_progress"]


async def test_anchor_is_the_first_change_at_work(sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1", state="queued")
    assert await _anchor(sql) == (None, None)
    await sql.execute("UPDATE taskstream.tasks SET error = 'note' WHERE id = 't1'")
    assert await _anchor(sql) == (None, None)  # still waiting in the queue
    await sql.execute("UPDATE taskstream.tasks SET state = 'downloading' WHERE id = 't1'")
    started, p0 = await _anchor(sql)
    updated = await sql.fetchval("SELECT updated_at FROM taskstream.tasks")
    assert started == updated and p0 == 0
    await sql.execute("UPDATE taskstream.tasks SET progress = 50 WHERE id = 't1'")
    assert await _anchor(sql) == (started, 0)
    # Writers cannot move the anchor.
    await sql.execute(
        "UPDATE taskstream.tasks SET started_at = now() - interval '1 day', start_progress = 7"
    )
    assert await _anchor(sql) == (started, 0)


async def test_anchor_at_insert_when_already_at_work(sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1", state="running", progress=10)
    started, p0 = await _anchor(sql)
    created = await sql.fetchval("SELECT created_at FROM taskstream.tasks")
    assert started == created and p0 == 10
    await create_task(sql, "t2", progress=5)  # pending, but progress > 0
    assert (await _anchor(sql, "t2"))[1] == 5


async def test_anchor_moves_when_progress_restarts(sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1", state="running", progress=40)
    first, _ = await _anchor(sql)
    await sql.execute("UPDATE taskstream.tasks SET progress = 10 WHERE id = 't1'")
    again, p0 = await _anchor(sql)
    assert again > first and p0 == 10


# -- end to end -----------------------------------------------------------------------------


async def test_derived_eta_in_events_and_api(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="queued")
    headers = {"Authorization": f"Bearer {server.token()}"}
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        assert (await s.next()).json()["estimated_time"] is None
        await sql.execute("UPDATE taskstream.tasks SET state = 'transcribing' WHERE id = 't1'")
        assert (await s.next()).json()["estimated_time"] is None  # the anchor itself
        await sql.execute("SELECT pg_sleep(0.2)")
        await sql.execute("UPDATE taskstream.tasks SET progress = 20 WHERE id = 't1'")
        pushed = (await s.next()).json()
        row = await sql.fetchrow("SELECT started_at, updated_at FROM taskstream.tasks")
        elapsed = (row["updated_at"] - row["started_at"]).total_seconds()
        expected = round(elapsed * 80 / 20)
        assert pushed["estimated_time"] == expected
        body = (await client.get(f"{server.url}/api/v1/tasks/t1", headers=headers)).json()
        assert body["estimated_time"] == expected
        assert body["started_at"] == row["started_at"].astimezone(UTC).isoformat()

        # The writer's value wins, in the stream and in the API.
        await sql.execute("UPDATE taskstream.tasks SET estimated_time = 500 WHERE id = 't1'")
        assert (await s.next()).json()["estimated_time"] == 500
        body = (await client.get(f"{server.url}/api/v1/tasks/t1", headers=headers)).json()
        assert body["estimated_time"] == 500

        await sql.execute(
            "UPDATE taskstream.tasks SET state = 'success', progress = 100,"
            " estimated_time = NULL WHERE id = 't1'"
        )
        assert (await s.next()).json()["estimated_time"] is None


async def test_finished_task_has_no_eta_although_the_row_keeps_one(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """A worker that sets only the final state leaves its last estimate in the row: no ETA."""
    await create_task(sql, "t1", state="transcribing")
    await sql.execute("UPDATE taskstream.tasks SET progress = 40, estimated_time = 71")
    headers = {"Authorization": f"Bearer {server.token()}"}
    url = f"{server.url}/api/v1/tasks/t1"
    async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
        first = (await s.next()).json()
        assert first["estimated_time"] == 71
        # The long poll waits for the next version and answers with the finished task.
        poll = client.get(
            url, params={"wait": 10, "after_version": first["version"]}, headers=headers
        )
        poll_task = asyncio.ensure_future(poll)
        await asyncio.sleep(0.2)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success', progress = 100")
        final = (await s.next()).json()
        assert (final["state"], final["estimated_time"]) == ("success", None)
        assert (await s.next()).event == "complete"
        polled = await asyncio.wait_for(poll_task, 10)
    assert polled.status_code == 200
    assert (polled.json()["state"], polled.json()["estimated_time"]) == ("success", None)
    body = (await client.get(url, headers=headers)).json()
    assert (body["state"], body["estimated_time"]) == ("success", None)
    assert await sql.fetchval("SELECT estimated_time FROM taskstream.tasks") == 71
