-- When a task started, for the server-derived ETA (see server/events.py, derive_eta).
--
-- started_at / start_progress are the first observation of the task at work: the first committed
-- version whose state is no longer a waiting state ('pending', 'queued') or whose progress is
-- above 0. Time spent waiting in a queue therefore does not count as slow progress. If progress
-- later drops below start_progress (the worker restarted the task), the task is re-anchored there.
-- Both columns belong to the server: a writer's values are ignored, like version's.
ALTER TABLE taskstream.tasks
    ADD COLUMN started_at     timestamptz,
    ADD COLUMN start_progress double precision;

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
        RETURN NEW;
    END IF;
    NEW.id := OLD.id;
    NEW.created_at := OLD.created_at;
    NEW.started_at := OLD.started_at;
    NEW.start_progress := OLD.start_progress;
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
    END IF;
    RETURN NEW;
END;
$$;

-- The same payload as 001 plus the start anchor, so the broker still never queries per event.
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
            'ts', extract(epoch FROM clock_timestamp())
        )::text;
        EXIT WHEN octet_length(payload) <= 7000 OR cut = 0;
        cut := cut / 2;
    END LOOP;
    PERFORM pg_notify('taskstream', payload);
    RETURN NULL;
END;
$$;

-- Rows that existed before this migration keep a NULL anchor until their next change at work: their
-- true start is unknown, and the ETA starts from an observed point rather than an invented one.
