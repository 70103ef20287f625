//! Schema evolution (docs/PROTOCOL.md §5.4, docs/SAAS.md "Schema
//! evolution"): `POST /v1/admin/schema` adds tables, columns and indexes
//! as a new schema version on every shard or refuses the change whole;
//! connected clients get a `schema` message before any change of the new
//! version and migrate their replica in place (rows, cursors and unpushed
//! writes kept); a client on an older version still pushes; a replica
//! behind migrates at its next `replica sync` round. A real server on
//! loopback, the real Rust client.

mod edge_common;

use std::time::{Duration, Instant};

use edge_common::server::{SCHEMA, TestServer, local_changes, service_token, site, user_token};
use serde_json::{Value as Json, json};
use tenantsync_client::{ClientConfig, Event, HttpClient, Replica, RoundOptions, SyncClient};
use tenantsync_core::Value;
use tenantsync_protocol::http::PushRequest;

const ADD_DUE: &str = "ALTER TABLE todos ADD COLUMN due TEXT;
CREATE INDEX todos_due ON todos (tenant_id, due);";

/// Posts a schema change: the status and the body.
async fn change(s: &TestServer, sql: &str) -> (u16, Json) {
    let r = reqwest::Client::new()
        .post(s.url("/v1/admin/schema"))
        .bearer_auth(service_token())
        .json(&json!({ "schema_sql": sql }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn get_schema(s: &TestServer) -> Json {
    reqwest::Client::new()
        .get(s.url("/v1/schema"))
        .bearer_auth(user_token("alice", "acme"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn columns(schema: &Json, table: &str) -> Vec<String> {
    schema["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == table)
        .map(|t| {
            t["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_a_new_version_with_the_script_a_replica_runs() {
    let s = TestServer::start().await;
    assert_eq!(get_schema(&s).await["schema_version"], 1);
    let (code, body) = change(
        &s,
        &format!(
            "{ADD_DUE}
             CREATE TABLE tags (id INTEGER PRIMARY KEY NOT NULL, tenant_id TEXT, name TEXT);
             SELECT crsql_as_crr('tags');"
        ),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["schema_version"], 2);
    assert_eq!(body["changed"], true);
    assert_eq!(body["applied"].as_array().unwrap().len(), 4, "{body}");
    let schema = get_schema(&s).await;
    assert_eq!(schema["schema_version"], 2);
    assert_eq!(
        columns(&schema, "todos").last().map(String::as_str),
        Some("due")
    );
    assert_eq!(columns(&schema, "tags"), ["id", "tenant_id", "name"]);
    let migrations = schema["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 2);
    assert_eq!(migrations[0]["version"], 1);
    let script = migrations[1]["sql"].as_str().unwrap();
    assert!(
        script.starts_with(
            "SELECT crsql_begin_alter('todos');\nALTER TABLE todos ADD COLUMN due TEXT;\nSELECT crsql_commit_alter('todos');\n"
        ),
        "{script}"
    );
    // The whole script a new replica runs is every version's, in order.
    assert_eq!(
        schema["schema_sql"].as_str().unwrap(),
        format!("{}{script}", migrations[0]["sql"].as_str().unwrap())
    );

    // The same change again: everything exists, nothing changes.
    let (code, body) = change(&s, ADD_DUE).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (&body["schema_version"], &body["changed"]),
        (&json!(2), &json!(false))
    );
    assert_eq!(body["skipped"].as_array().unwrap().len(), 2, "{body}");
    // So is the schema file a server started with (every statement exists).
    let (_, body) = change(&s, SCHEMA).await;
    assert_eq!(body["changed"], false, "{body}");

    // Indexes can go; the service SQL sees the new column.
    let (code, body) = change(&s, "DROP INDEX todos_due").await;
    assert_eq!((code, &body["schema_version"]), (200, &json!(3)), "{body}");
    s.sql("INSERT INTO todos (id, tenant_id, owner, title, due) VALUES (1, 'acme', 'alice', 'a', 'friday')")
        .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_changes_are_refused_whole_with_the_reason() {
    let s = TestServer::start().await;
    let cases: &[(&str, &str)] = &[
        ("ALTER TABLE todos DROP COLUMN title", "todos.title"),
        (
            "ALTER TABLE todos RENAME COLUMN title TO name",
            "todos.title",
        ),
        ("ALTER TABLE todos RENAME TO tasks", "todos"),
        ("DROP TABLE todos", "drops todos"),
        ("SELECT crsql_as_table('todos')", "crsql_as_table"),
        ("SELECT crsql_begin_alter('todos')", "crsql_begin_alter"),
        (
            "INSERT INTO todos (id, tenant_id) VALUES (9, 'acme')",
            "writes rows of todos",
        ),
        ("UPDATE todos SET title = 'x'", "writes rows of todos"),
        (
            "CREATE TRIGGER t AFTER INSERT ON todos BEGIN SELECT 1; END",
            "a trigger",
        ),
        ("DROP TABLE tenantsync_peers", "tenantsync_peers"),
        ("PRAGMA user_version = 3", "PRAGMA"),
        (
            "CREATE TABLE copy AS SELECT * FROM todos",
            "copies rows of todos",
        ),
        (
            "ALTER TABLE todos ADD COLUMN list_ref INTEGER REFERENCES lists (id)",
            "REFERENCES",
        ),
        (
            "CREATE UNIQUE INDEX todos_title ON todos (title)",
            "unique index \"todos_title\" on (title)",
        ),
        ("CREATE TABLE broken (", "statement 1"),
        (
            "ALTER TABLE todos ADD COLUMN due TEXT NOT NULL",
            "statement 1",
        ),
        // The first statement would be fine: nothing of the change stays.
        (
            "ALTER TABLE todos ADD COLUMN due TEXT; DROP TABLE lists",
            "statement 2",
        ),
    ];
    for (sql, names) in cases {
        let (code, body) = change(&s, sql).await;
        assert_eq!(code, 400, "{sql}: {body}");
        assert_eq!(body["code"], "schema_refused", "{sql}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(names), "{sql}: {message}");
    }
    let schema = get_schema(&s).await;
    assert_eq!(schema["schema_version"], 1);
    assert!(!columns(&schema, "todos").contains(&"due".to_owned()));
    assert_eq!(
        s.sql("SELECT count(*) FROM pragma_table_info('todos') WHERE name = 'due'")
            .await["results"][0]["rows"],
        json!([[0]])
    );
    // The refused changes left the core's tracking as it was: a write
    // after them is tracked and delivered whole.
    s.sql("INSERT INTO todos (id, tenant_id, owner, title) VALUES (5, 'acme', 'alice', 'after')")
        .await;
    let pull: Json = reqwest::Client::new()
        .post(s.url("/v1/pull"))
        .bearer_auth(user_token("alice", "acme"))
        .json(&json!({"site_id": site(9).to_string(), "subscriptions": [
            {"id": "t", "query": "SELECT * FROM todos"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let changes = pull["subs"]["t"]["changes"].as_array().unwrap();
    assert!(
        changes.iter().any(|c| c[2] == "title" && c[3] == "after"),
        "{pull}"
    );
    assert!(!changes.iter().any(|c| c[2] == "due"), "{pull}");
    // Only the service role changes the schema.
    let r = reqwest::Client::new()
        .post(s.url("/v1/admin/schema"))
        .bearer_auth(user_token("alice", "acme"))
        .json(&json!({ "schema_sql": ADD_DUE }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_message_comes_before_any_change_of_the_new_version() {
    let s = TestServer::start().await;
    s.sql("INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'a')")
        .await;
    let alice = user_token("alice", "acme");
    let mut ws = s.ws(Some(&alice)).await;
    let welcome = ws.open(site(1), Some(&alice)).await;
    assert_eq!(welcome["schema_version"], 1);
    ws.send(json!({"type": "subscribe", "id": "todos", "query": "SELECT * FROM todos"}))
        .await;
    ws.expect("subscribed").await;
    let snap = ws.expect("snapshot").await;
    assert_eq!(snap["last"], true);

    let (code, body) = change(&s, ADD_DUE).await;
    assert_eq!(code, 200, "{body}");
    s.sql("UPDATE todos SET due = 'friday' WHERE id = 1").await;
    let m = ws.msg().await;
    assert_eq!(m["type"], "schema", "{m}");
    assert_eq!(m["schema_version"], 2);
    // It carries the new version's migration: no other request is needed.
    assert_eq!(m["migrations"].as_array().unwrap().len(), 1, "{m}");
    assert_eq!(m["migrations"][0]["version"], 2);
    assert!(
        m["migrations"][0]["sql"]
            .as_str()
            .unwrap()
            .contains("ALTER TABLE todos ADD COLUMN due TEXT"),
        "{m}"
    );
    let m = ws.expect("changes").await;
    let changes = m["subs"]["todos"]["changes"].as_array().unwrap();
    assert!(
        changes.iter().any(|c| c[2] == "due" && c[3] == "friday"),
        "{m}"
    );
    // A new connection hears the version at welcome, with the migrations
    // above the version its hello says it has; pulls carry the version.
    let mut other = s.ws(Some(&alice)).await;
    let mut hello = edge_common::server::hello(site(2), Some(&alice));
    hello["schema_version"] = json!(1);
    other.send(hello).await;
    let w = other.expect("welcome").await;
    assert_eq!(w["schema_version"], 2);
    assert_eq!(w["migrations"].as_array().unwrap().len(), 1, "{w}");
    let mut fresh = s.ws(Some(&alice)).await;
    let mut hello = edge_common::server::hello(site(4), Some(&alice));
    hello["schema_version"] = json!(0);
    fresh.send(hello).await;
    let w = fresh.expect("welcome").await;
    assert_eq!(
        w["migrations"].as_array().unwrap().len(),
        2,
        "a new replica gets them all: {w}"
    );
    let mut legacy = s.ws(Some(&alice)).await;
    let w = legacy.open(site(5), Some(&alice)).await;
    assert_eq!(w["schema_version"], 2);
    assert!(
        w.get("migrations").is_none(),
        "a hello without a version gets none: {w}"
    );
    let pull: Json = reqwest::Client::new()
        .post(s.url("/v1/pull"))
        .bearer_auth(&alice)
        .json(&json!({"site_id": site(3).to_string(), "subscriptions": [
            {"id": "t", "query": "SELECT * FROM todos"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pull["schema_version"], 2, "{pull}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_from_a_replica_on_the_older_version_is_taken() {
    let s = TestServer::start().await;
    let (code, body) = change(&s, ADD_DUE).await;
    assert_eq!(code, 200, "{body}");
    // Written on a replica that has the first version's columns only.
    let (to, changes) = local_changes(
        site(1),
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'old')",
    );
    let r = reqwest::Client::new()
        .post(s.url("/v1/push"))
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
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        s.sql("SELECT title, due FROM todos").await["results"][0]["rows"],
        json!([["old", null]])
    );
    s.stop().await;
}

fn client(s: &TestServer, sub: &str, tenant: &str) -> SyncClient {
    let mut cfg = ClientConfig::new(s.url(""), user_token(sub, tenant));
    cfg.poll_interval = Some(Duration::from_millis(50));
    cfg.backoff_min = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    SyncClient::start(Replica::open_in_memory().unwrap(), cfg)
}

async fn rows(c: &SyncClient, sql: &str) -> Vec<Vec<Value>> {
    let sql = sql.to_owned();
    c.read(move |r| {
        let conn = r.conn().conn();
        let mut stmt = conn.prepare(&sql)?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |row| (0..n).map(|i| row.get::<_, Value>(i)).collect())?
            .collect::<rusqlite::Result<Vec<Vec<Value>>>>()?;
        Ok(rows)
    })
    .await
    .unwrap()
}

/// Waits until `sql` on `c` answers `expected`.
async fn until(c: &SyncClient, sql: &str, expected: Vec<Vec<Value>>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = rows(c, sql).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: expected {expected:?}, have {now:?}; status {:?}",
            c.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn settled(c: &SyncClient) {
    c.wait_until(Duration::from_secs(20), |s| {
        s.connected && !s.unpushed && s.cursors.keys().all(|k| s.live.contains(k))
    })
    .await
    .unwrap_or_else(|s| panic!("not settled: {s:?}"));
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_clients_migrate_in_place_keeping_rows_cursors_and_unpushed_writes() {
    let s = TestServer::start().await;
    let laptop = client(&s, "alice", "acme");
    let phone = client(&s, "alice", "acme");
    for c in [&laptop, &phone] {
        c.subscribe("todos", "SELECT * FROM todos").await.unwrap();
        settled(c).await;
    }
    laptop
        .write(|c| {
            c.execute_batch(
                "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'milk')",
            )
        })
        .await
        .unwrap();
    until(&phone, "SELECT title FROM todos", vec![vec![text("milk")]]).await;
    settled(&laptop).await;
    let cursor_before = laptop.status().cursors["todos"];
    // The phone goes offline and writes on the old schema.
    phone.set_online(false);
    phone
        .wait_until(Duration::from_secs(10), |st| !st.connected)
        .await
        .unwrap();
    phone
        .write(|c| {
            c.execute_batch(
                "INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'alice', 'eggs')",
            )
        })
        .await
        .unwrap();
    let mut events = laptop.events();

    let (code, body) = change(&s, ADD_DUE).await;
    assert_eq!(code, 200, "{body}");
    // The connected laptop migrates without reconnecting or resyncing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let e = tokio::time::timeout_at(deadline.into(), events.recv())
            .await
            .expect("a migration event")
            .unwrap();
        match e {
            Event::SchemaMigrated { from, to } => {
                assert_eq!((from, to), (1, 2));
                break;
            }
            Event::Disconnected { reason, .. } => panic!("disconnected: {reason}"),
            Event::Resync { sub, cursor } => panic!("resync of {sub} from {cursor}"),
            _ => {}
        }
    }
    s.sql("UPDATE todos SET due = 'friday' WHERE id = 1").await;
    until(
        &laptop,
        "SELECT title, due FROM todos",
        vec![vec![text("milk"), text("friday")]],
    )
    .await;
    laptop
        .wait_until(Duration::from_secs(10), |st| {
            st.cursors["todos"] > cursor_before
        })
        .await
        .unwrap();
    assert_eq!(laptop.status().sessions, 1, "{:?}", laptop.status());
    // Writes of the new column go up.
    laptop
        .write(|c| c.execute_batch("UPDATE todos SET due = 'monday' WHERE id = 1"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.sql("SELECT due FROM todos WHERE id = 1").await["results"][0]["rows"]
        != json!([["monday"]])
    {
        assert!(
            Instant::now() < deadline,
            "the new column's write never arrived: {:?}",
            laptop.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The phone comes back: migrates at welcome, pushes its old write.
    phone.set_online(true);
    settled(&phone).await;
    until(
        &phone,
        "SELECT id, title, due FROM todos ORDER BY id",
        vec![
            vec![Value::Integer(1), text("milk"), text("monday")],
            vec![Value::Integer(2), text("eggs"), Value::Null],
        ],
    )
    .await;
    until(
        &laptop,
        "SELECT id, title FROM todos ORDER BY id",
        vec![
            vec![Value::Integer(1), text("milk")],
            vec![Value::Integer(2), text("eggs")],
        ],
    )
    .await;
    for c in [&laptop, &phone] {
        let v = c.read(|r| r.schema_version()).await.unwrap();
        assert_eq!(v, 2);
        assert_eq!(c.status().pushes_refused, 0);
    }
    laptop.close().await.unwrap();
    phone.close().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sync_migrates_a_replica_behind_and_pushes_what_it_wrote_before() {
    let s = TestServer::start().await;
    let replica = tenantsync_client::ReplicaHandle::spawn(Replica::open_in_memory().unwrap());
    let http = HttpClient::new(&s.url(""), &user_token("alice", "acme")).unwrap();
    let opts = RoundOptions {
        subscriptions: vec![("todos".into(), "SELECT * FROM todos".into())],
        ..RoundOptions::default()
    };
    let first = tenantsync_client::sync_round(&replica, &http, &opts)
        .await
        .unwrap();
    assert!(first.schema_applied);
    assert_eq!(first.schema_version, 1);
    replica
        .call(|r| {
            r.conn().conn().execute_batch(
                "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'mine')",
            )
        })
        .await
        .unwrap()
        .unwrap();
    let (code, body) = change(&s, ADD_DUE).await;
    assert_eq!(code, 200, "{body}");
    s.sql("INSERT INTO todos (id, tenant_id, owner, title, due) VALUES (2, 'acme', 'alice', 'theirs', 'soon')")
        .await;
    let second = tenantsync_client::sync_round(&replica, &http, &opts)
        .await
        .unwrap();
    assert_eq!(second.migrated_from, Some(1), "{second:?}");
    assert_eq!(second.schema_version, 2);
    // The six non-key columns of the row it wrote; `due` kept its default.
    assert_eq!(second.pushed_changes, 6, "{second:?}");
    let got = replica
        .call(|r| {
            let mut st = r
                .conn()
                .conn()
                .prepare("SELECT id, title, due FROM todos ORDER BY id")
                .unwrap();
            st.query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
        })
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            (1, "mine".to_owned(), None),
            (2, "theirs".to_owned(), Some("soon".to_owned()))
        ]
    );
    s.stop().await;
}

#[test]
fn the_replica_refuses_migrations_with_a_hole() {
    let mut r = Replica::open_in_memory().unwrap();
    r.apply_schema(SCHEMA).unwrap();
    let schema = tenantsync_protocol::http::SchemaResponse {
        schema_version: 3,
        schema_sql: String::new(),
        migrations: vec![tenantsync_protocol::http::SchemaMigration {
            version: 3,
            sql: "CREATE TABLE x (id INTEGER PRIMARY KEY)".into(),
        }],
        tables: Vec::new(),
    };
    let e = r.migrate(&schema).unwrap_err().to_string();
    assert!(e.contains("skip from version 1 to 3"), "{e}");
    assert_eq!(r.schema_version().unwrap(), 1, "nothing applied");
}
