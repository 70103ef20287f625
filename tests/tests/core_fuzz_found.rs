//! Core bugs the fuzzers (fuzz/, docs/TESTING.md "Fuzzing") found, one test
//! each, stated as what the engine must do. Their inputs are replayed too
//! from fuzz/regressions/changes_insert/.

use tenantsync_core::{Change, CrrConnection, PackedPk, SiteId, Value};
use tenantsync_tests::crr::{apply_sql, changes, db_with, rows};

const T: &str = "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, b TEXT, n INTEGER, r REAL);
SELECT crsql_as_crr('t');
INSERT INTO t VALUES (1, 'b', 5, 1.5);";

fn cell(cid: &str, val: Value) -> Change {
    Change {
        table: "t".into(),
        pk: PackedPk::pack(&[Value::Integer(1)]).unwrap(),
        cid: cid.into(),
        val,
        col_version: 1,
        db_version: 1,
        site_id: SiteId([2; 16]),
        cl: 1,
        seq: 0,
    }
}

/// Every table and clock, and the db_version.
fn state(d: &CrrConnection) -> (Vec<String>, Vec<String>, i64) {
    (
        rows(d, "SELECT * FROM t ORDER BY id"),
        changes(d, ""),
        d.db_version().unwrap(),
    )
}

/// A value the column's affinity converts (1 into a TEXT column is stored
/// as '1') won its tie against the stored value again on every delivery:
/// each re-delivery re-stamped the cell and bumped the db_version.
#[test]
fn redelivering_a_converted_value_changes_nothing() {
    // Each wins its tie (INTEGER > REAL > TEXT) and is stored in a lower
    // storage class, which it beats again next time.
    let converted = [
        cell("b", Value::Integer(1)), // TEXT column: '1'
        cell("b", Value::Real(2.5)),  // TEXT column: '2.5'
        cell("r", Value::Integer(2)), // REAL column: 2.0
    ];
    for c in converted {
        for sql in [false, true] {
            let mut d = db_with(1, T);
            let merge = |d: &mut CrrConnection| {
                if sql {
                    apply_sql(d, std::slice::from_ref(&c));
                } else {
                    d.apply(std::slice::from_ref(&c)).unwrap();
                }
            };
            let before = state(&d);
            merge(&mut d);
            let once = state(&d);
            assert_ne!(once, before, "{c:?} wins the first time");
            merge(&mut d);
            assert_eq!(state(&d), once, "{c:?} delivered twice (sql: {sql})");
            if !sql {
                let again = d.apply(std::slice::from_ref(&c)).unwrap();
                assert_eq!((again.applied, again.duplicates), (0, 1), "{c:?}");
            }
        }
    }
}

/// Within one typed batch, a tie was decided against the value the batch
/// wrote before the column's affinity converted it (INTEGER 1 beat the
/// TEXT '5' that follows), while `INSERT INTO crsql_changes`, one change at
/// a time, compares with the stored '1' (and '5' wins, as in cr-sqlite).
#[test]
fn a_typed_batch_compares_with_stored_values_as_sql_does() {
    let batch = [
        cell("b", Value::Integer(1)),
        cell("b", Value::Text("5".into())),
    ];
    let mut typed = db_with(1, T);
    typed.apply(&batch).unwrap();
    let sql = db_with(1, T);
    apply_sql(&sql, &batch);
    assert_eq!(rows(&typed, "SELECT b FROM t"), ["'5'"]);
    assert_eq!(state(&typed), state(&sql));
}

/// A site id of 1-15 bytes, which only SQL can send, was stored (as
/// cr-sqlite stores it), and then the typed change feed failed for the whole
/// database ("the typed API needs 16"). It is refused now, and nothing of
/// the statement is applied.
#[test]
fn a_short_site_id_is_refused_and_the_feed_stays_readable() {
    let d = db_with(1, T);
    let before = state(&d);
    let err = d
        .conn()
        .execute_batch(
            "INSERT INTO crsql_changes VALUES ('t', x'010902', 'b', 'x', 1, 1, x'020202', 1, 0)",
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("site id of 3 bytes: a site id is 16 bytes (NULL for the local site)"),
        "{err}"
    );
    assert_eq!(state(&d), before);
    // NULL still means the local site, 16 bytes a remote one.
    d.conn()
        .execute_batch(&format!(
            "INSERT INTO crsql_changes VALUES ('t', x'010902', 'b', 'x', 1, 1, NULL, 1, 0);
             INSERT INTO crsql_changes VALUES ('t', x'010903', 'b', 'y', 1, 1, x'{}', 1, 0);",
            "02".repeat(16)
        ))
        .unwrap();
    let feed = d.changes_since(0, None).unwrap();
    let sites: Vec<(Vec<u8>, SiteId)> = feed
        .iter()
        .filter(|c| c.pk.0 != [1, 9, 1])
        .map(|c| (c.pk.0.clone(), c.site_id))
        .collect();
    assert_eq!(
        sites,
        [
            (vec![1, 9, 2], SiteId([1; 16])),
            (vec![1, 9, 3], SiteId([2; 16]))
        ]
    );
}

/// Dropping a connection with a transaction open segfaulted: SQLite frees
/// the client data holding rusqlite's hook closures before it rolls the
/// transaction back at close, then calls the (freed) rollback hook. The drop
/// must roll back cleanly and leave nothing of the transaction on disk.
#[test]
fn dropping_a_connection_inside_a_transaction_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open-tx.db");
    let d = CrrConnection::open(&path).unwrap();
    d.conn().execute_batch(T).unwrap();
    let before = state(&d);
    d.conn()
        .execute_batch("BEGIN; INSERT INTO t VALUES (2, 'x', 1, 2.5); UPDATE t SET n = 9;")
        .unwrap();
    drop(d);
    let again = CrrConnection::open(&path).unwrap();
    assert_eq!(state(&again), before);
}

/// Inside a transaction a refused `INSERT INTO crsql_changes` (a BLOB into a
/// STRICT TEXT column) left its change's site id registered in
/// `crsql_site_id`: the failed base-table write undid itself, the site id
/// registered before it stayed. Nothing of a refused row may stay, and a
/// site id that is in use stays in use.
#[test]
fn a_refused_change_inside_a_transaction_leaves_no_site_id() {
    let d = db_with(
        1,
        "CREATE TABLE s (id INTEGER PRIMARY KEY NOT NULL, t TEXT) STRICT;
         SELECT crsql_as_crr('s');",
    );
    let sites = |d: &CrrConnection| rows(d, "SELECT * FROM crsql_site_id ORDER BY ordinal");
    let known = format!("x'{}'", "02".repeat(16));
    let new = format!("x'{}'", "03".repeat(16));
    d.conn()
        .execute_batch(&format!(
            "INSERT INTO crsql_changes VALUES ('s', x'010901', 't', 'ok', 1, 1, {known}, 1, 0)"
        ))
        .unwrap();
    let before = (sites(&d), changes(&d, ""), rows(&d, "SELECT * FROM s"));
    d.conn().execute_batch("BEGIN").unwrap();
    for site in [&new, &known] {
        let err = d
            .conn()
            .execute_batch(&format!(
                "INSERT INTO crsql_changes VALUES ('s', x'010902', 't', x'00', 1, 1, {site}, 1, 0)"
            ))
            .unwrap_err();
        assert!(err.to_string().contains("cannot store BLOB"), "{err}");
        assert_eq!(
            (sites(&d), changes(&d, ""), rows(&d, "SELECT * FROM s")),
            before,
            "a refused change from {site} left something"
        );
    }
    // The transaction goes on: a good change from the new site registers it.
    d.conn()
        .execute_batch(&format!(
            "INSERT INTO crsql_changes VALUES ('s', x'010902', 't', 'fine', 1, 1, {new}, 1, 0); COMMIT;"
        ))
        .unwrap();
    assert_eq!(sites(&d).len(), before.0.len() + 1);
    assert_eq!(rows(&d, "SELECT * FROM s").len(), 2);
}
