//! Benchmarks: throughput against an ideal client, rate-limit precision, scale, replicas and
//! recovery time.
//!
//!     TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     TEST_MYSQL_URL=mysql://root@127.0.0.1:3306/mysql \
//!         cargo bench --bench sweeper -- [throughput|rate|scale|replicas|recovery|mysql|all] [--runs N]
//!
//! The sweeper always runs as its own process (the release binary), so its CPU time and peak RSS
//! are its own (`wait4`, read by a small spawner process in between: see [`spawner`]); the
//! simulator and the data seeding run in this process. Databases, the simulator and the
//! migrations come from the test suite's helpers (`tests/common`).
//!
//! # `throughput`: the sweeper against an ideal client
//!
//! A nominal bound (64 in flight ÷ 20 ms = 3,200/s) is not what a loaded 2-core machine can do,
//! so each run measures the machine's own limit next to the sweeper: an **ideal client** (this
//! binary re-executed with [`IDEAL_CLIENT_ARG`]) sends the same number of signed invalidate
//! requests, with the real client's body, headers, signing, HTTP stack and response
//! classification, at the sweeper's concurrency over keep-alive connections, to the same
//! simulator instance; no database, no ledger, nothing else. One run is: a fresh database with
//! 20,000 eligible sessions and a fresh simulator (20 ms latency), the ideal client, then
//! `once` (`batch_size = 500`, `concurrency = 64`, rate limit out of the way). Each process's
//! requests are told apart by the simulator's arrival counter before and after it (the
//! simulator cannot be reset). Per process:
//!
//! - **whole-run rate**: sessions ÷ process wall time (spawn → reaped by `wait4`);
//! - **steady rate**: the requests that arrived between the 10th and the 90th percentile of the
//!   process's arrival times, over that time: `(i90 − i10) ÷ (t[i90] − t[i10])`, with
//!   `i10 = ⌊0.1 n⌋` and `i90 = ⌊0.9 n⌋` (start-up, ramp-up and the tail are left out);
//! - the sweeper's **ratios** are its rates ÷ the ideal client's rates of the same run;
//! - **served latency**: the simulator's mean service time over the process's requests;
//! - **CPU per session**: (user + system time from `wait4`) ÷ sessions;
//! - **start-up**: spawn → the first request arriving at the simulator (the database is already
//!   migrated);
//! - **exit**: the last response → reaped by `wait4`. The simulator timestamps arrivals only, so
//!   the last response is taken as the last arrival plus the process's mean served latency
//!   (its sleep is precise to a fraction of a millisecond).
//!
//! Runs per backend: `--runs N` or `SWEEPER_BENCH_RUNS` (default 3). Each metric is printed as
//! min–max over the runs, with the targets beside it, as a ready-to-paste markdown row per
//! backend. `throughput` covers SQLite and PostgreSQL, and MariaDB/MySQL too when
//! `TEST_MYSQL_URL` is set; `mysql` runs MariaDB's throughput, scale and replicas.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{Kind, Pool, TestDb};
use session_sweeper::config::Config;
use session_sweeper::iyzico::client;
use session_sweeper::iyzico::simulator::{Simulator, SimulatorConfig};
use session_sweeper::store::{self, ClaimParams};

const BIN: &str = env!("CARGO_BIN_EXE_session-sweeper");
/// The first argument that makes this binary the ideal client: `<config.toml> <sessions>`.
const IDEAL_CLIENT_ARG: &str = "__ideal-client";
/// The first argument that makes this binary the spawner: `<program> <args…>`; see [`spawner`].
const SPAWNER_ARG: &str = "__spawner";
/// Sessions per throughput run.
const THROUGHPUT_SESSIONS: u64 = 20_000;
/// Calls in flight in a throughput run.
const THROUGHPUT_CONCURRENCY: usize = 64;
/// The simulator's latency in a throughput run.
const THROUGHPUT_LATENCY_MS: u64 = 20;

/// The backend's name in the tables.
fn label(kind: Kind) -> &'static str {
    match kind {
        Kind::Sqlite => "SQLite",
        Kind::Postgres => "PostgreSQL",
        Kind::MySql => "MariaDB",
    }
}

/// The server a benchmark database is created on, from the test suite's variables.
fn admin_url(kind: Kind) -> String {
    let url = match kind {
        Kind::MySql => common::mysql_admin_url(),
        _ => common::pg_admin_url(),
    };
    url.unwrap_or_else(|| {
        let var = match kind {
            Kind::MySql => common::MYSQL_ENV,
            _ => common::PG_ENV,
        };
        panic!("set {var} for {} benchmarks", label(kind))
    })
}

/// A fresh database with the test suite's source table; benchmarks never skip a backend.
async fn database(kind: Kind) -> TestDb {
    if kind != Kind::Sqlite {
        admin_url(kind);
    }
    TestDb::new(kind).await.expect("the server is configured")
}

/// `total` rows of which one in `every_nth_eligible` is active and idle; the rest passive.
/// Generated by the server: a million rows one by one would take minutes.
async fn seed(db: &TestDb, total: u64, every_nth_eligible: u64) {
    let sql = match db.kind {
        Kind::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {last}) \
             INSERT INTO checkout_sessions SELECT 'tok-' || i, 'mem-' || i, \
             CASE WHEN i % {every_nth_eligible} = 0 THEN 'ACTIVE' ELSE 'PASSIVE' END, \
             datetime('now', '-' || (60 + i % 7200) || ' minutes') FROM n; ANALYZE;",
            last = total - 1
        ),
        Kind::Postgres => format!(
            "INSERT INTO checkout_sessions SELECT 'tok-' || i, 'mem-' || i, \
             CASE WHEN i % {every_nth_eligible} = 0 THEN 'ACTIVE' ELSE 'PASSIVE' END, \
             now() - (60 + i % 7200) * interval '1 minute' FROM generate_series(0, {last}) AS i; \
             ANALYZE checkout_sessions;",
            last = total - 1
        ),
        Kind::MySql => {
            let d = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL \
                     SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL \
                     SELECT 8 UNION ALL SELECT 9)";
            format!(
                "INSERT INTO checkout_sessions SELECT CONCAT('tok-', i), CONCAT('mem-', i), \
                 CASE WHEN i % {every_nth_eligible} = 0 THEN 'ACTIVE' ELSE 'PASSIVE' END, \
                 UTC_TIMESTAMP(6) - INTERVAL (60 + i % 7200) MINUTE FROM \
                 (SELECT a.d + 10 * b.d + 100 * c.d + 1000 * e.d + 10000 * f.d + 100000 * g.d AS i \
                  FROM {d} a, {d} b, {d} c, {d} e, {d} f, {d} g) n WHERE i < {total}; \
                 ANALYZE TABLE checkout_sessions"
            )
        }
    };
    db.exec(&sql).await;
}

/// The benchmark's config: the test credentials, and each benchmark's own sweep and API settings.
fn config_toml(db: &TestDb, api: &str, extra_sweep: &str, extra_iyzico: &str) -> String {
    format!(
        r#"[database]
url = "{url}"
max_connections = 16
{source}[sweep]
{extra_sweep}
[iyzico]
base_url = "{api}"
api_key = "{key}"
secret_key = "{secret}"
timeout = "10s"
{extra_iyzico}
[log]
level = "warn"
"#,
        url = db.url,
        source = common::source_toml(),
        key = common::API_KEY,
        secret = common::SECRET,
    )
}

/// One benchmark's setting: a seeded database, a simulator and a migrated config file.
struct Scenario {
    kind: Kind,
    rows: u64,
    every_nth_eligible: u64,
    latency_ms: u64,
    name: &'static str,
    sweep: &'static str,
    iyzico: &'static str,
}

impl Scenario {
    async fn prepare(self) -> (TestDb, Simulator, PathBuf) {
        let db = database(self.kind).await;
        seed(&db, self.rows, self.every_nth_eligible).await;
        let sim = common::simulator(SimulatorConfig {
            latency: Duration::from_millis(self.latency_ms),
            ..SimulatorConfig::default()
        })
        .await;
        let text = config_toml(&db, &sim.base_url(), self.sweep, self.iyzico);
        Config::from_toml_str(&text, std::iter::empty()).expect("bench config is valid");
        let cfg = db.dir.path().join(format!("{}.toml", self.name));
        std::fs::write(&cfg, text).unwrap();
        let (out, _) = common::run_binary(&cfg, &["migrate"], &[]);
        assert!(out.status.success(), "{out:?}");
        (db, sim, cfg)
    }
}

/// What one child process used.
struct ChildReport {
    /// Just before the spawn.
    spawned: Instant,
    /// Just after `wait4` reaped it.
    exited: Instant,
    /// User + system time.
    cpu: Duration,
    max_rss_kib: i64,
    stdout: String,
}

impl ChildReport {
    fn wall(&self) -> Duration {
        self.exited - self.spawned
    }
}

/// The sweeper binary with `--config config` and `args`.
fn sweeper_command(config: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn");
    cmd
}

/// Runs the sweeper binary to completion; see [`run_command`].
async fn run_child(config: &Path, args: &[&str]) -> ChildReport {
    run_command(sweeper_command(config, args)).await
}

/// Runs `cmd` to completion under the spawner (see [`spawner`]), on a blocking thread so that
/// the simulator keeps every runtime worker, and returns the child's own usage.
async fn run_command(cmd: std::process::Command) -> ChildReport {
    tokio::task::spawn_blocking(move || run_spawned(cmd))
        .await
        .unwrap()
}

/// CLOCK_MONOTONIC in nanoseconds: `Instant`'s clock on Linux, comparable across processes.
fn monotonic_ns() -> u64 {
    // SAFETY: an all-zero timespec is a valid value; clock_gettime fills it.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: t is a valid out-pointer and CLOCK_MONOTONIC always exists.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    assert_eq!(r, 0);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The `Instant` of a CLOCK_MONOTONIC reading taken in the past (by the spawner).
fn instant_of(ns: u64) -> Instant {
    let (now, now_ns) = (Instant::now(), monotonic_ns());
    now - Duration::from_nanos(now_ns.saturating_sub(ns))
}

/// Runs `cmd` through this binary's spawner mode and reads the spawner's last line.
fn run_spawned(cmd: std::process::Command) -> ChildReport {
    let mut spawner = std::process::Command::new(std::env::current_exe().unwrap());
    spawner
        .arg(SPAWNER_ARG)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => spawner.env(k, v),
            None => spawner.env_remove(k),
        };
    }
    let out = spawner.output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (stdout, last) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim_end()));
    let report: serde_json::Value = serde_json::from_str(
        last.strip_prefix(SPAWNER_ARG)
            .unwrap_or_else(|| panic!("no spawner report: {text}"))
            .trim(),
    )
    .unwrap();
    assert!(
        out.status.success() && report["status"] == 0,
        "{:?} failed ({}): {stdout}",
        cmd.get_program(),
        report["status"]
    );
    let (rss, floor) = (
        report["max_rss_kib"].as_i64().unwrap(),
        report["spawner_rss_kib"].as_i64().unwrap(),
    );
    // A child's peak RSS starts at its spawner's (see `spawner`): at or below it, it is not its own.
    assert!(
        rss > floor,
        "peak RSS {rss} KiB is the spawner's ({floor} KiB)"
    );
    ChildReport {
        spawned: instant_of(report["spawned_ns"].as_u64().unwrap()),
        exited: instant_of(report["exited_ns"].as_u64().unwrap()),
        cpu: Duration::from_micros(report["cpu_us"].as_u64().unwrap()),
        max_rss_kib: rss,
        stdout: format!("{stdout}\n"),
    }
}

/// Spawner mode (`SPAWNER_ARG program args…`): runs the program, copies its stdout, then prints
/// one line with its own usage from `wait4`, its spawn and reap times (CLOCK_MONOTONIC) and its
/// exit status.
///
/// Why a process in between: on Linux a child's peak RSS (`ru_maxrss`) starts at the peak RSS
/// of the process it was spawned from (exec keeps the larger of the two), and this benchmark's
/// own process (simulator, pools, arrival lists) is bigger than the ideal client and sometimes
/// than the sweeper. The spawner is this binary before any runtime starts: a few MiB, printed
/// as the floor below which a reading would not be the child's.
///
/// The child's stderr is a pipe copied through, never a terminal: the sweeper behaves as under
/// systemd or in a container whether or not the benchmark runs in one (on a terminal `once`
/// draws a progress bar, which changes what start-up and exit measure).
// wait4 below reaps the child; clippy cannot see that.
#[allow(clippy::zombie_processes)]
fn spawner(args: &[String]) {
    let floor = own_peak_rss_kib();
    let spawned_ns = monotonic_ns();
    let child = std::process::Command::new(&args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let (mut stdout, mut stderr) = (child.stdout.unwrap(), child.stderr.unwrap());
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut s).unwrap();
        s
    });
    let passer = std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::stderr()));
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, status and usage are valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let exited_ns = monotonic_ns();
    assert_eq!(r, pid);
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let out = reader.join().unwrap();
    passer.join().unwrap().unwrap();
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out).unwrap();
    if !out.is_empty() && !out.ends_with(b"\n") {
        writeln!(stdout).unwrap();
    }
    writeln!(
        stdout,
        "{SPAWNER_ARG} {}",
        serde_json::json!({
            "status": code,
            "spawned_ns": spawned_ns,
            "exited_ns": exited_ns,
            "cpu_us": micros(usage.ru_utime) + micros(usage.ru_stime),
            "max_rss_kib": usage.ru_maxrss,
            "spawner_rss_kib": floor,
        })
    )
    .unwrap();
}

/// This process's peak resident memory (`VmHWM`), in KiB: what a child's peak RSS starts from.
/// Not `getrusage`'s, which starts from this process's own spawner's.
fn own_peak_rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// The sweep's own duration from the summary line ("... in 6.4s ...").
fn sweep_secs(stdout: &str) -> f64 {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_suffix('s').and_then(|n| n.parse::<f64>().ok()))
        .expect("summary line")
}

/// The ideal client: the real client's HTTP stack and request ([`client::Transport`]), and
/// nothing else.
struct IdealClient {
    transport: client::Transport,
    /// The next session to send.
    next: AtomicU64,
}

impl IdealClient {
    /// Built as `Client::new` builds its transport, from the same config.
    fn new(config: &Config) -> Self {
        Self {
            transport: client::Transport::new(&config.iyzico, config.sweep.concurrency.get())
                .unwrap(),
            next: AtomicU64::new(0),
        }
    }

    /// Sends sessions until `sessions` have been taken; stops at the first answer that is not
    /// a success, so a run that measured errors cannot pass.
    async fn work(&self, sessions: u64) -> Result<(), String> {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= sessions {
                return Ok(());
            }
            self.invalidate(&format!("ideal-{i}"), &format!("member-{i}"))
                .await?;
        }
    }

    /// One signed call, as the client makes it, classified by the client's own rules.
    async fn invalidate(&self, token: &str, member: &str) -> Result<(), String> {
        let conversation_id = uuid::Uuid::new_v4().to_string();
        let response = self
            .transport
            .post(&conversation_id, token, member)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        client::classify(status, None, &body, &conversation_id).map_err(|e| e.to_string())
    }
}

/// Ideal-client mode: `sessions` signed invalidate calls for `ideal-0…` at the config's
/// `sweep.concurrency`, with its API settings; prints one JSON line with its own time, or
/// exits 1 at the first failed call.
async fn ideal_client(config: &Path, sessions: u64) {
    let started = Instant::now();
    let config = Config::load(config, std::iter::empty()).expect("bench config");
    let concurrency = config.sweep.concurrency.get();
    let client = Arc::new(IdealClient::new(&config));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.work(sessions).await })
        })
        .collect();
    for w in workers {
        if let Err(e) = w.await.unwrap() {
            eprintln!("ideal client: a call failed: {e}");
            std::process::exit(1);
        }
    }
    println!(
        "{{\"sessions\":{sessions},\"concurrency\":{concurrency},\"wall_s\":{:.6}}}",
        started.elapsed().as_secs_f64()
    );
}

/// One process's requests at the simulator and what the process used.
struct Phase {
    sessions: u64,
    child: ChildReport,
    /// Arrival times of this process's requests, in order.
    arrivals: Vec<Instant>,
    /// The simulator's mean service time over them.
    served: Duration,
}

impl Phase {
    /// Runs `cmd` to its end and takes its requests from the simulator's counters.
    async fn measure(sim: &Simulator, sessions: u64, cmd: std::process::Command) -> Self {
        let (before, micros_before) = (
            sim.stats.arrivals().len(),
            sim.stats.service_micros.load(Ordering::SeqCst),
        );
        let child = run_command(cmd).await;
        let arrivals = sim.stats.arrivals().split_off(before);
        assert!(
            arrivals.len() as u64 >= sessions,
            "{} requests for {sessions} sessions",
            arrivals.len()
        );
        let micros = sim.stats.service_micros.load(Ordering::SeqCst) - micros_before;
        Self {
            sessions,
            served: Duration::from_micros(micros / arrivals.len() as u64),
            child,
            arrivals,
        }
    }

    /// Sessions ÷ process wall time.
    fn whole_rate(&self) -> f64 {
        self.sessions as f64 / self.child.wall().as_secs_f64()
    }

    /// Requests between the 10th and 90th percentile of arrival time, per second.
    fn steady_rate(&self) -> f64 {
        let n = self.arrivals.len();
        let (lo, hi) = (n / 10, n * 9 / 10);
        (hi - lo) as f64 / (self.arrivals[hi] - self.arrivals[lo]).as_secs_f64()
    }

    fn served_ms(&self) -> f64 {
        self.served.as_secs_f64() * 1e3
    }

    fn cpu_us_per_session(&self) -> f64 {
        self.child.cpu.as_secs_f64() * 1e6 / self.sessions as f64
    }

    /// Spawn → first request at the simulator.
    fn startup_ms(&self) -> f64 {
        (self.arrivals[0] - self.child.spawned).as_secs_f64() * 1e3
    }

    /// Last response (last arrival + mean service time) → reaped; negative if the estimate of
    /// the last response overshoots.
    fn exit_ms(&self) -> f64 {
        let last = *self.arrivals.last().unwrap() + self.served;
        match self.child.exited.checked_duration_since(last) {
            Some(d) => d.as_secs_f64() * 1e3,
            None => -(last - self.child.exited).as_secs_f64() * 1e3,
        }
    }

    fn rss_mib(&self) -> f64 {
        self.child.max_rss_kib as f64 / 1024.0
    }

    /// A one-line account of the phase.
    fn describe(&self) -> String {
        format!(
            "{:.0}/s whole, {:.0}/s steady, served {:.2} ms, {:.0} µs CPU/session, start-up {:.1} ms, exit {:.1} ms, {:.1} MiB peak RSS, wall {:.2} s",
            self.whole_rate(),
            self.steady_rate(),
            self.served_ms(),
            self.cpu_us_per_session(),
            self.startup_ms(),
            self.exit_ms(),
            self.rss_mib(),
            self.child.wall().as_secs_f64()
        )
    }
}

/// One run: the ideal client and the sweeper, against one simulator.
struct Comparison {
    ideal: Phase,
    sweeper: Phase,
}

impl Comparison {
    fn whole_ratio(&self) -> f64 {
        self.sweeper.whole_rate() / self.ideal.whole_rate()
    }

    fn steady_ratio(&self) -> f64 {
        self.sweeper.steady_rate() / self.ideal.steady_rate()
    }
}

/// A fresh database and simulator; the ideal client, then `once`, against them.
async fn compare_once(kind: Kind) -> Comparison {
    const N: u64 = THROUGHPUT_SESSIONS;
    let (db, sim, cfg) = Scenario {
        kind,
        rows: N,
        every_nth_eligible: 1,
        latency_ms: THROUGHPUT_LATENCY_MS,
        name: "throughput",
        sweep: "batch_size = 500\nconcurrency = 64",
        iyzico: "rate_per_second = 1000000\nburst = 100000",
    }
    .prepare()
    .await;
    let mut ideal = std::process::Command::new(std::env::current_exe().unwrap());
    ideal.arg(IDEAL_CLIENT_ARG).arg(&cfg).arg(N.to_string());
    let ideal = Phase::measure(&sim, N, ideal).await;
    let line: serde_json::Value =
        serde_json::from_str(ideal.child.stdout.trim()).expect("the ideal client's JSON line");
    assert_eq!(line["sessions"], N);
    assert_eq!(line["concurrency"], THROUGHPUT_CONCURRENCY);
    let sweeper = Phase::measure(&sim, N, sweeper_command(&cfg, &["once"])).await;
    let settled = db
        .scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE state = 'invalidated'")
        .await;
    assert_eq!(settled as u64, N);
    Comparison { ideal, sweeper }
}

/// `min–max` of `values` with `decimals`.
fn range(values: impl Iterator<Item = f64>, decimals: usize) -> String {
    let v: Vec<f64> = values.collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = (format!("{lo:.decimals$}"), format!("{hi:.decimals$}"));
    if lo == hi { lo } else { format!("{lo}–{hi}") }
}

/// The sweeper's CPU target per session for a backend, in µs, where the issue sets one.
fn cpu_target_us(kind: Kind) -> Option<f64> {
    match kind {
        Kind::Sqlite => Some(100.0),
        Kind::Postgres => Some(60.0),
        Kind::MySql => None,
    }
}

/// `runs` comparisons per backend, a line per run, then the table.
async fn throughput(kinds: &[Kind], runs: usize) {
    let nominal = THROUGHPUT_CONCURRENCY as f64 / (THROUGHPUT_LATENCY_MS as f64 / 1e3);
    println!(
        "throughput: {THROUGHPUT_SESSIONS} sessions, {THROUGHPUT_CONCURRENCY} in flight, simulator {THROUGHPUT_LATENCY_MS} ms \
         (nominal bound {nominal:.0}/s), {runs} run(s) per backend; loaded machine: compare ratios, not absolute rates"
    );
    let mut rows = Vec::new();
    for &kind in kinds {
        let mut results = Vec::new();
        for run in 1..=runs {
            let c = compare_once(kind).await;
            println!("  {} run {run}/{runs}:", label(kind));
            println!("    ideal client: {}", c.ideal.describe());
            println!(
                "    sweeper:      {}; sweep {:.2} s by its summary",
                c.sweeper.describe(),
                sweep_secs(&c.sweeper.child.stdout)
            );
            println!(
                "    ratios:       whole-run {:.3}, steady {:.3}",
                c.whole_ratio(),
                c.steady_ratio()
            );
            results.push(c);
        }
        let met = |ok: &dyn Fn(&Comparison) -> bool| {
            format!("{}/{runs}", results.iter().filter(|c| ok(c)).count())
        };
        let cpu_target = cpu_target_us(kind);
        println!(
            "  {} targets met: whole-run ≥ 0.95 {}, steady ≥ 0.98 {}, CPU {} {}, start-up ≤ 50 ms {}, exit ≤ 20 ms {}",
            label(kind),
            met(&|c| c.whole_ratio() >= 0.95),
            met(&|c| c.steady_ratio() >= 0.98),
            cpu_target.map_or("(no target)".into(), |t| format!("≤ {t:.0} µs")),
            cpu_target.map_or(
                "-".into(),
                |t| met(&|c| c.sweeper.cpu_us_per_session() <= t)
            ),
            met(&|c| c.sweeper.startup_ms() <= 50.0),
            met(&|c| c.sweeper.exit_ms() <= 20.0),
        );
        let r = &results;
        rows.push(format!(
            "| {} | {} / {} | {} | {} | {} / {} | {} | {} | {} | {} | {} / {} |",
            label(kind),
            range(r.iter().map(|c| c.ideal.whole_rate()), 0),
            range(r.iter().map(|c| c.ideal.steady_rate()), 0),
            range(r.iter().map(Comparison::whole_ratio), 3),
            range(r.iter().map(Comparison::steady_ratio), 3),
            range(r.iter().map(|c| c.sweeper.served_ms()), 2),
            range(r.iter().map(|c| c.ideal.served_ms()), 2),
            range(r.iter().map(|c| c.sweeper.cpu_us_per_session()), 0),
            range(r.iter().map(|c| c.ideal.cpu_us_per_session()), 0),
            range(r.iter().map(|c| c.sweeper.startup_ms()), 0),
            range(r.iter().map(|c| c.sweeper.exit_ms()), 0),
            range(r.iter().map(|c| c.sweeper.rss_mib()), 1),
            range(r.iter().map(|c| c.ideal.rss_mib()), 1),
        ));
    }
    println!();
    println!(
        "| backend | ideal client, sessions/s (whole run / steady) | sweeper ÷ ideal, whole run (≥ 0.95) | sweeper ÷ ideal, steady (≥ 0.98) \
         | served latency, ms (sweeper / ideal) | CPU µs/session, sweeper (≤ 60 PostgreSQL, ≤ 100 SQLite) \
         | CPU µs/session, ideal | start-up, ms (≤ 50) | exit, ms (≤ 20) | peak RSS, MiB (sweeper / ideal) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!();
}

async fn rate_precision() {
    const N: u64 = 4000;
    let (_db, sim, cfg) = Scenario {
        kind: Kind::Sqlite,
        rows: N,
        every_nth_eligible: 1,
        latency_ms: 2,
        name: "rate",
        sweep: "batch_size = 500\nconcurrency = 16",
        iyzico: "rate_per_second = 200\nburst = 10",
    }
    .prepare()
    .await;
    run_child(&cfg, &["once"]).await;
    let arrivals = sim.stats.arrivals();
    assert_eq!(arrivals.len() as u64, N);
    let most = sim.stats.max_in_window(Duration::from_secs(1));
    // Sustained: past the initial burst, arrivals per second over the whole run.
    let span = arrivals[arrivals.len() - 1]
        .duration_since(arrivals[10])
        .as_secs_f64();
    let sustained = (arrivals.len() - 11) as f64 / span;
    println!(
        "| rate limit | SQLite | rate 200/s, burst 10, {N} sessions | most in any 1 s window: {most} (limit {}) | sustained {sustained:.1}/s ({:.3} of 200) | |",
        200 + 10,
        sustained / 200.0
    );
}

async fn scale(kind: Kind) {
    for total in [100_000u64, 1_000_000] {
        let (_db, _sim, cfg) = Scenario {
            kind,
            rows: total,
            every_nth_eligible: 100,
            latency_ms: 0,
            name: "scale",
            sweep: "batch_size = 500\nconcurrency = 64",
            iyzico: "rate_per_second = 1000000\nburst = 100000",
        }
        .prepare()
        .await;
        let config = Config::load(&cfg, std::iter::empty()).unwrap();
        let store = store::open(&config).await.unwrap();
        let worker = session_sweeper::store::WorkerInfo {
            id: "bench".into(),
            hostname: "bench".into(),
            pid: 1,
        };
        store.heartbeat(&worker).await.unwrap();
        let mut times = Vec::new();
        for _ in 0..21 {
            let now = Utc::now();
            let p = ClaimParams {
                worker: "bench",
                idle_before: now - Duration::from_secs(1800),
                stale_after: Duration::from_secs(15),
                lease: Duration::from_secs(300),
                limit: 500,
            };
            let t = Instant::now();
            let got = store.claim(p).await.unwrap();
            times.push(t.elapsed());
            assert_eq!(got.len(), 500);
            store.release_all("bench").await.unwrap();
        }
        times.remove(0); // the first claim prepares the statement
        times.sort();
        store.forget_worker("bench").await.unwrap();
        store.close().await;
        let r = run_child(&cfg, &["once", "--max", "5000"]).await;
        println!(
            "| scale | {} | {total} rows, 1% eligible | claim of 500: median {:.1} ms, p95 {:.1} ms | `once --max 5000`: {:.1} MiB peak RSS | |",
            label(kind),
            times[times.len() / 2].as_secs_f64() * 1000.0,
            times[times.len() * 95 / 100].as_secs_f64() * 1000.0,
            r.max_rss_kib as f64 / 1024.0
        );
    }
    // A 200,000-session backlog: memory must not follow it.
    let (_db, _sim, cfg) = Scenario {
        kind,
        rows: 1_000_000,
        every_nth_eligible: 5,
        latency_ms: 0,
        name: "backlog",
        sweep: "batch_size = 500\nconcurrency = 64",
        iyzico: "rate_per_second = 1000000\nburst = 100000",
    }
    .prepare()
    .await;
    let r = run_child(&cfg, &["once", "--max", "20000"]).await;
    println!(
        "| scale | {} | 1,000,000 rows, 200,000 eligible | `once --max 20000`: {:.1} MiB peak RSS | {:.0} sessions/s (0 ms latency) | |",
        label(kind),
        r.max_rss_kib as f64 / 1024.0,
        20000.0 / sweep_secs(&r.stdout)
    );
}

async fn replicas(kind: Kind) {
    const N: u64 = 6000;
    for n in [1usize, 2, 4] {
        let (_db, sim, cfg) = Scenario {
            kind,
            rows: N,
            every_nth_eligible: 1,
            latency_ms: 20,
            name: "replicas",
            sweep: "batch_size = 200\nconcurrency = 32\nheartbeat = \"1s\"",
            iyzico: "rate_per_second = 1000\nburst = 50",
        }
        .prepare()
        .await;
        let start = Instant::now();
        let handles: Vec<_> = (0..n)
            .map(|_| tokio::spawn(run_command(sweeper_command(&cfg, &["once"]))))
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let wall = start.elapsed().as_secs_f64();
        let calls: HashMap<String, u32> = sim.stats.calls_per_token();
        let doubles = calls.values().filter(|&&c| c > 1).count();
        assert_eq!(calls.len() as u64, N);
        println!(
            "| replicas | {} | {n} process(es), fleet budget 1000/s, {N} sessions | {:.0} sessions/s aggregate | most in any 1 s window: {} | {doubles} double sends |",
            label(kind),
            N as f64 / wall,
            sim.stats.max_in_window(Duration::from_secs(1))
        );
    }
}

async fn recovery() {
    const N: u64 = 3000;
    let (db, sim, cfg) = Scenario {
        kind: Kind::Postgres,
        rows: N,
        every_nth_eligible: 1,
        latency_ms: 100,
        name: "recovery",
        sweep: "interval = \"1s\"\nbatch_size = 100\nconcurrency = 16",
        iyzico: "rate_per_second = 1000000\nburst = 100000",
    }
    .prepare()
    .await;
    let Pool::Pg(pool) = db.pool.clone() else {
        unreachable!("recovery runs on PostgreSQL")
    };
    let spawn = || sweeper_command(&cfg, &["run"]).spawn().unwrap();
    let mut victim = spawn();
    let mut survivor = spawn();
    while sim.stats.invalidated.load(Ordering::SeqCst) < 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim_id: String =
        sqlx::query_scalar("SELECT worker_id FROM sweeper_workers WHERE pid = $1")
            .bind(victim.id() as i32)
            .fetch_one(&pool)
            .await
            .unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &victim.id().to_string()])
        .status()
        .unwrap();
    let killed = Instant::now();
    victim.wait().unwrap();
    let held: Vec<String> =
        sqlx::query_scalar("SELECT session_token FROM sweeper_sessions WHERE lease_owner = $1")
            .bind(&victim_id)
            .fetch_all(&pool)
            .await
            .unwrap();
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sweeper_sessions WHERE session_token = ANY($1) \
             AND state NOT IN ('invalidated', 'already_invalidated')",
        )
        .bind(&held)
        .fetch_one(&pool)
        .await
        .unwrap();
        if open == 0 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "{open} of the victim's sessions still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = killed.elapsed();
    let twice = sim
        .stats
        .calls_per_token()
        .values()
        .filter(|&&c| c > 1)
        .count();
    println!(
        "| recovery | PostgreSQL | `kill -9` one of two `run` replicas, lease 5m, heartbeat 5s | its {} leased sessions settled by the survivor {:.1} s after the kill | {twice} sessions reached the API twice | |",
        held.len(),
        recovered.as_secs_f64()
    );
    std::process::Command::new("kill")
        .args(["-TERM", &survivor.id().to_string()])
        .status()
        .unwrap();
    survivor.wait().unwrap();
}

/// The benchmarks named on the command line, and the runs per throughput comparison.
struct Args {
    selected: Vec<String>,
    runs: usize,
}

impl Args {
    /// Selectors are bare words; `--runs N` (or `--runs=N`) sets the runs; other flags (cargo's
    /// `--bench`) are ignored.
    fn parse(args: &[String]) -> Self {
        let mut runs = std::env::var("SWEEPER_BENCH_RUNS")
            .ok()
            .map(|v| v.parse().expect("SWEEPER_BENCH_RUNS is a number"));
        let mut selected = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--runs" {
                runs = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--runs takes a number"),
                );
            } else if let Some(v) = a.strip_prefix("--runs=") {
                runs = Some(v.parse().expect("--runs takes a number"));
            } else if !a.starts_with("--") {
                selected.push(a.clone());
            }
        }
        let runs = runs.unwrap_or(3);
        assert!(runs > 0, "--runs must be at least 1");
        Self { selected, runs }
    }

    fn wants(&self, name: &str) -> bool {
        self.selected.is_empty() || self.selected.iter().any(|w| w == name || w == "all")
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    match raw.first().map(String::as_str) {
        // Before any runtime: the spawner's own memory is the floor of its child's peak RSS.
        Some(SPAWNER_ARG) => spawner(&raw[1..]),
        Some(IDEAL_CLIENT_ARG) => {
            let sessions = raw[2].parse().expect("sessions");
            ideal_client_main(Path::new(&raw[1]), sessions)
        }
        _ => benchmarks(Args::parse(&raw)),
    }
}

/// The ideal client on the runtime the sweeper's `main` has: one thread (see `src/main.rs`).
#[tokio::main(flavor = "current_thread")]
async fn ideal_client_main(config: &Path, sessions: u64) {
    ideal_client(config, sessions).await;
}

#[tokio::main]
async fn benchmarks(args: Args) {
    let mysql_set = std::env::var_os(common::MYSQL_ENV).is_some();
    // MariaDB/MySQL: `-- mysql`, or `throughput`/`all` with TEST_MYSQL_URL set.
    let mysql = args.selected.iter().any(|w| w == "mysql");
    if args.wants("throughput") || mysql {
        let mut kinds = Vec::new();
        if args.wants("throughput") {
            kinds.extend([Kind::Sqlite, Kind::Postgres]);
        }
        if mysql || mysql_set {
            kinds.push(Kind::MySql);
        }
        throughput(&kinds, args.runs).await;
    }
    let others = ["rate", "scale", "replicas", "recovery"];
    if others.iter().any(|w| args.wants(w)) || mysql {
        println!("| benchmark | backend | setup | result | | |");
        println!("|---|---|---|---|---|---|");
    }
    if args.wants("rate") {
        rate_precision().await;
    }
    if args.wants("scale") {
        scale(Kind::Postgres).await;
        scale(Kind::Sqlite).await;
    }
    if args.wants("replicas") {
        replicas(Kind::Postgres).await;
    }
    if args.wants("recovery") {
        recovery().await;
    }
    if mysql || (args.wants("all") && mysql_set) {
        scale(Kind::MySql).await;
        replicas(Kind::MySql).await;
    }
}
