//! The iyzico invalidate client: one signed POST per call, classified into a typed result,
//! rate-limited, bounded in concurrency, and retried with jittered exponential backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder as _;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::limiter::{FleetState, SharedLimiter};
use super::{
    ALREADY_INVALIDATED_CODE, AUTH_ERROR_CODES, INVALIDATE_PATH, RETRYABLE_ERROR_CODES, signing,
};
use crate::config::{IyzicoConfig, Locale, MAX_RETRY_AFTER};
use crate::shutdown::{Liveness, Shutdown};
use crate::telemetry::{Metrics, fingerprint};

/// The most response body we read; anything longer is not the documented JSON.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The most of iyzico's error text kept (logs, ledger, status page).
pub const MAX_MESSAGE_CHARS: usize = 500;
/// Tokens and members shorter than this are not searched for in iyzico's text.
const MIN_SCRUBBED_CHARS: usize = 4;

/// Why a call did not invalidate the session. Each variant is a decision for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// iyzico said `260030`: the session was already passive, which is what we wanted.
    #[error("already invalidated: {message}")]
    AlreadyInvalidated {
        /// iyzico's message.
        message: String,
    },
    /// A transient failure: try again later.
    #[error("retryable: {reason}")]
    Retryable {
        /// What happened, for the attempt log.
        reason: String,
        /// iyzico's error code, if it sent one.
        code: Option<String>,
        /// How long the server asked us to wait.
        retry_after: Option<Duration>,
    },
    /// iyzico refused the request for good.
    #[error("permanent failure {code}: {message}")]
    Permanent {
        /// iyzico's error code.
        code: String,
        /// iyzico's message.
        message: String,
    },
    /// Our credentials were refused: every further call would fail the same way.
    #[error("authentication failed ({code}): {message}")]
    Auth {
        /// iyzico's error code, or `HTTP <status>`.
        code: String,
        /// iyzico's message.
        message: String,
    },
}

impl ApiError {
    /// The short class name used in logs, metrics and the attempt log.
    pub fn class(&self) -> &'static str {
        match self {
            ApiError::AlreadyInvalidated { .. } => "already_invalidated",
            ApiError::Retryable { .. } => "retryable",
            ApiError::Permanent { .. } => "permanent",
            ApiError::Auth { .. } => "auth",
        }
    }

    /// iyzico's error code, when there is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::AlreadyInvalidated { .. } => Some(ALREADY_INVALIDATED_CODE),
            ApiError::Retryable { code, .. } => code.as_deref(),
            ApiError::Permanent { code, .. } | ApiError::Auth { code, .. } => Some(code),
        }
    }

    /// The same error with the session's token and member taken out of iyzico's text (an echo
    /// of the request must not carry them into logs, the ledger or the status page) and the
    /// text cut to [`MAX_MESSAGE_CHARS`].
    pub fn scrubbed(self, token: &str, member: &str) -> Self {
        let clean = |m: String| {
            let mut m = m;
            // Very short values (a member id `7`) would take digits out of iyzico's own text.
            if token.chars().count() >= MIN_SCRUBBED_CHARS {
                m = m.replace(token, &format!("[session {}]", fingerprint(token)));
            }
            if member.chars().count() >= MIN_SCRUBBED_CHARS {
                m = m.replace(member, "[member]");
            }
            match m.char_indices().nth(MAX_MESSAGE_CHARS) {
                Some((cut, _)) => format!("{}…", &m[..cut]),
                None => m,
            }
        };
        match self {
            ApiError::AlreadyInvalidated { message } => ApiError::AlreadyInvalidated {
                message: clean(message),
            },
            ApiError::Retryable {
                reason,
                code,
                retry_after,
            } => ApiError::Retryable {
                reason: clean(reason),
                code,
                retry_after,
            },
            ApiError::Permanent { code, message } => ApiError::Permanent {
                code,
                message: clean(message),
            },
            ApiError::Auth { code, message } => ApiError::Auth {
                code,
                message: clean(message),
            },
        }
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        match self {
            ApiError::AlreadyInvalidated { message }
            | ApiError::Permanent { message, .. }
            | ApiError::Auth { message, .. } => message,
            ApiError::Retryable { reason, .. } => reason,
        }
    }
}

/// Why [`Client::invalidate`] returned without a verdict from iyzico.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidateError {
    /// The API answered with an error (after retries, for a retryable one).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Shutdown interrupted the attempt: before any call, during backoff, or (after the grace
    /// period) with a call in flight whose result we will never know.
    #[error("interrupted by shutdown")]
    Interrupted,
    /// The heartbeat went stale (self-fencing): no call was made, or the one in flight was
    /// cancelled with its outcome unknown; the session goes back for a later attempt.
    #[error("stopped at the fencing deadline: this worker's heartbeat is stale")]
    Fenced,
    /// The caller's last look before a call said not to send (the session is no longer
    /// eligible, or no longer ours).
    #[error("withheld by the check before the call")]
    Withheld,
}

/// One HTTP call, as the attempt log records it.
#[derive(Debug, Clone)]
pub struct CallRecord {
    /// The `conversationId` we sent.
    pub conversation_id: String,
    /// The HTTP status, when a response arrived.
    pub http_status: Option<u16>,
    /// `invalidated` or one of [`ApiError::class`], or `interrupted`.
    pub class: &'static str,
    /// iyzico's error code, if any.
    pub error_code: Option<String>,
    /// The error message, if any.
    pub error_message: Option<String>,
    /// When the call started.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub latency: Duration,
}

/// What one attempt (the first call plus immediate retries) produced.
#[derive(Debug)]
pub struct Invalidation {
    /// Every call made, in order.
    pub calls: Vec<CallRecord>,
    /// `Ok` when iyzico said success.
    pub result: Result<(), InvalidateError>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestBody<'a> {
    locale: &'static str,
    conversation_id: &'a str,
    session_token: &'a str,
    member_identifier: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResponseBody {
    status: String,
    #[serde(default)]
    error_code: Option<serde_json::Value>,
    #[serde(default)]
    error_message: Option<String>,
    #[serde(default)]
    conversation_id: Option<String>,
}

/// Classifies one HTTP response. Pure, so it can be tested (and fuzzed) without a server.
pub fn classify(
    http_status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    sent_conversation_id: &str,
) -> Result<(), ApiError> {
    if matches!(http_status, 401 | 403) {
        return Err(refused(http_status, body));
    }
    let retryable = |reason: String, code: Option<String>| ApiError::Retryable {
        reason,
        code,
        retry_after,
    };
    let parsed = match parse_body(body) {
        Ok(p) => p,
        Err(_) if http_status == 429 => {
            return Err(retryable("HTTP 429 too many requests".into(), None));
        }
        Err(_) if http_status >= 500 => return Err(retryable(format!("HTTP {http_status}"), None)),
        Err(e) => {
            return Err(retryable(
                format!("HTTP {http_status}, body is not iyzico's JSON: {e}"),
                None,
            ));
        }
    };
    let code = parsed.error_code.as_ref().map(code_string);
    let message = parsed.error_message.clone().unwrap_or_default();
    if let Some(c) = code.as_deref().filter(|c| AUTH_ERROR_CODES.contains(c)) {
        return Err(ApiError::Auth {
            code: c.to_owned(),
            message,
        });
    }
    if http_status == 429 || http_status >= 500 {
        return Err(retryable(format!("HTTP {http_status}"), code));
    }
    if let Some(echoed) = parsed.conversation_id.as_deref()
        && echoed != sent_conversation_id
    {
        return Err(retryable(
            format!("response echoes conversationId {echoed:?}, not ours"),
            code,
        ));
    }
    by_status(http_status, &parsed.status, code, message, retry_after)
}

/// HTTP 401 or 403: our credentials were refused, whatever the body says (its code and
/// message are kept when it has them).
fn refused(http_status: u16, body: &[u8]) -> ApiError {
    let parsed = parse_body(body).ok();
    ApiError::Auth {
        code: parsed
            .as_ref()
            .and_then(|p| p.error_code.as_ref().map(code_string))
            .unwrap_or_else(|| format!("HTTP {http_status}")),
        message: parsed
            .and_then(|p| p.error_message)
            .unwrap_or_else(|| "credentials refused".into()),
    }
}

/// The verdict of an answer that is ours and is not an auth or transient failure, by its
/// `status` and, for a failure, its `errorCode`.
fn by_status(
    http_status: u16,
    status: &str,
    code: Option<String>,
    message: String,
    retry_after: Option<Duration>,
) -> Result<(), ApiError> {
    let retryable = |reason: String, code: Option<String>| ApiError::Retryable {
        reason,
        code,
        retry_after,
    };
    match status {
        "success" if (200..300).contains(&http_status) => Ok(()),
        "success" => Err(retryable(
            format!("HTTP {http_status} with status success"),
            code,
        )),
        "failure" => match code {
            Some(c) if c == ALREADY_INVALIDATED_CODE => {
                Err(ApiError::AlreadyInvalidated { message })
            }
            Some(c) if RETRYABLE_ERROR_CODES.contains(&c.as_str()) => {
                Err(retryable(format!("iyzico error {c}: {message}"), Some(c)))
            }
            Some(c) => Err(ApiError::Permanent { code: c, message }),
            None => Err(retryable("failure without an errorCode".into(), None)),
        },
        other => Err(retryable(format!("unknown status {other:?}"), code)),
    }
}

/// iyzico's answer as a typed body: a JSON object (serde would also accept an array for a
/// struct, so that is checked first) whose `errorCode`, if any, is a string or a number.
fn parse_body(body: &[u8]) -> Result<ResponseBody, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if !value.is_object() {
        return Err("the body is not a JSON object".into());
    }
    let parsed: ResponseBody = serde_json::from_value(value).map_err(|e| e.to_string())?;
    match &parsed.error_code {
        None
        | Some(
            serde_json::Value::Null | serde_json::Value::String(_) | serde_json::Value::Number(_),
        ) => Ok(parsed),
        Some(_) => Err("errorCode is neither a string nor a number".into()),
    }
}

/// A 3xx answer: never followed, always retryable. The reason names the status and where it
/// pointed (scheme, host and port only: a `Location`'s path or query may carry anything, and
/// never reaches a log line or the attempt log).
pub fn redirect_error(
    http_status: u16,
    location: Option<&str>,
    endpoint: &reqwest::Url,
    retry_after: Option<Duration>,
) -> ApiError {
    let target = match location.map(|l| endpoint.join(l.trim())) {
        None => "without a Location".to_owned(),
        Some(Err(_)) => "with a Location that is not a URL".to_owned(),
        Some(Ok(url)) => match (url.host_str(), url.port_or_known_default()) {
            (Some(host), Some(port)) => format!("to {}://{host}:{port}", url.scheme()),
            (Some(host), None) => format!("to {}://{host}", url.scheme()),
            (None, _) => "with a Location that names no host".to_owned(),
        },
    };
    ApiError::Retryable {
        reason: format!(
            "HTTP {http_status} redirect {target}, not followed (iyzico never redirects)"
        ),
        code: None,
        retry_after,
    }
}

fn code_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let when = DateTime::parse_from_rfc2822(value.trim()).ok()?;
    let wait = when.with_timezone(&Utc) - Utc::now();
    Some(wait.to_std().unwrap_or_default().min(MAX_RETRY_AFTER))
}

/// How one invalidate request is built, signed and sent: the HTTP side of [`Client`] alone.
/// The benchmark's ideal client sends through it too, so both measure the same stack.
pub struct Transport {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    api_key: SecretString,
    secret_key: SecretString,
    locale: Locale,
}

impl Transport {
    /// One pooled keep-alive HTTP client (rustls, timeouts from config) for the endpoint.
    pub fn new(config: &IyzicoConfig, concurrency: usize) -> Result<Self, BuildError> {
        super::install_tls_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("session-sweeper/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(concurrency)
            .tcp_nodelay(true)
            // iyzico never redirects. Following one would re-post the token and member to a host
            // iyzico never sees, and record its answer as iyzico's: a 3xx is a failure instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let endpoint = config
            .base_url
            .join(INVALIDATE_PATH)
            .expect("a validated base URL joins with a fixed path");
        Ok(Self {
            http,
            endpoint,
            api_key: config.api_key.clone(),
            secret_key: config.secret_key.clone(),
            locale: config.locale,
        })
    }

    /// Sends the signed request for one session. The constant headers are built without
    /// parsing.
    pub async fn post(
        &self,
        conversation_id: &str,
        session_token: &str,
        member_identifier: &str,
    ) -> reqwest::Result<reqwest::Response> {
        use reqwest::header::{self, HeaderName, HeaderValue};
        let body = serde_json::to_vec(&RequestBody {
            locale: self.locale.as_str(),
            conversation_id,
            session_token,
            member_identifier,
        })
        .expect("serializing strings cannot fail");
        let random_key = signing::random_key();
        let authorization = signing::authorization(
            self.api_key.expose_secret(),
            self.secret_key.expose_secret(),
            &random_key,
            self.endpoint.path(),
            &body,
        );
        const JSON: HeaderValue = HeaderValue::from_static("application/json");
        self.http
            .post(self.endpoint.clone())
            .header(header::CONTENT_TYPE, JSON)
            .header(header::ACCEPT, JSON)
            .header(header::AUTHORIZATION, authorization)
            .header(
                HeaderName::from_static(signing::RANDOM_KEY_HEADER),
                random_key,
            )
            .body(body)
            .send()
            .await
    }
}

/// The iyzico client. One per process; cheap to share through an `Arc`.
pub struct Client {
    transport: Transport,
    fleet: FleetState,
    in_flight: Arc<Semaphore>,
    /// The permits `in_flight` should hold (a reload may change it while calls run).
    concurrency: std::sync::Mutex<usize>,
    retry: std::sync::RwLock<RetryPolicy>,
    metrics: Metrics,
}

/// Immediate retries of a transient failure within one attempt (reloadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first call.
    pub retries: u32,
    /// Smallest backoff between two calls.
    pub min_delay: Duration,
    /// Largest backoff between two calls.
    pub max_delay: Duration,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct BuildError(#[from] reqwest::Error);

/// A call that was started but got no answer: its class and message for the attempt log, and
/// what it means for the attempt.
type Unanswered = (&'static str, &'static str, InvalidateError);

impl Client {
    /// Builds the client: one pooled keep-alive HTTP client, rustls, timeouts from config.
    pub fn new(
        config: &IyzicoConfig,
        concurrency: usize,
        limiter: Arc<SharedLimiter>,
        metrics: Metrics,
    ) -> Result<Self, BuildError> {
        Ok(Self {
            transport: Transport::new(config, concurrency)?,
            fleet: FleetState::new(limiter, Liveness::always()),
            in_flight: Arc::new(Semaphore::new(concurrency)),
            concurrency: std::sync::Mutex::new(concurrency),
            retry: std::sync::RwLock::new(RetryPolicy {
                retries: config.retries,
                min_delay: config.retry_min_delay,
                max_delay: config.retry_max_delay,
            }),
            metrics,
        })
    }

    /// Makes every call first check that this worker's heartbeat is fresh (self-fencing).
    pub fn with_liveness(mut self, liveness: Liveness) -> Self {
        self.fleet = FleetState::new(self.fleet.limiter().clone(), liveness);
        self
    }

    /// Changes the retry policy for attempts that start from now on (a config reload).
    pub fn set_retry_policy(&self, policy: RetryPolicy) {
        *self.retry.write().expect("retry policy lock") = policy;
    }

    /// Changes how many calls may be in flight at once (a config reload). Growing takes effect
    /// at once; shrinking as calls in flight end.
    pub fn set_concurrency(&self, concurrency: usize) {
        let mut current = self.concurrency.lock().expect("concurrency lock");
        if concurrency > *current {
            self.in_flight.add_permits(concurrency - *current);
        } else if concurrency < *current {
            let (sem, excess) = (self.in_flight.clone(), (*current - concurrency) as u32);
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many(excess).await {
                    p.forget();
                }
            });
        }
        *current = concurrency;
    }

    /// The shared rate limiter (a reload re-sizes the budget; the heartbeat re-shares it).
    pub fn limiter(&self) -> &Arc<SharedLimiter> {
        self.fleet.limiter()
    }

    /// What the client knows of the fleet: its share of the rate and its liveness.
    pub fn fleet(&self) -> &FleetState {
        &self.fleet
    }

    /// One attempt to invalidate a session: a call plus up to `retries` immediate retries of a
    /// transient failure. Every call waits for the rate limiter (without holding a concurrency
    /// slot) and then for a slot. Waiting and backoff end at once on stop; a call in flight is
    /// given until the abort.
    pub async fn invalidate(
        &self,
        session_token: &str,
        member_identifier: &str,
        shutdown: &Shutdown,
    ) -> Invalidation {
        self.invalidate_checked(session_token, member_identifier, shutdown, || async {
            true
        })
        .await
    }

    /// [`Client::invalidate`], with `before_call` asked right before every call, once the rate
    /// token and the concurrency slot are held: `false` withholds the call. A session that
    /// waited seconds for the limiter is thereby re-checked at the last moment, not at claim time.
    pub async fn invalidate_checked<F, Fut>(
        &self,
        session_token: &str,
        member_identifier: &str,
        shutdown: &Shutdown,
        mut before_call: F,
    ) -> Invalidation
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let session = (session_token, member_identifier);
        let mut calls = Vec::new();
        let mut backoff = self.backoff();
        loop {
            let call = self.checked_call(session, shutdown, &mut before_call, &mut calls);
            let result = match call.await {
                Ok(answer) => answer,
                Err(stopped) => {
                    return Invalidation {
                        calls,
                        result: Err(stopped),
                    };
                }
            };
            let retry_after = match &result {
                Err(ApiError::Retryable { retry_after, .. }) => *retry_after,
                _ => {
                    return Invalidation {
                        calls,
                        result: result.map_err(InvalidateError::Api),
                    };
                }
            };
            // No retry left, or a stop during the backoff: the last answer stands (the sweep
            // decides what a cut-short attempt means).
            let again = match backoff.next() {
                Some(delay) => {
                    let delay = delay.max(retry_after.unwrap_or_default());
                    self.wait_before_retry(delay, shutdown).await
                }
                None => false,
            };
            if !again {
                return Invalidation {
                    calls,
                    result: result.map_err(InvalidateError::Api),
                };
            }
        }
    }

    /// The jittered backoff between the calls of one attempt, from the current policy.
    fn backoff(&self) -> backon::ExponentialBackoff {
        let retry = *self.retry.read().expect("retry policy lock");
        backon::ExponentialBuilder::default()
            .with_min_delay(retry.min_delay)
            .with_max_delay(retry.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(retry.retries as usize)
            .build()
    }

    /// Sleeps `delay` before a retry; `false` if a stop came first.
    async fn wait_before_retry(&self, delay: Duration, shutdown: &Shutdown) -> bool {
        tokio::select! {
            biased;
            _ = shutdown.stopping() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Waits for the rate limiter, then for a concurrency slot (never holding a slot while it
    /// waits for the rate); `None` once a stop comes.
    async fn take_turn(&self, shutdown: &Shutdown) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let waited = tokio::select! {
            biased;
            _ = shutdown.stopping() => return None,
            w = self.fleet.limiter().acquire() => w,
        };
        self.metrics.rate_limit_waited(waited);
        tokio::select! {
            biased;
            _ = shutdown.stopping() => None,
            p = self.in_flight.acquire() => Some(p.expect("the semaphore is never closed")),
        }
    }

    /// One call of an attempt: its turn (rate and slot), the fencing check and `before_call`,
    /// then the request, whose record goes to `calls`. `Ok`: iyzico's classified answer;
    /// `Err`: why there is none (a stop, the fence, the check, the abort).
    async fn checked_call<F, Fut>(
        &self,
        (session_token, member_identifier): (&str, &str),
        shutdown: &Shutdown,
        before_call: &mut F,
        calls: &mut Vec<CallRecord>,
    ) -> Result<Result<(), ApiError>, InvalidateError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let permit = self
            .take_turn(shutdown)
            .await
            .ok_or(InvalidateError::Interrupted)?;
        if !self.fleet.liveness().is_fresh() {
            tracing::warn!("heartbeat is stale: not calling the API, giving the session back");
            return Err(InvalidateError::Fenced);
        }
        if !before_call().await {
            return Err(InvalidateError::Withheld);
        }
        let started_at = Utc::now();
        let started = Instant::now();
        let conversation_id = uuid::Uuid::new_v4().to_string();
        let outcome = self
            .send(&conversation_id, session_token, member_identifier, shutdown)
            .await;
        drop(permit);
        let latency = started.elapsed();
        match outcome {
            Ok((http_status, answer)) => {
                let answer = answer.map_err(|e| e.scrubbed(session_token, member_identifier));
                calls.push(self.answered(
                    session_token,
                    conversation_id,
                    http_status,
                    &answer,
                    (started_at, latency),
                ));
                Ok(answer)
            }
            Err((class, message, error)) => {
                if matches!(error, InvalidateError::Fenced) {
                    tracing::warn!("heartbeat went stale during a call: cancelled it");
                }
                calls.push(CallRecord {
                    conversation_id,
                    http_status: None,
                    class,
                    error_code: None,
                    error_message: Some(message.into()),
                    started_at,
                    latency,
                });
                Err(error)
            }
        }
    }

    /// The request, unless the shutdown's abort or the fencing deadline comes first: a call
    /// must end before peers may think this worker dead, so at the fencing deadline it is
    /// cancelled, whatever its timeout, and its outcome is unknown.
    async fn send(
        &self,
        conversation_id: &str,
        session_token: &str,
        member_identifier: &str,
        shutdown: &Shutdown,
    ) -> Result<(Option<u16>, Result<(), ApiError>), Unanswered> {
        tokio::select! {
            r = self.call_once(conversation_id, session_token, member_identifier) => Ok(r),
            _ = shutdown.aborted() => Err(("interrupted", "call abandoned at the end of the shutdown grace period", InvalidateError::Interrupted)),
            _ = self.fleet.liveness().fenced() => Err(("unknown", "call cancelled at the fencing deadline (heartbeat stale); outcome unknown, retried later", InvalidateError::Fenced)),
        }
    }

    /// The attempt log's record of an answered call, counted in the metrics.
    fn answered(
        &self,
        session_token: &str,
        conversation_id: String,
        http_status: Option<u16>,
        answer: &Result<(), ApiError>,
        (started_at, latency): (DateTime<Utc>, Duration),
    ) -> CallRecord {
        let class = match answer {
            Ok(()) => "invalidated",
            Err(e) => e.class(),
        };
        self.metrics.api_call(class, http_status, latency);
        // Field values are only computed when the line is emitted: no hashing on the hot path.
        match answer {
            Ok(()) => {
                tracing::debug!(session = %fingerprint(session_token), ?http_status, ?latency, "invalidated")
            }
            Err(e) => tracing::debug!(
                session = %fingerprint(session_token), ?http_status, ?latency, class, error = %e, "call failed"
            ),
        }
        CallRecord {
            conversation_id,
            http_status,
            class,
            error_code: answer
                .as_ref()
                .err()
                .and_then(|e| e.code().map(str::to_owned)),
            error_message: answer.as_ref().err().map(|e| e.message().to_owned()),
            started_at,
            latency,
        }
    }

    /// One signed POST, classified. Returns the HTTP status when a response arrived.
    async fn call_once(
        &self,
        conversation_id: &str,
        session_token: &str,
        member_identifier: &str,
    ) -> (Option<u16>, Result<(), ApiError>) {
        let response = match self
            .transport
            .post(conversation_id, session_token, member_identifier)
            .await
        {
            Ok(r) => r,
            Err(e) => return (None, Err(transport_error(&e))),
        };
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(response.headers());
        if response.status().is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok());
            return (
                Some(status),
                Err(redirect_error(
                    status,
                    location,
                    &self.transport.endpoint,
                    retry_after,
                )),
            );
        }
        let answer = match read_body(response, retry_after).await {
            Ok(body) => classify(status, retry_after, &body, conversation_id),
            Err(e) => Err(e),
        };
        (Some(status), answer)
    }
}

/// Reads a response body of at most [`MAX_RESPONSE_BYTES`]; anything longer is not iyzico's
/// answer (retryable).
async fn read_body(
    mut response: reqwest::Response,
    retry_after: Option<Duration>,
) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ApiError::Retryable {
                reason: format!("response body larger than {MAX_RESPONSE_BYTES} bytes"),
                code: None,
                retry_after,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn transport_error(e: &reqwest::Error) -> ApiError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transport error"
    };
    // reqwest's Display never includes headers or bodies, so no secret can leak through it.
    let mut reason = format!("{what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    ApiError::Retryable {
        reason,
        code: None,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "c-1";

    fn body(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn success_is_ok() {
        let b = body(serde_json::json!({"status":"success","conversationId":CID}));
        assert_eq!(classify(200, None, &b, CID), Ok(()));
        let b = body(serde_json::json!({"status":"success"}));
        assert_eq!(classify(200, None, &b, CID), Ok(()));
    }

    #[test]
    fn already_invalidated_is_its_own_class() {
        let b = body(
            serde_json::json!({"status":"failure","errorCode":"260030","errorMessage":"x","conversationId":CID}),
        );
        assert_eq!(
            classify(400, None, &b, CID).unwrap_err().class(),
            "already_invalidated"
        );
        let b = body(serde_json::json!({"status":"failure","errorCode":260030}));
        assert_eq!(
            classify(400, None, &b, CID).unwrap_err().class(),
            "already_invalidated"
        );
    }

    #[test]
    fn auth_codes_and_statuses_are_auth_whatever_the_status() {
        for code in ["1000", "1001", "1007"] {
            for status in [200, 400, 401, 500] {
                let b = body(serde_json::json!({"status":"failure","errorCode":code}));
                assert_eq!(
                    classify(status, None, &b, CID).unwrap_err().class(),
                    "auth",
                    "{code} {status}"
                );
            }
        }
        assert_eq!(
            classify(403, None, b"<html>", CID).unwrap_err().class(),
            "auth"
        );
    }

    #[test]
    fn transient_answers_are_retryable() {
        let rl = body(serde_json::json!({"status":"failure","errorCode":"50000"}));
        let sys = body(serde_json::json!({"status":"failure","errorCode":"100001"}));
        for (status, b) in [
            (503, b"<html>down</html>".to_vec()),
            (200, b"{\"status\":\"succ".to_vec()),
            (200, b"".to_vec()),
            (429, b"".to_vec()),
            (400, rl),
            (200, sys),
            (
                502,
                body(serde_json::json!({"status":"failure","errorCode":"11"})),
            ),
        ] {
            let e = classify(status, Some(Duration::from_secs(2)), &b, CID).unwrap_err();
            assert_eq!(
                e.class(),
                "retryable",
                "{status} {:?}",
                String::from_utf8_lossy(&b)
            );
            assert!(matches!(
                e,
                ApiError::Retryable {
                    retry_after: Some(_),
                    ..
                }
            ));
        }
    }

    #[test]
    fn an_answer_for_another_conversation_is_not_ours() {
        let b = body(serde_json::json!({"status":"success","conversationId":"someone-else"}));
        let e = classify(200, None, &b, CID).unwrap_err();
        assert_eq!(e.class(), "retryable");
        assert!(e.message().contains("not ours"));
    }

    #[test]
    fn other_failures_are_permanent_and_keep_code_and_message() {
        let b = body(
            serde_json::json!({"status":"failure","errorCode":"11","errorMessage":"Geçersiz istek"}),
        );
        assert_eq!(
            classify(400, None, &b, CID),
            Err(ApiError::Permanent {
                code: "11".into(),
                message: "Geçersiz istek".into()
            })
        );
    }

    #[test]
    fn a_redirect_names_status_and_host_but_never_path_or_query() {
        let endpoint: reqwest::Url = "https://api.iyzipay.com/v1/x".parse().unwrap();
        let e = redirect_error(
            307,
            Some("https://evil.example:8443/steal?sessionToken=abc#frag"),
            &endpoint,
            None,
        );
        assert_eq!(e.class(), "retryable");
        assert_eq!(
            e.message(),
            "HTTP 307 redirect to https://evil.example:8443, not followed (iyzico never redirects)"
        );
        let e = redirect_error(302, Some("/elsewhere?token=abc"), &endpoint, None);
        assert!(
            e.message().contains("to https://api.iyzipay.com:443"),
            "{e}"
        );
        assert!(!e.message().contains("abc"), "{e}");
        let e = redirect_error(301, None, &endpoint, None);
        assert!(
            e.message().contains("HTTP 301 redirect without a Location"),
            "{e}"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(reqwest::header::RETRY_AFTER, "99999".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn echoed_tokens_and_members_are_taken_out_of_iyzico_text() {
        let e = ApiError::Permanent {
            code: "11".into(),
            message: format!(
                "Session tok-secret-1 for member mem-4711 invalid {}",
                "x".repeat(600)
            ),
        }
        .scrubbed("tok-secret-1", "mem-4711");
        let m = e.message();
        assert!(
            !m.contains("tok-secret-1") && !m.contains("mem-4711"),
            "{m}"
        );
        assert!(m.contains(&fingerprint("tok-secret-1")) && m.contains("[member]"));
        assert!(m.chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert_eq!(e.code(), Some("11"));
        let short = ApiError::Permanent {
            code: "11".into(),
            message: "error 11".into(),
        }
        .scrubbed("tok", "1");
        assert_eq!(
            short.message(),
            "error 11",
            "short values leave the text alone"
        );
    }
}
