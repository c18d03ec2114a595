//! SQLite: one file, WAL mode, a busy timeout so a second process waits instead of failing, and
//! `BEGIN IMMEDIATE` around every write so two processes never claim the same session.
//! The sweeper's own timestamps are Unix milliseconds.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::{
    ClaimParams, Decision, FailureRow, Finding, IdleSession, Lease, Migration, Op, PendingSummary,
    Recheck, Report, RequeueFilter, Result, Settlement, Store, WorkerInfo, WorkerRow,
    column_findings, count_rows, index_findings, ledger_blocks, migration_finding,
};
use crate::config::{SourceConfig, TimestampFormat};
use crate::telemetry::fingerprint;

/// Sessions per multi-row statement (11 parameters each stays far below SQLite's limit).
const RECORD_CHUNK: usize = 80;

/// How long a statement waits for another process's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "ledger",
    sql: include_str!("../../migrations/sqlite/0001_ledger.sql"),
}];

/// The SQLite store.
pub struct SqliteStore {
    pool: SqlitePool,
    source: SourceConfig,
    sql: Statements,
}

/// SQL built once from validated identifiers.
struct Statements {
    claim: String,
    eligible: String,
    count: String,
    recheck: String,
    skip_revived: String,
    /// `UPDATE table SET status = `; the caller appends the value and the token list.
    mark_passive_many: String,
    token_column: String,
    status_column: String,
}

impl Statements {
    fn new(src: &SourceConfig) -> Self {
        let table = src.table.quoted();
        let tok = src.token_column.quoted();
        let mem = src.member_column.quoted();
        let status = src.status_column.quoted();
        let last = src.last_activity_column.quoted();
        // ?1 active value, ?2 idle cutoff, ?3 now, ?4 stale cutoff.
        let eligible_where = format!(
            "s.{status} = ?1 AND s.{last} < ?2 AND NOT EXISTS (SELECT 1 FROM sweeper_sessions l \
             WHERE l.session_token = s.{tok} AND {})",
            ledger_blocks("?3", "?4")
        );
        Self {
            claim: format!(
                "INSERT INTO sweeper_sessions (session_token, member_identifier, state, attempts, \
                 lease_owner, lease_expires_at, created_at, updated_at) \
                 SELECT CAST(s.{tok} AS TEXT), CAST(s.{mem} AS TEXT), 'pending', 0, ?6, ?7, ?3, ?3 \
                 FROM {table} s WHERE {eligible_where} ORDER BY s.{last} LIMIT ?5 \
                 ON CONFLICT (session_token) DO UPDATE SET lease_owner = excluded.lease_owner, \
                 lease_expires_at = excluded.lease_expires_at, updated_at = excluded.updated_at, \
                 state = 'pending' \
                 RETURNING session_token, member_identifier, attempts"
            ),
            eligible: format!(
                "SELECT CAST(s.{tok} AS TEXT), CAST(s.{mem} AS TEXT), s.{last} FROM {table} s \
                 WHERE {eligible_where} ORDER BY s.{last} LIMIT ?5"
            ),
            count: format!("SELECT COUNT(*) FROM {table} s WHERE {eligible_where}"),
            recheck: format!(
                "SELECT l.lease_owner = ?1, s.{status} = ?2 AND s.{last} < ?3 \
                 FROM sweeper_sessions l LEFT JOIN {table} s ON s.{tok} = l.session_token \
                 WHERE l.session_token = ?4"
            ),
            skip_revived: format!(
                "UPDATE sweeper_sessions AS l SET state = 'skipped', lease_owner = NULL, \
                 lease_expires_at = NULL, updated_at = ?3, settled_at = ?3 \
                 WHERE l.state = 'pending' AND (l.next_attempt_at IS NULL OR l.next_attempt_at <= ?3) \
                 AND NOT (l.lease_owner IS NOT NULL AND l.lease_expires_at > ?3 AND EXISTS \
                   (SELECT 1 FROM sweeper_workers w WHERE w.worker_id = l.lease_owner AND w.heartbeat_at > ?4)) \
                 AND NOT EXISTS (SELECT 1 FROM {table} s WHERE s.{tok} = l.session_token \
                   AND s.{status} = ?1 AND s.{last} < ?2)"
            ),
            mark_passive_many: format!("UPDATE {table} SET {status} = "),
            token_column: tok.clone(),
            status_column: status.clone(),
        }
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

/// A cutoff in the source column's storage format.
enum Cutoff {
    Text(String),
    Int(i64),
}

impl SqliteStore {
    /// Opens (lazily) a pool on `url` in WAL mode with a busy timeout.
    pub async fn connect(url: &str, max_connections: u32, source: SourceConfig) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .op("parsing the SQLite URL")?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_lazy_with(options);
        let sql = Statements::new(&source);
        Ok(Self { pool, source, sql })
    }

    fn cutoff(&self, t: DateTime<Utc>) -> Cutoff {
        match self.source.last_activity_format {
            TimestampFormat::SqliteText => Cutoff::Text(t.format("%Y-%m-%d %H:%M:%S").to_string()),
            TimestampFormat::Rfc3339 => Cutoff::Text(t.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
            TimestampFormat::UnixSeconds => Cutoff::Int(t.timestamp()),
            TimestampFormat::UnixMillis => Cutoff::Int(t.timestamp_millis()),
        }
    }

    fn parse_activity(&self, row: &sqlx::sqlite::SqliteRow, idx: usize) -> Option<DateTime<Utc>> {
        match self.source.last_activity_format {
            TimestampFormat::SqliteText => {
                let s: String = row.try_get(idx).ok()?;
                NaiveDateTime::parse_from_str(&s, "%Y-%m-%d %H:%M:%S%.f")
                    .ok()
                    .map(|n| n.and_utc())
            }
            TimestampFormat::Rfc3339 => {
                let s: String = row.try_get(idx).ok()?;
                DateTime::parse_from_rfc3339(&s)
                    .ok()
                    .map(|d| d.with_timezone(&Utc))
            }
            TimestampFormat::UnixSeconds => Utc.timestamp_opt(row.try_get(idx).ok()?, 0).single(),
            TimestampFormat::UnixMillis => {
                Utc.timestamp_millis_opt(row.try_get(idx).ok()?).single()
            }
        }
    }

    /// Binds ?1..?4 of the eligibility statements.
    fn bind_eligible<'q>(
        &self,
        sql: &'q str,
        p: &ClaimParams<'_>,
    ) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
        let q = sqlx::query(sql).bind(self.source.active_value.clone());
        let q = match self.cutoff(p.idle_before) {
            Cutoff::Text(t) => q.bind(t),
            Cutoff::Int(i) => q.bind(i),
        };
        q.bind(ms(p.now)).bind(ms(p.stale_before))
    }

    async fn table_columns(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT name FROM pragma_table_info(?1, ?2)")
            .bind(self.source.table.name())
            .bind(self.source.table.schema().unwrap_or("main"))
            .fetch_all(&self.pool)
            .await
            .op("reading the source table's columns")?;
        Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Index column lists of the source table (the primary key counts as one).
    async fn table_indexes(&self) -> Result<Vec<Vec<String>>> {
        let schema = self.source.table.schema().unwrap_or("main");
        let names = sqlx::query("SELECT name FROM pragma_index_list(?1, ?2)")
            .bind(self.source.table.name())
            .bind(schema)
            .fetch_all(&self.pool)
            .await
            .op("listing the source table's indexes")?;
        let mut out = Vec::new();
        for n in names {
            let name: String = n.get(0);
            let cols = sqlx::query("SELECT name FROM pragma_index_info(?1, ?2) ORDER BY seqno")
                .bind(&name)
                .bind(schema)
                .fetch_all(&self.pool)
                .await
                .op("reading an index of the source table")?;
            out.push(
                cols.iter()
                    .map(|r| r.get::<Option<String>, _>(0).unwrap_or_default())
                    .collect(),
            );
        }
        // An INTEGER PRIMARY KEY is the rowid and has no index entry; a token column never is one.
        Ok(out)
    }

    async fn apply_migrations(&self) -> Result<()> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .op("starting the migration")?;
        sqlx::Executor::execute(
            &mut *tx,
            "CREATE TABLE IF NOT EXISTS sweeper_schema_migrations (version INTEGER PRIMARY KEY, \
             name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .await
        .op("creating the migrations table")?;
        for m in MIGRATIONS {
            let done: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM sweeper_schema_migrations WHERE version = ?1",
            )
            .bind(m.version)
            .fetch_optional(&mut *tx)
            .await
            .op("reading applied migrations")?;
            if done.is_some() {
                continue;
            }
            sqlx::Executor::execute(&mut *tx, m.sql)
                .await
                .op("applying a migration")?;
            sqlx::query("INSERT INTO sweeper_schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)")
                .bind(m.version)
                .bind(m.name)
                .bind(ms(Utc::now()))
                .execute(&mut *tx)
                .await
                .op("recording a migration")?;
        }
        tx.commit().await.op("committing the migration")
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        self.apply_migrations().await
    }

    async fn pending_migrations(&self) -> Result<Vec<String>> {
        let exists: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'sweeper_schema_migrations'",
        )
        .fetch_optional(&self.pool)
        .await
        .op("looking for the migrations table")?;
        let applied: Vec<i64> = if exists.is_some() {
            sqlx::query_scalar("SELECT version FROM sweeper_schema_migrations")
                .fetch_all(&self.pool)
                .await
                .op("reading applied migrations")?
        } else {
            Vec::new()
        };
        Ok(MIGRATIONS
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| format!("{:04}_{}", m.version, m.name))
            .collect())
    }

    async fn check(&self) -> Result<Vec<Finding>> {
        let mut findings = column_findings(&self.source, &self.table_columns().await?);
        if !findings.iter().any(Finding::is_error) {
            findings.extend(index_findings(
                &self.source,
                &self.table_indexes().await?,
                false,
            ));
        }
        findings.push(migration_finding(self.pending_migrations().await?));
        Ok(findings)
    }

    async fn eligible(&self, p: ClaimParams<'_>) -> Result<Vec<IdleSession>> {
        let rows = self
            .bind_eligible(&self.sql.eligible, &p)
            .bind(i64::from(p.limit))
            .fetch_all(&self.pool)
            .await
            .op("listing eligible sessions")?;
        Ok(rows
            .iter()
            .map(|r| IdleSession {
                token: r.get(0),
                member: r.get(1),
                idle_for: self
                    .parse_activity(r, 2)
                    .and_then(|t| (p.now - t).to_std().ok())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn count_eligible(&self, p: ClaimParams<'_>) -> Result<u64> {
        let n: i64 = self
            .bind_eligible(&self.sql.count, &p)
            .fetch_one(&self.pool)
            .await
            .op("counting eligible sessions")?
            .get(0);
        Ok(n as u64)
    }

    async fn claim(&self, p: ClaimParams<'_>) -> Result<Vec<Lease>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .op("starting a claim")?;
        let rows = self
            .bind_eligible(&self.sql.claim, &p)
            .bind(i64::from(p.limit))
            .bind(p.worker)
            .bind(ms(p.lease_until))
            .fetch_all(&mut *tx)
            .await
            .op("claiming sessions")?;
        tx.commit().await.op("committing a claim")?;
        Ok(rows
            .iter()
            .map(|r| Lease {
                token: r.get(0),
                member: r.get(1),
                attempts: r.get::<i64, _>(2) as u32,
            })
            .collect())
    }

    async fn explain_claim(&self, p: ClaimParams<'_>) -> Result<String> {
        let sql = format!("EXPLAIN QUERY PLAN {}", self.sql.claim);
        let rows = self
            .bind_eligible(&sql, &p)
            .bind(i64::from(p.limit))
            .bind(p.worker)
            .bind(ms(p.lease_until))
            .fetch_all(&self.pool)
            .await
            .op("explaining the claim")?;
        Ok(rows
            .iter()
            .map(|r| format!("{}\n", r.get::<String, _>(3)))
            .collect())
    }

    async fn skip_revived(&self, p: ClaimParams<'_>) -> Result<u64> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .op("starting a skip")?;
        let done = self
            .bind_eligible(&self.sql.skip_revived, &p)
            .execute(&mut *tx)
            .await
            .op("skipping revived sessions")?;
        tx.commit().await.op("committing a skip")?;
        Ok(done.rows_affected())
    }

    async fn recheck(
        &self,
        worker: &str,
        token: &str,
        idle_before: DateTime<Utc>,
    ) -> Result<Recheck> {
        let q = sqlx::query(&self.sql.recheck)
            .bind(worker)
            .bind(self.source.active_value.clone());
        let q = match self.cutoff(idle_before) {
            Cutoff::Text(t) => q.bind(t),
            Cutoff::Int(i) => q.bind(i),
        };
        let row = q
            .bind(token)
            .fetch_optional(&self.pool)
            .await
            .op("rechecking a session")?;
        Ok(match row {
            None => Recheck::LeaseLost,
            Some(r) if r.get::<Option<i64>, _>(0) != Some(1) => Recheck::LeaseLost,
            Some(r) if r.get::<Option<i64>, _>(1) != Some(1) => Recheck::NoLongerEligible,
            Some(_) => Recheck::Eligible,
        })
    }

    async fn record(&self, worker: &str, now: DateTime<Utc>, batch: &[Settlement]) -> Result<u64> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .op("starting to record")?;
        let mut changed = 0;
        // Multi-row statements: a handful per chunk instead of three per session.
        for chunk in batch.chunks(RECORD_CHUNK) {
            let calls: Vec<_> = chunk
                .iter()
                .flat_map(|s| s.calls.iter().map(move |c| (s, c)))
                .collect();
            for calls in calls.chunks(RECORD_CHUNK) {
                let mut q = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO sweeper_attempts (session_token, attempt, worker_id, conversation_id, outcome, \
                     http_status, error_code, error_message, latency_ms, started_at, finished_at) ",
                );
                q.push_values(calls, |mut row, (s, c)| {
                    let latency = c.latency.as_millis() as i64;
                    row.push_bind(&s.token)
                        .push_bind(i64::from(s.attempt))
                        .push_bind(worker)
                        .push_bind(&c.conversation_id)
                        .push_bind(c.class)
                        .push_bind(c.http_status.map(i64::from))
                        .push_bind(&c.error_code)
                        .push_bind(&c.error_message)
                        .push_bind(latency)
                        .push_bind(ms(c.started_at))
                        .push_bind(ms(c.started_at) + latency);
                });
                q.build().execute(&mut *tx).await.op("recording attempts")?;
            }
            // A NULL state releases the lease and leaves everything else as it was.
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE sweeper_sessions SET \
                 state = COALESCE(u.column2, state), attempts = COALESCE(u.column3, attempts), \
                 next_attempt_at = CASE WHEN u.column2 IS NULL THEN next_attempt_at ELSE u.column4 END, \
                 last_error_code = CASE WHEN u.column2 IS NULL THEN last_error_code ELSE u.column5 END, \
                 last_error_message = CASE WHEN u.column2 IS NULL THEN last_error_message ELSE u.column6 END, \
                 lease_owner = NULL, lease_expires_at = NULL, updated_at = ",
            );
            q.push_bind(ms(now));
            q.push(", settled_at = CASE WHEN u.column2 IS NULL THEN settled_at WHEN u.column2 = 'pending' THEN NULL ELSE ");
            q.push_bind(ms(now));
            q.push(" END FROM (");
            q.push_values(chunk, |mut row, s| match &s.decision {
                Decision::Settle {
                    outcome,
                    attempts,
                    next_attempt_at,
                    error_code,
                    error_message,
                } => {
                    row.push_bind(&s.token)
                        .push_bind(Some(outcome.as_str()))
                        .push_bind(Some(i64::from(*attempts)))
                        .push_bind(next_attempt_at.map(ms))
                        .push_bind(error_code)
                        .push_bind(error_message);
                }
                Decision::Release => {
                    row.push_bind(&s.token)
                        .push_bind(None::<&str>)
                        .push_bind(None::<i64>)
                        .push_bind(None::<i64>)
                        .push_bind(None::<String>)
                        .push_bind(None::<String>);
                }
            });
            q.push(") AS u WHERE sweeper_sessions.session_token = u.column1 AND sweeper_sessions.lease_owner = ");
            q.push_bind(worker);
            q.push(" RETURNING session_token");
            let settled: Vec<String> = q
                .build_query_scalar()
                .fetch_all(&mut *tx)
                .await
                .op("settling sessions")?;
            changed += settled.len() as u64;
            if self.source.mark_passive {
                let passive: Vec<&str> = chunk
                    .iter()
                    .filter(|s| matches!(&s.decision, Decision::Settle { outcome, .. } if outcome.marks_passive()))
                    .map(|s| s.token.as_str())
                    .filter(|t| settled.iter().any(|x| x == t))
                    .collect();
                if !passive.is_empty() {
                    let mut q = QueryBuilder::<Sqlite>::new(&self.sql.mark_passive_many);
                    q.push_bind(&self.source.passive_value);
                    q.push(" WHERE ");
                    q.push(&self.sql.token_column);
                    q.push(" IN (");
                    let mut list = q.separated(", ");
                    for t in passive {
                        list.push_bind(t);
                    }
                    q.push(") AND ");
                    q.push(&self.sql.status_column);
                    q.push(" = ");
                    q.push_bind(&self.source.active_value);
                    q.build()
                        .execute(&mut *tx)
                        .await
                        .op("marking sessions passive")?;
                }
            }
        }
        tx.commit().await.op("committing recorded outcomes")?;
        Ok(changed)
    }

    async fn release_all(&self, worker: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE sweeper_sessions SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = ?1",
        )
        .bind(worker)
        .execute(&self.pool)
        .await
        .op("releasing leases")?;
        Ok(done.rows_affected())
    }

    async fn renew_leases(&self, worker: &str, until: DateTime<Utc>) -> Result<u64> {
        let done =
            sqlx::query("UPDATE sweeper_sessions SET lease_expires_at = ?1 WHERE lease_owner = ?2")
                .bind(ms(until))
                .bind(worker)
                .execute(&self.pool)
                .await
                .op("renewing leases")?;
        Ok(done.rows_affected())
    }

    async fn heartbeat(&self, worker: &WorkerInfo, now: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "INSERT INTO sweeper_workers (worker_id, hostname, pid, version, started_at, heartbeat_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(&worker.id)
        .bind(&worker.hostname)
        .bind(i64::from(worker.pid))
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(ms(now))
        .execute(&self.pool)
        .await
        .op("recording a heartbeat")?;
        Ok(())
    }

    async fn live_workers(&self, stale_before: DateTime<Utc>) -> Result<u32> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sweeper_workers WHERE heartbeat_at > ?1")
                .bind(ms(stale_before))
                .fetch_one(&self.pool)
                .await
                .op("counting live workers")?;
        Ok(n as u32)
    }

    async fn workers_on_host(&self, hostname: &str) -> Result<Vec<WorkerRow>> {
        let rows = sqlx::query("SELECT worker_id, pid FROM sweeper_workers WHERE hostname = ?1")
            .bind(hostname)
            .fetch_all(&self.pool)
            .await
            .op("listing workers")?;
        Ok(rows
            .iter()
            .map(|r| WorkerRow {
                id: r.get(0),
                pid: r.get::<i64, _>(1) as u32,
            })
            .collect())
    }

    async fn forget_worker(&self, worker: &str) -> Result<()> {
        sqlx::query("DELETE FROM sweeper_workers WHERE worker_id = ?1")
            .bind(worker)
            .execute(&self.pool)
            .await
            .op("removing a worker")?;
        Ok(())
    }

    async fn report(&self, now: DateTime<Utc>, failures: u32) -> Result<Report> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM sweeper_sessions GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .op("counting outcomes")?;
        let counts = count_rows(
            rows.iter()
                .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1))),
        );
        let p = sqlx::query(
            "SELECT COUNT(*), MIN(next_attempt_at), \
             COALESCE(SUM(CASE WHEN next_attempt_at IS NULL OR next_attempt_at <= ?1 THEN 1 ELSE 0 END), 0) \
             FROM sweeper_sessions WHERE state = 'pending'",
        )
        .bind(ms(now))
        .fetch_one(&self.pool)
        .await
        .op("summarising pending sessions")?;
        let leased: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sweeper_sessions WHERE lease_owner IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await
        .op("counting leases")?;
        let recent = sqlx::query(
            "SELECT session_token, last_error_code, last_error_message, attempts, settled_at \
             FROM sweeper_sessions WHERE state = 'failed' ORDER BY settled_at DESC LIMIT ?1",
        )
        .bind(i64::from(failures))
        .fetch_all(&self.pool)
        .await
        .op("listing failures")?;
        Ok(Report {
            counts,
            pending: PendingSummary {
                count: p.get::<i64, _>(0) as u64,
                next_due: p.get::<Option<i64>, _>(1).map(from_ms),
                due_now: p.get::<i64, _>(2) as u64,
            },
            leased: leased as u64,
            recent_failures: recent
                .iter()
                .map(|r| FailureRow {
                    session: fingerprint(&r.get::<String, _>(0)),
                    error_code: r.get(1),
                    error_message: r.get(2),
                    attempts: r.get::<i64, _>(3) as u32,
                    failed_at: r.get::<Option<i64>, _>(4).map(from_ms),
                })
                .collect(),
        })
    }

    async fn requeue(&self, filter: &RequeueFilter, now: DateTime<Utc>) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE sweeper_sessions SET state = 'pending', attempts = 0, next_attempt_at = NULL, \
             settled_at = NULL, updated_at = ?1 WHERE state = 'failed' AND (?2 IS NULL OR last_error_code = ?2)",
        )
        .bind(ms(now))
        .bind(&filter.error_code)
        .execute(&self.pool)
        .await
        .op("requeueing failed sessions")?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .op("pinging the database")?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
