"""Ticket buying is rate limited per user, and expired tickets do not pile up in the table."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
import httpx
import pytest

from server.ratelimit import RateLimiter
from tests.conftest import LiveServer, create_task

TICKETS = "/api/v1/sse/tickets"


async def _buy(server: LiveServer, client: httpx.AsyncClient, sub: str = "alice") -> httpx.Response:
    return await client.post(
        server.url + TICKETS,
        json={"task_id": "t1"},
        headers={"Authorization": f"Bearer {server.token(sub)}"},
    )


@pytest.mark.parametrize("settings_overrides", [{"ticket_rate": 3}])
async def test_ticket_buying_past_the_rate_is_429_with_retry_after(
    server: LiveServer, client: httpx.AsyncClient
) -> None:
    for _ in range(3):
        assert (await _buy(server, client)).status_code == 200
    r = await _buy(server, client)
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "Too many tickets"
    # 3 a minute: the next one is back within 20 s.
    assert 1 <= int(r.headers["retry-after"]) <= 20
    assert "ticket" not in r.json()
    # Per user: someone else is not held back.
    assert (await _buy(server, client, "bob")).status_code == 200


def test_rate_limiter_refills_and_keeps_a_bounded_number_of_users() -> None:
    now = [0.0]
    limiter = RateLimiter(60, max_keys=50, clock=lambda: now[0])
    for _ in range(60):
        assert limiter.take("alice") == 0.0
    assert limiter.take("alice") == pytest.approx(1.0)  # one token a second
    now[0] += 1.0
    assert limiter.take("alice") == 0.0
    for i in range(10_000):
        limiter.take(f"user{i}")
    assert len(limiter) <= 50
    # Buckets that refilled completely are forgotten: they hold nothing worth keeping.
    now[0] += 61.0
    limiter.take("carol")
    assert len(limiter) == 1


async def _ticket_count(sql: asyncpg.Connection) -> int:
    count: int = await sql.fetchval("SELECT count(*) FROM taskstream.stream_tickets")
    return count


async def _age_all(sql: asyncpg.Connection) -> None:
    await sql.execute(
        "UPDATE taskstream.stream_tickets SET expires_at = clock_timestamp() - interval '1 s'"
    )


@pytest.mark.parametrize("settings_overrides", [{"ticket_sweep_interval": 0.2}])
async def test_expired_tickets_are_swept_without_any_new_purchase(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    """Regression: expired tickets were only deleted when someone bought a new one."""
    for _ in range(5):
        assert (await _buy(server, client)).status_code == 200
    await _age_all(sql)
    for _ in range(50):
        if await _ticket_count(sql) == 0:
            break
        await asyncio.sleep(0.1)
    assert await _ticket_count(sql) == 0


@pytest.mark.parametrize("settings_overrides", [{"ticket_sweep_interval": 600.0}])
async def test_redeeming_a_ticket_sweeps_expired_ones(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await create_task(sql, "t1", state="success")
    stale = (await _buy(server, client)).json()["ticket"]
    live = (await _buy(server, client)).json()["ticket"]
    await sql.execute(
        "UPDATE taskstream.stream_tickets SET expires_at = clock_timestamp() - interval '1 s'"
        " WHERE ticket_hash = $1",
        hashlib.sha256(stale.encode()).digest(),
    )
    assert await _ticket_count(sql) == 2
    r = await client.get(server.stream_url("t1"), params={"ticket": live})
    assert r.status_code == 200
    assert await _ticket_count(sql) == 0
    # An expired ticket is still refused when it is the one being redeemed.
    r = await client.get(server.stream_url("t1"), params={"ticket": stale})
    assert r.status_code == 401
