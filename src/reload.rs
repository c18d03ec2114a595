//! SIGHUP, as `systemctl reload` sends it: the daemon re-reads and validates its config file and
//! applies what can change without reconnecting. An invalid file changes nothing; keys that need
//! a new connection or a new identity are named in the log and wait for a restart.

use secrecy::ExposeSecret as _;

use crate::config::Config;
use crate::iyzico::client::RetryPolicy;
use crate::sweep::Sweeper;
use crate::telemetry::LogLevelHandle;

/// What a reload found, key by key.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Applied now, as `key: old → new`.
    pub applied: Vec<String>,
    /// Changed in the file, but only a restart applies them.
    pub need_restart: Vec<&'static str>,
    /// Whether the sweep schedule changed (the daemon restarts its tick source).
    pub schedule: bool,
}

impl Changes {
    /// Whether the file changed nothing at all.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.need_restart.is_empty()
    }
}

/// Compares the running config with the new one.
pub fn diff(old: &Config, new: &Config) -> Changes {
    let mut c = Changes::default();
    note_applied(old, new, &mut c);
    note_need_restart(old, new, &mut c);
    c
}

/// Notes the keys a reload applies at once that differ, and whether the schedule changed.
fn note_applied(old: &Config, new: &Config, c: &mut Changes) {
    let mut applied = |key: &str, a: String, b: String| {
        if a != b {
            c.applied.push(format!("{key}: {a} → {b}"));
        }
    };
    let (oi, ni, os, ns) = (&old.iyzico, &new.iyzico, &old.sweep, &new.sweep);
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    applied(
        "iyzico.rate_per_second",
        oi.rate_per_second.to_string(),
        ni.rate_per_second.to_string(),
    );
    applied("iyzico.burst", oi.burst.to_string(), ni.burst.to_string());
    applied(
        "iyzico.retries",
        oi.retries.to_string(),
        ni.retries.to_string(),
    );
    applied(
        "iyzico.retry_min_delay",
        d(oi.retry_min_delay),
        d(ni.retry_min_delay),
    );
    applied(
        "iyzico.retry_max_delay",
        d(oi.retry_max_delay),
        d(ni.retry_max_delay),
    );
    applied(
        "sweep.concurrency",
        os.concurrency.to_string(),
        ns.concurrency.to_string(),
    );
    applied(
        "sweep.batch_size",
        os.batch_size.to_string(),
        ns.batch_size.to_string(),
    );
    applied(
        "sweep.max_attempts",
        os.max_attempts.to_string(),
        ns.max_attempts.to_string(),
    );
    applied("sweep.retry_base", d(os.retry_base), d(ns.retry_base));
    applied("sweep.retry_max", d(os.retry_max), d(ns.retry_max));
    applied("log.level", old.log.level.clone(), new.log.level.clone());
    let (a, b) = (format!("{:?}", os.schedule), format!("{:?}", ns.schedule));
    if a != b {
        applied("sweep.schedule", a, b);
        c.schedule = true;
    }
}

/// Notes the keys that differ but wait for a restart.
fn note_need_restart(old: &Config, new: &Config, c: &mut Changes) {
    let (oi, ni, os, ns) = (&old.iyzico, &new.iyzico, &old.sweep, &new.sweep);
    let mut restart = |key: &'static str, differs: bool| {
        if differs {
            c.need_restart.push(key);
        }
    };
    restart(
        "database",
        old.database.url.expose_secret() != new.database.url.expose_secret()
            || old.database.max_connections != new.database.max_connections,
    );
    restart(
        "source",
        format!("{:?}", old.source) != format!("{:?}", new.source),
    );
    restart(
        "server",
        format!("{:?}", old.server) != format!("{:?}", new.server),
    );
    restart("log.format", old.log.format != new.log.format);
    restart("iyzico.base_url", oi.base_url != ni.base_url);
    restart(
        "iyzico.api_key / secret_key",
        oi.api_key.expose_secret() != ni.api_key.expose_secret()
            || oi.secret_key.expose_secret() != ni.secret_key.expose_secret(),
    );
    restart("iyzico.locale", oi.locale != ni.locale);
    restart(
        "iyzico.timeout / connect_timeout",
        oi.timeout != ni.timeout || oi.connect_timeout != ni.connect_timeout,
    );
    restart("sweep.lease", os.lease != ns.lease);
    restart("sweep.heartbeat", os.heartbeat != ns.heartbeat);
    restart(
        "sweep.shutdown_grace",
        os.shutdown_grace != ns.shutdown_grace,
    );
}

/// Applies the reloadable part of `new` to the running sweeper, its client and limiter, and
/// the log filter. The schedule is the daemon's to restart (see [`Changes::schedule`]).
pub fn apply(new: &Config, sweeper: &Sweeper, log: Option<&LogLevelHandle>) {
    let client = sweeper.client();
    client
        .limiter()
        .set_budget(new.iyzico.rate_per_second, new.iyzico.burst);
    client.set_concurrency(new.sweep.concurrency.get());
    client.set_retry_policy(RetryPolicy {
        retries: new.iyzico.retries,
        min_delay: new.iyzico.retry_min_delay,
        max_delay: new.iyzico.retry_max_delay,
    });
    sweeper.update_settings(|s| {
        s.rate_per_second = new.iyzico.rate_per_second.get();
        s.calls_per_attempt = new.iyzico.calls_per_attempt();
        s.concurrency = new.sweep.concurrency.get();
        s.batch_size = new.sweep.batch_size.get();
        s.max_attempts = new.sweep.max_attempts.get();
        s.retry_base = new.sweep.retry_base;
        s.retry_max = new.sweep.retry_max;
    });
    if let Some(log) = log
        && let Err(e) = log.set(&new.log.level)
    {
        tracing::warn!(error = %e, "log.level not applied");
    }
}
