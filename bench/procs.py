"""Processes the bench starts (servers under test) and process-tree metrics via psutil."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["ProcTree", "ServerProcess", "free_port"]

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TreeSample:
    cpu: float  # user+system seconds, reaped children included
    rss: int  # bytes, summed over the live tree
    procs: int


class ProcTree:
    """CPU and RSS of a root process and all its descendants."""

    def __init__(self, root_pid: int) -> None:
        self.root = psutil.Process(root_pid)
        self._seen: dict[int, psutil.Process] = {}

    def processes(self) -> list[psutil.Process]:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self._seen.setdefault(p.pid, p)
        return procs

    def sample(self) -> TreeSample:
        cpu = 0.0
        rss = 0
        procs = self.processes()
        for p in procs:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system
                rss += p.memory_info().rss
                if p.pid == self.root.pid:
                    cpu += t.children_user + t.children_system
            except psutil.NoSuchProcess:
                continue
        return TreeSample(cpu, rss, len(procs))


class ServerProcess:
    """A server under test, started in its own session so it can be stopped as a group."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        port: int,
        log: Path,
        cwd: Path | None = None,
    ):
        self.name = name
        self.cwd = cwd
        self.argv = argv
        self.env = env
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    async def start(self, ready_text: str | None, workers: int, limit: float = 90.0) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            # A plain Popen: its own session (stop = kill the group) and output to a file.
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} during start-up; "
                    f"log:\n{self.tail()}"
                )
            text_ok = ready_text is None or ready_text in self.log.read_text(errors="replace")
            if text_ok and await probe_401(self.port) and self._workers_up(workers):
                # One more probe: with several workers, give the others a moment too.
                await asyncio.sleep(1.0)
                return
            await asyncio.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready in {limit}s; log:\n{self.tail()}")

    def _workers_up(self, workers: int) -> bool:
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        return workers <= 1 or len(kids) >= workers

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, limit: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group; return the exit code."""
        if self.proc is None:
            return self.exit_code
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + limit
            while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        if proc.poll() is None:
            logger.warning("%s ignored SIGTERM for %ss; killing its group", self.name, limit)
        # Whatever is left in the group we started (workers, helpers) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        self.exit_code = proc.returncode
        self.proc = None
        return self.exit_code


async def probe_401(port: int, host: str = "127.0.0.1") -> bool:
    """True when the stream endpoint answers an unauthenticated request with 401."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(
            f"GET /api/v1/sse/tasks/probe/progress HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        line = await asyncio.wait_for(reader.readline(), 5)
        return b" 401 " in line
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
