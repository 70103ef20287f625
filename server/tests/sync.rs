//! The engine end to end, in process: sessions driven with
//! `Session::handle`, frames read from `Outbox::next`, replicas checked
//! against the query + policy evaluated directly on the server database.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::ws::{ClientMsg, ServerMsg};

const SEED: &str = "
INSERT INTO lists VALUES (1, 't1', 'alice', 'alice''s'), (2, 't2', 'bob', 'bob''s'), (3, 't1', 'carol', 'carol''s');
INSERT INTO todos VALUES
  (1, 't1', 1, 'alice', 'a1', 0, 1), (2, 't1', 1, 'alice', 'a2', 0, 2),
  (10, 't2', 2, 'bob', 'b1', 0, 1), (11, 't2', 2, 'bob', 'b2', 0, 1),
  (20, 't1', 3, 'carol', 'c1', 0, 1);
";

async fn seeded() -> (Server, Truth) {
    let s = Server::start();
    s.sql_batch(SEED).await;
    let t = Truth::open(&s.path, POLICY);
    (s, t)
}

trait Batch {
    async fn sql_batch(&self, sql: &str);
}

impl Batch for Server {
    async fn sql_batch(&self, sql: &str) {
        for st in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            self.sql(st).await;
        }
    }
}

fn errors(r: &Replica) -> Vec<(ErrorCode, String)> {
    r.log
        .iter()
        .filter_map(|m| match m {
            ServerMsg::Error(e) => Some((e.code, e.message.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_never_see_each_other_through_snapshot_and_deltas() {
    let (s, truth) = seeded().await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    let mut bob = Replica::new(principal("bob", "t2"), site(2));
    for r in [&mut alice, &mut bob] {
        r.connect(&s.service).await;
        r.subscribe("all", "SELECT * FROM todos").await;
        r.subscribe("lists", "SELECT * FROM lists").await;
    }
    alice.pump().await;
    bob.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2]));
    assert_eq!(bob.todo_ids(), BTreeSet::from([10, 11]));
    check_replica(&truth, &alice);
    check_replica(&truth, &bob);
    // Deltas: writes in both tenants.
    s.sql("UPDATE todos SET title = 'x' WHERE id IN (1, 10)")
        .await;
    s.sql("INSERT INTO todos VALUES (3, 't1', 1, 'alice', 'a3', 0, 1), (12, 't2', 2, 'bob', 'b3', 0, 1)")
        .await;
    alice.pump().await;
    bob.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2, 3]));
    assert_eq!(bob.todo_ids(), BTreeSet::from([10, 11, 12]));
    check_replica(&truth, &alice);
    check_replica(&truth, &bob);
    // Nothing of the other tenant ever reached either replica.
    for (r, other) in [(&alice, [10, 11, 12]), (&bob, [1, 2, 3])] {
        let ever = ids(r
            .ever
            .iter()
            .filter(|(t, _)| t == "todos")
            .map(|(_, p)| p.clone()));
        for o in other {
            assert!(!ever.contains(&o), "{} saw todo {o}", r.who.subject);
        }
    }
    assert!(errors(&alice).is_empty(), "{:?}", errors(&alice));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_rows_by_their_filter_column_and_their_tenant() {
    let (s, truth) = seeded().await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    let mut bob = Replica::new(principal("bob", "t2"), site(2));
    alice.connect(&s.service).await;
    bob.connect(&s.service).await;
    alice
        .subscribe("open", "SELECT * FROM todos WHERE done = 0")
        .await;
    bob.subscribe("all", "SELECT * FROM todos").await;
    alice.pump().await;
    bob.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2]));
    // Out of the filter: evicted (not deleted on the server).
    s.sql("UPDATE todos SET done = 1 WHERE id = 1").await;
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([2]));
    check_replica(&truth, &alice);
    // Back in: whole.
    s.sql("UPDATE todos SET done = 0, title = 'back' WHERE id = 1")
        .await;
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2]));
    check_replica(&truth, &alice);
    // To another tenant (and owner): leaves alice, enters bob.
    s.sql("UPDATE todos SET tenant_id = 't2', owner = 'bob' WHERE id = 2")
        .await;
    alice.pump().await;
    bob.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1]));
    assert_eq!(bob.todo_ids(), BTreeSet::from([2, 10, 11]));
    check_replica(&truth, &alice);
    check_replica(&truth, &bob);
    // A real delete spreads as a delete.
    s.sql("DELETE FROM todos WHERE id = 10").await;
    bob.pump().await;
    assert_eq!(bob.todo_ids(), BTreeSet::from([2, 11]));
    check_replica(&truth, &bob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_granted_and_revoked_move_todos_in_and_out() {
    let (s, truth) = seeded().await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    alice.connect(&s.service).await;
    alice.subscribe("all", "SELECT * FROM todos").await;
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2]));
    // Carol shares list 3 with alice: its todos enter.
    s.sql("INSERT INTO members VALUES (3, 'alice', 't1')").await;
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2, 20]));
    check_replica(&truth, &alice);
    // A new todo in the shared list arrives as a delta of the view.
    s.sql("INSERT INTO todos VALUES (21, 't1', 3, 'carol', 'c2', 0, 1)")
        .await;
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2, 20, 21]));
    // Revoked: they leave.
    s.sql("DELETE FROM members WHERE list_id = 3 AND user_id = 'alice'")
        .await;
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2]));
    check_replica(&truth, &alice);
    // The report is clean once acked.
    let report = s.service.peer_report(site(1)).await.unwrap();
    assert!(report.clean, "{report:?}");
    assert_eq!(report.subscriptions[0].held_rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_into_another_tenants_rows_is_refused_whole() {
    let (s, truth) = seeded().await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    alice.connect(&s.service).await;
    alice.subscribe("all", "SELECT * FROM todos").await;
    alice.pump().await;
    let before = s.service.db_version();
    // Alice forges a change of bob's todo 10 (she does not have it) and an
    // allowed change of her own todo 1, in one transaction.
    alice.exec(
        "INSERT INTO todos VALUES (10, 't2', 2, 'bob', 'hijacked', 0, 1);
         UPDATE todos SET title = 'mine' WHERE id = 1;",
    );
    // Two local transactions, pushed together.
    let to = alice.db.db_version().unwrap();
    alice.push().await.unwrap();
    alice.pump().await;
    let refusal = alice
        .log
        .iter()
        .find_map(|m| match m {
            ServerMsg::PushRefused(r) => Some(r.clone()),
            _ => None,
        })
        .expect("refused");
    assert_eq!(refusal.code, ErrorCode::PolicyRefused);
    assert_eq!(refusal.rows.len(), 1, "{refusal:?}");
    assert_eq!(ids([refusal.rows[0].pk.clone()]), BTreeSet::from([10]));
    assert!(refusal.rows[0].policy.is_some() || !refusal.rows[0].reason.is_empty());
    // The server state of the visible row (todo 1), the invisible one named.
    assert!(
        refusal
            .state
            .iter()
            .all(|c| ids([c.pk.clone()]) == BTreeSet::from([1]))
    );
    assert!(!refusal.state.is_empty());
    assert_eq!(
        refusal
            .invisible
            .iter()
            .map(|k| ids([k.pk.clone()]))
            .collect::<Vec<_>>(),
        vec![BTreeSet::from([10])]
    );
    // Nothing changed on the server; the push is not held.
    assert_eq!(s.service.db_version(), before);
    assert_eq!(refusal.pushed_version, 0);
    let _ = to;
    let bobs = truth.visible(&principal("bob", "t2").identity, "SELECT * FROM todos");
    let ten = bobs
        .values()
        .find(|r| r[0] == tenantsync_types::Value::Integer(10))
        .unwrap();
    assert_eq!(ten[4], tenantsync_types::Value::Text("b1".into()));
    // The replica is back to the server's state.
    check_replica(&truth, &alice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_duplicates_are_harmless_and_gaps_are_errors() {
    let (s, truth) = seeded().await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    // Alice's second device.
    let mut bob2 = Replica::new(principal("alice", "t1"), site(4));
    alice.connect(&s.service).await;
    bob2.connect(&s.service).await;
    bob2.subscribe("all", "SELECT * FROM todos WHERE list_id = 1")
        .await;
    alice.subscribe("all", "SELECT * FROM todos").await;
    alice.pump().await;
    bob2.pump().await;
    alice.exec("INSERT INTO todos VALUES (5, 't1', 1, 'alice', 'new', 0, 1)");
    let v1 = alice.db.db_version().unwrap();
    let changes = alice
        .db
        .changes_since(0, None)
        .unwrap()
        .into_iter()
        .filter(|c| c.site_id == site(1))
        .collect::<Vec<_>>();
    // A gap: starting after what the server holds.
    alice
        .send(ClientMsg::Push {
            id: "gap".into(),
            from: v1,
            to: v1 + 1,
            changes: vec![],
        })
        .await;
    alice.pump().await;
    let gap = alice
        .log
        .iter()
        .find_map(|m| match m {
            ServerMsg::Error(e) if e.code == ErrorCode::Gap => Some(e.clone()),
            _ => None,
        })
        .expect("gap");
    assert_eq!(gap.pushed_version, Some(0));
    assert_eq!(gap.reference.as_deref(), Some("gap"));
    // The real push, twice.
    for id in ["p1", "p1-again"] {
        alice
            .send(ClientMsg::Push {
                id: id.into(),
                from: 0,
                to: v1,
                changes: changes.clone(),
            })
            .await;
    }
    alice.pump().await;
    let oks: Vec<(i64, i64)> = alice
        .log
        .iter()
        .filter_map(|m| match m {
            ServerMsg::PushOk {
                pushed_version,
                server_version,
                ..
            } => Some((*pushed_version, *server_version)),
            _ => None,
        })
        .collect();
    assert_eq!(oks.len(), 2);
    assert_eq!(oks[0].0, v1);
    assert!(oks[0].1 > 0);
    assert_eq!(
        oks[1],
        (v1, 0),
        "a duplicate is push_ok with server_version 0"
    );
    // Carol's view of list 1 got it once; alice got no echo of her write
    // but holds the row.
    bob2.pump().await;
    assert!(bob2.todo_ids().contains(&5));
    check_replica(&truth, &alice);
    check_replica(&truth, &bob2);
    // pushed_version survives a reconnect.
    alice.disconnect();
    alice.connect(&s.service).await;
    assert_eq!(alice.pushed_version, v1);
    // A pushed change authored by another site.
    let mut foreign = changes.clone();
    foreign[0].site_id = site(9);
    alice
        .send(ClientMsg::Push {
            id: "foreign".into(),
            from: v1,
            to: v1 + 1,
            changes: foreign
                .into_iter()
                .map(|mut c| {
                    c.db_version = v1 + 1;
                    c
                })
                .collect(),
        })
        .await;
    alice.pump().await;
    assert!(
        errors(&alice)
            .iter()
            .any(|(c, _)| *c == ErrorCode::SiteMismatch)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_resumes_exactly_and_misses_nothing() {
    let (s, truth) = seeded().await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    alice.connect(&s.service).await;
    alice.subscribe("all", "SELECT * FROM todos").await;
    alice.pump().await;
    alice.disconnect();
    // While away: a delta, an entering row, a leaving row, a delete.
    s.sql("UPDATE todos SET title = 'while away' WHERE id = 1")
        .await;
    s.sql("INSERT INTO todos VALUES (4, 't1', 1, 'alice', 'a4', 0, 1)")
        .await;
    s.sql("UPDATE todos SET owner = 'carol', list_id = 3 WHERE id = 2")
        .await;
    s.sql("INSERT INTO members VALUES (3, 'alice', 't1')").await;
    s.sql("DELETE FROM todos WHERE id = 20").await;
    alice.connect(&s.service).await;
    alice.resume_all().await;
    alice.pump().await;
    let subscribed: Vec<_> = alice
        .log
        .iter()
        .filter_map(|m| match m {
            ServerMsg::Subscribed { mode, .. } => Some(*mode),
            _ => None,
        })
        .collect();
    assert_eq!(
        subscribed.last(),
        Some(&tenantsync_protocol::SubscribeMode::Resume)
    );
    check_replica(&truth, &alice);
    // The peer report: held rows equal what the policy allows.
    let report = s.service.peer_report(site(1)).await.unwrap();
    assert!(report.clean, "{report:?}");
    let _ = Duration::ZERO;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_exactly_when_acked_and_refetches_otherwise() {
    let (s, _truth) = seeded().await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    let mut carol = Replica::new(principal("carol", "t1"), site(3));
    alice.connect(&s.service).await;
    carol.connect(&s.service).await;
    alice.subscribe("all", "SELECT * FROM todos").await;
    carol.subscribe("all", "SELECT * FROM todos").await;
    alice.pump().await;
    carol.pump().await;
    carol.auto_ack = false;
    s.sql("UPDATE todos SET title = 'unacked by carol' WHERE id = 20")
        .await;
    carol.pump().await;
    alice.disconnect();
    carol.disconnect();
    let s = s.restart().await;
    let truth = Truth::open(&s.path, POLICY);
    s.sql("UPDATE todos SET title = 'after restart' WHERE id IN (1, 20)")
        .await;
    alice.connect(&s.service).await;
    carol.connect(&s.service).await;
    carol.auto_ack = true;
    alice.resume_all().await;
    carol.resume_all().await;
    alice.pump().await;
    carol.pump().await;
    let mode = |r: &Replica| {
        r.log
            .iter()
            .filter_map(|m| match m {
                ServerMsg::Subscribed { mode, .. } => Some(*mode),
                _ => None,
            })
            .next_back()
    };
    assert_eq!(
        mode(&alice),
        Some(tenantsync_protocol::SubscribeMode::Resume)
    );
    assert_eq!(
        mode(&carol),
        Some(tenantsync_protocol::SubscribeMode::Refetch)
    );
    check_replica(&truth, &alice);
    check_replica(&truth, &carol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reloads_move_rows_and_never_leak_across_tenants() {
    let (s, truth) = seeded().await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    alice.connect(&s.service).await;
    alice.subscribe("all", "SELECT * FROM todos").await;
    alice.subscribe("lists", "SELECT * FROM lists").await;
    alice.pump().await;
    check_replica(&truth, &alice);
    // Everyone in the tenant sees every todo of the tenant now.
    let wider = POLICY.replace(
        "CREATE POLICY todos_owner ON todos FOR SELECT TO authenticated\n  USING (owner = auth.uid());",
        "CREATE POLICY todos_owner ON todos FOR SELECT TO authenticated\n  USING (owner = auth.uid() OR tenant_id = auth.claim('tenant_id'));",
    );
    assert_ne!(wider, POLICY);
    let r = s.service.reload_policy("policy.sql", &wider).await.unwrap();
    assert!(r.moved_subscriptions >= 1);
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2, 20]));
    check_replica(&Truth::open(&s.path, &wider), &alice);
    // A bad file keeps the old set.
    let bad = s
        .service
        .reload_policy("bad.sql", "CREATE POLICY x ON nope FOR SELECT USING (1);")
        .await
        .unwrap_err();
    assert_eq!(bad.code, ErrorCode::PolicyInvalid);
    assert!(!bad.diagnostics.is_empty());
    // Back to the original: carol's todo leaves.
    s.service.reload_policy("policy.sql", POLICY).await.unwrap();
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2]));
    check_replica(&truth, &alice);
    let report = s.service.peer_report(site(1)).await.unwrap();
    assert!(report.clean, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_outbox_is_caught_up_exactly() {
    let s = Server::start_with(|c| {
        c.limits.outbox_items = 2;
        c.limits.outbox_bytes = 4096;
    });
    s.sql_batch(SEED).await;
    let truth = Truth::open(&s.path, POLICY);
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    alice.connect(&s.service).await;
    alice.subscribe("all", "SELECT * FROM todos").await;
    alice.pump().await;
    // Alice does not read while many commits touch her view.
    for i in 0..40 {
        s.sql(&format!(
            "INSERT OR REPLACE INTO todos VALUES ({}, 't1', 1, 'alice', 'burst {i}', 0, 1)",
            100 + i % 7
        ))
        .await;
        s.sql(&format!("UPDATE todos SET done = {} WHERE id = 1", i % 2))
            .await;
    }
    s.sql("UPDATE todos SET owner = 'carol' WHERE id = 2").await;
    alice.pump_for(Duration::from_millis(300)).await;
    alice.pump().await;
    // She was caught up by a resume (mode resume after the first sync).
    let modes: Vec<_> = alice
        .log
        .iter()
        .filter_map(|m| match m {
            ServerMsg::Subscribed { mode, .. } => Some(*mode),
            _ => None,
        })
        .collect();
    assert!(modes.len() >= 2, "no catch-up sync: {modes:?}");
    assert_eq!(modes[1], tenantsync_protocol::SubscribeMode::Resume);
    check_replica(&truth, &alice);
    assert_eq!(alice.todo_ids(), (100..107).chain([1]).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_then_deltas_have_no_gap_and_no_duplicate_under_concurrent_writes() {
    let (s, truth) = seeded().await;
    let writer = {
        let service = s.service.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                let sql = format!(
                    "INSERT OR REPLACE INTO todos VALUES ({}, 't1', 1, 'alice', 'w{i}', {}, 1)",
                    200 + i % 23,
                    i % 2
                );
                service
                    .sql(
                        &service_principal(),
                        tenantsync_protocol::http::SqlRequest {
                            statements: vec![tenantsync_protocol::http::SqlStatement {
                                sql,
                                params: vec![],
                            }],
                            tenant: None,
                        },
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let mut peers = Vec::new();
    for k in 0..6u8 {
        let mut r = Replica::new(principal("alice", "t1"), site(10 + k));
        r.connect(&s.service).await;
        r.subscribe("all", "SELECT * FROM todos WHERE done = 0")
            .await;
        r.pump_for(Duration::from_millis(20)).await;
        peers.push(r);
    }
    writer.await.unwrap();
    for r in &mut peers {
        r.pump().await;
    }
    for r in &peers {
        check_replica(&truth, r);
        // Every checkpoint started exactly at the cursor before it: the
        // replica never saw a gap (it would have sent resync).
        let resyncs = r
            .log
            .iter()
            .filter(|m| matches!(m, ServerMsg::Subscribed { .. }))
            .count();
        assert_eq!(resyncs, 1, "{}: a gap forced a resync", r.site);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_report_shows_held_rows_until_a_revocation_is_acked() {
    let (s, _truth) = seeded().await;
    s.sql("INSERT INTO members VALUES (3, 'alice', 't1')").await;
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    alice.connect(&s.service).await;
    alice.subscribe("all", "SELECT * FROM todos").await;
    alice.pump().await;
    let r = s.service.peer_report(site(1)).await.unwrap();
    assert!(r.clean && r.connected);
    assert_eq!(r.subscriptions[0].held_rows, 3);
    // Revoked, delivered, not acked yet: the report says what she holds.
    alice.auto_ack = false;
    s.sql("DELETE FROM members WHERE list_id = 3 AND user_id = 'alice'")
        .await;
    alice.pump().await;
    assert_eq!(alice.todo_ids(), BTreeSet::from([1, 2]));
    let r = s.service.peer_report(site(1)).await.unwrap();
    assert!(!r.clean, "{r:?}");
    assert_eq!(
        ids(r.subscriptions[0].not_allowed.iter().map(|k| k.pk.clone())),
        BTreeSet::from([20])
    );
    assert_eq!(r.subscriptions[0].unacked_leaving, 1);
    // Acked: clean, holding exactly what the policy allows.
    alice.ack(&["all"]).await;
    alice.pump().await;
    let r = s.service.peer_report(site(1)).await.unwrap();
    assert!(r.clean, "{r:?}");
    assert_eq!(r.subscriptions[0].held_rows, 2);
    // After a restart too (held sets are persisted with the cursor).
    alice.disconnect();
    let s = s.restart().await;
    let r = s.service.peer_report(site(1)).await.unwrap();
    assert!(r.clean && !r.connected, "{r:?}");
    assert_eq!(r.subscriptions[0].held_rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_sql_cannot_touch_internal_tables_or_the_schema() {
    let (s, _truth) = seeded().await;
    for sql in [
        "UPDATE tenantsync_peers SET pushed_version = 99",
        "DELETE FROM todos__crsql_clock",
        "DROP TABLE todos",
        "CREATE TABLE evil (x)",
        "PRAGMA journal_mode = DELETE",
        "ATTACH DATABASE ':memory:' AS other",
        "COMMIT",
        "SELECT crsql_as_table('todos')",
    ] {
        let e = s
            .service
            .sql(
                &service_principal(),
                tenantsync_protocol::http::SqlRequest {
                    statements: vec![tenantsync_protocol::http::SqlStatement {
                        sql: sql.into(),
                        params: vec![],
                    }],
                    tenant: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::SqlError, "{sql}: {e}");
    }
    // Not the service role: forbidden.
    let e = s
        .service
        .sql(
            &principal("alice", "t1"),
            tenantsync_protocol::http::SqlRequest {
                statements: vec![],
                tenant: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    // A failing statement rolls back the ones before it.
    let before = s.service.db_version();
    let e = s
        .service
        .sql(
            &service_principal(),
            tenantsync_protocol::http::SqlRequest {
                statements: vec![
                    tenantsync_protocol::http::SqlStatement {
                        sql: "UPDATE todos SET title = ?1 WHERE id = 1".into(),
                        params: vec![tenantsync_types::Value::Text("gone".into())],
                    },
                    tenantsync_protocol::http::SqlStatement {
                        sql: "INSERT INTO nope VALUES (1)".into(),
                        params: vec![],
                    },
                ],
                tenant: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::SqlError);
    assert!(e.message.contains("statement 2"), "{e}");
    assert_eq!(s.service.db_version(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_resume_from_their_cursor_and_long_poll() {
    use tenantsync_protocol::http::{PullRequest, PullSub};
    let (s, _truth) = seeded().await;
    let alice = principal("alice", "t1");
    let pull = |cursor: Option<i64>, wait_ms: u64| PullRequest {
        site_id: site(1),
        subscriptions: vec![PullSub {
            id: "all".into(),
            query: "SELECT * FROM todos".into(),
            cursor,
        }],
        wait_ms,
        unsubscribe: vec![],
    };
    let r = s.service.pull(&alice, pull(None, 0)).await.unwrap();
    let part = &r.subs["all"];
    assert_eq!(part.mode, tenantsync_protocol::SubscribeMode::Snapshot);
    assert!(part.reset);
    assert_eq!(
        ids(part.changes.iter().map(|c| c.pk.clone())),
        BTreeSet::from([1, 2])
    );
    let v = r.version;
    // Nothing new: a long poll waits, then a write wakes it.
    let svc = s.service.clone();
    let waker = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        svc.sql(
            &service_principal(),
            tenantsync_protocol::http::SqlRequest {
                statements: vec![tenantsync_protocol::http::SqlStatement {
                    sql: "UPDATE todos SET owner = 'carol' WHERE id = 2".into(),
                    params: vec![],
                }],
                tenant: None,
            },
        )
        .await
        .unwrap();
    });
    let started = std::time::Instant::now();
    let r = s.service.pull(&alice, pull(Some(v), 5000)).await.unwrap();
    waker.await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    let part = &r.subs["all"];
    assert_eq!(part.mode, tenantsync_protocol::SubscribeMode::Resume);
    assert_eq!(part.from, v);
    assert_eq!(
        ids(part.evict.iter().map(|k| k.pk.clone())),
        BTreeSet::from([2])
    );
    // An unknown cursor is a refetch.
    let r = s
        .service
        .pull(&alice, pull(Some(v + 1000), 0))
        .await
        .unwrap();
    assert_eq!(
        r.subs["all"].mode,
        tenantsync_protocol::SubscribeMode::Refetch
    );
}

/// A peer's local changes since `since`, as a `POST /v1/push` body.
fn http_push(r: &Replica, since: i64) -> tenantsync_protocol::http::PushRequest {
    let to = r.db.db_version().unwrap();
    let changes =
        r.db.changes(&tenantsync_core::ChangesQuery {
            since,
            until: Some(to),
            site: tenantsync_core::SiteFilter::Only(r.site),
            ..Default::default()
        })
        .unwrap();
    tenantsync_protocol::http::PushRequest {
        site_id: r.site,
        from: since,
        to,
        changes,
    }
}

/// Regression (issue 6, oracle seed 125): a refusal described its rows as
/// the server had them at the refused push, inside its group commit; a
/// later write of the same group could create one of them in a
/// subscription of the pusher, whose part (the commit is fanned out before
/// the answers) then reached the pusher before the refusal that called the
/// row invisible: the pusher dropped a row the server believed it held.
/// The refusal describes its rows at the committed version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_describes_its_rows_as_of_its_groups_commit() {
    let (s, _truth) = seeded().await;
    let service = std::sync::Arc::new(s.service.clone());
    // Alice's push: her new todo 30 and a forged change of bob's todo 10
    // (refused); her second device then creates todo 30 itself.
    let mut alice = Replica::new(principal("alice", "t1"), site(1));
    alice.exec(
        "INSERT INTO todos VALUES (30, 't1', 1, 'alice', 'first device', 0, 1);
         INSERT INTO todos VALUES (10, 't2', 2, 'bob', 'hijacked', 0, 1);",
    );
    let mut device = Replica::new(principal("alice", "t1"), site(4));
    device.exec("INSERT INTO todos VALUES (30, 't1', 1, 'alice', 'second device', 0, 1)");
    let (refused, accepted) = (http_push(&alice, 0), http_push(&device, 0));
    // Both land in one group: the engine is busy with a slow statement
    // while they arrive, in this order (one tenant's writes keep theirs).
    let slow = {
        let svc = service.clone();
        tokio::spawn(async move {
            svc.sql(
                &service_principal(),
                tenantsync_protocol::http::SqlRequest {
                    statements: vec![tenantsync_protocol::http::SqlStatement {
                        sql: "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) SELECT count(*) FROM c".into(),
                        params: vec![],
                    }], tenant: None,
                },
            )
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let first = {
        let svc = service.clone();
        let who = alice.who.clone();
        tokio::spawn(async move { svc.push(&who, refused).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let second = {
        let svc = service.clone();
        let who = device.who.clone();
        tokio::spawn(async move { svc.push(&who, accepted).await })
    };
    slow.await.unwrap();
    let ok = second
        .await
        .unwrap()
        .expect("the second device's push is applied");
    let refusal = match first.await.unwrap() {
        Err(tenantsync_server::PushError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(ok.server_version > 0);
    // Todo 30 exists at the commit, visible to alice: in `state`, whole,
    // with the second device's value; bob's todo 10 stays invisible.
    let state_ids = ids(refusal.state.iter().map(|c| c.pk.clone()));
    assert_eq!(state_ids, BTreeSet::from([30]), "{refusal:?}");
    assert!(
        refusal
            .state
            .iter()
            .any(|c| c.val == tenantsync_types::Value::Text("second device".into())),
        "{refusal:?}"
    );
    assert_eq!(
        ids(refusal.invisible.iter().map(|k| k.pk.clone())),
        BTreeSet::from([10])
    );
}

/// An HTTP puller's last answer, not acknowledged yet, survives a clean
/// restart: a pull with its cursor resumes (PROTOCOL.md §8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pulls_last_answer_resumes_after_a_restart() {
    use tenantsync_protocol::http::{PullRequest, PullSub};
    let pull = |s: &Server, cursor: Option<i64>| {
        let req = PullRequest {
            site_id: site(40),
            subscriptions: vec![PullSub {
                id: "todos".into(),
                query: "SELECT * FROM todos".into(),
                cursor,
            }],
            wait_ms: 0,
            unsubscribe: vec![],
        };
        let p = principal("u40", "acme");
        let service = s.service.clone();
        async move { service.pull(&p, req).await.unwrap() }
    };
    let s = Server::start();
    let first = pull(&s, None).await;
    s.sql("INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'u40', 'x')")
        .await;
    let second = pull(&s, Some(first.version)).await;
    assert!(second.version > first.version);
    let s = s.restart().await;
    let back = pull(&s, Some(second.version)).await;
    assert_eq!(
        back.subs["todos"].mode,
        tenantsync_protocol::SubscribeMode::Resume
    );
    assert!(back.subs["todos"].changes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_built_off_the_writer_miss_no_write_and_keep_each_connections_order() {
    let (s, truth) = seeded().await;
    // Writes that move rows between the views below and grant and revoke
    // alice's membership of carol's list while the views are built.
    let writer = {
        let service = s.service.clone();
        tokio::spawn(async move {
            for i in 0..120 {
                let sql = match i % 3 {
                    0 => format!(
                        "INSERT OR REPLACE INTO todos VALUES ({}, 't1', {}, 'carol', 'w{i}', 0, {})",
                        300 + i % 17,
                        1 + i % 3,
                        i % 6
                    ),
                    1 => "INSERT OR IGNORE INTO members VALUES (3, 'alice', 't1')".to_owned(),
                    _ => "DELETE FROM members WHERE list_id = 3 AND user_id = 'alice'".to_owned(),
                };
                service
                    .sql(
                        &service_principal(),
                        tenantsync_protocol::http::SqlRequest {
                            statements: vec![tenantsync_protocol::http::SqlStatement {
                                sql,
                                params: vec![],
                            }],
                            tenant: None,
                        },
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let mut r = Replica::new(principal("alice", "t1"), site(30));
    r.connect(&s.service).await;
    // Each query a view of its own, sent back to back: each waits for a
    // reader's build, and the commands behind it wait with it.
    let mut sent = vec!["all".to_owned()];
    r.subscribe("all", "SELECT * FROM todos").await;
    for k in 0..6 {
        let id = format!("p{k}");
        r.subscribe(&id, &format!("SELECT * FROM todos WHERE priority = {k}"))
            .await;
        sent.push(id.clone());
        if k % 2 == 1 {
            r.send(ClientMsg::Unsubscribe { id: id.clone() }).await;
            sent.push(format!("-{id}"));
        }
    }
    r.subscribe("lists", "SELECT * FROM lists WHERE owner = 'carol'")
        .await;
    sent.push("lists".to_owned());
    writer.await.unwrap();
    r.pump().await;
    let answered: Vec<String> = r
        .log
        .iter()
        .filter_map(|m| match m {
            ServerMsg::Subscribed { id, .. } => Some(id.clone()),
            ServerMsg::Unsubscribed { id } => Some(format!("-{id}")),
            _ => None,
        })
        .collect();
    assert_eq!(answered, sent, "answers out of the order sent");
    for k in [1, 3, 5] {
        r.subs.remove(&format!("p{k}"));
    }
    check_replica(&truth, &r);
}
