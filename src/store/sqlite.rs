//! SQLite: one file, WAL mode, a busy timeout so a second process waits instead of failing, and
//! `BEGIN IMMEDIATE` around every write so two processes never claim the same session. The one
//! host's clock is the clock every worker on the file shares.

use std::time::Duration;

use sqlx::AnyConnection;
use sqlx::Row as _;

use super::core::{Arg, Catalog, Shape, SqlStore, bytes, int_at, query, strings};
use super::dialect::Stmt;
use super::lane::Failed;
use super::{
    BAD_SOURCE_ROW, EARLIEST_PLAUSIBLE_TIME, EARLIEST_PLAUSIBLE_UNIX_SECONDS, Finding,
    IndexDialect, Lease, Migration, Op, Result, StoreError,
};
use crate::config::TimestampFormat;

/// How long a statement waits for another process's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The sweeper's own tables, version by version.
pub(crate) const MIGRATIONS: &[Migration] = &[
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
    Migration {
        version: 3,
        name: "claim_id",
        sql: include_str!("../../migrations/sqlite/0003_claim_id.sql"),
    },
];

/// The condition under which a last-activity value fits the configured format, so that SQL can
/// compare it with the cutoff as stored (and an index can serve the comparison). A value that
/// does not fit is never eligible: integers sort before all text in SQLite, so without this a
/// column of Unix seconds would read as "idle since the dawn of time". Text before 2000 (the
/// Unix formats' floor) is none either: `0001-01-01 00:00:00` is the zero time of .NET and Go.
pub(crate) fn fits(col: &str, format: TimestampFormat) -> String {
    const DATE: &str = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]";
    const TIME: &str = "[0-9][0-9]:[0-9][0-9]:[0-9][0-9]";
    // strftime() normalises or refuses impossible times (February 30th, hour 25): a value that
    // does not come back unchanged is no real time and is never eligible. Hour 24 of some
    // dates comes back unchanged, hence its own test. SQLite's length(), substr() and GLOB
    // stop at a NUL while its comparisons go on: a time, a NUL, then anything would pass for
    // the time. instr() looks past it, in UTF-8 and UTF-16 files alike.
    let real = |sep: &str| {
        format!(
            "typeof({col}) = 'text' AND instr({col}, char(0)) = 0 \
             AND {col} >= '{EARLIEST_PLAUSIBLE_TIME}' \
             AND substr({col}, 1, 19) GLOB '{DATE}{sep}{TIME}' AND substr({col}, 12, 2) < '24' \
             AND strftime('%Y-%m-%d{sep}%H:%M:%S', substr({col}, 1, 19)) = substr({col}, 1, 19)"
        )
    };
    // Digits only, at least one, between the '.' at 20 and a suffix `tail` characters long.
    let fraction = |tail: usize| {
        let around = 20 + tail;
        format!(
            "(substr({col}, 20, 1) = '.' AND length({col}) > {around} \
             AND substr({col}, 21, length({col}) - {around}) NOT GLOB '*[^0-9]*')"
        )
    };
    match format {
        TimestampFormat::SqliteText => format!(
            "({} AND (length({col}) = 19 OR {}))",
            real(" "),
            fraction(0)
        ),
        TimestampFormat::Rfc3339 => format!(
            "({} AND (substr({col}, 20) IN ('Z', '+00:00') \
                  OR (substr({col}, -1) = 'Z' AND {}) OR (substr({col}, -6) = '+00:00' AND {})))",
            real("T"),
            fraction(1),
            fraction(6)
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

/// The claim: candidates into the ledger in one statement (run under `BEGIN IMMEDIATE`).
/// Duplicate tokens collapse to one (GROUP BY); tokens come back as bytes, so text that is not
/// UTF-8 can be settled instead of failing the claim.
pub(crate) fn claim(candidates: &str, now: &str) -> String {
    format!(
        "INSERT INTO sweeper_sessions (session_token, member_identifier, state, attempts, \
         lease_owner, lease_expires_at, created_at, updated_at) \
         SELECT token, MIN(member), 'pending', 0, $5, {now} + $6, {now}, {now} FROM ({candidates}) \
         WHERE true GROUP BY token \
         ON CONFLICT (session_token) DO UPDATE SET lease_owner = excluded.lease_owner, \
         lease_expires_at = excluded.lease_expires_at, updated_at = excluded.updated_at, state = 'pending' \
         RETURNING CAST(session_token AS BLOB), CAST(member_identifier AS BLOB), attempts"
    )
}

/// Runs the claim; settles rows whose token or member is not UTF-8 text as failed.
pub(crate) async fn run_claim(
    store: &SqlStore,
    conn: &mut AnyConnection,
    claim: &Stmt,
    args: &[Arg],
) -> std::result::Result<Vec<Lease>, Failed> {
    let tx = store
        .begin_on(conn, "starting a claim")
        .await
        .map_err(Failed::First)?;
    claim_in(store, tx, claim, args)
        .await
        .map_err(Failed::Later)
}

/// The claim's statements in `tx`, and its commit.
async fn claim_in(
    store: &SqlStore,
    mut tx: sqlx::Transaction<'_, sqlx::Any>,
    claim: &Stmt,
    args: &[Arg],
) -> Result<Vec<Lease>> {
    let rows = query(claim, args)
        .fetch_all(&mut *tx)
        .await
        .op("claiming sessions")?;
    let mut leases = Vec::with_capacity(rows.len());
    for r in &rows {
        let token = bytes(r, 0);
        let as_text = |b: Option<Vec<u8>>| b.and_then(|b| String::from_utf8(b).ok());
        match (as_text(token.clone()), as_text(bytes(r, 1))) {
            (Some(token), Some(member)) => leases.push(Lease {
                token,
                member,
                attempts: int_at(r, 2) as u32,
            }),
            _ => {
                // Text that is not UTF-8 can be neither sent nor logged: settle it as failed, by
                // the bytes it is stored as, so it never comes back.
                tracing::warn!("a source row's token or member is not UTF-8 text; settled failed");
                let settle = store.dialect.render(&format!(
                    "UPDATE sweeper_sessions SET state = 'failed', last_error_code = $1, \
                     last_error_message = 'the token or member is not UTF-8 text', lease_owner = NULL, \
                     lease_expires_at = NULL, settled_at = {now}, updated_at = {now} \
                     WHERE session_token = CAST($2 AS TEXT)",
                    now = store.dialect.now_ms()
                ));
                query(
                    &settle,
                    &[
                        Arg::Text(BAD_SOURCE_ROW.into()),
                        Arg::Bytes(token.unwrap_or_default()),
                    ],
                )
                .execute(&mut *tx)
                .await
                .op("settling an unreadable source row")?;
            }
        }
    }
    tx.commit().await.op("committing a claim")?;
    Ok(leases)
}

/// SQLite's text has no zone: it is read in `source.last_activity_timezone`, else UTC, which
/// is what SQLite's own clock functions write. A file that stores its text as UTF-16 is
/// refused: tokens are read as the file's bytes (to tell text that is not UTF-8 from text that
/// is), and UTF-16 bytes are no token iyzico knows.
pub(crate) async fn shape(store: &SqlStore) -> Result<Shape> {
    let encoding = strings(
        store,
        &store.dialect.render("PRAGMA encoding"),
        &[],
        "reading the file's text encoding",
    )
    .await?;
    if let Some(other) = encoding.first().filter(|e| *e != "UTF-8") {
        return Err(StoreError::Schema(format!(
            "the SQLite file stores its text as {other}; session-sweeper reads UTF-8 files \
             only: convert it with `sqlite3 FILE .dump | sqlite3 NEW_FILE` and point \
             database.url at the new file"
        )));
    }
    let tz = store
        .source
        .last_activity_timezone
        .unwrap_or(chrono_tz::UTC);
    Ok(Shape {
        activity: super::core::sqlite_activity(store.source.last_activity_format, tz),
        token_from_text: "{}".into(),
        // By the index (as text, or as the integer a column without text affinity stores),
        // then exactly as text.
        same_token: "s.{tok} IN ({}, CAST({} AS INTEGER)) AND CAST(s.{tok} AS TEXT) = {}".into(),
    })
}

/// The source's columns, indexes and kind, and whether its status can be written.
pub(crate) async fn catalog(store: &SqlStore) -> Result<Catalog> {
    let src = &store.source;
    let schema = src.table.schema().unwrap_or("main");
    let name = || Arg::Text(src.table.name().to_owned());
    let q = |t: &str| store.dialect.render(t);
    let columns = strings(
        store,
        &q("SELECT name FROM pragma_table_info($1, $2)"),
        &[name(), Arg::Text(schema.into())],
        "reading the source table's columns",
    )
    .await?;
    let mut indexes = Vec::new();
    for index in strings(
        store,
        &q("SELECT name FROM pragma_index_list($1, $2)"),
        &[name(), Arg::Text(schema.into())],
        "listing the source table's indexes",
    )
    .await?
    {
        indexes.push(
            strings(
                store,
                &q("SELECT name FROM pragma_index_info($1, $2) ORDER BY seqno"),
                &[Arg::Text(index), Arg::Text(schema.into())],
                "reading an index of the source table",
            )
            .await?,
        );
    }
    // `schema` is a validated identifier; an attached schema's catalog is addressed through it.
    let kinds = query(
        &q(&format!(
            "SELECT type, COALESCE(sql, '') FROM \"{schema}\".sqlite_master \
             WHERE (type = 'view' AND name = $1) OR (type = 'trigger' AND tbl_name = $1)"
        )),
        &[name()],
    )
    .fetch_all(&store.pool)
    .await
    .op("reading the source table's kind")?;
    let is_view = kinds
        .iter()
        .any(|r| r.try_get::<String, _>(0).is_ok_and(|t| t == "view"));
    let refusing_trigger = kinds.iter().any(|r| {
        r.try_get::<String, _>(1).is_ok_and(|sql| {
            let sql = sql.to_ascii_uppercase();
            sql.contains("BEFORE UPDATE") && sql.contains("RAISE")
        })
    });
    let instead_of_update = kinds.iter().any(|r| {
        r.try_get::<String, _>(1)
            .is_ok_and(|sql| sql.to_ascii_uppercase().contains("INSTEAD OF UPDATE"))
    });
    let mut status = Vec::new();
    if refusing_trigger && src.mark_passive {
        status.push(super::trigger_warning(src));
    }
    if is_view && src.mark_passive && !instead_of_update {
        status.push(Finding::Error(format!(
            "source.status_column: {} is a view without an INSTEAD OF UPDATE trigger, so {} \
             cannot be set to the passive value; add the trigger or set source.mark_passive = false",
            src.table, src.status_column
        )));
    }
    Ok(Catalog {
        columns,
        indexes,
        is_view,
        status,
        index_dialect: IndexDialect::Sqlite,
    })
}

/// Applies the pending migrations under `BEGIN IMMEDIATE`.
pub(crate) async fn migrate(store: &SqlStore) -> Result<()> {
    let mut tx = store.begin_write("starting the migration").await?;
    let record = format!(
        "INSERT INTO sweeper_schema_migrations (version, name, applied_at) VALUES ($1, $2, {})",
        store.dialect.now_ms()
    );
    super::core::apply_migrations(
        store,
        &mut tx,
        "CREATE TABLE IF NOT EXISTS sweeper_schema_migrations (version INTEGER PRIMARY KEY, \
         name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        MIGRATIONS,
        &record,
        false,
    )
    .await?;
    tx.commit().await.op("committing the migration")
}

/// Finds the migrations table (a name, or nothing).
pub(crate) const MIGRATIONS_TABLE: &str =
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'sweeper_schema_migrations'";
