//! SQLite: one file, WAL mode, a busy timeout so a second process waits instead of failing, and
//! `BEGIN IMMEDIATE` around every write so two processes never claim the same session.
//! The sweeper's own timestamps are Unix milliseconds of the one host's clock, which every
//! worker on the file shares.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};

use super::{
    BAD_SOURCE_ROW, ClaimParams, EARLIEST_PLAUSIBLE_UNIX_SECONDS, FailureRow, Finding, IdleSession,
    IndexDialect, Lease, Migration, Op, PendingSummary, Recheck, Report, RequeueFilter, Result,
    SampleValue, Settlement, Store, UnusableRows, WorkerInfo, WorkerRow, column_findings,
    count_rows, format_findings, index_findings, ledger_blocks, migration_finding, naive_cutoff,
    newest_finding, parse_rfc3339_utc, parse_sqlite_text, unusable_findings,
};
use crate::config::{SourceConfig, TimestampFormat};
use crate::telemetry::fingerprint;

/// Sessions per multi-row statement (11 parameters each stays far below SQLite's limit).
const RECORD_CHUNK: usize = 80;
/// Tokens per `IN (...)` list when marking source rows.
const MARK_CHUNK: usize = 500;

/// How long a statement waits for another process's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "ledger",
        sql: include_str!("../../migrations/sqlite/0001_ledger.sql"),
    },
    Migration {
        version: 2,
        name: "source_marked",
        sql: include_str!("../../migrations/sqlite/0002_source_marked.sql"),
    },
];

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
    unusable: String,
    sample_newest: String,
    sample_oldest: String,
    token_column: String,
    status_column: String,
    table: String,
}

/// The condition under which a last-activity value fits the configured format, so that SQL can
/// compare it with the cutoff as stored (and an index can serve the comparison). A value that
/// does not fit is never eligible: integers sort before all text in SQLite, so without this a
/// column of Unix seconds would read as "idle since the dawn of time".
fn fits(col: &str, format: TimestampFormat) -> String {
    const DATE: &str = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]";
    const TIME: &str = "[0-9][0-9]:[0-9][0-9]:[0-9][0-9]";
    match format {
        // strftime() normalises or refuses impossible times (February 30th, hour 25): a value
        // that does not come back unchanged is no real time and is never eligible.
        TimestampFormat::SqliteText => format!(
            "(typeof({col}) = 'text' AND {col} >= '0' AND substr({col}, 1, 19) GLOB '{DATE} {TIME}' \
             AND strftime('%Y-%m-%d %H:%M:%S', substr({col}, 1, 19)) = substr({col}, 1, 19) \
             AND (length({col}) = 19 OR (substr({col}, 20, 1) = '.' AND length({col}) > 20 \
                  AND substr({col}, 21) NOT GLOB '*[^0-9]*')))"
        ),
        TimestampFormat::Rfc3339 => format!(
            "(typeof({col}) = 'text' AND {col} >= '0' AND substr({col}, 1, 19) GLOB '{DATE}T{TIME}' \
             AND strftime('%Y-%m-%dT%H:%M:%S', substr({col}, 1, 19)) = substr({col}, 1, 19) \
             AND (substr({col}, 20) IN ('Z', '+00:00') OR substr({col}, 20) GLOB '.[0-9]*Z' \
                  OR substr({col}, 20) GLOB '.[0-9]*+00:00'))"
        ),
        TimestampFormat::UnixSeconds => {
            format!("(typeof({col}) = 'integer' AND {col} >= {EARLIEST_PLAUSIBLE_UNIX_SECONDS})")
        }
        TimestampFormat::UnixMillis => format!(
            "(typeof({col}) = 'integer' AND {col} >= {})",
            EARLIEST_PLAUSIBLE_UNIX_SECONDS * 1000
        ),
    }
}

/// Tokens and members must be text or integers; a BLOB or a NULL is never sent.
fn readable(col: &str) -> String {
    format!("(typeof({col}) IN ('text', 'integer') AND {col} <> '')")
}

/// Source rows whose token is the ledger's `l.session_token`: by the index (as text, or as the
/// integer a column without text affinity stores), then exactly as text.
fn same_token(tok: &str) -> String {
    format!(
        "s.{tok} IN (l.session_token, CAST(l.session_token AS INTEGER)) \
         AND CAST(s.{tok} AS TEXT) = l.session_token"
    )
}

/// The session behind `l` is still idle: some active row with its token is idle, and none is
/// live (a duplicate token touched a moment ago makes the whole session live). A row whose time
/// cannot be read counts as live: ambiguous data is never sent.
fn still_idle(
    table: &str,
    tok: &str,
    status: &str,
    last: &str,
    fits: &str,
    active: &str,
    cutoff: &str,
) -> String {
    let same = same_token(tok);
    format!(
        "(EXISTS (SELECT 1 FROM {table} s WHERE {same} AND s.{status} = {active} AND s.{last} < {cutoff} AND {fits}) \
         AND NOT EXISTS (SELECT 1 FROM {table} s WHERE {same} AND s.{status} = {active} \
           AND NOT COALESCE(s.{last} < {cutoff} AND {fits}, 0)))"
    )
}

impl Statements {
    fn new(src: &SourceConfig) -> Self {
        let table = src.table.quoted();
        let tok = src.token_column.quoted();
        let mem = src.member_column.quoted();
        let status = src.status_column.quoted();
        let last = src.last_activity_column.quoted();
        let fits = fits(&format!("s.{last}"), src.last_activity_format);
        let usable = format!(
            "{fits} AND {} AND {}",
            readable(&format!("s.{tok}")),
            readable(&format!("s.{mem}"))
        );
        // ?1 active value, ?2 idle cutoff, ?3 now, ?4 stale cutoff.
        let eligible_where = format!(
            "s.{status} = ?1 AND s.{last} < ?2 AND {usable} AND NOT EXISTS \
             (SELECT 1 FROM sweeper_sessions l WHERE l.session_token = CAST(s.{tok} AS TEXT) AND {})",
            ledger_blocks("?3", "?4")
        );
        let sample = |order: &str| {
            format!(
                "SELECT s.{last}, typeof(s.{last}) FROM {table} s WHERE s.{status} = ?1 \
                 AND s.{last} IS NOT NULL ORDER BY s.{last} {order} LIMIT 1"
            )
        };
        Self {
            // Duplicate tokens in the source collapse to one claim (GROUP BY), so one session
            // is never in flight twice; the ledger row blocks the duplicates from then on.
            claim: format!(
                "INSERT INTO sweeper_sessions (session_token, member_identifier, state, attempts, \
                 lease_owner, lease_expires_at, created_at, updated_at) \
                 SELECT token, MIN(member), 'pending', 0, ?6, ?7, ?3, ?3 FROM \
                 (SELECT CAST(s.{tok} AS TEXT) AS token, CAST(s.{mem} AS TEXT) AS member FROM {table} s \
                  WHERE {eligible_where} ORDER BY s.{last} LIMIT ?5) WHERE true GROUP BY token \
                 ON CONFLICT (session_token) DO UPDATE SET lease_owner = excluded.lease_owner, \
                 lease_expires_at = excluded.lease_expires_at, updated_at = excluded.updated_at, \
                 state = 'pending' \
                 RETURNING CAST(session_token AS BLOB), CAST(member_identifier AS BLOB), attempts"
            ),
            eligible: format!(
                "SELECT CAST(s.{tok} AS BLOB), CAST(s.{mem} AS BLOB), s.{last} FROM {table} s \
                 WHERE {eligible_where} ORDER BY s.{last} LIMIT ?5"
            ),
            count: format!(
                "SELECT COUNT(DISTINCT CAST(s.{tok} AS TEXT)) FROM {table} s WHERE {eligible_where}"
            ),
            recheck: format!(
                "SELECT l.lease_owner = ?1, {} FROM sweeper_sessions l WHERE l.session_token = ?4",
                still_idle(&table, &tok, &status, &last, &fits, "?2", "?3")
            ),
            skip_revived: format!(
                "UPDATE sweeper_sessions AS l SET state = 'skipped', lease_owner = NULL, \
                 lease_expires_at = NULL, updated_at = ?3, settled_at = ?3 \
                 WHERE l.state = 'pending' AND (l.next_attempt_at IS NULL OR l.next_attempt_at <= ?3) \
                 AND NOT (l.lease_owner IS NOT NULL AND l.lease_expires_at > ?3 AND EXISTS \
                   (SELECT 1 FROM sweeper_workers w WHERE w.worker_id = l.lease_owner AND w.heartbeat_at > ?4)) \
                 AND NOT {}",
                still_idle(&table, &tok, &status, &last, &fits, "?1", "?2")
            ),
            unusable: format!(
                "SELECT COALESCE(SUM(CASE WHEN {fits} THEN 0 ELSE 1 END), 0), \
                 COALESCE(SUM(CASE WHEN {fits} AND NOT ({} AND {}) THEN 1 ELSE 0 END), 0) \
                 FROM {table} s WHERE s.{status} = ?1",
                readable(&format!("s.{tok}")),
                readable(&format!("s.{mem}"))
            ),
            sample_newest: sample("DESC"),
            sample_oldest: sample("ASC"),
            token_column: tok,
            status_column: status,
            table,
        }
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A cutoff in the source column's storage format.
enum Cutoff {
    Text(String),
    Int(i64),
}

/// Text from bytes SQLite handed back, or `None` when they are not UTF-8.
fn text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|b| String::from_utf8(b).ok())
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

    /// The zone naive text is read in: SQLite's own clock functions write UTC.
    fn zone(&self) -> chrono_tz::Tz {
        self.source.last_activity_timezone.unwrap_or(chrono_tz::UTC)
    }

    fn cutoff(&self, t: DateTime<Utc>) -> Cutoff {
        // Truncating to whole seconds only ever moves the cutoff earlier: never a live session.
        match self.source.last_activity_format {
            TimestampFormat::SqliteText => Cutoff::Text(
                naive_cutoff(self.zone(), t)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
            ),
            TimestampFormat::Rfc3339 => Cutoff::Text(t.format("%Y-%m-%dT%H:%M:%S").to_string()),
            TimestampFormat::UnixSeconds => Cutoff::Int(t.timestamp()),
            TimestampFormat::UnixMillis => Cutoff::Int(t.timestamp_millis()),
        }
    }

    /// The instant a stored value means in the configured format, if it fits.
    fn parse_activity(&self, v: &SampleValue) -> Option<DateTime<Utc>> {
        match (self.source.last_activity_format, v) {
            (TimestampFormat::SqliteText, SampleValue::Text(s)) => parse_sqlite_text(s)
                .and_then(|n| n.and_local_timezone(self.zone()).latest())
                .map(|t| t.with_timezone(&Utc)),
            (TimestampFormat::Rfc3339, SampleValue::Text(s)) => parse_rfc3339_utc(s),
            (TimestampFormat::UnixSeconds, SampleValue::Int(i)) => {
                Utc.timestamp_opt(*i, 0).single()
            }
            (TimestampFormat::UnixMillis, SampleValue::Int(i)) => {
                Utc.timestamp_millis_opt(*i).single()
            }
            _ => None,
        }
    }

    /// A stored value as `check` samples it.
    fn sample_value(row: &sqlx::sqlite::SqliteRow) -> SampleValue {
        let kind: String = row.try_get(1).unwrap_or_default();
        match kind.as_str() {
            "integer" => row
                .try_get(0)
                .map(SampleValue::Int)
                .unwrap_or_else(|_| SampleValue::Other(kind)),
            "text" => row
                .try_get(0)
                .map(SampleValue::Text)
                .unwrap_or_else(|_| SampleValue::Other("text that is not UTF-8".into())),
            _ => SampleValue::Other(kind),
        }
    }

    /// Binds ?1..?4 of the eligibility statements.
    fn bind_eligible<'q>(
        &self,
        sql: &'q str,
        p: &ClaimParams<'_>,
    ) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
        let now = Utc::now();
        let q = sqlx::query(sql).bind(self.source.active_value.clone());
        let q = match self.cutoff(p.idle_before) {
            Cutoff::Text(t) => q.bind(t),
            Cutoff::Int(i) => q.bind(i),
        };
        q.bind(ms(now)).bind(ms(now) - millis(p.stale_after))
    }

    async fn table_columns(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT name FROM pragma_table_info(?1, ?2)")
            .bind(self.source.table.name())
            .bind(self.source.table.schema().unwrap_or("main"))
            .fetch_all(&self.pool)
            .await
            .op("reading the source table's columns")?;
        Ok(rows
            .iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect())
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
            let name: String = n.try_get(0).unwrap_or_default();
            let cols = sqlx::query("SELECT name FROM pragma_index_info(?1, ?2) ORDER BY seqno")
                .bind(&name)
                .bind(schema)
                .fetch_all(&self.pool)
                .await
                .op("reading an index of the source table")?;
            out.push(
                cols.iter()
                    .map(|r| {
                        r.try_get::<Option<String>, _>(0)
                            .ok()
                            .flatten()
                            .unwrap_or_default()
                    })
                    .collect(),
            );
        }
        Ok(out)
    }

    /// Whether the source is a view, whether a view has an `INSTEAD OF UPDATE` trigger, and
    /// whether a `BEFORE UPDATE` trigger might refuse the status update.
    async fn view_facts(&self) -> Result<(bool, bool, bool)> {
        let schema = self.source.table.schema().unwrap_or("main");
        // `schema` is a validated identifier; the catalog of an attached schema is addressed
        // through it.
        let rows = sqlx::query(&format!(
            "SELECT type, COALESCE(sql, '') FROM \"{schema}\".sqlite_master \
             WHERE (type = 'view' AND name = ?1) OR (type = 'trigger' AND tbl_name = ?1)"
        ))
        .bind(self.source.table.name())
        .fetch_all(&self.pool)
        .await
        .op("reading the source table's kind")?;
        let is_view = rows
            .iter()
            .any(|r| r.try_get::<String, _>(0).is_ok_and(|t| t == "view"));
        let instead_of_update = rows.iter().any(|r| {
            r.try_get::<String, _>(1)
                .is_ok_and(|sql| sql.to_ascii_uppercase().contains("INSTEAD OF UPDATE"))
        });
        let before_update = rows.iter().any(|r| {
            r.try_get::<String, _>(1).is_ok_and(|sql| {
                let sql = sql.to_ascii_uppercase();
                sql.contains("BEFORE UPDATE") && sql.contains("RAISE")
            })
        });
        Ok((is_view, instead_of_update, before_update))
    }

    /// Samples the newest and oldest active last-activity values.
    async fn timestamp_findings(&self) -> Result<Vec<Finding>> {
        let mut samples = Vec::new();
        for (which, sql) in [
            ("newest", &self.sql.sample_newest),
            ("oldest", &self.sql.sample_oldest),
        ] {
            if let Some(row) = sqlx::query(sql)
                .bind(&self.source.active_value)
                .fetch_optional(&self.pool)
                .await
                .op("sampling last-activity values")?
            {
                samples.push((which, Self::sample_value(&row)));
            }
        }
        let mut findings = format_findings(self.source.last_activity_format, &samples);
        let newest = samples
            .iter()
            .find(|(w, _)| *w == "newest")
            .and_then(|(_, v)| self.parse_activity(v));
        if !findings.iter().any(Finding::is_error) {
            findings.push(newest_finding(newest, Utc::now(), self.source.idle_after));
        }
        Ok(findings)
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

    /// One chunk of a batch: attempt rows, then the ledger rows we still hold.
    async fn record_chunk(
        &self,
        tx: &mut sqlx::SqliteConnection,
        worker: &str,
        now: i64,
        chunk: &[Settlement],
    ) -> Result<Vec<String>> {
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
        // An invalidated session owes its source update until `mark_passive` has done it.
        let owed = if self.source.mark_passive {
            "0"
        } else {
            "NULL"
        };
        // A NULL state releases the lease and leaves everything else as it was.
        let mut q = QueryBuilder::<Sqlite>::new(format!(
            "UPDATE sweeper_sessions SET \
             state = COALESCE(u.column2, state), attempts = COALESCE(u.column3, attempts), \
             next_attempt_at = CASE WHEN u.column2 IS NULL THEN next_attempt_at ELSE u.column4 END, \
             last_error_code = CASE WHEN u.column2 IS NULL THEN last_error_code ELSE u.column5 END, \
             last_error_message = CASE WHEN u.column2 IS NULL THEN last_error_message ELSE u.column6 END, \
             source_marked = CASE WHEN u.column2 IN ('invalidated', 'already_invalidated') THEN {owed} \
               ELSE source_marked END, \
             lease_owner = NULL, lease_expires_at = NULL, updated_at = "
        ));
        q.push_bind(now);
        q.push(", settled_at = CASE WHEN u.column2 IS NULL THEN settled_at WHEN u.column2 = 'pending' THEN NULL ELSE ");
        q.push_bind(now);
        q.push(" END FROM (");
        q.push_values(chunk, |mut row, s| {
            let f = super::FlatDecision::of(&s.decision);
            row.push_bind(&s.token)
                .push_bind(f.state)
                .push_bind(f.attempts.map(i64::from))
                .push_bind(f.retry_in.map(|d| now.saturating_add(millis(d))))
                .push_bind(f.error_code)
                .push_bind(f.error_message);
        });
        q.push(") AS u WHERE sweeper_sessions.session_token = u.column1 AND sweeper_sessions.lease_owner = ");
        q.push_bind(worker);
        q.push(" RETURNING session_token");
        q.build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .op("settling sessions")
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
        Ok(super::pending(MIGRATIONS, &applied))
    }

    async fn check(&self) -> Result<Vec<Finding>> {
        let mut findings = column_findings(&self.source, &self.table_columns().await?);
        if !findings.iter().any(Finding::is_error) {
            let (is_view, updatable_view, before_update) = self.view_facts().await?;
            if before_update && self.source.mark_passive {
                findings.push(super::trigger_warning(&self.source));
            }
            if is_view {
                findings.push(super::view_finding(&self.source));
                if self.source.mark_passive && !updatable_view {
                    findings.push(Finding::Error(format!(
                        "source.status_column: {} is a view without an INSTEAD OF UPDATE trigger, \
                         so {} cannot be set to the passive value; add the trigger or set \
                         source.mark_passive = false",
                        self.source.table, self.source.status_column
                    )));
                }
            } else {
                findings.extend(index_findings(
                    &self.source,
                    &self.table_indexes().await?,
                    IndexDialect::Sqlite,
                ));
            }
            findings.extend(self.timestamp_findings().await?);
            findings.extend(unusable_findings(self.unusable_rows().await?, &self.source));
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
        let now = Utc::now();
        Ok(rows
            .iter()
            .filter_map(|r| {
                let value = match r.try_get::<i64, _>(2) {
                    Ok(i) => SampleValue::Int(i),
                    Err(_) => SampleValue::Text(r.try_get(2).ok()?),
                };
                let last = self.parse_activity(&value)?;
                Some(IdleSession {
                    token: text(r.try_get(0).ok())?,
                    member: text(r.try_get(1).ok())?,
                    idle_for: (now - last).to_std().unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn count_eligible(&self, p: ClaimParams<'_>) -> Result<u64> {
        let n: i64 = self
            .bind_eligible(&self.sql.count, &p)
            .fetch_one(&self.pool)
            .await
            .op("counting eligible sessions")?
            .try_get(0)
            .op("counting eligible sessions")?;
        Ok(n as u64)
    }

    async fn claim(&self, p: ClaimParams<'_>) -> Result<Vec<Lease>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .op("starting a claim")?;
        let lease_until = ms(Utc::now()).saturating_add(millis(p.lease));
        let rows = self
            .bind_eligible(&self.sql.claim, &p)
            .bind(i64::from(p.limit))
            .bind(p.worker)
            .bind(lease_until)
            .fetch_all(&mut *tx)
            .await
            .op("claiming sessions")?;
        let mut leases = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for r in &rows {
            let token: Option<Vec<u8>> = r.try_get(0).ok();
            match (text(token.clone()), text(r.try_get(1).ok())) {
                (Some(token), Some(member)) => leases.push(Lease {
                    token,
                    member,
                    attempts: r.try_get::<i64, _>(2).unwrap_or_default() as u32,
                }),
                _ => unreadable.extend(token),
            }
        }
        // Text that is not UTF-8 can be neither sent nor logged: settle it as failed, by the
        // bytes it is stored as, so it never comes back.
        for bytes in unreadable {
            tracing::warn!("a source row's token or member is not UTF-8 text; settled failed");
            sqlx::query(
                "UPDATE sweeper_sessions SET state = 'failed', last_error_code = ?1, \
                 last_error_message = 'the token or member is not UTF-8 text', lease_owner = NULL, \
                 lease_expires_at = NULL, settled_at = ?2, updated_at = ?2 \
                 WHERE session_token = CAST(?3 AS TEXT)",
            )
            .bind(BAD_SOURCE_ROW)
            .bind(ms(Utc::now()))
            .bind(bytes)
            .execute(&mut *tx)
            .await
            .op("settling an unreadable source row")?;
        }
        tx.commit().await.op("committing a claim")?;
        Ok(leases)
    }

    async fn explain_claim(&self, p: ClaimParams<'_>) -> Result<String> {
        let sql = format!("EXPLAIN QUERY PLAN {}", self.sql.claim);
        let rows = self
            .bind_eligible(&sql, &p)
            .bind(i64::from(p.limit))
            .bind(p.worker)
            .bind(ms(Utc::now()))
            .fetch_all(&self.pool)
            .await
            .op("explaining the claim")?;
        Ok(rows
            .iter()
            .map(|r| format!("{}\n", r.try_get::<String, _>(3).unwrap_or_default()))
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
        let flag = |r: &sqlx::sqlite::SqliteRow, i| r.try_get::<Option<i64>, _>(i).ok().flatten();
        Ok(match row {
            None => Recheck::LeaseLost,
            Some(r) if flag(&r, 0) != Some(1) => Recheck::LeaseLost,
            Some(r) if flag(&r, 1) != Some(1) => Recheck::NoLongerEligible,
            Some(_) => Recheck::Eligible,
        })
    }

    async fn record(&self, worker: &str, batch: &[Settlement]) -> Result<Vec<String>> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .op("starting to record")?;
        let now = ms(Utc::now());
        let mut accepted = Vec::with_capacity(batch.len());
        // Multi-row statements: a handful per chunk instead of three per session.
        for chunk in batch.chunks(RECORD_CHUNK) {
            accepted.extend(self.record_chunk(&mut tx, worker, now, chunk).await?);
        }
        tx.commit().await.op("committing recorded outcomes")?;
        Ok(accepted)
    }

    async fn mark_passive(&self, tokens: &[String], idle_before: DateTime<Utc>) -> Result<u64> {
        let last = self.source.last_activity_column.quoted();
        let fits = fits(&last, self.source.last_activity_format);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .op("starting to mark sessions passive")?;
        let mut noted = 0;
        for chunk in tokens.chunks(MARK_CHUNK) {
            let mut q = QueryBuilder::<Sqlite>::new(format!(
                "UPDATE {} SET {} = ",
                self.sql.table, self.sql.status_column
            ));
            q.push_bind(&self.source.passive_value);
            q.push(format!(" WHERE {} IN (", self.sql.token_column));
            let mut list = q.separated(", ");
            for t in chunk {
                list.push_bind(t);
                // A column without text affinity stores an integer token as an integer.
                if let Ok(i) = t.parse::<i64>()
                    && i.to_string() == *t
                {
                    list.push_bind(i);
                }
            }
            q.push(format!(") AND {} = ", self.sql.status_column));
            q.push_bind(&self.source.active_value);
            // Only rows still idle: a duplicate token touched a moment ago stays active.
            q.push(format!(" AND {fits} AND {last} < "));
            match self.cutoff(idle_before) {
                Cutoff::Text(t) => q.push_bind(t),
                Cutoff::Int(i) => q.push_bind(i),
            };
            q.build()
                .execute(&mut *tx)
                .await
                .op("marking sessions passive")?;
            let mut q = QueryBuilder::<Sqlite>::new(
                "UPDATE sweeper_sessions SET source_marked = 1 WHERE session_token IN (",
            );
            let mut list = q.separated(", ");
            for t in chunk {
                list.push_bind(t);
            }
            q.push(")");
            noted += q
                .build()
                .execute(&mut *tx)
                .await
                .op("noting marked sessions")?
                .rows_affected();
        }
        tx.commit().await.op("committing marked sessions")?;
        Ok(noted)
    }

    async fn unmarked(&self, limit: u32) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT session_token FROM sweeper_sessions WHERE source_marked = 0 LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .op("listing sessions whose source row is not marked")
    }

    async fn unusable_rows(&self) -> Result<UnusableRows> {
        let row = sqlx::query(&self.sql.unusable)
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
            "UPDATE sweeper_sessions SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = ?1",
        )
        .bind(worker)
        .execute(&self.pool)
        .await
        .op("releasing leases")?;
        Ok(done.rows_affected())
    }

    async fn renew_leases(&self, worker: &str, lease: Duration) -> Result<u64> {
        let done =
            sqlx::query("UPDATE sweeper_sessions SET lease_expires_at = ?1 WHERE lease_owner = ?2")
                .bind(ms(Utc::now()).saturating_add(millis(lease)))
                .bind(worker)
                .execute(&self.pool)
                .await
                .op("renewing leases")?;
        Ok(done.rows_affected())
    }

    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<DateTime<Utc>> {
        let now = Utc::now();
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
        Ok(from_ms(ms(now)))
    }

    async fn database_time(&self) -> Result<DateTime<Utc>> {
        // Every worker on a SQLite file runs on its one host: the host's clock is the clock.
        Ok(Utc::now())
    }

    async fn live_workers(&self, stale_after: Duration) -> Result<u32> {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sweeper_workers WHERE heartbeat_at > ?1")
                .bind(ms(Utc::now()) - millis(stale_after))
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
            .filter_map(|r| {
                Some(WorkerRow {
                    id: r.try_get(0).ok()?,
                    pid: r.try_get::<i64, _>(1).ok()? as u32,
                })
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
             COALESCE(SUM(CASE WHEN next_attempt_at IS NULL OR next_attempt_at <= ?1 THEN 1 ELSE 0 END), 0) \
             FROM sweeper_sessions WHERE state = 'pending'",
        )
        .bind(ms(Utc::now()))
        .fetch_one(&self.pool)
        .await
        .op("summarising pending sessions")?;
        let leased: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sweeper_sessions WHERE lease_owner IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await
        .op("counting leases")?;
        let not_marked: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE source_marked = 0")
                .fetch_one(&self.pool)
                .await
                .op("counting unmarked source rows")?;
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
                count: p.try_get::<i64, _>(0).unwrap_or_default() as u64,
                next_due: p.try_get::<Option<i64>, _>(1).ok().flatten().map(from_ms),
                due_now: p.try_get::<i64, _>(2).unwrap_or_default() as u64,
            },
            leased: leased as u64,
            recent_failures: recent
                .iter()
                .map(|r| FailureRow {
                    session: fingerprint(&r.try_get::<String, _>(0).unwrap_or_default()),
                    error_code: r.try_get(1).ok().flatten(),
                    error_message: r.try_get(2).ok().flatten(),
                    attempts: r.try_get::<i64, _>(3).unwrap_or_default() as u32,
                    failed_at: r.try_get::<Option<i64>, _>(4).ok().flatten().map(from_ms),
                })
                .collect(),
            source_not_marked: not_marked as u64,
            unusable: self.unusable_rows().await?,
        })
    }

    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE sweeper_sessions SET state = 'pending', attempts = 0, next_attempt_at = NULL, \
             settled_at = NULL, updated_at = ?1 WHERE state = 'failed' AND (?2 IS NULL OR last_error_code = ?2)",
        )
        .bind(ms(Utc::now()))
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

    async fn status(&self, failures: u32) -> Result<super::StatusData> {
        use super::{
            FailureGroup, MinuteCount, PendingByDue, STATUS_CALL_ROWS, STATUS_FAILURE_CODES,
            STATUS_WORKERS, StatusData, WorkerStatus,
        };
        let report = self.report(failures).await?;
        let now = ms(Utc::now());
        // The newest rows by primary key, at most STATUS_CALL_ROWS of them, within the day.
        let calls = sqlx::query(
            "SELECT (finished_at / 60000) * 60000, outcome, COUNT(*) FROM sweeper_attempts \
             WHERE id > (SELECT COALESCE(MAX(id), 0) FROM sweeper_attempts) - ?1 AND finished_at >= ?2 \
             GROUP BY 1, 2",
        )
        .bind(STATUS_CALL_ROWS)
        .bind(now - 86_400_000)
        .fetch_all(&self.pool)
        .await
        .op("counting calls per minute")?;
        let ends = sqlx::query(
            "SELECT (SELECT finished_at FROM sweeper_attempts ORDER BY id DESC LIMIT 1), \
             (SELECT finished_at FROM sweeper_attempts WHERE id <= \
               (SELECT COALESCE(MAX(id), 0) FROM sweeper_attempts) - ?1 ORDER BY id DESC LIMIT 1)",
        )
        .bind(STATUS_CALL_ROWS)
        .fetch_one(&self.pool)
        .await
        .op("reading the newest call")?;
        let workers = sqlx::query(
            "SELECT w.worker_id, w.hostname, w.pid, w.version, w.started_at, w.heartbeat_at, \
             (SELECT COUNT(*) FROM sweeper_sessions l WHERE l.lease_owner = w.worker_id) \
             FROM sweeper_workers w ORDER BY w.heartbeat_at DESC LIMIT ?1",
        )
        .bind(STATUS_WORKERS)
        .fetch_all(&self.pool)
        .await
        .op("listing workers")?;
        let groups = sqlx::query(
            "SELECT last_error_code, MAX(last_error_message), COUNT(*), MAX(settled_at) \
             FROM sweeper_sessions WHERE state = 'failed' GROUP BY last_error_code \
             ORDER BY COUNT(*) DESC, last_error_code LIMIT ?1",
        )
        .bind(STATUS_FAILURE_CODES)
        .fetch_all(&self.pool)
        .await
        .op("grouping failures")?;
        let due = sqlx::query(
            "SELECT \
             COALESCE(SUM(CASE WHEN next_attempt_at IS NULL OR next_attempt_at <= ?1 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN next_attempt_at > ?1 AND next_attempt_at <= ?1 + 60000 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN next_attempt_at > ?1 + 60000 AND next_attempt_at <= ?1 + 300000 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN next_attempt_at > ?1 + 300000 AND next_attempt_at <= ?1 + 900000 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN next_attempt_at > ?1 + 900000 AND next_attempt_at <= ?1 + 3600000 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN next_attempt_at > ?1 + 3600000 THEN 1 ELSE 0 END), 0) \
             FROM sweeper_sessions WHERE state = 'pending'",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .op("grouping pending sessions by due time")?;
        let at = |r: &sqlx::sqlite::SqliteRow, i: usize| {
            r.try_get::<Option<i64>, _>(i).ok().flatten().map(from_ms)
        };
        let n = |r: &sqlx::sqlite::SqliteRow, i: usize| {
            r.try_get::<i64, _>(i).unwrap_or_default() as u64
        };
        Ok(StatusData {
            report,
            now: from_ms(now),
            calls: calls
                .iter()
                .filter_map(|r| {
                    Some(MinuteCount {
                        minute: from_ms(r.try_get::<i64, _>(0).ok()?),
                        class: r.try_get(1).ok()?,
                        count: n(r, 2),
                    })
                })
                .collect(),
            calls_cover_from: at(&ends, 1).filter(|t| ms(*t) >= now - 86_400_000),
            last_call_at: at(&ends, 0),
            workers: workers
                .iter()
                .filter_map(|r| {
                    Some(WorkerStatus {
                        id: r.try_get(0).ok()?,
                        hostname: r.try_get(1).ok()?,
                        pid: r.try_get::<i64, _>(2).ok()? as u32,
                        version: r.try_get(3).ok()?,
                        started_at: at(r, 4)?,
                        heartbeat_at: at(r, 5)?,
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
                    last_failed_at: at(r, 3),
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
