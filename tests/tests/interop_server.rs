//! A real cr-sqlite 0.16.0 peer (the `@vlcn.io/crsqlite-wasm` build under
//! Node, `tests/interop/peer.mjs`) as a client of a real tenantsync server
//! on 127.0.0.1:0, through the protocol's HTTP endpoints: it gets the schema,
//! pulls a subscription (`/v1/pull`) and merges the changes into its
//! `crsql_changes`, writes locally, pushes its own `crsql_changes` rows since
//! its pushed version under its own site id (`/v1/push`); a Rust
//! `tenantsync-client` replica of another device sees them, and the other
//! way round. The test relays: it carries the server's JSON to the Node
//! process and back through the existing harness, so every byte that
//! reaches the database is what the protocol carried.
//!
//! Evictions: cr-sqlite has no eviction API, and a local DELETE would
//! spread as a delete. The peer applies an eviction the way tenantsync's
//! core does, with what the real build allows (docs/arch/interop.md,
//! "A cr-sqlite peer of a tenantsync server"): in one transaction, with
//! `crsql_internal_sync_bit(1)` (its own triggers do not fire), it raises
//! `crsql_master.pre_compact_dbversion` to `crsql_db_version()` (so its
//! db_version never goes back when the row's clocks go), deletes the row,
//! its clock rows and its lookaside key, and clears the bit. The row is
//! forgotten, as if never received: no tombstone, nothing to push, and a
//! later re-entry merges as a new row.

use std::net::SocketAddr;

use serde_json::json;
use tenantsync_client::{HttpClient, PushAnswer, Replica};
use tenantsync_core::{Change, SiteId, Value};
use tenantsync_policy::Identity;
use tenantsync_protocol::RowKey;
use tenantsync_protocol::http::{
    PullRequest, PullResponse, PullSub, PushRequest, SqlRequest, SqlStatement,
};
use tenantsync_server::app::{AppState, Server};
use tenantsync_server::auth::{Authenticator, JwtKey, JwtSettings};
use tenantsync_server::config::EdgeSettings;
use tenantsync_server::{Principal, ServiceConfig, SyncService, Synchronous};
use tenantsync_tests::{RealCrsqlite, RealPeer};
use tenantsync_verify::Truth;
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = include_str!("../../examples/schema.sql");
const POLICY: &str = include_str!("../../examples/policy.sql");
const SECRET: &[u8] = b"interop server test secret, 32 B";
const TODOS: &str = "SELECT * FROM todos";

fn token(sub: &str, tenant: &str) -> String {
    let claims =
        json!({"sub": sub, "role": "authenticated", "tenant_id": tenant, "exp": 4_000_000_000u64});
    tenantsync_server::auth::mint_hs256(SECRET, claims.as_object().unwrap()).unwrap()
}

/// The cr-sqlite peer's side of the protocol: its database in the Node
/// process, its cursor and pushed version.
struct CrPeer {
    db: RealPeer,
    site: SiteId,
    cursor: Option<i64>,
    pushed: i64,
    http: HttpClient,
}

impl CrPeer {
    async fn pull(&mut self) -> PullResponse {
        let resp = self
            .http
            .pull(&PullRequest {
                site_id: self.site,
                subscriptions: vec![PullSub {
                    id: "todos".into(),
                    query: TODOS.into(),
                    cursor: self.cursor,
                }],
                wait_ms: 0,
                unsubscribe: vec![],
            })
            .await
            .unwrap();
        let part = &resp.subs["todos"];
        assert!(!part.reset || self.cursor.is_none(), "a refetch: {resp:?}");
        self.db.apply(&part.changes).unwrap();
        for k in &part.evict {
            self.evict(k);
        }
        self.cursor = Some(resp.version);
        resp
    }

    /// An eviction: forget the row without recording a delete.
    fn evict(&self, k: &RowKey) {
        assert_eq!(k.table, "todos");
        let pk = [Value::Blob(k.pk.0.clone())];
        let db = &self.db;
        db.exec("BEGIN").unwrap();
        db.query("SELECT crsql_internal_sync_bit(1)", &[]).unwrap();
        db.exec("INSERT OR REPLACE INTO crsql_master (key, value) VALUES ('pre_compact_dbversion', crsql_db_version())")
            .unwrap();
        db.query("DELETE FROM todos WHERE crsql_pack_columns(id) = ?", &pk)
            .unwrap();
        db.query(
            "DELETE FROM todos__crsql_clock WHERE key IN (SELECT __crsql_key FROM todos__crsql_pks WHERE crsql_pack_columns(id) = ?)",
            &pk,
        )
        .unwrap();
        db.query(
            "DELETE FROM todos__crsql_pks WHERE crsql_pack_columns(id) = ?",
            &pk,
        )
        .unwrap();
        db.query("SELECT crsql_internal_sync_bit(0)", &[]).unwrap();
        db.exec("COMMIT").unwrap();
    }

    /// Pushes its own changes since `pushed` (PROTOCOL.md §7).
    async fn push(&mut self) -> usize {
        let to = self.db.db_version().unwrap();
        if to <= self.pushed {
            return 0;
        }
        let changes: Vec<Change> = self
            .db
            .changes_since(self.pushed, None)
            .unwrap()
            .into_iter()
            .filter(|c| c.site_id == self.site && c.db_version <= to)
            .collect();
        let n = changes.len();
        let answer = self
            .http
            .push(&PushRequest {
                site_id: self.site,
                from: self.pushed,
                to,
                changes,
            })
            .await
            .unwrap();
        match answer {
            PushAnswer::Ok(r) => self.pushed = r.pushed_version,
            PushAnswer::Refused(r) => panic!("the cr-sqlite peer's push was refused: {r:?}"),
        }
        n
    }

    fn todos(&self) -> Vec<Vec<Value>> {
        self.db
            .query("SELECT * FROM todos ORDER BY id", &[])
            .unwrap()
    }
}

async fn rust_round(http: &HttpClient, r: &mut Replica) {
    while let Some(batch) = r.next_push(1 << 20).unwrap() {
        match http.push(&batch.to_http(r.site_id())).await.unwrap() {
            PushAnswer::Ok(ok) => r.push_ok(ok.pushed_version, ok.server_version).unwrap(),
            PushAnswer::Refused(x) => panic!("refused: {x:?}"),
        }
    }
    let sub = r.subscription("todos").unwrap().unwrap();
    let resp = http
        .pull(&PullRequest {
            site_id: r.site_id(),
            subscriptions: vec![PullSub {
                id: "todos".into(),
                query: TODOS.into(),
                cursor: sub.cursor,
            }],
            wait_ms: 0,
            unsubscribe: vec![],
        })
        .await
        .unwrap();
    r.apply_pull(&resp).unwrap();
}

fn todos(r: &Replica) -> Vec<Vec<Value>> {
    let mut st = r
        .conn()
        .conn()
        .prepare("SELECT * FROM todos ORDER BY id")
        .unwrap();
    let n = st.column_count();
    st.query_map([], |row| (0..n).map(|i| row.get::<_, Value>(i)).collect())
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_cr_sqlite_peer_syncs_through_the_protocol() {
    // The server.
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("server.db");
    let mut config = ServiceConfig::new(&db_path, SCHEMA, "policy.sql", POLICY);
    config.synchronous = Synchronous::Normal;
    let service = tokio::task::spawn_blocking(move || SyncService::start(config))
        .await
        .unwrap()
        .unwrap();
    let auth = Authenticator::new(&JwtSettings {
        key: JwtKey::Secret(SECRET.to_vec()),
        leeway_secs: 0,
        audience: None,
        issuer: None,
        tenant_claim: "tenant_id".into(),
    })
    .unwrap();
    let state = AppState::new(service.clone(), auth, EdgeSettings::default(), None);
    let server = Server::bind("127.0.0.1:0".parse::<SocketAddr>().unwrap(), state)
        .await
        .unwrap();
    let url = format!("http://{}", server.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone().cancelled_owned()));
    let backend = {
        let serde_json::Value::Object(m) =
            json!({"sub": "backend", "role": "service", "exp": 4_000_000_000u64})
        else {
            unreachable!()
        };
        Principal::from_claims(m, "tenant_id")
    };
    let sql = |s: &str| SqlRequest {
        statements: vec![SqlStatement {
            sql: s.into(),
            params: vec![],
        }],
        tenant: None,
    };
    service
        .sql(
            &backend,
            sql(
                "INSERT INTO todos (id, tenant_id, list_id, owner, title, done, priority) VALUES
                 (1, 'acme', 1, 'alice', 'one', 0, 1.5), (2, 'acme', 1, 'alice', x'00ff', 1, NULL),
                 (3, 'globex', 3, 'carol', 'not yours', 0, 1)",
            ),
        )
        .await
        .unwrap();

    // The cr-sqlite peer: schema from the server, then a pull.
    let real = RealCrsqlite::spawn().unwrap();
    let db = real.open().unwrap();
    let http = HttpClient::new(&url, &token("alice", "acme")).unwrap();
    db.exec(&http.schema().await.unwrap().schema_sql).unwrap();
    let site = db.site_id().unwrap();
    let mut peer = CrPeer {
        db,
        site,
        cursor: None,
        pushed: 0,
        http: http.clone(),
    };
    peer.pull().await;
    let truth = Truth::open(&db_path, "policy.sql", POLICY).unwrap();
    let alice =
        Identity::from_json(r#"{"sub": "alice", "role": "authenticated", "tenant_id": "acme"}"#)
            .unwrap();
    let visible = |truth: &Truth| -> Vec<Vec<Value>> {
        truth
            .visible(&alice, TODOS)
            .unwrap()
            .into_values()
            .collect()
    };
    assert_eq!(peer.todos(), visible(&truth));
    assert_eq!(peer.todos().len(), 2);

    // A Rust replica of another device of alice's.
    let mut rust = Replica::open_in_memory().unwrap();
    rust.apply_schema(&http.schema().await.unwrap().schema_sql)
        .unwrap();
    rust.add_subscription("todos", TODOS).unwrap();
    rust_round(&http, &mut rust).await;
    assert_eq!(todos(&rust), peer.todos());

    // The cr-sqlite peer writes and pushes; the Rust replica sees it.
    peer.db
        .exec("INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (10, 'acme', 1, 'alice', 'from cr-sqlite'); UPDATE todos SET done = 1 WHERE id = 1")
        .unwrap();
    assert!(peer.push().await > 0);
    rust_round(&http, &mut rust).await;
    assert_eq!(todos(&rust), visible(&truth));
    assert_eq!(
        todos(&rust)
            .iter()
            .find(|r| r[0] == Value::Integer(10))
            .unwrap()[4],
        Value::Text("from cr-sqlite".into())
    );
    // And the other way: the Rust replica edits, the peer pulls.
    rust.conn()
        .conn()
        .execute_batch("UPDATE todos SET title = 'from rust', priority = 2.25 WHERE id = 10; DELETE FROM todos WHERE id = 2")
        .unwrap();
    rust_round(&http, &mut rust).await;
    peer.pull().await;
    assert_eq!(peer.todos(), todos(&rust));
    assert_eq!(peer.todos(), visible(&truth));
    // Its own changes that came back are duplicates: pushing them again
    // changes nothing on the server.
    let v = service.db_version();
    peer.push().await;
    peer.pull().await;
    assert_eq!(peer.todos(), visible(&truth));
    assert!(
        service.db_version() <= v + 1,
        "{} -> {}",
        v,
        service.db_version()
    );

    // An eviction: the backend moves todo 1 to globex. It leaves the peer
    // (forgotten, not deleted), stays on the server, and the peer's next
    // push spreads no delete.
    service
        .sql(
            &backend,
            sql("UPDATE todos SET tenant_id = 'globex', owner = 'carol' WHERE id = 1"),
        )
        .await
        .unwrap();
    let resp = peer.pull().await;
    assert_eq!(resp.subs["todos"].evict.len(), 1, "{resp:?}");
    assert_eq!(peer.todos(), visible(&truth));
    assert!(
        peer.db
            .change_rows("WHERE pk = crsql_pack_columns(1)", &[])
            .unwrap()
            .is_empty()
    );
    let version_before = peer.db.db_version().unwrap();
    peer.db
        .exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (11, 'acme', 'alice', 'after the eviction')")
        .unwrap();
    assert!(peer.db.db_version().unwrap() > version_before);
    assert_eq!(peer.push().await, 6, "only the new row's changes");
    let moved = service
        .sql(
            &backend,
            sql("SELECT tenant_id, owner, title FROM todos WHERE id = 1"),
        )
        .await
        .unwrap();
    assert_eq!(
        moved.results[0].rows,
        vec![vec![
            Value::Text("globex".into()),
            Value::Text("carol".into()),
            Value::Text("one".into())
        ]]
    );
    // It comes back whole when it moves back.
    service
        .sql(
            &backend,
            sql("UPDATE todos SET tenant_id = 'acme', owner = 'alice' WHERE id = 1"),
        )
        .await
        .unwrap();
    peer.pull().await;
    rust_round(&http, &mut rust).await;
    assert_eq!(peer.todos(), visible(&truth));
    assert_eq!(todos(&rust), peer.todos());
    let check = truth.check(&alice, &rust).unwrap();
    assert!(check.ok(), "{check:?}");

    stop.cancel();
    let _ = task.await;
}
