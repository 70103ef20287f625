//! Memberships as predicates: what incremental membership maintenance (the
//! server's) needs. For every membership of a rewritten query or write plan,
//! evaluating `Membership::filter` on each row of its table (with the nested
//! memberships' sets, computed the same way, under their local ids) selects
//! exactly the rows the membership's SQL selects; its index cover finds every
//! member row; `index_keys`/`membership_probe_key` find exactly the values
//! the set contains.

mod common;

use std::collections::BTreeMap;

use rusqlite::Connection;
use tenantsync_policy::{
    Engine, IndexAtom, IndexKey, Membership, MembershipId, MembershipResults, MembershipSet,
    membership_probe_key,
};
use tenantsync_types::Value;

const DATA: &str = "
INSERT INTO lists VALUES (1, 't1', 'alice', 'a'), (2, 't2', 'bob', 'b'), (3, 't1', 'carol', 'c'),
  (4, 't1', 'alice', 'a2'), (5, 't2', 'alice', 'wrong tenant');
INSERT INTO members VALUES (3, 'alice', 't1'), (2, 'alice', 't2'), (1, 'bob', 't1'),
  (4, 'dave', 't1'), (5, 'erin', 't2'), (1, 'alice', 't1');
INSERT INTO todos VALUES (1, 't1', 1, 'alice', 'x', 0, 1), (2, 't1', 3, 'carol', 'y', 0, 2);
";

/// The set of membership `id` of `ms`, computed by evaluating its filter
/// on every row of its table (recursively for nested ones).
fn set_by_eval(conn: &Connection, ms: &[Membership], id: MembershipId) -> MembershipSet {
    let m = &ms[id.0 as usize];
    let mut local = MembershipResults::new();
    for (i, g) in m.nested.iter().enumerate() {
        local.insert(MembershipId(i as u32), set_by_eval(conn, ms, *g));
    }
    let rows = common::query(conn, &format!("SELECT * FROM \"{}\"", m.table), &[]);
    let mut values = Vec::new();
    for row in &rows {
        if m.filter.eval(row, &m.params, &local).is_true() {
            values.push(row[m.column_index].clone());
            // Every cover finds the member row.
            for cover in m.index_cover.iter().chain(&m.index_covers) {
                let hit = cover.iter().any(|a| match a {
                    IndexAtom::Eq { column, value } => {
                        IndexKey::from_value(&row[*column]).as_ref() == Some(value)
                    }
                    IndexAtom::InMembership { column, membership } => local
                        .get(*membership)
                        .is_some_and(|s| s.contains_value(&row[*column])),
                });
                assert!(hit, "{}: no atom of {cover:?} holds for {row:?}", m.sql);
            }
        }
    }
    m.set(values)
}

fn set_by_sql(conn: &Connection, m: &Membership) -> MembershipSet {
    m.set(
        common::query(conn, &m.sql, &m.params)
            .into_iter()
            .map(|mut r| r.remove(0)),
    )
}

#[track_caller]
fn check(conn: &Connection, ms: &[Membership]) {
    assert!(!ms.is_empty());
    for m in ms {
        let by_eval = set_by_eval(conn, ms, m.id);
        let by_sql = set_by_sql(conn, m);
        assert_eq!(by_eval.values(), by_sql.values(), "{}", m.sql);
        assert_eq!(by_eval.has_null(), by_sql.has_null(), "{}", m.sql);
        // The member rows by `where_sql` give the same set.
        let by_where = m.set(
            common::query(
                conn,
                &format!("SELECT * FROM \"{}\" WHERE {}", m.table, m.where_sql),
                &m.params,
            )
            .into_iter()
            .map(|mut r| r.swap_remove(m.column_index)),
        );
        assert_eq!(by_where.values(), by_sql.values(), "{}", m.where_sql);
        assert_eq!(
            m.column_index,
            common::example_schema()
                .table(&m.table)
                .unwrap()
                .column_index(&m.column)
                .unwrap()
        );
        for (i, g) in m.nested.iter().enumerate() {
            assert!((g.0 as usize) < ms.len(), "nested {i} of {}", m.sql);
        }
    }
}

fn setup() -> (Connection, Engine) {
    let (conn, _) = common::database(common::EXAMPLE_SCHEMA);
    conn.execute_batch(DATA).unwrap();
    (conn, common::example_engine())
}

#[test]
fn membership_filters_select_what_their_sql_selects() {
    let (conn, engine) = setup();
    for who in [
        r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#,
        r#"{"sub":"bob","role":"authenticated","tenant_id":"t2"}"#,
        r#"{"sub":"dave","role":"authenticated","tenant_id":"t1"}"#,
    ] {
        let id = common::identity(who);
        let q = engine.rewrite(&id, "SELECT * FROM todos").unwrap();
        // todos_shared reads members, whose policy reads lists: nested.
        assert!(q.memberships.iter().any(|m| !m.nested.is_empty()));
        check(&conn, &q.memberships);
        let by_where = common::query(
            &conn,
            &format!("SELECT * FROM todos WHERE {}", q.where_sql),
            &q.params,
        );
        assert_eq!(
            by_where.len(),
            common::query(&conn, &q.snapshot_sql, &q.params).len()
        );
        let q = engine
            .rewrite(&id, "SELECT * FROM members WHERE list_id = 1")
            .unwrap();
        check(&conn, &q.memberships);
        for table in ["todos", "members"] {
            let plan = engine.write_plan(&id, table).unwrap();
            check(&conn, &plan.memberships);
        }
    }
}

#[test]
fn membership_covers_are_the_filters_equalities() {
    let engine = common::example_engine();
    let id = common::identity(r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#);
    let q = engine.rewrite(&id, "SELECT * FROM todos").unwrap();
    let covers: BTreeMap<&str, &Option<Vec<IndexAtom>>> = q
        .memberships
        .iter()
        .map(|m| (m.table.as_str(), &m.index_cover))
        .collect();
    // members: user_id = 'alice' (AND the tenant/owner policies): one atom.
    assert_eq!(
        covers["members"],
        &Some(vec![IndexAtom::Eq {
            column: 1,
            value: IndexKey::Text("alice".into())
        }])
    );
    // lists (nested in members' policy): owner = 'alice'.
    assert_eq!(
        covers["lists"],
        &Some(vec![IndexAtom::Eq {
            column: 2,
            value: IndexKey::Text("alice".into())
        }])
    );
}

#[track_caller]
fn check_probe(set_values: Vec<Value>, aff: Option<tenantsync_policy::Affinity>, probes: &[Value]) {
    let set = MembershipSet::new(set_values, aff);
    let keys: Vec<IndexKey> = set.index_keys().collect();
    for p in probes {
        let by_key = membership_probe_key(p, aff).is_some_and(|k| keys.contains(&k));
        assert_eq!(
            by_key,
            set.contains_value(p),
            "probe {p:?} in {:?} ({aff:?})",
            set.values()
        );
    }
}

#[test]
fn probe_keys_find_exactly_the_set_members() {
    use tenantsync_policy::Affinity::*;
    let probes = [
        Value::Integer(5),
        Value::Real(5.0),
        Value::Text("5".into()),
        Value::Text(" 5".into()),
        Value::Text("abc".into()),
        Value::Real(0.5),
        Value::Blob(vec![0x35]),
        Value::Null,
        Value::Integer(6),
    ];
    for aff in [
        None,
        Some(Integer),
        Some(Text),
        Some(Numeric),
        Some(Real),
        Some(Blob),
    ] {
        check_probe(
            vec![
                Value::Integer(5),
                Value::Text("abc".into()),
                Value::Real(0.5),
            ],
            aff,
            &probes,
        );
        check_probe(vec![Value::Text("5".into()), Value::Null], aff, &probes);
        check_probe(vec![], aff, &probes);
    }
}

#[test]
fn every_subquery_is_judged_on_the_state_before_the_write() {
    let engine = common::example_engine();
    let alice = common::identity(r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#);
    let plan = engine.write_plan(&alice, "todos").unwrap();
    let text = |s: &str| Value::Text(s.into());
    // carol's todo in list 9, which alice may read and edit only as a
    // member of 9.
    let old = vec![
        Value::Integer(1),
        text("t1"),
        Value::Integer(9),
        text("carol"),
        text("x"),
        Value::Integer(0),
        Value::Null,
    ];
    let mut new = old.clone();
    new[4] = text("y");
    let member = {
        let mut r = MembershipResults::new();
        for m in plan.memberships.iter().filter(|m| m.direct) {
            r.insert(m.id, m.set([Value::Integer(9)]));
        }
        r
    };
    let none = MembershipResults::new();
    let rows = [(Some(old.as_slice()), Some(new.as_slice()))];
    let decide = |ms: &MembershipResults| plan.check(&rows, ms).unwrap().swap_remove(0);
    assert!(decide(&member).allowed);
    let d = decide(&none);
    assert!(!d.allowed && !d.skipped, "{d:?}");
    // The UPDATE's new row must stay readable to its writer (PostgreSQL):
    // moving carol's todo to a list alice is no member of is refused.
    let mut moved = old.clone();
    moved[2] = Value::Integer(10);
    let d = plan
        .check(&[(Some(old.as_slice()), Some(moved.as_slice()))], &member)
        .unwrap()
        .swap_remove(0);
    assert!(!d.allowed, "{d:?}");
    assert!(d.reason.contains("new row would not be visible"), "{d:?}");
    // A DELETE of a row alice cannot read is skipped, not refused.
    let d = plan
        .check(&[(Some(old.as_slice()), None)], &none)
        .unwrap()
        .swap_remove(0);
    assert!(!d.allowed && d.skipped, "{d:?}");
}
