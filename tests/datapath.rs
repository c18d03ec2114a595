//! The data path under real-world tables: values the configured format cannot read, naive
//! timestamps in a database that does not run in UTC, source updates that fail, and rows that
//! cannot be sent. Each story ends with what iyzico saw, which must be nothing it should not.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use common::{Kind, TestDb, idle_sessions, simulator, sweep_once};
use session_sweeper::iyzico::simulator::SimulatorConfig;
use session_sweeper::store::{Finding, Outcome};
use session_sweeper::sweep::SweepError;

fn requests(sim: &session_sweeper::iyzico::simulator::Simulator) -> u64 {
    sim.stats.requests.load(Ordering::SeqCst)
}

fn errors(findings: &[Finding]) -> Vec<&str> {
    findings
        .iter()
        .filter_map(|f| match f {
            Finding::Error(m) => Some(m.as_str()),
            _ => None,
        })
        .collect()
}

fn warnings(findings: &[Finding]) -> Vec<&str> {
    findings
        .iter()
        .filter_map(|f| match f {
            Finding::Warning(m) => Some(m.as_str()),
            _ => None,
        })
        .collect()
}

/// What `check` finds with the test config and `overrides`.
async fn check_with(db: &TestDb, overrides: &[(&str, &str)]) -> Vec<Finding> {
    let config = db.config("http://127.0.0.1:9", overrides);
    let store = session_sweeper::store::open(&config).await.unwrap();
    store.check().await.unwrap()
}

/// A PostgreSQL `timestamp` column holding one session touched a minute ago, written in
/// `zone`'s wall-clock time.
async fn one_session_a_minute_ago_written_in(zone: &str) -> Option<TestDb> {
    let db = TestDb::new(Kind::Postgres).await?;
    db.exec(&format!(
        "DROP TABLE checkout_sessions; \
         CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT, \
           status TEXT NOT NULL, last_activity_at TIMESTAMP NOT NULL); \
         INSERT INTO checkout_sessions VALUES ('a', 'm', 'ACTIVE', \
           (now() AT TIME ZONE '{zone}') - interval '1 minute')"
    ))
    .await;
    Some(db)
}

#[tokio::test]
async fn unix_seconds_under_the_default_text_format_are_never_sent_and_check_names_the_fit() {
    let db = TestDb::new(Kind::Sqlite).await.unwrap();
    // A shop that stores Unix seconds: one session touched a second ago, one two hours ago.
    db.exec(
        "DROP TABLE checkout_sessions; CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, \
         member_identifier TEXT, status TEXT, last_activity_at INTEGER); \
         CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at)",
    )
    .await;
    db.exec(&format!(
        "INSERT INTO checkout_sessions VALUES ('live', 'm1', 'ACTIVE', {}), ('old', 'm2', 'ACTIVE', {})",
        Utc::now().timestamp() - 1,
        Utc::now().timestamp() - 7200
    ))
    .await;
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(&sim.base_url(), &[]);
    let summary = sweep_once(&config).await.unwrap();
    assert_eq!(summary.invalidated, 0);
    assert_eq!(
        requests(&sim),
        0,
        "nothing is sent for values the format cannot read"
    );
    let store = db.store().await;
    let report = store.report(5).await.unwrap();
    assert_eq!(report.unusable.unreadable_last_activity, 2);
    let findings = store.check().await.unwrap();
    let errs = errors(&findings);
    assert!(
        errs.iter()
            .any(|e| e.contains("source.last_activity_format") && e.contains("unix_seconds")),
        "{findings:?}"
    );
    // With the format that fits, the idle one goes and the live one stays.
    let config = db.config(
        &sim.base_url(),
        &[("SWEEPER_SOURCE__LAST_ACTIVITY_FORMAT", "unix_seconds")],
    );
    assert_eq!(sweep_once(&config).await.unwrap().invalidated, 1);
    assert_eq!(db.status("live").await, "ACTIVE");
    assert_eq!(db.status("old").await, "PASSIVE");
}

#[tokio::test]
async fn seconds_read_as_milliseconds_and_offsets_in_text_are_never_eligible() {
    let db = TestDb::new(Kind::Sqlite).await.unwrap();
    db.exec(
        "DROP TABLE checkout_sessions; CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, \
         member_identifier TEXT, status TEXT, last_activity_at)",
    )
    .await;
    let live_local = Utc::now()
        .with_timezone(&chrono::FixedOffset::west_opt(5 * 3600).unwrap())
        .to_rfc3339();
    db.exec(&format!(
        "INSERT INTO checkout_sessions VALUES ('secs', 'm1', 'ACTIVE', {}), ('offset', 'm2', 'ACTIVE', '{live_local}')",
        Utc::now().timestamp() - 10
    ))
    .await;
    // Impossible times have the right shape but mean no instant at all.
    db.exec(
        "INSERT INTO checkout_sessions VALUES ('feb30', 'm3', 'ACTIVE', '2020-02-30 10:00:00'), \
         ('hour25', 'm4', 'ACTIVE', '2020-01-01 25:00:00'), ('feb30t', 'm5', 'ACTIVE', '2020-02-30T10:00:00Z')",
    )
    .await;
    let sim = simulator(SimulatorConfig::default()).await;
    assert_eq!(
        sweep_once(&db.config(&sim.base_url(), &[]))
            .await
            .unwrap()
            .invalidated,
        0,
        "impossible dates are never eligible"
    );
    for format in ["unix_millis", "rfc3339"] {
        let config = db.config(
            &sim.base_url(),
            &[("SWEEPER_SOURCE__LAST_ACTIVITY_FORMAT", format)],
        );
        assert_eq!(
            sweep_once(&config).await.unwrap().invalidated,
            0,
            "{format}"
        );
    }
    assert_eq!(requests(&sim), 0);
}

/// A table of `timestamp` (no zone) in a database that runs on New York time, as an application
/// writing `localtimestamp` fills it: one live session, one idle for two hours.
async fn new_york_database() -> Option<TestDb> {
    let db = TestDb::new(Kind::Postgres).await?;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    db.exec(&format!(
        "ALTER DATABASE {name} SET timezone TO 'America/New_York'; \
         DROP TABLE checkout_sessions; \
         CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT, \
           status TEXT NOT NULL, last_activity_at TIMESTAMP NOT NULL); \
         CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at)"
    ))
    .await;
    let ny = |ago: i64| {
        (Utc::now() - chrono::Duration::seconds(ago))
            .with_timezone(&chrono_tz::America::New_York)
            .naive_local()
    };
    db.exec(&format!(
        "INSERT INTO checkout_sessions VALUES ('live', 'm1', 'ACTIVE', '{}'), ('old', 'm2', 'ACTIVE', '{}')",
        ny(60),
        ny(7200)
    ))
    .await;
    Some(db)
}

#[tokio::test]
async fn naive_timestamps_in_a_non_utc_database_need_the_zone_and_then_spare_live_sessions() {
    let Some(db) = new_york_database().await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(&sim.base_url(), &[]);
    match sweep_once(&config).await {
        Err(SweepError::Store(e)) => assert!(
            e.to_string().contains("source.last_activity_timezone"),
            "{e}"
        ),
        other => panic!("a sweep on an ambiguous zone must refuse to start: {other:?}"),
    }
    assert_eq!(requests(&sim), 0);
    let config = db.config(
        &sim.base_url(),
        &[("SWEEPER_SOURCE__LAST_ACTIVITY_TIMEZONE", "America/New_York")],
    );
    assert_eq!(sweep_once(&config).await.unwrap().invalidated, 1);
    assert_eq!(db.status("old").await, "PASSIVE");
    assert_eq!(
        db.status("live").await,
        "ACTIVE",
        "a live session is never invalidated"
    );
}

async fn a_failing_source_update_keeps_the_record_and_never_resends(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    db.seed(&idle_sessions("s", 5)).await;
    // The application refuses every status change (a trigger, a missing privilege, a view).
    db.exec(match kind {
        Kind::Sqlite => {
            "CREATE TRIGGER no_status BEFORE UPDATE OF status ON checkout_sessions \
             BEGIN SELECT RAISE(ABORT, 'status is managed by the application'); END"
        }
        Kind::Postgres => {
            "CREATE FUNCTION no_status() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'status is managed by the application'; END $$; \
             CREATE TRIGGER no_status BEFORE UPDATE OF status ON checkout_sessions \
             FOR EACH ROW EXECUTE FUNCTION no_status()"
        }
        Kind::MySql => {
            "CREATE TRIGGER no_status BEFORE UPDATE ON checkout_sessions FOR EACH ROW \
             SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'status is managed by the application'"
        }
    })
    .await;
    let findings = db.store().await.check().await.unwrap();
    assert!(
        findings
            .iter()
            .any(|f| matches!(f, Finding::Warning(m) if m.contains("BEFORE UPDATE trigger"))),
        "check warns of the trigger: {findings:?}"
    );
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(&sim.base_url(), &[]);
    assert_eq!(sweep_once(&config).await.unwrap().invalidated, 5);
    assert_eq!(sweep_once(&config).await.unwrap().invalidated, 0);
    assert_eq!(
        requests(&sim),
        5,
        "every session was sent once, never again"
    );
    assert_eq!(db.count_state("invalidated").await, 5);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_attempts").await,
        5,
        "the attempt log kept every accepted call"
    );
    let store = db.store().await;
    assert_eq!(store.report(5).await.unwrap().source_not_marked, 5);
    // Once the application allows it, the next sweep marks them without calling again.
    db.exec(match kind {
        Kind::Sqlite => "DROP TRIGGER no_status",
        Kind::Postgres => "DROP TRIGGER no_status ON checkout_sessions",
        Kind::MySql => "DROP TRIGGER no_status",
    })
    .await;
    sweep_once(&config).await.unwrap();
    assert_eq!(db.status("s-0").await, "PASSIVE");
    assert_eq!(store.report(5).await.unwrap().source_not_marked, 0);
    assert_eq!(requests(&sim), 5);
}

async fn null_duplicate_and_unreadable_rows_never_stop_a_sweep(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let old = match kind {
        Kind::Sqlite => "datetime('now', '-2 hours')",
        Kind::Postgres => "now() - interval '2 hours'",
        Kind::MySql => "UTC_TIMESTAMP(6) - INTERVAL 2 HOUR",
    };
    // No unique token, nullable member: what real tables look like.
    db.exec(&format!(
        "DROP TABLE checkout_sessions; \
         CREATE TABLE checkout_sessions (session_token VARCHAR(64), member_identifier VARCHAR(64), \
           status VARCHAR(16), last_activity_at {ty}); \
         INSERT INTO checkout_sessions VALUES ('dup', 'm', 'ACTIVE', {old}), ('dup', 'm', 'ACTIVE', {old}), \
           ('dup', 'm', 'ACTIVE', {old}), (NULL, 'm', 'ACTIVE', {old}), ('no-member', NULL, 'ACTIVE', {old}), \
           ('fine', 'm', 'ACTIVE', {old})",
        ty = match kind {
            Kind::Sqlite => "TEXT",
            Kind::Postgres => "TIMESTAMPTZ",
            Kind::MySql => "DATETIME(6)",
        }
    ))
    .await;
    if kind == Kind::Sqlite {
        db.exec(&format!(
            "INSERT INTO checkout_sessions VALUES (x'ff00fe', 'm', 'ACTIVE', {old}), \
             (CAST(x'c328' AS TEXT), 'm', 'ACTIVE', {old}), \
             ('fine' || char(0) || 'x', 'm', 'ACTIVE', {old}), ('nul-member', 'm' || char(0), 'ACTIVE', {old})"
        ))
        .await;
    }
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(&sim.base_url(), &[]);
    let summary = sweep_once(&config).await.unwrap();
    assert_eq!(summary.invalidated, 2, "{summary:?}");
    let calls = sim.stats.calls_per_token();
    assert_eq!(
        calls.get("dup"),
        Some(&1),
        "a duplicated token is sent once"
    );
    assert_eq!(calls.get("fine"), Some(&1));
    assert_eq!(calls.len(), 2, "nothing else was sent: {calls:?}");
    let report = db.store().await.report(5).await.unwrap();
    assert!(report.unusable.bad_source_row >= 2, "{report:?}");
    if kind == Kind::Sqlite {
        // Text that is not UTF-8 is settled failed, with a code that says why.
        assert_eq!(
            db.scalar(
                "SELECT COUNT(*) FROM sweeper_sessions WHERE last_error_code = 'bad_source_row'"
            )
            .await,
            1
        );
    }
    // The dry run lists what a sweep would take, without panicking on the rest.
    let summary = sweep_once(&config).await.unwrap();
    assert_eq!(summary.processed(), 0);
    let counts = report
        .counts
        .iter()
        .find(|(o, _)| *o == Outcome::Invalidated);
    assert_eq!(counts.map(|c| c.1), Some(2));
}

async fn a_session_revived_while_waiting_for_the_rate_limiter_is_not_sent(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    db.seed(&idle_sessions("s", 6)).await;
    let sim = simulator(SimulatorConfig::default()).await;
    // Two calls a second: the last sessions wait seconds for their turn after being claimed.
    let config = db.config(
        &sim.base_url(),
        &[
            ("SWEEPER_IYZICO__RATE_PER_SECOND", "2"),
            ("SWEEPER_IYZICO__BURST", "1"),
        ],
    );
    let sweep = tokio::spawn(async move { sweep_once(&config).await });
    common::wait_for("the first call", Duration::from_secs(10), || {
        requests(&sim) >= 1
    })
    .await;
    // Every session is claimed by now; the shopper behind s-5 comes back.
    for i in 0..6 {
        if sim.stats.calls_per_token().contains_key(&format!("s-{i}")) {
            continue;
        }
        db.touch(&format!("s-{i}")).await;
        let summary = sweep.await.unwrap().unwrap();
        assert_eq!(summary.skipped, 1, "{summary:?}");
        assert!(
            !sim.stats.calls_per_token().contains_key(&format!("s-{i}")),
            "a session revived while queued is never sent"
        );
        assert_eq!(db.status(&format!("s-{i}")).await, "ACTIVE");
        return;
    }
    panic!("every session was sent before one could be revived");
}

async fn a_token_with_a_live_duplicate_row_is_neither_sent_nor_marked(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let (old, now) = match kind {
        Kind::Sqlite => ("datetime('now', '-2 hours')", "datetime('now')"),
        Kind::Postgres => ("now() - interval '2 hours'", "now()"),
        Kind::MySql => ("UTC_TIMESTAMP(6) - INTERVAL 2 HOUR", "UTC_TIMESTAMP(6)"),
    };
    // One session, three rows: two idle, one touched just now. The session is live.
    db.exec(&format!(
        "DROP TABLE checkout_sessions; \
         CREATE TABLE checkout_sessions (session_token VARCHAR(64), member_identifier VARCHAR(64), \
           status VARCHAR(16), last_activity_at {ty}); \
         CREATE INDEX checkout_sessions_tok ON checkout_sessions (session_token); \
         INSERT INTO checkout_sessions VALUES ('dup', 'm1', 'ACTIVE', {old}), ('dup', 'm2', 'ACTIVE', {old}), \
           ('dup', 'm3', 'ACTIVE', {now}), ('alone', 'm4', 'ACTIVE', {old})",
        ty = match kind {
            Kind::Sqlite => "TEXT",
            Kind::Postgres => "TIMESTAMPTZ",
            Kind::MySql => "DATETIME(6)",
        }
    ))
    .await;
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(&sim.base_url(), &[]);
    let summary = sweep_once(&config).await.unwrap();
    assert_eq!(summary.invalidated, 1, "{summary:?}");
    let calls = sim.stats.calls_per_token();
    assert!(
        !calls.contains_key("dup"),
        "a live session is never sent: {calls:?}"
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM checkout_sessions WHERE session_token = 'dup' AND status = 'ACTIVE'")
            .await,
        3,
        "no row of a live session is marked passive"
    );
    assert_eq!(db.status("alone").await, "PASSIVE");
}

async fn integer_and_empty_tokens_are_handled_as_what_they_are() {
    let db = TestDb::new(Kind::Sqlite).await.unwrap();
    // A column without a declared type keeps integers as integers.
    db.exec(
        "DROP TABLE checkout_sessions; \
         CREATE TABLE checkout_sessions (session_token, member_identifier, status TEXT, last_activity_at TEXT); \
         INSERT INTO checkout_sessions VALUES (12345, 'm1', 'ACTIVE', datetime('now', '-2 hours')), \
           ('', 'm2', 'ACTIVE', datetime('now', '-2 hours'))",
    )
    .await;
    let sim = simulator(SimulatorConfig::default()).await;
    let summary = sweep_once(&db.config(&sim.base_url(), &[])).await.unwrap();
    assert_eq!(summary.invalidated, 1, "{summary:?}");
    assert_eq!(summary.skipped, 0, "an integer token is not 'active again'");
    let calls = sim.stats.calls_per_token();
    assert_eq!(calls.get("12345"), Some(&1));
    assert!(!calls.contains_key(""), "an empty token is never sent");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM checkout_sessions WHERE status = 'PASSIVE'")
            .await,
        1,
        "the integer token's row is marked"
    );
    assert_eq!(
        db.store()
            .await
            .report(5)
            .await
            .unwrap()
            .unusable
            .bad_source_row,
        1
    );
}

#[tokio::test]
async fn integer_and_empty_tokens_on_sqlite() {
    integer_and_empty_tokens_are_handled_as_what_they_are().await;
}

#[tokio::test]
async fn check_warns_when_every_active_session_reads_as_idle() {
    // A UTC database whose application writes New York wall-clock time into `timestamp`:
    // read as UTC, every session touched a minute ago looks five hours idle.
    let Some(db) = one_session_a_minute_ago_written_in("America/New_York").await else {
        return;
    };
    let findings = db.store().await.check().await.unwrap();
    assert!(
        warnings(&findings)
            .iter()
            .any(|m| m.contains("every active session reads as idle")
                && m.contains("last_activity_timezone")),
        "{findings:?}"
    );
}

async fn a_row_dated_far_ahead_is_named_and_hides_no_real_newest(kind: Kind) {
    // Beside a shopper active a minute ago, one row a bug dated far ahead (PostgreSQL's last
    // year; MariaDB's last DATETIME): `check` names it and judges the zone by the real newest,
    // where it sampled the bogus row (and read it as 1970, or as no time at all) before.
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let mut rows = idle_sessions("idle", 1);
    rows.push(common::Seed {
        token: "live".into(),
        member: "m".into(),
        status: "ACTIVE",
        idle: Duration::from_secs(60),
    });
    db.seed(&rows).await;
    let ahead = match kind {
        Kind::Sqlite => "datetime('now', '+1 year')",
        Kind::Postgres => "'294276-12-31 23:59:59+00'",
        Kind::MySql => "'9999-12-31 23:59:59'",
    };
    db.exec(&format!(
        "INSERT INTO checkout_sessions VALUES ('ahead', 'm', 'ACTIVE', {ahead})"
    ))
    .await;
    let findings = db.store().await.check().await.unwrap();
    assert!(
        warnings(&findings)
            .iter()
            .any(|m| m.starts_with("1 active rows") && m.contains("no time zone explains")),
        "{findings:?}"
    );
    assert!(
        findings.iter().any(|f| matches!(f, Finding::Ok(m)
            if m.starts_with("the newest active last-activity value") && m.contains("before now"))),
        "{findings:?}"
    );
    assert!(errors(&findings).is_empty(), "{findings:?}");
    assert_eq!(listed(&db).await, ["idle-0"], "the row ahead is never idle");
    // Every row that far ahead: the column itself is misread.
    db.exec(&format!(
        "UPDATE checkout_sessions SET last_activity_at = {ahead}"
    ))
    .await;
    let findings = db.store().await.check().await.unwrap();
    assert!(
        errors(&findings)
            .iter()
            .any(|m| m.contains("3 of the 3 readable active")),
        "{findings:?}"
    );
}

#[tokio::test]
async fn check_calls_milliseconds_read_as_seconds_an_error_beside_a_stray_real_row() {
    // Two live sessions written in milliseconds, one stray row in seconds three days old: the
    // unit is wrong for most rows, not a few rows wrong; read as seconds, nothing is idle.
    let db = TestDb::new(Kind::Sqlite).await.unwrap();
    db.exec(&format!(
        "DROP TABLE checkout_sessions; CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, \
         member_identifier TEXT, status TEXT, last_activity_at INTEGER); \
         INSERT INTO checkout_sessions VALUES ('ms-1', 'm', 'ACTIVE', {ms}), ('ms-2', 'm', 'ACTIVE', {ms} - 60000), \
           ('secs', 'm', 'ACTIVE', {secs})",
        ms = Utc::now().timestamp_millis(),
        secs = Utc::now().timestamp() - 3 * 86_400,
    ))
    .await;
    let findings = check_with(
        &db,
        &[("SWEEPER_SOURCE__LAST_ACTIVITY_FORMAT", "unix_seconds")],
    )
    .await;
    assert!(
        errors(&findings)
            .iter()
            .any(|m| m.contains("2 of the 3 readable active") && m.contains("unit")),
        "{findings:?}"
    );
}

#[tokio::test]
async fn check_blames_the_zone_for_values_a_day_ahead_read_in_a_western_zone() {
    // Tokyo wall-clock time read as Los Angeles time: 17 h ahead, which two zones explain.
    let Some(db) = one_session_a_minute_ago_written_in("Asia/Tokyo").await else {
        return;
    };
    let findings = check_with(
        &db,
        &[(
            "SWEEPER_SOURCE__LAST_ACTIVITY_TIMEZONE",
            "America/Los_Angeles",
        )],
    )
    .await;
    assert!(
        errors(&findings)
            .iter()
            .any(|m| m.starts_with("source.last_activity_timezone")),
        "{findings:?}"
    );
}

#[tokio::test]
async fn check_names_the_unit_of_an_integer_column_read_in_the_wrong_one() {
    // Seconds in a BIGINT read as milliseconds are all "before 2000": nothing would ever be
    // swept, which `check` said as "no active sessions to sample", exit 0. It names the unit
    // that fits, as it does on SQLite.
    let Some(db) = TestDb::new(Kind::MySql).await else {
        return;
    };
    db.exec(
        "DROP TABLE checkout_sessions; \
         CREATE TABLE checkout_sessions (session_token VARCHAR(64) PRIMARY KEY, \
           member_identifier VARCHAR(64), status VARCHAR(16), last_activity_at BIGINT); \
         INSERT INTO checkout_sessions VALUES ('a', 'm', 'ACTIVE', UNIX_TIMESTAMP() - 3600), \
           ('b', 'm', 'ACTIVE', UNIX_TIMESTAMP() - 60)",
    )
    .await;
    let findings = check_with(
        &db,
        &[("SWEEPER_SOURCE__LAST_ACTIVITY_FORMAT", "unix_millis")],
    )
    .await;
    assert!(
        errors(&findings)
            .iter()
            .any(|m| m.contains("is \"unix_millis\"")
                && m.contains("set source.last_activity_format = \"unix_seconds\"")),
        "{findings:?}"
    );
}

#[tokio::test]
async fn check_calls_a_typed_column_with_no_readable_time_an_error() {
    // Only placeholders: nothing would ever be swept, which `check` said as "no active
    // sessions to sample", exit 0.
    let Some(db) = TestDb::new(Kind::Postgres).await else {
        return;
    };
    db.exec(
        "INSERT INTO checkout_sessions VALUES ('never', 'm', 'ACTIVE', '-infinity'), \
           ('old', 'm', 'ACTIVE', '1999-01-01 00:00:00+00')",
    )
    .await;
    let findings = db.store().await.check().await.unwrap();
    assert!(
        errors(&findings)
            .iter()
            .any(|m| m.contains("none of the 2 active")),
        "{findings:?}"
    );
}

/// What the dry run lists (the sweep's own eligibility), as tokens.
async fn listed(db: &TestDb) -> Vec<String> {
    let store = db.store().await;
    let params = session_sweeper::store::ClaimParams {
        worker: "dry-run",
        idle_before: Utc::now() - Duration::from_secs(1800),
        stale_after: Duration::from_secs(15),
        lease: Duration::from_secs(300),
        limit: 100,
    };
    let mut tokens: Vec<String> = store
        .eligible(params)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.token)
        .collect();
    tokens.sort();
    tokens
}

/// The end of each unreadable-times story: the dry run lists only the session `fine`, a sweep
/// sends only it, and `unreadable` active rows are counted as such.
async fn only_fine_is_sent(db: &TestDb, unreadable: u64) {
    assert_eq!(
        listed(db).await,
        ["fine"],
        "the dry run lists only the real time"
    );
    let sim = simulator(SimulatorConfig::default()).await;
    let summary = sweep_once(&db.config(&sim.base_url(), &[])).await.unwrap();
    assert_eq!(summary.invalidated, 1, "{summary:?}");
    let calls = sim.stats.calls_per_token();
    assert_eq!(calls.keys().collect::<Vec<_>>(), ["fine"], "{calls:?}");
    let report = db.store().await.report(5).await.unwrap();
    assert_eq!(
        report.unusable.unreadable_last_activity, unreadable,
        "{report:?}"
    );
}

#[tokio::test]
async fn mysql_zero_and_impossible_dates_are_unreadable_never_sent() {
    // MariaDB's default sql_mode stores them (WordPress writes 0000-00-00 00:00:00 for "never");
    // none is a time, and each compares as long ago.
    let Some(db) = TestDb::new(Kind::MySql).await else {
        return;
    };
    db.exec(
        "DROP TABLE checkout_sessions; \
         CREATE TABLE checkout_sessions (session_token VARCHAR(64) PRIMARY KEY, member_identifier VARCHAR(64), \
           status VARCHAR(16), last_activity_at DATETIME NULL); \
         INSERT INTO checkout_sessions VALUES ('zero-date', 'm', 'ACTIVE', '0000-00-00 00:00:00'), \
           ('zero-day', 'm', 'ACTIVE', '2026-11-00 00:00:00'), ('zero-month', 'm', 'ACTIVE', '2026-00-10 00:00:00'), \
           ('fine', 'm', 'ACTIVE', UTC_TIMESTAMP() - INTERVAL 2 HOUR)",
    )
    .await;
    // Days the month does not have, which a shop running with ALLOW_INVALID_DATES stores.
    let common::Pool::MySql(pool) = &db.pool else {
        unreachable!()
    };
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("SET SESSION sql_mode = 'ALLOW_INVALID_DATES'")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO checkout_sessions VALUES ('feb-30', 'm', 'ACTIVE', '2026-02-30 12:00:00'), \
           ('apr-31', 'm', 'ACTIVE', '2026-04-31 00:00:00'), ('feb-29-2025', 'm', 'ACTIVE', '2025-02-29 00:00:00')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::raw_sql("SET SESSION sql_mode = DEFAULT")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    only_fine_is_sent(&db, 6).await;
    for zero in ["zero-date", "zero-day", "zero-month", "feb-30", "apr-31"] {
        assert_eq!(db.status(zero).await, "ACTIVE");
    }
}

#[tokio::test]
async fn sqlite_text_before_2000_is_unreadable_never_sent() {
    // The zero time of .NET and Go, the Unix epoch written as text, the last moment of 1999:
    // each fits the format's shape and none is a shopper's last activity.
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    db.exec(
        "INSERT INTO checkout_sessions VALUES ('zero-time', 'm', 'ACTIVE', '0001-01-01 00:00:00'), \
           ('epoch', 'm', 'ACTIVE', '1970-01-01 00:00:00'), ('y1999', 'm', 'ACTIVE', '1999-12-31 23:59:59.999'), \
           ('fine', 'm', 'ACTIVE', datetime('now', '-2 hours'))",
    )
    .await;
    only_fine_is_sent(&db, 3).await;
}

#[tokio::test]
async fn sqlite_text_at_hour_24_or_with_a_nul_inside_is_unreadable_never_sent() {
    // SQLite's own date functions keep hour 24 of some dates as it is, so the format check let
    // it through: '…-29 24:30:00' sorts before a cutoff of '…-30 00:10:00' and means 00:30 on
    // the 30th.
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    db.exec(
        "INSERT INTO checkout_sessions VALUES \
           ('h24', 'm', 'ACTIVE', '2026-01-01 24:00:00'), \
           ('h2459', 'm', 'ACTIVE', '2026-01-01 24:59:59.5'), \
           ('fine', 'm', 'ACTIVE', datetime('now', '-2 hours'))",
    )
    .await;
    // SQLite's text functions and GLOB stop at a NUL, its comparisons do not: an old time, a
    // NUL, then anything at all looked like the old time.
    db.exec(
        "INSERT INTO checkout_sessions VALUES \
           ('nul-now', 'm', 'ACTIVE', CAST(CAST(datetime('now', '-2 hours') AS BLOB) || X'00' \
              || CAST(datetime('now') AS BLOB) AS TEXT)), \
           ('nul-fraction', 'm', 'ACTIVE', CAST(CAST(datetime('now', '-2 hours') || '.5' AS BLOB) \
              || X'006A756E6B' AS TEXT))",
    )
    .await;
    only_fine_is_sent(&db, 4).await;
}

#[tokio::test]
async fn a_utf16_sqlite_file_is_refused_with_a_reason_and_nothing_is_sent() {
    // `PRAGMA encoding = 'UTF-16le'` stores two bytes a character: its tokens came back as
    // those bytes, no token iyzico knows, and every session was released without a word.
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("utf16.sqlite").display()
    );
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "PRAGMA encoding = 'UTF-16le'; \
         CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT, \
           status TEXT, last_activity_at TEXT); \
         INSERT INTO checkout_sessions VALUES ('old', 'm', 'ACTIVE', datetime('now', '-2 hours'))",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(&sim.base_url(), &[("SWEEPER_DATABASE__URL", &url)]);
    let store = session_sweeper::store::open(&config).await.unwrap();
    store.migrate().await.unwrap();
    let findings = store.check().await.unwrap();
    assert!(
        errors(&findings).iter().any(|m| m.contains("UTF-16le")),
        "{findings:?}"
    );
    let e = sweep_once(&config).await.unwrap_err();
    assert!(e.to_string().contains("UTF-16le"), "{e}");
    assert_eq!(requests(&sim), 0);
}

#[tokio::test]
async fn rfc3339_text_with_junk_in_its_fraction_or_hour_24_is_never_sent() {
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    db.exec(
        "INSERT INTO checkout_sessions VALUES \
           ('junk-z', 'm', 'ACTIVE', '2026-01-01T00:00:00.5xZ'), \
           ('junk-offset', 'm', 'ACTIVE', '2026-01-01T00:00:00.5x+00:00'), \
           ('no-digits', 'm', 'ACTIVE', '2026-01-01T00:00:00.Z'), \
           ('h24', 'm', 'ACTIVE', '2026-01-01T24:00:00Z'), \
           ('nul', 'm', 'ACTIVE', CAST(CAST(strftime('%Y-%m-%dT%H:%M:%SZ', 'now', '-2 hours') AS BLOB) \
              || X'002B31343A3030' AS TEXT)), \
           ('fine', 'm', 'ACTIVE', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 hours')), \
           ('fine-offset', 'm', 'ACTIVE', strftime('%Y-%m-%dT%H:%M:%S', 'now', '-2 hours') || '.25+00:00')",
    )
    .await;
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(
        &sim.base_url(),
        &[("SWEEPER_SOURCE__LAST_ACTIVITY_FORMAT", "rfc3339")],
    );
    let summary = sweep_once(&config).await.unwrap();
    let calls = sim.stats.calls_per_token();
    let mut sent: Vec<_> = calls.keys().map(String::as_str).collect();
    sent.sort();
    assert_eq!(sent, ["fine", "fine-offset"], "{summary:?}");
    let store = session_sweeper::store::open(&config).await.unwrap();
    assert_eq!(
        store
            .report(5)
            .await
            .unwrap()
            .unusable
            .unreadable_last_activity,
        5
    );
}

#[tokio::test]
async fn postgres_infinite_and_ancient_times_are_unreadable_never_sent() {
    // `-infinity` sorts before every time and `infinity` is a common "never expires"; a date
    // before 2000 (here one BC) is no shopper's last activity either.
    let Some(db) = TestDb::new(Kind::Postgres).await else {
        return;
    };
    db.exec(
        "INSERT INTO checkout_sessions VALUES ('neg-inf', 'm', 'ACTIVE', '-infinity'), \
           ('pos-inf', 'm', 'ACTIVE', 'infinity'), ('bc', 'm', 'ACTIVE', '0044-03-15 00:00:00+00 BC'), \
           ('fine', 'm', 'ACTIVE', now() - interval '2 hours')",
    )
    .await;
    let findings = db.store().await.check().await.unwrap();
    assert!(errors(&findings).is_empty(), "{findings:?}");
    only_fine_is_sent(&db, 3).await;
}

/// The shop's migration or its own `LOCK TABLES` holds the source table: the sweep's statements
/// give up at the lock timeout instead of waiting as long as the lock lasts (a day, by MariaDB's
/// default), nothing is sent meanwhile, and the next sweep after the lock goes takes them all.
async fn a_source_table_the_shop_holds_locked_ends_the_sweep_instead_of_hanging(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    db.seed(&idle_sessions("s", 3)).await;
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(&sim.base_url(), &[]);
    // Joined the fleet and read the catalog before the lock, as a running daemon has.
    let store = session_sweeper::store::open(&config).await.unwrap();
    store.migrate().await.unwrap();
    let replica =
        session_sweeper::engine::Replica::start(store.clone(), &config, Default::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    // Held on a connection of its own until released below.
    let (mut pg_lock, mut my_lock) = (None, None);
    match &db.pool {
        common::Pool::Pg(_) => {
            pg_lock = Some(db.pg_lock("checkout_sessions", "ACCESS EXCLUSIVE").await);
        }
        common::Pool::MySql(p) => {
            let mut conn = p.acquire().await.unwrap();
            sqlx::raw_sql("LOCK TABLES checkout_sessions WRITE")
                .execute(&mut *conn)
                .await
                .unwrap();
            my_lock = Some(conn);
        }
        common::Pool::Sqlite(_) => unreachable!("one file, one lock: SQLite's busy timeout"),
    }
    let shutdown = session_sweeper::shutdown::Shutdown::new();
    let progress = || std::sync::Arc::new(session_sweeper::sweep::Progress::default());
    let sweep = tokio::time::timeout(
        Duration::from_secs(60),
        replica.sweeper.run_once(&shutdown, progress()),
    )
    .await
    .expect("the sweep gave up on the lock instead of waiting for it");
    assert!(sweep.is_err() || sweep.unwrap().invalidated == 0);
    assert_eq!(
        requests(&sim),
        0,
        "nothing is sent while the source cannot be read"
    );
    if let Some(tx) = pg_lock.take() {
        tx.rollback().await.unwrap();
    }
    if let Some(mut conn) = my_lock.take() {
        sqlx::raw_sql("UNLOCK TABLES")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let summary = replica
        .sweeper
        .run_once(&shutdown, progress())
        .await
        .unwrap();
    assert_eq!(summary.invalidated, 3, "{summary:?}");
    replica.membership.leave().await;
    store.close().await;
}

/// The shop holds its table against writes (a long report, a backup's read lock): the source
/// cannot be marked passive, but what iyzico accepted is in the ledger at once, not after the
/// marks have waited out their lock timeouts (5 s each, twice) batch after batch.
async fn the_ledger_is_written_while_the_source_cannot_be_marked(kind: Kind) {
    let Some((db, sim)) =
        common::sessions_and_simulator(kind, 20, Duration::from_millis(200)).await
    else {
        return;
    };
    let config = db.config(&sim.base_url(), &[("SWEEPER_SWEEP__CONCURRENCY", "4")]);
    // Reads go on; the source update waits for the lock (and gives up at lock_timeout).
    let lock = db.pg_lock("checkout_sessions", "SHARE").await;
    let sweep = tokio::spawn(async move { sweep_once(&config).await });
    common::wait_for("every call answered", Duration::from_secs(30), || {
        requests(&sim) >= 20
    })
    .await;
    // Five batches of four, 200 ms each, then the last answer: the ledger has them all well
    // before a single mark could have given up.
    let answered = std::time::Instant::now();
    while db.count_state("invalidated").await < 20 {
        assert!(
            answered.elapsed() < Duration::from_secs(3),
            "the ledger waited for the source: {} of 20 recorded",
            db.count_state("invalidated").await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.rollback().await.unwrap();
    let summary = sweep.await.unwrap().unwrap();
    assert_eq!(summary.invalidated, 20, "{summary:?}");
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $( #[tokio::test] async fn $name() { super::$name(super::Kind::Sqlite).await } )* }
        mod postgres { $( #[tokio::test] async fn $name() { super::$name(super::Kind::Postgres).await } )* }
        mod mysql { $( #[tokio::test] async fn $name() { super::$name(super::Kind::MySql).await } )* }
    };
}

both_backends!(
    a_failing_source_update_keeps_the_record_and_never_resends,
    null_duplicate_and_unreadable_rows_never_stop_a_sweep,
    a_session_revived_while_waiting_for_the_rate_limiter_is_not_sent,
    a_token_with_a_live_duplicate_row_is_neither_sent_nor_marked,
    a_row_dated_far_ahead_is_named_and_hides_no_real_newest,
);

// PostgreSQL only: on MariaDB a `LOCK TABLES … READ` also holds the claims (they lock the
// source rows they take), so nothing is sent at all while it lasts.
#[tokio::test]
async fn postgres_the_ledger_is_written_while_the_source_cannot_be_marked() {
    the_ledger_is_written_while_the_source_cannot_be_marked(Kind::Postgres).await
}

mod locked {
    use super::*;
    #[tokio::test]
    async fn postgres() {
        a_source_table_the_shop_holds_locked_ends_the_sweep_instead_of_hanging(Kind::Postgres).await
    }
    #[tokio::test]
    async fn mysql() {
        a_source_table_the_shop_holds_locked_ends_the_sweep_instead_of_hanging(Kind::MySql).await
    }
}

#[tokio::test]
async fn mysql_tokens_differing_in_case_or_trailing_spaces_are_different_sessions() {
    // MySQL's default collations fold case and ignore trailing spaces; sessions never do.
    let Some(db) = TestDb::new(Kind::MySql).await else {
        return;
    };
    db.exec(
        "DROP TABLE checkout_sessions; \
         CREATE TABLE checkout_sessions (id INT AUTO_INCREMENT PRIMARY KEY, session_token VARCHAR(255), \
           member_identifier INT, status VARCHAR(20), last_activity_at DATETIME) DEFAULT CHARSET = utf8mb4; \
         CREATE INDEX checkout_sessions_tok ON checkout_sessions (session_token); \
         INSERT INTO checkout_sessions (session_token, member_identifier, status, last_activity_at) VALUES \
           ('tokC', 1, 'ACTIVE', UTC_TIMESTAMP() - INTERVAL 3 HOUR), ('TOKC', 2, 'ACTIVE', UTC_TIMESTAMP() - INTERVAL 2 HOUR), \
           ('tokB', 3, 'ACTIVE', UTC_TIMESTAMP() - INTERVAL 2 HOUR), ('tokB ', 4, 'ACTIVE', UTC_TIMESTAMP() - INTERVAL 2 HOUR), \
           ('live', 5, 'ACTIVE', UTC_TIMESTAMP()), ('LIVE', 6, 'ACTIVE', UTC_TIMESTAMP() - INTERVAL 2 HOUR)",
    )
    .await;
    let sim = simulator(SimulatorConfig::default()).await;
    // One at a time: the marking of one token comes before the next is claimed.
    let config = db.config(&sim.base_url(), &[("SWEEPER_SWEEP__BATCH_SIZE", "1")]);
    let summary = sweep_once(&config).await.unwrap();
    let calls = sim.stats.calls_per_token();
    for token in ["tokC", "TOKC", "tokB", "tokB ", "LIVE"] {
        assert_eq!(
            calls.get(token),
            Some(&1),
            "{token:?} is its own session: {calls:?}"
        );
    }
    assert!(!calls.contains_key("live"), "{calls:?}");
    assert_eq!(summary.invalidated, 5, "{summary:?}");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM checkout_sessions WHERE status = 'PASSIVE'")
            .await,
        5
    );
    assert_eq!(
        db.status("live").await,
        "ACTIVE",
        "only the rows that were sent are marked"
    );
}

#[tokio::test]
async fn a_shop_shaped_mysql_table_works_from_check_to_report() {
    // What WooCommerce-style plugins create: integer ids and members, VARCHAR(255) tokens,
    // DATETIME activity, statuses in upper case.
    let Some(db) = TestDb::new(Kind::MySql).await else {
        return;
    };
    db.exec(
        "CREATE TABLE iyzico_sessions (id INT AUTO_INCREMENT PRIMARY KEY, session_token VARCHAR(255) NOT NULL, \
           member_id INT NOT NULL, status VARCHAR(16) NOT NULL, last_activity DATETIME NOT NULL, \
           INDEX idle (status, last_activity), INDEX tok (session_token)) DEFAULT CHARSET = utf8mb4; \
         INSERT INTO iyzico_sessions (session_token, member_id, status, last_activity) VALUES \
           ('shop-1', 101, 'ACTIVE', UTC_TIMESTAMP() - INTERVAL 2 HOUR), \
           ('shop-2', 102, 'ACTIVE', UTC_TIMESTAMP() - INTERVAL 3 HOUR), \
           ('shop-3', 103, 'ACTIVE', UTC_TIMESTAMP()), ('shop-4', 104, 'PASSIVE', UTC_TIMESTAMP() - INTERVAL 5 HOUR)",
    )
    .await;
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(
        &sim.base_url(),
        &[
            ("SWEEPER_SOURCE__TABLE", "iyzico_sessions"),
            ("SWEEPER_SOURCE__MEMBER_COLUMN", "member_id"),
            ("SWEEPER_SOURCE__LAST_ACTIVITY_COLUMN", "last_activity"),
        ],
    );
    let store = session_sweeper::store::open(&config).await.unwrap();
    store.migrate().await.unwrap();
    let findings = store.check().await.unwrap();
    assert!(errors(&findings).is_empty(), "{findings:?}");
    assert_eq!(sweep_once(&config).await.unwrap().invalidated, 2);
    let calls = sim.stats.calls_per_token();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let report = store.report(5).await.unwrap();
    let count = |o: Outcome| report.counts.iter().find(|(k, _)| *k == o).unwrap().1;
    assert_eq!(count(Outcome::Invalidated), 2);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM iyzico_sessions WHERE status = 'PASSIVE'")
            .await,
        3
    );
}
