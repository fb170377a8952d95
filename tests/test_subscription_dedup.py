"""Regression (fixed on main in take()): a NOTIFY that lands between subscribe() and the
snapshot read must not make the stream send the snapshot's version twice (seen once as a flaky
test_field_values_cannot_inject_events: a second `pending` progress with the same id)."""

from __future__ import annotations

from server.stream.mailbox import Subscription
from server.tasks import TaskState


def test_snapshot_version_already_pending_is_not_sent_twice() -> None:
    sub = Subscription("alice", {"t1"}, None)
    sub.offer(TaskState(id="t1", owner_id="alice", version=1))  # the INSERT's NOTIFY, late
    sub.mark_sent(TaskState(id="t1", owner_id="alice", version=1))  # the snapshot read
    assert sub.take() == []


def test_newer_pending_version_survives_the_snapshot() -> None:
    sub = Subscription("alice", {"t1"}, None)
    sub.offer(TaskState(id="t1", owner_id="alice", version=2))
    sub.mark_sent(TaskState(id="t1", owner_id="alice", version=1))
    assert [s.version for s in sub.take()] == [2]


def test_pending_deletion_survives_the_snapshot() -> None:
    sub = Subscription("alice", {"t1"}, None)
    sub.offer(TaskState(id="t1", owner_id="alice", version=0, deleted=True))
    sub.mark_sent(TaskState(id="t1", owner_id="alice", version=1))
    assert [s.deleted for s in sub.take()] == [True]
