"""Descriptor pressure is visible: gauges in /metrics, a reason in /readyz, one log line per
episode (server/descriptors.py, issue 14 item 2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource

import httpx
import pytest

from server.descriptors import DescriptorWatch
from tests.conftest import LiveServer
from tests.scrape import scrape, value
from tests.test_peerclose import fd_count, port_of, serve

LIMIT = 64


async def test_metrics_export_open_descriptors_and_their_limit(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    samples = await scrape(client, server.url)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 0 < value(samples, "taskstream_open_fds") < soft
    assert value(samples, "taskstream_max_fds") == soft


def test_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        DescriptorWatch(high=0.5, low=0.8)


async def test_readyz_says_when_descriptors_near_the_limit_and_the_log_says_it_once(
    database_url: str,
) -> None:
    async with serve(database_url) as proc, httpx.AsyncClient(timeout=5) as client:
        pid, port = proc.proc.pid, port_of(proc)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
        assert (await client.get(f"{proc.url}/readyz")).status_code == 200
        # Idle keep-alive connections, each holding one of the server's descriptors, until
        # the process is past 90 % of its limit (with a few left to answer /readyz).
        held: list[asyncio.StreamWriter] = []
        try:
            while fd_count(pid) < int(LIMIT * 0.9) + 2:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                held.append(writer)
            r = await client.get(f"{proc.url}/readyz")
            assert r.status_code == 503, r.text
            assert "file descriptors near the limit" in r.json()["reasons"]
            samples = await scrape(client, proc.url)
            assert value(samples, "taskstream_max_fds") == LIMIT
            assert value(samples, "taskstream_open_fds") >= LIMIT * 0.9
            await asyncio.sleep(2.5)  # the 1 s sampler sees the same episode again
        finally:
            for writer in held:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        for _ in range(50):
            if (await client.get(f"{proc.url}/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get(f"{proc.url}/readyz")).status_code == 200
        await asyncio.sleep(0.2)
    events = [json.loads(line).get("event") for line in proc.output if line.startswith("{")]
    assert events.count("fd_pressure") == 1, proc.output
    assert events.count("fd_pressure_over") == 1, proc.output
