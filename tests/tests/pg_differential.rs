//! Write decisions against PostgreSQL's own row-level security (issue 11,
//! class 8): random schemas, policies, identities and pushes run on a real
//! tenantsync engine (in process) and on a real PostgreSQL 15 with the same
//! policies; after every push both hold the same rows, and a push is
//! accepted exactly when PostgreSQL commits the statements it stands for.
//!
//! A push is a sequence of row writes. PostgreSQL runs them, in order, in
//! one transaction as the unprivileged role `app` with the identity's claims
//! in `request.jwt.claims`:
//!
//! - a write to a row that exists is `UPDATE ... SET <the pushed columns>
//!   WHERE key` (the existing row must pass SELECT and UPDATE USING, the
//!   new row UPDATE WITH CHECK and SELECT: "new row violates row-level
//!   security policy");
//! - a write to a row that does not exist is an `INSERT` of the pushed
//!   columns (INSERT WITH CHECK);
//! - a delete is `DELETE ... WHERE key`.
//!
//! Where PostgreSQL silently skips a row its USING hides, tenantsync
//! refuses the push when the writer could have held the row (an UPDATE of
//! any existing row; a DELETE of a row the writer can read): a silent no-op
//! would leave the writer's replica with a write the server never took,
//! and the refusal lets it restore the server's row (docs/POLICY.md, "Where
//! tenantsync differs from PostgreSQL"). A DELETE of a row the writer
//! cannot read is skipped by both. The mapping reads an UPDATE that
//! changed no existing row, and such a DELETE, as a refusal; the refusal
//! never lets anyone write more than PostgreSQL would.
//!
//! Subqueries see the database as the statements before them left it, in
//! both. `TENANTSYNC_PG_CASES` (default 30) scenarios of 25 pushes each;
//! `TENANTSYNC_PG_SEED` picks the first seed.

use rand::prelude::*;
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use tenantsync_core::{Change, CrrConnection, Options, PackedPk, SiteId, Value};
use tenantsync_protocol::http::{PushRequest, SqlRequest, SqlStatement};
use tenantsync_server::{PushError, ServiceConfig, SyncService, Synchronous};
use tenantsync_tests::postgres::PgServer;

/// A row key: (table, key values in key order).
type Key = (&'static str, Vec<Value>);

/// One generated world: the schema shape, the policy file, starting rows.
#[derive(Debug, Clone)]
struct Scenario {
    /// `t` keyed by (tenant, id) instead of id alone.
    composite: bool,
    policy: String,
    rows: Vec<(Key, BTreeMap<&'static str, Value>)>,
    pushes: Vec<Push>,
}

#[derive(Debug, Clone)]
struct Push {
    who: usize,
    writes: Vec<Write>,
}

#[derive(Debug, Clone)]
enum Write {
    /// Set these columns of the row (creating it when absent).
    Upsert(Key, BTreeMap<&'static str, Value>),
    Delete(Key),
}

const SUBS: &[&str] = &["u1", "u2", "u3"];
const TENANTS: &[&str] = &["a", "b"];

/// Identity i: (sub, tenant).
fn identity(i: usize) -> (&'static str, &'static str) {
    (SUBS[i % 3], TENANTS[(i / 3) % 2])
}

fn claims_json(i: usize) -> String {
    let (sub, tenant) = identity(i);
    serde_json::json!({"sub": sub, "role": "authenticated", "tenant": tenant, "exp": 4_000_000_000u64})
        .to_string()
}

fn t_columns(composite: bool) -> (&'static [&'static str], &'static [&'static str]) {
    if composite {
        (&["tenant", "id"], &["owner", "grp", "v"])
    } else {
        (&["id"], &["tenant", "owner", "grp", "v"])
    }
}

const M_KEY: &[&str] = &["grp", "user_id"];
const M_COLS: &[&str] = &["tenant"];

fn columns(table: &str, composite: bool) -> (&'static [&'static str], &'static [&'static str]) {
    if table == "t" {
        t_columns(composite)
    } else {
        (M_KEY, M_COLS)
    }
}

fn is_int(col: &str) -> bool {
    matches!(col, "id" | "grp" | "v")
}

fn sqlite_schema(composite: bool) -> String {
    let t = if composite {
        "CREATE TABLE t (tenant TEXT NOT NULL, id INTEGER NOT NULL, owner TEXT, grp INTEGER, v INTEGER, PRIMARY KEY (tenant, id));"
    } else {
        "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, tenant TEXT, owner TEXT, grp INTEGER, v INTEGER);"
    };
    format!(
        "{t}\nCREATE TABLE m (grp INTEGER NOT NULL, user_id TEXT NOT NULL, tenant TEXT, PRIMARY KEY (grp, user_id));\nSELECT crsql_as_crr('t');\nSELECT crsql_as_crr('m');\n"
    )
}

fn pg_schema(composite: bool) -> String {
    let t = if composite {
        "CREATE TABLE t (tenant text NOT NULL, id bigint NOT NULL, owner text, grp bigint, v bigint, PRIMARY KEY (tenant, id));"
    } else {
        "CREATE TABLE t (id bigint PRIMARY KEY, tenant text, owner text, grp bigint, v bigint);"
    };
    format!(
        "{t}
CREATE TABLE m (grp bigint NOT NULL, user_id text NOT NULL, tenant text, PRIMARY KEY (grp, user_id));
ALTER TABLE t ENABLE ROW LEVEL SECURITY;
ALTER TABLE m ENABLE ROW LEVEL SECURITY;
GRANT SELECT, INSERT, UPDATE, DELETE ON t, m TO app;"
    )
}

/// A condition on `t`'s row.
fn t_condition(rng: &mut StdRng, depth: u32) -> String {
    if depth == 0 || rng.random_bool(0.55) {
        return [
            "tenant = auth.claim('tenant')",
            "owner = auth.uid()",
            "owner IS NULL",
            "v > 3",
            "v = 5",
            "v IS NULL",
            "grp IN (SELECT grp FROM m WHERE user_id = auth.uid())",
            "grp IN (SELECT grp FROM m WHERE tenant = auth.claim('tenant'))",
            "true",
            "false",
        ]
        .choose(rng)
        .expect("atoms")
        .to_string();
    }
    let a = t_condition(rng, depth - 1);
    match rng.random_range(0..3) {
        0 => format!("({a} AND {})", t_condition(rng, depth - 1)),
        1 => format!("({a} OR {})", t_condition(rng, depth - 1)),
        _ => format!("(NOT {a})"),
    }
}

/// A condition on `m`'s row; `own` allows a subquery on `m` itself (write
/// policies may read their own table: the self-vouching attack).
fn m_condition(rng: &mut StdRng, depth: u32, own: bool) -> String {
    if depth == 0 || rng.random_bool(0.55) {
        let mut atoms = vec![
            "user_id = auth.uid()",
            "tenant = auth.claim('tenant')",
            "grp > 1",
            "tenant IS NULL",
            "true",
        ];
        if own {
            atoms.push("grp IN (SELECT grp FROM m WHERE user_id = auth.uid())");
            atoms.push("grp IN (SELECT grp FROM m WHERE tenant = auth.claim('tenant'))");
        }
        return atoms.choose(rng).expect("atoms").to_string();
    }
    let a = m_condition(rng, depth - 1, own);
    match rng.random_range(0..3) {
        0 => format!("({a} AND {})", m_condition(rng, depth - 1, own)),
        1 => format!("({a} OR {})", m_condition(rng, depth - 1, own)),
        _ => format!("(NOT {a})"),
    }
}

fn policy_file(rng: &mut StdRng) -> String {
    let mut out = String::new();
    let mut n = 0;
    let mut policy = |out: &mut String,
                      table: &str,
                      cmd: &str,
                      restrictive: bool,
                      using: Option<String>,
                      check: Option<String>| {
        n += 1;
        out.push_str(&format!(
            "CREATE POLICY p{n} ON {table} AS {} FOR {cmd} TO public{}{};\n",
            if restrictive {
                "RESTRICTIVE"
            } else {
                "PERMISSIVE"
            },
            using.map(|u| format!(" USING ({u})")).unwrap_or_default(),
            check
                .map(|c| format!(" WITH CHECK ({c})"))
                .unwrap_or_default(),
        ));
    };
    // Someone reads memberships, or every subquery is empty.
    policy(
        &mut out,
        "m",
        "SELECT",
        false,
        Some(m_condition(rng, 1, false)),
        None,
    );
    for _ in 0..rng.random_range(0..3) {
        let cmd = *["ALL", "INSERT", "UPDATE", "DELETE", "SELECT"]
            .choose(rng)
            .expect("cmds");
        let own = matches!(cmd, "INSERT" | "UPDATE" | "DELETE");
        let c = |rng: &mut StdRng| m_condition(rng, 2, own);
        let (u, w) = clauses(rng, cmd, c);
        policy(&mut out, "m", cmd, rng.random_bool(0.2), u, w);
    }
    for _ in 0..rng.random_range(1..5) {
        let cmd = *["ALL", "SELECT", "INSERT", "UPDATE", "DELETE"]
            .choose(rng)
            .expect("cmds");
        let (u, w) = clauses(rng, cmd, |rng: &mut StdRng| t_condition(rng, 2));
        policy(&mut out, "t", cmd, rng.random_bool(0.25), u, w);
    }
    out
}

/// USING and WITH CHECK as PostgreSQL allows them for the command.
fn clauses(
    rng: &mut StdRng,
    cmd: &str,
    mut cond: impl FnMut(&mut StdRng) -> String,
) -> (Option<String>, Option<String>) {
    match cmd {
        "SELECT" | "DELETE" => (Some(cond(rng)), None),
        "INSERT" => (None, Some(cond(rng))),
        _ => {
            let u = cond(rng);
            let w = rng.random_bool(0.6).then(|| cond(rng));
            (Some(u), w)
        }
    }
}

fn value(rng: &mut StdRng, col: &str) -> Value {
    match col {
        "tenant" => Value::from(*TENANTS.choose(rng).expect("tenants")),
        "owner" | "user_id" => {
            if col == "owner" && rng.random_bool(0.15) {
                Value::Null
            } else {
                Value::from(*SUBS.choose(rng).expect("subs"))
            }
        }
        "grp" => Value::Integer(rng.random_range(1..4)),
        "id" => Value::Integer(rng.random_range(1..7)),
        "v" => [
            Value::Integer(0),
            Value::Integer(5),
            Value::Integer(10),
            Value::Null,
        ]
        .choose(rng)
        .expect("v")
        .clone(),
        other => unreachable!("{other}"),
    }
}

fn key(rng: &mut StdRng, composite: bool) -> Key {
    if rng.random_bool(0.65) {
        let (k, _) = t_columns(composite);
        ("t", k.iter().map(|c| value(rng, c)).collect())
    } else {
        ("m", M_KEY.iter().map(|c| value(rng, c)).collect())
    }
}

fn scenario(seed: u64) -> Scenario {
    let mut rng = StdRng::seed_from_u64(seed);
    let composite = rng.random_bool(0.4);
    let policy = policy_file(&mut rng);
    let mut rows = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..rng.random_range(3..10) {
        let k = key(&mut rng, composite);
        if !seen.insert(format!("{k:?}")) {
            continue;
        }
        let (_, cols) = columns(k.0, composite);
        let vals = cols.iter().map(|c| (*c, value(&mut rng, c))).collect();
        rows.push((k, vals));
    }
    let pushes = (0..25)
        .map(|_| {
            let who = rng.random_range(0..6);
            let mut keys = std::collections::BTreeSet::new();
            let writes = (0..rng.random_range(1..4))
                .filter_map(|_| {
                    let k = key(&mut rng, composite);
                    if !keys.insert(format!("{k:?}")) {
                        return None;
                    }
                    if rng.random_bool(0.25) {
                        return Some(Write::Delete(k));
                    }
                    let (_, cols) = columns(k.0, composite);
                    let mut vals = BTreeMap::new();
                    for c in cols.iter() {
                        if vals.is_empty() || rng.random_bool(0.5) {
                            vals.insert(*c, value(&mut rng, c));
                        }
                    }
                    Some(Write::Upsert(k, vals))
                })
                .collect();
            Push { who, writes }
        })
        .collect();
    Scenario {
        composite,
        policy,
        rows,
        pushes,
    }
}

/// The PostgreSQL side of one scenario.
struct Pg<'a> {
    client: postgres::Client,
    composite: bool,
    _server: &'a PgServer,
}

fn pg_value(v: &Value) -> Box<dyn postgres::types::ToSql + Sync> {
    match v {
        Value::Null => Box::new(None::<String>),
        Value::Integer(i) => Box::new(*i),
        Value::Text(t) => Box::new(t.clone()),
        other => unreachable!("{other:?}"),
    }
}

/// A NULL of the column's type (PostgreSQL types NULL parameters).
fn pg_typed(col: &str, v: &Value) -> Box<dyn postgres::types::ToSql + Sync> {
    match (v, is_int(col)) {
        (Value::Null, true) => Box::new(None::<i64>),
        (Value::Null, false) => Box::new(None::<String>),
        _ => pg_value(v),
    }
}

impl Pg<'_> {
    fn reset(&mut self, sc: &Scenario) -> anyhow::Result<()> {
        self.client.batch_execute(
            "DROP TABLE IF EXISTS t, m CASCADE;
             DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app') THEN CREATE ROLE app; END IF; END $$;
             CREATE SCHEMA IF NOT EXISTS auth;
             GRANT USAGE ON SCHEMA auth TO app;
             CREATE OR REPLACE FUNCTION auth.uid() RETURNS text LANGUAGE sql STABLE
               AS $$ SELECT current_setting('request.jwt.claims', true)::jsonb ->> 'sub' $$;
             CREATE OR REPLACE FUNCTION auth.claim(name text) RETURNS text LANGUAGE sql STABLE
               AS $$ SELECT current_setting('request.jwt.claims', true)::jsonb ->> name $$;",
        )?;
        self.client.batch_execute(&pg_schema(sc.composite))?;
        self.client.batch_execute(&sc.policy)?;
        for (k, vals) in &sc.rows {
            self.insert(k, vals)?;
        }
        Ok(())
    }

    fn insert(&mut self, k: &Key, vals: &BTreeMap<&'static str, Value>) -> anyhow::Result<u64> {
        let (key, _) = columns(k.0, self.composite);
        let cols: Vec<&str> = key.iter().copied().chain(vals.keys().copied()).collect();
        let mut params: Vec<Box<dyn postgres::types::ToSql + Sync>> =
            k.1.iter().map(pg_value).collect();
        params.extend(vals.iter().map(|(c, v)| pg_typed(c, v)));
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            k.0,
            cols.join(", "),
            marks.join(", ")
        );
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|b| b.as_ref()).collect();
        Ok(self.client.execute(&sql, &refs)?)
    }

    /// Runs a push as `app`; `Ok(true)` when PostgreSQL commits it (and no
    /// DELETE the writer could read was skipped by its DELETE policies).
    fn push(&mut self, p: &Push) -> anyhow::Result<bool> {
        let composite = self.composite;
        let mut tx = self.client.transaction()?;
        tx.execute(
            "SELECT set_config('request.jwt.claims', $1, true)",
            &[&claims_json(p.who)],
        )?;
        let mut ok = true;
        for w in &p.writes {
            let k = match w {
                Write::Upsert(k, _) | Write::Delete(k) => k,
            };
            let (key, _) = columns(k.0, composite);
            let where_key = key
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c} = ${}", i + 1))
                .collect::<Vec<_>>()
                .join(" AND ");
            let kp: Vec<_> = k.1.iter().map(pg_value).collect();
            let krefs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                kp.iter().map(|b| b.as_ref()).collect();
            tx.batch_execute("SET LOCAL ROLE postgres")?;
            let exists = !tx
                .query(&format!("SELECT 1 FROM {} WHERE {where_key}", k.0), &krefs)?
                .is_empty();
            tx.batch_execute("SET LOCAL ROLE app")?;
            let result = match w {
                Write::Delete(_) => {
                    let visible = !tx
                        .query(&format!("SELECT 1 FROM {} WHERE {where_key}", k.0), &krefs)?
                        .is_empty();
                    match tx.execute(&format!("DELETE FROM {} WHERE {where_key}", k.0), &krefs) {
                        Ok(0) if exists && visible => Ok(false),
                        Ok(_) => Ok(true),
                        Err(e) => Err(e),
                    }
                }
                Write::Upsert(_, vals) if exists => {
                    // The pushed columns of a row that exists: PostgreSQL's
                    // UPDATE skips a row its USING hides, tenantsync
                    // refuses the push (the writer holds the row it wrote).
                    let set: Vec<String> = vals
                        .keys()
                        .enumerate()
                        .map(|(i, c)| format!("{c} = ${}", key.len() + i + 1))
                        .collect();
                    let mut params: Vec<Box<dyn postgres::types::ToSql + Sync>> =
                        k.1.iter().map(pg_value).collect();
                    params.extend(vals.iter().map(|(c, v)| pg_typed(c, v)));
                    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                        params.iter().map(|b| b.as_ref()).collect();
                    let sql = format!("UPDATE {} SET {} WHERE {where_key}", k.0, set.join(", "));
                    tx.execute(&sql, &refs).map(|n| n == 1)
                }
                Write::Upsert(_, vals) => {
                    let cols: Vec<&str> = key.iter().copied().chain(vals.keys().copied()).collect();
                    let mut params: Vec<Box<dyn postgres::types::ToSql + Sync>> =
                        k.1.iter().map(pg_value).collect();
                    params.extend(vals.iter().map(|(c, v)| pg_typed(c, v)));
                    let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
                    let sql = format!(
                        "INSERT INTO {} ({}) VALUES ({})",
                        k.0,
                        cols.join(", "),
                        marks.join(", ")
                    );
                    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                        params.iter().map(|b| b.as_ref()).collect();
                    tx.execute(&sql, &refs).map(|_| true)
                }
            };
            if std::env::var_os("TENANTSYNC_PG_TRACE").is_some() {
                eprintln!("  pg: {w:?} exists={exists} -> {result:?}");
            }
            match result {
                Ok(true) => {}
                Ok(false) => {
                    ok = false;
                    break;
                }
                Err(e) if e.as_db_error().is_some() => {
                    ok = false;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if ok {
            tx.commit()?;
        } else {
            tx.rollback()?;
        }
        Ok(ok)
    }

    /// Every row of both tables, as text, ordered.
    fn dump(&mut self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let (tk, tc) = t_columns(self.composite);
        for (table, cols) in [("t", [tk, tc].concat()), ("m", [M_KEY, M_COLS].concat())] {
            let sql = format!(
                "SELECT {} FROM {table} ORDER BY {}",
                cols.iter()
                    .map(|c| format!("{c}::text"))
                    .collect::<Vec<_>>()
                    .join(", "),
                columns(table, self.composite).0.join(", ")
            );
            for r in self.client.query(&sql, &[])? {
                let vals: Vec<String> = (0..cols.len())
                    .map(|i| {
                        r.get::<_, Option<String>>(i)
                            .unwrap_or_else(|| "NULL".into())
                    })
                    .collect();
                out.push(format!("{table}: {}", vals.join(" | ")));
            }
        }
        Ok(out)
    }
}

/// The tenantsync side: a real engine in process, pushes built from the
/// server's own clocks (what a client that holds the row would send).
struct Ours {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    service: SyncService,
    composite: bool,
    pushed: BTreeMap<usize, i64>,
}

fn principal(i: usize) -> tenantsync_server::Principal {
    let serde_json::Value::Object(m) = serde_json::from_str(&claims_json(i)).expect("claims")
    else {
        unreachable!()
    };
    tenantsync_server::Principal::from_claims(m, "tenant")
}

fn service_principal() -> tenantsync_server::Principal {
    let serde_json::Value::Object(m) =
        serde_json::json!({"sub": "ops", "role": "service", "exp": 4_000_000_000u64})
    else {
        unreachable!()
    };
    tenantsync_server::Principal::from_claims(m, "tenant")
}

fn site(i: usize) -> SiteId {
    SiteId([i as u8 + 1; 16])
}

impl Ours {
    async fn start(sc: &Scenario) -> anyhow::Result<Ours> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("server.db");
        let mut config = ServiceConfig::new(
            &path,
            sqlite_schema(sc.composite),
            "policy.sql",
            sc.policy.clone(),
        );
        config.tenant_claim = "tenant".into();
        config.synchronous = Synchronous::Normal;
        let service =
            SyncService::start(config).map_err(|e| anyhow::anyhow!("{e}\n{}", sc.policy))?;
        let ours = Ours {
            _dir: dir,
            path,
            service,
            composite: sc.composite,
            pushed: BTreeMap::new(),
        };
        let mut statements = Vec::new();
        for (k, vals) in &sc.rows {
            let (key, _) = columns(k.0, sc.composite);
            let cols: Vec<&str> = key.iter().copied().chain(vals.keys().copied()).collect();
            let mut params = k.1.clone();
            params.extend(vals.values().cloned());
            statements.push(SqlStatement {
                sql: format!(
                    "INSERT INTO {} ({}) VALUES ({})",
                    k.0,
                    cols.join(", "),
                    vec!["?"; cols.len()].join(", ")
                ),
                params,
            });
        }
        ours.service
            .sql(
                &service_principal(),
                SqlRequest {
                    statements,
                    tenant: None,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        Ok(ours)
    }

    fn reader(&self) -> anyhow::Result<CrrConnection> {
        Ok(CrrConnection::open_with(
            &self.path,
            Options {
                read_only: true,
                ..Options::default()
            },
        )?)
    }

    /// The changes a client holding the rows would push for these writes.
    fn changes(&self, p: &Push, version: i64) -> anyhow::Result<Vec<Change>> {
        let db = self.reader()?;
        let mut out = Vec::new();
        let mut seq = 0;
        for w in &p.writes {
            let k = match w {
                Write::Upsert(k, _) | Write::Delete(k) => k,
            };
            let pk = PackedPk::pack(&k.1)?;
            let held = db.row_changes(k.0, std::slice::from_ref(&pk))?;
            let cl = held.iter().map(|c| c.cl).max().unwrap_or(0);
            let alive = cl % 2 == 1;
            let mut change = |cid: &str, val: Value, col_version: i64, cl: i64| {
                out.push(Change {
                    table: k.0.into(),
                    pk: pk.clone(),
                    cid: cid.into(),
                    val,
                    col_version,
                    db_version: version,
                    site_id: site(p.who),
                    cl,
                    seq,
                });
                seq += 1;
            };
            match w {
                Write::Delete(_) => {
                    // The next even causal length: a delete of the live row,
                    // or a later delete of a row already deleted or absent.
                    let cl = if alive { cl + 1 } else { cl + 2 };
                    change("-1", Value::Null, cl, cl);
                }
                Write::Upsert(_, vals) => {
                    let cl = if alive { cl } else { cl + 1 };
                    if cl > 1 && !alive {
                        change("-1", Value::Null, cl, cl);
                    }
                    for (c, v) in vals {
                        let cv = if alive {
                            held.iter()
                                .find(|h| h.cid == *c)
                                .map_or(0, |h| h.col_version)
                                + 1
                        } else {
                            1
                        };
                        change(c, v.clone(), cv, cl);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn push(&mut self, p: &Push) -> anyhow::Result<bool> {
        let from = *self.pushed.get(&p.who).unwrap_or(&0);
        let to = from + 1;
        let changes = self.changes(p, to)?;
        match self
            .service
            .push(
                &principal(p.who),
                PushRequest {
                    site_id: site(p.who),
                    from,
                    to,
                    changes,
                },
            )
            .await
        {
            Ok(_) => {
                self.pushed.insert(p.who, to);
                Ok(true)
            }
            Err(PushError::Refused(_)) => Ok(false),
            Err(PushError::Api(e)) => anyhow::bail!("push failed: {:?} {}", e.code, e.message),
        }
    }

    fn dump(&self) -> anyhow::Result<Vec<String>> {
        let db = self.reader()?;
        let mut out = Vec::new();
        let (tk, tc) = t_columns(self.composite);
        for (table, cols) in [("t", [tk, tc].concat()), ("m", [M_KEY, M_COLS].concat())] {
            let sql = format!(
                "SELECT {} FROM {table} ORDER BY {}",
                cols.join(", "),
                columns(table, self.composite).0.join(", ")
            );
            let mut stmt = db.conn().prepare(&sql)?;
            let rows = stmt.query_map([], |r| {
                (0..cols.len())
                    .map(|i| {
                        r.get::<_, Value>(i).map(|v| match v {
                            Value::Null => "NULL".to_owned(),
                            Value::Integer(i) => i.to_string(),
                            Value::Text(t) => t,
                            other => format!("{other}"),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })?;
            for r in rows {
                out.push(format!("{table}: {}", r?.join(" | ")));
            }
        }
        Ok(out)
    }
}

#[test]
fn write_decisions_agree_with_postgresql() {
    let server = PgServer::start().expect("a PostgreSQL server (apt-get install postgresql-15)");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cases: u64 = std::env::var("TENANTSYNC_PG_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let first: u64 = std::env::var("TENANTSYNC_PG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut pg = Pg {
        client: server.connect().unwrap(),
        composite: false,
        _server: &server,
    };
    let mut decisions = [0usize; 2];
    for seed in first..first + cases {
        let sc = scenario(seed);
        pg.composite = sc.composite;
        pg.reset(&sc).unwrap_or_else(|e| {
            panic!(
                "seed {seed}: PostgreSQL refused the scenario: {e:#}\n{}",
                sc.policy
            )
        });
        let mut ours = rt
            .block_on(Ours::start(&sc))
            .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
        assert_eq!(
            ours.dump().unwrap(),
            pg.dump().unwrap(),
            "seed {seed}: the starting rows"
        );
        for (i, p) in sc.pushes.iter().enumerate() {
            if std::env::var_os("TENANTSYNC_PG_TRACE").is_some() {
                eprintln!(
                    "push {i} by {:?}; before:\n{}",
                    identity(p.who),
                    pg.dump().unwrap().join("\n")
                );
            }
            let want = pg
                .push(p)
                .unwrap_or_else(|e| panic!("seed {seed} push {i}: {e:#}"));
            let got = rt
                .block_on(ours.push(p))
                .unwrap_or_else(|e| panic!("seed {seed} push {i}: {e:#}"));
            decisions[usize::from(got)] += 1;
            let (a, b) = (ours.dump().unwrap(), pg.dump().unwrap());
            assert!(
                got == want && a == b,
                "seed {seed}, push {i} by {:?}: tenantsync {} it, PostgreSQL {}\npush: {p:?}\npolicies:\n{}\ntenantsync rows:\n{}\nPostgreSQL rows:\n{}",
                identity(p.who),
                if got { "accepted" } else { "refused" },
                if want { "committed" } else { "refused" },
                sc.policy,
                a.join("\n"),
                b.join("\n")
            );
        }
        rt.block_on(ours.service.shutdown(std::time::Duration::from_secs(5)));
    }
    // Both outcomes happen, or the comparison proves little.
    eprintln!(
        "{cases} scenarios: {} pushes accepted, {} refused, in agreement with PostgreSQL",
        decisions[1], decisions[0]
    );
    assert!(
        decisions[0] > 0 && decisions[1] > 0,
        "refused/accepted: {decisions:?}"
    );
}
