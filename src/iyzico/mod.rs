//! Everything that talks to iyzico: signing, the rate limiter, the client, and a local simulator.

pub mod client;
pub mod limiter;
pub mod signing;
pub mod simulator;

pub use client::{ApiError, CallRecord, Client, InvalidateError, Invalidation};

/// The invalidate endpoint's path.
pub const INVALIDATE_PATH: &str = "/v1/pay-with-iyzico/third-party-session/invalidate/session";
/// iyzico's "session already invalidated" error code: the outcome we wanted.
pub const ALREADY_INVALIDATED_CODE: &str = "260030";
/// Error codes iyzico returns for bad or missing credentials, whatever the HTTP status:
/// 1000 invalid signature, 1001 API credentials not found, 1007 missing signature.
pub const AUTH_ERROR_CODES: &[&str] = &["1000", "1001", "1007"];
/// Error codes that mean "try again later": 50000 request limit, 100001 system error.
pub const RETRYABLE_ERROR_CODES: &[&str] = &["50000", "100001"];

/// Makes rustls's ring provider the process default (idempotent). reqwest is built without a
/// provider of its own, so one must be chosen before the first client is built, here and in
/// every test that makes HTTPS-capable clients.
pub fn install_tls_provider() {
    // An error only says a provider is already installed: the same one, or the embedder's.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
