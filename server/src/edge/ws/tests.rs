//! The session before `hello`, frame parsing and the closing handshake,
//! over in-memory channels (no socket, no engine). The open session is
//! tested over real sockets in server/tests/edge_ws.rs.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use futures_channel::mpsc;
use futures_util::StreamExt;
use serde_json::{Value as Json, json};
use tenantsync_protocol::{ErrorCode, ServerMsg};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Context, End, await_hello, finish, parse_client_msg, read_error_end};
use crate::auth::{Authenticator, JwtKey, JwtSettings};
use crate::config::EdgeSettings;
use crate::service::Principal;

const SECRET: &str = "unit test secret, 32 bytes long!";
const SITE: &str = "0123456789abcdef0123456789abcdef";

fn auth() -> Authenticator {
    Authenticator::new(&JwtSettings {
        key: JwtKey::Secret(SECRET.as_bytes().to_vec()),
        leeway_secs: 0,
        audience: None,
        issuer: None,
        tenant_claim: "tenant_id".into(),
    })
    .unwrap()
}

fn token(sub: &str, exp_in: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims =
        json!({"sub": sub, "role": "authenticated", "tenant_id": "acme", "exp": now + exp_in});
    crate::auth::mint_hs256(SECRET.as_bytes(), claims.as_object().unwrap()).unwrap()
}

fn edge() -> EdgeSettings {
    EdgeSettings {
        max_message_bytes: 1024,
        ..EdgeSettings::default()
    }
}

fn hello(token: Option<&str>) -> Message {
    let mut h = json!({"type": "hello", "protocol": 1, "site_id": SITE, "client": "unit"});
    if let Some(t) = token {
        h["token"] = json!(t);
    }
    text(&h.to_string())
}

fn text(s: &str) -> Message {
    Message::Text(s.to_owned().into())
}

/// What the server wrote before the hello phase ended: `(code, message)` of
/// each error frame.
type Answers = Vec<(ErrorCode, String)>;

fn decode(answers: Vec<Message>) -> Answers {
    answers
        .into_iter()
        .map(|m| match m {
            Message::Text(t) => match serde_json::from_str::<ServerMsg>(t.as_str()).unwrap() {
                ServerMsg::Error(e) => (e.code, e.message),
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected frame {other:?}"),
        })
        .collect()
}

/// Runs the hello phase over `frames` (after which the client's stream
/// ends) and returns its result and the answers.
async fn run(
    frames: Vec<Message>,
    upgrade: Option<Principal>,
    shutdown: &CancellationToken,
) -> (Result<String, End>, Answers) {
    let (client_tx, mut client_rx) = mpsc::unbounded::<Result<Message, std::io::Error>>();
    let (server_tx, server_rx) = mpsc::unbounded::<Message>();
    for f in frames {
        client_tx.unbounded_send(Ok(f)).unwrap();
    }
    drop(client_tx);
    let auth = auth();
    let edge = edge();
    let hard_stop = CancellationToken::new();
    let ctx = Context {
        auth: &auth,
        edge: &edge,
        shutdown,
        hard_stop: &hard_stop,
    };
    let sink = Mutex::new(server_tx);
    let result = await_hello(&sink, &mut client_rx, &ctx, upgrade.as_ref())
        .await
        .map(|h| format!("{} {}", h.principal.subject, h.site));
    drop(sink);
    (result, decode(server_rx.collect().await))
}

#[track_caller]
fn assert_answers(got: &Answers, expected: &[(ErrorCode, &str)]) {
    assert_eq!(
        got.len(),
        expected.len(),
        "answers {got:#?}, expected {expected:#?}"
    );
    for ((code, message), (want_code, want)) in got.iter().zip(expected) {
        assert_eq!(code, want_code, "{message}");
        assert!(
            message.contains(want),
            "{message:?} should contain {want:?}"
        );
    }
}

#[tokio::test]
async fn a_hello_with_a_token_opens() {
    let (result, answers) = run(
        vec![hello(Some(&token("u1", 60)))],
        None,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(result.unwrap(), format!("u1 {SITE}"));
    assert_answers(&answers, &[]);
}

#[tokio::test]
async fn the_upgrade_token_serves_when_hello_has_none() {
    let upgrade = auth().verify(&token("from-header", 60)).unwrap();
    let (result, _) = run(
        vec![hello(None)],
        Some(upgrade.clone()),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(result.unwrap(), format!("from-header {SITE}"));
    // A token in hello is the session's identity.
    let (result, _) = run(
        vec![hello(Some(&token("from-hello", 60)))],
        Some(upgrade),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(result.unwrap(), format!("from-hello {SITE}"));
}

#[tokio::test]
async fn everything_before_hello_is_answered_and_the_socket_stays() {
    let (result, answers) = run(
        vec![
            text(r#"{"type":"subscribe","id":"s1","query":"SELECT * FROM todos"}"#),
            text(r#"{"type":"ping"}"#),
            text("not json"),
            text("[1,2]"),
            text(r#"{"id":"x"}"#),
            text(r#"{"type":7}"#),
            text(r#"{"type":"launch","id":"r1"}"#),
            text(r#"{"type":"subscribe","id":"s2"}"#),
            text(r#"{"type":"hello","protocol":1,"site_id":"zz"}"#),
            text(r#"{"type":"hello","protocol":1,"site_id":"0123456789abcdef0123456789abcdef","extra":1}"#),
            Message::Binary(vec![1, 2, 3].into()),
            Message::Ping(vec![].into()),
            text(&format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(2000))),
            hello(Some(&token("u1", 60))),
        ],
        None,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(result.unwrap(), format!("u1 {SITE}"));
    assert_answers(
        &answers,
        &[
            (ErrorCode::HelloRequired, "must be `hello`"),
            (ErrorCode::HelloRequired, "must be `hello`"),
            (ErrorCode::BadMessage, "not JSON"),
            (ErrorCode::BadMessage, "got an array"),
            (ErrorCode::BadMessage, "missing field `type`"),
            (ErrorCode::BadMessage, "`type` must be a string"),
            (ErrorCode::UnknownType, "unknown message type `launch`"),
            (ErrorCode::BadMessage, "missing field `query`"),
            (ErrorCode::BadMessage, "a site id is 32 hex digits"),
            (ErrorCode::BadMessage, "unknown field `extra`"),
            (ErrorCode::BadMessage, "binary frames"),
            (ErrorCode::TooLarge, "over the limit of 1024 bytes"),
        ],
    );
}

#[tokio::test]
async fn hellos_that_close_the_session() {
    let cases: Vec<(Message, ErrorCode, &str)> = vec![
        (
            text(&format!(
                r#"{{"type":"hello","protocol":2,"site_id":"{SITE}"}}"#
            )),
            ErrorCode::UnsupportedProtocol,
            "speaks protocol 1",
        ),
        (hello(None), ErrorCode::Unauthorized, "no token"),
        (
            hello(Some(&token("u1", -5))),
            ErrorCode::TokenExpired,
            "expired",
        ),
        (
            hello(Some("forged.token.here")),
            ErrorCode::Unauthorized,
            "malformed",
        ),
    ];
    for (frame, code, message) in cases {
        let (result, answers) = run(vec![frame], None, &CancellationToken::new()).await;
        match result {
            Err(End::Error(c, m)) => {
                assert_eq!(c, code, "{m}");
                assert!(m.contains(message), "{m:?} should contain {message:?}");
            }
            other => panic!("expected {code}, got {other:?}"),
        }
        assert_answers(&answers, &[]);
    }
}

#[tokio::test]
async fn an_expired_upgrade_token_is_refused_at_hello() {
    let mut upgrade = auth().verify(&token("u1", 60)).unwrap();
    upgrade.expires_at = Some(std::time::SystemTime::now() - Duration::from_secs(1));
    let (result, _) = run(vec![hello(None)], Some(upgrade), &CancellationToken::new()).await;
    assert!(
        matches!(result, Err(End::Error(ErrorCode::TokenExpired, _))),
        "{result:?}"
    );
}

#[tokio::test]
async fn the_peer_going_away_ends_the_phase() {
    let (result, _) = run(vec![], None, &CancellationToken::new()).await;
    assert_eq!(result.unwrap_err(), End::Gone);
    let (result, _) = run(
        vec![Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "bye".into(),
        }))],
        None,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(result.unwrap_err(), End::Gone);
}

#[tokio::test(start_paused = true)]
async fn no_hello_in_time_closes() {
    let (client_tx, mut client_rx) = mpsc::unbounded::<Result<Message, std::io::Error>>();
    let (server_tx, _server_rx) = mpsc::unbounded::<Message>();
    let auth = auth();
    let edge = edge();
    let (shutdown, hard_stop) = (CancellationToken::new(), CancellationToken::new());
    let ctx = Context {
        auth: &auth,
        edge: &edge,
        shutdown: &shutdown,
        hard_stop: &hard_stop,
    };
    let sink = Mutex::new(server_tx);
    let result = await_hello(&sink, &mut client_rx, &ctx, None).await;
    match result {
        Err(End::Error(ErrorCode::HelloRequired, m)) => {
            assert!(m.contains("no hello within 10 s"), "{m}")
        }
        Err(other) => panic!("unexpected {other:?}"),
        Ok(_) => panic!("unexpected hello"),
    }
    drop(client_tx);
}

#[tokio::test]
async fn a_shutdown_closes_sockets_before_hello() {
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let (result, _) = run(vec![], None, &shutdown).await;
    assert!(
        matches!(result, Err(End::Error(ErrorCode::ShuttingDown, _))),
        "{result:?}"
    );
}

#[tokio::test]
async fn finishing_sends_the_error_then_the_close_frame() {
    let check = |end: End, expected: Vec<Json>, close: Option<(u16, &'static str)>| async move {
        let (tx, rx) = mpsc::unbounded::<Message>();
        let sink = Mutex::new(tx);
        finish(&sink, &end, Duration::from_secs(1)).await;
        drop(sink);
        let frames: Vec<Message> = rx.collect().await;
        let mut texts = Vec::new();
        let mut closes = Vec::new();
        for f in frames {
            match f {
                Message::Text(t) => texts.push(serde_json::from_str::<Json>(t.as_str()).unwrap()),
                Message::Close(Some(c)) => closes.push((c.code, c.reason.as_str().to_owned())),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(texts, expected);
        assert_eq!(
            closes,
            close
                .map(|(c, r)| vec![(c, r.to_owned())])
                .unwrap_or_default()
        );
    };
    check(
        End::Error(ErrorCode::TokenExpired, "expired".into()),
        vec![json!({"type": "error", "code": "token_expired", "message": "expired"})],
        Some((1008, "token_expired")),
    )
    .await;
    check(
        End::Error(ErrorCode::ShuttingDown, "bye".into()),
        vec![json!({"type": "error", "code": "shutting_down", "message": "bye"})],
        Some((1001, "shutting_down")),
    )
    .await;
    check(
        End::Error(ErrorCode::TooLarge, "big".into()),
        vec![json!({"type": "error", "code": "too_large", "message": "big"})],
        Some((1009, "too_large")),
    )
    .await;
    check(
        End::Close(1001, "idle timeout"),
        vec![],
        Some((1001, "idle timeout")),
    )
    .await;
    check(End::Gone, vec![], None).await;
}

#[test]
fn every_client_type_is_known() {
    // Each tag of ClientMsg with no fields is a bad message (a missing
    // field), never an unknown type: CLIENT_TYPES matches the enum.
    for t in super::CLIENT_TYPES {
        if let Err(e) = parse_client_msg(&json!({"type": t}).to_string()) {
            assert_eq!(e.code, ErrorCode::BadMessage, "{t}: {}", e.message);
        }
    }
    let e = parse_client_msg(r#"{"type":"welcome"}"#).unwrap_err();
    assert_eq!(e.code, ErrorCode::UnknownType);
    assert!(
        e.message
            .contains("hello, subscribe, unsubscribe, resync, ack, push, ping")
    );
}

#[test]
fn parse_errors_carry_the_request_id() {
    let e = parse_client_msg(r#"{"type":"push","id":"p9","from":0}"#).unwrap_err();
    assert_eq!(
        (e.code, e.reference.as_deref()),
        (ErrorCode::BadMessage, Some("p9"))
    );
    assert!(e.message.contains("missing field `to`"), "{}", e.message);
    let e = parse_client_msg(r#"{"type":"resync","sub":"s3","cursor":"x"}"#).unwrap_err();
    assert_eq!(e.reference.as_deref(), Some("s3"));
    assert!(e.message.contains("invalid type"), "{}", e.message);
}

#[test]
fn transport_read_errors() {
    assert!(matches!(
        read_error_end(&"Space limit exceeded: Message too long: 5000 > 2048", 1024),
        End::Error(ErrorCode::TooLarge, m) if m.contains("over 2048 bytes")
    ));
    assert_eq!(
        read_error_end(&"Connection reset without closing handshake", 1024),
        End::Gone
    );
}
