//! The backend's write hook (docs/SAAS.md, "Backend write validation"): a
//! real HTTP backend on loopback sees each pushed row of its tables as it
//! would be after the merge, with the identity and tenant, and accepts or
//! refuses each; refused rows refuse the push whole with the backend's
//! reason; a backend that times out or is down gets the configured answer;
//! tables it does not judge never reach it.

mod edge_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json as AxJson;
use axum::extract::State;
use edge_common::server::{TestServer, edge, local_changes, site, user_token};
use serde_json::{Value as Json, json};
use tenantsync_protocol::http::PushRequest;
use tenantsync_server::WriteHook;

/// The backend: refuses rows whose `title` contains "forbidden", sleeps
/// `delay` first; records what it was asked.
#[derive(Default)]
struct Backend {
    asked: Mutex<Vec<Json>>,
    calls: AtomicUsize,
    delay: Mutex<Duration>,
    /// Service SQL it runs on its first call (a concurrent write), with
    /// the server's URL.
    first_call_writes: Mutex<Option<(String, String)>>,
}

async fn validate(State(b): State<Arc<Backend>>, AxJson(body): AxJson<Json>) -> AxJson<Json> {
    b.calls.fetch_add(1, Ordering::SeqCst);
    let write = b.first_call_writes.lock().unwrap().take();
    if let Some((url, sql)) = write {
        let r = reqwest::Client::new()
            .post(url)
            .bearer_auth(edge_common::server::service_token())
            .json(&json!({"statements": [{"sql": sql, "params": []}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let delay = *b.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    let verdicts: Vec<Json> = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            if r["after"]["title"]
                .as_str()
                .is_some_and(|t| t.contains("forbidden"))
            {
                json!({"accept": false, "reason": "titles may not say forbidden"})
            } else {
                json!({"accept": true})
            }
        })
        .collect();
    b.asked.lock().unwrap().push(body);
    AxJson(json!({ "rows": verdicts }))
}

async fn backend() -> (Arc<Backend>, String) {
    let b = Arc::new(Backend::default());
    let app = axum::Router::new()
        .route("/validate", axum::routing::post(validate))
        .with_state(b.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/validate", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (b, url)
}

fn hook(url: &str) -> WriteHook {
    WriteHook {
        url: url.into(),
        tables: vec!["todos".into()],
        timeout: Duration::from_secs(5),
        retries: 0,
        accept_on_failure: false,
    }
}

async fn server(h: WriteHook) -> TestServer {
    TestServer::start_with(edge(), move |c| c.write_hook = Some(h)).await
}

/// Pushes `sql`'s changes as `alice` of `acme` from site `n`: the status
/// and the body.
async fn push(s: &TestServer, n: u8, sql: &str) -> (u16, Json) {
    let (to, changes) = local_changes(site(n), sql);
    let r = reqwest::Client::new()
        .post(s.url("/v1/push"))
        .bearer_auth(user_token("alice", "acme"))
        .json(&PushRequest {
            site_id: site(n),
            from: 0,
            to,
            changes,
        })
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn titles(s: &TestServer) -> Json {
    s.sql("SELECT id, title FROM todos ORDER BY id").await["results"][0]["rows"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sees_rows_after_the_merge_and_accepts_them() {
    let (b, url) = backend().await;
    let s = server(hook(&url)).await;
    let (code, body) = push(
        &s,
        1,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'buy milk');
         INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'alice', 'walk');",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(titles(&s).await, json!([[1, "buy milk"], [2, "walk"]]));
    let asked = b.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1);
    let a = &asked[0];
    assert_eq!(
        (&a["tenant"], &a["subject"], &a["role"]),
        (&json!("acme"), &json!("alice"), &json!("authenticated"))
    );
    assert_eq!(a["site_id"], json!(site(1).to_string()));
    assert_eq!(a["rows"].as_array().unwrap().len(), 2);
    assert_eq!(a["rows"][0]["table"], "todos");
    assert_eq!(a["rows"][0]["before"], Json::Null);
    assert_eq!(a["rows"][0]["after"]["title"], "buy milk");
    assert_eq!(
        a["rows"][0]["after"]["done"], 0,
        "the default the merge gave"
    );

    // An update: before and after.
    let (code, body) = push(
        &s,
        2,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'buy oat milk');",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let asked = b.asked.lock().unwrap().clone();
    let row = &asked[1]["rows"][0];
    assert_eq!(row["before"]["title"], "buy milk");
    assert_eq!(row["after"]["title"], "buy oat milk");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_row_refuses_the_push_whole_with_the_backends_reason() {
    let (_b, url) = backend().await;
    let s = server(hook(&url)).await;
    let (code, body) = push(
        &s,
        1,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'fine');
         INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'alice', 'a forbidden title');",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["code"], "policy_refused");
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    assert_eq!(rows[0]["command"], "INSERT");
    assert!(
        rows[0]["reason"]
            .as_str()
            .unwrap()
            .contains("titles may not say forbidden"),
        "{body}"
    );
    // Nothing of it was applied; both rows are described (invisible: the
    // server has neither).
    assert_eq!(titles(&s).await, json!([]));
    assert_eq!(body["invisible"].as_array().unwrap().len(), 2, "{body}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_is_refused_after_its_timeout_and_other_tenants_write_meanwhile() {
    let (b, url) = backend().await;
    *b.delay.lock().unwrap() = Duration::from_secs(3);
    let s = server(WriteHook {
        timeout: Duration::from_millis(1000),
        retries: 1,
        ..hook(&url)
    })
    .await;
    let slow = {
        let url = s.url("/v1/push");
        let (to, changes) = local_changes(
            site(1),
            "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'slow');",
        );
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(user_token("alice", "acme"))
                .json(&PushRequest {
                    site_id: site(1),
                    from: 0,
                    to,
                    changes,
                })
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Json>().await.unwrap())
        })
    };
    // Meanwhile another tenant's write to an unjudged table commits: the
    // engine does not wait for the backend.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (to, changes) = local_changes(
        site(9),
        "INSERT INTO lists (id, tenant_id, owner, name) VALUES (7, 'globex', 'bob', 'groceries');",
    );
    let r = reqwest::Client::new()
        .post(s.url("/v1/push"))
        .bearer_auth(user_token("bob", "globex"))
        .json(&PushRequest {
            site_id: site(9),
            from: 0,
            to,
            changes,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !slow.is_finished(),
        "the slow push was answered before the other"
    );
    let (code, body) = slow.await.unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(
        body["rows"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("the backend did not answer: no answer in 1000 ms"),
        "{body}"
    );
    assert_eq!(b.calls.load(Ordering::SeqCst), 2, "one call and one retry");
    assert_eq!(titles(&s).await, json!([]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_gets_the_configured_answer() {
    // A port nothing listens on.
    let url = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/validate", l.local_addr().unwrap())
    };
    let s = server(WriteHook {
        accept_on_failure: true,
        ..hook(&url)
    })
    .await;
    let (code, body) = push(
        &s,
        1,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'while it is down');",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(titles(&s).await, json!([[1, "while it is down"]]));
    s.stop().await;

    let s = server(hook(&url)).await;
    let (code, body) = push(
        &s,
        1,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'refused');",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["rows"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("the backend did not answer"),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_it_does_not_judge_and_websocket_pushes() {
    let (b, url) = backend().await;
    let s = server(hook(&url)).await;
    let (code, body) = push(
        &s,
        1,
        "INSERT INTO lists (id, tenant_id, owner, name) VALUES (1, 'acme', 'alice', 'a forbidden list');",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(b.calls.load(Ordering::SeqCst), 0, "lists are not judged");

    // Over the WebSocket the refusal is a push_refused with the reason.
    let mut ws = s.ws(Some(&user_token("alice", "acme"))).await;
    ws.open(site(2), None).await;
    let (to, changes) = local_changes(
        site(2),
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (5, 'acme', 'alice', 'forbidden');",
    );
    let body = serde_json::to_value(PushRequest {
        site_id: site(2),
        from: 0,
        to,
        changes,
    })
    .unwrap();
    ws.send(json!({"type": "push", "id": "p1", "from": 0, "to": to, "changes": body["changes"]}))
        .await;
    let m = ws.expect("push_refused").await;
    assert_eq!(m["id"], "p1");
    assert!(
        m["rows"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("titles may not say forbidden"),
        "{m}"
    );
    // And an accepted one is push_ok.
    let (to, changes) = local_changes(
        site(2),
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (6, 'acme', 'alice', 'fine');",
    );
    let body = serde_json::to_value(PushRequest {
        site_id: site(2),
        from: 0,
        to,
        changes,
    })
    .unwrap();
    ws.send(json!({"type": "push", "id": "p2", "from": 0, "to": to, "changes": body["changes"]}))
        .await;
    let m = ws.expect("push_ok").await;
    assert_eq!(m["id"], "p2");
    assert_eq!(titles(&s).await, json!([[6, "fine"]]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_changed_while_the_backend_judged_it_is_judged_again() {
    let (b, url) = backend().await;
    let s = server(hook(&url)).await;
    s.sql("INSERT INTO todos (id, tenant_id, owner, title, priority) VALUES (1, 'acme', 'alice', 'old', 1)")
        .await;
    // While the backend judges the push, the backend itself changes
    // another column of the row: what the push would make is no longer
    // what it saw, so it is asked again about the row as it now would be.
    *b.first_call_writes.lock().unwrap() = Some((
        s.url("/v1/sql"),
        "UPDATE todos SET priority = 5 WHERE id = 1".into(),
    ));
    let (code, body) = push(
        &s,
        1,
        "INSERT INTO todos (id, tenant_id, owner, title, priority) VALUES (1, 'acme', 'alice', 'draft', 1);
         UPDATE todos SET title = 'newer' WHERE id = 1;
         UPDATE todos SET title = 'new' WHERE id = 1;",
    )
    .await;
    // The push's title clock (3) beats the row's; its priority clock (1)
    // does not beat the service write's (2): the row the backend accepted
    // the second time is the new title with the new priority.
    assert_eq!(code, 200, "{body}");
    assert_eq!(b.calls.load(Ordering::SeqCst), 2);
    let asked = b.asked.lock().unwrap().clone();
    assert_eq!(asked[0]["rows"][0]["after"]["priority"], 1);
    assert_eq!(asked[1]["rows"][0]["after"]["priority"], 5);
    assert_eq!(asked[1]["rows"][0]["after"]["title"], "new");
    let row = s
        .sql("SELECT title, priority FROM todos WHERE id = 1")
        .await["results"][0]["rows"]
        .clone();
    assert_eq!(row, json!([["new", 5]]));
    s.stop().await;
}
