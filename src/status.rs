//! The status page's data: [`Store::status`] plus what only the running process knows (its
//! last sweep, readiness, clock skew), shaped into the JSON that `/api/status` serves and the
//! page draws. Never a database URL, a key, a secret, a token (only its fingerprint) or a
//! member identifier.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound as _, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{Backend, Config, Schedule};
use crate::store::{ClaimParams, StatusData, Store, StoreError, WorkerStatus};
use crate::telemetry::Metrics;

/// How many recent failures the page lists.
pub const RECENT_FAILURES: u32 = 10;
/// How long one reading is served to every open page before the database is asked again.
pub const CACHE_FOR: Duration = Duration::from_secs(5);
/// Workers whose heartbeat went stale within this long are listed as "stale recently".
pub const STALE_RECENTLY: Duration = Duration::from_secs(3600);

/// The chart's series, in drawing order, and the attempt-log classes each one counts.
pub const SERIES: [(&str, &[&str]); 5] = [
    ("invalidated", &["invalidated"]),
    ("already_invalidated", &["already_invalidated"]),
    ("failed", &["permanent"]),
    ("retried", &["retryable"]),
    ("other", &[]),
];

/// The settings the page shows: what decides the sweeper's pace, nothing secret.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// `source.idle_after`.
    pub idle_after: String,
    /// `sweep.interval` or `sweep.schedule`.
    pub schedule: String,
    /// `iyzico.rate_per_second` (the fleet's budget).
    pub rate_per_second: u32,
    /// `iyzico.burst`.
    pub burst: u32,
    /// `sweep.concurrency`.
    pub concurrency: usize,
    /// `sweep.batch_size`.
    pub batch_size: u32,
    /// `sweep.max_attempts`.
    pub max_attempts: u32,
    /// `sweep.heartbeat`.
    pub heartbeat: String,
    /// `sqlite` or `postgres` (never the URL).
    pub backend: &'static str,
    /// The source table's name.
    pub source_table: String,
    /// The running build.
    pub version: &'static str,
    /// Its git commit.
    pub commit: &'static str,
}

/// What the view needs from the config.
#[derive(Debug, Clone)]
struct Inputs {
    settings: Settings,
    idle_after: Duration,
    stale_after: Duration,
    lease: Duration,
}

impl Inputs {
    fn of(config: &Config) -> Self {
        let human = |d: Duration| humantime::format_duration(d).to_string();
        Self {
            settings: Settings {
                idle_after: human(config.source.idle_after),
                schedule: match &config.sweep.schedule {
                    Schedule::Interval(d) => format!("every {}", human(*d)),
                    Schedule::Cron(expr) => format!("cron {expr}"),
                },
                rate_per_second: config.iyzico.rate_per_second.get(),
                burst: config.iyzico.burst.get(),
                concurrency: config.sweep.concurrency.get(),
                batch_size: config.sweep.batch_size.get(),
                max_attempts: config.sweep.max_attempts.get(),
                heartbeat: human(config.sweep.heartbeat),
                backend: match config.database.backend {
                    Backend::Sqlite => "sqlite",
                    Backend::Postgres => "postgres",
                    Backend::MySql => "mysql",
                },
                source_table: config.source.table.to_string(),
                version: crate::build_info::VERSION,
                commit: crate::build_info::COMMIT,
            },
            idle_after: config.source.idle_after,
            stale_after: config.sweep.stale_after(),
            lease: config.sweep.lease,
        }
    }
}

/// The longest one reading of the status may take; a stalled database then answers 503.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the status data, cached for [`CACHE_FOR`] so that any number of open pages cost the
/// database one reading per period. Cheap to clone.
#[derive(Clone)]
pub struct StatusSource {
    store: Arc<dyn Store>,
    inputs: Arc<RwLock<Inputs>>,
    /// `run`'s metrics; `None` under `serve-status`, which does not sweep.
    metrics: Option<Metrics>,
    /// This process's worker row (host as recorded, pid), to mark it on the page.
    me: (String, u32),
    cache: Arc<tokio::sync::Mutex<Option<Reading>>>,
}

/// One reading of `/api/status` and when it was taken.
type Reading = (Instant, Arc<String>);

impl StatusSource {
    /// A source for `run` (with its metrics) or `serve-status` (`None`).
    pub fn new(store: Arc<dyn Store>, config: &Config, metrics: Option<Metrics>) -> Self {
        let me = crate::fleet::this_worker();
        Self {
            store,
            inputs: Arc::new(RwLock::new(Inputs::of(config))),
            metrics,
            me: (me.hostname, me.pid),
            cache: Arc::default(),
        }
    }

    /// Shows the settings of a reloaded config.
    pub fn update(&self, config: &Config) {
        *self.inputs.write().expect("status inputs lock") = Inputs::of(config);
    }

    /// The JSON of `/api/status`, at most [`CACHE_FOR`] old.
    pub async fn json(&self) -> Result<Arc<String>, StoreError> {
        // Waiters for a reading in progress give up with it: a stalled database costs every
        // page one bounded wait, not a queue.
        let mut cache = tokio::time::timeout(READ_TIMEOUT, self.cache.lock())
            .await
            .map_err(|_| StoreError::TimedOut {
                op: "reading the status (another reading is still waiting)",
            })?;
        if let Some((at, body)) = cache.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return Ok(body.clone());
        }
        let body = tokio::time::timeout(READ_TIMEOUT, self.view())
            .await
            .map_err(|_| StoreError::TimedOut {
                op: "reading the status",
            })??
            .to_string();
        let body = Arc::new(body);
        *cache = Some((Instant::now(), body.clone()));
        Ok(body)
    }

    /// Reads the database and builds the view (uncached).
    pub async fn view(&self) -> Result<Value, StoreError> {
        let inputs = self.inputs.read().expect("status inputs lock").clone();
        let data = self.store.status(RECENT_FAILURES).await?;
        let backlog = match &self.metrics {
            Some(m) => {
                json!({ "eligible": m.backlog(), "measured": "at the start of the last sweep" })
            }
            None => {
                let params = ClaimParams {
                    worker: "status",
                    idle_before: crate::sweep::cutoff_before(data.now, inputs.idle_after),
                    stale_after: inputs.stale_after,
                    lease: inputs.lease,
                    limit: 0,
                };
                json!({ "eligible": self.store.count_eligible(params).await?, "measured": "now" })
            }
        };
        Ok(build(
            &data,
            &inputs,
            backlog,
            self.metrics.as_ref(),
            &self.me,
        ))
    }
}

/// Shapes the view. Pure, so it is tested without a database.
fn build(
    data: &StatusData,
    inputs: &Inputs,
    backlog: Value,
    metrics: Option<&Metrics>,
    me: &(String, u32),
) -> Value {
    let now = data.now;
    let r = &data.report;
    let outcomes: serde_json::Map<String, Value> = r
        .counts
        .iter()
        .map(|(o, n)| (o.as_str().to_owned(), json!(n)))
        .collect();
    json!({
        "mode": if metrics.is_some() { "run" } else { "serve-status" },
        "now": now,
        "ready": metrics.map(|m| m.is_ready()),
        "outcomes": outcomes,
        "source_not_marked": r.source_not_marked,
        "unusable": r.unusable,
        "leased": r.leased,
        "backlog": backlog,
        "last_sweep": metrics.and_then(|m| m.last_sweep()),
        "last_call_at": data.last_call_at,
        "chart": {
            "series": SERIES.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            "hour": histogram(data, now, 60, 60),
            "day": histogram(data, now, 96, 15 * 60),
            "cover_from": data.calls_cover_from,
        },
        "fleet": fleet(data, inputs, metrics, me),
        "failures": {
            "by_code": data.failures_by_code,
            "latest": r.recent_failures,
        },
        "pending": pending(data),
        "settings": inputs.settings,
    })
}

/// The workers live now and those stale within [`STALE_RECENTLY`], each with its rate share.
fn fleet(
    data: &StatusData,
    inputs: &Inputs,
    metrics: Option<&Metrics>,
    me: &(String, u32),
) -> Value {
    let now = data.now;
    let age = |t: DateTime<Utc>| (now - t).num_milliseconds().max(0) as f64 / 1000.0;
    let stale_after = chrono::Duration::from_std(inputs.stale_after).unwrap_or_default();
    let recently =
        chrono::Duration::from_std(STALE_RECENTLY + inputs.stale_after).unwrap_or_default();
    let (live, stale): (Vec<&WorkerStatus>, Vec<&WorkerStatus>) = data
        .workers
        .iter()
        .filter(|w| now - w.heartbeat_at < recently)
        .partition(|w| now - w.heartbeat_at < stale_after);
    let share = (inputs.settings.rate_per_second / (live.len() as u32).max(1)).max(1);
    let worker = |w: &WorkerStatus, is_live: bool| {
        let this = metrics.is_some() && w.hostname == me.0 && w.pid == me.1;
        json!({
            "host": w.hostname.split('#').next().unwrap_or_default(),
            "pid": w.pid,
            "id": w.id.rsplit(':').next().unwrap_or_default(),
            "version": w.version,
            "started_at": w.started_at,
            "heartbeat_at": w.heartbeat_at,
            "heartbeat_age_seconds": age(w.heartbeat_at),
            "leased": w.leased,
            "rate_share": if is_live { json!(share) } else { Value::Null },
            "this_process": this,
            "clock_skew_seconds": match metrics {
                Some(m) if this => json!(m.clock_skew_seconds()),
                _ => Value::Null,
            },
        })
    };
    json!({
        "live": live.iter().map(|w| worker(w, true)).collect::<Vec<_>>(),
        "stale_recently": stale.iter().map(|w| worker(w, false)).collect::<Vec<_>>(),
        "stale_after_seconds": inputs.stale_after.as_secs_f64(),
    })
}

/// Pending sessions: how many, when the next is due, and a histogram by due time.
fn pending(data: &StatusData) -> Value {
    let r = &data.report;
    let p = &data.pending_by_due;
    json!({
        "count": r.pending.count,
        "due_now": r.pending.due_now,
        "next_due": r.pending.next_due,
        "by_due": [
            { "label": "due now", "count": p.now },
            { "label": "< 1 min", "count": p.within_1m },
            { "label": "1–5 min", "count": p.within_5m },
            { "label": "5–15 min", "count": p.within_15m },
            { "label": "15–60 min", "count": p.within_1h },
            { "label": "later", "count": p.later },
        ],
    })
}

/// `buckets` buckets of `bucket_secs` ending with the one holding `now`, per series.
fn histogram(data: &StatusData, now: DateTime<Utc>, buckets: usize, bucket_secs: i64) -> Value {
    let width = chrono::Duration::seconds(bucket_secs);
    let last = now.duration_trunc(width).unwrap_or(now);
    let start = last - width * (buckets as i32 - 1);
    let mut series = vec![vec![0u64; buckets]; SERIES.len()];
    for c in &data.calls {
        let offset = (c.minute - start).num_seconds();
        if offset < 0 {
            continue;
        }
        let i = (offset / bucket_secs) as usize;
        if i >= buckets {
            continue;
        }
        let s = SERIES
            .iter()
            .position(|(_, classes)| classes.contains(&c.class.as_str()))
            .unwrap_or(SERIES.len() - 1);
        series[s][i] += c.count;
    }
    let named: serde_json::Map<String, Value> = SERIES
        .iter()
        .zip(series)
        .map(|((name, _), v)| ((*name).to_owned(), json!(v)))
        .collect();
    json!({ "start": start, "bucket_seconds": bucket_secs, "series": named })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        FailureRow, MinuteCount, Outcome, PendingByDue, PendingSummary, Report, UnusableRows,
    };
    use chrono::TimeZone as _;

    fn data(now: DateTime<Utc>) -> StatusData {
        StatusData {
            report: Report {
                counts: Outcome::ALL.iter().map(|o| (*o, 3)).collect(),
                pending: PendingSummary {
                    count: 3,
                    next_due: None,
                    due_now: 1,
                },
                leased: 2,
                recent_failures: vec![FailureRow {
                    session: "0a1b2c3d".into(),
                    error_code: Some("11".into()),
                    error_message: Some("nope".into()),
                    attempts: 1,
                    failed_at: Some(now),
                }],
                source_not_marked: 0,
                unusable: UnusableRows::default(),
            },
            now,
            calls: vec![
                MinuteCount {
                    minute: now - chrono::Duration::minutes(1),
                    class: "invalidated".into(),
                    count: 7,
                },
                MinuteCount {
                    minute: now - chrono::Duration::minutes(1),
                    class: "auth".into(),
                    count: 1,
                },
                MinuteCount {
                    minute: now - chrono::Duration::hours(3),
                    class: "permanent".into(),
                    count: 2,
                },
            ],
            calls_cover_from: None,
            last_call_at: Some(now),
            workers: vec![
                WorkerStatus {
                    id: "h:1:abcd1234".into(),
                    hostname: "h#boot#ns".into(),
                    pid: 1,
                    version: "0.1.0".into(),
                    started_at: now,
                    heartbeat_at: now - chrono::Duration::seconds(1),
                    leased: 4,
                },
                WorkerStatus {
                    id: "h:2:ffff0000".into(),
                    hostname: "h#boot#ns".into(),
                    pid: 2,
                    version: "0.1.0".into(),
                    started_at: now,
                    heartbeat_at: now - chrono::Duration::minutes(5),
                    leased: 0,
                },
                WorkerStatus {
                    id: "h:3:00000000".into(),
                    hostname: "h#boot#ns".into(),
                    pid: 3,
                    version: "0.1.0".into(),
                    started_at: now,
                    heartbeat_at: now - chrono::Duration::days(2),
                    leased: 0,
                },
            ],
            failures_by_code: vec![],
            pending_by_due: PendingByDue::default(),
        }
    }

    fn inputs() -> Inputs {
        Inputs {
            settings: Settings {
                idle_after: "30m".into(),
                schedule: "every 1m".into(),
                rate_per_second: 10,
                burst: 10,
                concurrency: 8,
                batch_size: 500,
                max_attempts: 10,
                heartbeat: "5s".into(),
                backend: "sqlite",
                source_table: "checkout_sessions".into(),
                version: "0.1.0",
                commit: "unknown",
            },
            idle_after: Duration::from_secs(1800),
            stale_after: Duration::from_secs(15),
            lease: Duration::from_secs(300),
        }
    }

    #[test]
    fn the_view_buckets_calls_and_splits_the_fleet() {
        let now = Utc.with_ymd_and_hms(2026, 6, 1, 12, 30, 20).unwrap();
        let v = build(
            &data(now),
            &inputs(),
            json!({"eligible": 5}),
            None,
            &("x".into(), 0),
        );
        assert_eq!(v["outcomes"]["failed"], 3);
        let hour = &v["chart"]["hour"];
        assert_eq!(hour["series"]["invalidated"][58], 7);
        assert_eq!(hour["series"]["other"][58], 1);
        assert_eq!(hour["series"]["invalidated"].as_array().unwrap().len(), 60);
        // Three hours ago is outside the hour, inside the day.
        let failed_day: u64 = v["chart"]["day"]["series"]["failed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(failed_day, 2);
        assert_eq!(v["fleet"]["live"].as_array().unwrap().len(), 1);
        assert_eq!(v["fleet"]["live"][0]["host"], "h");
        assert_eq!(v["fleet"]["live"][0]["id"], "abcd1234");
        assert_eq!(v["fleet"]["live"][0]["rate_share"], 10);
        assert_eq!(v["fleet"]["stale_recently"].as_array().unwrap().len(), 1);
        assert_eq!(v["mode"], "serve-status");
    }
}
