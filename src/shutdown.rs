//! One shutdown handle threaded through every task: a graceful *stop* (stop claiming, finish
//! in-flight calls) followed, after the grace period, by an *abort* (drop what is still running).
//! The signal listener lives here too, so tests can stop things without signalling themselves.

use std::time::Duration;

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// Graceful stop plus hard abort, cloneable and awaitable any number of times.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    abort: CancellationToken,
}

impl Shutdown {
    /// A handle nothing has triggered yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a graceful stop; the abort follows by itself after `grace`.
    pub fn begin(&self, grace: Duration) {
        if self.stop.is_cancelled() {
            return;
        }
        self.stop.cancel();
        let abort = self.abort.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => abort.cancel(),
                _ = abort.cancelled() => {}
            }
        });
    }

    /// Stops claiming without a deadline for calls in flight (an auth failure, a dead database).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Aborts at once: whatever is in flight is dropped.
    pub fn abort(&self) {
        self.stop.cancel();
        self.abort.cancel();
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once a stop is requested.
    pub async fn stopping(&self) {
        self.stop.cancelled().await
    }

    /// Whether in-flight work must be dropped.
    pub fn is_aborted(&self) -> bool {
        self.abort.is_cancelled()
    }

    /// Resolves once in-flight work must be dropped.
    pub async fn aborted(&self) {
        self.abort.cancelled().await
    }

    /// A handle that stops when this one stops, and that can also be stopped on its own
    /// (a sweep uses one to end itself on an auth failure without stopping the daemon).
    pub fn child(&self) -> Self {
        Self {
            stop: self.stop.child_token(),
            abort: self.abort.child_token(),
        }
    }
}

/// Whether this worker may still call the API (self-fencing). Peers may take its sessions once
/// its heartbeat is `stale_after` old by the database's clock; it stops sending, and cancels
/// the calls in flight, at an earlier deadline: `max_age` after the moment its last good beat
/// was *sent* (the database wrote a time at or after that moment, so the deadline can only be
/// early, never late). The margin between the two covers the cancellation itself.
#[derive(Clone, Debug)]
pub struct Liveness {
    origin: tokio::time::Instant,
    last_beat_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    max_age: Duration,
}

impl Liveness {
    /// Fresh now; fenced once no beat sent later than `max_age` ago succeeded.
    pub fn new(max_age: Duration) -> Self {
        Self {
            origin: tokio::time::Instant::now(),
            last_beat_ms: Default::default(),
            max_age,
        }
    }

    /// Never fenced (a client used outside a fleet, as in tests and the simulator's trials).
    pub fn always() -> Self {
        Self::new(Duration::MAX)
    }

    /// Records a successful heartbeat that was sent at `sent`.
    pub fn beat_sent_at(&self, sent: tokio::time::Instant) {
        let at = sent.saturating_duration_since(self.origin).as_millis() as u64;
        self.last_beat_ms
            .fetch_max(at, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a successful heartbeat sent just now.
    pub fn beat(&self) {
        self.beat_sent_at(tokio::time::Instant::now());
    }

    /// The moment this worker must have stopped calling, as things stand.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        let last =
            Duration::from_millis(self.last_beat_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.origin.checked_add(last)?.checked_add(self.max_age)
    }

    /// Whether the last heartbeat is recent enough to send.
    pub fn is_fresh(&self) -> bool {
        self.deadline()
            .is_none_or(|d| tokio::time::Instant::now() < d)
    }

    /// Resolves once the fencing deadline passes without a newer beat.
    pub async fn fenced(&self) {
        loop {
            match self.deadline() {
                None => return std::future::pending().await,
                Some(d) if tokio::time::Instant::now() >= d => return,
                Some(d) => tokio::time::sleep_until(d).await,
            }
        }
    }
}

/// Keeps SIGHUP (a closed terminal, an ssh session that dropped) from killing a command that
/// is not `run`: the command goes on, and the hangup is logged. Only `run` reloads on SIGHUP.
pub fn ignore_hangups() -> std::io::Result<()> {
    let mut signals = signal_hook_tokio::Signals::new([signal_hook::consts::SIGHUP])?;
    tokio::spawn(async move {
        while signals.next().await.is_some() {
            tracing::warn!("SIGHUP ignored: only `run` reloads its config; this command goes on");
        }
    });
    Ok(())
}

/// The exit code of a forced stop after a second signal: 128 + the signal number.
pub type ForcedExit = i32;

/// Listens for SIGTERM and SIGINT: the first begins a graceful stop with `grace`, the second
/// resolves the returned future with 128 + signal, for the binary to exit at once.
pub fn listen_for_signals(
    shutdown: Shutdown,
    grace: Duration,
) -> std::io::Result<impl Future<Output = ForcedExit>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
    Ok(async move {
        let mut seen = 0;
        while let Some(signal) = signals.next().await {
            seen += 1;
            if seen == 1 {
                tracing::info!(signal, grace = ?grace, "stopping: no new claims, finishing in-flight calls");
                shutdown.begin(grace);
            } else {
                tracing::warn!(signal, "second signal: stopping immediately");
                shutdown.abort();
                return 128 + signal;
            }
        }
        std::future::pending().await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn abort_follows_stop_after_grace() {
        let s = Shutdown::new();
        let child = s.child();
        s.begin(Duration::from_secs(5));
        assert!(child.is_stopping());
        tokio::time::timeout(Duration::from_secs(4), child.aborted())
            .await
            .unwrap_err();
        tokio::time::timeout(Duration::from_secs(2), child.aborted())
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_goes_stale_without_beats_and_fences_at_the_deadline() {
        let l = Liveness::new(Duration::from_millis(30));
        assert!(l.is_fresh());
        let sent = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_millis(20)).await;
        // A beat that took 20 ms to come back counts from when it was sent.
        l.beat_sent_at(sent);
        tokio::time::timeout(Duration::from_millis(9), l.fenced())
            .await
            .unwrap_err();
        tokio::time::timeout(Duration::from_millis(5), l.fenced())
            .await
            .unwrap();
        assert!(!l.is_fresh());
        l.beat();
        assert!(l.is_fresh());
        assert!(Liveness::always().is_fresh());
    }

    #[tokio::test]
    async fn child_stops_alone() {
        let s = Shutdown::new();
        let child = s.child();
        child.abort();
        assert!(child.is_stopping());
        assert!(!s.is_stopping());
    }
}
