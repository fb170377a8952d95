"""server/hypercorn_internals.py is the one module that touches Hypercorn's and h11's internals:
pinned exactly, checked once at start-up, and harmless (one warning, ordinary path) when the
shape it expects is not there."""

from __future__ import annotations

import logging
import re
from importlib import metadata
from pathlib import Path

import asyncpg
import h11._writers
import httpx
import pytest

from server import hypercorn_internals, metrics
from tests.conftest import create_task, make_settings, run_server
from tests.sse_client import open_stream

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_installed_versions_are_the_pinned_ones() -> None:
    text = PYPROJECT.read_text(encoding="utf-8")
    for package, version in hypercorn_internals.PINNED.items():
        assert metadata.version(package) == version
        assert re.search(rf'"{package}=={re.escape(version)}"', text), package


def test_the_pinned_versions_have_the_expected_shape() -> None:
    assert hypercorn_internals.shape_problems() == []
    assert hypercorn_internals.peerclose_problems() == []


def test_shape_check_fails_when_an_internal_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(h11._writers, "ChunkedWriter")
    assert hypercorn_internals.shape_problems() == ["h11._writers.ChunkedWriter is missing"]


async def test_missing_shape_means_one_startup_warning_and_the_ordinary_path(
    database_url: str,
    sql: asyncpg.Connection,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delattr(h11._writers, "ChunkedWriter")
    await create_task(sql, "t1")
    with caplog.at_level(logging.WARNING, logger="server.hypercorn_internals"):
        async with run_server(make_settings(database_url)) as server:
            warnings = [r for r in caplog.records if r.name == "server.hypercorn_internals"]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert "ChunkedWriter is missing" in warnings[0].getMessage()
            assert getattr(warnings[0], "event", None) == "server_internals_changed"
            before = metrics.TALLY.direct_writes
            async with open_stream(client, server.stream_url("t1"), token=server.token()) as s:
                assert (await s.next()).id == "1"
                for p in (10, 20):
                    await sql.execute("UPDATE taskstream.tasks SET progress = $1", p)
                    assert (await s.next()).json()["progress"] == p
            # Delivered through Quart, quietly: no direct write, no warning per stream.
            assert metrics.TALLY.direct_writes == before
            later = [r for r in caplog.records if r.name == "server.hypercorn_internals"]
            assert len(later) == 1
