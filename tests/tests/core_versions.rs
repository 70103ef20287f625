//! db_version rules (reference §4) including our two fixes: no version is
//! consumed by a transaction that writes no clock, and db_version never goes
//! backwards, also across a reopen.

use tenantsync_core::{CrrConnection, Options};
use tenantsync_tests::crr::{db_with, rows, site};

const T: &str = "CREATE TABLE t (id PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');";

fn one(d: &CrrConnection, sql: &str) -> String {
    rows(d, sql).join(",")
}

#[test]
fn next_db_version_reserves_only_inside_write_transactions() {
    let a = db_with(1, T);
    assert_eq!(one(&a, "SELECT crsql_db_version()"), "0");
    assert_eq!(one(&a, "SELECT crsql_next_db_version()"), "1");
    assert_eq!(one(&a, "SELECT crsql_db_version()"), "0");
    for i in 1..=10 {
        a.conn()
            .execute_batch(&format!("INSERT INTO t VALUES ({i}, 'a', 'b')"))
            .unwrap();
    }
    assert_eq!(a.db_version().unwrap(), 10);
    // A read and a no-op update do not advance it (cr-sqlite: 11).
    a.conn()
        .execute_batch("SELECT * FROM t; UPDATE t SET a = a WHERE id = 1;")
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 10);
    // Inside a transaction: repeated calls return the same reservation.
    a.conn().execute_batch("BEGIN").unwrap();
    assert_eq!(one(&a, "SELECT crsql_next_db_version()"), "11");
    assert_eq!(one(&a, "SELECT crsql_next_db_version(50)"), "50");
    assert_eq!(one(&a, "SELECT crsql_next_db_version()"), "50");
    a.conn().execute_batch("ROLLBACK").unwrap();
    assert_eq!(a.db_version().unwrap(), 10);
    // A transaction that only reserved and committed leaks nothing
    // (cr-sqlite: the next write gets 50).
    a.conn()
        .execute_batch("BEGIN; SELECT crsql_next_db_version(50); COMMIT;")
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 10);
    a.conn()
        .execute_batch("INSERT INTO t VALUES (11, 'a', 'b')")
        .unwrap();
    assert_eq!(
        one(
            &a,
            "SELECT DISTINCT db_version FROM crsql_changes WHERE pk = x'01090B'"
        ),
        "11"
    );
    // A reservation in a transaction that then writes is used.
    a.conn()
        .execute_batch(
            "BEGIN; SELECT crsql_next_db_version(40); INSERT INTO t VALUES (12, 1, 1); COMMIT;",
        )
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 40);
    // An autocommit read reserves nothing either.
    assert_eq!(one(&a, "SELECT crsql_next_db_version(90)"), "90");
    a.conn()
        .execute_batch("INSERT INTO t VALUES (13, 1, 1)")
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 41);
    // Writes to a non-CRR table consume nothing.
    a.conn()
        .execute_batch("CREATE TABLE plain (x); INSERT INTO plain VALUES (1);")
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 41);
}

#[test]
fn db_version_survives_reopen_and_never_goes_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let site_before;
    {
        let d = CrrConnection::open(&path).unwrap();
        site_before = d.site_id();
        d.conn().execute_batch(T).unwrap();
        d.conn()
            .execute_batch("INSERT INTO t VALUES (1, 1, 1); UPDATE t SET a = a;")
            .unwrap();
        assert_eq!(d.db_version().unwrap(), 1);
    }
    {
        let d = CrrConnection::open(&path).unwrap();
        assert_eq!(d.site_id(), site_before);
        assert_eq!(d.db_version().unwrap(), 1);
        d.conn()
            .execute_batch("INSERT INTO t VALUES (2, 2, 2)")
            .unwrap();
        assert_eq!(d.db_version().unwrap(), 2);
        // Evicting the rows holding the highest versions keeps db_version.
        let mut d = d;
        let pks = d
            .changes_since(0, None)
            .unwrap()
            .into_iter()
            .map(|c| c.pk)
            .collect::<Vec<_>>();
        d.evict("t", &pks).unwrap();
        assert_eq!(d.db_version().unwrap(), 2);
    }
    let d = CrrConnection::open(&path).unwrap();
    assert_eq!(d.db_version().unwrap(), 2);
    d.conn()
        .execute_batch("INSERT INTO t VALUES (3, 3, 3)")
        .unwrap();
    assert_eq!(d.db_version().unwrap(), 3);
}

#[test]
fn another_connections_commit_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let a = CrrConnection::open(&path).unwrap();
    a.conn().execute_batch(T).unwrap();
    let b = CrrConnection::open(&path).unwrap();
    assert_eq!(b.site_id(), a.site_id());
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 1, 1)")
        .unwrap();
    assert_eq!(b.db_version().unwrap(), 1);
    b.conn()
        .execute_batch("INSERT INTO t VALUES (2, 2, 2)")
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 2);
    a.conn()
        .execute_batch("INSERT INTO t VALUES (3, 3, 3)")
        .unwrap();
    assert_eq!(
        rows(
            &b,
            "SELECT DISTINCT db_version FROM crsql_changes ORDER BY 1"
        ),
        ["1", "2", "3"]
    );
    // A read-only connection reads changes and packs keys.
    let r = CrrConnection::open_with(
        &path,
        Options {
            read_only: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(r.db_version().unwrap(), 3);
    assert_eq!(r.changes_since(1, None).unwrap().len(), 4);
    assert_eq!(
        rows(&r, "SELECT hex(crsql_pack_columns(1, 'a'))"),
        ["'0209010B0161'"]
    );
    assert!(
        r.conn()
            .execute_batch("INSERT INTO t VALUES (9, 9, 9)")
            .is_err()
    );
    a.conn()
        .execute_batch("INSERT INTO t VALUES (4, 4, 4)")
        .unwrap();
    assert_eq!(r.db_version().unwrap(), 4);
}

#[test]
fn site_id_option_applies_only_to_new_databases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let opts = |n| Options {
        site_id: Some(site(n)),
        ..Options::default()
    };
    assert_eq!(
        CrrConnection::open_with(&path, opts(7)).unwrap().site_id(),
        site(7)
    );
    assert_eq!(
        CrrConnection::open_with(&path, opts(8)).unwrap().site_id(),
        site(7)
    );
    let fresh = CrrConnection::open_in_memory().unwrap();
    let s = fresh.site_id().0;
    assert_eq!(
        (s[6] >> 4, s[8] >> 6),
        (4, 2),
        "UUIDv4 version and variant bits"
    );
    assert_eq!(
        rows(
            &fresh,
            "SELECT hex(crsql_site_id()) = upper(?)"
                .replace('?', &format!("'{}'", fresh.site_id()))
                .as_str()
        ),
        ["1"]
    );
}

#[test]
fn read_only_open_of_a_new_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE x (a)")
        .unwrap();
    let err = CrrConnection::open_with(
        &path,
        Options {
            read_only: true,
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("open it read-write once"), "{err}");
}

#[test]
fn cr_sqlite_databases_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crsqlite.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE crsql_master (key TEXT PRIMARY KEY, value ANY); INSERT INTO crsql_master VALUES ('crsqlite_version', 150000);",
        )
        .unwrap();
    let err = CrrConnection::open(&path).unwrap_err();
    assert!(
        err.to_string()
            .contains("laid out by the cr-sqlite extension")
            && err.to_string().contains("150000"),
        "{err}"
    );
    let path2 = dir.path().join("crsqlite2.db");
    rusqlite::Connection::open(&path2)
        .unwrap()
        .execute_batch("CREATE TABLE t__crsql_pks (__crsql_key INTEGER PRIMARY KEY, id);")
        .unwrap();
    let err = CrrConnection::open(&path2).unwrap_err();
    assert!(err.to_string().contains("t__crsql_pks"), "{err}");
}

#[test]
fn bump_db_version_gives_a_transaction_its_own_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bump.db");
    let a = CrrConnection::open(&path).unwrap();
    a.conn().execute_batch(T).unwrap();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'a', 'b')")
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 1);
    // Outside a transaction it is refused.
    assert!(a.bump_db_version().is_err());
    // A reader inside a read transaction keeps its version.
    let r = CrrConnection::open_with(
        &path,
        Options {
            read_only: true,
            ..Options::default()
        },
    )
    .unwrap();
    r.conn().execute_batch("BEGIN").unwrap();
    let _: i64 = r
        .conn()
        .query_row("SELECT count(*) FROM t", [], |x| x.get(0))
        .unwrap();
    assert_eq!(r.db_version().unwrap(), 1);
    a.conn().execute_batch("BEGIN IMMEDIATE").unwrap();
    assert_eq!(a.bump_db_version().unwrap(), 2);
    assert_eq!(
        a.bump_db_version().unwrap(),
        2,
        "one version per transaction"
    );
    a.conn().execute_batch("COMMIT").unwrap();
    assert_eq!(a.db_version().unwrap(), 2);
    assert_eq!(r.db_version().unwrap(), 1, "the reader's snapshot is older");
    r.conn().execute_batch("COMMIT").unwrap();
    assert_eq!(r.db_version().unwrap(), 2);
    // The next write gets the next version; no clock was written by the bump.
    a.conn()
        .execute_batch("UPDATE t SET a = 'x' WHERE id = 1")
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 3);
    assert_eq!(a.changes_since(1, None).unwrap().len(), 1);
    drop(a);
    let a = CrrConnection::open(&path).unwrap();
    assert_eq!(a.db_version().unwrap(), 3);
    // A rolled back bump leaves nothing.
    a.conn().execute_batch("BEGIN IMMEDIATE").unwrap();
    assert_eq!(a.bump_db_version().unwrap(), 4);
    a.conn().execute_batch("ROLLBACK").unwrap();
    assert_eq!(a.db_version().unwrap(), 3);
}
