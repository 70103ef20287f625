//! Hooks for the criterion benchmarks in `benches/` (not a stable API):
//! the engine's matching and the outbox's checkpoint builder, driven
//! directly on seeded data.

use std::sync::Arc;
use std::time::Instant;

use tenantsync_core::{CrrConnection, PackedPk, SiteId};
use tenantsync_policy::{Engine as PolicyEngine, Identity, PolicySet};
use tenantsync_types::Value;

use crate::engine::filters::{ChangedRow, Filters};
use crate::engine::outbox::{Enc, Item, ItemPart, RowChanges, ViewPart, build_changes};
use crate::engine::schema::ServerSchema;

/// `views` views over examples/schema.sql + policy.sql, one per user, users
/// spread over `views / 10` tenants, each user with a few todos; and one
/// changed row to match, in a tenant with 10 users.
pub struct Matching {
    db: CrrConnection,
    schema: ServerSchema,
    filters: Filters,
    rows: Vec<ChangedRow>,
}

fn identity(user: usize, tenant: usize) -> Identity {
    let serde_json::Value::Object(m) = serde_json::json!({
        "sub": format!("u{user}"), "role": "authenticated", "tenant_id": format!("t{tenant}")
    }) else {
        unreachable!()
    };
    Identity::new(m)
}

impl Matching {
    pub fn new(schema_sql: &str, policy_sql: &str, views: usize) -> Matching {
        let db = CrrConnection::open_in_memory().expect("in-memory database");
        db.conn().execute_batch(schema_sql).expect("schema");
        db.conn().execute_batch("BEGIN").expect("begin");
        for u in 0..views {
            let t = u / 10;
            for k in 0..3 {
                let id = (u * 3 + k) as i64;
                db.conn()
                    .execute(
                        "INSERT INTO todos VALUES (?1, ?2, ?3, ?4, 'seed', 0, 1)",
                        rusqlite::params![id, format!("t{t}"), (u % 50) as i64, format!("u{u}")],
                    )
                    .expect("seed");
            }
        }
        db.conn().execute_batch("COMMIT").expect("commit");
        let schema = ServerSchema::read(&db, Vec::new()).expect("schema");
        let policy = PolicyEngine::new(
            PolicySet::parse("policy.sql", policy_sql, &schema.policy).expect("policy"),
        );
        let mut filters = Filters::default();
        for u in 0..views {
            let q = policy
                .rewrite(&identity(u, u / 10), "SELECT * FROM todos")
                .expect("rewrite");
            filters
                .view_for(&db, &schema, &Arc::new(q), 0)
                .expect("view");
        }
        // One changed row: user 0's first todo, retitled.
        let t = schema.table("todos").expect("todos").id;
        let pk = PackedPk::pack(&[Value::Integer(0)]).expect("pk");
        let after = db.row_values("todos", &pk).expect("row").expect("exists");
        let changes = db
            .row_changes("todos", std::slice::from_ref(&pk))
            .expect("changes");
        let rows = vec![ChangedRow {
            table: t,
            pk: pk.clone(),
            after: Some(after),
            delta: Arc::new(RowChanges {
                table: Arc::from("todos"),
                pk,
                changes: changes.iter().map(Enc::new).collect(),
            }),
        }];
        Matching {
            db,
            schema,
            filters,
            rows,
        }
    }

    /// Matches the changed row against every view (through the index):
    /// returns the number of views it touched.
    pub fn match_one(&mut self) -> usize {
        self.filters
            .apply_commit(&self.db, &self.schema, &self.rows, 0)
            .expect("apply")
            .len()
    }

    /// Number of views.
    pub fn views(&self) -> usize {
        self.filters.views.len()
    }
}

/// Items of `commits` commits, each with one part of `changes_per_part`
/// changes for each of `subs` subscriptions (shared parts, as fan-out
/// makes them).
pub struct Checkpoint {
    items: Vec<Item>,
    me: SiteId,
}

impl Checkpoint {
    pub fn new(commits: usize, subs: usize, changes_per_part: usize) -> Checkpoint {
        let site = SiteId([7; 16]);
        let mut items = Vec::new();
        for v in 0..commits {
            let rows: Vec<Arc<RowChanges>> = (0..changes_per_part)
                .map(|k| {
                    let pk = PackedPk::pack(&[Value::Integer((v * 1000 + k) as i64)]).expect("pk");
                    let c = tenantsync_core::Change {
                        table: "todos".into(),
                        pk: pk.clone(),
                        cid: "title".into(),
                        val: Value::Text(format!("title {v} {k}")),
                        col_version: 1,
                        db_version: v as i64 + 1,
                        site_id: site,
                        cl: 1,
                        seq: k as i64,
                    };
                    Arc::new(RowChanges {
                        table: Arc::from("todos"),
                        pk,
                        changes: vec![Enc::new(&c)],
                    })
                })
                .collect();
            let part = Arc::new(
                ViewPart {
                    version: v as i64 + 1,
                    deltas: rows,
                    ..ViewPart::default()
                }
                .finish(),
            );
            items.push(Item {
                version: v as i64 + 1,
                bytes: part.bytes * subs,
                parts: (0..subs)
                    .map(|s| ItemPart {
                        sub: Arc::from(format!("sub{s}").as_str()),
                        from: v as i64,
                        part: part.clone(),
                    })
                    .collect(),
                committed: Instant::now(),
            });
        }
        Checkpoint {
            items,
            me: SiteId([9; 16]),
        }
    }

    /// Builds the `changes` message(s); returns their total length.
    pub fn build(&self) -> usize {
        build_changes(&self.items, &self.me, crate::DEFAULT_MAX)
            .iter()
            .map(String::len)
            .sum()
    }
}
