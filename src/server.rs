//! The operations endpoint: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz`
//! (database reachable and the last sweep not failing), and the read-only status page: `/`
//! with its script and style sheet, and its data at `/api/status`. GET and HEAD only; any
//! other method is answered 405.

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::shutdown::Shutdown;
use crate::status::StatusSource;
use crate::telemetry::Metrics;

/// The page, its script and its style sheet, embedded in the binary.
const INDEX_HTML: &str = include_str!("status/index.html");
const STATUS_JS: &str = include_str!("status/status.js");
const STATUS_CSS: &str = include_str!("status/status.css");

/// Only this origin's script, style and data; nothing inline, no frames, no forms.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// `run`'s router: the operations endpoints, plus the status page when `status` is given.
pub fn router(metrics: Metrics, status: Option<StatusSource>) -> axum::Router {
    let ops = ops_router(metrics);
    match status {
        Some(s) => ops.merge(status_router(s)),
        None => ops,
    }
}

/// The status page and its data (and `/healthz`, for `serve-status`'s health check).
pub fn status_router(status: StatusSource) -> axum::Router {
    fn asset(content_type: &'static str, body: &'static str) -> axum::response::Response {
        (secure_headers(content_type, "no-cache"), body).into_response()
    }
    axum::Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/status.js",
            get(|| async { asset("text/javascript; charset=utf-8", STATUS_JS) }),
        )
        .route(
            "/status.css",
            get(|| async { asset("text/css; charset=utf-8", STATUS_CSS) }),
        )
        .route(
            "/api/status",
            get(move || {
                let status = status.clone();
                async move {
                    let ct = "application/json";
                    match status.json().await {
                        Ok(body) => {
                            (secure_headers(ct, "no-store"), body.to_string()).into_response()
                        }
                        Err(e) => {
                            // The detail goes to the log only: the page never shows driver text.
                            tracing::warn!(error = %e, "status page: reading the database failed");
                            let body =
                                r#"{"error":"the database did not answer; see the sweeper's log"}"#;
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                secure_headers(ct, "no-store"),
                                body,
                            )
                                .into_response()
                        }
                    }
                }
            }),
        )
}

/// The same headers on every page response.
fn secure_headers(
    content_type: &'static str,
    cache: &'static str,
) -> [(header::HeaderName, &'static str); 6] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, cache),
    ]
}

/// `/metrics`, `/healthz` and `/readyz`.
fn ops_router(metrics: Metrics) -> axum::Router {
    let for_metrics = metrics.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = for_metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = metrics.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
                    }
                }
            }),
        )
}

/// Serves until the shutdown's abort (it stays up while in-flight work drains, so probes and
/// scrapes keep answering during a graceful stop).
pub async fn serve_routes(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.aborted().await })
        .await
}
