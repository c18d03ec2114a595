//! What the sweeper tells its operator must be true and usable: counts of a sweep whose leases
//! collided with a peer's, the SQL `check` suggests (it has to run as printed), what `check` says
//! about views and missing privileges, how fast a refused connection is reported, and what
//! `dry-run` lists when some rows cannot be read.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use common::{Kind, Pool, TestDb, idle_sessions, run_binary, simulator, write_config};
use session_sweeper::iyzico::simulator::SimulatorConfig;
use session_sweeper::shutdown::Shutdown;
use session_sweeper::store::{ClaimParams, Decision, Outcome, Settlement};
use session_sweeper::telemetry::Metrics;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn all_output(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The statements `check` prints in its index warnings ("... Create one: <SQL>").
fn suggested_statements(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("warning: "))
        .filter_map(|l| l.split_once("Create one: ").map(|(_, sql)| sql.to_owned()))
        .collect()
}

/// Runs one statement on the test database, returning the database's verdict.
async fn try_exec(db: &TestDb, sql: &str) -> Result<(), sqlx::Error> {
    match &db.pool {
        Pool::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        Pool::Pg(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        Pool::MySql(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
    }
}

// ---------------------------------------------------------------------------------------------
// Item 6: counts that lie.

/// Worker A claims four sessions and calls iyzico (slowly). While A's calls are on the wire,
/// A's heartbeat is aged past staleness, so worker B rescues the sessions and settles them.
/// When A's calls return, the ledger refuses A's settlements (the lease is B's): A's summary
/// and metrics must say it settled nothing and lost four. Before issue 11 the recorder counted
/// every settlement it was handed, so A reported "swept 4 ... invalidated=4" (and bumped
/// `sweeper_sessions_total{outcome="invalidated"}` by 4) for sessions B had settled.
async fn a_sweep_counts_only_what_the_ledger_accepted(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    db.seed(&idle_sessions("s", 4)).await;
    let sim = simulator(SimulatorConfig {
        latency: Duration::from_millis(1500), // under the 2 s client timeout: A's calls succeed
        ..SimulatorConfig::default()
    })
    .await;
    let config = db.config(&sim.base_url(), &[]);
    let metrics = Metrics::new();
    let a = {
        let (config, metrics) = (config.clone(), metrics.clone());
        tokio::spawn(
            async move { common::sweep_once_with(&config, &Shutdown::new(), metrics).await },
        )
    };
    common::wait_for("A's four calls", Duration::from_secs(10), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 4
    })
    .await;

    // A is thought dead: its heartbeat is aged (A itself beats on, unaware), and B takes over.
    let store = db.store().await;
    let worker_a: String = match &db.pool {
        Pool::Sqlite(p) => sqlx::query_scalar("SELECT worker_id FROM sweeper_workers")
            .fetch_one(p)
            .await
            .unwrap(),
        Pool::Pg(p) => sqlx::query_scalar("SELECT worker_id FROM sweeper_workers")
            .fetch_one(p)
            .await
            .unwrap(),
        Pool::MySql(p) => sqlx::query_scalar("SELECT worker_id FROM sweeper_workers")
            .fetch_one(p)
            .await
            .unwrap(),
    };
    let mut rescued = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    // A beats every second and may refresh its heartbeat between the ageing and the claim: age
    // again until B holds all four (well before A's calls return).
    while rescued.len() < 4 {
        assert!(std::time::Instant::now() < deadline, "B could not rescue");
        db.age_heartbeat(&worker_a, 600).await;
        let now = store.database_time().await.unwrap();
        rescued.extend(
            store
                .claim(ClaimParams {
                    worker: "worker-b",
                    idle_before: now - chrono::Duration::minutes(30),
                    stale_after: config.sweep.stale_after(),
                    lease: Duration::from_secs(300),
                    limit: 10,
                })
                .await
                .unwrap(),
        );
    }
    let settled: Vec<Settlement> = rescued
        .iter()
        .map(|l| Settlement {
            token: l.token.clone(),
            attempt: l.attempts + 1,
            calls: Vec::new(),
            decision: Decision::Settle {
                outcome: Outcome::Invalidated,
                attempts: l.attempts + 1,
                retry_in: None,
                error_code: None,
                error_message: None,
            },
        })
        .collect();
    assert_eq!(store.record("worker-b", &settled).await.unwrap().len(), 4);

    let summary = a.await.unwrap().unwrap();
    assert_eq!(summary.invalidated, 0, "{summary:?}");
    assert_eq!(summary.processed(), 0, "{}", summary.line());
    assert_eq!(summary.lost, 4, "{summary:?}");
    assert_eq!(
        summary.api_calls, 4,
        "the calls A made still count as calls"
    );
    assert!(
        summary.line().starts_with("swept 0 sessions"),
        "{}",
        summary.line()
    );
    let rendered = metrics.render();
    assert!(
        !rendered.contains("sweeper_sessions_total{outcome=\"invalidated\"}"),
        "metrics count only accepted settlements:\n{rendered}"
    );
    // The ledger holds B's four settlements, and A's calls are still in the attempt log.
    assert_eq!(db.count_state("invalidated").await, 4);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM sweeper_attempts").await, 4);
}

// ---------------------------------------------------------------------------------------------
// Item 8: `check` suggests SQL that runs.

/// SQLite, `source.table = "main.checkout_sessions"`, no index: before issue 11 `check` printed
/// `CREATE INDEX "checkout_sessions_sweeper_idx" ON "main"."checkout_sessions" (...)`, which
/// SQLite refuses (the schema goes on the index name). Every printed statement must run, and
/// afterwards `check` must find the indexes it asked for.
#[tokio::test]
async fn sqlite_index_suggestions_for_a_schema_qualified_table_run_as_printed() {
    let db = TestDb::new(Kind::Sqlite).await.unwrap();
    db.exec(
        "DROP TABLE checkout_sessions; CREATE TABLE checkout_sessions (session_token TEXT, \
         member_identifier TEXT NOT NULL, status TEXT NOT NULL, last_activity_at TEXT NOT NULL)",
    )
    .await;
    db.seed(&idle_sessions("s", 3)).await;
    db.store().await;
    let config = write_config(&db, "http://127.0.0.1:9");
    let env = [("SWEEPER_SOURCE__TABLE", "main.checkout_sessions")];
    let (out, _) = run_binary(&config, &["check"], &env);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let statements = suggested_statements(&text);
    assert_eq!(statements.len(), 2, "two indexes are missing: {text}");
    for sql in &statements {
        if let Err(e) = try_exec(&db, sql).await {
            panic!("check printed SQL that does not run: {sql}\n{e}");
        }
    }
    let (out, _) = run_binary(&config, &["check"], &env);
    let text = stdout(&out);
    assert!(suggested_statements(&text).is_empty(), "{text}");
    assert!(text.contains("serves the eligibility query"), "{text}");
    assert!(text.contains("serves status updates"), "{text}");
}

/// PostgreSQL, a table in schema `payments`, no index: the printed `CREATE INDEX CONCURRENTLY`
/// statements run as printed (each on its own, as `psql` runs them) and satisfy `check`.
#[tokio::test]
async fn postgres_index_suggestions_for_a_schema_qualified_table_run_as_printed() {
    let Some(db) = TestDb::new(Kind::Postgres).await else {
        return;
    };
    db.exec(
        "DROP TABLE checkout_sessions; CREATE SCHEMA payments; \
         CREATE TABLE payments.checkout_sessions (session_token TEXT, member_identifier TEXT NOT NULL, \
           status TEXT NOT NULL, last_activity_at TIMESTAMPTZ NOT NULL); \
         INSERT INTO payments.checkout_sessions VALUES ('a', 'm', 'ACTIVE', now() - interval '2 hours'), \
           ('b', 'm', 'ACTIVE', now() - interval '1 minute')",
    )
    .await;
    let config = write_config(&db, "http://127.0.0.1:9");
    let env = [("SWEEPER_SOURCE__TABLE", "payments.checkout_sessions")];
    let (out, _) = run_binary(&config, &["migrate"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let (out, _) = run_binary(&config, &["check"], &env);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let statements = suggested_statements(&text);
    assert_eq!(statements.len(), 2, "two indexes are missing: {text}");
    for sql in &statements {
        if let Err(e) = try_exec(&db, sql).await {
            panic!("check printed SQL that does not run: {sql}\n{e}");
        }
    }
    let indexes = db
        .scalar("SELECT COUNT(*) FROM pg_indexes WHERE schemaname = 'payments'")
        .await;
    assert_eq!(indexes, 2, "the indexes land beside the table");
    let (out, _) = run_binary(&config, &["check"], &env);
    let text = stdout(&out);
    assert!(suggested_statements(&text).is_empty(), "{text}");
    assert!(text.contains("serves the eligibility query"), "{text}");
}

/// A view as the source: `check` says it is a view and never suggests indexing it, with
/// `mark_passive` on or off. Before issue 11 both backends printed `CREATE INDEX ... ON` the
/// view; on PostgreSQL the view was recognised only by the status-column check, which
/// `mark_passive = false` skips, so with it the view was still offered an index.
async fn check_never_suggests_indexing_a_view(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    db.seed(&idle_sessions("s", 2)).await;
    db.exec("CREATE VIEW open_sessions AS SELECT * FROM checkout_sessions")
        .await;
    db.store().await;
    let config = write_config(&db, "http://127.0.0.1:9");
    for mark_passive in ["true", "false"] {
        let env = [
            ("SWEEPER_SOURCE__TABLE", "open_sessions"),
            ("SWEEPER_SOURCE__MARK_PASSIVE", mark_passive),
        ];
        let (out, _) = run_binary(&config, &["check"], &env);
        let text = stdout(&out);
        let all = all_output(&out);
        assert!(
            text.contains("open_sessions is a view"),
            "mark_passive = {mark_passive}: {all}"
        );
        assert!(
            !text.contains("CREATE INDEX") && suggested_statements(&text).is_empty(),
            "mark_passive = {mark_passive}: a view cannot be indexed: {all}"
        );
        if mark_passive == "false" {
            assert_eq!(out.status.code(), Some(0), "{all}");
        }
    }
}

/// A role with SELECT only: `check` fails naming `source.status_column` (the sweep could
/// invalidate at iyzico but never mark the row), unless `mark_passive = false`. Before issue 11
/// `check` did not look at privileges at all and passed.
#[tokio::test]
async fn postgres_check_names_the_status_column_a_role_cannot_update() {
    let Some(db) = TestDb::new(Kind::Postgres).await else {
        return;
    };
    db.seed(&idle_sessions("s", 2)).await;
    db.store().await;
    let (role, url) = db.read_only_role().await;
    let config = write_config(&db, "http://127.0.0.1:9");
    let (out, _) = run_binary(&config, &["check"], &[("SWEEPER_DATABASE__URL", &url)]);
    let refused = all_output(&out);
    let (out_off, _) = run_binary(
        &config,
        &["check"],
        &[
            ("SWEEPER_DATABASE__URL", &url),
            ("SWEEPER_SOURCE__MARK_PASSIVE", "false"),
        ],
    );
    let allowed = all_output(&out_off);
    db.drop_role(&role).await;

    assert_eq!(out.status.code(), Some(1), "{refused}");
    assert!(
        refused
            .lines()
            .any(|l| l.starts_with("error: source.status_column") && l.contains("UPDATE")),
        "{refused}"
    );
    assert_eq!(out_off.status.code(), Some(0), "{allowed}");
    assert!(!allowed.contains("source.status_column"), "{allowed}");
}

// ---------------------------------------------------------------------------------------------
// Item 9: a refused connection is reported as refused, at once.

/// Nothing listens on port 1: every command that needs the database says "connection refused"
/// and exits 1 within a moment. Before issue 11, `once` (and `dry-run`, `report`) went through
/// the pool, which retries a refused connection until its 10 s acquire timeout and then says
/// only "pool timed out while waiting for an open connection".
#[tokio::test]
async fn a_refused_connection_is_reported_as_refused_at_once() {
    let db = TestDb::new(Kind::Sqlite).await.unwrap();
    let config = write_config(&db, "http://127.0.0.1:9");
    let env = [("SWEEPER_DATABASE__URL", "postgres://postgres@127.0.0.1:1/x")];
    for command in ["check", "once", "dry-run", "report"] {
        let (out, took) = run_binary(&config, &[command], &env);
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{command}: {}",
            all_output(&out)
        );
        assert!(
            took < Duration::from_secs(3),
            "{command} took {took:?} to report a refused connection"
        );
        assert!(stderr.contains("refused"), "{command}: {stderr}");
        assert!(!stderr.contains("timed out"), "{command}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// `dry-run` on rows it cannot read.

fn idle_column(table: &str) -> Vec<&str> {
    table
        .lines()
        .skip(1)
        .filter(|l| !l.contains("eligible now"))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect()
}

/// SQLite, an INTEGER column of Unix seconds under the default `sqlite_text`: the integers are
/// unreadable in that format, so `dry-run` lists none of them (before issue 11 it listed every
/// one, "0s" idle, even the session touched a second ago); the one text value that fits is
/// listed with its real idle time.
#[tokio::test]
async fn dry_run_skips_integers_under_sqlite_text() {
    let db = TestDb::new(Kind::Sqlite).await.unwrap();
    db.exec(
        "DROP TABLE checkout_sessions; CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, \
         member_identifier TEXT, status TEXT, last_activity_at INTEGER)",
    )
    .await;
    let two_hours_ago = (Utc::now() - chrono::Duration::hours(2))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    db.exec(&format!(
        "INSERT INTO checkout_sessions VALUES ('int-live', 'm1', 'ACTIVE', {}), \
         ('int-old', 'm2', 'ACTIVE', {}), ('text-old', 'm3', 'ACTIVE', '{two_hours_ago}')",
        Utc::now().timestamp() - 1,
        Utc::now().timestamp() - 7200
    ))
    .await;
    db.store().await;
    let config = write_config(&db, "http://127.0.0.1:9");
    dry_run_lists_only(&config, &["text-old"]);
}

/// PostgreSQL, rows with a NULL member or token: before issue 11 `dry-run` panicked on them
/// (exit 101); they are not listed, and the readable row is, with its real idle time.
#[tokio::test]
async fn dry_run_skips_null_rows_on_postgres() {
    let Some(db) = TestDb::new(Kind::Postgres).await else {
        return;
    };
    db.exec(
        "DROP TABLE checkout_sessions; CREATE TABLE checkout_sessions (session_token TEXT, \
         member_identifier TEXT, status TEXT, last_activity_at TIMESTAMPTZ); \
         INSERT INTO checkout_sessions VALUES ('no-member', NULL, 'ACTIVE', now() - interval '2 hours'), \
           (NULL, 'm', 'ACTIVE', now() - interval '2 hours'), \
           ('no-activity', 'm', 'ACTIVE', NULL), \
           ('fine', 'm', 'ACTIVE', now() - interval '2 hours')",
    )
    .await;
    db.store().await;
    let config = write_config(&db, "http://127.0.0.1:9");
    dry_run_lists_only(&config, &["fine"]);
}

/// Runs `dry-run` in both formats: exit 0, exactly `tokens` listed, each idle for about two
/// hours, and no "0s" anywhere.
fn dry_run_lists_only(config: &std::path::Path, tokens: &[&str]) {
    let (out, _) = run_binary(config, &["dry-run", "--format", "json"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sessions = doc["sessions"].as_array().unwrap();
    let listed: Vec<&str> = sessions
        .iter()
        .map(|s| s["token"].as_str().unwrap())
        .collect();
    assert_eq!(listed, tokens, "{doc}");
    for s in sessions {
        let idle = s["idle_for"].as_u64().unwrap();
        assert!((7000..7400).contains(&idle), "{doc}");
    }
    let (out, _) = run_binary(config, &["dry-run"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", all_output(&out));
    let table = stdout(&out);
    let idle = idle_column(&table);
    assert_eq!(idle.len(), tokens.len(), "{table}");
    assert!(
        idle.iter().all(|i| *i != "0s" && i.starts_with("2h")),
        "{table}"
    );
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Sqlite).await } )* }
        mod postgres { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::Kind::Postgres).await } )* }
    };
}

both_backends!(
    a_sweep_counts_only_what_the_ledger_accepted,
    check_never_suggests_indexing_a_view,
);
