//! The command line: parses arguments, loads the config, and runs one command. Exit codes follow
//! the contract: 0 done, 1 runtime failure, 2 bad usage or config, 130/143 forced stop.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::config::{Config, ConfigError, LogConfig, LogFormat};
use crate::daemon::DaemonError;
use crate::engine::{ProgressDisplay, Replica, StartError};
use crate::iyzico::simulator::{Faults, Simulator, SimulatorConfig};
pub use crate::output::Format;
use crate::output::print_report;
use crate::output::say;
use crate::shutdown::{Shutdown, listen_for_signals};
use crate::store::{self, ClaimParams, Finding, RequeueFilter, Store};
use crate::sweep::SweepError;
use crate::telemetry::{Metrics, init_logging};

/// The default config file when neither `--config` nor `SWEEPER_CONFIG` is set.
pub const DEFAULT_CONFIG: &str = "session-sweeper.toml";

/// session-sweeper: invalidates abandoned "Pay with iyzico" checkout sessions.
#[derive(Debug, Parser)]
#[command(name = "session-sweeper", version = crate::build_info::LONG_VERSION, about, long_about = None)]
pub struct Cli {
    /// Config file [default: $SWEEPER_CONFIG, then ./session-sweeper.toml]
    #[arg(long, global = true, env = "SWEEPER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of the contract, plus `requeue`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the sweeper's own tables (idempotent).
    Migrate,
    /// Validate the config, connect, and check the source table, its columns and indexes.
    Check,
    /// List the sessions a sweep would invalidate now; no API call, no write.
    DryRun {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// List at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// One sweep: process eligible sessions until none is left (or N were processed).
    Once {
        /// Stop after this many sessions.
        #[arg(long, value_name = "N")]
        max: Option<u64>,
    },
    /// The daemon: sweep on the schedule until SIGTERM or SIGINT; serve metrics and health.
    Run,
    /// Outcome counts, pending sessions, and the most recent failures.
    Report {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// How many recent failures to list.
        #[arg(long, default_value_t = 10)]
        failures: u32,
    },
    /// Serve the status page and /api/status without sweeping (for CronJob deployments).
    ServeStatus {
        /// Address to listen on [default: server.listen, else 127.0.0.1:9464].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Put failed sessions back in the queue (all, or those with one error code).
    Requeue {
        /// Requeue every failed session.
        #[arg(
            long,
            conflicts_with = "error_code",
            required_unless_present = "error_code"
        )]
        all: bool,
        /// Requeue only failed sessions whose last error code is this.
        #[arg(long, value_name = "CODE")]
        error_code: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// A local iyzico-compatible invalidate endpoint for trials, tests and benchmarks.
    SimulateApi(SimulateArgs),
    /// A one-command trial: a temporary SQLite database, the simulator in-process, one sweep.
    Demo {
        /// Sample sessions to create.
        #[arg(long, default_value_t = 300)]
        sessions: u32,
    },
    /// Exit 0 when the sweeper's /healthz answers 2xx, 1 otherwise (for container health checks).
    Healthcheck(crate::release::HealthcheckArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(crate::release::CompletionsArgs),
}

/// Options of `simulate-api`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// API key to accept.
    #[arg(long, default_value = "sandbox-api-key", env = "SIMULATOR_API_KEY")]
    pub api_key: String,
    /// Secret key to verify signatures with.
    #[arg(
        long,
        default_value = "sandbox-secret-key",
        env = "SIMULATOR_SECRET_KEY",
        hide_env_values = true
    )]
    pub secret_key: String,
    /// Latency added to every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency: u64,
    /// Share of requests answered 503 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub fail_503: f64,
    /// Share of requests answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub fail_429: f64,
    /// Seconds sent in Retry-After.
    #[arg(long, default_value_t = 1)]
    pub retry_after: u64,
    /// Share of requests answered slowly.
    #[arg(long, default_value_t = 0.0)]
    pub slow: f64,
    /// How slow a slow answer is, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    pub slow_ms: u64,
    /// Share of requests answered with a truncated JSON body.
    #[arg(long, default_value_t = 0.0)]
    pub malformed: f64,
    /// Share of requests answered with a permanent failure (errorCode 11).
    #[arg(long, default_value_t = 0.0)]
    pub permanent: f64,
    /// Share of requests answered 307 with a Location on another host (never followed).
    #[arg(long, alias = "redirect-rate", default_value_t = 0.0)]
    pub redirect: f64,
    /// Where a redirect points.
    #[arg(long, default_value_t = crate::iyzico::simulator::DEFAULT_REDIRECT_TO)]
    pub redirect_to: SocketAddr,
}

impl SimulateArgs {
    fn config(&self) -> Result<SimulatorConfig, CliError> {
        for (name, v) in [
            ("--fail-503", self.fail_503),
            ("--fail-429", self.fail_429),
            ("--slow", self.slow),
            ("--malformed", self.malformed),
            ("--permanent", self.permanent),
            ("--redirect", self.redirect),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(CliError::Usage(format!(
                    "{name}: {v} must be between 0.0 and 1.0"
                )));
            }
        }
        Ok(SimulatorConfig {
            api_key: self.api_key.clone(),
            secret_key: self.secret_key.clone(),
            latency: Duration::from_millis(self.latency),
            faults: Faults {
                unavailable: self.fail_503,
                too_many_requests: self.fail_429,
                retry_after_secs: self.retry_after,
                slow: self.slow,
                slow_delay: Duration::from_millis(self.slow_ms),
                malformed: self.malformed,
                permanent: self.permanent,
                redirect: self.redirect,
                redirect_to: Some(self.redirect_to),
            },
            always_fail: Default::default(),
            already_invalidated: Default::default(),
        })
    }
}

/// A failure with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad configuration: exit 2, nothing touched.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bad usage: exit 2.
    #[error("{0}")]
    Usage(String),
    /// A runtime failure: exit 1.
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
    /// A second signal forced an immediate stop.
    #[error("stopped by a second signal")]
    Forced(i32),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
            CliError::Forced(code) => *code as u8,
        }
    }
}

impl From<store::StoreError> for CliError {
    fn from(e: store::StoreError) -> Self {
        CliError::Runtime(e.into())
    }
}

impl From<StartError> for CliError {
    fn from(e: StartError) -> Self {
        CliError::Runtime(e.into())
    }
}

impl From<SweepError> for CliError {
    fn from(e: SweepError) -> Self {
        CliError::Runtime(e.into())
    }
}

impl From<crate::release::ReleaseError> for CliError {
    fn from(e: crate::release::ReleaseError) -> Self {
        if e.is_usage() {
            CliError::Usage(e.to_string())
        } else {
            CliError::Runtime(e.into())
        }
    }
}

impl From<crate::demo::DemoError> for CliError {
    fn from(e: crate::demo::DemoError) -> Self {
        match e {
            crate::demo::DemoError::Forced(code) => CliError::Forced(code),
            crate::demo::DemoError::Failed(e) => CliError::Runtime(e),
        }
    }
}

impl From<DaemonError> for CliError {
    fn from(e: DaemonError) -> Self {
        match e {
            DaemonError::Forced(code) => CliError::Forced(code),
            e => CliError::Runtime(e.into()),
        }
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::SimulateApi(args) => {
            init_logging(&LogConfig::default(), std::io::stderr);
            simulate(args).await
        }
        Command::Demo { sessions } => {
            let quiet = LogConfig {
                level: "error".into(),
                ..LogConfig::default()
            };
            init_logging(&quiet, std::io::stderr);
            Ok(crate::demo::run(sessions).await?)
        }
        Command::Healthcheck(args) => {
            let path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            Ok(crate::release::healthcheck(&args, &path)?)
        }
        Command::Completions(args) => Ok(crate::release::completions(&args, Cli::command())?),
        command => {
            let path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            let config = Config::load(&path, std::env::vars())?;
            let log = init_logging(&config.log, std::io::stderr);
            if matches!(command, Command::Run | Command::Once { .. }) {
                log_start();
            }
            if let Command::Run = command {
                let store = store::open(&config).await?;
                let reload = crate::daemon::ReloadSource { path, log };
                let result = crate::daemon::run(store.clone(), config, reload).await;
                // A second signal means "now", as for every other command: closing the pool
                // politely would wait for connections that a stalled database never gives back.
                if !matches!(result, Err(DaemonError::Forced(_))) {
                    store.close().await;
                }
                return Ok(result?);
            }
            run_with_config(command, config).await
        }
    }
}

/// The first log line of `run` and `once`: what is running.
fn log_start() {
    use crate::build_info::{BUILD_DATE, COMMIT, VERSION};
    tracing::info!(
        version = VERSION,
        commit = COMMIT,
        built = BUILD_DATE,
        "session-sweeper {VERSION} ({COMMIT}) starting"
    );
}

async fn simulate(args: SimulateArgs) -> Result<(), CliError> {
    let config = args.config()?;
    let shutdown = Shutdown::new();
    let forced = listen_for_signals(shutdown.clone(), Duration::ZERO)
        .map_err(|e| CliError::Runtime(e.into()))?;
    let stop = {
        let s = shutdown.clone();
        async move { s.stopping().await }
    };
    tokio::select! {
        r = Simulator::listen_until(args.listen, config, stop) => r.map_err(|e| CliError::Runtime(anyhow::anyhow!("simulator on {}: {e}", args.listen))),
        code = forced => Err(CliError::Forced(code)),
    }
}

/// Runs a command that needs the config (everything but `simulate-api` and `demo`).
///
/// Signals: `run` handles its own. For every other command the first SIGTERM/SIGINT is obeyed
/// at once where that is safe (a read, or a wait for the database before anything was written:
/// exit 1 with a message), and otherwise lets the work finish (`migrate` and `requeue` complete
/// or roll back, and `once` drains its sweep), so 130/143 only ever mean a second signal.
pub async fn run_with_config(command: Command, config: Config) -> Result<(), CliError> {
    let shutdown = Shutdown::new();
    crate::shutdown::ignore_hangups().map_err(|e| CliError::Runtime(e.into()))?;
    let forced = listen_for_signals(shutdown.clone(), config.sweep.shutdown_grace)
        .map_err(|e| CliError::Runtime(e.into()))?;
    let store = store::open(&config).await?;
    let result = tokio::select! {
        r = run_command(command, store.clone(), &config, &shutdown) => r,
        // A second signal means "now": the pool is not closed politely, the process exits.
        code = forced => return Err(CliError::Forced(code)),
    };
    if shutdown.is_stopping() {
        // The database may be unreachable: do not let closing the pool hold the exit up.
        let _ = tokio::time::timeout(Duration::from_secs(1), store.close()).await;
    } else {
        store.close().await;
    }
    result
}

/// Why a command ended early on the first signal.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal {while_doing}; nothing was changed")]
pub struct Interrupted {
    /// What the command was doing.
    pub while_doing: &'static str,
}

/// Runs `work`, unless the first signal comes first: then ends at once with [`Interrupted`].
/// Only for work that writes nothing, or writes in one transaction that is rolled back when
/// dropped.
async fn unless_stopped<T>(
    shutdown: &Shutdown,
    while_doing: &'static str,
    work: impl Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    tokio::select! {
        r = work => r,
        _ = shutdown.stopping() => Err(CliError::Runtime(Interrupted { while_doing }.into())),
    }
}

/// Runs `work` to its end even when the first signal comes (a second one still forces the
/// exit), saying so once.
async fn despite_stop<T>(
    shutdown: &Shutdown,
    what: &'static str,
    work: impl Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return r,
        _ = shutdown.stopping() => {}
    }
    tracing::warn!("signal received: finishing {what} first (a second signal stops at once)");
    work.await
}

async fn run_command(
    command: Command,
    store: Arc<dyn Store>,
    config: &Config,
    shutdown: &Shutdown,
) -> Result<(), CliError> {
    if matches!(
        command,
        Command::Migrate
            | Command::DryRun { .. }
            | Command::Report { .. }
            | Command::Requeue { .. }
    ) {
        // As `check` and `once` do: a refused connection is said at once, not after the pool's
        // acquire timeout as "timed out".
        unless_stopped(shutdown, "while waiting for the database", async {
            Ok(store.ping().await?)
        })
        .await?;
    }
    match command {
        Command::Migrate => migrate(&*store, shutdown).await,
        Command::Check => unless_stopped(shutdown, "during check", check(&*store)).await,
        Command::DryRun { format, limit } => {
            let listing = dry_run(&*store, config, format, limit);
            unless_stopped(shutdown, "during dry-run", listing).await
        }
        Command::Report { format, failures } => {
            let report = unless_stopped(shutdown, "while reading the report", async {
                Ok(store.report(failures).await?)
            })
            .await?;
            print_report(&report, format);
            Ok(())
        }
        Command::Requeue {
            error_code, format, ..
        } => requeue(&*store, error_code, format, shutdown).await,
        Command::Once { max } => once(store, config, max, shutdown).await,
        Command::ServeStatus { listen } => serve_status(store, config, listen, shutdown).await,
        Command::Run
        | Command::SimulateApi(_)
        | Command::Demo { .. }
        | Command::Healthcheck(_)
        | Command::Completions(_) => {
            unreachable!("handled before")
        }
    }
}

/// `migrate`: runs to its end even on the first signal (a half-applied migration helps nobody).
async fn migrate(store: &dyn Store, shutdown: &Shutdown) -> Result<(), CliError> {
    despite_stop(shutdown, "the migration", async {
        Ok(store.migrate().await?)
    })
    .await?;
    say!("migrations applied; the sweeper's tables are current");
    Ok(())
}

/// `requeue`: one transaction, finished (or rolled back) even on the first signal.
async fn requeue(
    store: &dyn Store,
    error_code: Option<String>,
    format: Format,
    shutdown: &Shutdown,
) -> Result<(), CliError> {
    let filter = RequeueFilter {
        error_code: error_code.clone(),
    };
    let n = despite_stop(shutdown, "the requeue", async {
        Ok(store.requeue(&filter).await?)
    })
    .await?;
    match format {
        Format::Json => say!(
            "{}",
            serde_json::json!({ "requeued": n, "error_code": error_code })
        ),
        Format::Table => say!("requeued {n} failed sessions"),
    }
    Ok(())
}

/// `once`: the first signal ends the wait for the database at once (nothing was claimed yet),
/// or, once the sweep runs, stops claiming and drains it (exit 0).
async fn once(
    store: Arc<dyn Store>,
    config: &Config,
    max: Option<u64>,
    shutdown: &Shutdown,
) -> Result<(), CliError> {
    let replica = unless_stopped(shutdown, "while waiting for the database", async {
        Ok(Replica::start(store, config, Metrics::new()).await?)
    })
    .await?;
    replica.sweeper.update_settings(|s| s.max_sessions = max);
    let display = if std::io::stderr().is_terminal() && config.log.format == LogFormat::Text {
        ProgressDisplay::Bar
    } else {
        ProgressDisplay::LogLines
    };
    let summary = replica.sweep_once(shutdown, display).await?;
    say!("{}", summary.line());
    Ok(())
}

/// `serve-status`: the status page and its data, read from the database, until a signal.
async fn serve_status(
    store: Arc<dyn Store>,
    config: &Config,
    listen: Option<SocketAddr>,
    shutdown: &Shutdown,
) -> Result<(), CliError> {
    if !config.server.status_page {
        return Err(CliError::Usage(
            "server.status_page is false: the status page is turned off".into(),
        ));
    }
    // As every command that needs the database does: a refused connection is said at once,
    // not after the pool's acquire timeout as "timed out".
    unless_stopped(shutdown, "while waiting for the database", async {
        Ok(store.ping().await?)
    })
    .await?;
    let pending = unless_stopped(shutdown, "before serving", async {
        Ok(store.pending_migrations().await?)
    })
    .await?;
    if !pending.is_empty() {
        return Err(CliError::Runtime(anyhow::anyhow!(
            "the sweeper's tables need migrations {}: run `session-sweeper migrate` first",
            pending.join(", ")
        )));
    }
    let addr = listen
        .or(config.server.listen)
        .unwrap_or(crate::release::DEFAULT_HEALTH_ADDR);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Runtime(anyhow::anyhow!("cannot listen on {addr}: {e}")))?;
    tracing::info!(%addr, "serving the status page at / and /api/status (not sweeping)");
    let status = crate::status::StatusSource::new(store, config, None);
    let router = crate::server::status_router(status)
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let stop = shutdown.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.stopping().await })
        .await
        .map_err(|e| CliError::Runtime(anyhow::anyhow!("serving the status page: {e}")))
}

async fn check(store: &dyn Store) -> Result<(), CliError> {
    store.ping().await?;
    say!("ok: config is valid and the database answers");
    let findings = store.check().await?;
    let mut errors = 0;
    for f in &findings {
        match f {
            Finding::Ok(m) => say!("ok: {m}"),
            Finding::Warning(m) => say!("warning: {m}"),
            Finding::Error(m) => {
                errors += 1;
                say!("error: {m}")
            }
        }
    }
    if errors > 0 {
        return Err(CliError::Runtime(anyhow::anyhow!(
            "check found {errors} problem(s)"
        )));
    }
    Ok(())
}

async fn dry_run(
    store: &dyn Store,
    config: &Config,
    format: Format,
    limit: u32,
) -> Result<(), CliError> {
    // Idle is judged by the database's clock, as the sweep judges it.
    let now = store.database_time().await?;
    let params = ClaimParams {
        worker: "dry-run",
        idle_before: crate::sweep::cutoff_before(now, config.source.idle_after),
        stale_after: config.sweep.stale_after(),
        lease: config.sweep.lease,
        limit,
    };
    let sessions = store.eligible(params).await?;
    let total = store.count_eligible(params).await?;
    match format {
        Format::Json => {
            let doc = serde_json::json!({ "eligible": total, "listed": sessions.len(), "sessions": sessions });
            say!(
                "{}",
                serde_json::to_string_pretty(&doc).expect("serializable")
            );
        }
        Format::Table => {
            say!("{:<40} {:<40} {:>12}", "SESSION TOKEN", "MEMBER", "IDLE");
            for s in &sessions {
                let idle = humantime::format_duration(Duration::from_secs(s.idle_for.as_secs()));
                say!("{:<40} {:<40} {:>12}", s.token, s.member, idle.to_string());
            }
            say!(
                "{total} eligible now ({} listed); nothing was sent or written",
                sessions.len()
            );
        }
    }
    Ok(())
}

/// The binary's entry point after the runtime starts: runs and maps errors to exit codes.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(e, CliError::Forced(_)) {
                // Not `eprintln!`: a closed stderr must not turn the exit code into a panic's.
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "error: {}", error_chain(&e));
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// An error and its causes on one line, `outer: cause: cause`, each said once. Most errors
/// here already end their message with their source's (`StoreError`: "database error while
/// X: Y", and sqlx's own errors do the same), so a cause whose text is already on the line is
/// not repeated: printing the chain naively said the same driver error three times.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
