//! Shared helpers: databases built through the core from a schema script,
//! their schema as the policy engine sees it, rows as values, whole-database
//! dumps, bit-exact value comparison.

use rusqlite::Connection;
use tenantsync_core::{CrrConnection, Options, SiteId};
use tenantsync_policy::Schema;
use tenantsync_types::Value;

/// An in-memory core database with site id `[site; 16]` and `script` run on it.
pub fn core_db(site: u8, script: &str) -> CrrConnection {
    let db = CrrConnection::open_with(
        ":memory:",
        Options {
            site_id: Some(SiteId([site; 16])),
            ..Options::default()
        },
    )
    .expect("open an in-memory core database");
    db.conn()
        .execute_batch(script)
        .unwrap_or_else(|e| panic!("schema script failed: {e}\n{script}"));
    db
}

/// The database's tables as the policy engine takes them (what the CLI's
/// `load_schema` builds from the core's description).
pub fn policy_schema(db: &CrrConnection) -> Schema {
    Schema::from(&db.schema().expect("describe the schema"))
}

/// Runs `sql` with `params` bound and returns every row, or SQLite's error.
pub fn query(conn: &Connection, sql: &str, params: &[Value]) -> rusqlite::Result<Vec<Vec<Value>>> {
    let mut stmt = conn.prepare(sql)?;
    let n = stmt.column_count();
    let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
        (0..n).map(|i| r.get::<_, Value>(i)).collect()
    })?;
    rows.collect()
}

/// Bit-exact equality: REALs by their bits (so `-0.0 != 0.0` and a NaN
/// equals itself), everything else structurally.
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

/// [`same_value`] over slices.
pub fn same_values(a: &[Value], b: &[Value]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_value(x, y))
}

/// Every row of every ordinary table (the engine's clock tables and
/// bookkeeping included), sorted, with the committed db_version: two equal
/// dumps mean the database holds the same state.
pub fn dump(db: &CrrConnection) -> String {
    let conn = db.conn();
    let names: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND coalesce(sql, '') NOT LIKE 'CREATE VIRTUAL%' ORDER BY name",
        )
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("list tables");
    let mut out = String::new();
    for name in names {
        let sql = format!("SELECT * FROM \"{}\"", name.replace('"', "\"\""));
        let mut stmt = conn.prepare(&sql).expect("prepare dump");
        let n = stmt.column_count();
        let mut rows: Vec<String> = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| r.get_ref(i).map(cell))
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .expect("dump rows")
            .into_iter()
            .map(|r| r.join("|"))
            .collect();
        rows.sort();
        out.push_str(&format!("{name}: {}\n", rows.join("; ")));
    }
    let version = db.db_version().expect("db_version");
    out.push_str(&format!("db_version {version}\n"));
    out
}

/// One cell of a dump: its storage class and exact contents.
fn cell(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => format!("i{i}"),
        ValueRef::Real(r) => format!("r{:016x}", r.to_bits()),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => format!("t{s:?}"),
            Err(_) => format!("T{}", hex(t)),
        },
        ValueRef::Blob(b) => format!("b{}", hex(b)),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
