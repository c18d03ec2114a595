//! Benchmarks: throughput, rate-limit precision, scale, replicas and recovery time.
//!
//!     TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!         cargo bench --bench sweeper -- [throughput|rate|scale|replicas|recovery|all]
//!
//! The sweeper always runs as its own process (the release binary), so its CPU time and peak RSS
//! are its own (`wait4`); the simulator and the data seeding run in this process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use session_sweeper::config::Config;
use session_sweeper::iyzico::simulator::{Simulator, SimulatorConfig};
use session_sweeper::store::{self, ClaimParams};
use sqlx::Row;

const API_KEY: &str = "bench-key";
const SECRET: &str = "bench-secret";
const BIN: &str = env!("CARGO_BIN_EXE_session-sweeper");

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::MySql => "MariaDB",
        }
    }
}

/// A fresh database with the source table; dropped (Postgres) or deleted (SQLite) at the end.
struct Db {
    backend: Backend,
    url: String,
    dir: PathBuf,
    pg_name: Option<String>,
}

impl Db {
    async fn new(backend: Backend) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sweeper-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let (url, pg_name) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}?mode=rwc", dir.join("bench.db").display()),
                None,
            ),
            server => {
                let admin = admin_url(server);
                let name = format!("sweeper_bench_{}", uuid::Uuid::new_v4().simple());
                admin_exec(&admin, &format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                let mut u: url::Url = admin.parse().unwrap();
                u.set_path(&name);
                (u.to_string(), Some(name))
            }
        };
        let db = Db {
            backend,
            url,
            dir,
            pg_name,
        };
        db.exec(match backend {
            Backend::Sqlite => {
                "CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT NOT NULL, \
                 status TEXT NOT NULL, last_activity_at TEXT NOT NULL); \
                 CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at);"
            }
            Backend::Postgres => {
                "CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT NOT NULL, \
                 status TEXT NOT NULL, last_activity_at TIMESTAMPTZ NOT NULL); \
                 CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at);"
            }
            Backend::MySql => {
                "CREATE TABLE checkout_sessions (session_token VARCHAR(64) PRIMARY KEY, \
                 member_identifier VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, \
                 last_activity_at DATETIME(6) NOT NULL); \
                 CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at);"
            }
        })
        .await;
        db
    }

    async fn exec(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
                sqlx::raw_sql(sql).execute(&pool).await.unwrap();
                pool.close().await;
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
                sqlx::raw_sql(sql).execute(&pool).await.unwrap();
                pool.close().await;
            }
            Backend::MySql => {
                let pool = sqlx::MySqlPool::connect(&self.url).await.unwrap();
                for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    sqlx::raw_sql(statement).execute(&pool).await.unwrap();
                }
                pool.close().await;
            }
        }
    }

    async fn scalar(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
                let v = sqlx::query(sql)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    .get::<i64, _>(0);
                pool.close().await;
                v
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
                let v = sqlx::query(sql)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    .get::<i64, _>(0);
                pool.close().await;
                v
            }
            Backend::MySql => {
                let pool = sqlx::MySqlPool::connect(&self.url).await.unwrap();
                let v = sqlx::query(&format!("SELECT CAST(({sql}) AS SIGNED)"))
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    .get::<i64, _>(0);
                pool.close().await;
                v
            }
        }
    }

    /// `total` rows of which one in `1/eligible_share` is active and idle; the rest passive.
    async fn seed(&self, total: u64, every_nth_eligible: u64) {
        let sql = match self.backend {
            Backend::Sqlite => format!(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {last}) \
                 INSERT INTO checkout_sessions SELECT 'tok-' || i, 'mem-' || i, \
                 CASE WHEN i % {every_nth_eligible} = 0 THEN 'ACTIVE' ELSE 'PASSIVE' END, \
                 datetime('now', '-' || (60 + i % 7200) || ' minutes') FROM n; ANALYZE;",
                last = total - 1
            ),
            Backend::Postgres => format!(
                "INSERT INTO checkout_sessions SELECT 'tok-' || i, 'mem-' || i, \
                 CASE WHEN i % {every_nth_eligible} = 0 THEN 'ACTIVE' ELSE 'PASSIVE' END, \
                 now() - (60 + i % 7200) * interval '1 minute' FROM generate_series(0, {last}) AS i; \
                 ANALYZE checkout_sessions;",
                last = total - 1
            ),
            Backend::MySql => {
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
        self.exec(&sql).await;
    }

    fn config_toml(&self, api: &str, extra_sweep: &str, extra_iyzico: &str) -> String {
        format!(
            r#"[database]
url = "{url}"
max_connections = 16
[source]
table = "checkout_sessions"
token_column = "session_token"
member_column = "member_identifier"
status_column = "status"
last_activity_column = "last_activity_at"
active_value = "ACTIVE"
passive_value = "PASSIVE"
idle_after = "30m"
[sweep]
{extra_sweep}
[iyzico]
base_url = "{api}"
api_key = "{API_KEY}"
secret_key = "{SECRET}"
timeout = "10s"
{extra_iyzico}
[log]
level = "warn"
"#,
            url = self.url
        )
    }

    fn write_config(&self, name: &str, text: &str) -> PathBuf {
        Config::from_toml_str(text, std::iter::empty()).expect("bench config is valid");
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    async fn migrate(&self, config: &Path) {
        let out = std::process::Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("migrate")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    async fn drop(self) {
        if let Some(name) = &self.pg_name {
            let force = if self.backend == Backend::Postgres {
                " WITH (FORCE)"
            } else {
                ""
            };
            // Best effort: a database left behind is only disk.
            let _ = admin_exec(
                &admin_url(self.backend),
                &format!("DROP DATABASE IF EXISTS {name}{force}"),
            )
            .await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server a benchmark database is created on, from the test suite's variables.
fn admin_url(backend: Backend) -> String {
    let var = match backend {
        Backend::MySql => "TEST_MYSQL_URL",
        _ => "TEST_POSTGRES_URL",
    };
    std::env::var(var).unwrap_or_else(|_| panic!("set {var} for {} benchmarks", backend.name()))
}

/// One statement on the admin connection of a server (PostgreSQL or MySQL).
async fn admin_exec(admin: &str, sql: &str) -> sqlx::Result<()> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(admin).await?;
    let done = sqlx::query(sql).execute(&pool).await.map(drop);
    pool.close().await;
    done
}

async fn simulator(latency_ms: u64) -> Simulator {
    Simulator::start(
        "127.0.0.1:0".parse().unwrap(),
        SimulatorConfig {
            api_key: API_KEY.into(),
            secret_key: SECRET.into(),
            latency: Duration::from_millis(latency_ms),
            ..SimulatorConfig::default()
        },
    )
    .await
    .unwrap()
}

/// One benchmark's setting: a seeded database, a simulator and a migrated config file.
struct Scenario {
    backend: Backend,
    rows: u64,
    every_nth_eligible: u64,
    latency_ms: u64,
    name: &'static str,
    sweep: &'static str,
    iyzico: &'static str,
}

impl Scenario {
    async fn prepare(self) -> (Db, Simulator, PathBuf) {
        let db = Db::new(self.backend).await;
        db.seed(self.rows, self.every_nth_eligible).await;
        let sim = simulator(self.latency_ms).await;
        let cfg = db.write_config(
            &format!("{}.toml", self.name),
            &db.config_toml(&sim.base_url(), self.sweep, self.iyzico),
        );
        db.migrate(&cfg).await;
        (db, sim, cfg)
    }
}

/// What one sweeper process used.
struct ChildReport {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: i64,
    stdout: String,
}

/// Runs the sweeper binary to completion and reads its own rusage with `wait4`.
// wait4 below reaps the child; clippy cannot see that.
#[allow(clippy::zombie_processes)]
fn run_child(config: &Path, args: &[&str]) -> ChildReport {
    let start = Instant::now();
    let child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, status and usage are valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    let wall = start.elapsed();
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    let stdout = reader.join().unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "sweeper failed: {stdout}"
    );
    ChildReport {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
        stdout,
    }
}

/// The sweep's own duration from the summary line ("... in 6.4s ...").
fn sweep_secs(stdout: &str) -> f64 {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_suffix('s').and_then(|n| n.parse::<f64>().ok()))
        .expect("summary line")
}

async fn throughput(backend: Backend) {
    const N: u64 = 20_000;
    let (db, sim, cfg) = Scenario {
        backend,
        rows: N,
        every_nth_eligible: 1,
        latency_ms: 20,
        name: "throughput",
        sweep: "batch_size = 500\nconcurrency = 64",
        iyzico: "rate_per_second = 1000000\nburst = 100000",
    }
    .prepare()
    .await;
    let r = run_child(&cfg, &["once"]);
    let secs = sweep_secs(&r.stdout);
    let rate = N as f64 / secs;
    let bound = 64.0 / 0.020;
    let settled = db
        .scalar("SELECT COUNT(*) FROM sweeper_sessions WHERE state = 'invalidated'")
        .await;
    assert_eq!(settled as u64, N);
    // tokio's timer rounds a 20 ms sleep up to the next millisecond tick and beyond: the bound
    // with the latency the simulator really served is the fair one to compare with too.
    let served = sim.stats.mean_service_time().as_secs_f64();
    println!(
        "| throughput | {} | {N} sessions, 20 ms latency, concurrency 64 | {rate:.0} sessions/s = {:.3} of {bound:.0} (nominal); served latency {:.2} ms, so {:.3} of {:.0} (served) | sweep {secs:.2} s, process {:.2} s; {:.0} µs CPU/session | {:.1} MiB peak RSS |",
        backend.name(),
        rate / bound,
        served * 1000.0,
        rate / (64.0 / served),
        64.0 / served,
        r.wall.as_secs_f64(),
        r.cpu.as_micros() as f64 / N as f64,
        r.max_rss_kib as f64 / 1024.0
    );
    db.drop().await;
}

async fn rate_precision() {
    const N: u64 = 4000;
    let (db, sim, cfg) = Scenario {
        backend: Backend::Sqlite,
        rows: N,
        every_nth_eligible: 1,
        latency_ms: 2,
        name: "rate",
        sweep: "batch_size = 500\nconcurrency = 16",
        iyzico: "rate_per_second = 200\nburst = 10",
    }
    .prepare()
    .await;
    run_child(&cfg, &["once"]);
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
    db.drop().await;
}

async fn scale(backend: Backend) {
    for total in [100_000u64, 1_000_000] {
        let (db, _sim, cfg) = Scenario {
            backend,
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
        let r = run_child(&cfg, &["once", "--max", "5000"]);
        println!(
            "| scale | {} | {total} rows, 1% eligible | claim of 500: median {:.1} ms, p95 {:.1} ms | `once --max 5000`: {:.1} MiB peak RSS | |",
            backend.name(),
            times[times.len() / 2].as_secs_f64() * 1000.0,
            times[times.len() * 95 / 100].as_secs_f64() * 1000.0,
            r.max_rss_kib as f64 / 1024.0
        );
        db.drop().await;
    }
    // A 200,000-session backlog: memory must not follow it.
    let (db, _sim, cfg) = Scenario {
        backend,
        rows: 1_000_000,
        every_nth_eligible: 5,
        latency_ms: 0,
        name: "backlog",
        sweep: "batch_size = 500\nconcurrency = 64",
        iyzico: "rate_per_second = 1000000\nburst = 100000",
    }
    .prepare()
    .await;
    let r = run_child(&cfg, &["once", "--max", "20000"]);
    println!(
        "| scale | {} | 1,000,000 rows, 200,000 eligible | `once --max 20000`: {:.1} MiB peak RSS | {:.0} sessions/s (0 ms latency) | |",
        backend.name(),
        r.max_rss_kib as f64 / 1024.0,
        20000.0 / sweep_secs(&r.stdout)
    );
    db.drop().await;
}

async fn replicas(backend: Backend) {
    const N: u64 = 6000;
    for n in [1usize, 2, 4] {
        let (db, sim, cfg) = Scenario {
            backend,
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
            .map(|_| {
                let cfg = cfg.clone();
                std::thread::spawn(move || run_child(&cfg, &["once"]))
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let wall = start.elapsed().as_secs_f64();
        let calls: HashMap<String, u32> = sim.stats.calls_per_token();
        let doubles = calls.values().filter(|&&c| c > 1).count();
        assert_eq!(calls.len() as u64, N);
        println!(
            "| replicas | {} | {n} process(es), fleet budget 1000/s, {N} sessions | {:.0} sessions/s aggregate | most in any 1 s window: {} | {doubles} double sends |",
            backend.name(),
            N as f64 / wall,
            sim.stats.max_in_window(Duration::from_secs(1))
        );
        db.drop().await;
    }
}

async fn recovery() {
    const N: u64 = 3000;
    let (db, sim, cfg) = Scenario {
        backend: Backend::Postgres,
        rows: N,
        every_nth_eligible: 1,
        latency_ms: 100,
        name: "recovery",
        sweep: "interval = \"1s\"\nbatch_size = 100\nconcurrency = 16",
        iyzico: "rate_per_second = 1000000\nburst = 100000",
    }
    .prepare()
    .await;
    let spawn = || {
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let mut victim = spawn();
    let mut survivor = spawn();
    while sim.stats.invalidated.load(Ordering::SeqCst) < 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
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
    pool.close().await;
    db.drop().await;
}

#[tokio::main]
async fn main() {
    let what: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = what.is_empty() || what.iter().any(|w| w == "all");
    let wants = |name: &str| all || what.iter().any(|w| w == name);
    println!("| benchmark | backend | setup | result | | |");
    println!("|---|---|---|---|---|---|");
    if wants("throughput") {
        throughput(Backend::Sqlite).await;
        throughput(Backend::Postgres).await;
    }
    if wants("rate") {
        rate_precision().await;
    }
    if wants("scale") {
        scale(Backend::Postgres).await;
        scale(Backend::Sqlite).await;
    }
    if wants("replicas") {
        replicas(Backend::Postgres).await;
    }
    if wants("recovery") {
        recovery().await;
    }
    // MariaDB/MySQL: `-- mysql` (or `all` with TEST_MYSQL_URL set).
    if what.iter().any(|w| w == "mysql") || (all && std::env::var_os("TEST_MYSQL_URL").is_some()) {
        throughput(Backend::MySql).await;
        scale(Backend::MySql).await;
        replicas(Backend::MySql).await;
    }
}
