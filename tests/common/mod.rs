//! Shared by every integration test: a fresh database (a SQLite file, or a new PostgreSQL or
//! MySQL database on the server named by `TEST_POSTGRES_URL` or `TEST_MYSQL_URL`, dropped with
//! the test), the simulator on port 0, a config pointing at both, and quiet tracing (set
//! `TEST_LOG=1` to see it).
#![allow(dead_code)]

use std::sync::{Arc, Once};
use std::time::Duration;

use chrono::{DateTime, Utc};
use session_sweeper::config::Config;
use session_sweeper::engine::Replica;
use session_sweeper::iyzico::simulator::{Simulator, SimulatorConfig};
use session_sweeper::shutdown::Shutdown;
use session_sweeper::store::{self, Store};
use session_sweeper::sweep::{Progress, SweepError, SweepSummary};
use session_sweeper::telemetry::Metrics;
use sqlx::{PgPool, Row, SqlitePool};

/// The environment variable naming the PostgreSQL server tests create databases on.
pub const PG_ENV: &str = "TEST_POSTGRES_URL";
/// API key and secret the simulator and the config share.
pub const API_KEY: &str = "test-api-key";
/// The secret; tests assert it never shows up in output.
pub const SECRET: &str = "test-secret-key-7f3a9c";

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on the PostgreSQL server.
    Postgres,
    /// A fresh database on the MySQL/MariaDB server.
    MySql,
}

/// The environment variable naming the MySQL/MariaDB server tests create databases on.
pub const MYSQL_ENV: &str = "TEST_MYSQL_URL";

/// The MySQL admin URL, or `None` (with a notice) when unset outside CI.
pub fn mysql_admin_url() -> Option<String> {
    match std::env::var(MYSQL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{MYSQL_ENV} must be set in CI: MySQL tests never skip there")
        }
        _ => {
            eprintln!("notice: {MYSQL_ENV} is not set; skipping the MySQL variant of this test");
            None
        }
    }
}

/// Installs quiet tracing once per test binary.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let level = session_sweeper::config::LogConfig {
                level: "debug".into(),
                ..Default::default()
            };
            session_sweeper::telemetry::init_logging(&level, std::io::stderr);
        }
    });
}

/// The PostgreSQL admin URL, or `None` (with a notice) when unset outside CI.
pub fn pg_admin_url() -> Option<String> {
    match std::env::var(PG_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{PG_ENV} must be set in CI: PostgreSQL tests never skip there")
        }
        _ => {
            eprintln!("notice: {PG_ENV} is not set; skipping the PostgreSQL variant of this test");
            None
        }
    }
}

/// A connection to the test database for seeding and assertions.
#[derive(Clone)]
pub enum Pool {
    /// SQLite.
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Pg(PgPool),
    /// MySQL or MariaDB.
    MySql(sqlx::MySqlPool),
}

/// A fresh database with the source table `checkout_sessions`.
pub struct TestDb {
    /// Which backend.
    pub kind: Kind,
    /// The URL the sweeper connects with.
    pub url: String,
    /// For seeding and assertions.
    pub pool: Pool,
    /// Keeps the SQLite file's directory alive.
    pub dir: tempfile::TempDir,
    /// The server database behind `url` (PostgreSQL, MySQL), dropped with this; last, so that
    /// `pool` is dropped before it.
    server_database: Option<ServerDatabase>,
}

/// One source row to seed.
#[derive(Debug, Clone)]
pub struct Seed {
    /// Token.
    pub token: String,
    /// Member.
    pub member: String,
    /// Status value.
    pub status: &'static str,
    /// How long ago the last activity was.
    pub idle: Duration,
}

/// `n` active sessions idle for two hours, tokens `{prefix}-0..n`.
pub fn idle_sessions(prefix: &str, n: usize) -> Vec<Seed> {
    (0..n)
        .map(|i| Seed {
            token: format!("{prefix}-{i}"),
            member: format!("member-{i}"),
            status: "ACTIVE",
            idle: Duration::from_secs(7200),
        })
        .collect()
}

/// A session active a minute ago (not eligible).
pub fn fresh_session(token: &str) -> Seed {
    Seed {
        token: token.into(),
        member: "member-fresh".into(),
        status: "ACTIVE",
        idle: Duration::from_secs(60),
    }
}

/// How long dropping a test database may take before it is left behind with a warning.
const DROP_DATABASE_TIMEOUT: Duration = Duration::from_secs(30);

/// A database created on a test server for one test. Dropping it drops the database, its
/// connections cut first (a test may leave a pool, a daemon or a child process connected), so
/// that databases never pile up on the server; also when the test panics.
struct ServerDatabase {
    kind: Kind,
    admin_url: String,
    name: String,
}

impl ServerDatabase {
    /// Creates a database with a random name on the server `admin_url` names (`kind`:
    /// PostgreSQL or MySQL); returns it and its URL.
    async fn create(kind: Kind, admin_url: &str) -> (Self, String) {
        sqlx::any::install_default_drivers();
        let admin = sqlx::AnyPool::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("connect to the test server: {e}"));
        let name = format!("sweeper_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let mut url: url::Url = admin_url.parse().unwrap();
        url.set_path(&name);
        let database = Self {
            kind,
            admin_url: admin_url.to_owned(),
            name,
        };
        (database, url.to_string())
    }

    /// Cuts every connection to the database and drops it.
    async fn drop_now(kind: Kind, admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
        use sqlx::Connection as _;
        match kind {
            Kind::Postgres => {
                let mut admin = sqlx::PgConnection::connect(admin_url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            }
            Kind::MySql => {
                let mut admin = sqlx::MySqlConnection::connect(admin_url).await?;
                // A connection left inside a transaction holds metadata locks the drop would
                // wait for: end them all first, and never wait long for a straggler.
                sqlx::query("SET SESSION lock_wait_timeout = 10")
                    .execute(&mut admin)
                    .await?;
                let connected: Vec<i64> = sqlx::query_scalar(
                    "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST \
                     WHERE DB = ? AND ID <> CONNECTION_ID()",
                )
                .bind(name)
                .fetch_all(&mut admin)
                .await?;
                for id in connected {
                    // Gone already, if it ended meanwhile.
                    let _ = sqlx::query(&format!("KILL CONNECTION {id}"))
                        .execute(&mut admin)
                        .await;
                }
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await
            }
            Kind::Sqlite => Ok(()),
        }
    }
}

impl Drop for ServerDatabase {
    fn drop(&mut self) {
        let (kind, admin_url, name) = (self.kind, self.admin_url.clone(), self.name.clone());
        // A thread with its own runtime: a Drop cannot await on the test's runtime, which may
        // be single-threaded (blocked right here) or unwinding from a panic.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                tokio::time::timeout(
                    DROP_DATABASE_TIMEOUT,
                    Self::drop_now(kind, &admin_url, &name),
                )
                .await
                .map_err(|_| format!("timed out after {DROP_DATABASE_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())
            })
        })
        .join();
        // Never panic here: a panic while a failed test unwinds would abort the whole binary.
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: test database {} not dropped: {e}", self.name),
            Err(_) => eprintln!(
                "warning: test database {} not dropped: the drop panicked",
                self.name
            ),
        }
    }
}

impl TestDb {
    /// A fresh database with an empty, indexed `checkout_sessions`; `None` to skip.
    pub async fn new(kind: Kind) -> Option<Self> {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let db = match kind {
            Kind::Sqlite => {
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("sweeper.db").display()
                );
                let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(opts.busy_timeout(Duration::from_secs(30)))
                    .await
                    .unwrap();
                TestDb {
                    kind,
                    url,
                    pool: Pool::Sqlite(pool),
                    dir,
                    server_database: None,
                }
            }
            Kind::Postgres => {
                let (database, url) = ServerDatabase::create(kind, &pg_admin_url()?).await;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .connect(&url)
                    .await
                    .unwrap();
                TestDb {
                    kind,
                    url,
                    pool: Pool::Pg(pool),
                    dir,
                    server_database: Some(database),
                }
            }
            Kind::MySql => {
                let (database, url) = ServerDatabase::create(kind, &mysql_admin_url()?).await;
                let pool = sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(4)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::Executor::execute(&mut *conn, "SET time_zone = '+00:00'").await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await
                    .unwrap();
                TestDb {
                    kind,
                    url,
                    pool: Pool::MySql(pool),
                    dir,
                    server_database: Some(database),
                }
            }
        };
        db.exec(match kind {
            Kind::Sqlite => {
                "CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT NOT NULL, \
                 status TEXT NOT NULL, last_activity_at TEXT NOT NULL); \
                 CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at)"
            }
            Kind::Postgres => {
                "CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT NOT NULL, \
                 status TEXT NOT NULL, last_activity_at TIMESTAMPTZ NOT NULL); \
                 CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at)"
            }
            // A shop's table: DATETIME in UTC (the server's zone here), VARCHAR token.
            Kind::MySql => {
                "CREATE TABLE checkout_sessions (session_token VARCHAR(255) PRIMARY KEY, \
                 member_identifier VARCHAR(255) NOT NULL, status VARCHAR(32) NOT NULL, \
                 last_activity_at DATETIME(6) NOT NULL); \
                 CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at)"
            }
        })
        .await;
        Some(db)
    }

    /// Moves a worker's heartbeat `secs` into the past: the database's clock decides staleness,
    /// so tests travel in time by ageing rows, not by passing a later "now".
    pub async fn age_heartbeat(&self, worker: &str, secs: i64) {
        self.exec(&match self.kind {
            Kind::Sqlite => format!(
                "UPDATE sweeper_workers SET heartbeat_at = heartbeat_at - {} WHERE worker_id = '{worker}'",
                secs * 1000
            ),
            Kind::Postgres | Kind::MySql => format!(
                "UPDATE sweeper_workers SET heartbeat_at = heartbeat_at - {} WHERE worker_id = '{worker}'",
                secs * 1000
            ),
        })
        .await;
    }

    /// Moves every lease expiry and next-attempt time of the ledger `secs` into the past.
    pub async fn age_ledger(&self, secs: i64) {
        self.exec(&match self.kind {
            Kind::Sqlite => format!(
                "UPDATE sweeper_sessions SET lease_expires_at = lease_expires_at - {ms}, \
                 next_attempt_at = next_attempt_at - {ms}",
                ms = secs * 1000
            ),
            Kind::Postgres | Kind::MySql => format!(
                "UPDATE sweeper_sessions SET lease_expires_at = lease_expires_at - {ms}, \
                 next_attempt_at = next_attempt_at - {ms}",
                ms = secs * 1000
            ),
        })
        .await;
    }

    /// Runs SQL (several statements allowed).
    pub async fn exec(&self, sql: &str) {
        match &self.pool {
            Pool::Sqlite(p) => {
                sqlx::raw_sql(sql).execute(p).await.unwrap();
            }
            Pool::Pg(p) => {
                sqlx::raw_sql(sql).execute(p).await.unwrap();
            }
            Pool::MySql(p) => {
                for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    sqlx::raw_sql(statement).execute(p).await.unwrap();
                }
            }
        }
    }

    /// Inserts source rows.
    pub async fn seed(&self, rows: &[Seed]) {
        let now = Utc::now();
        for chunk in rows.chunks(500) {
            match &self.pool {
                Pool::Sqlite(p) => {
                    let mut tx = p.begin().await.unwrap();
                    for r in chunk {
                        let at: DateTime<Utc> = now - r.idle;
                        sqlx::query("INSERT INTO checkout_sessions VALUES (?1, ?2, ?3, ?4)")
                            .bind(&r.token)
                            .bind(&r.member)
                            .bind(r.status)
                            .bind(at.format("%Y-%m-%d %H:%M:%S").to_string())
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                    }
                    tx.commit().await.unwrap();
                }
                Pool::Pg(p) => {
                    let tokens: Vec<&str> = chunk.iter().map(|r| r.token.as_str()).collect();
                    let members: Vec<&str> = chunk.iter().map(|r| r.member.as_str()).collect();
                    let statuses: Vec<&str> = chunk.iter().map(|r| r.status).collect();
                    let ats: Vec<DateTime<Utc>> = chunk.iter().map(|r| now - r.idle).collect();
                    sqlx::query(
                        "INSERT INTO checkout_sessions SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[])",
                    )
                    .bind(&tokens)
                    .bind(&members)
                    .bind(&statuses)
                    .bind(&ats)
                    .execute(p)
                    .await
                    .unwrap();
                }
                Pool::MySql(p) => {
                    let mut q =
                        sqlx::QueryBuilder::<sqlx::MySql>::new("INSERT INTO checkout_sessions ");
                    q.push_values(chunk, |mut row, r| {
                        let at: DateTime<Utc> = now - r.idle;
                        row.push_bind(&r.token)
                            .push_bind(&r.member)
                            .push_bind(r.status)
                            .push_bind(at.naive_utc());
                    });
                    q.build().execute(p).await.unwrap();
                }
            }
        }
    }

    /// Sets a session's last activity to now (the user came back).
    pub async fn touch(&self, token: &str) {
        let now = Utc::now();
        match &self.pool {
            Pool::Sqlite(p) => {
                sqlx::query(
                    "UPDATE checkout_sessions SET last_activity_at = ?1 WHERE session_token = ?2",
                )
                .bind(now.format("%Y-%m-%d %H:%M:%S").to_string())
                .bind(token)
                .execute(p)
                .await
                .unwrap();
            }
            Pool::Pg(p) => {
                sqlx::query(
                    "UPDATE checkout_sessions SET last_activity_at = $1 WHERE session_token = $2",
                )
                .bind(now)
                .bind(token)
                .execute(p)
                .await
                .unwrap();
            }
            Pool::MySql(p) => {
                sqlx::query(
                    "UPDATE checkout_sessions SET last_activity_at = ? WHERE session_token = ?",
                )
                .bind(now.naive_utc())
                .bind(token)
                .execute(p)
                .await
                .unwrap();
            }
        }
    }

    /// Holds `LOCK TABLE {table} IN {mode} MODE` (PostgreSQL), as the shop's own transaction
    /// would, until the returned transaction ends.
    pub async fn pg_lock(
        &self,
        table: &str,
        mode: &str,
    ) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let Pool::Pg(pool) = &self.pool else {
            panic!("LOCK TABLE … MODE is PostgreSQL's")
        };
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN {mode} MODE"))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx
    }

    /// A single integer from a query.
    pub async fn scalar(&self, sql: &str) -> i64 {
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query(sql)
                .fetch_one(p)
                .await
                .unwrap()
                .get::<i64, _>(0),
            Pool::Pg(p) => sqlx::query(sql)
                .fetch_one(p)
                .await
                .unwrap()
                .get::<i64, _>(0),
            Pool::MySql(p) => sqlx::query(&format!("SELECT CAST(({sql}) AS SIGNED)"))
                .fetch_one(p)
                .await
                .unwrap()
                .get::<i64, _>(0),
        }
    }

    /// The source status of a session.
    pub async fn status(&self, token: &str) -> String {
        let sql = "SELECT status FROM checkout_sessions WHERE session_token = ";
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query_scalar(&format!("{sql}?1"))
                .bind(token)
                .fetch_one(p)
                .await
                .unwrap(),
            Pool::Pg(p) => sqlx::query_scalar(&format!("{sql}$1"))
                .bind(token)
                .fetch_one(p)
                .await
                .unwrap(),
            Pool::MySql(p) => sqlx::query_scalar(&format!("{sql}?"))
                .bind(token)
                .fetch_one(p)
                .await
                .unwrap(),
        }
    }

    /// The ledger state and attempts of a session, if it has a row.
    pub async fn ledger(&self, token: &str) -> Option<(String, i64)> {
        let sql = if self.kind == Kind::MySql {
            "SELECT state, CAST(attempts AS SIGNED) FROM sweeper_sessions WHERE session_token = "
        } else {
            "SELECT state, CAST(attempts AS BIGINT) FROM sweeper_sessions WHERE session_token = "
        };
        match &self.pool {
            Pool::Sqlite(p) => sqlx::query(&format!("{sql}?1"))
                .bind(token)
                .fetch_optional(p)
                .await
                .unwrap()
                .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1))),
            Pool::Pg(p) => sqlx::query(&format!("{sql}$1"))
                .bind(token)
                .fetch_optional(p)
                .await
                .unwrap()
                .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1))),
            Pool::MySql(p) => sqlx::query(&format!("{sql}?"))
                .bind(token)
                .fetch_optional(p)
                .await
                .unwrap()
                .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1))),
        }
    }

    /// How many ledger rows are in `state`.
    pub async fn count_state(&self, state: &str) -> i64 {
        self.scalar(&format!(
            "SELECT COUNT(*) FROM sweeper_sessions WHERE state = '{state}'"
        ))
        .await
    }

    /// A store on this database with the test source config.
    pub async fn store(&self) -> Arc<dyn Store> {
        let config = self.config("http://127.0.0.1:9", &[]);
        let store = store::open(&config).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// The test config pointing at this database and `api_url`, with `SWEEPER_*`-style overrides.
    pub fn config(&self, api_url: &str, overrides: &[(&str, &str)]) -> Config {
        Config::from_toml_str(
            &self.config_toml(api_url),
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .expect("test config is valid")
    }

    /// The test config's TOML text.
    pub fn config_toml(&self, api_url: &str) -> String {
        format!(
            r#"
[database]
url = "{url}"
max_connections = 8

{source}
[sweep]
interval = "1h"
batch_size = 50
concurrency = 8
lease = "5m"
max_attempts = 3
retry_base = "1s"
retry_max = "4s"
shutdown_grace = "5s"
heartbeat = "1s"

[iyzico]
base_url = "{api_url}"
api_key = "{API_KEY}"
secret_key = "{SECRET}"
locale = "en"
timeout = "2s"
rate_per_second = 10000
burst = 1000
retries = 2
retry_min_delay = "10ms"
retry_max_delay = "50ms"
"#,
            url = self.url,
            source = source_toml(),
        )
    }
}

/// The `[source]` block of every test config, ending in a newline: the `checkout_sessions`
/// table [`TestDb::new`] creates, idle after 30 minutes.
pub fn source_toml() -> &'static str {
    r#"[source]
table = "checkout_sessions"
token_column = "session_token"
member_column = "member_identifier"
status_column = "status"
last_activity_column = "last_activity_at"
active_value = "ACTIVE"
passive_value = "PASSIVE"
idle_after = "30m"
"#
}

/// Starts the simulator on port 0 with the test credentials.
pub async fn simulator(config: SimulatorConfig) -> Simulator {
    let config = SimulatorConfig {
        api_key: API_KEY.into(),
        secret_key: SECRET.into(),
        ..config
    };
    Simulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// A migrated database with `sessions` idle sessions (`s-0`…), a simulator answering after
/// `latency`, and the `sweeper.toml` the binary reads; `None` to skip.
pub async fn sessions_and_simulator(
    kind: Kind,
    sessions: usize,
    latency: Duration,
) -> Option<(TestDb, Simulator)> {
    let db = TestDb::new(kind).await?;
    let sim = simulator(SimulatorConfig {
        latency,
        ..SimulatorConfig::default()
    })
    .await;
    db.seed(&idle_sessions("s", sessions)).await;
    db.store().await;
    std::fs::write(
        db.dir.path().join("sweeper.toml"),
        db.config_toml(&sim.base_url()),
    )
    .unwrap();
    Some((db, sim))
}

/// The daemon (`run`) in-process: its metrics, its shutdown handle, its task, and the address
/// of its HTTP routes (a listener the test bound to port 0).
pub struct Daemon {
    /// The metrics it records into.
    pub metrics: Metrics,
    /// Stops it without a signal.
    pub shutdown: Shutdown,
    /// Ends with the daemon's result.
    pub task: tokio::task::JoinHandle<Result<(), session_sweeper::daemon::DaemonError>>,
    /// `http://127.0.0.1:PORT`, where `/metrics`, `/healthz`, `/readyz` and the page answer.
    pub base_url: String,
}

impl Daemon {
    /// Starts `run`'s loop on `config`'s database (migrated beforehand by the test's setup).
    pub async fn start(config: Config) -> Self {
        let store = store::open(&config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let (metrics, shutdown) = (Metrics::new(), Shutdown::new());
        let daemon =
            session_sweeper::daemon::Daemon::new(store, config, metrics.clone()).serving(listener);
        let task = tokio::spawn(daemon.run_until_stopped(shutdown.clone()));
        Self {
            metrics,
            shutdown,
            task,
            base_url,
        }
    }

    /// Stops it gracefully with `grace` and asserts it exits cleanly within `within`.
    pub async fn stop(self, grace: Duration, within: Duration) {
        self.shutdown.begin(grace);
        tokio::time::timeout(within, self.task)
            .await
            .expect("stops in time")
            .unwrap()
            .unwrap();
    }
}

/// Runs one sweep in-process, as `once` does.
pub async fn sweep_once(config: &Config) -> Result<SweepSummary, SweepError> {
    sweep_once_with(config, &Shutdown::new(), Metrics::new()).await
}

/// Runs one sweep in-process with a given shutdown handle and metrics.
pub async fn sweep_once_with(
    config: &Config,
    shutdown: &Shutdown,
    metrics: Metrics,
) -> Result<SweepSummary, SweepError> {
    let store = store::open(config).await.unwrap();
    store.migrate().await.unwrap();
    let replica = Replica::start(store.clone(), config, metrics)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let result = replica
        .sweeper
        .run_once(shutdown, Arc::new(Progress::default()))
        .await;
    replica.membership.leave().await;
    store.close().await;
    result
}

/// Starts the binary with `command` on this database's `sweeper.toml` (written by the test),
/// output captured, killed if the test drops it.
pub fn spawn_sweeper(db: &TestDb, command: &str, env: &[(&str, &str)]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"));
    cmd.arg("--config")
        .arg(db.dir.path().join("sweeper.toml"))
        .arg(command)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Sends a signal (`"-TERM"`, `"-INT"`, `"-KILL"`) to a running child.
pub fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "kill {sig} {pid}");
}

/// Polls `done` every few milliseconds until it holds; fails the test after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Declares a test for each backend from one `async fn(Kind)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Kind::Sqlite).await }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Kind::Postgres).await }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name($crate::common::Kind::MySql).await }
            )*
        }
    };
}

/// A TCP proxy to a database that can stall: connections stay open, but nothing is forwarded
/// either way until it resumes (a database that hangs, not one that is down).
pub struct StallProxy {
    /// Where clients connect.
    pub addr: std::net::SocketAddr,
    stalled: Arc<std::sync::atomic::AtomicBool>,
}

impl StallProxy {
    /// Forwards to `target` until dropped with the test.
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Self::pipe(cr, sw, flag.clone()));
                tokio::spawn(Self::pipe(sr, cw, flag.clone()));
            }
        });
        Self { addr, stalled }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        stalled: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while stalled.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Stops forwarding (connections stay open).
    pub fn stall(&self) {
        self.stalled
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.stalled
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Runs the binary to its end with `--config config`, `args` and `env` (`RUST_LOG=warn`,
/// `SWEEPER_CONFIG` removed); returns its output and how long it took.
pub fn run_binary(
    config: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Output, Duration) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("SWEEPER_CONFIG")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = std::time::Instant::now();
    let out = cmd.output().unwrap();
    (out, started.elapsed())
}

/// Writes this database's test config (API calls to `api_url`) as `sweeper.toml` in its
/// directory and returns the path, for [`run_binary`].
pub fn write_config(db: &TestDb, api_url: &str) -> std::path::PathBuf {
    let path = db.dir.path().join("sweeper.toml");
    std::fs::write(&path, db.config_toml(api_url)).unwrap();
    path
}

impl TestDb {
    /// A login role on the test server that may only read (`SELECT` on every table of the test
    /// database's `public` schema), and this database's URL as that role. Drop it with
    /// [`TestDb::drop_role`].
    pub async fn read_only_role(&self) -> (String, String) {
        let role = format!(
            "sweeper_ro_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        self.exec(&format!(
            "CREATE ROLE {role} LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"
        ))
        .await;
        let mut url: url::Url = self.url.parse().unwrap();
        url.set_username(&role).unwrap();
        (role, url.to_string())
    }

    /// Drops a role made by [`TestDb::read_only_role`] (its grants in this database first).
    pub async fn drop_role(&self, role: &str) {
        self.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
            .await;
    }
}

/// A local port nothing listens on right now, for a *child process* to bind (in-process
/// servers take a listener bound to port 0 instead, which cannot race).
pub fn free_local_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `127.0.0.1:PORT` with a [`free_local_port`].
pub fn free_local_addr() -> String {
    format!("127.0.0.1:{}", free_local_port())
}

/// The value of the metric `name` (with its labels, as rendered) in a Prometheus text
/// exposition, if it is there.
pub fn metric(rendered: &str, name: &str) -> Option<f64> {
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
