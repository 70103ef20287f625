//! tenantsync-verify: the isolation oracle.
//!
//! Isolation checks: a replica against what its identity may see, evaluated
//! directly on the server database.
//!
//! [`Truth`] opens the server database read-only and parses the policy file
//! with `tenantsync-policy`. For an identity and a subscription query,
//! [`Truth::visible`] rewrites the query with the policies
//! ([`Engine::rewrite`]) and runs the rewritten predicate
//! (`SELECT * FROM <t> WHERE <where_sql>`, the policy engine's SQL with its
//! bound parameters) on the server database: the rows, every column, that
//! the identity's subscription may hold. [`Truth::check`] compares a
//! [`Replica`] with the union over its subscriptions, row by row and column
//! by column, and each subscription's held keys with its own visible rows.
//!
//! The server is not asked anything: the check trusts only the server's
//! data and the policy text, so a server bug that leaks a row (or loses
//! one) shows up here. Used by `tenantsync demo`, the end-to-end tests and
//! the bench harness.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tenantsync_core::{CrrConnection, Options, PackedPk, Value};
use tenantsync_policy::{Engine, Identity, PolicySet, Schema};

use tenantsync_client::{Replica, ReplicaError};

/// Rows keyed by (table, packed primary key), every column in table order.
pub type Rows = BTreeMap<(String, PackedPk), Vec<Value>>;

/// Why a check could not run (not a failed check: see [`Check`]).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The server database (or a replica) could not be read.
    #[error("cannot read {what}: {source}")]
    Database {
        /// Which database.
        what: String,
        /// Why.
        #[source]
        source: tenantsync_core::Error,
    },
    /// A query failed on a database.
    #[error("{what}: {sql}: {source}")]
    Sql {
        /// Which database.
        what: String,
        /// The statement.
        sql: String,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The policy file does not parse against the server's schema.
    #[error("the policy file {name} is invalid:\n{}", .diagnostics.join("\n"))]
    Policy {
        /// The file's name.
        name: String,
        /// Each diagnostic.
        diagnostics: Vec<String>,
    },
    /// A subscription query is refused for the identity.
    #[error("subscription {query:?} is refused for this identity: {reason}")]
    Query {
        /// The query.
        query: String,
        /// The policy engine's reason.
        reason: String,
    },
    /// The replica could not be read.
    #[error("cannot read the replica: {0}")]
    Replica(#[from] ReplicaError),
}

/// The policy engine's schema of a database: its user tables (not the
/// `tenantsync_*` bookkeeping), columns with declared types, primary keys,
/// CRR flags.
pub fn policy_schema(db: &CrrConnection) -> Result<Schema, tenantsync_core::Error> {
    let mut core = db.schema()?;
    core.tables
        .retain(|t| !t.name.to_ascii_lowercase().starts_with("tenantsync_"));
    Ok(Schema::from(&core))
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Runs `SELECT * FROM <table> [WHERE ...]` and keys the rows by packed pk.
fn select_rows(
    conn: &rusqlite::Connection,
    what: &str,
    table: &str,
    pk: &[usize],
    where_sql: Option<&str>,
    params: &[Value],
    out: &mut Rows,
) -> Result<(), VerifyError> {
    let sql = match where_sql {
        Some(w) => format!("SELECT * FROM {} WHERE {w}", quote(table)),
        None => format!("SELECT * FROM {}", quote(table)),
    };
    let err = |source| VerifyError::Sql {
        what: what.to_owned(),
        sql: sql.clone(),
        source,
    };
    let mut stmt = conn.prepare(&sql).map_err(err)?;
    let n = stmt.column_count();
    let rows = stmt
        .query_map(rusqlite::params_from_iter(params.iter()), |r| {
            (0..n)
                .map(|i| r.get::<_, Value>(i))
                .collect::<rusqlite::Result<Vec<Value>>>()
        })
        .map_err(err)?;
    for row in rows {
        let row = row.map_err(err)?;
        let key: Vec<Value> = pk.iter().map(|&i| row[i].clone()).collect();
        let packed = PackedPk::pack(&key).map_err(|e| VerifyError::Sql {
            what: what.to_owned(),
            sql: sql.clone(),
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
        out.insert((table.to_owned(), packed), row);
    }
    Ok(())
}

/// Every row of every CRR of a database (a replica), every column.
pub fn crr_rows(db: &CrrConnection) -> Result<Rows, VerifyError> {
    let schema = db.schema().map_err(|source| VerifyError::Database {
        what: "the replica".into(),
        source,
    })?;
    let mut out = Rows::new();
    for t in schema.tables.iter().filter(|t| t.is_crr) {
        select_rows(
            db.conn(),
            "the replica",
            &t.name,
            &t.pk_positions(),
            None,
            &[],
            &mut out,
        )?;
    }
    Ok(out)
}

/// The truth: the server database and the policies, evaluated directly.
pub struct Truth {
    db: CrrConnection,
    engine: Engine,
    pks: BTreeMap<String, Vec<usize>>,
}

impl std::fmt::Debug for Truth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Truth")
            .field("tables", &self.pks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Truth {
    /// Opens the server database read-only (WAL: it may be in use by a
    /// running server) with the policy file's text.
    pub fn open(
        server_db: &Path,
        policy_name: &str,
        policy_sql: &str,
    ) -> Result<Truth, VerifyError> {
        let db = CrrConnection::open_with(
            server_db,
            Options {
                read_only: true,
                ..Options::default()
            },
        )
        .map_err(|source| VerifyError::Database {
            what: format!("the server database {}", server_db.display()),
            source,
        })?;
        Truth::from_connection(db, policy_name, policy_sql)
    }

    /// The same on an open connection to the server database.
    pub fn from_connection(
        db: CrrConnection,
        policy_name: &str,
        policy_sql: &str,
    ) -> Result<Truth, VerifyError> {
        let schema = policy_schema(&db).map_err(|source| VerifyError::Database {
            what: "the server database".into(),
            source,
        })?;
        let pks = schema
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.pk.clone()))
            .collect();
        let set = PolicySet::parse(policy_name, policy_sql, &schema).map_err(|d| {
            VerifyError::Policy {
                name: policy_name.to_owned(),
                diagnostics: d.summary_lines(),
            }
        })?;
        Ok(Truth {
            db,
            engine: Engine::new(set),
            pks,
        })
    }

    /// Replaces the policies (after a reload on the server).
    pub fn set_policy(&mut self, policy_name: &str, policy_sql: &str) -> Result<(), VerifyError> {
        let set = PolicySet::parse(policy_name, policy_sql, self.engine.schema()).map_err(|d| {
            VerifyError::Policy {
                name: policy_name.to_owned(),
                diagnostics: d.summary_lines(),
            }
        })?;
        self.engine.replace_policies(set);
        Ok(())
    }

    /// The server's db_version now.
    pub fn db_version(&self) -> Result<i64, VerifyError> {
        self.db
            .db_version()
            .map_err(|source| VerifyError::Database {
                what: "the server database".into(),
                source,
            })
    }

    fn visible_into(
        &self,
        identity: &Identity,
        query: &str,
        out: &mut Rows,
    ) -> Result<(), VerifyError> {
        let q = self
            .engine
            .rewrite(identity, query)
            .map_err(|e| VerifyError::Query {
                query: query.to_owned(),
                reason: e.to_string(),
            })?;
        let pk = self.pks.get(&q.table).cloned().unwrap_or_default();
        select_rows(
            self.db.conn(),
            "the server database",
            &q.table,
            &pk,
            Some(&q.where_sql),
            &q.params,
            out,
        )
    }

    /// The CRR a subscription query reads.
    pub fn table_of(&self, identity: &Identity, query: &str) -> Result<String, VerifyError> {
        self.engine
            .rewrite(identity, query)
            .map(|q| q.table)
            .map_err(|e| VerifyError::Query {
                query: query.to_owned(),
                reason: e.to_string(),
            })
    }

    /// The rows `query` gives `identity` on the server now: the query's
    /// filter and the identity's SELECT policies, every column.
    pub fn visible(&self, identity: &Identity, query: &str) -> Result<Rows, VerifyError> {
        let mut out = Rows::new();
        self.visible_into(identity, query, &mut out)?;
        Ok(out)
    }

    /// The union of [`Truth::visible`] over several queries: what a replica
    /// with these subscriptions must hold.
    pub fn expected(&self, identity: &Identity, queries: &[&str]) -> Result<Rows, VerifyError> {
        self.in_snapshot(|t| {
            let mut out = Rows::new();
            for q in queries {
                t.visible_into(identity, q, &mut out)?;
            }
            Ok(out)
        })
    }

    /// Runs `f` inside one read transaction, so every query sees one
    /// version of the server database.
    fn in_snapshot<T>(
        &self,
        f: impl FnOnce(&Truth) -> Result<T, VerifyError>,
    ) -> Result<T, VerifyError> {
        let conn = self.db.conn();
        let begun = conn.is_autocommit() && conn.execute_batch("BEGIN").is_ok();
        let out = f(self);
        if begun {
            let _ = conn.execute_batch("COMMIT");
        }
        out
    }

    /// Checks a replica held by `identity` against the server: every row of
    /// its CRR tables against the union of its subscriptions' visible rows,
    /// all columns, and each subscription's held keys against that
    /// subscription's visible rows.
    pub fn check(&self, identity: &Identity, replica: &Replica) -> Result<Check, VerifyError> {
        self.check_state(identity, &ReplicaState::read(replica)?)
    }

    /// [`Truth::check`] on a [`ReplicaState`] read earlier (e.g. on the
    /// replica's own thread, [`tenantsync_client::ReplicaHandle`]).
    pub fn check_state(
        &self,
        identity: &Identity,
        state: &ReplicaState,
    ) -> Result<Check, VerifyError> {
        self.in_snapshot(|t| {
            let version = t.db_version()?;
            let mut expected = Rows::new();
            let mut held_diffs = Vec::new();
            for s in &state.subscriptions {
                let vis = t.visible(identity, &s.query)?;
                let want: BTreeSet<&(String, PackedPk)> = vis.keys().collect();
                // Keys of rows the replica does not have are not held
                // data: the client keeps the key of a row it deleted itself
                // until the subscription's next full sync (the server does
                // not echo a peer's own delete). Rows are checked below.
                let have: BTreeSet<&(String, PackedPk)> = s
                    .held
                    .iter()
                    .filter(|k| state.rows.contains_key(*k))
                    .collect();
                let extra = have.difference(&want).count();
                let missing = want.difference(&have).count();
                if extra + missing > 0 {
                    held_diffs.push(HeldDiff {
                        sub: s.id.clone(),
                        extra,
                        missing,
                    });
                }
                expected.extend(vis);
            }
            Ok(Check::compare(version, &state.rows, &expected, held_diffs))
        })
    }
}

/// What a replica holds, read in one go: its subscriptions with their held
/// keys, and every row of its CRR tables.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplicaState {
    /// Each subscription.
    pub subscriptions: Vec<HeldSubscription>,
    /// Every row of the replica's CRR tables.
    pub rows: Rows,
}

/// One subscription of a [`ReplicaState`].
#[derive(Debug, Clone, PartialEq)]
pub struct HeldSubscription {
    /// Its id.
    pub id: String,
    /// Its query.
    pub query: String,
    /// Its cursor.
    pub cursor: Option<i64>,
    /// The keys it holds.
    pub held: BTreeSet<(String, PackedPk)>,
}

impl ReplicaState {
    /// Reads a replica's state (one read transaction).
    pub fn read(replica: &Replica) -> Result<ReplicaState, VerifyError> {
        let conn = replica.conn().conn();
        let begun = conn.is_autocommit() && conn.execute_batch("BEGIN").is_ok();
        let out = (|| {
            let mut subscriptions = Vec::new();
            for s in replica.subscriptions()? {
                let held = replica
                    .held(&s.id)?
                    .into_iter()
                    .map(|k| (k.table, k.pk))
                    .collect();
                subscriptions.push(HeldSubscription {
                    id: s.id,
                    query: s.query,
                    cursor: s.cursor,
                    held,
                });
            }
            Ok(ReplicaState {
                subscriptions,
                rows: crr_rows(replica.conn())?,
            })
        })();
        if begun {
            let _ = conn.execute_batch("COMMIT");
        }
        out
    }
}

/// One row that differs between a replica and the truth.
#[derive(Debug, Clone, PartialEq)]
pub struct RowDiff {
    /// The table.
    pub table: String,
    /// The primary key's values.
    pub pk: Vec<Value>,
    /// The replica's values (None: it does not have the row).
    pub replica: Option<Vec<Value>>,
    /// The server's values (None: the identity may not see the row).
    pub server: Option<Vec<Value>>,
}

impl std::fmt::Display for RowDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<Vec<Value>>| match v {
            None => "-".to_owned(),
            Some(v) => format!(
                "({})",
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        write!(
            f,
            "{} {:?}: replica {} server {}",
            self.table,
            self.pk,
            show(&self.replica),
            show(&self.server)
        )
    }
}

/// A subscription whose held keys differ from its visible rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldDiff {
    /// The subscription id.
    pub sub: String,
    /// Keys it holds that it may not (or that do not exist any more).
    pub extra: usize,
    /// Visible keys it does not hold.
    pub missing: usize,
}

/// The outcome of [`Truth::check`].
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// The server's db_version the truth was read at.
    pub server_version: i64,
    /// Rows in the replica's CRR tables.
    pub held: usize,
    /// Rows its subscriptions may hold.
    pub expected: usize,
    /// Rows the replica has and may not see (or that no longer exist).
    pub leaks: Vec<RowDiff>,
    /// Visible rows the replica lacks.
    pub misses: Vec<RowDiff>,
    /// Rows both have, with different values.
    pub stale: Vec<RowDiff>,
    /// Subscriptions whose held keys differ from what they may see.
    pub held_diffs: Vec<HeldDiff>,
}

impl Check {
    /// Compares a replica's rows with the expected ones.
    pub fn compare(
        server_version: i64,
        replica: &Rows,
        expected: &Rows,
        held_diffs: Vec<HeldDiff>,
    ) -> Check {
        let unpack = |pk: &PackedPk| pk.unpack().unwrap_or_default();
        let mut leaks = Vec::new();
        let mut stale = Vec::new();
        for ((table, pk), have) in replica {
            match expected.get(&(table.clone(), pk.clone())) {
                None => leaks.push(RowDiff {
                    table: table.clone(),
                    pk: unpack(pk),
                    replica: Some(have.clone()),
                    server: None,
                }),
                Some(want) if !same_row(want, have) => stale.push(RowDiff {
                    table: table.clone(),
                    pk: unpack(pk),
                    replica: Some(have.clone()),
                    server: Some(want.clone()),
                }),
                Some(_) => {}
            }
        }
        let misses = expected
            .iter()
            .filter(|(k, _)| !replica.contains_key(k))
            .map(|((table, pk), want)| RowDiff {
                table: table.clone(),
                pk: unpack(pk),
                replica: None,
                server: Some(want.clone()),
            })
            .collect();
        Check {
            server_version,
            held: replica.len(),
            expected: expected.len(),
            leaks,
            misses,
            stale,
            held_diffs,
        }
    }

    /// Whether the replica is exactly what it may see.
    pub fn ok(&self) -> bool {
        self.leaks.is_empty()
            && self.misses.is_empty()
            && self.stale.is_empty()
            && self.held_diffs.is_empty()
    }
}

/// One line per difference (at most 10 rows of each kind), or `ok`.
impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok() {
            return write!(
                f,
                "ok: {} rows at server version {}",
                self.held, self.server_version
            );
        }
        write!(
            f,
            "{} rows, {} expected at server version {}: {} leaks, {} misses, {} stale",
            self.held,
            self.expected,
            self.server_version,
            self.leaks.len(),
            self.misses.len(),
            self.stale.len()
        )?;
        for (what, diffs) in [
            ("leak", &self.leaks),
            ("miss", &self.misses),
            ("stale", &self.stale),
        ] {
            for d in diffs.iter().take(10) {
                write!(f, "\n  {what}: {d}")?;
            }
        }
        for h in &self.held_diffs {
            write!(
                f,
                "\n  subscription {}: holds {} keys it may not, lacks {} it may",
                h.sub, h.extra, h.missing
            )?;
        }
        Ok(())
    }
}

/// Equal values, REALs by their bits (so -0.0 differs from 0.0, as it does
/// on the wire).
fn same_row(a: &[Value], b: &[Value]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Value::Real(p), Value::Real(q)) => p.to_bits() == q.to_bits(),
            _ => x == y,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = "CREATE TABLE todos (id INTEGER PRIMARY KEY NOT NULL, tenant_id TEXT, owner TEXT, title TEXT);
        SELECT crsql_as_crr('todos');";
    const POLICY: &str = "CREATE POLICY t ON todos FOR SELECT TO authenticated
        USING (tenant_id = auth.claim('tenant_id'));";

    fn identity(sub: &str, tenant: &str) -> Identity {
        Identity::from_json(&format!(
            r#"{{"sub": "{sub}", "role": "authenticated", "tenant_id": "{tenant}"}}"#
        ))
        .unwrap()
    }

    fn server() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let db = CrrConnection::open(&path).unwrap();
        db.conn().execute_batch(SCHEMA).unwrap();
        db.conn()
            .execute_batch(
                "INSERT INTO todos VALUES (1, 'a', 'u', 'one'), (2, 'a', 'v', 'two'), (3, 'b', 'w', 'three')",
            )
            .unwrap();
        (dir, path)
    }

    fn ids(rows: &[RowDiff]) -> Vec<Vec<Value>> {
        rows.iter().map(|r| r.pk.clone()).collect()
    }

    #[test]
    fn visible_rows_are_the_query_and_the_policy_on_the_server() {
        let (_dir, path) = server();
        let truth = Truth::open(&path, "p.sql", POLICY).unwrap();
        let a = identity("u", "a");
        let all = truth.visible(&a, "SELECT * FROM todos").unwrap();
        assert_eq!(all.len(), 2);
        let mine = truth
            .visible(&a, "SELECT * FROM todos WHERE owner = 'u'")
            .unwrap();
        assert_eq!(
            mine.values().next().unwrap(),
            &vec![
                Value::Integer(1),
                Value::Text("a".into()),
                Value::Text("u".into()),
                Value::Text("one".into())
            ]
        );
        let err = truth.visible(&a, "SELECT * FROM nope").unwrap_err();
        assert!(err.to_string().contains("SELECT * FROM nope"), "{err}");
    }

    #[test]
    fn a_replica_is_compared_row_by_row_and_column_by_column() {
        let (_dir, path) = server();
        let truth = Truth::open(&path, "p.sql", POLICY).unwrap();
        let a = identity("u", "a");
        let replica = CrrConnection::open_in_memory().unwrap();
        replica.conn().execute_batch(SCHEMA).unwrap();
        // Row 1 exact, row 2 stale, row 3 of tenant b leaked; nothing missing.
        replica
            .conn()
            .execute_batch(
                "INSERT INTO todos VALUES (1, 'a', 'u', 'one'), (2, 'a', 'v', 'old'), (3, 'b', 'w', 'three')",
            )
            .unwrap();
        let have = crr_rows(&replica).unwrap();
        let want = truth.expected(&a, &["SELECT * FROM todos"]).unwrap();
        let c = Check::compare(0, &have, &want, vec![]);
        assert!(!c.ok());
        assert_eq!((c.held, c.expected), (3, 2));
        assert_eq!(ids(&c.leaks), vec![vec![Value::Integer(3)]]);
        assert_eq!(ids(&c.stale), vec![vec![Value::Integer(2)]]);
        assert!(c.misses.is_empty());
        // Missing row 1, nothing else wrong.
        replica
            .conn()
            .execute_batch(
                "DELETE FROM todos WHERE id IN (1, 3); UPDATE todos SET title = 'two' WHERE id = 2",
            )
            .unwrap();
        let c = Check::compare(0, &crr_rows(&replica).unwrap(), &want, vec![]);
        assert_eq!(ids(&c.misses), vec![vec![Value::Integer(1)]]);
        assert!(c.leaks.is_empty() && c.stale.is_empty());
        replica
            .conn()
            .execute_batch("INSERT INTO todos VALUES (1, 'a', 'u', 'one')")
            .unwrap();
        assert!(Check::compare(0, &crr_rows(&replica).unwrap(), &want, vec![]).ok());
    }

    #[test]
    fn a_bad_policy_is_named() {
        let (_dir, path) = server();
        let err = Truth::open(&path, "bad.sql", "CREATE POLICY x ON nope USING (1)").unwrap_err();
        assert!(err.to_string().contains("bad.sql"), "{err}");
    }
}
