"""Database access: the connection pool, schema migrations and the task queries.

The LISTEN connection is *not* here: it lives in :mod:`server.broker` on a dedicated connection,
because a pool runs ``UNLISTEN *`` whenever it takes a connection back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from server.events import TaskState

__all__ = [
    "MIGRATION_LOCK_KEY",
    "DatabaseUnavailable",
    "connect",
    "create_pool",
    "fetch_open_tasks",
    "fetch_task",
    "fetch_tasks",
    "migrate",
    "migration_files",
]

logger = logging.getLogger(__name__)

# pg_advisory_lock key shared by every process that migrates this database ("tsmigr" in hex-ish).
MIGRATION_LOCK_KEY = 0x7473_6D69_6772

TASK_COLUMNS = (
    "id, owner_id, state, progress, estimated_time, error, version, created_at, updated_at"
)

# Errors that mean "the database is not reachable right now", as opposed to a bug or bad input.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    TimeoutError,
)


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL did not answer; the caller should retry later."""


def migration_files() -> list[tuple[str, str]]:
    """Return ``(name, sql)`` for every migration, in order.

    A wheel carries them as ``server/sql``; an editable checkout reads the top-level ``sql/``.
    """
    packaged = resources.files("server").joinpath("sql")
    if packaged.is_dir():
        entries: Iterable[Any] = packaged.iterdir()
    else:
        entries = (Path(__file__).resolve().parent.parent / "sql").iterdir()
    files = sorted((e for e in entries if e.name.endswith(".sql")), key=lambda e: e.name)
    return [(e.name, e.read_text(encoding="utf-8")) for e in files]


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=kwargs.pop("timeout", 5), **kwargs)


async def create_pool(dsn: str, *, min_size: int = 0, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=5,
        command_timeout=10,
        server_settings={"application_name": "taskstream"},
    )
    assert pool is not None
    return pool


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations and return the names applied.

    Each file runs in its own transaction; a session advisory lock serialises concurrent
    migrators, so two processes starting at once apply each file exactly once.
    """
    conn = await connect(dsn)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(
                """
                CREATE SCHEMA IF NOT EXISTS taskstream;
                CREATE TABLE IF NOT EXISTS taskstream.schema_migrations (
                    name text PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                );
                """
            )
            rows = await conn.fetch("SELECT name FROM taskstream.schema_migrations")
            done = {r["name"] for r in rows}
            for name, sql in migration_files():
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO taskstream.schema_migrations (name) VALUES ($1)", name
                    )
                logger.info("applied migration %s", name)
                applied.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
    return applied


def _row_to_state(row: asyncpg.Record) -> TaskState:
    return TaskState.from_row(dict(row))


async def fetch_task(pool: asyncpg.Pool, task_id: str) -> TaskState | None:
    row = await pool.fetchrow(f"SELECT {TASK_COLUMNS} FROM taskstream.tasks WHERE id = $1", task_id)
    return None if row is None else _row_to_state(row)


async def fetch_open_tasks(pool: asyncpg.Pool, owner_id: str) -> dict[str, TaskState]:
    """Every non-terminal task of one owner, oldest first (the owner-wide stream's start)."""
    rows = await pool.fetch(
        f"SELECT {TASK_COLUMNS} FROM taskstream.tasks WHERE owner_id = $1"
        " AND state NOT IN ('success', 'failed', 'cancelled') ORDER BY created_at, id",
        owner_id,
    )
    return {r["id"]: _row_to_state(r) for r in rows}


async def fetch_tasks(
    conn: asyncpg.Pool | asyncpg.Connection, task_ids: Sequence[str]
) -> dict[str, TaskState]:
    """Read many tasks in one round trip (used by resync and the fallback poll)."""
    rows = await conn.fetch(
        f"SELECT {TASK_COLUMNS} FROM taskstream.tasks WHERE id = ANY($1::text[])", list(task_ids)
    )
    return {r["id"]: _row_to_state(r) for r in rows}
