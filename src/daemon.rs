//! `run`: sweep at start and then on the schedule, never two sweeps at once, until a signal.
//! Survives database outages (retrying with backoff and reporting not-ready), keeps systemd
//! informed, and drains gracefully.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::cli::{CliError, Engine};
use crate::config::{Config, Schedule};
use crate::shutdown::{Shutdown, listen_for_signals};
use crate::store::Store;
use crate::sweep::{Progress, SweepError};
use crate::telemetry::{LogLevelHandle, Metrics};

/// Longest wait between retries after a failed sweep or an unreachable database.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Where SIGHUP re-reads the config from, and the log filter it may change.
#[derive(Debug, Clone)]
pub struct ReloadSource {
    /// The config file `run` was started with.
    pub path: std::path::PathBuf,
    /// The running log filter, when this process installed it.
    pub log: Option<LogLevelHandle>,
}

/// Runs the daemon until SIGTERM/SIGINT (or a forced second signal); SIGHUP reloads.
pub async fn run(
    store: Arc<dyn Store>,
    config: Config,
    reload: ReloadSource,
) -> Result<(), CliError> {
    let shutdown = Shutdown::new();
    let hangups =
        listen_for_hangups(reload.path.clone()).map_err(|e| CliError::Runtime(e.into()))?;
    let forced = listen_for_signals(shutdown.clone(), config.sweep.shutdown_grace)
        .map_err(|e| CliError::Runtime(e.into()))?;
    tokio::select! {
        r = serve_with_reloads(store, config, Metrics::new(), shutdown, hangups, reload.log) => r,
        code = forced => Err(CliError::Forced(code)),
    }
}

/// Re-reads and validates `path` on every SIGHUP; sends each valid config. An invalid file is
/// logged and changes nothing: the running settings stay.
fn listen_for_hangups(path: std::path::PathBuf) -> std::io::Result<mpsc::Receiver<Config>> {
    use futures::StreamExt as _;
    let mut signals = signal_hook_tokio::Signals::new([signal_hook::consts::SIGHUP])?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while signals.next().await.is_some() {
            match Config::load(&path, std::env::vars()) {
                Ok(config) => {
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!(
                    config = %path.display(),
                    error = %e,
                    "SIGHUP: the config file is invalid; keeping the running settings"
                ),
            }
        }
    });
    Ok(rx)
}

fn notify(state: sd_notify::NotifyState<'_>) {
    // A no-op outside systemd (no NOTIFY_SOCKET).
    let _ = sd_notify::notify(&[state]);
}

/// The daemon loop, with the stop signal passed in so tests can drive it.
pub async fn serve(
    store: Arc<dyn Store>,
    config: Config,
    metrics: Metrics,
    shutdown: Shutdown,
) -> Result<(), CliError> {
    let (_keep, reloads) = mpsc::channel(1);
    serve_with_reloads(store, config, metrics, shutdown, reloads, None).await
}

/// [`serve`], applying each config that arrives on `reloads` (see `reload`).
pub async fn serve_with_reloads(
    store: Arc<dyn Store>,
    mut config: Config,
    metrics: Metrics,
    shutdown: Shutdown,
    mut reloads: mpsc::Receiver<Config>,
    log: Option<LogLevelHandle>,
) -> Result<(), CliError> {
    let status = (config.server.listen.is_some() && config.server.status_page)
        .then(|| crate::status::StatusSource::new(store.clone(), &config, Some(metrics.clone())));
    if let Some(addr) = config.server.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::Runtime(anyhow::anyhow!("server.listen: cannot bind {addr}: {e}"))
        })?;
        let page = if status.is_some() {
            ", the status page at /"
        } else {
            ""
        };
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz{page}");
        let (router, s) = (
            crate::server::router(metrics.clone(), status.clone()),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = crate::server::serve(listener, router, s).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    if let Some(period) = sd_notify::watchdog_enabled() {
        let s = shutdown.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period / 2);
            loop {
                tokio::select! {
                    _ = s.aborted() => return,
                    _ = ticker.tick() => notify(sd_notify::NotifyState::Watchdog),
                }
            }
        });
    }

    // Start-up waits out a database that is not there yet, instead of crash-looping.
    let mut delay = Duration::from_secs(1);
    let engine = loop {
        match Engine::start(store.clone(), &config, metrics.clone()).await {
            Ok(e) => break e,
            Err(CliError::Runtime(e)) if is_transient(&e) => {
                metrics.set_ready(false);
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "database not reachable; retrying");
                tokio::select! {
                    _ = shutdown.stopping() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            Err(e) => return Err(e),
        }
    };
    metrics.set_ready(true);
    notify(sd_notify::NotifyState::Ready);
    let Engine {
        sweeper,
        membership,
        ..
    } = engine;
    let sweeper = Arc::new(sweeper);

    let (tick_tx, mut ticks) = mpsc::channel::<()>(1);
    let mut schedule = Ticks::start(&config.sweep.schedule, &tick_tx, &shutdown).await?;

    let mut running: Option<
        tokio::task::JoinHandle<Result<crate::sweep::SweepSummary, SweepError>>,
    > = None;
    let mut retry_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut failures = 0u32;
    let mut tick_skip_logged = false;
    let mut result = Ok(());
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let idle = running.is_none();
        tokio::select! {
            _ = shutdown.stopping(), if idle => break,
            _ = retry, if idle => {
                retry_at = None;
                running = Some(spawn_sweep(sweeper.clone(), shutdown.clone()));
            }
            Some(new) = reloads.recv() => {
                let changes = crate::reload::diff(&config, &new);
                if changes.is_empty() {
                    tracing::info!("SIGHUP: the config file is unchanged");
                    continue;
                }
                crate::reload::apply(&new, &sweeper, log.as_ref());
                if let Some(status) = &status {
                    status.update(&new);
                }
                if changes.schedule {
                    match Ticks::start(&new.sweep.schedule, &tick_tx, &shutdown).await {
                        Ok(t) => schedule.replace(t).await,
                        Err(e) => tracing::error!(error = %e, "SIGHUP: the new schedule could not start; keeping the old one"),
                    }
                }
                for change in &changes.applied {
                    tracing::info!(%change, "SIGHUP: applied");
                }
                if !changes.need_restart.is_empty() {
                    tracing::warn!(keys = ?changes.need_restart, "SIGHUP: these changed in the file but only take effect after a restart");
                }
                config = new;
            }
            Some(()) = ticks.recv() => {
                if running.is_some() {
                    metrics.tick_skipped();
                    // Once per sweep, not per tick: a long sweep on a short interval is normal.
                    if !tick_skip_logged {
                        tick_skip_logged = true;
                        tracing::info!("previous sweep still running; ticks are skipped until it ends");
                    }
                } else {
                    tick_skip_logged = false;
                    running = Some(spawn_sweep(sweeper.clone(), shutdown.clone()));
                }
            }
            joined = async {
                match running.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            } => {
                running = None;
                tick_skip_logged = false;
                let joined = joined.unwrap_or(Err(SweepError::Panicked("the sweep task")));
                match joined {
                    Ok(summary) => {
                        failures = 0;
                        metrics.set_ready(true);
                        metrics.sweep_finished(if shutdown.is_stopping() { "aborted" } else { "ok" }, summary.duration);
                        if summary.processed() > 0 || summary.released > 0 {
                            tracing::info!("{}", summary.line());
                        }
                    }
                    Err(e @ (SweepError::Auth { .. } | SweepError::Panicked(_))) => {
                        metrics.sweep_finished("failed", Duration::ZERO);
                        result = Err(CliError::Runtime(e.into()));
                        break;
                    }
                    Err(SweepError::Store(e)) => {
                        failures += 1;
                        metrics.set_ready(false);
                        metrics.sweep_finished("failed", Duration::ZERO);
                        let wait = (Duration::from_secs(1) * 2u32.saturating_pow(failures.min(6))).min(MAX_RETRY_DELAY);
                        tracing::warn!(error = %e, retry_in = ?wait, "sweep failed; retrying");
                        retry_at = Some(tokio::time::Instant::now() + wait);
                    }
                }
                if shutdown.is_stopping() {
                    break;
                }
            }
        }
    }
    notify(sd_notify::NotifyState::Stopping);
    if let Some(h) = running.take() {
        let _ = h.await;
    }
    membership.leave().await;
    shutdown.abort();
    tracing::info!("stopped");
    result
}

fn spawn_sweep(
    sweeper: Arc<crate::sweep::Sweeper>,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<Result<crate::sweep::SweepSummary, SweepError>> {
    tokio::spawn(
        async move {
            sweeper
                .run_once(&shutdown, Arc::new(Progress::default()))
                .await
        }
        .instrument(tracing::info_span!("sweep")),
    )
}

/// Whether a start-up error is worth retrying (the database is down, not misconfigured).
fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>()
            .is_some_and(|s| matches!(s, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_)))
            || c.downcast_ref::<crate::store::StoreError>().is_some_and(|s| {
                matches!(s, crate::store::StoreError::Database { source, .. }
                    if matches!(source, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed))
            })
    })
}

/// The running tick source; a reload replaces it.
struct Ticks {
    stop: Shutdown,
    cron: Option<tokio_cron_scheduler::JobScheduler>,
}

impl Ticks {
    async fn start(
        schedule: &Schedule,
        ticks: &mpsc::Sender<()>,
        shutdown: &Shutdown,
    ) -> Result<Self, CliError> {
        let stop = shutdown.child();
        let cron = start_schedule(schedule, ticks.clone(), stop.clone()).await?;
        Ok(Self { stop, cron })
    }

    /// Stops this tick source and keeps `next` in its place.
    async fn replace(&mut self, next: Ticks) {
        self.stop.abort();
        if let Some(mut cron) = self.cron.take() {
            let _ = cron.shutdown().await;
        }
        *self = next;
    }
}

/// Starts the tick source: a plain interval or the cron scheduler. Keeps it alive while held.
async fn start_schedule(
    schedule: &Schedule,
    ticks: mpsc::Sender<()>,
    shutdown: Shutdown,
) -> Result<Option<tokio_cron_scheduler::JobScheduler>, CliError> {
    match schedule {
        Schedule::Interval(period) => {
            let period = *period;
            tokio::spawn(async move {
                let mut ticker =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = shutdown.stopping() => return,
                        _ = ticker.tick() => { let _ = ticks.try_send(()); }
                    }
                }
            });
            Ok(None)
        }
        Schedule::Cron(expr) => {
            let err = |e: tokio_cron_scheduler::JobSchedulerError| {
                CliError::Runtime(anyhow::anyhow!("sweep.schedule: {e}"))
            };
            let scheduler = tokio_cron_scheduler::JobScheduler::new()
                .await
                .map_err(err)?;
            let job = tokio_cron_scheduler::Job::new_async(expr.as_str(), move |_, _| {
                let ticks = ticks.clone();
                Box::pin(async move {
                    // A full channel means a tick is already waiting: the sweep loop counts skips.
                    let _ = ticks.try_send(());
                })
            })
            .map_err(err)?;
            scheduler.add(job).await.map_err(err)?;
            scheduler.start().await.map_err(err)?;
            Ok(Some(scheduler))
        }
    }
}
