//! Whole sweeps against the simulator, on both backends.

mod common;

use session_sweeper::engine::ProgressDisplay;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use common::{Kind, TestDb, fresh_session, idle_sessions, simulator, sweep_once};
use session_sweeper::iyzico::simulator::{Faults, SimulatorConfig};
use session_sweeper::store::{ClaimParams, WorkerInfo};
use session_sweeper::sweep::{SweepError, SweepSummary};

async fn every_outcome_end_to_end(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig {
        always_fail: HashSet::from(["bad-0".to_string()]),
        ..SimulatorConfig::default()
    })
    .await;
    let mut rows = idle_sessions("s", 20);
    rows.extend(idle_sessions("bad", 1));
    rows.extend(idle_sessions("done", 1));
    rows.push(fresh_session("fresh"));
    db.seed(&rows).await;
    let config = db.config(&sim.base_url(), &[]);
    // "done-0" was invalidated earlier, outside our knowledge: iyzico answers 260030.
    {
        let c = session_sweeper::iyzico::Client::new(
            &config.iyzico,
            1,
            std::sync::Arc::new(session_sweeper::iyzico::limiter::SharedLimiter::new(
                config.iyzico.rate_per_second,
                config.iyzico.burst,
            )),
            Default::default(),
        )
        .unwrap();
        assert!(
            c.invalidate("done-0", "m", &Default::default())
                .await
                .result
                .is_ok()
        );
    }
    let summary = sweep_once(&config).await.unwrap();
    assert_eq!(summary.invalidated, 20, "{summary:?}");
    assert_eq!(summary.already_invalidated, 1, "{summary:?}");
    assert_eq!(summary.failed, 1, "{summary:?}");
    assert_eq!(db.ledger("s-3").await, Some(("invalidated".into(), 1)));
    assert_eq!(db.ledger("done-0").await.unwrap().0, "already_invalidated");
    assert_eq!(db.ledger("bad-0").await, Some(("failed".into(), 1)));
    assert_eq!(db.ledger("fresh").await, None);
    assert_eq!(db.status("s-3").await, "PASSIVE");
    assert_eq!(db.status("done-0").await, "PASSIVE");
    assert_eq!(db.status("bad-0").await, "ACTIVE");
    assert_eq!(db.status("fresh").await, "ACTIVE");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_attempts WHERE session_token = 'bad-0' AND error_code = '11'").await,
        1
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE lease_owner IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_workers").await,
        0,
        "the worker deregistered"
    );
}

async fn a_second_sweep_right_after_sends_nothing(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    db.seed(&idle_sessions("s", 120)).await;
    let config = db.config(
        &sim.base_url(),
        &[("SWEEPER_SOURCE__MARK_PASSIVE", "false")],
    );
    assert_eq!(sweep_once(&config).await.unwrap().invalidated, 120);
    let calls = sim.stats.requests.load(Ordering::SeqCst);
    let again = sweep_once(&config).await.unwrap();
    assert_eq!(again.processed(), 0, "{again:?}");
    assert_eq!(
        sim.stats.requests.load(Ordering::SeqCst),
        calls,
        "nothing sent twice"
    );
    assert_eq!(
        db.status("s-0").await,
        "ACTIVE",
        "mark_passive = false leaves the source alone"
    );
}

/// One sweep with metrics of its own: its summary, and the backlog gauge it set.
async fn sweep_reading_the_backlog(
    config: &session_sweeper::config::Config,
) -> (SweepSummary, f64) {
    let metrics = session_sweeper::telemetry::Metrics::new();
    let summary = common::sweep_once_with(
        config,
        &session_sweeper::shutdown::Shutdown::new(),
        metrics.clone(),
    )
    .await
    .unwrap();
    let backlog =
        common::metric(&metrics.render(), "sweeper_backlog_sessions").expect("the gauge is set");
    (summary, backlog)
}

/// The sweep counts its sessions beside its first claims, not before them: the count still
/// says how many there were at the start, the sessions it had claimed already included.
async fn the_backlog_counted_beside_the_claims_is_the_sweeps_start(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    let mut rows = idle_sessions("s", 300);
    rows.push(fresh_session("live"));
    db.seed(&rows).await;
    let config = db.config(&sim.base_url(), &[("SWEEPER_SWEEP__CONCURRENCY", "8")]);
    let (summary, backlog) = sweep_reading_the_backlog(&config).await;
    assert_eq!(summary.invalidated, 300, "{summary:?}");
    assert_eq!(
        backlog, 300.0,
        "the sessions there were when the sweep started"
    );
}

/// The count beside the claims says how many sessions there were at the start however the
/// race with the first calls falls: sweep after sweep, none counts without the sessions its
/// first calls settled before the count ran.
async fn every_sweeps_backlog_is_its_start(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    let config = db.config(&sim.base_url(), &[("SWEEPER_SWEEP__CONCURRENCY", "8")]);
    for round in 0..5 {
        db.seed(&idle_sessions(&format!("r{round}"), 300)).await;
        let (summary, backlog) = sweep_reading_the_backlog(&config).await;
        assert_eq!(summary.invalidated, 300, "{summary:?}");
        assert_eq!(
            backlog, 300.0,
            "round {round}: the sessions there were at its start"
        );
    }
}

/// The count says what was idle when the sweep started, however late it reads: a session
/// that only turned idle while the first claim waited on a shop's row lock is no part of it.
async fn a_session_idle_only_after_the_start_is_not_in_its_count(kind: Kind) {
    // Only PostgreSQL's claim waits on a held ledger key while its preparation does not: a
    // held SQLite write lock, or MariaDB's row lock, would hold up the preparation too.
    if kind != Kind::Postgres {
        return;
    }
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let common::Pool::Pg(pool) = &db.pool else {
        unreachable!()
    };
    let sim = simulator(SimulatorConfig::default()).await;
    let mut rows = idle_sessions("s", 100);
    // The oldest, so the first claim wants it; another transaction holds its ledger key.
    rows.push(common::Seed {
        idle: Duration::from_secs(3 * 3600),
        ..fresh_session("held")
    });
    // Idle (30 minutes) 3 s after it was seeded: not at the sweep's start, but before the
    // first claim gets through.
    rows.push(common::Seed {
        idle: Duration::from_secs(30 * 60 - 3),
        ..fresh_session("late")
    });
    db.seed(&rows).await;
    db.store().await;
    let config = db.config(&sim.base_url(), &[]);
    let hold = async {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO sweeper_sessions (session_token, member_identifier, state, attempts, \
             created_at, updated_at) VALUES ('held', 'm', 'skipped', 1, 0, 0)",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        tx.rollback().await.unwrap();
    };
    let ((summary, backlog), ()) = tokio::join!(sweep_reading_the_backlog(&config), hold);
    assert_eq!(summary.invalidated, 102, "{summary:?}");
    assert_eq!(
        backlog, 101.0,
        "the sessions idle at the start: 'late' was not yet"
    );
}

async fn calls_in_flight_never_exceed_concurrency(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig {
        latency: Duration::from_millis(25),
        ..SimulatorConfig::default()
    })
    .await;
    db.seed(&idle_sessions("s", 300)).await;
    let config = db.config(
        &sim.base_url(),
        &[
            ("SWEEPER_SWEEP__CONCURRENCY", "6"),
            ("SWEEPER_SWEEP__BATCH_SIZE", "40"),
        ],
    );
    let summary = sweep_once(&config).await.unwrap();
    assert_eq!(summary.invalidated, 300);
    let max = sim.stats.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 6, "{max} calls in flight with concurrency 6");
    assert!(
        max >= 5,
        "{max}: the pipe should stay (nearly) full across batch boundaries"
    );
}

async fn once_max_stops_after_n(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    db.seed(&idle_sessions("s", 30)).await;
    let config = db.config(&sim.base_url(), &[("SWEEPER_SWEEP__BATCH_SIZE", "7")]);
    let store = session_sweeper::store::open(&config).await.unwrap();
    store.migrate().await.unwrap();
    let replica = session_sweeper::engine::Replica::start(store, &config, Default::default())
        .await
        .unwrap();
    replica
        .sweeper
        .update_settings(|s| s.max_sessions = Some(10));
    let summary = replica
        .sweep_once(&Default::default(), ProgressDisplay::LogLines)
        .await
        .unwrap();
    assert_eq!(summary.invalidated, 10);
    assert_eq!(db.count_state("invalidated").await, 10);
}

/// A simulator that answers every call with a 503.
async fn always_unavailable() -> session_sweeper::iyzico::simulator::Simulator {
    simulator(SimulatorConfig {
        faults: Faults {
            unavailable: 1.0,
            ..Faults::default()
        },
        ..SimulatorConfig::default()
    })
    .await
}

async fn retryable_failures_follow_the_retry_schedule_then_fail(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = always_unavailable().await;
    db.seed(&idle_sessions("s", 3)).await;
    let config = db.config(
        &sim.base_url(),
        &[
            ("SWEEPER_SWEEP__RETRY_BASE", "1s"),
            ("SWEEPER_SWEEP__RETRY_MAX", "2s"),
            ("SWEEPER_SWEEP__MAX_ATTEMPTS", "3"),
            ("SWEEPER_IYZICO__RETRIES", "1"),
        ],
    );
    let first = sweep_once(&config).await.unwrap();
    assert_eq!(first.pending, 3);
    assert_eq!(
        sim.stats.requests.load(Ordering::SeqCst),
        6,
        "1 call + 1 immediate retry each"
    );
    assert_eq!(db.ledger("s-0").await, Some(("pending".into(), 1)));
    // Not due yet: nothing is sent.
    assert_eq!(sweep_once(&config).await.unwrap().processed(), 0);
    assert_eq!(sim.stats.requests.load(Ordering::SeqCst), 6);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(sweep_once(&config).await.unwrap().pending, 3);
    assert_eq!(db.ledger("s-0").await, Some(("pending".into(), 2)));
    // The second delay doubles to 2 s.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        sweep_once(&config).await.unwrap().processed(),
        0,
        "retry_base doubles per attempt"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let last = sweep_once(&config).await.unwrap();
    assert_eq!(last.failed, 3, "{last:?}");
    assert_eq!(db.ledger("s-0").await, Some(("failed".into(), 3)));
    assert_eq!(
        sim.stats.requests.load(Ordering::SeqCst),
        18,
        "3 attempts × 2 calls × 3 sessions"
    );
    let per_token = sim.stats.calls_per_token();
    assert!(per_token.values().all(|&n| n == 6), "{per_token:?}");
}

async fn an_auth_failure_stops_the_sweep_and_marks_nothing_failed(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig {
        latency: Duration::from_millis(5),
        ..SimulatorConfig::default()
    })
    .await;
    db.seed(&idle_sessions("s", 200)).await;
    let config = db.config(
        &sim.base_url(),
        &[("SWEEPER_IYZICO__SECRET_KEY", "not-the-secret")],
    );
    match sweep_once(&config).await {
        Err(SweepError::Auth { code, .. }) => assert_eq!(code, "1000"),
        other => panic!("expected an auth failure, got {other:?}"),
    }
    let calls = sim.stats.requests.load(Ordering::SeqCst);
    assert!(calls < 50, "{calls} calls: the sweep should stop at once");
    assert_eq!(db.count_state("failed").await, 0);
    assert_eq!(db.count_state("invalidated").await, 0);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE lease_owner IS NOT NULL")
            .await,
        0,
        "leases released"
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE attempts > 0")
            .await,
        0,
        "no attempt counted"
    );
    assert!(
        db.scalar("SELECT COUNT(*) FROM sweeper_attempts WHERE outcome = 'auth'")
            .await
            >= 1,
        "the calls are logged"
    );
    // With the right secret, everything goes through.
    let fixed = db.config(&sim.base_url(), &[]);
    assert_eq!(sweep_once(&fixed).await.unwrap().invalidated, 200);
}

async fn a_dead_workers_sessions_are_rescued_without_waiting_for_the_lease(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    db.seed(&idle_sessions("s", 10)).await;
    let store = db.store().await;
    // A worker claimed everything with a one-hour lease, then died: its last heartbeat is old.
    let dead = WorkerInfo {
        id: "dead-host:1:abc".into(),
        hostname: "dead-host".into(),
        pid: 1,
    };
    store.heartbeat(&dead).await.unwrap();
    let claimed = store
        .claim(ClaimParams {
            worker: &dead.id,
            idle_before: Utc::now() - Duration::from_secs(1800),
            stale_after: Duration::from_secs(15),
            lease: Duration::from_secs(3600),
            limit: 100,
        })
        .await
        .unwrap();
    db.age_heartbeat(&dead.id, 10).await;
    assert_eq!(claimed.len(), 10);
    // heartbeat = 1s in the test config: stale after 3 s, so a 10 s old heartbeat is dead.
    let config = db.config(&sim.base_url(), &[]);
    assert_eq!(sweep_once(&config).await.unwrap().invalidated, 10);
}

async fn a_session_revived_while_pending_is_skipped_and_never_sent(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = always_unavailable().await;
    db.seed(&idle_sessions("s", 2)).await;
    let flaky = db.config(
        &sim.base_url(),
        &[
            // Long enough that the same sweep never finds them due again (a slow second claim
            // on a loaded machine would), short enough for the next sweep below.
            ("SWEEPER_SWEEP__RETRY_BASE", "500ms"),
            ("SWEEPER_IYZICO__RETRIES", "0"),
        ],
    );
    assert_eq!(sweep_once(&flaky).await.unwrap().pending, 2);
    db.touch("s-0").await;
    let healthy = simulator(SimulatorConfig::default()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let summary = sweep_once(&db.config(&healthy.base_url(), &[]))
        .await
        .unwrap();
    assert_eq!(
        (summary.skipped, summary.invalidated),
        (1, 1),
        "{summary:?}"
    );
    assert_eq!(
        healthy.stats.calls_per_token().get("s-0"),
        None,
        "a revived session is never sent"
    );
    assert_eq!(db.ledger("s-0").await.unwrap().0, "skipped");
    assert_eq!(db.status("s-0").await, "ACTIVE");
}

async fn a_session_that_comes_back_while_queued_is_skipped_and_never_sent(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    // Oldest first: s-0 is sent first, s-5 last, about 2.5 s later at 2 requests per second.
    let rows: Vec<common::Seed> = (0..6)
        .map(|i| common::Seed {
            token: format!("s-{i}"),
            member: "m".into(),
            status: "ACTIVE",
            idle: Duration::from_secs(7200 - i * 60),
        })
        .collect();
    db.seed(&rows).await;
    let config = db.config(
        &sim.base_url(),
        &[
            ("SWEEPER_IYZICO__RATE_PER_SECOND", "2"),
            ("SWEEPER_IYZICO__BURST", "1"),
            ("SWEEPER_SWEEP__CONCURRENCY", "1"),
        ],
    );
    let sweep = tokio::spawn(async move { sweep_once(&config).await });
    let start = std::time::Instant::now();
    while sim.stats.requests.load(Ordering::SeqCst) < 1 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.touch("s-5").await;
    let summary = sweep.await.unwrap().unwrap();
    assert_eq!(
        (summary.invalidated, summary.skipped),
        (5, 1),
        "{summary:?}"
    );
    assert_eq!(sim.stats.calls_per_token().get("s-5"), None, "never sent");
    assert_eq!(db.ledger("s-5").await.unwrap().0, "skipped");
}

/// A source row still owed its passive mark is marked before the rows the sweep cannot use are
/// counted: the owed update is finished first, so a settled session whose row has since become
/// unusable (its member blanked) is neither counted nor warned about as a row never sent.
async fn rows_marked_before_the_sweep_are_not_counted_unusable(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    // Invalidated by an earlier sweep whose source update failed: the mark is still owed.
    let owed: Vec<common::Seed> = idle_sessions("owed", 300)
        .into_iter()
        .map(|s| common::Seed {
            member: String::new(),
            ..s
        })
        .collect();
    db.seed(&owed).await;
    db.store().await;
    let ledger: Vec<String> = (0..owed.len())
        .map(|i| format!("('owed-{i}', 'member-{i}', 'invalidated', 1, 0, 0, 0, 0)"))
        .collect();
    db.exec(&format!(
        "INSERT INTO sweeper_sessions (session_token, member_identifier, state, attempts, \
         created_at, updated_at, settled_at, source_marked) VALUES {}",
        ledger.join(", ")
    ))
    .await;
    let metrics = session_sweeper::telemetry::Metrics::new();
    let summary = common::sweep_once_with(
        &db.config(&sim.base_url(), &[]),
        &session_sweeper::shutdown::Shutdown::new(),
        metrics.clone(),
    )
    .await
    .unwrap();
    assert_eq!(summary.processed(), 0, "{summary:?}");
    assert_eq!(db.status("owed-0").await, "PASSIVE");
    assert_eq!(db.status("owed-299").await, "PASSIVE");
    let bad_rows = common::metric(
        &metrics.render(),
        "sweeper_source_rows_unusable{reason=\"bad_source_row\"}",
    )
    .expect("the gauge is set");
    assert_eq!(bad_rows, 0.0, "rows marked passive are not active");
}

/// A sweep stopped mid-flight says how many sessions it gave back: the attempts it cut short
/// and the claimed sessions it never started alike, so its counts add up to what it claimed
/// (every ledger row, here) and none reads as taken over by another worker.
async fn a_stopped_sweep_counts_every_session_it_gave_back(kind: Kind) {
    let Some((db, sim)) =
        common::sessions_and_simulator(kind, 200, Duration::from_millis(300)).await
    else {
        return;
    };
    let config = db.config(&sim.base_url(), &[("SWEEPER_SWEEP__CONCURRENCY", "4")]);
    let shutdown = session_sweeper::shutdown::Shutdown::new();
    let stop = shutdown.clone();
    let sweep = tokio::spawn(async move {
        common::sweep_once_with(&config, &shutdown, Default::default()).await
    });
    common::wait_for("the first call", Duration::from_secs(10), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    stop.stop();
    let summary = sweep.await.unwrap().unwrap();
    let claimed = db.scalar("SELECT COUNT(*) FROM sweeper_sessions").await as u64;
    assert!(
        claimed > summary.processed(),
        "{claimed} claimed, {summary:?}"
    );
    assert_eq!(summary.lost, 0, "{summary:?}");
    assert_eq!(
        summary.processed() + summary.released,
        claimed,
        "{summary:?}"
    );
}

both_backends!(
    processes_sharing_one_database_send_every_session_exactly_once,
    a_session_that_comes_back_while_queued_is_skipped_and_never_sent,
    every_outcome_end_to_end,
    a_second_sweep_right_after_sends_nothing,
    the_backlog_counted_beside_the_claims_is_the_sweeps_start,
    every_sweeps_backlog_is_its_start,
    a_session_idle_only_after_the_start_is_not_in_its_count,
    calls_in_flight_never_exceed_concurrency,
    once_max_stops_after_n,
    retryable_failures_follow_the_retry_schedule_then_fail,
    an_auth_failure_stops_the_sweep_and_marks_nothing_failed,
    a_dead_workers_sessions_are_rescued_without_waiting_for_the_lease,
    a_session_revived_while_pending_is_skipped_and_never_sent,
    rows_marked_before_the_sweep_are_not_counted_unusable,
    a_role_limited_to_max_connections_starts_every_time,
    a_stopped_sweep_counts_every_session_it_gave_back,
);

/// Several `once` processes on one database send every session exactly once: three on
/// PostgreSQL, two on a SQLite file (immediate transactions, WAL, busy timeout).
async fn processes_sharing_one_database_send_every_session_exactly_once(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let processes = if kind == Kind::Postgres { 3 } else { 2 };
    // Slow enough that the others together need longer than the heartbeat period (1 s) that a
    // process finding them already live waits before its first call: 900 ÷ (2 × 8) × 30 ms.
    let sim = simulator(SimulatorConfig {
        latency: Duration::from_millis(30),
        ..SimulatorConfig::default()
    })
    .await;
    db.seed(&idle_sessions("s", 900)).await;
    db.store().await;
    let config_path = db.dir.path().join("sweeper.toml");
    std::fs::write(&config_path, db.config_toml(&sim.base_url())).unwrap();
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"))
            .arg("--config")
            .arg(&config_path)
            .arg("once")
            .env("SWEEPER_SWEEP__BATCH_SIZE", "25")
            .env("SWEEPER_LOG__LEVEL", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let procs: Vec<_> = (0..processes).map(|_| spawn()).collect();
    let mut total = 0;
    for p in procs {
        let out = p.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        let line = String::from_utf8(out.stdout).unwrap();
        let n: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(n > 0, "every process took part: {line}");
        total += n;
    }
    assert_eq!(total, 900);
    let per_token = sim.stats.calls_per_token();
    assert_eq!(per_token.len(), 900);
    assert!(
        per_token.values().all(|&n| n == 1),
        "a session was sent twice"
    );
    assert_eq!(db.count_state("invalidated").await, 900);
}

/// A database role that may hold exactly `max_connections` connections (PostgreSQL's
/// `CONNECTION LIMIT`, MySQL's `MAX_USER_CONNECTIONS`): the sweeper, configured to that
/// budget, starts and sweeps every time; its start never holds one connection more than it.
async fn a_role_limited_to_max_connections_starts_every_time(kind: Kind) {
    if kind == Kind::Sqlite {
        return;
    }
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    db.seed(&idle_sessions("s", 30)).await;
    db.store().await;
    let role = format!(
        "sweeper_lim_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut url: url::Url = db.url.parse().unwrap();
    if kind == Kind::Postgres {
        db.exec(&format!(
            "CREATE ROLE {role} LOGIN CONNECTION LIMIT 4; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"
        ))
        .await;
    } else {
        let database = url.path().trim_start_matches('/').to_owned();
        db.exec(&format!(
            "CREATE USER '{role}'@'%' WITH MAX_USER_CONNECTIONS 4; \
             GRANT ALL PRIVILEGES ON `{database}`.* TO '{role}'@'%'"
        ))
        .await;
    }
    url.set_username(&role).unwrap();
    let url = url.to_string();
    let config = db.config(
        &sim.base_url(),
        &[
            ("SWEEPER_DATABASE__URL", url.as_str()),
            ("SWEEPER_DATABASE__MAX_CONNECTIONS", "4"),
        ],
    );
    let mut failures = Vec::new();
    let sessions_of_role = if kind == Kind::Postgres {
        format!("SELECT COUNT(*) FROM pg_stat_activity WHERE usename = '{role}'")
    } else {
        format!("SELECT COUNT(*) FROM information_schema.processlist WHERE user = '{role}'")
    };
    for _ in 0..8 {
        // The last round's connections are gone from the server before the next start.
        let start = std::time::Instant::now();
        while db.scalar(&sessions_of_role).await > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "connections linger"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let store = session_sweeper::store::open(&config).await.unwrap();
        match session_sweeper::engine::Replica::start(store.clone(), &config, Default::default())
            .await
        {
            Ok(replica) => {
                replica
                    .sweeper
                    .run_once(
                        &session_sweeper::shutdown::Shutdown::new(),
                        Default::default(),
                    )
                    .await
                    .unwrap();
                replica.membership.leave().await;
            }
            Err(e) => failures.push(e.to_string()),
        }
        store.close().await;
    }
    if kind == Kind::Postgres {
        db.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
            .await;
    } else {
        db.exec(&format!("DROP USER '{role}'@'%'")).await;
    }
    assert!(failures.is_empty(), "starts that failed: {failures:?}");
    assert_eq!(db.count_state("invalidated").await, 30);
}
