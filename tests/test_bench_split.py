"""The load generator asks each worker process only for streams it has (bench/loadgen.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.loadgen import _split


def test_twenty_thousand_over_three_workers_in_five_steps_opens_all() -> None:
    room = [6667, 6667, 6666]  # how 20,000 assignments divide over three workers
    asked = [0, 0, 0]
    for _ in range(5):
        step = _split(4000, [r - a for r, a in zip(room, asked, strict=True)])
        assert sum(step) == 4000
        asked = [a + s for a, s in zip(asked, step, strict=True)]
    assert asked == room


@given(st.integers(0, 5000), st.lists(st.integers(0, 3000), min_size=1, max_size=8))
def test_split_is_capped_complete_and_even(total: int, room: list[int]) -> None:
    per = _split(total, room)
    assert sum(per) == min(total, sum(room))
    assert all(0 <= p <= r for p, r in zip(per, room, strict=True))
    # Even: a worker gets less than another only when it is out of room.
    for i, p in enumerate(per):
        if p < room[i]:
            assert all(q <= p + 1 for q in per), (per, room)
