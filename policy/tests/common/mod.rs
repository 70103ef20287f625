//! Test helpers: a real SQLite database built from a schema file (with
//! `crsql_as_crr` recording which tables are CRRs) and its [`Schema`].

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use rusqlite::functions::FunctionFlags;
use tenantsync_policy::{Engine, Identity, PolicySet, Schema};
use tenantsync_types::Value;

pub const EXAMPLE_SCHEMA: &str = include_str!("../../../examples/schema.sql");
pub const EXAMPLE_POLICY: &str = include_str!("../../../examples/policy.sql");

/// Runs a schema file on an in-memory database; `crsql_as_crr('t')` marks t.
/// The stand-in for core (which this crate must not depend on).
pub fn database(schema_sql: &str) -> (Connection, Schema) {
    let conn = Connection::open_in_memory().unwrap();
    let crrs: Arc<Mutex<Vec<String>>> = Arc::default();
    let c2 = crrs.clone();
    conn.create_scalar_function("crsql_as_crr", 1, FunctionFlags::SQLITE_UTF8, move |ctx| {
        let t: String = ctx.get(0)?;
        c2.lock().unwrap().push(t);
        Ok("OK")
    })
    .unwrap();
    conn.execute_batch(schema_sql).unwrap();
    let schema = read_schema(&conn, &crrs.lock().unwrap());
    (conn, schema)
}

/// The tables as SQLite describes them (declared types, keys, STRICT,
/// collations), through the policy engine's one conversion.
pub fn read_schema(conn: &Connection, crrs: &[String]) -> Schema {
    use tenantsync_types::schema as ts;
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")
        .unwrap();
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut tables = Vec::new();
    for name in names {
        let mut info = conn
            .prepare(&format!(
                "PRAGMA table_info(\"{}\")",
                name.replace('"', "\"\"")
            ))
            .unwrap();
        let cols: Vec<(String, String, i64)> = info
            .query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get(5)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let strict: bool = conn
            .query_row(
                "SELECT strict FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
                [&name],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            != 0;
        let columns = cols
            .iter()
            .map(|(n, t, pk)| {
                let (_, coll, ..) = conn.column_metadata(None::<&str>, &name, n).unwrap();
                ts::ColumnSchema {
                    name: n.clone(),
                    decl_type: t.clone(),
                    not_null: false,
                    default: None,
                    pk: *pk as u32,
                    collation: coll
                        .map(|c| c.to_string_lossy().into_owned())
                        .filter(|c| !c.eq_ignore_ascii_case("BINARY")),
                }
            })
            .collect();
        tables.push(ts::TableSchema {
            is_crr: crrs.iter().any(|c| c.eq_ignore_ascii_case(&name)),
            name,
            columns,
            strict,
        });
    }
    Schema::from(&ts::Schema { tables })
}

pub fn example_schema() -> Schema {
    database(EXAMPLE_SCHEMA).1
}

pub fn example_engine() -> Engine {
    let schema = example_schema();
    Engine::new(PolicySet::parse("policy.sql", EXAMPLE_POLICY, &schema).unwrap())
}

pub fn engine(schema: &Schema, policy: &str) -> Engine {
    match PolicySet::parse("policy.sql", policy, schema) {
        Ok(set) => Engine::new(set),
        Err(d) => panic!("policy file refused:\n{d}"),
    }
}

pub fn identity(json: &str) -> Identity {
    Identity::from_json(json).unwrap()
}

/// Runs SQL with bound values and returns the rows.
pub fn query(conn: &Connection, sql: &str, params: &[Value]) -> Vec<Vec<Value>> {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{e}: {sql}"));
    let n = stmt.column_count();
    stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
        (0..n).map(|i| r.get::<_, Value>(i)).collect()
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}
