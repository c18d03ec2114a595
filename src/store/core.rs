//! The store's operations, written once for every database. Each runs SQL rendered for the
//! store's [`Dialect`] over one `sqlx` Any pool; the few things only a catalog can answer (the
//! source's types, its indexes, privileges) and the claim's locking come from the backend files.
//! The sweeper's own tables keep time as Unix milliseconds of the database's clock everywhere.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone as _, Utc};
use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Connection as _, Row as _};
use tokio::sync::OnceCell;

use super::dialect::{Dialect, Stmt};
use super::hot::{HotShape, HotStatements};
use super::lane::{Failed, Lane, MIN_POOL_TO_COUNT_BESIDE_A_SWEEP, on_lane};
use super::{
    ClaimParams, DEADLOCK_TRIES, FURTHEST_ZONE_AHEAD, FailureRow, Finding, IdleSession, Lease, Op,
    PendingSummary, Recheck, Report, RequeueFilter, Result, SampleValue, Settlement, Snapshot,
    Store, StoreError, UnusableRows, WorkerInfo, WorkerRow, column_findings, count_rows,
    far_ahead_finding, format_findings, index_findings, ledger_blocks, ledger_blocks_for_others,
    lost_a_deadlock, migration_finding, naive_cutoff, newest_finding, none_readable_finding,
    parse_rfc3339_utc, parse_sqlite_text, unusable_findings,
};
use crate::config::{SourceConfig, TimestampFormat};
use crate::telemetry::fingerprint;

/// How long to wait for a pooled connection before reporting the database unreachable.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// One bound value.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    NullInt,
    NullText,
}

impl Arg {
    pub(crate) fn opt_int(v: Option<i64>) -> Self {
        v.map_or(Arg::NullInt, Arg::Int)
    }
    /// A text value or a typed NULL.
    pub(crate) fn opt_text(v: Option<&str>) -> Self {
        v.map_or(Arg::NullText, |s| Arg::Text(s.to_owned()))
    }
}

/// A query with its arguments bound in the statement's order.
pub(crate) fn query<'q>(
    stmt: &'q Stmt,
    args: &[Arg],
) -> sqlx::query::Query<'q, Any, AnyArguments<'q>> {
    let mut q = sqlx::query(&stmt.text);
    for &i in &stmt.binds {
        q = match &args[i] {
            Arg::Int(v) => q.bind(*v),
            Arg::Text(v) => q.bind(v.clone()),
            Arg::Bytes(v) => q.bind(v.clone()),
            Arg::NullInt => q.bind(None::<i64>),
            Arg::NullText => q.bind(None::<String>),
        };
    }
    q
}

/// [`query`], taking the arguments by value: each is moved into the query, not copied
/// (a MySQL statement that names one twice gets a copy for each further use).
pub(crate) fn query_owned(
    stmt: &Stmt,
    mut args: Vec<Arg>,
) -> sqlx::query::Query<'_, Any, AnyArguments<'_>> {
    let mut last_use = vec![0; args.len()];
    for (n, &i) in stmt.binds.iter().enumerate() {
        last_use[i] = n;
    }
    let mut q = sqlx::query(&stmt.text);
    for (n, &i) in stmt.binds.iter().enumerate() {
        let arg = if n < last_use[i] {
            args[i].clone()
        } else {
            std::mem::replace(&mut args[i], Arg::NullInt)
        };
        q = match arg {
            Arg::Int(v) => q.bind(v),
            Arg::Text(v) => q.bind(v),
            Arg::Bytes(v) => q.bind(v),
            Arg::NullInt => q.bind(None::<i64>),
            Arg::NullText => q.bind(None::<String>),
        };
    }
    q
}

pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn int(r: &AnyRow, i: usize) -> i64 {
    r.try_get::<Option<i64>, _>(i)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A value as bytes, whether the driver calls it a blob or (MySQL's binary strings) text.
fn raw_bytes(r: &AnyRow, i: usize) -> Vec<u8> {
    match r.try_get::<Option<Vec<u8>>, _>(i) {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => text(r, i).map(String::into_bytes).unwrap_or_default(),
    }
}

pub(crate) fn opt_int(r: &AnyRow, i: usize) -> Option<i64> {
    r.try_get::<Option<i64>, _>(i).ok().flatten()
}

pub(crate) fn text(r: &AnyRow, i: usize) -> Option<String> {
    // MySQL hands long text (TEXT, GROUP_CONCAT) over as a blob.
    match r.try_get::<Option<String>, _>(i) {
        Ok(v) => v,
        Err(_) => r
            .try_get::<Option<Vec<u8>>, _>(i)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok()),
    }
}

/// How the source's last-activity column holds time, as its catalog (or the config) says.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Activity {
    /// An instant (PostgreSQL `timestamptz`, MySQL `TIMESTAMP`).
    Instant,
    /// A wall-clock time in this zone (PostgreSQL `timestamp`, MySQL `DATETIME`, SQLite text).
    Naive(chrono_tz::Tz),
    /// RFC 3339 text in UTC (SQLite).
    Rfc3339,
    /// Integer Unix seconds.
    UnixSeconds,
    /// Integer Unix milliseconds.
    UnixMillis,
}

/// What the backend learned from its catalog, once.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    /// How time is held.
    pub activity: Activity,
    /// `s.tok = <this>` compares a source token with a text value (a cast on PostgreSQL,
    /// where a `uuid` column never equals `text`); `{}` stands for the value.
    pub token_from_text: String,
    /// The condition "source row `s` has the token `{}`" (a ledger token), index-friendly and
    /// exact; `{tok}` stands for the quoted token column.
    pub same_token: String,
}

/// The statements of the source-side operations, rendered once.
pub(crate) struct Statements {
    pub(crate) shape: Shape,
    claim: Stmt,
    eligible: Stmt,
    count: Stmt,
    count_to_sweep: Stmt,
    /// The re-check, the record and the source update.
    pub(crate) hot: HotStatements,
    skip_revived: Stmt,
    unusable: Stmt,
    sample_newest: Stmt,
    sample_oldest: Stmt,
    /// Active rows by whether their time is readable, and later than any zone could explain.
    far_ahead: Stmt,
}

/// The SQL fragments the statements over the source are built from (quoted names, the clock,
/// the idle cutoff, the conditions of eligibility), rendered once.
struct Parts {
    table: String,
    tok: String,
    member_text: String,
    status: String,
    last: String,
    now: &'static str,
    stale: String,
    cutoff: &'static str,
    fits: String,
    token_text: String,
    same: String,
    eligible_where: String,
    /// `eligible_where`, with the sessions leased by `$5` counted in.
    eligible_or_ours_where: String,
    activity_value: String,
}

/// Counts the distinct tokens of the source rows that meet `condition`.
fn count_sessions(d: Dialect, p: &Parts, condition: &str) -> String {
    format!(
        "SELECT {} FROM {} s WHERE {condition}",
        d.int(&format!(
            "COUNT(DISTINCT {})",
            d.exact(&format!("s.{}", p.tok))
        )),
        p.table,
    )
}

/// The store: one pool, one dialect, the source's config.
pub struct SqlStore {
    pub(crate) pool: AnyPool,
    pub(crate) url: String,
    pub(crate) dialect: Dialect,
    pub(crate) source: SourceConfig,
    sql: OnceCell<Statements>,
    pub(crate) lanes: Lanes,
}

/// The connections kept between uses by streams of back-to-back operations (see `lane`).
pub(crate) struct Lanes {
    /// The steps that follow one another: start-up's checks, joining the fleet, the
    /// heartbeats and leaving it, preparing a sweep, the claims.
    pub steps: Lane,
    /// The re-checks before calls.
    pub recheck: Lane,
    /// The records of outcomes.
    pub record: Lane,
    /// The source updates, which run beside the records (a locked source must not hold them).
    pub mark: Lane,
}

impl SqlStore {
    /// Opens (lazily) a pool of at most `max_connections` on `url`.
    pub async fn connect(
        url: &str,
        dialect: Dialect,
        max_connections: u32,
        source: SourceConfig,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let url = match dialect {
            Dialect::MySql => super::mysql_url(url),
            _ => url.to_owned(),
        };
        let options: sqlx::any::AnyConnectOptions = url.parse().op("parsing the database URL")?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(match dialect {
                Dialect::Sqlite => super::sqlite::BUSY_TIMEOUT,
                _ => ACQUIRE_TIMEOUT,
            })
            .test_before_acquire(dialect != Dialect::Sqlite)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    for statement in session_setup(dialect) {
                        sqlx::query(statement).execute(&mut *conn).await?;
                    }
                    if dialect == Dialect::MySql {
                        // MariaDB caches correlated subqueries by the outer value in its own
                        // collation, so 'TOKC' would reuse the answer for 'tokC'. MySQL has no
                        // such cache (and refuses the flag), hence no error on failure.
                        let _ = sqlx::query("SET SESSION optimizer_switch = 'subquery_cache=off'")
                            .execute(&mut *conn)
                            .await;
                    }
                    if dialect == Dialect::Postgres {
                        // The hot path's statements keep their texts, so PostgreSQL would switch
                        // them to a generic plan after five runs: planned while the ledger was
                        // nearly empty, a sequential scan, kept as it grows to millions of rows.
                        // A plan for each run, as varying texts always had. (PostgreSQL 12+;
                        // older servers plan as before, hence no error on failure.)
                        let _ = sqlx::query("SET plan_cache_mode = force_custom_plan")
                            .execute(&mut *conn)
                            .await;
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            url,
            dialect,
            source,
            sql: OnceCell::new(),
            lanes: Lanes {
                steps: Lane::new(max_connections),
                recheck: Lane::new(max_connections),
                record: Lane::new(max_connections),
                mark: Lane::new(max_connections),
            },
        })
    }

    fn q(&self, template: &str) -> Stmt {
        self.dialect.render(template)
    }

    pub(crate) fn col(&self, c: &crate::config::SqlIdent) -> String {
        self.dialect.quote(c)
    }

    pub(crate) async fn sql(&self) -> Result<&Statements> {
        self.sql
            .get_or_try_init(|| async {
                let shape = match self.dialect {
                    Dialect::Sqlite => super::sqlite::shape(self).await?,
                    Dialect::Postgres => super::postgres::shape(self).await?,
                    Dialect::MySql => super::mysql::shape(self).await?,
                };
                Ok(self.statements(shape))
            })
            .await
    }

    /// The idle cutoff, in the column's own terms ($2 of the eligibility statements).
    fn cutoff_expr(&self, activity: Activity) -> &'static str {
        match (self.dialect, activity) {
            (Dialect::Postgres, Activity::Instant) => "CAST($2 AS timestamptz)",
            (Dialect::Postgres, Activity::Naive(_)) => "CAST($2 AS timestamp)",
            (Dialect::MySql, Activity::Instant | Activity::Naive(_)) => "CAST($2 AS DATETIME(6))",
            _ => "$2",
        }
    }

    /// The cutoff's value. Truncated to whole seconds: that only ever moves it earlier, so a
    /// live session is never taken.
    pub(crate) fn cutoff(&self, activity: Activity, idle_before: DateTime<Utc>) -> Arg {
        match activity {
            Activity::Instant => match self.dialect {
                Dialect::Postgres => {
                    Arg::Text(idle_before.format("%Y-%m-%d %H:%M:%S+00").to_string())
                }
                _ => Arg::Text(idle_before.format("%Y-%m-%d %H:%M:%S").to_string()),
            },
            Activity::Naive(tz) => Arg::Text(
                naive_cutoff(tz, idle_before)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
            ),
            Activity::Rfc3339 => Arg::Text(idle_before.format("%Y-%m-%dT%H:%M:%S").to_string()),
            Activity::UnixSeconds => Arg::Int(idle_before.timestamp()),
            Activity::UnixMillis => Arg::Int(idle_before.timestamp_millis()),
        }
    }

    /// Whether `source.last_activity_format` decides how the column is read: on SQLite, and
    /// for an integer column (MySQL/MariaDB); typed time columns ignore it.
    fn format_applies(&self, activity: Activity) -> bool {
        self.dialect == Dialect::Sqlite
            || matches!(activity, Activity::UnixSeconds | Activity::UnixMillis)
    }

    /// The condition under which a row is fit to send: its time fits the column's format and
    /// its token and member can be read.
    fn usable(&self, activity: Activity) -> String {
        format!("{} AND {}", self.time_fits(activity), self.readable_ids())
    }

    /// Only the identity part of [`SqlStore::usable`]: a token and a member that can be read
    /// as non-empty text.
    fn readable_ids(&self) -> String {
        let (tok, mem) = (
            format!("s.{}", self.col(&self.source.token_column)),
            format!("s.{}", self.col(&self.source.member_column)),
        );
        match self.dialect {
            // A NUL inside: an API or a proxy reading up to it would see another token.
            Dialect::Sqlite => format!(
                "typeof({tok}) IN ('text', 'integer') AND typeof({mem}) IN ('text', 'integer') \
                 AND {tok} <> '' AND {mem} <> '' AND instr({tok}, char(0)) = 0 \
                 AND instr({mem}, char(0)) = 0"
            ),
            _ => format!(
                "{tok} IS NOT NULL AND {mem} IS NOT NULL AND {} <> '' AND {} <> ''",
                self.dialect.text(&tok),
                self.dialect.text(&mem)
            ),
        }
    }

    /// Only the time part of [`SqlStore::usable`] (for the re-check and revived sessions): a
    /// time no earlier than 2000 (as the Unix formats' floor), which rules out what a time
    /// column can hold that is no shopper's last activity and compares as long ago: PostgreSQL's
    /// `-infinity` (and `infinity`, which `extract` cannot turn into milliseconds), MySQL's zero
    /// dates (`0000-00-00`, and a zero month or day such as `2026-11-00`, which its default
    /// `sql_mode` stores) and impossible ones (`2026-02-30`, stored under
    /// `ALLOW_INVALID_DATES`), and dates before the common era.
    fn time_fits(&self, activity: Activity) -> String {
        let last = format!("s.{}", self.col(&self.source.last_activity_column));
        match (self.dialect, activity) {
            (Dialect::Sqlite, _) => super::sqlite::fits(&last, self.source.last_activity_format),
            (_, Activity::UnixSeconds) => {
                format!("{last} >= {}", super::EARLIEST_PLAUSIBLE_UNIX_SECONDS)
            }
            (_, Activity::UnixMillis) => format!(
                "{last} >= {}",
                super::EARLIEST_PLAUSIBLE_UNIX_SECONDS * 1000
            ),
            (Dialect::Postgres, Activity::Instant) => format!(
                "({last} >= CAST('{}+00' AS timestamptz) AND isfinite({last}))",
                super::EARLIEST_PLAUSIBLE_TIME
            ),
            (Dialect::Postgres, _) => format!(
                "({last} >= CAST('{}' AS timestamp) AND isfinite({last}))",
                super::EARLIEST_PLAUSIBLE_TIME
            ),
            // A day the month has, in arithmetic alone: a function that rejects an impossible
            // date (`DATE_ADD`) warns, and strict mode turns the warning into an UPDATE's error.
            (Dialect::MySql, _) => format!(
                "({last} >= CAST('{}' AS DATETIME) AND MONTH({last}) <> 0 \
                 AND DAYOFMONTH({last}) <> 0 AND DAYOFMONTH({last}) <= CASE \
                 WHEN MONTH({last}) = 2 THEN 28 + (YEAR({last}) % 4 = 0 \
                   AND (YEAR({last}) % 100 <> 0 OR YEAR({last}) % 400 = 0)) \
                 WHEN MONTH({last}) IN (4, 6, 9, 11) THEN 30 ELSE 31 END)",
                super::EARLIEST_PLAUSIBLE_TIME
            ),
        }
    }

    /// The fragments every statement over the source is built from.
    fn parts(&self, shape: &Shape) -> Parts {
        let d = self.dialect;
        let tok = self.col(&self.source.token_column);
        let last = self.col(&self.source.last_activity_column);
        let now = d.now_ms();
        let stale = format!("{now} - $3");
        let cutoff = self.cutoff_expr(shape.activity);
        let usable = self.usable(shape.activity);
        let token_text = d.text(&format!("s.{tok}"));
        // $1 active value, $2 idle cutoff, $3 staleness (ms); claims add $4 limit, $5 worker,
        // $6 lease (ms).
        let eligible = |blocks: String| {
            format!(
                "s.{status} = $1 AND s.{last} < {cutoff} AND {usable} AND NOT EXISTS \
                 (SELECT 1 FROM sweeper_sessions l WHERE l.session_token = {token_text} AND {blocks})",
                status = self.col(&self.source.status_column),
            )
        };
        let eligible_where = eligible(ledger_blocks(now, &stale));
        let eligible_or_ours_where = eligible(ledger_blocks_for_others(now, &stale, "$5"));
        let activity_value = match d {
            Dialect::Sqlite => format!("s.{last}"),
            Dialect::Postgres => d.int(&format!("extract(epoch FROM s.{last}) * 1000")),
            Dialect::MySql => match shape.activity {
                Activity::UnixSeconds | Activity::UnixMillis => format!("s.{last}"),
                _ => d.int(&format!("UNIX_TIMESTAMP(s.{last}) * 1000")),
            },
        };
        Parts {
            table: self.col(&self.source.table),
            member_text: d.text(&format!("s.{}", self.col(&self.source.member_column))),
            status: self.col(&self.source.status_column),
            same: shape
                .same_token
                .replace("{tok}", &tok)
                .replace("{}", "l.session_token"),
            fits: self.time_fits(shape.activity),
            tok,
            last,
            now,
            stale,
            cutoff,
            token_text,
            eligible_where,
            eligible_or_ours_where,
            activity_value,
        }
    }

    /// The session behind ledger row `l` is still idle: it has an active row, and every active
    /// row with its token is idle (a duplicate token touched a moment ago makes the whole
    /// session live; a row whose time cannot be read counts as live: ambiguous data is never
    /// sent). One pass over its rows; the minimum of no rows is NULL, which is not 1.
    fn still_idle(&self, p: &Parts, active: &str, cutoff: &str) -> String {
        let (table, same, status, last, fits) = (&p.table, &p.same, &p.status, &p.last, &p.fits);
        let no = if self.dialect == Dialect::Postgres {
            "FALSE"
        } else {
            "0"
        };
        format!(
            "(COALESCE((SELECT MIN(CASE WHEN COALESCE(s.{last} < {cutoff} AND {fits}, {no}) \
             THEN 1 ELSE 0 END) FROM {table} s WHERE {same} AND s.{status} = {active}), 0) = 1)"
        )
    }

    /// The claim statement: each backend locks and writes its leases its own way.
    fn claim_sql(&self, p: &Parts) -> String {
        let candidates = format!(
            "SELECT {} AS token, {} AS member FROM {} s WHERE {} ORDER BY s.{} LIMIT $4",
            p.token_text, p.member_text, p.table, p.eligible_where, p.last
        );
        match self.dialect {
            Dialect::Postgres => super::postgres::claim(&candidates, p.now, &p.stale),
            Dialect::Sqlite => super::sqlite::claim(&candidates, p.now),
            Dialect::MySql => super::mysql::candidates(&candidates),
        }
    }

    /// Due pending sessions that came back to life: settled `skipped`.
    fn skip_revived_sql(&self, p: &Parts) -> String {
        format!(
            "UPDATE sweeper_sessions AS l SET state = 'skipped', lease_owner = NULL, \
             lease_expires_at = NULL, updated_at = {now}, settled_at = {now} \
             WHERE l.state = 'pending' AND (l.next_attempt_at IS NULL OR l.next_attempt_at <= {now}) \
             AND NOT (l.lease_owner IS NOT NULL AND l.lease_expires_at > {now} AND EXISTS \
               (SELECT 1 FROM sweeper_workers w WHERE w.worker_id = l.lease_owner AND w.heartbeat_at > {stale})) \
             AND NOT {}",
            self.still_idle(p, "$1", p.cutoff),
            now = p.now,
            stale = p.stale,
        )
    }

    /// `check`'s sample of the newest or oldest active last-activity value (`order`: `DESC` or
    /// `ASC`); with `bounded`, no readable value from `$2` on (in the cutoff's terms), so that a
    /// row no zone explains (see [`FURTHEST_ZONE_AHEAD`]) cannot hide the newest real one.
    fn sample(&self, p: &Parts, activity: Activity, order: &str, bounded: bool) -> Stmt {
        // Where the format setting applies, the samples are what `check` judges the format by,
        // so they include what does not fit; a typed column's are times, and only readable
        // ones can be read as such.
        let (kind, sample_fits) = match self.dialect {
            _ if !self.format_applies(activity) => ("'typed'".into(), p.fits.clone()),
            Dialect::Sqlite => (
                format!("typeof(s.{})", p.last),
                format!("s.{} IS NOT NULL", p.last),
            ),
            _ => ("'integer'".into(), format!("s.{} IS NOT NULL", p.last)),
        };
        // What does not fit stays in the samples: `check` names its format by them.
        let bound = if bounded {
            format!(
                " AND CASE WHEN {} THEN s.{} < {} ELSE TRUE END",
                p.fits, p.last, p.cutoff
            )
        } else {
            String::new()
        };
        self.q(&format!(
            "SELECT {}, {kind} FROM {} s WHERE s.{} = $1 AND {}{bound} ORDER BY s.{} {order} LIMIT 1",
            p.activity_value, p.table, p.status, sample_fits, p.last
        ))
    }

    fn statements(&self, shape: Shape) -> Statements {
        let d = self.dialect;
        let p = self.parts(&shape);
        let cutoff_3 = p.cutoff.replace("$2", "$3");
        let hot = HotStatements::render(
            self,
            &HotShape {
                still_idle: &self.still_idle(&p, "$2", &cutoff_3),
                token_from_text: &shape.token_from_text,
                cutoff: &cutoff_3,
                fits: &p.fits,
            },
        );
        Statements {
            hot,
            claim: self.q(&self.claim_sql(&p)),
            eligible: self.q(&format!(
                "SELECT {}, {}, {} FROM {} s WHERE {} ORDER BY s.{} LIMIT $4",
                p.token_text, p.member_text, p.activity_value, p.table, p.eligible_where, p.last
            )),
            count: self.q(&count_sessions(d, &p, &p.eligible_where)),
            count_to_sweep: self.q(&count_sessions(d, &p, &p.eligible_or_ours_where)),
            skip_revived: self.q(&self.skip_revived_sql(&p)),
            // One kind per active row, its conditions evaluated once (two sums over them
            // evaluated them three times, and this scan runs at every sweep's start): 0 fit to
            // send, 1 an unreadable time, 2 a readable time but no readable token or member.
            unusable: self.q(&format!(
                "SELECT {}, {} FROM {} s WHERE s.{} = $1 GROUP BY 1",
                d.int(&format!(
                    "CASE WHEN {} THEN CASE WHEN {} THEN 0 ELSE 2 END ELSE 1 END",
                    p.fits,
                    self.readable_ids()
                )),
                d.int("COUNT(*)"),
                p.table,
                p.status
            )),
            sample_newest: self.sample(&p, shape.activity, "DESC", true),
            sample_oldest: self.sample(&p, shape.activity, "ASC", false),
            // One kind per active row, as `unusable`'s: 0 readable and before `$2` (in the
            // cutoff's terms, as the bounded sample's), 1 readable and from `$2` on, 2 unreadable.
            far_ahead: self.q(&format!(
                "SELECT {}, {} FROM {} s WHERE s.{} = $1 GROUP BY 1",
                d.int(&format!(
                    "CASE WHEN {} THEN CASE WHEN s.{} < {} THEN 0 ELSE 1 END ELSE 2 END",
                    p.fits, p.last, p.cutoff
                )),
                d.int("COUNT(*)"),
                p.table,
                p.status
            )),
            shape,
        }
    }

    /// Binds $1..$3 of the eligibility statements (and the claim's $4..$6 when given).
    fn eligible_args(&self, shape: &Shape, p: &ClaimParams<'_>) -> Vec<Arg> {
        vec![
            Arg::Text(self.source.active_value.clone()),
            self.cutoff(shape.activity, p.idle_before),
            Arg::Int(millis(p.stale_after)),
            Arg::Int(i64::from(p.limit)),
            Arg::Text(p.worker.to_owned()),
            Arg::Int(millis(p.lease)),
        ]
    }

    /// The instant a stored value means (as the dialect's sample and listing select it).
    fn activity_instant(
        &self,
        activity: Activity,
        row: &AnyRow,
        i: usize,
    ) -> Option<DateTime<Utc>> {
        let value = match row.try_get::<Option<i64>, _>(i) {
            Ok(Some(v)) => SampleValue::Int(v),
            _ => SampleValue::Text(text(row, i)?),
        };
        self.parse_activity(activity, &value)
    }

    fn parse_activity(&self, activity: Activity, v: &SampleValue) -> Option<DateTime<Utc>> {
        let naive_ms = |ms: i64| from_ms(ms).naive_utc();
        match (self.dialect, activity, v) {
            (Dialect::Sqlite, Activity::Naive(tz), SampleValue::Text(s)) => parse_sqlite_text(s)
                .and_then(|n| n.and_local_timezone(tz).latest())
                .map(|t| t.with_timezone(&Utc)),
            (_, Activity::Rfc3339, SampleValue::Text(s)) => parse_rfc3339_utc(s),
            (_, Activity::UnixSeconds, SampleValue::Int(i)) => Utc.timestamp_opt(*i, 0).single(),
            (_, Activity::UnixMillis, SampleValue::Int(i)) => Utc.timestamp_millis_opt(*i).single(),
            (Dialect::Sqlite, _, _) => None,
            (_, Activity::Instant, SampleValue::Int(i)) => Some(from_ms(*i)),
            (_, Activity::Naive(tz), SampleValue::Int(i)) => naive_ms(*i)
                .and_local_timezone(tz)
                .latest()
                .map(|t| t.with_timezone(&Utc)),
            _ => None,
        }
    }

    /// Samples the newest and oldest active last-activity values for `check`.
    async fn timestamp_findings(&self) -> Result<Vec<Finding>> {
        let sql = match self.sql().await {
            Ok(sql) => sql,
            Err(e) => return Ok(vec![Finding::Error(e.to_string())]),
        };
        let format_applies = self.format_applies(sql.shape.activity);
        let active = [Arg::Text(self.source.active_value.clone())];
        let now = self.database_time().await?;
        let bound = self.cutoff(sql.shape.activity, now + FURTHEST_ZONE_AHEAD);
        let bounded = [active[0].clone(), bound];
        let mut samples = Vec::new();
        let mut newest = None;
        for (which, stmt, args) in [
            ("newest", &sql.sample_newest, &bounded[..]),
            ("oldest", &sql.sample_oldest, &active[..]),
        ] {
            let Some(row) = query(stmt, args)
                .fetch_optional(&self.pool)
                .await
                .op("sampling last-activity values")?
            else {
                continue;
            };
            if which == "newest" {
                newest = self.activity_instant(sql.shape.activity, &row, 0);
            }
            if format_applies {
                samples.push((which, sample_value(&row)));
            }
        }
        let rows = query(&sql.far_ahead, &bounded)
            .fetch_all(&self.pool)
            .await
            .op("sampling last-activity values")?;
        let [earlier, far_ahead, unreadable] = kind_counts(&rows);
        let readable = earlier + far_ahead;
        let mut findings = if format_applies {
            format_findings(self.source.last_activity_format, &samples)
        } else {
            vec![Finding::Ok(format!(
                "{} is read as {}",
                self.source.last_activity_column,
                match sql.shape.activity {
                    Activity::Instant => "an instant".to_owned(),
                    Activity::Naive(tz) => format!("wall-clock time in {tz}"),
                    Activity::UnixSeconds => "Unix seconds".to_owned(),
                    Activity::UnixMillis => "Unix milliseconds".to_owned(),
                    Activity::Rfc3339 => "RFC 3339 text".to_owned(),
                }
            ))]
        };
        if !findings.iter().any(Finding::is_error) {
            if readable == 0 && unreadable > 0 {
                findings.push(none_readable_finding(
                    unreadable,
                    format_applies,
                    &self.source,
                ));
                return Ok(findings);
            }
            match far_ahead_finding(far_ahead, readable, format_applies, &self.source) {
                // Half the readable values or more are far ahead: the rest say nothing of the
                // zone.
                Some(misread @ Finding::Error(_)) => findings.push(misread),
                far_ahead => {
                    findings.extend(far_ahead);
                    findings.push(newest_finding(newest, now, self.source.idle_after));
                }
            }
        }
        Ok(findings)
    }

    /// One statement's rows, on the steps' lane.
    pub(crate) async fn step_rows(
        &self,
        stmt: &Stmt,
        args: &[Arg],
        op: &'static str,
    ) -> Result<Vec<AnyRow>> {
        on_lane!(self, self.lanes.steps, op, |conn| query(stmt, args)
            .fetch_all(conn)
            .await
            .op(op)
            .map_err(Failed::First))
    }

    /// One statement's one row, on the steps' lane.
    async fn step_row(&self, stmt: &Stmt, args: &[Arg], op: &'static str) -> Result<AnyRow> {
        on_lane!(self, self.lanes.steps, op, |conn| query(stmt, args)
            .fetch_one(conn)
            .await
            .op(op)
            .map_err(Failed::First))
    }

    /// One statement's rows affected, on the steps' lane.
    async fn step_execute(&self, stmt: &Stmt, args: &[Arg], op: &'static str) -> Result<u64> {
        on_lane!(self, self.lanes.steps, op, |conn| query(stmt, args)
            .execute(conn)
            .await
            .op(op)
            .map(|done| done.rows_affected())
            .map_err(Failed::First))
    }

    /// The database's clock, read on `conn`.
    async fn clock_on(&self, conn: &mut sqlx::AnyConnection) -> Result<DateTime<Utc>> {
        let row = sqlx::query(&format!("SELECT {}", self.dialect.now_ms()))
            .fetch_one(conn)
            .await
            .op("reading the database's clock")?;
        Ok(from_ms(int(&row, 0)))
    }

    /// A write transaction (SQLite takes its write lock at once).
    pub(crate) async fn begin_write(
        &self,
        op: &'static str,
    ) -> Result<sqlx::Transaction<'static, Any>> {
        match self.dialect.begin_write() {
            Some(begin) => self.pool.begin_with(begin).await.op(op),
            None => self.pool.begin().await.op(op),
        }
    }
}

/// Statements every new connection runs: the session settings the sweeper relies on.
fn session_setup(dialect: Dialect) -> &'static [&'static str] {
    match dialect {
        Dialect::Sqlite => &[
            "PRAGMA journal_mode = WAL",
            "PRAGMA synchronous = NORMAL",
            "PRAGMA busy_timeout = 30000",
        ],
        // Never wait forever on the application's row locks or a stuck statement: a failed
        // write is retried by the recorder, a hung one would stall the sweep and its shutdown.
        Dialect::Postgres => &[
            "SET application_name = 'session-sweeper'",
            "SET lock_timeout = '5s'",
            "SET statement_timeout = '60s'",
        ],
        // UTC for TIMESTAMP columns and UNIX_TIMESTAMP(); READ COMMITTED so a claim takes no
        // gap locks that would block the shop's own inserts; 5 s for a row lock, and for a table
        // lock (the shop's `LOCK TABLES`, a migration's ALTER) whose default wait is a day.
        Dialect::MySql => &[
            "SET time_zone = '+00:00'",
            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "SET SESSION innodb_lock_wait_timeout = 5",
            "SET SESSION lock_wait_timeout = 5",
        ],
    }
}

#[async_trait]
impl Store for SqlStore {
    async fn migrate(&self) -> Result<()> {
        match self.dialect {
            Dialect::Sqlite => super::sqlite::migrate(self).await,
            Dialect::Postgres => super::postgres::migrate(self).await,
            Dialect::MySql => super::mysql::migrate(self).await,
        }
    }

    async fn pending_migrations(&self) -> Result<Vec<String>> {
        let (migrations, table) = match self.dialect {
            Dialect::Sqlite => (super::sqlite::MIGRATIONS, super::sqlite::MIGRATIONS_TABLE),
            Dialect::Postgres => (
                super::postgres::MIGRATIONS,
                super::postgres::MIGRATIONS_TABLE,
            ),
            Dialect::MySql => (super::mysql::MIGRATIONS, super::mysql::MIGRATIONS_TABLE),
        };
        let exists = strings(
            self,
            &self.q(table),
            &[],
            "looking for the migrations table",
        )
        .await?;
        let applied: Vec<i64> = if exists.is_empty() {
            Vec::new()
        } else {
            self.step_rows(
                &self.q("SELECT version FROM sweeper_schema_migrations"),
                &[],
                "reading applied migrations",
            )
            .await?
            .iter()
            .filter_map(|r| opt_int(r, 0))
            .collect()
        };
        Ok(super::pending(migrations, &applied))
    }

    async fn check(&self) -> Result<Vec<Finding>> {
        let mut findings = Vec::new();
        if self.dialect == Dialect::MySql {
            findings.push(super::mysql::version_finding(self).await?);
        }
        let catalog = match self.dialect {
            Dialect::Sqlite => super::sqlite::catalog(self).await?,
            Dialect::Postgres => super::postgres::catalog(self).await?,
            Dialect::MySql => super::mysql::catalog(self).await?,
        };
        findings.extend(column_findings(&self.source, &catalog.columns));
        if !findings.iter().any(Finding::is_error) {
            if catalog.is_view {
                findings.push(super::view_finding(&self.source));
            } else {
                findings.extend(index_findings(
                    &self.source,
                    &catalog.indexes,
                    catalog.index_dialect,
                ));
            }
            findings.extend(catalog.status);
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
        let rows = query(&sql.eligible, &self.eligible_args(&sql.shape, &p))
            .fetch_all(&self.pool)
            .await
            .op("listing eligible sessions")?;
        let now = self.database_time().await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let last = self.activity_instant(sql.shape.activity, r, 2)?;
                Some(IdleSession {
                    token: text(r, 0)?,
                    member: text(r, 1)?,
                    idle_for: (now - last).to_std().unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn count_eligible(&self, p: ClaimParams<'_>) -> Result<u64> {
        let sql = self.sql().await?;
        let row = query(&sql.count, &self.eligible_args(&sql.shape, &p))
            .fetch_one(&self.pool)
            .await
            .op("counting eligible sessions")?;
        Ok(int(&row, 0) as u64)
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let op = "taking a snapshot to count in";
        let mut conn = self.pool.acquire().await.op(op)?;
        // Closed when done, never given back to the pool: a `BEGIN` cut short by an abort may
        // still have begun on the server (MySQL's driver does not roll that back), and MySQL's
        // `SET TRANSACTION` holds for the next transaction if the `BEGIN` never came. Neither
        // may reach a claim or a re-check on a pooled connection.
        conn.close_on_drop();
        let (before, begin, pin) = self.dialect.snapshot();
        if let Some(before) = before {
            sqlx::query(before).execute(&mut *conn).await.op(op)?;
        }
        let mut tx = sqlx::Transaction::begin(conn, Some(begin.into()))
            .await
            .op(op)?;
        if let Some(pin) = pin {
            sqlx::query(pin).execute(&mut *tx).await.op(op)?;
        }
        Ok(Snapshot { tx })
    }

    async fn counts_in(
        &self,
        snapshot: Snapshot,
        p: ClaimParams<'_>,
    ) -> Result<(UnusableRows, u64)> {
        let sql = self.sql().await?;
        let op = "counting the sweep's sessions";
        let Snapshot { mut tx } = snapshot;
        let unusable = query(
            &sql.unusable,
            &[Arg::Text(self.source.active_value.clone())],
        )
        .fetch_all(&mut *tx)
        .await
        .op(op)?;
        let to_sweep = query(&sql.count_to_sweep, &self.eligible_args(&sql.shape, &p))
            .fetch_one(&mut *tx)
            .await
            .op(op)?;
        tx.commit().await.op(op)?;
        Ok((unusable_from(&unusable), int(&to_sweep, 0) as u64))
    }

    fn can_count_beside_a_sweep(&self) -> bool {
        self.pool.options().get_max_connections() >= MIN_POOL_TO_COUNT_BESIDE_A_SWEEP
    }

    async fn claim(&self, p: ClaimParams<'_>) -> Result<Vec<Lease>> {
        let sql = self.sql().await?;
        let args = self.eligible_args(&sql.shape, &p);
        on_lane!(self, self.lanes.steps, "claiming sessions", |conn| {
            match self.dialect {
                Dialect::Postgres => super::postgres::run_claim(conn, &sql.claim, &args).await,
                Dialect::Sqlite => super::sqlite::run_claim(self, conn, &sql.claim, &args).await,
                Dialect::MySql => super::mysql::run_claim(self, conn, &sql.claim, &args, &p).await,
            }
        })
    }

    async fn explain_claim(&self, p: ClaimParams<'_>) -> Result<String> {
        let sql = self.sql().await?;
        let (prefix, col) = match self.dialect {
            Dialect::Sqlite => ("EXPLAIN QUERY PLAN ", 3),
            Dialect::Postgres => ("EXPLAIN ", 0),
            Dialect::MySql => ("EXPLAIN FORMAT=JSON ", 0),
        };
        let stmt = Stmt {
            text: format!("{prefix}{}", sql.claim.text),
            binds: sql.claim.binds.clone(),
        };
        let rows = query(&stmt, &self.eligible_args(&sql.shape, &p))
            .fetch_all(&self.pool)
            .await
            .op("explaining the claim")?;
        Ok(rows
            .iter()
            .map(|r| format!("{}\n", text(r, col).unwrap_or_default()))
            .collect())
    }

    async fn skip_revived(&self, p: ClaimParams<'_>) -> Result<u64> {
        let sql = self.sql().await?;
        let args = self.eligible_args(&sql.shape, &p);
        on_lane!(self, self.lanes.steps, "starting a skip", |conn| {
            async {
                let mut tx = self
                    .begin_on(conn, "starting a skip")
                    .await
                    .map_err(Failed::First)?;
                let done = query(&sql.skip_revived, &args)
                    .execute(&mut *tx)
                    .await
                    .op("skipping revived sessions")
                    .map_err(Failed::Later)?;
                tx.commit()
                    .await
                    .op("committing a skip")
                    .map_err(Failed::Later)?;
                Ok(done.rows_affected())
            }
            .await
        })
    }

    async fn recheck_many(
        &self,
        worker: &str,
        tokens: &[&str],
        idle_before: DateTime<Utc>,
    ) -> Result<Vec<Recheck>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        self.recheck_on_lane(worker, tokens, idle_before).await
    }

    async fn record(&self, worker: &str, batch: &[Settlement]) -> Result<Vec<String>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.record_on_lane(worker, batch).await
    }

    async fn mark_passive(&self, tokens: &[String], idle_before: DateTime<Utc>) -> Result<u64> {
        if tokens.is_empty() {
            return Ok(0);
        }
        self.mark_on_lane(tokens, idle_before).await
    }

    async fn unmarked(&self, limit: u32) -> Result<Vec<String>> {
        strings(
            self,
            &self.q("SELECT session_token FROM sweeper_sessions WHERE source_marked = 0 LIMIT $1"),
            &[Arg::Int(i64::from(limit))],
            "listing sessions whose source row is not marked",
        )
        .await
    }

    async fn unusable_rows(&self) -> Result<UnusableRows> {
        let sql = self.sql().await?;
        let rows = query(
            &sql.unusable,
            &[Arg::Text(self.source.active_value.clone())],
        )
        .fetch_all(&self.pool)
        .await
        .op("counting unusable source rows")?;
        Ok(unusable_from(&rows))
    }

    async fn release_all(&self, worker: &str) -> Result<u64> {
        self.step_execute(
            &self.q("UPDATE sweeper_sessions SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = $1"),
            &[Arg::Text(worker.to_owned())],
            "releasing leases",
        )
        .await
    }

    async fn renew_leases(&self, worker: &str, lease: Duration) -> Result<u64> {
        let renew = self.q(&format!(
            "UPDATE sweeper_sessions SET lease_expires_at = {} + $1 WHERE lease_owner = $2",
            self.dialect.now_ms()
        ));
        let args = [Arg::Int(millis(lease)), Arg::Text(worker.to_owned())];
        on_lane!(self, self.lanes.steps, "renewing leases", |conn| {
            let mut tries = 1;
            loop {
                // The renewal takes our leases in the index's order while records and claims
                // take them in theirs: the database may end it to break a deadlock, having done
                // nothing. A failed renewal fails the heartbeat, so it is tried again at once.
                match query(&renew, &args).execute(&mut *conn).await {
                    Err(e) if lost_a_deadlock(&e) && tries < DEADLOCK_TRIES => tries += 1,
                    done => {
                        break done
                            .op("renewing leases")
                            .map(|done| done.rows_affected())
                            .map_err(Failed::First);
                    }
                }
            }
        })
    }

    async fn heartbeat(&self, worker: &WorkerInfo) -> Result<DateTime<Utc>> {
        let upsert = self.q(&format!(
            "INSERT INTO sweeper_workers (worker_id, hostname, pid, version, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, $4, $5, $5) {}",
            self.dialect.upsert_heartbeat()
        ));
        on_lane!(self, self.lanes.steps, "recording a heartbeat", |conn| {
            async {
                let now = self.clock_on(&mut *conn).await.map_err(Failed::First)?;
                let args = [
                    Arg::Text(worker.id.clone()),
                    Arg::Text(worker.hostname.clone()),
                    Arg::Int(i64::from(worker.pid)),
                    Arg::Text(env!("CARGO_PKG_VERSION").into()),
                    Arg::Int(ms(now)),
                ];
                query(&upsert, &args)
                    .execute(&mut *conn)
                    .await
                    .op("recording a heartbeat")
                    .map_err(Failed::Later)?;
                Ok(now)
            }
            .await
        })
    }

    async fn database_time(&self) -> Result<DateTime<Utc>> {
        let op = "reading the database's clock";
        on_lane!(self, self.lanes.steps, op, |conn| self
            .clock_on(conn)
            .await
            .map_err(Failed::First))
    }

    async fn live_workers(&self, stale_after: Duration) -> Result<u32> {
        let stmt = self.q(&format!(
            "SELECT {} FROM sweeper_workers WHERE heartbeat_at > {} - $1",
            self.dialect.int("COUNT(*)"),
            self.dialect.now_ms()
        ));
        let args = [Arg::Int(millis(stale_after))];
        let row = self.step_row(&stmt, &args, "counting live workers").await?;
        Ok(int(&row, 0) as u32)
    }

    async fn workers_on_host(&self, hostname: &str) -> Result<Vec<WorkerRow>> {
        let rows = self
            .step_rows(
                &self.q("SELECT worker_id, pid FROM sweeper_workers WHERE hostname = $1"),
                &[Arg::Text(hostname.to_owned())],
                "listing workers",
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(WorkerRow {
                    id: text(r, 0)?,
                    pid: opt_int(r, 1)? as u32,
                })
            })
            .collect())
    }

    async fn forget_worker(&self, worker: &str) -> Result<()> {
        self.step_execute(
            &self.q("DELETE FROM sweeper_workers WHERE worker_id = $1"),
            &[Arg::Text(worker.to_owned())],
            "removing a worker",
        )
        .await
        .map(drop)
    }

    async fn report(&self, failures: u32) -> Result<Report> {
        let d = self.dialect;
        let rows = sqlx::query(&format!(
            "SELECT state, {} FROM sweeper_sessions GROUP BY state",
            d.int("COUNT(*)")
        ))
        .fetch_all(&self.pool)
        .await
        .op("counting outcomes")?;
        let counts = count_rows(rows.iter().filter_map(|r| Some((text(r, 0)?, int(r, 1)))));
        let now = d.now_ms();
        let p = sqlx::query(&format!(
            "SELECT {}, MIN(next_attempt_at), {}, \
             (SELECT {} FROM sweeper_sessions WHERE lease_owner IS NOT NULL), \
             (SELECT {} FROM sweeper_sessions WHERE source_marked = 0) \
             FROM sweeper_sessions WHERE state = 'pending'",
            d.int("COUNT(*)"),
            d.int(&format!(
                "COALESCE(SUM(CASE WHEN next_attempt_at IS NULL OR next_attempt_at <= {now} THEN 1 ELSE 0 END), 0)"
            )),
            d.int("COUNT(*)"),
            d.int("COUNT(*)"),
        ))
        .fetch_one(&self.pool)
        .await
        .op("summarising pending sessions")?;
        // Tokens as bytes: a token that is not UTF-8 text (settled `bad_source_row`) is still
        // fingerprinted, never decoded.
        let recent = query(
            &self.q(&format!(
                "SELECT {}, last_error_code, {}, attempts, settled_at \
                 FROM sweeper_sessions WHERE state = 'failed' ORDER BY settled_at DESC LIMIT $1",
                d.bytes("session_token"),
                d.text("last_error_message")
            )),
            &[Arg::Int(i64::from(failures))],
        )
        .fetch_all(&self.pool)
        .await
        .op("listing failures")?;
        Ok(Report {
            counts,
            pending: PendingSummary {
                count: int(&p, 0) as u64,
                next_due: opt_int(&p, 1).map(from_ms),
                due_now: int(&p, 2) as u64,
            },
            leased: int(&p, 3) as u64,
            recent_failures: recent
                .iter()
                .map(|r| FailureRow {
                    session: fingerprint(&String::from_utf8_lossy(&raw_bytes(r, 0))),
                    error_code: text(r, 1),
                    error_message: text(r, 2),
                    attempts: int(r, 3) as u32,
                    failed_at: opt_int(r, 4).map(from_ms),
                })
                .collect(),
            source_not_marked: int(&p, 4) as u64,
            unusable: self.unusable_rows().await?,
        })
    }

    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        let done = query(
            &self.q(&format!(
                "UPDATE sweeper_sessions SET state = 'pending', attempts = 0, next_attempt_at = NULL, \
                 settled_at = NULL, updated_at = {} WHERE state = 'failed' AND ($1 IS NULL OR last_error_code = $1)",
                self.dialect.now_ms()
            )),
            &[Arg::opt_text(filter.error_code.as_deref())],
        )
        .execute(&self.pool)
        .await
        .op("requeueing failed sessions")?;
        Ok(done.rows_affected())
    }

    async fn status(&self, failures: u32) -> Result<super::StatusData> {
        let report = self.report(failures).await?;
        let calls = self.calls_per_minute().await?;
        let ends = self.call_ends().await?;
        Ok(super::StatusData {
            report,
            now: ends.now,
            calls,
            calls_cover_from: ends.cover_from,
            last_call_at: ends.last_call_at,
            workers: self.worker_statuses().await?,
            failures_by_code: self.failure_groups().await?,
            pending_by_due: self.pending_by_due().await?,
        })
    }

    async fn ping(&self) -> Result<()> {
        // A fresh connection, not the pool: the pool retries a refused connection until its
        // acquire timeout and then says only "timed out".
        let connect = sqlx::AnyConnection::connect(&self.url);
        let mut conn = tokio::time::timeout(ACQUIRE_TIMEOUT, connect)
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

    async fn open_connections(&self, n: u32) -> Result<()> {
        let n = n.min(self.pool.options().get_max_connections());
        let open = futures::future::try_join_all((0..n).map(|_| self.pool.acquire()))
            .await
            .op("connecting to the database")?;
        // Given back before returning, not by the tasks a drop would spawn: the next step
        // would not find them idle yet and would open one more.
        for mut conn in open {
            conn.return_to_pool().await;
        }
        Ok(())
    }

    async fn close(&self) {
        let mut open: Vec<_> = [
            self.lanes.steps.take_kept(),
            self.lanes.recheck.take_kept(),
            self.lanes.record.take_kept(),
            self.lanes.mark.take_kept(),
        ]
        .into_iter()
        .flatten()
        .collect();
        open.extend(std::iter::from_fn(|| self.pool.try_acquire()));
        // Side by side: each close waits for the server to end its session, and the pool would
        // close its connections one after the other (a few milliseconds each, at every exit).
        futures::future::join_all(open.into_iter().map(|conn| conn.close())).await;
        self.pool.close().await;
    }
}

/// The status page's bounded queries, beside [`Store::status`].
mod status_queries;

/// What a backend's catalog says about the source table, for `check`.
pub(crate) struct Catalog {
    /// Its column names (none: it does not exist).
    pub columns: Vec<String>,
    /// Column lists of its indexes.
    pub indexes: Vec<Vec<String>>,
    /// Whether it is a view.
    pub is_view: bool,
    /// Findings about writing the status column.
    pub status: Vec<Finding>,
    /// How a suggested `CREATE INDEX` is written.
    pub index_dialect: super::IndexDialect,
}

/// A stored value as `check` samples it where `source.last_activity_format` applies (the
/// sample selects the value and its kind: SQLite's `typeof`, `'integer'` for a MySQL column).
pub(crate) fn sample_value(row: &sqlx::any::AnyRow) -> SampleValue {
    let kind: String = row.try_get(1).unwrap_or_default();
    match kind.as_str() {
        "integer" => row
            .try_get::<i64, _>(0)
            .map(SampleValue::Int)
            .unwrap_or_else(|_| SampleValue::Other(kind)),
        "text" => row
            .try_get::<String, _>(0)
            .map(SampleValue::Text)
            .unwrap_or_else(|_| SampleValue::Other("text that is not UTF-8".into())),
        _ => SampleValue::Other(kind),
    }
}

/// The unusable-rows statement's answer.
fn unusable_from(rows: &[AnyRow]) -> UnusableRows {
    let [_fine, unreadable_last_activity, bad_source_row] = kind_counts(rows);
    UnusableRows {
        unreadable_last_activity,
        bad_source_row,
    }
}

/// The rows of a statement that counts rows by kind (`kind`, `COUNT(*)`, kinds `0..N`), as
/// counts indexed by kind; a kind no row has counts 0.
fn kind_counts<const N: usize>(rows: &[AnyRow]) -> [u64; N] {
    let mut counts = [0; N];
    for row in rows {
        if let Some(n) = usize::try_from(int(row, 0))
            .ok()
            .and_then(|k| counts.get_mut(k))
        {
            *n = int(row, 1) as u64;
        }
    }
    counts
}

/// Rows of a query as strings (catalog queries), NULLs skipped.
pub(crate) async fn strings(
    store: &SqlStore,
    stmt: &Stmt,
    args: &[Arg],
    op: &'static str,
) -> Result<Vec<String>> {
    let rows = store.step_rows(stmt, args, op).await?;
    Ok(rows.iter().filter_map(|r| text(r, 0)).collect())
}

/// Used by the backends' claims.
pub(crate) fn lease_from_row(r: &AnyRow) -> Option<Lease> {
    Some(Lease {
        token: text(r, 0)?,
        member: text(r, 1)?,
        attempts: opt_int(r, 2)? as u32,
    })
}

/// Used by SQLite's claim.
pub(crate) fn bytes(r: &AnyRow, i: usize) -> Option<Vec<u8>> {
    r.try_get::<Option<Vec<u8>>, _>(i).ok().flatten()
}

/// Used by SQLite's claim.
pub(crate) fn int_at(r: &AnyRow, i: usize) -> i64 {
    int(r, i)
}

/// The current format, for SQLite's activity kinds.
pub(crate) fn sqlite_activity(format: TimestampFormat, tz: chrono_tz::Tz) -> Activity {
    match format {
        TimestampFormat::SqliteText => Activity::Naive(tz),
        TimestampFormat::Rfc3339 => Activity::Rfc3339,
        TimestampFormat::UnixSeconds => Activity::UnixSeconds,
        TimestampFormat::UnixMillis => Activity::UnixMillis,
    }
}

/// The migration runner every backend shares, on a connection (or transaction) that already
/// holds the backend's migration lock: creates the migrations table with `table_ddl`, applies
/// what is not recorded yet and records it with `record` (`$1` version, `$2` name).
/// `one_at_a_time` runs a file statement by statement (MySQL takes no multi-statement text).
pub(crate) async fn apply_migrations(
    store: &SqlStore,
    conn: &mut sqlx::AnyConnection,
    table_ddl: &str,
    migrations: &[super::Migration],
    record: &str,
    one_at_a_time: bool,
) -> Result<()> {
    sqlx::Executor::execute(&mut *conn, table_ddl)
        .await
        .op("creating the migrations table")?;
    let done: Vec<i64> = sqlx::query("SELECT version FROM sweeper_schema_migrations")
        .fetch_all(&mut *conn)
        .await
        .op("reading applied migrations")?
        .iter()
        .filter_map(|r| opt_int(r, 0))
        .collect();
    let record = store.dialect.render(record);
    for m in migrations.iter().filter(|m| !done.contains(&m.version)) {
        let statements = if one_at_a_time {
            migration_statements(m.sql)
        } else {
            vec![m.sql.to_owned()]
        };
        for statement in statements {
            sqlx::Executor::execute(&mut *conn, statement.as_str())
                .await
                .op("applying a migration")?;
        }
        query(&record, &[Arg::Int(m.version), Arg::Text(m.name.into())])
            .execute(&mut *conn)
            .await
            .op("recording a migration")?;
    }
    Ok(())
}

/// The statements of a migration file, comments dropped.
pub(crate) fn migration_statements(sql: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}
