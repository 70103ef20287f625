//! Outbound HTTP(S) calls the server makes to other services (an identity
//! provider's key set, the backend's write hook): HTTP/1.1 over hyper, TLS
//! by rustls on ring with the system's root certificates. A leaf: imports
//! nothing of the crate.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Largest answer read.
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Sends a request and reads its answer's body: `GET` without a body,
/// `POST` with a JSON one; an error (in words) for no connection, a
/// timeout, a status other than 2xx or a body over 4 MiB.
pub async fn call(
    url: &str,
    json_body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    match tokio::time::timeout(timeout, call_inner(url, json_body)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer in {} ms", timeout.as_millis())),
    }
}

async fn call_inner(url: &str, json_body: Option<Vec<u8>>) -> Result<Vec<u8>, String> {
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| format!("no TLS roots on this system: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<axum::body::Bytes>> =
        Client::builder(TokioExecutor::new()).build(https);
    let mut req = axum::http::Request::builder().uri(uri);
    let body = match json_body {
        Some(b) => {
            req = req
                .method(axum::http::Method::POST)
                .header(axum::http::header::CONTENT_TYPE, "application/json");
            Full::new(axum::body::Bytes::from(b))
        }
        None => Full::new(axum::body::Bytes::new()),
    };
    let req = req.body(body).map_err(|e| e.to_string())?;
    let r = client.request(req).await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}", r.status()));
    }
    let body = Limited::new(r.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    Ok(body.to_vec())
}
