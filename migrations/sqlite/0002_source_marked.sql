-- Whether an invalidated session's source row has been marked passive: NULL where there is
-- nothing to mark, 0 while the source update is still owed (retried every sweep), 1 once done.
ALTER TABLE sweeper_sessions ADD COLUMN source_marked INTEGER;
CREATE INDEX IF NOT EXISTS sweeper_sessions_unmarked_idx ON sweeper_sessions (session_token)
    WHERE source_marked = 0;
