//! One sweep: claim eligible sessions in batches, invalidate each through the client with
//! bounded concurrency, and record every outcome in batched transactions.
//!
//! The pipe stays full: a batch's sessions are handed to tasks as slots free up, and the next
//! batch is claimed as soon as the current one has been handed out, while its calls are still in
//! flight. Memory is bounded by the batch size plus the slots, whatever the backlog.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;
use chrono::{DateTime, Utc};
use futures::stream::{FuturesUnordered, StreamExt as _};
use futures::{Future, FutureExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::clock::DbClock;
use crate::config::{Config, SweepConfig};
use crate::iyzico::limiter::FleetState;
use crate::iyzico::{ApiError, CallRecord, Client, InvalidateError, Invalidation};
use crate::shutdown::Shutdown;
use crate::store::{ClaimParams, Decision, Lease, Outcome, Recheck, Settlement, Store, StoreError};
use crate::telemetry::{Metrics, fingerprint};

/// Most settlements written in one transaction.
pub const RECORD_BATCH: usize = 512;
/// How many times a failing batch write is retried before the sweep gives up.
pub const RECORD_RETRIES: usize = 5;
/// After the shutdown grace period, each remaining database step gets one try this long, so the
/// process exits within the grace plus a few seconds even when the database has stalled.
pub const FINAL_STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// Tries of the source update that marks invalidated sessions passive, per batch.
pub const MARK_RETRIES: usize = 2;
/// Sessions whose source row is still owed its update, re-marked at the start of each sweep.
pub const UNMARKED_PER_SWEEP: u32 = 5_000;
/// Sessions worked on at once, per call allowed in flight: while one set of calls is on the
/// wire, the next set waits for its rate tokens and slots and has its re-check done, so the
/// pipe never drains between sessions.
pub const PIPELINE_DEPTH: usize = 2;
/// The longest the first record of a sweep waits for the counts beside it to take their
/// snapshot (one round trip, normally).
const COUNT_PIN_WAIT: Duration = Duration::from_secs(1);
/// Most sessions one re-check query answers.
pub const RECHECK_BATCH: usize = 64;
/// Writes of outcomes begin at most this often: a write that finds few settlements waiting
/// gathers more until then (a group commit). Each write costs a few round trips whatever its
/// size, and the database's commits are what bounds how quickly an outcome is safe anyway;
/// a slower write is followed by the next one at once.
pub const RECORD_INTERVAL: Duration = Duration::from_millis(10);
/// The source is marked at most this often (the batches of that time together).
const MARK_INTERVAL: Duration = Duration::from_millis(25);
/// The first wait before a failed batch write is tried again; it doubles with each try.
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between two tries of a batch write.
const RECORD_RETRY_MAX: Duration = Duration::from_secs(10);

/// Delays that start at `first` and double up to `max`, without jitter: the one schedule of
/// the sweep's own retries (the client's immediate retries add jitter to theirs).
fn doubling(first: Duration, max: Duration) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

/// `now - d`, or the earliest time there is when that overflows: a cutoff that takes nothing.
pub fn cutoff_before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Runs a database step to the end, unless the shutdown grace period ends first: then it gets
/// [`FINAL_STEP_TIMEOUT`] more and is given up.
pub async fn bounded<T>(
    shutdown: &Shutdown,
    op: &'static str,
    step: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::pin!(step);
    tokio::select! {
        r = &mut step => r,
        _ = shutdown.aborted() => tokio::time::timeout(FINAL_STEP_TIMEOUT, step)
            .await
            .unwrap_or(Err(StoreError::TimedOut { op })),
    }
}

/// What a sweep needs to know, as typed values.
#[derive(Debug, Clone)]
pub struct SweepSettings {
    /// Sessions per claim (at most; see [`SweepSettings::claim_size`]).
    pub batch_size: u32,
    /// The fleet's requests per second.
    pub rate_per_second: u32,
    /// The most calls one attempt makes (the first plus immediate retries).
    pub calls_per_attempt: u32,
    /// Sessions being worked on at once (API calls in flight are bounded by the client).
    pub concurrency: usize,
    /// Lease length.
    pub lease: Duration,
    /// Sweep-level attempts before `failed`.
    pub max_attempts: u32,
    /// First delay between sweep-level attempts.
    pub retry_base: Duration,
    /// Largest delay between sweep-level attempts.
    pub retry_max: Duration,
    /// Idle time after which a session is eligible.
    pub idle_after: Duration,
    /// Heartbeat age after which a worker is dead.
    pub stale_after: Duration,
    /// Stop after this many sessions (`once --max N`).
    pub max_sessions: Option<u64>,
    /// Whether invalidated sessions' source rows are marked passive.
    pub mark_passive: bool,
}

impl SweepSettings {
    /// Settings from the validated config.
    pub fn from_config(config: &Config) -> Self {
        let s: &SweepConfig = &config.sweep;
        Self {
            batch_size: s.batch_size.get(),
            rate_per_second: config.iyzico.rate_per_second.get(),
            calls_per_attempt: config.iyzico.retries + 1,
            concurrency: s.concurrency.get(),
            lease: s.lease,
            max_attempts: s.max_attempts.get(),
            retry_base: s.retry_base,
            retry_max: s.retry_max,
            idle_after: config.source.idle_after,
            stale_after: s.stale_after(),
            max_sessions: None,
            mark_passive: config.source.mark_passive,
        }
    }

    /// How many sessions to claim at once with `replicas` sharing the rate: never more than this
    /// replica can send in half a lease at its share of the rate, even if every call is retried,
    /// so that claimed work is not hoarded away from other replicas.
    pub fn claim_size(&self, replicas: u32) -> u32 {
        let share = f64::from(self.rate_per_second) / f64::from(replicas.max(1));
        let sendable =
            share * self.lease.as_secs_f64() / (2.0 * f64::from(self.calls_per_attempt.max(1)));
        self.batch_size.min(sendable.max(1.0) as u32)
    }

    /// How many sessions the next claim asks for, with `replicas` sharing the rate and
    /// `claimed` claimed by this sweep so far; 0 once `max_sessions` are claimed.
    pub fn next_claim(&self, replicas: u32, claimed: u64) -> u32 {
        let mut size = self.claim_size(replicas);
        if claimed == 0 {
            // The first batch only fills the slots: a smaller claim is a shorter wait before
            // the first call, and the next, full batch is claimed while these are in flight.
            size = size.min(u32::try_from(self.concurrency).unwrap_or(u32::MAX));
        }
        match self.max_sessions {
            Some(max) => max.saturating_sub(claimed).min(u64::from(size)) as u32,
            None => size,
        }
    }

    /// The delay before sweep-level attempt `attempts + 1`: `retry_base` doubling, capped.
    pub fn retry_delay(&self, attempts: u32) -> Duration {
        doubling(self.retry_base, self.retry_max)
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.retry_max)
    }
}

/// Live counters of a running sweep, for progress bars and log lines.
#[derive(Debug, Default)]
pub struct Progress {
    /// Eligible when the sweep started (the progress bar's length).
    pub eligible_at_start: AtomicU64,
    /// Sessions claimed.
    pub claimed: AtomicU64,
    /// Sessions settled or released.
    pub done: AtomicU64,
}

/// What one sweep did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SweepSummary {
    /// Settled as `invalidated`.
    pub invalidated: u64,
    /// Settled as `already_invalidated`.
    pub already_invalidated: u64,
    /// Settled as `skipped`.
    pub skipped: u64,
    /// Left `pending` for a later attempt.
    pub pending: u64,
    /// Settled as `failed`.
    pub failed: u64,
    /// Given back untouched (shutdown or auth failure): attempts cut short, and claimed
    /// sessions never started.
    pub released: u64,
    /// Leases another worker had taken over before our call.
    pub lost: u64,
    /// API calls made.
    pub api_calls: u64,
    /// Wall time.
    #[serde(serialize_with = "secs_f64")]
    pub duration: Duration,
}

fn secs_f64<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl SweepSummary {
    /// Sessions that reached a decision (everything but released and lost).
    pub fn processed(&self) -> u64 {
        self.invalidated + self.already_invalidated + self.skipped + self.pending + self.failed
    }

    fn count(&mut self, s: &Settlement) {
        self.api_calls += s.calls.len() as u64;
        match &s.decision {
            Decision::Release => self.released += 1,
            Decision::Settle { outcome, .. } => match outcome {
                Outcome::Invalidated => self.invalidated += 1,
                Outcome::AlreadyInvalidated => self.already_invalidated += 1,
                Outcome::Skipped => self.skipped += 1,
                Outcome::Pending => self.pending += 1,
                Outcome::Failed => self.failed += 1,
            },
        }
    }

    /// The one-line summary `once` prints.
    pub fn line(&self) -> String {
        let secs = self.duration.as_secs_f64();
        let rate = if secs > 0.0 {
            self.processed() as f64 / secs
        } else {
            0.0
        };
        format!(
            "swept {} sessions in {:.2}s ({:.0}/s): invalidated={} already_invalidated={} skipped={} pending={} failed={} released={}",
            self.processed(),
            secs,
            rate,
            self.invalidated,
            self.already_invalidated,
            self.skipped,
            self.pending,
            self.failed,
            self.released
        )
    }
}

/// Why a sweep ended early.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task of the sweep panicked (a bug): the sweep stops, and its leases go back.
    #[error("{0} of the sweep panicked")]
    Panicked(&'static str),
    /// iyzico refused our credentials; the sweep stopped and released its leases.
    #[error(
        "iyzico rejected our credentials ({code}: {message}); check iyzico.api_key and the secret key"
    )]
    Auth {
        /// iyzico's code.
        code: String,
        /// iyzico's message.
        message: String,
    },
}

/// Runs sweeps for one worker.
pub struct Sweeper {
    store: Arc<dyn Store>,
    client: Arc<Client>,
    /// The fleet as the client sees it (how many replicas share the rate).
    fleet: FleetState,
    /// Read once per sweep; a config reload replaces it between sweeps.
    settings: std::sync::RwLock<SweepSettings>,
    worker: String,
    metrics: Metrics,
    clock: DbClock,
}

/// The first failure of each kind that ends a sweep, shared by its tasks.
struct FirstFailures {
    auth_failure: Mutex<Option<ApiError>>,
    store_failure: Mutex<Option<StoreError>>,
}

impl Sweeper {
    /// A sweeper for `worker` (whose heartbeat must be kept by the caller, see `fleet`).
    pub fn new(
        store: Arc<dyn Store>,
        client: Arc<Client>,
        settings: SweepSettings,
        worker: String,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            fleet: client.fleet().clone(),
            client,
            settings: std::sync::RwLock::new(settings),
            worker,
            metrics,
            clock: DbClock::new(),
        }
    }

    /// Places idle cutoffs on the database's timeline, as the heartbeat measures it.
    pub fn with_clock(mut self, clock: DbClock) -> Self {
        self.clock = clock;
        self
    }

    fn params<'a>(&'a self, settings: &SweepSettings, limit: u32) -> ClaimParams<'a> {
        ClaimParams {
            worker: &self.worker,
            idle_before: cutoff_before(self.clock.now(), settings.idle_after),
            stale_after: settings.stale_after,
            lease: settings.lease,
            limit,
        }
    }

    /// The settings the next sweep will use.
    pub fn settings(&self) -> SweepSettings {
        self.settings.read().expect("settings lock").clone()
    }

    /// Changes the settings for the sweeps that start from now on (`once --max`, a reload).
    pub fn update_settings(&self, change: impl FnOnce(&mut SweepSettings)) {
        change(&mut self.settings.write().expect("settings lock"));
    }

    /// The API client (a reload re-sizes its concurrency and retry policy).
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// Before claiming: give back our own leases from an interrupted sweep, finish source
    /// updates still owed, settle revived pending sessions. Returns how many were skipped as
    /// revived.
    async fn prepare(&self, settings: &SweepSettings) -> Result<u64, StoreError> {
        // Our own leases count as eligible again only once they are given back.
        self.store.release_all(&self.worker).await?;
        // The writes go one after the other, and all before the counts: a source row still
        // owed its mark is active until marked, and the unusable count reads every active row,
        // settled or not (a row whose member was blanked after it was invalidated would be
        // counted and warned about). Nor is a write transaction ever cut short because a step
        // beside it failed.
        if settings.mark_passive {
            self.mark_owed(settings).await?;
        }
        self.store.skip_revived(self.params(settings, 0)).await
    }

    /// Counts what the sweep has to do and the rows it cannot use, for the progress display,
    /// the gauges and the log; neither count decides anything. Each is one scan of the source,
    /// so on a pool large enough they run beside the first claims instead of before them (see
    /// [`Beside`]). Both read one snapshot, taken before the sweep records anything, and the
    /// sweep's count takes in the sessions this worker has claimed: so it says what there was
    /// at the start whenever it reads. A count that fails is said and the sweep goes on.
    async fn count_at_start(
        &self,
        settings: &SweepSettings,
        sweep: &Shutdown,
        progress: &Progress,
        beside: Option<Beside>,
    ) {
        // The idle cutoff of the start, as the snapshot's: one taken when the counts read
        // would take in sessions that turned idle in between.
        let params = self.params(settings, 0);
        let counts = async {
            let snapshot = self.store.snapshot().await?;
            if let Some(beside) = beside {
                let _ = beside.pinned.send(());
                beside.first_calls_ready.cancelled().await;
            }
            if sweep.is_stopping() {
                return Ok(None);
            }
            let counts = self.store.counts_in(snapshot, params);
            counts.await.map(Some)
        };
        let (unusable, to_sweep) = match bounded(sweep, "counting sessions", counts).await {
            Ok(Some(counts)) => counts,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the sweep's sessions; sweeping anyway");
                return;
            }
        };
        progress
            .eligible_at_start
            .store(to_sweep, Ordering::Relaxed);
        self.metrics.set_backlog(to_sweep);
        self.metrics.set_unusable(unusable);
        tracing::info!(
            eligible = to_sweep,
            "sessions to sweep, counted at its start"
        );
        if unusable.unreadable_last_activity + unusable.bad_source_row > 0 {
            tracing::warn!(
                unreadable_last_activity = unusable.unreadable_last_activity,
                bad_source_row = unusable.bad_source_row,
                "active source rows that are never sent (see `session-sweeper check`)"
            );
        }
    }

    /// Marks the source rows an earlier sweep could not mark passive.
    async fn mark_owed(&self, settings: &SweepSettings) -> Result<(), StoreError> {
        let owed = self.store.unmarked(UNMARKED_PER_SWEEP).await?;
        if owed.is_empty() {
            return Ok(());
        }
        let idle_before = cutoff_before(self.clock.now(), settings.idle_after);
        match self.store.mark_passive(&owed, idle_before).await {
            Ok(n) => tracing::info!(
                marked = n,
                "marked source rows passive that an earlier sweep could not"
            ),
            Err(e) => {
                tracing::warn!(error = %e, owed = owed.len(), "source rows still cannot be marked passive; the sessions stay invalidated and are never sent again")
            }
        }
        Ok(())
    }

    /// Drains everything eligible now (or `max_sessions`), then returns what happened.
    /// On stop it claims nothing more, lets calls in flight finish until the abort, records
    /// every outcome, and releases whatever it did not finish.
    pub async fn run_once(
        &self,
        shutdown: &Shutdown,
        progress: Arc<Progress>,
    ) -> Result<SweepSummary, SweepError> {
        let started = Instant::now();
        let settings = self.settings();
        let sweep = shutdown.child();
        // Database steps run to their end (a transaction cut short can leave its pooled
        // connection unusable); only after the grace period are they given up.
        let skipped = bounded(&sweep, "preparing the sweep", self.prepare(&settings)).await?;
        for _ in 0..skipped {
            self.metrics.session_settled(Outcome::Skipped.as_str());
        }
        if sweep.is_stopping() {
            return Ok(SweepSummary {
                skipped,
                ..SweepSummary::default()
            });
        }
        tracing::info!(worker = %self.worker, "sweep started");
        // The counts run beside the sweep only where the pool has room for them on top of what
        // the sweep holds; on a smaller one they come first, as a step of their own.
        let (beside, waits) = if self.store.can_count_beside_a_sweep() {
            let (beside, waits) = Beside::new();
            (Some(beside), Some(waits))
        } else {
            self.count_at_start(&settings, &sweep, &progress, None)
                .await;
            (None, None)
        };
        let state = Arc::new(FirstFailures {
            auth_failure: Mutex::new(None),
            store_failure: Mutex::new(None),
        });
        let (run, recorder, rechecker) =
            self.start_run(settings.clone(), &sweep, &state, &progress, waits);
        let dispatched = self
            .dispatch_counting(run, &sweep, &settings, &progress, beside)
            .await;
        // The recorder flushes its last batch under no cancellation: the last writes must land.
        let recorded = recorder.await;
        let rechecker = rechecker.await;
        // Whatever we claimed but never started (stop, auth failure) goes back at once.
        let leftover = bounded(
            &sweep,
            "releasing leases",
            self.store.release_all(&self.worker),
        )
        .await;
        let mut summary = recorded.map_err(|_| SweepError::Panicked("the recorder"))?;
        let dispatched = dispatched.map_err(|_| SweepError::Panicked("the claim loop"))?;
        rechecker.map_err(|_| SweepError::Panicked("the re-checker"))?;
        if dispatched.panicked {
            return Err(SweepError::Panicked("an attempt"));
        }
        summary.skipped += skipped;
        summary.duration = started.elapsed();
        let leftover = leftover?;
        if leftover > 0 {
            tracing::info!(released = leftover, "released unfinished leases");
        }
        // Claimed and never started are given back as surely as attempts cut short.
        summary.released += leftover;
        summary.lost = dispatched
            .claimed
            .saturating_sub(summary.processed() + summary.released - skipped);
        if let Some(e) = state.store_failure.lock().expect("lock").take() {
            return Err(e.into());
        }
        if let Some(e) = dispatched.claim_error {
            return Err(e.into());
        }
        if let Some(ApiError::Auth { code, message }) =
            state.auth_failure.lock().expect("lock").take()
        {
            return Err(SweepError::Auth { code, message });
        }
        Ok(summary)
    }

    /// Runs the claim loop, and the counts beside it when there is `beside`.
    async fn dispatch_counting(
        &self,
        run: Run,
        sweep: &Shutdown,
        settings: &SweepSettings,
        progress: &Progress,
        beside: Option<Beside>,
    ) -> Result<Dispatched, tokio::task::JoinError> {
        // The claim loop and its attempts run as one task of the runtime, not on the thread
        // that awaits the sweep: every answer then wakes a task where it arrives.
        let dispatched = tokio::spawn(run.dispatch());
        let counted = async {
            if beside.is_some() {
                self.count_at_start(settings, sweep, progress, beside).await;
            }
        };
        tokio::join!(dispatched, counted).0
    }

    /// Starts the recorder and the re-checker of one sweep; returns the claim loop that feeds
    /// them. Both tasks end once the loop (and with it every sender) is gone.
    fn start_run(
        &self,
        settings: SweepSettings,
        sweep: &Shutdown,
        state: &Arc<FirstFailures>,
        progress: &Arc<Progress>,
        waits: Option<BesideWaits>,
    ) -> (Run, JoinHandle<SweepSummary>, JoinHandle<()>) {
        let (counted_from, first_answered, ended) = match waits {
            Some(w) => (Some(w.pinned), Some(w.first_answered), Some(w.ended)),
            None => (None, None, None),
        };
        // Room for the batch being written and the next one filling: attempts never wait on
        // the recorder unless it falls a whole batch behind.
        let (settle, settle_rx) = mpsc::channel::<Settlement>(RECORD_BATCH * 2);
        let recorder = tokio::spawn(
            Recorder {
                store: self.store.clone(),
                worker: self.worker.clone(),
                metrics: self.metrics.clone(),
                state: state.clone(),
                sweep: sweep.clone(),
                progress: progress.clone(),
                marker: settings.mark_passive.then(|| Marker {
                    store: self.store.clone(),
                    metrics: self.metrics.clone(),
                    sweep: sweep.clone(),
                    idle_after: settings.idle_after,
                    clock: self.clock.clone(),
                }),
                counted_from,
            }
            .run(settle_rx),
        );
        let (recheck, rechecker) = Rechecker::start(
            self.store.clone(),
            self.worker.clone(),
            settings.idle_after,
            self.clock.clone(),
            sweep.clone(),
            first_answered,
        );
        let run = Run {
            store: self.store.clone(),
            client: self.client.clone(),
            fleet: self.fleet.clone(),
            worker: self.worker.clone(),
            clock: self.clock.clone(),
            settings,
            sweep: sweep.clone(),
            state: state.clone(),
            progress: progress.clone(),
            recheck,
            settle,
            _ended: ended,
        };
        (run, recorder, rechecker)
    }
}

/// How the counts beside a sweep miss nothing of it and keep out of its way: they take their
/// snapshot at once and the first record waits for it (`pinned`), and they read only once the
/// first re-check has answered (or the claim loop ended without one), so the first claim and
/// re-check find the connections opened at start free.
struct Beside {
    /// Told once the snapshot is taken.
    pinned: oneshot::Sender<()>,
    /// Cancelled once the first re-check answered or the claim loop ended.
    first_calls_ready: CancellationToken,
}

/// The sweep's side of [`Beside`].
struct BesideWaits {
    /// The recorder's first write waits for this.
    pinned: oneshot::Receiver<()>,
    /// The re-checker cancels this after its first query.
    first_answered: CancellationToken,
    /// The claim loop holds this: dropped, it cancels the token too.
    ended: DropGuard,
}

impl Beside {
    fn new() -> (Self, BesideWaits) {
        let (pinned, pinned_rx) = oneshot::channel();
        let first_calls_ready = CancellationToken::new();
        let waits = BesideWaits {
            pinned: pinned_rx,
            first_answered: first_calls_ready.clone(),
            ended: first_calls_ready.clone().drop_guard(),
        };
        let beside = Self {
            pinned,
            first_calls_ready,
        };
        (beside, waits)
    }
}

/// What the claim loop did.
#[derive(Default)]
struct Dispatched {
    /// Sessions claimed.
    claimed: u64,
    /// Why claiming stopped early, if it failed.
    claim_error: Option<StoreError>,
    /// Whether an attempt panicked (a bug).
    panicked: bool,
}

/// One sweep's claim loop and the attempts it runs: every attempt borrows what it needs from
/// here, and the attempts of the sweep are polled together in the loop's own task.
struct Run {
    store: Arc<dyn Store>,
    client: Arc<Client>,
    fleet: FleetState,
    worker: String,
    clock: DbClock,
    settings: SweepSettings,
    sweep: Shutdown,
    state: Arc<FirstFailures>,
    progress: Arc<Progress>,
    recheck: Rechecker,
    settle: mpsc::Sender<Settlement>,
    /// Lets the counts beside the sweep read when the loop ends before any re-check.
    _ended: Option<DropGuard>,
}

/// What an attempt in the claim loop's set yields: `Err` if it panicked.
type Ended = std::thread::Result<()>;

impl Run {
    /// Claims batch after batch and runs an attempt for each session, at most `concurrency ×
    /// PIPELINE_DEPTH` at once; the next batch is claimed as soon as the current one has been
    /// handed out, while its calls are still in flight. Ends when nothing is left to claim (or
    /// on stop) and every attempt has ended.
    async fn dispatch(self) -> Dispatched {
        let slots = self.settings.concurrency * PIPELINE_DEPTH;
        let mut running = FuturesUnordered::new();
        let mut queue = std::collections::VecDeque::new();
        let mut out = Dispatched::default();
        let mut claiming = true;
        loop {
            while running.len() < slots && !self.sweep.is_stopping() {
                let Some(lease) = queue.pop_front() else {
                    break;
                };
                running.push(std::panic::AssertUnwindSafe(self.attempt(lease)).catch_unwind());
            }
            // A stop: nothing more is claimed or started; what was claimed but not started
            // goes back with the sweep's final release.
            claiming &= !self.sweep.is_stopping();
            if claiming && queue.is_empty() {
                match self.claim_next(out.claimed, &mut running, &mut out).await {
                    Ok(leases) if !leases.is_empty() && !self.sweep.is_stopping() => {
                        out.claimed += leases.len() as u64;
                        self.progress
                            .claimed
                            .fetch_add(leases.len() as u64, Ordering::Relaxed);
                        queue.extend(leases);
                    }
                    Ok(_) => claiming = false,
                    Err(e) => {
                        out.claim_error = Some(e);
                        claiming = false;
                    }
                }
                continue;
            }
            if running.is_empty() && (queue.is_empty() || self.sweep.is_stopping()) {
                return out;
            }
            // Every slot is taken (or nothing is left to start): wait for an attempt to end,
            // or for a stop.
            tokio::select! {
                biased;
                _ = self.sweep.stopping(), if !self.sweep.is_stopping() => {}
                Some(ended) = running.next() => out.panicked |= ended.is_err(),
            }
        }
    }

    /// Claims the next batch (at most `max_sessions` in all) while the attempts in flight go
    /// on. An empty batch: nothing is left.
    async fn claim_next(
        &self,
        claimed: u64,
        running: &mut FuturesUnordered<impl Future<Output = Ended>>,
        out: &mut Dispatched,
    ) -> Result<Vec<Lease>, StoreError> {
        let limit = self.settings.next_claim(self.fleet.replicas(), claimed);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let params = ClaimParams {
            worker: &self.worker,
            idle_before: cutoff_before(self.clock.now(), self.settings.idle_after),
            stale_after: self.settings.stale_after,
            lease: self.settings.lease,
            limit,
        };
        let claim = bounded(&self.sweep, "claiming sessions", self.store.claim(params));
        tokio::pin!(claim);
        loop {
            tokio::select! {
                biased;
                r = &mut claim => return r,
                Some(ended) = running.next() => out.panicked |= ended.is_err(),
            }
        }
    }

    /// One session's attempt: the calls (each re-checked right before it is sent) and the
    /// settlement they lead to, handed to the recorder.
    #[tracing::instrument(name = "attempt", skip_all, fields(session = %fingerprint(&lease.token), attempt = lease.attempts + 1))]
    async fn attempt(&self, lease: Lease) {
        if self.sweep.is_stopping() {
            let _ = self
                .settle
                .send(release(&lease, lease.attempts + 1, Vec::new()))
                .await;
            return;
        }
        // The last look, taken with the rate token and the slot in hand, right before each
        // call: a shopper who came back while the session queued is never cut off.
        let verdict = Mutex::new(None);
        let inv = self
            .client
            .invalidate_checked(&lease.token, &lease.member, &self.sweep, || async {
                let r = tokio::select! {
                    r = self.recheck.check(&lease.token) => r,
                    _ = self.sweep.aborted() => Err(Arc::new(StoreError::TimedOut { op: "rechecking a session" })),
                };
                let send = matches!(r, Ok(Recheck::Eligible));
                *verdict.lock().expect("lock") = Some(r);
                send
            })
            .await;
        let verdict = verdict.into_inner().expect("lock");
        if let Some(settlement) = self.settlement(&lease, inv, verdict) {
            // The recorder only goes away after every attempt ended, so this cannot fail.
            let _ = self.settle.send(settlement).await;
        }
    }

    /// What an attempt settles: a call withheld by the re-check settles by the re-check's
    /// verdict (nothing at all for a lease lost before any call), anything else by the calls.
    fn settlement(
        &self,
        lease: &Lease,
        inv: Invalidation,
        verdict: Option<Verdict>,
    ) -> Option<Settlement> {
        let attempt = lease.attempts + 1;
        let withheld = matches!(inv.result, Err(InvalidateError::Withheld));
        match verdict {
            Some(Ok(Recheck::LeaseLost)) if withheld => {
                tracing::info!("lease taken over by another worker; leaving it");
                (!inv.calls.is_empty()).then(|| release(lease, attempt, inv.calls))
            }
            Some(Ok(Recheck::NoLongerEligible)) if withheld => {
                tracing::info!(
                    "no longer idle (or its last activity no longer readable) since it was claimed; skipped"
                );
                // Calls made before (retries of this attempt) make it count as an attempt.
                let attempts = if inv.calls.is_empty() {
                    lease.attempts
                } else {
                    attempt
                };
                Some(Settlement {
                    token: lease.token.clone(),
                    attempt,
                    calls: inv.calls,
                    decision: Decision::Settle {
                        outcome: Outcome::Skipped,
                        attempts,
                        retry_in: None,
                        error_code: None,
                        error_message: None,
                    },
                })
            }
            Some(Err(e)) if withheld => {
                tracing::warn!(error = %e, "recheck failed; releasing");
                Some(release(lease, attempt, inv.calls))
            }
            _ => Some(Settlement {
                token: lease.token.clone(),
                attempt,
                decision: self.decide(attempt, inv.result),
                calls: inv.calls,
            }),
        }
    }

    /// The ledger's decision for an attempt whose calls ran (or were cut short).
    fn decide(&self, attempt: u32, result: Result<(), InvalidateError>) -> Decision {
        match result {
            Ok(()) => settle(Outcome::Invalidated, attempt, None, None, None),
            Err(
                InvalidateError::Interrupted | InvalidateError::Fenced | InvalidateError::Withheld,
            ) => Decision::Release,
            Err(InvalidateError::Api(e)) => self.decide_api_error(attempt, e),
        }
    }

    fn decide_api_error(&self, attempt: u32, e: ApiError) -> Decision {
        let code = e.code().map(str::to_owned);
        match e {
            ApiError::AlreadyInvalidated { message } => settle(
                Outcome::AlreadyInvalidated,
                attempt,
                None,
                code,
                Some(message),
            ),
            ApiError::Permanent { code, message } => {
                tracing::warn!(code, message, "permanent failure");
                settle(Outcome::Failed, attempt, None, Some(code), Some(message))
            }
            ApiError::Auth { code, message } => {
                tracing::error!(
                    code,
                    message,
                    "iyzico rejected our credentials; stopping the sweep"
                );
                self.state
                    .auth_failure
                    .lock()
                    .expect("lock")
                    .get_or_insert(ApiError::Auth { code, message });
                self.sweep.stop();
                Decision::Release
            }
            // Cut short by shutdown, not judged by the retry policy: give it back.
            ApiError::Retryable { .. } if self.sweep.is_stopping() => Decision::Release,
            ApiError::Retryable { reason, code, .. } if attempt >= self.settings.max_attempts => {
                tracing::warn!(reason, "retryable failure, attempts used up: failed");
                let code = code.unwrap_or_else(|| "attempts_exhausted".to_owned());
                settle(Outcome::Failed, attempt, None, Some(code), Some(reason))
            }
            ApiError::Retryable { reason, code, .. } => {
                let next = self.settings.retry_delay(attempt);
                settle(Outcome::Pending, attempt, Some(next), code, Some(reason))
            }
        }
    }
}

/// A decision that settles the session (as opposed to releasing it).
fn settle(
    outcome: Outcome,
    attempts: u32,
    retry_in: Option<Duration>,
    error_code: Option<String>,
    error_message: Option<String>,
) -> Decision {
    Decision::Settle {
        outcome,
        attempts,
        retry_in,
        error_code,
        error_message,
    }
}

/// Gives a session back untouched (the calls made, if any, are still logged).
fn release(lease: &Lease, attempt: u32, calls: Vec<CallRecord>) -> Settlement {
    Settlement {
        token: lease.token.clone(),
        attempt,
        calls,
        decision: Decision::Release,
    }
}

/// What the re-check of one session found, or why it could not say.
type Verdict = Result<Recheck, Arc<StoreError>>;

/// The re-check right before each call, coalesced like a group commit: a call that is ready
/// (rate token and slot in hand) asks, and every call that becomes ready while one query runs
/// is answered by the next query, together. Each verdict is still taken after its call was
/// ready, with the idle cutoff of the moment its query starts; it costs one query per batch
/// instead of one per call.
struct Rechecker {
    requests: mpsc::UnboundedSender<(String, oneshot::Sender<Verdict>)>,
}

impl Rechecker {
    /// Starts the task that runs the queries; it ends once the handle is dropped.
    /// `first_answered` is cancelled once the first query has answered.
    fn start(
        store: Arc<dyn Store>,
        worker: String,
        idle_after: Duration,
        clock: DbClock,
        shutdown: Shutdown,
        mut first_answered: Option<CancellationToken>,
    ) -> (Self, JoinHandle<()>) {
        let (requests, mut rx) = mpsc::unbounded_channel::<(String, oneshot::Sender<Verdict>)>();
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(RECHECK_BATCH);
            while rx.recv_many(&mut batch, RECHECK_BATCH).await > 0 {
                let tokens: Vec<&str> = batch.iter().map(|(t, _)| t.as_str()).collect();
                let idle_before = cutoff_before(clock.now(), idle_after);
                let verdicts = tokio::select! {
                    r = store.recheck_many(&worker, &tokens, idle_before) => r.map_err(Arc::new),
                    _ = shutdown.aborted() => Err(Arc::new(StoreError::TimedOut { op: "rechecking a session" })),
                };
                drop(tokens);
                for (i, (_, reply)) in batch.drain(..).enumerate() {
                    let verdict = match &verdicts {
                        Ok(v) => Ok(v[i]),
                        Err(e) => Err(e.clone()),
                    };
                    // The asker may be gone (aborted); nobody else needs the answer.
                    let _ = reply.send(verdict);
                }
                if let Some(first) = first_answered.take() {
                    first.cancel();
                }
            }
        });
        (Self { requests }, task)
    }

    /// Whether `token` is still eligible and ours, asked now.
    async fn check(&self, token: &str) -> Verdict {
        let (reply, answer) = oneshot::channel();
        let gone = || {
            Arc::new(StoreError::TimedOut {
                op: "rechecking a session",
            })
        };
        self.requests
            .send((token.to_owned(), reply))
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Writes settlements in batches as they arrive, retrying a failed write with backoff, and
/// hands the invalidated sessions to a [`Marker`] beside it, which marks their source rows
/// passive. Runs until every sender is gone (and the marker is done), so the final batch is
/// written even during shutdown.
struct Recorder {
    store: Arc<dyn Store>,
    worker: String,
    metrics: Metrics,
    state: Arc<FirstFailures>,
    sweep: Shutdown,
    progress: Arc<Progress>,
    /// Marks source rows passive beside the records (none: `mark_passive = false`).
    marker: Option<Marker>,
    /// Told once the counts beside the sweep have their snapshot, which must not miss any
    /// session this sweep settles: the first write waits for it (at most [`COUNT_PIN_WAIT`]).
    counted_from: Option<oneshot::Receiver<()>>,
}

impl Recorder {
    async fn run(mut self, mut rx: mpsc::Receiver<Settlement>) -> SweepSummary {
        let mut summary = SweepSummary::default();
        let mut batch = Vec::with_capacity(RECORD_BATCH);
        let mut last_write = None;
        // The source is marked beside the records, never in their way: a source row the shop
        // holds locked (up to the lock timeout, twice) must not keep the ledger from taking
        // what iyzico accepted since.
        let (marks, marked) = match self.marker.take() {
            Some(marker) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(tokio::spawn(marker.run(rx))))
            }
            None => (None, None),
        };
        while self.gather(&mut rx, &mut batch, last_write).await > 0 {
            if let Some(pinned) = self.counted_from.take() {
                // Told, or the counts gave up (the sender is gone), or it takes too long: the
                // counts only inform, the records must go on.
                let _ = tokio::time::timeout(COUNT_PIN_WAIT, pinned).await;
            }
            last_write = Some(tokio::time::Instant::now());
            let accepted = self.record(&batch).await;
            let accepted: std::collections::HashSet<&str> =
                accepted.iter().map(String::as_str).collect();
            let mut passive = Vec::new();
            for s in &batch {
                self.progress.done.fetch_add(1, Ordering::Relaxed);
                // Only what the ledger took counts: a lease lost to a peer settled nothing.
                if !accepted.contains(s.token.as_str()) {
                    summary.api_calls += s.calls.len() as u64;
                    continue;
                }
                if let Decision::Settle { outcome, .. } = &s.decision {
                    self.metrics.session_settled(outcome.as_str());
                    if outcome.marks_passive() {
                        passive.push(s.token.clone());
                    }
                }
                summary.count(s);
            }
            batch.clear();
            if let Some(marks) = marks.as_ref().filter(|_| !passive.is_empty()) {
                // The marker only ends once this sender is dropped below.
                let _ = marks.send(passive);
            }
        }
        drop(marks);
        if let Some(marked) = marked {
            // The marker catches its own failures; a panic in it leaves the rows owed.
            let _ = marked.await;
        }
        summary
    }

    /// Waits for the next batch: at least one settlement, and then more until
    /// [`RECORD_INTERVAL`] has passed since the last write began (or [`RECORD_BATCH`] are in,
    /// or every sender is gone). Returns how many there are; 0 once all is written.
    async fn gather(
        &self,
        rx: &mut mpsc::Receiver<Settlement>,
        batch: &mut Vec<Settlement>,
        last_write: Option<tokio::time::Instant>,
    ) -> usize {
        if rx.recv_many(batch, RECORD_BATCH).await == 0 {
            return 0;
        }
        let Some(last) = last_write else {
            return batch.len();
        };
        let next = last + RECORD_INTERVAL;
        while batch.len() < RECORD_BATCH {
            tokio::select! {
                n = rx.recv_many(batch, RECORD_BATCH - batch.len()) => if n == 0 { break },
                _ = tokio::time::sleep_until(next) => break,
                _ = self.sweep.aborted() => break,
            }
        }
        batch.len()
    }

    /// Writes one batch of the attempt log and ledger; returns the tokens the ledger accepted.
    async fn record(&self, batch: &[Settlement]) -> Vec<String> {
        let mut delays = doubling(RECORD_RETRY_FIRST, RECORD_RETRY_MAX);
        let mut tries = 0;
        loop {
            let write = bounded(
                &self.sweep,
                "recording outcomes",
                self.store.record(&self.worker, batch),
            );
            let e = match write.await {
                Ok(accepted) => return accepted,
                Err(e) => e,
            };
            // Past the grace period one more try is all the time there is.
            let budget = if self.sweep.is_aborted() {
                0
            } else {
                RECORD_RETRIES
            };
            if tries >= budget {
                // Sessions invalidated but not recorded keep their lease until it lapses;
                // the next attempt is answered `260030` and settles them.
                tracing::error!(error = %e, lost = batch.len(), "cannot record outcomes; stopping the sweep");
                self.state
                    .store_failure
                    .lock()
                    .expect("lock")
                    .get_or_insert(e);
                self.sweep.stop();
                return Vec::new();
            }
            tries += 1;
            tracing::warn!(error = %e, tries, "recording outcomes failed; retrying");
            let delay = delays.next().unwrap_or(RECORD_RETRY_MAX);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.sweep.aborted() => {}
            }
        }
    }
}

/// Marks invalidated sessions' source rows passive after the recorder has written them, batch
/// after batch as they come, until the recorder is done.
struct Marker {
    store: Arc<dyn Store>,
    metrics: Metrics,
    sweep: Shutdown,
    idle_after: Duration,
    clock: DbClock,
}

impl Marker {
    /// Marks what the recorder hands over, at most one mark every [`MARK_INTERVAL`]: the
    /// batches of that time go together (the ledger already holds them, and the source only
    /// learns a little later what iyzico has done), so the marks cost the database fewer
    /// statements than the records, beside which they run.
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Vec<String>>) {
        let mut waiting = Vec::new();
        while rx.recv_many(&mut waiting, RECORD_BATCH).await > 0 {
            let next = tokio::time::Instant::now() + MARK_INTERVAL;
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut waiting, RECORD_BATCH) => if n == 0 { break },
                    _ = tokio::time::sleep_until(next) => break,
                    _ = self.sweep.stopping() => break,
                }
            }
            let tokens: Vec<String> = waiting.drain(..).flatten().collect();
            for piece in tokens.chunks(RECORD_BATCH) {
                self.mark(piece).await;
            }
        }
    }

    /// Marks source rows passive; on failure they stay owed (ledger: invalidated, source not
    /// marked) and the next sweep tries again. They are never sent again either way.
    async fn mark(&self, tokens: &[String]) {
        let mut last_error = None;
        for _ in 0..MARK_RETRIES {
            let step = bounded(
                &self.sweep,
                "marking sessions passive",
                self.store
                    .mark_passive(tokens, cutoff_before(self.clock.now(), self.idle_after)),
            );
            match step.await {
                Ok(_) => return,
                Err(e) => last_error = Some(e),
            }
            if self.sweep.is_aborted() {
                break;
            }
        }
        if let Some(e) = last_error {
            tracing::error!(error = %e, sessions = tokens.len(), "invalidated, but the source rows could not be marked passive; retried next sweep");
            self.metrics.source_unmarked(tokens.len() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SweepSettings {
        SweepSettings {
            batch_size: 10,
            rate_per_second: 10,
            calls_per_attempt: 4,
            concurrency: 2,
            lease: Duration::from_secs(300),
            max_attempts: 10,
            retry_base: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            idle_after: Duration::from_secs(1800),
            stale_after: Duration::from_secs(15),
            max_sessions: None,
            mark_passive: true,
        }
    }

    #[test]
    fn claims_never_exceed_what_this_replica_can_send_in_half_a_lease() {
        let mut s = settings();
        s.batch_size = 500;
        // 10/s × 300 s / 2 / 4 calls = 375; with 8 replicas 1.25/s → 46.
        assert_eq!(s.claim_size(1), 375);
        assert_eq!(s.claim_size(8), 46);
        s.rate_per_second = 100_000;
        assert_eq!(s.claim_size(1), 500);
        s.rate_per_second = 1;
        s.lease = Duration::from_secs(1);
        assert_eq!(s.claim_size(4), 1, "always at least one");
    }

    #[test]
    fn the_first_claim_only_fills_the_slots_and_max_sessions_ends_claiming() {
        let mut s = settings();
        s.batch_size = 500;
        s.rate_per_second = 100_000;
        s.concurrency = 64;
        assert_eq!(s.next_claim(1, 0), 64, "the first claim fills the slots");
        assert_eq!(s.next_claim(1, 64), 500, "then whole batches");
        s.concurrency = 1000;
        assert_eq!(s.next_claim(1, 0), 500, "never more than a batch");
        s.max_sessions = Some(530);
        assert_eq!(s.next_claim(1, 0), 500);
        assert_eq!(s.next_claim(1, 500), 30);
        assert_eq!(
            s.next_claim(1, 530),
            0,
            "nothing once max_sessions are claimed"
        );
        assert_eq!(s.next_claim(1, 600), 0);
    }

    #[test]
    fn retry_delay_doubles_from_base_up_to_max() {
        let s = settings();
        let secs: Vec<u64> = (1..=9).map(|a| s.retry_delay(a).as_secs()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(s.retry_delay(60).as_secs(), 3600);
    }
}
