"""Attached sources (server/sources.py): a user's own jobs table streamed as tasks.

Everything runs against the real server and PostgreSQL: the user's writer is plain SQL on the
user's table, never on taskstream.tasks.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import asyncpg
import httpx
import pytest

from server import sources
from server.source_sql import Mapping, MappingError
from server.sources import SourceError
from tests.conftest import LiveServer, env_with
from tests.sse_client import open_stream

pytestmark = pytest.mark.timeout(60)

JOBS = Mapping(
    id="id",
    owner="owner",
    state="status",
    progress="done_fraction",
    progress_scale=1,
    eta="seconds_left",
    error="failure",
    terminal=("finished", "crashed"),
    success=("finished",),
)


async def make_jobs(sql: asyncpg.Connection) -> None:
    await sql.execute(
        """
        CREATE SCHEMA app;
        CREATE TABLE app.jobs (
            id text PRIMARY KEY, owner text, status text NOT NULL DEFAULT 'waiting',
            done_fraction real NOT NULL DEFAULT 0, seconds_left integer, failure text,
            unrelated text
        );
        INSERT INTO app.jobs (id, owner, status) VALUES ('old', 'alice', 'running');
        """
    )


# What a user can see of their schema: every catalog row naming it, its tables, columns,
# triggers, functions, indexes, constraints, and what depends on its table.
CATALOG = """
SELECT 'namespace' AS kind, nspname::text AS name, nspacl::text AS detail
  FROM pg_namespace WHERE nspname = 'app'
UNION ALL SELECT 'class', relname::text, relkind::text || relnatts || coalesce(relacl::text, '')
          || relhastriggers || relhasrules
  FROM pg_class WHERE relnamespace = 'app'::regnamespace
UNION ALL SELECT 'attribute', attrelid::regclass::text || '.' || attname,
          atttypid::regtype::text || attnum || attnotnull
  FROM pg_attribute WHERE attrelid = 'app.jobs'::regclass
UNION ALL SELECT 'trigger', tgname::text, tgfoid::regprocedure::text
  FROM pg_trigger WHERE tgrelid = 'app.jobs'::regclass
UNION ALL SELECT 'proc', proname::text, prosrc
  FROM pg_proc WHERE pronamespace = 'app'::regnamespace
UNION ALL SELECT 'constraint', conname::text, pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'app'::regnamespace
UNION ALL SELECT 'index', indexrelid::regclass::text, pg_get_indexdef(indexrelid)
  FROM pg_index WHERE indrelid = 'app.jobs'::regclass
UNION ALL SELECT 'depend', classid::regclass::text || objid, deptype::text
  FROM pg_depend WHERE refobjid = 'app.jobs'::regclass
UNION ALL SELECT 'rewrite', rulename::text, ev_type::text
  FROM pg_rewrite WHERE ev_class = 'app.jobs'::regclass
ORDER BY 1, 2, 3
"""


async def catalog(sql: asyncpg.Connection) -> list[tuple[str, str, str]]:
    return [tuple(r) for r in await sql.fetch(CATALOG)]  # type: ignore[misc]


async def rows_with_xmin(sql: asyncpg.Connection) -> list[tuple[str, str, str]]:
    # xmin changes when a row is rewritten: equal xmins prove attach wrote no user row.
    return [
        (r["id"], r["xmin"], r["row"])
        for r in await sql.fetch(
            "SELECT id, xmin::text, jobs::text AS row FROM app.jobs ORDER BY id"
        )
    ]


async def test_detach_leaves_the_schema_exactly_as_it_was(sql: asyncpg.Connection) -> None:
    await make_jobs(sql)
    before, rows_before = await catalog(sql), await rows_with_xmin(sql)
    await sources.attach(sql, "jobs", "app.jobs", JOBS)
    during = await catalog(sql)
    assert during != before  # the trigger is there (and the view depends on the table)
    assert [k for k in during if k[0] == "trigger"] == [
        ("trigger", "taskstream_jobs", "taskstream.source_jobs_publish()")
    ]
    assert await rows_with_xmin(sql) == rows_before  # no user row rewritten
    await sql.execute("UPDATE app.jobs SET status = 'finished' WHERE id = 'old'")
    await sources.detach(sql, "jobs")
    # pg_class.relhastriggers means "has or once had triggers" (PostgreSQL's catalog docs): the
    # next VACUUM, which autovacuum runs, clears it. Everything else is identical at once.
    after = await catalog(sql)
    assert [k for k in after if k[0] != "class"] == [k for k in before if k[0] != "class"]
    await sql.execute("VACUUM app.jobs")
    assert await catalog(sql) == before
    assert await sql.fetchval("SELECT count(*) FROM taskstream.sources") == 0
    assert await sql.fetchval("SELECT count(*) FROM taskstream.source_rows") == 0
    names = await sql.fetch(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'taskstream'::regnamespace"
        " AND proname LIKE 'source_jobs%' UNION ALL SELECT relname FROM pg_class"
        " WHERE relnamespace = 'taskstream'::regnamespace AND relname LIKE 'source_jobs%'"
    )
    assert names == []


async def test_a_mapping_that_does_not_type_check_is_refused_and_creates_nothing(
    sql: asyncpg.Connection, database_url: str
) -> None:
    await make_jobs(sql)
    before = await catalog(sql)
    bad = [
        (["--progress", "no_such_column"], 'column "no_such_column" does not exist'),
        (["--eta", "now()"], "--eta does not fit the table"),
        (["--owner", "status; DROP TABLE app.jobs"], "statement separator"),
        (["--error", "failure -- x"], "a comment"),
    ]
    for extra, message in bad:
        cmd = [sys.executable, "-m", "server", "attach", "jobs", "--table", "app.jobs"]
        cmd += ["--id", "id", "--state", "status", "--terminal", "finished", *extra]
        done = subprocess.run(
            cmd, env=env_with(DATABASE_URL=database_url), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1, done.stderr
        assert message in done.stderr
        assert "Traceback" not in done.stderr
    with pytest.raises(MappingError, match="--success states must also be terminal"):
        Mapping(id="id", state="status", terminal=("a",), success=("b",))
    with pytest.raises(SourceError, match="does not exist"):
        await sources.attach(sql, "jobs", "app.nope", JOBS)
    with pytest.raises(MappingError, match="source name"):
        await sources.attach(sql, "Jobs;", "app.jobs", JOBS)
    assert await catalog(sql) == before


async def test_cli_attach_sources_detach(sql: asyncpg.Connection, database_url: str) -> None:
    await make_jobs(sql)
    env = env_with(DATABASE_URL=database_url)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    done = run(
        "attach", "jobs", "--table", "app.jobs", "--id", "id", "--owner", "owner",
        "--state", "status", "--progress", "done_fraction", "--progress-scale", "1",
        "--terminal", "finished,crashed", "--success", "finished",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = run("sources")
    assert listed.returncode == 0
    assert "jobs: app.jobs" in listed.stdout and "done_fraction (scale 1)" in listed.stdout
    again = run("attach", "jobs", "--table", "app.jobs", "--id", "id", "--state", "status",
                "--terminal", "x")  # fmt: skip
    assert again.returncode == 1 and "already attached" in again.stderr
    assert run("detach", "jobs").returncode == 0
    assert "no sources attached" in run("sources").stdout
    gone = run("detach", "jobs")
    assert gone.returncode == 1 and "no source named 'jobs'" in gone.stderr


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_attached_rows_stream_resume_and_read_like_native_tasks(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await make_jobs(sql)
    await sources.attach(sql, "jobs", "app.jobs", JOBS)
    await sql.execute("INSERT INTO app.jobs (id, owner) VALUES ('j1', 'alice')")
    token = server.token("alice")
    async with open_stream(client, server.stream_url("jobs:j1"), token=token) as s:
        first = await s.next()
        assert first.event == "progress" and first.id == "1"
        assert first.json()["task_id"] == "jobs:j1" and first.json()["state"] == "waiting"
        await sql.execute(
            "UPDATE app.jobs SET status = 'running', done_fraction = 0.25 WHERE id = 'j1'"
        )
        ev = await s.next()
        assert (ev.id, ev.json()["progress"], ev.json()["state"]) == ("2", 25.0, "running")
        # A column the mapping does not read changes nothing: no event (as on taskstream.tasks).
        await sql.execute("UPDATE app.jobs SET unrelated = 'x' WHERE id = 'j1'")
        await s.expect_nothing(0.3)
        # Clamped: 1.7 of a 0-1 scale is 100 %.
        await sql.execute("UPDATE app.jobs SET done_fraction = 1.7 WHERE id = 'j1'")
        assert (await s.next()).json()["progress"] == 100.0
    # Resume: only what came after the last id seen.
    await sql.execute("UPDATE app.jobs SET done_fraction = 0.5 WHERE id = 'j1'")
    async with open_stream(
        client, server.stream_url("jobs:j1"), token=token, headers={"Last-Event-ID": "3"}
    ) as s:
        ev = await s.next()
        assert (ev.id, ev.json()["progress"]) == ("4", 50.0)
        await sql.execute(
            "UPDATE app.jobs SET status = 'crashed', failure = 'disk full' WHERE id = 'j1'"
        )
        assert (await s.next()).json()["state"] == "failed"
        done = await s.next()
        assert done.event == "complete" and done.json() == {"state": "failed", "error": "disk full"}
        await s.wait_closed()
    # The task API's reads.
    r = await client.get(f"{server.url}/api/v1/tasks/jobs:j1", headers=_auth(token))
    assert r.status_code == 200 and r.json()["state"] == "failed" and r.headers["etag"] == '"5"'
    assert r.json()["error"] == "disk full" and r.json()["owner_id"] == "alice"
    r = await client.get(f"{server.url}/api/v1/tasks", headers=_auth(token))
    assert {t["task_id"] for t in r.json()["tasks"]} == {"jobs:j1", "jobs:old"}
    # A row that existed before attach is version 1 until its first change.
    r = await client.get(f"{server.url}/api/v1/tasks/jobs:old", headers=_auth(token))
    assert r.json()["version"] == 1 and r.json()["state"] == "running"
    # Long poll: answered by the trigger's NOTIFY.
    poll = asyncio.create_task(
        client.get(
            f"{server.url}/api/v1/tasks/jobs:old?wait=10&after_version=1", headers=_auth(token)
        )
    )
    await asyncio.sleep(0.3)
    await sql.execute("UPDATE app.jobs SET status = 'finished', done_fraction = 1 WHERE id = 'old'")
    r = await asyncio.wait_for(poll, 5)
    assert r.status_code == 200 and r.json()["state"] == "success" and r.json()["version"] == 2
    # Read-only through taskstream: the table's writers are the user's.
    writer = _auth(server.token("svc", scopes=["tasks:write"]))
    r = await client.patch(
        f"{server.url}/api/v1/tasks/jobs:j1", json={"progress": 1}, headers=writer
    )
    assert r.status_code == 404
    r = await client.post(f"{server.url}/api/v1/tasks/jobs:old/cancel", headers=_auth(token))
    assert r.status_code == 404
    # Multi-task streams mix native and attached ids.
    await sql.execute("INSERT INTO taskstream.tasks (id, owner_id) VALUES ('native', 'alice')")
    async with open_stream(
        client, f"{server.url}/api/v1/sse/tasks?ids=native,jobs:old", token=token
    ) as s:
        got = {(await s.next()).json()["task_id"] for _ in range(3)}
        assert {"native", "jobs:old"} <= got


async def test_owner_wide_stream_follows_attached_rows(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await make_jobs(sql)
    await sources.attach(sql, "jobs", "app.jobs", JOBS)
    async with open_stream(client, f"{server.url}/api/v1/sse/tasks", token=server.token()) as s:
        assert (await s.next()).json()["task_id"] == "jobs:old"
        await sql.execute("INSERT INTO app.jobs (id, owner) VALUES ('new', 'alice'), ('b', 'bob')")
        ev = await s.next()
        assert ev.json()["task_id"] == "jobs:new"
        await s.expect_nothing(0.3)  # bob's row is not alice's


async def test_native_ids_cannot_enter_a_sources_id_space(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await make_jobs(sql)
    await sources.attach(sql, "jobs", "app.jobs", JOBS)
    r = await client.post(
        f"{server.url}/api/v1/tasks", json={"id": "jobs:old"}, headers=_auth(server.token())
    )
    assert r.status_code == 409
    await sources.detach(sql, "jobs")
    await sql.execute("INSERT INTO taskstream.tasks (id, owner_id) VALUES ('jobs:x', 'alice')")
    with pytest.raises(SourceError, match="native task ids already start with 'jobs:'"):
        await sources.attach(sql, "jobs", "app.jobs", JOBS)


async def test_a_row_the_mapping_cannot_read_never_fails_the_writer(
    sql: asyncpg.Connection,
) -> None:
    await make_jobs(sql)
    # The progress cast fails at run time for a non-number: the writer's UPDATE still commits.
    mapping = Mapping(id="id", owner="owner", state="status", progress="unrelated",
                      terminal=("finished",))  # fmt: skip
    await sources.attach(sql, "jobs", "app.jobs", mapping)
    await sql.execute("UPDATE app.jobs SET unrelated = 'not a number' WHERE id = 'old'")
    assert await sql.fetchval("SELECT unrelated FROM app.jobs WHERE id = 'old'") == "not a number"
    await sql.execute("UPDATE app.jobs SET unrelated = '42' WHERE id = 'old'")
    row = await sql.fetchrow("SELECT * FROM taskstream.source_rows WHERE key = 'old'")
    assert row is not None and row["progress"] == 42.0


async def test_column_names_like_taskstreams_own_do_not_clash(sql: asyncpg.Connection) -> None:
    # Regression: the view joined source_rows, whose "progress" made a bare `progress` ambiguous.
    await sql.execute(
        "CREATE TABLE public.t2 (key text PRIMARY KEY, owner_id text, state text,"
        " progress real, version int, source text, g text, m text, v text)"
    )
    await sql.execute(
        "INSERT INTO public.t2 VALUES ('a', 'alice', 'run', 10, 7, 's', 'g', 'm', 'v')"
    )
    mapping = Mapping(id="key", owner="owner_id", state="state", progress="progress",
                      error="m || g || v", terminal=("done",))  # fmt: skip
    await sources.attach(sql, "t2", "public.t2", mapping)
    await sql.execute("UPDATE public.t2 SET progress = 20, version = 8")
    row = await sql.fetchrow("SELECT * FROM taskstream.tasks_by_ids(ARRAY['t2:a'])")
    assert row is not None
    assert (row["owner_id"], row["progress"], row["version"], row["error"]) == (
        "alice",
        20,
        2,
        "mgv",
    )
    rows = await sql.fetch("SELECT id FROM taskstream.all_tasks WHERE owner_id = 'alice'")
    assert [r["id"] for r in rows] == ["t2:a"]


# -- ownership: a source whose rows do not know their owner ------------------------------------

GRANTED = Mapping(id="id", state="status", terminal=("finished",), success=("finished",))


async def test_an_ungranted_task_opens_on_no_path_and_a_grant_opens_it_for_one_user(
    server: LiveServer, client: httpx.AsyncClient, sql: asyncpg.Connection
) -> None:
    await make_jobs(sql)
    await sources.attach(sql, "q", "app.jobs", GRANTED)
    await sql.execute("INSERT INTO app.jobs (id, status) VALUES ('r1', 'running')")
    alice, bob = server.token("alice"), server.token("bob")

    async def closed_everywhere(token: str) -> None:
        r = await client.get(f"{server.url}/api/v1/tasks/q:r1", headers=_auth(token))
        assert r.status_code == 404
        r = await client.get(
            f"{server.url}/api/v1/tasks/q:r1?wait=1&after_version=0", headers=_auth(token)
        )
        assert r.status_code == 404
        r = await client.get(f"{server.url}/api/v1/tasks", headers=_auth(token))
        assert [t["task_id"] for t in r.json()["tasks"]] == []
        for url in (server.stream_url("q:r1"), f"{server.url}/api/v1/sse/tasks?ids=q:r1"):
            async with open_stream(client, url, token=token) as s:
                ev = await s.next()
                assert ev.event == "error" and json.loads(ev.data)["error"] == "Task not found"
        # A ticket is bought for any id, and opens nothing the buyer could not open.
        r = await client.post(
            f"{server.url}/api/v1/sse/tickets", json={"task_ids": ["q:r1"]}, headers=_auth(token)
        )
        assert r.status_code == 200
        ticket = r.json()["ticket"]
        async with open_stream(client, server.stream_url("q:r1") + f"?ticket={ticket}") as s:
            assert (await s.next()).event == "error"

    await closed_everywhere(alice)
    async with open_stream(client, f"{server.url}/api/v1/sse/tasks", token=alice) as wide:
        await wide.expect_nothing(0.3)
        await sources.grant(sql, "q:r1", "alice")  # what the backend does, in SQL
        ev = await wide.next()  # the grant joins the task to alice's owner-wide stream
        assert ev.json()["task_id"] == "q:r1" and ev.json()["state"] == "running"
    await closed_everywhere(bob)
    r = await client.get(f"{server.url}/api/v1/tasks/q:r1", headers=_auth(alice))
    assert r.status_code == 200 and r.json()["owner_id"] == "alice"
    async with open_stream(client, server.stream_url("q:r1"), token=alice) as s:
        assert (await s.next()).json()["state"] == "running"
        await sql.execute("UPDATE app.jobs SET status = 'step 2' WHERE id = 'r1'")
        assert (await s.next()).json()["state"] == "step 2"
        await sources.revoke(sql, "q:r1")  # revoked: gone from the open stream
        ev = await s.next()
        assert ev.event == "error" and ev.json() == {"error": "Task not found"}
    await closed_everywhere(alice)
    # A grant may come first: the row appears later, already alice's.
    await sources.grant(sql, "q:later", "alice")
    await sql.execute("INSERT INTO app.jobs (id, status) VALUES ('later', 'finished')")
    r = await client.get(f"{server.url}/api/v1/tasks/q:later", headers=_auth(alice))
    assert r.status_code == 200 and r.json()["state"] == "success"
    with pytest.raises(asyncpg.InvalidParameterValueError, match="not a task of an attached"):
        await sources.grant(sql, "nosource:1", "alice")
