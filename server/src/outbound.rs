//! Outbound HTTP(S) calls the server makes to other services (an identity
//! provider's key set, the backend's write hook, the node that owns a
//! shard in a cluster): HTTP/1.1 over hyper with one shared connection
//! pool, TLS by rustls on ring with the system's root certificates. A
//! leaf: imports nothing of the crate.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest answer [`call`] reads.
const MAX_ANSWER_BYTES: usize = 4 << 20;

type Pool = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn pool() -> Result<&'static Pool, String> {
    static POOL: OnceLock<Result<Pool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| format!("no TLS roots on this system: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Client::builder(TokioExecutor::new()).build(https))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// An answer: its status, headers and body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends a request with `headers` and reads the whole answer (at most
/// `max_bytes` of body): an error (in words) for no connection, a timeout
/// or a body over the limit; any status is an answer.
pub async fn exchange(
    method: Method,
    url: &str,
    headers: HeaderMap,
    body: Bytes,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Answer, String> {
    let inner = async {
        let uri: axum::http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        *req.headers_mut() = headers;
        let r = pool()?.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = r.into_parts();
        let body = Limited::new(body, max_bytes)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(timeout, inner).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer in {} ms", timeout.as_millis())),
    }
}

/// Sends a request and reads its answer's body: `GET` without a body,
/// `POST` with a JSON one; an error (in words) for no connection, a
/// timeout, a status other than 2xx or a body over 4 MiB.
pub async fn call(
    url: &str,
    json_body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let mut headers = HeaderMap::new();
    let (method, body) = match json_body {
        Some(b) => {
            headers.insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            (Method::POST, Bytes::from(b))
        }
        None => (Method::GET, Bytes::new()),
    };
    let a = exchange(method, url, headers, body, MAX_ANSWER_BYTES, timeout).await?;
    if !a.status.is_success() {
        return Err(format!("HTTP {}", a.status));
    }
    Ok(a.body.to_vec())
}
