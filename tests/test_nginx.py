"""Horizontal scale, proven: a real nginx running deploy/nginx.conf in front of two instances.

Round-robin with no stickiness works because every instance holds its own LISTEN connection:
PostgreSQL delivers each committed change to both, so whichever instance a client lands on (and
lands on again after a reconnect) streams every update. Everything runs on 127.0.0.1 and is
stopped at the end, also when the test fails. nginx comes from Debian (scripts/setup-nginx.sh,
run by .ci/run); when it is missing this test fails rather than skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
from httpx_sse import EventSource

from server.auth import issue_token
from tests.conftest import SECRET, create_task
from tests.scrape import scrape, value
from tests.test_cli import _clean_env

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROOT = DEPLOY.parent


def _nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else ""
    )
    assert found, "nginx is not installed: run scripts/setup-nginx.sh (.ci/run does)"
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    """A child process whose output goes to a file (a pipe nobody reads would block it)."""

    proc: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _spawn(log: Path, *argv: str, env: dict[str, str] | None = None) -> Proc:
    # A local file opened once per process start: nothing to wait for.
    with open(log, "wb") as out:  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=ROOT
        )
    return Proc(proc, log)


async def _start_instance(
    workdir: Path, name: str, database_url: str, **extra_env: str
) -> tuple[Proc, str]:
    env = _clean_env(
        DATABASE_URL=database_url,
        TASKSTREAM_JWT_SECRET=SECRET,
        PYTHONPATH=str(ROOT),
        TASKSTREAM_RETRY_MS="100",
        **extra_env,
    )
    p = await _spawn(
        workdir / f"{name}.log",
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        "0",
        env=env,
    )
    deadline = time.monotonic() + 30
    while "taskstream ready" not in p.output():
        assert p.proc.returncode is None, f"{name} exited:\n{p.output()}"
        assert time.monotonic() < deadline, f"{name} did not start:\n{p.output()}"
        await asyncio.sleep(0.05)
    url = next(line.split()[-1] for line in p.output().splitlines() if "listening on" in line)
    return p, url


@contextlib.asynccontextmanager
async def _nginx(workdir: Path, upstream_ports: list[int]) -> AsyncIterator[tuple[Proc, str]]:
    """Run deploy/nginx.conf itself (a symlink), with generated upstream and listen files."""
    binary = _nginx_binary()
    conf_dir = workdir / "nginx"
    conf_dir.mkdir()
    (conf_dir / "nginx.conf").symlink_to(DEPLOY / "nginx.conf")
    servers = "".join(
        f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in upstream_ports
    )
    (conf_dir / "taskstream-upstream.conf").write_text(
        f"upstream taskstream {{\n{servers}    keepalive 16;\n}}\n"
    )
    port = _free_port()
    (conf_dir / "taskstream-listen.conf").write_text(f"listen 127.0.0.1:{port};\n")
    argv = [binary, "-p", str(conf_dir), "-c", str(conf_dir / "nginx.conf")]
    main_args = f"daemon off; pid {conf_dir / 'nginx.pid'};"
    check = await asyncio.create_subprocess_exec(
        *argv,
        "-g",
        main_args,
        "-t",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(check.communicate(), 10)
    assert check.returncode == 0, out.decode()
    p = await _spawn(workdir / "nginx.log", *argv, "-g", main_args)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        async with httpx.AsyncClient(timeout=2) as c:
            while True:
                assert p.proc.returncode is None, f"nginx exited:\n{p.output()}"
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(f"{url}/healthz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"nginx did not answer:\n{p.output()}"
                await asyncio.sleep(0.05)
        yield p, url
    finally:
        await p.stop(signal.SIGQUIT, timeout=5)


@dataclass
class Follower:
    """A client that follows one task like EventSource does: reconnect with Last-Event-ID."""

    task_id: str
    token: str
    via_query: bool
    versions: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    first_event_s: float | None = None
    connects: int = 0
    completed: bool = False

    async def run(self, client: httpx.AsyncClient, base: str) -> None:
        last_id: str | None = None
        while not self.completed:
            url = f"{base}/api/v1/sse/tasks/{self.task_id}/progress"
            headers = {} if last_id is None else {"Last-Event-ID": last_id}
            if self.via_query:
                url += f"?access_token={self.token}"
            else:
                headers["Authorization"] = f"Bearer {self.token}"
            self.connects += 1
            started = time.monotonic()
            try:
                async with client.stream("GET", url, headers=headers) as r:
                    if r.status_code == 204:
                        self.completed = True  # saw the final state already
                        return
                    if r.status_code == 200:
                        async for ev in EventSource(r).aiter_sse():
                            if ev.event == "progress":
                                if self.first_event_s is None:
                                    self.first_event_s = time.monotonic() - started
                                self.versions.append(int(ev.id))
                                self.states.append(ev.json()["state"])
                                last_id = ev.id
                            elif ev.event == "complete":
                                self.completed = True
                                return
            except httpx.HTTPError:
                pass  # the instance went away mid-stream: reconnect, as EventSource would
            await asyncio.sleep(0.1)


async def _wait(cond: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = cond() if callable(cond) else cond
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_two_instances_behind_nginx_serve_every_client_every_update(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await two_instances_behind_nginx(database_url, sql)


async def two_instances_behind_nginx(
    database_url: str,
    sql: asyncpg.Connection,
    after_kill: Callable[[httpx.AsyncClient, str], Awaitable[None]] | None = None,
    **extra_env: str,
) -> str:
    """The scenario, with ``extra_env`` for both instances (tests/test_bus_nginx.py runs it in
    bus mode, with ``after_kill`` waiting for B to take over). Returns the instances' logs."""
    n_tasks, per_task = 15, 2
    workdir = Path(tempfile.mkdtemp(prefix="taskstream-nginx-test-"))
    procs: list[Proc] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        a, url_a = await _start_instance(workdir, "a", database_url, **extra_env)
        procs.append(a)
        b, url_b = await _start_instance(workdir, "b", database_url, **extra_env)
        procs.append(b)
        ports = [int(u.rsplit(":", 1)[1]) for u in (url_a, url_b)]
        async with (
            _nginx(workdir, ports) as (nginx, base),
            httpx.AsyncClient(
                timeout=httpx.Timeout(10, read=30),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=0),
            ) as client,
            httpx.AsyncClient(timeout=5) as direct,
        ):
            token = issue_token(SECRET, "alice", ttl=120)
            for i in range(n_tasks):
                await create_task(sql, f"t{i}", state="running")
            followers = [
                Follower(f"t{i}", token, via_query=bool(j % 2))
                for i in range(n_tasks)
                for j in range(per_task)
            ]
            tasks = [asyncio.create_task(f.run(client, base)) for f in followers]

            # Unbuffered: each snapshot (a few hundred bytes, far below any proxy buffer) gets
            # through while its stream stays open.
            await _wait(lambda: all(f.versions == [1] for f in followers), "snapshots")
            assert max(f.first_event_s or 99 for f in followers) < 2.0
            assert not any(f.completed for f in followers)

            # Round-robin without stickiness: both instances serve some of the streams.
            async def spread() -> bool:
                counts = [
                    value(await scrape(direct, u), "taskstream_streams_open")
                    for u in (url_a, url_b)
                ]
                return sum(counts) == len(followers) and min(counts) > 0

            await _wait(spread, "streams on both instances")
            on_a = int(value(await scrape(direct, url_a), "taskstream_streams_open"))

            # Every client gets every update, whichever instance serves it.
            for rnd in range(1, 4):
                await sql.execute("UPDATE taskstream.tasks SET progress = $1", rnd * 10)
                await _wait(
                    lambda rnd=rnd: all(f.versions[-1] == rnd + 1 for f in followers),
                    f"update round {rnd}",
                )
            assert all(f.versions == [1, 2, 3, 4] for f in followers)

            # Kill instance A outright; its clients reconnect through nginx to B.
            await a.stop(signal.SIGKILL)
            if after_kill is not None:
                await after_kill(direct, url_b)
            await sql.execute("UPDATE taskstream.tasks SET progress = 90")
            await sql.execute("UPDATE taskstream.tasks SET state = 'success', progress = 100")
            await asyncio.wait_for(asyncio.gather(*tasks), 20)

            for f in followers:
                assert f.completed, f
                assert f.states[-1] == "success" and f.versions[-1] == 6, f
                assert f.versions == sorted(set(f.versions)), f  # in order, no repeats
            moved = [f for f in followers if f.connects > 1]
            assert len(moved) == on_a, (len(moved), on_a)
            stayed = [f for f in followers if f.connects == 1]
            assert stayed and all(f.versions == [1, 2, 3, 4, 5, 6] for f in stayed)

            await _wait(lambda: _streams_open(direct, url_b), "instance B to close its streams")
        log = "".join(p.output() for p in procs) + nginx.output()
        assert token not in log, "a token reached a log"
        assert '"path":"/api/v1/sse/tasks/t0/progress"' in nginx.output()
        return log
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in procs:
            await p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _streams_open(client: httpx.AsyncClient, url: str) -> bool:
    return value(await scrape(client, url), "taskstream_streams_open") == 0
