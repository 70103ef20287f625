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
