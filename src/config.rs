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

/// Default heartbeat period of a worker; three missed beats make it stale.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Default smallest delay between two immediate retries of one call.
pub const DEFAULT_RETRY_MIN_DELAY: Duration = Duration::from_secs(2);
/// Default largest delay between two immediate retries of one call.
pub const DEFAULT_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);

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
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
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
}

/// `[database]`.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// Connection URL; may hold a password, so it is never printed whole.
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

/// A URL with any password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

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

impl SweepConfig {
    /// A worker whose heartbeat is older than this is considered dead and its leases reclaimable.
    pub fn stale_after(&self) -> Duration {
        self.heartbeat * 3
    }
}

/// `[iyzico]`.
#[derive(Clone)]
pub struct IyzicoConfig {
    /// Scheme, host and port of the API; `https` unless loopback.
    pub base_url: reqwest::Url,
    /// Merchant API key.
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

/// `[server]`.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` disables the server.
    pub listen: Option<SocketAddr>,
    /// Whether the read-only status page is served at `/` and `/api/status`.
    pub status_page: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

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
            format: LogFormat::Text,
            level: "info".into(),
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
    url: String,
    #[serde(default, deserialize_with = "de::opt_num")]
    max_connections: Option<i64>,
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
    batch_size: Option<i64>,
    #[serde(default, deserialize_with = "de::opt_num")]
    concurrency: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    lease: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_num")]
    max_attempts: Option<i64>,
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
    api_key: String,
    secret_key: Option<SecretString>,
    secret_key_file: Option<PathBuf>,
    #[serde(default)]
    locale: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_num")]
    rate_per_second: Option<i64>,
    #[serde(default, deserialize_with = "de::opt_num")]
    burst: Option<i64>,
    #[serde(default, deserialize_with = "de::opt_num")]
    retries: Option<i64>,
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

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(i64),
        Str(String),
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrStr {
        Bool(bool),
        Str(String),
    }

    pub fn opt_num<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => Ok(Some(n)),
            NumOrStr::Str(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a whole number"))),
        }
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
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_owned(),
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
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: PathBuf::new(),
                    message: e.message().to_owned(),
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
                let message = if key.ends_with("secret_key") || key.ends_with("api_key") {
                    "must be a string".to_owned()
                } else {
                    inner.replace("unknown field", "unknown key")
                };
                ConfigError::invalid(if key.is_empty() { "config".into() } else { key }, message)
            })?;
        raw.validate()
    }
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
        // Setting one of two alternatives from the environment replaces the other.
        match key.as_str() {
            "secret_key" => drop(section_table.remove("secret_key_file")),
            "secret_key_file" => drop(section_table.remove("secret_key")),
            "interval" => drop(section_table.remove("schedule")),
            "schedule" => drop(section_table.remove("interval")),
            _ => {}
        }
        section_table.insert(key, toml::Value::String(value));
    }
    Ok(())
}

fn positive(key: &str, value: Option<i64>, default: i64) -> Result<u32, ConfigError> {
    let v = value.unwrap_or(default);
    if v <= 0 {
        return Err(ConfigError::invalid(
            key,
            format!("must be positive, got {v}"),
        ));
    }
    u32::try_from(v).map_err(|_| ConfigError::invalid(key, format!("{v} is too large")))
}

fn nonzero_duration(
    key: &str,
    value: Option<Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let v = value.unwrap_or(default);
    if v.is_zero() {
        return Err(ConfigError::invalid(key, "must be longer than zero"));
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
        Ok(Config {
            database: self.database.validate()?,
            source: self.source.validate()?,
            sweep: self.sweep.validate()?,
            iyzico: self.iyzico.validate()?,
            server: self.server.validate()?,
            log: self.log.validate()?,
        })
    }
}

impl RawDatabase {
    fn validate(self) -> Result<DatabaseConfig, ConfigError> {
        let backend = if self.url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if self.url.starts_with("postgres://") || self.url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            // The value may be a DSN with a password in it: never echo it.
            return Err(ConfigError::invalid(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        };
        // Parse it now, so a malformed URL is bad configuration (exit 2), not a runtime failure.
        let parsed = match backend {
            Backend::Sqlite => self
                .url
                .parse::<sqlx::sqlite::SqliteConnectOptions>()
                .map(drop),
            Backend::Postgres => self
                .url
                .parse::<sqlx::postgres::PgConnectOptions>()
                .map(drop),
        };
        parsed
            .map_err(|_| ConfigError::invalid("database.url", "is not a valid connection URL"))?;
        Ok(DatabaseConfig {
            url: SecretString::from(self.url),
            backend,
            max_connections: nz(positive(
                "database.max_connections",
                self.max_connections,
                8,
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
            idle_after: nonzero_duration(
                "source.idle_after",
                Some(self.idle_after),
                Duration::ZERO,
            )?,
            mark_passive: self.mark_passive.unwrap_or(true),
        })
    }
}

impl RawSweep {
    fn validate(self) -> Result<SweepConfig, ConfigError> {
        let schedule = match (self.interval, self.schedule) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "sweep.schedule",
                    "set either sweep.interval or sweep.schedule, not both",
                ));
            }
            (Some(i), None) => Schedule::Interval(nonzero_duration("sweep.interval", Some(i), i)?),
            (None, Some(cron)) => {
                validate_cron(&cron).map_err(|m| ConfigError::invalid("sweep.schedule", m))?;
                Schedule::Cron(cron)
            }
            (None, None) => Schedule::Interval(Duration::from_secs(60)),
        };
        let retry_base =
            nonzero_duration("sweep.retry_base", self.retry_base, Duration::from_secs(30))?;
        let retry_max =
            nonzero_duration("sweep.retry_max", self.retry_max, Duration::from_secs(3600))?;
        if retry_max < retry_base {
            return Err(ConfigError::invalid(
                "sweep.retry_max",
                "must be at least sweep.retry_base",
            ));
        }
        Ok(SweepConfig {
            schedule,
            batch_size: nz(positive("sweep.batch_size", self.batch_size, 500)?),
            concurrency: NonZeroUsize::new(
                positive("sweep.concurrency", self.concurrency, 16)? as usize
            )
            .expect("checked positive"),
            lease: nonzero_duration("sweep.lease", self.lease, Duration::from_secs(300))?,
            max_attempts: nz(positive("sweep.max_attempts", self.max_attempts, 10)?),
            retry_base,
            retry_max,
            shutdown_grace: self.shutdown_grace.unwrap_or(Duration::from_secs(25)),
            heartbeat: nonzero_duration("sweep.heartbeat", self.heartbeat, DEFAULT_HEARTBEAT)?,
        })
    }
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
        .map(|_| ())
        .map_err(|e| format!("{expr:?} is not a valid cron schedule: {e}"))
}

impl RawIyzico {
    fn validate(self) -> Result<IyzicoConfig, ConfigError> {
        let base_url = reqwest::Url::parse(&self.base_url).map_err(|e| {
            ConfigError::invalid(
                "iyzico.base_url",
                format!("{:?} is not a URL: {e}", self.base_url),
            )
        })?;
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
                return Err(ConfigError::invalid(
                    "iyzico.base_url",
                    format!(
                        "{:?} must use https:// (plain http is allowed only for a loopback host)",
                        self.base_url
                    ),
                ));
            }
        }
        if base_url.path() != "/" || base_url.query().is_some() {
            return Err(ConfigError::invalid(
                "iyzico.base_url",
                format!("{:?} must be scheme, host and port only", self.base_url),
            ));
        }
        if self.api_key.trim().is_empty() {
            return Err(ConfigError::invalid("iyzico.api_key", "must not be empty"));
        }
        let secret_key = match (self.secret_key, self.secret_key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "iyzico.secret_key",
                    "set either iyzico.secret_key or iyzico.secret_key_file, not both",
                ));
            }
            (Some(s), None) => s,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::invalid(
                        "iyzico.secret_key_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                SecretString::from(text.trim_end_matches(['\r', '\n']).to_owned())
            }
            (None, None) => {
                return Err(ConfigError::invalid(
                    "iyzico.secret_key",
                    "a secret is required: set iyzico.secret_key or iyzico.secret_key_file",
                ));
            }
        };
        if secret_key.expose_secret().trim().is_empty() {
            return Err(ConfigError::invalid(
                "iyzico.secret_key",
                "must not be empty",
            ));
        }
        let locale = match self.locale.as_deref().unwrap_or("tr") {
            "tr" => Locale::Tr,
            "en" => Locale::En,
            other => {
                return Err(ConfigError::invalid(
                    "iyzico.locale",
                    format!("{other:?} must be \"tr\" or \"en\""),
                ));
            }
        };
        let retries = self.retries.unwrap_or(3);
        if !(0..=20).contains(&retries) {
            return Err(ConfigError::invalid(
                "iyzico.retries",
                format!("must be between 0 and 20, got {retries}"),
            ));
        }
        let retry_min_delay = nonzero_duration(
            "iyzico.retry_min_delay",
            self.retry_min_delay,
            DEFAULT_RETRY_MIN_DELAY,
        )?;
        let retry_max_delay = nonzero_duration(
            "iyzico.retry_max_delay",
            self.retry_max_delay,
            DEFAULT_RETRY_MAX_DELAY,
        )?;
        if retry_max_delay < retry_min_delay {
            return Err(ConfigError::invalid(
                "iyzico.retry_max_delay",
                "must be at least iyzico.retry_min_delay",
            ));
        }
        Ok(IyzicoConfig {
            base_url,
            api_key: SecretString::from(self.api_key),
            secret_key,
            locale,
            timeout: nonzero_duration("iyzico.timeout", self.timeout, Duration::from_secs(10))?,
            connect_timeout: nonzero_duration(
                "iyzico.connect_timeout",
                self.connect_timeout,
                Duration::from_secs(5),
            )?,
            rate_per_second: nz(positive(
                "iyzico.rate_per_second",
                self.rate_per_second,
                10,
            )?),
            burst: nz(positive("iyzico.burst", self.burst, 10)?),
            retries: retries as u32,
            retry_min_delay,
            retry_max_delay,
        })
    }
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
            status_page: self.status_page.unwrap_or(true),
        })
    }
}

impl RawLog {
    fn validate(self) -> Result<LogConfig, ConfigError> {
        let level = self.level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
            ConfigError::invalid("log.level", format!("{level:?} is not a log filter: {e}"))
        })?;
        Ok(LogConfig {
            format: self.format.unwrap_or_default(),
            level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn cron_needs_seconds_field() {
        assert!(validate_cron("0 */5 * * * *").is_ok());
        assert!(validate_cron("*/5 * * * *").is_err());
        assert!(validate_cron("0 61 * * * *").is_err());
    }
}
