"""Database access: the connection pool, schema migrations and the task queries.

The LISTEN connection is *not* here: it lives in :mod:`server.stream.listener` on a dedicated
connection, because a pool runs ``UNLISTEN *`` whenever it takes a connection back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from server.tasks import TERMINAL_ORDER, TaskState

__all__ = [
    "CONNECTION_ERRORS",
    "DATABASE_ERRORS",
    "MIGRATION_LOCK_KEY",
    "DatabaseUnavailable",
    "GroupClosedError",
    "GroupView",
    "TaskChange",
    "close_group",
    "connect",
    "create_pool",
    "fetch_group",
    "fetch_groups",
    "fetch_joined_tasks",
    "fetch_open_tasks",
    "fetch_task",
    "fetch_tasks",
    "insert_task",
    "list_tasks",
    "migrate",
    "migration_files",
    "update_task",
]

logger = logging.getLogger(__name__)

# pg_advisory_lock key shared by every process that migrates this database ("tsmigr" in hex-ish).
MIGRATION_LOCK_KEY = 0x7473_6D69_6772

TASK_COLUMNS = (
    "id, owner_id, state, progress, estimated_time, error, version, created_at, updated_at,"
    " started_at, start_progress, owner_since, group_id, group_seq, metadata"
)

# Reads go through every task source: taskstream.tasks and the attached tables (sql/006_sources.sql,
# server/sources.py). By owner: the union view; by id: tasks_by_ids(), which looks each source's
# rows up by row id. With nothing attached both are taskstream.tasks alone, with its plans.
READ_RELATION = "taskstream.all_tasks"

# The terminal states as an SQL list, from the one definition in server/tasks.py.
TERMINAL_SQL = "(" + ", ".join(f"'{state}'" for state in TERMINAL_ORDER) + ")"

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
# Every error a query can end with that is the database's, not the caller's: unreachable, or
# refusing the statement. Request handlers let these through to the app's one handler (503).
DATABASE_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)

# Errors that mean "PostgreSQL answered, and refused": a database or role that does not exist, a
# wrong password, a pg_hba rule. Retrying does not help; the operator must fix DATABASE_URL.
CONNECTION_REFUSED_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
)


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL did not answer; the caller should retry later."""


class GroupClosedError(ValueError):
    """A task cannot join this group: it is closed, full, or another owner's."""


def _metadata_json(metadata: dict[str, Any] | None) -> str | None:
    return None if metadata is None else json.dumps(metadata, separators=(",", ":"))


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


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing beyond what asyncpg always does (roll back an open
    transaction, drop listeners). Its default sends ``SELECT pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL`` on every release, a second round trip for each pooled query;
    in a connect storm that was a seventh of the server's time. Nothing here leaves session
    state on a pooled connection: no session ``SET`` (only ``SET LOCAL``), no ``LISTEN`` (the
    listener and the relay have connections of their own), no session advisory lock (only the
    migrator's, on its own connection), no cursor outside a transaction."""


async def create_pool(dsn: str, *, min_size: int = 0, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=5,
        command_timeout=10,
        reset=_keep_session,
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
    row = await pool.fetchrow(
        f"SELECT {TASK_COLUMNS} FROM taskstream.tasks_by_ids(ARRAY[$1::text])", task_id
    )
    return None if row is None else _row_to_state(row)


async def fetch_open_tasks(
    pool: asyncpg.Pool, owner_id: str
) -> tuple[dict[str, TaskState], datetime]:
    """Every non-terminal task of one owner, oldest first, and the database time of the read
    (tasks created before it that were not open then are not part of an owner-wide stream)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        rows = await conn.fetch(
            f"SELECT {TASK_COLUMNS} FROM {READ_RELATION} WHERE owner_id = $1"
            f" AND state NOT IN {TERMINAL_SQL} ORDER BY created_at, id",
            owner_id,
        )
        now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return {r["id"]: _row_to_state(r) for r in rows}, now


async def fetch_tasks(
    conn: asyncpg.Pool | asyncpg.Connection, task_ids: Sequence[str]
) -> dict[str, TaskState]:
    """Read many tasks in one round trip (used by resync and the fallback poll)."""
    rows = await conn.fetch(
        f"SELECT {TASK_COLUMNS} FROM taskstream.tasks_by_ids($1::text[])", list(task_ids)
    )
    return {r["id"]: _row_to_state(r) for r in rows}


async def fetch_joined_tasks(
    conn: asyncpg.Pool | asyncpg.Connection, since: dict[str, datetime]
) -> list[TaskState]:
    """Every task that became its owner's (created for them, or given to them) after
    ``since[owner]``: what an owner-wide stream picks up, read back after a listener outage."""
    if not since:
        return []
    # Two index range scans, (owner_id, created_at) and (owner_id, owner_since), rather than one
    # OR that reads every task the owner ever had; owner_since >= created_at, so the second
    # branch only adds tasks created before the cutoff and given to the owner after it.
    rows = await conn.fetch(
        f"SELECT {TASK_COLUMNS} FROM {READ_RELATION}"
        " JOIN unnest($1::text[], $2::timestamptz[]) AS o(joined_owner, joined_after)"
        " ON owner_id = o.joined_owner AND created_at > o.joined_after"
        f" UNION ALL SELECT {TASK_COLUMNS} FROM {READ_RELATION}"
        " JOIN unnest($1::text[], $2::timestamptz[]) AS o(joined_owner, joined_after)"
        " ON owner_id = o.joined_owner AND owner_since > o.joined_after"
        " AND created_at <= o.joined_after",
        list(since),
        list(since.values()),
    )
    return [_row_to_state(r) for r in rows]


# -- the task API's queries ------------------------------------------------------------------
# Every value is a parameter; the SQL text is fixed.


async def insert_task(
    conn: asyncpg.Pool | asyncpg.Connection,
    task_id: str,
    owner_id: str,
    *,
    state: str = "pending",
    progress: float = 0.0,
    estimated_time: int | None = None,
    group_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> TaskState | None:
    """Create a task; None if the id is taken (by anyone) or lies in an attached source's id
    space. Raises :class:`GroupClosedError` when ``group_id`` names a group that is closed, full
    or another owner's."""
    try:
        row = await conn.fetchrow(
            "INSERT INTO taskstream.tasks"
            " (id, owner_id, state, progress, estimated_time, group_id, metadata)"
            " SELECT $1::text, $2::text, $3::text, $4::double precision, $5::integer,"
            " $6::text, $7::jsonb"
            # Not in an attached source's id space ("<source>:<row id>").
            " WHERE NOT EXISTS"
            " (SELECT 1 FROM taskstream.sources WHERE starts_with($1, name || ':'))"
            " ON CONFLICT (id) DO NOTHING"
            f" RETURNING {TASK_COLUMNS}",
            task_id,
            owner_id,
            state,
            progress,
            estimated_time,
            group_id,
            _metadata_json(metadata),
        )
    except asyncpg.CheckViolationError as exc:
        if getattr(exc, "constraint_name", None) == "tasks_group_open":
            raise GroupClosedError(str(group_id)) from None
        raise
    return None if row is None else _row_to_state(row)


class TaskChange:
    """The fields a PATCH (or ``taskstream update``) sets; absent fields stay as they are."""

    __slots__ = ("error", "estimated_time", "fields", "metadata", "progress", "state")

    def __init__(self, **fields: Any) -> None:
        unknown = set(fields) - {"state", "progress", "estimated_time", "error", "metadata"}
        if unknown:
            raise TypeError(f"unknown task fields: {sorted(unknown)}")
        self.fields = frozenset(fields)
        self.state: str | None = fields.get("state")
        self.progress: float | None = fields.get("progress")
        self.estimated_time: int | None = fields.get("estimated_time")
        self.error: str | None = fields.get("error")
        self.metadata: dict[str, Any] | None = fields.get("metadata")


async def update_task(
    conn: asyncpg.Pool | asyncpg.Connection,
    task_id: str,
    change: TaskChange,
    *,
    owner_id: str | None = None,
) -> tuple[str, TaskState | None]:
    """Apply ``change`` to a non-terminal task in one statement.

    Returns ``("updated", state)``, ``("terminal", state)`` when the task is already finished
    (nothing changed), or ``("not_found", None)``, also when ``owner_id`` is given and is not the
    task's owner.
    """
    f = change.fields
    row = await conn.fetchrow(
        "UPDATE taskstream.tasks SET"
        " state = CASE WHEN $3 THEN $4::text ELSE state END,"
        " progress = CASE WHEN $5 THEN $6::double precision ELSE progress END,"
        " estimated_time = CASE WHEN $7 THEN $8::integer ELSE estimated_time END,"
        " error = CASE WHEN $9 THEN $10::text ELSE error END,"
        " metadata = CASE WHEN $11 THEN $12::jsonb ELSE metadata END"
        " WHERE id = $1 AND ($2::text IS NULL OR owner_id = $2)"
        f" AND state NOT IN {TERMINAL_SQL}"
        f" RETURNING {TASK_COLUMNS}",
        task_id,
        owner_id,
        "state" in f,
        change.state,
        "progress" in f,
        change.progress,
        "estimated_time" in f,
        change.estimated_time,
        "error" in f,
        change.error,
        "metadata" in f,
        _metadata_json(change.metadata),
    )
    if row is not None:
        return "updated", _row_to_state(row)
    # Not updated: tell a finished task from a missing (or someone else's) one.
    row = await conn.fetchrow(
        f"SELECT {TASK_COLUMNS} FROM taskstream.tasks"
        " WHERE id = $1 AND ($2::text IS NULL OR owner_id = $2)",
        task_id,
        owner_id,
    )
    if row is None:
        return "not_found", None
    return "terminal", _row_to_state(row)


async def list_tasks(
    conn: asyncpg.Pool | asyncpg.Connection,
    owner_id: str,
    *,
    limit: int,
    state: str | None = None,
    before: tuple[datetime, str] | None = None,
) -> list[TaskState]:
    """One owner's tasks, newest first (``created_at DESC, id DESC``), after a keyset cursor.

    Both shapes walk the index ``(owner_id, created_at DESC, id DESC)``; the cursor is a row
    comparison on that index's columns, so a page costs the same however deep it is.
    """
    if before is None:
        rows = await conn.fetch(
            f"SELECT {TASK_COLUMNS} FROM {READ_RELATION}"
            " WHERE owner_id = $1 AND ($2::text IS NULL OR state = $2)"
            " ORDER BY created_at DESC, id DESC LIMIT $3",
            owner_id,
            state,
            limit,
        )
    else:
        rows = await conn.fetch(
            f"SELECT {TASK_COLUMNS} FROM {READ_RELATION}"
            " WHERE owner_id = $1 AND ($2::text IS NULL OR state = $2)"
            " AND (created_at, id) < ($3::timestamptz, $4::text)"
            " ORDER BY created_at DESC, id DESC LIMIT $5",
            owner_id,
            state,
            before[0],
            before[1],
            limit,
        )
    return [_row_to_state(r) for r in rows]


# -- groups ----------------------------------------------------------------------------------


class GroupView:
    """A group as a group stream opens on it: its owner, whether it is closed, its tasks."""

    __slots__ = ("closed", "group_id", "owner_id", "tasks")

    def __init__(
        self, group_id: str, owner_id: str, closed: bool, tasks: dict[str, TaskState]
    ) -> None:
        self.group_id = group_id
        self.owner_id = owner_id
        self.closed = closed
        # Every task of the group (whoever owns it now), by sequence number.
        self.tasks = tasks


async def fetch_group(pool: asyncpg.Pool, group_id: str) -> GroupView | None:
    """A group and all its tasks, read in one snapshot; None if no task ever joined it."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        group = await conn.fetchrow(
            "SELECT owner_id, closed_at IS NOT NULL AS closed FROM taskstream.groups WHERE id = $1",
            group_id,
        )
        if group is None:
            return None
        rows = await conn.fetch(
            f"SELECT {TASK_COLUMNS} FROM taskstream.tasks WHERE group_id = $1 ORDER BY group_seq",
            group_id,
        )
    return GroupView(
        group_id, group["owner_id"], group["closed"], {r["id"]: _row_to_state(r) for r in rows}
    )


async def fetch_groups(
    conn: asyncpg.Pool | asyncpg.Connection, group_ids: Sequence[str]
) -> tuple[list[TaskState], list[tuple[str, str]]]:
    """Every task of these groups, and the closed ones as ``(group id, owner)``: what group
    streams pick up, read back after a listener outage."""
    rows = await conn.fetch(
        f"SELECT {TASK_COLUMNS} FROM taskstream.tasks WHERE group_id = ANY($1::text[])"
        " ORDER BY group_id, group_seq",
        list(group_ids),
    )
    closed = await conn.fetch(
        "SELECT id, owner_id FROM taskstream.groups"
        " WHERE id = ANY($1::text[]) AND closed_at IS NOT NULL",
        list(group_ids),
    )
    return [_row_to_state(r) for r in rows], [(r["id"], r["owner_id"]) for r in closed]


async def close_group(
    conn: asyncpg.Pool | asyncpg.Connection, group_id: str, owner_id: str
) -> dict[str, Any] | None:
    """Close one of ``owner_id``'s groups (idempotent); None if there is no such group of theirs.
    Returns the group: id, owner, when it was closed, and its number of tasks."""
    row = await conn.fetchrow(
        "WITH closed AS (UPDATE taskstream.groups SET closed_at = coalesce(closed_at,"
        " clock_timestamp()) WHERE id = $1 AND owner_id = $2 RETURNING id, owner_id, closed_at)"
        " SELECT closed.*, (SELECT count(*) FROM taskstream.tasks t WHERE t.group_id = $1)"
        " AS tasks FROM closed",
        group_id,
        owner_id,
    )
    if row is None:
        return None
    return {
        "group_id": row["id"],
        "owner_id": row["owner_id"],
        "closed_at": row["closed_at"].isoformat(),
        "tasks": int(row["tasks"]),
    }
