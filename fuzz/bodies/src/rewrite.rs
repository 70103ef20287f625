//! Target `rewrite`: arbitrary subscription queries and claims through
//! `Engine::rewrite`, checked against a real core database.
//!
//! Input: the first byte picks one of [`POLICIES`]; the rest (lossy UTF-8)
//! is `<claims JSON>\n<query>`. When the first line is not a JSON object
//! the whole rest is the query and the claims are one of the fixed
//! [`IDENTITIES`] (picked by the first byte too), so mutations of the query
//! are never wasted on broken claims.
//!
//! The database holds the example schema (lists, todos, members) and the
//! differential test's typed table `t` with its membership table `m`,
//! filled with rows drawn from a fixed seed (every storage class, the
//! tenants and users the policies and claims name).
//!
//! Properties, for every accepted query:
//! - the snapshot SQL runs and selects exactly the rows (by primary key)
//!   whose predicate the reference evaluator (`EffectiveQuery::matches`,
//!   i.e. `Predicate::eval`) says is TRUE, given the membership sets from
//!   the membership SQL;
//! - the delta SQL since version 0 returns changes of exactly those rows
//!   (every row here has changes) and of no other table;
//! - every visible row is granted by a named permissive policy, and hits an
//!   atom of the index cover when there is one;
//! - the SQL has exactly as many placeholders as there are parameters.
//!
//! Refused queries must be refused with an error, never a panic.

use std::collections::BTreeSet;

use tenantsync_core::{CrrConnection, PackedPk};
use tenantsync_policy::{
    EffectiveQuery, Engine, Identity, IndexAtom, IndexKey, MembershipResults, PolicySet, Schema,
};
use tenantsync_types::Value;

use crate::sql::{core_db, policy_schema, query};

/// The schema (examples' tables plus `t` and `m`).
pub const SCHEMA: &str = concat!(
    include_str!("../../../examples/schema.sql"),
    "
CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a INTEGER, b TEXT, c REAL, d NUMERIC, e, tenant TEXT);
CREATE TABLE m (k INTEGER PRIMARY KEY NOT NULL, v TEXT, w INTEGER, tenant TEXT);
SELECT crsql_as_crr('t');
SELECT crsql_as_crr('m');
"
);

/// The policy files the first byte picks from.
pub const POLICIES: &[&str] = &[
    // The examples' policies, and everyone may read t and m by tenant.
    concat!(
        include_str!("../../../examples/policy.sql"),
        "
CREATE POLICY t_tenant ON t FOR SELECT USING (tenant = auth.claim('tenant_id'));
CREATE POLICY m_all ON m FOR SELECT USING (true);
"
    ),
    // Typed comparisons, memberships, restrictive policies, roles.
    "
CREATE POLICY p_owner ON t FOR SELECT TO authenticated USING (b = auth.uid() OR a = auth.claim('n'));
CREATE POLICY p_member ON t FOR SELECT USING (a IN (SELECT w FROM m WHERE v = auth.uid()));
CREATE POLICY p_range ON t FOR SELECT TO r1 USING (c BETWEEN 0 AND auth.claim('n') OR d > e);
CREATE POLICY r_tenant ON t AS RESTRICTIVE FOR SELECT USING (tenant IS NOT DISTINCT FROM auth.claim('tenant_id') OR auth.role() = 'r2');
CREATE POLICY m_tenant ON m FOR SELECT USING (tenant = auth.claim('tenant_id') OR tenant IS NULL);
CREATE POLICY lists_all ON lists FOR SELECT USING (owner = auth.uid());
CREATE POLICY todos_all ON todos FOR SELECT USING (list_id NOT IN (SELECT id FROM lists WHERE tenant_id <> auth.claim('tenant_id')));
CREATE POLICY members_all ON members FOR SELECT USING (user_id LIKE auth.uid() || '%');
",
    // Expressions: arithmetic, text functions, CASE, coalesce.
    "
CREATE POLICY e1 ON t FOR SELECT USING (coalesce(a, 0) + length(b) > 1 AND lower(b) <> upper(b));
CREATE POLICY e2 ON t FOR SELECT USING (CASE WHEN tenant = auth.claim('tenant_id') THEN e ELSE NULL END IS NOT NULL);
CREATE POLICY e3 ON t FOR SELECT USING ((a * 2) % 3 = 1 OR c / 2 < -0.5 OR b || e = 'a1');
CREATE POLICY m_e ON m FOR SELECT USING (w - 1 IN (0, 1, auth.claim('n')));
CREATE POLICY todos_e ON todos FOR SELECT USING (done OR priority IS NULL);
CREATE POLICY lists_e ON lists FOR SELECT USING (ifnull(name, '') NOT LIKE '%b%' ESCAPE '!');
",
    // Nothing granted on some tables (default deny), a role-only policy.
    "
CREATE POLICY only_r2 ON t FOR SELECT TO r2 USING (true);
CREATE POLICY todos_owner ON todos FOR SELECT USING (owner = auth.uid());
",
];

/// Claims used when the input's first line is not a JSON object.
pub const IDENTITIES: &[&str] = &[
    r#"{"sub":"alice","role":"authenticated","tenant_id":"t1","n":1}"#,
    r#"{"sub":"bob","role":"r1","tenant_id":"t2","n":2.5}"#,
    r#"{"sub":"u1","role":"r2","n":"1"}"#,
    r#"{"sub":"x' OR '1'='1","role":"authenticated","tenant_id":"t1' OR '1'='1"}"#,
    r#"{}"#,
];

struct Fixture {
    db: CrrConnection,
    schema: Schema,
    engines: Vec<Engine>,
}

/// A small deterministic generator for the fixed rows.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

fn pool() -> Vec<Value> {
    vec![
        Value::Null,
        Value::Integer(0),
        Value::Integer(1),
        Value::Integer(-1),
        Value::Integer(2),
        Value::Integer(3),
        Value::Integer(i64::MAX),
        Value::Integer(i64::MIN),
        Value::Real(0.5),
        Value::Real(-1.5),
        Value::Real(2.0),
        Value::Real(-0.0),
        Value::Real(1e20),
        Value::Real(0.1),
        Value::Text(String::new()),
        Value::Text("a".into()),
        Value::Text("A".into()),
        Value::Text("ab".into()),
        Value::Text("1".into()),
        Value::Text(" 2 ".into()),
        Value::Text("1.5".into()),
        Value::Text("x%y".into()),
        Value::Text("é".into()),
        Value::Text("2abc".into()),
        Value::Text("t1".into()),
        Value::Text("t2".into()),
        Value::Text("u1".into()),
        Value::Text("alice".into()),
        Value::Text("bob".into()),
        Value::Blob(vec![0x61]),
        Value::Blob(vec![]),
    ]
}

/// The fixed rows: the same for every run (seed 0x5eed).
fn fill(db: &CrrConnection) {
    let mut rng = Rng(0x5eed);
    let pool = pool();
    let users = ["alice", "bob", "carol", "u1"];
    let tenants: Vec<Value> = vec![
        Value::Text("t1".into()),
        Value::Text("t2".into()),
        Value::Null,
    ];
    let conn = db.conn();
    let insert = |sql: &str, vals: Vec<Value>| {
        conn.execute(sql, rusqlite::params_from_iter(vals.iter()))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    };
    for id in 0..48 {
        let mut row = vec![Value::Integer(id)];
        row.extend((0..5).map(|_| rng.pick(&pool).clone()));
        row.push(rng.pick(&tenants).clone());
        insert("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", row);
    }
    for k in 0..12 {
        let mut row = vec![Value::Integer(k)];
        row.extend((0..2).map(|_| rng.pick(&pool).clone()));
        row.push(rng.pick(&tenants).clone());
        insert("INSERT INTO m VALUES (?, ?, ?, ?)", row);
    }
    for id in 1..=8 {
        insert(
            "INSERT INTO lists VALUES (?, ?, ?, ?)",
            vec![
                Value::Integer(id),
                rng.pick(&tenants).clone(),
                Value::Text((*rng.pick(&users)).into()),
                rng.pick(&pool).clone(),
            ],
        );
    }
    for id in 1..=32 {
        insert(
            "INSERT INTO todos VALUES (?, ?, ?, ?, ?, ?, ?)",
            vec![
                Value::Integer(id),
                rng.pick(&tenants).clone(),
                Value::Integer((rng.next() % 10) as i64),
                Value::Text((*rng.pick(&users)).into()),
                rng.pick(&pool).clone(),
                Value::Integer((rng.next() % 2) as i64),
                rng.pick(&pool).clone(),
            ],
        );
    }
    for list in 1..=8 {
        for user in users {
            if rng.next().is_multiple_of(3) {
                insert(
                    "INSERT INTO members VALUES (?, ?, ?)",
                    vec![
                        Value::Integer(list),
                        Value::Text(user.into()),
                        rng.pick(&tenants).clone(),
                    ],
                );
            }
        }
    }
}

thread_local! {
    static FIXTURE: Fixture = {
        let db = core_db(1, SCHEMA);
        fill(&db);
        let schema = policy_schema(&db);
        let engines = POLICIES
            .iter()
            .map(|p| {
                Engine::new(
                    PolicySet::parse("policy.sql", p, &schema)
                        .unwrap_or_else(|d| panic!("a fixed policy file is refused:\n{d}")),
                )
            })
            .collect();
        Fixture { db, schema, engines }
    };
}

/// The target's body.
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let (id, query_sql) = match text.split_once('\n') {
        Some((line, q)) => match Identity::from_json(line) {
            Ok(id) => (id, q),
            Err(_) => (fixed_identity(which), &*text),
        },
        None => (fixed_identity(which), &*text),
    };
    FIXTURE.with(|fx| {
        let engine = &fx.engines[usize::from(which) % fx.engines.len()];
        if let Ok(q) = engine.rewrite(&id, query_sql) {
            check(fx, &q, query_sql);
        }
    });
}

fn fixed_identity(which: u8) -> Identity {
    let claims = IDENTITIES[usize::from(which / 4) % IDENTITIES.len()];
    Identity::from_json(claims).expect("fixed claims parse")
}

/// Runs SQL that must run, with the context of the query on failure.
fn must(fx: &Fixture, what: &str, sql: &str, params: &[Value], q: &str) -> Vec<Vec<Value>> {
    let conn = fx.db.conn();
    let stmt = conn
        .prepare(sql)
        .unwrap_or_else(|e| panic!("{what} of `{q}` does not prepare: {e}\n{sql}"));
    assert_eq!(
        stmt.parameter_count(),
        params.len(),
        "{what} of `{q}` has {} placeholders for {} parameters\n{sql}",
        stmt.parameter_count(),
        params.len()
    );
    drop(stmt);
    query(conn, sql, params)
        .unwrap_or_else(|e| panic!("{what} of `{q}` fails: {e}\n{sql}\n{params:?}"))
}

fn check(fx: &Fixture, q: &EffectiveQuery, query_sql: &str) {
    let table = fx
        .schema
        .table(&q.table)
        .unwrap_or_else(|| panic!("rewrite names an unknown table {}", q.table));
    let pk_of = |row: &[Value]| -> Vec<u8> {
        let vals: Vec<Value> = table.pk.iter().map(|&i| row[i].clone()).collect();
        PackedPk::pack(&vals).expect("pk packs").0
    };
    // Snapshot: pk columns by name in snapshot_columns.
    let pk_pos: Vec<usize> = table
        .pk
        .iter()
        .map(|&i| {
            q.snapshot_columns
                .iter()
                .position(|c| c.eq_ignore_ascii_case(&table.columns[i].name))
                .unwrap_or_else(|| panic!("snapshot columns {:?} lack a pk", q.snapshot_columns))
        })
        .collect();
    let snapshot = must(fx, "snapshot SQL", &q.snapshot_sql, &q.params, query_sql);
    let by_sql: BTreeSet<Vec<u8>> = snapshot
        .iter()
        .map(|r| {
            let vals: Vec<Value> = pk_pos.iter().map(|&i| r[i].clone()).collect();
            PackedPk::pack(&vals).expect("pk packs").0
        })
        .collect();
    assert_eq!(
        by_sql.len(),
        snapshot.len(),
        "snapshot SQL returns a row twice"
    );
    let mut ms = MembershipResults::new();
    for m in &q.memberships {
        let vals = must(fx, "membership SQL", &m.sql, &m.params, query_sql);
        if m.direct {
            ms.insert(m.id, m.set(vals.into_iter().map(|mut r| r.remove(0))));
        }
    }
    let all = must(
        fx,
        "reading the table",
        &format!("SELECT * FROM \"{}\"", table.name),
        &[],
        query_sql,
    );
    let mut by_eval = BTreeSet::new();
    for row in &all {
        if !q.matches(row, &ms) {
            continue;
        }
        by_eval.insert(pk_of(row));
        assert!(
            !q.granting_policies(row, &ms).is_empty(),
            "`{query_sql}`: no policy grants visible row {row:?}"
        );
        if let Some(cover) = &q.index_cover {
            let hit = cover.iter().any(|a| match a {
                IndexAtom::Eq { column, value } => {
                    IndexKey::from_value(&row[*column]).as_ref() == Some(value)
                }
                IndexAtom::InMembership { column, membership } => ms
                    .get(*membership)
                    .is_some_and(|s| s.contains_value(&row[*column])),
            });
            assert!(
                hit,
                "`{query_sql}`: visible row {row:?} hits no atom of the index cover {cover:?}"
            );
        }
    }
    let report = || {
        format!(
            "query: {query_sql}\nsql: {}\nparams: {:?}\nonly SQL: {:?}\nonly evaluator: {:?}",
            q.snapshot_sql,
            q.params,
            by_sql.difference(&by_eval).collect::<Vec<_>>(),
            by_eval.difference(&by_sql).collect::<Vec<_>>()
        )
    };
    assert!(
        by_sql.is_subset(&by_eval),
        "the snapshot SQL selects rows the evaluator hides\n{}",
        report()
    );
    assert_eq!(
        by_sql,
        by_eval,
        "the snapshot SQL misses rows the evaluator shows\n{}",
        report()
    );
    let mut params = q.params.clone();
    params.push(Value::Integer(0));
    assert_eq!(q.delta_since_param, params.len());
    let delta = must(fx, "delta SQL", &q.delta_sql, &params, query_sql);
    let mut by_delta = BTreeSet::new();
    for c in &delta {
        assert_eq!(
            c[0],
            Value::Text(table.name.clone()),
            "delta SQL returns another table's change"
        );
        let Value::Blob(pk) = &c[1] else {
            panic!("delta pk {:?}", c[1])
        };
        by_delta.insert(pk.clone());
    }
    assert_eq!(
        by_delta,
        by_eval,
        "the delta SQL's rows differ from the evaluator's\n{}",
        report()
    );
}
