//! MySQL 8.0+ and MariaDB 10.6+: claims lock source rows `FOR UPDATE SKIP LOCKED` under READ
//! COMMITTED (no gap locks that would hold up the shop's own writes), write the ledger with an
//! upsert that leaves a live lease or a settlement alone, and read back what this claim took by
//! its claim id (there is no `RETURNING`). Sessions run with `time_zone = '+00:00'`.

use sqlx::AnyConnection;
use sqlx::Row as _;

use super::core::{Activity, Arg, Catalog, Shape, SqlStore, lease_from_row, query, strings};
use super::dialect::{Dialect, Stmt};
use super::lane::Failed;
use super::{
    ClaimParams, Finding, IndexDialect, Lease, Migration, Op, Result, StoreError, ledger_blocks,
    naive_zone,
};
use crate::config::TimestampFormat;

/// The sweeper's own tables, version by version.
pub(crate) const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "ledger",
    sql: include_str!("../../migrations/mysql/0001_ledger.sql"),
}];

/// The oldest servers with `SELECT … FOR UPDATE SKIP LOCKED`.
const MIN_MYSQL: (u32, u32) = (8, 0);
const MIN_MARIADB: (u32, u32) = (10, 6);

/// The candidate rows, locked; skipping rows another claim holds.
pub(crate) fn candidates(candidates: &str) -> String {
    format!("{candidates} FOR UPDATE SKIP LOCKED")
}

/// Locks candidates, writes their leases under a fresh claim id, reads back what it took.
pub(crate) async fn run_claim(
    store: &SqlStore,
    conn: &mut AnyConnection,
    candidates: &Stmt,
    args: &[Arg],
    p: &ClaimParams<'_>,
) -> std::result::Result<Vec<Lease>, Failed> {
    let tx = store
        .begin_on(conn, "starting a claim")
        .await
        .map_err(Failed::First)?;
    claim_in(store, tx, candidates, args, p)
        .await
        .map_err(Failed::Later)
}

/// The claim's statements in `tx`, and its commit.
async fn claim_in(
    store: &SqlStore,
    mut tx: sqlx::Transaction<'_, sqlx::Any>,
    candidates: &Stmt,
    args: &[Arg],
    p: &ClaimParams<'_>,
) -> Result<Vec<Lease>> {
    let picked = lock_candidates(&mut tx, candidates, args).await?;
    if picked.is_empty() {
        tx.commit().await.op("committing a claim")?;
        return Ok(Vec::new());
    }
    let claim_id = i64::from_le_bytes(
        uuid::Uuid::new_v4().as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    ) & i64::MAX;
    let (upsert, binds) = lease_upsert(store.dialect, p, &picked, claim_id);
    query(&upsert, &binds)
        .execute(&mut *tx)
        .await
        .op("claiming sessions")?;
    let taken = query(
        &store.dialect.render(
            "SELECT CAST(session_token AS CHAR), CAST(member_identifier AS CHAR), CAST(attempts AS SIGNED) \
             FROM sweeper_sessions WHERE claim_id = $1 AND lease_owner = $2",
        ),
        &[Arg::Int(claim_id), Arg::Text(p.worker.to_owned())],
    )
    .fetch_all(&mut *tx)
    .await
    .op("reading claimed sessions")?;
    tx.commit().await.op("committing a claim")?;
    Ok(taken.iter().filter_map(lease_from_row).collect())
}

/// Locks the candidate rows; their tokens and members, duplicate tokens collapsed to one.
async fn lock_candidates(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    candidates: &Stmt,
    args: &[Arg],
) -> Result<Vec<(String, String)>> {
    let rows = query(candidates, args)
        .fetch_all(&mut **tx)
        .await
        .op("claiming sessions")?;
    // Duplicate tokens in the source collapse to one claim.
    let mut seen = std::collections::HashSet::new();
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some((
                r.try_get::<String, _>(0).ok()?,
                r.try_get::<String, _>(1).ok()?,
            ))
        })
        .filter(|(t, _)| seen.insert(t.clone()))
        .collect())
}

/// The upsert that leases `picked` under `claim_id` where no live lease or settlement got
/// there first, and its arguments.
fn lease_upsert(
    d: Dialect,
    p: &ClaimParams<'_>,
    picked: &[(String, String)],
    claim_id: i64,
) -> (Stmt, Vec<Arg>) {
    let now = d.now_ms();
    let mut binds = vec![
        Arg::Text(p.worker.to_owned()),
        Arg::Int(i64::try_from(p.lease.as_millis()).unwrap_or(i64::MAX)),
        Arg::Int(claim_id),
        Arg::Int(i64::try_from(p.stale_after.as_millis()).unwrap_or(i64::MAX)),
    ];
    let mut values = Vec::new();
    for (token, member) in picked {
        binds.push(Arg::Text(token.clone()));
        binds.push(Arg::Text(member.clone()));
        let (t, m) = (binds.len() - 1, binds.len());
        values.push(format!(
            "(${t}, ${m}, 'pending', 0, $1, {now} + $2, {now}, {now}, $3)"
        ));
    }
    // The first assignment decides, on the row as it was, whether this claim may take it; the
    // others follow that decision (MySQL applies assignments left to right).
    let blocks = ledger_blocks(now, &format!("{now} - $4")).replace("l.", "sweeper_sessions.");
    let ours = "sweeper_sessions.claim_id = VALUES(claim_id)";
    let upsert = d.render(&format!(
        "INSERT INTO sweeper_sessions (session_token, member_identifier, state, attempts, \
         lease_owner, lease_expires_at, created_at, updated_at, claim_id) VALUES {} \
         ON DUPLICATE KEY UPDATE \
         claim_id = IF({blocks}, sweeper_sessions.claim_id, VALUES(claim_id)), \
         lease_owner = IF({ours}, VALUES(lease_owner), sweeper_sessions.lease_owner), \
         lease_expires_at = IF({ours}, VALUES(lease_expires_at), sweeper_sessions.lease_expires_at), \
         updated_at = IF({ours}, VALUES(updated_at), sweeper_sessions.updated_at), \
         state = IF({ours}, 'pending', sweeper_sessions.state)",
        values.join(", ")
    ));
    (upsert, binds)
}

/// The table's schema: the one named in `source.table`, else the connection's database.
fn schema_arg(store: &SqlStore) -> Arg {
    Arg::opt_text(store.source.table.schema())
}

async fn column_type(store: &SqlStore, column: &str) -> Result<Option<String>> {
    Ok(strings(
        store,
        &store.dialect.render(
            "SELECT CAST(LOWER(DATA_TYPE) AS CHAR) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = COALESCE($1, DATABASE()) AND TABLE_NAME = $2 AND COLUMN_NAME = $3",
        ),
        &[schema_arg(store), Arg::Text(store.source.table.name().into()), Arg::Text(column.into())],
        "reading a source column's type",
    )
    .await?
    .pop())
}

/// How the last-activity column holds time: `DATETIME` in a zone, `TIMESTAMP` as an instant
/// (read in UTC), or integers in the configured unit.
pub(crate) async fn shape(store: &SqlStore) -> Result<Shape> {
    let src = &store.source;
    let t = column_type(store, src.last_activity_column.name())
        .await?
        .ok_or_else(|| {
            StoreError::Schema(format!(
                "source.last_activity_column: column {} not found in {} (run `session-sweeper check`)",
                src.last_activity_column, src.table
            ))
        })?;
    let activity = match t.as_str() {
        "timestamp" => Activity::Instant,
        "datetime" => Activity::Naive(naive_zone(
            src.last_activity_timezone,
            &server_zone(store).await?,
            &format!("{} (DATETIME)", src.last_activity_column),
        )?),
        "int" | "bigint" | "integer" | "mediumint" => match src.last_activity_format {
            TimestampFormat::UnixSeconds => Activity::UnixSeconds,
            TimestampFormat::UnixMillis => Activity::UnixMillis,
            other => {
                return Err(StoreError::Schema(format!(
                    "source.last_activity_format: is {:?} but {} holds integers; set \
                     source.last_activity_format = \"unix_seconds\" or \"unix_millis\"",
                    super::format_name(other),
                    src.last_activity_column
                )));
            }
        },
        other => {
            return Err(StoreError::Schema(format!(
                "source.last_activity_column: {} is of type {other}; MySQL sources need DATETIME, \
                 TIMESTAMP, or integer Unix seconds or milliseconds",
                src.last_activity_column
            )));
        }
    };
    // The ledger keeps tokens as utf8mb4 bytes. A source row has a ledger token when the index
    // finds it (the value converted into the column's own character set and collation, or the
    // comparison would mix collations) and its utf8mb4 bytes are the same: collations fold case
    // and ignore trailing spaces, and a number compares with text as a number ('0012' = 12).
    let same_token = match token_collation(store).await? {
        Some((charset, collation)) => format!(
            "s.{{tok}} = CONVERT({{}} USING {charset}) COLLATE {collation} \
             AND CAST(CONVERT(s.{{tok}} USING utf8mb4) AS BINARY) = {{}}"
        ),
        None => {
            "s.{tok} = CAST({} AS CHAR) AND CAST(CONVERT(s.{tok} USING utf8mb4) AS BINARY) = {}"
                .into()
        }
    };
    Ok(Shape {
        activity,
        token_from_text: "{}".into(),
        same_token,
    })
}

/// The token column's character set and collation (`None` for a number), checked to be plain
/// names before they are written into SQL.
async fn token_collation(store: &SqlStore) -> Result<Option<(String, String)>> {
    let row = query(
        &store.dialect.render(
            "SELECT CAST(CHARACTER_SET_NAME AS CHAR), CAST(COLLATION_NAME AS CHAR) \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = COALESCE($1, DATABASE()) \
             AND TABLE_NAME = $2 AND COLUMN_NAME = $3",
        ),
        &[
            schema_arg(store),
            Arg::Text(store.source.table.name().into()),
            Arg::Text(store.source.token_column.name().into()),
        ],
    )
    .fetch_optional(&store.pool)
    .await
    .op("reading the token column's collation")?;
    let plain = |s: &str| {
        !s.is_empty() && s.len() < 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    Ok(row.and_then(|r| {
        let charset: String = r.try_get(0).ok()?;
        let collation: String = r.try_get(1).ok()?;
        (plain(&charset) && plain(&collation)).then_some((charset, collation))
    }))
}

/// The server's zone, as the shop's own connections see it (ours run in UTC).
async fn server_zone(store: &SqlStore) -> Result<String> {
    let row =
        sqlx::query("SELECT CAST(@@global.time_zone AS CHAR), CAST(@@system_time_zone AS CHAR)")
            .fetch_one(&store.pool)
            .await
            .op("reading the server's time zone")?;
    let global: String = row.try_get(0).unwrap_or_default();
    Ok(if global.eq_ignore_ascii_case("SYSTEM") {
        row.try_get(1).unwrap_or_default()
    } else {
        global
    })
}

/// `check`'s finding on the server's version: both need `SKIP LOCKED`.
pub(crate) async fn version_finding(store: &SqlStore) -> Result<Finding> {
    let version = strings(
        store,
        &store.dialect.render("SELECT CAST(VERSION() AS CHAR)"),
        &[],
        "reading the server's version",
    )
    .await?
    .pop()
    .unwrap_or_default();
    Ok(version_verdict(&version))
}

/// Whether a `VERSION()` string names a supported server.
fn version_verdict(version: &str) -> Finding {
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let mut next = || {
        parts
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let found = (next(), next());
    let (name, needed) = if mariadb {
        ("MariaDB", MIN_MARIADB)
    } else {
        ("MySQL", MIN_MYSQL)
    };
    if found >= needed {
        Finding::Ok(format!("{name} {version} supports SKIP LOCKED"))
    } else {
        Finding::Error(format!(
            "database.url: the server is {name} {version}; the sweeper needs {name} {}.{} or newer \
             (SELECT … FOR UPDATE SKIP LOCKED)",
            needed.0, needed.1
        ))
    }
}

/// The source's columns, indexes and kind, and whether this user may write its status.
pub(crate) async fn catalog(store: &SqlStore) -> Result<Catalog> {
    let src = &store.source;
    let columns = catalog_strings(
        store,
        "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = COALESCE($1, DATABASE()) AND TABLE_NAME = $2",
        "reading the source table's columns",
    )
    .await?;
    let indexes = catalog_strings(
        store,
        "SELECT CAST(GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX) AS CHAR) FROM information_schema.STATISTICS \
         WHERE TABLE_SCHEMA = COALESCE($1, DATABASE()) AND TABLE_NAME = $2 GROUP BY INDEX_NAME",
        "listing the source table's indexes",
    )
    .await?
    .into_iter()
    .map(|cols| cols.split(',').map(str::to_owned).collect())
    .collect();
    let is_view = catalog_strings(
        store,
        "SELECT CAST(TABLE_TYPE AS CHAR) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = COALESCE($1, DATABASE()) AND TABLE_NAME = $2",
        "reading the source table's kind",
    )
    .await?
    .iter()
    .any(|t| t == "VIEW");
    let mut status = Vec::new();
    let triggers = before_update_triggers(store).await?;
    if src.mark_passive && triggers > 0 {
        status.push(super::trigger_warning(src));
    }
    if src.mark_passive {
        status.push(status_privilege_finding(store).await?);
    }
    Ok(Catalog {
        columns,
        indexes,
        is_view,
        status,
        index_dialect: IndexDialect::MySql,
    })
}

/// A catalog query about the source table (`$1` its schema, `$2` its name), as strings.
async fn catalog_strings(store: &SqlStore, sql: &str, op: &'static str) -> Result<Vec<String>> {
    let table = [
        schema_arg(store),
        Arg::Text(store.source.table.name().into()),
    ];
    strings(store, &store.dialect.render(sql), &table, op).await
}

/// How many `BEFORE UPDATE` triggers the source table has.
async fn before_update_triggers(store: &SqlStore) -> Result<i64> {
    Ok(catalog_strings(
        store,
        "SELECT CAST(COUNT(*) AS CHAR) FROM information_schema.TRIGGERS \
         WHERE EVENT_OBJECT_SCHEMA = COALESCE($1, DATABASE()) AND EVENT_OBJECT_TABLE = $2 \
         AND ACTION_TIMING = 'BEFORE' AND EVENT_MANIPULATION = 'UPDATE'",
        "listing the source table's triggers",
    )
    .await?
    .pop()
    .and_then(|n| n.parse::<i64>().ok())
    .unwrap_or(0))
}

/// Whether this user may set the status column: `UPDATE` granted globally, on the database,
/// on the table, or on the column.
async fn status_privilege_finding(store: &SqlStore) -> Result<Finding> {
    let src = &store.source;
    let grantee = "CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')";
    let may = strings(
        store,
        &store.dialect.render(&format!(
            "SELECT CAST(COUNT(*) AS CHAR) FROM ( \
             SELECT 1 AS x FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = {grantee} AND PRIVILEGE_TYPE = 'UPDATE' \
             UNION ALL SELECT 1 FROM information_schema.SCHEMA_PRIVILEGES WHERE GRANTEE = {grantee} AND PRIVILEGE_TYPE = 'UPDATE' \
               AND TABLE_SCHEMA = COALESCE($1, DATABASE()) \
             UNION ALL SELECT 1 FROM information_schema.TABLE_PRIVILEGES WHERE GRANTEE = {grantee} AND PRIVILEGE_TYPE = 'UPDATE' \
               AND TABLE_SCHEMA = COALESCE($1, DATABASE()) AND TABLE_NAME = $2 \
             UNION ALL SELECT 1 FROM information_schema.COLUMN_PRIVILEGES WHERE GRANTEE = {grantee} AND PRIVILEGE_TYPE = 'UPDATE' \
               AND TABLE_SCHEMA = COALESCE($1, DATABASE()) AND TABLE_NAME = $2 AND COLUMN_NAME = $3) g"
        )),
        &[schema_arg(store), Arg::Text(src.table.name().into()), Arg::Text(src.status_column.name().into())],
        "checking the status column's privileges",
    )
    .await?
    .pop()
    .and_then(|n| n.parse::<i64>().ok())
    .unwrap_or(0);
    Ok(if may > 0 {
        Finding::Ok(format!(
            "{} can be set to the passive value",
            src.status_column
        ))
    } else {
        Finding::Error(format!(
            "source.status_column: this user has no UPDATE privilege on {} in {}; grant \
             UPDATE ({}) ON {} or set source.mark_passive = false",
            src.status_column,
            src.table,
            store.col(&src.status_column),
            store.col(&src.table)
        ))
    })
}

/// Applies the pending migrations under a named lock. MySQL commits DDL as it goes, so every
/// statement is idempotent on its own (`IF NOT EXISTS`).
pub(crate) async fn migrate(store: &SqlStore) -> Result<()> {
    let mut conn = store.pool.acquire().await.op("starting the migration")?;
    sqlx::query("SELECT GET_LOCK('session_sweeper_migrate', 60)")
        .execute(&mut *conn)
        .await
        .op("locking for the migration")?;
    let record = format!(
        "INSERT INTO sweeper_schema_migrations (version, name, applied_at) VALUES ($1, $2, {})",
        store.dialect.now_ms()
    );
    let result = super::core::apply_migrations(
        store,
        &mut conn,
        "CREATE TABLE IF NOT EXISTS sweeper_schema_migrations (version BIGINT NOT NULL PRIMARY KEY, \
         name VARCHAR(255) NOT NULL, applied_at BIGINT NOT NULL) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
        MIGRATIONS,
        &record,
        true,
    )
    .await;
    let _ = sqlx::query("SELECT RELEASE_LOCK('session_sweeper_migrate')")
        .execute(&mut *conn)
        .await;
    result
}

/// Finds the migrations table (a name, or nothing).
pub(crate) const MIGRATIONS_TABLE: &str = "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'sweeper_schema_migrations'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_without_skip_locked_are_refused() {
        assert!(!version_verdict("10.11.19-MariaDB-0+deb12u1").is_error());
        assert!(!version_verdict("8.0.36").is_error());
        assert!(version_verdict("10.5.2-MariaDB").is_error());
        assert!(version_verdict("5.7.44-log").is_error());
    }

    #[test]
    fn migration_files_split_into_statements() {
        assert_eq!(
            super::super::core::migration_statements(MIGRATIONS[0].sql).len(),
            3
        );
    }
}
