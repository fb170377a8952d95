"""The web side without a browser: the page and static files, demo mode's endpoints and worker."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg
import httpx
import pytest

from server.auth import TokenVerifier
from server.demo import DEMO_USER, MAX_ACTIVE_DEMO_TASKS, plan_step, simulate_once
from tests import conftest
from tests.conftest import SECRET, LiveServer, create_task, run_server

# ---- the demo plan (pure) -----------------------------------------------------------------------


def _walk(task_id: str, until: float = 40.0, step: float = 0.1) -> list[Any]:
    return [plan_step(task_id, i * step) for i in range(int(until / step))]


def test_demo_plan_goes_through_realistic_states_in_order() -> None:
    order = ["queued", "downloading", "transcribing", "success", "failed"]
    for n in range(60):
        steps = _walk(f"demo_{n}")
        states = [s.state for s in steps]
        seen = list(dict.fromkeys(states))
        assert seen[:3] == ["queued", "downloading", "transcribing"]
        assert seen[3] in ("success", "failed") and len(seen) == 4
        assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)
        progress = [s.progress for s in steps]
        assert progress == sorted(progress), "progress never goes back"
        assert all(0 <= p <= 100 for p in progress)
        etas = [s.estimated_time for s in steps if s.estimated_time is not None]
        assert etas == sorted(etas, reverse=True) and min(etas) >= 0
        final = steps[-1]
        if final.state == "success":
            assert final.progress == 100 and final.error is None
        else:
            assert final.progress < 100 and final.error and "simulated" in final.error


def test_demo_plan_fails_occasionally_not_often() -> None:
    fates = [_walk(f"demo_{n:04d}", step=1.0)[-1].state for n in range(600)]
    failed = fates.count("failed") / len(fates)
    assert 0.08 < failed < 0.25, failed


def test_demo_failure_message_is_not_a_clock_time() -> None:
    errors = {_walk(f"demo_{n:04d}", step=1.0)[-1].error for n in range(200)} - {None}
    assert len(errors) > 5  # the crash point differs between tasks
    for error in errors:
        assert error and error.startswith("simulated failure: ") and " into the recording" in error
        assert not re.search(r"\d:\d\d", error), error


def test_demo_plan_rejects_negative_age() -> None:
    with pytest.raises(ValueError):
        plan_step("demo_x", -1)


async def test_simulated_worker_writes_with_sql_and_leaves_other_tasks_alone(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "demo_abc", owner=DEMO_USER, state="queued")
    await create_task(sql, "real_job", owner=DEMO_USER, state="queued")
    await create_task(sql, "demo_done", owner=DEMO_USER, state="cancelled")
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2)
    try:
        # 1000x speed: the demo task is a thousand simulated seconds old, so at its end.
        await asyncio.sleep(0.05)
        assert await simulate_once(pool, speed=1000) == 1
        assert await simulate_once(pool, speed=1000) == 0  # terminal now: nothing left to move
    finally:
        await pool.close()
    rows = {
        r["id"]: r
        for r in await sql.fetch("SELECT id, state, progress, version FROM taskstream.tasks")
    }
    assert rows["demo_abc"]["state"] in ("success", "failed")
    assert rows["demo_abc"]["version"] == 2
    assert (rows["real_job"]["state"], rows["real_job"]["version"]) == ("queued", 1)
    assert (rows["demo_done"]["state"], rows["demo_done"]["version"]) == ("cancelled", 1)


# ---- the page and the static files --------------------------------------------------------------


async def test_page_is_served_with_a_strict_policy(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.get(server.url + "/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "Start demo task" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp


@pytest.mark.parametrize("name", ["taskstream.js", "react.js", "demo.js"])
async def test_client_modules_are_served_as_javascript(
    server: LiveServer, client: httpx.AsyncClient, name: str
) -> None:
    r = await client.get(f"{server.url}/static/{name}")
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert "max-age=0" in r.headers["cache-control"]
    again = await client.get(
        f"{server.url}/static/{name}", headers={"If-None-Match": r.headers["etag"]}
    )
    assert again.status_code == 304


async def test_static_does_not_serve_the_working_directory(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/missing.js"):
        r = await client.get(server.url + path)
        assert r.status_code == 404, path


# ---- demo mode endpoints ------------------------------------------------------------------------


async def test_demo_routes_do_not_exist_outside_demo_mode(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    assert not server.settings.demo
    assert (await client.get(server.url + "/demo/token")).status_code == 404
    r = await client.post(
        server.url + "/demo/tasks", headers={"Authorization": f"Bearer {server.token()}"}
    )
    assert r.status_code in (404, 405)


@pytest.fixture
async def demo_server(database_url: str) -> Any:
    # A slow simulated worker, so the tasks these tests create stay where they were put.
    settings = conftest.make_settings(database_url, demo=True, demo_speed=0.01)
    async with run_server(settings) as live:
        yield live


async def test_demo_token_is_for_the_demo_user(
    demo_server: LiveServer, client: httpx.AsyncClient
) -> None:
    r = await client.get(demo_server.url + "/demo/token")
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["user_id"] == DEMO_USER and body["expires_in"] == 3600
    assert (await TokenVerifier(SECRET).verify(body["token"])).user_id == DEMO_USER


async def test_demo_task_is_created_for_the_caller(
    demo_server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    r = await client.post(demo_server.url + "/demo/tasks")
    assert r.status_code == 401
    r = await client.post(
        demo_server.url + "/demo/tasks",
        headers={"Authorization": f"Bearer {demo_server.token('carol')}"},
    )
    assert r.status_code == 201
    task = r.json()
    assert task["task_id"].startswith("demo_") and task["state"] == "queued"
    assert task["version"] == 1 and task["progress"] == 0
    owner = await sql.fetchval(
        "SELECT owner_id FROM taskstream.tasks WHERE id = $1", task["task_id"]
    )
    assert owner == "carol"


async def test_demo_tasks_are_capped_per_user(
    demo_server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await sql.executemany(
        "INSERT INTO taskstream.tasks (id, owner_id, state) VALUES ($1, 'demo', 'queued')",
        [(f"demo_fill{n}",) for n in range(MAX_ACTIVE_DEMO_TASKS)],
    )
    r = await client.post(
        demo_server.url + "/demo/tasks",
        headers={"Authorization": f"Bearer {demo_server.token(DEMO_USER)}"},
    )
    assert r.status_code == 429 and r.json()["error"] == "Too many running demo tasks"


# ---- the command -------------------------------------------------------------------------------


async def test_serve_demo_runs_the_simulated_worker(database_url: str) -> None:
    from tests.test_cli import _clean_env, start_serve

    env = _clean_env(
        DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET, TASKSTREAM_DEMO_SPEED="50"
    )
    serve = await start_serve(env, "--demo")
    try:
        await serve.wait_ready()
        assert any("demo mode: open" in line for line in serve.output)
        async with httpx.AsyncClient(timeout=10) as client:
            token = (await client.get(serve.url + "/demo/token")).json()["token"]
            r = await client.post(
                serve.url + "/demo/tasks", headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 201
            task_id = r.json()["task_id"]
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(100):
                state = await conn.fetchval(
                    "SELECT state FROM taskstream.tasks WHERE id = $1", task_id
                )
                if state in ("success", "failed"):
                    break
                await asyncio.sleep(0.1)
            assert state in ("success", "failed")
        finally:
            await conn.close()
    finally:
        code = await serve.stop()
    assert code == 0, "".join(serve.output)
    assert "Traceback" not in "".join(serve.output)


async def test_serve_without_demo_has_no_demo_routes(database_url: str) -> None:
    from tests.test_cli import _clean_env, start_serve

    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    serve = await start_serve(env)
    try:
        await serve.wait_ready()
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(serve.url + "/demo/token")).status_code == 404
            assert (await client.get(serve.url + "/")).status_code == 200
    finally:
        assert await serve.stop() == 0
