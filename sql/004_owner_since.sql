-- When a task passed to its current owner, so that a task given to another owner joins that
-- owner's owner-wide streams exactly as a task created for them does (server/broker.py,
-- is_new_for_owner_stream), whether the broker hears of it by NOTIFY or reads it after an outage.
--
-- owner_since is NULL while the task is still with the owner it was created for (it has been
-- theirs since created_at); every change of owner_id sets it to that version's updated_at. Like
-- version, it belongs to the server: a writer's value is ignored. The payload already names the
-- owner (since 001); it now also carries owner_since.
ALTER TABLE taskstream.tasks ADD COLUMN owner_since timestamptz;

-- The broker's resync finds the tasks that joined an owner after a stream's snapshot with
-- created_at (tasks_owner_created_idx) or owner_since (this index, only rows that changed owner).
CREATE INDEX tasks_owner_since_idx ON taskstream.tasks (owner_id, owner_since)
    WHERE owner_since IS NOT NULL;

CREATE OR REPLACE FUNCTION taskstream.tasks_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    at_work boolean := NEW.state NOT IN ('pending', 'queued') OR NEW.progress > 0;
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.version := 1;
        NEW.created_at := clock_timestamp();
        NEW.updated_at := NEW.created_at;
        NEW.started_at := CASE WHEN at_work THEN NEW.created_at END;
        NEW.start_progress := CASE WHEN at_work THEN NEW.progress END;
        NEW.owner_since := NULL;
        RETURN NEW;
    END IF;
    NEW.id := OLD.id;
    NEW.created_at := OLD.created_at;
    NEW.started_at := OLD.started_at;
    NEW.start_progress := OLD.start_progress;
    NEW.owner_since := OLD.owner_since;
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

-- The same payload as 002 plus owner_since.
CREATE OR REPLACE FUNCTION taskstream.tasks_notify() RETURNS trigger
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
            'started_at', NEW.started_at,
            'start_progress', NEW.start_progress,
            'owner_since', NEW.owner_since,
            'ts', extract(epoch FROM clock_timestamp())
        )::text;
        EXIT WHEN octet_length(payload) <= 7000 OR cut = 0;
        cut := cut / 2;
    END LOOP;
    PERFORM pg_notify('taskstream', payload);
    RETURN NULL;
END;
$$;
