//! Fleet membership: every worker keeps a heartbeat row, which makes its leases count, lets the
//! others rescue its sessions within seconds when it dies, and splits the fleet's rate budget.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinHandle;

use crate::clock::{DbClock, SKEW_WARNING};
use crate::iyzico::limiter::SharedLimiter;
use crate::shutdown::{Liveness, Shutdown};
use crate::store::{Store, StoreError, WorkerInfo};
use crate::telemetry::Metrics;

/// Extra looks at the fleet right after joining, so simultaneous starts share the budget
/// within a quarter second instead of a whole heartbeat period.
const FAST_DISCOVERY: [Duration; 2] = [Duration::from_millis(250), Duration::from_millis(500)];

/// This process's identity: unique per start, so a restarted process never waits on the
/// leases of its dead predecessor.
///
/// The "host" it is grouped under is the hostname plus the boot id and the pid namespace: only
/// within one of those do pids and `/proc` mean the same thing, so only there may a worker
/// judge another dead by its pid. Two containers that share a hostname never qualify.
pub fn this_worker() -> WorkerInfo {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .ok()
    };
    let hostname = read("/proc/sys/kernel/hostname")
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    let boot = read("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let pid_ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pid = std::process::id();
    let nonce = &uuid::Uuid::new_v4().simple().to_string()[..8];
    WorkerInfo {
        id: format!("{hostname}:{pid}:{nonce}"),
        hostname: format!("{hostname}#{}#{pid_ns}", boot.get(..8).unwrap_or(&boot)),
        pid,
    }
}

/// Whether a process with this pid exists on this host.
fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A running heartbeat; `leave` ends it and deregisters the worker.
pub struct Membership {
    worker: WorkerInfo,
    store: Arc<dyn Store>,
    stop: Shutdown,
    task: JoinHandle<()>,
}

/// What a heartbeat keeps up to date besides the row itself.
#[derive(Clone)]
pub struct FleetView {
    /// The fleet's rate budget, shared by the live replicas.
    pub limiter: Arc<SharedLimiter>,
    /// Metrics (replicas, readiness, skew).
    pub metrics: Metrics,
    /// Self-fencing: fresh while beats succeed.
    pub liveness: Liveness,
    /// The database's clock as measured by each beat.
    pub clock: DbClock,
    /// Whether the last beat found the skew past [`SKEW_WARNING`] (so it is said once).
    pub skewed: Arc<std::sync::atomic::AtomicBool>,
}

/// One heartbeat round trip: the row, then the leases, then the fleet's size. Returns the live
/// count; records the skew it measured and, on success, the moment it was sent as the last beat.
async fn beat(
    store: &dyn Store,
    worker: &WorkerInfo,
    lease: Duration,
    stale_after: Duration,
    view: &FleetView,
) -> Result<u32, StoreError> {
    let sent = tokio::time::Instant::now();
    let sent_wall = Utc::now();
    let written = store.heartbeat(worker).await?;
    let skew = view.clock.observe(written, sent_wall, Utc::now());
    view.metrics.set_clock_skew(skew);
    // Said when it starts and when it ends, not at every beat.
    let skewed = skew.abs() > SKEW_WARNING;
    if skewed
        != view
            .skewed
            .swap(skewed, std::sync::atomic::Ordering::Relaxed)
    {
        if skewed {
            tracing::warn!(
                skew_ms = skew.num_milliseconds(),
                "this host's clock differs from the database's by more than a second; leases are \
                 safe (the database's clock decides them), but check NTP"
            );
        } else {
            tracing::info!(
                skew_ms = skew.num_milliseconds(),
                "this host's clock agrees with the database's again"
            );
        }
    }
    store.renew_leases(&worker.id, lease).await?;
    let live = store.live_workers(stale_after).await?;
    view.liveness.beat_sent_at(sent);
    Ok(live)
}

impl Membership {
    /// Registers `worker`, forgets dead predecessors on this host, and keeps the heartbeat
    /// (and the limiter's share of the budget) up to date every `period` until `leave`.
    pub async fn join(
        store: Arc<dyn Store>,
        worker: WorkerInfo,
        period: Duration,
        stale_after: Duration,
        lease: Duration,
        view: FleetView,
    ) -> Result<Self, StoreError> {
        for w in store.workers_on_host(&worker.hostname).await? {
            // Same pid in a fresh process (a restarted container is pid 1 again) or no such
            // process: the predecessor is dead, and its leases should not make anyone wait.
            if w.id != worker.id && (w.pid == worker.pid || !process_exists(w.pid)) {
                tracing::info!(worker = %w.id, "forgetting a dead worker from this host");
                store.forget_worker(&w.id).await?;
            }
        }
        let mut live = beat(&*store, &worker, lease, stale_after, &view).await?;
        // Of replicas starting together, the later to register always counts the earlier
        // (its count follows both registrations) and waits below; the earlier spends the
        // budget alone until it sees the newcomer at its next look (`FAST_DISCOVERY`), which
        // comes before the newcomer's first request. So no one waits before a first look.
        if live > 1 {
            // The others learn of us at their next beat; until then they still spend the
            // shares they had. Waiting one period keeps the fleet within its budget.
            tokio::time::sleep(period).await;
            live = beat(&*store, &worker, lease, stale_after, &view).await?;
        }
        view.limiter.set_replicas(live);
        view.metrics.set_replicas(live);
        let stop = Shutdown::new();
        let task = tokio::spawn(
            Heartbeat {
                store: store.clone(),
                worker: worker.clone(),
                period,
                stale_after,
                lease,
                view,
                stop: stop.clone(),
            }
            .run(),
        );
        Ok(Self {
            worker,
            store,
            stop,
            task,
        })
    }

    /// This worker's id (the lease owner).
    pub fn worker_id(&self) -> &str {
        &self.worker.id
    }

    /// Stops the heartbeat (a beat already under way is let end) and removes the worker row:
    /// both within one short bound, for at exit a stalled database must not hold the process
    /// (the row then goes stale by itself).
    pub async fn leave(self) {
        self.stop.abort();
        let heartbeat = self.task.abort_handle();
        // One bound for both: the beat under way, then the removal.
        let left = tokio::time::timeout(crate::sweep::FINAL_STEP_TIMEOUT, async {
            let _ = self.task.await;
            self.store.forget_worker(&self.worker.id).await
        })
        .await;
        heartbeat.abort();
        match left {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not deregister this worker; it will go stale by itself")
            }
            Err(_) => tracing::warn!(
                "the database did not answer the deregistration in time; this worker will go stale by itself"
            ),
        }
    }
}

/// The background loop of one membership.
struct Heartbeat {
    store: Arc<dyn Store>,
    worker: WorkerInfo,
    period: Duration,
    stale_after: Duration,
    lease: Duration,
    view: FleetView,
    stop: Shutdown,
}

impl Heartbeat {
    async fn run(self) {
        // Replicas that start together only see each other once each has registered: look again
        // soon after joining, then settle into the regular period.
        let mut delays = FAST_DISCOVERY
            .iter()
            .copied()
            .chain(std::iter::repeat(self.period));
        let mut next = delays.next().expect("endless");
        loop {
            tokio::select! {
                _ = self.stop.stopping() => return,
                _ = tokio::time::sleep(next) => {}
            }
            next = delays.next().expect("endless");
            // Readiness follows the heartbeat: a beat that fails, or takes longer than a
            // period, says "not ready" at once; the next good one says "ready" again.
            let round = beat(
                &*self.store,
                &self.worker,
                self.lease,
                self.stale_after,
                &self.view,
            );
            tokio::pin!(round);
            // A beat cut short on leaving would still run in the database (its statements are
            // sent) and could register this worker again after `leave` removed it: a stop lets
            // the beat end first (`leave` bounds the wait).
            let finish = |round| async move {
                let _ = round.await;
            };
            let result = tokio::select! {
                r = &mut round => r,
                _ = tokio::time::sleep(self.period) => {
                    self.view.metrics.set_reachable(false);
                    tracing::warn!(period = ?self.period, "heartbeat is taking longer than a period; not ready");
                    tokio::select! {
                        r = &mut round => r,
                        _ = self.stop.stopping() => return finish(round).await,
                    }
                }
                _ = self.stop.stopping() => return finish(round).await,
            };
            match result {
                Ok(live) => {
                    self.view.metrics.set_reachable(true);
                    if live != self.view.limiter.replicas() {
                        tracing::info!(
                            replicas = live,
                            "fleet size changed; adjusting this worker's share of the rate budget"
                        );
                    }
                    self.view.limiter.set_replicas(live);
                    self.view.metrics.set_replicas(live);
                }
                Err(e) => {
                    self.view.metrics.set_reachable(false);
                    tracing::warn!(error = %e, "heartbeat failed; not ready");
                }
            }
        }
    }
}
