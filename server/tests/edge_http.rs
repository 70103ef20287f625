//! The HTTP endpoints over real sockets (docs/PROTOCOL.md §8, §9): status
//! codes and JSON error bodies for malformed, oversized, unauthenticated,
//! expired and forbidden requests; the server stays up through all of them.

mod edge_common;

use edge_common::server::{
    METRICS_TEXT, SECRET, TestServer, local_changes, service_token, site, user_token,
};
use edge_common::tokens;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value as Json, json};

/// Sends `method path` with an optional bearer token and body (JSON text
/// sent as is), returns the status and the JSON body.
async fn call(
    s: &TestServer,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (StatusCode, Json) {
    let mut req = Client::new().request(method, s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let r = req.send().await.expect("the server answers");
    let status = r.status();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, body)
}

/// Expects an error answer: the status, the code, and a part of the message.
#[track_caller]
fn check_error(got: (StatusCode, Json), status: u16, code: &str, text: &str) {
    let (st, body) = got;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(text),
        "{message:?} should contain {text:?}"
    );
}

async fn health(s: &TestServer) -> Json {
    let (st, body) = call(s, Method::GET, "/v1/health", None, None).await;
    assert_eq!(st, 200, "{body}");
    body
}

/// `GET /v1/admin/status` with the service token.
async fn status(s: &TestServer) -> Json {
    let (st, body) = call(
        s,
        Method::GET,
        "/v1/admin/status",
        Some(&service_token()),
        None,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    body
}

/// Health needs no token and tells nothing of the data: no version, no
/// count (issue 11: anyone could count and time other tenants' commits).
#[tokio::test]
async fn health_needs_no_token_and_tells_nothing_of_the_data() {
    let s = TestServer::start().await;
    let body = health(&s).await;
    assert_eq!(body, serde_json::json!({"status": "ok"}));
    assert!(status(&s).await["db_version"].is_i64());
    let (st, body) = call(&s, Method::GET, "/v1/admin/status", None, None).await;
    assert_eq!(st, 401, "{body}");
    s.stop().await;
}

#[tokio::test]
async fn metrics_render_the_given_recorder_to_the_service_role_only() {
    let s = TestServer::start().await;
    let r = Client::new().get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401, "every tenant's traffic is counted there");
    let r = Client::new()
        .get(s.url("/metrics"))
        .bearer_auth(service_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    assert_eq!(r.text().await.unwrap(), METRICS_TEXT);
    s.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_before_anything_else() {
    let s = TestServer::start().await;
    let expired = tokens::hs256(SECRET, &tokens::claims("u1", "acme", -30));
    let mut early = tokens::claims("u1", "acme", 3600);
    early.insert("nbf".into(), json!(tokens::now() + 600));
    let early = tokens::hs256(SECRET, &early);
    let forged = tokens::hs256(
        "not the server's secret",
        &tokens::claims("u1", "acme", 3600),
    );
    let unsigned = tokens::unsigned(json!({"alg": "none"}), &tokens::claims("u1", "acme", 3600));
    let tampered = tokens::with_claims(&user_token("u1", "acme"), &tokens::service_claims(3600));

    for (method, path) in [
        (Method::GET, "/v1/schema"),
        (Method::POST, "/v1/push"),
        (Method::POST, "/v1/pull"),
        (Method::POST, "/v1/sql"),
        (Method::POST, "/v1/admin/policy"),
        (
            Method::GET,
            "/v1/admin/peers/00000000000000000000000000000000",
        ),
    ] {
        // A body that is not even JSON: the token is refused first.
        let body = (method == Method::POST).then(|| "{not json".to_owned());
        let cases: [(Option<&str>, &str, &str); 6] = [
            (None, "unauthorized", "no token"),
            (Some(&expired), "token_expired", "expired"),
            (Some(&early), "token_not_yet_valid", "not valid yet"),
            (Some(&forged), "unauthorized", "signature"),
            (Some(&unsigned), "unauthorized", "malformed token"),
            (Some(&tampered), "unauthorized", "signature"),
        ];
        for (token, code, text) in cases {
            check_error(
                call(&s, method.clone(), path, token, body.clone()).await,
                401,
                code,
                text,
            );
        }
    }
    // Not a bearer header.
    let r = Client::new()
        .get(s.url("/v1/schema"))
        .header("authorization", "Basic dTE6cHc=")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Json = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    health(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn the_schema_for_a_valid_token() {
    let s = TestServer::start().await;
    let (st, body) = call(
        &s,
        Method::GET,
        "/v1/schema",
        Some(&user_token("u1", "acme")),
        None,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(
        body["schema_sql"]
            .as_str()
            .unwrap()
            .contains("CREATE TABLE todos")
    );
    let tables: Vec<&str> = body["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(tables.contains(&"todos"), "{tables:?}");
    s.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_named() {
    let s = TestServer::start().await;
    let token = user_token("u1", "acme");
    let site = site(1).to_string();
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        (
            "/v1/push",
            "{not json".into(),
            400,
            "bad_message",
            "invalid request body",
        ),
        (
            "/v1/push",
            "[]".into(),
            400,
            "bad_message",
            "invalid request body",
        ),
        (
            "/v1/push",
            json!({"site_id": site, "from": 0}).to_string(),
            400,
            "bad_message",
            "missing field `to`",
        ),
        (
            "/v1/push",
            json!({"site_id": site, "from": "zero", "to": 1, "changes": []}).to_string(),
            400,
            "bad_message",
            "invalid type",
        ),
        (
            "/v1/push",
            json!({"site_id": "xyz", "from": 0, "to": 1, "changes": []}).to_string(),
            400,
            "bad_message",
            "a site id is 32 hex digits",
        ),
        (
            "/v1/push",
            json!({"site_id": site, "from": 0, "to": 1, "changes": [], "extra": 1}).to_string(),
            400,
            "bad_message",
            "unknown field `extra`",
        ),
        (
            "/v1/push",
            json!({"site_id": site, "from": 0, "to": 1, "changes": [["todos"]]}).to_string(),
            400,
            "bad_message",
            "invalid request body",
        ),
        (
            "/v1/pull",
            json!({"site_id": site}).to_string(),
            400,
            "bad_message",
            "missing field `subscriptions`",
        ),
        (
            "/v1/pull",
            json!({"site_id": site, "subscriptions": [{"id": 1, "query": "x"}]}).to_string(),
            400,
            "bad_message",
            "invalid type",
        ),
        (
            "/v1/push",
            String::new(),
            400,
            "bad_message",
            "invalid request body",
        ),
    ];
    for (path, body, status, code, text) in cases {
        check_error(
            call(&s, Method::POST, path, Some(&token), Some(body.clone())).await,
            status,
            code,
            text,
        );
    }
    health(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_too_large() {
    let s = TestServer::start().await;
    // The test server's limit is 4096 bytes.
    let big = json!({"site_id": site(1).to_string(), "from": 0, "to": 1,
        "changes": [], "pad": "x".repeat(5000)})
    .to_string();
    for path in ["/v1/push", "/v1/pull", "/v1/admin/policy", "/v1/sql"] {
        let token = if path.starts_with("/v1/push") || path.starts_with("/v1/pull") {
            user_token("u1", "acme")
        } else {
            service_token()
        };
        check_error(
            call(&s, Method::POST, path, Some(&token), Some(big.clone())).await,
            413,
            "too_large",
            "over the limit",
        );
    }
    // Just under the limit is read (and then judged on its content).
    let under = json!({"site_id": site(1).to_string(), "from": 0, "to": 0,
        "changes": [], "pad": "x".repeat(3900)})
    .to_string();
    assert!(under.len() < 4096);
    check_error(
        call(
            &s,
            Method::POST,
            "/v1/push",
            Some(&user_token("u1", "acme")),
            Some(under),
        )
        .await,
        400,
        "bad_message",
        "unknown field `pad`",
    );
    health(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn service_endpoints_need_the_service_role() {
    let s = TestServer::start().await;
    let user = user_token("u1", "acme");
    for (method, path, body) in [
        (
            Method::POST,
            "/v1/sql",
            Some(json!({"statements": []}).to_string()),
        ),
        (
            Method::POST,
            "/v1/admin/policy",
            Some(json!({"policy_sql": ""}).to_string()),
        ),
        (
            Method::GET,
            "/v1/admin/peers/00000000000000000000000000000000",
            None,
        ),
    ] {
        check_error(
            call(&s, method, path, Some(&user), body).await,
            403,
            "forbidden",
            "needs a token with role `service`",
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn service_sql() {
    let s = TestServer::start().await;
    let svc = service_token();
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/sql",
        Some(&svc),
        Some(
            json!({"statements": [
                {"sql": "INSERT INTO lists (id, tenant_id, owner, name) VALUES (?1, ?2, ?3, ?4)",
                 "params": [1, "acme", "u1", "groceries"]},
                {"sql": "SELECT id, name FROM lists", "params": []}
            ]})
            .to_string(),
        ),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["results"][1]["rows"], json!([[1, "groceries"]]));
    assert!(body["db_version"].as_i64().unwrap() > 0);
    check_error(
        call(
            &s,
            Method::POST,
            "/v1/sql",
            Some(&svc),
            Some(json!({"statements": [{"sql": "INSERT INTO nope VALUES (1)"}]}).to_string()),
        )
        .await,
        400,
        "sql_error",
        "nope",
    );
    assert_eq!(status(&s).await["db_version"], body["db_version"]);
    s.stop().await;
}

#[tokio::test]
async fn policy_reload_through_the_admin_endpoint() {
    let s = TestServer::start().await;
    let svc = service_token();
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/admin/policy",
        Some(&svc),
        Some(
            json!({"policy_sql": "CREATE POLICY p ON nosuch FOR SELECT USING (true);\nCREATE POLICY q ON todos FOR SELECT USING (nocol = 1);"})
                .to_string(),
        ),
    )
    .await;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (400, Some("policy_invalid")),
        "{body}"
    );
    let diagnostics: Vec<&str> = body["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    // Every diagnostic, located in the request body.
    for expected in [
        "POST /v1/admin/policy:1:20: unknown table `nosuch`",
        "POST /v1/admin/policy:2:44: unknown column `nocol`",
    ] {
        assert!(
            diagnostics.iter().any(|d| d.starts_with(expected)),
            "{expected:?} in {diagnostics:?}"
        );
    }

    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/admin/policy",
        Some(&svc),
        Some(json!({"policy_sql": edge_common::server::POLICY}).to_string()),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(body["changed_views"].is_u64(), "{body}");
    s.stop().await;
}

#[tokio::test]
async fn peer_reports() {
    let s = TestServer::start().await;
    let svc = service_token();
    check_error(
        call(
            &s,
            Method::GET,
            "/v1/admin/peers/not-a-site",
            Some(&svc),
            None,
        )
        .await,
        400,
        "bad_message",
        "a site id is 32 hex digits",
    );
    // A peer that pushed is known.
    let site = site(3);
    let (to, changes) = local_changes(
        site,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'u3', 'mine')",
    );
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/push",
        Some(&user_token("u3", "acme")),
        Some(json!({"site_id": site.to_string(), "from": 0, "to": to, "changes": changes_json(&changes)}).to_string()),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = call(
        &s,
        Method::GET,
        &format!("/v1/admin/peers/{site}"),
        Some(&svc),
        None,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["subject"], "u3");
    assert_eq!(body["pushed_version"], to);
    s.stop().await;
}

fn changes_json(changes: &[tenantsync_core::Change]) -> Json {
    // The wire form, through the protocol's own encoder.
    let req = tenantsync_protocol::http::PushRequest {
        site_id: site(0),
        from: 0,
        to: 0,
        changes: changes.to_vec(),
    };
    serde_json::to_value(req).unwrap()["changes"].clone()
}

#[tokio::test]
async fn push_and_pull_and_a_refusal() {
    let s = TestServer::start().await;
    let me = site(4);
    let token = user_token("u4", "acme");
    let (to, changes) = local_changes(
        me,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (10, 'acme', 'u4', 'ok')",
    );
    let push = |from: i64, to: i64, changes: &[tenantsync_core::Change]| {
        json!({"site_id": me.to_string(), "from": from, "to": to, "changes": changes_json(changes)})
            .to_string()
    };
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/push",
        Some(&token),
        Some(push(0, to, &changes)),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["pushed_version"], to);

    // A gap: 409 with the server's pushed_version.
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/push",
        Some(&token),
        Some(push(to + 5, to + 6, &[])),
    )
    .await;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (409, Some("gap")),
        "{body}"
    );
    assert_eq!(body["pushed_version"], to);

    // A row of another tenant: refused whole, 403 with the refusal.
    let other = site(5);
    let (to2, changes2) = local_changes(
        other,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (11, 'globex', 'u5', 'not yours')",
    );
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/push",
        Some(&user_token("u5", "acme")),
        Some(json!({"site_id": other.to_string(), "from": 0, "to": to2, "changes": changes_json(&changes2)}).to_string()),
    )
    .await;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (403, Some("policy_refused")),
        "{body}"
    );
    // The body is the `push_refused` message without `type`, and without
    // `id`: an HTTP push has none (PROTOCOL.md §8).
    assert!(body.get("type").is_none(), "{body}");
    assert!(body.get("id").is_none(), "{body}");
    assert_eq!(body["rows"][0]["table"], "todos");
    // A refusal does not move the peer's pushed version (PROTOCOL.md §7).
    assert_eq!(body["pushed_version"], 0);
    // Every row of the push is in `state` or `invisible`: a row the server
    // does not have is invisible.
    assert_eq!(body["state"], json!([]), "{body}");
    assert_eq!(
        body["invisible"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
    assert_eq!(body["invisible"][0]["table"], "todos");

    // Pull sees the accepted row and not the refused one.
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/pull",
        Some(&token),
        Some(json!({"site_id": me.to_string(), "subscriptions": [{"id": "all", "query": "SELECT * FROM todos"}]}).to_string()),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let part = &body["subs"]["all"];
    assert_eq!(part["mode"], "snapshot");
    let titles: Vec<&Json> = part["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c[2] == "title")
        .map(|c| &c[3])
        .collect();
    assert_eq!(titles, vec![&json!("ok")]);
    // An HTTP-only peer learns where to push from in every pull answer.
    assert_eq!(body["pushed_version"], to, "{body}");

    // A part with nothing in it omits `changes` and `evict` (both mean
    // empty): a resume from the version just pulled.
    let v = body["version"].as_i64().unwrap();
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/pull",
        Some(&token),
        Some(json!({"site_id": me.to_string(), "subscriptions": [{"id": "all", "query": "SELECT * FROM todos", "cursor": v}]}).to_string()),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        body["subs"]["all"],
        json!({"mode": "resume", "from": v, "reset": false}),
        "{body}"
    );
    s.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let s = TestServer::start().await;
    check_error(
        call(&s, Method::GET, "/v2/nothing", None, None).await,
        404,
        "bad_message",
        "no endpoint GET /v2/nothing",
    );
    check_error(
        call(&s, Method::GET, "/v1/push", None, None).await,
        405,
        "bad_message",
        "/v1/push does not take GET",
    );
    check_error(
        call(&s, Method::DELETE, "/v1/health", None, None).await,
        405,
        "bad_message",
        "does not take DELETE",
    );
    // /v1/sync without an upgrade.
    check_error(
        call(
            &s,
            Method::GET,
            "/v1/sync",
            Some(&user_token("u1", "acme")),
            None,
        )
        .await,
        400,
        "bad_message",
        "WebSocket endpoint",
    );
    health(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn nothing_listens_after_a_shutdown() {
    let s = TestServer::start().await;
    let url = s.url("/v1/health");
    let token = user_token("u6", "acme");
    let pull = Client::new()
        .post(s.url("/v1/pull"))
        .bearer_auth(&token)
        .json(&json!({"site_id": site(6).to_string(), "subscriptions": [{"id": "a", "query": "SELECT * FROM todos"}], "wait_ms": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(pull.status(), 200);
    let (task, _dir) = s.begin_stop();
    // Once stopped, nothing listens any more.
    tokio::time::timeout(std::time::Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap();
    assert!(Client::new().get(&url).send().await.is_err());
}

/// PROTOCOL.md §7: a change that changes nothing is not judged. Real
/// cr-sqlite records the merge of a row the peer wrote (sent back whole
/// when it re-enters) as new local versions under the peer's own site id;
/// pushing them again is a duplicate, answered like any push, even where
/// the policies would refuse a real write of that row. A real write of the
/// same row is still judged and refused.
#[tokio::test]
async fn pushing_back_what_the_server_holds_is_not_judged() {
    let s = TestServer::start().await;
    let me = site(6);
    let token = user_token("u6", "acme");
    let (to, changes) = local_changes(
        me,
        "INSERT INTO lists (id, tenant_id, owner, name) VALUES (20, 'acme', 'u6', 'mine')",
    );
    let push = |from: i64, to: i64, changes: &[tenantsync_core::Change]| {
        json!({"site_id": me.to_string(), "from": from, "to": to, "changes": changes_json(changes)})
            .to_string()
    };
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/push",
        Some(&token),
        Some(push(0, to, &changes)),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // The list changes hands: u6 may still read it, no longer write it.
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/sql",
        Some(&service_token()),
        Some(
            json!({"statements": [{"sql": "UPDATE lists SET owner = 'u7' WHERE id = 20"}]})
                .to_string(),
        ),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let row = || async {
        let (_, body) = call(
            &s,
            Method::POST,
            "/v1/sql",
            Some(&service_token()),
            Some(
                json!({"statements": [{"sql": "SELECT owner, name FROM lists WHERE id = 20"}]})
                    .to_string(),
            ),
        )
        .await;
        body["results"][0]["rows"].clone()
    };

    // The same clocks again, as new local versions: a duplicate.
    let again: Vec<_> = changes
        .iter()
        .map(|c| tenantsync_core::Change {
            db_version: to + 1,
            ..c.clone()
        })
        .collect();
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/push",
        Some(&token),
        Some(push(to, to + 1, &again)),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["pushed_version"], to + 1);
    assert_eq!(row().await, json!([["u7", "mine"]]));

    // A real write of the row (a newer clock) is judged, and refused.
    let newer: Vec<_> = changes
        .iter()
        .filter(|c| c.cid == "name")
        .map(|c| tenantsync_core::Change {
            db_version: to + 2,
            col_version: c.col_version + 5,
            val: tenantsync_types::Value::Text("taken back".into()),
            ..c.clone()
        })
        .collect();
    let (st, body) = call(
        &s,
        Method::POST,
        "/v1/push",
        Some(&token),
        Some(push(to + 1, to + 2, &newer)),
    )
    .await;
    assert_eq!(
        (st.as_u16(), body["code"].as_str()),
        (403, Some("policy_refused")),
        "{body}"
    );
    assert_eq!(row().await, json!([["u7", "mine"]]));
    s.stop().await;
}
