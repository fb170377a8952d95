"""How one process's bus side recovers what NATS did not deliver, on a real NATS cluster and a
real PostgreSQL: a skipped version resyncs that task, a slow-consumer drop resyncs, and a change
that arrives twice (the task's subject and its owner's) is handed on once.

The bus here is the real :class:`~server.stream.bus.NatsBus`; what it hands on is recorded
instead of going into a registry, and the test publishes to its subjects the way the relay does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Collection

import nats
import pytest

from server.stream.bus import NatsBus
from server.tasks import TaskState
from tests.natscluster import NatsCluster
from tests.test_nginx import _wait

pytestmark = pytest.mark.timeout(60)


class Recorder:
    def __init__(self, slow: float = 0.0) -> None:
        self.changes: list[tuple[str, int]] = []
        self.resyncs: list[tuple[list[str] | None, list[str] | None]] = []
        self.slow = slow

    def on_change(self, state: TaskState) -> None:
        if self.slow:
            time.sleep(self.slow)  # a process too busy to keep up
        self.changes.append((state.id, state.version))

    async def on_resync(
        self, task_ids: Collection[str] | None = None, owners: Collection[str] | None = None
    ) -> None:
        self.resyncs.append(
            (
                None if task_ids is None else sorted(task_ids),
                None if owners is None else sorted(owners),
            )
        )


def payload(task_id: str, version: int, owner: str = "alice") -> bytes:
    return json.dumps({"id": task_id, "owner_id": owner, "version": version}).encode()


async def test_a_skipped_version_resyncs_that_task_and_a_repeat_is_handed_on_once(
    database_url: str, nats_cluster: NatsCluster
) -> None:
    rec = Recorder()
    bus = NatsBus(database_url, nats_cluster.urls[:1], prefix="rec1", settle=0.1)
    await bus.start(rec.on_change, rec.on_resync)
    pub = await nats.connect(nats_cluster.urls[2])
    try:
        bus.watch_task("a.b c")
        bus.watch_owner("alice")
        await _wait(lambda: bus.subject_count == 2, "subscribed")
        await asyncio.sleep(0.3)  # the interest has spread over the cluster
        rec.resyncs.clear()
        subjects = bus.subjects
        for version in (1, 2):
            for subject in (subjects.task("a.b c"), subjects.owner("alice")):
                await pub.publish(subject, payload("a.b c", version))
        await pub.publish(subjects.task("a.b c"), payload("a.b c", 5))  # 3 and 4 never came
        await pub.publish(subjects.task("other"), payload("other", 1))  # nobody watches it
        await pub.flush()
        await _wait(lambda: ("a.b c", 5) in rec.changes, "version 5")
        assert rec.changes == [("a.b c", 1), ("a.b c", 2), ("a.b c", 5)]
        await _wait(lambda: (["a.b c"], []) in rec.resyncs, "the gap's resync")
        assert bus.resyncs.get("gap") == 1
    finally:
        await pub.close()
        await bus.stop()
    assert bus.subject_count == 0


async def test_a_slow_consumer_drop_leads_to_a_resync(
    database_url: str, nats_cluster: NatsCluster
) -> None:
    rec = Recorder(slow=0.005)
    bus = NatsBus(database_url, nats_cluster.urls[:1], prefix="rec2", settle=0.1)
    bus.pending_msgs_limit = 20
    await bus.start(rec.on_change, rec.on_resync)
    pub = await nats.connect(nats_cluster.urls[0])
    try:
        bus.watch_task("t")
        await _wait(lambda: bus.subject_count == 1, "subscribed")
        await asyncio.sleep(0.3)
        rec.resyncs.clear()
        for version in range(1, 501):
            await pub.publish(bus.subjects.task("t"), payload("t", version))
        await pub.flush()
        await _wait(lambda: bus.drops > 0, "a slow-consumer drop", timeout=20)
        await _wait(lambda: (None, None) in rec.resyncs, "a full resync")
        assert bus.resyncs.get("slow_consumer", 0) >= 1
        assert len(rec.changes) < 500  # some were really dropped
    finally:
        await pub.close()
        await bus.stop()
