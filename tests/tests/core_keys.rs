//! One reading of a row's key (issue 11, class 1) and bounded clocks
//! (class 3), as properties of the core:
//!
//! - `ColumnType::store` is what SQLite stores: every value, written to a
//!   real column of every affinity, STRICT type and the rowid, reads back
//!   as `store` says, or SQLite refuses it exactly when `store` does;
//! - the row a check reads (`row_values` by a pushed pk) is the row a merge
//!   of that pk changes, for every pk encoding (integer, real, text forms
//!   of numbers with every kind of space and sign, blob, NULL, huge values,
//!   composite keys) on every table shape of the examples and on more;
//!   a key SQLite would refuse is refused by both, nothing changed;
//! - with the server's options, a change for an absent row that does not
//!   create it leaves no trace, and after any accepted change an
//!   authorized local writer can still update and delete the row.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::select;
use rusqlite::Connection;
use tenantsync_core::{ApplyOptions, Change, ClockBound, CrrConnection, PackedPk, SiteId, Value};
use tenantsync_tests::crr::db_with;
use tenantsync_types::affinity::{Affinity, ColumnType, StrictType};

/// Spaces SQLite trims (ASCII) and others it does not.
const SPACES: &[&str] = &[
    "", " ", "  ", "\t", "\n", "\x0b", "\x0c", "\r", "\u{a0}", "\u{2003}", "\u{3000}", "\u{feff}",
    "\u{85}",
];

/// Text that looks, or almost looks, like a number.
fn numeric_text() -> impl Strategy<Value = String> {
    (
        select(SPACES),
        select(&["", "+", "-", "--"][..]),
        prop_oneof![
            Just(String::new()),
            "[0-9]{1,3}",
            "[0-9]{18,21}",
            Just("9223372036854775807".to_owned()),
            Just("9223372036854775808".to_owned()),
        ],
        prop_oneof![Just(String::new()), Just(".".to_owned()), "\\.[0-9]{0,3}"],
        prop_oneof![Just(String::new()), "[eE][+-]?[0-9]{0,3}"],
        select(SPACES),
        select(&["", "x", "0x10", "\0"][..]),
    )
        .prop_map(|(a, s, d, f, e, b, g)| format!("{a}{s}{d}{f}{e}{b}{g}"))
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::Integer),
        select(&[0, 1, -1, 5, i64::MAX, i64::MIN, i64::MAX - 1, 1 << 53][..])
            .prop_map(Value::Integer),
        any::<f64>()
            .prop_filter("SQLite stores no NaN", |r| !r.is_nan())
            .prop_map(Value::Real),
        select(
            &[
                0.0,
                -0.0,
                5.0,
                5.5,
                -1.0,
                1e19,
                -1e19,
                9.223372036854776e18,
                f64::INFINITY,
                f64::NEG_INFINITY,
                0.1,
                1e-300
            ][..]
        )
        .prop_map(Value::Real),
        numeric_text().prop_map(Value::Text),
        ".{0,6}".prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..4).prop_map(Value::Blob),
    ]
}

/// (column declaration, table suffix, the type the core reads from it).
fn column_types() -> Vec<(&'static str, &'static str, ColumnType)> {
    vec![
        ("x INTEGER", "", ColumnType::Affinity(Affinity::Integer)),
        ("x TEXT", "", ColumnType::Affinity(Affinity::Text)),
        ("x NUMERIC", "", ColumnType::Affinity(Affinity::Numeric)),
        ("x REAL", "", ColumnType::Affinity(Affinity::Real)),
        ("x", "", ColumnType::Affinity(Affinity::Blob)),
        ("x INTEGER PRIMARY KEY", "", ColumnType::Rowid),
        (
            "x INTEGER",
            " STRICT",
            ColumnType::Strict(StrictType::Integer),
        ),
        ("x REAL", " STRICT", ColumnType::Strict(StrictType::Real)),
        ("x TEXT", " STRICT", ColumnType::Strict(StrictType::Text)),
        ("x BLOB", " STRICT", ColumnType::Strict(StrictType::Blob)),
        ("x ANY", " STRICT", ColumnType::Strict(StrictType::Any)),
    ]
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn store_is_what_sqlite_stores(v in value()) {
        let conn = Connection::open_in_memory().unwrap();
        for (i, (decl, suffix, ty)) in column_types().into_iter().enumerate() {
            if v.is_null() && ty == ColumnType::Rowid {
                continue; // NULL asks for a new rowid; keys refuse NULL before.
            }
            conn.execute_batch(&format!("CREATE TABLE t{i} ({decl}){suffix};")).unwrap();
            let wrote = conn.execute(&format!("INSERT INTO t{i} (x) VALUES (?1)"), [&v]);
            let want = ty.store(&v);
            match wrote {
                Err(e) => prop_assert!(want.is_err(), "{decl}{suffix}: SQLite refused {v:?} ({e}), store gave {want:?}"),
                Ok(_) => {
                    let got: Value = conn
                        .query_row(&format!("SELECT x FROM t{i} WHERE rowid = last_insert_rowid()"), [], |r| r.get(0))
                        .unwrap();
                    match want {
                        Ok(w) => prop_assert!(same(&w, &got), "{decl}{suffix}: {v:?} stored as {got:?}, store gave {w:?}"),
                        Err(m) => prop_assert!(false, "{decl}{suffix}: SQLite stored {v:?} as {got:?}, store refused: {m}"),
                    }
                }
            }
        }
    }
}

/// Table shapes: the examples' and others (affinities, WITHOUT ROWID,
/// STRICT, composite keys), each with rows whose keys the pushes aim at.
const SHAPES: &str = "
CREATE TABLE lists (id INTEGER PRIMARY KEY NOT NULL, tenant_id TEXT, owner TEXT, name TEXT);
CREATE TABLE todos (id INTEGER PRIMARY KEY NOT NULL, tenant_id TEXT, list_id INTEGER, owner TEXT, title TEXT, done INTEGER NOT NULL DEFAULT 0, priority INTEGER);
CREATE INDEX todos_list ON todos (list_id);
CREATE TABLE members (list_id INTEGER NOT NULL, user_id TEXT NOT NULL, tenant_id TEXT, PRIMARY KEY (list_id, user_id));
CREATE TABLE k_text (id TEXT PRIMARY KEY NOT NULL, v);
CREATE TABLE k_real (id REAL PRIMARY KEY NOT NULL, v);
CREATE TABLE k_num (id NUMERIC PRIMARY KEY NOT NULL, v);
CREATE TABLE k_none (id PRIMARY KEY NOT NULL, v);
CREATE TABLE k_wr (id INTEGER PRIMARY KEY NOT NULL, v) WITHOUT ROWID;
CREATE TABLE k_strict (id INTEGER PRIMARY KEY NOT NULL, v ANY) STRICT;
CREATE TABLE k_any (id ANY PRIMARY KEY NOT NULL, v ANY) STRICT;
CREATE TABLE k_pair (a INTEGER NOT NULL, b TEXT NOT NULL, v, PRIMARY KEY (b, a));
SELECT crsql_as_crr('lists'); SELECT crsql_as_crr('todos'); SELECT crsql_as_crr('members');
SELECT crsql_as_crr('k_text'); SELECT crsql_as_crr('k_real'); SELECT crsql_as_crr('k_num');
SELECT crsql_as_crr('k_none'); SELECT crsql_as_crr('k_wr'); SELECT crsql_as_crr('k_strict');
SELECT crsql_as_crr('k_any'); SELECT crsql_as_crr('k_pair');
INSERT INTO lists VALUES (1, 'acme', 'alice', 'l1'), (5, 'acme', 'alice', 'l5');
INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (1, 'acme', 1, 'alice', 't1'), (5, 'acme', 5, 'alice', 't5');
INSERT INTO members VALUES (5, 'bob', 'acme'), (1, '5', 'acme');
INSERT INTO k_text VALUES ('5', 'a'), ('5.0', 'b'), (' 5', 'c');
INSERT INTO k_real VALUES (5.0, 'a'), (5.5, 'b');
INSERT INTO k_num VALUES (5, 'a'), ('x', 'b');
INSERT INTO k_none VALUES (5, 'a'), ('5', 'b'), (X'35', 'd');
INSERT INTO k_wr VALUES (5, 'a');
INSERT INTO k_strict VALUES (5, 'a');
INSERT INTO k_any VALUES (5, 'a'), ('5', 'b');
INSERT INTO k_pair VALUES (5, '5', 'a');
";

/// (table, number of key values, a non-key column).
const TABLES: &[(&str, usize, &str)] = &[
    ("lists", 1, "name"),
    ("todos", 1, "title"),
    ("members", 2, "tenant_id"),
    ("k_text", 1, "v"),
    ("k_real", 1, "v"),
    ("k_num", 1, "v"),
    ("k_none", 1, "v"),
    ("k_wr", 1, "v"),
    ("k_strict", 1, "v"),
    ("k_any", 1, "v"),
    ("k_pair", 2, "v"),
];

/// A key value aimed at the rows above: 5 in many encodings, and others.
fn key_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => select(vec![
            Value::Integer(5),
            Value::Real(5.0),
            Value::Text("5".into()),
            Value::Text(" 5".into()),
            Value::Text("5 ".into()),
            Value::Text("\u{a0}5".into()),
            Value::Text("\u{3000}5".into()),
            Value::Text("+5".into()),
            Value::Text("5.0".into()),
            Value::Text("5e0".into()),
            Value::Blob(b"5".to_vec()),
            Value::Null,
            Value::Integer(1),
            Value::Integer(6),
            Value::Real(5.5),
            Value::Text("bob".into()),
            Value::Integer(i64::MAX),
            Value::Real(1e19),
            Value::Text("9223372036854775808".into()),
        ]),
        1 => value(),
    ]
}

/// A change the way a peer could push it: a cell, a create or a delete.
fn change() -> impl Strategy<Value = (usize, Vec<Value>, u8, i64, i64)> {
    (
        0..TABLES.len(),
        prop::collection::vec(key_value(), 2),
        0u8..3,
        select(&[1i64, 2, 3, 4, 7][..]),
        select(&[1i64, 2, 9, 1 << 40][..]),
    )
        .prop_map(|(t, vals, kind, cl, cv)| (t, vals, kind, cl, cv))
}

fn make(table: &str, col: &str, pk: PackedPk, kind: u8, cl: i64, cv: i64) -> Change {
    let (cid, val, cl, col_version) = match kind {
        // A cell of a live row.
        0 => (col, Value::Text("pushed".into()), cl | 1, cv),
        // A sentinel: create (odd) or delete (even) at this causal length.
        1 => ("-1", Value::Null, cl | 1, cl | 1),
        _ => ("-1", Value::Null, (cl + 1) & !1, (cl + 1) & !1),
    };
    Change {
        table: table.into(),
        pk,
        cid: cid.into(),
        val,
        col_version,
        db_version: 1,
        site_id: SiteId([9; 16]),
        cl,
        seq: 0,
    }
}

/// The server's merge options (server/src/engine/write.rs).
const UNTRUSTED: ApplyOptions = ApplyOptions {
    absent_rows_leave_no_trace: true,
    clock_bound: Some(ClockBound {
        max_step: tenantsync_protocol::MAX_CLOCK_STEP,
        max: tenantsync_protocol::MAX_CLOCK,
    }),
};

/// Every row of a table, by the packed key of its stored values: the base
/// row (if any) and its clocks as `crsql_changes` reports them.
fn dump(d: &CrrConnection, table: &str) -> BTreeMap<PackedPk, (Option<Vec<Value>>, Vec<String>)> {
    let schema = d.schema().unwrap();
    let t = schema.tables.iter().find(|t| t.name == table).unwrap();
    let mut pk_cols: Vec<(u32, usize)> = t
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.pk > 0)
        .map(|(i, c)| (c.pk, i))
        .collect();
    pk_cols.sort();
    let pk_cols: Vec<usize> = pk_cols.into_iter().map(|(_, i)| i).collect();
    let mut out: BTreeMap<PackedPk, (Option<Vec<Value>>, Vec<String>)> = BTreeMap::new();
    let conn = d.conn();
    let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
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
    let mut stmt = conn
        .prepare("SELECT pk, cid, quote(val), col_version, cl, hex(site_id) FROM crsql_changes WHERE \"table\" = ?1")
        .unwrap();
    let clocks: Vec<(Vec<u8>, String)> = stmt
        .query_map([table], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                format!(
                    "{} {} cv{} cl{} {}",
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?
                ),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (pk, c) in clocks {
        out.entry(PackedPk(pk)).or_default().1.push(c);
    }
    out
}

fn changed_keys(
    a: &BTreeMap<PackedPk, (Option<Vec<Value>>, Vec<String>)>,
    b: &BTreeMap<PackedPk, (Option<Vec<Value>>, Vec<String>)>,
) -> Vec<PackedPk> {
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(k) != b.get(k))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// What a server does with one pushed change: name its row by the
    /// canonical key, read it (the check's "before"), merge, read it again
    /// (the check's "after"). The merge changes that row and no other; a
    /// key the table cannot hold is refused by both, nothing changed.
    #[test]
    fn the_row_checked_is_the_row_merged((t, vals, kind, cl, cv) in change(), typed in any::<bool>()) {
        let (table, arity, col) = TABLES[t];
        let mut d = db_with(1, SHAPES);
        let pk = PackedPk::pack(&vals[..arity]).unwrap();
        let c = make(table, col, pk.clone(), kind, cl, cv);
        let before = dump(&d, table);
        let sites = |d: &CrrConnection| -> i64 {
            d.conn().query_row("SELECT count(*) FROM crsql_site_id", [], |r| r.get(0)).unwrap()
        };
        let sites_before = sites(&d);
        let canonical = d.canonical_pk(table, &pk);
        let checked_before = d.row_values(table, &pk);
        let merged = if typed {
            d.apply_with(std::slice::from_ref(&c), &UNTRUSTED).map(|r| r.changed)
        } else {
            // The default merge keeps tombstones of absent rows, as
            // cr-sqlite does; the key rules are the same.
            d.apply(std::slice::from_ref(&c)).map(|_| Vec::new())
        };
        let after = dump(&d, table);
        match canonical {
            Err(e) => {
                prop_assert!(merged.is_err(), "{table} {vals:?}: the key is refused ({e}) but the merge took it");
                prop_assert!(checked_before.is_err(), "{table} {vals:?}: the check read a row the merge refuses");
                prop_assert_eq!(before, after, "a refused merge changed nothing");
            }
            Ok(key) => {
                let checked_before = checked_before.unwrap();
                prop_assert_eq!(checked_before.clone(), before.get(&key).and_then(|r| r.0.clone()), "{} {:?}: the check read another row than the one keyed {}", table, vals, key);
                let merged = match merged {
                    Ok(m) => m,
                    Err(e) => {
                        // Only a clock beyond the bound refuses a key that
                        // is well formed; nothing changed.
                        prop_assert!(e.to_string().contains("ahead of the"), "{table} {vals:?}: {e}");
                        prop_assert_eq!(before, after);
                        return Ok(());
                    }
                };
                let changed = changed_keys(&before, &after);
                prop_assert!(changed.iter().all(|k| *k == key), "{table} {vals:?}: the merge changed {changed:?}, the check read {key}");
                if typed {
                    let reported: Vec<PackedPk> = merged.into_iter().map(|(_, k)| k).collect();
                    prop_assert_eq!(&reported, &changed, "the report names what changed");
                    let existed = before.get(&key).is_some_and(|r| r.0.is_some());
                    let exists = after.get(&key).is_some_and(|r| r.0.is_some());
                    if !existed && !exists {
                        prop_assert!(changed.is_empty(), "{table} {vals:?}: an absent row kept a trace");
                    }
                    if changed.is_empty() {
                        prop_assert_eq!(sites(&d), sites_before, "nothing changed, not even a site id");
                    }
                }
            }
        }
    }

    /// After any change the server accepts, the row can still be written
    /// and deleted by a local writer (the server's own SQL), and the delete
    /// is a delete (an even causal length), whatever clocks were pushed.
    #[test]
    fn an_accepted_change_never_pins_a_row(
        cl in select(&[1i64, 3, 5, (1 << 32) + 1, (1 << 53) - 1, (1 << 53) + 1, i64::MAX][..]),
        cv in select(&[1i64, 2, 1 << 32, (1 << 32) + 1, (1 << 53) - 1, 1 << 53, i64::MAX][..]),
        sentinel in any::<bool>(),
        existing in any::<bool>(),
    ) {
        let mut d = db_with(1, "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, v TEXT); SELECT crsql_as_crr('t');");
        if existing {
            d.conn().execute_batch("INSERT INTO t VALUES (1, 'x')").unwrap();
        }
        let pk = PackedPk::pack(&[Value::Integer(1)]).unwrap();
        let c = make("t", "v", pk, if sentinel { 1 } else { 0 }, cl, cv);
        if d.apply_with(std::slice::from_ref(&c), &UNTRUSTED).is_err() {
            return Ok(());
        }
        d.conn().execute_batch("INSERT INTO t VALUES (1, 'y') ON CONFLICT DO UPDATE SET v = 'z'").unwrap();
        let v: String = d.conn().query_row("SELECT v FROM t WHERE id = 1", [], |r| r.get(0)).unwrap();
        prop_assert!(v == "y" || v == "z");
        d.conn().execute_batch("DELETE FROM t WHERE id = 1").unwrap();
        let cl: i64 = d.conn().query_row("SELECT cl FROM crsql_changes WHERE cid = '-1'", [], |r| r.get(0)).unwrap();
        prop_assert_eq!(cl % 2, 0, "the delete left an odd causal length {}", cl);
        prop_assert!(cl < i64::MAX);
    }
}

/// Without bounds (a cr-sqlite peer may push anything), a clock at the end
/// of its range makes the next local write fail with an error naming the
/// clock instead of sticking: a saturated causal length stayed odd, so the
/// row could never be deleted again.
#[test]
fn a_clock_at_the_end_of_its_range_fails_the_write_instead_of_sticking() {
    let mut d = db_with(
        1,
        "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, v TEXT); SELECT crsql_as_crr('t');",
    );
    let pk = PackedPk::pack(&[Value::Integer(1)]).unwrap();
    d.apply(&[make("t", "v", pk, 1, i64::MAX, i64::MAX)])
        .unwrap();
    let e = d
        .conn()
        .execute_batch("DELETE FROM t WHERE id = 1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("overflows"), "{e}");
    assert_eq!(
        d.conn()
            .query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        1
    );
}

/// A key column with a collation other than BINARY cannot be a CRR key:
/// 'a' and 'A' would be one row to SQLite and two to the clocks.
#[test]
fn keys_with_a_collation_are_refused() {
    let d = CrrConnection::open_in_memory().unwrap();
    d.conn()
        .execute_batch("CREATE TABLE c (id TEXT COLLATE NOCASE PRIMARY KEY NOT NULL, v)")
        .unwrap();
    let e = d
        .conn()
        .query_row("SELECT crsql_as_crr('c')", [], |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("COLLATE NOCASE"), "{e}");
    d.conn().execute_batch("CREATE TABLE b (id TEXT COLLATE BINARY PRIMARY KEY NOT NULL, v); SELECT crsql_as_crr('b');").unwrap();
}
