//! The iyzico client over real HTTP: every classification branch, retries, Retry-After, the
//! rate limit, shutdown, and that no secret reaches any log line.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use common::{API_KEY, SECRET};
use session_sweeper::config::Config;
use session_sweeper::iyzico::limiter::SharedLimiter;
use session_sweeper::iyzico::simulator::{Faults, SimulatorConfig};
use session_sweeper::iyzico::{ApiError, Client, InvalidateError, Invalidation};
use session_sweeper::shutdown::Shutdown;
use session_sweeper::telemetry::Metrics;

/// One canned answer of the scripted server.
#[derive(Clone)]
struct Canned {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
    /// Replace the echoed conversationId with this.
    echo: Option<&'static str>,
}

fn canned(status: u16, body: serde_json::Value) -> Canned {
    Canned {
        status,
        headers: vec![],
        body: body.to_string(),
        delay: Duration::ZERO,
        echo: None,
    }
}

#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<Canned>>,
    seen: Mutex<Vec<(HeaderMap, serde_json::Value, Instant, String)>>,
}

/// A server answering from a script, in order; the last answer repeats.
async fn scripted(answers: Vec<Canned>) -> (String, Arc<Script>) {
    let script = Arc::new(Script {
        answers: Mutex::new(answers.into()),
        seen: Mutex::default(),
    });
    let s = script.clone();
    let app = axum::Router::new().route(
        session_sweeper::iyzico::INVALIDATE_PATH,
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let s = s.clone();
            async move {
                let request: serde_json::Value = serde_json::from_str(&body).unwrap();
                s.seen.lock().unwrap().push((
                    headers,
                    request.clone(),
                    Instant::now(),
                    body.clone(),
                ));
                let answer = {
                    let mut q = s.answers.lock().unwrap();
                    if q.len() > 1 {
                        q.pop_front().unwrap()
                    } else {
                        q.front().unwrap().clone()
                    }
                };
                tokio::time::sleep(answer.delay).await;
                let cid = answer
                    .echo
                    .map(str::to_owned)
                    .or_else(|| request["conversationId"].as_str().map(str::to_owned));
                let body = answer.body.replace("$CID", &cid.unwrap_or_default());
                let mut r = (StatusCode::from_u16(answer.status).unwrap(), body).into_response();
                for (k, v) in answer.headers {
                    r.headers_mut().insert(k, v.parse().unwrap());
                }
                r
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, script)
}

fn config(url: &str, overrides: &[(&str, &str)]) -> Config {
    let toml = format!(
        r#"
[database]
url = "sqlite://unused.db"
{source}[iyzico]
base_url = "{url}"
api_key = "{API_KEY}"
secret_key = "{SECRET}"
timeout = "500ms"
rate_per_second = 1000
burst = 100
retries = 2
retry_min_delay = "10ms"
retry_max_delay = "40ms"
"#,
        source = common::source_toml(),
    );
    Config::from_toml_str(
        &toml,
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap()
}

fn client(config: &Config) -> Client {
    let limiter = Arc::new(SharedLimiter::new(
        config.iyzico.rate_per_second,
        config.iyzico.burst,
    ));
    Client::new(&config.iyzico, 8, limiter, Metrics::new()).unwrap()
}

async fn invalidate(url: &str, overrides: &[(&str, &str)]) -> Invalidation {
    client(&config(url, overrides))
        .invalidate("tok-1", "mem-1", &Shutdown::new())
        .await
}

fn ok_body() -> serde_json::Value {
    serde_json::json!({"status": "success", "locale": "en", "systemTime": 1, "conversationId": "$CID"})
}

fn failure(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"status": "failure", "errorCode": code, "errorMessage": message, "conversationId": "$CID"})
}

#[tokio::test]
async fn a_signed_request_is_accepted_by_the_simulator_and_repeats_are_already_invalidated() {
    let sim = common::simulator(SimulatorConfig::default()).await;
    let c = client(&config(&sim.base_url(), &[]));
    let first = c.invalidate("tok-1", "mem-1", &Shutdown::new()).await;
    assert_eq!(first.result, Ok(()));
    assert_eq!(first.calls.len(), 1);
    assert_eq!(first.calls[0].http_status, Some(200));
    let again = c.invalidate("tok-1", "mem-1", &Shutdown::new()).await;
    assert!(
        matches!(
            again.result,
            Err(InvalidateError::Api(ApiError::AlreadyInvalidated { .. }))
        ),
        "{:?}",
        again.result
    );
    assert_eq!(again.calls[0].error_code.as_deref(), Some("260030"));
    assert_eq!(
        sim.stats
            .bad_signatures
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn wrong_credentials_are_auth_failures_without_retries() {
    let sim = common::simulator(SimulatorConfig::default()).await;
    let bad_secret = invalidate(
        &sim.base_url(),
        &[("SWEEPER_IYZICO__SECRET_KEY", "wrong-secret")],
    )
    .await;
    match &bad_secret.result {
        Err(InvalidateError::Api(ApiError::Auth { code, .. })) => assert_eq!(code, "1000"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        bad_secret.calls.len(),
        1,
        "an auth failure is never retried"
    );
    let bad_key = invalidate(
        &sim.base_url(),
        &[("SWEEPER_IYZICO__API_KEY", "someone-else")],
    )
    .await;
    assert!(
        matches!(&bad_key.result, Err(InvalidateError::Api(ApiError::Auth { code, .. })) if code == "1001")
    );
}

#[tokio::test]
async fn the_request_is_the_documented_json_signed_with_iyzwsv2() {
    let (url, script) = scripted(vec![canned(200, ok_body())]).await;
    let r = invalidate(&url, &[]).await;
    assert_eq!(r.result, Ok(()));
    let seen = script.seen.lock().unwrap();
    let (headers, body, _, raw) = &seen[0];
    assert_eq!(body["sessionToken"], "tok-1");
    assert_eq!(body["memberIdentifier"], "mem-1");
    assert_eq!(body["locale"], "tr");
    assert_eq!(headers["content-type"], "application/json");
    assert!(
        headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("session-sweeper/")
    );
    let rnd = headers["x-iyzi-rnd"].to_str().unwrap();
    let auth = headers["authorization"].to_str().unwrap();
    assert!(auth.starts_with("IYZWSv2 "));
    assert!(
        raw.starts_with("{\"locale\":\"tr\",\"conversationId\":"),
        "field order as documented: {raw}"
    );
    let body_bytes = raw.as_bytes();
    session_sweeper::iyzico::signing::verify(
        Some(auth),
        Some(rnd),
        API_KEY,
        SECRET,
        session_sweeper::iyzico::INVALIDATE_PATH,
        body_bytes,
    )
    .expect("signature verifies over the body as sent");
}

#[tokio::test]
async fn every_answer_is_classified() {
    let html = Canned {
        body: "<html><body>Bad Gateway</body></html>".into(),
        ..canned(502, serde_json::json!({}))
    };
    let truncated = Canned {
        body: "{\"status\":\"succ".into(),
        ..canned(200, serde_json::json!({}))
    };
    let cases: Vec<(&str, Canned, &str, Option<&str>)> = vec![
        ("success", canned(200, ok_body()), "invalidated", None),
        (
            "already",
            canned(400, failure("260030", "Session is already invalidated")),
            "already_invalidated",
            Some("260030"),
        ),
        (
            "invalid request",
            canned(400, failure("11", "Geçersiz istek")),
            "permanent",
            Some("11"),
        ),
        (
            "invalid signature",
            canned(200, failure("1000", "Geçersiz imza")),
            "auth",
            Some("1000"),
        ),
        (
            "credentials not found",
            canned(400, failure("1001", "api bilgileri bulunamadı")),
            "auth",
            Some("1001"),
        ),
        (
            "missing signature",
            canned(400, failure("1007", "imza yok")),
            "auth",
            Some("1007"),
        ),
        (
            "http 401",
            canned(401, serde_json::json!({})),
            "auth",
            Some("HTTP 401"),
        ),
        (
            "http 403 html",
            Canned {
                body: "<h1>Forbidden</h1>".into(),
                ..canned(403, serde_json::json!({}))
            },
            "auth",
            Some("HTTP 403"),
        ),
        (
            "request limit",
            canned(429, failure("50000", "limit")),
            "retryable",
            Some("50000"),
        ),
        (
            "system error",
            canned(200, failure("100001", "Sistem hatası")),
            "retryable",
            Some("100001"),
        ),
        ("html 502", html, "retryable", None),
        ("truncated json", truncated, "retryable", None),
        (
            "503 json",
            canned(503, failure("11", "x")),
            "retryable",
            Some("11"),
        ),
        (
            "not our conversation",
            Canned {
                echo: Some("other"),
                ..canned(200, ok_body())
            },
            "retryable",
            None,
        ),
        (
            "timeout",
            Canned {
                delay: Duration::from_secs(2),
                ..canned(200, ok_body())
            },
            "retryable",
            None,
        ),
    ];
    for (name, answer, class, code) in cases {
        let (url, script) = scripted(vec![answer]).await;
        let r = invalidate(&url, &[]).await;
        let last = r.calls.last().unwrap();
        assert_eq!(last.class, class, "{name}: {:?}", r.result);
        assert_eq!(last.error_code.as_deref(), code, "{name}");
        let expected_calls = if class == "retryable" { 3 } else { 1 };
        assert_eq!(
            r.calls.len(),
            expected_calls,
            "{name}: retries = 2 means 3 calls for retryable only"
        );
        assert_eq!(script.seen.lock().unwrap().len(), expected_calls, "{name}");
        if name == "timeout" {
            assert!(
                last.error_message.as_deref().unwrap().contains("timed out"),
                "{:?}",
                last.error_message
            );
        }
    }
}

#[tokio::test]
async fn a_refused_connection_is_retryable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let r = invalidate(&url, &[]).await;
    assert_eq!(r.calls.len(), 3);
    assert!(
        r.calls
            .iter()
            .all(|c| c.class == "retryable" && c.http_status.is_none())
    );
}

/// iyzico never redirects: a 307 to a host that would answer success is not followed (that host
/// sees nothing, so the token and member never leave for it) and the call is retryable, naming
/// the status and the host but not the Location's path or query.
#[tokio::test]
async fn a_redirect_is_not_followed_and_is_retryable() {
    let elsewhere = common::simulator(SimulatorConfig::default()).await;
    let redirecting = common::simulator(SimulatorConfig {
        faults: Faults {
            redirect: 1.0,
            redirect_to: Some(elsewhere.addr),
            ..Faults::default()
        },
        ..SimulatorConfig::default()
    })
    .await;
    let r = invalidate(&redirecting.base_url(), &[]).await;
    let load = |s: &session_sweeper::iyzico::simulator::Simulator| {
        s.stats.requests.load(std::sync::atomic::Ordering::SeqCst)
    };
    assert_eq!(
        load(&elsewhere),
        0,
        "the redirect was followed: {:?}",
        r.calls
    );
    assert_eq!(load(&redirecting), 3, "retries = 2: three calls");
    let Err(InvalidateError::Api(ApiError::Retryable { reason, .. })) = &r.result else {
        panic!("not retryable: {:?}", r.result);
    };
    assert_eq!(
        reason,
        &format!(
            "HTTP 307 redirect to http://{}, not followed (iyzico never redirects)",
            elsewhere.addr
        )
    );
    assert!(
        !reason.contains("redirected=1"),
        "the query leaked: {reason}"
    );
    assert!(
        r.calls
            .iter()
            .all(|c| c.class == "retryable" && c.http_status == Some(307)),
        "{:?}",
        r.calls
    );

    // A scripted 302 to a URL with a token in its query: the query never reaches the error.
    let (url, _) = scripted(vec![Canned {
        headers: vec![(
            "location",
            "https://other.example/v1/x?sessionToken=tok-1".into(),
        )],
        ..canned(302, serde_json::json!({"status": "success"}))
    }])
    .await;
    let r = invalidate(&url, &[("SWEEPER_IYZICO__RETRIES", "0")]).await;
    let message = r.calls[0].error_message.clone().unwrap_or_default();
    assert_eq!(r.calls[0].class, "retryable", "{message}");
    assert!(
        message.contains("HTTP 302") && message.contains("other.example"),
        "{message}"
    );
    assert!(!message.contains("tok-1"), "{message}");
}

#[tokio::test]
async fn a_transient_failure_then_success_is_a_success() {
    let (url, script) = scripted(vec![
        Canned {
            body: "<html>".into(),
            ..canned(503, serde_json::json!({}))
        },
        canned(200, ok_body()),
    ])
    .await;
    let r = invalidate(&url, &[]).await;
    assert_eq!(r.result, Ok(()));
    assert_eq!(
        r.calls.iter().map(|c| c.class).collect::<Vec<_>>(),
        ["retryable", "invalidated"]
    );
    // Each call carries a fresh conversationId and random key.
    let seen = script.seen.lock().unwrap();
    assert_ne!(seen[0].1["conversationId"], seen[1].1["conversationId"]);
    assert_ne!(seen[0].0["x-iyzi-rnd"], seen[1].0["x-iyzi-rnd"]);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let limited = Canned {
        headers: vec![("retry-after", "1".into())],
        ..canned(429, failure("50000", "Too many requests"))
    };
    let (url, script) = scripted(vec![limited, canned(200, ok_body())]).await;
    let r = invalidate(&url, &[]).await;
    assert_eq!(r.result, Ok(()));
    let seen = script.seen.lock().unwrap();
    let gap = seen[1].2 - seen[0].2;
    assert!(
        gap >= Duration::from_millis(950),
        "retried after {gap:?}, before Retry-After's 1s"
    );
}

#[tokio::test]
async fn shutdown_ends_the_backoff_at_once() {
    let (url, _script) = scripted(vec![Canned {
        headers: vec![("retry-after", "30".into())],
        ..canned(503, serde_json::json!({}))
    }])
    .await;
    let c = client(&config(&url, &[]));
    let shutdown = Shutdown::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.begin(Duration::from_secs(10));
    });
    let started = Instant::now();
    let r = c.invalidate("tok-1", "mem-1", &shutdown).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(r.calls.len(), 1);
    assert!(matches!(
        r.result,
        Err(InvalidateError::Api(ApiError::Retryable { .. }))
    ));
}

#[tokio::test]
async fn the_rate_limit_bounds_every_window() {
    let sim = common::simulator(SimulatorConfig::default()).await;
    let config = config(
        &sim.base_url(),
        &[
            ("SWEEPER_IYZICO__RATE_PER_SECOND", "40"),
            ("SWEEPER_IYZICO__BURST", "5"),
        ],
    );
    let c = Arc::new(client(&config));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..70 {
        let c = c.clone();
        tasks.spawn(async move {
            c.invalidate(&format!("tok-{i}"), "m", &Shutdown::new())
                .await
                .result
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap(), Ok(()));
    }
    let most = sim.stats.max_in_window(Duration::from_secs(1));
    assert!(
        most <= 40 + 5,
        "{most} requests in one second, limit is 40/s with burst 5"
    );
    assert!(most >= 30, "{most}: the limiter should not starve either");
}

#[tokio::test]
async fn the_simulator_injects_faults_that_the_client_survives() {
    let sim = common::simulator(SimulatorConfig {
        faults: Faults {
            unavailable: 0.3,
            malformed: 0.1,
            ..Faults::default()
        },
        ..SimulatorConfig::default()
    })
    .await;
    // Twelve retries may take 12 Retry-After waits: the lease must cover such an attempt.
    let config = config(
        &sim.base_url(),
        &[
            ("SWEEPER_IYZICO__RETRIES", "12"),
            ("SWEEPER_SWEEP__LEASE", "15m"),
        ],
    );
    let c = client(&config);
    for i in 0..30 {
        let r = c
            .invalidate(&format!("tok-{i}"), "m", &Shutdown::new())
            .await;
        assert_eq!(r.result, Ok(()), "tok-{i}: {:?}", r.calls);
    }
    assert!(
        sim.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            > 30
    );
}

/// Captures every log line at every level while the client works, including an auth failure.
#[tokio::test]
async fn no_log_line_at_any_level_contains_the_secret() {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = common::simulator(SimulatorConfig::default()).await;
    let good = config(&sim.base_url(), &[]);
    tracing::debug!(config = ?good, "loaded");
    client(&good)
        .invalidate("tok-1", "mem-1", &Shutdown::new())
        .await;
    let bad = config(&sim.base_url(), &[("SWEEPER_IYZICO__API_KEY", "other")]);
    client(&bad)
        .invalidate("tok-2", "mem-2", &Shutdown::new())
        .await;
    let logs = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("loaded"), "the capture works: {logs}");
    assert!(
        !logs.contains(SECRET),
        "the secret leaked into the logs:\n{logs}"
    );
    assert!(
        !logs.contains("tok-1"),
        "session tokens appear only as fingerprints:\n{logs}"
    );
}

#[tokio::test]
async fn a_worker_with_a_stale_heartbeat_does_not_call_the_api() {
    let sim = common::simulator(SimulatorConfig::default()).await;
    let liveness = session_sweeper::shutdown::Liveness::new(Duration::from_millis(20));
    let c = client(&config(&sim.base_url(), &[])).with_liveness(liveness.clone());
    liveness.beat();
    assert_eq!(
        c.invalidate("tok-1", "m", &Shutdown::new()).await.result,
        Ok(())
    );
    tokio::time::sleep(Duration::from_millis(40)).await;
    let fenced = c.invalidate("tok-2", "m", &Shutdown::new()).await;
    assert_eq!(fenced.result, Err(InvalidateError::Fenced));
    assert!(fenced.calls.is_empty());
    assert_eq!(
        sim.stats.requests.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "nothing sent while fenced"
    );
}

#[tokio::test]
async fn a_call_in_flight_is_cancelled_at_the_fencing_deadline() {
    // The call would take 3 s; the heartbeat goes stale after 300 ms. Peers may take the
    // session soon after, so the call must not outlive the deadline, whatever its timeout.
    let sim = common::simulator(SimulatorConfig {
        latency: Duration::from_secs(3),
        ..SimulatorConfig::default()
    })
    .await;
    let liveness = session_sweeper::shutdown::Liveness::new(Duration::from_millis(300));
    let c = client(&config(
        &sim.base_url(),
        &[("SWEEPER_IYZICO__TIMEOUT", "10s")],
    ))
    .with_liveness(liveness.clone());
    liveness.beat();
    let started = std::time::Instant::now();
    let inv = c.invalidate("tok-1", "m", &Shutdown::new()).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "cancelled at the deadline, not after the call: {:?}",
        started.elapsed()
    );
    assert_eq!(inv.result, Err(InvalidateError::Fenced));
    assert_eq!(inv.calls.len(), 1, "the cancelled call is still logged");
    assert_eq!(inv.calls[0].class, "unknown");
}

#[tokio::test]
async fn the_check_before_a_call_can_withhold_it() {
    let sim = common::simulator(SimulatorConfig::default()).await;
    let c = client(&config(&sim.base_url(), &[]));
    let inv = c
        .invalidate_checked("tok-1", "m", &Shutdown::new(), || async { false })
        .await;
    assert_eq!(inv.result, Err(InvalidateError::Withheld));
    assert_eq!(
        sim.stats.requests.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
