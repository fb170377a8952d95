"""schemathesis against /openapi.json on a live server, with a valid token: zero 5xx.

The CLI runs in a subprocess (its HTTP client is synchronous) while the server under test
serves in this test's event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("schemathesis") is None, reason="schemathesis is not installed"
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("settings_overrides", [{"stream_timeout": 0.3, "ticket_ttl": 5}])
async def test_schemathesis_finds_no_server_errors(server: LiveServer, tmp_path: Path) -> None:
    token = server.token(scopes=["tasks:write"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        "25",
        "--seed",
        "20261127",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--no-color",
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
        },
        cwd=tmp_path,  # schemathesis keeps a .schemathesis/ folder in its working directory
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 100)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "Server error" not in text and "Traceback" not in text
