"""SIGTERM during ``taskstream serve``'s start-up, before the event loop takes the signal over.

Until then a SIGTERM must not kill the process outright (an embedded PostgreSQL would be left
running), so the handler raises :class:`StoppedDuringStartup` to unwind through ``serve``'s
clean-up. A raise from a signal handler is not reliable on its own, though: Python runs the
handler at whatever bytecode comes next, and if that is a destructor (``__del__``), a weakref
callback or an event loop's callback, the exception is printed as "ignored" or handed to the
loop's exception handler, and the signal is lost. The handler therefore also records the
request, and each later step of start-up checks it (:func:`checkpoint`, :func:`requested`), so
a swallowed raise still stops the server as soon as the next step begins.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

__all__ = ["StoppedDuringStartup", "checkpoint", "install", "requested"]

_requested = False


class StoppedDuringStartup(Exception):
    """SIGTERM arrived before the server was ready to drain: nothing to drain, stop cleanly."""


def _handler(_signum: int, _frame: FrameType | None) -> None:
    global _requested
    _requested = True
    raise StoppedDuringStartup


def install() -> None:
    """From here until the event loop installs its own handler, SIGTERM stops start-up."""
    signal.signal(signal.SIGTERM, _handler)
    previous = sys.unraisablehook

    def quiet(unraisable: sys.UnraisableHookArgs) -> None:
        # A raise swallowed in a destructor is recorded above; a traceback for it on stderr
        # would only alarm whoever sent the SIGTERM.
        if not isinstance(unraisable.exc_value, StoppedDuringStartup):
            previous(unraisable)

    sys.unraisablehook = quiet


def requested() -> bool:
    """Whether a SIGTERM arrived during start-up (even one whose raise was swallowed)."""
    return _requested


def checkpoint() -> None:
    """Raise :class:`StoppedDuringStartup` if a SIGTERM arrived earlier in start-up."""
    if _requested:
        raise StoppedDuringStartup
