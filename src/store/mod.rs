//! The database: the user's source table (read; only its status column is ever written) and the
//! sweeper's own `sweeper_*` tables. One operation-named trait, one module per backend; the
//! sweep never sees `sqlx` types.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::config::{Backend, Config, SourceConfig};
use crate::iyzico::CallRecord;

/// Ledger states. `Pending` is the only non-terminal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// iyzico said success.
    Invalidated,
    /// iyzico said `260030`: already passive.
    AlreadyInvalidated,
    /// No longer eligible when its turn came (the user came back).
    Skipped,
    /// Waiting for its next attempt.
    Pending,
    /// A permanent error, or `max_attempts` used up.
    Failed,
}

impl Outcome {
    /// Every outcome, in report order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Invalidated,
        Outcome::AlreadyInvalidated,
        Outcome::Skipped,
        Outcome::Pending,
        Outcome::Failed,
    ];

    /// The contract's name, also the stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Invalidated => "invalidated",
            Outcome::AlreadyInvalidated => "already_invalidated",
            Outcome::Skipped => "skipped",
            Outcome::Pending => "pending",
            Outcome::Failed => "failed",
        }
    }

    /// Parses a stored value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether the source row is marked passive with this outcome.
    pub fn marks_passive(self) -> bool {
        matches!(self, Outcome::Invalidated | Outcome::AlreadyInvalidated)
    }
}

/// A session the sweep would invalidate now (for `dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct IdleSession {
    /// The session token.
    pub token: String,
    /// The member identifier.
    pub member: String,
    /// How long it has been idle.
    #[serde(serialize_with = "serialize_secs")]
    pub idle_for: Duration,
}

fn serialize_secs<S: serde::Serializer>(
    d: &Duration,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// A session this worker holds a lease on and must settle or release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The session token.
    pub token: String,
    /// The member identifier.
    pub member: String,
    /// Sweep-level attempts made before this one.
    pub attempts: u32,
}

/// Parameters of a claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimParams<'a> {
    /// This worker.
    pub worker: &'a str,
    /// The current time.
    pub now: DateTime<Utc>,
    /// Sessions whose last activity is before this are idle.
    pub idle_before: DateTime<Utc>,
    /// Workers whose heartbeat is before this are dead; their leases do not count.
    pub stale_before: DateTime<Utc>,
    /// When the new leases expire.
    pub lease_until: DateTime<Utc>,
    /// How many to claim at most.
    pub limit: u32,
}

/// What the check right before a call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recheck {
    /// Still active, idle, and ours: send it.
    Eligible,
    /// Active again or no longer active: settle as skipped, never send.
    NoLongerEligible,
    /// Our lease was taken over (we were thought dead): leave it alone.
    LeaseLost,
}

/// How the ledger row changes when an attempt ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Settle in a terminal or pending state.
    Settle {
        /// The new state.
        outcome: Outcome,
        /// Sweep-level attempts including this one.
        attempts: u32,
        /// When to try again (only for `Pending`).
        next_attempt_at: Option<DateTime<Utc>>,
        /// The last error code, if any.
        error_code: Option<String>,
        /// The last error message, if any.
        error_message: Option<String>,
    },
    /// Give the session back untouched (shutdown or an auth failure cut the attempt short).
    Release,
}

/// One finished attempt, written in a batch with others.
#[derive(Debug, Clone)]
pub struct Settlement {
    /// The session token.
    pub token: String,
    /// The sweep-level attempt number these calls belong to.
    pub attempt: u32,
    /// Every HTTP call made.
    pub calls: Vec<CallRecord>,
    /// What happens to the ledger row.
    pub decision: Decision,
}

/// Which failed sessions to put back in the queue.
#[derive(Debug, Clone, Default)]
pub struct RequeueFilter {
    /// Only those whose last error code is this.
    pub error_code: Option<String>,
}

/// A pending session in the report.
#[derive(Debug, Clone, Serialize)]
pub struct PendingSummary {
    /// Sessions pending.
    pub count: u64,
    /// The earliest next attempt.
    pub next_due: Option<DateTime<Utc>>,
    /// How many are due now.
    pub due_now: u64,
}

/// A failed session in the report.
#[derive(Debug, Clone, Serialize)]
pub struct FailureRow {
    /// A fingerprint of the token (never the token itself).
    pub session: String,
    /// iyzico's error code.
    pub error_code: Option<String>,
    /// iyzico's message.
    pub error_message: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// When it failed.
    pub failed_at: Option<DateTime<Utc>>,
}

/// What `report` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Counts per outcome, every outcome present.
    pub counts: Vec<(Outcome, u64)>,
    /// Pending sessions and when they are due.
    pub pending: PendingSummary,
    /// Sessions leased right now.
    pub leased: u64,
    /// The most recent failures.
    pub recent_failures: Vec<FailureRow>,
}

/// A finding of `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Fine.
    Ok(String),
    /// Works, but should be fixed (e.g. a missing index, with the statement to create it).
    Warning(String),
    /// Cannot work.
    Error(String),
}

impl Finding {
    /// Whether this finding means the sweeper cannot work.
    pub fn is_error(&self) -> bool {
        matches!(self, Finding::Error(_))
    }
}

/// A worker's identity, as the heartbeat table records it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// Unique per process start.
    pub id: String,
    /// The host it runs on.
    pub hostname: String,
    /// Its process id.
    pub pid: u32,
}

/// A worker row whose liveness can be checked on this host.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    /// Its id.
    pub id: String,
    /// Its process id.
    pub pid: u32,
}

/// A database error, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database error while {op}: {source}")]
    Database {
        /// What we were doing.
        op: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The schema is not what we need.
    #[error("{0}")]
    Schema(String),
}

/// Shorthand for a store result.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Attaches the operation's name to a driver error.
pub(crate) trait Op<T> {
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> Op<T> for std::result::Result<T, sqlx::Error> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| StoreError::Database { op, source })
    }
}

/// Every database operation the sweeper needs, named after what it does.
#[async_trait]
pub trait Store: Send + Sync {
    /// Creates or upgrades the sweeper's own tables; idempotent.
    async fn migrate(&self) -> Result<()>;
    /// Migrations not yet applied (empty when current).
    async fn pending_migrations(&self) -> Result<Vec<String>>;
    /// Checks the source table, its columns and indexes, and the own tables.
    async fn check(&self) -> Result<Vec<Finding>>;
    /// Up to `limit` sessions eligible now, oldest first, without claiming them.
    async fn eligible(&self, p: ClaimParams<'_>) -> Result<Vec<IdleSession>>;
    /// How many sessions are eligible now.
    async fn count_eligible(&self, p: ClaimParams<'_>) -> Result<u64>;
    /// Claims up to `limit` eligible sessions with a lease owned by `worker`.
    async fn claim(&self, p: ClaimParams<'_>) -> Result<Vec<Lease>>;
    /// The database's plan for the claim statement (EXPLAIN; nothing is executed).
    async fn explain_claim(&self, p: ClaimParams<'_>) -> Result<String>;
    /// Settles as `skipped` the due pending sessions whose source row is no longer eligible.
    async fn skip_revived(&self, p: ClaimParams<'_>) -> Result<u64>;
    /// Checks, right before its call, that a leased session is still eligible and ours.
    async fn recheck(
        &self,
        worker: &str,
        token: &str,
        idle_before: DateTime<Utc>,
    ) -> Result<Recheck>;
    /// Writes a batch of settlements in one transaction: attempt log, ledger, source status.
    /// Returns how many ledger rows changed (those whose lease we still held).
    async fn record(&self, worker: &str, now: DateTime<Utc>, batch: &[Settlement]) -> Result<u64>;
    /// Releases every lease `worker` holds.
    async fn release_all(&self, worker: &str) -> Result<u64>;
    /// Extends every lease `worker` holds to `until` (called with each heartbeat, so a live
    /// worker's leases never lapse however long its queue).
    async fn renew_leases(&self, worker: &str, until: DateTime<Utc>) -> Result<u64>;
    /// Records that `worker` is alive.
    async fn heartbeat(&self, worker: &WorkerInfo, now: DateTime<Utc>) -> Result<()>;
    /// How many workers are alive (heartbeat after `stale_before`).
    async fn live_workers(&self, stale_before: DateTime<Utc>) -> Result<u32>;
    /// Workers registered from `hostname`.
    async fn workers_on_host(&self, hostname: &str) -> Result<Vec<WorkerRow>>;
    /// Removes a worker: its leases stop counting at once.
    async fn forget_worker(&self, worker: &str) -> Result<()>;
    /// Counts per outcome, pending schedule, recent failures.
    async fn report(&self, now: DateTime<Utc>, failures: u32) -> Result<Report>;
    /// Puts failed sessions back in the queue; returns how many.
    async fn requeue(&self, filter: &RequeueFilter, now: DateTime<Utc>) -> Result<u64>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<()>;
    /// Closes the pool, waiting for connections to be returned.
    async fn close(&self);
}

/// Opens the configured backend (connecting lazily checks nothing; call `ping` or `check`).
pub async fn open(config: &Config) -> Result<Arc<dyn Store>> {
    let (db, source) = (&config.database, &config.source);
    let url = db.url.expose_secret();
    Ok(match db.backend {
        Backend::Sqlite => Arc::new(
            sqlite::SqliteStore::connect(url, db.max_connections.get(), source.clone()).await?,
        ),
        Backend::Postgres => Arc::new(
            postgres::PgStore::connect(url, db.max_connections.get(), source.clone()).await?,
        ),
    })
}

/// One embedded migration.
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The SQL condition under which a ledger row `l` keeps its session from being claimed:
/// settled for good, waiting for its next attempt, or leased by a live worker.
/// `now` and `stale` are the placeholders of the current time and the staleness cutoff.
pub(crate) fn ledger_blocks(now: &str, stale: &str) -> String {
    // COALESCE: a NULL (no next attempt, no lease) must read as "does not block", also under NOT.
    format!(
        "COALESCE(l.state IN ('invalidated', 'already_invalidated', 'failed') \
          OR (l.state = 'pending' AND l.next_attempt_at > {now}) \
          OR (l.lease_owner IS NOT NULL AND l.lease_expires_at > {now} \
              AND EXISTS (SELECT 1 FROM sweeper_workers w \
                          WHERE w.worker_id = l.lease_owner AND w.heartbeat_at > {stale})), FALSE)"
    )
}

/// A `CREATE INDEX` statement serving the eligibility query, for `check`'s warning.
pub(crate) fn suggested_index(source: &SourceConfig, concurrently: bool) -> String {
    format!(
        "CREATE INDEX {}{}_sweeper_idx ON {} ({}, {});",
        if concurrently { "CONCURRENTLY " } else { "" },
        source.table.name(),
        source.table.quoted(),
        source.status_column.quoted(),
        source.last_activity_column.quoted(),
    )
}

/// Findings about the source table from its column names (none: the table does not exist).
pub(crate) fn column_findings(src: &SourceConfig, columns: &[String]) -> Vec<Finding> {
    if columns.is_empty() {
        return vec![Finding::Error(format!(
            "source.table: table {} does not exist",
            src.table
        ))];
    }
    let mut findings = vec![Finding::Ok(format!("source table {} exists", src.table))];
    for (key, col) in column_keys(src) {
        findings.push(if columns.iter().any(|c| c == col.name()) {
            Finding::Ok(format!("column {col} exists"))
        } else {
            Finding::Error(format!(
                "{key}: column {col} does not exist in {}",
                src.table
            ))
        });
    }
    findings
}

/// The config keys of the source columns, for messages that name the key.
fn column_keys(src: &SourceConfig) -> [(&'static str, &crate::config::SqlIdent); 4] {
    [
        ("source.token_column", &src.token_column),
        ("source.member_column", &src.member_column),
        ("source.status_column", &src.status_column),
        ("source.last_activity_column", &src.last_activity_column),
    ]
}

/// Index advice from the source table's index column lists.
pub(crate) fn index_findings(
    src: &SourceConfig,
    indexes: &[Vec<String>],
    postgres: bool,
) -> Vec<Finding> {
    let starts_with = |cols: &[&str]| {
        indexes.iter().any(|ix| {
            ix.iter()
                .map(String::as_str)
                .take(cols.len())
                .eq(cols.iter().copied())
        })
    };
    let mut out = Vec::new();
    if starts_with(&[src.status_column.name(), src.last_activity_column.name()]) {
        out.push(Finding::Ok(format!(
            "an index on ({}, {}) serves the eligibility query",
            src.status_column, src.last_activity_column
        )));
    } else {
        out.push(Finding::Warning(format!(
            "no index on ({}, {}): every sweep scans the table. Create one: {}",
            src.status_column,
            src.last_activity_column,
            suggested_index(src, postgres)
        )));
    }
    if starts_with(&[src.token_column.name()]) {
        out.push(Finding::Ok(format!(
            "an index on {} serves status updates",
            src.token_column
        )));
    } else {
        out.push(Finding::Warning(format!(
            "no index on {}: each status update scans the table. Create one: CREATE UNIQUE INDEX {}{}_token_idx ON {} ({});",
            src.token_column,
            if postgres { "CONCURRENTLY " } else { "" },
            src.table.name(),
            src.table.quoted(),
            src.token_column.quoted()
        )));
    }
    out
}

/// The finding for the own tables' migrations.
pub(crate) fn migration_finding(pending: Vec<String>) -> Finding {
    if pending.is_empty() {
        Finding::Ok("the sweeper's own tables are migrated".into())
    } else {
        Finding::Error(format!(
            "the sweeper's own tables need migrations {}: run `session-sweeper migrate`",
            pending.join(", ")
        ))
    }
}

/// Counts per outcome with every outcome present.
pub(crate) fn count_rows(rows: impl Iterator<Item = (String, i64)>) -> Vec<(Outcome, u64)> {
    let mut counts: Vec<(Outcome, u64)> = Outcome::ALL.iter().map(|o| (*o, 0)).collect();
    for (state, n) in rows {
        if let Some(o) = Outcome::parse(&state)
            && let Some(slot) = counts.iter_mut().find(|(k, _)| *k == o)
        {
            slot.1 = n as u64;
        }
    }
    counts
}
