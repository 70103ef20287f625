//! The policy engine's SQL on a real core database: the snapshot SQL and the
//! delta SQL (crsql_changes joined to rows by pk through
//! `tenantsync_pk_value`) deliver exactly the rows the policies allow.

use std::collections::BTreeSet;

use rusqlite::Connection;
use tenantsync_core::CrrConnection;
use tenantsync_policy::{EffectiveQuery, Engine, Identity, PolicySet, Schema};
use tenantsync_types::Value;

const SCHEMA: &str = include_str!("../../examples/schema.sql");
const POLICY: &str = include_str!("../../examples/policy.sql");

fn schema(db: &CrrConnection) -> Schema {
    Schema::from(&db.schema().expect("describe the schema"))
}

fn rows(conn: &Connection, sql: &str, params: &[Value]) -> Vec<Vec<Value>> {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{e}: {sql}"));
    let n = stmt.column_count();
    stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
        (0..n).map(|i| r.get::<_, Value>(i)).collect()
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The ids of the todos whose changes the delta SQL returns since `since`.
fn delta_ids(db: &CrrConnection, q: &EffectiveQuery, since: i64) -> BTreeSet<i64> {
    let mut params = q.params.clone();
    params.push(Value::Integer(since));
    assert_eq!(params.len(), q.delta_since_param);
    rows(db.conn(), &q.delta_sql, &params)
        .into_iter()
        .map(|r| {
            // Unpack the pk with core's own function.
            let pk = r[1].clone();
            let v = rows(db.conn(), "SELECT tenantsync_pk_value(?1, 0)", &[pk]);
            match v[0][0] {
                Value::Integer(i) => i,
                ref other => panic!("{other:?}"),
            }
        })
        .collect()
}

fn snapshot_ids(db: &CrrConnection, q: &EffectiveQuery) -> BTreeSet<i64> {
    rows(db.conn(), &q.snapshot_sql, &q.params)
        .into_iter()
        .map(|r| match r[0] {
            Value::Integer(i) => i,
            ref other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn snapshot_and_delta_sql_deliver_only_what_policies_allow() {
    let db = CrrConnection::open_in_memory().unwrap();
    db.conn().execute_batch(SCHEMA).unwrap();
    db.conn()
        .execute_batch(
            "INSERT INTO lists VALUES (1, 't1', 'alice', 'a'), (2, 't2', 'bob', 'b'), (3, 't1', 'carol', 'c');
             INSERT INTO members VALUES (3, 'alice', 't1');
             INSERT INTO todos VALUES (1, 't1', 1, 'alice', 'mine', 0, 1),
               (2, 't2', 2, 'bob', 'other tenant', 0, 2),
               (3, 't1', 3, 'carol', 'shared', 1, 3),
               (5, 't1', NULL, 'dave', 'not shared', 0, NULL);",
        )
        .unwrap();
    let engine = Engine::new(PolicySet::parse("policy.sql", POLICY, &schema(&db)).unwrap());
    let alice =
        Identity::from_json(r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#).unwrap();
    let q = engine.rewrite(&alice, "SELECT * FROM todos").unwrap();

    let expected: BTreeSet<i64> = [1, 3].into();
    assert_eq!(snapshot_ids(&db, &q), expected);
    assert_eq!(delta_ids(&db, &q, 0), expected);

    // Later changes: only those of visible rows come through.
    let v = db.db_version().unwrap();
    db.conn()
        .execute_batch(
            "UPDATE todos SET done = 1 WHERE id IN (1, 2, 5);
             INSERT INTO todos VALUES (6, 't1', 3, 'carol', 'new in shared list', 0, 1),
               (7, 't2', 3, 'carol', 'shared list, wrong tenant', 0, 1);",
        )
        .unwrap();
    assert_eq!(delta_ids(&db, &q, v), [1, 6].into());

    // Revocation is data: alice leaves list 3, its todos leave her view.
    db.conn()
        .execute_batch("DELETE FROM members WHERE list_id = 3 AND user_id = 'alice'")
        .unwrap();
    assert_eq!(snapshot_ids(&db, &q), [1].into());
}
