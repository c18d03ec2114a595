-- The sweeper's own tables keep time as Unix milliseconds of the database's clock, as on every
-- other backend: one way to write and compare it. Existing values are converted in place.
DROP INDEX IF EXISTS sweeper_sessions_unmarked_idx;
ALTER TABLE sweeper_sessions
    ALTER COLUMN next_attempt_at TYPE BIGINT USING CAST(extract(epoch FROM next_attempt_at) * 1000 AS BIGINT),
    ALTER COLUMN lease_expires_at TYPE BIGINT USING CAST(extract(epoch FROM lease_expires_at) * 1000 AS BIGINT),
    ALTER COLUMN created_at TYPE BIGINT USING CAST(extract(epoch FROM created_at) * 1000 AS BIGINT),
    ALTER COLUMN updated_at TYPE BIGINT USING CAST(extract(epoch FROM updated_at) * 1000 AS BIGINT),
    ALTER COLUMN settled_at TYPE BIGINT USING CAST(extract(epoch FROM settled_at) * 1000 AS BIGINT),
    ALTER COLUMN source_marked TYPE SMALLINT USING CASE WHEN source_marked IS NULL THEN NULL WHEN source_marked THEN 1 ELSE 0 END,
    ADD COLUMN IF NOT EXISTS claim_id BIGINT;
CREATE INDEX IF NOT EXISTS sweeper_sessions_unmarked_idx ON sweeper_sessions (session_token)
    WHERE source_marked = 0;
ALTER TABLE sweeper_attempts
    ALTER COLUMN started_at TYPE BIGINT USING CAST(extract(epoch FROM started_at) * 1000 AS BIGINT),
    ALTER COLUMN finished_at TYPE BIGINT USING CAST(extract(epoch FROM finished_at) * 1000 AS BIGINT);
ALTER TABLE sweeper_workers
    ALTER COLUMN started_at TYPE BIGINT USING CAST(extract(epoch FROM started_at) * 1000 AS BIGINT),
    ALTER COLUMN heartbeat_at TYPE BIGINT USING CAST(extract(epoch FROM heartbeat_at) * 1000 AS BIGINT);
