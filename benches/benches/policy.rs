//! The policy engine's costs: rewriting a subscription (once per
//! subscription, cached by the server), evaluating a predicate on a changed
//! row (per change per candidate view: must be cheap), and checking a
//! 100-row pushed batch.
//!
//! Run: `cargo bench -p tenantsync-benches --bench policy`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tenantsync_policy::{
    ColumnSchema, Engine, Identity, MembershipResults, PolicySet, Schema, TableSchema,
};
use tenantsync_types::Value;

/// examples/schema.sql, described by hand (the bench does not open SQLite).
fn schema() -> Schema {
    let table = |name: &str, cols: &[(&str, &str)], pk: Vec<usize>| TableSchema {
        name: name.into(),
        columns: cols
            .iter()
            .map(|(n, t)| ColumnSchema::new(*n, Some(t)))
            .collect(),
        pk,
        is_crr: true,
    };
    Schema {
        tables: vec![
            table(
                "lists",
                &[
                    ("id", "INTEGER"),
                    ("tenant_id", "TEXT"),
                    ("owner", "TEXT"),
                    ("name", "TEXT"),
                ],
                vec![0],
            ),
            table(
                "todos",
                &[
                    ("id", "INTEGER"),
                    ("tenant_id", "TEXT"),
                    ("list_id", "INTEGER"),
                    ("owner", "TEXT"),
                    ("title", "TEXT"),
                    ("done", "INTEGER"),
                    ("priority", "INTEGER"),
                ],
                vec![0],
            ),
            table(
                "members",
                &[
                    ("list_id", "INTEGER"),
                    ("user_id", "TEXT"),
                    ("tenant_id", "TEXT"),
                ],
                vec![0, 1],
            ),
        ],
    }
}

fn engine() -> Engine {
    let policy = include_str!("../../examples/policy.sql");
    Engine::new(PolicySet::parse("policy.sql", policy, &schema()).expect("example policy is valid"))
}

fn alice() -> Identity {
    Identity::from_json(r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#).unwrap()
}

fn todo(id: i64, owner: &str, list: i64) -> Vec<Value> {
    vec![
        Value::Integer(id),
        Value::Text("t1".into()),
        Value::Integer(list),
        Value::Text(owner.into()),
        Value::Text("a title of some length".into()),
        Value::Integer(0),
        Value::Integer(2),
    ]
}

fn benches(c: &mut Criterion) {
    let engine = engine();
    let id = alice();
    let query = "SELECT * FROM todos WHERE list_id = 7 AND done = 0";

    c.bench_function("policy/rewrite", |b| {
        b.iter(|| engine.rewrite(black_box(&id), black_box(query)).unwrap())
    });

    let q = engine.rewrite(&id, query).unwrap();
    let mut ms = MembershipResults::new();
    for m in &q.memberships {
        ms.insert(m.id, m.set((0..50).map(Value::Integer)));
    }
    let visible = todo(1, "alice", 7);
    let hidden = todo(2, "bob", 8);
    let mut g = c.benchmark_group("policy/eval");
    g.throughput(Throughput::Elements(1));
    g.bench_function("visible_row", |b| {
        b.iter(|| q.predicate.eval(black_box(&visible), &q.params, &ms))
    });
    g.bench_function("hidden_row", |b| {
        b.iter(|| q.predicate.eval(black_box(&hidden), &q.params, &ms))
    });
    g.finish();

    let plan = engine.write_plan(&id, "todos").unwrap();
    let mut wms = MembershipResults::new();
    for m in &plan.memberships {
        wms.insert(m.id, m.set((0..50).map(Value::Integer)));
    }
    let before: Vec<Vec<Value>> = (0..100).map(|i| todo(i, "alice", i % 60)).collect();
    let after: Vec<Vec<Value>> = before
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r[5] = Value::Integer(1);
            r
        })
        .collect();
    let batch: Vec<_> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (Some(b.as_slice()), Some(a.as_slice())))
        .collect();
    let mut g = c.benchmark_group("policy/check_writes");
    g.throughput(Throughput::Elements(100));
    g.bench_function("update_batch_100", |b| {
        b.iter(|| plan.check(black_box(&batch), &wms).unwrap())
    });
    g.bench_function("plan_and_update_batch_100", |b| {
        b.iter(|| {
            engine
                .check_writes(&id, "todos", black_box(&batch), &wms)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(policy, benches);
criterion_main!(policy);
