//! The client's `Replica` against the real sync engine, in process: the
//! engine's `Session`/`Outbox` stand where the WebSocket edge will, and a
//! small driver does what the WebSocket client does with each message
//! (the same `Replica` calls, in the same order). The same flows over real
//! sockets are in `client_e2e.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tenantsync_client::{PushBatch, Replica};
use tenantsync_core::Value;
use tenantsync_protocol::ws::{ClientMsg, ServerMsg};
use tenantsync_protocol::{ErrorCode, SubscribeMode};
use tenantsync_server::{
    OutFrame, Outbox, Principal, ServiceConfig, Session, SyncService, Synchronous,
};

const SCHEMA: &str = include_str!("../../examples/schema.sql");
const POLICY: &str = include_str!("../../examples/policy.sql");

fn principal(sub: &str, tenant: &str) -> Principal {
    let serde_json::Value::Object(m) =
        json!({"sub": sub, "role": "authenticated", "tenant_id": tenant, "exp": 4_000_000_000u64})
    else {
        unreachable!()
    };
    Principal::from_claims(m, "tenant_id")
}

struct Server {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    service: SyncService,
}

fn config(path: &std::path::Path) -> ServiceConfig {
    let mut c = ServiceConfig::new(path, SCHEMA, "policy.sql", POLICY);
    c.synchronous = Synchronous::Normal;
    c
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let service = SyncService::start(config(&path)).unwrap();
        Server {
            _dir: dir,
            path,
            service,
        }
    }

    async fn restart(self) -> Server {
        self.service.shutdown(Duration::from_secs(10)).await;
        let Server {
            _dir,
            path,
            service,
        } = self;
        drop(service);
        let service = SyncService::start(config(&path)).unwrap();
        Server {
            _dir,
            path,
            service,
        }
    }
}

/// A peer: a client `Replica` and, when connected, an engine session.
struct Peer {
    who: Principal,
    replica: Replica,
    conn: Option<(Session, Outbox)>,
    inflight: Option<(String, PushBatch)>,
    pushes: u64,
    max_bytes: usize,
    /// Non-data answers (push_ok, push_refused, errors).
    log: Vec<ServerMsg>,
    /// The mode of every `subscribed`, in order.
    modes: Vec<(String, SubscribeMode)>,
}

impl Peer {
    fn new(server: &Server, sub: &str, tenant: &str) -> Peer {
        let mut replica = Replica::open_in_memory().unwrap();
        assert!(replica.is_new().unwrap());
        replica
            .apply_schema(&server.service.schema().schema_sql)
            .unwrap();
        Peer {
            who: principal(sub, tenant),
            replica,
            conn: None,
            inflight: None,
            pushes: 0,
            max_bytes: tenantsync_protocol::DEFAULT_MAX_MESSAGE_BYTES,
            log: Vec::new(),
            modes: Vec::new(),
        }
    }

    /// hello/welcome, resubscribe with cursors, push what is pending.
    async fn connect(&mut self, server: &Server) {
        let site = self.replica.site_id();
        let (session, outbox) = server
            .service
            .open_session(self.who.clone(), site, Some("client_engine".into()), None)
            .await
            .unwrap();
        self.conn = Some((session, outbox));
        match self.frame(Duration::from_secs(5)).await.expect("welcome") {
            ServerMsg::Welcome {
                peer,
                limits,
                server_site_id,
                db_version,
                ..
            } => {
                assert_eq!(peer.site_id, site);
                self.max_bytes = limits.max_message_bytes;
                self.replica.drop_staged();
                self.replica.push_abandoned();
                self.replica.set_server_site_id(server_site_id).unwrap();
                self.replica
                    .set_pushed_version(peer.pushed_version, db_version)
                    .unwrap();
            }
            other => panic!("expected welcome, got {other:?}"),
        }
        self.inflight = None;
        for s in self.replica.subscriptions().unwrap() {
            self.send(ClientMsg::Subscribe {
                id: s.id,
                query: s.query,
                cursor: s.cursor,
            })
            .await;
        }
        self.push().await;
    }

    fn disconnect(&mut self) {
        self.conn = None;
        self.inflight = None;
        self.replica.push_abandoned();
        self.replica.drop_staged();
    }

    async fn subscribe(&mut self, id: &str, query: &str) {
        self.replica.add_subscription(id, query).unwrap();
        let cursor = self.replica.subscription(id).unwrap().unwrap().cursor;
        self.send(ClientMsg::Subscribe {
            id: id.into(),
            query: query.into(),
            cursor,
        })
        .await;
    }

    async fn send(&mut self, m: ClientMsg) {
        let (s, _) = self.conn.as_mut().expect("connected");
        s.handle(m).await;
    }

    async fn frame(&mut self, wait: Duration) -> Option<ServerMsg> {
        let (_, outbox) = self.conn.as_mut()?;
        match tokio::time::timeout(wait, outbox.next()).await {
            Ok(Some(OutFrame::Text(t))) => {
                outbox.written();
                Some(serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")))
            }
            Ok(Some(OutFrame::Close { code, message })) => {
                panic!("session closed: {code}: {message}")
            }
            Ok(None) | Err(_) => None,
        }
    }

    /// Applies frames until none comes for 200 ms.
    async fn pump(&mut self) {
        while let Some(m) = self.frame(Duration::from_millis(200)).await {
            self.on(m).await;
        }
    }

    async fn push(&mut self) {
        if self.inflight.is_some() || self.conn.is_none() {
            return;
        }
        if let Some(batch) = self.replica.next_push(self.max_bytes).unwrap() {
            self.pushes += 1;
            let id = format!("p{}", self.pushes);
            self.send(batch.to_ws(id.clone())).await;
            self.inflight = Some((id, batch));
        }
    }

    async fn on(&mut self, m: ServerMsg) {
        match m {
            ServerMsg::Subscribed {
                id, table, mode, ..
            } => {
                self.replica.begin_sync(&id, &table).unwrap();
                self.modes.push((id, mode));
            }
            ServerMsg::Snapshot {
                sub,
                version,
                reset,
                changes,
                evict,
                last,
            } => {
                if let Some(r) = self
                    .replica
                    .apply_snapshot(&sub, version, reset, changes, evict, last)
                    .unwrap()
                {
                    self.send(ClientMsg::Ack {
                        cursors: r.cursors(),
                    })
                    .await;
                }
            }
            ServerMsg::Changes {
                version,
                subs,
                more,
            } => {
                if let Some(r) = self.replica.apply_changes(version, subs, more).unwrap() {
                    if !r.parts.is_empty() {
                        self.send(ClientMsg::Ack {
                            cursors: r.cursors(),
                        })
                        .await;
                    }
                    for g in r.gaps {
                        self.send(ClientMsg::Resync {
                            sub: g.sub,
                            cursor: g.cursor.unwrap_or(0),
                        })
                        .await;
                    }
                }
            }
            ServerMsg::PushOk {
                ref id,
                pushed_version,
                server_version,
            } => {
                assert_eq!(
                    self.inflight.as_ref().map(|x| x.0.as_str()),
                    Some(id.as_str())
                );
                self.inflight = None;
                self.replica
                    .push_ok(pushed_version, server_version)
                    .unwrap();
                self.replica.settle_pushed(server_version).unwrap();
                self.log.push(m);
                self.push().await;
            }
            ServerMsg::PushRefused(ref r) => {
                let (_, batch) = self.inflight.take().expect("a push in flight");
                let report = self.replica.push_refused(&batch, r).unwrap();
                for sub in report.refetch {
                    self.send(ClientMsg::Resync { sub, cursor: 0 }).await;
                }
                self.log.push(m);
                self.push().await;
            }
            other => self.log.push(other),
        }
    }

    fn rows(&self, sql: &str) -> Vec<Vec<Value>> {
        let conn = self.replica.conn().conn();
        let mut stmt = conn.prepare(sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    fn titles(&self) -> Vec<(i64, String)> {
        self.rows("SELECT id, title FROM todos ORDER BY id")
            .into_iter()
            .map(|r| match (&r[0], &r[1]) {
                (Value::Integer(i), Value::Text(t)) => (*i, t.clone()),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    async fn write(&mut self, sql: &str) {
        self.replica.conn().conn().execute_batch(sql).unwrap();
        self.push().await;
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_sync_through_the_engine_and_never_see_each_other() {
    let server = Server::start();
    let mut alice = Peer::new(&server, "alice", "acme");
    let mut bob = Peer::new(&server, "bob", "globex");
    alice.connect(&server).await;
    bob.connect(&server).await;
    alice.subscribe("todos", "SELECT * FROM todos").await;
    alice.subscribe("lists", "SELECT * FROM lists").await;
    bob.subscribe("todos", "SELECT * FROM todos").await;
    alice.pump().await;
    bob.pump().await;

    // Alice writes; her push is applied; bob sees nothing of it.
    alice
        .write(
            "INSERT INTO lists (id, tenant_id, owner, name) VALUES (1, 'acme', 'alice', 'groceries');
             INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (1, 'acme', 1, 'alice', 'milk');",
        )
        .await;
    alice.pump().await;
    bob.pump().await;
    assert!(
        matches!(alice.log.last(), Some(ServerMsg::PushOk { .. })),
        "{:?}",
        alice.log
    );
    assert!(!alice.replica.has_unpushed().unwrap());
    assert_eq!(alice.titles(), vec![(1, "milk".into())]);
    assert!(bob.titles().is_empty());

    // Bob writes into his tenant: alice never gets it.
    bob.write(
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'globex', 'bob', 'bolts')",
    )
    .await;
    bob.pump().await;
    alice.pump().await;
    assert_eq!(bob.titles(), vec![(2, "bolts".into())]);
    assert_eq!(alice.titles(), vec![(1, "milk".into())]);

    // A second device of alice (another site) gets her rows in its snapshot
    // and then her live changes.
    let mut phone = Peer::new(&server, "alice", "acme");
    phone.connect(&server).await;
    phone.subscribe("todos", "SELECT * FROM todos").await;
    phone.pump().await;
    assert_eq!(phone.titles(), vec![(1, "milk".into())]);
    alice
        .write("UPDATE todos SET title = 'oat milk' WHERE id = 1")
        .await;
    alice.pump().await;
    phone.pump().await;
    assert_eq!(phone.titles(), vec![(1, "oat milk".into())]);
    let cursors: BTreeMap<String, Option<i64>> = phone
        .replica
        .subscriptions()
        .unwrap()
        .into_iter()
        .map(|s| (s.id, s.cursor))
        .collect();
    assert!(cursors["todos"].is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_into_another_tenant_is_refused_quarantined_and_restored() {
    let server = Server::start();
    let mut alice = Peer::new(&server, "alice", "acme");
    let mut bob = Peer::new(&server, "bob", "globex");
    alice.connect(&server).await;
    bob.connect(&server).await;
    alice.subscribe("todos", "SELECT * FROM todos").await;
    bob.subscribe("todos", "SELECT * FROM todos").await;
    alice
        .write(
            "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'milk')",
        )
        .await;
    alice.pump().await;
    bob.pump().await;

    // Bob tries to write a row of acme's: refused whole.
    bob.write(
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (7, 'acme', 'bob', 'sneaky')",
    )
    .await;
    bob.pump().await;
    let refusal = bob
        .log
        .iter()
        .find_map(|m| match m {
            ServerMsg::PushRefused(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("refused: {:?}", bob.log));
    assert_eq!(refusal.code, ErrorCode::PolicyRefused);
    // Bob's replica: the row is gone (he may not see it on the server), the
    // change is in quarantine, nothing left to push.
    assert!(bob.titles().is_empty());
    let q = bob.replica.quarantine().unwrap();
    assert!(!q.is_empty());
    assert!(q.iter().any(|e| e.change.val == text("sneaky")));
    assert!(
        q.iter()
            .all(|e| e.code.as_deref() == Some("policy_refused"))
    );
    assert!(!bob.replica.has_unpushed().unwrap());
    // Nothing changed on the server: alice still has only her row.
    alice.pump().await;
    assert_eq!(alice.titles(), vec![(1, "milk".into())]);

    // Bob updating alice's row he cannot see is refused as well; and alice
    // editing someone else's row in her tenant that a policy protects is
    // restored to the server's state.
    let mut carol = Peer::new(&server, "carol", "acme");
    carol.connect(&server).await;
    carol.subscribe("lists", "SELECT * FROM lists").await;
    // Alice edits the list later: she holds it through a subscription (a
    // replica keeps only what its subscriptions hold, its own writes too).
    alice.subscribe("lists", "SELECT * FROM lists").await;
    alice
        .write("INSERT INTO lists (id, tenant_id, owner, name) VALUES (5, 'acme', 'alice', 'alice''s list')")
        .await;
    alice.pump().await;
    carol.pump().await;
    assert_eq!(
        carol.rows("SELECT id, name FROM lists"),
        vec![vec![Value::Integer(5), text("alice's list")]]
    );
    // Only the owner may change a list: carol's rename is refused, and her
    // replica gets the server's row back.
    carol
        .write("UPDATE lists SET name = 'mine now' WHERE id = 5")
        .await;
    carol.pump().await;
    assert!(
        carol
            .log
            .iter()
            .any(|m| matches!(m, ServerMsg::PushRefused(_))),
        "{:?}",
        carol.log
    );
    assert_eq!(
        carol.rows("SELECT id, name FROM lists"),
        vec![vec![Value::Integer(5), text("alice's list")]]
    );
    let q = carol.replica.quarantine().unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].change.val, text("mine now"));
    assert_eq!(q[0].command.as_deref(), Some("UPDATE"));
    assert!(!carol.replica.has_unpushed().unwrap());
    // The restored row is not pushed again, and later writes still are.
    alice
        .write("UPDATE lists SET name = 'shared' WHERE id = 5")
        .await;
    alice.pump().await;
    carol.pump().await;
    assert_eq!(
        carol.rows("SELECT id, name FROM lists"),
        vec![vec![Value::Integer(5), text("shared")]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moving_out_of_a_subscription_is_evicted_and_moves_back_in_whole() {
    let server = Server::start();
    let mut alice = Peer::new(&server, "alice", "acme");
    alice.connect(&server).await;
    alice
        .subscribe("l1", "SELECT * FROM todos WHERE list_id = 1")
        .await;
    alice
        .subscribe("l2", "SELECT * FROM todos WHERE list_id = 2")
        .await;
    alice
        .write(
            "INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (1, 'acme', 1, 'alice', 'a'), (2, 'acme', 1, 'alice', 'b')",
        )
        .await;
    alice.pump().await;
    let mut phone = Peer::new(&server, "alice", "acme");
    phone.connect(&server).await;
    phone
        .subscribe("l1", "SELECT * FROM todos WHERE list_id = 1")
        .await;
    phone.pump().await;
    assert_eq!(phone.titles(), vec![(1, "a".into()), (2, "b".into())]);
    // Row 2 moves to list 2: the phone (list 1 only) evicts it, locally,
    // without a delete; the laptop holds it in l2 now.
    alice
        .write("UPDATE todos SET list_id = 2 WHERE id = 2")
        .await;
    alice.pump().await;
    phone.pump().await;
    assert_eq!(phone.titles(), vec![(1, "a".into())]);
    assert!(!phone.replica.has_unpushed().unwrap());
    assert_eq!(alice.titles(), vec![(1, "a".into()), (2, "b".into())]);
    // And back: it arrives whole.
    alice
        .write("UPDATE todos SET list_id = 1, title = 'b2' WHERE id = 2")
        .await;
    alice.pump().await;
    phone.pump().await;
    assert_eq!(phone.titles(), vec![(1, "a".into()), (2, "b2".into())]);
    // A delete spreads as a delete.
    alice.write("DELETE FROM todos WHERE id = 1").await;
    alice.pump().await;
    phone.pump().await;
    assert_eq!(phone.titles(), vec![(2, "b2".into())]);
    let tomb = phone.rows(
        "SELECT cid, cl FROM crsql_changes WHERE pk = crsql_pack_columns(1) AND \"table\" = 'todos'",
    );
    assert_eq!(tomb, vec![vec![text("-1"), Value::Integer(2)]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_and_restarting_the_server_resume_from_the_persisted_cursors() {
    let mut server = Server::start();
    let mut alice = Peer::new(&server, "alice", "acme");
    let mut phone = Peer::new(&server, "alice", "acme");
    alice.connect(&server).await;
    phone.connect(&server).await;
    alice.subscribe("todos", "SELECT * FROM todos").await;
    phone.subscribe("todos", "SELECT * FROM todos").await;
    alice
        .write("INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'one')")
        .await;
    alice.pump().await;
    phone.pump().await;
    assert_eq!(phone.titles(), vec![(1, "one".into())]);

    // The phone goes offline; writes happen on both sides.
    phone.disconnect();
    alice
        .write("INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'alice', 'two')")
        .await;
    alice.pump().await;
    phone
        .replica
        .conn()
        .conn()
        .execute_batch("INSERT INTO todos (id, tenant_id, owner, title) VALUES (3, 'acme', 'alice', 'offline')")
        .unwrap();
    // Back online: it resumes (no snapshot), pushes its offline write.
    phone.modes.clear();
    phone.connect(&server).await;
    phone.pump().await;
    alice.pump().await;
    assert_eq!(
        phone.modes,
        vec![("todos".to_owned(), SubscribeMode::Resume)]
    );
    assert!(
        phone
            .log
            .iter()
            .any(|m| matches!(m, ServerMsg::PushOk { .. })),
        "{:?}",
        phone.log
    );
    assert_eq!(
        phone.titles(),
        vec![(1, "one".into()), (2, "two".into()), (3, "offline".into())]
    );
    assert_eq!(alice.titles(), phone.titles());

    // The server restarts; both reconnect and resume from their cursors.
    alice.disconnect();
    phone.disconnect();
    server = server.restart().await;
    phone.modes.clear();
    alice.connect(&server).await;
    phone.connect(&server).await;
    alice.pump().await;
    phone.pump().await;
    // The server persisted the acknowledged cursors at shutdown.
    assert_eq!(
        phone.modes,
        vec![("todos".to_owned(), SubscribeMode::Resume)]
    );
    alice
        .write("UPDATE todos SET title = 'after restart' WHERE id = 2")
        .await;
    alice.pump().await;
    phone.pump().await;
    assert_eq!(
        phone.titles(),
        vec![
            (1, "one".into()),
            (2, "after restart".into()),
            (3, "offline".into())
        ]
    );
    assert!(!phone.replica.has_unpushed().unwrap());
    assert!(!alice.replica.has_unpushed().unwrap());
}
