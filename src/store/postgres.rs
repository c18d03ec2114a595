//! PostgreSQL: claims lock source rows `FOR UPDATE SKIP LOCKED` and re-check the ledger under
//! `ON CONFLICT ... WHERE`, so any number of processes share one database and never hold the
//! same session at once. Batched writes go through `UNNEST` arrays: three statements per batch.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection as _, PgPool, Row};
use tokio::sync::OnceCell;

use super::{
    ClaimParams, FailureRow, Finding, IdleSession, IndexDialect, Lease, Migration, Op,
    PendingSummary, Recheck, Report, RequeueFilter, Result, Settlement, Store, StoreError,
    UnusableRows, WorkerInfo, WorkerRow, column_findings, count_rows, index_findings,
    ledger_blocks, migration_finding, naive_cutoff, naive_zone, newest_finding, trigger_warning,
    unusable_findings,
};
use crate::config::SourceConfig;
use crate::telemetry::fingerprint;

/// How long to wait for a pooled connection before reporting the database unreachable.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Serialises concurrent `migrate` runs (an arbitrary constant: "sweeper" on a phone keypad).
const MIGRATION_LOCK: i64 = 7_933_737;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "ledger",
        sql: include_str!("../../migrations/postgres/0001_ledger.sql"),
    },
    Migration {
        version: 2,
        name: "source_marked",
        sql: include_str!("../../migrations/postgres/0002_source_marked.sql"),
    },
];

/// The PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
    options: PgConnectOptions,
    source: SourceConfig,
    sql: OnceCell<Statements>,
}

/// How the last-activity column holds time.
#[derive(Debug, Clone, Copy)]
enum Activity {
    /// `timestamptz`: an instant; compared with an instant.
    Instant,
    /// `timestamp`: a wall-clock time in this zone; compared with the cutoff converted to it.
    Naive(chrono_tz::Tz),
}

/// SQL built once from validated identifiers and the columns' catalog types.
struct Statements {
    activity: Activity,
    claim: String,
    eligible: String,
    count: String,
    recheck: String,
    skip_revived: String,
    mark_passive: String,
    unusable: String,
    sample: String,
}

/// The database's clock minus a duration bound in milliseconds.
fn ago(param: &str) -> String {
    format!("now() - {param} * interval '1 millisecond'")
}

impl Statements {
    fn new(src: &SourceConfig, token_type: &str, activity: Activity) -> Self {
        let table = src.table.quoted();
        let tok = src.token_column.quoted();
        let mem = src.member_column.quoted();
        let status = src.status_column.quoted();
        let last = src.last_activity_column.quoted();
        // $1 active value, $2 idle cutoff, $3 staleness in ms. Rows with a NULL token or member
        // are never taken: there is nothing to send.
        let eligible_where = format!(
            "s.{status} = $1 AND s.{last} < $2 AND s.{tok} IS NOT NULL AND s.{mem} IS NOT NULL \
             AND s.{tok}::text <> '' AND s.{mem}::text <> '' \
             AND NOT EXISTS (SELECT 1 FROM sweeper_sessions l \
             WHERE l.session_token = s.{tok}::text AND {})",
            ledger_blocks("now()", &ago("$3"))
        );
        Self {
            activity,
            // Duplicate tokens collapse to one (DISTINCT ON): one session is never in flight
            // twice, and ON CONFLICT never meets the same key twice in one statement.
            claim: format!(
                "WITH candidates AS (SELECT s.{tok}::text AS token, s.{mem}::text AS member FROM {table} s \
                 WHERE {eligible_where} ORDER BY s.{last} LIMIT $4 FOR UPDATE OF s SKIP LOCKED), \
                 unique_candidates AS (SELECT DISTINCT ON (token) token, member FROM candidates ORDER BY token) \
                 INSERT INTO sweeper_sessions AS l (session_token, member_identifier, state, attempts, \
                 lease_owner, lease_expires_at, created_at, updated_at) \
                 SELECT token, member, 'pending', 0, $5, now() + $6 * interval '1 millisecond', now(), now() \
                 FROM unique_candidates \
                 ON CONFLICT (session_token) DO UPDATE SET lease_owner = EXCLUDED.lease_owner, \
                 lease_expires_at = EXCLUDED.lease_expires_at, updated_at = EXCLUDED.updated_at, state = 'pending' \
                 WHERE NOT {} \
                 RETURNING l.session_token, l.member_identifier, l.attempts",
                ledger_blocks("now()", &ago("$3"))
            ),
            eligible: format!(
                "SELECT s.{tok}::text, s.{mem}::text, s.{last} FROM {table} s \
                 WHERE {eligible_where} ORDER BY s.{last} LIMIT $4"
            ),
            count: format!(
                "SELECT COUNT(DISTINCT s.{tok}::text) FROM {table} s WHERE {eligible_where}"
            ),
            recheck: format!(
                "SELECT l.lease_owner = $1, {} FROM sweeper_sessions l WHERE l.session_token = $4",
                still_idle(&table, &tok, &status, &last, token_type, "$2", "$3")
            ),
            skip_revived: format!(
                "UPDATE sweeper_sessions AS l SET state = 'skipped', lease_owner = NULL, \
                 lease_expires_at = NULL, updated_at = now(), settled_at = now() \
                 WHERE l.state = 'pending' AND (l.next_attempt_at IS NULL OR l.next_attempt_at <= now()) \
                 AND NOT (l.lease_owner IS NOT NULL AND l.lease_expires_at > now() AND EXISTS \
                   (SELECT 1 FROM sweeper_workers w WHERE w.worker_id = l.lease_owner AND w.heartbeat_at > {})) \
                 AND NOT {}",
                ago("$3"),
                still_idle(&table, &tok, &status, &last, token_type, "$1", "$2")
            ),
            // Only rows still idle: a duplicate token touched a moment ago stays active.
            mark_passive: format!(
                "UPDATE {table} SET {status} = $1 WHERE {tok} = ANY(CAST($2 AS {token_type}[])) \
                 AND {status} = $3 AND {last} < $4"
            ),
            unusable: format!(
                "SELECT COUNT(*) FILTER (WHERE s.{last} IS NULL), \
                 COUNT(*) FILTER (WHERE s.{last} IS NOT NULL AND (s.{tok} IS NULL OR s.{mem} IS NULL \
                   OR s.{tok}::text = '' OR s.{mem}::text = '')) \
                 FROM {table} s WHERE s.{status} = $1"
            ),
            sample: format!(
                "SELECT max(s.{last})::text, min(s.{last})::text, \
                 (SELECT s2.{last} FROM {table} s2 WHERE s2.{status} = $1 AND s2.{last} IS NOT NULL \
                  ORDER BY s2.{last} DESC LIMIT 1) FROM {table} s WHERE s.{status} = $1"
            ),
        }
    }
}

/// The session behind `l` is still idle: some active row with its token is idle, and none is
/// live (a duplicate token touched a moment ago makes the whole session live).
fn still_idle(
    table: &str,
    tok: &str,
    status: &str,
    last: &str,
    token_type: &str,
    active: &str,
    cutoff: &str,
) -> String {
    let same = format!("s.{tok} = CAST(l.session_token AS {token_type})");
    format!(
        "(EXISTS (SELECT 1 FROM {table} s WHERE {same} AND s.{status} = {active} AND s.{last} < {cutoff}) \
         AND NOT EXISTS (SELECT 1 FROM {table} s WHERE {same} AND s.{status} = {active} \
           AND NOT COALESCE(s.{last} < {cutoff}, FALSE)))"
    )
}

/// A catalog type name is interpolated into SQL, so it must look like one (`uuid`,
/// `character varying(64)`, `text`), never anything else.
fn safe_type_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() < 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _(),".contains(c))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
            .connect_lazy_with(options.clone());
        Ok(Self {
            pool,
            options,
            source,
            sql: OnceCell::new(),
        })
    }

    async fn sql(&self) -> Result<&Statements> {
        self.sql
            .get_or_try_init(|| async {
                let missing = |key: &str, col: &crate::config::SqlIdent| {
                    StoreError::Schema(format!(
                        "{key}: column {col} not found in {} (run `session-sweeper check`)",
                        self.source.table
                    ))
                };
                let t = self
                    .column_type(self.source.token_column.name())
                    .await?
                    .ok_or_else(|| missing("source.token_column", &self.source.token_column))?;
                if !safe_type_name(&t) {
                    return Err(StoreError::Schema(format!(
                        "source.token_column: unsupported column type {t:?}"
                    )));
                }
                let a = self
                    .column_type(self.source.last_activity_column.name())
                    .await?
                    .ok_or_else(|| {
                        missing(
                            "source.last_activity_column",
                            &self.source.last_activity_column,
                        )
                    })?;
                let activity = self.activity(&a).await?;
                Ok(Statements::new(&self.source, &t, activity))
            })
            .await
    }

    /// How the last-activity column of type `t` is compared, or why it cannot be.
    async fn activity(&self, t: &str) -> Result<Activity> {
        match t {
            "timestamp with time zone" => Ok(Activity::Instant),
            "timestamp without time zone" => {
                let zone = self.database_zone().await?;
                let what = format!(
                    "{} (timestamp without time zone)",
                    self.source.last_activity_column
                );
                Ok(Activity::Naive(naive_zone(
                    self.source.last_activity_timezone,
                    &zone,
                    &what,
                )?))
            }
            other => Err(StoreError::Schema(format!(
                "source.last_activity_column: {} is of type {other}; PostgreSQL sources need \
                 timestamp or timestamptz",
                self.source.last_activity_column
            ))),
        }
    }

    /// The zone the database itself runs in, as the application's sessions see it: the
    /// per-database or per-role setting, else the server's. (Our own sessions run in UTC, so
    /// our `TimeZone` says nothing about theirs.)
    async fn database_zone(&self) -> Result<String> {
        let configured: Option<String> = sqlx::query_scalar(
            "SELECT substring(c FROM position('=' IN c) + 1) FROM pg_db_role_setting s, unnest(s.setconfig) c \
             WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database())) \
             AND s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = current_user)) \
             AND lower(c) LIKE 'timezone=%' \
             ORDER BY (s.setdatabase <> 0 AND s.setrole <> 0) DESC, (s.setrole <> 0) DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .op("reading the database's time zone")?;
        if let Some(zone) = configured {
            return Ok(zone);
        }
        // The server's setting; `pg_file_settings` needs a privileged role, `log_timezone` is
        // written beside `timezone` by initdb and is readable by anyone.
        let from_file: Option<String> = sqlx::query_scalar(
            "SELECT setting FROM pg_file_settings WHERE name = 'timezone' AND applied \
             ORDER BY seqno DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .unwrap_or(None);
        match from_file {
            Some(zone) => Ok(zone),
            None => {
                sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = 'log_timezone'")
                    .fetch_one(&self.pool)
                    .await
                    .op("reading the server's time zone")
            }
        }
    }

    async fn column_type(&self, column: &str) -> Result<Option<String>> {
        sqlx::query_scalar(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
        )
        .bind(self.source.table.quoted())
        .bind(column)
        .fetch_optional(&self.pool)
        .await
        .op("reading a source column's type")
    }

    fn bind_eligible<'q>(
        &self,
        sql: &'q Statements,
        text: &'q str,
        p: &ClaimParams<'_>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let q = sqlx::query(text).bind(self.source.active_value.clone());
        let q = bind_cutoff(q, sql.activity, p.idle_before);
        q.bind(millis(p.stale_after))
    }

    /// The source relation's kind as `pg_class.relkind` says it (`r` table, `v` view, `m`
    /// materialised view, `p` partitioned table, ...); `None` when it does not exist.
    async fn relation_kind(&self) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
            .bind(self.source.table.quoted())
            .fetch_optional(&self.pool)
            .await
            .op("reading the source table's kind")
    }

    /// Whether the status column can be written: privileges, and for a view its updatability.
    async fn status_findings(&self) -> Result<Vec<Finding>> {
        if !self.source.mark_passive {
            return Ok(vec![]);
        }
        let row = sqlx::query(
            "SELECT has_column_privilege(to_regclass($1), $2, 'UPDATE'), \
             pg_relation_is_updatable(to_regclass($1), false), \
             COALESCE(pg_column_is_updatable(to_regclass($1), \
               (SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2), false), false), \
             (SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal \
               AND (tgtype & 2) <> 0 AND (tgtype & 16) <> 0) \
             FROM pg_class c WHERE c.oid = to_regclass($1)",
        )
        .bind(self.source.table.quoted())
        .bind(self.source.status_column.name())
        .fetch_optional(&self.pool)
        .await
        .op("checking the status column's privileges")?;
        let Some(row) = row else { return Ok(vec![]) };
        let may_update: bool = row.try_get(0).unwrap_or(false);
        let updatable: i32 = row.try_get(1).unwrap_or(0);
        let column_updatable: bool = row.try_get(2).unwrap_or(false);
        let before_update_triggers: i64 = row.try_get(3).unwrap_or(0);
        let mut out = Vec::new();
        if before_update_triggers > 0 {
            out.push(trigger_warning(&self.source));
        }
        // Bit 2 (4) of pg_relation_is_updatable: UPDATE.
        out.push(if !may_update || updatable & 4 == 0 || !column_updatable {
            Finding::Error(format!(
                "source.status_column: {} in {} cannot be updated by this role ({}); grant \
                 UPDATE ({}) ON {} or set source.mark_passive = false",
                self.source.status_column,
                self.source.table,
                if !may_update {
                    "no UPDATE privilege"
                } else if updatable & 4 == 0 {
                    "the relation is not updatable"
                } else {
                    "the column is computed by a view"
                },
                self.source.status_column.quoted(),
                self.source.table.quoted(),
            ))
        } else {
            Finding::Ok(format!(
                "{} can be set to the passive value",
                self.source.status_column
            ))
        });
        Ok(out)
    }

    /// Type, zone and the newest and oldest active values of the last-activity column.
    async fn timestamp_findings(&self) -> Result<Vec<Finding>> {
        let sql = match self.sql().await {
            Ok(sql) => sql,
            Err(e) => return Ok(vec![Finding::Error(e.to_string())]),
        };
        let row = sqlx::query(&sql.sample)
            .bind(&self.source.active_value)
            .fetch_one(&self.pool)
            .await
            .op("sampling last-activity values")?;
        let newest = match sql.activity {
            Activity::Instant => row.try_get::<Option<DateTime<Utc>>, _>(2).ok().flatten(),
            Activity::Naive(tz) => row
                .try_get::<Option<chrono::NaiveDateTime>, _>(2)
                .ok()
                .flatten()
                .and_then(|n| n.and_local_timezone(tz).latest())
                .map(|t| t.with_timezone(&Utc)),
        };
        let mut out = vec![Finding::Ok(format!(
            "{} is {}; newest active {}, oldest {}",
            self.source.last_activity_column,
            match sql.activity {
                Activity::Instant => "timestamptz (an instant)".to_owned(),
                Activity::Naive(tz) => format!("timestamp read in {tz}"),
            },
            row.try_get::<Option<String>, _>(0)
                .ok()
                .flatten()
                .unwrap_or_else(|| "none".into()),
            row.try_get::<Option<String>, _>(1)
                .ok()
                .flatten()
                .unwrap_or_else(|| "none".into()),
        ))];
        out.push(newest_finding(
            newest,
            self.database_time().await?,
            self.source.idle_after,
        ));
        Ok(out)
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

/// Binds the idle cutoff as the column compares: an instant, or the wall-clock time in the
/// column's zone (converted here, so the column is compared as stored and its index serves).
fn bind_cutoff<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    activity: Activity,
    idle_before: DateTime<Utc>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    match activity {
        Activity::Instant => q.bind(idle_before),
        Activity::Naive(tz) => q.bind(naive_cutoff(tz, idle_before)),
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
        Ok(super::pending(MIGRATIONS, &applied))
    }

    async fn check(&self) -> Result<Vec<Finding>> {
        let table = self.source.table.quoted();
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        )
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
            // Whatever `mark_passive` says: a view cannot be indexed, so it is never offered
            // an index (a materialised view can be, and is).
            if self.relation_kind().await?.as_deref() == Some("v") {
                findings.push(super::view_finding(&self.source));
            } else {
                findings.extend(index_findings(
                    &self.source,
                    &indexes,
                    IndexDialect::Postgres,
                ));
            }
            findings.extend(self.status_findings().await?);
            let timestamps = self.timestamp_findings().await?;
            let usable = !timestamps.iter().any(Finding::is_error);
            findings.extend(timestamps);
            if usable {
                findings.extend(unusable_findings(self.unusable_rows().await?, &self.source));
            }
        }
        findings.push(migration_finding(self.pending_migrations().await?));
        Ok(findings)
    }

    async fn eligible(&self, p: ClaimParams<'_>) -> Result<Vec<IdleSession>> {
        let sql = self.sql().await?;
        let rows = self
            .bind_eligible(sql, &sql.eligible, &p)
            .bind(i64::from(p.limit))
            .fetch_all(&self.pool)
            .await
            .op("listing eligible sessions")?;
        let now = self.database_time().await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let last = match sql.activity {
                    Activity::Instant => r.try_get::<DateTime<Utc>, _>(2).ok()?,
                    Activity::Naive(tz) => r
                        .try_get::<chrono::NaiveDateTime, _>(2)
                        .ok()?
                        .and_local_timezone(tz)
                        .latest()?
                        .with_timezone(&Utc),
                };
                Some(IdleSession {
                    token: r.try_get(0).ok()?,
                    member: r.try_get(1).ok()?,
                    idle_for: (now - last).to_std().unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn count_eligible(&self, p: ClaimParams<'_>) -> Result<u64> {
        let sql = self.sql().await?;
        let n: i64 = self
            .bind_eligible(sql, &sql.count, &p)
            .fetch_one(&self.pool)
            .await
            .op("counting eligible sessions")?
            .try_get(0)
            .op("counting eligible sessions")?;
        Ok(n as u64)
    }

    async fn claim(&self, p: ClaimParams<'_>) -> Result<Vec<Lease>> {
        let sql = self.sql().await?;
        let rows = self
            .bind_eligible(sql, &sql.claim, &p)
            .bind(i64::from(p.limit))
            .bind(p.worker)
            .bind(millis(p.lease))
            .fetch_all(&self.pool)
            .await
            .op("claiming sessions")?;
        rows.iter()
            .map(|r| {
                Ok(Lease {
                    token: r.try_get(0).op("reading a claimed session")?,
                    member: r.try_get(1).op("reading a claimed session")?,
                    attempts: r.try_get::<i32, _>(2).op("reading a claimed session")? as u32,
                })
            })
            .collect()
    }

    async fn explain_claim(&self, p: ClaimParams<'_>) -> Result<String> {
        let sql = self.sql().await?;
        let text = format!("EXPLAIN {}", sql.claim);
        let rows = self
            .bind_eligible(sql, &text, &p)
            .bind(i64::from(p.limit))
            .bind(p.worker)
            .bind(millis(p.lease))
            .fetch_all(&self.pool)
            .await
            .op("explaining the claim")?;
        Ok(rows
            .iter()
            .map(|r| format!("{}\n", r.try_get::<String, _>(0).unwrap_or_default()))
            .collect())
    }

    async fn skip_revived(&self, p: ClaimParams<'_>) -> Result<u64> {
        let sql = self.sql().await?;
        let done = self
            .bind_eligible(sql, &sql.skip_revived, &p)
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
        let q = sqlx::query(&sql.recheck)
            .bind(worker)
            .bind(&self.source.active_value);
        let row = bind_cutoff(q, sql.activity, idle_before)
            .bind(token)
            .fetch_optional(&self.pool)
            .await
            .op("rechecking a session")?;
        let flag = |r: &sqlx::postgres::PgRow, i| r.try_get::<Option<bool>, _>(i).ok().flatten();
        Ok(match row {
            None => Recheck::LeaseLost,
            Some(r) if flag(&r, 0) != Some(true) => Recheck::LeaseLost,
            Some(r) if flag(&r, 1) != Some(true) => Recheck::NoLongerEligible,
            Some(_) => Recheck::Eligible,
        })
    }

    async fn record(&self, worker: &str, batch: &[Settlement]) -> Result<Vec<String>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let attempts = AttemptColumns::of(batch);
        let ledger = LedgerColumns::of(batch);
        let mut tx = self.pool.begin().await.op("starting to record")?;
        if !attempts.token.is_empty() {
            attempts.insert(worker, &mut tx).await?;
        }
        let accepted = ledger
            .update(worker, self.source.mark_passive, &mut tx)
            .await?;
        tx.commit().await.op("committing recorded outcomes")?;
        Ok(accepted)
    }

    async fn mark_passive(&self, tokens: &[String], idle_before: DateTime<Utc>) -> Result<u64> {
        if tokens.is_empty() {
            return Ok(0);
        }
        let sql = self.sql().await?;
        let mut tx = self
            .pool
            .begin()
            .await
            .op("starting to mark sessions passive")?;
        let q = sqlx::query(&sql.mark_passive)
            .bind(&self.source.passive_value)
            .bind(tokens)
            .bind(&self.source.active_value);
        bind_cutoff(q, sql.activity, idle_before)
            .execute(&mut *tx)
            .await
            .op("marking sessions passive")?;
        let noted = sqlx::query(
            "UPDATE sweeper_sessions SET source_marked = TRUE WHERE session_token = ANY($1)",
        )
        .bind(tokens)
        .execute(&mut *tx)
        .await
        .op("noting marked sessions")?;
        tx.commit().await.op("committing marked sessions")?;
        Ok(noted.rows_affected())
    }

    async fn unmarked(&self, limit: u32) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT session_token FROM sweeper_sessions WHERE source_marked = FALSE LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .op("listing sessions whose source row is not marked")
    }

    async fn unusable_rows(&self) -> Result<UnusableRows> {
        let sql = self.sql().await?;
        let row = sqlx::query(&sql.unusable)
            .bind(&self.source.active_value)
            .fetch_one(&self.pool)
            .await
            .op("counting unusable source rows")?;
        Ok(UnusableRows {
            unreadable_last_activity: row.try_get::<i64, _>(0).unwrap_or_default() as u64,
            bad_source_row: row.try_get::<i64, _>(1).unwrap_or_default() as u64,
        })
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

    async fn renew_leases(&self, worker: &str, lease: Duration) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE sweeper_sessions SET lease_expires_at = now() + $1 * interval '1 millisecond' \
             WHERE lease_owner = $2",
        )
        .bind(millis(lease))
        .bind(worker)
        .execute(&self.pool)
        .await
        .op("renewing leases")?;
        Ok(done.rows_affected())
    }

    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<DateTime<Utc>> {
        sqlx::query_scalar(
            "INSERT INTO sweeper_workers (worker_id, hostname, pid, version, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, $4, clock_timestamp(), clock_timestamp()) \
             ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at \
             RETURNING heartbeat_at",
        )
        .bind(&worker.id)
        .bind(&worker.hostname)
        .bind(worker.pid as i32)
        .bind(env!("CARGO_PKG_VERSION"))
        .fetch_one(&self.pool)
        .await
        .op("recording a heartbeat")
    }

    async fn database_time(&self) -> Result<DateTime<Utc>> {
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await
            .op("reading the database's clock")
    }

    async fn live_workers(&self, stale_after: Duration) -> Result<u32> {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM sweeper_workers WHERE heartbeat_at > {}",
            ago("$1")
        ))
        .bind(millis(stale_after))
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
            .filter_map(|r| {
                Some(WorkerRow {
                    id: r.try_get(0).ok()?,
                    pid: r.try_get::<i32, _>(1).ok()? as u32,
                })
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

    async fn report(&self, failures: u32) -> Result<Report> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM sweeper_sessions GROUP BY state")
            .fetch_all(&self.pool)
            .await
            .op("counting outcomes")?;
        let counts = count_rows(rows.iter().filter_map(|r| {
            Some((
                r.try_get::<String, _>(0).ok()?,
                r.try_get::<i64, _>(1).ok()?,
            ))
        }));
        let p = sqlx::query(
            "SELECT COUNT(*), MIN(next_attempt_at), \
             COUNT(*) FILTER (WHERE next_attempt_at IS NULL OR next_attempt_at <= now()), \
             (SELECT COUNT(*) FROM sweeper_sessions WHERE lease_owner IS NOT NULL), \
             (SELECT COUNT(*) FROM sweeper_sessions WHERE source_marked = FALSE) \
             FROM sweeper_sessions WHERE state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await
        .op("summarising pending sessions")?;
        let recent = sqlx::query(
            "SELECT session_token, last_error_code, last_error_message, attempts, settled_at \
             FROM sweeper_sessions WHERE state = 'failed' ORDER BY settled_at DESC LIMIT $1",
        )
        .bind(i64::from(failures))
        .fetch_all(&self.pool)
        .await
        .op("listing failures")?;
        let n = |i| p.try_get::<i64, _>(i).unwrap_or_default() as u64;
        Ok(Report {
            counts,
            pending: PendingSummary {
                count: n(0),
                next_due: p.try_get(1).ok().flatten(),
                due_now: n(2),
            },
            leased: n(3),
            recent_failures: recent
                .iter()
                .map(|r| FailureRow {
                    session: fingerprint(&r.try_get::<String, _>(0).unwrap_or_default()),
                    error_code: r.try_get(1).ok().flatten(),
                    error_message: r.try_get(2).ok().flatten(),
                    attempts: r.try_get::<i32, _>(3).unwrap_or_default() as u32,
                    failed_at: r.try_get(4).ok().flatten(),
                })
                .collect(),
            source_not_marked: n(4),
            unusable: self.unusable_rows().await?,
        })
    }

    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE sweeper_sessions SET state = 'pending', attempts = 0, next_attempt_at = NULL, \
             settled_at = NULL, updated_at = now() WHERE state = 'failed' AND ($1::text IS NULL OR last_error_code = $1)",
        )
        .bind(&filter.error_code)
        .execute(&self.pool)
        .await
        .op("requeueing failed sessions")?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<()> {
        // A fresh connection, not the pool: the pool retries a refused connection until its
        // acquire timeout and then says only "timed out".
        let mut conn =
            tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&self.options))
                .await
                .map_err(|_| StoreError::Database {
                    op: "connecting to the database",
                    source: sqlx::Error::PoolTimedOut,
                })?
                .op("connecting to the database")?;
        conn.ping().await.op("pinging the database")?;
        let _ = conn.close().await;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn status(&self, failures: u32) -> Result<super::StatusData> {
        use super::{
            FailureGroup, MinuteCount, PendingByDue, STATUS_CALL_ROWS, STATUS_FAILURE_CODES,
            STATUS_WORKERS, StatusData, WorkerStatus,
        };
        let report = self.report(failures).await?;
        // The newest rows by primary key, at most STATUS_CALL_ROWS of them, within the day.
        let calls = sqlx::query(
            "SELECT date_trunc('minute', finished_at), outcome, COUNT(*) FROM sweeper_attempts \
             WHERE id > (SELECT COALESCE(MAX(id), 0) FROM sweeper_attempts) - $1 \
             AND finished_at >= now() - interval '1 day' GROUP BY 1, 2",
        )
        .bind(STATUS_CALL_ROWS)
        .fetch_all(&self.pool)
        .await
        .op("counting calls per minute")?;
        let ends = sqlx::query(
            "SELECT now(), (SELECT finished_at FROM sweeper_attempts ORDER BY id DESC LIMIT 1), \
             (SELECT finished_at FROM sweeper_attempts WHERE id <= \
               (SELECT COALESCE(MAX(id), 0) FROM sweeper_attempts) - $1 \
               AND finished_at >= now() - interval '1 day' ORDER BY id DESC LIMIT 1)",
        )
        .bind(STATUS_CALL_ROWS)
        .fetch_one(&self.pool)
        .await
        .op("reading the newest call")?;
        let workers = sqlx::query(
            "SELECT w.worker_id, w.hostname, w.pid, w.version, w.started_at, w.heartbeat_at, \
             (SELECT COUNT(*) FROM sweeper_sessions l WHERE l.lease_owner = w.worker_id) \
             FROM sweeper_workers w ORDER BY w.heartbeat_at DESC LIMIT $1",
        )
        .bind(STATUS_WORKERS)
        .fetch_all(&self.pool)
        .await
        .op("listing workers")?;
        let groups = sqlx::query(
            "SELECT last_error_code, MAX(last_error_message), COUNT(*), MAX(settled_at) \
             FROM sweeper_sessions WHERE state = 'failed' GROUP BY last_error_code \
             ORDER BY COUNT(*) DESC, last_error_code LIMIT $1",
        )
        .bind(STATUS_FAILURE_CODES)
        .fetch_all(&self.pool)
        .await
        .op("grouping failures")?;
        let due = sqlx::query(
            "SELECT \
             COUNT(*) FILTER (WHERE next_attempt_at IS NULL OR next_attempt_at <= now()), \
             COUNT(*) FILTER (WHERE next_attempt_at > now() AND next_attempt_at <= now() + interval '1 minute'), \
             COUNT(*) FILTER (WHERE next_attempt_at > now() + interval '1 minute' AND next_attempt_at <= now() + interval '5 minutes'), \
             COUNT(*) FILTER (WHERE next_attempt_at > now() + interval '5 minutes' AND next_attempt_at <= now() + interval '15 minutes'), \
             COUNT(*) FILTER (WHERE next_attempt_at > now() + interval '15 minutes' AND next_attempt_at <= now() + interval '1 hour'), \
             COUNT(*) FILTER (WHERE next_attempt_at > now() + interval '1 hour') \
             FROM sweeper_sessions WHERE state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await
        .op("grouping pending sessions by due time")?;
        let n =
            |r: &sqlx::postgres::PgRow, i: usize| r.try_get::<i64, _>(i).unwrap_or_default() as u64;
        Ok(StatusData {
            report,
            now: ends.try_get(0).op("reading the database time")?,
            calls: calls
                .iter()
                .filter_map(|r| {
                    Some(MinuteCount {
                        minute: r.try_get(0).ok()?,
                        class: r.try_get(1).ok()?,
                        count: n(r, 2),
                    })
                })
                .collect(),
            calls_cover_from: ends.try_get(2).ok().flatten(),
            last_call_at: ends.try_get(1).ok().flatten(),
            workers: workers
                .iter()
                .filter_map(|r| {
                    Some(WorkerStatus {
                        id: r.try_get(0).ok()?,
                        hostname: r.try_get(1).ok()?,
                        pid: r.try_get::<i32, _>(2).ok()? as u32,
                        version: r.try_get(3).ok()?,
                        started_at: r.try_get(4).ok()?,
                        heartbeat_at: r.try_get(5).ok()?,
                        leased: n(r, 6),
                    })
                })
                .collect(),
            failures_by_code: groups
                .iter()
                .map(|r| FailureGroup {
                    error_code: r.try_get(0).ok().flatten(),
                    error_message: r.try_get(1).ok().flatten(),
                    count: n(r, 2),
                    last_failed_at: r.try_get(3).ok().flatten(),
                })
                .collect(),
            pending_by_due: PendingByDue {
                now: n(&due, 0),
                within_1m: n(&due, 1),
                within_5m: n(&due, 2),
                within_15m: n(&due, 3),
                within_1h: n(&due, 4),
                later: n(&due, 5),
            },
        })
    }
}

/// The attempt log of one batch as `UNNEST` arrays: one statement text whatever the batch size.
#[derive(Default)]
struct AttemptColumns<'a> {
    token: Vec<&'a str>,
    attempt: Vec<i32>,
    conversation: Vec<&'a str>,
    outcome: Vec<&'a str>,
    status: Vec<Option<i32>>,
    code: Vec<Option<&'a str>>,
    message: Vec<Option<&'a str>>,
    latency: Vec<i32>,
    started: Vec<DateTime<Utc>>,
    finished: Vec<DateTime<Utc>>,
}

impl<'a> AttemptColumns<'a> {
    fn of(batch: &'a [Settlement]) -> Self {
        let mut c = Self::default();
        for s in batch {
            for call in &s.calls {
                c.token.push(&s.token);
                c.attempt.push(s.attempt as i32);
                c.conversation.push(&call.conversation_id);
                c.outcome.push(call.class);
                c.status.push(call.http_status.map(i32::from));
                c.code.push(call.error_code.as_deref());
                c.message.push(call.error_message.as_deref());
                c.latency.push(call.latency.as_millis() as i32);
                c.started.push(call.started_at);
                c.finished.push(call.started_at + call.latency);
            }
        }
        c
    }

    async fn insert(&self, worker: &str, tx: &mut sqlx::PgConnection) -> Result<()> {
        sqlx::query(
            "INSERT INTO sweeper_attempts (session_token, attempt, worker_id, conversation_id, outcome, \
             http_status, error_code, error_message, latency_ms, started_at, finished_at) \
             SELECT t, a, $1, c, o, h, e, m, l, s, f FROM UNNEST($2::text[], $3::int4[], $4::text[], $5::text[], \
             $6::int4[], $7::text[], $8::text[], $9::int4[], $10::timestamptz[], $11::timestamptz[]) \
             AS u(t, a, c, o, h, e, m, l, s, f)",
        )
        .bind(worker)
        .bind(&self.token)
        .bind(&self.attempt)
        .bind(&self.conversation)
        .bind(&self.outcome)
        .bind(&self.status)
        .bind(&self.code)
        .bind(&self.message)
        .bind(&self.latency)
        .bind(&self.started)
        .bind(&self.finished)
        .execute(tx)
        .await
        .op("recording attempts")?;
        Ok(())
    }
}

/// The ledger changes of one batch as `UNNEST` arrays (a NULL state: release the lease only).
#[derive(Default)]
struct LedgerColumns<'a> {
    token: Vec<&'a str>,
    state: Vec<Option<&'static str>>,
    attempts: Vec<Option<i32>>,
    retry_ms: Vec<Option<i64>>,
    code: Vec<Option<&'a str>>,
    message: Vec<Option<&'a str>>,
}

impl<'a> LedgerColumns<'a> {
    fn of(batch: &'a [Settlement]) -> Self {
        let mut c = Self::default();
        for s in batch {
            let f = super::FlatDecision::of(&s.decision);
            c.token.push(&s.token);
            c.state.push(f.state);
            c.attempts.push(f.attempts.map(|a| a as i32));
            c.retry_ms.push(f.retry_in.map(millis));
            c.code.push(f.error_code);
            c.message.push(f.error_message);
        }
        c
    }

    /// Settles the rows whose lease `worker` still holds; returns their tokens.
    async fn update(
        &self,
        worker: &str,
        mark_passive: bool,
        tx: &mut sqlx::PgConnection,
    ) -> Result<Vec<String>> {
        // An invalidated session owes its source update until `mark_passive` has done it.
        let owed = if mark_passive { "FALSE" } else { "NULL" };
        sqlx::query_scalar(&format!(
            "UPDATE sweeper_sessions AS l SET \
             state = COALESCE(u.state, l.state), attempts = COALESCE(u.attempts, l.attempts), \
             next_attempt_at = CASE WHEN u.state IS NULL THEN l.next_attempt_at \
               ELSE now() + u.retry_ms * interval '1 millisecond' END, \
             last_error_code = CASE WHEN u.state IS NULL THEN l.last_error_code ELSE u.code END, \
             last_error_message = CASE WHEN u.state IS NULL THEN l.last_error_message ELSE u.msg END, \
             source_marked = CASE WHEN u.state IN ('invalidated', 'already_invalidated') THEN {owed} \
               ELSE l.source_marked END, \
             lease_owner = NULL, lease_expires_at = NULL, updated_at = now(), \
             settled_at = CASE WHEN u.state IS NULL THEN l.settled_at WHEN u.state = 'pending' THEN NULL ELSE now() END \
             FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[]) \
             AS u(token, state, attempts, retry_ms, code, msg) \
             WHERE l.session_token = u.token AND l.lease_owner = $7 \
             RETURNING l.session_token"
        ))
        .bind(&self.token)
        .bind(&self.state)
        .bind(&self.attempts)
        .bind(&self.retry_ms)
        .bind(&self.code)
        .bind(&self.message)
        .bind(worker)
        .fetch_all(tx)
        .await
        .op("settling sessions")
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
