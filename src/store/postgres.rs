//! PostgreSQL: claims lock source rows `FOR UPDATE SKIP LOCKED` and re-check the ledger under
//! `ON CONFLICT ... WHERE`, so any number of processes share one database and never hold the
//! same session at once. Batched writes go through `UNNEST` arrays: three statements per batch.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::sync::OnceCell;

use super::{
    ClaimParams, Decision, FailureRow, Finding, IdleSession, Lease, Migration, Op, Outcome,
    PendingSummary, Recheck, Report, RequeueFilter, Result, Settlement, Store, StoreError,
    WorkerInfo, WorkerRow, column_findings, count_rows, index_findings, ledger_blocks,
    migration_finding,
};
use crate::config::SourceConfig;
use crate::telemetry::fingerprint;

/// How long to wait for a pooled connection before reporting the database unreachable.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Serialises concurrent `migrate` runs (an arbitrary constant: "sweeper" on a phone keypad).
const MIGRATION_LOCK: i64 = 7_933_737;

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "ledger",
    sql: include_str!("../../migrations/postgres/0001_ledger.sql"),
}];

/// The PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
    source: SourceConfig,
    sql: OnceCell<Statements>,
}

/// SQL built once from validated identifiers and the token column's catalog type.
struct Statements {
    claim: String,
    eligible: String,
    count: String,
    recheck: String,
    skip_revived: String,
    mark_passive: String,
}

impl Statements {
    fn new(src: &SourceConfig, token_type: &str) -> Self {
        let table = src.table.quoted();
        let tok = src.token_column.quoted();
        let mem = src.member_column.quoted();
        let status = src.status_column.quoted();
        let last = src.last_activity_column.quoted();
        // $1 active value, $2 idle cutoff, $3 now, $4 stale cutoff.
        let eligible_where = format!(
            "s.{status} = $1 AND s.{last} < $2 AND NOT EXISTS (SELECT 1 FROM sweeper_sessions l \
             WHERE l.session_token = s.{tok}::text AND {})",
            ledger_blocks("$3", "$4")
        );
        Self {
            claim: format!(
                "WITH candidates AS (SELECT s.{tok}::text AS token, s.{mem}::text AS member FROM {table} s \
                 WHERE {eligible_where} ORDER BY s.{last} LIMIT $5 FOR UPDATE OF s SKIP LOCKED) \
                 INSERT INTO sweeper_sessions AS l (session_token, member_identifier, state, attempts, \
                 lease_owner, lease_expires_at, created_at, updated_at) \
                 SELECT token, member, 'pending', 0, $6, $7, $3, $3 FROM candidates \
                 ON CONFLICT (session_token) DO UPDATE SET lease_owner = EXCLUDED.lease_owner, \
                 lease_expires_at = EXCLUDED.lease_expires_at, updated_at = EXCLUDED.updated_at, state = 'pending' \
                 WHERE NOT {} \
                 RETURNING l.session_token, l.member_identifier, l.attempts",
                ledger_blocks("$3", "$4")
            ),
            eligible: format!(
                "SELECT s.{tok}::text, s.{mem}::text, s.{last}::timestamptz FROM {table} s \
                 WHERE {eligible_where} ORDER BY s.{last} LIMIT $5"
            ),
            count: format!("SELECT COUNT(*) FROM {table} s WHERE {eligible_where}"),
            recheck: format!(
                "SELECT l.lease_owner = $1, (s.{status} = $2 AND s.{last} < $3) \
                 FROM sweeper_sessions l LEFT JOIN {table} s ON s.{tok} = CAST(l.session_token AS {token_type}) \
                 WHERE l.session_token = $4"
            ),
            skip_revived: format!(
                "UPDATE sweeper_sessions AS l SET state = 'skipped', lease_owner = NULL, \
                 lease_expires_at = NULL, updated_at = $3, settled_at = $3 \
                 WHERE l.state = 'pending' AND (l.next_attempt_at IS NULL OR l.next_attempt_at <= $3) \
                 AND NOT (l.lease_owner IS NOT NULL AND l.lease_expires_at > $3 AND EXISTS \
                   (SELECT 1 FROM sweeper_workers w WHERE w.worker_id = l.lease_owner AND w.heartbeat_at > $4)) \
                 AND NOT EXISTS (SELECT 1 FROM {table} s WHERE s.{tok} = CAST(l.session_token AS {token_type}) \
                   AND s.{status} = $1 AND s.{last} < $2)"
            ),
            mark_passive: format!(
                "UPDATE {table} SET {status} = $1 WHERE {tok} = ANY(CAST($2 AS {token_type}[])) AND {status} = $3"
            ),
        }
    }
}

/// A catalog type name is interpolated into SQL, so it must look like one (`uuid`,
/// `character varying(64)`, `text`), never anything else.
fn safe_type_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() < 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _(),".contains(c))
}

impl PgStore {
    /// Opens (lazily) a pool on `url`.
    pub async fn connect(url: &str, max_connections: u32, source: SourceConfig) -> Result<Self> {
        let options: PgConnectOptions = url.parse().op("parsing the PostgreSQL URL")?;
        // Never wait forever on the application's row locks or a stuck statement: a failed
        // write is retried by the recorder, a hung one would stall the sweep and its shutdown.
        let options = options
            .application_name("session-sweeper")
            .options([("lock_timeout", "5s"), ("statement_timeout", "60s")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(true)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            source,
            sql: OnceCell::new(),
        })
    }

    async fn sql(&self) -> Result<&Statements> {
        self.sql
            .get_or_try_init(|| async {
                let t = self.token_type().await?.ok_or_else(|| {
                    StoreError::Schema(format!(
                        "source.token_column: column {} not found in {} (run `session-sweeper check`)",
                        self.source.token_column, self.source.table
                    ))
                })?;
                if !safe_type_name(&t) {
                    return Err(StoreError::Schema(format!(
                        "source.token_column: unsupported column type {t:?}"
                    )));
                }
                Ok(Statements::new(&self.source, &t))
            })
            .await
    }

    async fn token_type(&self) -> Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
        )
        .bind(self.source.table.quoted())
        .bind(self.source.token_column.name())
        .fetch_optional(&self.pool)
        .await
        .op("reading the token column's type")
    }

    fn bind_eligible<'q>(
        &self,
        sql: &'q str,
        p: &ClaimParams<'_>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(sql)
            .bind(self.source.active_value.clone())
            .bind(p.idle_before)
            .bind(p.now)
            .bind(p.stale_before)
    }

    async fn apply_migrations(&self) -> Result<()> {
        let mut tx = self.pool.begin().await.op("starting the migration")?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .op("locking for the migration")?;
        sqlx::Executor::execute(
            &mut *tx,
            "CREATE TABLE IF NOT EXISTS sweeper_schema_migrations (version BIGINT PRIMARY KEY, \
             name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .op("creating the migrations table")?;
        for m in MIGRATIONS {
            let done: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM sweeper_schema_migrations WHERE version = $1",
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
            sqlx::query("INSERT INTO sweeper_schema_migrations (version, name) VALUES ($1, $2)")
                .bind(m.version)
                .bind(m.name)
                .execute(&mut *tx)
                .await
                .op("recording a migration")?;
        }
        tx.commit().await.op("committing the migration")
    }
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> Result<()> {
        self.apply_migrations().await
    }

    async fn pending_migrations(&self) -> Result<Vec<String>> {
        let exists: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('sweeper_schema_migrations')::text")
                .fetch_one(&self.pool)
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
        let table = self.source.table.quoted();
        let columns: Vec<String> = sqlx::query_scalar("SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",)
        .bind(&table)
        .fetch_all(&self.pool)
        .await
        .op("reading the source table's columns")?;
        let mut findings = column_findings(&self.source, &columns);
        if !findings.iter().any(Finding::is_error) {
            let indexes: Vec<Vec<String>> = sqlx::query_scalar(
                "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = to_regclass($1) AND i.indpred IS NULL GROUP BY i.indexrelid",
            )
            .bind(&table)
            .fetch_all(&self.pool)
            .await
            .op("listing the source table's indexes")?;
            findings.extend(index_findings(&self.source, &indexes, true));
            if let Err(e) = self.sql().await {
                findings.push(Finding::Error(e.to_string()));
            }
        }
        findings.push(migration_finding(self.pending_migrations().await?));
        Ok(findings)
    }

    async fn eligible(&self, p: ClaimParams<'_>) -> Result<Vec<IdleSession>> {
        let sql = self.sql().await?;
        let rows = self
            .bind_eligible(&sql.eligible, &p)
            .bind(i64::from(p.limit))
            .fetch_all(&self.pool)
            .await
            .op("listing eligible sessions")?;
        Ok(rows
            .iter()
            .map(|r| IdleSession {
                token: r.get(0),
                member: r.get(1),
                idle_for: r
                    .get::<Option<DateTime<Utc>>, _>(2)
                    .and_then(|t| (p.now - t).to_std().ok())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn count_eligible(&self, p: ClaimParams<'_>) -> Result<u64> {
        let sql = self.sql().await?;
        let n: i64 = self
            .bind_eligible(&sql.count, &p)
            .fetch_one(&self.pool)
            .await
            .op("counting eligible sessions")?
            .get(0);
        Ok(n as u64)
    }

    async fn claim(&self, p: ClaimParams<'_>) -> Result<Vec<Lease>> {
        let sql = self.sql().await?;
        let rows = self
            .bind_eligible(&sql.claim, &p)
            .bind(i64::from(p.limit))
            .bind(p.worker)
            .bind(p.lease_until)
            .fetch_all(&self.pool)
            .await
            .op("claiming sessions")?;
        Ok(rows
            .iter()
            .map(|r| Lease {
                token: r.get(0),
                member: r.get(1),
                attempts: r.get::<i32, _>(2) as u32,
            })
            .collect())
    }

    async fn explain_claim(&self, p: ClaimParams<'_>) -> Result<String> {
        let sql = format!("EXPLAIN {}", self.sql().await?.claim);
        let rows = self
            .bind_eligible(&sql, &p)
            .bind(i64::from(p.limit))
            .bind(p.worker)
            .bind(p.lease_until)
            .fetch_all(&self.pool)
            .await
            .op("explaining the claim")?;
        Ok(rows
            .iter()
            .map(|r| format!("{}\n", r.get::<String, _>(0)))
            .collect())
    }

    async fn skip_revived(&self, p: ClaimParams<'_>) -> Result<u64> {
        let sql = self.sql().await?;
        let done = self
            .bind_eligible(&sql.skip_revived, &p)
            .execute(&self.pool)
            .await
            .op("skipping revived sessions")?;
        Ok(done.rows_affected())
    }

    async fn recheck(
        &self,
        worker: &str,
        token: &str,
        idle_before: DateTime<Utc>,
    ) -> Result<Recheck> {
        let sql = self.sql().await?;
        let row = sqlx::query(&sql.recheck)
            .bind(worker)
            .bind(&self.source.active_value)
            .bind(idle_before)
            .bind(token)
            .fetch_optional(&self.pool)
            .await
            .op("rechecking a session")?;
        Ok(match row {
            None => Recheck::LeaseLost,
            Some(r) if r.get::<Option<bool>, _>(0) != Some(true) => Recheck::LeaseLost,
            Some(r) if r.get::<Option<bool>, _>(1) != Some(true) => Recheck::NoLongerEligible,
            Some(_) => Recheck::Eligible,
        })
    }

    async fn record(&self, worker: &str, now: DateTime<Utc>, batch: &[Settlement]) -> Result<u64> {
        if batch.is_empty() {
            return Ok(0);
        }
        let sql = self.sql().await?;
        let calls = batch
            .iter()
            .flat_map(|s| s.calls.iter().map(move |c| (s, c)));
        let mut a_token = Vec::new();
        let mut a_attempt = Vec::new();
        let mut a_cid = Vec::new();
        let mut a_outcome = Vec::new();
        let mut a_status = Vec::new();
        let mut a_code = Vec::new();
        let mut a_msg = Vec::new();
        let mut a_latency = Vec::new();
        let mut a_started = Vec::new();
        let mut a_finished = Vec::new();
        for (s, c) in calls {
            a_token.push(s.token.as_str());
            a_attempt.push(s.attempt as i32);
            a_cid.push(c.conversation_id.as_str());
            a_outcome.push(c.class);
            a_status.push(c.http_status.map(i32::from));
            a_code.push(c.error_code.as_deref());
            a_msg.push(c.error_message.as_deref());
            a_latency.push(c.latency.as_millis() as i32);
            a_started.push(c.started_at);
            a_finished.push(c.started_at + c.latency);
        }
        let mut l_token = Vec::new();
        let mut l_state = Vec::new();
        let mut l_attempts = Vec::new();
        let mut l_next = Vec::new();
        let mut l_code = Vec::new();
        let mut l_msg = Vec::new();
        for s in batch {
            l_token.push(s.token.as_str());
            match &s.decision {
                Decision::Settle {
                    outcome,
                    attempts,
                    next_attempt_at,
                    error_code,
                    error_message,
                } => {
                    l_state.push(Some(outcome.as_str()));
                    l_attempts.push(Some(*attempts as i32));
                    l_next.push(*next_attempt_at);
                    l_code.push(error_code.as_deref());
                    l_msg.push(error_message.as_deref());
                }
                Decision::Release => {
                    l_state.push(None);
                    l_attempts.push(None);
                    l_next.push(None);
                    l_code.push(None);
                    l_msg.push(None);
                }
            }
        }
        let mut tx = self.pool.begin().await.op("starting to record")?;
        if !a_token.is_empty() {
            sqlx::query(
                "INSERT INTO sweeper_attempts (session_token, attempt, worker_id, conversation_id, outcome, \
                 http_status, error_code, error_message, latency_ms, started_at, finished_at) \
                 SELECT t, a, $1, c, o, h, e, m, l, s, f FROM UNNEST($2::text[], $3::int4[], $4::text[], $5::text[], \
                 $6::int4[], $7::text[], $8::text[], $9::int4[], $10::timestamptz[], $11::timestamptz[]) \
                 AS u(t, a, c, o, h, e, m, l, s, f)",
            )
            .bind(worker)
            .bind(&a_token)
            .bind(&a_attempt)
            .bind(&a_cid)
            .bind(&a_outcome)
            .bind(&a_status)
            .bind(&a_code)
            .bind(&a_msg)
            .bind(&a_latency)
            .bind(&a_started)
            .bind(&a_finished)
            .execute(&mut *tx)
            .await
            .op("recording attempts")?;
        }
        let settled = sqlx::query(
            "UPDATE sweeper_sessions AS l SET \
             state = COALESCE(u.state, l.state), attempts = COALESCE(u.attempts, l.attempts), \
             next_attempt_at = CASE WHEN u.state IS NULL THEN l.next_attempt_at ELSE u.next_at END, \
             last_error_code = CASE WHEN u.state IS NULL THEN l.last_error_code ELSE u.code END, \
             last_error_message = CASE WHEN u.state IS NULL THEN l.last_error_message ELSE u.msg END, \
             lease_owner = NULL, lease_expires_at = NULL, updated_at = $7, \
             settled_at = CASE WHEN u.state IS NULL THEN l.settled_at WHEN u.state = 'pending' THEN NULL ELSE $7 END \
             FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::timestamptz[], $5::text[], $6::text[]) \
             AS u(token, state, attempts, next_at, code, msg) \
             WHERE l.session_token = u.token AND l.lease_owner = $8 \
             RETURNING l.session_token, u.state",
        )
        .bind(&l_token)
        .bind(&l_state)
        .bind(&l_attempts)
        .bind(&l_next)
        .bind(&l_code)
        .bind(&l_msg)
        .bind(now)
        .bind(worker)
        .fetch_all(&mut *tx)
        .await
        .op("settling sessions")?;
        if self.source.mark_passive {
            let passive: Vec<String> = settled
                .iter()
                .filter(|r| {
                    r.get::<Option<String>, _>(1)
                        .and_then(|s| Outcome::parse(&s))
                        .is_some_and(Outcome::marks_passive)
                })
                .map(|r| r.get(0))
                .collect();
            if !passive.is_empty() {
                sqlx::query(&sql.mark_passive)
                    .bind(&self.source.passive_value)
                    .bind(&passive)
                    .bind(&self.source.active_value)
                    .execute(&mut *tx)
                    .await
                    .op("marking sessions passive")?;
            }
        }
        tx.commit().await.op("committing recorded outcomes")?;
        Ok(settled.len() as u64)
    }

    async fn release_all(&self, worker: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE sweeper_sessions SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = $1",
        )
        .bind(worker)
        .execute(&self.pool)
        .await
        .op("releasing leases")?;
        Ok(done.rows_affected())
    }

    async fn renew_leases(&self, worker: &str, until: DateTime<Utc>) -> Result<u64> {
        let done =
            sqlx::query("UPDATE sweeper_sessions SET lease_expires_at = $1 WHERE lease_owner = $2")
                .bind(until)
                .bind(worker)
                .execute(&self.pool)
                .await
                .op("renewing leases")?;
        Ok(done.rows_affected())
    }

    async fn heartbeat(&self, worker: &WorkerInfo, now: DateTime<Utc>) -> Result<()> {
        sqlx::query(
            "INSERT INTO sweeper_workers (worker_id, hostname, pid, version, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
        )
        .bind(&worker.id)
        .bind(&worker.hostname)
        .bind(worker.pid as i32)
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(now)
        .execute(&self.pool)
        .await
        .op("recording a heartbeat")?;
        Ok(())
    }

    async fn live_workers(&self, stale_before: DateTime<Utc>) -> Result<u32> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sweeper_workers WHERE heartbeat_at > $1")
                .bind(stale_before)
                .fetch_one(&self.pool)
                .await
                .op("counting live workers")?;
        Ok(n as u32)
    }

    async fn workers_on_host(&self, hostname: &str) -> Result<Vec<WorkerRow>> {
        let rows = sqlx::query("SELECT worker_id, pid FROM sweeper_workers WHERE hostname = $1")
            .bind(hostname)
            .fetch_all(&self.pool)
            .await
            .op("listing workers")?;
        Ok(rows
            .iter()
            .map(|r| WorkerRow {
                id: r.get(0),
                pid: r.get::<i32, _>(1) as u32,
            })
            .collect())
    }

    async fn forget_worker(&self, worker: &str) -> Result<()> {
        sqlx::query("DELETE FROM sweeper_workers WHERE worker_id = $1")
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
             COUNT(*) FILTER (WHERE next_attempt_at IS NULL OR next_attempt_at <= $1) \
             FROM sweeper_sessions WHERE state = 'pending'",
        )
        .bind(now)
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
             FROM sweeper_sessions WHERE state = 'failed' ORDER BY settled_at DESC LIMIT $1",
        )
        .bind(i64::from(failures))
        .fetch_all(&self.pool)
        .await
        .op("listing failures")?;
        Ok(Report {
            counts,
            pending: PendingSummary {
                count: p.get::<i64, _>(0) as u64,
                next_due: p.get(1),
                due_now: p.get::<i64, _>(2) as u64,
            },
            leased: leased as u64,
            recent_failures: recent
                .iter()
                .map(|r| FailureRow {
                    session: fingerprint(&r.get::<String, _>(0)),
                    error_code: r.get(1),
                    error_message: r.get(2),
                    attempts: r.get::<i32, _>(3) as u32,
                    failed_at: r.get(4),
                })
                .collect(),
        })
    }

    async fn requeue(&self, filter: &RequeueFilter, now: DateTime<Utc>) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE sweeper_sessions SET state = 'pending', attempts = 0, next_attempt_at = NULL, \
             settled_at = NULL, updated_at = $1 WHERE state = 'failed' AND ($2::text IS NULL OR last_error_code = $2)",
        )
        .bind(now)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_type_names_pass() {
        for ok in ["uuid", "text", "character varying(64)", "character(36)"] {
            assert!(safe_type_name(ok), "{ok}");
        }
        for bad in ["text; DROP TABLE x", "text[]--", "\"x\"", ""] {
            assert!(!safe_type_name(bad), "{bad}");
        }
    }
}
