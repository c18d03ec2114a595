//! Logs (tracing, text or JSON) and the Prometheus metrics every part records into.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use sha2::Digest;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogConfig, LogFormat};

/// Changes the log filter of the running process (`log.level` on a config reload).
#[derive(Clone)]
pub struct LogLevelHandle(Arc<SetFilter>);

/// Replaces the running filter with the one a directive describes.
type SetFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

impl LogLevelHandle {
    /// Applies `level` (a `tracing` filter directive). `RUST_LOG`, when set, still wins.
    pub fn set(&self, level: &str) -> Result<(), String> {
        if std::env::var_os("RUST_LOG").is_some() {
            return Err("RUST_LOG is set and wins over log.level".into());
        }
        (self.0)(level)
    }
}

impl std::fmt::Debug for LogLevelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogLevelHandle")
    }
}

/// Installs the global `tracing` subscriber writing to `sink`. `RUST_LOG` wins over the config.
/// Returns a handle to change the level later, or `None` when a subscriber was already
/// installed (tests install one per process).
pub fn init_logging<W>(log: &LogConfig, sink: W) -> Option<LogLevelHandle>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&log.level));
    // A log line that cannot be written is dropped. By default the subscriber reports that on
    // stderr with `eprintln!`, which panics when stderr is the closed pipe: in a sqlx worker
    // thread that left a transaction open and the sweep waiting forever.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .log_internal_errors(false);
    fn handle<S: Send + Sync + 'static>(
        h: tracing_subscriber::reload::Handle<EnvFilter, S>,
    ) -> LogLevelHandle {
        LogLevelHandle(Arc::new(move |level: &str| {
            let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            h.reload(filter).map_err(|e| e.to_string())
        }))
    }
    match log.format {
        LogFormat::Text => {
            let builder = builder.with_target(false).with_filter_reloading();
            let h = handle(builder.reload_handle());
            builder.try_init().is_ok().then_some(h)
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_filter_reloading();
            let h = handle(builder.reload_handle());
            builder.try_init().is_ok().then_some(h)
        }
    }
}

/// A short, stable, non-reversible fingerprint of a session token, for logs.
pub fn fingerprint(token: &str) -> String {
    let digest = sha2::Sha256::digest(token.as_bytes());
    hex::encode(&digest[..4])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiCallLabels {
    class: &'static str,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildInfoLabels {
    version: &'static str,
    commit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Every metric the process exposes; cheap to clone, shared by all tasks.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    sessions: Family<OutcomeLabel, Counter>,
    api_calls: Family<ApiCallLabels, Counter>,
    api_latency: Histogram,
    sweep_duration: Histogram,
    sweeps: Family<ResultLabel, Counter>,
    last_success: Gauge<f64, AtomicU64>,
    backlog: Gauge,
    rate_wait: Counter<f64, AtomicU64>,
    skipped_ticks: Counter,
    auth_failures: Counter,
    replicas: Gauge,
    ready: Gauge,
    readiness: std::sync::Mutex<Readiness>,
    unusable_rows: Family<ReasonLabel, Gauge>,
    source_unmarked: Counter,
    clock_skew: Gauge<f64, AtomicU64>,
    last_sweep: std::sync::Mutex<Option<LastSweep>>,
}

/// What readiness is made of: ready when both hold.
struct Readiness {
    /// The database answered the last heartbeat (or start-up's checks) within a period.
    reachable: bool,
    /// The last sweep did not fail (true before the first).
    sweeping: bool,
}

/// How the last sweep of this process ended (for the status page).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LastSweep {
    /// `ok`, `failed` or `aborted`.
    pub result: &'static str,
    /// When it ended.
    pub finished_at: chrono::DateTime<chrono::Utc>,
    /// How long it ran, in seconds (0 when it failed).
    pub duration_seconds: f64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A metric's name and help text.
type Described = (&'static str, &'static str);

// Every metric's name and help, in the order `/metrics` lists them.
const UNUSABLE_ROWS: Described = (
    "sweeper_source_rows_unusable",
    "Active source rows never sent, by reason (unreadable_last_activity, bad_source_row)",
);
const SOURCE_UNMARKED: Described = (
    "sweeper_source_unmarked",
    "Invalidated sessions whose source row could not be marked passive (retried each sweep)",
);
const CLOCK_SKEW: Described = (
    "sweeper_clock_skew_seconds",
    "The database's clock minus this host's, as the last heartbeat measured it",
);
const SESSIONS: Described = ("sweeper_sessions", "Sessions settled, by outcome");
const API_CALLS: Described = (
    "sweeper_api_calls",
    "API calls, by result class and HTTP status",
);
const API_LATENCY: Described = ("sweeper_api_latency_seconds", "API call latency");
const SWEEP_DURATION: Described = ("sweeper_sweep_duration_seconds", "Duration of one sweep");
const SWEEPS: Described = ("sweeper_sweeps", "Sweeps, by result");
const LAST_SUCCESS: Described = (
    "sweeper_last_successful_sweep_timestamp_seconds",
    "Unix time the last sweep finished without error",
);
const BACKLOG: Described = ("sweeper_backlog_sessions", "Sessions eligible right now");
const RATE_WAIT: Described = (
    "sweeper_rate_limit_wait_seconds",
    "Time spent waiting on the rate limiter",
);
const SKIPPED_TICKS: Described = (
    "sweeper_skipped_ticks",
    "Schedule ticks skipped because a sweep was still running",
);
const AUTH_FAILURES: Described = (
    "sweeper_auth_failures",
    "API calls refused for bad credentials",
);
const REPLICAS: Described = (
    "sweeper_fleet_replicas",
    "Live replicas sharing the rate budget",
);
const READY: Described = (
    "sweeper_ready",
    "1 when the database is reachable and sweeps succeed",
);
const BUILD_INFO: Described = (
    "sweeper_build_info",
    "Always 1; the labels name the running build",
);

/// Registers metrics and hands them back, so each is named once where it is created.
struct Registrar(Registry);

impl Registrar {
    fn add<M: Metric + Clone>(&mut self, (name, help): Described, metric: M) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }
}

/// `sweeper_build_info`: 1, labelled with this build's version and commit.
fn build_info() -> Family<BuildInfoLabels, Gauge> {
    let family = Family::<BuildInfoLabels, Gauge>::default();
    family
        .get_or_create(&BuildInfoLabels {
            version: crate::build_info::VERSION,
            commit: crate::build_info::COMMIT,
        })
        .set(1);
    family
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut r = Registrar(Registry::default());
        let unusable_rows = r.add(UNUSABLE_ROWS, Family::default());
        let source_unmarked = r.add(SOURCE_UNMARKED, Counter::default());
        let clock_skew = r.add(CLOCK_SKEW, Gauge::<f64, AtomicU64>::default());
        let sessions = r.add(SESSIONS, Family::default());
        let api_calls = r.add(API_CALLS, Family::default());
        let api_latency = r.add(
            API_LATENCY,
            Histogram::new(exponential_buckets(0.005, 2.0, 14)),
        );
        let sweep_duration = r.add(
            SWEEP_DURATION,
            Histogram::new(exponential_buckets(0.1, 2.0, 16)),
        );
        let sweeps = r.add(SWEEPS, Family::default());
        let last_success = r.add(LAST_SUCCESS, Gauge::<f64, AtomicU64>::default());
        let backlog = r.add(BACKLOG, Gauge::default());
        let rate_wait = r.add(RATE_WAIT, Counter::<f64, AtomicU64>::default());
        let skipped_ticks = r.add(SKIPPED_TICKS, Counter::default());
        let auth_failures = r.add(AUTH_FAILURES, Counter::default());
        let replicas = r.add(REPLICAS, Gauge::default());
        let ready = r.add(READY, Gauge::default());
        r.add(BUILD_INFO, build_info());
        Self {
            inner: Arc::new(Inner {
                registry: r.0,
                sessions,
                api_calls,
                api_latency,
                sweep_duration,
                sweeps,
                last_success,
                backlog,
                rate_wait,
                skipped_ticks,
                auth_failures,
                replicas,
                ready,
                readiness: std::sync::Mutex::new(Readiness {
                    reachable: false,
                    sweeping: true,
                }),
                unusable_rows,
                source_unmarked,
                clock_skew,
                last_sweep: std::sync::Mutex::new(None),
            }),
        }
    }

    /// Active source rows the sweep cannot use, as `(reason, rows)` pairs.
    pub fn set_unusable(&self, by_reason: impl IntoIterator<Item = (&'static str, u64)>) {
        for (reason, n) in by_reason {
            self.inner
                .unusable_rows
                .get_or_create(&ReasonLabel { reason })
                .set(n as i64);
        }
    }

    /// Invalidated sessions whose source update failed this time.
    pub fn source_unmarked(&self, n: u64) {
        self.inner.source_unmarked.inc_by(n);
    }

    /// The skew the last heartbeat measured (database minus local).
    pub fn set_clock_skew(&self, skew: chrono::Duration) {
        self.inner
            .clock_skew
            .set(skew.num_milliseconds() as f64 / 1000.0);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts a settled session.
    pub fn session_settled(&self, outcome: &'static str) {
        self.inner
            .sessions
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Counts one API call and its latency.
    pub fn api_call(&self, class: &'static str, status: Option<u16>, latency: Duration) {
        let status = status.map_or_else(|| "none".to_owned(), |s| s.to_string());
        self.inner
            .api_calls
            .get_or_create(&ApiCallLabels { class, status })
            .inc();
        self.inner.api_latency.observe(latency.as_secs_f64());
        if class == "auth" {
            self.inner.auth_failures.inc();
        }
    }

    /// Records a finished sweep.
    pub fn sweep_finished(&self, result: &'static str, duration: Duration) {
        self.inner
            .sweeps
            .get_or_create(&ResultLabel { result })
            .inc();
        self.inner.sweep_duration.observe(duration.as_secs_f64());
        *self.inner.last_sweep.lock().expect("last sweep lock") = Some(LastSweep {
            result,
            finished_at: chrono::Utc::now(),
            duration_seconds: duration.as_secs_f64(),
        });
        if result == "ok" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            self.inner.last_success.set(now.as_secs_f64());
        }
    }

    /// Sets the eligible backlog.
    pub fn set_backlog(&self, n: u64) {
        self.inner.backlog.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Adds time spent waiting on the rate limiter.
    pub fn rate_limit_waited(&self, waited: Duration) {
        self.inner.rate_wait.inc_by(waited.as_secs_f64());
    }

    /// Counts a schedule tick skipped because a sweep was running.
    pub fn tick_skipped(&self) {
        self.inner.skipped_ticks.inc();
    }

    /// Sets the number of live replicas sharing the budget.
    pub fn set_replicas(&self, n: u32) {
        self.inner.replicas.set(i64::from(n));
    }

    /// Whether the database answered the last heartbeat (or start-up's checks) in time.
    pub fn set_reachable(&self, reachable: bool) {
        self.update_readiness(|r| r.reachable = reachable);
    }

    /// Whether the last sweep succeeded: a failed sweep keeps readiness off until one does,
    /// however many heartbeats succeed meanwhile.
    pub fn set_sweeping(&self, sweeping: bool) {
        self.update_readiness(|r| r.sweeping = sweeping);
    }

    fn update_readiness(&self, change: impl FnOnce(&mut Readiness)) {
        let mut readiness = self.inner.readiness.lock().expect("readiness lock");
        change(&mut readiness);
        let ready = readiness.reachable && readiness.sweeping;
        self.inner.ready.set(i64::from(ready));
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.get() == 1
    }

    /// The eligible backlog at the start of the last sweep.
    pub fn backlog(&self) -> u64 {
        self.inner.backlog.get().max(0) as u64
    }

    /// Live replicas sharing the rate budget, as the last heartbeat counted them.
    pub fn replicas(&self) -> u32 {
        self.inner.replicas.get().clamp(0, i64::from(u32::MAX)) as u32
    }

    /// The clock skew the last heartbeat measured, in seconds (database minus local).
    pub fn clock_skew_seconds(&self) -> f64 {
        self.inner.clock_skew.get()
    }

    /// How this process's last sweep ended, if one did.
    pub fn last_sweep(&self) -> Option<LastSweep> {
        *self.inner.last_sweep.lock().expect("last sweep lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_short_and_hides_the_token() {
        let fp = fingerprint("f2f06a82-6480-4d2b-811d-93168ddce577");
        assert_eq!(fp.len(), 8);
        assert!(!"f2f06a82-6480-4d2b-811d-93168ddce577".contains(&fp));
        assert_eq!(fp, fingerprint("f2f06a82-6480-4d2b-811d-93168ddce577"));
    }

    #[test]
    fn renders_prometheus_text_with_contract_names() {
        let m = Metrics::new();
        m.session_settled("invalidated");
        m.api_call("retryable", Some(503), Duration::from_millis(20));
        m.api_call("retryable", None, Duration::from_millis(20));
        m.sweep_finished("ok", Duration::from_secs(1));
        let text = m.render();
        assert!(
            text.contains("sweeper_sessions_total{outcome=\"invalidated\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sweeper_api_calls_total{class=\"retryable\",status=\"503\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sweeper_api_calls_total{class=\"retryable\",status=\"none\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sweeper_api_latency_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("sweeper_sweeps_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("sweeper_last_successful_sweep_timestamp_seconds 0\n"),
            "{text}"
        );
    }
}
