//! The daemon: graceful stop on signals, crash recovery, database trouble, metrics and health,
//! and the fleet-wide rate budget.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Kind, TestDb, sessions_and_simulator, signal, spawn_sweeper, wait_for};
use session_sweeper::daemon::DaemonError;
use session_sweeper::fleet::Membership;
use session_sweeper::iyzico::limiter::SharedLimiter;
use session_sweeper::shutdown::Shutdown;
use session_sweeper::store::WorkerInfo;
use session_sweeper::sweep::SweepError;
use session_sweeper::telemetry::Metrics;

async fn sigterm_mid_sweep_records_every_call_and_releases_the_rest(kind: Kind) {
    let Some((db, sim)) = sessions_and_simulator(kind, 40, Duration::from_millis(600)).await else {
        return;
    };
    let mut child = spawn_sweeper(
        &db,
        "run",
        &[
            ("SWEEPER_SWEEP__CONCURRENCY", "4"),
            ("SWEEPER_SWEEP__SHUTDOWN_GRACE", "5s"),
        ],
    );
    wait_for("calls in flight", Duration::from_secs(20), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 4
    })
    .await;
    let stopped_at = Instant::now();
    signal(&child, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(8), child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(stopped_at.elapsed() < Duration::from_secs(6));
    let sent = sim.stats.invalidated.load(Ordering::SeqCst) as i64;
    assert!((4..40).contains(&sent), "{sent}");
    assert_eq!(
        db.count_state("invalidated").await,
        sent,
        "every session the API invalidated is recorded"
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE lease_owner IS NOT NULL")
            .await,
        0
    );
    assert_eq!(db.scalar("SELECT COUNT(*) FROM sweeper_workers").await, 0);
    // The rest is claimable at once by anyone.
    let store = db.store().await;
    let now = chrono::Utc::now();
    let p = session_sweeper::store::ClaimParams {
        worker: "other",
        idle_before: now - Duration::from_secs(1800),
        stale_after: Duration::from_secs(3),
        lease: Duration::from_secs(60),
        limit: 100,
    };
    assert_eq!(store.count_eligible(p).await.unwrap() as i64, 40 - sent);
}

async fn a_second_signal_stops_at_once(kind: Kind) {
    let Some((db, sim)) = sessions_and_simulator(kind, 10, Duration::from_millis(10_000)).await
    else {
        return;
    };
    let mut child = spawn_sweeper(&db, "once", &[("SWEEPER_SWEEP__SHUTDOWN_GRACE", "60s")]);
    wait_for("a call in flight", Duration::from_secs(20), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&child, "-INT");
    let status = tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .expect("a forced stop is immediate")
        .unwrap();
    assert_eq!(status.code(), Some(130));
}

async fn after_sigkill_a_restart_settles_everything_at_most_twice(kind: Kind) {
    let Some((db, sim)) = sessions_and_simulator(kind, 60, Duration::from_millis(150)).await else {
        return;
    };
    let mut victim = spawn_sweeper(&db, "run", &[("SWEEPER_SWEEP__CONCURRENCY", "8")]);
    wait_for("some progress", Duration::from_secs(20), || {
        sim.stats.invalidated.load(Ordering::SeqCst) >= 10
    })
    .await;
    signal(&victim, "-KILL");
    victim.wait().await.unwrap();
    // The restarted process forgets its dead predecessor on this host: no waiting on its leases.
    let started = Instant::now();
    let out = spawn_sweeper(&db, "once", &[])
        .wait_with_output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let settled = db.count_state("invalidated").await + db.count_state("already_invalidated").await;
    assert_eq!(settled, 60, "everything settles");
    let calls: HashMap<String, u32> = sim.stats.calls_per_token();
    assert!(calls.values().all(|&n| n <= 2), "{calls:?}");
    // A call cut off by the kill may or may not have reached iyzico; when it did, the repeat is
    // answered 260030 and recorded as already_invalidated, never as a failure.
    let repeats = sim.stats.already_invalidated.load(Ordering::SeqCst) as i64;
    assert_eq!(
        db.count_state("already_invalidated").await,
        repeats,
        "a repeat is recognised through 260030"
    );
    assert_eq!(db.count_state("failed").await, 0);
}

both_backends!(
    sigterm_mid_sweep_records_every_call_and_releases_the_rest,
    a_second_signal_stops_at_once,
    after_sigkill_a_restart_settles_everything_at_most_twice,
);

async fn get(url: &str) -> (u16, String) {
    session_sweeper::iyzico::install_tls_provider();
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_skipped_ticks() {
    let Some((db, _sim)) =
        sessions_and_simulator(Kind::Sqlite, 20, Duration::from_millis(100)).await
    else {
        return;
    };
    let config = db.config(
        &_sim.base_url(),
        &[
            ("SWEEPER_SWEEP__INTERVAL", "100ms"),
            ("SWEEPER_SWEEP__CONCURRENCY", "2"),
        ],
    );
    let daemon = common::Daemon::start(config).await;
    let base = daemon.base_url.clone();
    session_sweeper::iyzico::install_tls_provider();
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/metrics")).await {
            let text = r.text().await.unwrap();
            if text.contains("sweeper_sweeps_total{result=\"ok\"} 1") {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no successful sweep"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, metrics) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for needle in [
        "sweeper_sessions_total{outcome=\"invalidated\"} 20",
        "sweeper_api_calls_total{class=\"invalidated\",status=\"200\"} 20",
        "sweeper_api_latency_seconds_count 20",
        "sweeper_sweep_duration_seconds_count",
        "sweeper_backlog_sessions",
        "sweeper_rate_limit_wait_seconds_total",
        "sweeper_fleet_replicas",
        "sweeper_ready 1",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    let last_ok = metrics
        .lines()
        .find(|l| l.starts_with("sweeper_last_successful_sweep_timestamp_seconds "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(last_ok > 1.7e9, "{last_ok}");
    let skipped: u64 = metrics
        .lines()
        .find(|l| l.starts_with("sweeper_skipped_ticks_total "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        skipped >= 3,
        "a 1 s sweep with a 100 ms interval skips ticks: {skipped}"
    );
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(get(&format!("{base}/readyz")).await.0, 200);
    daemon
        .stop(Duration::from_secs(5), Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_database_connections_do_not_stop_the_daemon() {
    let Some((db, sim)) =
        sessions_and_simulator(Kind::Postgres, 400, Duration::from_millis(15)).await
    else {
        return;
    };
    let config = db.config(
        &sim.base_url(),
        &[
            ("SWEEPER_SWEEP__INTERVAL", "200ms"),
            ("SWEEPER_SWEEP__CONCURRENCY", "4"),
            ("SWEEPER_SWEEP__BATCH_SIZE", "20"),
        ],
    );
    let daemon = common::Daemon::start(config).await;
    wait_for("the sweep to start", Duration::from_secs(20), || {
        sim.stats.invalidated.load(Ordering::SeqCst) >= 20
    })
    .await;
    for _ in 0..5 {
        db.exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'session-sweeper'",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    loop {
        let done =
            db.count_state("invalidated").await + db.count_state("already_invalidated").await;
        if done == 400 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {done} of 400 settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = sim.stats.calls_per_token();
    assert_eq!(calls.len(), 400);
    assert!(calls.values().all(|&n| n <= 2), "at most twice");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_sessions").await,
        400,
        "one ledger row per session"
    );
    assert!(!daemon.task.is_finished(), "the daemon kept running");
    daemon
        .stop(Duration::from_secs(5), Duration::from_secs(10))
        .await;
}

/// What a membership in these stories sees of the fleet: `limiter`, and nothing that fences it.
fn fleet_view(limiter: Arc<SharedLimiter>) -> session_sweeper::fleet::FleetView {
    session_sweeper::fleet::FleetView {
        limiter,
        metrics: Metrics::new(),
        liveness: session_sweeper::shutdown::Liveness::always(),
        clock: session_sweeper::clock::DbClock::new(),
        skewed: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_split_the_rate_budget_and_take_it_back() {
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    let store = db.store().await;
    let rate = std::num::NonZeroU32::new(20).unwrap();
    let worker = |n: u32| WorkerInfo {
        id: format!("host:{n}:x"),
        hostname: format!("host-{n}"),
        pid: n,
    };
    let limiter_a = Arc::new(SharedLimiter::new(rate, rate));
    let limiter_b = Arc::new(SharedLimiter::new(rate, rate));
    let beat = Duration::from_millis(100);
    let a = Membership::join(
        store.clone(),
        worker(1),
        beat,
        beat * 3,
        Duration::from_secs(60),
        fleet_view(limiter_a.clone()),
    )
    .await
    .unwrap();
    let b = Membership::join(
        store.clone(),
        worker(2),
        beat,
        beat * 3,
        Duration::from_secs(60),
        fleet_view(limiter_b.clone()),
    )
    .await
    .unwrap();
    wait_for("both to see two replicas", Duration::from_secs(5), || {
        limiter_a.replicas() == 2 && limiter_b.replicas() == 2
    })
    .await;
    // Two replicas: each gets 10/s, so 25 requests take a replica more than a second.
    let start = Instant::now();
    for _ in 0..25 {
        limiter_a.acquire().await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    b.leave().await;
    wait_for(
        "the survivor to take the whole budget",
        Duration::from_secs(5),
        || limiter_a.replicas() == 1,
    )
    .await;
    a.leave().await;
}

fn metric(text: &str, name: &str) -> f64 {
    common::metric(text, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_schedule_drives_sweeps() {
    let Some((db, sim)) = sessions_and_simulator(Kind::Sqlite, 3, Duration::from_millis(0)).await
    else {
        return;
    };
    let config = db.config(
        &sim.base_url(),
        &[("SWEEPER_SWEEP__SCHEDULE", "* * * * * *")],
    );
    let daemon = common::Daemon::start(config).await;
    let metrics = daemon.metrics.clone();
    let m = metrics.clone();
    wait_for(
        "three sweeps (start + two cron ticks)",
        Duration::from_secs(10),
        move || metric(&m.render(), "sweeper_sweeps_total{result=\"ok\"}") >= 3.0,
    )
    .await;
    assert_eq!(db.count_state("invalidated").await, 3);
    daemon
        .stop(Duration::from_secs(5), Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_1_when_iyzico_rejects_the_credentials() {
    let Some((db, sim)) = sessions_and_simulator(Kind::Sqlite, 20, Duration::from_millis(0)).await
    else {
        return;
    };
    let config = db.config(&sim.base_url(), &[("SWEEPER_IYZICO__SECRET_KEY", "wrong")]);
    let store = session_sweeper::store::open(&config).await.unwrap();
    let daemon = session_sweeper::daemon::Daemon::new(store, config, Metrics::new());
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        daemon.run_until_stopped(Shutdown::new()),
    )
    .await
    .expect("the daemon stops on its own");
    let err = result.unwrap_err();
    assert!(
        matches!(err, DaemonError::Sweep(SweepError::Auth { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("credentials"), "{err}");
    assert_eq!(db.count_state("failed").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_at_start_is_not_ready_and_waits() {
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    let config = db.config(
        "http://127.0.0.1:9",
        &[(
            "SWEEPER_DATABASE__URL",
            "postgres://postgres@127.0.0.1:1/nowhere",
        )],
    );
    let daemon = common::Daemon::start(config).await;
    let base = daemon.base_url.clone();
    session_sweeper::iyzico::install_tls_provider();
    // The listener was bound before the daemon started: nothing to wait for.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(get(&format!("{base}/readyz")).await.0, 503);
    assert!(
        !daemon.task.is_finished(),
        "it keeps trying instead of exiting"
    );
    daemon
        .stop(Duration::from_secs(1), Duration::from_secs(15))
        .await;
}

/// `run` under a systemd-like notify socket: READY=1, watchdog pings, STOPPING=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_ready_watchdog_and_stopping() {
    let Some((db, _sim)) = sessions_and_simulator(Kind::Sqlite, 2, Duration::from_millis(0)).await
    else {
        return;
    };
    let socket_path = db.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let socket_env = socket_path.to_str().unwrap().to_owned();
    let mut child = spawn_sweeper(
        &db,
        "run",
        &[
            ("NOTIFY_SOCKET", socket_env.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = Vec::new();
    let read = |seen: &mut Vec<String>, until: &str| {
        let start = Instant::now();
        let mut buf = [0u8; 512];
        while !seen.iter().any(|m| m.contains(until)) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no {until} in {seen:?}"
            );
            if let Ok(n) = socket.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    read(&mut seen, "READY=1");
    read(&mut seen, "WATCHDOG=1");
    signal(&child, "-TERM");
    read(&mut seen, "STOPPING=1");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_the_config_and_keeps_running() {
    let (db, sim) = sessions_and_simulator(Kind::Sqlite, 0, Duration::ZERO)
        .await
        .unwrap();
    let path = db.dir.path().join("sweeper.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let mut child = spawn_sweeper(&db, "run", &[("RUST_LOG", "info")]);
    wait_for("the worker to register", Duration::from_secs(10), || {
        std::fs::metadata(db.dir.path().join("sweeper.db-wal")).is_ok()
    })
    .await;
    let registered = async {
        for _ in 0..100 {
            if db.scalar("SELECT COUNT(*) FROM sweeper_workers").await == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the daemon never registered");
    };
    registered.await;
    // Two calls a second and a sweep every second, from a reload; the process keeps running.
    std::fs::write(
        &path,
        original
            .replace("rate_per_second = 10000", "rate_per_second = 2")
            .replace("burst = 1000", "burst = 1")
            .replace("interval = \"1h\"", "interval = \"1s\""),
    )
    .unwrap();
    signal(&child, "-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP never stops run"
    );
    db.seed(&common::idle_sessions("s", 8)).await;
    wait_for("the next scheduled sweep", Duration::from_secs(5), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = sim.stats.requests.load(Ordering::SeqCst);
    assert!(
        (1..=5).contains(&sent),
        "the reloaded rate of 2/s holds: {sent} calls in about 1.5 s"
    );
    // An invalid file changes nothing: the process keeps running on the settings it has.
    std::fs::write(
        &path,
        original.replace("rate_per_second = 10000", "rate_per_second = 0"),
    )
    .unwrap();
    signal(&child, "-HUP");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(child.try_wait().unwrap().is_none());
    let later = sim.stats.requests.load(Ordering::SeqCst);
    assert!(
        later - sent <= 3,
        "still 2/s after an invalid reload: {sent} → {later}"
    );
    signal(&child, "-TERM");
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("stops")
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("iyzico.rate_per_second: 10000 → 2"), "{logs}");
    assert!(logs.contains("sweep.schedule"), "{logs}");
    assert!(logs.contains("the config file is invalid"), "{logs}");
    assert!(!logs.contains(common::SECRET), "no secret in the logs");
}

#[tokio::test]
async fn a_stalled_database_turns_readiness_off_and_shutdown_stays_bounded() {
    let Some((db, sim)) =
        sessions_and_simulator(Kind::Postgres, 60, Duration::from_millis(300)).await
    else {
        return;
    };
    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = common::StallProxy::start(target).await;
    let mut url: url::Url = db.url.parse().unwrap();
    url.set_port(Some(proxy.addr.port())).unwrap();
    let config = db.config(
        &sim.base_url(),
        &[
            ("SWEEPER_DATABASE__URL", url.as_str()),
            ("SWEEPER_SWEEP__CONCURRENCY", "4"),
            ("SWEEPER_IYZICO__RATE_PER_SECOND", "20"),
        ],
    );
    let daemon = common::Daemon::start(config).await;
    wait_for("calls in flight", Duration::from_secs(20), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 4
    })
    .await;
    assert!(daemon.metrics.is_ready());
    // The database stops answering: the next heartbeat (1 s period) cannot complete.
    proxy.stall();
    let stalled_at = Instant::now();
    wait_for("readiness to turn off", Duration::from_secs(4), || {
        !daemon.metrics.is_ready()
    })
    .await;
    assert!(stalled_at.elapsed() < Duration::from_millis(3500));
    // It comes back: so does readiness, at the next good beat.
    proxy.resume();
    wait_for("readiness to come back", Duration::from_secs(5), || {
        daemon.metrics.is_ready()
    })
    .await;
    // Stalled again, a stop is bounded by the grace plus one short try per remaining step.
    proxy.stall();
    let grace = Duration::from_secs(2);
    let stopping = Instant::now();
    daemon.stop(grace, Duration::from_secs(15)).await;
    assert!(
        stopping.elapsed() < grace + Duration::from_secs(9),
        "stopped {:?} after SIGTERM with a stalled database",
        stopping.elapsed()
    );
    proxy.resume();
}

/// libfaketime, from Debian's `faketime` package (`.ci/run` installs it when missing).
fn libfaketime() -> Option<&'static str> {
    const LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    if std::path::Path::new(LIB).exists() {
        return Some(LIB);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{LIB} is missing in CI: install the faketime package"
    );
    eprintln!("notice: libfaketime not installed; skipping the clock-skew test");
    None
}

#[tokio::test]
async fn a_replica_whose_clock_runs_ahead_never_takes_a_live_peers_sessions() {
    let Some(lib) = libfaketime() else { return };
    let Some((db, sim)) =
        sessions_and_simulator(Kind::Postgres, 40, Duration::from_millis(1500)).await
    else {
        return;
    };
    // Long calls, few at a time: sessions stay leased for seconds, so a replica that judged its
    // peer dead by its own clock (30 s ahead: the peer's heartbeat looks 30 s old) would take
    // them while the peer's calls are still open.
    let env = [
        ("SWEEPER_SWEEP__CONCURRENCY", "4"),
        ("SWEEPER_SWEEP__BATCH_SIZE", "40"),
    ];
    let honest = spawn_sweeper(&db, "run", &env);
    wait_for("the first replica's calls", Duration::from_secs(20), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 2
    })
    .await;
    let mut ahead_env = env.to_vec();
    ahead_env.extend([
        ("LD_PRELOAD", lib),
        ("FAKETIME", "+30s"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]);
    let ahead = spawn_sweeper(&db, "run", &ahead_env);
    tokio::time::sleep(Duration::from_secs(8)).await;
    signal(&honest, "-TERM");
    signal(&ahead, "-TERM");
    let honest = honest.wait_with_output().await.unwrap();
    let ahead = ahead.wait_with_output().await.unwrap();
    assert_eq!(honest.status.code(), Some(0));
    assert_eq!(ahead.status.code(), Some(0));
    assert_eq!(
        sim.stats.overlapping_calls.load(Ordering::SeqCst),
        0,
        "a session was in flight from two workers at once"
    );
    let logs = String::from_utf8_lossy(&ahead.stderr);
    assert!(
        logs.contains("clock differs from the database's"),
        "the replica whose clock runs ahead says so: {logs}"
    );
}

#[tokio::test]
async fn sighup_never_stops_once() {
    let (db, sim) = sessions_and_simulator(Kind::Sqlite, 6, Duration::from_millis(700))
        .await
        .unwrap();
    let child = spawn_sweeper(&db, "once", &[("SWEEPER_SWEEP__CONCURRENCY", "2")]);
    wait_for("a call in flight", Duration::from_secs(20), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    signal(&child, "-HUP");
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("once ends")
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        db.count_state("invalidated").await,
        6,
        "the sweep went on to the end"
    );
}

/// A second signal stops `run` at once (143) even when the database stalls: the binary used to
/// close its pool politely after a forced stop, and the pool waited forever for the connection
/// a stalled heartbeat held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_run_at_once_even_with_a_stalled_database() {
    let Some((db, sim)) =
        sessions_and_simulator(Kind::Postgres, 40, Duration::from_millis(5_000)).await
    else {
        return;
    };
    let proxy = common::StallProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut url: url::Url = db.url.parse().unwrap();
    url.set_port(Some(proxy.addr.port())).unwrap();
    let mut child = spawn_sweeper(
        &db,
        "run",
        &[
            ("SWEEPER_DATABASE__URL", url.as_str()),
            ("SWEEPER_IYZICO__TIMEOUT", "10s"),
            ("SWEEPER_SWEEP__SHUTDOWN_GRACE", "60s"),
        ],
    );
    wait_for("calls in flight", Duration::from_secs(20), || {
        sim.stats.requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    // The database stops answering; within a beat (1 s) the heartbeat waits on it.
    proxy.stall();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .expect("a second signal stops run at once, whatever the database does")
        .unwrap();
    assert_eq!(status.code(), Some(143));
    proxy.resume();
}

/// A database URL whose port answers in another protocol (here an HTTP server) is a mistake in
/// the config, not a database that is down: `run` ends with it (exit 1) as it always did,
/// instead of waiting, not ready, for a database that will never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_url_that_reaches_another_protocol_ends_run() {
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    let sim = common::simulator(Default::default()).await;
    let not_postgres = sim.base_url().replace("http://", "postgres://postgres@") + "/none";
    let config = db.config(
        &sim.base_url(),
        &[("SWEEPER_DATABASE__URL", not_postgres.as_str())],
    );
    let store = session_sweeper::store::open(&config).await.unwrap();
    let daemon = session_sweeper::daemon::Daemon::new(store, config, Metrics::new());
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        daemon.run_until_stopped(Shutdown::new()),
    )
    .await
    .expect("run ends instead of retrying a server that is not a database");
    let err = result.unwrap_err();
    assert!(matches!(err, DaemonError::Start(_)), "{err:?}");
    assert!(
        err.to_string().contains("connecting to the database"),
        "{err}"
    );
}

/// The first signal ends `run`'s wait for a database that accepts connections and never answers
/// at once, not after the attempt's own timeout (10 s), and the routes stop with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_signal_ends_runs_wait_for_a_silent_database_at_once() {
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    // Connections complete in the kernel's backlog; nothing ever reads or answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://postgres@{}/none", silent.local_addr().unwrap());
    let config = db.config(
        "http://127.0.0.1:9",
        &[("SWEEPER_DATABASE__URL", url.as_str())],
    );
    let daemon = common::Daemon::start(config).await;
    let base = daemon.base_url.clone();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(get(&format!("{base}/readyz")).await.0, 503);
    assert!(!daemon.task.is_finished(), "still waiting for the database");
    let stopping = Instant::now();
    daemon
        .stop(Duration::from_secs(5), Duration::from_secs(2))
        .await;
    assert!(stopping.elapsed() < Duration::from_secs(2));
    let stopped = Instant::now();
    while reqwest::get(format!("{base}/healthz")).await.is_ok() {
        assert!(
            stopped.elapsed() < Duration::from_secs(2),
            "the routes stop with the daemon"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A worker that leaves while a heartbeat is still waiting on the database stays gone: the beat
/// is let finish before the row is removed, so it cannot put the row back afterwards (another
/// writer holds SQLite's write lock, so the beat and the removal wait for it together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leaves_mid_heartbeat_stays_gone() {
    let Some(db) = TestDb::new(Kind::Sqlite).await else {
        return;
    };
    let store = db.store().await;
    let common::Pool::Sqlite(pool) = &db.pool else {
        unreachable!("a SQLite database")
    };
    let rate = std::num::NonZeroU32::new(20).unwrap();
    let membership = Membership::join(
        store.clone(),
        WorkerInfo {
            id: "host:1:x".into(),
            hostname: "host".into(),
            pid: 1,
        },
        Duration::from_millis(100),
        Duration::from_secs(3),
        Duration::from_secs(60),
        fleet_view(Arc::new(SharedLimiter::new(rate, rate))),
    )
    .await
    .unwrap();
    let mut writer = pool.acquire().await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut *writer)
        .await
        .unwrap();
    // The first beat comes 250 ms after joining, and waits for the lock.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let leaving = tokio::spawn(membership.leave());
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::raw_sql("COMMIT").execute(&mut *writer).await.unwrap();
    drop(writer);
    leaving.await.unwrap();
    // Whatever was still running in the database has landed by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_workers").await,
        0,
        "the worker is gone"
    );
}

/// How this process's last sweep ended, if one did.
fn last_sweep(m: &Metrics) -> Option<&'static str> {
    m.last_sweep().map(|s| s.result)
}

/// A PostgreSQL daemon (3 sessions, a sweep every 200 ms, and `overrides`) whose first sweep
/// succeeded, then whose source the shop locked in `mode` until a sweep failed on it. The
/// lock comes back held.
async fn failing_on_a_locked_source(
    overrides: &[(&str, &str)],
    mode: &str,
) -> Option<(
    TestDb,
    session_sweeper::iyzico::simulator::Simulator,
    common::Daemon,
    sqlx::Transaction<'static, sqlx::Postgres>,
)> {
    let (db, sim) = sessions_and_simulator(Kind::Postgres, 3, Duration::ZERO).await?;
    let mut settings = vec![("SWEEPER_SWEEP__INTERVAL", "200ms")];
    settings.extend_from_slice(overrides);
    let daemon = common::Daemon::start(db.config(&sim.base_url(), &settings)).await;
    wait_for("a first sweep", Duration::from_secs(20), || {
        last_sweep(&daemon.metrics) == Some("ok")
    })
    .await;
    let lock = db.pg_lock("checkout_sessions", mode).await;
    wait_for(
        "a sweep to fail on the lock",
        Duration::from_secs(20),
        || last_sweep(&daemon.metrics) == Some("failed"),
    )
    .await;
    Some((db, sim, daemon, lock))
}

#[tokio::test]
async fn a_sweep_that_fails_keeps_readiness_off_until_one_succeeds() {
    // The database answers (every heartbeat succeeds) but the shop holds its table locked, so
    // every sweep fails: `/readyz` must say so, not only the first moment after each failure.
    let Some((_db, _sim, daemon, lock)) =
        failing_on_a_locked_source(&[("SWEEPER_SWEEP__HEARTBEAT", "1s")], "ACCESS EXCLUSIVE").await
    else {
        return;
    };
    // Two heartbeat periods, all beats good, no sweep succeeding: never ready.
    let watching = Instant::now();
    while watching.elapsed() < Duration::from_millis(2500) {
        assert!(
            !daemon.metrics.is_ready(),
            "ready {:?} after a failed sweep, while no sweep has succeeded",
            watching.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.rollback().await.unwrap();
    wait_for(
        "readiness after a good sweep",
        Duration::from_secs(30),
        || daemon.metrics.is_ready() && last_sweep(&daemon.metrics) == Some("ok"),
    )
    .await;
    daemon
        .stop(Duration::from_secs(5), Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn a_sweep_stopped_after_failures_never_turns_readiness_on() {
    // Sweeps fail on a shop's lock; a stop then cuts the next one short. A sweep cut short is
    // no sweep that succeeded: the daemon stays not ready until it has exited.
    let Some((db, _sim, daemon, lock)) = failing_on_a_locked_source(&[], "EXCLUSIVE").await else {
        return;
    };
    // The next sweep waits in its preparation, on a lock over the ledger; the stop comes
    // meanwhile, then the ledger is let go, so the sweep ends cut short, not failed. A lock
    // over the workers keeps the exit open long enough to watch.
    let ledger = db.pg_lock("sweeper_sessions", "SHARE").await;
    let waiting = Instant::now();
    while db
        .scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND application_name = 'session-sweeper' AND query LIKE '%SET lease_owner = NULL%'",
        )
        .await
        == 0
    {
        assert!(
            waiting.elapsed() < Duration::from_secs(20),
            "no sweep waits on the ledger"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = daemon.metrics.clone();
    let common::Daemon { shutdown, task, .. } = daemon;
    shutdown.begin(Duration::from_secs(10));
    let workers = db.pg_lock("sweeper_workers", "EXCLUSIVE").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    ledger.rollback().await.unwrap();
    let mut task = task;
    let ended = loop {
        assert!(
            !metrics.is_ready(),
            "ready while stopping, the last sweep {:?}",
            last_sweep(&metrics)
        );
        match tokio::time::timeout(Duration::from_millis(10), &mut task).await {
            Ok(ended) => break ended,
            Err(_) => continue,
        }
    };
    ended.unwrap().unwrap();
    assert_eq!(
        last_sweep(&metrics),
        Some("aborted"),
        "the story's sweep was cut short"
    );
    assert!(!metrics.is_ready());
    workers.rollback().await.unwrap();
    lock.rollback().await.unwrap();
}
