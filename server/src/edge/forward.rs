//! Forwarding to the node that runs a tenant's shard, in a cluster
//! (docs/CLUSTER.md, "Any node, any client"): a node that does not run the
//! shard of a request's tenant passes the request on to the node that
//! does, and its answer back; a WebSocket session is relayed frame by
//! frame after its `hello`. The client never learns which node serves it.
//! A forwarded request carries [`FORWARDED`] and is never forwarded again
//! (a node that does not run the shard then answers `unavailable`), so a
//! placement being updated cannot make a loop.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tenantsync_protocol::ErrorCode;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite;

use crate::app::AppState;
use crate::http::HttpError;
use crate::service::ApiError;
use crate::ws::End;

/// The header marking a forwarded request.
pub const FORWARDED: &str = "tenantsync-forwarded";

/// Where a request for `tenant` goes, when not here: the owner's URL.
pub(crate) fn target(
    state: &AppState,
    headers: &HeaderMap,
    tenant: Option<&str>,
) -> Option<String> {
    if headers.contains_key(FORWARDED) {
        return None;
    }
    state.service().forward_to(tenant)
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("the node running this tenant's shard did not answer ({e}); retry"),
    )
}

/// Passes an HTTP request on to `base` (the owner) with the caller's
/// credentials and its JSON body; its answer comes back as it is.
pub(crate) async fn http(
    state: &AppState,
    base: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Vec<u8>,
) -> Response {
    let mut out = HeaderMap::new();
    for h in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(v) = headers.get(&h) {
            out.insert(h, v.clone());
        }
    }
    out.insert(FORWARDED, HeaderValue::from_static("1"));
    let limits = state.service().limits();
    let max = limits.max_pull_bytes.max(limits.max_message_bytes) + (1 << 20);
    let timeout = limits.max_wait + Duration::from_secs(15);
    let url = format!("{base}{path}");
    match crate::outbound::exchange(method, &url, out, Bytes::from(body), max, timeout).await {
        Ok(a) => {
            let mut r = (a.status, a.body).into_response();
            if let Some(ct) = a.headers.get(header::CONTENT_TYPE) {
                r.headers_mut().insert(header::CONTENT_TYPE, ct.clone());
            }
            r
        }
        Err(e) => HttpError(unavailable(e)).into_response(),
    }
}

fn to_upstream(m: Message) -> tungstenite::Message {
    match m {
        Message::Text(t) => tungstenite::Message::Text(t.as_str().into()),
        Message::Binary(b) => tungstenite::Message::Binary(b),
        Message::Ping(b) => tungstenite::Message::Ping(b),
        Message::Pong(b) => tungstenite::Message::Pong(b),
        Message::Close(c) => {
            tungstenite::Message::Close(c.map(|c| tungstenite::protocol::CloseFrame {
                code: c.code.into(),
                reason: c.reason.as_str().into(),
            }))
        }
    }
}

fn to_client(m: tungstenite::Message) -> Option<Message> {
    Some(match m {
        tungstenite::Message::Text(t) => Message::Text(t.as_str().into()),
        tungstenite::Message::Binary(b) => Message::Binary(b),
        tungstenite::Message::Ping(b) => Message::Ping(b),
        tungstenite::Message::Pong(b) => Message::Pong(b),
        tungstenite::Message::Close(c) => Message::Close(c.map(|c| CloseFrame {
            code: c.code.into(),
            reason: c.reason.as_str().into(),
        })),
        tungstenite::Message::Frame(_) => return None,
    })
}

/// Relays a WebSocket session to `base` (the owner): opens a session
/// there with the same credentials, sends the client's `hello` as it came,
/// then passes every frame both ways until either side ends. How it ended
/// (`unavailable` when the owner cannot be reached: the client reconnects).
pub(crate) async fn ws<S, R, E, E2>(
    sink: &Mutex<S>,
    stream: &mut R,
    base: &str,
    hello: String,
    upgrade_auth: Option<HeaderValue>,
    max_message_bytes: usize,
) -> End
where
    S: Sink<Message, Error = E> + Unpin,
    R: Stream<Item = Result<Message, E2>> + Unpin,
    E2: std::fmt::Display,
{
    use tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/v1/sync",
        base.replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1)
    );
    let mut req = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return End::Error(ErrorCode::Unavailable, unavailable(e).message),
    };
    req.headers_mut()
        .insert(FORWARDED, HeaderValue::from_static("1"));
    if let Some(a) = upgrade_auth {
        req.headers_mut().insert(header::AUTHORIZATION, a);
    }
    let cap = crate::ws::transport_cap(max_message_bytes);
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(cap))
        .max_frame_size(Some(cap));
    let upstream = tokio_tungstenite::connect_async_with_config(req, Some(config), true).await;
    let (mut up_tx, mut up_rx) = match upstream {
        Ok((s, _)) => s.split(),
        Err(e) => return End::Error(ErrorCode::Unavailable, unavailable(e).message),
    };
    if let Err(e) = up_tx.send(tungstenite::Message::Text(hello.into())).await {
        return End::Error(ErrorCode::Unavailable, unavailable(e).message);
    }
    loop {
        tokio::select! {
            from_client = stream.next() => match from_client {
                Some(Ok(m)) => {
                    let closing = matches!(m, Message::Close(_));
                    if up_tx.send(to_upstream(m)).await.is_err() || closing {
                        return End::Gone;
                    }
                }
                _ => {
                    let _ = up_tx.close().await;
                    return End::Gone;
                }
            },
            from_owner = up_rx.next() => match from_owner {
                Some(Ok(m)) => {
                    let closing = matches!(m, tungstenite::Message::Close(_));
                    if let Some(m) = to_client(m)
                        && (sink.lock().await.send(m).await.is_err() || closing)
                    {
                        return End::Gone;
                    }
                }
                // The owner went away (it died, or gave the shard up): the
                // client reconnects, and is relayed to the next owner.
                _ => return End::Error(
                    ErrorCode::Unavailable,
                    "the node running this tenant's shard went away; reconnect".into(),
                ),
            },
        }
    }
}
