//! `crsql_as_crr` rules (reference §5), the schema description, and schema
//! changes through `crsql_begin_alter` / `crsql_commit_alter`.

use tenantsync_core::ColumnSchema;
use tenantsync_tests::crr::{changes, db, db_with, rows, sync_sql, table};

/// Creates the table with `ddl` and checks what `crsql_as_crr('x')` says:
/// `"OK"` or a fragment of the error.
#[track_caller]
fn check(ddl: &str, expected: &str) {
    let d = db(1);
    d.conn().execute_batch(ddl).unwrap();
    let got = match d
        .conn()
        .query_row("SELECT crsql_as_crr('x')", [], |r| r.get::<_, String>(0))
    {
        Ok(s) => s,
        Err(e) => e.to_string(),
    };
    assert!(
        got.contains(expected),
        "{ddl}\n  got: {got}\n  expected: {expected}"
    );
    // The typed API refuses the same way.
    if expected != "OK" {
        let e = d.as_crr("x").unwrap_err().to_string();
        assert!(e.contains(expected) && e.contains("table \"x\""), "{e}");
    }
}

#[test]
fn as_crr_refuses_what_cr_sqlite_refuses() {
    check("CREATE TABLE x (a, b)", "no primary key");
    check(
        "CREATE TABLE x (id PRIMARY KEY, a)",
        "primary key column \"id\" is nullable",
    );
    check(
        "CREATE TABLE x (id INTEGER PRIMARY KEY, a)",
        "(INTEGER PRIMARY KEY columns must also be declared NOT NULL)",
    );
    check(
        "CREATE TABLE x (a NOT NULL, b, c, PRIMARY KEY (a, b))",
        "primary key column \"b\" is nullable",
    );
    check(
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, a UNIQUE)",
        "unique index \"sqlite_autoindex_x_2\" on (a)",
    );
    check(
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, a); CREATE UNIQUE INDEX xa ON x (a)",
        "unique index \"xa\" on (a) besides the primary key",
    );
    check(
        "CREATE TABLE x (id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, a)",
        "AUTOINCREMENT",
    );
    check(
        "CREATE TABLE y (id PRIMARY KEY NOT NULL); CREATE TABLE x (id PRIMARY KEY NOT NULL, yid REFERENCES y(id))",
        "column \"yid\" REFERENCES \"y\"",
    );
    check(
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, a NOT NULL)",
        "column \"a\" is NOT NULL without a DEFAULT",
    );
    check(
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, \"c\"\"q\")",
        "names containing '\"'",
    );
    check("CREATE VIEW x AS SELECT 1", "it is a view");
    check("SELECT 1", "no such table");
    // Allowed.
    check(
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, a); CREATE INDEX xa ON x (a)",
        "OK",
    );
    check(
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, a NOT NULL DEFAULT 0)",
        "OK",
    );
    check(
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, a CHECK (a > 0))",
        "OK",
    );
    check(
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, a) WITHOUT ROWID",
        "OK",
    );
    check(
        "CREATE TABLE x (id TEXT PRIMARY KEY NOT NULL, a INTEGER) STRICT",
        "OK",
    );
    check("CREATE TABLE x (id INTEGER PRIMARY KEY NOT NULL, a)", "OK");
    check("CREATE TABLE x (id PRIMARY KEY NOT NULL)", "OK");
    let d = db(1);
    let e = d
        .conn()
        .execute_batch("SELECT crsql_as_crr('temp', 'x')")
        .unwrap_err()
        .to_string();
    assert!(e.contains("only the main database"), "{e}");
    d.conn()
        .execute_batch("CREATE TABLE crsql_x (id PRIMARY KEY NOT NULL)")
        .unwrap();
    let e = d
        .conn()
        .execute_batch("SELECT crsql_as_crr('main', 'crsql_x')")
        .unwrap_err()
        .to_string();
    assert!(e.contains("reserved for CRR metadata"), "{e}");
}

#[test]
fn schema_describes_tables_and_crrs() {
    let d = db_with(
        1,
        "CREATE TABLE t (id INTEGER NOT NULL, k TEXT NOT NULL, v REAL DEFAULT 1.5, PRIMARY KEY (k, id)); SELECT crsql_as_crr('t'); CREATE TABLE plain (x);",
    );
    let s = d.schema().unwrap();
    assert_eq!(
        s.tables
            .iter()
            .map(|t| (t.name.as_str(), t.is_crr))
            .collect::<Vec<_>>(),
        [("plain", false), ("t", true)]
    );
    let t = s.table("t").unwrap();
    assert_eq!(
        t.columns,
        [
            ColumnSchema {
                name: "id".into(),
                decl_type: "INTEGER".into(),
                not_null: true,
                default: None,
                pk: 2,
                collation: None,
            },
            ColumnSchema {
                name: "k".into(),
                decl_type: "TEXT".into(),
                not_null: true,
                default: None,
                pk: 1,
                collation: None,
            },
            ColumnSchema {
                name: "v".into(),
                decl_type: "REAL".into(),
                not_null: false,
                default: Some("1.5".into()),
                pk: 0,
                collation: None,
            },
        ]
    );
    assert_eq!(
        t.pk_columns()
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["k", "id"]
    );
    assert!(d.is_crr("t").unwrap() && !d.is_crr("plain").unwrap());
    // Packed in PRIMARY KEY order: (k, id).
    d.conn()
        .execute_batch("INSERT INTO t (id, k) VALUES (1, 'x')")
        .unwrap();
    assert_eq!(
        changes(&d, ""),
        ["t 020B01780901 v 1.5 cv1 dbv1 cl1 seq0 s01"]
    );
}

#[test]
fn add_and_drop_columns_through_alter() {
    let d = db_with(
        1,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 'a', 'b'), (2, 'c', 'd');",
    );
    d.conn()
        .execute_batch("SELECT crsql_begin_alter('t'); ALTER TABLE t ADD COLUMN c DEFAULT 7; SELECT crsql_commit_alter('t');")
        .unwrap();
    // Added columns equal to their default get no clocks.
    assert_eq!(changes(&d, "WHERE cid = 'c'"), Vec::<String>::new());
    d.conn()
        .execute_batch("UPDATE t SET c = 8 WHERE id = 1")
        .unwrap();
    assert_eq!(
        changes(&d, "WHERE cid = 'c'"),
        ["t 010901 c 8 cv1 dbv2 cl1 seq0 s01"]
    );
    // Values set during the alter get clocks at the current version.
    d.conn()
        .execute_batch("SELECT crsql_begin_alter('t'); ALTER TABLE t ADD COLUMN e; UPDATE t SET e = 'set' WHERE id = 2; SELECT crsql_commit_alter('t');")
        .unwrap();
    assert_eq!(
        changes(&d, "WHERE cid = 'e'"),
        ["t 010902 e 'set' cv1 dbv2 cl1 seq0 s01"]
    );
    // Dropped columns lose their clocks.
    d.conn()
        .execute_batch("SELECT crsql_begin_alter('t'); ALTER TABLE t DROP COLUMN b; SELECT crsql_commit_alter('t');")
        .unwrap();
    assert_eq!(changes(&d, "WHERE cid = 'b'"), Vec::<String>::new());
    assert_eq!(rows(&d, "SELECT count(*) FROM crsql_changes"), ["4"]);
    d.conn()
        .execute_batch("INSERT INTO t (id, a) VALUES (3, 'z')")
        .unwrap();
    assert_eq!(
        changes(&d, "WHERE pk = x'010903'"),
        [
            "t 010903 a 'z' cv1 dbv3 cl1 seq0 s01",
            "t 010903 c 7 cv1 dbv3 cl1 seq1 s01",
            "t 010903 e NULL cv1 dbv3 cl1 seq2 s01"
        ]
    );
    // A peer with the same schema converges.
    let p = db_with(
        2,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a, c DEFAULT 7, e); SELECT crsql_as_crr('t');",
    );
    sync_sql(&d, &p, "");
    assert_eq!(table(&p, "t"), table(&d, "t"));
}

#[test]
fn typed_alter_rolls_back_on_error() {
    let d = db_with(
        1,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 'a');",
    );
    let err = d
        .alter("t", |c| {
            c.execute_batch("ALTER TABLE t ADD COLUMN z NOT NULL DEFAULT 0")?;
            c.execute_batch("ALTER TABLE t ADD COLUMN bad UNIQUE")?;
            Ok(())
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("Cannot add a UNIQUE column"),
        "{err}"
    );
    assert_eq!(
        rows(&d, "SELECT name FROM pragma_table_info('t')"),
        ["'id'", "'a'"]
    );
    // Triggers are back: writes are tracked.
    d.conn().execute_batch("UPDATE t SET a = 'b'").unwrap();
    assert_eq!(
        changes(&d, "WHERE db_version = 2"),
        ["t 010901 a 'b' cv2 dbv2 cl1 seq0 s01"]
    );
    d.alter("t", |c| Ok(c.execute_batch("ALTER TABLE t ADD COLUMN n")?))
        .unwrap();
    d.conn().execute_batch("UPDATE t SET n = 1").unwrap();
    assert_eq!(
        changes(&d, "WHERE cid = 'n'"),
        ["t 010901 n 1 cv1 dbv3 cl1 seq0 s01"]
    );
}

#[test]
fn alter_changing_the_primary_key_rebuilds_clocks() {
    let d = db_with(
        1,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 'a'); DELETE FROM t; INSERT INTO t VALUES (2, 'b');",
    );
    d.conn()
        .execute_batch(
            "SELECT crsql_begin_alter('t');
             CREATE TABLE t2 (id NOT NULL, a NOT NULL DEFAULT '', PRIMARY KEY (id, a));
             INSERT INTO t2 SELECT * FROM t; DROP TABLE t; ALTER TABLE t2 RENAME TO t;
             SELECT crsql_commit_alter('t');",
        )
        .unwrap();
    assert_eq!(
        changes(&d, ""),
        ["t 0209020B0162 -1 NULL cv1 dbv3 cl1 seq0 s01"]
    );
}

#[test]
fn as_table_stops_tracking() {
    let d = db_with(
        1,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 'a');",
    );
    d.conn()
        .execute_batch("SELECT crsql_as_table('t'); INSERT INTO t VALUES (2, 'b');")
        .unwrap();
    assert_eq!(changes(&d, ""), Vec::<String>::new());
    assert_eq!(
        rows(
            &d,
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 't\\_\\_%' ESCAPE '\\'"
        ),
        ["0"]
    );
    assert_eq!(d.db_version().unwrap(), 1);
}

/// cr-sqlite 0.16 breaks every later write to a table altered without
/// `crsql_begin_alter`/`crsql_commit_alter` ("expected 11 values, got 9").
/// Here writes keep working: the tracking triggers still pass the tracked
/// columns, so the new column stays local (untracked) until an alter pair
/// adopts it, backfilling the values that differ from its default.
#[test]
fn an_alter_outside_begin_and_commit_keeps_writes_working() {
    let d = db_with(
        1,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 'a');",
    );
    d.conn()
        .execute_batch(
            "ALTER TABLE t ADD COLUMN c; INSERT INTO t VALUES (2, 'b', 'c2'); UPDATE t SET a = 'a1', c = 'c1' WHERE id = 1;",
        )
        .unwrap();
    assert_eq!(
        changes(&d, ""),
        [
            "t 010902 a 'b' cv1 dbv2 cl1 seq0 s01",
            "t 010901 a 'a1' cv2 dbv3 cl1 seq0 s01"
        ]
    );
    d.conn()
        .execute_batch("SELECT crsql_begin_alter('t'); SELECT crsql_commit_alter('t');")
        .unwrap();
    assert_eq!(
        changes(&d, "WHERE cid = 'c'"),
        [
            "t 010901 c 'c1' cv1 dbv3 cl1 seq0 s01",
            "t 010902 c 'c2' cv1 dbv3 cl1 seq1 s01"
        ]
    );
    assert_eq!(table(&d, "t"), ["1|'a1'|'c1'", "2|'b'|'c2'"]);
}
