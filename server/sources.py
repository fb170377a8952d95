"""Attached sources: existing tables streamed as tasks (``taskstream attach/detach/sources``).

Attaching never moves data and never changes the user's rows or columns: it creates a view, a
trigger function (both in schema ``taskstream``) and one trigger on the table, records them in
``taskstream.sources`` and regenerates the union the reads go through (``all_tasks``,
``tasks_by_ids``). The only lock on the user's table beyond a read's is CREATE TRIGGER's, taken
at the end and held for the few catalog writes after it; ``lock_timeout`` makes attach give up
rather than queue the table's writers behind a long transaction. The SQL is in
:mod:`server.source_sql`.

A source's tasks are addressed as ``<source>:<row id>``; a native task id cannot start with a
source's prefix (attach refuses a name that native ids already use, and the task API refuses to
create one), so the two never collide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from server.source_sql import (
    Mapping,
    MappingError,
    SourceObjects,
    attach_sql,
    check_name,
    detach_sql,
    ident,
    objects_for,
    type_check_sql,
    union_sql,
)

__all__ = [
    "LOCK_TIMEOUT",
    "Mapping",
    "MappingError",
    "Source",
    "SourceError",
    "attach",
    "describe",
    "detach",
    "grant",
    "list_sources",
    "revoke",
    "run_command",
]

# Advisory lock key serialising attach and detach (they regenerate shared objects).
SOURCES_LOCK_KEY = 0x7473_7372_6373
# How long attach and detach wait for the table's lock before giving up.
LOCK_TIMEOUT = "5s"


class SourceError(RuntimeError):
    """Attach or detach refused; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Source:
    """One attached table."""

    name: str
    table: str
    mapping: Mapping
    objects: SourceObjects
    attached_at: datetime


async def _resolve_table(conn: asyncpg.Connection, table: str) -> tuple[int, str, str]:
    try:
        row = await conn.fetchrow(
            "SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind FROM pg_class AS c"
            " JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
            table,
        )
    except asyncpg.PostgresError as exc:
        raise SourceError(f"table {table!r}: {exc}") from None
    if row is None:
        raise SourceError(f"table {table!r} does not exist (give it as schema.table)")
    if row["relkind"] not in ("r", "p"):
        raise SourceError(f"{table!r} is not a table")
    if row["nspname"] == "taskstream":
        raise SourceError("taskstream's own tables cannot be attached")
    return int(row["oid"]), row["nspname"], row["relname"]


async def _type_check(conn: asyncpg.Connection, table: str, mapping: Mapping) -> None:
    """Plan each field's expression against the table in a transaction that is rolled back."""
    for field_name, sql in type_check_sql(table, mapping):
        tr = conn.transaction()
        await tr.start()
        try:
            await conn.prepare(sql)
        except asyncpg.PostgresError as exc:
            raise MappingError(f"--{field_name} does not fit the table: {exc}") from None
        finally:
            await tr.rollback()


async def _regenerate(conn: asyncpg.Connection, except_name: str | None = None) -> None:
    rows = await conn.fetch("SELECT name FROM taskstream.sources ORDER BY name")
    names = [r["name"] for r in rows if r["name"] != except_name]
    for statement in union_sql(names):
        await conn.execute(statement)


async def attach(conn: asyncpg.Connection, name: str, table: str, mapping: Mapping) -> Source:
    """Attach ``table`` as source ``name`` with ``mapping``; refuse with :class:`SourceError` or
    :class:`MappingError` (nothing is then created)."""
    check_name(name)
    oid, schema, relname = await _resolve_table(conn, table)
    quoted = f"{ident(schema)}.{ident(relname)}"
    await _type_check(conn, quoted, mapping)
    objects = objects_for(name)
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SOURCES_LOCK_KEY)
        if await conn.fetchval("SELECT 1 FROM taskstream.sources WHERE name = $1", name):
            raise SourceError(f"source {name!r} is already attached (detach it first)")
        if await conn.fetchval("SELECT 1 FROM taskstream.sources WHERE table_oid = $1", oid):
            raise SourceError(f"{schema}.{relname} is already attached")
        if await conn.fetchval(
            "SELECT 1 FROM taskstream.tasks WHERE starts_with(id, $1) LIMIT 1", name + ":"
        ):
            raise SourceError(
                f"native task ids already start with {name + ':'!r}: choose another source name"
            )
        attached_at: datetime = await conn.fetchval("SELECT clock_timestamp()")
        rows = await conn.fetch(
            "SELECT attname::text AS name, format_type(atttypid, atttypmod) AS type"
            " FROM pg_attribute WHERE attrelid = 'taskstream.tasks'::regclass AND attnum > 0"
            " AND NOT attisdropped"
        )
        types = {r["name"]: r["type"] for r in rows}
        try:
            for statement in attach_sql(name, quoted, mapping, attached_at, types):
                await conn.execute(statement)
        except asyncpg.LockNotAvailableError:
            raise SourceError(
                f"{schema}.{relname} is locked by a long transaction; try again"
            ) from None
        except asyncpg.PostgresError as exc:
            raise MappingError(f"the mapping does not fit the table: {exc}") from None
        await conn.execute(
            "INSERT INTO taskstream.sources"
            " (name, table_oid, schema_name, table_name, mapping, objects, attached_at)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7)",
            name,
            oid,
            schema,
            relname,
            json.dumps(mapping.as_json()),
            json.dumps(objects.as_json()),
            attached_at,
        )
        await _regenerate(conn)
    return Source(name, f"{schema}.{relname}", mapping, objects, attached_at)


async def detach(conn: asyncpg.Connection, name: str) -> Source:
    """Remove every object :func:`attach` created for ``name``, its versions and grants."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SOURCES_LOCK_KEY)
        row = await conn.fetchrow("SELECT * FROM taskstream.sources WHERE name = $1", name)
        if row is None:
            raise SourceError(f"no source named {name!r} (see `taskstream sources`)")
        source = _source(row)
        # The table may have been dropped (with CASCADE, which took the view): by oid, not name.
        exists = await conn.fetchval("SELECT 1 FROM pg_class WHERE oid = $1", row["table_oid"])
        table = f"{ident(row['schema_name'])}.{ident(row['table_name'])}" if exists else None
        # The union first: it depends on the source's view.
        await _regenerate(conn, except_name=name)
        try:
            for statement in detach_sql(table, source.objects):
                await conn.execute(statement)
        except asyncpg.LockNotAvailableError:
            raise SourceError(
                f"{source.table} is locked by a long transaction; try again"
            ) from None
        await conn.execute("DELETE FROM taskstream.sources WHERE name = $1", name)
    return source


def _source(row: asyncpg.Record) -> Source:
    objects: dict[str, Any] = json.loads(row["objects"])
    return Source(
        name=row["name"],
        table=f"{row['schema_name']}.{row['table_name']}",
        mapping=Mapping.from_json(json.loads(row["mapping"])),
        objects=SourceObjects(**objects),
        attached_at=row["attached_at"],
    )


async def list_sources(conn: asyncpg.Connection) -> list[Source]:
    rows = await conn.fetch("SELECT * FROM taskstream.sources ORDER BY name")
    return [_source(r) for r in rows]


async def grant(conn: asyncpg.Connection, task_id: str, owner_id: str) -> None:
    """Give an attached task to ``owner_id`` (what an application backend does in SQL with
    ``SELECT taskstream.grant_task(task_id, owner_id)``)."""
    await conn.execute("SELECT taskstream.grant_task($1, $2)", task_id, owner_id)


async def revoke(conn: asyncpg.Connection, task_id: str) -> None:
    await conn.execute("SELECT taskstream.revoke_task($1)", task_id)


def describe(source: Source) -> str:
    """What ``taskstream sources`` prints for one source."""
    m = source.mapping
    when = f"{source.attached_at:%Y-%m-%d %H:%M:%S%z}"
    lines = [f"{source.name}: {source.table} (tasks '{source.name}:<id>', attached {when})"]
    fields = [
        ("id", m.id),
        ("owner", m.owner if m.owner is not None else "(granted: taskstream.grant_task)"),
        ("state", m.state),
        ("progress", None if m.progress is None else f"{m.progress} (scale {m.progress_scale:g})"),
        ("eta", m.eta),
        ("error", m.error),
        ("terminal", ", ".join(m.terminal)),
        ("success", ", ".join(m.success) or "(none)"),
    ]
    lines += [f"  {key:<9}{value}" for key, value in fields if value is not None]
    return "\n".join(lines)


async def run_command(dsn: str, command: str, options: dict[str, Any]) -> str:
    """The ``attach``, ``detach`` and ``sources`` commands; returns what to print. Applies
    pending migrations first, as ``serve`` does."""
    from server import db

    await db.migrate(dsn)
    conn = await db.connect(dsn)
    try:
        if command == "attach":
            mapping = Mapping(
                id=options["id"],
                state=options["state"],
                owner=options.get("owner"),
                progress=options.get("progress"),
                progress_scale=options.get("progress_scale") or 100.0,
                eta=options.get("eta"),
                error=options.get("error"),
                terminal=tuple(options.get("terminal") or ()),
                success=tuple(options.get("success") or ()),
            )
            source = await attach(conn, options["name"], options["table"], mapping)
            return "attached " + describe(source)
        if command == "detach":
            source = await detach(conn, options["name"])
            return (
                f"detached {source.name} ({source.table}): its view, function and trigger are gone"
            )
        found = await list_sources(conn)
        return "\n".join(describe(s) for s in found) if found else "no sources attached"
    finally:
        await conn.close()
