//! Configuration: one TOML file plus `SWEEPER_<SECTION>__<KEY>` overrides, validated once at
//! start-up into typed values. Nothing downstream ever sees a raw string where a type fits.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A year as humantime counts it (365.25 days), so limits print as whole years.
const YEAR: u64 = 31_557_600;
/// The longest duration any key accepts: 10 years. Times are computed as `now ± duration` with
/// `chrono`, whose range ends a few hundred thousand years out: a longer value (e.g.
/// `"300000years"`) would overflow that arithmetic, and nothing here needs more than years.
/// Keys: `source.idle_after`, `sweep.interval`, `sweep.lease`, `sweep.retry_base`,
/// `sweep.retry_max`.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * YEAR);
/// The longest `sweep.heartbeat`: a worker is declared dead 3 beats after its last one, so a
/// longer beat would leave a crashed worker's sessions stranded for hours.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);
/// The shortest `sweep.heartbeat`: a worker fences itself 2 beats after its last good beat and
/// peers may take its sessions after 3, so one beat must cover a database round trip plus the
/// cancellation of the calls in flight.
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);
/// The longest `sweep.shutdown_grace`: a stop must stay well inside what service managers allow.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);
/// The longest `iyzico.timeout` and `iyzico.connect_timeout`: a call is seconds; minutes are
/// already a broken network.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// The most immediate retries of one call (`iyzico.retries`).
pub const MAX_RETRIES: u32 = 20;
/// The longest `iyzico.retry_min_delay` and `iyzico.retry_max_delay`: immediate retries are for
/// transient failures; longer waits are what `sweep.retry_base` is for.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// Longest `Retry-After` the client honours; a larger value is capped so shutdown stays prompt.
/// Here, not in the client, because the lease rule ([`Config::worst_case_attempt`]) counts it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A configuration error: which key, and what is wrong with it. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file we tried.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML at line {line}, column {column}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error, in characters.
        column: usize,
        /// The parser's message (without the parser's excerpt of the line, which could hold a
        /// secret).
        message: String,
    },
    /// A key holds a value that is not allowed, or is unknown or missing.
    #[error("{key}: {message}")]
    Invalid {
        /// The dotted key, e.g. `source.table`.
        key: String,
        /// What is wrong, without the value when the key is secret.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A validated SQL identifier, optionally schema-qualified: safe to interpolate (quoted).
#[derive(Clone, PartialEq, Eq)]
pub struct SqlIdent {
    schema: Option<String>,
    name: String,
}

impl SqlIdent {
    /// Validates `raw` as `name` or `schema.name`, each `[A-Za-z_][A-Za-z0-9_]*`.
    pub fn parse(raw: &str, allow_schema: bool) -> Result<Self, String> {
        fn part_ok(p: &str) -> bool {
            let mut chars = p.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                && p.len() <= 63
        }
        let refuse = || format!("{raw:?} is not an SQL identifier");
        let (schema, name) = match raw.split_once('.') {
            Some((s, n)) if allow_schema => (Some(s), n),
            Some(_) => return Err(refuse()),
            None => (None, raw),
        };
        if !part_ok(name) || schema.is_some_and(|s| !part_ok(s)) {
            return Err(refuse());
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The unqualified name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schema, when qualified.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The identifier double-quoted for SQL (both SQLite and Postgres accept this form).
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("\"{s}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }
}

impl fmt::Display for SqlIdent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl fmt::Debug for SqlIdent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How the source table stores `last_activity_column` (SQLite; Postgres uses its native type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// UTC text as SQLite's `CURRENT_TIMESTAMP` writes it: `YYYY-MM-DD HH:MM:SS`.
    #[default]
    SqliteText,
    /// UTC RFC 3339 text with a `Z` suffix: `YYYY-MM-DDTHH:MM:SSZ`.
    Rfc3339,
    /// Integer Unix seconds.
    UnixSeconds,
    /// Integer Unix milliseconds.
    UnixMillis,
}

/// Which database the URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
    /// A MySQL (8.0+) or MariaDB (10.6+) server.
    MySql,
}

/// Default `database.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// `[database]`.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// Connection URL (from `url` or `url_file`); may hold a password, so it is never printed
    /// whole.
    pub url: SecretString,
    /// Which backend the URL selects.
    pub backend: Backend,
    /// Pool size.
    pub max_connections: NonZeroU32,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("backend", &self.backend)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// A URL with any password replaced by `***`, for logs and errors. Everything between the
/// first `:` of the user information and the last `@` is hidden, so a password holding `@` or
/// `/` is hidden whole; without a `scheme://` (a mistyped URL) the user information is taken
/// from the start.
pub fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url.rfind('@') {
        Some(at) if at >= start => match url[start..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..start], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// A `mariadb://` URL as the MySQL driver reads it (the same protocol).
pub fn mysql_url(url: &str) -> String {
    match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_owned(),
    }
}

/// Default `source.mark_passive`.
pub const DEFAULT_MARK_PASSIVE: bool = true;

/// `[source]`: the application's sessions table.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The table, optionally schema-qualified.
    pub table: SqlIdent,
    /// Column holding the session token sent to iyzico.
    pub token_column: SqlIdent,
    /// Column holding the member identifier sent to iyzico.
    pub member_column: SqlIdent,
    /// Column holding the status.
    pub status_column: SqlIdent,
    /// Column holding the last activity time.
    pub last_activity_column: SqlIdent,
    /// How `last_activity_column` is stored (SQLite only).
    pub last_activity_format: TimestampFormat,
    /// The zone naive timestamps are written in (PostgreSQL `timestamp`, MySQL `DATETIME`,
    /// SQLite text without an offset); `None`: UTC, allowed only where the database's zone is UTC.
    pub last_activity_timezone: Option<chrono_tz::Tz>,
    /// Status of a live session.
    pub active_value: String,
    /// Status written once invalidated.
    pub passive_value: String,
    /// Idle time after which an active session is eligible.
    pub idle_after: Duration,
    /// Whether to set the status to `passive_value` once invalidated.
    pub mark_passive: bool,
}

/// When sweeps happen in `run`.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A sweep every period.
    Interval(Duration),
    /// A cron expression with seconds, already checked to parse.
    Cron(String),
}

/// Default `sweep.interval` (when neither it nor `sweep.schedule` is set).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// Default `sweep.batch_size`.
pub const DEFAULT_BATCH_SIZE: u32 = 500;
/// Default `sweep.concurrency`.
pub const DEFAULT_CONCURRENCY: u32 = 16;
/// Default `sweep.lease`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);
/// Default `sweep.max_attempts`.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Default `sweep.retry_base`.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(30);
/// Default `sweep.retry_max`.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(3600);
/// Default `sweep.shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);
/// Default `sweep.heartbeat`; three missed beats make a worker stale.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// `[sweep]`.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// When `run` sweeps.
    pub schedule: Schedule,
    /// Sessions claimed per batch.
    pub batch_size: NonZeroU32,
    /// API calls in flight at once, per process.
    pub concurrency: NonZeroUsize,
    /// How long a claim lasts if its worker dies without a heartbeat going stale first.
    pub lease: Duration,
    /// Sweep-level attempts per session before it is `failed`.
    pub max_attempts: NonZeroU32,
    /// First delay between sweep-level attempts, doubled per attempt.
    pub retry_base: Duration,
    /// Largest delay between sweep-level attempts.
    pub retry_max: Duration,
    /// How long in-flight calls may finish after the first SIGTERM.
    pub shutdown_grace: Duration,
    /// How often a worker records its heartbeat.
    pub heartbeat: Duration,
}

/// Heartbeats a worker may miss before its peers count it dead ([`SweepConfig::stale_after`]).
pub const STALE_AFTER_BEATS: u32 = 3;
/// Heartbeats without a good one after which a worker fences itself
/// ([`SweepConfig::fence_after`]): one fewer than [`STALE_AFTER_BEATS`].
pub const FENCE_AFTER_BEATS: u32 = STALE_AFTER_BEATS - 1;

impl SweepConfig {
    /// A worker whose heartbeat is older than this is considered dead and its leases reclaimable.
    pub fn stale_after(&self) -> Duration {
        self.heartbeat * STALE_AFTER_BEATS
    }

    /// A worker whose last good heartbeat is older than this stops sending and cancels its
    /// calls in flight (self-fencing). It is one heartbeat before [`Self::stale_after`], when
    /// peers may take its sessions; that beat of margin is why `sweep.heartbeat` is at least
    /// [`MIN_HEARTBEAT`].
    pub fn fence_after(&self) -> Duration {
        self.heartbeat * FENCE_AFTER_BEATS
    }

    /// The longest one attempt on one session can keep its lease busy with `iyzico`'s
    /// settings: every call of it ([`IyzicoConfig::calls_per_attempt`]) waiting out
    /// `iyzico.timeout`, every wait before a retry at its longest
    /// ([`IyzicoConfig::longest_retry_wait`]), plus one `sweep.heartbeat` for the renewal that
    /// follows:
    ///
    /// `(retries + 1) × timeout + retries × max(retry_max_delay, 60 s) + heartbeat`
    ///
    /// `sweep.lease` must be at least this, so a lease never lapses under an attempt even if
    /// renewals stop. (Rate-limiter and concurrency waits come before a call, not during one.)
    /// Saturating: the inputs are bounded, so it never saturates in practice.
    pub fn worst_case_attempt(&self, iyzico: &IyzicoConfig) -> Duration {
        iyzico
            .timeout
            .saturating_mul(iyzico.calls_per_attempt())
            .saturating_add(iyzico.longest_retry_wait().saturating_mul(iyzico.retries))
            .saturating_add(self.heartbeat)
    }

    /// The rules between `[sweep]` and `[iyzico]`: the lease against the heartbeat and against
    /// the longest attempt.
    fn check_lease(&self, iyzico: &IyzicoConfig) -> Result<(), ConfigError> {
        let human = |d: Duration| humantime::format_duration(d).to_string();
        let beats = self.stale_after();
        if self.lease < beats {
            return Err(ConfigError::invalid(
                "sweep.lease",
                format!(
                    "{} is shorter than {STALE_AFTER_BEATS} × sweep.heartbeat ({}) = {}: leases \
                     are renewed with each heartbeat, and a shorter lease lapses between \
                     renewals, so this worker's next claim would take its own sessions again",
                    human(self.lease),
                    human(self.heartbeat),
                    human(beats)
                ),
            ));
        }
        let worst = self.worst_case_attempt(iyzico);
        if self.lease < worst {
            return Err(ConfigError::invalid(
                "sweep.lease",
                format!(
                    "{} is shorter than the longest attempt, {} = (iyzico.retries {} + 1) × \
                     iyzico.timeout {} + {} × {} (the longest wait before a retry: \
                     iyzico.retry_max_delay {} or a Retry-After of up to {}) + sweep.heartbeat \
                     {}; raise sweep.lease or lower those",
                    human(self.lease),
                    human(worst),
                    iyzico.retries,
                    human(iyzico.timeout),
                    iyzico.retries,
                    human(iyzico.longest_retry_wait()),
                    human(iyzico.retry_max_delay),
                    human(MAX_RETRY_AFTER),
                    human(self.heartbeat),
                ),
            ));
        }
        Ok(())
    }
}

/// Default `iyzico.locale`.
pub const DEFAULT_LOCALE: Locale = Locale::Tr;
/// Default `iyzico.timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `iyzico.connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `iyzico.rate_per_second`.
pub const DEFAULT_RATE_PER_SECOND: u32 = 10;
/// Default `iyzico.burst`.
pub const DEFAULT_BURST: u32 = 10;
/// Default `iyzico.retries`.
pub const DEFAULT_RETRIES: u32 = 3;
/// Default `iyzico.retry_min_delay`: the smallest delay between two immediate retries of one call.
pub const DEFAULT_RETRY_MIN_DELAY: Duration = Duration::from_secs(2);
/// Default `iyzico.retry_max_delay`: the largest delay between two immediate retries of one call.
pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);

/// `[iyzico]`.
#[derive(Clone)]
pub struct IyzicoConfig {
    /// Scheme, host and port of the API; `https` unless loopback.
    pub base_url: reqwest::Url,
    /// Merchant API key (from `api_key` or `api_key_file`).
    pub api_key: SecretString,
    /// Merchant secret key (from `secret_key` or `secret_key_file`).
    pub secret_key: SecretString,
    /// `tr` or `en`.
    pub locale: Locale,
    /// Total time allowed for one request.
    pub timeout: Duration,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Requests per second (for the whole fleet).
    pub rate_per_second: NonZeroU32,
    /// Requests allowed in a burst.
    pub burst: NonZeroU32,
    /// Immediate retries of a transient failure within one attempt.
    pub retries: u32,
    /// Smallest backoff between immediate retries.
    pub retry_min_delay: Duration,
    /// Largest backoff between immediate retries.
    pub retry_max_delay: Duration,
}

impl IyzicoConfig {
    /// Calls one sweep-level attempt makes at most: the first and `iyzico.retries` immediate
    /// retries.
    pub fn calls_per_attempt(&self) -> u32 {
        self.retries + 1
    }

    /// The longest wait before one immediate retry: `iyzico.retry_max_delay`, or a
    /// `Retry-After` up to its cap, [`MAX_RETRY_AFTER`].
    pub fn longest_retry_wait(&self) -> Duration {
        self.retry_max_delay.max(MAX_RETRY_AFTER)
    }
}

impl fmt::Debug for IyzicoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IyzicoConfig")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &"[redacted]")
            .field("secret_key", &"[redacted]")
            .field("locale", &self.locale)
            .field("timeout", &self.timeout)
            .field("rate_per_second", &self.rate_per_second)
            .field("burst", &self.burst)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// The request locale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locale {
    /// Turkish.
    Tr,
    /// English.
    En,
}

impl Locale {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Locale::Tr => "tr",
            Locale::En => "en",
        }
    }
}

/// Default `server.status_page` (`server.listen` has none: no server unless set).
pub const DEFAULT_STATUS_PAGE: bool = true;

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` disables the server.
    pub listen: Option<SocketAddr>,
    /// Whether the read-only status page is served at `/` and `/api/status`.
    pub status_page: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Default `log.format`.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// Default `log.level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Text or JSON.
    pub format: LogFormat,
    /// A `tracing` filter directive; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: DEFAULT_LOG_FORMAT,
            level: DEFAULT_LOG_LEVEL.into(),
        }
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[database]`.
    pub database: DatabaseConfig,
    /// `[source]`.
    pub source: SourceConfig,
    /// `[sweep]`.
    pub sweep: SweepConfig,
    /// `[iyzico]`.
    pub iyzico: IyzicoConfig,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[log]`.
    pub log: LogConfig,
}

impl Config {
    /// The longest one attempt on one session can keep its lease busy:
    /// [`SweepConfig::worst_case_attempt`] with this config's `[iyzico]`.
    pub fn worst_case_attempt(&self) -> Duration {
        self.sweep.worst_case_attempt(&self.iyzico)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw, as written. Every section refuses unknown keys so a typo cannot pass silently.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: RawDatabase,
    source: RawSource,
    #[serde(default)]
    sweep: RawSweep,
    iyzico: RawIyzico,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    log: RawLog,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    url_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "de::opt_num")]
    max_connections: Option<de::RawNum>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    table: String,
    token_column: String,
    member_column: String,
    status_column: String,
    last_activity_column: String,
    #[serde(default)]
    last_activity_format: TimestampFormat,
    last_activity_timezone: Option<String>,
    active_value: String,
    passive_value: String,
    #[serde(with = "humantime_serde")]
    idle_after: Duration,
    #[serde(default, deserialize_with = "de::opt_bool")]
    mark_passive: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    schedule: Option<String>,
    #[serde(default, deserialize_with = "de::opt_num")]
    batch_size: Option<de::RawNum>,
    #[serde(default, deserialize_with = "de::opt_num")]
    concurrency: Option<de::RawNum>,
    #[serde(default, with = "humantime_serde")]
    lease: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_num")]
    max_attempts: Option<de::RawNum>,
    #[serde(default, with = "humantime_serde")]
    retry_base: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_max: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    heartbeat: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIyzico {
    base_url: String,
    api_key: Option<SecretString>,
    api_key_file: Option<PathBuf>,
    secret_key: Option<SecretString>,
    secret_key_file: Option<PathBuf>,
    #[serde(default)]
    locale: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_num")]
    rate_per_second: Option<de::RawNum>,
    #[serde(default, deserialize_with = "de::opt_num")]
    burst: Option<de::RawNum>,
    #[serde(default, deserialize_with = "de::opt_num")]
    retries: Option<de::RawNum>,
    #[serde(default, with = "humantime_serde")]
    retry_min_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_max_delay: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    #[serde(default, deserialize_with = "de::opt_bool")]
    status_page: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

/// Lenient scalar deserializers: an environment override always arrives as a string.
mod de {
    use serde::{Deserialize, Deserializer};

    /// A number as written: a whole number, or anything else, kept as text for a message that
    /// says what is wrong with it in words.
    #[derive(Debug, Clone, PartialEq)]
    pub enum RawNum {
        /// A whole number (also `10.0`, and a string holding one, as overrides arrive).
        Whole(i64),
        /// A fraction, a number out of range, or text that is not a number.
        Other(String),
    }

    struct RawNumVisitor;

    impl serde::de::Visitor<'_> for RawNumVisitor {
        type Value = RawNum;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a whole number")
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawNum, E> {
            Ok(RawNum::Whole(v))
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawNum, E> {
            Ok(i64::try_from(v).map_or_else(|_| RawNum::Other(v.to_string()), RawNum::Whole))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RawNum, E> {
            // i64::MAX as f64 rounds up to 2^63, so the upper bound is exclusive.
            if v.fract() == 0.0 && v >= i64::MIN as f64 && v < i64::MAX as f64 {
                Ok(RawNum::Whole(v as i64))
            } else {
                Ok(RawNum::Other(v.to_string()))
            }
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawNum, E> {
            let t = v.trim();
            if let Ok(n) = t.parse::<i64>() {
                return Ok(RawNum::Whole(n));
            }
            match t.parse::<f64>() {
                Ok(f) if f.is_finite() => self.visit_f64(f),
                _ => Ok(RawNum::Other(format!("{v:?}"))),
            }
        }
    }

    impl<'de> Deserialize<'de> for RawNum {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(RawNumVisitor)
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrStr {
        Bool(bool),
        Str(String),
    }

    pub fn opt_num<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RawNum>, D::Error> {
        RawNum::deserialize(d).map(Some)
    }

    pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match BoolOrStr::deserialize(d)? {
            BoolOrStr::Bool(b) => Ok(Some(b)),
            BoolOrStr::Str(s) => match s.trim() {
                "true" => Ok(Some(true)),
                "false" => Ok(Some(false)),
                _ => Err(serde::de::Error::custom(format!(
                    "{s:?} is not true or false"
                ))),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------

impl Config {
    /// Loads `path`, applies `SWEEPER_*` overrides from `env`, and validates everything.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, env).map_err(|e| match e {
            ConfigError::Syntax {
                line,
                column,
                message,
                ..
            } => ConfigError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text, applies overrides and validates.
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let (line, column) = line_and_column(text, e.span().map_or(0, |s| s.start));
            ConfigError::Syntax {
                path: PathBuf::new(),
                line,
                column,
                message: e.message().trim().replace('\n', "; "),
            }
        })?;
        apply_env_overrides(&mut table, env)?;
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let path = e.path().to_string();
                // toml appends "in `section`"; the key path already says where.
                let inner = e
                    .into_inner()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let key = if path == "." { String::new() } else { path };
                // A type error on a secret would echo the value: never let it through.
                let message = if key.ends_with("secret_key")
                    || key.ends_with("api_key")
                    || key == "database.url"
                {
                    "must be a string".to_owned()
                } else {
                    inner.replace("unknown field", "unknown key")
                };
                ConfigError::invalid(if key.is_empty() { "config".into() } else { key }, message)
            })?;
        raw.validate()
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Overlays `SWEEPER_<SECTION>__<KEY>=value` onto the parsed file, as string values.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let overrides: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("SWEEPER_") && k.contains("__"))
        .collect();
    // `section__key`, lower case: which keys the environment sets.
    let from_env: std::collections::BTreeSet<String> = overrides
        .keys()
        .map(|k| k["SWEEPER_".len()..].to_ascii_lowercase())
        .collect();
    for (var, value) in overrides {
        let rest = &var["SWEEPER_".len()..];
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        if section.is_empty() || key.is_empty() || key.contains("__") {
            return Err(ConfigError::invalid(
                var,
                "environment overrides take the form SWEEPER_<SECTION>__<KEY>",
            ));
        }
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            return Err(ConfigError::invalid(section, "must be a table"));
        };
        // Setting one of two alternatives from the environment replaces the other; setting
        // both from the environment is ambiguous, and refused.
        if let Some(other) = alternative(&section, &key) {
            let other_var = format!(
                "SWEEPER_{}__{}",
                section.to_ascii_uppercase(),
                other.to_ascii_uppercase()
            );
            if from_env.contains(&format!("{section}__{other}")) {
                return Err(ConfigError::invalid(
                    format!("{section}.{key}"),
                    format!("{var} and {other_var} are both set: set one of them"),
                ));
            }
            section_table.remove(other);
        }
        section_table.insert(key, toml::Value::String(value));
    }
    Ok(())
}

/// The key that `section.key` is the alternative of (exactly one of the two may be set).
fn alternative(section: &str, key: &str) -> Option<&'static str> {
    Some(match (section, key) {
        ("database", "url") => "url_file",
        ("database", "url_file") => "url",
        ("iyzico", "api_key") => "api_key_file",
        ("iyzico", "api_key_file") => "api_key",
        ("iyzico", "secret_key") => "secret_key_file",
        ("iyzico", "secret_key_file") => "secret_key",
        ("sweep", "interval") => "schedule",
        ("sweep", "schedule") => "interval",
        _ => return None,
    })
}

/// Exactly one of `key` (the value itself) and `key_file` (a file holding it): the value, from
/// the file with its trailing newline trimmed. Errors name the key and the file, never what
/// the file holds.
fn secret_value(
    key: &str,
    value: Option<SecretString>,
    file: Option<PathBuf>,
    what: &str,
) -> Result<SecretString, ConfigError> {
    let file_key = format!("{key}_file");
    let secret = match (value, file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                key,
                format!("set either {key} or {file_key}, not both"),
            ));
        }
        (Some(value), None) => value,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::invalid(&file_key, format!("cannot read {}: {e}", path.display()))
            })?;
            let text = text.trim_end_matches(['\r', '\n']);
            if text.trim().is_empty() {
                return Err(ConfigError::invalid(
                    &file_key,
                    format!("{} is empty", path.display()),
                ));
            }
            return Ok(SecretString::from(text.to_owned()));
        }
        (None, None) => {
            return Err(ConfigError::invalid(
                key,
                format!("{what} is required: set {key} or {file_key}"),
            ));
        }
    };
    if secret.expose_secret().trim().is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    Ok(secret)
}

/// A whole number of `unit` from `min` to `max` (or the default), refused in words otherwise:
/// "must be a whole number of requests per second, at least 1; got 0.001".
fn whole(
    key: &str,
    value: Option<de::RawNum>,
    default: u32,
    unit: &str,
    (min, max): (u32, u32),
) -> Result<u32, ConfigError> {
    let range = if max == u32::MAX {
        format!("at least {min}")
    } else {
        format!("from {min} to {max}")
    };
    let refuse = |got: &dyn fmt::Display| {
        ConfigError::invalid(
            key,
            format!("must be a whole number of {unit}, {range}; got {got}"),
        )
    };
    match value {
        None => Ok(default),
        Some(de::RawNum::Whole(v)) => u32::try_from(v)
            .ok()
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| refuse(&v)),
        Some(de::RawNum::Other(text)) => Err(refuse(&text)),
    }
}

/// [`whole`] for a count that must be at least 1.
fn positive(
    key: &str,
    value: Option<de::RawNum>,
    default: u32,
    unit: &str,
) -> Result<u32, ConfigError> {
    whole(key, value, default, unit, (1, u32::MAX))
}

/// A duration longer than zero and at most `max` (or the default).
fn duration(
    key: &str,
    value: Option<Duration>,
    default: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let v = value.unwrap_or(default);
    if v.is_zero() {
        return Err(ConfigError::invalid(key, "must be longer than zero"));
    }
    if v > max {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{} is too long: at most {}",
                humantime::format_duration(v),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(v)
}

fn ident(key: &str, raw: &str, allow_schema: bool) -> Result<SqlIdent, ConfigError> {
    SqlIdent::parse(raw, allow_schema).map_err(|m| ConfigError::invalid(key, m))
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).expect("checked positive")
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let database = self.database.validate()?;
        let source = self.source.validate()?;
        let sweep = self.sweep.validate()?;
        let iyzico = self.iyzico.validate()?;
        sweep.check_lease(&iyzico)?;
        Ok(Config {
            database,
            source,
            sweep,
            iyzico,
            server: self.server.validate()?,
            log: self.log.validate()?,
        })
    }
}

impl RawDatabase {
    fn validate(self) -> Result<DatabaseConfig, ConfigError> {
        // Where a mistake in the URL is reported: the key, or the file key and its path. The
        // URL may hold a password: it is never echoed.
        let (key, within) = match &self.url_file {
            Some(path) if self.url.is_none() => (
                "database.url_file",
                format!("the URL in {}", path.display()),
            ),
            _ => ("database.url", "the URL".to_owned()),
        };
        let url = secret_value(
            "database.url",
            self.url.map(SecretString::from),
            self.url_file,
            "a database URL",
        )?;
        let url = url.expose_secret();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Backend::MySql
        } else {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "{within} must start with sqlite:, postgres://, postgresql://, mysql:// or mariadb://"
                ),
            ));
        };
        // Parse it now, so a malformed URL is bad configuration (exit 2), not a runtime failure.
        let parsed = match backend {
            Backend::Sqlite => url.parse::<sqlx::sqlite::SqliteConnectOptions>().map(drop),
            Backend::Postgres => url.parse::<sqlx::postgres::PgConnectOptions>().map(drop),
            Backend::MySql => mysql_url(url)
                .parse::<sqlx::mysql::MySqlConnectOptions>()
                .map(drop),
        };
        parsed.map_err(|_| {
            ConfigError::invalid(key, format!("{within} is not a valid connection URL"))
        })?;
        Ok(DatabaseConfig {
            url: SecretString::from(url.to_owned()),
            backend,
            max_connections: nz(positive(
                "database.max_connections",
                self.max_connections,
                DEFAULT_MAX_CONNECTIONS,
                "connections",
            )?),
        })
    }
}

impl RawSource {
    fn validate(self) -> Result<SourceConfig, ConfigError> {
        for (key, v) in [
            ("source.active_value", &self.active_value),
            ("source.passive_value", &self.passive_value),
        ] {
            if v.is_empty() {
                return Err(ConfigError::invalid(key, "must not be empty"));
            }
        }
        if self.active_value == self.passive_value {
            return Err(ConfigError::invalid(
                "source.passive_value",
                "must differ from source.active_value",
            ));
        }
        Ok(SourceConfig {
            table: ident("source.table", &self.table, true)?,
            token_column: ident("source.token_column", &self.token_column, false)?,
            member_column: ident("source.member_column", &self.member_column, false)?,
            status_column: ident("source.status_column", &self.status_column, false)?,
            last_activity_column: ident(
                "source.last_activity_column",
                &self.last_activity_column,
                false,
            )?,
            last_activity_format: self.last_activity_format,
            last_activity_timezone: match self.last_activity_timezone.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(zone) => Some(zone.parse::<chrono_tz::Tz>().map_err(|_| {
                    ConfigError::invalid(
                        "source.last_activity_timezone",
                        format!("{zone:?} is not an IANA time zone name like \"Europe/Istanbul\" or \"UTC\""),
                    )
                })?),
            },
            active_value: self.active_value,
            passive_value: self.passive_value,
            idle_after: idle_after(self.idle_after)?,
            mark_passive: self.mark_passive.unwrap_or(DEFAULT_MARK_PASSIVE),
        })
    }
}

impl RawSweep {
    fn validate(self) -> Result<SweepConfig, ConfigError> {
        let schedule = sweep_schedule(self.interval, self.schedule)?;
        let (retry_base, retry_max) = sweep_retry_window(self.retry_base, self.retry_max)?;
        let heartbeat = sweep_heartbeat(self.heartbeat)?;
        let shutdown_grace = sweep_shutdown_grace(self.shutdown_grace)?;
        Ok(SweepConfig {
            schedule,
            batch_size: nz(positive(
                "sweep.batch_size",
                self.batch_size,
                DEFAULT_BATCH_SIZE,
                "sessions",
            )?),
            concurrency: NonZeroUsize::new(positive(
                "sweep.concurrency",
                self.concurrency,
                DEFAULT_CONCURRENCY,
                "calls in flight",
            )? as usize)
            .expect("checked positive"),
            lease: duration("sweep.lease", self.lease, DEFAULT_LEASE, MAX_DURATION)?,
            max_attempts: nz(positive(
                "sweep.max_attempts",
                self.max_attempts,
                DEFAULT_MAX_ATTEMPTS,
                "attempts",
            )?),
            retry_base,
            retry_max,
            shutdown_grace,
            heartbeat,
        })
    }
}

/// `sweep.interval` or `sweep.schedule` (at most one of them; neither: the default interval).
fn sweep_schedule(
    interval: Option<Duration>,
    cron: Option<String>,
) -> Result<Schedule, ConfigError> {
    Ok(match (interval, cron) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                "sweep.schedule",
                "set either sweep.interval or sweep.schedule, not both",
            ));
        }
        (Some(i), None) => {
            Schedule::Interval(duration("sweep.interval", Some(i), i, MAX_DURATION)?)
        }
        (None, Some(cron)) => {
            validate_cron(&cron).map_err(|m| ConfigError::invalid("sweep.schedule", m))?;
            Schedule::Cron(cron)
        }
        (None, None) => Schedule::Interval(DEFAULT_INTERVAL),
    })
}

/// `sweep.retry_base` and `sweep.retry_max`, the second at least the first.
fn sweep_retry_window(
    base: Option<Duration>,
    max: Option<Duration>,
) -> Result<(Duration, Duration), ConfigError> {
    let base = duration("sweep.retry_base", base, DEFAULT_RETRY_BASE, MAX_DURATION)?;
    let max = duration("sweep.retry_max", max, DEFAULT_RETRY_MAX, MAX_DURATION)?;
    if max < base {
        return Err(ConfigError::invalid(
            "sweep.retry_max",
            "must be at least sweep.retry_base",
        ));
    }
    Ok((base, max))
}

/// `sweep.heartbeat`, from [`MIN_HEARTBEAT`] to [`MAX_HEARTBEAT`].
fn sweep_heartbeat(value: Option<Duration>) -> Result<Duration, ConfigError> {
    let heartbeat = duration("sweep.heartbeat", value, DEFAULT_HEARTBEAT, MAX_HEARTBEAT)?;
    if heartbeat < MIN_HEARTBEAT {
        return Err(ConfigError::invalid(
            "sweep.heartbeat",
            format!(
                "{} is too short: at least {}, so that the beat between fencing \
                 ({FENCE_AFTER_BEATS} beats without a good heartbeat) and staleness \
                 ({STALE_AFTER_BEATS} beats) covers a database round trip and the \
                 cancellation of calls in flight",
                humantime::format_duration(heartbeat),
                humantime::format_duration(MIN_HEARTBEAT)
            ),
        ));
    }
    Ok(heartbeat)
}

/// `source.idle_after`: at least a second. The cutoff is taken in whole seconds, and a shorter
/// one is a unit typed wrong (`30ms` for `30m`) that would take every active session, in use or
/// not, for idle.
fn idle_after(value: Duration) -> Result<Duration, ConfigError> {
    let v = duration(
        "source.idle_after",
        Some(value),
        Duration::ZERO,
        MAX_DURATION,
    )?;
    if v < Duration::from_secs(1) {
        return Err(ConfigError::invalid(
            "source.idle_after",
            format!(
                "{} is shorter than a second: a session is idle after minutes (\"30m\")",
                humantime::format_duration(v)
            ),
        ));
    }
    Ok(v)
}

/// `sweep.shutdown_grace`, at most [`MAX_SHUTDOWN_GRACE`] (zero allowed: no grace).
fn sweep_shutdown_grace(value: Option<Duration>) -> Result<Duration, ConfigError> {
    let grace = value.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    if grace > MAX_SHUTDOWN_GRACE {
        return Err(ConfigError::invalid(
            "sweep.shutdown_grace",
            format!(
                "{} is too long: at most {}",
                humantime::format_duration(grace),
                humantime::format_duration(MAX_SHUTDOWN_GRACE)
            ),
        ));
    }
    Ok(grace)
}

/// Checks that a cron expression (six fields, with seconds) parses.
pub fn validate_cron(expr: &str) -> Result<(), String> {
    let fields = expr.split_whitespace().count();
    if !(6..=7).contains(&fields) {
        return Err(format!(
            "{expr:?} must have 6 fields (sec min hour day month weekday), got {fields}"
        ));
    }
    // Parse with the scheduler itself, so what passes here is exactly what `run` accepts.
    tokio_cron_scheduler::Job::new(expr, |_, _| {})
        .map_err(|e| format!("{expr:?} is not a valid cron schedule: {e}"))?;
    // As the scheduler reads it (seconds required, day of month and weekday both to match):
    // one that parses but has no next time (February 31st) would sweep once, then never.
    let never = || {
        let year = if fields == 7 { ", year" } else { "" };
        format!(
            "{expr:?} never fires again: no date from now on has that day, month{year} and weekday"
        )
    };
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
        .map_err(|e| format!("{expr:?} is not a valid cron schedule: {e}"))?
        .find_next_occurrence(&chrono::Utc::now(), false)
        .map(|_| ())
        .map_err(|_| never())
}

impl RawIyzico {
    fn validate(self) -> Result<IyzicoConfig, ConfigError> {
        let base_url = api_base_url(&self.base_url)?;
        let api_key = secret_value(
            "iyzico.api_key",
            self.api_key,
            self.api_key_file,
            "an API key",
        )?;
        let secret_key = secret_value(
            "iyzico.secret_key",
            self.secret_key,
            self.secret_key_file,
            "a secret",
        )?;
        let locale = api_locale(self.locale.as_deref())?;
        let retries = whole(
            "iyzico.retries",
            self.retries,
            DEFAULT_RETRIES,
            "retries",
            (0, MAX_RETRIES),
        )?;
        let (retry_min_delay, retry_max_delay) =
            api_retry_delays(self.retry_min_delay, self.retry_max_delay)?;
        Ok(IyzicoConfig {
            base_url,
            api_key,
            secret_key,
            locale,
            timeout: duration("iyzico.timeout", self.timeout, DEFAULT_TIMEOUT, MAX_TIMEOUT)?,
            connect_timeout: duration(
                "iyzico.connect_timeout",
                self.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
                MAX_TIMEOUT,
            )?,
            rate_per_second: nz(positive(
                "iyzico.rate_per_second",
                self.rate_per_second,
                DEFAULT_RATE_PER_SECOND,
                "requests per second",
            )?),
            burst: nz(positive(
                "iyzico.burst",
                self.burst,
                DEFAULT_BURST,
                "requests",
            )?),
            retries,
            retry_min_delay,
            retry_max_delay,
        })
    }
}

/// `iyzico.base_url`: scheme, host and port only, and `https` unless the host is loopback.
fn api_base_url(raw: &str) -> Result<reqwest::Url, ConfigError> {
    let refuse = |message: String| ConfigError::invalid("iyzico.base_url", message);
    let base_url =
        reqwest::Url::parse(raw).map_err(|e| refuse(format!("{raw:?} is not a URL: {e}")))?;
    let loopback = match base_url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    match base_url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(refuse(format!(
                "{raw:?} must use https:// (plain http is allowed only for a loopback host)"
            )));
        }
    }
    if base_url.path() != "/" || base_url.query().is_some() {
        return Err(refuse(format!(
            "{raw:?} must be scheme, host and port only"
        )));
    }
    Ok(base_url)
}

/// `iyzico.locale`: `tr` or `en`.
fn api_locale(value: Option<&str>) -> Result<Locale, ConfigError> {
    match value {
        None => Ok(DEFAULT_LOCALE),
        Some("tr") => Ok(Locale::Tr),
        Some("en") => Ok(Locale::En),
        Some(other) => Err(ConfigError::invalid(
            "iyzico.locale",
            format!("{other:?} must be \"tr\" or \"en\""),
        )),
    }
}

/// `iyzico.retry_min_delay` and `iyzico.retry_max_delay`, the second at least the first.
fn api_retry_delays(
    min: Option<Duration>,
    max: Option<Duration>,
) -> Result<(Duration, Duration), ConfigError> {
    let min = duration(
        "iyzico.retry_min_delay",
        min,
        DEFAULT_RETRY_MIN_DELAY,
        MAX_RETRY_DELAY,
    )?;
    let max = duration(
        "iyzico.retry_max_delay",
        max,
        DEFAULT_RETRY_MAX_DELAY,
        MAX_RETRY_DELAY,
    )?;
    if max < min {
        return Err(ConfigError::invalid(
            "iyzico.retry_max_delay",
            "must be at least iyzico.retry_min_delay",
        ));
    }
    Ok((min, max))
}

impl RawServer {
    fn validate(self) -> Result<ServerConfig, ConfigError> {
        let listen = match self.listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(addr) => Some(addr.parse().map_err(|_| {
                ConfigError::invalid(
                    "server.listen",
                    format!("{addr:?} is not an address like 127.0.0.1:9464"),
                )
            })?),
        };
        Ok(ServerConfig {
            listen,
            status_page: self.status_page.unwrap_or(DEFAULT_STATUS_PAGE),
        })
    }
}

impl RawLog {
    fn validate(self) -> Result<LogConfig, ConfigError> {
        let level = self.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.into());
        tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
            ConfigError::invalid("log.level", format!("{level:?} is not a log filter: {e}"))
        })?;
        Ok(LogConfig {
            format: self.format.unwrap_or(DEFAULT_LOG_FORMAT),
            level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_must_have_a_next_time() {
        for fires in [
            "0 */5 * * * *",
            "0 0 0 29 2 *",
            "0 0 12 * * MON-FRI",
            "0 0 3 1 * *",
        ] {
            assert!(validate_cron(fires).is_ok(), "{fires}");
        }
        for never in ["0 0 0 31 2 *", "0 0 0 31 4 *", "0 0 0 30 2 *"] {
            let e = validate_cron(never).unwrap_err();
            assert!(e.contains("never fires"), "{never}: {e}");
        }
        // A year that has passed says so among the fields it names.
        let e = validate_cron("0 0 0 1 1 * 2020").unwrap_err();
        assert!(e.contains("never fires again") && e.contains("year"), "{e}");
    }

    #[test]
    fn identifiers_accept_plain_and_schema_qualified_names() {
        assert_eq!(
            SqlIdent::parse("checkout_sessions", true).unwrap().quoted(),
            "\"checkout_sessions\""
        );
        assert_eq!(
            SqlIdent::parse("payments.checkout_sessions", true)
                .unwrap()
                .quoted(),
            "\"payments\".\"checkout_sessions\""
        );
        assert!(SqlIdent::parse("payments.checkout_sessions", false).is_err());
    }

    #[test]
    fn identifiers_refuse_injection_attempts() {
        for bad in [
            "x; DROP TABLE y",
            "x\"; --",
            "a.b.c",
            "",
            "1abc",
            "a-b",
            "a b",
            "tab\u{0}le",
            "ş",
            "x'",
            ".x",
            "x.",
            "\"x\"",
        ] {
            let err = SqlIdent::parse(bad, true).unwrap_err();
            assert!(err.contains("is not an SQL identifier"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn redact_url_hides_password_only() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(redact_url("http://u:p@ss/w@h:1/x"), "http://u:***@h:1/x");
        assert_eq!(redact_url("u:pw@h:1/x"), "u:***@h:1/x");
        assert_eq!(redact_url("http://h:1/x"), "http://h:1/x");
    }

    const MINIMAL: &str = r#"
[database]
url = "sqlite://x.db"
[source]
table = "t"
token_column = "a"
member_column = "b"
status_column = "c"
last_activity_column = "d"
active_value = "ACTIVE"
passive_value = "PASSIVE"
idle_after = "30m"
[iyzico]
base_url = "https://api.iyzipay.com"
api_key = "k"
secret_key = "s"
"#;

    #[test]
    fn the_defaults_leave_the_lease_its_margins() {
        let c = Config::from_toml_str(MINIMAL, []).unwrap();
        assert_eq!(c.sweep.fence_after(), Duration::from_secs(10));
        assert_eq!(c.sweep.stale_after(), Duration::from_secs(15));
        // 4 × 10 s + 3 × 60 s (the Retry-After cap exceeds the 30 s backoff) + 5 s.
        assert_eq!(c.worst_case_attempt(), Duration::from_secs(225));
        assert!(c.sweep.lease >= c.worst_case_attempt());
    }

    #[test]
    fn numbers_are_refused_in_words() {
        let load = |k: &str, v: &str| {
            Config::from_toml_str(MINIMAL, [(k.to_owned(), v.to_owned())])
                .map(|c| c.iyzico.rate_per_second.get())
                .map_err(|e| e.to_string())
        };
        assert_eq!(load("SWEEPER_IYZICO__RATE_PER_SECOND", "12"), Ok(12));
        assert_eq!(load("SWEEPER_IYZICO__RATE_PER_SECOND", "12.0"), Ok(12));
        for (v, got) in [
            ("0.001", "0.001"),
            ("0", "0"),
            ("-3", "-3"),
            ("lots", "\"lots\""),
            ("99999999999", "99999999999"),
        ] {
            assert_eq!(
                load("SWEEPER_IYZICO__RATE_PER_SECOND", v).unwrap_err(),
                format!(
                    "iyzico.rate_per_second: must be a whole number of requests per second, at least 1; got {got}"
                )
            );
        }
    }

    #[test]
    fn syntax_errors_say_where() {
        assert_eq!(line_and_column("ab\ncdé\nx", 7), (2, 4));
        assert_eq!(line_and_column("abc", 0), (1, 1));
        assert_eq!(line_and_column("abc", 99), (1, 4));
        let err = Config::from_toml_str("[database]\nurl = \"x\"\nmore\n", [])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not valid TOML at line 3, column 5: key with no value"),
            "{err}"
        );
    }

    #[test]
    fn cron_needs_seconds_field() {
        assert!(validate_cron("0 */5 * * * *").is_ok());
        assert!(validate_cron("*/5 * * * *").is_err());
        assert!(validate_cron("0 61 * * * *").is_err());
    }
}
