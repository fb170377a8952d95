-- Attached sources: existing tables whose rows are streamed as tasks (server/sources.py,
-- server/source_sql.py). `taskstream attach` adds one row to taskstream.sources and generates, per
-- source, a view over the user's table and one trigger function (both in this schema) plus the
-- triggers on the user's table; `taskstream detach` removes them. Nothing here touches a user
-- table: what resume needs per row (the version, the ETA anchor) lives in source_rows, keyed by
-- source and the row's id, never in a column added to the user's table.
CREATE TABLE taskstream.sources (
    -- Also the prefix of the source's task ids: "<name>:<row id>".
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,31}$'),
    table_oid   oid NOT NULL,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    -- The mapping as given (expressions, scale, state lists), for `taskstream sources`.
    mapping     jsonb NOT NULL,
    -- Every object attach created, so detach drops exactly those.
    objects     jsonb NOT NULL,
    attached_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The last published state of each attached row: change detection (an UPDATE that changes no
-- mapped value publishes nothing, as on taskstream.tasks), the version, and the ETA anchor.
CREATE TABLE taskstream.source_rows (
    source         text NOT NULL REFERENCES taskstream.sources (name) ON DELETE CASCADE,
    key            text NOT NULL,
    owner_id       text NOT NULL,
    state          text NOT NULL,
    progress       double precision NOT NULL,
    estimated_time integer,
    error          text,
    version        bigint NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    started_at     timestamptz,
    start_progress double precision,
    owner_since    timestamptz,
    PRIMARY KEY (source, key)
-- Every update rewrites a row without touching its key: room on the page keeps it a HOT update.
) WITH (fillfactor = 70);

-- Ownership of tasks whose rows do not name their owner (a task queue's result table): the
-- application's backend grants each task id to one user with taskstream.grant_task(), in its own
-- transaction. A granted task is that user's task everywhere (streams, owner-wide streams, REST,
-- long poll) through the one owner comparison those paths already make; an ungranted one is no
-- one's. A grant may come before the row exists (Celery writes its row when the task starts).
CREATE TABLE taskstream.source_grants (
    source     text NOT NULL REFERENCES taskstream.sources (name) ON DELETE CASCADE,
    key        text NOT NULL,
    owner_id   text NOT NULL CHECK (char_length(owner_id) BETWEEN 1 AND 200),
    granted_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (source, key)
);
CREATE INDEX source_grants_owner_idx ON taskstream.source_grants (owner_id, source);

-- The NOTIFY payload of an attached row: the same keys as taskstream.tasks_notify (sql/004), so
-- the listener, the registry and the encoder cannot tell the two apart.
CREATE FUNCTION taskstream.source_payload(task_id text, r taskstream.source_rows) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    payload text;
    cut integer := 1000;
BEGIN
    LOOP
        payload := json_build_object(
            'id', task_id,
            'owner_id', r.owner_id,
            'state', r.state,
            'progress', r.progress,
            'estimated_time', r.estimated_time,
            'error', left(r.error, cut),
            'error_truncated', r.error IS NOT NULL AND char_length(r.error) > cut,
            'version', r.version,
            'created_at', r.created_at,
            'updated_at', r.updated_at,
            'started_at', r.started_at,
            'start_progress', r.start_progress,
            'owner_since', r.owner_since,
            'ts', extract(epoch FROM clock_timestamp())
        )::text;
        EXIT WHEN octet_length(payload) <= 7000 OR cut = 0;
        cut := cut / 2;
    END LOOP;
    RETURN payload;
END;
$$;

-- Record a row's mapped state; return the new source_rows row, or NULL when nothing mapped
-- changed. The rules are taskstream.tasks_bump_version's (sql/004): versions only go up, the
-- ETA anchor is the first observation at work, owner_since is set when the owner changes. A row
-- that existed before attach and was never seen is version 1 in the source's view, so its first
-- change is version 2.
CREATE FUNCTION taskstream.source_publish(
    p_source text, p_key text, p_owner text, p_state text, p_progress double precision,
    p_eta integer, p_error text, p_new_row boolean
) RETURNS taskstream.source_rows
LANGUAGE plpgsql AS $$
DECLARE
    now_ts timestamptz := clock_timestamp();
    at_work boolean := p_state NOT IN ('pending', 'queued') OR p_progress > 0;
    r taskstream.source_rows;
BEGIN
    INSERT INTO taskstream.source_rows AS s
        (source, key, owner_id, state, progress, estimated_time, error, version,
         created_at, updated_at, started_at, start_progress, owner_since)
    VALUES (p_source, p_key, p_owner, p_state, p_progress, p_eta, p_error,
            CASE WHEN p_new_row THEN 1 ELSE 2 END, now_ts, now_ts,
            CASE WHEN at_work THEN now_ts END, CASE WHEN at_work THEN p_progress END, NULL)
    ON CONFLICT (source, key) DO UPDATE SET
        owner_id = EXCLUDED.owner_id,
        state = EXCLUDED.state,
        progress = EXCLUDED.progress,
        estimated_time = EXCLUDED.estimated_time,
        error = EXCLUDED.error,
        version = s.version + 1,
        updated_at = now_ts,
        started_at = CASE WHEN at_work AND (s.started_at IS NULL OR p_progress < s.start_progress)
                          THEN now_ts ELSE s.started_at END,
        start_progress = CASE WHEN at_work AND (s.started_at IS NULL
                                                OR p_progress < s.start_progress)
                              THEN p_progress ELSE s.start_progress END,
        owner_since = CASE WHEN EXCLUDED.owner_id IS DISTINCT FROM s.owner_id
                           THEN now_ts ELSE s.owner_since END
    WHERE (s.owner_id, s.state, s.progress, s.estimated_time, s.error)
          IS DISTINCT FROM
          (EXCLUDED.owner_id, EXCLUDED.state, EXCLUDED.progress, EXCLUDED.estimated_time,
           EXCLUDED.error)
    RETURNING s.* INTO r;
    RETURN r;
END;
$$;

-- A row left its source (deleted, or its grant revoked): tell its watchers, as a deletion from
-- taskstream.tasks does.
CREATE FUNCTION taskstream.source_forget(p_source text, p_key text, p_owner text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    DELETE FROM taskstream.source_rows WHERE source = p_source AND key = p_key
    RETURNING version INTO v;
    PERFORM pg_notify('taskstream', json_build_object(
        'id', p_source || ':' || p_key, 'owner_id', coalesce(p_owner, ''),
        'version', coalesce(v, 1) + 1, 'deleted', true)::text);
END;
$$;

-- Re-read one row through its source's view and publish it: what a grant or a revocation does.
CREATE FUNCTION taskstream.source_touch(p_source text, p_key text, p_old_owner text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v record;
    n bigint;
    r taskstream.source_rows;
BEGIN
    EXECUTE format('SELECT owner_id, state, progress, estimated_time, error FROM taskstream.%I'
                   ' WHERE source_key = $1', 'source_' || p_source)
       INTO v USING p_key;
    GET DIAGNOSTICS n = ROW_COUNT;  -- EXECUTE does not set FOUND
    IF n = 0 OR v.owner_id = '' THEN
        PERFORM taskstream.source_forget(p_source, p_key, p_old_owner);
        RETURN;
    END IF;
    r := taskstream.source_publish(p_source, p_key, v.owner_id, v.state, v.progress,
                                   v.estimated_time, v.error, false);
    IF r.version IS NOT NULL THEN
        PERFORM pg_notify('taskstream', taskstream.source_payload(p_source || ':' || p_key, r));
    END IF;
END;
$$;

-- Give an attached task ("<source>:<row id>") to a user. Call it from the application's backend,
-- ideally in the transaction that enqueues the task. Re-granting moves the task to the new owner.
CREATE FUNCTION taskstream.grant_task(p_task_id text, p_owner_id text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    src text := split_part(p_task_id, ':', 1);
    k text := substr(p_task_id, char_length(split_part(p_task_id, ':', 1)) + 2);
    old_owner text;
BEGIN
    IF position(':' IN p_task_id) = 0 OR k = '' OR NOT EXISTS (
        SELECT 1 FROM taskstream.sources WHERE name = src AND mapping->>'owner' IS NULL
    ) THEN
        RAISE EXCEPTION 'taskstream: % is not a task of an attached source without an owner column',
            p_task_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT owner_id INTO old_owner FROM taskstream.source_grants WHERE source = src AND key = k;
    INSERT INTO taskstream.source_grants (source, key, owner_id) VALUES (src, k, p_owner_id)
    ON CONFLICT (source, key) DO UPDATE SET owner_id = EXCLUDED.owner_id,
                                            granted_at = clock_timestamp();
    PERFORM taskstream.source_touch(src, k, old_owner);
END;
$$;

CREATE FUNCTION taskstream.revoke_task(p_task_id text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    src text := split_part(p_task_id, ':', 1);
    k text := substr(p_task_id, char_length(split_part(p_task_id, ':', 1)) + 2);
    old_owner text;
BEGIN
    DELETE FROM taskstream.source_grants WHERE source = src AND key = k
    RETURNING owner_id INTO old_owner;
    IF FOUND THEN
        PERFORM taskstream.source_touch(src, k, old_owner);
    END IF;
END;
$$;

-- Every task, native and attached, for the reads by owner (lists, owner-wide streams). attach and
-- detach regenerate it, and tasks_by_ids, with one branch per source (server/source_sql.py).
-- Until then it is taskstream.tasks with all its columns.
CREATE VIEW taskstream.all_tasks AS SELECT * FROM taskstream.tasks;

-- The reads by id (snapshots, resync, GET): each source's branch looks its rows up by the row id,
-- so an index on the user's id column serves it.
CREATE FUNCTION taskstream.tasks_by_ids(ids text[]) RETURNS SETOF taskstream.all_tasks
LANGUAGE sql STABLE AS $$
    SELECT * FROM taskstream.all_tasks WHERE id = ANY(ids)
$$;
