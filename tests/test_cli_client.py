"""``taskstream watch``, ``create`` and ``update`` as a user runs them: real processes against the
real server fixture (and straight against the database)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from server.client.terminal import format_eta, progress_line, render_bar
from tests.conftest import LiveServer, create_task

WRITE = ["tasks:write"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKSTREAM_", "DATABASE_"))}
    env.update(extra)
    return env


async def start_cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        *args,
        env=env if env is not None else _env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = 30, seen: str = "") -> Result:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), seen + err.decode())


async def first_progress(proc: asyncio.subprocess.Process, timeout: float = 15) -> str:
    """The watcher's first progress line (stderr): once it is out, the snapshot was taken, so
    what the test writes next arrives as a change."""
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), timeout)
    assert line, "the watcher printed nothing"
    return line.decode()


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Result:
    return await finish(await start_cli(*args, env=env), timeout)


def watch_args(server: LiveServer, task_id: str, *extra: str, user: str = "alice") -> list[str]:
    return ["watch", task_id, "--url", server.url, "--token", server.token(user), *extra]


async def wait_for_stream(server: LiveServer, count: int = 1) -> None:
    for _ in range(200):
        if server.runtime.broker.subscriber_count >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the watcher never connected")


# -- rendering ------------------------------------------------------------------------------


def test_bar_and_eta_formatting() -> None:
    assert render_bar(0, 10) == "[----------]"
    assert render_bar(40, 10) == "[####------]"
    assert render_bar(100, 10) == "[##########]"
    assert render_bar(250, 10) == "[##########]"
    assert [format_eta(s) for s in (None, 0, 59, 71, 3600, 7322)] == [
        "--",
        "0s",
        "59s",
        "1m11s",
        "1h00m",
        "2h02m",
    ]
    line = progress_line({"progress": 40, "state": "transcribing", "estimated_time": 71})
    assert "40.0%" in line and "transcribing" in line and "ETA 1m11s" in line
    # A finished task shows no ETA, even if the data carries the writer's last estimate.
    for state in ("success", "failed", "cancelled"):
        line = progress_line({"progress": 100, "state": state, "estimated_time": 71})
        assert line.endswith(f"100.0%  {state}") and "ETA" not in line, line
    # Text from the server cannot drive the terminal.
    assert "\x1b" not in progress_line({"progress": 1, "state": "\x1b[2Jevil"})


# -- watch: every exit code -----------------------------------------------------------------


async def test_watch_success_exits_0(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1", state="queued")
    proc = await start_cli(*watch_args(server, "t1"))
    seen = await first_progress(proc)
    assert "0.0%  queued  ETA --" in seen
    await sql.execute(
        "UPDATE taskstream.tasks SET state = 'transcribing', progress = 40, estimated_time = 71"
    )
    await asyncio.sleep(0.2)
    await sql.execute("UPDATE taskstream.tasks SET state = 'success', progress = 100")
    r = await finish(proc, seen=seen)
    assert r.code == 0, r
    assert r.last_line == "success"
    # Not a terminal: one line per change on stderr, with state, percent and ETA.
    assert "queued" in r.stderr
    assert "40.0%  transcribing  ETA 1m11s" in r.stderr
    assert "100.0%  success" in r.stderr
    # The writer left estimated_time = 71 in the row: a finished task still shows no ETA.
    assert "1m11s" not in r.stderr.split("100.0%  success")[1]
    assert "success  ETA" not in r.stderr


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ("state = 'failed', error = 'disk full'", "failed: disk full"),
        ("state = 'cancelled'", "cancelled"),
    ],
)
async def test_watch_failed_or_cancelled_exits_1(
    server: LiveServer, sql: asyncpg.Connection, update: str, reason: str
) -> None:
    await create_task(sql, "t1", state="running")
    proc = await start_cli(*watch_args(server, "t1"))
    await first_progress(proc)
    await sql.execute(f"UPDATE taskstream.tasks SET {update}")
    r = await finish(proc)
    assert (r.code, r.last_line) == (1, reason), r


async def test_watch_finished_task_exits_at_once(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="failed")
    r = await cli(*watch_args(server, "t1"))
    assert (r.code, r.last_line) == (1, "failed: no error given")


async def test_watch_missing_or_foreign_task_exits_2(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "bobs", owner="bob")
    for task_id in ("nope", "bobs"):
        r = await cli(*watch_args(server, task_id))
        assert (r.code, r.last_line) == (2, "error: Task not found"), r


@pytest.mark.parametrize("settings_overrides", [{"stream_timeout": 0.5}])
async def test_watch_server_timeout_exits_2(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1")
    r = await cli(*watch_args(server, "t1"))
    assert (r.code, r.last_line) == (2, "timeout: Stream timeout"), r


async def test_watch_client_timeout_exits_2(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1")
    r = await cli(*watch_args(server, "t1", "--timeout", "0.5"))
    assert (r.code, r.last_line) == (2, "timeout: no final state within 0.5 s"), r


async def test_watch_bad_token_exits_2(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1")
    r = await cli("watch", "t1", "--url", server.url, "--token", "garbage")
    assert r.code == 2 and r.last_line.startswith("error: HTTP 401: "), r
    r = await cli("watch", "t1", "--url", server.url)
    assert r.code == 2 and "no token" in r.last_line, r


async def test_watch_token_file_rewritten_in_place_is_waited_for(
    server: LiveServer, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """`taskstream token > file` truncates the file before it writes: a read that lands in
    between finds it empty. The watch waits a moment for the token instead of failing."""
    await create_task(sql, "t1", state="success", progress=100.0)
    path = tmp_path / "token"
    path.write_text("")

    async def write_later() -> None:
        await asyncio.sleep(0.4)
        path.write_text(server.token("alice") + "\n")

    writer = asyncio.create_task(write_later())
    r = await cli("watch", "t1", "--url", server.url, "--token-file", str(path))
    await writer
    assert r.code == 0 and r.last_line == "success", r

    path.write_text("")
    r = await cli("watch", "t1", "--url", server.url, "--token-file", str(path))
    assert r.code == 2 and r.last_line.startswith("error: the token file"), r
    assert "is empty" in r.last_line, r


async def test_watch_token_file_is_read_again_when_the_token_expires(
    server: LiveServer, sql: asyncpg.Connection, tmp_path: Path
) -> None:
    """Two 2-second tokens in a row, each renewed in the file while the watch runs: the server
    ends the stream at each expiry and the watcher resumes with the file's new token, missing no
    change. A fixed --token that expires is the end (exit 2)."""
    server.runtime.verifier.leeway = 0
    await create_task(sql, "t1", state="queued")
    path = tmp_path / "token"

    async def renew() -> None:
        # Like a sidecar: a fresh 2-second token in the file every half second.
        while True:
            path.write_text(server.token("alice", ttl=2) + "\n")
            await asyncio.sleep(0.5)

    renewer = asyncio.create_task(renew())
    try:
        await asyncio.sleep(0.1)
        proc = await start_cli("watch", "t1", "--url", server.url, "--token-file", str(path))
        seen = await first_progress(proc)
        for percent in (20, 40, 60):
            await asyncio.sleep(1.5)  # at least one expiry between two changes
            await sql.execute(
                "UPDATE taskstream.tasks SET state = 'running', progress = $1", percent
            )
        await asyncio.sleep(1.5)
        await sql.execute("UPDATE taskstream.tasks SET state = 'success', progress = 100")
        r = await finish(proc, seen=seen)
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
    assert r.code == 0 and r.last_line == "success", r
    for percent in (20, 40, 60):
        assert f"{percent}.0%  running" in r.stderr, r

    await create_task(sql, "t2", state="queued")
    r = await cli("watch", "t2", "--url", server.url, "--token", server.token("alice", ttl=2))
    assert r.code == 2 and r.last_line == "error: Token expired", r
    path.unlink()
    r = await cli("watch", "t2", "--url", server.url, "--token-file", str(path))
    assert r.code == 2 and r.last_line.startswith("error: cannot read the token file"), r


async def test_watch_unreachable_server_exits_2() -> None:
    r = await cli("watch", "t1", "--url", "http://127.0.0.1:1", "--token", "x", timeout=20)
    assert r.code == 2 and r.last_line.startswith("error: cannot reach http://127.0.0.1:1"), r


async def test_watch_reads_url_and_token_from_the_environment(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    env = _env(TASKSTREAM_URL=server.url, TASKSTREAM_TOKEN=server.token())
    r = await cli("watch", "t1", env=env)
    assert (r.code, r.last_line) == (0, "success"), r


@pytest.mark.parametrize("settings_overrides", [{"retry_ms": 100}])
async def test_watch_resumes_after_the_server_drops_the_stream(
    server: LiveServer, sql: asyncpg.Connection
) -> None:
    """A restart: the stream closes, new streams get 503 for a moment, then it resumes with
    Last-Event-ID and still sees every later change."""
    await create_task(sql, "t1", state="running")
    proc = await start_cli(*watch_args(server, "t1"))
    seen = await first_progress(proc)
    rt = server.runtime
    await rt.drain()
    await asyncio.sleep(0.5)  # reconnects meanwhile get 503 + Retry-After
    await sql.execute("UPDATE taskstream.tasks SET progress = 50")
    rt.draining = False
    await wait_for_stream(server)
    await sql.execute("UPDATE taskstream.tasks SET state = 'success', progress = 100")
    r = await finish(proc, seen=seen)
    assert (r.code, r.last_line) == (0, "success"), r
    assert "50.0%" in r.stderr


# -- create / update over the API -----------------------------------------------------------


async def test_create_and_update_over_the_api(server: LiveServer, sql: asyncpg.Connection) -> None:
    alice = ["--url", server.url, "--token", server.token("alice")]
    r = await cli("create", *alice)
    assert r.code == 0, r
    task_id = r.stdout.strip()
    assert task_id.startswith("task_")
    assert await sql.fetchval("SELECT owner_id FROM taskstream.tasks WHERE id = $1", task_id) == (
        "alice"
    )
    r = await cli("create", "--id", "job-7", "--state", "queued", *alice)
    assert (r.code, r.stdout.strip()) == (0, "job-7")
    r = await cli("create", "--id", "job-7", *alice)
    assert r.code == 1 and "409" in r.stderr, r
    r = await cli("create", "--owner", "bob", *alice)
    assert r.code == 2 and "403" in r.stderr, r

    worker = ["--url", server.url, "--token", server.token("worker", scopes=WRITE)]
    r = await cli("create", "--id", "for-bob", "--owner", "bob", *worker)
    assert r.code == 0, r
    r = await cli(
        "update", "job-7", "--progress", "40", "--state", "transcribing", "--eta", "71", *worker
    )
    assert r.code == 0, r
    body = json.loads(r.stdout)
    assert (body["progress"], body["state"], body["estimated_time"]) == (40.0, "transcribing", 71)
    r = await cli("update", "job-7", "--eta", "auto", *worker)
    assert r.code == 0 and json.loads(r.stdout)["version"] == 3, r
    assert (
        await sql.fetchval("SELECT estimated_time FROM taskstream.tasks WHERE id = 'job-7'") is None
    )

    r = await cli("update", "job-7", "--progress", "40", *alice)
    assert r.code == 2 and "403" in r.stderr, r
    r = await cli("update", "nope", "--progress", "40", *worker)
    assert r.code == 1 and "404" in r.stderr, r
    r = await cli("update", "job-7", "--state", "success", *worker)
    assert r.code == 0, r
    r = await cli("update", "job-7", "--progress", "50", *worker)
    assert r.code == 1 and "409" in r.stderr, r


async def test_update_validates_before_sending(server: LiveServer, sql: asyncpg.Connection) -> None:
    await create_task(sql, "t1")
    worker = ["--url", server.url, "--token", server.token("worker", scopes=WRITE)]
    for args in (["--progress", "101"], ["--eta", "-3"], ["--state", "x" * 65], []):
        r = await cli("update", "t1", *args, *worker)
        assert r.code == 2 and "invalid" in r.stderr, (args, r)
    r = await cli("update", "t1", "--eta", "soon", *worker)
    assert r.code == 2 and "'auto'" in r.stderr  # argparse's usage error
    assert await sql.fetchval("SELECT version FROM taskstream.tasks") == 1


# -- create / update straight to the database ---------------------------------------------


async def test_create_and_update_in_the_database(
    server: LiveServer, database_url: str, sql: asyncpg.Connection
) -> None:
    env = _env(DATABASE_URL=database_url)
    r = await cli("create", "--owner", "alice", "--id", "db-1", env=env)
    assert (r.code, r.stdout.strip()) == (0, "db-1"), r
    r = await cli("create", "--owner", "alice", "--id", "db-1", env=env)
    assert r.code == 1 and "exists" in r.stderr, r
    r = await cli("create", "--id", "db-2", env=env)
    assert r.code == 2 and "--owner" in r.stderr, r

    # A watcher sees writes made with the CLI, and exits 0 when the CLI says success.
    watcher = await start_cli(*watch_args(server, "db-1"))
    seen = await first_progress(watcher)
    r = await cli("update", "db-1", "--state", "transcribing", "--progress", "40", env=env)
    assert r.code == 0 and json.loads(r.stdout)["state"] == "transcribing", r
    r = await cli("update", "db-1", "--state", "success", "--progress", "100", env=env)
    assert r.code == 0, r
    w = await finish(watcher, seen=seen)
    assert (w.code, w.last_line) == (0, "success"), w
    assert "40.0%  transcribing" in w.stderr

    r = await cli("update", "db-1", "--progress", "5", env=env)
    assert r.code == 1 and "finished" in r.stderr, r
    r = await cli("update", "nope", "--progress", "5", env=env)
    assert r.code == 1 and "not found" in r.stderr, r
    # --db wins over a token in the environment.
    env_tok = {**env, "TASKSTREAM_TOKEN": "unused"}
    r = await cli("create", "--db", "--owner", "carol", env=env_tok)
    assert r.code == 0, r


async def test_database_unreachable_exits_2() -> None:
    env = _env(DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    r = await cli("create", "--owner", "alice", env=env)
    assert r.code == 2 and "cannot reach PostgreSQL" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's basetemp: as root, the embedded PostgreSQL runs as the `pgserver` user,
    # which must be able to reach the directory (pytest's are private to root).
    with tempfile.TemporaryDirectory(prefix="taskstream-test-data-") as tmp:
        yield Path(tmp)


async def test_create_with_the_embedded_database(data_dir: Path) -> None:
    """No DATABASE_URL: the embedded PostgreSQL is started, migrated, written and stopped."""
    env = _env(TASKSTREAM_DATA_DIR=str(data_dir))
    r = await cli("create", "--owner", "alice", "--id", "emb-1", env=env, timeout=120)
    assert (r.code, r.stdout.strip()) == (0, "emb-1"), r
    r = await cli("update", "emb-1", "--progress", "10", env=env, timeout=120)
    assert r.code == 0 and json.loads(r.stdout)["progress"] == 10.0, r
    assert not (data_dir / "pgdata" / "postmaster.pid").exists(), "embedded PostgreSQL left running"
