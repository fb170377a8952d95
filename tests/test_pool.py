"""The server's connection pool (server/db.py, create_pool): releasing a connection costs no
round trip, and still leaves nothing of a transaction behind."""

from __future__ import annotations

import asyncpg

from server import db


async def test_release_sends_no_reset_query(database_url: str, sql: asyncpg.Connection) -> None:
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        await pool.fetchval("SELECT 'pool-marker'")
        # pg_stat_activity.query is the backend's last statement: the marker, not asyncpg's
        # default "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;".
        last = await sql.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
        assert last == "SELECT 'pool-marker'", last
    finally:
        await pool.close()


async def test_a_transaction_left_open_is_rolled_back_on_release(
    database_url: str, sql: asyncpg.Connection
) -> None:
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TABLE pool_left_open (n int)")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pool_left_open')") is None
    finally:
        await pool.close()
