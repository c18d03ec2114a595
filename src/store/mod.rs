//! The database: the user's source table (read; only its status column is ever written) and the
//! sweeper's own `sweeper_*` tables. One operation-named trait, one module per backend; the
//! sweep never sees `sqlx` types.

mod core;
mod dialect;
mod hot;
mod lane;
mod mysql;
mod postgres;
mod sqlite;

pub use self::core::{ACQUIRE_TIMEOUT, SqlStore};
pub use self::dialect::Dialect;
pub use self::postgres::MIGRATION_LOCK;
pub use self::sqlite::BUSY_TIMEOUT;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;

// `core` reads the URL normalisation as `super::mysql_url`; config owns it, as it parses the
// URL at start-up too.
use crate::config::mysql_url;
use crate::config::{Backend, Config, SourceConfig};
use crate::iyzico::CallRecord;

/// Ledger states. `Pending` is the only non-terminal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Parameters of a claim. Every lease and liveness decision is made by the database's clock
/// (PostgreSQL's `now()`, the single host's clock for SQLite), so replicas whose clocks disagree
/// still agree on who holds what; only durations travel from here.
#[derive(Debug, Clone, Copy)]
pub struct ClaimParams<'a> {
    /// This worker.
    pub worker: &'a str,
    /// Sessions whose last activity is before this instant (database time) are idle.
    pub idle_before: DateTime<Utc>,
    /// A worker whose heartbeat is older than this, by the database's clock, is dead.
    pub stale_after: Duration,
    /// How long new leases last, by the database's clock.
    pub lease: Duration,
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
        /// How long until the next attempt (only for `Pending`), counted by the database's clock.
        retry_in: Option<Duration>,
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
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
pub struct Report {
    /// Counts per outcome, every outcome present.
    pub counts: Vec<(Outcome, u64)>,
    /// Pending sessions and when they are due.
    pub pending: PendingSummary,
    /// Sessions leased right now.
    pub leased: u64,
    /// The most recent failures.
    pub recent_failures: Vec<FailureRow>,
    /// Invalidated at iyzico, but the source row is not marked passive yet (retried each sweep).
    pub source_not_marked: u64,
    /// Active source rows the sweep cannot use, by reason.
    pub unusable: UnusableRows,
}

/// A read-only transaction on a connection of its own, seeing the database as it was when
/// [`Store::snapshot`] began it; rolled back when dropped.
pub struct Snapshot {
    tx: sqlx::Transaction<'static, sqlx::Any>,
}

/// Active source rows that are never sent, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UnusableRows {
    /// The last-activity value is missing, no time from 2000 on, or does not fit
    /// `source.last_activity_format`.
    pub unreadable_last_activity: u64,
    /// The token or member is NULL, empty or not text (on SQLite also: has a NUL inside).
    pub bad_source_row: u64,
}

/// The counts as `(reason, rows)` pairs, the reasons named as the
/// `sweeper_source_rows_unusable` metric labels them.
impl IntoIterator for UnusableRows {
    type Item = (&'static str, u64);
    type IntoIter = std::array::IntoIter<(&'static str, u64), 2>;

    fn into_iter(self) -> Self::IntoIter {
        [
            ("unreadable_last_activity", self.unreadable_last_activity),
            (BAD_SOURCE_ROW, self.bad_source_row),
        ]
        .into_iter()
    }
}

/// How many attempt-log rows the status page's chart reads at most (newest first, by primary
/// key): the bound on its cost however busy the last day was.
pub const STATUS_CALL_ROWS: i64 = 100_000;
/// How many worker rows the status page lists at most (newest heartbeat first).
pub const STATUS_WORKERS: i64 = 100;
/// How many error codes the status page groups failures into at most (most frequent first).
pub const STATUS_FAILURE_CODES: i64 = 20;

/// Attempt-log calls that finished in one minute with one result class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MinuteCount {
    /// The start of the minute.
    pub minute: DateTime<Utc>,
    /// The call's class: `invalidated`, `already_invalidated`, `retryable`, `permanent`, ...
    pub class: String,
    /// Calls.
    pub count: u64,
}

/// A row of `sweeper_workers`, with the leases it holds.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    /// Its id (`host:pid:nonce`).
    pub id: String,
    /// The host as recorded (`host#boot#pid-namespace`).
    pub hostname: String,
    /// Its process id.
    pub pid: u32,
    /// The version it runs.
    pub version: String,
    /// When it started (database time).
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat (database time).
    pub heartbeat_at: DateTime<Utc>,
    /// Sessions whose lease it holds.
    pub leased: u64,
}

/// Failed sessions with one last error code.
#[derive(Debug, Clone, Serialize)]
pub struct FailureGroup {
    /// The error code (`None`: none recorded).
    pub error_code: Option<String>,
    /// One of its messages.
    pub error_message: Option<String>,
    /// Failed sessions with this code.
    pub count: u64,
    /// The latest of them.
    pub last_failed_at: Option<DateTime<Utc>>,
}

/// Pending sessions by when their next attempt is due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingByDue {
    /// Due now (or overdue).
    pub now: u64,
    /// Within the next minute.
    pub within_1m: u64,
    /// In 1 to 5 minutes.
    pub within_5m: u64,
    /// In 5 to 15 minutes.
    pub within_15m: u64,
    /// In 15 to 60 minutes.
    pub within_1h: u64,
    /// Later.
    pub later: u64,
}

/// What the status page reads from the database: the report plus a few bounded queries.
#[derive(Debug, Clone)]
pub struct StatusData {
    /// The same numbers as `report`.
    pub report: Report,
    /// The database's clock when read.
    pub now: DateTime<Utc>,
    /// Attempt-log calls per minute and class over the last day (at most
    /// [`STATUS_CALL_ROWS`] rows read).
    pub calls: Vec<MinuteCount>,
    /// Set when the row bound cut the day short: the chart covers calls from this time on.
    pub calls_cover_from: Option<DateTime<Utc>>,
    /// When the newest attempt-log call finished.
    pub last_call_at: Option<DateTime<Utc>>,
    /// Worker rows, newest heartbeat first (at most [`STATUS_WORKERS`]).
    pub workers: Vec<WorkerStatus>,
    /// Failed sessions by error code, most frequent first (at most [`STATUS_FAILURE_CODES`]).
    pub failures_by_code: Vec<FailureGroup>,
    /// Pending sessions by due time.
    pub pending_by_due: PendingByDue,
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
    /// A step after the shutdown grace period got its one short try and no answer.
    #[error("database did not answer in time while {op} (after the shutdown grace period)")]
    TimedOut {
        /// What we were doing.
        op: &'static str,
    },
}

impl StoreError {
    /// Whether retrying later may help: the database is unreachable or busy, not misconfigured.
    /// A server that answers in another protocol (the URL's port is some other service's) is a
    /// mistake in the config that waiting never fixes.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database { source, .. } => {
                matches!(
                    source,
                    sqlx::Error::Io(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Tls(_)
                ) || the_server_ended_the_session(source)
            }
            StoreError::TimedOut { .. } => true,
            StoreError::Schema(_) => false,
        }
    }
}

/// Whether the server ended the session (or would not begin one) rather than answered: SQLSTATE
/// class 08 (connection exception), PostgreSQL's 57P01 and 57P02 (shut down by an administrator
/// or after a crash), 57P03 (still starting up) and 57P05 (an idle session ended), MariaDB's
/// 1927 (a `KILL CONNECTION`). A statement it ended is rolled back (one whose commit the
/// server ended only its answer to is the rare exception: a claim's leases then stay this
/// worker's until its sweep gives them back), and a fresh connection, now or a little later,
/// may well succeed. MariaDB's other 70100s are answers on a
/// session that lives on: a statement cut short by `max_statement_time` (1969) or by a `KILL
/// QUERY` (1317), which waiting does not change.
pub(crate) fn the_server_ended_the_session(e: &sqlx::Error) -> bool {
    /// MariaDB's `ER_CONNECTION_KILLED`, SQLSTATE 70100.
    const CONNECTION_KILLED: u16 = 1927;
    let sqlx::Error::Database(d) = e else {
        return false;
    };
    if let Some(mysql) = d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return mysql.number() == CONNECTION_KILLED
            || mysql.code().is_some_and(|code| code.starts_with("08"));
    }
    d.code().is_some_and(|code| {
        code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "57P05")
    })
}

/// How often a single statement that the database ended to break a deadlock is tried.
pub(crate) const DEADLOCK_TRIES: u32 = 3;

/// Whether the database ended a statement to break a deadlock or a serialization conflict
/// (SQLSTATE 40001 on MySQL and PostgreSQL, 40P01 on PostgreSQL): its transaction was rolled
/// back, and running it again is safe.
pub(crate) fn lost_a_deadlock(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001" | "40P01")))
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
    /// A read-only transaction that sees the database as it is now, for [`Store::counts_in`]
    /// to read later: nothing written after this returns can be in its counts.
    async fn snapshot(&self) -> Result<Snapshot>;
    /// A sweep's two counts, read in `snapshot`: the active rows it cannot use, and its
    /// sessions (eligible, or leased by `p.worker`: a sweep's work at its start, counted alike
    /// before and after that sweep's own first claims).
    async fn counts_in(
        &self,
        snapshot: Snapshot,
        p: ClaimParams<'_>,
    ) -> Result<(UnusableRows, u64)>;
    /// Whether the pool is large enough for two counts to run while a sweep holds what it
    /// needs (its claim, its heartbeat, its kept connections).
    fn can_count_beside_a_sweep(&self) -> bool;
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
    ) -> Result<Recheck> {
        let verdicts = self.recheck_many(worker, &[token], idle_before).await?;
        Ok(verdicts.first().copied().unwrap_or(Recheck::LeaseLost))
    }
    /// [`Store::recheck`] for several sessions at once (calls that became ready together);
    /// the verdicts come in the order of `tokens`.
    async fn recheck_many(
        &self,
        worker: &str,
        tokens: &[&str],
        idle_before: DateTime<Utc>,
    ) -> Result<Vec<Recheck>>;
    /// Writes a batch of settlements in one transaction: attempt log and ledger. The source
    /// rows are marked passive afterwards, by [`Store::mark_passive`], so that a source update
    /// that fails can never take the record of an accepted call with it. Returns the tokens
    /// whose ledger row changed (those whose lease we still held): only those count.
    async fn record(&self, worker: &str, batch: &[Settlement]) -> Result<Vec<String>>;
    /// Sets the source status of these invalidated sessions to the passive value (rows still
    /// idle before `idle_before` only) and notes in the ledger that it was done, in one
    /// transaction. Returns how many ledger rows it noted.
    async fn mark_passive(&self, tokens: &[String], idle_before: DateTime<Utc>) -> Result<u64>;
    /// Up to `limit` invalidated sessions whose source row is not marked passive yet.
    async fn unmarked(&self, limit: u32) -> Result<Vec<String>>;
    /// Active source rows the sweep cannot use, by reason (never sent; counted and reported).
    async fn unusable_rows(&self) -> Result<UnusableRows>;
    /// Releases every lease `worker` holds.
    async fn release_all(&self, worker: &str) -> Result<u64>;
    /// Extends every lease `worker` holds to `lease` from now (called with each heartbeat, so a
    /// live worker's leases never lapse however long its queue).
    async fn renew_leases(&self, worker: &str, lease: Duration) -> Result<u64>;
    /// Records that `worker` is alive; returns the database time written.
    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<DateTime<Utc>>;
    /// The database's current time (the clock every lease and liveness decision uses).
    async fn database_time(&self) -> Result<DateTime<Utc>>;
    /// How many workers are alive (heartbeat younger than `stale_after`).
    async fn live_workers(&self, stale_after: Duration) -> Result<u32>;
    /// Workers registered from `hostname`.
    async fn workers_on_host(&self, hostname: &str) -> Result<Vec<WorkerRow>>;
    /// Removes a worker: its leases stop counting at once.
    async fn forget_worker(&self, worker: &str) -> Result<()>;
    /// Counts per outcome, pending schedule, recent failures.
    async fn report(&self, failures: u32) -> Result<Report>;
    /// Puts failed sessions back in the queue; returns how many.
    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64>;
    /// Whether the database answers, on a fresh connection: a refused or unreachable server is
    /// reported at once, not after the pool's acquire timeout.
    async fn ping(&self) -> Result<()>;
    /// Opens up to `n` of the pool's connections at once (never more than it may hold), so that
    /// the steps that follow find them open instead of each opening one in turn.
    async fn open_connections(&self, n: u32) -> Result<()>;
    /// Closes the pool, waiting for connections to be returned.
    async fn close(&self);
    /// What the status page shows: [`Store::report`] with `failures` recent failures, plus the
    /// chart's calls per minute, the workers and their leases, failures by code and pending
    /// sessions by due time. Every query is bounded (see the `STATUS_*` limits).
    async fn status(&self, failures: u32) -> Result<StatusData>;
}

/// Opens the configured backend (connecting lazily checks nothing; call `ping` or `check`).
pub async fn open(config: &Config) -> Result<Arc<dyn Store>> {
    let (db, source) = (&config.database, &config.source);
    let url = db.url.expose_secret();
    let dialect = match db.backend {
        Backend::Sqlite => Dialect::Sqlite,
        Backend::Postgres => Dialect::Postgres,
        Backend::MySql => Dialect::MySql,
    };
    Ok(Arc::new(
        SqlStore::connect(url, dialect, db.max_connections.get(), source.clone()).await?,
    ))
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
    blocks_unless_leased_by(now, stale, "")
}

/// [`ledger_blocks`], except that a lease held by `owner` (a placeholder) does not block: the
/// sessions a sweep of that worker has still to do, whether or not it has claimed them yet.
pub(crate) fn ledger_blocks_for_others(now: &str, stale: &str, owner: &str) -> String {
    blocks_unless_leased_by(now, stale, &format!(" AND l.lease_owner <> {owner}"))
}

fn blocks_unless_leased_by(now: &str, stale: &str, not_owner: &str) -> String {
    // COALESCE: a NULL (no next attempt, no lease) must read as "does not block", also under NOT.
    format!(
        "COALESCE(l.state IN ('invalidated', 'already_invalidated', 'failed') \
          OR (l.state = 'pending' AND l.next_attempt_at > {now}) \
          OR (l.lease_owner IS NOT NULL{not_owner} AND l.lease_expires_at > {now} \
              AND EXISTS (SELECT 1 FROM sweeper_workers w \
                          WHERE w.worker_id = l.lease_owner AND w.heartbeat_at > {stale})), FALSE)"
    )
}

/// Which SQL a `CREATE INDEX` suggestion is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IndexDialect {
    /// PostgreSQL: `CONCURRENTLY`, the index lands in the table's schema by itself.
    Postgres,
    /// SQLite: the schema goes on the index name, never on the table.
    Sqlite,
    /// MySQL and MariaDB: backticks; no `CONCURRENTLY` (InnoDB builds indexes online).
    MySql,
}

/// A `CREATE INDEX` statement on `columns` that runs as printed.
pub(crate) fn create_index(
    source: &SourceConfig,
    dialect: IndexDialect,
    unique: bool,
    suffix: &str,
    columns: &[&crate::config::SqlIdent],
) -> String {
    let name = format!("{}_{suffix}", source.table.name());
    let cols = columns
        .iter()
        .map(|c| c.quoted())
        .collect::<Vec<_>>()
        .join(", ");
    let unique = if unique { "UNIQUE " } else { "" };
    match dialect {
        IndexDialect::Postgres => format!(
            "CREATE {unique}INDEX CONCURRENTLY \"{name}\" ON {} ({cols});",
            source.table.quoted()
        ),
        IndexDialect::MySql => {
            let table = match source.table.schema() {
                Some(schema) => format!("`{schema}`.`{}`", source.table.name()),
                None => format!("`{}`", source.table.name()),
            };
            let cols = columns
                .iter()
                .map(|c| format!("`{}`", c.name()))
                .collect::<Vec<_>>()
                .join(", ");
            format!("CREATE {unique}INDEX `{name}` ON {table} ({cols});")
        }
        IndexDialect::Sqlite => {
            let index = match source.table.schema() {
                Some(schema) => format!("\"{schema}\".\"{name}\""),
                None => format!("\"{name}\""),
            };
            format!(
                "CREATE {unique}INDEX {index} ON \"{}\" ({cols});",
                source.table.name()
            )
        }
    }
}

/// A `CREATE INDEX` statement serving the eligibility query, for `check`'s warning.
pub(crate) fn suggested_index(source: &SourceConfig, dialect: IndexDialect) -> String {
    create_index(
        source,
        dialect,
        false,
        "sweeper_idx",
        &[&source.status_column, &source.last_activity_column],
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
    dialect: IndexDialect,
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
            suggested_index(src, dialect)
        )));
    }
    if starts_with(&[src.token_column.name()]) {
        out.push(Finding::Ok(format!(
            "an index on {} serves status updates",
            src.token_column
        )));
    } else {
        out.push(Finding::Warning(format!(
            "no index on {}: each status update scans the table. Create one: {}",
            src.token_column,
            // Not unique: tables with duplicate tokens (which the sweeper handles) must take it.
            create_index(src, dialect, false, "token_idx", &[&src.token_column]),
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

/// A decision as the columns the ledger update binds (all `None`: release the lease only).
pub(crate) struct FlatDecision<'a> {
    pub state: Option<&'static str>,
    pub attempts: Option<u32>,
    pub retry_in: Option<Duration>,
    pub error_code: Option<&'a str>,
    pub error_message: Option<&'a str>,
}

impl<'a> FlatDecision<'a> {
    /// Flattens `d`.
    pub fn of(d: &'a Decision) -> Self {
        match d {
            Decision::Settle {
                outcome,
                attempts,
                retry_in,
                error_code,
                error_message,
            } => Self {
                state: Some(outcome.as_str()),
                attempts: Some(*attempts),
                retry_in: *retry_in,
                error_code: error_code.as_deref(),
                error_message: error_message.as_deref(),
            },
            Decision::Release => Self {
                state: None,
                attempts: None,
                retry_in: None,
                error_code: None,
                error_message: None,
            },
        }
    }
}

/// Names of the embedded migrations not in `applied`.
pub(crate) fn pending(migrations: &[Migration], applied: &[i64]) -> Vec<String> {
    migrations
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| format!("{:04}_{}", m.version, m.name))
        .collect()
}

/// A trigger that runs before updates may refuse the status change; nothing shows which until
/// it runs, and then the sessions stay invalidated with their source not marked.
pub(crate) fn trigger_warning(src: &SourceConfig) -> Finding {
    Finding::Warning(format!(
        "source.status_column: {} has a BEFORE UPDATE trigger, which may refuse setting {} to \
         the passive value; if it does, sessions stay invalidated with the source not marked \
         (report's source_not_marked) and are never sent again",
        src.table, src.status_column
    ))
}

/// Index advice for a source that is a view: indexes belong on the table behind it.
pub(crate) fn view_finding(src: &SourceConfig) -> Finding {
    Finding::Warning(format!(
        "source.table: {} is a view, which cannot be indexed: make sure the table behind it has an \
         index on the columns behind ({}, {}), or every sweep scans it",
        src.table, src.status_column, src.last_activity_column
    ))
}

/// The error code a session gets when its source row cannot be read (never sent).
pub const BAD_SOURCE_ROW: &str = "bad_source_row";

/// Zone names whose offset is zero all year: naive values in such a database are UTC.
pub(crate) fn is_utc_zone(name: &str) -> bool {
    let n = name.trim().trim_start_matches("Etc/").to_ascii_uppercase();
    matches!(
        n.as_str(),
        "UTC"
            | "UCT"
            | "GMT"
            | "GMT0"
            | "GMT+0"
            | "GMT-0"
            | "ZULU"
            | "UNIVERSAL"
            | "GREENWICH"
            | "Z"
            | "+00:00"
            | "+00"
            | "SYSTEM+00:00"
    )
}

/// The zone naive timestamps are read in: the configured one, else UTC where the database's own
/// zone is UTC; anything else is ambiguous, so nothing starts until the key is set.
pub(crate) fn naive_zone(
    configured: Option<chrono_tz::Tz>,
    database_zone: &str,
    what: &str,
) -> Result<chrono_tz::Tz> {
    match configured {
        Some(tz) => Ok(tz),
        None if is_utc_zone(database_zone) => Ok(chrono_tz::UTC),
        None => {
            // Suggest the database's zone only when it is a name the key accepts ("+03:00" is not).
            let example = if database_zone.parse::<chrono_tz::Tz>().is_ok() {
                format!("{database_zone:?}")
            } else {
                "\"Europe/Istanbul\"".to_owned()
            };
            Err(StoreError::Schema(format!(
                "source.last_activity_timezone: {what} holds times without a zone and the database's \
                 time zone is {database_zone:?}, so which instant a value means is ambiguous; set \
                 source.last_activity_timezone to the IANA zone the application writes them in \
                 (e.g. {example}, or \"UTC\")"
            )))
        }
    }
}

/// The latest instant a naive local time can mean in `tz` (the later one in a repeated hour; a
/// time skipped by a spring-forward gap reads as the end of the gap).
fn latest_instant(tz: chrono_tz::Tz, v: NaiveDateTime) -> DateTime<Utc> {
    use chrono::TimeZone as _;
    match tz.from_local_datetime(&v) {
        chrono::LocalResult::Single(t) => t.with_timezone(&Utc),
        chrono::LocalResult::Ambiguous(a, b) => a.max(b).with_timezone(&Utc),
        chrono::LocalResult::None => {
            let after = v + chrono::Duration::hours(3);
            let t = tz
                .from_local_datetime(&after)
                .earliest()
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(|| v.and_utc());
            t - chrono::Duration::hours(3)
        }
    }
}

/// The naive cutoff for "idle before `instant`" in `tz`: the smallest local time whose every
/// meaning is at or after `instant`, so `column < cutoff` never takes a session that might
/// still be live, also in the repeated hour when clocks go back. Index-friendly: the column is
/// compared as stored, only the cutoff is converted.
pub(crate) fn naive_cutoff(tz: chrono_tz::Tz, instant: DateTime<Utc>) -> NaiveDateTime {
    let start = instant.with_timezone(&tz).naive_local();
    // `latest_instant` only grows with the local time: bisect the last three hours in ms.
    let (mut lo, mut hi) = (-3 * 3_600_000i64, 0i64);
    if latest_instant(tz, start + chrono::Duration::milliseconds(lo)) >= instant {
        return start + chrono::Duration::milliseconds(lo);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if latest_instant(tz, start + chrono::Duration::milliseconds(mid)) >= instant {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    start + chrono::Duration::milliseconds(hi)
}

/// Parses a naive text timestamp as SQLite's `CURRENT_TIMESTAMP` writes it.
pub(crate) fn parse_sqlite_text(s: &str) -> Option<NaiveDateTime> {
    let ok_shape = s.len() >= 19
        && s.as_bytes()[10] == b' '
        && (s.len() == 19
            || (s.as_bytes()[19] == b'.'
                && s.len() > 20
                && s[20..].bytes().all(|b| b.is_ascii_digit())));
    ok_shape
        .then(|| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").ok())
        .flatten()
}

/// Parses RFC 3339 text in UTC (`Z` or `+00:00`), the only form SQL can compare as text.
pub(crate) fn parse_rfc3339_utc(s: &str) -> Option<DateTime<Utc>> {
    let utc = s.ends_with('Z') || s.ends_with("+00:00");
    let t = DateTime::parse_from_rfc3339(s).ok()?;
    (utc && s.as_bytes().get(10) == Some(&b'T')).then(|| t.with_timezone(&Utc))
}

/// Unix times before this are taken for a wrong unit, not for a session idle since the 1990s.
pub const EARLIEST_PLAUSIBLE_UNIX_SECONDS: i64 = 946_684_800; // 2000-01-01

/// [`EARLIEST_PLAUSIBLE_UNIX_SECONDS`] as a time column's literal: earlier values are sentinels
/// (`-infinity`, zero dates) or damage, never a shopper's last activity.
pub const EARLIEST_PLAUSIBLE_TIME: &str = "2000-01-01 00:00:00";

/// What a sampled last-activity value looks like, in the words of `source.last_activity_format`.
pub(crate) fn describe_value(v: &SampleValue) -> (String, Option<crate::config::TimestampFormat>) {
    use crate::config::TimestampFormat as F;
    match v {
        SampleValue::Int(i) => {
            let secs_lo = EARLIEST_PLAUSIBLE_UNIX_SECONDS;
            let secs_hi = 32_503_680_000; // year 3000
            if (secs_lo..secs_hi).contains(i) {
                (
                    format!("the integer {i} (Unix seconds)"),
                    Some(F::UnixSeconds),
                )
            } else if (secs_lo * 1000..secs_hi * 1000).contains(i) {
                (
                    format!("the integer {i} (Unix milliseconds)"),
                    Some(F::UnixMillis),
                )
            } else {
                (
                    format!("the integer {i}, which is no plausible Unix time"),
                    None,
                )
            }
        }
        SampleValue::Text(t) => {
            if parse_sqlite_text(t).is_some() {
                (format!("the text {t:?}"), Some(F::SqliteText))
            } else if parse_rfc3339_utc(t).is_some() {
                (
                    format!("the text {t:?} (RFC 3339 in UTC)"),
                    Some(F::Rfc3339),
                )
            } else if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                (
                    format!(
                        "the text {t:?}, a Unix time stored as text (the column's type gives it \
                         text affinity); declare the column INTEGER to use unix_seconds or unix_millis"
                    ),
                    None,
                )
            } else if DateTime::parse_from_rfc3339(t).is_ok() {
                (
                    format!(
                        "the text {t:?}, RFC 3339 with a non-UTC offset, which text comparison \
                         cannot order; store UTC (`Z`) or Unix seconds"
                    ),
                    None,
                )
            } else {
                (
                    format!("the text {t:?}, which is no supported timestamp"),
                    None,
                )
            }
        }
        SampleValue::Other(kind) => (format!("a value of type {kind}"), None),
    }
}

/// A last-activity value sampled by `check`.
#[derive(Debug, Clone)]
pub(crate) enum SampleValue {
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
    /// Anything else (the storage class or type named).
    Other(String),
}

/// The name of a timestamp format as the config writes it.
pub(crate) fn format_name(f: crate::config::TimestampFormat) -> &'static str {
    use crate::config::TimestampFormat as F;
    match f {
        F::SqliteText => "sqlite_text",
        F::Rfc3339 => "rfc3339",
        F::UnixSeconds => "unix_seconds",
        F::UnixMillis => "unix_millis",
    }
}

/// `check`'s verdict on sampled values (the newest and oldest active ones) against the setting.
pub(crate) fn format_findings(
    configured: crate::config::TimestampFormat,
    samples: &[(&str, SampleValue)],
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (which, v) in samples {
        let (what, fits) = describe_value(v);
        if fits == Some(configured) {
            out.push(Finding::Ok(format!(
                "the {which} active last-activity value is {what}: fits source.last_activity_format = {:?}",
                format_name(configured)
            )));
        } else {
            let hint = match fits {
                Some(f) => format!("set source.last_activity_format = {:?}", format_name(f)),
                None => "no supported format fits it".into(),
            };
            out.push(Finding::Error(format!(
                "source.last_activity_format: is {:?} but the {which} active value is {what}; {hint}. \
                 Values that do not fit are never swept",
                format_name(configured)
            )));
        }
    }
    out
}

/// How far ahead of the database's clock a last-activity value can read before no time zone
/// explains it: zones run from 12 h behind UTC to 14 h ahead, so a value written in one and
/// read in the other is off by up to 26 h; one more hour of slack.
pub(crate) const FURTHEST_ZONE_AHEAD: chrono::Duration = chrono::Duration::hours(27);

/// `check`'s finding about the `far_ahead` of the `readable` active rows whose last activity
/// reads as later than [`FURTHEST_ZONE_AHEAD`]: half of them or more, the column is misread; a
/// few, rows written wrong. `format_applies`: whether `source.last_activity_format` decides how
/// the column is read (SQLite, integer columns).
pub(crate) fn far_ahead_finding(
    far_ahead: u64,
    readable: u64,
    format_applies: bool,
    src: &SourceConfig,
) -> Option<Finding> {
    let hours = FURTHEST_ZONE_AHEAD.num_hours();
    let col = &src.last_activity_column;
    let (key, cause) = if format_applies {
        (
            "source.last_activity_format",
            "the column is read in the wrong unit or format",
        )
    } else {
        (
            "source.last_activity_column",
            "the application writes placeholders (such as 9999-12-31) or the wrong column is named",
        )
    };
    match far_ahead {
        0 => None,
        n if n * 2 >= readable => Some(Finding::Error(format!(
            "{key}: {n} of the {readable} readable active {col} values read as more than \
             {hours} h after the database's clock, which no time zone explains: {cause}, or the \
             database's clock is wrong; idle times would be wrong too"
        ))),
        n => Some(Finding::Warning(format!(
            "{n} active rows have a {col} value more than {hours} h after the database's clock, \
             which no time zone explains: they never read as idle, so they are never swept, \
             and the newest value below is sampled without them"
        ))),
    }
}

/// `check`'s finding when none of the active rows' last activity can be read (`unreadable`
/// of them): nothing would ever be swept.
pub(crate) fn none_readable_finding(
    unreadable: u64,
    format_applies: bool,
    src: &SourceConfig,
) -> Finding {
    let col = &src.last_activity_column;
    Finding::Error(if format_applies {
        format!(
            "source.last_activity_format: none of the {unreadable} active {col} values reads as \
             a time from 2000 on in the format {:?}: is that its unit and format? Nothing \
             would ever be swept",
            format_name(src.last_activity_format)
        )
    } else {
        format!(
            "source.last_activity_column: none of the {unreadable} active {col} values is a \
             time from 2000 on (missing, a zero date, infinity): nothing would ever be swept"
        )
    })
}

/// `check`'s verdict on the newest activity against the database's clock: a value in the future
/// means the zone or the unit is wrong, and idle times would be misjudged.
pub(crate) fn newest_finding(
    newest: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    idle_after: Duration,
) -> Finding {
    let idle = chrono::Duration::from_std(idle_after).unwrap_or(chrono::Duration::MAX);
    match newest {
        // Every active session idle is possible (a quiet night), but it is also what a zone
        // west of UTC read as UTC looks like: say so, with the hours it is off by.
        Some(t) if now - t > idle => Finding::Warning(format!(
            "source.last_activity_timezone: every active session reads as idle; the newest \
             last-activity value reads as {t}, {} h {} min before the database's clock. If \
             shoppers are active right now, the column is read in the wrong zone (a whole \
             number of hours off suggests one) and a sweep would invalidate them: set \
             source.last_activity_timezone to the zone the application writes in",
            (now - t).num_hours(),
            (now - t).num_minutes() % 60
        )),
        Some(t) if t > now + chrono::Duration::minutes(5) => Finding::Error(format!(
            "source.last_activity_timezone: the newest active last-activity value reads as {t}, \
             {} minutes after the database's clock ({now}): the zone (or unit) it is read in is \
             wrong, so idle times would be wrong too",
            (t - now).num_minutes()
        )),
        Some(t) => Finding::Ok(format!(
            "the newest active last-activity value reads as {t}, {} before now",
            humantime::format_duration(Duration::from_secs((now - t).num_seconds().max(0) as u64))
        )),
        None => Finding::Ok("no active sessions to sample".into()),
    }
}

/// Findings about rows the sweep cannot use.
pub(crate) fn unusable_findings(u: UnusableRows, src: &SourceConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    if u.unreadable_last_activity > 0 {
        out.push(Finding::Warning(format!(
            "{} active rows have a {} value that is missing, is no time from 2000 on \
             (a zero date, -infinity), or does not fit source.last_activity_format: they are \
             never swept",
            u.unreadable_last_activity, src.last_activity_column
        )));
    }
    if u.bad_source_row > 0 {
        out.push(Finding::Warning(format!(
            "{} active rows have a NULL, empty or non-text {} or {} (or one with a NUL inside): \
             they are never sent",
            u.bad_source_row, src.token_column, src.member_column
        )));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    #[test]
    fn naive_cutoff_in_utc_is_the_instant_itself() {
        let t = Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap();
        assert_eq!(naive_cutoff(chrono_tz::UTC, t), t.naive_utc());
    }

    #[test]
    fn naive_cutoff_converts_to_the_zone() {
        let t = Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap();
        let ny = naive_cutoff(chrono_tz::America::New_York, t);
        assert_eq!(ny.to_string(), "2026-06-01 08:00:00");
    }

    #[test]
    fn naive_cutoff_in_the_repeated_hour_takes_none_that_might_be_live() {
        // New York, 2026-11-01: 01:00-02:00 happens twice (EDT, then EST).
        let tz = chrono_tz::America::New_York;
        // 05:30Z is 01:30 EDT, the first pass; 01:30 EST (06:30Z) is later than the cutoff.
        let cutoff = Utc.with_ymd_and_hms(2026, 11, 1, 5, 30, 0).unwrap();
        let v = naive_cutoff(tz, cutoff);
        assert_eq!(v.to_string(), "2026-11-01 01:00:00");
        // Every naive value below the cutoff means an instant before it, whichever pass.
        let below = v - chrono::Duration::seconds(1);
        assert!(latest_instant(tz, below) < cutoff);
    }

    #[test]
    fn utc_zone_names() {
        for z in ["UTC", "Etc/UTC", "GMT", "Etc/GMT", "utc", "Zulu"] {
            assert!(is_utc_zone(z), "{z}");
        }
        for z in ["America/New_York", "Europe/Istanbul", "SYSTEM", "+03:00"] {
            assert!(!is_utc_zone(z), "{z}");
        }
    }

    #[test]
    fn sampled_values_name_the_format_that_fits() {
        use crate::config::TimestampFormat as F;
        let fits = |v: SampleValue| describe_value(&v).1;
        assert_eq!(fits(SampleValue::Int(1_764_000_000)), Some(F::UnixSeconds));
        assert_eq!(
            fits(SampleValue::Int(1_764_000_000_000)),
            Some(F::UnixMillis)
        );
        assert_eq!(fits(SampleValue::Int(42)), None);
        assert_eq!(
            fits(SampleValue::Text("2026-11-29 10:00:00".into())),
            Some(F::SqliteText)
        );
        assert_eq!(
            fits(SampleValue::Text("2026-11-29T10:00:00.123Z".into())),
            Some(F::Rfc3339)
        );
        assert_eq!(
            fits(SampleValue::Text("2026-11-29T10:00:00+03:00".into())),
            None
        );
        assert_eq!(fits(SampleValue::Text("yesterday".into())), None);
    }
}
