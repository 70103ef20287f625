//! Helpers for the `core_*` tests: databases with fixed site ids, compact
//! dumps of `crsql_changes` and of tables, and syncs between databases.

use rusqlite::types::ValueRef;
use tenantsync_core::{CrrConnection, Options, SiteId, Value};

/// The site id `[n; 16]` (so tie-breaks between test sites are predictable).
pub fn site(n: u8) -> SiteId {
    SiteId([n; 16])
}

/// An in-memory database with site id `[n; 16]`.
pub fn db(n: u8) -> CrrConnection {
    CrrConnection::open_with(
        ":memory:",
        Options {
            site_id: Some(site(n)),
            ..Options::default()
        },
    )
    .expect("open in-memory database")
}

/// An in-memory database with site `n` and `sql` run on it.
pub fn db_with(n: u8, sql: &str) -> CrrConnection {
    let d = db(n);
    d.conn().execute_batch(sql).expect("setup SQL");
    d
}

/// A value as an SQL literal (`'a'`, `1`, `1.0`, `X'00'`, `NULL`).
pub fn lit(v: ValueRef<'_>) -> String {
    match Value::try_from(v) {
        Ok(v) => v.to_string(),
        Err(_) => "<bad utf8>".into(),
    }
}

/// The rows of a query, each as its values joined by `|`.
pub fn rows(d: &CrrConnection, sql: &str) -> Vec<String> {
    let mut stmt = d.conn().prepare(sql).expect("prepare");
    let n = stmt.column_count();
    let mut out = Vec::new();
    let mut rs = stmt.query([]).expect("query");
    while let Some(r) = rs.next().expect("step") {
        let cols: Vec<String> = (0..n).map(|i| lit(r.get_ref(i).expect("column"))).collect();
        out.push(cols.join("|"));
    }
    out
}

/// `crsql_changes` rows (optionally filtered with `where`), one line each:
/// `table pk(hex) cid val cv dbv cl seq site(first byte hex)`.
pub fn changes(d: &CrrConnection, filter: &str) -> Vec<String> {
    let sql = format!(
        "SELECT \"table\", hex(pk), cid, val, col_version, db_version, cl, seq, lower(substr(hex(site_id), 1, 2)) FROM crsql_changes {filter}"
    );
    let mut stmt = d.conn().prepare(&sql).expect("prepare");
    let mut out = Vec::new();
    let mut rs = stmt.query([]).expect("query");
    while let Some(r) = rs.next().expect("step") {
        let s = |i| r.get::<_, String>(i).expect("text");
        let n = |i| r.get::<_, i64>(i).expect("int");
        out.push(format!(
            "{} {} {} {} cv{} dbv{} cl{} seq{} s{}",
            s(0),
            s(1),
            s(2),
            lit(r.get_ref(3).expect("val")),
            n(4),
            n(5),
            n(6),
            n(7),
            s(8)
        ));
    }
    out
}

/// Copies `crsql_changes` rows of `from` (with `filter`) into `to` through
/// SQL (`INSERT INTO crsql_changes VALUES (?..)` in one transaction), as the
/// reference experiments' `sync` does. Returns the number of rows copied.
pub fn sync_sql(from: &CrrConnection, to: &CrrConnection, filter: &str) -> usize {
    let sql = format!(
        "SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes {filter}"
    );
    let mut stmt = from.conn().prepare(&sql).expect("prepare");
    let mut batch: Vec<Vec<rusqlite::types::Value>> = Vec::new();
    let mut rs = stmt.query([]).expect("query");
    while let Some(r) = rs.next().expect("step") {
        batch.push((0..9).map(|i| r.get(i).expect("col")).collect());
    }
    to.conn().execute_batch("BEGIN").expect("begin");
    {
        let mut ins = to
            .conn()
            .prepare_cached("INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .expect("prepare insert");
        for row in &batch {
            ins.execute(rusqlite::params_from_iter(row.iter()))
                .expect("insert into crsql_changes");
        }
    }
    to.conn().execute_batch("COMMIT").expect("commit");
    batch.len()
}

/// A table's rows (`SELECT * ... ORDER BY 1`), for comparing peers.
pub fn table(d: &CrrConnection, name: &str) -> Vec<String> {
    rows(d, &format!("SELECT * FROM \"{name}\" ORDER BY 1, 2"))
}

/// Merges typed changes through SQL (`INSERT INTO crsql_changes`), in one
/// transaction.
pub fn apply_sql(to: &CrrConnection, changes: &[tenantsync_core::Change]) {
    to.conn().execute_batch("BEGIN").expect("begin");
    {
        let mut ins = to
            .conn()
            .prepare_cached("INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .expect("prepare insert");
        for c in changes {
            ins.execute(rusqlite::params_from_iter(c.sql_params()))
                .expect("insert into crsql_changes");
        }
    }
    to.conn().execute_batch("COMMIT").expect("commit");
}
