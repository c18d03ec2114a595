-- Whether an invalidated session's source row has been marked passive: NULL where there is
-- nothing to mark, FALSE while the source update is still owed (retried every sweep), TRUE once done.
ALTER TABLE sweeper_sessions ADD COLUMN IF NOT EXISTS source_marked BOOLEAN;
CREATE INDEX IF NOT EXISTS sweeper_sessions_unmarked_idx ON sweeper_sessions (session_token)
    WHERE source_marked = FALSE;
