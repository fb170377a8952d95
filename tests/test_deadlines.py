"""Every waiting mailbox shares one loop timer for its deadline (server/stream/mailbox.py,
Deadlines): each still wakes at its own deadline, never before, and a moved or released
deadline does not wake it."""

from __future__ import annotations

import asyncio

import pytest

from server.stream.mailbox import TICK, Deadlines, Subscription
from server.tasks import TaskState


def _sub() -> Subscription:
    return Subscription("alice", {"t"}, None)


async def test_many_mailboxes_wake_at_their_own_deadlines_through_one_timer() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    subs = [_sub() for _ in range(500)]
    deadlines = [t0 + 0.05 + (i % 50) * 0.004 for i in range(500)]
    woke: list[float] = [0.0] * 500

    async def waiter(i: int) -> None:
        await subs[i].wait(deadlines[i])
        woke[i] = loop.time()

    shared = Deadlines.of(loop)
    before = len(shared)  # other tests' streams may share this loop
    tasks = [asyncio.create_task(waiter(i)) for i in range(500)]
    await asyncio.sleep(0)
    # One entry per mailbox, one timer for all of them.
    assert len(shared) == before + 500
    assert all(not hasattr(s, "_timer") for s in subs)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    late = [w - d for w, d in zip(woke, deadlines, strict=True)]
    assert min(late) >= -0.002, "a mailbox woke before its deadline"
    assert max(late) < 2.0
    mine = {id(s) for s in subs}
    assert not [e for e in shared._heap if id(e[2]) in mine], "fired entries left behind"


async def test_an_offer_wakes_before_the_deadline_and_the_same_deadline_is_not_armed_twice() -> (
    None
):
    loop = asyncio.get_running_loop()
    sub = _sub()
    until = loop.time() + 30
    task = asyncio.create_task(sub.wait(until))
    await asyncio.sleep(0)
    sub.offer(TaskState.gone("t"))
    await asyncio.wait_for(task, 2)
    sub.take()
    entries = len(Deadlines.of(loop))
    task = asyncio.create_task(sub.wait(until))
    await asyncio.sleep(0)
    assert len(Deadlines.of(loop)) == entries  # kept across waits, not once per event
    sub.close("test")
    await asyncio.wait_for(task, 2)


async def test_a_moved_or_released_deadline_does_not_wake() -> None:
    loop = asyncio.get_running_loop()
    moved, released = _sub(), _sub()
    early = loop.time() + 0.05
    first = asyncio.create_task(moved.wait(early))
    await asyncio.sleep(0)
    moved.offer(TaskState.gone("t"))
    await asyncio.wait_for(first, 2)
    moved.take()
    # The same mailbox now waits for a later deadline: the early entry must not wake it.
    later = asyncio.create_task(moved.wait(loop.time() + 30))
    gone = asyncio.create_task(released.wait(early))
    await asyncio.sleep(0)
    released.release()
    done, _ = await asyncio.wait({later, gone}, timeout=0.3)
    assert not done, "a stale deadline woke a mailbox"
    for sub in (moved, released):
        sub.close("test")
    await asyncio.wait_for(asyncio.gather(later, gone), 2)


async def test_deadlines_fire_together_on_the_tick_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """500 deadlines spread over 200 ms wake in about ten timer fires (one per 20 ms tick),
    never before their time and at most one tick late, not in one fire per distinct deadline."""
    fires = 0
    fire = Deadlines._fire

    def counted(self: Deadlines) -> None:
        nonlocal fires
        fires += 1
        fire(self)

    monkeypatch.setattr(Deadlines, "_fire", counted)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    subs = [_sub() for _ in range(500)]
    deadlines = [t0 + 0.05 + (i % 100) * 0.002 for i in range(500)]  # 100 distinct times
    woke: list[float] = [0.0] * 500

    async def waiter(i: int) -> None:
        await subs[i].wait(deadlines[i])
        woke[i] = loop.time()

    await asyncio.wait_for(asyncio.gather(*(waiter(i) for i in range(500))), 5)
    late = [w - d for w, d in zip(woke, deadlines, strict=True)]
    assert min(late) >= -0.002, "a mailbox woke before its deadline"
    assert max(late) < TICK + 0.5
    assert fires <= 0.2 / TICK + 3, f"{fires} timer fires for 100 distinct deadlines"
