"""The SQL that attaching a table generates: pure functions from a mapping to SQL text.

A source's mapping gives each task field as an SQL expression over the user's row, which is
always aliased ``t`` (so ``status``, ``t.status`` and ``(t.meta->>'n')::int`` all work). The
expressions are the operator's: they are spliced into the generated SQL as given, after
:func:`check_expression` refused what could end or comment out the surrounding statement.
Every name (schema, table, source) goes through :func:`ident` or :func:`literal`.

What one source gets, all in schema ``taskstream`` except the trigger (which PostgreSQL keeps on
the user's table):

- ``source_<name>``: a view over the user's table with the columns of ``taskstream.tasks`` (plus
  ``source_key``, the row id as text), joined to ``source_rows`` for versions and ETA anchors
  and, for a source without an owner column, to ``source_grants`` for owners;
- ``source_<name>_publish()``: the trigger function, which records the mapped row in
  ``source_rows`` and sends the same NOTIFY payload as ``taskstream.tasks``;
- trigger ``taskstream_<name>`` on the user's table.

``all_tasks`` and ``tasks_by_ids()`` (sql/006_sources.sql) are regenerated from every source.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server import db
from server.tasks import MAX_ETA, MAX_STATE

__all__ = [
    "TASK_COLUMNS",
    "Mapping",
    "MappingError",
    "SourceObjects",
    "attach_sql",
    "check_expression",
    "check_name",
    "detach_sql",
    "ident",
    "literal",
    "mapped_columns",
    "objects_for",
    "type_check_sql",
    "union_sql",
]

# The columns every task source yields, in taskstream.tasks' order: db.py's one list.
TASK_COLUMNS = tuple(column.strip() for column in db.TASK_COLUMNS.split(","))

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class MappingError(ValueError):
    """A mapping that cannot be attached; the message says which field and why."""


def ident(name: str) -> str:
    """Quote an SQL identifier (any text, including quotes)."""
    if "\x00" in name:
        raise MappingError("names must not contain NUL")
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings is on since PostgreSQL 9.1)."""
    if "\x00" in value:
        raise MappingError("values must not contain NUL")
    return "'" + value.replace("'", "''") + "'"


def check_name(name: str) -> str:
    """A source name is also its task ids' prefix and part of object names: kept plain."""
    if not _NAME.match(name):
        raise MappingError(
            f"source name {name!r}: use 1 to 32 lowercase letters, digits or _, starting with a"
            " letter"
        )
    return name


def check_expression(field_name: str, expr: str) -> str:
    """Refuse what would end, or comment out the rest of, the generated statement."""
    text = expr.strip()
    if not text:
        raise MappingError(f"--{field_name}: empty expression")
    for token, why in ((";", "a statement separator"), ("--", "a comment"), ("/*", "a comment")):
        if token in text:
            raise MappingError(f"--{field_name}: {why} ({token!r}) is not allowed in an expression")
    if "\x00" in text:
        raise MappingError(f"--{field_name}: NUL is not allowed in an expression")
    return text


@dataclass(frozen=True, slots=True)
class Mapping:
    """How the user's row becomes a task. Expressions are SQL over the row ``t``."""

    id: str
    state: str
    owner: str | None = None
    progress: str | None = None
    # The progress expression's value for "done": 1 for 0-1, 100 for percentages.
    progress_scale: float = 100.0
    eta: str | None = None
    error: str | None = None
    terminal: tuple[str, ...] = ()
    success: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("id", "state", "owner", "progress", "eta", "error"):
            value = getattr(self, name)
            if value is not None:
                check_expression(name, value)
        if not self.progress_scale > 0 or self.progress_scale != self.progress_scale:
            raise MappingError("--progress-scale must be a positive number")
        if not self.terminal:
            raise MappingError("--terminal: name at least one terminal state")
        missing = [s for s in self.success if s not in self.terminal]
        if missing:
            raise MappingError(f"--success states must also be terminal: {missing}")
        for state in (*self.terminal, *self.success):
            if not state or len(state) > MAX_STATE:
                raise MappingError(f"state names are 1 to {MAX_STATE} characters: {state!r}")

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state,
            "owner": self.owner,
            "progress": self.progress,
            "progress_scale": self.progress_scale,
            "eta": self.eta,
            "error": self.error,
            "terminal": list(self.terminal),
            "success": list(self.success),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Mapping:
        return cls(
            id=data["id"],
            state=data["state"],
            owner=data.get("owner"),
            progress=data.get("progress"),
            progress_scale=float(data.get("progress_scale", 100.0)),
            eta=data.get("eta"),
            error=data.get("error"),
            terminal=tuple(data.get("terminal", ())),
            success=tuple(data.get("success", ())),
        )


def _in_list(values: Sequence[str]) -> str:
    return "(" + ", ".join(literal(v) for v in values) + ")"


def mapped_columns(mapping: Mapping) -> dict[str, str]:
    """Each task field as an SQL expression over ``t``, already in taskstream's terms.

    The state: a success state becomes ``success``, another terminal state ``failed`` (the two
    terminal states every client knows), anything else passes through (cut to the state limit).
    Progress is scaled to 0-100 and clamped; a missing value is 0. The ETA is whole seconds,
    clamped to 0..MAX_ETA. Nothing here can raise on a value the expressions produce.
    """
    raw_state = f"(({mapping.state}))::text"
    failed = [s for s in mapping.terminal if s not in mapping.success]
    cases = []
    if mapping.success:
        cases.append(f"WHEN {raw_state} IN {_in_list(mapping.success)} THEN 'success'")
    if failed:
        cases.append(f"WHEN {raw_state} IN {_in_list(failed)} THEN 'failed'")
    state = (
        f"CASE {' '.join(cases)} ELSE coalesce(nullif(left({raw_state}, {MAX_STATE}), ''),"
        " 'pending') END"
    )
    if mapping.progress is None:
        progress = "0::double precision"
    else:
        factor = 100.0 / mapping.progress_scale
        progress = (
            f"least(100::double precision, greatest(0::double precision,"
            f" coalesce((({mapping.progress}))::double precision * {factor!r}, 0)))"
        )
    if mapping.eta is None:
        eta = "NULL::integer"
    else:
        eta = (
            f"(least({MAX_ETA}::double precision, greatest(0::double precision,"
            f" round((({mapping.eta}))::double precision))))::integer"
        )
    error = "NULL::text" if mapping.error is None else f"(({mapping.error}))::text"
    owner = "NULL::text" if mapping.owner is None else f"coalesce((({mapping.owner}))::text, '')"
    return {
        "key": f"(({mapping.id}))::text",
        "owner_id": owner,
        "state": state,
        "progress": progress,
        "estimated_time": eta,
        "error": error,
    }


@dataclass(frozen=True, slots=True)
class SourceObjects:
    """The names of what attach creates for one source (recorded in taskstream.sources)."""

    view: str
    function: str
    trigger: str

    def as_json(self) -> dict[str, str]:
        return {"view": self.view, "function": self.function, "trigger": self.trigger}


def objects_for(name: str) -> SourceObjects:
    check_name(name)
    return SourceObjects(
        view=f"source_{name}", function=f"source_{name}_publish", trigger=f"taskstream_{name}"
    )


def type_check_sql(table: str, mapping: Mapping) -> list[tuple[str, str]]:
    """One ``SELECT ... WHERE false`` per field, to name the field whose expression is wrong."""
    checks = [
        ("id", f"(({mapping.id}))::text"),
        ("state", f"(({mapping.state}))::text"),
    ]
    if mapping.owner is not None:
        checks.append(("owner", f"(({mapping.owner}))::text"))
    if mapping.progress is not None:
        checks.append(("progress", f"(({mapping.progress}))::double precision"))
    if mapping.eta is not None:
        checks.append(("eta", f"(({mapping.eta}))::double precision"))
    if mapping.error is not None:
        checks.append(("error", f"(({mapping.error}))::text"))
    # Then the mapping as the view and the trigger evaluate it (state lists, scale, clamps).
    checks.append(("state/--terminal/--success", ", ".join(mapped_columns(mapping).values())))
    return [(name, f"SELECT {expr} FROM {table} AS t WHERE false") for name, expr in checks]


def _view_sql(
    name: str, table: str, mapping: Mapping, attached_at: datetime, types: dict[str, str]
) -> str:
    cols = mapped_columns(mapping)
    objects = objects_for(name)
    since = f"{literal(attached_at.isoformat())}::timestamptz"
    # The mapping is evaluated over the user's table alone, so its expressions' column names
    # can never be taken for a column of the tables joined to it.
    mapped = (
        f"(SELECT {cols['key']} AS ts_key, {cols['owner_id']} AS ts_owner,"
        f" {cols['state']} AS ts_state, {cols['progress']} AS ts_progress,"
        f" {cols['estimated_time']} AS ts_eta, {cols['error']} AS ts_error"
        f" FROM {table} AS t) AS m"
    )
    if mapping.owner is None:
        # Tasks are the grants: a granted task whose row the writer has not written yet (Celery
        # writes it when the task starts) is a pending task, as Celery itself calls an unknown id.
        owner, key = "g.owner_id", "g.key"
        rows = f"taskstream.source_grants AS g LEFT JOIN {mapped} ON m.ts_key = g.key"
        where = f" WHERE g.source = {literal(name)}"
    else:
        owner, key, rows, where = "m.ts_owner", "m.ts_key", mapped, ""
    values = {
        "id": f"{literal(name + ':')} || {key}",
        "owner_id": owner,
        "state": "coalesce(m.ts_state, 'pending')",
        "progress": "coalesce(m.ts_progress, 0)",
        "estimated_time": "m.ts_eta",
        "error": "m.ts_error",
        "version": "coalesce(v.version, 1)::bigint",
        "created_at": f"coalesce(v.created_at, {since})",
        "updated_at": f"coalesce(v.updated_at, {since})",
        "started_at": "v.started_at",
        "start_progress": "v.start_progress",
        "owner_since": "v.owner_since",
    }
    # Columns of taskstream.tasks that a source does not map (added by later migrations) are
    # NULL of the column's own type, so every source yields exactly the columns of the union.
    select = ", ".join(
        f"{values[c]} AS {c}" if c in values else f"NULL::{_type(types, c)} AS {c}"
        for c in TASK_COLUMNS
    )
    return (
        f"CREATE VIEW taskstream.{ident(objects.view)} AS SELECT {select},"
        f" {key} AS source_key FROM {rows}"
        f" LEFT JOIN taskstream.source_rows AS v ON v.source = {literal(name)} AND v.key = {key}"
        f"{where}"
    )


def _type(types: dict[str, str], column: str) -> str:
    if column not in types:
        raise MappingError(f"taskstream.tasks has no column {column!r}: run taskstream migrate")
    return types[column]


def _function_sql(name: str, mapping: Mapping) -> str:
    cols = mapped_columns(mapping)
    objects = objects_for(name)
    tag = "$ts_" + secrets.token_hex(6) + "$"
    if mapping.owner is None:
        # No owner in the row: the grant is the owner (sql/006_sources.sql, grant_task).
        owner_lookup = (
            "SELECT g.owner_id INTO ts_owner FROM taskstream.source_grants AS g"
            f" WHERE g.source = {literal(name)} AND g.key = ts_m.key;\n"
            "    ts_owner := coalesce(ts_owner, '');"
        )
        old_owner = "NULL::text"
    else:
        owner_lookup = "ts_owner := ts_m.owner_id;"
        old_owner = cols["owner_id"]
    return f"""CREATE FUNCTION taskstream.{ident(objects.function)}() RETURNS trigger
LANGUAGE plpgsql AS {tag}
DECLARE
    ts_m record;
    ts_owner text;
    ts_row taskstream.source_rows;
BEGIN
    IF TG_OP = 'DELETE' THEN
        SELECT {cols["key"]} AS key, {old_owner} AS owner_id INTO ts_m FROM (SELECT OLD.*) AS t;
        IF ts_m.owner_id IS NULL THEN
            -- The task is gone with its row: so is its grant (else it would read as pending).
            DELETE FROM taskstream.source_grants AS g
             WHERE g.source = {literal(name)} AND g.key = ts_m.key
            RETURNING g.owner_id INTO ts_owner;
        ELSE
            ts_owner := ts_m.owner_id;
        END IF;
        PERFORM taskstream.source_forget({literal(name)}, ts_m.key, ts_owner);
        RETURN NULL;
    END IF;
    SELECT {cols["key"]} AS key,
           {cols["owner_id"]} AS owner_id,
           {cols["state"]} AS state,
           {cols["progress"]} AS progress,
           {cols["estimated_time"]} AS estimated_time,
           {cols["error"]} AS error
      INTO ts_m FROM (SELECT NEW.*) AS t;
    IF ts_m.key IS NULL THEN
        RETURN NULL;
    END IF;
    {owner_lookup}
    ts_row := taskstream.source_publish({literal(name)}, ts_m.key, ts_owner, ts_m.state,
                                        ts_m.progress, ts_m.estimated_time, ts_m.error,
                                        TG_OP = 'INSERT');
    IF ts_row.version IS NOT NULL THEN
        PERFORM pg_notify('taskstream',
                          taskstream.source_payload({literal(name + ":")} || ts_m.key, ts_row));
    END IF;
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    -- Never fail the user's writer: a row the mapping cannot read is skipped, loudly.
    RAISE WARNING 'taskstream source %: row not published: %', {literal(name)}, SQLERRM;
    RETURN NULL;
END;
{tag}"""


def attach_sql(
    name: str, table: str, mapping: Mapping, attached_at: datetime, types: dict[str, str]
) -> list[str]:
    """The statements that attach ``table`` (already quoted, ``schema.table``) as ``name``;
    ``types`` are the SQL types of taskstream.tasks' columns, by name."""
    objects = objects_for(name)
    return [
        _view_sql(name, table, mapping, attached_at, types),
        _function_sql(name, mapping),
        f"CREATE TRIGGER {ident(objects.trigger)} AFTER INSERT OR UPDATE OR DELETE ON {table}"
        f" FOR EACH ROW EXECUTE FUNCTION taskstream.{ident(objects.function)}()",
    ]


def detach_sql(table: str | None, objects: SourceObjects) -> list[str]:
    """The statements that remove what :func:`attach_sql` created (``table`` None: it is gone,
    and its trigger with it)."""
    statements = []
    if table is not None:
        statements.append(f"DROP TRIGGER IF EXISTS {ident(objects.trigger)} ON {table}")
    statements += [
        f"DROP FUNCTION IF EXISTS taskstream.{ident(objects.function)}()",
        f"DROP VIEW IF EXISTS taskstream.{ident(objects.view)}",
    ]
    return statements


def union_sql(names: Sequence[str]) -> list[str]:
    """``all_tasks`` and ``tasks_by_ids()`` over taskstream.tasks and every source ``names``."""
    cols = ", ".join(TASK_COLUMNS)
    views = [ident(objects_for(n).view) for n in names]
    union = f"SELECT {cols} FROM taskstream.tasks" + "".join(
        f" UNION ALL SELECT {cols} FROM taskstream.{view}" for view in views
    )
    by_id = f"SELECT {cols} FROM taskstream.tasks WHERE id = ANY(ids)"
    for name, view in zip(names, views, strict=True):
        prefix = name + ":"
        by_id += (
            f" UNION ALL SELECT {cols} FROM taskstream.{view} WHERE source_key = ANY(ARRAY("
            f"SELECT substr(i, {len(prefix) + 1}) FROM unnest(ids) AS i"
            f" WHERE starts_with(i, {literal(prefix)})))"
        )
    return [
        f"CREATE OR REPLACE VIEW taskstream.all_tasks AS {union}",
        "CREATE OR REPLACE FUNCTION taskstream.tasks_by_ids(ids text[])"
        f" RETURNS SETOF taskstream.all_tasks LANGUAGE sql STABLE AS $$ {by_id} $$",
    ]
