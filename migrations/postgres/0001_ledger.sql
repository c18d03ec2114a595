-- The sweeper's own tables.

-- One row per session the sweeper has taken on.
CREATE TABLE IF NOT EXISTS sweeper_sessions (
    session_token      TEXT PRIMARY KEY,
    member_identifier  TEXT NOT NULL,
    state              TEXT NOT NULL CHECK (state IN
                         ('pending', 'invalidated', 'already_invalidated', 'skipped', 'failed')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    TIMESTAMPTZ,
    lease_owner        TEXT,
    lease_expires_at   TIMESTAMPTZ,
    last_error_code    TEXT,
    last_error_message TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL,
    settled_at         TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS sweeper_sessions_due_idx ON sweeper_sessions (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS sweeper_sessions_lease_idx ON sweeper_sessions (lease_owner)
    WHERE lease_owner IS NOT NULL;

-- Append-only: one row per HTTP call.
CREATE TABLE IF NOT EXISTS sweeper_attempts (
    id              BIGSERIAL PRIMARY KEY,
    session_token   TEXT NOT NULL,
    attempt         INTEGER NOT NULL,
    worker_id       TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    http_status     INTEGER,
    error_code      TEXT,
    error_message   TEXT,
    latency_ms      INTEGER NOT NULL,
    started_at      TIMESTAMPTZ NOT NULL,
    finished_at     TIMESTAMPTZ NOT NULL
);

CREATE INDEX IF NOT EXISTS sweeper_attempts_token_idx ON sweeper_attempts (session_token);

-- Live workers: heartbeats decide whose leases still count and how the rate budget is shared.
CREATE TABLE IF NOT EXISTS sweeper_workers (
    worker_id    TEXT PRIMARY KEY,
    hostname     TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL
);
