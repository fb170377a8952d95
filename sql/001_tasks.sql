-- taskstream core schema: the tasks table, its version/updated_at trigger and the NOTIFY trigger.
CREATE SCHEMA IF NOT EXISTS taskstream;

CREATE TABLE taskstream.tasks (
    id             text PRIMARY KEY CHECK (char_length(id) BETWEEN 1 AND 200),
    owner_id       text NOT NULL CHECK (char_length(owner_id) BETWEEN 1 AND 200),
    -- States are short identifiers; the bound keeps every NOTIFY payload far below 8000 bytes.
    state          text NOT NULL DEFAULT 'pending' CHECK (char_length(state) BETWEEN 1 AND 64),
    progress       double precision NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 100),
    estimated_time integer CHECK (estimated_time >= 0),
    error          text,
    version        bigint NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX tasks_owner_created_idx ON taskstream.tasks (owner_id, created_at DESC, id DESC);

-- Versions belong to the server, not the writer: a writer cannot move them backwards or skip them.
CREATE FUNCTION taskstream.tasks_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.version := 1;
        NEW.created_at := clock_timestamp();
        NEW.updated_at := NEW.created_at;
        RETURN NEW;
    END IF;
    NEW.id := OLD.id;
    NEW.created_at := OLD.created_at;
    IF (NEW.owner_id, NEW.state, NEW.progress, NEW.estimated_time, NEW.error)
       IS NOT DISTINCT FROM
       (OLD.owner_id, OLD.state, OLD.progress, OLD.estimated_time, OLD.error) THEN
        -- Nothing real changed: keep the row as it was, so no version and no notification.
        NEW.version := OLD.version;
        NEW.updated_at := OLD.updated_at;
    ELSE
        NEW.version := OLD.version + 1;
        -- clock_timestamp(), not now(): now() is the transaction start, which would make
        -- commit-to-receive latency look longer than it is in long transactions.
        NEW.updated_at := clock_timestamp();
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tasks_bump_version
    BEFORE INSERT OR UPDATE ON taskstream.tasks
    FOR EACH ROW EXECUTE FUNCTION taskstream.tasks_bump_version();

-- The payload carries the whole public state so that the broker never queries per notification.
-- The error text is cut (1000 characters at most, less if JSON escaping would need it) so the
-- payload stays far below NOTIFY's 8000-byte limit whatever the row holds.
CREATE FUNCTION taskstream.tasks_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
    cut integer := 1000;
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
            'ts', extract(epoch FROM clock_timestamp())
        )::text;
        EXIT WHEN octet_length(payload) <= 7000 OR cut = 0;
        cut := cut / 2;
    END LOOP;
    PERFORM pg_notify('taskstream', payload);
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_notify_insert
    AFTER INSERT ON taskstream.tasks
    FOR EACH ROW EXECUTE FUNCTION taskstream.tasks_notify();

CREATE TRIGGER tasks_notify_update
    AFTER UPDATE ON taskstream.tasks
    FOR EACH ROW WHEN (OLD.version IS DISTINCT FROM NEW.version)
    EXECUTE FUNCTION taskstream.tasks_notify();

CREATE TRIGGER tasks_notify_delete
    AFTER DELETE ON taskstream.tasks
    FOR EACH ROW EXECUTE FUNCTION taskstream.tasks_notify();
