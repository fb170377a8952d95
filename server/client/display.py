"""What the terminal client shows: the progress bar, the ETA and server text made safe to print.

Pure formatting, no I/O beyond the stream it is given: :mod:`server.client.watch` feeds it events.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["TERMINAL_STATES", "Display", "clean", "format_eta", "progress_line", "render_bar"]

# The server's terminal states (server.tasks.TERMINAL_STATES), copied so that the client imports
# no server module; tests/test_client_package.py proves the two agree.
TERMINAL_STATES = frozenset({"success", "failed", "cancelled"})

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text: Any) -> str:
    """Make server-provided text safe to print: no escape sequences into the terminal."""
    return _CONTROL.sub("?", str(text))


def format_eta(seconds: int | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render_bar(progress: float, width: int = 30) -> str:
    progress = min(100.0, max(0.0, float(progress)))
    filled = int(round(width * progress / 100))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(data: dict[str, Any]) -> str:
    progress = float(data.get("progress") or 0.0)
    state = data.get("state", "?")
    line = f"{render_bar(progress)} {progress:5.1f}%  {clean(state)}"
    # A finished task has no time left: no "ETA", even from a server that sends the writer's
    # last estimate with the final state.
    if state not in TERMINAL_STATES:
        line = f"{line}  ETA {format_eta(data.get('estimated_time'))}"
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and metadata:
        # The task's own fields (current file, step), compact and cut to stay on one line.
        text = clean(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False))
        line = f"{line}  {text if len(text) <= 60 else text[:59] + '…'}"
    return line


@dataclass
class Display:
    """The live bar: redrawn in place on a terminal, one line per change otherwise."""

    out: TextIO
    tty: bool
    drawn: bool = False

    def show(self, data: dict[str, Any], *, label: str | None = None) -> None:
        line = progress_line(data)
        if label is not None:
            # A group's tasks share the screen: one line per change, each named.
            self.close()
            self.out.write(f"{clean(label)}  {line}\n")
            self.out.flush()
            return
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self.drawn = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
            self.drawn = False
