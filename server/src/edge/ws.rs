//! The WebSocket session (docs/PROTOCOL.md §4): `GET /v1/sync`.
//!
//! A session goes through two phases:
//!
//! 1. **Before `hello`** ([`await_hello`]): the edge alone answers. The
//!    first message must be `hello` (`hello_required` otherwise, the socket
//!    stays open); its protocol must be 1 (`unsupported_protocol`, closes);
//!    the caller is the token of `hello.token` if given, else the one the
//!    upgrade request carried (`unauthorized`, closes, when there is none).
//!    Then [`SyncService::open_session`].
//! 2. **Open** ([`run_open_session`]): three loops run together until one
//!    ends the session: the reader parses every frame and feeds it to
//!    [`Session::handle`] (parse errors go to [`Session::reply_error`]); the
//!    pump writes every [`Outbox::next`] frame and calls
//!    [`Outbox::written`] after each; the pinger sends a ping frame every
//!    `ping_interval`. The session also ends when the token expires
//!    (`token_expired`), when nothing arrives for `idle_timeout`, or at a
//!    forced shutdown.
//!
//! Everything is written against `Sink<Message>` + `Stream<Item =
//! Result<Message, E>>`, so the session runs over an axum [`WebSocket`] as
//! well as over in-memory channels in tests.
//!
//! Frame sizes: a text frame over `max_message_bytes` is answered
//! `too_large` and the session goes on; the transport refuses frames over
//! [`transport_cap`] (twice the limit), which ends the session with
//! `too_large` and close code 1009 (the rest of such a frame cannot be
//! skipped). Memory per socket stays bounded by the cap.
//!
//! [`WebSocket`]: axum::extract::ws::WebSocket

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, close_code};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde_json::Value as Json;
use tenantsync_core::SiteId;
use tenantsync_protocol::ws::ErrorMsg;
use tenantsync_protocol::{ClientMsg, ErrorCode, PROTOCOL_VERSION, ServerMsg};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::EdgeSettings;
use crate::service::{ApiError, OutFrame, Outbox, Principal, Session, SyncService};

/// The message types a client may send (the tags of [`ClientMsg`]).
pub const CLIENT_TYPES: &[&str] = &[
    "hello",
    "subscribe",
    "unsubscribe",
    "resync",
    "ack",
    "push",
    "ping",
];

/// Largest frame the transport reads, for a message limit of
/// `max_message_bytes`: frames between the limit and this are answered
/// `too_large` and the session goes on.
pub fn transport_cap(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(2)
}

/// Largest amount of outgoing data buffered for one socket before writes
/// wait for the peer (backpressure).
pub fn write_buffer_cap(max_message_bytes: usize) -> usize {
    WRITE_BUFFER + max_message_bytes.saturating_mul(2)
}

/// The write buffer size handed to the transport: 0, each frame is written
/// as it is sent (the session flushes every frame anyway), so the buffer
/// holds one frame at a time and keeps the capacity of the largest.
pub const WRITE_BUFFER: usize = 0;

/// The read buffer each socket starts with: most client messages (acks,
/// subscribes, pings) fit; a larger frame grows it for as long as it is
/// being read, up to [`transport_cap`].
pub const READ_BUFFER: usize = 4 * 1024;

/// Parses one client message. The error is the protocol's answer:
/// `bad_message` (not JSON, not an object, a missing, ill-typed or unknown
/// field) or `unknown_type`, naming what was wrong and carrying the
/// message's `id` as `ref` when it has one.
pub fn parse_client_msg(text: &str) -> Result<ClientMsg, ErrorMsg> {
    match tenantsync_protocol::json::decode::<ClientMsg>(text.as_bytes()) {
        Ok(m) => Ok(m),
        Err(tenantsync_protocol::json::DecodeError::Json(e)) => Err(explain_parse_error(text, &e)),
        Err(e) => Err(ErrorMsg::new(ErrorCode::BadMessage, e.to_string())),
    }
}

fn explain_parse_error(text: &str, typed: &serde_json::Error) -> ErrorMsg {
    let bad = |m: String| ErrorMsg::new(ErrorCode::BadMessage, m);
    let value: Json = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return bad(format!("not JSON: {e}")),
    };
    let Json::Object(obj) = value else {
        return bad(format!(
            "a message is a JSON object with a `type`, got {}",
            json_kind(&value)
        ));
    };
    let reference = ["id", "sub"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Json::as_str))
        .map(str::to_owned);
    let mut err = match obj.get("type") {
        None => bad("missing field `type`".into()),
        Some(Json::String(t)) if !CLIENT_TYPES.contains(&t.as_str()) => ErrorMsg::new(
            ErrorCode::UnknownType,
            format!(
                "unknown message type `{t}` (expected one of {})",
                CLIENT_TYPES.join(", ")
            ),
        ),
        Some(Json::String(t)) => bad(format!("bad `{t}` message: {typed}")),
        Some(other) => bad(format!("`type` must be a string, got {}", json_kind(other))),
    };
    err.reference = reference;
    err
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// What a text frame is, once its size is checked.
fn read_text(text: &str, max_message_bytes: usize) -> Result<ClientMsg, ErrorMsg> {
    if text.len() > max_message_bytes {
        return Err(too_large(text.len(), max_message_bytes));
    }
    parse_client_msg(text)
}

fn too_large(size: usize, max: usize) -> ErrorMsg {
    ErrorMsg::new(
        ErrorCode::TooLarge,
        format!(
            "a message of {size} bytes is over the limit of {max} bytes (limits.max_message_bytes)"
        ),
    )
}

fn binary_refused() -> ErrorMsg {
    ErrorMsg::new(
        ErrorCode::BadMessage,
        "binary frames are not part of the protocol: send each message as one JSON text frame",
    )
}

/// How a session ends, and what the peer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Send this `error`, then a close frame.
    Error(ErrorCode, String),
    /// Send a close frame only.
    Close(u16, &'static str),
    /// The peer closed or the connection broke: nothing more to send.
    Gone,
}

impl End {
    fn error(e: ApiError) -> End {
        End::Error(e.code, e.message)
    }
}

/// The close code that goes with an error that ends a session.
pub fn close_code_for(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::TooLarge => close_code::SIZE,
        ErrorCode::UnsupportedProtocol => close_code::PROTOCOL,
        ErrorCode::ShuttingDown => close_code::AWAY,
        ErrorCode::Internal => close_code::ERROR,
        _ => close_code::POLICY,
    }
}

/// What the session loops need from the server.
pub(crate) struct Context<'a> {
    pub auth: &'a Authenticator,
    pub edge: &'a EdgeSettings,
    /// Cancelled when the server starts shutting down: a socket still
    /// before `hello` closes with `shutting_down` (open sessions are closed
    /// by the service, through their outbox).
    pub shutdown: &'a CancellationToken,
    /// Cancelled when the shutdown timed out: every session closes now.
    pub hard_stop: &'a CancellationToken,
}

/// A `hello` that opened a session.
pub(crate) struct Hello {
    /// The message as it came (relayed as it is to another node).
    pub raw: String,
    pub principal: Principal,
    pub site: SiteId,
    pub client: Option<String>,
    /// The schema version the replica has.
    pub schema_version: Option<i64>,
}

/// What a session needs to be relayed to the node running its tenant's
/// shard (a cluster, [`crate::forward`]).
#[derive(Debug, Clone, Default)]
pub struct Relay {
    /// The upgrade request's `Authorization` header, passed on.
    pub upgrade_auth: Option<axum::http::HeaderValue>,
    /// The session was relayed here already: it is never relayed again.
    pub forwarded: bool,
}

/// The sink, shared by the writers of an open session.
type SharedSink<S> = Arc<Mutex<S>>;

/// Sends one message, bounded by `deadline`: a peer that does not take a
/// frame in that time is gone.
async fn send<S, E>(sink: &Mutex<S>, msg: Message, deadline: Duration) -> Result<(), ()>
where
    S: Sink<Message, Error = E> + Unpin,
{
    let mut sink = sink.lock().await;
    match tokio::time::timeout(deadline, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn error_frame(e: &ErrorMsg) -> Message {
    let text = serde_json::to_string(&ServerMsg::Error(e.clone())).expect("an error serialises");
    Message::Text(text.into())
}

/// Tells the peer how the session ended (the `error` and the close frame),
/// bounded by a few seconds, and closes the sink.
async fn finish<S, E>(sink: &Mutex<S>, end: &End, deadline: Duration)
where
    S: Sink<Message, Error = E> + Unpin,
{
    let deadline = deadline.min(Duration::from_secs(5));
    let close = match end {
        End::Gone => None,
        End::Close(code, reason) => Some((*code, (*reason).to_owned())),
        End::Error(code, message) => {
            crate::app::count_edge_error(*code);
            let e = ErrorMsg::new(*code, message.clone());
            if send(sink, error_frame(&e), deadline).await.is_err() {
                return;
            }
            Some((close_code_for(*code), code.as_str().to_owned()))
        }
    };
    if let Some((code, reason)) = close {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }));
        if send(sink, frame, deadline).await.is_err() {
            return;
        }
    }
    let mut sink = sink.lock().await;
    let _ = tokio::time::timeout(deadline, sink.close()).await;
    if matches!(end, End::Error(ErrorCode::TooLarge, _)) {
        // The rest of the frame is unread in the socket: closing it now
        // would reset the connection and could destroy the close frame
        // before the peer reads it. The socket stays open a moment first.
        tokio::time::sleep(OVERSIZE_LINGER).await;
    }
}

/// How long a session ended by a frame over the transport cap keeps its
/// socket open after the close frame (see [`finish`]).
const OVERSIZE_LINGER: Duration = Duration::from_secs(1);

/// A read error of the transport: over the frame cap, or a broken
/// connection.
fn read_error_end<E: std::fmt::Display>(e: &E, max_message_bytes: usize) -> End {
    let text = e.to_string();
    if text.contains("Message too long") {
        End::Error(
            ErrorCode::TooLarge,
            format!(
                "a frame over {} bytes cannot be read (the message limit is {max_message_bytes} bytes): {text}",
                transport_cap(max_message_bytes)
            ),
        )
    } else {
        tracing::debug!(error = %text, "websocket read failed");
        End::Gone
    }
}

/// Phase 1: waits for a valid `hello`, answering everything else. Returns
/// the hello, or how the session ended.
pub(crate) async fn await_hello<S, R, E, E2>(
    sink: &Mutex<S>,
    stream: &mut R,
    ctx: &Context<'_>,
    upgrade_principal: Option<&Principal>,
) -> Result<Hello, End>
where
    S: Sink<Message, Error = E> + Unpin,
    R: Stream<Item = Result<Message, E2>> + Unpin,
    E2: std::fmt::Display,
{
    let max = ctx.edge.max_message_bytes;
    let deadline = tokio::time::Instant::now() + ctx.edge.hello_timeout;
    loop {
        let frame = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => {
                return Err(End::Error(ErrorCode::ShuttingDown, "the server is shutting down".into()));
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(End::Error(ErrorCode::HelloRequired, format!(
                    "no hello within {} s of the upgrade", ctx.edge.hello_timeout.as_secs()
                )));
            }
            frame = stream.next() => frame,
        };
        let answer = match frame {
            None => return Err(End::Gone),
            Some(Err(e)) => return Err(read_error_end(&e, max)),
            Some(Ok(Message::Text(text))) => match read_text(text.as_str(), max) {
                Ok(ClientMsg::Hello {
                    protocol,
                    site_id,
                    client,
                    token,
                    schema_version,
                }) => {
                    if protocol != PROTOCOL_VERSION {
                        return Err(End::Error(
                            ErrorCode::UnsupportedProtocol,
                            format!(
                                "this server speaks protocol {PROTOCOL_VERSION}, the hello asks for {protocol}"
                            ),
                        ));
                    }
                    let principal = match (token, upgrade_principal) {
                        (Some(token), _) => {
                            ctx.auth.authenticate(&token).await.map_err(End::error)?
                        }
                        (None, Some(p)) => p.clone(),
                        (None, None) => {
                            return Err(End::Error(
                                ErrorCode::Unauthorized,
                                "no token: send `Authorization: Bearer <token>` with the upgrade request, or `token` in hello".into(),
                            ));
                        }
                    };
                    if let Some(at) = expiry(&principal, ctx.auth)
                        && at <= SystemTime::now()
                    {
                        return Err(End::Error(
                            ErrorCode::TokenExpired,
                            "the token has expired (`exp` passed)".into(),
                        ));
                    }
                    return Ok(Hello {
                        raw: text.as_str().to_owned(),
                        principal,
                        site: site_id,
                        client,
                        schema_version,
                    });
                }
                Ok(_) => ErrorMsg::new(
                    ErrorCode::HelloRequired,
                    "the first message of a session must be `hello`",
                ),
                Err(e) => e,
            },
            Some(Ok(Message::Binary(_))) => binary_refused(),
            Some(Ok(Message::Close(_))) => return Err(End::Gone),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
        };
        crate::app::count_edge_error(answer.code);
        if send(sink, error_frame(&answer), ctx.edge.idle_timeout)
            .await
            .is_err()
        {
            return Err(End::Gone);
        }
    }
}

/// When the session's token stops being valid (its `exp`, plus the
/// leeway the server grants).
fn expiry(p: &Principal, auth: &Authenticator) -> Option<SystemTime> {
    p.expires_at
        .map(|at| at + Duration::from_secs(auth.leeway_secs()))
}

/// Phase 2: runs an open session until it ends; returns how.
pub(crate) async fn run_open_session<S, R, E, E2>(
    sink: SharedSink<S>,
    stream: &mut R,
    ctx: &Context<'_>,
    mut session: Session,
    mut outbox: Outbox,
    expires_at: Option<SystemTime>,
) -> End
where
    S: Sink<Message, Error = E> + Unpin,
    R: Stream<Item = Result<Message, E2>> + Unpin,
    E2: std::fmt::Display,
{
    let edge = ctx.edge;
    let max = edge.max_message_bytes;

    let reader = async {
        loop {
            session.room().await;
            let frame = match tokio::time::timeout(edge.idle_timeout, stream.next()).await {
                Err(_) => return End::Close(close_code::AWAY, "idle timeout"),
                Ok(None) => return End::Gone,
                Ok(Some(Err(e))) => return read_error_end(&e, max),
                Ok(Some(Ok(frame))) => frame,
            };
            let refused = match frame {
                Message::Text(text) => match read_text(text.as_str(), max) {
                    Ok(ClientMsg::Hello { .. }) => Some(ErrorMsg::new(
                        ErrorCode::BadMessage,
                        "this session is open already: hello is only the first message",
                    )),
                    Ok(msg) => {
                        session.handle(msg).await;
                        None
                    }
                    Err(e) => Some(e),
                },
                Message::Binary(_) => Some(binary_refused()),
                Message::Close(_) => return End::Gone,
                // Pings are answered by the transport; any frame counts as
                // a sign of life.
                Message::Ping(_) | Message::Pong(_) => None,
            };
            if let Some(e) = refused {
                crate::app::count_edge_error(e.code);
                session.reply_error(e);
            }
        }
    };

    let pump = async {
        loop {
            match outbox.next().await {
                Some(OutFrame::Text(text)) => {
                    if send(&sink, Message::Text(text.into()), edge.idle_timeout)
                        .await
                        .is_err()
                    {
                        return End::Gone;
                    }
                    outbox.written();
                }
                Some(OutFrame::Close { code, message }) => return End::Error(code, message),
                None => return End::Close(close_code::AWAY, "session ended"),
            }
        }
    };

    let pinger = async {
        let mut tick = tokio::time::interval(edge.ping_interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            if send(&sink, Message::Ping(Default::default()), edge.idle_timeout)
                .await
                .is_err()
            {
                return End::Gone;
            }
        }
    };

    let expired = async {
        match expires_at {
            Some(at) => {
                let left = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::time::sleep(left).await;
                End::Error(
                    ErrorCode::TokenExpired,
                    "the token expired during the session: reconnect with a fresh token".into(),
                )
            }
            None => std::future::pending().await,
        }
    };

    tokio::select! {
        end = reader => end,
        end = pump => end,
        end = pinger => end,
        end = expired => end,
        _ = ctx.hard_stop.cancelled() => End::Error(
            ErrorCode::ShuttingDown,
            "the server is shutting down".into(),
        ),
    }
}

/// A whole session over any sink and stream: `hello`, the open session,
/// and the final `error` and close frame.
pub(crate) async fn run_session<S, R, E, E2>(
    sink: S,
    mut stream: R,
    ctx: Context<'_>,
    service: &SyncService,
    upgrade_principal: Option<Principal>,
    relay: Relay,
) where
    S: Sink<Message, Error = E> + Unpin,
    R: Stream<Item = Result<Message, E2>> + Unpin,
    E2: std::fmt::Display,
{
    let sink = Arc::new(Mutex::new(sink));
    let end = loop {
        let hello = match await_hello(&sink, &mut stream, &ctx, upgrade_principal.as_ref()).await {
            Ok(h) => h,
            Err(end) => break end,
        };
        let span = tracing::info_span!(
            "session",
            site = %hello.site,
            subject = %hello.principal.subject,
            tenant = hello.principal.tenant.as_deref().unwrap_or(""),
            client = hello.client.as_deref().unwrap_or(""),
        );
        if !relay.forwarded
            && let Some(base) = service.forward_to(hello.principal.tenant.as_deref())
        {
            break crate::forward::ws(
                &sink,
                &mut stream,
                &base,
                hello.raw,
                relay.upgrade_auth.clone(),
                ctx.edge.max_message_bytes,
            )
            .await;
        }
        let expires_at = expiry(&hello.principal, ctx.auth);
        let opened = service
            .open_session(
                hello.principal,
                hello.site,
                hello.client,
                hello.schema_version,
            )
            .await;
        match opened {
            Ok((session, outbox)) => {
                let end = tracing::Instrument::instrument(
                    run_open_session(sink.clone(), &mut stream, &ctx, session, outbox, expires_at),
                    span.clone(),
                )
                .await;
                span.in_scope(|| tracing::debug!(?end, "session ended"));
                break end;
            }
            Err(e) if e.code.closes_connection() => break End::error(e),
            Err(e) => {
                // Not fatal (a limit): say so and wait for another hello.
                crate::app::count_edge_error(e.code);
                if send(&sink, error_frame(&e.ws(None)), ctx.edge.idle_timeout)
                    .await
                    .is_err()
                {
                    break End::Gone;
                }
            }
        }
    };
    finish(&sink, &end, ctx.edge.idle_timeout).await;
}

#[cfg(test)]
mod tests;
