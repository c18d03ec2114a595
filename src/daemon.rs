//! `run`: sweep at start and then on the schedule, never two sweeps at once, until a signal.
//! Survives database outages (retrying with backoff and reporting not-ready), keeps systemd
//! informed, and drains gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::config::{Config, Schedule};
use crate::engine::{Replica, StartError};
use crate::shutdown::{Shutdown, listen_for_signals};
use crate::status::StatusSource;
use crate::store::Store;
use crate::sweep::{Progress, SweepError, SweepSummary, Sweeper};
use crate::telemetry::{LogLevelHandle, Metrics};

/// Longest wait between retries after a failed sweep or an unreachable database.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// First wait after the database is found unreachable at start-up.
const FIRST_START_RETRY: Duration = Duration::from_secs(1);
/// First wait after a sweep failed on the database (then doubling up to [`MAX_RETRY_DELAY`]).
const FIRST_SWEEP_RETRY: Duration = Duration::from_secs(2);

/// Why the daemon stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `server.listen` could not be bound.
    #[error("server.listen: cannot bind {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot listen for signals: {0}")]
    Signals(#[source] std::io::Error),
    /// Start-up failed for a reason waiting does not fix (a transient one is retried).
    #[error(transparent)]
    Start(#[from] StartError),
    /// The cron schedule could not start.
    #[error("sweep.schedule: {0}")]
    Schedule(#[from] tokio_cron_scheduler::JobSchedulerError),
    /// A sweep ended in a way retrying cannot fix (iyzico refused the credentials, or a bug).
    #[error(transparent)]
    Sweep(SweepError),
    /// A second signal forced an immediate stop; carries the exit code (130 or 143).
    #[error("stopped by a second signal")]
    Forced(i32),
}

/// Where SIGHUP re-reads the config from, and the log filter it may change.
#[derive(Debug, Clone)]
pub struct ReloadSource {
    /// The config file `run` was started with.
    pub path: std::path::PathBuf,
    /// The running log filter, when this process installed it.
    pub log: Option<LogLevelHandle>,
}

/// `run`: binds `server.listen`, installs the signal handlers and runs the daemon until
/// SIGTERM/SIGINT (or a forced second signal); SIGHUP reloads.
pub async fn run(
    store: Arc<dyn Store>,
    config: Config,
    reload: ReloadSource,
) -> Result<(), DaemonError> {
    let shutdown = Shutdown::new();
    let hangups = listen_for_hangups(reload.path).map_err(DaemonError::Signals)?;
    let forced = listen_for_signals(shutdown.clone(), config.sweep.shutdown_grace)
        .map_err(DaemonError::Signals)?;
    let listen = config.server.listen;
    let mut daemon = Daemon::new(store, config, Metrics::new()).reloading(hangups, reload.log);
    if let Some(addr) = listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Bind { addr, source })?;
        daemon = daemon.serving(listener);
    }
    tokio::select! {
        r = daemon.run_until_stopped(shutdown) => r,
        code = forced => Err(DaemonError::Forced(code)),
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

/// The daemon's parts. `run` builds them from the config and the process; tests build them
/// directly (a listener bound to port 0, their own metrics and shutdown).
pub struct Daemon {
    store: Arc<dyn Store>,
    config: Config,
    metrics: Metrics,
    listener: Option<TcpListener>,
    reloads: Option<mpsc::Receiver<Config>>,
    log: Option<LogLevelHandle>,
}

impl Daemon {
    /// A daemon that sweeps `store` as `config` says and records into `metrics`; it serves
    /// nothing and never reloads until told to.
    pub fn new(store: Arc<dyn Store>, config: Config, metrics: Metrics) -> Self {
        Self {
            store,
            config,
            metrics,
            listener: None,
            reloads: None,
            log: None,
        }
    }

    /// Serves `/metrics`, `/healthz`, `/readyz` (and the status page, when it is on) on
    /// `listener`, whatever `server.listen` says.
    pub fn serving(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Applies each config that arrives on `reloads` (see `reload`), and its log level to `log`.
    pub fn reloading(
        mut self,
        reloads: mpsc::Receiver<Config>,
        log: Option<LogLevelHandle>,
    ) -> Self {
        self.reloads = Some(reloads);
        self.log = log;
        self
    }

    /// Runs until `shutdown` stops it (then drains), or a sweep fails beyond retrying.
    pub async fn run_until_stopped(self, shutdown: Shutdown) -> Result<(), DaemonError> {
        let status = (self.listener.is_some() && self.config.server.status_page).then(|| {
            StatusSource::new(self.store.clone(), &self.config, Some(self.metrics.clone()))
        });
        if let Some(listener) = self.listener {
            spawn_http(listener, &self.metrics, status.clone(), &shutdown);
        }
        spawn_watchdog(&shutdown);
        let replica =
            match start_when_reachable(&self.store, &self.config, &self.metrics, &shutdown).await {
                Ok(Some(replica)) => replica,
                stopped_or_failed => {
                    // Nothing to drain: the routes and the watchdog end with the daemon.
                    shutdown.abort();
                    return stopped_or_failed.map(|_| ());
                }
            };
        self.metrics.set_reachable(true);
        notify(sd_notify::NotifyState::Ready);
        let Replica {
            sweeper,
            membership,
        } = replica;
        let reloader = Reloader {
            config: self.config,
            status,
            log: self.log,
        };
        let result = SweepLoop::new(Arc::new(sweeper), self.metrics, shutdown.clone())
            .run(reloader, self.reloads)
            .await;
        membership.leave().await;
        shutdown.abort();
        tracing::info!("stopped");
        result
    }
}

/// Serves the routes until the shutdown's abort, logging where.
fn spawn_http(
    listener: TcpListener,
    metrics: &Metrics,
    status: Option<StatusSource>,
    shutdown: &Shutdown,
) {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let page = if status.is_some() {
        ", the status page at /"
    } else {
        ""
    };
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz{page}");
    let router = crate::server::router(metrics.clone(), status);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::server::serve_routes(listener, router, stop).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
}

/// Pings systemd's watchdog at half its period, when systemd asks for it.
fn spawn_watchdog(shutdown: &Shutdown) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
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

/// Start-up waits out a database that is not there yet, not ready meanwhile, instead of
/// crash-looping. `None` when a signal came first: it ends an attempt in progress too (a
/// database that accepts connections and never answers holds one for 10 s and more), and
/// nothing was claimed yet.
async fn start_when_reachable(
    store: &Arc<dyn Store>,
    config: &Config,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<Option<Replica>, DaemonError> {
    let mut delays = retry_delays(FIRST_START_RETRY);
    loop {
        let attempt = tokio::select! {
            // A replica that is ready is taken (and drained by the sweep loop), never dropped
            // with its heartbeat running.
            biased;
            started = Replica::start(store.clone(), config, metrics.clone()) => started,
            _ = shutdown.stopping() => return Ok(None),
        };
        match attempt {
            Ok(replica) => return Ok(Some(replica)),
            Err(e) if e.is_transient() => {
                metrics.set_reachable(false);
                let delay = delays.next().unwrap_or(MAX_RETRY_DELAY);
                // `StoreError`'s message already ends with the driver's: no chain to walk.
                tracing::warn!(error = %e, retry_in = ?delay, "database not reachable; retrying");
                tokio::select! {
                    _ = shutdown.stopping() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Doubling waits from `first` up to [`MAX_RETRY_DELAY`], without end.
fn retry_delays(first: Duration) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::new()
        .with_min_delay(first)
        .with_max_delay(MAX_RETRY_DELAY)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// The config as last applied, and what a reload changes besides the sweeper.
struct Reloader {
    config: Config,
    status: Option<StatusSource>,
    log: Option<LogLevelHandle>,
}

impl Reloader {
    /// Applies `new` to the sweeper, the log filter, the status page and the schedule.
    async fn apply(&mut self, new: Config, sweeper: &Sweeper, schedule: &mut Ticks) {
        let changes = crate::reload::diff(&self.config, &new);
        if changes.is_empty() {
            tracing::info!("SIGHUP: the config file is unchanged");
            return;
        }
        crate::reload::apply(&new, sweeper, self.log.as_ref());
        if let Some(status) = &self.status {
            status.update(&new);
        }
        if changes.schedule {
            match Ticks::start(&new.sweep.schedule, &schedule.sender, &schedule.parent).await {
                Ok(t) => schedule.replace(t).await,
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the new schedule could not start; keeping the old one")
                }
            }
        }
        for change in &changes.applied {
            tracing::info!(%change, "SIGHUP: applied");
        }
        if !changes.need_restart.is_empty() {
            tracing::warn!(keys = ?changes.need_restart, "SIGHUP: these changed in the file but only take effect after a restart");
        }
        self.config = new;
    }
}

type SweepTask = JoinHandle<Result<SweepSummary, SweepError>>;

/// At most one sweep at a time: started at once, then by the schedule's ticks, and again after
/// a database failure once its backoff has passed.
struct SweepLoop {
    sweeper: Arc<Sweeper>,
    metrics: Metrics,
    shutdown: Shutdown,
    running: Option<SweepTask>,
    retry_at: Option<tokio::time::Instant>,
    retry_delays: backon::ExponentialBackoff,
    tick_skip_logged: bool,
}

impl SweepLoop {
    fn new(sweeper: Arc<Sweeper>, metrics: Metrics, shutdown: Shutdown) -> Self {
        Self {
            sweeper,
            metrics,
            shutdown,
            running: None,
            retry_at: Some(tokio::time::Instant::now()),
            retry_delays: retry_delays(FIRST_SWEEP_RETRY),
            tick_skip_logged: false,
        }
    }

    /// Runs sweeps until a stop (draining the one in flight) or a failure beyond retrying.
    async fn run(
        mut self,
        mut reloader: Reloader,
        mut reloads: Option<mpsc::Receiver<Config>>,
    ) -> Result<(), DaemonError> {
        let (tick_tx, mut ticks) = mpsc::channel::<()>(1);
        let mut schedule =
            Ticks::start(&reloader.config.sweep.schedule, &tick_tx, &self.shutdown).await?;
        let mut result = Ok(());
        loop {
            let idle = self.running.is_none();
            let retry_at = self.retry_at;
            tokio::select! {
                _ = self.shutdown.stopping(), if idle => break,
                _ = sleep_until(retry_at), if idle => {
                    self.retry_at = None;
                    self.start_sweep();
                }
                Some(new) = next_reload(&mut reloads) => {
                    reloader.apply(new, &self.sweeper, &mut schedule).await;
                }
                Some(()) = ticks.recv() => self.on_tick(),
                joined = join(&mut self.running) => {
                    self.running = None;
                    if let Err(e) = self.on_sweep_ended(joined) {
                        result = Err(e);
                        break;
                    }
                    if self.shutdown.is_stopping() {
                        break;
                    }
                }
            }
        }
        notify(sd_notify::NotifyState::Stopping);
        if let Some(h) = self.running.take() {
            let _ = h.await;
        }
        result
    }

    fn start_sweep(&mut self) {
        self.tick_skip_logged = false;
        let (sweeper, shutdown) = (self.sweeper.clone(), self.shutdown.clone());
        self.running = Some(tokio::spawn(
            async move {
                sweeper
                    .run_once(&shutdown, Arc::new(Progress::default()))
                    .await
            }
            .instrument(tracing::info_span!("sweep")),
        ));
    }

    fn on_tick(&mut self) {
        if self.running.is_none() {
            self.start_sweep();
            return;
        }
        self.metrics.tick_skipped();
        // Once per sweep, not per tick: a long sweep on a short interval is normal.
        if !self.tick_skip_logged {
            self.tick_skip_logged = true;
            tracing::info!("previous sweep still running; ticks are skipped until it ends");
        }
    }

    /// Records how a sweep ended; schedules a retry after a database failure. An error ends
    /// the daemon.
    fn on_sweep_ended(
        &mut self,
        joined: Result<Result<SweepSummary, SweepError>, tokio::task::JoinError>,
    ) -> Result<(), DaemonError> {
        self.tick_skip_logged = false;
        match joined.unwrap_or(Err(SweepError::Panicked("the sweep task"))) {
            Ok(summary) => {
                self.retry_delays = retry_delays(FIRST_SWEEP_RETRY);
                // A sweep cut short by a stop proves nothing about the database: readiness
                // stays as the last finished sweep left it.
                let result = if self.shutdown.is_stopping() {
                    "aborted"
                } else {
                    self.metrics.set_sweeping(true);
                    "ok"
                };
                self.metrics.sweep_finished(result, summary.duration);
                if summary.processed() > 0 || summary.released > 0 {
                    tracing::info!("{}", summary.line());
                }
                Ok(())
            }
            Err(SweepError::Store(e)) => {
                self.metrics.set_sweeping(false);
                self.metrics.sweep_finished("failed", Duration::ZERO);
                let wait = self.retry_delays.next().unwrap_or(MAX_RETRY_DELAY);
                tracing::warn!(error = %e, retry_in = ?wait, "sweep failed; retrying");
                self.retry_at = Some(tokio::time::Instant::now() + wait);
                Ok(())
            }
            Err(e) => {
                self.metrics.sweep_finished("failed", Duration::ZERO);
                Err(DaemonError::Sweep(e))
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn next_reload(reloads: &mut Option<mpsc::Receiver<Config>>) -> Option<Config> {
    match reloads {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn join(
    running: &mut Option<SweepTask>,
) -> Result<Result<SweepSummary, SweepError>, tokio::task::JoinError> {
    match running.as_mut() {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// The running tick source; a reload replaces it.
struct Ticks {
    /// Where ticks go (the sweep loop's channel).
    sender: mpsc::Sender<()>,
    /// The daemon's shutdown, whose child stops this source.
    parent: Shutdown,
    stop: Shutdown,
    cron: Option<tokio_cron_scheduler::JobScheduler>,
}

impl Ticks {
    async fn start(
        schedule: &Schedule,
        ticks: &mpsc::Sender<()>,
        shutdown: &Shutdown,
    ) -> Result<Self, DaemonError> {
        let stop = shutdown.child();
        let cron = start_schedule(schedule, ticks.clone(), stop.clone()).await?;
        Ok(Self {
            sender: ticks.clone(),
            parent: shutdown.clone(),
            stop,
            cron,
        })
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
) -> Result<Option<tokio_cron_scheduler::JobScheduler>, DaemonError> {
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
            let scheduler = tokio_cron_scheduler::JobScheduler::new().await?;
            let job = tokio_cron_scheduler::Job::new_async(expr.as_str(), move |_, _| {
                let ticks = ticks.clone();
                Box::pin(async move {
                    // A full channel means a tick is already waiting: the sweep loop counts skips.
                    let _ = ticks.try_send(());
                })
            })?;
            scheduler.add(job).await?;
            scheduler.start().await?;
            Ok(Some(scheduler))
        }
    }
}
