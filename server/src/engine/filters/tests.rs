//! The law of views built off the writer thread: built at older versions
//! (several, installed together) and caught up with the rows changed since
//! the oldest, each selects exactly what the same view built now selects,
//! whether its membership instances are new, shared between builds of
//! different versions, or shared with views the engine kept up to date
//! meanwhile.

use std::sync::Arc;

use proptest::prelude::*;
use tenantsync_core::CrrConnection;
use tenantsync_policy::{EffectiveQuery, Engine as PolicyEngine, Identity, PolicySet};

use super::*;
use crate::engine::commit::read_batch;

const SCHEMA: &str = include_str!("../../../../examples/schema.sql");
const POLICY: &str = include_str!("../../../../examples/policy.sql");

/// One commit: service writes to todos and members of tenant t0.
#[derive(Debug, Clone)]
enum Op {
    Todo {
        id: i64,
        list: i64,
        owner: u8,
        done: bool,
    },
    DeleteTodo(i64),
    Member {
        list: i64,
        user: u8,
    },
    DeleteMember {
        list: i64,
        user: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..12i64, 1..4i64, 0..3u8, any::<bool>())
            .prop_map(|(id, list, owner, done)| Op::Todo { id, list, owner, done }),
        1 => (0..12i64).prop_map(Op::DeleteTodo),
        2 => (1..4i64, 0..3u8).prop_map(|(list, user)| Op::Member { list, user }),
        2 => (1..4i64, 0..3u8).prop_map(|(list, user)| Op::DeleteMember { list, user }),
    ]
}

fn run(db: &CrrConnection, op: &Op) {
    let c = db.conn();
    match op {
        Op::Todo {
            id,
            list,
            owner,
            done,
        } => c.execute(
            "INSERT INTO todos (id, tenant_id, list_id, owner, title, done) \
             VALUES (?1, 't0', ?2, ?3, 'x', ?4) ON CONFLICT (id) DO UPDATE SET \
             list_id = excluded.list_id, owner = excluded.owner, done = excluded.done",
            rusqlite::params![id, list, format!("u{owner}"), *done as i64],
        ),
        Op::DeleteTodo(id) => c.execute("DELETE FROM todos WHERE id = ?1", [id]),
        Op::Member { list, user } => c.execute(
            "INSERT OR IGNORE INTO members VALUES (?1, ?2, 't0')",
            rusqlite::params![list, format!("u{user}")],
        ),
        Op::DeleteMember { list, user } => c.execute(
            "DELETE FROM members WHERE list_id = ?1 AND user_id = ?2",
            rusqlite::params![list, format!("u{user}")],
        ),
    }
    .expect("write");
}

fn query(policy: &PolicyEngine, user: u8, sql: &str) -> Arc<EffectiveQuery> {
    let serde_json::Value::Object(m) = serde_json::json!({
        "sub": format!("u{user}"), "role": "authenticated", "tenant_id": "t0"
    }) else {
        unreachable!()
    };
    Arc::new(policy.rewrite(&Identity::new(m), sql).expect("rewrite"))
}

/// The engine's part: commits ops one by one, applying each to the
/// filters it keeps; returns every commit's changed rows.
fn commit_all(
    db: &CrrConnection,
    schema: &ServerSchema,
    filters: &mut Filters,
    ops: &[Op],
) -> Vec<Vec<ChangedRow>> {
    let mut out = Vec::new();
    for op in ops {
        let before = db.db_version().expect("version");
        run(db, op);
        let after = db.db_version().expect("version");
        if after > before {
            let rows = read_batch(db, schema, before, after).expect("batch");
            filters
                .apply_commit(db, schema, &rows, after)
                .expect("apply");
            out.push(rows);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn views_built_earlier_and_caught_up_are_the_views_built_now(
        seed in prop::collection::vec(op(), 0..12),
        before in prop::collection::vec(op(), 0..8),
        between in prop::collection::vec(op(), 0..8),
        during in prop::collection::vec(op(), 0..16),
    ) {
        let db = CrrConnection::open_in_memory().expect("db");
        db.conn().execute_batch(SCHEMA).expect("schema");
        let schema = ServerSchema::read(&db, Vec::new()).expect("schema");
        let policy = PolicyEngine::new(
            PolicySet::parse("policy.sql", POLICY, &schema.policy).expect("policy"),
        );
        let mut filters = Filters::default();
        let mut log = commit_all(&db, &schema, &mut filters, &seed);
        // Kept up to date all along: u0's todos (its members instance is
        // shared with the first view built below).
        let kept = query(&policy, 0, "SELECT * FROM todos");
        let v = db.db_version().expect("version");
        let kept_id = filters.view_for(&db, &schema, &kept, v).expect("view");
        log.extend(commit_all(&db, &schema, &mut filters, &before));

        // Readers build at `at1` and, later, at `at2`; the engine commits
        // on; both are installed in one turn.
        let first = vec![
            query(&policy, 0, "SELECT * FROM todos WHERE done = 0"),
            query(&policy, 1, "SELECT * FROM todos"),
            query(&policy, 2, "SELECT * FROM members"),
        ];
        // u1's members instance again, at another version.
        let second = vec![
            query(&policy, 1, "SELECT * FROM todos WHERE done = 1"),
            query(&policy, 2, "SELECT * FROM todos"),
        ];
        let at1 = db.db_version().expect("version");
        let mark = log.len();
        let pre1 = Prebuilt::compute(&db, &schema, &first, at1).expect("prebuilt");
        log.extend(commit_all(&db, &schema, &mut filters, &between));
        let at2 = db.db_version().expect("version");
        let pre2 = Prebuilt::compute(&db, &schema, &second, at2).expect("prebuilt");
        log.extend(commit_all(&db, &schema, &mut filters, &during));
        let now = db.db_version().expect("version");

        let mut created = Vec::new();
        let mut ids = Vec::new();
        for (queries, pre) in [(&first, &pre1), (&second, &pre2)] {
            for q in queries {
                let (id, c) = filters.install(&db, &schema, q, now, pre).expect("install");
                ids.push((q.clone(), id));
                created.extend(c.into_iter().map(|f| (f, pre.version)));
            }
        }
        let rows = latest_images(log[mark..].iter().map(Vec::as_slice));
        filters.catch_up(&db, &schema, &created, &rows, now).expect("catch up");

        let mut fresh = Filters::default();
        for (q, id) in &ids {
            let f = fresh.view_for(&db, &schema, q, now).expect("fresh view");
            prop_assert_eq!(filters.pks(*id), fresh.pks(f), "view {}", q.where_sql);
        }
        let f = fresh.view_for(&db, &schema, &kept, now).expect("fresh view");
        prop_assert_eq!(filters.pks(kept_id), fresh.pks(f));

        // And they stay exact under the commits that follow.
        let after: Vec<Op> = during.iter().rev().cloned().collect();
        commit_all(&db, &schema, &mut filters, &after);
        let end = db.db_version().expect("version");
        let mut fresh = Filters::default();
        for (q, id) in &ids {
            let f = fresh.view_for(&db, &schema, q, end).expect("fresh view");
            prop_assert_eq!(filters.pks(*id), fresh.pks(f), "view {} later", q.where_sql);
        }
    }
}
