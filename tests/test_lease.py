"""A stream's subscription has one owner, the registry's Lease: released on every exit path."""

from __future__ import annotations

import asyncio

import pytest

from server.stream.registry import StreamLimitExceeded
from tests.conftest import LiveServer


def released(server: LiveServer) -> bool:
    broker = server.runtime.broker
    return broker.subscriber_count == 0 and broker._by_task == {} and broker._per_user == {}


async def test_body_raises_releases_the_subscription(server: LiveServer) -> None:
    broker = server.runtime.broker
    with pytest.raises(RuntimeError, match="boom"):
        async with broker.open("alice", ["t1"]) as sub:
            assert broker.subscriber_count == 1 and sub.task_ids == {"t1"}
            raise RuntimeError("boom")
    assert released(server)


async def test_kept_lease_is_released_by_the_response_body(server: LiveServer) -> None:
    broker = server.runtime.broker
    lease = broker.open("alice", ["t1"])

    async def body() -> None:
        async with lease:
            raise RuntimeError("body failed")

    async def request() -> None:
        async with lease:
            lease.keep()  # as a streaming view does: the body owns it from here
        assert broker.subscriber_count == 1
        with pytest.raises(RuntimeError, match="body failed"):
            await body()
        assert released(server)

    await asyncio.wait_for(request(), 5)


async def test_kept_lease_whose_body_never_starts_is_released_with_the_request(
    server: LiveServer,
) -> None:
    broker = server.runtime.broker

    async def request() -> None:
        async with broker.open("alice", ["t1"]) as lease_sub:
            assert lease_sub is not None
        # (not kept: released here)
        lease = broker.open("alice", ["t2"])
        async with lease:
            lease.keep()
        assert broker.subscriber_count == 1  # the client left before the body started

    await asyncio.wait_for(asyncio.create_task(request()), 5)
    await asyncio.sleep(0)  # the done-callback runs on the next turn of the loop
    assert released(server)


@pytest.mark.parametrize("settings_overrides", [{"max_streams_per_user": 1}])
async def test_limit_refusal_registers_nothing(server: LiveServer) -> None:
    broker = server.runtime.broker
    async with broker.open("alice", ["t1"]):
        with pytest.raises(StreamLimitExceeded):
            async with broker.open("alice", ["t2"]):
                raise AssertionError("not reached")
        assert broker.subscriber_count == 1 and set(broker._by_task) == {"t1"}
    assert released(server)
