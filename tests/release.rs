//! What a packaged install relies on, through the real binary: `--version` with the build
//! stamp, `completions`, `healthcheck` against a running daemon and a closed port, and the
//! build stamp in the start-up log line and in `sweeper_build_info`.

mod common;

use std::io::{Read as _, Write as _};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{Kind, sessions_and_simulator, signal, spawn_sweeper};

fn sweeper(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"))
        .args(args)
        .env_remove("SWEEPER_CONFIG")
        .env_remove("SWEEPER_SERVER__LISTEN")
        .output()
        .unwrap()
}

/// The binary run in `dir` (where no ./session-sweeper.toml is, unless the test puts one).
fn sweeper_in(dir: &std::path::Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_session-sweeper"))
        .args(args)
        .current_dir(dir)
        .env_remove("SWEEPER_CONFIG")
        .env_remove("SWEEPER_SERVER__LISTEN")
        .output()
        .unwrap()
}

fn all_output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A tiny HTTP server: 200 on `/healthz`, 503 on anything else; every request it got.
fn fake_health_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let req = String::from_utf8_lossy(&req).into_owned();
            let status = if req.starts_with("GET /healthz ") {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            log.lock().unwrap().push(req);
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, seen)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The commit `--version` must show: git's, or "unknown" where git cannot tell.
fn expected_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn version_shows_version_commit_and_build_date() {
    let o = sweeper(&["--version"]);
    assert!(o.status.success());
    let line = stdout(&o);
    let want = format!(
        "session-sweeper {} (commit {}, built ",
        env!("CARGO_PKG_VERSION"),
        expected_commit()
    );
    assert!(line.starts_with(&want), "{line:?} does not start {want:?}");
    let date = line
        .trim_end()
        .trim_start_matches(&want)
        .trim_end_matches(')');
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-',
        "build date {date:?} in {line:?}"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let o = sweeper(&["completions", "bash"]);
    assert!(o.status.success(), "{o:?}");
    let script = stdout(&o);
    assert!(
        script.contains("_session__sweeper()"),
        "not a bash completion function"
    );
    assert!(script.contains("complete -F _session__sweeper"));
    for sub in [
        "migrate",
        "dry-run",
        "once",
        "run",
        "report",
        "healthcheck",
        "completions",
    ] {
        assert!(script.contains(sub), "bash completion lacks {sub}");
    }
    let zsh = sweeper(&["completions", "zsh"]);
    assert!(zsh.status.success() && stdout(&zsh).starts_with("#compdef session-sweeper"));
    let fish = sweeper(&["completions", "fish"]);
    assert!(fish.status.success() && stdout(&fish).contains("complete -c session-sweeper"));
    assert_eq!(sweeper(&["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn healthcheck_fails_on_a_closed_port() {
    let url = format!("http://127.0.0.1:{}/healthz", common::free_local_port());
    let o = sweeper(&["healthcheck", "--url", &url]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains(&url));
    // Bad usage is not a health verdict.
    let o = sweeper(&["healthcheck", "--url", "https://127.0.0.1:9/healthz"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

#[test]
fn healthcheck_refuses_a_config_that_serves_no_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sweeper.toml");
    // A config without [server] listen: `run` serves nothing, so nothing is probed.
    std::fs::write(
        &config,
        "[database]\nurl = \"sqlite://x.db\"\n[server]\nstatus_page = true\n",
    )
    .unwrap();
    let o = sweeper_in(
        dir.path(),
        &["--config", config.to_str().unwrap(), "healthcheck"],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    let want = format!(
        "server.listen is not set in {}: the daemon serves no /healthz; set it or pass --url",
        config.display()
    );
    assert!(err.contains(&want), "{err:?} lacks {want:?}");
    assert!(!err.contains("9464"), "no probe of the default port: {err}");

    // The same through ./session-sweeper.toml and through SWEEPER_CONFIG.
    std::fs::copy(&config, dir.path().join("session-sweeper.toml")).unwrap();
    let o = sweeper_in(dir.path(), &["healthcheck"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("server.listen is not set in session-sweeper.toml"),
        "{o:?}"
    );

    // A listen address the daemon would refuse is not replaced by the default either.
    std::fs::write(&config, "[server]\nlisten = \"localhost\"\n").unwrap();
    let o = sweeper_in(
        dir.path(),
        &["--config", config.to_str().unwrap(), "healthcheck"],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("\"localhost\" is not an address"),
        "{o:?}"
    );
}

#[test]
fn healthcheck_without_any_config_file_asks_the_default_port() {
    let dir = tempfile::tempdir().unwrap();
    let o = sweeper_in(dir.path(), &["healthcheck"]);
    // 0 or 1 depending on whether something on this machine answers there: either way, it
    // asked 127.0.0.1:9464.
    assert!(matches!(o.status.code(), Some(0 | 1)), "{o:?}");
    assert!(
        all_output(&o).contains("http://127.0.0.1:9464/healthz"),
        "{o:?}"
    );
    let absent = dir.path().join("absent.toml");
    let o = sweeper_in(
        dir.path(),
        &["--config", absent.to_str().unwrap(), "healthcheck"],
    );
    assert!(
        all_output(&o).contains("http://127.0.0.1:9464/healthz"),
        "{o:?}"
    );
}

#[test]
fn healthcheck_never_prints_a_password_from_the_url() {
    let (port, seen) = fake_health_server();
    let closed = common::free_local_port();
    let cases = [
        // (URL, exit code, what the output shows instead of the password)
        (
            format!("http://probe:hunter2@127.0.0.1:{port}/healthz"),
            0,
            format!("http://probe:***@127.0.0.1:{port}/healthz: 200"),
        ),
        (
            format!("http://probe:hunter2@127.0.0.1:{port}/readyz"),
            1,
            format!("http://probe:***@127.0.0.1:{port}/readyz: HTTP 503"),
        ),
        (
            format!("http://probe:hunter2@127.0.0.1:{closed}/healthz"),
            1,
            format!("http://probe:***@127.0.0.1:{closed}/healthz: "),
        ),
        (
            "https://probe:hunter2@127.0.0.1:9/healthz".to_owned(),
            2,
            "--url https://probe:***@127.0.0.1:9/healthz: only http://".to_owned(),
        ),
        (
            "http://probe:hunter2@127.0.0.1:99999/healthz".to_owned(),
            2,
            "--url http://probe:***@127.0.0.1:99999/healthz: ".to_owned(),
        ),
        (
            "http://probe:hunter2@no-such-host.invalid:9464/healthz".to_owned(),
            1,
            "http://probe:***@no-such-host.invalid:9464/healthz: resolving".to_owned(),
        ),
        (
            "probe:hunter2@127.0.0.1:9464/healthz".to_owned(),
            2,
            "--url probe:***@127.0.0.1:9464/healthz".to_owned(),
        ),
    ];
    for (url, code, shown) in cases {
        let o = sweeper(&["healthcheck", "--url", &url]);
        let out = all_output(&o);
        assert_eq!(o.status.code(), Some(code), "{url}: {out}");
        assert!(out.contains(&shown), "{url}: {shown:?} not in {out:?}");
        assert!(
            !out.contains("hunter2"),
            "{url}: the password leaked: {out}"
        );
    }
    let requests = seen.lock().unwrap();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        requests
            .iter()
            .all(|r| !r.contains("hunter2") && !r.contains("probe")),
        "the user information is not sent on: {requests:?}"
    );
}

#[tokio::test]
async fn healthcheck_passes_against_a_running_daemon() {
    let (db, _sim) = sessions_and_simulator(Kind::Sqlite, 0, Duration::ZERO)
        .await
        .expect("SQLite always runs");
    let port = common::free_local_port();
    let config = db.dir.path().join("sweeper.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&format!("\n[server]\nlisten = \"127.0.0.1:{port}\"\n"));
    std::fs::write(&config, toml).unwrap();
    let child = spawn_sweeper(&db, "run", &[("RUST_LOG", "info")]);

    // The default URL comes from the config's server.listen.
    let cfg = config.to_str().unwrap();
    let start = Instant::now();
    let ok = loop {
        let o = sweeper(&["--config", cfg, "healthcheck"]);
        if o.status.success() {
            break o;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the daemon never answered /healthz: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(stdout(&ok).contains(&format!("http://127.0.0.1:{port}/healthz: 200")));

    // --url wins, and a non-2xx answer is unhealthy.
    let base = format!("http://127.0.0.1:{port}");
    assert!(
        sweeper(&["healthcheck", "--url", &format!("{base}/healthz")])
            .status
            .success()
    );
    let missing = sweeper(&["healthcheck", "--url", &format!("{base}/no-such-page")]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");

    // The build stamp is a metric.
    let metrics = http_get(port, "/metrics").unwrap();
    let info = format!(
        "sweeper_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        expected_commit()
    );
    assert!(metrics.contains(&info), "no {info} in:\n{metrics}");

    // ...and is in the start-up log line.
    signal(&child, "-TERM");
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    let starting = log
        .lines()
        .find(|l| l.contains("starting"))
        .unwrap_or_else(|| panic!("no start-up line in:\n{log}"));
    assert!(
        starting.contains(env!("CARGO_PKG_VERSION")) && starting.contains(&expected_commit()),
        "{starting}"
    );
}
