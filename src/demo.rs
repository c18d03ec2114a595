//! `demo`: a one-command trial on a fresh machine, with no config and no network. A temporary
//! SQLite database gets a few hundred sample sessions, the simulator runs in-process with some
//! latency and injected faults, one sweep runs with its progress bar, and the report is printed.

use std::collections::HashSet;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;

use crate::config::{Config, DEFAULT_SHUTDOWN_GRACE};
use crate::engine::{ProgressDisplay, Replica};
use crate::iyzico::simulator::{Faults, Simulator, SimulatorConfig};
use crate::output::say;
use crate::output::{Format, print_report};
use crate::shutdown::{ForcedExit, Shutdown, listen_for_signals};
use crate::store::{self, Store};
use crate::telemetry::Metrics;

const API_KEY: &str = "demo-api-key";
const SECRET: &str = "demo-secret-key";

/// A sample session: what it is for, and how long ago it was last active.
struct Sample {
    token: String,
    status: &'static str,
    idle: Duration,
}

fn samples(n: u32) -> (Vec<Sample>, HashSet<String>, HashSet<String>) {
    let mut rows = Vec::new();
    let mut rejected = HashSet::new();
    let mut already = HashSet::new();
    for i in 0..n {
        let token = uuid::Uuid::new_v4().to_string();
        let (status, idle) = match i % 20 {
            // Fresh: the shopper is still there.
            0..=3 => ("ACTIVE", Duration::from_secs(120 + u64::from(i))),
            // Finished checkouts: not ours to touch.
            4 => ("PASSIVE", Duration::from_secs(7200)),
            // Abandoned: idle for hours.
            _ => ("ACTIVE", Duration::from_secs(3600 + u64::from(i) * 37)),
        };
        if status == "ACTIVE" && idle > Duration::from_secs(3600) {
            match i % 50 {
                7 => drop(rejected.insert(token.clone())),
                13 | 31 => drop(already.insert(token.clone())),
                _ => {}
            }
        }
        rows.push(Sample {
            token,
            status,
            idle,
        });
    }
    (rows, rejected, already)
}

/// Why the demo ended without its report.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A second signal forced an immediate stop; carries the exit code (130 or 143).
    #[error("stopped by a second signal")]
    Forced(ForcedExit),
    /// A step failed (the chain says which), or the first signal came before the sweep.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Runs the demo. The signals are the commands': the first one before the sweep ends the demo
/// at once (nothing was sent), during the sweep it drains it and the report follows, a second
/// one stops at once. The temporary directory is removed in every case.
pub async fn run(sessions: u32) -> Result<(), DemoError> {
    let shutdown = Shutdown::new();
    // The demo's config sets no `shutdown_grace`: the default is its grace.
    let forced = listen_for_signals(shutdown.clone(), DEFAULT_SHUTDOWN_GRACE)
        .context("listening for signals")?;
    let dir = std::env::temp_dir().join(format!(
        "session-sweeper-demo-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = tokio::select! {
        r = demo_in(&dir, sessions, &shutdown) => r.map_err(DemoError::Failed),
        code = forced => Err(DemoError::Forced(code)),
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn demo_in(dir: &std::path::Path, sessions: u32, shutdown: &Shutdown) -> anyhow::Result<()> {
    let (rows, rejected, already) = samples(sessions);
    let sim = Simulator::start(
        "127.0.0.1:0".parse().expect("valid"),
        simulator(rejected, already),
    )
    .await
    .context("starting the simulator")?;
    let db_path = dir.join("demo.db");
    let config = Config::from_toml_str(&demo_config(&db_path, &sim.base_url()), std::iter::empty())
        .context("the demo config")?;
    say!("session-sweeper demo");
    say!("  database:  {} (temporary SQLite)", db_path.display());
    say!(
        "  simulator: {} (15 ms latency; 5% 503s, 3% 429s, 2% malformed answers)",
        sim.base_url()
    );
    let store = store::open(&config).await?;
    let result = seed_and_sweep(&store, &config, &db_path, &rows, &sim, shutdown).await;
    store.close().await;
    result
}

/// The simulator's faults: some of everything the sweeper must survive.
fn simulator(rejected: HashSet<String>, already: HashSet<String>) -> SimulatorConfig {
    SimulatorConfig {
        api_key: API_KEY.into(),
        secret_key: SECRET.into(),
        latency: Duration::from_millis(15),
        faults: Faults {
            unavailable: 0.05,
            too_many_requests: 0.03,
            retry_after_secs: 1,
            malformed: 0.02,
            // iyzico never redirects; the sweeper does not follow one and retries.
            redirect: 0.01,
            ..Faults::default()
        },
        always_fail: rejected,
        already_invalidated: already,
    }
}

fn demo_config(db_path: &std::path::Path, api_url: &str) -> String {
    format!(
        r#"
[database]
url = "sqlite://{db}?mode=rwc"
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
batch_size = 100
concurrency = 16
retry_base = "1m"
[iyzico]
base_url = "{api_url}"
api_key = "{API_KEY}"
secret_key = "{SECRET}"
rate_per_second = 200
burst = 20
retries = 3
retry_min_delay = "100ms"
retry_max_delay = "1s"
timeout = "3s"
"#,
        db = db_path.display(),
    )
}

/// Seeds the sample sessions, sweeps them once, and prints what happened. The first signal
/// before the sweep ends it at once; during the sweep it drains it.
async fn seed_and_sweep(
    store: &Arc<dyn Store>,
    config: &Config,
    db_path: &std::path::Path,
    rows: &[Sample],
    sim: &Simulator,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    let prepare = async {
        seed(db_path, rows).await?;
        describe_samples(rows);
        store.migrate().await?;
        anyhow::Ok(Replica::start(store.clone(), config, Metrics::new()).await?)
    };
    let replica = tokio::select! {
        // A replica that is ready sweeps (and leaves the fleet), never dropped with its
        // heartbeat running.
        biased;
        r = prepare => r?,
        _ = shutdown.stopping() => {
            anyhow::bail!("stopped by a signal while preparing the demo; nothing was sent")
        }
    };
    let display = if std::io::stderr().is_terminal() {
        ProgressDisplay::Bar
    } else {
        ProgressDisplay::LogLines
    };
    let summary = replica.sweep_once(shutdown, display).await?;
    say!("\n{}\n", summary.line());
    say!(
        "The simulator saw {} calls; the retries absorbed its injected faults.\n",
        sim.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    print_report(&store.report(5).await?, Format::Table);
    say!("\nNext: write a session-sweeper.toml for your database (see the README), then");
    say!("`session-sweeper check`, `session-sweeper dry-run`, and `session-sweeper once`.");
    Ok(())
}

fn describe_samples(rows: &[Sample]) {
    let abandoned = |r: &&Sample| r.status == "ACTIVE" && r.idle > Duration::from_secs(1800);
    let in_use = |r: &&Sample| r.status == "ACTIVE" && r.idle <= Duration::from_secs(1800);
    say!(
        "  sessions:  {} in all: {} abandoned (idle > 30m), {} still in use, {} finished\n",
        rows.len(),
        rows.iter().filter(abandoned).count(),
        rows.iter().filter(in_use).count(),
        rows.iter().filter(|r| r.status == "PASSIVE").count()
    );
}

async fn seed(db_path: &std::path::Path, rows: &[Sample]) -> anyhow::Result<()> {
    // The application's table, as an application would have it.
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", db_path.display())).await?;
    sqlx::raw_sql(
        "CREATE TABLE checkout_sessions (session_token TEXT PRIMARY KEY, member_identifier TEXT NOT NULL, \
         status TEXT NOT NULL, last_activity_at TEXT NOT NULL); \
         CREATE INDEX checkout_sessions_idle ON checkout_sessions (status, last_activity_at);",
    )
    .execute(&pool)
    .await?;
    let now = Utc::now();
    let mut tx = pool.begin().await?;
    for r in rows {
        sqlx::query("INSERT INTO checkout_sessions VALUES (?1, ?2, ?3, ?4)")
            .bind(&r.token)
            .bind(format!("member-{}", &r.token[..8]))
            .bind(r.status)
            .bind((now - r.idle).format("%Y-%m-%d %H:%M:%S").to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    pool.close().await;
    Ok(())
}
