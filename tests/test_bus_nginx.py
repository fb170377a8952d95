"""tests/test_nginx.py's two instances behind a real nginx, in bus mode: one relay holds the
LISTEN connection, the other instance gets every change through a real three-node NATS cluster,
and when the relay instance is killed the survivor takes the relay role over."""

from __future__ import annotations

import secrets

import asyncpg
import httpx
import pytest

from tests.natscluster import NatsCluster
from tests.scrape import scrape, value
from tests.test_nginx import _wait, two_instances_behind_nginx

pytestmark = pytest.mark.timeout(120)


async def test_two_bus_instances_behind_nginx_serve_every_client_every_update(
    database_url: str, sql: asyncpg.Connection, nats_cluster: NatsCluster
) -> None:
    async def survivor_is_relay(direct: httpx.AsyncClient, url_b: str) -> None:
        async def relay() -> bool:
            return value(await scrape(direct, url_b), "taskstream_bus_relay") == 1

        await _wait(relay, "instance B to become the relay", timeout=15)

    log = await two_instances_behind_nginx(
        database_url,
        sql,
        after_kill=survivor_is_relay,
        TASKSTREAM_NATS_URL=",".join(nats_cluster.urls),
        TASKSTREAM_NATS_SUBJECT_PREFIX=f"ts{secrets.token_hex(4)}",
        TASKSTREAM_LISTENER_CHECK="0.5",
        TASKSTREAM_FALLBACK_POLL="0.5",
    )
    # One relay at a time: A (started first) and then B, or B all along.
    assert log.count("this process is now the bus relay") in (1, 2), log
