-- Groups (a batch or parent id per task) and metadata (a small JSON object per task).
--
-- Groups: a task joins a group at creation (group_id is immutable afterwards, like id). The first
-- task of a group creates its row in taskstream.groups, owned by that task's owner; later tasks
-- must have the same owner and the group must not be closed. Each task gets the group's next
-- sequence number (group_seq, from 1): a group stream's resume id lists one version per sequence
-- number. Taking the number locks the group's row until commit, so inserts into one group
-- serialise (inserts into different groups do not). A group is closed by its owner
-- (POST /api/v1/groups/{id}/close, or UPDATE ... SET closed_at); closing notifies, and a group
-- stream ends once its group is closed and every task in it is terminal.
--
-- Metadata: a JSON object, at most 4096 bytes in jsonb's text form (the API's own cap is 2048
-- bytes of compact JSON, server/tasks.py MAX_METADATA; jsonb's text adds spaces, hence twice as
-- much here). A notification carries it when the whole payload stays within the 7000-byte
-- budget; otherwise the payload omits it and says "fetch": true, and the server reads that row.
CREATE TABLE taskstream.groups (
    id         text PRIMARY KEY CHECK (char_length(id) BETWEEN 1 AND 200),
    owner_id   text NOT NULL CHECK (char_length(owner_id) BETWEEN 1 AND 200),
    -- The last sequence number handed out (a task whose insert was skipped leaves a gap).
    last_seq   integer NOT NULL DEFAULT 0 CHECK (last_seq BETWEEN 0 AND 1000),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    closed_at  timestamptz
);

ALTER TABLE taskstream.tasks
    ADD COLUMN group_id  text CHECK (char_length(group_id) BETWEEN 1 AND 200),
    ADD COLUMN group_seq integer,
    ADD COLUMN metadata  jsonb CONSTRAINT tasks_metadata_object CHECK (
        metadata IS NULL
        OR (jsonb_typeof(metadata) = 'object' AND octet_length(metadata::text) <= 4096)
    );

CREATE INDEX tasks_group_idx ON taskstream.tasks (group_id, group_seq) WHERE group_id IS NOT NULL;

CREATE OR REPLACE FUNCTION taskstream.tasks_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    at_work boolean := NEW.state NOT IN ('pending', 'queued') OR NEW.progress > 0;
    seq integer;
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.version := 1;
        NEW.created_at := clock_timestamp();
        NEW.updated_at := NEW.created_at;
        NEW.started_at := CASE WHEN at_work THEN NEW.created_at END;
        NEW.start_progress := CASE WHEN at_work THEN NEW.progress END;
        NEW.owner_since := NULL;
        NEW.group_seq := NULL;
        IF NEW.group_id IS NOT NULL THEN
            INSERT INTO taskstream.groups AS g (id, owner_id, last_seq)
                VALUES (NEW.group_id, NEW.owner_id, 1)
                ON CONFLICT (id) DO UPDATE SET last_seq = g.last_seq + 1
                WHERE g.owner_id = EXCLUDED.owner_id AND g.closed_at IS NULL
                  AND g.last_seq < 1000
                RETURNING last_seq INTO seq;
            IF seq IS NULL THEN
                RAISE EXCEPTION 'group % is closed, full (1000 tasks) or another owner''s',
                    NEW.group_id
                    USING ERRCODE = 'check_violation', CONSTRAINT = 'tasks_group_open';
            END IF;
            NEW.group_seq := seq;
        END IF;
        RETURN NEW;
    END IF;
    NEW.id := OLD.id;
    NEW.created_at := OLD.created_at;
    NEW.started_at := OLD.started_at;
    NEW.start_progress := OLD.start_progress;
    NEW.owner_since := OLD.owner_since;
    NEW.group_id := OLD.group_id;
    NEW.group_seq := OLD.group_seq;
    IF (NEW.owner_id, NEW.state, NEW.progress, NEW.estimated_time, NEW.error, NEW.metadata)
       IS NOT DISTINCT FROM
       (OLD.owner_id, OLD.state, OLD.progress, OLD.estimated_time, OLD.error, OLD.metadata) THEN
        -- Nothing real changed: keep the row as it was, so no version and no notification.
        NEW.version := OLD.version;
        NEW.updated_at := OLD.updated_at;
    ELSE
        NEW.version := OLD.version + 1;
        -- clock_timestamp(), not now(): now() is the transaction start, which would make
        -- commit-to-receive latency look longer than it is in long transactions.
        NEW.updated_at := clock_timestamp();
        IF at_work AND (OLD.started_at IS NULL OR NEW.progress < OLD.start_progress) THEN
            NEW.started_at := NEW.updated_at;
            NEW.start_progress := NEW.progress;
        END IF;
        IF NEW.owner_id IS DISTINCT FROM OLD.owner_id THEN
            NEW.owner_since := NEW.updated_at;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

-- The same payload as 004 plus group_id, group_seq and metadata. The metadata goes in only if
-- the whole payload stays within the budget; otherwise "fetch": true tells the server to read
-- this row (and only this one) instead.
CREATE OR REPLACE FUNCTION taskstream.tasks_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    cut integer := 1000;
    with_metadata text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        payload := json_build_object('id', OLD.id, 'owner_id', OLD.owner_id,
                                     'version', OLD.version, 'deleted', true)::text;
        PERFORM pg_notify('taskstream', payload);
        RETURN OLD;
    END IF;
    LOOP
        payload := json_build_object(
            'id', NEW.id,
            'owner_id', NEW.owner_id,
            'state', NEW.state,
            'progress', NEW.progress,
            'estimated_time', NEW.estimated_time,
            'error', left(NEW.error, cut),
            'error_truncated', NEW.error IS NOT NULL AND char_length(NEW.error) > cut,
            'version', NEW.version,
            'created_at', NEW.created_at,
            'updated_at', NEW.updated_at,
            'started_at', NEW.started_at,
            'start_progress', NEW.start_progress,
            'owner_since', NEW.owner_since,
            'group_id', NEW.group_id,
            'group_seq', NEW.group_seq,
            'ts', extract(epoch FROM clock_timestamp())
        )::text;
        EXIT WHEN octet_length(payload) <= 7000 OR cut = 0;
        cut := cut / 2;
    END LOOP;
    IF NEW.metadata IS NOT NULL THEN
        -- The payload is one JSON object: put the metadata in before its closing brace.
        with_metadata := left(payload, -1) || ', "metadata" : ' || NEW.metadata::text || '}';
        IF octet_length(with_metadata) <= 7000 THEN
            payload := with_metadata;
        ELSE
            payload := left(payload, -1) || ', "fetch" : true}';
        END IF;
    END IF;
    PERFORM pg_notify('taskstream', payload);
    RETURN NULL;
END;
$$;

-- Closing a group tells every server process, so its group streams can end.
CREATE FUNCTION taskstream.groups_notify_closed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('taskstream', json_build_object(
        'group_closed', NEW.id, 'owner_id', NEW.owner_id)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER groups_notify_closed
    AFTER UPDATE ON taskstream.groups
    FOR EACH ROW WHEN (OLD.closed_at IS NULL AND NEW.closed_at IS NOT NULL)
    EXECUTE FUNCTION taskstream.groups_notify_closed();
