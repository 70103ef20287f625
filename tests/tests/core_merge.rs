//! Merging remote changes (reference §3), through `INSERT INTO crsql_changes`
//! and through the typed `apply`.

use tenantsync_core::{ChangesQuery, CrrConnection, MergeStamping, Options, SiteFilter};
use tenantsync_tests::crr::{changes, db, db_with, rows, site, sync_sql, table};

const T: &str = "CREATE TABLE t (id PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');";

fn pair() -> (CrrConnection, CrrConnection) {
    (db_with(0xA0, T), db_with(0xB0, T))
}

/// A and B insert row 1 with `a` = `va` / `vb` (both col_version 1); the
/// winner is the same whichever direction the merge goes.
#[track_caller]
fn check_tie(va: &str, vb: &str, winner: &str) {
    for a_to_b in [true, false] {
        let (a, b) = pair();
        a.conn()
            .execute_batch(&format!("INSERT INTO t VALUES (1, {va}, 0)"))
            .unwrap();
        b.conn()
            .execute_batch(&format!("INSERT INTO t VALUES (1, {vb}, 0)"))
            .unwrap();
        let target = if a_to_b {
            sync_sql(&a, &b, "");
            &b
        } else {
            sync_sql(&b, &a, "");
            &a
        };
        assert_eq!(
            rows(target, "SELECT a FROM t"),
            [winner],
            "{va} vs {vb}, a_to_b={a_to_b}"
        );
    }
}

#[test]
fn equal_col_versions_break_ties_by_type_then_value() {
    check_tie("5", "3", "5");
    check_tie("'b'", "'a'", "'b'");
    check_tie("'B'", "'a'", "'a'");
    check_tie("'é'", "'z'", "'é'");
    check_tie("1", "100.5", "1");
    check_tie("1", "1.0", "1");
    check_tie("1", "'zzz'", "1");
    check_tie("2.5", "'a'", "2.5");
    check_tie("'a'", "x'ff'", "'a'");
    check_tie("x'00'", "NULL", "X'00'");
    check_tie("NULL", "-5", "-5");
    check_tie("x'0102'", "x'01'", "X'0102'");
}

#[test]
fn higher_col_version_wins_regardless_of_value() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'zzz', 0)")
        .unwrap();
    sync_sql(&a, &b, "");
    a.conn()
        .execute_batch("UPDATE t SET a = 'aaa'; UPDATE t SET a = 'bbb';")
        .unwrap();
    b.conn().execute_batch("UPDATE t SET a = 'yyy'").unwrap();
    sync_sql(&a, &b, "");
    sync_sql(&b, &a, "");
    assert_eq!(table(&a, "t"), ["1|'bbb'|0"]);
    assert_eq!(table(&b, "t"), ["1|'bbb'|0"]);
}

#[test]
fn equal_value_and_version_is_a_no_op_keeping_the_local_author() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'same', 0)")
        .unwrap();
    b.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'same', 0)")
        .unwrap();
    sync_sql(&a, &b, "");
    assert_eq!(
        changes(&b, ""),
        [
            "t 010901 a 'same' cv1 dbv1 cl1 seq0 sb0",
            "t 010901 b 0 cv1 dbv1 cl1 seq1 sb0"
        ]
    );
    assert_eq!(b.db_version().unwrap(), 1);
}

#[test]
fn merge_equal_values_breaks_ties_by_site_id() {
    let (a, b) = pair();
    b.set_merge_equal_values(true).unwrap();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'same', 0)")
        .unwrap();
    b.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'same', 0)")
        .unwrap();
    // A's site (a0..) is smaller than B's (b0..): B keeps its clocks.
    sync_sql(&a, &b, "");
    assert_eq!(
        changes(&b, "WHERE cid = 'a'"),
        ["t 010901 a 'same' cv1 dbv1 cl1 seq0 sb0"]
    );
    // B's site is larger: A takes B's clocks when merge-equal-values is on.
    a.conn()
        .execute_batch("SELECT crsql_config_set('merge-equal-values', 1)")
        .unwrap();
    assert_eq!(
        rows(&a, "SELECT crsql_config_get('merge-equal-values')"),
        ["1"]
    );
    sync_sql(&b, &a, "");
    assert_eq!(
        changes(&a, "WHERE cid = 'a'"),
        ["t 010901 a 'same' cv1 dbv2 cl1 seq0 sb0"]
    );
    assert_eq!(
        rows(
            &a,
            "SELECT value FROM crsql_master WHERE key = 'config.merge-equal-values'"
        ),
        ["1"]
    );
    let err = a
        .conn()
        .execute_batch("SELECT crsql_config_set('nope', 1)")
        .unwrap_err();
    assert!(err.to_string().contains("Unknown setting name"), "{err}");
}

#[test]
fn delete_beats_concurrent_updates_at_a_lower_causal_length() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 0)")
        .unwrap();
    sync_sql(&a, &b, "");
    a.conn()
        .execute_batch("DELETE FROM t WHERE id = 1")
        .unwrap();
    b.conn()
        .execute_batch("UPDATE t SET a = 'upd'; UPDATE t SET a = 'upd2'; UPDATE t SET a = 'upd3';")
        .unwrap();
    sync_sql(&b, &a, "");
    sync_sql(&a, &b, "");
    assert_eq!(table(&a, "t"), Vec::<String>::new());
    assert_eq!(table(&b, "t"), Vec::<String>::new());
    // B was at 4 (merge + 3 updates): A's delete (its v2) is stamped 5.
    assert_eq!(changes(&b, ""), ["t 010901 -1 NULL cv2 dbv5 cl2 seq0 sa0"]);
}

#[test]
fn resurrection_beats_concurrent_edits_of_the_old_incarnation() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y')")
        .unwrap();
    sync_sql(&a, &b, "");
    a.conn()
        .execute_batch("DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (1, 'new', NULL);")
        .unwrap();
    for i in 0..5 {
        b.conn()
            .execute_batch(&format!("UPDATE t SET b = 'b{i}'"))
            .unwrap();
    }
    sync_sql(&b, &a, "");
    sync_sql(&a, &b, "");
    assert_eq!(table(&a, "t"), ["1|'new'|NULL"]);
    assert_eq!(table(&b, "t"), ["1|'new'|NULL"]);
}

#[test]
fn concurrent_deletes_keep_each_side_its_own_tombstone() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y')")
        .unwrap();
    sync_sql(&a, &b, "");
    a.conn().execute_batch("DELETE FROM t").unwrap();
    b.conn().execute_batch("DELETE FROM t").unwrap();
    sync_sql(&a, &b, "");
    assert_eq!(changes(&b, ""), ["t 010901 -1 NULL cv2 dbv2 cl2 seq0 sb0"]);
}

#[test]
fn out_of_order_column_change_resurrects_with_its_causal_length() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y'); DELETE FROM t; INSERT INTO t VALUES (1, 'x3', 'y3');")
        .unwrap();
    sync_sql(&a, &b, "WHERE cid = 'a'");
    assert_eq!(table(&b, "t"), ["1|'x3'|NULL"]);
    // The sentinel is created at cl 3 with the column change's seq and author.
    assert_eq!(
        changes(&b, ""),
        [
            "t 010901 -1 NULL cv3 dbv3 cl3 seq1 sa0",
            "t 010901 a 'x3' cv1 dbv3 cl3 seq1 sa0"
        ]
    );
    // The real sentinel arriving later is a no-op.
    sync_sql(&a, &b, "WHERE cid = '-1'");
    assert_eq!(
        changes(&b, "WHERE cid = '-1'"),
        ["t 010901 -1 NULL cv3 dbv3 cl3 seq1 sa0"]
    );
    sync_sql(&a, &b, "");
    assert_eq!(table(&b, "t"), ["1|'x3'|'y3'"]);
}

#[test]
fn a_cl1_column_change_creates_the_row_without_a_sentinel() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y')")
        .unwrap();
    sync_sql(&a, &b, "WHERE cid = 'b'");
    assert_eq!(table(&b, "t"), ["1|NULL|'y'"]);
    assert_eq!(changes(&b, ""), ["t 010901 b 'y' cv1 dbv1 cl1 seq1 sa0"]);
}

#[test]
fn a_lone_delete_stores_a_tombstone_and_a_later_insert_gets_cl3() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y'); DELETE FROM t;")
        .unwrap();
    sync_sql(&a, &b, "");
    assert_eq!(table(&b, "t"), Vec::<String>::new());
    assert_eq!(changes(&b, ""), ["t 010901 -1 NULL cv2 dbv2 cl2 seq0 sa0"]);
    b.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'local', NULL)")
        .unwrap();
    assert_eq!(
        changes(&b, ""),
        [
            "t 010901 -1 NULL cv3 dbv3 cl3 seq0 sb0",
            "t 010901 a 'local' cv1 dbv3 cl3 seq1 sb0",
            "t 010901 b NULL cv1 dbv3 cl3 seq2 sb0"
        ]
    );
}

#[test]
fn a_resurrecting_sentinel_zeroes_the_local_cell_versions() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y')")
        .unwrap();
    sync_sql(&a, &b, "");
    for i in 0..4 {
        b.conn()
            .execute_batch(&format!("UPDATE t SET a = 'B{i}'"))
            .unwrap();
    }
    a.conn()
        .execute_batch("DELETE FROM t; INSERT INTO t (id, b) VALUES (1, 'fromA');")
        .unwrap();
    sync_sql(&a, &b, "WHERE cid = '-1'");
    assert_eq!(
        changes(&b, ""),
        [
            "t 010901 -1 NULL cv3 dbv6 cl3 seq0 sa0",
            "t 010901 a 'B3' cv0 dbv6 cl3 seq0 sb0",
            "t 010901 b 'y' cv0 dbv6 cl3 seq1 sa0"
        ]
    );
    sync_sql(&a, &b, "");
    assert_eq!(table(&b, "t"), ["1|NULL|'fromA'"]);
    assert_eq!(table(&a, "t"), ["1|NULL|'fromA'"]);
}

#[test]
fn even_causal_length_on_a_column_change_is_a_delete() {
    let c = db_with(0xC0, T);
    c.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'live', 'x')")
        .unwrap();
    c.conn()
        .execute_batch("INSERT INTO crsql_changes VALUES ('t', x'010901', 'a', 'ignored?', 1, 9, x'00112233445566778899aabbccddeeff', 2, 0)")
        .unwrap();
    assert_eq!(table(&c, "t"), Vec::<String>::new());
    assert_eq!(changes(&c, ""), ["t 010901 -1 NULL cv1 dbv9 cl1 seq0 s00"]);
}

#[test]
fn a_cl1_sentinel_for_an_absent_row_creates_it_with_defaults() {
    let c = db_with(
        0xC0,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a DEFAULT 'dflt', b); SELECT crsql_as_crr('t');",
    );
    c.conn()
        .execute_batch("INSERT INTO crsql_changes VALUES ('t', x'010907', '-1', NULL, 1, 9, x'00112233445566778899aabbccddeeff', 1, 0)")
        .unwrap();
    assert_eq!(table(&c, "t"), ["7|'dflt'|NULL"]);
    assert_eq!(changes(&c, ""), ["t 010907 -1 NULL cv1 dbv9 cl1 seq0 s00"]);
}

#[test]
fn user_triggers_fire_on_merge_and_affinity_applies() {
    let c = db_with(
        0xC0,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t'); CREATE TABLE log (x); CREATE TRIGGER tl AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.id); END; CREATE TABLE ty (id PRIMARY KEY NOT NULL, n INTEGER); SELECT crsql_as_crr('ty');",
    );
    c.conn()
        .execute_batch("INSERT INTO crsql_changes VALUES ('t', x'010908', 'a', 'm', 1, 10, x'00112233445566778899aabbccddeeff', 1, 0)")
        .unwrap();
    assert_eq!(rows(&c, "SELECT * FROM log"), ["8"]);
    c.conn()
        .execute_batch("INSERT INTO crsql_changes VALUES ('ty', x'010901', 'n', '5', 1, 11, x'00112233445566778899aabbccddeeff', 1, 0)")
        .unwrap();
    assert_eq!(rows(&c, "SELECT n, typeof(n) FROM ty"), ["5|'integer'"]);
    assert_eq!(
        rows(&c, "SELECT val FROM crsql_changes WHERE \"table\" = 'ty'"),
        ["5"]
    );
}

#[test]
fn site_ids_are_kept_through_ordinals_and_null_means_local() {
    let (a, b) = pair();
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y')")
        .unwrap();
    sync_sql(&a, &b, "");
    assert_eq!(
        rows(
            &b,
            "SELECT hex(site_id), ordinal FROM crsql_site_id ORDER BY ordinal"
        ),
        [
            "'B0B0B0B0B0B0B0B0B0B0B0B0B0B0B0B0'|0",
            "'A0A0A0A0A0A0A0A0A0A0A0A0A0A0A0A0'|1"
        ]
    );
    b.conn()
        .execute_batch(
            "INSERT INTO crsql_changes VALUES ('t', x'010902', 'a', 'nullsite', 1, 50, NULL, 1, 0)",
        )
        .unwrap();
    assert_eq!(
        changes(&b, "WHERE pk = x'010902'"),
        ["t 010902 a 'nullsite' cv1 dbv50 cl1 seq0 sb0"]
    );
    // A merge never re-records a remote change as local.
    assert_eq!(
        rows(
            &b,
            "SELECT count(*) FROM crsql_changes WHERE pk = x'010901' AND site_id = crsql_site_id()"
        ),
        ["0"]
    );
}

#[test]
fn bad_changes_are_refused_with_cr_sqlites_messages() {
    let b = db_with(0xB0, &format!("{T} INSERT INTO t VALUES (1, 1, 1);"));
    let err = |sql: &str| match b.conn().execute_batch(sql) {
        Ok(()) => panic!("{sql} succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err("INSERT INTO crsql_changes VALUES ('nope', x'010902', 'a', 1, 1, 1, x'01', 1, 0)")
            .contains("could not find the schema information for table nope")
    );
    assert!(
        err("INSERT INTO crsql_changes VALUES ('t', x'010902', 'zz', 1, 2, 1, x'01', 1, 0)")
            .contains("has no tracked column \"zz\"")
    );
    assert!(
        err("INSERT INTO crsql_changes VALUES ('t', x'010902', 'a', 1, 2, 1, x'0102030405060708090a0b0c0d0e0f1011', 1, 0)")
            .contains("site id exceeded max length")
    );
    assert!(
        err("INSERT INTO crsql_changes VALUES ('t', x'0209010902', 'a', 'v', 1, 1, x'01', 1, 0)")
            .contains("column index out of range")
    );
    assert!(
        err("INSERT INTO crsql_changes VALUES ('t', x'0109', 'a', 'v', 1, 1, x'01', 1, 0)")
            .contains("truncated")
    );
    assert!(
        err("UPDATE crsql_changes SET val = 1").contains(
            "Only INSERT and SELECT statements are allowed against the crsql changes table"
        )
    );
    assert!(
        err("DELETE FROM crsql_changes").contains(
            "Only INSERT and SELECT statements are allowed against the crsql changes table"
        )
    );
}

#[test]
fn non_canonical_keys_are_normalized() {
    let d = db_with(
        0xD0,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t');",
    );
    d.conn()
        .execute_batch("INSERT INTO crsql_changes VALUES ('t', x'01410000000000000001', 'a', 'v', 1, 1, x'00112233445566778899aabbccddeeff', 1, 0)")
        .unwrap();
    assert_eq!(changes(&d, ""), ["t 010901 a 'v' cv1 dbv1 cl1 seq0 s00"]);
}

#[test]
fn rows_impacted_counts_effective_merges_until_commit() {
    let b = db_with(0xB0, T);
    b.conn().execute_batch("BEGIN").unwrap();
    for _ in 0..2 {
        b.conn()
            .execute_batch(
                "INSERT INTO crsql_changes VALUES ('t', x'010903', 'a', 'r', 1, 60, x'01010101010101010101010101010101', 1, 0)",
            )
            .unwrap();
    }
    assert_eq!(rows(&b, "SELECT crsql_rows_impacted()"), ["1"]);
    b.conn().execute_batch("COMMIT").unwrap();
    assert_eq!(rows(&b, "SELECT crsql_rows_impacted()"), ["0"]);
}

#[test]
fn merged_clocks_are_stamped_lamport_style() {
    let a = db_with(0xA0, T);
    for i in 1..=10 {
        a.conn()
            .execute_batch(&format!("INSERT INTO t VALUES ({i}, 'a{i}', 'b{i}')"))
            .unwrap();
    }
    let b = db_with(0xB0, T);
    b.conn()
        .execute_batch(
            "INSERT INTO t VALUES (100, 'x', 'y'); INSERT INTO t VALUES (101, 'x', 'y');",
        )
        .unwrap();
    // B at 2 merging A's versions 1..3 in one transaction: all stamped 3.
    sync_sql(&a, &b, "WHERE db_version <= 3");
    assert_eq!(
        rows(
            &b,
            "SELECT DISTINCT db_version FROM crsql_changes WHERE pk IN (x'010901', x'010902', x'010903')"
        ),
        ["3"]
    );
    assert_eq!(b.db_version().unwrap(), 3);
    // B at 3 merging A's v4 then v9 in one transaction: stamped 4 and 9.
    sync_sql(&a, &b, "WHERE db_version IN (4, 9)");
    assert_eq!(
        rows(
            &b,
            "SELECT hex(pk), db_version FROM crsql_changes WHERE pk IN (x'010904', x'010909') AND cid = 'a'"
        ),
        ["'010904'|4", "'010909'|9"]
    );
    // B at 9 merging A's older v5: stamped 10.
    sync_sql(&a, &b, "WHERE db_version = 5");
    assert_eq!(
        rows(
            &b,
            "SELECT DISTINCT db_version FROM crsql_changes WHERE pk = x'010905'"
        ),
        ["10"]
    );
    b.conn()
        .execute_batch("INSERT INTO t VALUES (102, 'x', 'y')")
        .unwrap();
    assert_eq!(b.db_version().unwrap(), 11);
}

#[test]
fn local_stamping_ignores_the_senders_db_version() {
    let a = db_with(0xA0, T);
    a.conn()
        .execute_batch("SELECT crsql_next_db_version(1000)")
        .unwrap();
    a.conn()
        .execute_batch(
            "BEGIN; SELECT crsql_next_db_version(1000); INSERT INTO t VALUES (1, 1, 1); COMMIT;",
        )
        .unwrap();
    assert_eq!(a.db_version().unwrap(), 1000);
    let s = CrrConnection::open_with(
        ":memory:",
        Options {
            merge_stamping: MergeStamping::Local,
            site_id: Some(site(0x5E)),
            ..Options::default()
        },
    )
    .unwrap();
    s.conn().execute_batch(T).unwrap();
    let mut s = s;
    let stats = s.apply(&a.changes_since(0, None).unwrap()).unwrap();
    assert_eq!((stats.applied, stats.max_db_version), (2, Some(1)));
    assert_eq!(s.db_version().unwrap(), 1);
}

#[test]
fn typed_apply_matches_the_sql_path_and_counts_outcomes() {
    let a = db_with(0xA0, T);
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y'); INSERT INTO t VALUES (2, 2, 2.5); DELETE FROM t WHERE id = 2; UPDATE t SET a = x'00ff' WHERE id = 1;")
        .unwrap();
    let all = a.changes_since(0, None).unwrap();
    let mut b = db_with(0xB0, T);
    let c = db_with(0xC0, T);
    let stats = b.apply(&all).unwrap();
    sync_sql(&a, &c, "");
    assert_eq!((stats.applied, stats.lost, stats.duplicates), (3, 0, 0));
    assert_eq!(table(&b, "t"), table(&c, "t"));
    assert_eq!(changes(&b, ""), changes(&c, ""));
    // Applying the same changes again: all duplicates.
    let again = b.apply(&all).unwrap();
    assert_eq!((again.applied, again.lost, again.duplicates), (0, 0, 3));
    // Changes from B exclude A's own when asked.
    assert!(b.changes_since(0, Some(&a.site_id())).unwrap().is_empty());
    assert_eq!(
        b.changes(&ChangesQuery {
            site: SiteFilter::Only(a.site_id()),
            ..Default::default()
        })
        .unwrap()
        .len(),
        3
    );
}

#[test]
fn typed_apply_is_all_or_nothing_and_names_the_bad_change() {
    let a = db_with(0xA0, T);
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y'); INSERT INTO t VALUES (2, 'z', 'w');")
        .unwrap();
    let mut all = a.changes_since(0, None).unwrap();
    all[3].cid = "nope".into();
    let mut b = db_with(0xB0, T);
    let err = b.apply(&all).unwrap_err().to_string();
    assert!(
        err.contains("change #3") && err.contains("\"nope\"") && err.contains("pk 010902"),
        "{err}"
    );
    assert_eq!(table(&b, "t"), Vec::<String>::new());
    assert_eq!(b.db_version().unwrap(), 0);
    // The connection still works afterwards.
    all[3].cid = "b".into();
    assert_eq!(b.apply(&all).unwrap().applied, 4);
    assert_eq!(table(&b, "t"), ["1|'x'|'y'", "2|'z'|'w'"]);
}

#[test]
fn apply_inside_a_callers_transaction_uses_a_savepoint() {
    let a = db_with(0xA0, T);
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'x', 'y')")
        .unwrap();
    let ch = a.changes_since(0, None).unwrap();
    let mut b = db(0xB0);
    b.conn().execute_batch(T).unwrap();
    b.conn().execute_batch("BEGIN").unwrap();
    b.apply(&ch).unwrap();
    b.conn().execute_batch("ROLLBACK").unwrap();
    assert_eq!(table(&b, "t"), Vec::<String>::new());
    b.apply(&ch).unwrap();
    assert_eq!(table(&b, "t"), ["1|'x'|'y'"]);
}

#[test]
fn a_row_group_writes_each_value_to_its_column_whatever_the_order() {
    let a = db_with(0xA0, T);
    a.conn()
        .execute_batch("INSERT INTO t VALUES (0, NULL, NULL); UPDATE t SET a = 1 WHERE id = 0; INSERT INTO t VALUES (1, NULL, 1);")
        .unwrap();
    // Row 0's first group merges b before a, row 1's a before b.
    let mut b = db_with(0xB0, T);
    b.apply(&a.changes_since(0, None).unwrap()).unwrap();
    assert_eq!(table(&b, "t"), ["0|1|NULL", "1|NULL|1"]);
}

#[test]
fn integer_primary_keys_are_keyed_the_way_sqlite_stores_them() {
    const I: &str =
        "CREATE TABLE i (id INTEGER PRIMARY KEY NOT NULL, v); SELECT crsql_as_crr('i');";
    let a = db_with(0xA0, I);
    a.conn().execute_batch("INSERT INTO i VALUES (5, 'x'); UPDATE i SET id = 6 WHERE id = 5; DELETE FROM i WHERE id = 6; INSERT INTO i VALUES (6, 'y');").unwrap();
    let b = db_with(0xB0, I);
    sync_sql(&a, &b, "");
    assert_eq!(table(&b, "i"), ["6|'y'"]);
    assert_eq!(changes(&b, ""), changes(&a, ""));
    // A REAL 7.0 or TEXT '7' key is stored (and keyed) as the integer 7.
    b.conn()
        .execute_batch("INSERT INTO crsql_changes VALUES ('i', crsql_pack_columns(7.0), 'v', 'r', 1, 1, x'0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c', 1, 0); INSERT INTO crsql_changes VALUES ('i', crsql_pack_columns('7'), 'v', 's', 2, 1, x'0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c', 1, 0);")
        .unwrap();
    assert_eq!(
        changes(&b, "WHERE pk = x'010907'"),
        ["i 010907 v 's' cv2 dbv6 cl1 seq0 s0c"]
    );
    let err = b
        .conn()
        .execute_batch("INSERT INTO crsql_changes VALUES ('i', crsql_pack_columns('x'), 'v', 1, 1, 1, x'0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c', 1, 0)")
        .unwrap_err()
        .to_string();
    assert!(err.contains("datatype mismatch"), "{err}");
}
