//! IYZWSv2 request signing, as iyzico's official clients compute it.
//!
//! signature = hex(HMAC-SHA256(secret, random_key + path_without_query + body)), sent as
//! `Authorization: IYZWSv2 base64("apiKey:" + key + "&randomKey:" + rnd + "&signature:" + sig)`
//! with the random key repeated in `x-iyzi-rnd`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the random key.
pub const RANDOM_KEY_HEADER: &str = "x-iyzi-rnd";
/// The scheme word that starts the `Authorization` value.
pub const AUTH_SCHEME: &str = "IYZWSv2";

type HmacSha256 = Hmac<Sha256>;

/// A fresh random key from the operating system's CSPRNG (a v4 UUID, 122 random bits).
pub fn random_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Lower-case hex HMAC-SHA256 signature over `random_key + path (no query) + body`.
pub fn signature(secret_key: &str, random_key: &str, request_path: &str, body: &[u8]) -> String {
    hex::encode(
        mac(secret_key, random_key, request_path, body)
            .finalize()
            .into_bytes(),
    )
}

/// The HMAC over the signed message, ready to finalize or verify.
fn mac(secret_key: &str, random_key: &str, request_path: &str, body: &[u8]) -> HmacSha256 {
    let path = request_path.split('?').next().unwrap_or_default();
    let mut mac =
        HmacSha256::new_from_slice(secret_key.as_bytes()).expect("HMAC takes any key length");
    mac.update(random_key.as_bytes());
    mac.update(path.as_bytes());
    mac.update(body);
    mac
}

/// The full `Authorization` header value.
pub fn authorization(
    api_key: &str,
    secret_key: &str,
    random_key: &str,
    request_path: &str,
    body: &[u8],
) -> String {
    let sig = signature(secret_key, random_key, request_path, body);
    let params = format!("apiKey:{api_key}&randomKey:{random_key}&signature:{sig}");
    format!("{AUTH_SCHEME} {}", BASE64.encode(params))
}

/// Why a signed request was refused by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No usable `Authorization` header or random key.
    #[error("missing or malformed signature headers")]
    Missing,
    /// The API key is not the expected one.
    #[error("unknown api key")]
    UnknownApiKey,
    /// The signature does not match the body.
    #[error("invalid signature")]
    BadSignature,
}

/// Checks an incoming request's signature (used by the simulator), in constant time.
pub fn verify(
    authorization_header: Option<&str>,
    random_key_header: Option<&str>,
    expected_api_key: &str,
    secret_key: &str,
    request_path: &str,
    body: &[u8],
) -> Result<(), VerifyError> {
    let header = authorization_header.ok_or(VerifyError::Missing)?;
    let rnd = random_key_header.ok_or(VerifyError::Missing)?;
    let encoded = header
        .strip_prefix(AUTH_SCHEME)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(VerifyError::Missing)?;
    let decoded = BASE64
        .decode(encoded.trim())
        .map_err(|_| VerifyError::Missing)?;
    let decoded = String::from_utf8(decoded).map_err(|_| VerifyError::Missing)?;
    let mut api_key = None;
    let mut random_key = None;
    let mut sig = None;
    for part in decoded.split('&') {
        match part.split_once(':') {
            Some(("apiKey", v)) => api_key = Some(v),
            Some(("randomKey", v)) => random_key = Some(v),
            Some(("signature", v)) => sig = Some(v),
            _ => {}
        }
    }
    let (api_key, random_key, sig) = match (api_key, random_key, sig) {
        (Some(a), Some(r), Some(s)) => (a, r, s),
        _ => return Err(VerifyError::Missing),
    };
    if api_key != expected_api_key {
        return Err(VerifyError::UnknownApiKey);
    }
    if random_key != rnd {
        return Err(VerifyError::BadSignature);
    }
    let sig = hex::decode(sig).map_err(|_| VerifyError::BadSignature)?;
    mac(secret_key, random_key, request_path, body)
        .verify_slice(&sig)
        .map_err(|_| VerifyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vectors {
        vectors: Vec<Vector>,
    }

    #[derive(serde::Deserialize)]
    struct Vector {
        api_key: String,
        secret_key: String,
        random_key: String,
        request_path: String,
        body: String,
        authorization: String,
    }

    /// The vectors were computed with iyzico's official Python client; see the file's `about`.
    const VECTORS: &str = include_str!("../../tests/data/iyzico-auth-vectors.json");

    #[test]
    fn reproduces_every_official_vector() {
        let vectors: Vectors = serde_json::from_str(VECTORS).unwrap();
        assert!(vectors.vectors.len() >= 4);
        for v in &vectors.vectors {
            let got = authorization(
                &v.api_key,
                &v.secret_key,
                &v.random_key,
                &v.request_path,
                v.body.as_bytes(),
            );
            assert_eq!(
                got, v.authorization,
                "vector with random key {}",
                v.random_key
            );
            verify(
                Some(&got),
                Some(&v.random_key),
                &v.api_key,
                &v.secret_key,
                &v.request_path,
                v.body.as_bytes(),
            )
            .unwrap();
        }
    }

    #[test]
    fn verify_refuses_tampering() {
        let (k, s, r, p, b) = ("key", "secret", "rnd", "/v1/x", br#"{"a":1}"#.as_slice());
        let good = authorization(k, s, r, p, b);
        assert_eq!(
            verify(Some(&good), Some(r), k, s, p, br#"{"a":2}"#),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify(Some(&good), Some(r), k, "other", p, b),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify(Some(&good), Some("rnd2"), k, s, p, b),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify(Some(&good), Some(r), "key2", s, p, b),
            Err(VerifyError::UnknownApiKey)
        );
        assert_eq!(verify(None, Some(r), k, s, p, b), Err(VerifyError::Missing));
        assert_eq!(
            verify(Some("IYZWSv2 !!"), Some(r), k, s, p, b),
            Err(VerifyError::Missing)
        );
    }

    #[test]
    fn random_keys_are_fresh() {
        assert_ne!(random_key(), random_key());
        assert_eq!(random_key().len(), 32);
    }
}
