//! The isolation check at quiescence: every row a client's subscription
//! holds against what its identity may see now, i.e. the policy ∧ the
//! subscription's query rewritten by tenantsync-policy and run on the
//! server database opened read-only. Leaks are held rows it must not have,
//! misses rows it should have and lacks.
//!
//! Not `tenantsync_verify`: that one compares whole rows of real
//! replicas, one query per subscription. The load clients hold only ids,
//! and 30,000 subscriptions share 1,500 views, so this one runs each view's
//! query once (cached by its canonical key) and compares ids. Both take
//! their schema from `tenantsync_verify::policy_schema`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use tenantsync_core::{CrrConnection, Options};
use tenantsync_policy::{Engine, Identity, PolicySet};

/// The truth on the server's databases (one per shard; a tenant's rows
/// are in exactly one).
pub struct Truth {
    dbs: Vec<CrrConnection>,
    engine: Engine,
    /// Effective query (canonical key) -> visible ids.
    cache: HashMap<String, HashSet<i64>>,
}

/// What the check found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Isolation {
    /// Whether the run reached quiescence before the check (every write
    /// answered, no data for 1.5 s). When false, leaks and misses may be
    /// deliveries still on their way, not isolation failures.
    pub quiescent: bool,
    /// Clients whose every subscription was compared.
    pub clients_checked: usize,
    /// Subscriptions compared.
    pub subscriptions_checked: usize,
    /// Rows compared (held or expected).
    pub rows_checked: usize,
    /// Held rows the identity may not see through that subscription.
    pub leaks: usize,
    /// Rows the identity may see through the subscription and lacks.
    pub misses: usize,
    /// The first few findings, for the report.
    pub samples: Vec<String>,
}

impl Truth {
    /// Opens the server's databases (every shard's) read-only with the
    /// policy file's text.
    pub fn open(dbs: &[impl AsRef<Path>], policy_sql: &str) -> anyhow::Result<Truth> {
        let dbs = dbs
            .iter()
            .map(|p| {
                let p = p.as_ref();
                CrrConnection::open_with(
                    p,
                    Options {
                        read_only: true,
                        ..Options::default()
                    },
                )
                .with_context(|| format!("cannot open {} read-only", p.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let first = dbs.first().context("no server database")?;
        let schema = tenantsync_verify::policy_schema(first)?;
        let set = PolicySet::parse("policy.sql", policy_sql, &schema)
            .map_err(|d| anyhow::anyhow!("the bench policy does not parse: {d}"))?;
        Ok(Truth {
            dbs,
            engine: Engine::new(set),
            cache: HashMap::new(),
        })
    }

    /// The ids `query` gives `claims` now (single-integer-key tables).
    pub fn visible(
        &mut self,
        claims: serde_json::Map<String, serde_json::Value>,
        query: &str,
    ) -> anyhow::Result<&HashSet<i64>> {
        let q = self
            .engine
            .rewrite(&Identity::new(claims), query)
            .map_err(|e| anyhow::anyhow!("rewriting {query}: {e}"))?;
        let key = q.key.canonical().to_owned();
        if !self.cache.contains_key(&key) {
            let sql = format!(
                "SELECT \"{}\".rowid FROM \"{}\" WHERE {}",
                q.table, q.table, q.where_sql
            );
            let mut ids = HashSet::new();
            for db in &self.dbs {
                let mut stmt = db.conn().prepare(&sql).with_context(|| sql.clone())?;
                for id in stmt.query_map(rusqlite::params_from_iter(q.params.iter()), |r| {
                    r.get::<_, i64>(0)
                })? {
                    ids.insert(id?);
                }
            }
            self.cache.insert(key.clone(), ids);
        }
        Ok(&self.cache[&key])
    }

    /// Compares one client's held rows (per subscription query) and adds
    /// the findings to `out`.
    pub fn check(
        &mut self,
        who: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
        held: &[(&str, &str, &HashSet<i64>)],
        out: &mut Isolation,
    ) -> anyhow::Result<()> {
        for &(sub, query, rows) in held {
            let want = self.visible(claims.clone(), query)?;
            out.subscriptions_checked += 1;
            out.rows_checked += rows.union(want).count();
            for id in rows.difference(want) {
                out.leaks += 1;
                if out.samples.len() < 20 {
                    out.samples
                        .push(format!("leak: {who} sub {sub} holds id {id}"));
                }
            }
            for id in want.difference(rows) {
                out.misses += 1;
                if out.samples.len() < 20 {
                    out.samples
                        .push(format!("miss: {who} sub {sub} lacks id {id}"));
                }
            }
        }
        out.clients_checked += 1;
        Ok(())
    }
}
