"""Optional py-spy sampling of the server under load (``--profile``).

py-spy records every server process (``--subprocesses``) in raw "collapsed stack"
format; :func:`summarize` turns that into the top functions by own and total time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.scenarios import Run

__all__ = ["Profiler", "summarize"]

logger = logging.getLogger(__name__)


class Profiler:
    """py-spy attached to the server tree for one window."""

    def __init__(self, pid: int, out: Path, seconds: float) -> None:
        self.pid = pid
        self.out = out
        self.seconds = seconds
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    @contextlib.asynccontextmanager
    async def maybe(run: Run, label: str, seconds: float) -> AsyncIterator[None]:
        """Profile ``run``'s taskstream server during the body when ``--profile`` is on."""
        if not run.cfg.profile or run.target != "taskstream" or run.server is None:
            yield
            return
        exe = shutil.which("py-spy")
        if exe is None:
            logger.warning("--profile: py-spy is not installed (pip install py-spy)")
            yield
            return
        out = run.ctx.out / f"profile-{label}.txt"
        prof = Profiler(run.server.pid, out, seconds)
        prof.start(exe)
        try:
            yield
        finally:
            await prof.stop()
            if out.exists():
                (run.ctx.out / f"profile-{label}-top.txt").write_text(summarize(out))

    def start(self, exe: str) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(self.pid),
                "--subprocesses",
                "--nonblocking",
                "--rate",
                "200",
                "--duration",
                str(int(self.seconds + 1)),
                "--format",
                "raw",
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for _ in range(100):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.1)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _frame(name: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; drop the line number.
    head, _, rest = name.partition(" (")
    path = rest.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(Path(path).parts[-2:]) if path else ""
    return f"{head} ({short})" if short else head


IDLE_LEAVES = ("Runner.run (", "run_forever (", "run_until_complete (", "select (", "poll (")


def summarize(raw: Path, top: int = 25) -> str:
    """Top functions by own and by inclusive samples, over the samples where a worker was busy.

    uvloop waits for I/O in C, so a sample whose innermost Python frame is the loop runner
    itself is an idle one.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [
            _frame(f)
            for f in stack.split(";")
            if not f.startswith(("process ", "thread ", " spawn_main", "<module>"))
        ]
        if not frames:
            continue
        samples += n
        if frames[-1].startswith(IDLE_LEAVES):
            idle += n
            continue
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    busy = max(samples - idle, 1)
    lines = [
        f"samples: {samples}, idle in the event loop: {idle}, busy: {samples - idle}",
        "percentages are of busy samples",
        "",
        "own time:",
    ]
    for f, n in own.most_common(top):
        lines.append(f"  {100 * n / busy:5.1f}%  {f}")
    lines += ["", "inclusive time:"]
    for f, n in total.most_common(top):
        lines.append(f"  {100 * n / busy:5.1f}%  {f}")
    return "\n".join(lines) + "\n"
