-- The sweeper's own tables (InnoDB, utf8mb4). Tokens are kept as bytes (VARBINARY): collations
-- fold case and ignore trailing spaces, and two sessions must never share a ledger row.
-- Worker ids compare exactly (utf8mb4_bin).
-- Time is Unix milliseconds of the database's clock.

-- One row per session the sweeper has taken on.
CREATE TABLE IF NOT EXISTS sweeper_sessions (
    session_token      VARBINARY(1020) NOT NULL PRIMARY KEY,
    member_identifier  VARCHAR(255) NOT NULL,
    state              VARCHAR(32) NOT NULL,
    attempts           INT NOT NULL DEFAULT 0,
    next_attempt_at    BIGINT NULL,
    lease_owner        VARCHAR(255) COLLATE utf8mb4_bin NULL,
    lease_expires_at   BIGINT NULL,
    last_error_code    VARCHAR(64) NULL,
    last_error_message TEXT NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    settled_at         BIGINT NULL,
    source_marked      SMALLINT NULL,
    claim_id           BIGINT NULL,
    CONSTRAINT sweeper_sessions_state CHECK (state IN
        ('pending', 'invalidated', 'already_invalidated', 'skipped', 'failed')),
    INDEX sweeper_sessions_due_idx (state, next_attempt_at),
    INDEX sweeper_sessions_lease_idx (lease_owner),
    INDEX sweeper_sessions_unmarked_idx (source_marked),
    INDEX sweeper_sessions_claim_idx (claim_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Append-only: one row per HTTP call.
CREATE TABLE IF NOT EXISTS sweeper_attempts (
    id              BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    session_token   VARBINARY(1020) NOT NULL,
    attempt         INT NOT NULL,
    worker_id       VARCHAR(255) COLLATE utf8mb4_bin NOT NULL,
    conversation_id VARCHAR(64) NOT NULL,
    outcome         VARCHAR(32) NOT NULL,
    http_status     INT NULL,
    error_code      VARCHAR(64) NULL,
    error_message   TEXT NULL,
    latency_ms      INT NOT NULL,
    started_at      BIGINT NOT NULL,
    finished_at     BIGINT NOT NULL,
    INDEX sweeper_attempts_token_idx (session_token)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Live workers: heartbeats decide whose leases still count and how the rate budget is shared.
CREATE TABLE IF NOT EXISTS sweeper_workers (
    worker_id    VARCHAR(255) COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    hostname     VARCHAR(255) NOT NULL,
    pid          INT NOT NULL,
    version      VARCHAR(64) NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
