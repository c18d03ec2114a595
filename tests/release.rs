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

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    let url = format!("http://127.0.0.1:{}/healthz", free_port());
    let o = sweeper(&["healthcheck", "--url", &url]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains(&url));
    // Bad usage is not a health verdict.
    let o = sweeper(&["healthcheck", "--url", "https://127.0.0.1:9/healthz"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

#[tokio::test]
async fn healthcheck_passes_against_a_running_daemon() {
    let (db, _sim) = sessions_and_simulator(Kind::Sqlite, 0, Duration::ZERO)
        .await
        .expect("SQLite always runs");
    let port = free_port();
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
