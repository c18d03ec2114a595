//! Fleet membership: every worker keeps a heartbeat row, which makes its leases count, lets the
//! others rescue its sessions within seconds when it dies, and splits the fleet's rate budget.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinHandle;

use crate::iyzico::limiter::SharedLimiter;
use crate::shutdown::{Liveness, Shutdown};
use crate::store::{Store, StoreError, WorkerInfo};
use crate::telemetry::Metrics;

/// Extra looks at the fleet right after joining, so simultaneous starts share the budget
/// within a quarter second instead of a whole heartbeat period.
const FAST_DISCOVERY: [Duration; 2] = [Duration::from_millis(250), Duration::from_millis(500)];
/// How long `join` waits before its first count of the fleet.
const FIRST_LOOK: Duration = Duration::from_millis(100);

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

impl Membership {
    /// Registers `worker`, forgets dead predecessors on this host, and keeps the heartbeat
    /// (and the limiter's share of the budget) up to date every `period` until `leave`.
    pub async fn join(
        store: Arc<dyn Store>,
        worker: WorkerInfo,
        period: Duration,
        lease: Duration,
        limiter: Arc<SharedLimiter>,
        metrics: Metrics,
        liveness: Liveness,
    ) -> Result<Self, StoreError> {
        for w in store.workers_on_host(&worker.hostname).await? {
            // Same pid in a fresh process (a restarted container is pid 1 again) or no such
            // process: the predecessor is dead, and its leases should not make anyone wait.
            if w.id != worker.id && (w.pid == worker.pid || !process_exists(w.pid)) {
                tracing::info!(worker = %w.id, "forgetting a dead worker from this host");
                store.forget_worker(&w.id).await?;
            }
        }
        store.heartbeat(&worker, Utc::now()).await?;
        liveness.beat();
        let stale_after = period * 3;
        // Give replicas starting together a moment to register, then take our share before
        // the first request, so a simultaneous start does not spend the budget several times.
        tokio::time::sleep(FIRST_LOOK).await;
        let mut live = store.live_workers(Utc::now() - stale_after).await?;
        if live > 1 {
            // The others learn of us at their next beat; until then they still spend the
            // shares they had. Waiting one period keeps the fleet within its budget.
            tokio::time::sleep(period).await;
            store.heartbeat(&worker, Utc::now()).await?;
            liveness.beat();
            live = store.live_workers(Utc::now() - stale_after).await?;
        }
        limiter.set_replicas(live);
        metrics.set_replicas(live);
        let stop = Shutdown::new();
        let task = tokio::spawn(
            Heartbeat {
                store: store.clone(),
                worker: worker.clone(),
                period,
                stale_after,
                lease,
                limiter,
                metrics,
                liveness,
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

    /// Stops the heartbeat and removes the worker row.
    pub async fn leave(self) {
        self.stop.abort();
        let _ = self.task.await;
        if let Err(e) = self.store.forget_worker(&self.worker.id).await {
            tracing::warn!(error = %e, "could not deregister this worker; it will go stale by itself");
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
    limiter: Arc<SharedLimiter>,
    metrics: Metrics,
    liveness: Liveness,
    stop: Shutdown,
}

impl Heartbeat {
    async fn run(self) {
        let Heartbeat {
            store,
            worker,
            period,
            stale_after,
            lease,
            limiter,
            metrics,
            liveness,
            stop,
        } = self;
        // Replicas that start together only see each other once each has registered: look again
        // soon after joining, then settle into the regular period.
        let mut delays = FAST_DISCOVERY
            .iter()
            .copied()
            .chain(std::iter::repeat(period));
        let mut next = delays.next().expect("endless");
        loop {
            tokio::select! {
                _ = stop.stopping() => return,
                _ = tokio::time::sleep(next) => {}
            }
            next = delays.next().expect("endless");
            let now = Utc::now();
            let result = async {
                store.heartbeat(&worker, now).await?;
                store.renew_leases(&worker.id, now + lease).await?;
                store.live_workers(now - stale_after).await
            }
            .await;
            match result {
                Ok(live) => {
                    liveness.beat();
                    if live != limiter.replicas() {
                        tracing::info!(
                            replicas = live,
                            "fleet size changed; adjusting this worker's share of the rate budget"
                        );
                    }
                    limiter.set_replicas(live);
                    metrics.set_replicas(live);
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }
}
