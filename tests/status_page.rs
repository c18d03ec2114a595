//! The status page as a person sees it: a real headless Chromium loads the page that `run` (and
//! `serve-status`) serves on a real database after a sweep with failures, runs its script, and
//! the rendered DOM is checked against `report`. Neither the page nor `/api/status` may show a
//! token, a member identifier or a secret. Every method but GET and HEAD is answered 405.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{API_KEY, Kind, SECRET, TestDb};
use session_sweeper::iyzico::simulator::SimulatorConfig;
use session_sweeper::store::{Outcome, Report};
use session_sweeper::telemetry::fingerprint;

/// Distinctive, so a leak cannot hide behind ordinary words.
const TOKEN_PREFIX: &str = "tok7f3e";
const MEMBER_PREFIX: &str = "mbr91c2";
const SESSIONS: usize = 24;
/// Tokens the simulator always refuses (errorCode 11, permanent): they end `failed`.
const FAILING: [usize; 3] = [2, 9, 17];
/// Tokens it answers `260030` for.
const ALREADY: [usize; 2] = [4, 5];

/// Debian's chromium; `None` (with a notice) when missing outside CI. In CI it must be there.
fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("chromium is missing: `apt-get install -y chromium` (.ci/run installs it)");
        }
        eprintln!("notice: chromium is not installed; skipping the browser test");
    }
    found
}

/// Runs headless Chromium on `url` with a fresh profile; returns the DOM after the scripts ran.
/// With `screenshot`, also saves a PNG of the page there.
async fn browse(chromium: &Path, url: &str, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .kill_on_drop(true);
    match screenshot {
        Some(path) => cmd
            .arg(format!("--screenshot={}", path.display()))
            .arg("--window-size=1280,1280"),
        None => cmd.arg("--dump-dom"),
    };
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.arg(url).output())
        .await
        .expect("chromium finishes within 60 s")
        .expect("chromium starts");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn token(i: usize) -> String {
    format!("{TOKEN_PREFIX}-{i:02}")
}

/// A database with idle sessions and a simulator that fails some and calls others already
/// invalidated; `None` to skip.
async fn setup(kind: Kind) -> Option<(TestDb, session_sweeper::iyzico::simulator::Simulator)> {
    let db = TestDb::new(kind).await?;
    let seeds: Vec<common::Seed> = (0..SESSIONS)
        .map(|i| common::Seed {
            token: token(i),
            member: format!("{MEMBER_PREFIX}-{i:02}"),
            status: "ACTIVE",
            idle: Duration::from_secs(7200),
        })
        .collect();
    db.seed(&seeds).await;
    db.store().await;
    let sim = common::simulator(SimulatorConfig {
        always_fail: FAILING.iter().map(|i| token(*i)).collect::<HashSet<_>>(),
        already_invalidated: ALREADY.iter().map(|i| token(*i)).collect::<HashSet<_>>(),
        ..SimulatorConfig::default()
    })
    .await;
    Some((db, sim))
}

async fn http(method: &str, url: &str) -> reqwest::Response {
    session_sweeper::iyzico::install_tls_provider();
    reqwest::Client::new()
        .request(method.parse().unwrap(), url)
        .send()
        .await
        .unwrap()
}

/// Polls `/api/status` until `done` holds for it.
async fn wait_for_status(base: &str, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    session_sweeper::iyzico::install_tls_provider();
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/api/status")).await
            && r.status() == 200
            && let Ok(v) = r.json::<serde_json::Value>().await
            && done(&v)
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the element with `id` in a dumped DOM.
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    &rest[start..end]
}

/// The page shows what `report` says, and never a token, member or secret.
fn assert_page_matches_report(dom: &str, api: &str, report: &Report, db: &TestDb) {
    for (outcome, n) in &report.counts {
        assert_eq!(
            text_of(dom, &format!("count-{}", outcome.as_str())),
            n.to_string(),
            "{} on the page",
            outcome.as_str()
        );
    }
    let count = |o: Outcome| report.counts.iter().find(|(k, _)| *k == o).unwrap().1;
    assert_eq!(count(Outcome::Failed), FAILING.len() as u64);
    assert_eq!(count(Outcome::AlreadyInvalidated), ALREADY.len() as u64);
    assert_eq!(
        count(Outcome::Invalidated),
        (SESSIONS - FAILING.len() - ALREADY.len()) as u64
    );
    // A failed session by its fingerprint, with iyzico's error code.
    let fp = fingerprint(&token(FAILING[0]));
    assert!(dom.contains(&format!(">{fp}<")), "{fp} missing:\n{dom}");
    assert!(
        dom.contains(">11<"),
        "error code 11 missing from the page:\n{dom}"
    );
    assert!(
        dom.contains(&format!(">{}<", FAILING.len())),
        "the by-code count"
    );
    let db_secret = match db.kind {
        Kind::Sqlite => db.dir.path().display().to_string(),
        Kind::Postgres | Kind::MySql => db.url.clone(),
    };
    for (what, text) in [("the page", dom), ("/api/status", api)] {
        for needle in [
            TOKEN_PREFIX,
            MEMBER_PREFIX,
            SECRET,
            API_KEY,
            &db_secret,
            "postgres://",
            "sqlite:",
        ] {
            assert!(!text.contains(needle), "{what} shows {needle:?}:\n{text}");
        }
    }
}

/// Every method but GET and HEAD is refused on every route.
async fn assert_read_only(base: &str, routes: &[&str]) {
    for route in routes {
        let url = format!("{base}{route}");
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            assert_eq!(
                http(method, &url).await.status(),
                405,
                "{method} {route} must be 405"
            );
        }
        let head = http("HEAD", &url).await;
        assert_eq!(head.status(), 200, "HEAD {route}");
    }
    let page = http("GET", &format!("{base}/")).await;
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let body = page.text().await.unwrap();
    assert!(
        !body.contains("<script>") && !body.contains("style="),
        "nothing inline: {body}"
    );
}

async fn run_serves_the_page(kind: Kind) {
    let Some(chromium) = chromium() else { return };
    let Some((db, sim)) = setup(kind).await else {
        return;
    };
    let config = db.config(&sim.base_url(), &[]);
    let daemon = common::Daemon::start(config).await;
    let base = daemon.base_url.clone();
    wait_for_status(&base, "the first sweep and its heartbeat", |v| {
        v["outcomes"]["failed"] == FAILING.len()
            && v["outcomes"]["pending"] == 0
            && v["last_sweep"]["result"] == "ok"
            && !v["fleet"]["live"].as_array().unwrap().is_empty()
    })
    .await;
    let report = db.store().await.report(10).await.unwrap();
    let dom = browse(&chromium, &format!("{base}/"), None).await;
    let api = http("GET", &format!("{base}/api/status"))
        .await
        .text()
        .await
        .unwrap();
    assert_page_matches_report(&dom, &api, &report, &db);
    // The live worker: this process, on this host.
    let host = session_sweeper::fleet::this_worker().hostname;
    let host = host.split('#').next().unwrap();
    assert!(
        dom.contains(&format!("{host} (this process)")),
        "live worker {host} missing:\n{dom}"
    );
    assert_eq!(text_of(&dom, "health"), "ready");
    // The chart drew the calls of the last hour.
    assert!(dom.contains("<svg"), "no chart:\n{dom}");
    assert!(dom.contains("class=\"s-failed\""), "no failed bar:\n{dom}");
    assert_read_only(
        &base,
        &["/", "/api/status", "/status.js", "/status.css", "/metrics"],
    )
    .await;
    if kind == Kind::Sqlite {
        // The README's screenshot: SAVE_STATUS_SCREENSHOT=docs/status-page.png to refresh it.
        let png = std::env::var_os("SAVE_STATUS_SCREENSHOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| db.dir.path().join("status-page.png"));
        browse(&chromium, &format!("{base}/"), Some(&png)).await;
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG screenshot");
    }
    daemon
        .stop(Duration::from_secs(5), Duration::from_secs(10))
        .await;
}

async fn serve_status_serves_the_page_without_sweeping(kind: Kind) {
    let Some(chromium) = chromium() else { return };
    let Some((db, sim)) = setup(kind).await else {
        return;
    };
    let config = db.config(&sim.base_url(), &[]);
    common::sweep_once(&config).await.unwrap();
    let calls = sim.stats.arrivals().len();
    std::fs::write(
        db.dir.path().join("sweeper.toml"),
        db.config_toml(&sim.base_url()),
    )
    .unwrap();
    let listen = common::free_local_addr();
    let mut child = common::spawn_sweeper(
        &db,
        "serve-status",
        &[("SWEEPER_SERVER__LISTEN", listen.as_str())],
    );
    let base = format!("http://{listen}");
    wait_for_status(&base, "serve-status to answer", |v| {
        v["mode"] == "serve-status"
    })
    .await;
    let report = db.store().await.report(10).await.unwrap();
    let dom = browse(&chromium, &format!("{base}/"), None).await;
    let api = http("GET", &format!("{base}/api/status"))
        .await
        .text()
        .await
        .unwrap();
    assert_page_matches_report(&dom, &api, &report, &db);
    assert_eq!(text_of(&dom, "health"), "no live worker");
    assert!(
        text_of(&dom, "backlog").starts_with("0 now"),
        "{}",
        text_of(&dom, "backlog")
    );
    assert_read_only(&base, &["/", "/api/status", "/status.js", "/healthz"]).await;
    assert_eq!(
        sim.stats.arrivals().len(),
        calls,
        "serve-status never calls the API"
    );
    common::signal(&child, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("serve-status stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_off_leaves_only_the_operations_endpoints() {
    let Some((db, sim)) = setup(Kind::Sqlite).await else {
        return;
    };
    let config = db.config(&sim.base_url(), &[("SWEEPER_SERVER__STATUS_PAGE", "false")]);
    let daemon = common::Daemon::start(config).await;
    let base = daemon.base_url.clone();
    session_sweeper::iyzico::install_tls_provider();
    // The listener was bound before the daemon started: nothing to wait for.
    assert_eq!(http("GET", &format!("{base}/")).await.status(), 404);
    assert_eq!(
        http("GET", &format!("{base}/api/status")).await.status(),
        404
    );
    assert_eq!(http("GET", &format!("{base}/metrics")).await.status(), 200);
    daemon
        .stop(Duration::from_secs(5), Duration::from_secs(10))
        .await;
}

both_backends!(
    run_serves_the_page,
    serve_status_serves_the_page_without_sweeping
);
