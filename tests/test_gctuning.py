"""TASKSTREAM_GC_THRESHOLDS: parsed strictly, and applied to the process (server/gctuning.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.config import DEFAULT_GC_THRESHOLDS, ConfigError, Settings


def test_default_and_explicit_thresholds() -> None:
    assert Settings.from_env({}).gc_thresholds == DEFAULT_GC_THRESHOLDS == (50_000, 20, 10)
    assert Settings.from_env({"TASKSTREAM_GC_THRESHOLDS": " 700, 10 ,10"}).gc_thresholds == (
        700,
        10,
        10,
    )
    assert Settings.from_env({"TASKSTREAM_GC_THRESHOLDS": "Python"}).gc_thresholds is None


@pytest.mark.parametrize(
    "raw", ["1,2", "1,2,3,4", "a,b,c", "-1,2,3", "1.5,2,3", "0,10,10", "²,1,1", "1" * 12 + ",1,1"]
)
def test_bad_thresholds_are_refused(raw: str) -> None:
    with pytest.raises(ConfigError, match="TASKSTREAM_GC_THRESHOLDS"):
        Settings.from_env({"TASKSTREAM_GC_THRESHOLDS": raw})


def test_apply_sets_thresholds_and_freezes_start_up_objects() -> None:
    # In a child process: the test runner's own collector is not ours to change.
    code = (
        "import gc; from server import gctuning; gctuning.apply((4321, 3, 2));"
        "print(gc.get_threshold(), gc.get_freeze_count() > 1000)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "(4321, 3, 2) True"
    untouched = (
        "import gc; from server import gctuning; gctuning.apply(None); print(gc.get_threshold())"
    )
    out = subprocess.run(
        [sys.executable, "-c", untouched], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "(700, 10, 10)"
