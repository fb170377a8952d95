"""A per-key token bucket, in this process's memory, with a bounded number of keys.

Used for ticket buying: each bucket holds up to ``per_minute`` tokens and refills at
``per_minute`` a minute. The limit is per process: with N server processes a user can get N times
as many; the database-side bound is the ticket lifetime (expired tickets are swept).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["DEFAULT_MAX_KEYS", "RateLimiter", "retry_after"]

# Keys are user ids from verified tokens. Past this many, the least recently used bucket goes:
# that user starts again with a full bucket, which only ever errs on the side of allowing.
DEFAULT_MAX_KEYS = 100_000


class RateLimiter:
    """``take(key)`` spends one token: 0.0 if allowed, else the seconds until one is back."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.capacity = float(per_minute)
        self.refill_per_second = per_minute / 60.0
        self.max_keys = max_keys
        self._clock = clock
        # key -> (tokens, when they were counted); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        now = self._clock()
        tokens, then = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.refill_per_second)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.refill_per_second
        self._buckets[key] = (tokens, now)
        self._forget_full(now)
        return wait

    def _forget_full(self, now: float) -> None:
        # A bucket that has refilled completely is the same as no bucket: drop it. The oldest
        # come first, so the loop stops at the first one still refilling.
        while self._buckets:
            key, (tokens, then) = next(iter(self._buckets.items()))
            full = tokens + (now - then) * self.refill_per_second >= self.capacity
            if not full and len(self._buckets) <= self.max_keys:
                break
            del self._buckets[key]


def retry_after(wait: float) -> str:
    """A Retry-After value (whole seconds, at least 1) for a wait in seconds."""
    return str(max(1, math.ceil(wait)))
