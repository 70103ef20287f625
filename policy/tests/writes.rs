//! Write checks: each pushed row is allowed or denied with the policy that
//! decided and why; membership subqueries run once per batch.

mod common;

use rusqlite::Connection;
use tenantsync_policy::{Engine, MembershipResults, WriteError, WritePlan};
use tenantsync_types::Value;

const ALICE: &str = r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#;

fn todo(id: i64, tenant: &str, list: i64, owner: &str, title: &str) -> Vec<Value> {
    vec![
        Value::Integer(id),
        tenant.into(),
        Value::Integer(list),
        owner.into(),
        title.into(),
        Value::Integer(0),
        Value::Null,
    ]
}

fn fixture() -> (Connection, Engine) {
    let (conn, _) = common::database(common::EXAMPLE_SCHEMA);
    conn.execute_batch(
        "INSERT INTO lists VALUES (1, 't1', 'alice', 'a'), (3, 't1', 'carol', 'c');
         INSERT INTO members VALUES (3, 'alice', 't1');",
    )
    .unwrap();
    (conn, common::example_engine())
}

/// Runs the plan's memberships on the database: once for the whole batch.
fn run_memberships(conn: &Connection, plan: &WritePlan) -> MembershipResults {
    let mut r = MembershipResults::new();
    for m in plan.memberships.iter().filter(|m| m.direct) {
        let vals = common::query(conn, &m.sql, &m.params)
            .into_iter()
            .map(|mut v| v.remove(0));
        r.insert(m.id, m.set(vals));
    }
    r
}

type Row = Option<Vec<Value>>;

fn check(claims: &str, table: &str, rows: &[(Row, Row)]) -> String {
    let (conn, engine) = fixture();
    let plan = engine.write_plan(&common::identity(claims), table).unwrap();
    let ms = run_memberships(&conn, &plan);
    let pairs: Vec<_> = rows
        .iter()
        .map(|(b, a)| (b.as_deref(), a.as_deref()))
        .collect();
    plan.check(&pairs, &ms)
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{} {:?} [{}]: {}",
                match (d.allowed, d.skipped) {
                    (true, _) => "allowed",
                    (false, true) => "skipped",
                    (false, false) => "denied",
                },
                d.command,
                d.policies.join(", "),
                d.reason
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn inserts_check_with_check() {
    insta::assert_snapshot!(check(ALICE, "todos", &[
        (None, Some(todo(10, "t1", 1, "alice", "ok"))),
        (None, Some(todo(11, "t1", 1, "bob", "someone else's"))),
        (None, Some(todo(12, "t2", 1, "alice", "other tenant"))),
    ]), @r"
    allowed Insert [todos_insert]: policy `todos_insert` (WITH CHECK) grants INSERT of the new row
    denied Insert []: no permissive INSERT policy's WITH CHECK is true for the new row (checked: `todos_insert`)
    denied Insert [todos_same_tenant]: restrictive policy `todos_same_tenant` refuses the new row: its WITH CHECK is not true for it
    ");
}

#[test]
fn updates_need_a_visible_row_using_and_with_check() {
    insta::assert_snapshot!(check(ALICE, "todos", &[
        // Own row, title changed.
        (Some(todo(1, "t1", 1, "alice", "a")), Some(todo(1, "t1", 1, "alice", "b"))),
        // Carol's row in a list alice is a member of: USING via membership.
        (Some(todo(3, "t1", 3, "carol", "a")), Some(todo(3, "t1", 3, "carol", "b"))),
        // Moving a row to another tenant: WITH CHECK refuses.
        (Some(todo(1, "t1", 1, "alice", "a")), Some(todo(1, "t2", 1, "alice", "a"))),
        // A row alice cannot see at all.
        (Some(todo(4, "t1", 9, "dave", "a")), Some(todo(4, "t1", 9, "alice", "mine now"))),
    ]), @r"
    allowed Update [todos_update]: policy `todos_update` (USING) grants UPDATE of the existing row and `todos_update` (WITH CHECK) accepts the new row
    allowed Update [todos_update]: policy `todos_update` (USING) grants UPDATE of the existing row and `todos_update` (WITH CHECK) accepts the new row
    denied Update [todos_same_tenant]: restrictive policy `todos_same_tenant` refuses the new row: its WITH CHECK is not true for it
    denied Update []: the existing row is not visible to role `authenticated` (no SELECT policy on `todos` grants it): a row must be readable to be changed
    ");
}

#[test]
fn deletes_check_using() {
    insta::assert_snapshot!(check(ALICE, "todos", &[
        (Some(todo(1, "t1", 1, "alice", "a")), None),
        (Some(todo(3, "t1", 3, "carol", "visible, not mine")), None),
    ]), @r"
    allowed Delete [todos_delete]: policy `todos_delete` (USING) grants DELETE of the existing row
    denied Delete []: no permissive DELETE policy's USING is true for the existing row (checked: `todos_delete`)
    ");
}

#[test]
fn roles_without_policies_are_denied_by_default() {
    insta::assert_snapshot!(check(r#"{"sub":"alice","role":"anon","tenant_id":"t1"}"#, "todos", &[
        (None, Some(todo(10, "t1", 1, "alice", "x"))),
        (Some(todo(1, "t1", 1, "alice", "a")), None),
    ]), @r"
    denied Insert []: no policy grants INSERT on `todos` to role `anon`
    skipped Delete []: the row is not visible to the writer: the delete changes nothing
    ");
}

#[test]
fn a_batch_costs_one_query_per_membership() {
    let (conn, engine) = fixture();
    let plan = engine
        .write_plan(&common::identity(ALICE), "todos")
        .unwrap();
    let direct = plan.memberships.iter().filter(|m| m.direct).count();
    assert!(direct <= 3, "{:#?}", plan.memberships);
    let ms = run_memberships(&conn, &plan);
    let rows: Vec<Vec<Value>> = (0..100)
        .map(|i| todo(100 + i, "t1", 1, "alice", "bulk"))
        .collect();
    let pairs: Vec<_> = rows.iter().map(|r| (None, Some(r.as_slice()))).collect();
    let decisions = plan.check(&pairs, &ms).unwrap();
    assert_eq!(decisions.len(), 100);
    assert!(decisions.iter().all(|d| d.allowed));
}

#[test]
fn malformed_batches_are_errors_not_decisions() {
    let engine = common::example_engine();
    let id = common::identity(ALICE);
    let short = [Value::Integer(1)];
    assert_eq!(
        engine.check_writes(
            &id,
            "todos",
            &[(None, Some(&short[..]))],
            &MembershipResults::new()
        ),
        Err(WriteError::RowWidth {
            table: "todos".into(),
            index: 0,
            expected: 7,
            found: 1
        })
    );
    assert_eq!(
        engine.check_writes(&id, "todos", &[(None, None)], &MembershipResults::new()),
        Err(WriteError::Empty {
            table: "todos".into(),
            index: 0
        })
    );
    assert!(matches!(
        engine.write_plan(&id, "local_settings"),
        Err(WriteError::Table { .. })
    ));
    assert!(matches!(
        engine.write_plan(&id, "nope"),
        Err(WriteError::Table { .. })
    ));
}

#[test]
fn reloading_policies_names_the_changed_tables() {
    let schema = common::example_schema();
    let mut engine = common::example_engine();
    let id = common::identity(ALICE);
    let lists_view = engine.rewrite(&id, "SELECT * FROM lists").unwrap();
    let todos_view = engine.rewrite(&id, "SELECT * FROM todos").unwrap();
    let new_policy = common::EXAMPLE_POLICY.replace(
        "USING (tenant_id = auth.claim('tenant_id'));\nCREATE POLICY lists_owner_write",
        "USING (tenant_id = auth.claim('tenant_id') AND name IS NOT NULL);\nCREATE POLICY lists_owner_write",
    );
    assert_ne!(new_policy, common::EXAMPLE_POLICY);
    let set = tenantsync_policy::PolicySet::parse("new.sql", &new_policy, &schema).unwrap();
    let change = engine.replace_policies(set);
    assert_eq!(change.changed_tables.iter().collect::<Vec<_>>(), ["lists"]);
    assert!(change.affects(&lists_view));
    // todos reads members, which reads lists: it may have changed too.
    assert!(change.affects(&todos_view));
    assert_ne!(
        engine.rewrite(&id, "SELECT * FROM lists").unwrap().key,
        lists_view.key
    );
    let members_only = engine
        .rewrite(&id, "SELECT * FROM members WHERE tenant_id = 't1'")
        .unwrap();
    assert!(change.affects(&members_only));
}
