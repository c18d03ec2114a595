//! The composition root: builds this process's [`Replica`] (API client, rate limiter, fleet
//! membership and sweeper) from the validated config, and runs one sweep with its progress
//! display for `once` and `demo`. The commands above only choose what to run; nothing here
//! parses arguments or knows exit codes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::clock::DbClock;
use crate::config::Config;
use crate::fleet::{FleetView, Membership, this_worker};
use crate::iyzico::Client;
use crate::iyzico::client::BuildError;
use crate::iyzico::limiter::SharedLimiter;
use crate::shutdown::{Liveness, Shutdown};
use crate::store::{Store, StoreError};
use crate::sweep::{Progress, SweepError, SweepSettings, SweepSummary, Sweeper};
use crate::telemetry::Metrics;

/// Pool connections opened beside the ping at start: the one the steps up to the first claim
/// run on, one after the other (see `store::lane`), the one the counts beside the first claim
/// take, and the one the first re-check takes.
const START_CONNECTIONS: u32 = 3;
/// How often a progress bar redraws.
const BAR_REDRAW: Duration = Duration::from_millis(100);
/// How often a progress log line is written when there is no terminal.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// Why this process could not become a replica.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database failed (possibly only for now: see [`StartError::is_transient`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sweeper's own tables are older than this binary.
    #[error(
        "the sweeper's tables need migrations {}: run `session-sweeper migrate` first",
        .0.join(", ")
    )]
    PendingMigrations(Vec<String>),
    /// The HTTP client could not be built from `[iyzico]`.
    #[error(transparent)]
    Client(#[from] BuildError),
}

impl StartError {
    /// Whether waiting and trying again may help: the database is down, not misconfigured.
    pub fn is_transient(&self) -> bool {
        matches!(self, StartError::Store(e) if e.is_transient())
    }
}

/// This process as one replica of the fleet: its heartbeat and its sweeper.
pub struct Replica {
    /// Claims, invalidates and records.
    pub sweeper: Sweeper,
    /// The heartbeat that keeps this replica's leases alive and its rate share fair.
    pub membership: Membership,
}

impl Replica {
    /// Checks the schema, builds the client, joins the fleet and builds the sweeper.
    pub async fn start(
        store: Arc<dyn Store>,
        config: &Config,
        metrics: Metrics,
    ) -> Result<Self, StartError> {
        let limiter = Arc::new(SharedLimiter::new(
            config.iyzico.rate_per_second,
            config.iyzico.burst,
        ));
        // Building the HTTP client reads the system's root certificates: milliseconds of CPU
        // that need not wait for the database, nor it for them.
        let building = {
            let (iyzico, concurrency) = (config.iyzico.clone(), config.sweep.concurrency.get());
            let (limiter, metrics) = (limiter.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || Client::new(&iyzico, concurrency, limiter, metrics))
        };
        // A fresh connection first: a refused or unreachable server is reported as such at
        // once, not as the pool's "timed out" after its acquire timeout (`run` retries it).
        // Meanwhile the pool opens its first connections, side by side, as far as the pool
        // leaves room beside the ping's: that one counts against the same budget (a role's
        // connection limit, a proxy's pool), and one over it is refused.
        let beside = START_CONNECTIONS.min(config.database.max_connections.get() - 1);
        tokio::try_join!(store.ping(), store.open_connections(beside))?;
        let pending = store.pending_migrations().await?;
        if !pending.is_empty() {
            return Err(StartError::PendingMigrations(pending));
        }
        // Stop sending, and cancel calls in flight, one beat before peers may take our
        // sessions: see `Liveness`.
        let liveness = Liveness::new(config.sweep.fence_after());
        let client = building
            .await
            .expect("building the HTTP client does not panic")?
            .with_liveness(liveness.clone());
        let clock = DbClock::new();
        let view = FleetView {
            limiter,
            metrics: metrics.clone(),
            liveness,
            clock: clock.clone(),
            skewed: Default::default(),
        };
        let membership = Membership::join(
            store.clone(),
            this_worker(),
            config.sweep.heartbeat,
            config.sweep.stale_after(),
            config.sweep.lease,
            view,
        )
        .await?;
        let sweeper = Sweeper::new(
            store,
            Arc::new(client),
            SweepSettings::from_config(config),
            membership.worker_id().to_owned(),
            metrics,
        )
        .with_clock(clock);
        Ok(Self {
            sweeper,
            membership,
        })
    }

    /// One sweep until nothing eligible is left (or the first signal), shown as `display`
    /// says; then leaves the fleet. Ends as soon as the sweep does: the display is told, not
    /// waited for.
    pub async fn sweep_once(
        self,
        shutdown: &Shutdown,
        display: ProgressDisplay,
    ) -> Result<SweepSummary, SweepError> {
        let progress = Arc::new(Progress::default());
        let ended = Arc::new(Notify::new());
        let reporter = tokio::spawn(show_progress(progress.clone(), display, ended.clone()));
        let result = self.sweeper.run_once(shutdown, progress).await;
        // `notify_one` keeps a permit when the reporter is not waiting yet: it cannot miss it.
        ended.notify_one();
        if let Err(e) = reporter.await
            && e.is_panic()
        {
            tracing::error!("the progress display panicked; the sweep itself is unaffected");
        }
        self.membership.leave().await;
        result
    }
}

/// How a sweep's progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressDisplay {
    /// A progress bar on stderr (a terminal).
    Bar,
    /// An info log line every few seconds (CronJobs, systemd, pipes).
    LogLines,
}

/// Shows `progress` until `ended` is notified, then draws the last state and returns at once.
async fn show_progress(progress: Arc<Progress>, display: ProgressDisplay, ended: Arc<Notify>) {
    match display {
        ProgressDisplay::Bar => draw_bar(&progress, &ended).await,
        ProgressDisplay::LogLines => log_progress(&progress, &ended).await,
    }
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

async fn draw_bar(progress: &Progress, ended: &Notify) {
    let bar = indicatif::ProgressBar::new(load(&progress.eligible_at_start));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} sessions ({rate}, eta {eta})",
        )
        .expect("valid template")
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", state.per_sec());
            },
        ),
    );
    let redraw = || {
        bar.set_length(load(&progress.eligible_at_start).max(load(&progress.claimed)));
        bar.set_position(load(&progress.done));
    };
    loop {
        redraw();
        tokio::select! {
            _ = ended.notified() => break,
            _ = tokio::time::sleep(BAR_REDRAW) => {}
        }
    }
    redraw();
    bar.finish();
}

async fn log_progress(progress: &Progress, ended: &Notify) {
    let mut ticker = tokio::time::interval(PROGRESS_LOG_EVERY);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ended.notified() => return,
            _ = ticker.tick() => tracing::info!(
                done = load(&progress.done),
                claimed = load(&progress.claimed),
                eligible_at_start = load(&progress.eligible_at_start),
                "sweep progress"
            ),
        }
    }
}
