"""The Celery recipe (docs/celery.md) end to end: a real Celery worker with a real Redis broker
writes its results to PostgreSQL through django-celery-results; the table is attached with the
exact command the recipe documents; a real Chromium on the demo page and ``taskstream watch``
see every ``update_state`` step and the final SUCCESS, and the error of a FAILURE.

Everything started here (redis-server on a free loopback port, the worker) is stopped here.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import pytest
from playwright.async_api import Browser, async_playwright, expect

from server import sources
from server.demo import DEMO_USER
from tests.conftest import LiveServer, env_with
from tests.test_cli_client import finish, first_progress, start_cli, watch_args

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TASKSTREAM_CHROMIUM", "/usr/bin/chromium")
STEPS = 4


def recipe_attach_command() -> list[str]:
    """The `taskstream attach` command exactly as docs/celery.md gives it."""
    text = (ROOT / "docs" / "celery.md").read_text(encoding="utf-8")
    match = re.search(r"```sh\n(taskstream attach celery .*?)\n```", text, re.S)
    assert match, "docs/celery.md lost its attach command"
    return shlex.split(match.group(1).replace("\\\n", " "))[1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: run scripts/setup-redis.sh"
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def celery_env(database_url: str, redis_url: str) -> dict[str, str]:
    return env_with(
        DJANGO_SETTINGS_MODULE="tests.celery_app.settings",
        TASKSTREAM_CELERY_DATABASE_URL=database_url,
        TASKSTREAM_CELERY_BROKER_URL=redis_url,
        DATABASE_URL=database_url,
        PYTHONPATH=str(ROOT),
    )


@pytest.fixture
async def worker(database_url: str, redis_url: str) -> AsyncIterator[dict[str, str]]:
    """The Django project migrated, the table attached as the recipe says, a worker running."""
    env = celery_env(database_url, redis_url)

    async def run(*args: str) -> None:
        # Not subprocess.run: the server under test shares this event loop.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode()

    await run("-m", "django", "migrate", "django_celery_results", "-v", "0")
    await run("-m", "server", *recipe_attach_command())
    (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
    log = (ROOT / "tests" / "artifacts" / "celery-worker.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "celery", "-A", "tests.celery_app.worker", "worker",
        "--pool", "solo", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "--hostname", f"test-{os.getpid()}@127.0.0.1",
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield env
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()


async def enqueue(
    env: dict[str, str], task_id: str, total: int, pause: float, fail_at: int | None = None
) -> None:
    """The backend: grant the task ("celery:<id>") to the demo user, enqueue it.

    Never blocking: the server under test runs in this event loop. (Regression: a blocking
    subprocess.run here stalled the server while the worker ran a task, whose steps then
    reached the page conflated into one.)"""
    args = [task_id.removeprefix("celery:"), str(total), str(pause)]
    args += [] if fail_at is None else [str(fail_at)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.celery_app.enqueue", DEMO_USER, *args,
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


# Every (state, percent) the page's card shows, in order, recorded in the page.
RECORD = """
window.__seen = {};
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(() => {
    for (const li of document.querySelectorAll("li.task")) {
      const bar = li.querySelector(".bar");
      const key = `${li.dataset.state}|${bar ? bar.getAttribute("aria-valuenow") : ""}`;
      const seen = (window.__seen[li.dataset.taskId] ??= []);
      if (seen[seen.length - 1] !== key) seen.push(key);
    }
  }).observe(document.body, { subtree: true, attributes: true, childList: true });
});
"""


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"demo": True, "demo_speed": 0.01}


async def test_celery_progress_reaches_the_browser_and_the_terminal(
    server: LiveServer, sql: asyncpg.Connection, worker: dict[str, str]
) -> None:
    ok_id, bad_id = f"celery:{uuid4()}", f"celery:{uuid4()}"
    # Granted before the worker writes a row: the tasks are the user's, and pending.
    for tid in (ok_id, bad_id):
        await sources.grant(sql, tid, DEMO_USER)
    watchers = [await start_cli(*watch_args(server, t, user=DEMO_USER)) for t in (ok_id, bad_id)]
    for proc in watchers:
        assert "pending" in await first_progress(proc)
    async with async_playwright() as p:
        browser: Browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.add_init_script(RECORD)
            await page.goto(f"{server.url}/?watch={ok_id},{bad_id}")
            ok_card = page.locator(f'li.task[data-task-id="{ok_id}"]')
            bad_card = page.locator(f'li.task[data-task-id="{bad_id}"]')
            for card in (ok_card, bad_card):
                await expect(card).to_have_attribute("data-state", "pending")
            # Both watchers and the page are on: now the backend enqueues (grant, apply_async).
            await enqueue(worker, ok_id, STEPS, 0.5)
            await enqueue(worker, bad_id, STEPS, 0.5, fail_at=3)
            await expect(ok_card).to_have_attribute("data-state", "success", timeout=60_000)
            await expect(ok_card.locator(".outcome")).to_have_text("✓ complete")
            await expect(bad_card).to_have_attribute("data-state", "failed", timeout=60_000)
            await expect(bad_card).to_contain_text("ValueError: step 3 broke")
            seen: dict[str, list[str]] = await page.evaluate("window.__seen")
            (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
            await page.screenshot(path=str(ROOT / "tests" / "artifacts" / "celery.png"))
        finally:
            await browser.close()
    # Every update_state step, in order, then the outcome.
    ok_steps = [s for s in seen[ok_id] if s.startswith("PROGRESS|")]
    assert ok_steps == ["PROGRESS|25", "PROGRESS|50", "PROGRESS|75", "PROGRESS|100"], seen
    assert seen[ok_id][-1] == "success|100"
    bad_steps = [s for s in seen[bad_id] if s.startswith("PROGRESS|")]
    assert bad_steps == ["PROGRESS|25", "PROGRESS|50"], seen
    assert seen[bad_id][-1].startswith("failed|")

    ok, bad = [await finish(proc, timeout=60) for proc in watchers]
    assert ok.code == 0 and ok.last_line == "success", ok
    for pct in ("25.0%  PROGRESS", "50.0%  PROGRESS", "75.0%  PROGRESS", "100.0%  success"):
        assert pct in ok.stderr, ok.stderr
    assert bad.code == 1 and "failed: ValueError: step 3 broke" in bad.stdout + bad.stderr, bad
    assert "50.0%  PROGRESS" in bad.stderr and "75.0%" not in bad.stderr


async def test_a_celery_task_not_granted_to_you_stays_closed(
    server: LiveServer, worker: dict[str, str]
) -> None:
    tid = f"celery:{uuid4()}"
    await enqueue(worker, tid, 1, 0.1)
    proc = await start_cli(*watch_args(server, tid, user="mallory"))
    r = await finish(proc, timeout=30)
    assert r.code == 2 and "not found" in (r.stdout + r.stderr).lower(), r
