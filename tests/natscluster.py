"""A real NATS cluster for the bus tests: three ``nats-server`` nodes on free loopback ports,
each with routes to the other two (Debian's package, installed by scripts/setup-nats.sh).

Nodes can be killed and started again on the same ports while clients are connected.
Everything started is stopped by :meth:`NatsCluster.stop` (the fixture calls it), also when a
test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else ""
    )
    assert found, "nats-server is not installed: run scripts/setup-nats.sh (.ci/run does)"
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class NatsNode:
    name: str
    port: int
    cluster_port: int
    http_port: int
    routes: list[int]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        argv = [
            nats_server_binary(),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.http_port),
            "-n", self.name,
            "--cluster_name", "taskstream-test",
            "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
            "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes),
        ]  # fmt: skip
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def monitor(self, path: str) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.http_port}/{path}"
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback monitor
            data: dict[str, object] = json.loads(r.read())
            return data

    def routes_up(self) -> int:
        try:
            return int(self.monitor("routez").get("num_routes", 0))  # type: ignore[call-overload]
        except OSError:
            return -1

    def log(self) -> str:
        path = self.workdir / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class NatsCluster:
    nodes: list[NatsNode] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ts-nats-")))

    @classmethod
    def create(cls, size: int = 3) -> NatsCluster:
        c = cls()
        ports = free_ports(3 * size)
        cluster_ports = ports[size : 2 * size]
        for i in range(size):
            others = [p for j, p in enumerate(cluster_ports) if j != i]
            c.nodes.append(
                NatsNode(
                    name=f"n{i}",
                    port=ports[i],
                    cluster_port=cluster_ports[i],
                    http_port=ports[2 * size + i],
                    routes=others,
                    workdir=c.workdir,
                )
            )
        return c

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 15) -> None:
        for node in self.nodes:
            node.start()
        self.wait_meshed(timeout)

    def wait_meshed(self, timeout: float = 15) -> None:
        """Until every live node has a route to every other live node."""
        deadline = time.monotonic() + timeout
        while True:
            live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            if all(n.routes_up() >= len(live) - 1 for n in live):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(n.log()[-2000:] for n in self.nodes)
                raise AssertionError(f"NATS cluster did not form routes:\n{logs}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def nats_cluster(size: int = 3) -> Iterator[NatsCluster]:
    c = NatsCluster.create(size)
    try:
        c.start()
        yield c
    finally:
        c.stop()
