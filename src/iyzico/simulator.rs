//! A local iyzico-compatible invalidate endpoint, for trials, tests, the demo and benchmarks.
//! It verifies every signature exactly as iyzico does, remembers which tokens it invalidated,
//! counts what it saw, and injects faults on request.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;

use super::{ALREADY_INVALIDATED_CODE, INVALIDATE_PATH, signing};

/// Shares (0.0 to 1.0) of requests that get each fault, checked in this order.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// HTTP 503 with an HTML page.
    pub unavailable: f64,
    /// HTTP 429 with `Retry-After` and iyzico's request-limit error `50000`.
    pub too_many_requests: f64,
    /// Seconds sent in `Retry-After` with a 429.
    pub retry_after_secs: u64,
    /// An answer delayed by `slow_delay` (past the client's timeout, if that is shorter).
    pub slow: f64,
    /// How long a slow answer takes.
    pub slow_delay: Duration,
    /// HTTP 200 with a truncated JSON body.
    pub malformed: f64,
    /// A permanent failure (`errorCode` 11, invalid request).
    pub permanent: f64,
    /// HTTP 307 to another host (`redirect_to`), which iyzico never sends: the client must not
    /// follow it.
    pub redirect: f64,
    /// Where a redirect points; `None`: [`DEFAULT_REDIRECT_TO`].
    pub redirect_to: Option<SocketAddr>,
}

/// Where an injected redirect points by default: another loopback host, so that a client that
/// wrongly followed it would reach nothing of ours.
pub const DEFAULT_REDIRECT_TO: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(127, 0, 0, 2),
    8089,
));

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimulatorConfig {
    /// The API key it accepts.
    pub api_key: String,
    /// The secret it verifies signatures with.
    pub secret_key: String,
    /// Added to every answer.
    pub latency: Duration,
    /// Injected faults.
    pub faults: Faults,
    /// Tokens for which it answers a permanent failure every time (for deterministic tests).
    pub always_fail: HashSet<String>,
    /// Tokens it treats as invalidated before it started (answered `260030`).
    pub already_invalidated: HashSet<String>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            api_key: "sandbox-api-key".into(),
            secret_key: "sandbox-secret-key".into(),
            latency: Duration::ZERO,
            faults: Faults::default(),
            always_fail: HashSet::new(),
            already_invalidated: HashSet::new(),
        }
    }
}

/// What the simulator saw; read it while it runs or after.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests received (signed or not).
    pub requests: AtomicU64,
    /// Requests refused for a bad signature.
    pub bad_signatures: AtomicU64,
    /// Successful invalidations (first call for a token).
    pub invalidated: AtomicU64,
    /// Calls answered with `260030`.
    pub already_invalidated: AtomicU64,
    /// Requests being handled right now.
    pub in_flight: AtomicUsize,
    /// The most requests handled at once.
    pub max_in_flight: AtomicUsize,
    /// Total time spent answering signed requests, in microseconds (for the mean service time).
    pub service_micros: AtomicU64,
    calls_per_token: Mutex<HashMap<String, u32>>,
    /// Calls per token being answered right now.
    tokens_in_flight: Mutex<HashMap<String, u32>>,
    /// Calls that arrived while another call for the same token was still being answered: a
    /// session in flight twice at once, which the fleet must never do.
    pub overlapping_calls: AtomicU64,
    arrivals: Mutex<Vec<Instant>>,
}

impl Stats {
    /// How many signed calls each token received.
    pub fn calls_per_token(&self) -> HashMap<String, u32> {
        self.calls_per_token.lock().expect("stats lock").clone()
    }

    /// The most signed requests that arrived within any window of `window`.
    pub fn max_in_window(&self, window: Duration) -> usize {
        let arrivals = self.arrivals.lock().expect("stats lock");
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..arrivals.len() {
            while arrivals[hi].duration_since(arrivals[lo]) >= window {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    /// Mean time to answer a signed request (the latency the client sees, less the network).
    pub fn mean_service_time(&self) -> Duration {
        let n = self.arrivals.lock().expect("stats lock").len() as u64;
        Duration::from_micros(
            self.service_micros
                .load(Ordering::Relaxed)
                .checked_div(n)
                .unwrap_or(0),
        )
    }

    /// Arrival times of signed requests, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().expect("stats lock").clone()
    }
}

struct AppState {
    config: SimulatorConfig,
    invalidated: Mutex<HashSet<String>>,
    stats: Arc<Stats>,
}

/// A running simulator.
pub struct Simulator {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Simulator {
    /// Binds `listen` (port 0 picks a free one) and serves until dropped.
    pub async fn start(listen: SocketAddr, config: SimulatorConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let router = router(config, stats.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "simulator stopped");
            }
        });
        Ok(Self { addr, stats, task })
    }

    /// The base URL to configure the client with.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Binds `listen` and serves until `stop` resolves (the `simulate-api` command).
    pub async fn listen_until(
        listen: SocketAddr,
        config: SimulatorConfig,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        tracing::info!(addr = %listener.local_addr()?, path = INVALIDATE_PATH, "simulator listening");
        axum::serve(listener, router(config, Arc::new(Stats::default())))
            .with_graceful_shutdown(stop)
            .await
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(config: SimulatorConfig, stats: Arc<Stats>) -> axum::Router {
    let state = Arc::new(AppState {
        invalidated: Mutex::new(config.already_invalidated.clone()),
        config,
        stats,
    });
    axum::Router::new()
        .route(INVALIDATE_PATH, post(invalidate))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    #[serde(default)]
    locale: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
    session_token: String,
    member_identifier: String,
}

struct InFlight<'a>(&'a Stats);

/// One call for a token being answered; counts overlaps with others for the same token.
struct TokenInFlight<'a>(&'a Stats, String);

impl<'a> TokenInFlight<'a> {
    fn enter(stats: &'a Stats, token: &str) -> Self {
        let mut map = stats.tokens_in_flight.lock().expect("stats lock");
        let n = map.entry(token.to_owned()).or_default();
        if *n > 0 {
            stats.overlapping_calls.fetch_add(1, Ordering::SeqCst);
        }
        *n += 1;
        Self(stats, token.to_owned())
    }
}

impl Drop for TokenInFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.0.tokens_in_flight.lock().expect("stats lock");
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// Adds the time until it is dropped to the service time.
struct Timed<'a>(&'a Stats, Instant);

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        self.0
            .service_micros
            .fetch_add(self.1.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

impl<'a> InFlight<'a> {
    fn enter(stats: &'a Stats) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(stats)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sleeps until `deadline` within a fraction of a millisecond: tokio's timer ticks in whole
/// milliseconds and rounds up (a 20 ms sleep lasts about 21 ms), so the last stretch is slept
/// on a blocking thread. The simulated latency is then what `--latency` says.
async fn precise_sleep(deadline: Instant) {
    const SLACK: Duration = Duration::from_millis(2);
    if let Some(coarse) = deadline
        .checked_duration_since(Instant::now())
        .and_then(|d| d.checked_sub(SLACK))
    {
        tokio::time::sleep(coarse).await;
    }
    let rest = deadline.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

fn failure(
    status: StatusCode,
    code: &str,
    message: &str,
    locale: &str,
    cid: Option<&str>,
) -> Response {
    let body = json!({
        "status": "failure",
        "errorCode": code,
        "errorMessage": message,
        "locale": locale,
        "systemTime": chrono::Utc::now().timestamp_millis(),
        "conversationId": cid,
    });
    (status, axum::Json(body)).into_response()
}

async fn invalidate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stats = &state.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::enter(stats);
    let request = match verified_request(&state.config, stats, &headers, &body) {
        Ok(request) => request,
        Err((status, code, message)) => return failure(status, code, message, "tr", None),
    };
    let locale = request.locale.as_deref().unwrap_or("tr").to_owned();
    let cid = request.conversation_id.as_deref();
    let arrived = Instant::now();
    let _timed = Timed(stats, arrived);
    let _token = TokenInFlight::enter(stats, &request.session_token);
    count_arrival(stats, &request.session_token);
    if !state.config.latency.is_zero() {
        precise_sleep(arrived + state.config.latency).await;
    }
    if let Some(fault) = injected_fault(&state.config.faults, &locale, cid).await {
        return fault;
    }
    if state.config.always_fail.contains(&request.session_token) {
        return invalid_request(&locale, cid);
    }
    settle(&state, &request, &locale, cid)
}

/// Why a request is refused, as iyzico answers it: HTTP status, `errorCode`, `errorMessage`.
type Refusal = (StatusCode, &'static str, &'static str);

/// The signed, well-formed request, or why it is refused.
fn verified_request(
    config: &SimulatorConfig,
    stats: &Stats,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Request, Refusal> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Err(e) = signing::verify(
        header(header::AUTHORIZATION.as_str()),
        header(signing::RANDOM_KEY_HEADER),
        &config.api_key,
        &config.secret_key,
        INVALIDATE_PATH,
        body,
    ) {
        stats.bad_signatures.fetch_add(1, Ordering::Relaxed);
        let (code, message) = match e {
            signing::VerifyError::Missing => ("1007", "Signature bulunamadı"),
            signing::VerifyError::UnknownApiKey => ("1001", "api bilgileri bulunamadı"),
            signing::VerifyError::BadSignature => ("1000", "Geçersiz imza"),
        };
        return Err((StatusCode::UNAUTHORIZED, code, message));
    }
    serde_json::from_slice::<Request>(body)
        .map_err(|_| (StatusCode::BAD_REQUEST, "11", "Geçersiz istek"))
}

/// Records a signed call's arrival and counts it for its token.
fn count_arrival(stats: &Stats, token: &str) {
    stats
        .arrivals
        .lock()
        .expect("stats lock")
        .push(Instant::now());
    *stats
        .calls_per_token
        .lock()
        .expect("stats lock")
        .entry(token.to_owned())
        .or_default() += 1;
}

/// One roll of the dice against every fault share, in [`Faults`]' order: the fault's answer,
/// or `None` to answer normally.
async fn injected_fault(faults: &Faults, locale: &str, cid: Option<&str>) -> Option<Response> {
    let mut roll = fastrand::f64();
    let mut hit = |share: f64| {
        let h = roll < share;
        roll -= share;
        h
    };
    if hit(faults.unavailable) {
        return Some(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "<html><body>503 Service Unavailable</body></html>",
            )
                .into_response(),
        );
    }
    if hit(faults.too_many_requests) {
        let mut r = failure(
            StatusCode::TOO_MANY_REQUESTS,
            "50000",
            "Too many requests",
            locale,
            cid,
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, faults.retry_after_secs.into());
        return Some(r);
    }
    if hit(faults.slow) {
        // Fault decided before the work: a slow answer never invalidates (the client gave up).
        tokio::time::sleep(faults.slow_delay).await;
        return Some(failure(
            StatusCode::GATEWAY_TIMEOUT,
            "100001",
            "Sistem hatası",
            locale,
            cid,
        ));
    }
    if hit(faults.malformed) {
        return Some(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "{\"status\":\"succ",
            )
                .into_response(),
        );
    }
    if hit(faults.redirect) {
        let to = faults.redirect_to.unwrap_or(DEFAULT_REDIRECT_TO);
        return Some(
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(
                    header::LOCATION,
                    format!("http://{to}{INVALIDATE_PATH}?redirected=1"),
                )],
            )
                .into_response(),
        );
    }
    hit(faults.permanent).then(|| invalid_request(locale, cid))
}

/// iyzico's permanent failure: `errorCode` 11, invalid request.
fn invalid_request(locale: &str, cid: Option<&str>) -> Response {
    failure(StatusCode::BAD_REQUEST, "11", "Geçersiz istek", locale, cid)
}

/// Invalidates the session: success the first time, `260030` (already invalidated) after.
fn settle(state: &AppState, request: &Request, locale: &str, cid: Option<&str>) -> Response {
    let stats = &state.stats;
    let first = state
        .invalidated
        .lock()
        .expect("simulator lock")
        .insert(request.session_token.clone());
    if !first {
        stats.already_invalidated.fetch_add(1, Ordering::Relaxed);
        return failure(
            StatusCode::BAD_REQUEST,
            ALREADY_INVALIDATED_CODE,
            "Session is already invalidated.",
            locale,
            cid,
        );
    }
    stats.invalidated.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({
        "status": "success",
        "locale": locale,
        "systemTime": chrono::Utc::now().timestamp_millis(),
        "conversationId": cid,
        "sessionToken": request.session_token,
        "memberIdentifier": request.member_identifier,
    }))
    .into_response()
}
