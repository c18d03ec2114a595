//! The binary as users run it: config rules and their messages, exit codes, and the output of
//! `migrate`, `check`, `dry-run`, `once`, `report` and `requeue`.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{
    Kind, SECRET, TestDb, fresh_session, idle_sessions, sessions_and_simulator, signal, simulator,
    spawn_sweeper,
};
use session_sweeper::config::Config;
use session_sweeper::iyzico::simulator::SimulatorConfig;

fn run(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"));
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("SWEEPER_CONFIG")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A valid config file for a SQLite database inside `dir`, with `edit` applied to its text.
fn config_file(
    dir: &Path,
    edit: impl Fn(String) -> String,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let db = dir.join("app.db");
    let text = format!(
        r#"
[database]
url = "sqlite://{}?mode=rwc"
max_connections = 4

{source}mark_passive = true

[sweep]
interval = "1m"
batch_size = 500
concurrency = 16
lease = "5m"
max_attempts = 10
retry_base = "30s"
retry_max = "1h"
shutdown_grace = "25s"

[iyzico]
base_url = "https://sandbox-api.iyzipay.com"
api_key = "key"
secret_key = "{SECRET}"
locale = "tr"
timeout = "10s"
rate_per_second = 10
burst = 10
retries = 3

[server]
listen = "127.0.0.1:9464"

[log]
format = "text"
level = "info"
"#,
        db.display(),
        source = common::source_toml(),
    );
    let path = dir.join("sweeper.toml");
    std::fs::write(&path, edit(text)).unwrap();
    (path, db)
}

/// `text` without its lines that start with `prefix`.
fn without_line(text: &str, prefix: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with(prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_contract_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = config_file(dir.path(), |t| t);
    Config::load(&path, []).unwrap();
}

/// Each bad config: exit 2, a message naming the key, and nothing touched (no database file).
#[test]
fn bad_configs_exit_2_naming_the_key_and_touch_nothing() {
    type Edit = Box<dyn Fn(String) -> String>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "injection in table",
            Box::new(|t| {
                t.replace(
                    "table = \"checkout_sessions\"",
                    "table = \"x; DROP TABLE y\"",
                )
            }),
            "source.table: \"x; DROP TABLE y\" is not an SQL identifier",
        ),
        (
            "quote in column",
            Box::new(|t| {
                t.replace(
                    "status_column = \"status\"",
                    "status_column = \"st\\\"atus\"",
                )
            }),
            "source.status_column",
        ),
        (
            "three-part name",
            Box::new(|t| t.replace("table = \"checkout_sessions\"", "table = \"a.b.c\"")),
            "source.table",
        ),
        (
            "schema on a column",
            Box::new(|t| {
                t.replace(
                    "token_column = \"session_token\"",
                    "token_column = \"s.session_token\"",
                )
            }),
            "source.token_column",
        ),
        (
            "typo",
            Box::new(|t| t.replace("batch_size", "bach_size")),
            "unknown key `bach_size`",
        ),
        (
            "unknown section",
            Box::new(|t| format!("{t}\n[extra]\nx = 1\n")),
            "unknown key `extra`",
        ),
        (
            "http base url",
            Box::new(|t| t.replace("https://sandbox-api.iyzipay.com", "http://api.iyzipay.com")),
            "iyzico.base_url",
        ),
        (
            "base url with a path",
            Box::new(|t| {
                t.replace(
                    "https://sandbox-api.iyzipay.com",
                    "https://api.iyzipay.com/v1",
                )
            }),
            "iyzico.base_url",
        ),
        (
            "no secret",
            Box::new(|t| t.replace(&format!("secret_key = \"{SECRET}\""), "")),
            "iyzico.secret_key: a secret is required",
        ),
        (
            "both secrets",
            Box::new(|t| {
                t.replace(
                    &format!("secret_key = \"{SECRET}\""),
                    &format!("secret_key = \"{SECRET}\"\nsecret_key_file = \"/x\""),
                )
            }),
            "iyzico.secret_key",
        ),
        (
            "missing secret file",
            Box::new(|t| {
                t.replace(
                    &format!("secret_key = \"{SECRET}\""),
                    "secret_key_file = \"/nonexistent/secret\"",
                )
            }),
            "iyzico.secret_key_file",
        ),
        (
            "both database urls",
            Box::new(|t| t.replace("url = \"sqlite://", "url_file = \"/x\"\nurl = \"sqlite://")),
            "database.url: set either database.url or database.url_file, not both",
        ),
        (
            "no database url",
            Box::new(|t| without_line(&t, "url = ")),
            "database.url: a database URL is required: set database.url or database.url_file",
        ),
        (
            "missing database url file",
            Box::new(|t| {
                without_line(&t, "url = ").replace(
                    "[database]",
                    "[database]\nurl_file = \"/nonexistent/database-url\"",
                )
            }),
            "database.url_file: cannot read /nonexistent/database-url: ",
        ),
        (
            "both api keys",
            Box::new(|t| {
                t.replace(
                    "api_key = \"key\"",
                    "api_key = \"key\"\napi_key_file = \"/x\"",
                )
            }),
            "iyzico.api_key: set either iyzico.api_key or iyzico.api_key_file, not both",
        ),
        (
            "no api key",
            Box::new(|t| without_line(&t, "api_key = ")),
            "iyzico.api_key: an API key is required: set iyzico.api_key or iyzico.api_key_file",
        ),
        (
            "missing api key file",
            Box::new(|t| {
                t.replace(
                    "api_key = \"key\"",
                    "api_key_file = \"/nonexistent/api-key\"",
                )
            }),
            "iyzico.api_key_file: cannot read /nonexistent/api-key: ",
        ),
        (
            "numeric api key",
            Box::new(|t| t.replace("api_key = \"key\"", "api_key = 424242")),
            "iyzico.api_key: must be a string",
        ),
        (
            "zero batch",
            Box::new(|t| t.replace("batch_size = 500", "batch_size = 0")),
            "sweep.batch_size: must be a whole number of sessions, at least 1; got 0",
        ),
        (
            "negative concurrency",
            Box::new(|t| t.replace("concurrency = 16", "concurrency = -4")),
            "sweep.concurrency: must be a whole number of calls in flight, at least 1; got -4",
        ),
        (
            "zero rate",
            Box::new(|t| t.replace("rate_per_second = 10", "rate_per_second = 0")),
            "iyzico.rate_per_second",
        ),
        (
            "zero idle",
            Box::new(|t| t.replace("idle_after = \"30m\"", "idle_after = \"0s\"")),
            "source.idle_after",
        ),
        // `30ms` for `30m`: every active session, in use or not, would read as idle.
        (
            "idle for 30 milliseconds",
            Box::new(|t| t.replace("idle_after = \"30m\"", "idle_after = \"30ms\"")),
            "source.idle_after: 30ms is shorter than a second",
        ),
        (
            "bad duration",
            Box::new(|t| t.replace("lease = \"5m\"", "lease = \"5 parsecs\"")),
            "sweep.lease",
        ),
        (
            "bad locale",
            Box::new(|t| t.replace("locale = \"tr\"", "locale = \"de\"")),
            "iyzico.locale: \"de\" must be \"tr\" or \"en\"",
        ),
        (
            "interval and schedule",
            Box::new(|t| {
                t.replace(
                    "interval = \"1m\"",
                    "interval = \"1m\"\nschedule = \"0 */5 * * * *\"",
                )
            }),
            "sweep.schedule: set either",
        ),
        (
            "bad cron",
            Box::new(|t| t.replace("interval = \"1m\"", "schedule = \"every five minutes\"")),
            "sweep.schedule",
        ),
        // February 31st: `run` would sweep once at start and never again.
        (
            "cron that never fires",
            Box::new(|t| t.replace("interval = \"1m\"", "schedule = \"0 0 0 31 2 *\"")),
            "sweep.schedule: \"0 0 0 31 2 *\" never fires",
        ),
        (
            "cron without seconds",
            Box::new(|t| t.replace("interval = \"1m\"", "schedule = \"*/5 * * * *\"")),
            "sweep.schedule",
        ),
        (
            "retry max below base",
            Box::new(|t| t.replace("retry_max = \"1h\"", "retry_max = \"1s\"")),
            "sweep.retry_max",
        ),
        (
            "bad listen",
            Box::new(|t| t.replace("127.0.0.1:9464", "localhost")),
            "server.listen",
        ),
        (
            "bad database url",
            Box::new(|t| t.replace("url = \"sqlite://", "url = \"oracle://")),
            "database.url",
        ),
        (
            "same active and passive",
            Box::new(|t| t.replace("passive_value = \"PASSIVE\"", "passive_value = \"ACTIVE\"")),
            "source.passive_value",
        ),
        (
            "wrong type",
            Box::new(|t| t.replace("mark_passive = true", "mark_passive = \"yes\"")),
            "source.mark_passive",
        ),
        (
            "numeric secret",
            Box::new(|t| t.replace(&format!("secret_key = \"{SECRET}\""), "secret_key = 424242")),
            "iyzico.secret_key: must be a string",
        ),
        (
            "not toml",
            Box::new(|t| t.replace("[sweep]", "[sweep")),
            "is not valid TOML at line 17, column 7: unclosed table, expected `]`",
        ),
        (
            "unterminated string holding the secret",
            Box::new(|t| {
                t.replace(
                    &format!("secret_key = \"{SECRET}\""),
                    &format!("secret_key = \"{SECRET}"),
                )
            }),
            "is not valid TOML at line 30, column 37: invalid basic string",
        ),
        // Numbers: in words, whatever serde's shape of the mistake.
        (
            "fractional rate",
            Box::new(|t| t.replace("rate_per_second = 10", "rate_per_second = 0.001")),
            "iyzico.rate_per_second: must be a whole number of requests per second, at least 1; got 0.001",
        ),
        (
            "rate out of range",
            Box::new(|t| t.replace("rate_per_second = 10", "rate_per_second = 99999999999")),
            "iyzico.rate_per_second: must be a whole number of requests per second, at least 1; got 99999999999",
        ),
        (
            "rate as text",
            Box::new(|t| t.replace("rate_per_second = 10", "rate_per_second = \"fast\"")),
            "iyzico.rate_per_second: must be a whole number of requests per second, at least 1; got \"fast\"",
        ),
        (
            "fractional burst",
            Box::new(|t| t.replace("burst = 10", "burst = 2.5")),
            "iyzico.burst: must be a whole number of requests, at least 1; got 2.5",
        ),
        (
            "too many retries",
            Box::new(|t| t.replace("retries = 3", "retries = 21")),
            "iyzico.retries: must be a whole number of retries, from 0 to 20; got 21",
        ),
        // Durations past what the time arithmetic supports: exit 2, never a panic.
        (
            "idle for 300000 years",
            Box::new(|t| t.replace("idle_after = \"30m\"", "idle_after = \"300000years\"")),
            "source.idle_after: 300000years is too long: at most 10years",
        ),
        (
            "heartbeat of 500000 years",
            Box::new(|t| {
                t.replace(
                    "shutdown_grace = \"25s\"",
                    "shutdown_grace = \"25s\"\nheartbeat = \"500000years\"",
                )
            }),
            "sweep.heartbeat: 500000years is too long: at most 1h",
        ),
        (
            "huge retry base",
            Box::new(|t| t.replace("retry_base = \"30s\"", "retry_base = \"100000years\"")),
            "sweep.retry_base: 100000years is too long",
        ),
        (
            "huge retry max",
            Box::new(|t| t.replace("retry_max = \"1h\"", "retry_max = \"100000years\"")),
            "sweep.retry_max: 100000years is too long",
        ),
        (
            "huge interval",
            Box::new(|t| t.replace("interval = \"1m\"", "interval = \"20years\"")),
            "sweep.interval: 20years is too long",
        ),
        (
            "huge lease",
            Box::new(|t| t.replace("lease = \"5m\"", "lease = \"11years\"")),
            "sweep.lease: 11years is too long",
        ),
        (
            "huge grace",
            Box::new(|t| t.replace("shutdown_grace = \"25s\"", "shutdown_grace = \"2h\"")),
            "sweep.shutdown_grace: 2h is too long: at most 1h",
        ),
        (
            "huge timeout",
            Box::new(|t| t.replace("timeout = \"10s\"", "timeout = \"1h\"")),
            "iyzico.timeout: 1h is too long: at most 10m",
        ),
        (
            "huge connect timeout",
            Box::new(|t| {
                t.replace(
                    "timeout = \"10s\"",
                    "timeout = \"10s\"\nconnect_timeout = \"1000years\"",
                )
            }),
            "iyzico.connect_timeout: 1000years is too long",
        ),
        (
            "huge retry min delay",
            Box::new(|t| t.replace("retries = 3", "retries = 3\nretry_min_delay = \"2h\"")),
            "iyzico.retry_min_delay: 2h is too long: at most 1h",
        ),
        (
            "huge retry max delay",
            Box::new(|t| t.replace("retries = 3", "retries = 3\nretry_max_delay = \"2h\"")),
            "iyzico.retry_max_delay: 2h is too long: at most 1h",
        ),
        // The lease, the heartbeat and the longest attempt.
        (
            "heartbeat under a second",
            Box::new(|t| {
                t.replace(
                    "shutdown_grace = \"25s\"",
                    "shutdown_grace = \"25s\"\nheartbeat = \"500ms\"",
                )
            }),
            "sweep.heartbeat: 500ms is too short: at least 1s",
        ),
        (
            "lease of one second",
            Box::new(|t| t.replace("lease = \"5m\"", "lease = \"1s\"")),
            "sweep.lease: 1s is shorter than 3 × sweep.heartbeat (5s) = 15s",
        ),
        (
            "lease under three heartbeats",
            Box::new(|t| {
                t.replace("lease = \"5m\"", "lease = \"1m\"").replace(
                    "shutdown_grace = \"25s\"",
                    "shutdown_grace = \"25s\"\nheartbeat = \"30s\"",
                )
            }),
            "sweep.lease: 1m is shorter than 3 × sweep.heartbeat (30s) = 1m 30s",
        ),
        (
            "lease under the longest attempt",
            Box::new(|t| t.replace("lease = \"5m\"", "lease = \"3m\"")),
            "sweep.lease: 3m is shorter than the longest attempt, 3m 45s = (iyzico.retries 3 + 1) × iyzico.timeout 10s + 3 × 1m",
        ),
        (
            "lease under the longest attempt with long timeouts",
            Box::new(|t| t.replace("timeout = \"10s\"", "timeout = \"2m\"")),
            "sweep.lease: 5m is shorter than the longest attempt, 11m 5s",
        ),
        (
            "bad log level",
            Box::new(|t| t.replace("level = \"info\"", "level = \"sweeper=loudest\"")),
            "log.level",
        ),
    ];
    for (name, edit, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (path, db) = config_file(dir.path(), edit);
        let out = run(&path, &["check"], &[]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {all}");
        assert!(
            all.contains(expected),
            "{name}: expected {expected:?} in: {all}"
        );
        assert_eq!(
            all.matches("error: ").count(),
            1,
            "{name}: the error is said once: {all}"
        );
        assert!(
            !all.contains("untagged enum") && !all.contains("panicked"),
            "{name}: {all}"
        );
        assert!(!all.contains(SECRET), "{name}: the secret leaked: {all}");
        assert!(!all.contains("424242"), "{name}: the secret leaked: {all}");
        assert!(!db.exists(), "{name}: the database was touched");
    }
}

#[test]
fn environment_overrides_win_and_can_be_wrong_too() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = config_file(dir.path(), |t| t);
    let env = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let c = Config::load(
        &path,
        env(&[
            ("SWEEPER_SWEEP__BATCH_SIZE", "50"),
            ("SWEEPER_SOURCE__MARK_PASSIVE", "false"),
            ("SWEEPER_IYZICO__BASE_URL", "http://127.0.0.1:8089"),
            ("SWEEPER_SWEEP__SCHEDULE", "0 */5 * * * *"),
        ]),
    )
    .unwrap();
    assert_eq!(c.sweep.batch_size.get(), 50);
    assert!(!c.source.mark_passive);
    assert_eq!(c.iyzico.base_url.as_str(), "http://127.0.0.1:8089/");
    assert!(
        matches!(c.sweep.schedule, session_sweeper::config::Schedule::Cron(_)),
        "schedule from env replaces the file's interval"
    );
    let err = Config::load(&path, env(&[("SWEEPER_SWEEP__BACH_SIZE", "50")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown key `bach_size`"), "{err}");
    let err = Config::load(&path, env(&[("SWEEPER_SWEEP__BATCH_SIZE", "lots")]))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("sweep.batch_size"), "{err}");
    // Variables that are not overrides are ignored.
    Config::load(
        &path,
        env(&[("SWEEPER_CONFIG", "/x"), ("SWEEPER_TEST_NOTHING", "1")]),
    )
    .unwrap();
}

#[test]
fn the_secret_can_come_from_a_file_and_never_shows_in_debug() {
    let dir = tempfile::tempdir().unwrap();
    let secret_path = dir.path().join("secret");
    std::fs::write(&secret_path, "from-a-file-123\n").unwrap();
    let (path, _) = config_file(dir.path(), |t| {
        t.replace(
            &format!("secret_key = \"{SECRET}\""),
            &format!("secret_key_file = \"{}\"", secret_path.display()),
        )
    });
    let c = Config::load(&path, []).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(
        c.iyzico.secret_key.expose_secret(),
        "from-a-file-123",
        "trailing newline trimmed"
    );
    let debug = format!("{c:?}");
    assert!(!debug.contains("from-a-file-123"), "{debug}");
    // An env override of secret_key replaces the file setting.
    let c = Config::load(
        &path,
        [(
            "SWEEPER_IYZICO__SECRET_KEY".to_string(),
            "env-secret".to_string(),
        )],
    )
    .unwrap();
    assert_eq!(c.iyzico.secret_key.expose_secret(), "env-secret");
    let with_password = Config::load(
        &path,
        [(
            "SWEEPER_DATABASE__URL".to_string(),
            "postgres://u:hunter2@db/x".to_string(),
        )],
    )
    .unwrap();
    assert!(!format!("{with_password:?}").contains("hunter2"));
}

/// A secret file that cannot be used: exit 2, naming the key and the file, never what the file
/// holds, and nothing touched.
#[test]
fn unusable_secret_files_name_the_key_and_the_path_never_the_contents() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str, Option<&str>, &str)] = &[
        // (name, key in the file, the line it replaces, contents (None: a directory), expected)
        (
            "empty url file",
            "database",
            "url = ",
            Some("\n"),
            "is empty",
        ),
        (
            "url file with another scheme",
            "database",
            "url = ",
            Some("oracle://u:hunter2@db/x\n"),
            "must start with sqlite:, postgres://, postgresql://, mysql:// or mariadb://",
        ),
        (
            "url file with a bad port",
            "database",
            "url = ",
            Some("postgres://u:hunter2@db:notaport/x\n"),
            "is not a valid connection URL",
        ),
        (
            "url file is a directory",
            "database",
            "url = ",
            None,
            "cannot read",
        ),
        (
            "empty api key file",
            "iyzico",
            "api_key = ",
            Some(""),
            "is empty",
        ),
        (
            "blank api key file",
            "iyzico",
            "api_key = ",
            Some(" \r\n"),
            "is empty",
        ),
        (
            "api key file is a directory",
            "iyzico",
            "api_key = ",
            None,
            "cannot read",
        ),
        (
            "empty secret key file",
            "iyzico",
            "secret_key = ",
            Some("\n"),
            "is empty",
        ),
    ];
    for (i, (name, section, line, contents, expected)) in cases.iter().enumerate() {
        let case_dir = dir.path().join(i.to_string());
        std::fs::create_dir(&case_dir).unwrap();
        let file = case_dir.join("secret-file");
        match contents {
            Some(c) => std::fs::write(&file, c).unwrap(),
            None => std::fs::create_dir(&file).unwrap(),
        }
        let key = format!("{}_file", line.trim_end_matches(" = "));
        let (path, db) = config_file(&case_dir, |t| {
            without_line(&t, line).replace(
                &format!("[{section}]"),
                &format!("[{section}]\n{key} = \"{}\"", file.display()),
            )
        });
        let out = run(&path, &["check"], &[]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {all}");
        let named = format!("error: {section}.{key}: ");
        assert!(all.contains(&named), "{name}: expected {named:?} in: {all}");
        assert!(
            all.contains(&file.display().to_string()),
            "{name}: the path is named: {all}"
        );
        assert!(
            all.contains(expected),
            "{name}: expected {expected:?} in: {all}"
        );
        assert_eq!(all.matches("error: ").count(), 1, "{name}: {all}");
        assert!(
            !all.contains("hunter2"),
            "{name}: the password leaked: {all}"
        );
        assert!(!db.exists(), "{name}: the database was touched");
    }
}

/// `url_file` and `api_key_file` from the config file or the environment; one alternative set
/// from the environment replaces the other, and both from the environment are refused.
#[test]
fn secret_files_and_their_environment_overrides() {
    use secrecy::ExposeSecret;
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("database-url");
    std::fs::write(&url_file, "postgres://sweeper:from-a-file@db/payments\n").unwrap();
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "api-key-from-a-file\r\n").unwrap();
    let env = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    let url_file_var = url_file.display().to_string();
    let key_file_var = key_file.display().to_string();

    // In the file.
    let (with_files, _) = config_file(dir.path(), |t| {
        without_line(&t, "url = ")
            .replace(
                "[database]",
                &format!("[database]\nurl_file = \"{url_file_var}\""),
            )
            .replace(
                "api_key = \"key\"",
                &format!("api_key_file = \"{key_file_var}\""),
            )
    });
    let c = Config::load(&with_files, []).unwrap();
    assert_eq!(
        c.database.url.expose_secret(),
        "postgres://sweeper:from-a-file@db/payments",
        "trailing newline trimmed"
    );
    assert_eq!(c.iyzico.api_key.expose_secret(), "api-key-from-a-file");
    let debug = format!("{c:?}");
    assert!(
        !debug.contains("from-a-file@") && !debug.contains("api-key-from-a-file"),
        "{debug}"
    );

    // The value from the environment replaces the file setting.
    let c = Config::load(
        &with_files,
        env(&[
            ("SWEEPER_DATABASE__URL", "sqlite://from-env.db"),
            ("SWEEPER_IYZICO__API_KEY", "key-from-env"),
        ]),
    )
    .unwrap();
    assert_eq!(c.database.url.expose_secret(), "sqlite://from-env.db");
    assert_eq!(c.iyzico.api_key.expose_secret(), "key-from-env");

    // And the file from the environment replaces the value in the config file.
    let (with_values, _) = config_file(dir.path(), |t| t);
    let c = Config::load(
        &with_values,
        env(&[
            ("SWEEPER_DATABASE__URL_FILE", &url_file_var),
            ("SWEEPER_IYZICO__API_KEY_FILE", &key_file_var),
        ]),
    )
    .unwrap();
    assert_eq!(
        c.database.url.expose_secret(),
        "postgres://sweeper:from-a-file@db/payments"
    );
    assert_eq!(c.iyzico.api_key.expose_secret(), "api-key-from-a-file");

    // Both alternatives from the environment: which one was meant? Refused.
    for (a, b, key) in [
        (
            "SWEEPER_DATABASE__URL",
            "SWEEPER_DATABASE__URL_FILE",
            "database.",
        ),
        (
            "SWEEPER_IYZICO__API_KEY",
            "SWEEPER_IYZICO__API_KEY_FILE",
            "iyzico.api_key",
        ),
        (
            "SWEEPER_IYZICO__SECRET_KEY",
            "SWEEPER_IYZICO__SECRET_KEY_FILE",
            "iyzico.secret_key",
        ),
    ] {
        let err = Config::load(
            &with_values,
            env(&[(a, "postgres://u:hunter2@db/x"), (b, &key_file_var)]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(key) && err.contains(&format!("{a} and {b} are both set")),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = config_file(dir.path(), |t| t);
    assert_eq!(run(&path, &["frobnicate"], &[]).status.code(), Some(2));
    assert_eq!(
        run(&path, &["dry-run", "--format", "xml"], &[])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(&path, &["requeue"], &[]).status.code(),
        Some(2),
        "requeue needs --all or --error-code"
    );
    let missing = run(&dir.path().join("nope.toml"), &["check"], &[]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).contains("nope.toml"), "{}", text(&missing));
}

#[test]
fn an_unreachable_database_is_a_runtime_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = config_file(dir.path(), |t| {
        t.replace("max_connections = 4", "max_connections = 1")
    });
    let out = run(
        &path,
        &["check"],
        &[(
            "SWEEPER_DATABASE__URL",
            "postgres://postgres@127.0.0.1:1/none",
        )],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

/// Every runtime error is printed once, as one chain: "database error while X: Y". A SQLite
/// error used to be printed three times (the error, then its source, then the source's source).
#[test]
fn a_database_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = config_file(dir.path(), |t| t);
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("no-such-dir").join("app.db").display()
    );
    for command in ["check", "migrate", "once", "report"] {
        let out = run(&path, &[command], &[("SWEEPER_DATABASE__URL", &url)]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{command}: {all}");
        assert!(
            all.starts_with("error: database error while "),
            "{command}: {all}"
        );
        assert_eq!(
            all.matches("unable to open database file").count(),
            1,
            "{command}: the cause is said once: {all}"
        );
        assert_eq!(all.lines().count(), 1, "{command}: {all}");
    }
}

/// A database that accepts connections and never answers: the first SIGTERM ends the wait at
/// once (exit 1, saying so) instead of after the pool's timeout, and is not a forced stop.
#[test]
fn the_first_signal_ends_a_wait_for_a_silent_database() {
    // Connections complete in the kernel's backlog; nothing ever reads or answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://postgres@{}/none", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = config_file(dir.path(), |t| t);
    for command in ["once", "check", "dry-run", "report"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"))
            .arg("--config")
            .arg(&path)
            .arg(command)
            .env_remove("SWEEPER_CONFIG")
            .env("RUST_LOG", "warn")
            .env("SWEEPER_DATABASE__URL", &url)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(800));
        assert!(
            child.try_wait().unwrap().is_none(),
            "{command} should still be waiting for the database"
        );
        let signalled = std::time::Instant::now();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if signalled.elapsed() > std::time::Duration::from_secs(5) {
                child.kill().unwrap();
                panic!("{command} ignored SIGTERM while waiting for the database");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let took = signalled.elapsed();
        let out = child.wait_with_output().unwrap();
        let all = text(&out);
        assert_eq!(status.code(), Some(1), "{command}: {all}");
        assert!(
            took < std::time::Duration::from_secs(2),
            "{command} took {took:?} to obey SIGTERM"
        );
        assert!(all.contains("stopped by a signal"), "{command}: {all}");
        assert_eq!(all.matches("error: ").count(), 1, "{command}: {all}");
    }
}

/// Holds the lock `migrate` needs (SQLite: a write transaction; PostgreSQL: the migration's
/// advisory lock, `MIGRATION_LOCK` in src/store/postgres.rs) until `release` is sent.
async fn hold_migration_lock(db: &TestDb) -> tokio::sync::oneshot::Sender<()> {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (locked, is_locked) = tokio::sync::oneshot::channel::<()>();
    match &db.pool {
        common::Pool::Sqlite(p) => {
            // The sweeper's connections switch the file to WAL, which cannot happen under a
            // writer: switch first (it persists), so that migrate waits in BEGIN IMMEDIATE.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(p)
                .await
                .unwrap();
            let p = p.clone();
            tokio::spawn(async move {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await.unwrap();
                sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
                locked.send(()).unwrap();
                let _ = released.await;
                tx.rollback().await.unwrap();
            });
        }
        common::Pool::MySql(_) => unreachable!("not run on MySQL"),
        common::Pool::Pg(p) => {
            let p = p.clone();
            tokio::spawn(async move {
                let mut tx = p.begin().await.unwrap();
                sqlx::query("SELECT pg_advisory_xact_lock(7933737)")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                locked.send(()).unwrap();
                let _ = released.await;
                tx.rollback().await.unwrap();
            });
        }
    }
    is_locked.await.unwrap();
    release
}

/// A single SIGTERM during `migrate` lets the migration finish (exit 0, tables current); only a
/// second one forces 143, and then nothing is half-applied.
async fn one_signal_lets_migrate_finish_and_two_force_it(kind: Kind) {
    // MySQL commits DDL as it goes, so "a forced stop commits nothing" cannot hold there; its
    // migration statements are each idempotent instead, and the MySQL store test re-runs them.
    if kind == Kind::MySql {
        return;
    }
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    std::fs::write(
        db.dir.path().join("sweeper.toml"),
        db.config_toml("http://127.0.0.1:9"),
    )
    .unwrap();
    let migrations = || async {
        let sql = match kind {
            Kind::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'sweeper_schema_migrations'"
            }
            Kind::Postgres | Kind::MySql => {
                "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'sweeper_schema_migrations'"
            }
        };
        db.scalar(sql).await
    };

    // Two signals: forced, 143, and the migration's transaction is never committed.
    let release = hold_migration_lock(&db).await;
    let mut child = spawn_sweeper(&db, "migrate", &[]);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    if child.try_wait().unwrap().is_some() {
        let out = child.wait_with_output().await.unwrap();
        panic!("migrate did not wait for the lock: {}", text(&out));
    }
    signal(&child, "-TERM");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "one signal does not stop migrate"
    );
    signal(&child, "-TERM");
    let status = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
        .await
        .expect("a second signal stops at once")
        .unwrap();
    assert_eq!(status.code(), Some(143));
    release.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(migrations().await, 0, "a forced stop commits nothing");

    // One signal: the migration finishes once the lock is free, and the exit is 0.
    let release = hold_migration_lock(&db).await;
    let child = spawn_sweeper(&db, "migrate", &[]);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    signal(&child, "-TERM");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    release.send(()).unwrap();
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("migrate finishes")
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("migrations applied"), "{all}");
    assert_eq!(migrations().await, 1);
    assert!(
        db.store()
            .await
            .pending_migrations()
            .await
            .unwrap()
            .is_empty(),
        "the tables are current"
    );
}

async fn the_commands_tell_a_consistent_story(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig {
        always_fail: ["s-1".to_string()].into(),
        ..SimulatorConfig::default()
    })
    .await;
    let mut rows = idle_sessions("s", 5);
    rows.push(fresh_session("fresh"));
    db.seed(&rows).await;
    let path = db.dir.path().join("sweeper.toml");
    std::fs::write(&path, db.config_toml(&sim.base_url())).unwrap();

    // Before migrate: check says so, once refuses.
    let check = run(&path, &["check"], &[]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains("run `session-sweeper migrate`"),
        "{}",
        text(&check)
    );
    let once = run(&path, &["once"], &[]);
    assert_eq!(once.status.code(), Some(1));
    assert!(text(&once).contains("migrate"), "{}", text(&once));

    assert!(run(&path, &["migrate"], &[]).status.success());
    assert!(
        run(&path, &["migrate"], &[]).status.success(),
        "migrate is idempotent"
    );
    let check = run(&path, &["check"], &[]);
    assert!(check.status.success(), "{}", text(&check));

    let dry = run(&path, &["dry-run", "--format", "json"], &[]);
    assert!(dry.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(doc["eligible"], 5);
    assert!(
        doc["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["idle_for"].as_u64().unwrap() >= 7190)
    );
    let table = run(&path, &["dry-run"], &[]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("s-4"));
    assert_eq!(
        sim.stats.requests.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "dry-run sends nothing"
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM sweeper_sessions").await,
        0,
        "dry-run writes nothing"
    );

    let once = run(&path, &["once"], &[]);
    assert!(once.status.success(), "{}", text(&once));
    let line = String::from_utf8_lossy(&once.stdout);
    assert!(
        line.contains("invalidated=4") && line.contains("failed=1"),
        "{line}"
    );

    let report = run(&path, &["report", "--format", "json"], &[]);
    let doc: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    for key in [
        "invalidated",
        "already_invalidated",
        "skipped",
        "pending",
        "failed",
    ] {
        assert!(doc[key].is_u64(), "report JSON lacks integer {key}: {doc}");
    }
    assert_eq!(
        (doc["invalidated"].as_u64(), doc["failed"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(doc["recent_failures"][0]["error_code"], "11");

    let requeue = run(
        &path,
        &["requeue", "--error-code", "11", "--format", "json"],
        &[],
    );
    let doc: serde_json::Value = serde_json::from_slice(&requeue.stdout).unwrap();
    assert_eq!(doc["requeued"], 1);
    assert_eq!(db.ledger("s-1").await, Some(("pending".into(), 0)));
    let table = String::from_utf8_lossy(&run(&path, &["report"], &[]).stdout).to_string();
    assert!(
        table.contains("pending") && table.contains("due now"),
        "{table}"
    );
}

/// Every secret from a file: the database URL, the API key (the simulator checks it) and the
/// secret key (it checks the signature). migrate, check and once all work.
async fn every_secret_can_come_from_a_file(kind: Kind) {
    let Some(db) = TestDb::new(kind).await else {
        return;
    };
    let sim = simulator(SimulatorConfig::default()).await;
    db.seed(&idle_sessions("s", 3)).await;
    let dir = db.dir.path();
    let url_file = dir.join("database-url");
    std::fs::write(&url_file, format!("{}\n", db.url)).unwrap();
    let key_file = dir.join("api-key");
    std::fs::write(&key_file, format!("{}\n", common::API_KEY)).unwrap();
    let secret_file = dir.join("secret-key");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let toml = db
        .config_toml(&sim.base_url())
        .replace(
            &format!("url = \"{}\"", db.url),
            &format!("url_file = \"{}\"", url_file.display()),
        )
        .replace(
            &format!("api_key = \"{}\"", common::API_KEY),
            &format!("api_key_file = \"{}\"", key_file.display()),
        )
        .replace(
            &format!("secret_key = \"{SECRET}\""),
            &format!("secret_key_file = \"{}\"", secret_file.display()),
        );
    assert!(
        !toml.contains(&db.url) && !toml.contains(common::API_KEY) && !toml.contains(SECRET),
        "no secret left in the config: {toml}"
    );
    let path = dir.join("sweeper.toml");
    std::fs::write(&path, toml).unwrap();

    for command in ["migrate", "check"] {
        let out = run(&path, &[command], &[]);
        assert!(out.status.success(), "{command}: {}", text(&out));
    }
    let once = run(&path, &["once"], &[]);
    let all = text(&once);
    assert!(once.status.success(), "{all}");
    assert!(all.contains("invalidated=3"), "{all}");
    assert!(
        !all.contains(SECRET) && !all.contains(common::API_KEY),
        "{all}"
    );
    assert_eq!(db.status("s-0").await, "PASSIVE");
}

both_backends!(
    every_secret_can_come_from_a_file,
    the_commands_tell_a_consistent_story,
    one_signal_lets_migrate_finish_and_two_force_it,
);

/// `serve-status` opens one fresh connection first, as every command that needs the database
/// does: a server that refuses connections is said at once, not as the pool's "timed out" ten
/// seconds later.
#[test]
fn serve_status_reports_a_refused_database_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = config_file(dir.path(), |t| t);
    let started = std::time::Instant::now();
    let out = run(
        &path,
        &["serve-status", "--listen", "127.0.0.1:0"],
        &[(
            "SWEEPER_DATABASE__URL",
            "postgres://postgres:hunter2@127.0.0.1:1/none",
        )],
    );
    let took = started.elapsed();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("connecting to the database") && all.contains("Connection refused"),
        "{all}"
    );
    assert!(!all.contains("hunter2"), "{all}");
    assert_eq!(all.matches("error: ").count(), 1, "{all}");
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
}

/// `demo` as a newcomer runs it: its own temporary database and simulator, one sweep, the
/// report, exit 0, and nothing left behind in the temporary directory.
#[test]
fn demo_prints_its_report_and_exits_0() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"))
        .args(["demo", "--sessions", "100"])
        .env("TMPDIR", tmp.path())
        .env_remove("SWEEPER_CONFIG")
        .output()
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "session-sweeper demo",
        "swept ",
        "OUTCOME",
        "invalidated",
        "Next:",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "{all}");
}

/// `demo` started with `args` in its own temporary directory, and its stdout line by line.
fn spawn_demo(
    tmp: &Path,
    args: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<Vec<String>>,
) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"))
        .arg("demo")
        .args(args)
        .env("TMPDIR", tmp)
        .env_remove("SWEEPER_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let _ = tx.send(line.clone());
            lines.push(line);
        }
        lines
    });
    (child, rx, reader)
}

/// Waits for a line of `lines` that contains `needle`.
fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str) {
    loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no line with {needle:?}: {e}"));
        if line.contains(needle) {
            return;
        }
    }
}

/// Sends `sig` (`"-TERM"`, `"-INT"`) to `child`.
fn kill(child: &std::process::Child, sig: &str) {
    let sent = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Signals during `demo` keep the contract: the first before its sweep stops it at once (exit
/// 1, saying so), a second during the sweep forces 130/143; either way its temporary directory
/// is removed. It used to die of a signal that came while it seeded (leaving the directory
/// behind) and to exit 1 on a forced stop.
#[test]
fn demo_obeys_signals_and_leaves_nothing_behind() {
    // The first signal while the sample sessions are written.
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, lines, reader) = spawn_demo(tmp.path(), &["--sessions", "300000"]);
    wait_for_line(&lines, "session-sweeper demo");
    kill(&child, "-TERM");
    let status = child.wait().unwrap();
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopped by a signal"), "{stderr}");
    assert_eq!(stderr.matches("error: ").count(), 1, "{stderr}");
    reader.join().unwrap();
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

    // Two signals while it sweeps (5,000 sessions at 200/s): forced, 128 + the second one
    // (both pending at once, the kernel delivers SIGINT first).
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, lines, reader) = spawn_demo(tmp.path(), &["--sessions", "5000"]);
    wait_for_line(&lines, "sessions:");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    kill(&child, "-TERM");
    kill(&child, "-INT");
    let status = child.wait().unwrap();
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(
        matches!(status.code(), Some(130 | 143)),
        "{status:?}: {stderr}"
    );
    reader.join().unwrap();
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// A log shipper that goes away (`once 2>&1 | head`) must not stop the sweep half-way: a log
/// line that cannot be written is dropped, the sweep finishes, every call is recorded, and the
/// process exits on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_output_pipes_neither_hang_nor_lose_a_sweep() {
    let Some((db, _sim)) = sessions_and_simulator(Kind::Sqlite, 40, Duration::from_millis(5)).await
    else {
        return;
    };
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"));
    cmd.arg("--config")
        .arg(db.dir.path().join("sweeper.toml"))
        .arg("once")
        // Every statement and request logged: the writes start failing at once.
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // The reader goes away before the first line.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("once hung after its output pipes closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(db.count_state("invalidated").await, 40);
    let passive = db
        .scalar("SELECT COUNT(*) FROM checkout_sessions WHERE status = 'PASSIVE'")
        .await;
    assert_eq!(passive, 40);
}
