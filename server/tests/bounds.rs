//! Resource isolation (issue 12): every kind of per-connection, per-peer
//! and per-tenant state is bounded and expires, and one tenant's work
//! cannot hold up another's. Each test shows a bound from the outside
//! (over real sockets) and that a victim keeps its service meanwhile.

mod edge_common;

use std::time::{Duration, Instant};

use edge_common::server::{Got, TestServer, edge, site, user_token};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// A peer that sends pings (or anything answered) without ever reading:
/// the server stops reading it once its answers fill the outbox bound, so
/// the peer's sends stall instead of the server's memory growing; the
/// write timeout then ends that session, and another tenant's pings are
/// answered promptly throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_peer_never_reads_do_not_pile_up() {
    let mut settings = edge();
    settings.idle_timeout = Duration::from_secs(3);
    let s = TestServer::start_with(settings, |c| c.limits.outbox_bytes = 64 * 1024).await;
    let mut flood = s.ws(Some(&user_token("mallory", "evil"))).await;
    flood.open(site(1), None).await;
    let mut victim = s.ws(Some(&user_token("alice", "acme"))).await;
    victim.open(site(2), None).await;
    // The victim pings throughout and keeps its slowest answer.
    let stop = tokio_util::sync::CancellationToken::new();
    let victim = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut slowest = Duration::ZERO;
            let mut n = 0;
            while !stop.is_cancelled() {
                let started = Instant::now();
                victim.ping(&format!("v{n}")).await;
                slowest = slowest.max(started.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (victim, slowest, n)
        }
    });

    // 1 KiB pings: 64 MiB of answers if the server kept reading.
    let id = "x".repeat(1000);
    let ping = json!({"type": "ping", "id": id}).to_string();
    let mut sent = 0usize;
    let stalled = loop {
        let send = flood.socket.send(Message::Text(ping.clone().into()));
        match tokio::time::timeout(Duration::from_secs(1), send).await {
            Err(_) => break true,
            Ok(Err(_)) => break true,
            Ok(Ok(())) => sent += 1,
        }
        if sent == 64 * 1024 {
            break false;
        }
    };
    assert!(
        stalled,
        "the server read all {sent} pings without their answers being read"
    );
    // The kernel's buffers hold some; the server a bounded outbox more.
    assert!(
        sent < 32 * 1024,
        "{sent} pings read before the server stopped"
    );

    // The flooder's session ends once its socket would not take a write
    // for the idle timeout; what it reads is its answers, then the end.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Got::Msg(m) = flood.next().await {
            assert_eq!(m["type"], "pong");
        }
    })
    .await;
    assert!(ended.is_ok(), "the flooding session ended");
    stop.cancel();
    let (mut victim, slowest, n) = victim.await.unwrap();
    assert!(n > 10, "{n} victim pings");
    assert!(
        slowest < Duration::from_secs(2),
        "the victim waited {slowest:?}"
    );
    victim.ping("after").await;
    s.stop().await;
}

/// Pushes a tenant's byte budget allows, one after the other, as fast as
/// it can: large pushes are refused with `rate_limited` and the wait once
/// the burst is spent, small pushes are counted against the push rate;
/// another tenant's push goes through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_budgeted_in_bytes_per_tenant() {
    let mut settings = edge();
    settings.max_message_bytes = 64 * 1024;
    let s =
        TestServer::start_with(settings, |c| c.limits.push_bytes_per_tenant = 64.0 * 1024.0).await;
    let http = reqwest::Client::new();
    let push = |token: String, site: tenantsync_core::SiteId, from: i64, sql: String| {
        let http = http.clone();
        let url = s.url("/v1/push");
        async move {
            let (to, changes) = edge_common::server::local_changes(site, &sql);
            let body = tenantsync_protocol::http::PushRequest {
                site_id: site,
                from,
                to,
                changes,
            };
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    // One row with an 8 KiB title: about 8 KiB of changes per push.
    let big = |id: usize| {
        format!(
            "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({id}, 'evil', 'mallory', '{}')",
            "x".repeat(8 * 1024)
        )
    };
    let mallory = user_token("mallory", "evil");
    let mut accepted = 0;
    let refusal = loop {
        let (status, body) = push(mallory.clone(), site(1), 0, big(accepted + 1)).await;
        if status != 200 {
            break (status, body);
        }
        accepted += 1;
        assert!(
            accepted < 100,
            "no byte budget: {accepted} pushes of 8 KiB taken at once"
        );
    };
    // The burst is twice the message limit: 128 KiB, so about 15 pushes.
    assert!(
        (10..=17).contains(&accepted),
        "{accepted} pushes of 8 KiB before {refusal:?}"
    );
    assert_eq!(refusal.0, 429, "{refusal:?}");
    assert_eq!(refusal.1["code"], "rate_limited");
    let message = refusal.1["message"].as_str().unwrap();
    assert!(message.contains("bytes of changes per second"), "{message}");
    assert!(refusal.1["retry_after_ms"].as_u64().unwrap() >= 1);
    // Another tenant is not held up by it.
    let (status, body) = push(
        user_token("alice", "acme"),
        site(2),
        0,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1000, 'acme', 'alice', 'mine')"
            .into(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    s.stop().await;
}

/// A tenant binds at most `limits.max_peers_per_tenant` site ids: a new
/// one over it is refused with `limit_exceeded`, while its known peers and
/// other tenants' new ones are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_binds_a_bounded_number_of_peers() {
    let s = TestServer::start_with(edge(), |c| c.limits.max_peers_per_tenant = 3).await;
    for n in 1..=3 {
        let mut ws = s.ws(Some(&user_token(&format!("u{n}"), "evil"))).await;
        ws.open(site(n), None).await;
    }
    let mut fourth = s.ws(Some(&user_token("u4", "evil"))).await;
    fourth.send(edge_common::server::hello(site(4), None)).await;
    fourth
        .expect_error("limit_exceeded", "maximum of 3 peers")
        .await;
    // A known peer comes back; another tenant binds a new one.
    let mut again = s.ws(Some(&user_token("u1", "evil"))).await;
    again.open(site(1), None).await;
    let mut other = s.ws(Some(&user_token("alice", "acme"))).await;
    other.open(site(5), None).await;
    other.ping("served").await;
    s.stop().await;
}

/// What a peer leaves in memory is released once it is idle: HTTP pull
/// state and the peer itself leave memory after the grace period (the
/// database keeps what was acknowledged), and a peer that comes back with
/// its cursor resumes from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pull_state_and_peers_leave_memory() {
    let s = TestServer::start_with(edge(), |c| c.idle_grace = Duration::from_millis(300)).await;
    let http = reqwest::Client::new();
    let pull = |n: u8, cursor: Option<i64>| {
        let http = http.clone();
        let url = s.url("/v1/pull");
        async move {
            let body = tenantsync_protocol::http::PullRequest {
                site_id: site(n),
                subscriptions: vec![tenantsync_protocol::http::PullSub {
                    id: "todos".into(),
                    query: "SELECT * FROM todos".into(),
                    cursor,
                }],
                wait_ms: 0,
                unsubscribe: vec![],
            };
            let r = http
                .post(url)
                .bearer_auth(user_token(&format!("u{n}"), "acme"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let status = || async {
        let r: serde_json::Value = http
            .get(s.url("/v1/admin/status"))
            .bearer_auth(edge_common::server::service_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let shard = &r["shards"][0];
        (
            shard["pull_states"].as_u64().unwrap(),
            shard["peers_in_memory"].as_u64().unwrap(),
        )
    };
    s.sql("INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'u1', 't')")
        .await;
    let mut cursors = Vec::new();
    for n in 1..=20 {
        let first = pull(n, None).await;
        let v = first["version"].as_i64().unwrap();
        // The second pull acknowledges the first (its cursor).
        let second = pull(n, Some(v)).await;
        assert_eq!(second["subs"]["todos"]["mode"], "resume", "{second}");
        cursors.push(second["version"].as_i64().unwrap());
    }
    // Puller 21's last answer moves past what it acknowledged: a commit of
    // its own row lies between its two pulls.
    let first = pull(21, None).await;
    s.sql("INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'u21', 'new')")
        .await;
    let second = pull(21, Some(first["version"].as_i64().unwrap())).await;
    let delivered = second["version"].as_i64().unwrap();
    assert!(delivered > first["version"].as_i64().unwrap(), "{second}");
    // Published every tick (250 ms).
    let mut held = (0, 0);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = status().await;
        if held == (21, 21) {
            break;
        }
    }
    assert!(
        held.0 >= 1 && held.1 >= 1,
        "in memory while in use: {held:?}"
    );
    let released = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if status().await == (0, 0) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), released)
        .await
        .expect("idle pull states and peers leave memory");
    // Coming back with the acknowledged cursor resumes.
    let back = pull(1, Some(cursors[0])).await;
    assert_eq!(back["subs"]["todos"]["mode"], "resume", "{back}");
    // So does coming back with the cursor of the last answer, never
    // acknowledged: the server kept it when the state left memory.
    let back = pull(21, Some(delivered)).await;
    assert_eq!(back["subs"]["todos"]["mode"], "resume", "{back}");
    s.stop().await;
}

/// A long-poll waits for a commit that concerns its tenant: another
/// tenant's commits on the same tables do not wake it (each wake re-runs
/// its pull on a reader), its own tenant's commit does at once, and so does
/// a row it holds leaving for another tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_wake_only_for_their_tenant() {
    let s = TestServer::start().await;
    s.sql("INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'held')")
        .await;
    let http = reqwest::Client::new();
    let pull = |cursor: Option<i64>, wait_ms: u64| {
        let http = http.clone();
        let url = s.url("/v1/pull");
        async move {
            let body = tenantsync_protocol::http::PullRequest {
                site_id: site(1),
                subscriptions: vec![tenantsync_protocol::http::PullSub {
                    id: "todos".into(),
                    query: "SELECT * FROM todos".into(),
                    cursor,
                }],
                wait_ms,
                unsubscribe: vec![],
            };
            let started = Instant::now();
            let r: serde_json::Value = http
                .post(url)
                .bearer_auth(user_token("alice", "acme"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            (r, started.elapsed())
        }
    };
    let (first, _) = pull(None, 0).await;
    let mut cursor = first["version"].as_i64().unwrap();
    let reads = || async {
        let r: serde_json::Value = http
            .get(s.url("/v1/admin/status"))
            .bearer_auth(edge_common::server::service_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["shards"][0]["pull_reads"].as_u64().unwrap()
    };
    let before = reads().await;

    // Another tenant writes the same table throughout the wait.
    let noisy = async {
        for i in 0..30 {
            s.sql(&format!(
                "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({}, 'evil', 'alice', 'x')",
                100 + i
            ))
            .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ((quiet, waited), ()) = tokio::join!(pull(Some(cursor), 2500), noisy);
    assert!(
        waited >= Duration::from_millis(2400),
        "woken after {waited:?}: {quiet}"
    );
    assert!(quiet["subs"]["todos"].get("changes").is_none(), "{quiet}");
    // Read once when it came, at most once more for commits between that
    // read and its wait, and once at its deadline.
    let read = reads().await - before;
    assert!(read <= 3, "the quiet long-poll was read {read} times");
    cursor = quiet["version"].as_i64().unwrap();

    // Its own tenant's commit wakes it at once.
    let writer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.sql("INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'alice', 'new')")
            .await;
    };
    let ((woken, waited), ()) = tokio::join!(pull(Some(cursor), 10_000), writer);
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(
        woken["subs"]["todos"]["changes"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{woken}"
    );
    cursor = woken["version"].as_i64().unwrap();

    // A held row leaving for another tenant wakes it with the eviction.
    let mover = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.sql("UPDATE todos SET tenant_id = 'evil' WHERE id = 1")
            .await;
    };
    let ((left, waited), ()) = tokio::join!(pull(Some(cursor), 10_000), mover);
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(
        left["subs"]["todos"]["evict"][0]["table"], "todos",
        "{left}"
    );
    s.stop().await;
}

/// A tenant that opens hundreds of subscriptions, each a new view whose
/// query reads thousands of its rows, gets them one per turn within the
/// engine's session budget: another tenant's subscription, sent after the
/// burst, is answered while most of the burst still waits (without the
/// turn it waited for every one of them: the shard's view count was the
/// whole burst when it was answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_subscriptions_waits_its_turn() {
    const BURST: usize = 400;
    let s = TestServer::start_with(edge(), |c| {
        c.limits.max_subscriptions_per_connection = BURST;
    })
    .await;
    s.sql(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
         INSERT INTO todos (id, tenant_id, owner, title, priority) \
         SELECT 100000 + i, 'evil', 'mallory', 'row ' || i, i % 1000 FROM n",
    )
    .await;
    let http = reqwest::Client::new();
    let views = || async {
        let r: serde_json::Value = http
            .get(s.url("/v1/admin/status"))
            .bearer_auth(edge_common::server::service_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["shards"][0]["views"].as_u64().unwrap()
    };

    let mut flood = s.ws(Some(&user_token("mallory", "evil"))).await;
    flood.open(site(1), None).await;
    for i in 0..BURST {
        flood
            .send(json!({"type": "subscribe", "id": format!("s{i}"), "query": format!("SELECT * FROM todos WHERE priority = {i}")}))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut victim = s.ws(Some(&user_token("alice", "acme"))).await;
    victim.open(site(2), None).await;
    victim
        .send(json!({"type": "subscribe", "id": "mine", "query": "SELECT * FROM todos"}))
        .await;
    let subscribed = victim.expect("subscribed").await;
    assert_eq!(subscribed["id"], "mine");
    // The gauges are refreshed every 250 ms: wait for one refresh.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = views().await as usize;
    assert!(
        held < BURST / 2,
        "{held} views existed when the other tenant's subscription was answered"
    );
    // The burst completes all the same.
    let mut answered = 0;
    while answered < BURST {
        let m = flood.msg().await;
        if m["type"] == "subscribed" {
            answered += 1;
        }
    }
    s.stop().await;
}
