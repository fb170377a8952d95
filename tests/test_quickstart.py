"""The README's quick start, run as written: its commands and SQL in order, against a real server.

The blocks are read from README.md, so the quick start cannot drift from what the server does: a
step out of order (a stream opened before its task exists), a sample output that leaves an event
out, or a new block this test does not know all fail here.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import SECRET
from tests.test_cli import ServeProcess, _clean_env, start_serve

README = Path(__file__).resolve().parent.parent / "README.md"
DOCUMENTED_URL = "http://127.0.0.1:8000"


@dataclass
class Block:
    lang: str
    text: str


def quick_start_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Quick start\n") :]
    section = section[: section.index("\n## ", 1)]
    pattern = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
    return [Block(m.group(1), m.group(2)) for m in pattern.finditer(section)]


def sql_statements(code: str) -> list[str]:
    without_comments = "\n".join(line.split("--", 1)[0] for line in code.splitlines())
    return [s.strip() for s in without_comments.split(";") if s.strip()]


def parse_sse(text: str) -> list[dict[str, str]]:
    """Complete events (blank-line terminated) as field dicts; comments (heartbeats) dropped."""
    events = []
    for chunk in text.replace("\r\n", "\n").split("\n\n")[:-1]:
        fields: dict[str, str] = {}
        for line in chunk.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if fields:
            events.append(fields)
    return events


def normalised(events: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The shape to compare: times and the jittered retry checked for form, then blanked."""
    out: list[dict[str, Any]] = []
    for fields in events:
        item: dict[str, Any] = dict(fields)
        if "retry" in item:
            assert item["retry"].isdigit() and 3000 <= int(item["retry"]) <= 4500, item
            item["retry"] = "<ms>"
        if "data" in item:
            data = json.loads(item["data"])
            if "updated_at" in data:
                assert datetime.fromisoformat(data["updated_at"]).utcoffset() is not None
                data["updated_at"] = "<time>"
            item["data"] = data
        out.append(item)
    return out


@dataclass
class Watcher:
    """The quick start's curl (or, without curl, the same request from httpx), read as it goes."""

    output: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None

    @property
    def events(self) -> list[dict[str, str]]:
        return [e for e in parse_sse("".join(self.output)) if "event" in e]

    async def wait_for_events(self, count: int, timeout: float = 10) -> None:
        async def until() -> None:
            while len(self.events) < count:
                await asyncio.sleep(0.02)

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(f"expected {count} events, got:\n{''.join(self.output)}") from None


async def _read_curl(watcher: Watcher, proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while chunk := await proc.stdout.read(4096):
        watcher.output.append(chunk.decode())


async def _read_httpx(watcher: Watcher, url: str, token: str) -> None:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("GET", url, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        async for text in r.aiter_text():
            watcher.output.append(text)


@pytest.fixture
async def watcher() -> AsyncIterator[Watcher]:
    w = Watcher()
    try:
        yield w
    finally:
        if w.proc is not None and w.proc.returncode is None:
            w.proc.kill()
            await w.proc.wait()
        if w.reader is not None and not w.reader.done():
            w.reader.cancel()
            await asyncio.gather(w.reader, return_exceptions=True)


async def start_watcher(
    watcher: Watcher, script: str, serve: ServeProcess, env: dict[str, str], shim_dir: Path
) -> None:
    script = script.replace(DOCUMENTED_URL, serve.url)
    # `taskstream` as the README types it, whether or not the package's script is on PATH.
    shim = shim_dir / "taskstream"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m server "$@"\n')
    shim.chmod(0o755)
    env = {**env, "PATH": f"{shim_dir}:{env.get('PATH', '')}"}
    if shutil.which("curl") is not None:
        watcher.proc = await asyncio.create_subprocess_exec(
            "bash", "-euc", script, env=env, stdout=asyncio.subprocess.PIPE
        )
        watcher.reader = asyncio.create_task(_read_curl(watcher, watcher.proc))
        return
    # No curl: run the token command as written and make the same request with httpx.
    token_command = re.search(r"\$\((taskstream token [^)]*)\)", script)
    url = re.search(r"http://\S+", script)
    assert token_command and url, script
    proc = await asyncio.create_subprocess_exec(
        "bash", "-euc", token_command.group(1), env=env, stdout=asyncio.subprocess.PIPE
    )
    token = (await proc.communicate())[0].decode().strip()
    assert proc.returncode == 0 and token
    watcher.reader = asyncio.create_task(_read_httpx(watcher, url.group(0), token))


async def test_quick_start_runs_as_written(
    database_url: str, watcher: Watcher, tmp_path: Path
) -> None:
    blocks = quick_start_blocks()
    env = _clean_env(DATABASE_URL=database_url, TASKSTREAM_JWT_SECRET=SECRET)
    serve: ServeProcess | None = None
    conn: asyncpg.Connection | None = None
    expected: list[dict[str, str]] | None = None
    steps: list[str] = []
    try:
        for block in blocks:
            text = block.text.strip()
            if block.lang == "bash" and text.endswith("taskstream serve"):
                steps.append("serve")
                serve = await start_serve(env)
                await serve.wait_ready()
            elif block.lang == "bash" and ("pytest" in text or "install-test-deps" in text):
                continue  # the test command: that is this very suite
            elif block.lang == "bash" and text.startswith("psql "):
                steps.append("psql")
                assert "pgdata" in text and "user=postgres" in text, text
                conn = await asyncpg.connect(database_url)  # the test's database stands in
            elif block.lang == "sql":
                assert conn is not None, "SQL before the step that connects"
                for statement in sql_statements(text):
                    steps.append(statement.split()[0].lower())
                    seen = len(watcher.events)
                    await conn.execute(statement)
                    if watcher.reader is not None:
                        # A person reads the new event before typing the next statement.
                        await watcher.wait_for_events(seen + 1)
            elif block.lang == "bash" and "curl -N" in text:
                steps.append("curl")
                assert serve is not None, "curl before the server runs"
                await start_watcher(watcher, text, serve, env, tmp_path)
                await watcher.wait_for_events(1)
                first = json.loads(watcher.events[0]["data"])
                assert watcher.events[0]["event"] == "progress", watcher.output
                assert first["state"] == "queued", "the stream must open on the created task"
            elif block.lang == "" and text.startswith("retry:"):
                expected = parse_sse(block.text + "\n")
            else:
                raise AssertionError(f"a quick start block this test does not know:\n{text}")
        assert steps == ["serve", "psql", "insert", "curl", "update", "update"], steps
        assert watcher.reader is not None
        # The server closes the stream after `complete`: curl ends by itself, successfully.
        await asyncio.wait_for(asyncio.shield(watcher.reader), 10)
        if watcher.proc is not None:
            assert await asyncio.wait_for(watcher.proc.wait(), 10) == 0
    finally:
        if conn is not None:
            await conn.close()
        if serve is not None:
            await serve.stop()
    assert expected is not None, "the quick start shows no sample output"
    actual = parse_sse("".join(watcher.output))
    assert normalised(actual) == normalised(expected)
