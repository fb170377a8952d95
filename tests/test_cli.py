"""The `taskstream` command as a user runs it: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from server.auth import TokenVerifier
from server.db import migration_files
from tests import pg
from tests.conftest import SECRET, create_task
from tests.sse_client import open_stream


class ServeProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.output: list[str] = []
        self.url = ""

    async def wait_ready(self, ready_lines: int = 1, timeout: float = 60) -> None:
        async def read() -> None:
            assert self.proc.stdout is not None
            seen = 0
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise AssertionError("server exited early:\n" + "".join(self.output))
                self.output.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                if "taskstream ready" in line:
                    seen += 1
                    if seen >= ready_lines:
                        return

        await asyncio.wait_for(read(), timeout)

    async def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.returncode is None and sig is not None:
            self.proc.send_signal(sig)
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            # The test fails, but it must not leave a server (and its database) running.
            self.proc.kill()
            await self.proc.wait()
            raise
        self.output.append(out.decode())
        assert self.proc.returncode is not None
        return self.proc.returncode


async def start_serve(env: dict[str, str], *args: str) -> ServeProcess:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        "0",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    return ServeProcess(proc)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKSTREAM_", "DATABASE_"))}
    env.update(extra)
    return env


def _postgres_running(pgdata: Path) -> bool:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: pytest strips group/other permissions from its base directory at
    # session start, and the embedded PostgreSQL runs as the `pgserver` user, who needs them.
    with tempfile.TemporaryDirectory(prefix="taskstream-test-data-") as tmp:
        yield Path(tmp)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_embedded_streams_and_stops_cleanly(data_dir: Path, sig: int) -> None:
    """No DATABASE_URL: embedded PostgreSQL, generated secret, migrations, stream, clean exit."""
    env = _clean_env(TASKSTREAM_DATA_DIR=str(data_dir))
    serve = await start_serve(env)
    try:
        await serve.wait_ready()
        assert serve.url.startswith("http://127.0.0.1:")
        secret_file = data_dir / "jwt_secret"
        assert secret_file.exists() and oct(secret_file.stat().st_mode)[-3:] == "600"
        assert _postgres_running(data_dir / "pgdata")

        token = subprocess.run(
            [sys.executable, "-m", "server", "token", "alice", "--ttl", "60"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert (await TokenVerifier(secret_file.read_text()).verify(token)).user_id == "alice"

        conn = await asyncpg.connect(
            host=str(data_dir / "pgdata"), user="postgres", database="postgres"
        )
        try:
            await create_task(conn, "t1")
            async with httpx.AsyncClient() as client:
                url = f"{serve.url}/api/v1/sse/tasks/t1/progress"
                async with open_stream(client, url, token=token) as s:
                    assert (await s.next(5)).event == "progress"
                    await conn.execute("UPDATE taskstream.tasks SET state='success' WHERE id='t1'")
                    assert (await s.next(5)).json()["state"] == "success"
                    assert (await s.next(5)).event == "complete"
        finally:
            await conn.close()
    finally:
        code = await serve.stop(sig)
    assert code == 0, "".join(serve.output)
    assert "Traceback" not in "".join(serve.output)
    assert not _postgres_running(data_dir / "pgdata"), "embedded PostgreSQL left running"


async def test_serve_workers_each_hold_one_listen_connection(database_url: str) -> None:
    env = _clean_env(
        DATABASE_URL=database_url,
        TASKSTREAM_JWT_SECRET=SECRET,
        TASKSTREAM_LOG_LEVEL="DEBUG",
        TASKSTREAM_GC_THRESHOLDS="12345,6,7",
    )
    serve = await start_serve(env, "--workers", "2")
    try:
        await serve.wait_ready(ready_lines=2)
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'taskstream-listener'"
                " AND datname = current_database()"
            )
        finally:
            await conn.close()
        assert len(rows) == 2
        # Each worker applied the GC thresholds (server/gctuning.py) before serving.
        assert "".join(serve.output).count("gc thresholds (12345, 6, 7)") == 2, serve.output
    finally:
        code = await serve.stop()
    assert code == 0, "".join(serve.output)


async def test_token_needs_a_secret_when_database_url_is_set(database_url: str) -> None:
    env = _clean_env(DATABASE_URL=database_url)
    r = subprocess.run(
        [sys.executable, "-m", "server", "token", "alice"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "TASKSTREAM_JWT_SECRET" in r.stderr and "Traceback" not in r.stderr


async def test_migrate_command_is_idempotent(database_url: str) -> None:
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    r = subprocess.run(
        [sys.executable, "-m", "server", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "applied 0 migration(s)" in r.stdout


async def test_unreachable_database_is_a_clear_error() -> None:
    env = _clean_env(
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/none", TASKSTREAM_JWT_SECRET=SECRET
    )
    r = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "cannot reach PostgreSQL" in r.stderr and "Traceback" not in r.stderr


def test_wheel_ships_the_migrations(tmp_path: Path) -> None:
    """A non-editable install must find sql/ inside the package, outside the checkout."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("taskstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("server/sql/"))
    expected = sorted(f"server/sql/{p.name}" for p in (root / "sql").glob("*.sql"))
    assert shipped == expected and expected
    assert "server/py.typed" in names


# -- the first steps of a new user: one clear line, a non-zero exit, no traceback ---------------


@pytest.fixture
async def empty_database_url(pg_cluster: str) -> AsyncIterator[str]:
    """A database with no migrations applied yet, as a new user's is."""
    name = f"ts_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_cluster)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield pg.with_database(pg_cluster, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _run_cli(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


async def test_port_in_use_is_one_clear_line(database_url: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
        r = _run_cli(env, "serve", "--port", str(port))
    assert r.returncode == 1, r
    line = _one_line(r.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "already in use" in line, line
    assert "PostgreSQL" not in line and "listening" not in r.stdout


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ("database", 'database "no_such_database_here" does not exist'),
        ("role", 'role "no_such_role" does not exist'),
    ],
)
async def test_database_or_role_that_does_not_exist_is_one_clear_line(
    database_url: str, missing: str, expected: str
) -> None:
    # Built with urlsplit: the embedded cluster's URL names a unix socket in its query string.
    if missing == "database":
        url = pg.with_database(database_url, "no_such_database_here")
    else:
        parts = urlsplit(database_url)
        host = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"no_such_role:pw-s3cr3t-value@{host}"))
    env = _clean_env(DATABASE_URL=url, TASKSTREAM_JWT_SECRET=SECRET)
    for command in (["serve", "--port", "0"], ["migrate"]):
        r = _run_cli(env, *command)
        assert r.returncode == 1, r
        line = _one_line(r.stderr)
        assert expected in line and "DATABASE_URL" in line, line
        assert "pw-s3cr3t-value" not in r.stderr + r.stdout


async def test_short_secret_is_rejected_before_anything_starts(empty_database_url: str) -> None:
    env = _clean_env(DATABASE_URL=empty_database_url, TASKSTREAM_JWT_SECRET="too-short-s3cret")
    r = _run_cli(env, "serve", "--port", "0")
    assert r.returncode == 2, r
    line = _one_line(r.stderr)
    assert "at least 32 bytes" in line and "too-short-s3cret" not in r.stderr + r.stdout
    # Nothing started: no URL printed, no migration applied.
    assert "listening" not in r.stdout and "migration" not in r.stdout, r.stdout
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('taskstream.schema_migrations')") is None
    finally:
        await conn.close()


async def test_token_with_a_short_secret_is_one_clear_line(database_url: str) -> None:
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET="too-short-s3cret")
    r = _run_cli(env, "token", "alice")
    assert r.returncode == 2, r
    line = _one_line(r.stderr)
    assert "TASKSTREAM_JWT_SECRET" in line and "at least 32 bytes" in line, line
    assert "too-short-s3cret" not in r.stderr + r.stdout and r.stdout == ""


@pytest.mark.parametrize("ttl", ["0", "-5", "soon"])
async def test_token_ttl_must_be_positive(database_url: str, ttl: str) -> None:
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    r = _run_cli(env, "token", "alice", "--ttl", ttl)
    assert r.returncode == 2 and r.stdout == "", r
    assert "--ttl" in r.stderr and "Traceback" not in r.stderr


async def test_each_migration_is_logged_once(empty_database_url: str) -> None:
    env = _clean_env(DATABASE_URL=empty_database_url, TASKSTREAM_JWT_SECRET=SECRET)
    serve = await start_serve(env)
    try:
        await serve.wait_ready()
    finally:
        code = await serve.stop()
    assert code == 0, serve.output
    output = "".join(serve.output)
    names = [name for name, _ in migration_files()]
    assert names
    for name in names:
        assert output.count(name) == 1, output


async def _sigterm_after(
    env: dict[str, str], marker: str, delay: float = 0.0, timeout: float = 30
) -> ServeProcess:
    """Start a server, SIGTERM it ``delay`` seconds after the line with ``marker``, and check
    that it stopped cleanly."""
    serve = await start_serve(env)
    assert serve.proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(serve.proc.stdout.readline(), 60)).decode()
        assert line, "server exited early:\n" + "".join(serve.output)
        serve.output.append(line)
        if marker in line:
            break
    await asyncio.sleep(delay)
    code = await serve.stop(timeout=timeout)
    assert code == 0, "".join(serve.output)
    return serve


@pytest.mark.parametrize("marker", ["listening on", "taskstream ready"])
async def test_sigterm_during_start_up_stops_cleanly(database_url: str, marker: str) -> None:
    """Regression: a SIGTERM between the migrations and the worker's own signal handlers
    killed the process (exit -15), which would leave an embedded PostgreSQL running."""
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    serve = await _sigterm_after(env, marker)
    assert "Traceback" not in "".join(serve.output)


def test_a_sigterm_whose_raise_is_swallowed_is_still_recorded() -> None:
    """Python runs a signal handler at the next bytecode, which may be a destructor's: there
    its exception is only "ignored". Start-up must still know it was asked to stop, and must
    not print a traceback for it (the unraisable hook drops exactly that exception)."""
    script = textwrap.dedent(
        """
        import gc, os, signal, sys
        from server import startsignal
        startsignal.install()

        class Sends:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))  # bytecode: the handler runs here, inside __del__

        Sends()
        gc.collect()
        print("survived", startsignal.requested())
        try:
            startsignal.checkpoint()
        except startsignal.StoppedDuringStartup:
            print("checkpoint stops")

        class Fails:
            def __del__(self):
                raise ValueError("an unrelated error")

        Fails()
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines() == ["survived True", "checkpoint stops"], r
    assert "StoppedDuringStartup" not in r.stderr, r.stderr
    # Other unraisable errors are still reported.
    assert "ValueError: an unrelated error" in r.stderr, r.stderr


async def test_sigterm_at_any_moment_after_listening_stops_the_server(database_url: str) -> None:
    """Regression: a SIGTERM a few milliseconds after "listening on" could land in a
    destructor while the worker started, be swallowed, and leave the server running for good.
    Eight tries spread over the first 40 ms, where that window is."""
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    for attempt in range(8):
        serve = await _sigterm_after(env, "listening on", delay=attempt * 0.005, timeout=15)
        output = "".join(serve.output)
        assert "Traceback" not in output, output


def test_help_texts_say_what_and_the_defaults() -> None:
    env = _clean_env()
    top = _run_cli(env, "--help").stdout
    assert "Server-Sent Events" in top and "taskstream serve" in top
    for markup in (":mod:", "``", "Hypercorn workers"):
        assert markup not in top, top
    serve = " ".join(_run_cli(env, "serve", "--help").stdout.split())
    for text in ("address to listen on (default: 127.0.0.1", "(default: 8000", "(default: 1)"):
        assert text in serve, serve
    token = " ".join(_run_cli(env, "token", "--help").stdout.split())
    assert "lifetime in seconds, at least 1 (default: 3600)" in token, token


async def test_serve_raises_the_descriptor_limit_to_the_hard_limit_and_logs_it(
    database_url: str,
) -> None:
    # Started with a soft limit of 256 under a hard one of 4096 (as a shell with `ulimit -Sn 256`
    # would), the server and its workers must run at 4096 and say so once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    assert ceiling > 256, "this test needs a hard RLIMIT_NOFILE above 256"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, ceiling))

    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        "0",
        "--workers",
        "2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=low_soft_limit,
    )
    serve = ServeProcess(proc)
    try:
        await serve.wait_ready(ready_lines=2)
        limits = [_soft_nofile(proc.pid)]
        limits += [_soft_nofile(int(p)) for p in _children(proc.pid)]
        # The master and its two workers (and multiprocessing's resource tracker, if any).
        assert len(limits) >= 3 and set(limits) == {ceiling}, limits
        lines = [
            json.loads(line)
            for line in serve.output
            if line.startswith("{") and "nofile_limit" in line
        ]
        assert len(lines) == 1, serve.output
        assert lines[0]["max_fds"] == ceiling and lines[0]["max_fds_before"] == 256
        assert f"RLIMIT_NOFILE soft): {ceiling} (was 256)" in lines[0]["msg"]
    finally:
        code = await serve.stop()
    assert code == 0, "".join(serve.output)


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def _children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split()
