//! Target `changes_insert`: arbitrary rows into `crsql_changes` (SQL) and
//! `CrrConnection::apply` (typed), on a fresh core database per input with
//! a fixed schema: integer, composite, text and pk-only keys, a CHECK
//! constraint, a NOT NULL column with a default, a STRICT table, a local
//! table; some rows written locally and some merged from another site
//! before the input's changes arrive.
//!
//! The first byte picks the surface, the rest describes up to 16 changes
//! (tables, keys, columns and values mostly valid, sometimes not: unknown
//! tables and columns, wrong key arity, malformed or non-canonical keys,
//! NULL keys, the local site's id, extreme versions and causal lengths,
//! NaN and other odd REALs). Through SQL, a change can also carry a key or
//! site id of the wrong type or length.
//!
//! Properties:
//! - nothing panics;
//! - a refused batch (typed `apply`, or one multi-row `INSERT`) leaves the
//!   database exactly as it was (every table, clocks and bookkeeping
//!   included, and the db_version); inside a transaction a refused
//!   `INSERT` leaves it as it was before that statement;
//! - the typed and the SQL surfaces agree: same acceptance, same database;
//! - for batches of well-formed changes (see [`well_formed`]): applying an
//!   accepted batch again succeeds, merges nothing (`applied == 0`) and
//!   changes nothing, and an empty replica that merges the database's whole
//!   change feed ends up with the same CRR tables.
//!
//! Ill-formed changes (an even causal length on a column change, a
//! sentinel whose col_version is not its causal length) are merged as
//! cr-sqlite 0.16 merges them (tests/tests/interop_core.rs pins that), and
//! that is not idempotent: cr-sqlite stores the change's col_version as the
//! sentinel's causal length, so the same change deletes the row again.
//! cr-sqlite never emits such changes; a server must refuse them from
//! clients.

use std::cell::Cell;
use std::time::Duration;

use rusqlite::backup::Backup;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags};
use tenantsync_core::{Change, CrrConnection, PackedPk, SiteId};
use tenantsync_types::Value;

use crate::input::Input;
use crate::sql::{core_db, dump};

/// The CRR tables and a local one.
pub const SCHEMA: &str = "
CREATE TABLE items (id INTEGER PRIMARY KEY NOT NULL, a, b TEXT, r REAL, n INTEGER DEFAULT 0);
CREATE TABLE pairs (k1 TEXT NOT NULL, k2 NOT NULL, v, w DEFAULT 'w0', PRIMARY KEY (k2, k1));
CREATE TABLE names (name TEXT PRIMARY KEY NOT NULL, note);
CREATE TABLE tags (x NOT NULL, y NOT NULL, PRIMARY KEY (x, y));
CREATE TABLE checked (id INTEGER PRIMARY KEY NOT NULL, c INTEGER CHECK (c IS NULL OR c < 100), s TEXT NOT NULL DEFAULT 's');
CREATE TABLE strict_t (id INTEGER PRIMARY KEY NOT NULL, i INTEGER, t TEXT) STRICT;
CREATE TABLE local_notes (k TEXT PRIMARY KEY, v);
SELECT crsql_as_crr('items');
SELECT crsql_as_crr('pairs');
SELECT crsql_as_crr('names');
SELECT crsql_as_crr('tags');
SELECT crsql_as_crr('checked');
SELECT crsql_as_crr('strict_t');
";

/// Local writes before the input's changes.
const SEED: &str = "
INSERT INTO items VALUES (1, 'a', 'b', 1.5, 1), (2, NULL, 'x', NULL, 2);
INSERT INTO pairs (k1, k2, v) VALUES ('a', 1, 'v1'), ('b', x'01', NULL);
INSERT INTO names VALUES ('n1', 'note');
INSERT INTO tags VALUES (1, 'a');
INSERT INTO checked (id, c) VALUES (1, 5);
INSERT INTO strict_t VALUES (1, 1, 't');
INSERT INTO local_notes VALUES ('k', 'v');
UPDATE items SET a = 'a2' WHERE id = 1;
DELETE FROM names WHERE name = 'n1';
INSERT INTO names VALUES ('n1', 'again');
DELETE FROM tags;
";

/// Local site id, and the remote ones.
const LOCAL: u8 = 0xaa;
const REMOTE: [u8; 3] = [0x02, 0x03, 0x01];

/// (table, pk columns, other columns)
const TABLES: &[(&str, usize, &[&str])] = &[
    ("items", 1, &["a", "b", "r", "n"]),
    ("pairs", 2, &["v", "w"]),
    ("names", 1, &["note"]),
    ("tags", 2, &[]),
    ("checked", 1, &["c", "s"]),
    ("strict_t", 1, &["i", "t"]),
];

const OTHER_TABLES: &[&str] = &[
    "local_notes",
    "nope",
    "ITEMS",
    "crsql_master",
    "sqlite_master",
    "",
];

const OTHER_CIDS: &[&str] = &["-1", "-1", "-1", "nope", "", "id", "k1", "A", "name", "x"];

/// The database every input starts from: the schema, the local seed
/// writes, then a remote site's changes merged.
fn prepared() -> CrrConnection {
    let mut db = core_db(LOCAL, SCHEMA);
    db.conn().execute_batch(SEED).expect("seed writes");
    // Some state from another site: a row only it wrote, and a newer
    // value and a delete of local rows.
    let remote = core_db(REMOTE[2], SCHEMA);
    remote
        .conn()
        .execute_batch(
            "INSERT INTO items VALUES (1, 'r', NULL, 2.5, 7), (9, 'remote', 'r', -0.0, NULL);
             UPDATE items SET a = 'r2' WHERE id = 1;
             INSERT INTO pairs (k1, k2, v) VALUES ('a', 1, 'rv');
             DELETE FROM pairs;
             INSERT INTO checked (id, c, s) VALUES (2, 99, 'z');",
        )
        .expect("remote writes");
    let feed = remote.changes_since(0, None).expect("remote feed");
    db.apply(&feed).expect("merge the remote feed");
    db
}

thread_local! {
    static PREPARED: CrrConnection = prepared();
    static EMPTY: CrrConnection = core_db(0x77, SCHEMA);
    static COPIES: Cell<u64> = const { Cell::new(0) };
}

/// A fresh copy of [`prepared`].
fn fresh() -> CrrConnection {
    PREPARED.with(copy)
}

/// A fresh copy of an empty database with the schema (site 0x77).
fn empty_replica() -> CrrConnection {
    EMPTY.with(copy)
}

/// A copy of `template`, reopened: a page-exact backup into an in-memory
/// (`memdb`) database, much cheaper than building the schema again.
fn copy(template: &CrrConnection) -> CrrConnection {
    let n = COPIES.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let uri = format!("file:/tenantsync-fuzz-{}-{n}?vfs=memdb", std::process::id());
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_URI;
    // Holds the memdb database open until the engine has opened it.
    let mut holder = Connection::open_with_flags(&uri, flags).expect("open a memdb database");
    Backup::new(template.conn(), &mut holder)
        .and_then(|b| b.run_to_completion(1 << 20, Duration::ZERO, None))
        .expect("copy the template database");
    let db = CrrConnection::open(&uri).expect("reopen the copy");
    drop(holder);
    db
}

/// A key from the key pool (`None` for a raw, possibly malformed key).
fn key_value(input: &mut Input<'_>) -> Value {
    match input.byte() % 12 {
        0 | 1 => Value::Integer(1),
        2 => Value::Integer(2),
        3 => Value::Integer(9),
        4 => Value::Text("a".into()),
        5 => Value::Text("b".into()),
        6 => Value::Text("n1".into()),
        7 => Value::Blob(vec![1]),
        8 => Value::Null,
        9 => Value::Real(1.5),
        10 => Value::Real(1.0),
        _ => input.value(),
    }
}

fn pk(input: &mut Input<'_>, arity: usize) -> PackedPk {
    match input.byte() % 10 {
        0..=5 => {
            let vals: Vec<Value> = (0..arity).map(|_| key_value(input)).collect();
            PackedPk::pack(&vals).expect("a few values pack")
        }
        6 => {
            let n = (arity + 2).saturating_sub(input.below(4));
            let vals: Vec<Value> = (0..n).map(|_| key_value(input)).collect();
            PackedPk::pack(&vals).expect("a few values pack")
        }
        7 => PackedPk(input.short_bytes(12)),
        _ => {
            // A non-canonical encoding of integer keys: 8-byte widths.
            let mut out = vec![arity as u8];
            for _ in 0..arity {
                out.push((8 << 3) | 1);
                out.extend_from_slice(&(input.below(4) as u64).to_be_bytes());
            }
            PackedPk(out)
        }
    }
}

fn change(input: &mut Input<'_>) -> Change {
    let t = input.byte();
    let (table, arity, cols) = if t < 240 {
        let (name, arity, cols) = TABLES[usize::from(t) % TABLES.len()];
        (name.to_owned(), arity, cols)
    } else {
        (input.pick(OTHER_TABLES).to_owned(), 1, &[][..])
    };
    let pk = pk(input, arity);
    let cid = match input.byte() % 8 {
        0..=4 if !cols.is_empty() => input.pick(cols).to_owned(),
        0..=5 => "-1".to_owned(),
        6 => input.pick(OTHER_CIDS).to_owned(),
        _ => input.short_text(4),
    };
    let val = if cid == "-1" && !input.byte().is_multiple_of(4) {
        Value::Null
    } else {
        match input.byte() % 4 {
            0 => key_value(input),
            _ => input.value(),
        }
    };
    let version = |input: &mut Input<'_>| match input.byte() % 12 {
        0..=3 => 1,
        4 | 5 => 2,
        6 => 3,
        7 => 0,
        8 => -1,
        9 => i64::MAX,
        10 => 100,
        _ => input.int(),
    };
    let col_version = version(input);
    let db_version = version(input);
    let site_id = match input.byte() % 8 {
        0..=4 => SiteId([REMOTE[input.below(2)]; 16]),
        5 => SiteId([LOCAL; 16]),
        6 => SiteId([REMOTE[2]; 16]),
        _ => SiteId(input.bytes(16).try_into().unwrap_or([0; 16])),
    };
    let cl = match input.byte() % 12 {
        0..=4 => 1,
        5 | 6 => 2,
        7 => 3,
        8 => 4,
        9 => 0,
        10 => -1,
        _ => input.int(),
    };
    let seq = match input.byte() % 6 {
        0..=2 => 0,
        3 => 1,
        4 => -1,
        _ => input.int(),
    };
    Change {
        table,
        pk,
        cid,
        val,
        col_version,
        db_version,
        site_id,
        cl,
        seq,
    }
}

/// What cr-sqlite emits: a sentinel's col_version is its causal length, a
/// column change belongs to a live row (odd causal length).
pub fn well_formed(c: &Change) -> bool {
    if c.is_sentinel() {
        c.col_version == c.cl
    } else {
        c.cl % 2 != 0
    }
}

/// A change's SQL row; `odd` makes the key or site id of another type or
/// length (only SQL can say that).
fn sql_row(c: &Change, odd: u8) -> Vec<SqlValue> {
    let pk = match odd % 8 {
        1 => SqlValue::Text(c.pk.to_hex()),
        2 => SqlValue::Null,
        3 => SqlValue::Integer(1),
        _ => SqlValue::Blob(c.pk.0.clone()),
    };
    let site = match odd % 8 {
        4 => SqlValue::Blob(c.site_id.0[..15].to_vec()),
        5 => SqlValue::Null,
        6 => SqlValue::Text(c.site_id.to_string()),
        _ => SqlValue::Blob(c.site_id.0.to_vec()),
    };
    vec![
        SqlValue::Text(c.table.clone()),
        pk,
        SqlValue::Text(c.cid.clone()),
        to_sql(&c.val),
        SqlValue::Integer(c.col_version),
        SqlValue::Integer(c.db_version),
        site,
        SqlValue::Integer(c.cl),
        SqlValue::Integer(c.seq),
    ]
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Real(r) => SqlValue::Real(*r),
        Value::Text(t) => SqlValue::Text(t.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
    }
}

/// One multi-row `INSERT INTO crsql_changes` statement.
fn insert_rows(db: &CrrConnection, rows: &[Vec<SqlValue>]) -> rusqlite::Result<usize> {
    if rows.is_empty() {
        return Ok(0);
    }
    let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; rows.len()].join(", ");
    let sql = format!("INSERT INTO crsql_changes VALUES {values}");
    db.conn()
        .execute(&sql, rusqlite::params_from_iter(rows.iter().flatten()))
}

/// The target's body.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.byte();
    let n = input.below(17);
    let mut changes = Vec::with_capacity(n);
    let mut odd = Vec::with_capacity(n);
    for _ in 0..n {
        changes.push(change(&mut input));
        odd.push(if input.byte().is_multiple_of(16) {
            input.byte()
        } else {
            0
        });
    }
    match mode % 3 {
        0 => typed_and_sql(&changes),
        1 => sql_batch(&changes, &odd),
        _ => sql_statements(&changes, &odd),
    }
}

/// Typed `apply` on one database, the same changes as one SQL statement on
/// another: both refuse, or both accept and agree.
fn typed_and_sql(changes: &[Change]) {
    let mut a = fresh();
    let before = dump(&a);
    let typed = a.apply(changes);
    let b = fresh();
    let rows: Vec<Vec<SqlValue>> = changes.iter().map(|c| sql_row(c, 0)).collect();
    let sql = insert_rows(&b, &rows);
    match (&typed, &sql) {
        (Ok(_), Ok(_)) => assert_eq!(
            dump(&a),
            dump(&b),
            "apply and INSERT INTO crsql_changes give different databases\n{changes:#?}"
        ),
        (Err(e), Err(_)) => {
            assert_eq!(
                dump(&a),
                before,
                "a refused apply changed the database: {e}\n{changes:#?}"
            );
            assert_eq!(dump(&b), before, "a refused INSERT changed the database");
        }
        (Ok(_), Err(e)) => panic!("apply accepts what INSERT refuses ({e})\n{changes:#?}"),
        (Err(e), Ok(_)) => panic!("INSERT accepts what apply refuses ({e})\n{changes:#?}"),
    }
    let Ok(stats) = typed else { return };
    if !changes.iter().all(well_formed) {
        local_writes(&a);
        return;
    }
    let after = dump(&a);
    let again = a
        .apply(changes)
        .unwrap_or_else(|e| panic!("an accepted batch is refused the second time: {e}"));
    assert_eq!(
        again.applied, 0,
        "the second apply merged something ({again:?}; first {stats:?})\n{changes:#?}"
    );
    assert_eq!(
        dump(&a),
        after,
        "applying an accepted batch twice changed the database\n{changes:#?}"
    );
    read_back(&a);
}

/// One multi-row statement in autocommit mode.
fn sql_batch(changes: &[Change], odd: &[u8]) {
    let db = fresh();
    let rows: Vec<Vec<SqlValue>> = changes
        .iter()
        .zip(odd)
        .map(|(c, &o)| sql_row(c, o))
        .collect();
    let before = dump(&db);
    match insert_rows(&db, &rows) {
        Err(e) => assert_eq!(
            dump(&db),
            before,
            "a refused INSERT changed the database: {e}\n{rows:?}"
        ),
        Ok(_) if changes.iter().all(well_formed) => {
            let after = dump(&db);
            insert_rows(&db, &rows)
                .unwrap_or_else(|e| panic!("an accepted INSERT is refused the second time: {e}"));
            assert_eq!(
                dump(&db),
                after,
                "inserting accepted rows twice changed the database\n{rows:?}"
            );
            read_back(&db);
        }
        Ok(_) => local_writes(&db),
    }
}

/// One statement per row inside a transaction: a refused row leaves the
/// transaction's state as it was; the accepted rows, committed, then sent
/// again, change nothing.
fn sql_statements(changes: &[Change], odd: &[u8]) {
    let db = fresh();
    db.conn().execute_batch("BEGIN").expect("begin");
    let mut accepted = Vec::new();
    let mut all_well_formed = true;
    for (c, &o) in changes.iter().zip(odd) {
        let row = sql_row(c, o);
        let before = dump(&db);
        match insert_rows(&db, std::slice::from_ref(&row)) {
            Ok(_) => {
                all_well_formed &= well_formed(c);
                accepted.push(row);
            }
            // Nothing of a refused row stays, its site id neither
            // (fuzz/regressions/changes_insert/refused-insert-in-transaction-keeps-site-id).
            Err(e) => assert_eq!(
                dump(&db),
                before,
                "a refused INSERT inside a transaction changed it: {e}\n{row:?}"
            ),
        }
    }
    db.conn()
        .execute_batch("COMMIT")
        .expect("commit after refused statements");
    if !all_well_formed {
        local_writes(&db);
        return;
    }
    let after = dump(&db);
    db.conn().execute_batch("BEGIN").expect("begin");
    for row in &accepted {
        insert_rows(&db, std::slice::from_ref(row))
            .unwrap_or_else(|e| panic!("an accepted row is refused the second time: {e}\n{row:?}"));
    }
    db.conn().execute_batch("COMMIT").expect("commit");
    assert_eq!(
        dump(&db),
        after,
        "inserting accepted rows twice changed the database\n{accepted:?}"
    );
    read_back(&db);
}

/// Local writes on every table after the merges (whatever clocks, causal
/// lengths and versions they left): each statement succeeds or fails whole.
const LOCAL_WRITES: &[&str] = &[
    "UPDATE items SET a = 'L', n = coalesce(n, 0) + 1",
    "UPDATE pairs SET v = 'L'",
    "DELETE FROM names",
    "INSERT OR REPLACE INTO names VALUES ('n1', 'L'), ('a', NULL)",
    "DELETE FROM tags",
    "INSERT OR IGNORE INTO tags VALUES (1, 'a'), (x'01', 2)",
    "UPDATE checked SET c = 1, s = 'L'",
    "UPDATE strict_t SET t = 'L'",
    "INSERT OR IGNORE INTO items (id) VALUES (1), (2), (9)",
    "DELETE FROM items WHERE id > 1",
];

fn local_writes(db: &CrrConnection) {
    for sql in LOCAL_WRITES {
        let before = dump(db);
        if let Err(e) = db.conn().execute_batch(sql) {
            assert_eq!(
                dump(db),
                before,
                "a refused local write changed the database: {sql}: {e}"
            );
        }
    }
}

/// An empty replica merging the whole change feed has the same CRR tables,
/// also after local writes on top of the merges.
fn read_back(db: &CrrConnection) {
    read_back_once(db);
    local_writes(db);
    read_back_once(db);
}

fn read_back_once(db: &CrrConnection) {
    let feed = db
        .changes_since(0, None)
        .unwrap_or_else(|e| panic!("the change feed cannot be read after a merge: {e}"));
    let mut replica = empty_replica();
    replica
        .apply(&feed)
        .unwrap_or_else(|e| panic!("a replica refuses the database's own feed: {e}\n{feed:#?}"));
    for (t, _, _) in TABLES {
        let sql = format!("SELECT * FROM {t} ORDER BY 1, 2");
        let ours = crate::sql::query(db.conn(), &sql, &[]).expect("read table");
        let theirs = crate::sql::query(replica.conn(), &sql, &[]).expect("read table");
        assert!(
            ours.len() == theirs.len()
                && ours
                    .iter()
                    .zip(&theirs)
                    .all(|(x, y)| crate::sql::same_values(x, y)),
            "a replica of the feed differs on {t}:\nours   {ours:?}\ntheirs {theirs:?}\nfeed {feed:#?}"
        );
    }
}
