"""TASKSTREAM_HEARTBEAT must stay below event-source-polyfill's 45 s silence limit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.config import ConfigError, Settings


@pytest.mark.parametrize("value", ["45", "60", "45.0"])
def test_heartbeat_of_45_seconds_or_more_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="below 45 seconds"):
        Settings.from_env({"TASKSTREAM_HEARTBEAT": value})


def test_heartbeat_just_below_the_limit_is_accepted() -> None:
    assert Settings.from_env({"TASKSTREAM_HEARTBEAT": "44.9"}).heartbeat == 44.9


def test_serve_refuses_a_slow_heartbeat_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKSTREAM_", "DATABASE_"))}
    # An unreachable database: if the check did not happen first, this would fail differently.
    env.update(
        TASKSTREAM_HEARTBEAT="50",
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/none",
        TASKSTREAM_JWT_SECRET="x" * 32,
    )
    r = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "TASKSTREAM_HEARTBEAT must be below 45 seconds (got 50)" in r.stderr
    assert "event-source-polyfill" in r.stderr and "Traceback" not in r.stderr
