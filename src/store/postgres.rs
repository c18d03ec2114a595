//! PostgreSQL: claims lock source rows `FOR UPDATE SKIP LOCKED` and re-check the ledger under
//! `ON CONFLICT ... WHERE`, so any number of processes share one database and never hold the
//! same session at once. Time is the server's `now()`.

use sqlx::AnyConnection;
use sqlx::Row as _;

use super::core::{Activity, Arg, Catalog, Shape, SqlStore, lease_from_row, query, strings};
use super::dialect::Stmt;
use super::lane::Failed;
use super::{
    Finding, IndexDialect, Lease, Migration, Op, Result, StoreError, ledger_blocks, naive_zone,
};

/// Serialises concurrent `migrate` runs (an arbitrary constant: "sweeper" on a phone keypad).
pub const MIGRATION_LOCK: i64 = 7_933_737;

/// The sweeper's own tables, version by version.
pub(crate) const MIGRATIONS: &[Migration] = &[
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
    Migration {
        version: 3,
        name: "unified_time",
        sql: include_str!("../../migrations/postgres/0003_unified_time.sql"),
    },
];

/// The claim in one statement: lock candidates, collapse duplicate tokens, upsert the ledger
/// unless a live lease or a settlement got there first.
pub(crate) fn claim(candidates: &str, now: &str, stale: &str) -> String {
    format!(
        "WITH candidates AS ({} FOR UPDATE OF s SKIP LOCKED), \
         unique_candidates AS (SELECT DISTINCT ON (token) token, member FROM candidates ORDER BY token) \
         INSERT INTO sweeper_sessions AS l (session_token, member_identifier, state, attempts, \
         lease_owner, lease_expires_at, created_at, updated_at) \
         SELECT token, member, 'pending', 0, $5, {now} + $6, {now}, {now} FROM unique_candidates \
         ON CONFLICT (session_token) DO UPDATE SET lease_owner = EXCLUDED.lease_owner, \
         lease_expires_at = EXCLUDED.lease_expires_at, updated_at = EXCLUDED.updated_at, state = 'pending' \
         WHERE NOT {} \
         RETURNING l.session_token, l.member_identifier, CAST(l.attempts AS int8)",
        candidates,
        ledger_blocks(now, stale)
    )
}

/// Runs the claim statement.
pub(crate) async fn run_claim(
    conn: &mut AnyConnection,
    claim: &Stmt,
    args: &[Arg],
) -> std::result::Result<Vec<Lease>, Failed> {
    let rows = query(claim, args)
        .fetch_all(conn)
        .await
        .op("claiming sessions")
        .map_err(Failed::First)?;
    Ok(rows.iter().filter_map(lease_from_row).collect())
}

/// A catalog type name is interpolated into SQL, so it must look like one (`uuid`,
/// `character varying(64)`, `text`), never anything else.
pub(crate) fn safe_type_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() < 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _(),".contains(c))
}

async fn column_type(store: &SqlStore, column: &str) -> Result<Option<String>> {
    Ok(strings(
        store,
        &store.dialect.render(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
        ),
        &[
            Arg::Text(store.col(&store.source.table)),
            Arg::Text(column.into()),
        ],
        "reading a source column's type",
    )
    .await?
    .pop())
}

/// The token column's type (for casts) and how the last-activity column holds time.
pub(crate) async fn shape(store: &SqlStore) -> Result<Shape> {
    let src = &store.source;
    let missing = |key: &str, col: &crate::config::SqlIdent| {
        StoreError::Schema(format!(
            "{key}: column {col} not found in {} (run `session-sweeper check`)",
            src.table
        ))
    };
    let token_type = column_type(store, src.token_column.name())
        .await?
        .ok_or_else(|| missing("source.token_column", &src.token_column))?;
    if !safe_type_name(&token_type) {
        return Err(StoreError::Schema(format!(
            "source.token_column: unsupported column type {token_type:?}"
        )));
    }
    let activity_type = column_type(store, src.last_activity_column.name())
        .await?
        .ok_or_else(|| missing("source.last_activity_column", &src.last_activity_column))?;
    let activity = match activity_type.as_str() {
        "timestamp with time zone" => Activity::Instant,
        "timestamp without time zone" => Activity::Naive(naive_zone(
            src.last_activity_timezone,
            &database_zone(store).await?,
            &format!("{} (timestamp without time zone)", src.last_activity_column),
        )?),
        other => {
            return Err(StoreError::Schema(format!(
                "source.last_activity_column: {} is of type {other}; PostgreSQL sources need \
                 timestamp or timestamptz",
                src.last_activity_column
            )));
        }
    };
    Ok(Shape {
        activity,
        token_from_text: format!("CAST({{}} AS {token_type})"),
        same_token: format!("s.{{tok}} = CAST({{}} AS {token_type})"),
    })
}

/// The zone the database itself runs in, as the application's sessions see it: the
/// per-database or per-role setting, else the server's. (Our own sessions run in UTC, so our
/// `TimeZone` says nothing about theirs.)
async fn database_zone(store: &SqlStore) -> Result<String> {
    let configured = strings(
        store,
        &store.dialect.render(
            "SELECT substring(c FROM position('=' IN c) + 1) FROM pg_db_role_setting s, unnest(s.setconfig) c \
             WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database())) \
             AND s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = current_user)) \
             AND lower(c) LIKE 'timezone=%' \
             ORDER BY (s.setdatabase <> 0 AND s.setrole <> 0) DESC, (s.setrole <> 0) DESC LIMIT 1",
        ),
        &[],
        "reading the database's time zone",
    )
    .await?;
    if let Some(zone) = configured.into_iter().next() {
        return Ok(zone);
    }
    // The server's setting; `pg_file_settings` needs a privileged role, `log_timezone` is
    // written beside `timezone` by initdb and is readable by anyone.
    let from_file = sqlx::query(
        "SELECT setting FROM pg_file_settings WHERE name = 'timezone' AND applied \
         ORDER BY seqno DESC LIMIT 1",
    )
    .fetch_optional(&store.pool)
    .await
    .ok()
    .flatten()
    .and_then(|r| r.try_get::<String, _>(0).ok());
    match from_file {
        Some(zone) => Ok(zone),
        None => Ok(strings(
            store,
            &store
                .dialect
                .render("SELECT setting FROM pg_settings WHERE name = 'log_timezone'"),
            &[],
            "reading the server's time zone",
        )
        .await?
        .pop()
        .unwrap_or_default()),
    }
}

/// The source's columns, indexes and kind, and whether this role may write its status.
pub(crate) async fn catalog(store: &SqlStore) -> Result<Catalog> {
    let src = &store.source;
    let table = || Arg::Text(store.col(&src.table));
    let q = |t: &str| store.dialect.render(t);
    let columns = strings(
        store,
        &q("SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped"),
        &[table()],
        "reading the source table's columns",
    )
    .await?;
    let indexes = strings(
        store,
        &q(
            "SELECT string_agg(a.attname::text, ',' ORDER BY k.ord) FROM pg_index i \
            CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
            WHERE i.indrelid = to_regclass($1) AND i.indpred IS NULL GROUP BY i.indexrelid",
        ),
        &[table()],
        "listing the source table's indexes",
    )
    .await?
    .into_iter()
    .map(|cols| cols.split(',').map(str::to_owned).collect())
    .collect();
    let (is_view, status) = relation_facts(store).await?;
    Ok(Catalog {
        columns,
        indexes,
        is_view,
        status,
        index_dialect: IndexDialect::Postgres,
    })
}

/// Whether the source is a view, and the findings on setting its status column: this role's
/// privilege, whether the relation and the column are updatable, and `BEFORE UPDATE` triggers.
/// Nothing when the table does not exist (the column findings say so).
async fn relation_facts(store: &SqlStore) -> Result<(bool, Vec<Finding>)> {
    let src = &store.source;
    let facts = query(
        &store.dialect.render("SELECT CAST(CASE WHEN has_column_privilege(to_regclass($1), $2, 'UPDATE') THEN 1 ELSE 0 END AS int8), \
            c.relkind::text, CAST(pg_relation_is_updatable(to_regclass($1), false) AS int8), \
            CAST(CASE WHEN COALESCE(pg_column_is_updatable(to_regclass($1), \
              (SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2), false), false) \
              THEN 1 ELSE 0 END AS int8), \
            (SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal \
              AND (tgtype & 2) <> 0 AND (tgtype & 16) <> 0) \
            FROM pg_class c WHERE c.oid = to_regclass($1)"),
        &[Arg::Text(store.col(&src.table)), Arg::Text(src.status_column.name().into())],
    )
    .fetch_optional(&store.pool)
    .await
    .op("checking the status column's privileges")?;
    let Some(row) = facts else {
        return Ok((false, Vec::new()));
    };
    let may_update = row.try_get::<i64, _>(0).unwrap_or(0) == 1;
    let kind: String = row.try_get(1).unwrap_or_default();
    let updatable = row.try_get::<i64, _>(2).unwrap_or(0);
    let column_updatable = row.try_get::<i64, _>(3).unwrap_or(0) == 1;
    let triggers = row.try_get::<i64, _>(4).unwrap_or(0);
    let is_view = matches!(kind.as_str(), "v" | "m");
    let mut status = Vec::new();
    if src.mark_passive && triggers > 0 {
        status.push(super::trigger_warning(src));
    }
    // Bit 2 (4) of pg_relation_is_updatable: UPDATE.
    if src.mark_passive && (!may_update || updatable & 4 == 0 || !column_updatable) {
        status.push(Finding::Error(format!(
            "source.status_column: {} in {} cannot be updated by this role ({}); grant \
             UPDATE ({}) ON {} or set source.mark_passive = false",
            src.status_column,
            src.table,
            if !may_update {
                "no UPDATE privilege"
            } else if updatable & 4 == 0 {
                "the relation is not updatable"
            } else {
                "the column is computed by a view"
            },
            store.col(&src.status_column),
            store.col(&src.table),
        )));
    } else if src.mark_passive {
        status.push(Finding::Ok(format!(
            "{} can be set to the passive value",
            src.status_column
        )));
    }
    Ok((is_view, status))
}

/// Applies the pending migrations in one transaction under an advisory lock.
pub(crate) async fn migrate(store: &SqlStore) -> Result<()> {
    let mut tx = store.pool.begin().await.op("starting the migration")?;
    query(
        &store.dialect.render("SELECT pg_advisory_xact_lock($1)"),
        &[Arg::Int(MIGRATION_LOCK)],
    )
    .execute(&mut *tx)
    .await
    .op("locking for the migration")?;
    super::core::apply_migrations(
        store,
        &mut tx,
        "CREATE TABLE IF NOT EXISTS sweeper_schema_migrations (version BIGINT PRIMARY KEY, \
         name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        MIGRATIONS,
        "INSERT INTO sweeper_schema_migrations (version, name) VALUES ($1, $2)",
        false,
    )
    .await?;
    tx.commit().await.op("committing the migration")
}

/// Finds the migrations table (a name, or nothing).
pub(crate) const MIGRATIONS_TABLE: &str = "SELECT to_regclass('sweeper_schema_migrations')::text";

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
