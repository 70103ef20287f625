//! Local write tracking (reference §1, §5): what each local write records in
//! `crsql_changes`.

use tenantsync_tests::crr::{changes, db_with, rows};

const T: &str = "CREATE TABLE t (id PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');";

/// Runs `sql` on `db` and checks the whole `crsql_changes` (for `filter`).
#[track_caller]
fn check(db: &tenantsync_core::CrrConnection, sql: &str, filter: &str, expected: &[&str]) {
    db.conn().execute_batch(sql).expect("statement");
    assert_eq!(changes(db, filter), expected, "after {sql}");
}

#[test]
fn lifecycle_of_one_row() {
    let d = db_with(1, T);
    check(
        &d,
        "INSERT INTO t VALUES (1, 'a1', 'b1')",
        "",
        &[
            "t 010901 a 'a1' cv1 dbv1 cl1 seq0 s01",
            "t 010901 b 'b1' cv1 dbv1 cl1 seq1 s01",
        ],
    );
    check(
        &d,
        "UPDATE t SET a = 'a2' WHERE id = 1",
        "",
        &[
            "t 010901 b 'b1' cv1 dbv1 cl1 seq1 s01",
            "t 010901 a 'a2' cv2 dbv2 cl1 seq0 s01",
        ],
    );
    // A no-op update records nothing and (unlike cr-sqlite) consumes no version.
    check(
        &d,
        "UPDATE t SET a = 'a2' WHERE id = 1",
        "",
        &[
            "t 010901 b 'b1' cv1 dbv1 cl1 seq1 s01",
            "t 010901 a 'a2' cv2 dbv2 cl1 seq0 s01",
        ],
    );
    assert_eq!(d.db_version().unwrap(), 2);
    check(
        &d,
        "DELETE FROM t WHERE id = 1",
        "",
        &["t 010901 -1 NULL cv2 dbv3 cl2 seq0 s01"],
    );
    check(
        &d,
        "INSERT INTO t VALUES (1, 'a3', NULL)",
        "",
        &[
            "t 010901 -1 NULL cv3 dbv4 cl3 seq0 s01",
            "t 010901 a 'a3' cv1 dbv4 cl3 seq1 s01",
            "t 010901 b NULL cv1 dbv4 cl3 seq2 s01",
        ],
    );
    check(
        &d,
        "DELETE FROM t WHERE id = 1; INSERT INTO t (id) VALUES (1);",
        "",
        &[
            "t 010901 -1 NULL cv5 dbv6 cl5 seq0 s01",
            "t 010901 a NULL cv1 dbv6 cl5 seq1 s01",
            "t 010901 b NULL cv1 dbv6 cl5 seq2 s01",
        ],
    );
}

#[test]
fn pk_only_tables_record_a_sentinel() {
    let d = db_with(
        1,
        "CREATE TABLE p (x NOT NULL, y NOT NULL, PRIMARY KEY (x, y)); SELECT crsql_as_crr('p');",
    );
    check(
        &d,
        "INSERT INTO p VALUES (1, 2)",
        "",
        &["p 0209010902 -1 NULL cv1 dbv1 cl1 seq0 s01"],
    );
    check(
        &d,
        "DELETE FROM p",
        "",
        &["p 0209010902 -1 NULL cv2 dbv2 cl2 seq0 s01"],
    );
    check(
        &d,
        "INSERT INTO p VALUES (1, 2)",
        "",
        &["p 0209010902 -1 NULL cv3 dbv3 cl3 seq0 s01"],
    );
}

#[test]
fn one_transaction_one_db_version_with_increasing_seq() {
    let d = db_with(1, T);
    check(
        &d,
        "BEGIN; INSERT INTO t VALUES (20, 'a', 'b'); INSERT INTO t VALUES (21, 'c', 'd'); UPDATE t SET a = 'e' WHERE id = 20; COMMIT;",
        "",
        &[
            "t 010914 b 'b' cv1 dbv1 cl1 seq1 s01",
            "t 010915 a 'c' cv1 dbv1 cl1 seq2 s01",
            "t 010915 b 'd' cv1 dbv1 cl1 seq3 s01",
            "t 010914 a 'e' cv2 dbv1 cl1 seq4 s01",
        ],
    );
    assert_eq!(d.db_version().unwrap(), 1);
    // Autocommit statements each get their own version.
    d.conn()
        .execute_batch("INSERT INTO t VALUES (22, 1, 1); INSERT INTO t VALUES (23, 1, 1);")
        .unwrap();
    assert_eq!(
        rows(
            &d,
            "SELECT DISTINCT db_version FROM crsql_changes ORDER BY 1"
        ),
        ["1", "2", "3"]
    );
}

#[test]
fn rollback_discards_clocks_and_the_version() {
    let d = db_with(1, T);
    d.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y')")
        .unwrap();
    d.conn()
        .execute_batch("BEGIN; UPDATE t SET a = 'gone'; INSERT INTO t VALUES (2, 2, 2); ROLLBACK;")
        .unwrap();
    assert_eq!(d.db_version().unwrap(), 1);
    check(
        &d,
        "INSERT INTO t VALUES (3, 3, 3)",
        "WHERE pk = x'010903'",
        &[
            "t 010903 a 3 cv1 dbv2 cl1 seq0 s01",
            "t 010903 b 3 cv1 dbv2 cl1 seq1 s01",
        ],
    );
}

#[test]
fn updates_record_only_changed_columns_by_type_and_value() {
    let d = db_with(
        1,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 1, 'x');",
    );
    // 1 -> 1.0 is a change (REAL vs INTEGER); 'x' -> 'x' is not.
    check(
        &d,
        "UPDATE t SET a = 1.0, b = 'x'",
        "WHERE db_version = 2",
        &["t 010901 a 1.0 cv2 dbv2 cl1 seq0 s01"],
    );
    // 0.0 -> -0.0 compares equal: no change.
    d.conn().execute_batch("UPDATE t SET a = 0.0").unwrap();
    check(&d, "UPDATE t SET a = -0.0", "WHERE db_version = 4", &[]);
    // NULL -> NULL is no change, NULL -> 0 is.
    d.conn().execute_batch("UPDATE t SET b = NULL").unwrap();
    check(&d, "UPDATE t SET b = NULL", "WHERE db_version = 5", &[]);
    check(
        &d,
        "UPDATE t SET b = 0",
        "WHERE db_version = 5",
        &["t 010901 b 0 cv3 dbv5 cl1 seq0 s01"],
    );
}

#[test]
fn insert_or_replace_bumps_every_column_and_the_sentinel_by_two() {
    let d = db_with(
        1,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t'); CREATE TABLE p (id PRIMARY KEY NOT NULL); SELECT crsql_as_crr('p');",
    );
    d.conn()
        .execute_batch(
            "INSERT INTO t VALUES (1, 'x'); DELETE FROM t; INSERT INTO t VALUES (1, 'y');",
        )
        .unwrap();
    // (e13) cl 3 -> 5, a cv 1 -> 2, seq 0 consumed by the sentinel.
    check(
        &d,
        "INSERT OR REPLACE INTO t VALUES (1, 'z')",
        "WHERE \"table\" = 't'",
        &[
            "t 010901 -1 NULL cv5 dbv4 cl5 seq0 s01",
            "t 010901 a 'z' cv2 dbv4 cl5 seq1 s01",
        ],
    );
    // A live row without a sentinel: seq 0 is consumed but not written (#431).
    d.conn()
        .execute_batch("INSERT INTO t VALUES (2, 'q')")
        .unwrap();
    check(
        &d,
        "INSERT OR REPLACE INTO t VALUES (2, 'q')",
        "WHERE pk = x'010902'",
        &["t 010902 a 'q' cv2 dbv6 cl1 seq1 s01"],
    );
    // PK-only table: 1 -> 3.
    d.conn().execute_batch("INSERT INTO p VALUES (1)").unwrap();
    check(
        &d,
        "INSERT OR REPLACE INTO p VALUES (1)",
        "WHERE \"table\" = 'p'",
        &["p 010901 -1 NULL cv3 dbv8 cl3 seq0 s01"],
    );
    // INSERT OR IGNORE on an existing row records nothing.
    check(
        &d,
        "INSERT OR IGNORE INTO p VALUES (1)",
        "WHERE \"table\" = 'p'",
        &["p 010901 -1 NULL cv3 dbv8 cl3 seq0 s01"],
    );
    assert_eq!(d.db_version().unwrap(), 8);
}

#[test]
fn upsert_goes_through_the_update_path() {
    let d = db_with(1, T);
    d.conn()
        .execute_batch("INSERT INTO t VALUES (11, 'x', 'y')")
        .unwrap();
    check(
        &d,
        "INSERT INTO t VALUES (11, 'w', 'y') ON CONFLICT DO UPDATE SET a = excluded.a, b = excluded.b",
        "",
        &[
            "t 01090B b 'y' cv1 dbv1 cl1 seq1 s01",
            "t 01090B a 'w' cv2 dbv2 cl1 seq0 s01",
        ],
    );
}

#[test]
fn primary_key_update_moves_cells_restamped() {
    let d = db_with(1, T);
    d.conn()
        .execute_batch("INSERT INTO t VALUES (10, 'x', 'y')")
        .unwrap();
    // Old key: tombstone. New key: sentinel, then the moved cells keep their
    // col_version and author but carry this transaction's db_version (the
    // cr-sqlite 0.16 bug fix), so `db_version > 1` sees the values.
    check(
        &d,
        "UPDATE t SET id = 11 WHERE id = 10",
        "WHERE db_version > 1",
        &[
            "t 01090A -1 NULL cv2 dbv2 cl2 seq0 s01",
            "t 01090B -1 NULL cv1 dbv2 cl1 seq1 s01",
            "t 01090B a 'x' cv1 dbv2 cl1 seq2 s01",
            "t 01090B b 'y' cv1 dbv2 cl1 seq3 s01",
        ],
    );
    // Changing the key and a column at once bumps the column.
    check(
        &d,
        "UPDATE t SET id = 12, a = 'z' WHERE id = 11",
        "WHERE pk = x'01090C'",
        &[
            "t 01090C -1 NULL cv1 dbv3 cl1 seq1 s01",
            "t 01090C b 'y' cv1 dbv3 cl1 seq3 s01",
            "t 01090C a 'z' cv2 dbv3 cl1 seq4 s01",
        ],
    );
}

#[test]
fn generated_columns_are_not_tracked() {
    let d = db_with(
        1,
        "CREATE TABLE x (id PRIMARY KEY NOT NULL, a, g AS (a * 2)); SELECT crsql_as_crr('x');",
    );
    check(
        &d,
        "INSERT INTO x (id, a) VALUES (1, 5)",
        "",
        &["x 010901 a 5 cv1 dbv1 cl1 seq0 s01"],
    );
}

#[test]
fn as_crr_backfills_existing_rows_with_one_version() {
    let d = db_with(
        1,
        "CREATE TABLE q (id PRIMARY KEY NOT NULL); SELECT crsql_as_crr('q'); INSERT INTO q VALUES (1);",
    );
    d.conn().execute_batch("CREATE TABLE pre (id PRIMARY KEY NOT NULL, a, b); INSERT INTO pre VALUES (1, 'a', 'b'), (2, 'c', 'd');").unwrap();
    check(
        &d,
        "SELECT crsql_as_crr('pre')",
        "WHERE \"table\" = 'pre'",
        &[
            "pre 010901 a 'a' cv1 dbv2 cl1 seq0 s01",
            "pre 010901 b 'b' cv1 dbv2 cl1 seq1 s01",
            "pre 010902 a 'c' cv1 dbv2 cl1 seq2 s01",
            "pre 010902 b 'd' cv1 dbv2 cl1 seq3 s01",
        ],
    );
    assert_eq!(d.db_version().unwrap(), 2);
    // Idempotent: a second call changes nothing.
    assert_eq!(rows(&d, "SELECT crsql_as_crr('pre')"), ["'OK'"]);
    assert_eq!(changes(&d, "WHERE \"table\" = 'pre'").len(), 4);
    assert_eq!(d.db_version().unwrap(), 2);
}

#[test]
fn writes_with_the_sync_bit_set_are_not_tracked() {
    let d = db_with(1, T);
    d.conn().execute_batch("SELECT crsql_internal_sync_bit(1); INSERT INTO t VALUES (1, 1, 1); SELECT crsql_internal_sync_bit(0);").unwrap();
    assert_eq!(changes(&d, ""), Vec::<String>::new());
    assert_eq!(rows(&d, "SELECT crsql_internal_sync_bit()"), ["0"]);
}

#[test]
fn integer_primary_key_tables_track_the_same_way() {
    let d = db_with(
        1,
        "CREATE TABLE i (id INTEGER PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('i');",
    );
    check(
        &d,
        "INSERT INTO i VALUES (300, 'x', 'y')",
        "",
        &[
            "i 0111012C a 'x' cv1 dbv1 cl1 seq0 s01",
            "i 0111012C b 'y' cv1 dbv1 cl1 seq1 s01",
        ],
    );
    check(
        &d,
        "UPDATE i SET id = -1 WHERE id = 300; DELETE FROM i WHERE id = -1; INSERT INTO i (id) VALUES (-1);",
        "WHERE db_version > 2",
        &[
            "i 0141FFFFFFFFFFFFFFFF -1 NULL cv3 dbv4 cl3 seq0 s01",
            "i 0141FFFFFFFFFFFFFFFF a NULL cv1 dbv4 cl3 seq1 s01",
            "i 0141FFFFFFFFFFFFFFFF b NULL cv1 dbv4 cl3 seq2 s01",
        ],
    );
    assert_eq!(
        rows(
            &d,
            "SELECT type FROM pragma_table_info('i__crsql_clock') WHERE name = 'pk'"
        ),
        ["'INTEGER'"]
    );
    // `INTEGER PRIMARY KEY DESC` is not a rowid alias: keyed by the packed blob.
    let e = db_with(
        1,
        "CREATE TABLE j (id INTEGER PRIMARY KEY DESC NOT NULL, a); SELECT crsql_as_crr('j');",
    );
    assert_eq!(
        rows(
            &e,
            "SELECT type FROM pragma_table_info('j__crsql_clock') WHERE name = 'pk'"
        ),
        ["'BLOB'"]
    );
}
