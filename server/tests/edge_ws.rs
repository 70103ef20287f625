//! The WebSocket endpoint over real sockets (docs/PROTOCOL.md §3, §4, §9):
//! authentication at the upgrade and at hello, hello first, malformed,
//! unknown and oversized frames answered without ending the session, the
//! errors that do close it (with a close frame), token expiry, idle
//! timeout, shutdown; other clients keep their service throughout.

mod edge_common;

use std::time::Duration;

use edge_common::server::{Got, SECRET, TestServer, Ws, edge, hello, site, user_token};
use edge_common::tokens;
use serde_json::json;
use tokio_tungstenite::tungstenite;

#[tokio::test]
async fn a_session_with_the_header_token() {
    let s = TestServer::start().await;
    let mut ws = s.ws(Some(&user_token("u1", "acme"))).await;
    let welcome = ws.open(site(1), None).await;
    assert_eq!(welcome["protocol"], 1);
    assert_eq!(welcome["peer"]["site_id"], site(1).to_string());
    assert_eq!(welcome["limits"]["max_message_bytes"], 4096);
    ws.ping("p1").await;
    s.stop().await;
}

#[tokio::test]
async fn a_session_with_the_hello_token() {
    let s = TestServer::start().await;
    let mut ws = s.ws(None).await;
    ws.open(site(2), Some(&user_token("u2", "acme"))).await;
    ws.ping("p").await;
    s.stop().await;
}

#[tokio::test]
async fn hello_comes_first() {
    let s = TestServer::start().await;
    let mut ws = s.ws(Some(&user_token("u1", "acme"))).await;
    ws.send(json!({"type": "subscribe", "id": "s", "query": "SELECT * FROM todos"}))
        .await;
    ws.expect_error("hello_required", "must be `hello`").await;
    ws.send(json!({"type": "ping"})).await;
    ws.expect_error("hello_required", "").await;
    ws.send_text("{").await;
    ws.expect_error("bad_message", "not JSON").await;
    ws.open(site(1), None).await;
    ws.ping("after").await;
    s.stop().await;
}

#[tokio::test]
async fn malformed_frames_are_answered_and_the_session_goes_on() {
    let s = TestServer::start().await;
    let mut ws = s.ws(Some(&user_token("u1", "acme"))).await;
    ws.open(site(1), None).await;

    ws.send_text("not json").await;
    ws.expect_error("bad_message", "not JSON").await;
    ws.send_text("42").await;
    ws.expect_error("bad_message", "got a number").await;
    ws.send(json!({"type": "launch", "id": "x1"})).await;
    let e = ws
        .expect_error("unknown_type", "unknown message type `launch`")
        .await;
    assert_eq!(e["ref"], "x1");
    ws.send(json!({"type": "subscribe", "id": 1, "query": "SELECT * FROM todos"}))
        .await;
    ws.expect_error("bad_message", "invalid type: integer `1`")
        .await;
    ws.send(json!({"type": "subscribe", "id": "s"})).await;
    let e = ws
        .expect_error("bad_message", "missing field `query`")
        .await;
    assert_eq!(e["ref"], "s");
    ws.send(json!({"type": "ack", "cursors": {"s": "one"}}))
        .await;
    ws.expect_error("bad_message", "invalid type").await;
    ws.send(json!({"type": "ping", "id": "p", "extra": true}))
        .await;
    ws.expect_error("bad_message", "unknown field `extra`")
        .await;
    ws.send_binary(vec![0, 1, 2]).await;
    ws.expect_error("bad_message", "binary frames").await;
    ws.send(hello(site(1), None)).await;
    ws.expect_error("bad_message", "hello").await;
    // Over the limit (4096) but under the transport cap (8192).
    ws.send(json!({"type": "ping", "id": "x".repeat(6000)}))
        .await;
    ws.expect_error("too_large", "over the limit of 4096 bytes")
        .await;
    // A refused query is an error too, and the session still serves.
    ws.send(json!({"type": "subscribe", "id": "bad", "query": "DELETE FROM todos"}))
        .await;
    let e = ws.expect_error("query_refused", "").await;
    assert_eq!(e["ref"], "bad");

    ws.ping("still here").await;
    ws.send(json!({"type": "subscribe", "id": "all", "query": "SELECT * FROM todos"}))
        .await;
    let sub = ws.expect("subscribed").await;
    assert_eq!(sub["id"], "all");
    let snap = ws.expect("snapshot").await;
    assert_eq!(snap["last"], true);
    s.stop().await;
}

#[tokio::test]
async fn a_frame_over_the_transport_cap_ends_only_that_session() {
    let s = TestServer::start().await;
    let mut other = s.ws(Some(&user_token("u2", "acme"))).await;
    other.open(site(2), None).await;

    let mut ws = s.ws(Some(&user_token("u1", "acme"))).await;
    ws.open(site(1), None).await;
    ws.send(json!({"type": "ping", "id": "x".repeat(20_000)}))
        .await;
    ws.expect_closed_with("too_large", 1009).await;

    // Before hello too.
    let mut ws = s.ws(None).await;
    ws.send_text("x".repeat(20_000)).await;
    ws.expect_closed_with("too_large", 1009).await;

    other.ping("fine").await;
    s.ws(None)
        .await
        .open(site(3), Some(&user_token("u3", "acme")))
        .await;
    s.stop().await;
}

#[tokio::test]
async fn errors_that_close_the_session() {
    let s = TestServer::start().await;
    // No token anywhere.
    let mut ws = s.ws(None).await;
    ws.send(hello(site(1), None)).await;
    ws.expect_closed_with("unauthorized", 1008).await;
    // A bad token in hello.
    let forged = tokens::hs256(
        "wrong secret, wrong secret!!",
        &tokens::claims("u1", "acme", 60),
    );
    let mut ws = s.ws(None).await;
    ws.send(hello(site(1), Some(&forged))).await;
    ws.expect_closed_with("unauthorized", 1008).await;
    let expired = tokens::hs256(SECRET, &tokens::claims("u1", "acme", -60));
    let mut ws = s.ws(None).await;
    ws.send(hello(site(1), Some(&expired))).await;
    ws.expect_closed_with("token_expired", 1008).await;
    let mut early = tokens::claims("u1", "acme", 600);
    early.insert("nbf".into(), json!(tokens::now() + 300));
    let mut ws = s.ws(None).await;
    ws.send(hello(site(1), Some(&tokens::hs256(SECRET, &early))))
        .await;
    ws.expect_closed_with("token_not_yet_valid", 1008).await;
    // Another protocol version.
    let mut ws = s.ws(Some(&user_token("u1", "acme"))).await;
    ws.send(json!({"type": "hello", "protocol": 2, "site_id": site(1).to_string()}))
        .await;
    ws.expect_closed_with("unsupported_protocol", 1002).await;
    // A site id bound to another subject.
    let mut first = s.ws(Some(&user_token("owner", "acme"))).await;
    first.open(site(9), None).await;
    let mut thief = s.ws(Some(&user_token("thief", "acme"))).await;
    thief.send(hello(site(9), None)).await;
    thief
        .expect_closed_with("site_bound_to_other_subject", 1008)
        .await;
    first.ping("unaffected").await;
    s.stop().await;
}

#[tokio::test]
async fn bad_tokens_at_the_upgrade_are_refused_with_401() {
    let s = TestServer::start().await;
    let expired = tokens::hs256(SECRET, &tokens::claims("u1", "acme", -60));
    let forged = tokens::with_claims(&user_token("u1", "acme"), &tokens::service_claims(600));
    let unsigned = tokens::unsigned(
        json!({"alg": "none", "typ": "JWT"}),
        &tokens::claims("u1", "acme", 60),
    );
    for (token, code) in [
        (expired.as_str(), "token_expired"),
        (forged.as_str(), "unauthorized"),
        (unsigned.as_str(), "unauthorized"),
        ("garbage", "unauthorized"),
    ] {
        match Ws::connect(s.addr, Some(token)).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401);
                let body: serde_json::Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
                assert_eq!(body["code"], code, "{body}");
            }
            Err(e) => panic!("expected a 401, got {e}"),
            Ok(_) => panic!("the upgrade with {code} should be refused"),
        }
    }
    s.ws(None)
        .await
        .open(site(1), Some(&user_token("u1", "acme")))
        .await;
    s.stop().await;
}

#[tokio::test]
async fn a_session_ends_when_its_token_expires() {
    let s = TestServer::start().await;
    let short = tokens::hs256(SECRET, &tokens::claims("u1", "acme", 2));
    let mut ws = s.ws(Some(&short)).await;
    ws.open(site(1), None).await;
    ws.ping("alive").await;
    let started = std::time::Instant::now();
    let e = ws
        .expect_error("token_expired", "reconnect with a fresh token")
        .await;
    assert_eq!(e["type"], "error");
    match ws.next().await {
        Got::Close(Some((1008, reason))) => assert_eq!(reason, "token_expired"),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(started.elapsed() <= Duration::from_secs(4));
    s.stop().await;
}

#[tokio::test]
async fn idle_sessions_are_closed_and_live_ones_kept() {
    let mut settings = edge();
    settings.idle_timeout = Duration::from_secs(2);
    settings.ping_interval = Duration::from_millis(500);
    let s = TestServer::start_with(settings, |_| {}).await;

    // This client keeps reading: it answers the server's pings, so it stays.
    let mut live = s.ws(Some(&user_token("u1", "acme"))).await;
    live.open(site(1), None).await;
    // This one reads nothing, so it sends no pongs.
    let mut idle = s.ws(Some(&user_token("u2", "acme"))).await;
    idle.open(site(2), None).await;

    let reader = async {
        use futures_util::StreamExt;
        let until = tokio::time::Instant::now() + Duration::from_secs(4);
        let mut pings = 0;
        while let Ok(Some(frame)) = tokio::time::timeout_at(until, live.socket.next()).await {
            match frame.unwrap() {
                tungstenite::Message::Ping(_) => pings += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        pings
    };
    let pings = reader.await;
    assert!(pings >= 3, "{pings} pings in 4 s");
    live.ping("alive after 4 s").await;

    // The server dropped the silent session (and only that one).
    let connected = |site: tenantsync_core::SiteId| {
        let url = s.url(&format!("/v1/admin/peers/{site}"));
        async move {
            let r: serde_json::Value = reqwest::Client::new()
                .get(url)
                .bearer_auth(edge_common::server::service_token())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["connected"].as_bool().unwrap()
        }
    };
    assert!(connected(site(1)).await);
    assert!(!connected(site(2)).await);
    // What the silent client reads: the pings, then the close frame (or,
    // when its own automatic pong replies hit the closed socket first, the
    // end of the connection); never another message.
    match idle.next().await {
        Got::Close(Some((code, reason))) => {
            assert_eq!((code, reason.as_str()), (1001, "idle timeout"))
        }
        Got::Ended => {}
        other => panic!("expected the idle close, got {other:?}"),
    }
    s.stop().await;
}

#[tokio::test]
async fn a_shutdown_closes_every_socket_with_shutting_down() {
    let s = TestServer::start().await;
    let mut open = s.ws(Some(&user_token("u1", "acme"))).await;
    open.open(site(1), None).await;
    open.send(json!({"type": "subscribe", "id": "all", "query": "SELECT * FROM todos"}))
        .await;
    open.expect("subscribed").await;
    open.expect("snapshot").await;
    let mut waiting = s.ws(None).await;
    let addr = s.addr;
    let (task, _dir) = s.begin_stop();
    waiting.expect_closed_with("shutting_down", 1001).await;
    open.expect_closed_with("shutting_down", 1001).await;
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("stops")
        .unwrap();
    assert!(Ws::connect(addr, None).await.is_err());
}

#[tokio::test]
async fn other_clients_keep_their_service() {
    let s = TestServer::start().await;
    let mut good = s.ws(Some(&user_token("u1", "acme"))).await;
    good.open(site(1), None).await;
    good.send(json!({"type": "subscribe", "id": "mine", "query": "SELECT * FROM todos"}))
        .await;
    good.expect("subscribed").await;
    let snap = good.expect("snapshot").await;
    let from = snap["version"].as_i64().unwrap();

    // Misbehaving clients, each on its own socket.
    for _ in 0..3 {
        let mut bad = s.ws(Some(&user_token("u2", "acme"))).await;
        bad.send_text("garbage").await;
        bad.expect_error("bad_message", "").await;
        bad.open(site(2), None).await;
        for junk in ["{", "[]", r#"{"type":"nope"}"#, r#"{"type":"push"}"#] {
            bad.send_text(junk).await;
            assert_eq!(bad.msg().await["type"], "error");
        }
        bad.send(json!({"type": "ping", "id": "y".repeat(50_000)}))
            .await;
        bad.expect_closed_with("too_large", 1009).await;
    }
    // Clients that vanish without a close handshake.
    for n in 0..3 {
        let mut gone = s.ws(Some(&user_token("u3", "acme"))).await;
        gone.open(site(10 + n), None).await;
        drop(gone);
    }

    // The good client still gets its live changes.
    s.sql(
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'u1', 'still served')",
    )
    .await;
    let changes = loop {
        let m = good.msg().await;
        if m["type"] == "changes" && m["subs"]["mine"]["changes"].is_array() {
            break m;
        }
    };
    let part = &changes["subs"]["mine"];
    assert!(part["from"].as_i64().unwrap() >= from);
    assert!(
        part["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c[3] == "still served"),
        "{changes}"
    );
    good.ping("done").await;
    s.stop().await;
}
