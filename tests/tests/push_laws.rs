//! The law of the write path (issue 11): a push never changes, creates or
//! deletes a row that its checks did not evaluate and allow.
//!
//! Random pushes (rows of the examples' tables named by every pk encoding,
//! clocks from tiny to extreme, tombstones and resurrections, values moving
//! rows between tenants, identities of two tenants sharing subjects) go to
//! a real engine in process. Around each push the test dumps the server's
//! rows and clocks itself, keyed by the rows' stored keys, and for every row
//! that differs asks the policy engine, independently of the server's own
//! bookkeeping, whether this identity may turn that row (as it was) into
//! that row (as it is), with the membership sets read before the push. An
//! accepted push changed only allowed rows; a refused or failed push
//! changed nothing. Each push writes one table (so its memberships, which
//! read other tables, are those of the database before it).

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::select;
use tenantsync_core::{Change, CrrConnection, Options, PackedPk, SiteId, Value};
use tenantsync_policy::{Engine, Identity, MembershipResults, PolicySet, Schema};
use tenantsync_protocol::http::{PushRequest, SqlRequest, SqlStatement};
use tenantsync_server::{PushError, ServiceConfig, SyncService, Synchronous};

const SCHEMA: &str = include_str!("../../examples/schema.sql");
const POLICY: &str = include_str!("../../examples/policy.sql");

/// Identities: subjects shared across the two tenants.
const WHO: &[(&str, &str)] = &[
    ("alice", "acme"),
    ("bob", "acme"),
    ("alice", "globex"),
    ("bob", "globex"),
];

fn claims(i: usize) -> serde_json::Map<String, serde_json::Value> {
    let (sub, tenant) = WHO[i];
    let serde_json::Value::Object(m) = serde_json::json!({
        "sub": sub, "role": "authenticated", "tenant_id": tenant, "exp": 4_000_000_000u64
    }) else {
        unreachable!()
    };
    m
}

/// A key value naming row `id` (or not) in some encoding.
fn key(id: i64) -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => Just(Value::Integer(id)),
        1 => select(vec![
        Value::Real(id as f64),
        Value::Text(format!("{id}")),
        Value::Text(format!(" {id}")),
        Value::Text(format!("\u{a0}{id}")),
        Value::Text(format!("+{id}")),
        Value::Text(format!("{id}.0")),
        Value::Blob(id.to_string().into_bytes()),
        Value::Null,
    ]),
    ]
}

#[derive(Debug, Clone)]
struct RowWrite {
    pk: Vec<Value>,
    /// 0: cells of a live row, 1: a resurrection (sentinel + cells),
    /// 2: a delete.
    kind: u8,
    cl: i64,
    cv: i64,
    cells: Vec<(&'static str, Value)>,
}

#[derive(Debug, Clone)]
struct Push {
    who: usize,
    table: &'static str,
    rows: Vec<RowWrite>,
}

fn cell_value(col: &'static str) -> BoxedStrategy<Value> {
    match col {
        "tenant_id" => select(vec![
            Value::from("acme"),
            Value::from("globex"),
            Value::Null,
        ])
        .boxed(),
        "owner" | "user_id" => select(vec![
            Value::from("alice"),
            Value::from("bob"),
            Value::from("carol"),
        ])
        .boxed(),
        "list_id" => (1i64..4).prop_map(Value::Integer).boxed(),
        "done" => (0i64..2).prop_map(Value::Integer).boxed(),
        _ => select(vec![Value::from("x"), Value::from("y"), Value::Integer(3)]).boxed(),
    }
}

fn row_write(table: &'static str) -> impl Strategy<Value = RowWrite> {
    let cols: &'static [&'static str] = match table {
        "todos" => &["tenant_id", "list_id", "owner", "title", "done"],
        "lists" => &["tenant_id", "owner", "name"],
        _ => &["tenant_id"],
    };
    let pk: BoxedStrategy<Vec<Value>> = if table == "members" {
        ((1i64..4).prop_flat_map(key), select(vec!["alice", "bob"]))
            .prop_map(|(l, u)| vec![l, Value::from(u)])
            .boxed()
    } else {
        (1i64..5).prop_flat_map(key).prop_map(|k| vec![k]).boxed()
    };
    let cells = prop::collection::vec(
        (0..cols.len()).prop_flat_map(move |i| cell_value(cols[i]).prop_map(move |v| (cols[i], v))),
        1..4,
    );
    (
        pk,
        0u8..3,
        select(vec![1i64, 3, 5, 1 << 20, (1 << 53) + 1, i64::MAX]),
        select(vec![1i64, 2, 10, 1 << 40, i64::MAX]),
        cells,
    )
        .prop_map(|(pk, kind, cl, cv, cells)| RowWrite {
            pk,
            kind,
            cl,
            cv,
            cells,
        })
}

fn push() -> impl Strategy<Value = Push> {
    (0..WHO.len(), select(vec!["todos", "lists", "members"])).prop_flat_map(|(who, table)| {
        prop::collection::vec(row_write(table), 1..4).prop_map(move |rows| Push {
            who,
            table,
            rows,
        })
    })
}

/// Every row of a table by its stored key: values and clocks.
type Dump = BTreeMap<PackedPk, (Option<Vec<Value>>, Vec<String>)>;

fn dump(db: &CrrConnection, table: &str) -> Dump {
    let schema = db.schema().unwrap();
    let t = schema.table(table).unwrap();
    let pk_cols = t.pk_positions();
    let mut out = Dump::new();
    let mut stmt = db
        .conn()
        .prepare(&format!("SELECT * FROM \"{table}\""))
        .unwrap();
    let n = stmt.column_count();
    let rows: Vec<Vec<Value>> = stmt
        .query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for row in rows {
        let key: Vec<Value> = pk_cols.iter().map(|&i| row[i].clone()).collect();
        out.entry(PackedPk::pack(&key).unwrap()).or_default().0 = Some(row);
    }
    for c in db
        .changes(&tenantsync_core::ChangesQuery {
            table: Some(table.into()),
            ..Default::default()
        })
        .unwrap()
    {
        out.entry(c.pk.clone()).or_default().1.push(format!(
            "{} cv{} cl{} {}",
            c.cid, c.col_version, c.cl, c.site_id
        ));
    }
    out
}

/// The membership sets of `table`'s write plan for `who`, on `db` now.
fn memberships(
    engine: &Engine,
    db: &CrrConnection,
    who: &Identity,
    table: &str,
) -> MembershipResults {
    let plan = engine.write_plan(who, table).unwrap();
    let mut r = MembershipResults::new();
    for m in plan.memberships.iter().filter(|m| m.direct) {
        let mut stmt = db.conn().prepare(&m.sql).unwrap();
        let vals: Vec<Value> = stmt
            .query_map(rusqlite::params_from_iter(m.params.iter()), |row| {
                row.get(0)
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        r.insert(m.id, m.set(vals));
    }
    r
}

fn changes_of(p: &Push, db: &CrrConnection, site: SiteId, version: i64) -> Vec<Change> {
    let mut out = Vec::new();
    for (seq, w) in p.rows.iter().enumerate() {
        let pk = PackedPk::pack(&w.pk).unwrap();
        let make = |cid: &str, val: Value, cv: i64, cl: i64| Change {
            table: p.table.into(),
            pk: pk.clone(),
            cid: cid.into(),
            val,
            col_version: cv,
            db_version: version,
            site_id: site,
            cl,
            seq: seq as i64,
        };
        // Clocks near the server's, or extreme: those of the row as held.
        let held = db
            .canonical_pk(p.table, &pk)
            .ok()
            .and_then(|k| db.row_changes(p.table, &[k]).ok())
            .unwrap_or_default();
        let base = held.iter().map(|c| c.cl).max().unwrap_or(0);
        match w.kind {
            0 => {
                let cl = if base % 2 == 1 { base } else { base + 1 };
                let cl = if w.cl > (1 << 20) { w.cl | 1 } else { cl };
                for (c, v) in &w.cells {
                    let cv = held
                        .iter()
                        .find(|h| h.cid == *c)
                        .map_or(0, |h| h.col_version)
                        + 1;
                    out.push(make(c, v.clone(), cv.max(w.cv.min(cv + 1)), cl));
                }
            }
            1 => {
                let cl = (base + 1) | 1;
                let cl = cl.max(w.cl | 1);
                out.push(make("-1", Value::Null, cl, cl));
                for (c, v) in &w.cells {
                    out.push(make(c, v.clone(), w.cv.min(cl), cl));
                }
            }
            _ => {
                let cl = if base % 2 == 1 { base + 1 } else { base + 2 };
                out.push(make("-1", Value::Null, cl, cl));
            }
        }
    }
    out
}

#[test]
fn a_push_never_changes_a_row_its_checks_did_not_allow() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    let totals = std::cell::Cell::new((0usize, 0usize));
    runner
        .run(&prop::collection::vec(push(), 1..12), |pushes| {
            let (a, r) = one_history(&pushes)?;
            let (ta, tr) = totals.get();
            totals.set((ta + a, tr + r));
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = totals.get();
    eprintln!("{accepted} pushes accepted, {refused} refused");
    assert!(accepted > 0 && refused > 0, "both outcomes happen");
}

/// Runs one history of pushes on a fresh engine; (accepted, refused).
fn one_history(pushes: &[Push]) -> Result<(usize, usize), TestCaseError> {
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let mut config = ServiceConfig::new(&path, SCHEMA, "policy.sql", POLICY);
        config.synchronous = Synchronous::Normal;
        let service = SyncService::start(config).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let service_principal = {
            let serde_json::Value::Object(m) =
                serde_json::json!({"sub": "ops", "role": "service", "exp": 4_000_000_000u64})
            else {
                unreachable!()
            };
            tenantsync_server::Principal::from_claims(m, "tenant_id")
        };
        let seed = [
            "INSERT INTO lists VALUES (1, 'acme', 'alice', 'a1'), (2, 'globex', 'alice', 'g2'), (3, 'acme', 'bob', 'a3')",
            "INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (1, 'acme', 1, 'alice', 't1'), (2, 'globex', 2, 'alice', 't2'), (3, 'acme', 3, 'bob', 't3')",
            "INSERT INTO members VALUES (1, 'bob', 'acme'), (2, 'bob', 'globex')",
        ];
        rt.block_on(
            service.sql(
                &service_principal,
                SqlRequest {
                    statements: seed
                        .iter()
                        .map(|s| SqlStatement {
                            sql: (*s).into(),
                            params: vec![],
                        })
                        .collect(),
                    tenant: None,
                },
            ),
        )
        .unwrap();
        let reader = CrrConnection::open_with(
            &path,
            Options {
                read_only: true,
                ..Options::default()
            },
        )
        .unwrap();
        let mut core_schema = reader.schema().unwrap();
        core_schema
            .tables
            .retain(|t| !t.name.starts_with("tenantsync_"));
        let engine = Engine::new(
            PolicySet::parse("policy.sql", POLICY, &Schema::from(&core_schema)).unwrap(),
        );
        let mut pushed = [0i64; 4];
        let (mut accepted, mut refused) = (0, 0);
        for p in pushes {
            let who = Identity::new(claims(p.who));
            let site = SiteId([p.who as u8 + 1; 16]);
            let before = dump(&reader, p.table);
            let ms = memberships(&engine, &reader, &who, p.table);
            let changes = changes_of(p, &reader, site, pushed[p.who] + 1);
            let principal = tenantsync_server::Principal::from_claims(claims(p.who), "tenant_id");
            let r = rt.block_on(service.push(
                &principal,
                PushRequest {
                    site_id: site,
                    from: pushed[p.who],
                    to: pushed[p.who] + 1,
                    changes,
                },
            ));
            let after = dump(&reader, p.table);
            let changed: Vec<&PackedPk> = before
                .keys()
                .chain(after.keys())
                .filter(|k| before.get(*k) != after.get(*k))
                .collect();
            match r {
                Ok(_) => {
                    pushed[p.who] += 1;
                    accepted += 1;
                    let plan = engine.write_plan(&who, p.table).unwrap();
                    for k in changed {
                        let (b, a) = (
                            before.get(k).and_then(|r| r.0.clone()),
                            after.get(k).and_then(|r| r.0.clone()),
                        );
                        prop_assert!(
                            b.is_some() || a.is_some(),
                            "{p:?}: a row absent before and after kept a trace: {k} {:?}",
                            after.get(k)
                        );
                        let d = plan
                            .check(&[(b.as_deref(), a.as_deref())], &ms)
                            .unwrap()
                            .swap_remove(0);
                        prop_assert!(
                            d.allowed,
                            "{p:?}: row {k} changed from {b:?} to {a:?} though {}",
                            d.reason
                        );
                    }
                }
                Err(PushError::Refused(_)) | Err(PushError::Api(_)) => {
                    refused += 1;
                    prop_assert!(
                        changed.is_empty(),
                        "{p:?}: a push that was not accepted changed {changed:?}"
                    );
                }
            }
        }
        rt.block_on(service.shutdown(std::time::Duration::from_secs(5)));
        Ok((accepted, refused))
    }
}
