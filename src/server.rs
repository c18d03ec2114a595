//! The operations endpoint: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz`
//! (database reachable and the last sweep not failing).

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

/// The router, separate from the listener so tests can bind port 0.
pub fn router(metrics: Metrics) -> axum::Router {
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
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(async move { shutdown.aborted().await })
        .await
}
