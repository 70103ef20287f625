//! The catalogue of hostile inputs (issue 6): one table, [`catalogue`],
//! lists every attack a client can make on a real server (the axum edge on
//! 127.0.0.1:0, real WebSockets and HTTP) with the answer it must get. For
//! each case the harness checks, besides the answer:
//!
//! - nothing changed: every table of the server database (CRRs, their
//!   clocks, cr-sqlite's bookkeeping, `pushed_version`s) reads exactly as
//!   before the case;
//! - the server is up (`/v1/health`) and a bystander (another tenant's live
//!   subscription, opened before the first case) still gets the next
//!   write of its tenant.
//!
//! The edge tests (edge_ws.rs, edge_http.rs, edge_auth.rs) pin the exact
//! messages of many of these errors; this file proves, for all of them at
//! once, that a refusal leaves no trace and hurts no one else.

mod edge_common;

use std::time::Duration;

use edge_common::server::*;
use edge_common::tokens;
use serde_json::{Value as Json, json};
use tenantsync_core::SiteId;
use tokio_tungstenite::tungstenite;

/// How the attack reaches the server.
enum Attack {
    /// On a session opened (upgrade token, `hello`) by `who` on a fresh site
    /// id, these frames; the answer to the last one is checked.
    Frames { who: Who, frames: Vec<Frame> },
    /// A WebSocket upgrade with this bearer token.
    Upgrade(String),
    /// An upgrade without a token, then `hello` with this token and site.
    Hello { token: String, site: SiteId },
    /// `POST path` with this token and body text.
    Post {
        path: &'static str,
        token: String,
        body: String,
    },
}

/// An identity: (sub, tenant_id claim).
type Who = (&'static str, &'static str);

enum Frame {
    Text(String),
    Json(Json),
    Binary(Vec<u8>),
}

/// The answer a case must get.
enum Expect {
    /// An `error` with this code; the session goes on (a `ping` is answered).
    Error(&'static str),
    /// An `error` with this code, then a close frame with this close code.
    Closed(&'static str, u16),
    /// A close frame 1009 (a frame over the transport cap cannot be read).
    Cut,
    /// The upgrade is refused: HTTP 401 with this code.
    Upgrade401(&'static str),
    /// `push_refused` with this code; the session goes on.
    Refused(&'static str),
    /// `push_ok`: the push is acknowledged and leaves no trace (only the
    /// pusher's own `pushed_version` moves).
    Acked,
    /// `subscribed`, then a snapshot holding exactly this many rows.
    Rows(usize),
    /// An HTTP error with this status and code.
    Http(u16, &'static str),
}

const ALICE: Who = ("alice", "acme");
const MALLORY: Who = ("mallory", "acme");
/// The bystander: another tenant, subscribed for the whole run.
const BOB: Who = ("bob", "globex");
/// An attacker in globex (issue 11's attacks on acme's rows).
const GUS: Who = ("gus", "globex");
const BOB_SITE: u8 = 2;

fn token(who: Who) -> String {
    user_token(who.0, who.1)
}

fn text(s: &str) -> Frame {
    Frame::Text(s.to_owned())
}

fn subscribe(query: &str) -> Frame {
    Frame::Json(json!({"type": "subscribe", "id": "s", "query": query}))
}

/// The wire changes of `sql` run on a fresh replica of `site` (a push's
/// `changes`), and its last version.
fn changes_of(site: SiteId, sql: &str) -> (i64, Vec<Json>) {
    let (to, changes) = local_changes(site, sql);
    let req = tenantsync_protocol::http::PushRequest {
        site_id: site,
        from: 0,
        to,
        changes,
    };
    let v = serde_json::to_value(req).unwrap();
    (to, v["changes"].as_array().unwrap().clone())
}

fn push(from: i64, to: i64, changes: Vec<Json>) -> Frame {
    Frame::Json(json!({"type": "push", "id": "p", "from": from, "to": to, "changes": changes}))
}

/// A push of `sql`'s changes, after `edit` changed them.
fn push_edited(site: SiteId, sql: &str, edit: impl Fn(&mut Vec<Json>)) -> Frame {
    let (to, mut changes) = changes_of(site, sql);
    edit(&mut changes);
    push(0, to, changes)
}

/// Index of a change field in the 9-element wire array.
const PK: usize = 1;
const CID: usize = 2;
const VAL: usize = 3;
const COL_VERSION: usize = 4;
const DB_VERSION: usize = 5;
const SITE: usize = 6;
const CL: usize = 7;

/// The push's row sentinel (a well-formed one is added when the local
/// insert did not record one).
fn sentinel(changes: &mut Vec<Json>) -> &mut Json {
    if let Some(i) = changes.iter().position(|c| c[CID] == "-1") {
        return &mut changes[i];
    }
    let mut s = changes[0].clone();
    s[CID] = json!("-1");
    s[VAL] = Json::Null;
    s[COL_VERSION] = s[CL].clone();
    changes.push(s);
    changes.last_mut().unwrap()
}

fn column<'a>(changes: &'a mut [Json], cid: &str) -> &'a mut Json {
    changes
        .iter_mut()
        .find(|c| c[CID] == cid)
        .expect("the column")
}

/// A packed pk of these values, as hex.
fn pk_hex(values: &[tenantsync_core::Value]) -> Json {
    json!(tenantsync_core::PackedPk::pack(values).unwrap().to_hex())
}

/// gus writes list 1's row (acme's, seeded) under another encoding of its
/// key, with clocks that would win.
fn gus_on_list_1(site: SiteId, key: tenantsync_core::Value) -> Frame {
    push_edited(site, GUS_LIST, |c| {
        c.retain(|c| c[CID] != "-1");
        for c in c.iter_mut() {
            c[PK] = pk_hex(std::slice::from_ref(&key));
            c[COL_VERSION] = json!(9);
        }
    })
}

/// gus's own list 3 (seeded in globex), rewritten with these clocks.
fn gus_on_list_3(site: SiteId, cl: i64, col_version: i64, sentinel_only: bool) -> Frame {
    push_edited(site, GUS_LIST_3, move |c| {
        if sentinel_only {
            c.retain(|c| c[CID] == "-1");
            if c.is_empty() {
                let mut s = changes_of(site, GUS_LIST_3).1[0].clone();
                s[CID] = json!("-1");
                s[VAL] = Json::Null;
                c.push(s);
            }
            for c in c.iter_mut() {
                c[CL] = json!(cl);
                c[COL_VERSION] = json!(cl);
            }
        } else {
            c.retain(|c| c[CID] != "-1");
            for c in c.iter_mut() {
                c[CL] = json!(cl);
                c[COL_VERSION] = json!(col_version);
            }
        }
    })
}

/// A tombstone (cl 2 sentinel) for `lists` row `id`.
fn tombstone(site: SiteId, id: i64) -> Frame {
    push_edited(site, GUS_LIST, |c| {
        let mut s = c[0].clone();
        s[PK] = pk_hex(&[tenantsync_core::Value::Integer(id)]);
        s[CID] = json!("-1");
        s[VAL] = Json::Null;
        s[CL] = json!(2);
        s[COL_VERSION] = json!(2);
        *c = vec![s];
    })
}

const GUS_LIST: &str =
    "INSERT INTO lists (id, tenant_id, owner, name) VALUES (1, 'globex', 'gus', 'took')";
const GUS_LIST_3: &str =
    "INSERT INTO lists (id, tenant_id, owner, name) VALUES (3, 'globex', 'gus', 'mine')";

const INSERT_ACME: &str =
    "INSERT INTO todos (id, tenant_id, owner, title) VALUES (50, 'acme', 'alice', 'mine')";

/// The site id each case's session uses (fresh per case).
fn case_site(i: usize) -> SiteId {
    site(100 + i as u8)
}

/// Every hostile input, with the answer it must get.
fn catalogue() -> Vec<(&'static str, Attack, Expect)> {
    use Attack::*;
    use Expect::*;
    let frames = |who: Who, frames: Vec<Frame>| Frames { who, frames };
    let on = |f: Frame| frames(ALICE, vec![f]);
    let upgrade = |claims: serde_json::Map<String, Json>| Upgrade(tokens::hs256(SECRET, &claims));
    let alice_claims = || tokens::claims("alice", "acme", 600);
    let flood: Vec<Frame> = (0..=8)
        .map(|i| {
            Frame::Json(
                json!({"type": "subscribe", "id": format!("f{i}"), "query": "SELECT * FROM todos"}),
            )
        })
        .collect();
    // The push cases' site is the case's own: built lazily by index below.
    let me = |i: usize| case_site(i);
    let mut cases: Vec<(&'static str, Attack, Expect)> = vec![
        // Malformed messages.
        ("not JSON", on(text("{\"type\": \"ping\"")), Error("bad_message")),
        ("JSON but not an object", on(text("[1, 2, 3]")), Error("bad_message")),
        ("no type", on(text("{\"id\": \"x\"}")), Error("bad_message")),
        ("a field of the wrong type", on(Frame::Json(json!({"type": "subscribe", "id": 7, "query": "SELECT * FROM todos"}))), Error("bad_message")),
        ("a cursor that is a string", on(Frame::Json(json!({"type": "subscribe", "id": "s", "query": "SELECT * FROM todos", "cursor": "9"}))), Error("bad_message")),
        ("an unknown field", on(Frame::Json(json!({"type": "ping", "id": "x", "admin": true}))), Error("bad_message")),
        ("an unknown message type", on(Frame::Json(json!({"type": "drop_database"}))), Error("unknown_type")),
        ("a binary frame", on(Frame::Binary(vec![0x81, 0, 0xff])), Error("bad_message")),
        ("a second hello", on(Frame::Json(hello(site(99), None))), Error("bad_message")),
        ("a frame over the message limit", on(Frame::Json(json!({"type": "ping", "id": "x".repeat(6000)}))), Error("too_large")),
        ("a frame over the transport cap", on(Frame::Json(json!({"type": "ping", "id": "x".repeat(20_000)}))), Cut),
        ("a push whose changes are not arrays", on(Frame::Json(json!({"type": "push", "id": "p", "from": 0, "to": 1, "changes": [{"table": "todos"}]}))), Error("bad_message")),
        ("an integer outside i64", on(Frame::Json(json!({"type": "push", "id": "p", "from": 0, "to": 1, "changes": []})).with_text(|t| t.replace("\"to\":1", "\"to\":99999999999999999999"))), Error("bad_message")),
        // Subscription limits and bookkeeping.
        ("a flood of subscriptions (limit 8 per connection)", frames(ALICE, flood), Error("limit_exceeded")),
        ("unsubscribe of an unknown id", on(Frame::Json(json!({"type": "unsubscribe", "id": "nope"}))), Error("unknown_subscription")),
        ("ack of an unknown id", on(Frame::Json(json!({"type": "ack", "cursors": {"nope": 5}}))), Error("unknown_subscription")),
        ("resync of an unknown id", on(Frame::Json(json!({"type": "resync", "sub": "nope", "cursor": 0}))), Error("unknown_subscription")),
        // Subscriptions to what is not a CRR.
        ("a local (non-CRR) table", on(subscribe("SELECT * FROM local_settings")), Error("query_refused")),
        ("a clock table", on(subscribe("SELECT * FROM todos__crsql_clock")), Error("query_refused")),
        ("crsql_changes", on(subscribe("SELECT * FROM crsql_changes")), Error("query_refused")),
        ("crsql_site_id", on(subscribe("SELECT * FROM crsql_site_id")), Error("query_refused")),
        ("sqlite_master", on(subscribe("SELECT * FROM sqlite_master")), Error("query_refused")),
        ("tenantsync_peers", on(subscribe("SELECT * FROM tenantsync_peers")), Error("query_refused")),
        ("tenantsync_subscriptions", on(subscribe("SELECT * FROM tenantsync_subscriptions")), Error("query_refused")),
        ("an unknown table", on(subscribe("SELECT * FROM secrets")), Error("query_refused")),
        ("an unknown column", on(subscribe("SELECT * FROM todos WHERE password = 1")), Error("query_refused")),
        // SQL injection through the query.
        ("a second statement", on(subscribe("SELECT * FROM todos; DELETE FROM todos")), Error("query_refused")),
        ("a write", on(subscribe("DELETE FROM todos")), Error("query_refused")),
        ("UNION with another tenant's rows", on(subscribe("SELECT * FROM todos WHERE id = 1 UNION SELECT * FROM todos")), Error("query_refused")),
        ("a subquery on a clock table", on(subscribe("SELECT * FROM todos WHERE id IN (SELECT key FROM todos__crsql_clock)")), Error("query_refused")),
        ("a subquery on the peers table", on(subscribe("SELECT * FROM todos WHERE owner IN (SELECT subject FROM tenantsync_peers)")), Error("query_refused")),
        ("a function call", on(subscribe("SELECT * FROM todos WHERE load_extension('x') = 1")), Error("query_refused")),
        ("OR 1=1 cannot widen the policy", on(subscribe("SELECT * FROM todos WHERE owner = 'bob' OR 1=1")), Rows(1)),
        ("a quote in a literal", on(subscribe("SELECT * FROM todos WHERE title = 'x'' OR ''1''=''1'")), Rows(0)),
        // SQL injection through the claims.
        ("a tenant claim with a quote", frames(("alice", "acme' OR 1=1 --"), vec![subscribe("SELECT * FROM todos")]), Rows(0)),
        ("a subject with a quote", frames(("alice' OR '1'='1", "acme"), vec![subscribe("SELECT * FROM todos")]), Rows(0)),
        ("a quoted tenant claim pushing into acme", Attack::Frames { who: ("alice", "acme' OR 1=1 --"), frames: vec![] }, Refused("policy_refused")),
        // Tokens.
        ("no token", Hello { token: String::new(), site: site(98) }, Closed("unauthorized", 1008)),
        ("a forged signature", Upgrade(tokens::hs256("another secret, another secret!", &alice_claims())), Upgrade401("unauthorized")),
        ("claims swapped under a valid signature", Upgrade(tokens::with_claims(&token(ALICE), &tokens::service_claims(600))), Upgrade401("unauthorized")),
        ("alg: none", Upgrade(tokens::unsigned(json!({"alg": "none", "typ": "JWT"}), &alice_claims())), Upgrade401("unauthorized")),
        ("another algorithm (RS256)", Upgrade(tokens::rs256(&alice_claims())), Upgrade401("unauthorized")),
        ("garbage", Upgrade("not.a.token".into()), Upgrade401("unauthorized")),
        ("expired", upgrade(tokens::claims("alice", "acme", -60)), Upgrade401("token_expired")),
        ("not yet valid", upgrade({ let mut c = alice_claims(); c.insert("nbf".into(), json!(tokens::now() + 600)); c }), Upgrade401("token_not_yet_valid")),
        ("no exp", upgrade({ let mut c = alice_claims(); c.remove("exp"); c }), Upgrade401("unauthorized")),
        ("expired, in hello", Hello { token: tokens::hs256(SECRET, &tokens::claims("alice", "acme", -60)), site: site(97) }, Closed("token_expired", 1008)),
        ("alg: none, in hello", Hello { token: tokens::unsigned(json!({"alg": "none"}), &alice_claims()), site: site(97) }, Closed("unauthorized", 1008)),
        ("another subject's site id", Hello { token: token(MALLORY), site: site(BOB_SITE) }, Closed("site_bound_to_other_subject", 1008)),
        // Pushes.
        ("a row of another tenant", Frames { who: ALICE, frames: vec![] }, Refused("policy_refused")),
        ("moving a row from acme to globex", Frames { who: ALICE, frames: vec![] }, Refused("policy_refused")),
        ("another peer's site id in the changes", Frames { who: ALICE, frames: vec![] }, Error("site_mismatch")),
        ("a pk that does not decode", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a pk with two values for a one-column key", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a pk that is not hex", Frames { who: ALICE, frames: vec![] }, Error("bad_message")),
        ("to before from (versions going backwards)", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a change outside the range", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a gap (from after pushed_version)", Frames { who: ALICE, frames: vec![] }, Error("gap")),
        ("a push to an unknown table", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a push to a local table", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a push of an unknown column", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a column change with an even causal length", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a sentinel whose col_version is not its cl", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a sentinel with a value", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a causal length of 0", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a col_version of 0", Frames { who: ALICE, frames: vec![] }, Error("bad_push")),
        ("a site id of 15 bytes", Frames { who: ALICE, frames: vec![] }, Error("bad_message")),
        // HTTP.
        ("HTTP: a body that is not JSON", Post { path: "/v1/push", token: token(ALICE), body: "{".into() }, Http(400, "bad_message")),
        ("HTTP: a body over the limit", Post { path: "/v1/push", token: token(ALICE), body: format!("{{\"x\": \"{}\"}}", "y".repeat(8000)) }, Http(413, "too_large")),
        ("HTTP: service SQL without the service role", Post { path: "/v1/sql", token: token(ALICE), body: json!({"statements": [{"sql": "DELETE FROM todos", "params": []}]}).to_string() }, Http(403, "forbidden")),
        ("HTTP: service SQL writing an internal table", Post { path: "/v1/sql", token: service_token(), body: json!({"statements": [{"sql": "DELETE FROM tenantsync_peers", "params": []}]}).to_string() }, Http(400, "sql_error")),
        ("HTTP: service SQL writing a clock table", Post { path: "/v1/sql", token: service_token(), body: json!({"statements": [{"sql": "DELETE FROM todos__crsql_clock", "params": []}]}).to_string() }, Http(400, "sql_error")),
        ("HTTP: service SQL attaching a file", Post { path: "/v1/sql", token: service_token(), body: json!({"statements": [{"sql": "ATTACH '/tmp/x.db' AS x", "params": []}]}).to_string() }, Http(400, "sql_error")),
        ("HTTP: service SQL changing the schema", Post { path: "/v1/sql", token: service_token(), body: json!({"statements": [{"sql": "DROP TABLE todos", "params": []}]}).to_string() }, Http(400, "sql_error")),
        ("HTTP: half a transaction", Post { path: "/v1/sql", token: service_token(), body: json!({"statements": [{"sql": "INSERT INTO todos (id, tenant_id, owner, title) VALUES (77, 'acme', 'alice', 'half')", "params": []}, {"sql": "INSERT INTO nowhere VALUES (1)", "params": []}]}).to_string() }, Http(400, "sql_error")),
        ("HTTP: a pull as another subject's site", Post { path: "/v1/pull", token: token(MALLORY), body: json!({"site_id": site(BOB_SITE).to_string(), "subscriptions": [{"id": "s", "query": "SELECT * FROM todos"}]}).to_string() }, Http(403, "site_bound_to_other_subject")),
        ("HTTP: a pull with an injected query", Post { path: "/v1/pull", token: token(ALICE), body: json!({"site_id": site(96).to_string(), "subscriptions": [{"id": "s", "query": "SELECT * FROM todos; DROP TABLE todos"}]}).to_string() }, Http(400, "query_refused")),
        ("HTTP: a wait that is not a number", Post { path: "/v1/pull", token: token(ALICE), body: json!({"site_id": site(96).to_string(), "subscriptions": [], "wait_ms": "forever"}).to_string() }, Http(400, "bad_message")),
        ("HTTP: a push as another subject's site", Post { path: "/v1/push", token: token(MALLORY), body: json!({"site_id": site(BOB_SITE).to_string(), "from": 0, "to": 0, "changes": []}).to_string() }, Http(403, "site_bound_to_other_subject")),
        // Issue 11, class 1: the row a check reads is the row a merge
        // writes. A key SQLite would not store is refused; any other
        // encoding of acme's list 1 is list 1, and gus may not write it.
        ("class 1: a rowid key of U+00A0 and digits", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a rowid key of U+2003 and digits", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a rowid key of U+3000 and digits", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a rowid key of U+FEFF and digits", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a rowid key of digits and U+00A0", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a rowid key that is a BLOB", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a rowid key of 5.5", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a rowid key above i64 as text", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a NULL key (planting a row under a fresh id)", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        ("class 1: a key of ASCII spaces and digits is row 1", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 1: a key of '+1' is row 1", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 1: a key of '1.0' is row 1", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 1: a key of '1e0' is row 1", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 1: a key of REAL 1.0 is row 1", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 1: a composite key whose INTEGER part is U+00A0 and digits", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        // Class 2: nothing is kept that no check saw.
        ("class 2: a tombstone for an id no row has leaves no trace", Frames { who: GUS, frames: vec![] }, Acked),
        ("class 2: a tombstone for another tenant's row is skipped", Frames { who: GUS, frames: vec![] }, Acked),
        ("class 2: a resurrection of another tenant's row", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        // Class 3: clocks are bounded relative to the server's.
        ("class 3: a col_version of i64::MAX on a row the pusher may write", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 3: a causal length of i64::MAX on a row the pusher may write", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 3: a col_version 2^32 + 2 ahead of the server's", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 3: a causal length above 2^53", Frames { who: GUS, frames: vec![] }, Refused("policy_refused")),
        ("class 3: a to above 2^53", Frames { who: GUS, frames: vec![] }, Error("bad_push")),
        // Class 4: numbers and times read one way.
        ("class 4: a change value above i64", on(Frame::Text(r#"{"type":"push","id":"p","from":0,"to":1,"changes":[["todos","010932","title",18446744073709551616,1,1,"ed00000000000000000000000000007f",1,0]]}"#.into())), Error("bad_message")),
        ("class 4: a fractional exp in the past", upgrade({ let mut c = alice_claims(); c.insert("exp".into(), json!(tokens::now() as f64 - 30.75)); c }), Upgrade401("token_expired")),
        ("class 4: an exp that is a string", upgrade({ let mut c = alice_claims(); c.insert("exp".into(), json!((tokens::now() + 600).to_string())); c }), Upgrade401("unauthorized")),
        ("class 4: a negative exp", upgrade({ let mut c = alice_claims(); c.insert("exp".into(), json!(-5)); c }), Upgrade401("unauthorized")),
        // Class 5: identity is (tenant, subject).
        ("class 5: bob of acme on the site of bob of globex", Hello { token: token(("bob", "acme")), site: site(BOB_SITE) }, Closed("site_bound_to_other_subject", 1008)),
        ("class 5: HTTP: bob of acme pulls on the site of bob of globex", Post { path: "/v1/pull", token: token(("bob", "acme")), body: json!({"site_id": site(BOB_SITE).to_string(), "subscriptions": [{"id": "s", "query": "SELECT * FROM todos"}]}).to_string() }, Http(403, "site_bound_to_other_subject")),
        // Class 6: errors say what limit was hit, never the policy's SQL.
        ("class 6: a LIKE pattern read from the row", on(subscribe("SELECT * FROM todos WHERE title LIKE owner")), Error("query_refused")),
        ("class 6: a LIKE pattern over the limit", on(subscribe(&format!("SELECT * FROM todos WHERE title LIKE '{}'", "%".repeat(1100)))), Error("query_refused")),
    ];
    // The pushes need the case's own site id (the one its session uses).
    for (i, (name, attack, _)) in cases.iter_mut().enumerate() {
        let Attack::Frames { frames, .. } = attack else {
            continue;
        };
        if !frames.is_empty() {
            continue;
        }
        let s = me(i);
        let f = match *name {
            "a quoted tenant claim pushing into acme" => push_edited(s, INSERT_ACME, |_| {}),
            "a row of another tenant" => push_edited(
                s,
                "INSERT INTO todos (id, tenant_id, owner, title) VALUES (51, 'globex', 'alice', 'not mine')",
                |_| {},
            ),
            // Todo 1 is alice's, in acme (seeded); her push moves it.
            "moving a row from acme to globex" => push_edited(
                s,
                "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'globex', 'alice', 'moved')",
                |c| {
                    // As an update of the existing row: a higher col_version
                    // wins over the seeded clocks.
                    c.retain(|c| c[CID] != "-1");
                    for c in c.iter_mut() {
                        c[COL_VERSION] = json!(9);
                    }
                },
            ),
            "another peer's site id in the changes" => push_edited(s, INSERT_ACME, |c| {
                for c in c.iter_mut() {
                    c[SITE] = json!(site(BOB_SITE).to_string());
                }
            }),
            "a pk that does not decode" => push_edited(s, INSERT_ACME, |c| {
                for c in c.iter_mut() {
                    c[PK] = json!("0109");
                }
            }),
            "a pk with two values for a one-column key" => push_edited(s, INSERT_ACME, |c| {
                for c in c.iter_mut() {
                    c[PK] = json!("0209320905");
                }
            }),
            "a pk that is not hex" => push_edited(s, INSERT_ACME, |c| {
                c[0][PK] = json!("zz");
            }),
            "to before from (versions going backwards)" => {
                let (_, c) = changes_of(s, INSERT_ACME);
                push(1, 0, c)
            }
            "a change outside the range" => push_edited(s, INSERT_ACME, |c| {
                c[0][DB_VERSION] = json!(7);
            }),
            "a gap (from after pushed_version)" => {
                let (to, c) = changes_of(s, INSERT_ACME);
                let c = c
                    .into_iter()
                    .map(|mut c| {
                        c[DB_VERSION] = json!(to + 5);
                        c
                    })
                    .collect();
                push(to + 4, to + 5, c)
            }
            "a push to an unknown table" => push_edited(s, INSERT_ACME, |c| {
                c[0][0] = json!("secrets");
            }),
            "a push to a local table" => push_edited(s, INSERT_ACME, |c| {
                c[0][0] = json!("local_settings");
            }),
            "a push of an unknown column" => push_edited(s, INSERT_ACME, |c| {
                column(c, "title")[CID] = json!("password");
            }),
            "a column change with an even causal length" => push_edited(s, INSERT_ACME, |c| {
                c.retain(|c| c[CID] != "-1");
                column(c, "title")[CL] = json!(2);
            }),
            "a sentinel whose col_version is not its cl" => push_edited(s, INSERT_ACME, |c| {
                sentinel(c)[COL_VERSION] = json!(3);
            }),
            "a sentinel with a value" => push_edited(s, INSERT_ACME, |c| {
                sentinel(c)[VAL] = json!("smuggled");
            }),
            "a causal length of 0" => push_edited(s, INSERT_ACME, |c| {
                for c in c.iter_mut() {
                    c[CL] = json!(0);
                }
                sentinel(c)[COL_VERSION] = json!(0);
            }),
            "a col_version of 0" => push_edited(s, INSERT_ACME, |c| {
                column(c, "title")[COL_VERSION] = json!(0);
            }),
            "a site id of 15 bytes" => push_edited(s, INSERT_ACME, |c| {
                c[0][SITE] = json!("00".repeat(15));
            }),
            name if name.starts_with("class ") => class_push(s, name),
            other => panic!("no push for {other:?}"),
        };
        frames.push(f);
    }
    cases
}

/// The pushes of the issue-11 cases, by name.
fn class_push(s: SiteId, name: &str) -> Frame {
    use tenantsync_core::Value::{Blob, Integer, Null, Real, Text};
    let text = |t: &str| Text(t.to_owned());
    match name {
        "class 1: a rowid key of U+00A0 and digits" => gus_on_list_1(s, text("\u{a0}1")),
        "class 1: a rowid key of U+2003 and digits" => gus_on_list_1(s, text("\u{2003}1")),
        "class 1: a rowid key of U+3000 and digits" => gus_on_list_1(s, text("\u{3000}1")),
        "class 1: a rowid key of U+FEFF and digits" => gus_on_list_1(s, text("\u{feff}1")),
        "class 1: a rowid key of digits and U+00A0" => gus_on_list_1(s, text("1\u{a0}")),
        "class 1: a rowid key that is a BLOB" => gus_on_list_1(s, Blob(b"1".to_vec())),
        "class 1: a rowid key of 5.5" => gus_on_list_1(s, Real(5.5)),
        "class 1: a rowid key above i64 as text" => gus_on_list_1(s, text("9223372036854775808")),
        "class 1: a NULL key (planting a row under a fresh id)" => {
            push_edited(s, INSERT_ACME, |c| {
                for c in c.iter_mut() {
                    c[PK] = pk_hex(&[Null]);
                }
            })
        }
        "class 1: a key of ASCII spaces and digits is row 1" => gus_on_list_1(s, text(" 1 ")),
        "class 1: a key of '+1' is row 1" => gus_on_list_1(s, text("+1")),
        "class 1: a key of '1.0' is row 1" => gus_on_list_1(s, text("1.0")),
        "class 1: a key of '1e0' is row 1" => gus_on_list_1(s, text("1e0")),
        "class 1: a key of REAL 1.0 is row 1" => gus_on_list_1(s, Real(1.0)),
        "class 1: a composite key whose INTEGER part is U+00A0 and digits" => push_edited(
            s,
            "INSERT INTO members (list_id, user_id, tenant_id) VALUES (1, 'gus', 'acme')",
            |c| {
                for c in c.iter_mut() {
                    c[PK] = pk_hex(&[text("\u{a0}1"), text("gus")]);
                }
            },
        ),
        "class 2: a tombstone for an id no row has leaves no trace" => tombstone(s, 777),
        "class 2: a tombstone for another tenant's row is skipped" => tombstone(s, 1),
        "class 2: a resurrection of another tenant's row" => push_edited(s, GUS_LIST, |c| {
            for c in c.iter_mut() {
                c[CL] = json!(3);
                if c[CID] == "-1" {
                    c[COL_VERSION] = json!(3);
                }
            }
            sentinel(c)[COL_VERSION] = json!(3);
        }),
        "class 3: a col_version of i64::MAX on a row the pusher may write" => {
            gus_on_list_3(s, 1, i64::MAX, false)
        }
        "class 3: a causal length of i64::MAX on a row the pusher may write" => {
            gus_on_list_3(s, i64::MAX, i64::MAX, true)
        }
        "class 3: a col_version 2^32 + 2 ahead of the server's" => {
            gus_on_list_3(s, 1, (1 << 32) + 2, false)
        }
        "class 3: a causal length above 2^53" => {
            gus_on_list_3(s, (1 << 53) + 1, (1 << 53) + 1, true)
        }
        "class 3: a to above 2^53" => {
            let (_, c) = changes_of(s, GUS_LIST_3);
            let big = (1i64 << 53) + 5;
            let c = c
                .into_iter()
                .map(|mut c| {
                    c[DB_VERSION] = json!(big);
                    c
                })
                .collect();
            push(0, big, c)
        }
        other => {
            let _ = Integer(0);
            panic!("no push for {other:?}")
        }
    }
}

trait WithText {
    fn with_text(self, f: impl Fn(String) -> String) -> Frame;
}

impl WithText for Frame {
    /// The frame's text, rewritten (for inputs JSON values cannot hold).
    fn with_text(self, f: impl Fn(String) -> String) -> Frame {
        match self {
            Frame::Json(j) => Frame::Text(f(j.to_string())),
            Frame::Text(t) => Frame::Text(f(t)),
            b => b,
        }
    }
}

/// Every table of the server database except the peers' last-seen times and
/// the persisted subscriptions (which a hello or a subscribe legitimately
/// writes), as sorted text: equal before and after a case = nothing changed.
fn fingerprint(s: &TestServer, own: SiteId) -> Vec<String> {
    let db = rusqlite::Connection::open_with_flags(
        s.dir.path().join("server.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'tenantsync_%' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let mut out = Vec::new();
    let dump = |sql: &str, name: &str, out: &mut Vec<String>| {
        let mut stmt = db.prepare(sql).unwrap();
        let n = stmt.column_count();
        let mut rows: Vec<String> = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| {
                        r.get::<_, rusqlite::types::Value>(i)
                            .map(|v| format!("{v:?}"))
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap()
            .map(|r| format!("{name}: {}", r.unwrap().join(", ")))
            .collect();
        rows.sort();
        out.extend(rows);
    };
    for t in &tables {
        dump(&format!("SELECT * FROM \"{t}\""), t, &mut out);
    }
    dump(
        &format!(
            "SELECT site_id, pushed_version FROM tenantsync_peers WHERE pushed_version > 0 AND site_id != X'{}'",
            own
        ),
        "pushed_version",
        &mut out,
    );
    out
}

/// Runs one case and checks its answer.
async fn attack(s: &TestServer, i: usize, name: &str, attack: Attack, expect: &Expect) {
    match attack {
        Attack::Frames { who, frames } => {
            let mut ws = s.ws(Some(&token(who))).await;
            ws.open(case_site(i), None).await;
            let n = frames.len();
            for (k, f) in frames.into_iter().enumerate() {
                match f {
                    Frame::Text(t) => ws.send_text(t).await,
                    Frame::Json(j) => ws.send(j).await,
                    Frame::Binary(b) => ws.send_binary(b).await,
                }
                if k + 1 < n {
                    // Earlier frames (the flood) must be served: their
                    // subscribed and snapshot.
                    ws.expect("subscribed").await;
                    ws.expect("snapshot").await;
                }
            }
            match expect {
                Expect::Error(code) => {
                    ws.expect_error(code, "").await;
                    ws.ping("still served").await;
                }
                Expect::Closed(code, close) => ws.expect_closed_with(code, *close).await,
                Expect::Cut => ws.expect_closed_with("too_large", 1009).await,
                Expect::Refused(code) => {
                    let m = ws.expect("push_refused").await;
                    assert_eq!(m["code"], *code, "{name}: {m}");
                    ws.ping("still served").await;
                }
                Expect::Acked => {
                    let m = ws.msg().await;
                    assert_eq!(m["type"], "push_ok", "{name}: {m}");
                    ws.ping("still served").await;
                }
                Expect::Rows(n) => {
                    ws.expect("subscribed").await;
                    let snap = ws.expect("snapshot").await;
                    assert_eq!(snap["last"], true, "{name}: one chunk");
                    let rows: std::collections::BTreeSet<String> = snap["changes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c[PK].to_string())
                        .collect();
                    assert_eq!(rows.len(), *n, "{name}: {snap}");
                }
                Expect::Upgrade401(_) | Expect::Http(..) => panic!("{name}: not a session answer"),
            }
        }
        Attack::Upgrade(tok) => {
            let Expect::Upgrade401(code) = expect else {
                panic!("{name}: an upgrade is answered 401");
            };
            match Ws::connect(s.addr, Some(&tok)).await {
                Err(tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), 401, "{name}");
                    let body: Json =
                        serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                            .unwrap();
                    assert_eq!(body["code"], *code, "{name}: {body}");
                }
                Err(e) => panic!("{name}: expected a 401, got {e}"),
                Ok(_) => panic!("{name}: the upgrade should be refused"),
            }
        }
        Attack::Hello { token, site } => {
            let Expect::Closed(code, close) = expect else {
                panic!("{name}: a hello is answered by a close");
            };
            let mut ws = s.ws(None).await;
            ws.send(hello(site, (!token.is_empty()).then_some(token.as_str())))
                .await;
            ws.expect_closed_with(code, *close).await;
        }
        Attack::Post { path, token, body } => {
            let Expect::Http(status, code) = expect else {
                panic!("{name}: an HTTP request is answered by a status");
            };
            let r = reqwest::Client::new()
                .post(s.url(path))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            let body: Json = r.json().await.unwrap();
            assert_eq!(
                (st, body["code"].as_str()),
                (*status, Some(*code)),
                "{name}: {body}"
            );
        }
    }
}

/// The bystander's session: bob of globex, live on his todos.
async fn bystander(s: &TestServer) -> Ws {
    let mut ws = s.ws(Some(&token(BOB))).await;
    ws.open(site(BOB_SITE), None).await;
    ws.send(json!({"type": "subscribe", "id": "mine", "query": "SELECT * FROM todos"}))
        .await;
    ws.expect("subscribed").await;
    ws.expect("snapshot").await;
    ws
}

/// A service write to globex must reach the bystander.
async fn still_served(s: &TestServer, bob: &mut Ws, n: usize, name: &str) {
    let title = format!("after case {n}");
    s.sql(&format!(
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({}, 'globex', 'bob', '{title}')",
        1000 + n
    ))
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = bob.msg().await;
        if m["type"] == "changes" && m.to_string().contains(&title) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: the bystander never got {title:?}"
        );
    }
    let h: Json = reqwest::get(s.url("/v1/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok", "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_input_gets_its_error_changes_nothing_and_hurts_no_one_else() {
    let s = TestServer::start_with(edge(), |c| {
        c.limits.max_subscriptions_per_connection = 8;
    })
    .await;
    s.sql("INSERT INTO lists (id, tenant_id, owner, name) VALUES (1, 'acme', 'alice', 'home')")
        .await;
    s.sql("INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (1, 'acme', 1, 'alice', 'milk')")
        .await;
    s.sql("INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'globex', 'bob', 'bolts')")
        .await;
    s.sql("INSERT INTO lists (id, tenant_id, owner, name) VALUES (3, 'globex', 'gus', 'mine')")
        .await;
    let mut bob = bystander(&s).await;
    let cases = catalogue();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut names = std::collections::BTreeSet::new();
    for (i, (name, a, expect)) in cases.into_iter().enumerate() {
        assert!(names.insert(name), "two cases named {name:?}");
        // An acknowledged case may move its own pushed_version, nothing else.
        let own = case_site(i);
        let before = fingerprint(&s, own);
        attack(&s, i, name, a, &expect).await;
        // Let the engine finish whatever the case queued.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let after = fingerprint(&s, own);
        if before != after {
            let gone: Vec<_> = before.iter().filter(|r| !after.contains(r)).collect();
            let new: Vec<_> = after.iter().filter(|r| !before.contains(r)).collect();
            panic!("case {i} ({name}) changed the database: gone {gone:?}, new {new:?}");
        }
        still_served(&s, &mut bob, i, name).await;
    }
    s.stop().await;
}

/// Issue 11, class 6: a subscription over a limit is refused with the
/// limit it hit, and nothing of the effective SQL (the policies' shape)
/// reaches the client; before, SQLite's own error came back as `internal`
/// with that SQL in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_queries_are_refused_with_their_limit_and_no_sql() {
    let s = TestServer::start_with(
        tenantsync_server::config::EdgeSettings {
            max_message_bytes: 4 * 1024 * 1024,
            ..edge()
        },
        |c| c.limits.max_message_bytes = 4 * 1024 * 1024,
    )
    .await;
    let ids = (0..200_000)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let cases = [
        (format!("SELECT * FROM todos WHERE id IN ({ids})"), "values"),
        (
            format!(
                "SELECT * FROM todos WHERE title LIKE '{}'",
                "a%".repeat(25_000)
            ),
            "LIKE pattern",
        ),
        (
            format!(
                "SELECT * FROM todos WHERE title = '{}'",
                "x".repeat(100_000)
            ),
            "literal",
        ),
    ];
    for (query, limit) in cases {
        let mut ws = s.ws(Some(&token(ALICE))).await;
        ws.open(site(90), None).await;
        ws.send(json!({"type": "subscribe", "id": "s", "query": query}))
            .await;
        let m = ws.expect_error("query_refused", limit).await;
        let message = m["message"].as_str().unwrap();
        for leak in ["SELECT", "tenant_id", "members", "?1"] {
            assert!(!message.contains(leak), "{leak:?} in {message:?}");
        }
        ws.ping("still served").await;
    }
    s.stop().await;
}

/// Issue 11, class 8: a WITH CHECK whose subquery reads the written table
/// judges the row on the database before it, as PostgreSQL does: a
/// membership row never vouches for itself, and another row of the same
/// push vouches only once it was itself allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_row_never_vouches_for_itself() {
    const POLICY: &str = "
CREATE POLICY lists_read ON lists FOR SELECT USING (tenant_id = auth.claim('tenant_id'));
CREATE POLICY members_read ON members FOR SELECT USING (tenant_id = auth.claim('tenant_id'));
CREATE POLICY members_join ON members FOR INSERT
  WITH CHECK (tenant_id = auth.claim('tenant_id')
              AND list_id IN (SELECT list_id FROM members WHERE user_id = auth.uid()));
";
    let s = TestServer::start_with(edge(), |c| c.policy_sql = POLICY.into()).await;
    s.sql("INSERT INTO members (list_id, user_id, tenant_id) VALUES (1, 'alice', 'acme')")
        .await;
    let mut ws = s.ws(Some(&token(MALLORY))).await;
    let me = site(91);
    ws.open(me, None).await;
    // mallory, a member of nothing, adds herself to list 1: her own row
    // is what the subquery would find.
    ws.send(
        match push_edited(
            me,
            "INSERT INTO members (list_id, user_id, tenant_id) VALUES (1, 'mallory', 'acme')",
            |_| {},
        ) {
            Frame::Json(j) => j,
            _ => unreachable!(),
        },
    )
    .await;
    let m = ws.expect("push_refused").await;
    assert_eq!(m["rows"][0]["table"], "members", "{m}");
    let n = s
        .sql("SELECT count(*) FROM members WHERE user_id = 'mallory'")
        .await;
    assert_eq!(n["results"][0]["rows"][0][0], 0, "{n}");
    // alice, a member of list 1, adds bob to it: allowed.
    let mut ws = s.ws(Some(&token(ALICE))).await;
    let her = site(92);
    ws.open(her, None).await;
    ws.send(
        match push_edited(
            her,
            "INSERT INTO members (list_id, user_id, tenant_id) VALUES (1, 'bob', 'acme')",
            |_| {},
        ) {
            Frame::Json(j) => j,
            _ => unreachable!(),
        },
    )
    .await;
    ws.expect("push_ok").await;
    s.stop().await;
}

/// Issue 11, class 4: `exp` is read once, for HTTP and WebSocket alike; a
/// fractional one ends the session when HTTP starts refusing the token
/// (the session never expired before: its expiry read only integers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fractional_exp_ends_the_session_when_http_refuses_the_token() {
    let s = TestServer::start().await;
    let mut claims = tokens::claims("alice", "acme", 0);
    claims.insert("exp".into(), json!(tokens::now() as f64 + 2.25));
    let tok = tokens::hs256(SECRET, &claims);
    let mut ws = s.ws(Some(&tok)).await;
    ws.open(site(93), None).await;
    ws.send(json!({"type": "subscribe", "id": "s", "query": "SELECT * FROM todos"}))
        .await;
    ws.expect("subscribed").await;
    ws.expect("snapshot").await;
    let started = std::time::Instant::now();
    let closed = loop {
        match ws.next().await {
            edge_common::server::Got::Msg(m) if m["type"] == "error" => {
                assert_eq!(m["code"], "token_expired", "{m}");
            }
            edge_common::server::Got::Msg(_) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(closed, edge_common::server::Got::Close(Some((1008, ref r))) if r == "token_expired"),
        "{closed:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    let r = reqwest::Client::new()
        .post(s.url("/v1/pull"))
        .bearer_auth(&tok)
        .json(&json!({"site_id": site(93).to_string(), "subscriptions": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    s.stop().await;
}
