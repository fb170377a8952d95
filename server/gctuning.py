"""Garbage-collector settings for a server process that holds thousands of open streams.

Each open stream keeps about 200 Python objects alive (Hypercorn's connection and h11 state,
Quart's request, the tasks, the mailbox), so one process with 5,000 streams tracks about a
million objects, and a full (generation 2) collection of them pauses the event loop for about
0.7 s on the benchmark machine. With the interpreter's thresholds (700, 10, 10) the objects that
are merely in flight while one update is written to thousands of streams survive a young
collection, get promoted, and every so often tip CPython's "25 % more long-lived objects" rule
into such a full collection. That pause was the whole tail: with the thresholds below, the
bench's fan-out to 10,000 watchers went from p99 1,038 ms to 253 ms in an otherwise identical
run, and many-tasks from p99 494 ms to 3 ms (README "Performance").

- A young generation of 50,000 objects: transient objects die (by reference count) before a
  young collection sees them, so they are not promoted. A young collection of that size takes
  a few milliseconds.
- The middle and old thresholds stay close to the defaults, so cyclic garbage of closed
  streams is still reclaimed as the population turns over: full collections still happen when
  the long-lived population really grows, which is what their cost is proportional to.
- :func:`gc.freeze` moves what start-up created (modules, the app) out of every later scan.

``TASKSTREAM_GC_THRESHOLDS=python`` keeps the interpreter's own settings.
"""

from __future__ import annotations

import gc
import logging

__all__ = ["apply"]

logger = logging.getLogger(__name__)


def apply(thresholds: tuple[int, int, int] | None) -> None:
    """Apply ``thresholds`` to this process and freeze what exists now (call after start-up)."""
    if thresholds is None:
        return
    gc.collect()  # start-up garbage should not be frozen for ever
    gc.freeze()
    gc.set_threshold(*thresholds)
    logger.debug("gc thresholds %s, %d start-up objects frozen", thresholds, gc.get_freeze_count())
