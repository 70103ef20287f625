//! Reading changes: `crsql_changes` plans (served by indexes, not scans),
//! filter semantics, order, and the typed read API.

use tenantsync_core::{ChangesQuery, CrrConnection, PackedPk, RowRef, SiteFilter, Value};
use tenantsync_tests::crr::{changes, db_with, rows, sync_sql, table};

const SCHEMA: &str = "CREATE TABLE t (id PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');
                      CREATE TABLE u (k PRIMARY KEY NOT NULL, v); SELECT crsql_as_crr('u');";

/// A with local writes to t and u (versions 1-4), B's writes merged in
/// (stamped 5) and one local transaction writing both tables (6).
fn fixture() -> CrrConnection {
    let a = db_with(0xA0, SCHEMA);
    let b = db_with(0xB0, SCHEMA);
    a.conn()
        .execute_batch("INSERT INTO t VALUES (1, 'a', 'b'); INSERT INTO u VALUES ('k', 1); UPDATE t SET a = 'a2'; DELETE FROM u;")
        .unwrap();
    b.conn()
        .execute_batch("INSERT INTO t VALUES (2, 'x', 'y'); INSERT INTO u VALUES ('z', 9);")
        .unwrap();
    sync_sql(&b, &a, "");
    a.conn()
        .execute_batch(
            "BEGIN; INSERT INTO t VALUES (3, 3, 3); INSERT INTO u VALUES ('m', 5); COMMIT;",
        )
        .unwrap();
    a
}

/// The plan's detail lines for `sql`.
fn plan(d: &CrrConnection, sql: &str) -> String {
    rows(d, &format!("EXPLAIN QUERY PLAN {sql}"))
        .into_iter()
        .map(|r| {
            r.rsplit('|')
                .next()
                .unwrap_or_default()
                .trim_matches('\'')
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[track_caller]
fn check_plan(sql: &str, expected: &str) {
    let d = fixture();
    assert_eq!(plan(&d, sql), expected, "{sql}");
}

#[test]
fn constraints_are_served_from_indexes() {
    check_plan(
        "SELECT * FROM crsql_changes",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:full",
    );
    check_plan(
        "SELECT * FROM crsql_changes WHERE db_version > 3",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:dbv>",
    );
    check_plan(
        "SELECT * FROM crsql_changes WHERE db_version > 3 AND site_id IS NOT x'01'",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:dbv> site-is-not",
    );
    check_plan(
        "SELECT * FROM crsql_changes WHERE site_id = crsql_site_id() AND db_version >= 1 AND db_version <= 4",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:site= dbv>= dbv<=",
    );
    check_plan(
        "SELECT * FROM crsql_changes WHERE \"table\" = 't'",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:table=",
    );
    check_plan(
        "SELECT * FROM crsql_changes WHERE pk = x'010901'",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:pk=",
    );
    check_plan(
        "SELECT * FROM crsql_changes WHERE \"table\" = 't' AND pk = x'010901'",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:table= pk=",
    );
    // Not `val`: the base rows are not read when val is not wanted.
    check_plan(
        "SELECT count(*) FROM crsql_changes WHERE db_version > 0",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 0:dbv>",
    );
}

#[test]
fn order_by_db_version_ascending_is_consumed() {
    check_plan(
        "SELECT * FROM crsql_changes WHERE db_version > 0 ORDER BY db_version, seq",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:dbv>",
    );
    check_plan(
        "SELECT * FROM crsql_changes ORDER BY db_version DESC",
        "SCAN crsql_changes VIRTUAL TABLE INDEX 1:full; USE TEMP B-TREE FOR ORDER BY",
    );
}

#[test]
fn a_delta_join_drives_from_the_db_version_index() {
    let d = fixture();
    let sql = "SELECT t.id, c.cid FROM crsql_changes c JOIN t ON t.id = tenantsync_pk_value(c.pk, 0) WHERE c.\"table\" = 't' AND c.db_version > 2";
    let p = plan(&d, sql);
    assert!(
        p.starts_with("SCAN c VIRTUAL TABLE INDEX 0:table= dbv>"),
        "{p}"
    );
    assert!(p.contains("SEARCH t USING"), "{p}");
    assert_eq!(rows(&d, sql), ["1|'a'", "2|'a'", "2|'b'", "3|'a'", "3|'b'"]);
}

#[test]
fn default_order_is_db_version_then_seq_across_tables() {
    let d = fixture();
    let got = rows(&d, "SELECT db_version, seq FROM crsql_changes");
    let mut sorted = got.clone();
    sorted.sort_by_key(|r| {
        let (v, s) = r.split_once('|').unwrap();
        (v.parse::<i64>().unwrap(), s.parse::<i64>().unwrap())
    });
    assert_eq!(got, sorted);
    assert_eq!(
        changes(&d, "WHERE db_version = 6"),
        [
            "t 010903 a 3 cv1 dbv6 cl1 seq0 sa0",
            "t 010903 b 3 cv1 dbv6 cl1 seq1 sa0",
            "u 010B016D v 5 cv1 dbv6 cl1 seq2 sa0"
        ]
    );
}

/// The same WHERE over `crsql_changes` and over a plain copy of it must
/// return the same rows: pushed-down constraints keep SQLite's semantics.
#[test]
fn pushed_down_filters_match_sqlite_semantics() {
    let d = fixture();
    d.conn()
        .execute_batch("CREATE TEMP TABLE copy AS SELECT * FROM crsql_changes")
        .unwrap();
    let a = d.site_id().to_string().to_uppercase();
    let filters = [
        "db_version > 2".to_owned(),
        "db_version >= 2 AND db_version < 4".to_owned(),
        "db_version = 3".to_owned(),
        "db_version > 2.5".to_owned(),
        "db_version <= 2.5".to_owned(),
        "db_version > '2'".to_owned(),
        "db_version < 'x'".to_owned(),
        "db_version > 'x'".to_owned(),
        "db_version > NULL".to_owned(),
        "db_version > 9223372036854775807".to_owned(),
        "db_version < -9223372036854775808".to_owned(),
        format!("site_id = x'{a}'"),
        format!("site_id != x'{a}'"),
        format!("site_id IS NOT x'{a}' AND db_version > 1"),
        format!("site_id IS x'{a}'"),
        "site_id IS NOT NULL".to_owned(),
        "site_id IS NULL".to_owned(),
        "site_id = NULL".to_owned(),
        "site_id = 'text'".to_owned(),
        format!("site_id = x'{a}' AND site_id != x'{a}'"),
        format!("site_id != x'{a}' AND site_id != x'B0B0B0B0B0B0B0B0B0B0B0B0B0B0B0B0'"),
        "\"table\" = 'u'".to_owned(),
        "\"table\" = 'nope'".to_owned(),
        "\"table\" = 'u' AND \"table\" = 't'".to_owned(),
        "pk = x'010902'".to_owned(),
        "pk = x'010902' AND \"table\" = 't'".to_owned(),
        "pk IN (x'010901', x'010B016B')".to_owned(),
        "pk = x'01410000000000000001'".to_owned(),
        "cid = 'a' AND cl = 1".to_owned(),
        "val = 9".to_owned(),
        "seq = 1 AND col_version >= 1".to_owned(),
    ];
    for f in filters {
        let q = |from: &str| {
            let mut r = rows(&d, &format!("SELECT * FROM {from} WHERE {f}"));
            r.sort();
            r
        };
        assert_eq!(q("crsql_changes"), q("copy"), "WHERE {f}");
    }
}

#[test]
fn nested_reads_work() {
    let d = fixture();
    assert_eq!(
        rows(
            &d,
            "SELECT count(*) FROM crsql_changes WHERE db_version = (SELECT max(db_version) FROM crsql_changes)"
        ),
        ["3"]
    );
    d.conn()
        .execute_batch("INSERT INTO crsql_changes SELECT * FROM crsql_changes")
        .unwrap();
    assert_eq!(rows(&d, "SELECT crsql_rows_impacted()"), ["0"]);
}

#[test]
fn pk_helpers() {
    let d = fixture();
    assert_eq!(
        rows(
            &d,
            "SELECT cell FROM crsql_unpack_columns(x'030C01FF05024000000000000000')"
        ),
        ["X'ff'", "NULL", "2.0"]
    );
    assert_eq!(
        rows(
            &d,
            "SELECT tenantsync_pk_value(x'0209010B03616263', 1), tenantsync_pk_value(x'010901', 5)"
        ),
        ["'abc'|NULL"]
    );
    assert_eq!(
        rows(&d, "SELECT hex(crsql_pack_columns(1, 'abc'))"),
        ["'0209010B03616263'"]
    );
    assert!(
        d.conn()
            .execute_batch("SELECT tenantsync_pk_value(x'0109', 0)")
            .is_err()
    );
}

#[test]
fn typed_queries() {
    let d = fixture();
    let q = |q: ChangesQuery| -> Vec<(String, i64, i64)> {
        d.changes(&q)
            .unwrap()
            .into_iter()
            .map(|c| (c.cid, c.db_version, c.seq))
            .collect()
    };
    assert_eq!(
        q(ChangesQuery {
            since: 4,
            ..Default::default()
        })
        .len(),
        6
    );
    // Version 2 (u 'k' inserted) was superseded by its delete at 4.
    assert_eq!(
        q(ChangesQuery {
            since: 1,
            until: Some(3),
            ..Default::default()
        }),
        [("a".to_owned(), 3, 0)]
    );
    assert_eq!(
        q(ChangesQuery {
            table: Some("u".into()),
            ..Default::default()
        }),
        [
            ("-1".to_owned(), 4, 0),
            ("v".to_owned(), 5, 0),
            ("v".to_owned(), 6, 2)
        ]
    );
    // The limit never splits a db_version.
    let limited = d
        .changes(&ChangesQuery {
            limit: Some(1),
            since: 4,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(limited.len(), 3);
    // pks in any encoding.
    let one = d
        .changes(&ChangesQuery {
            table: Some("t".into()),
            pks: Some(vec![PackedPk(vec![0x01, 0x41, 0, 0, 0, 0, 0, 0, 0, 1])]),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(one.len(), 2);
    let only_b = d
        .changes(&ChangesQuery {
            site: SiteFilter::Only(tenantsync_tests::crr::site(0xB0)),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(only_b.len(), 3);
    assert!(only_b.iter().all(|c| c.db_version == 5));
    // serde round trip of a change.
    let json = serde_json::to_string(&one[0]).unwrap();
    assert_eq!(
        serde_json::from_str::<tenantsync_core::Change>(&json).unwrap(),
        one[0]
    );
}

#[test]
fn row_level_api() {
    let mut d = fixture();
    assert_eq!(
        d.changed_rows(3, None).unwrap(),
        [
            RowRef {
                table: "u".into(),
                pk: PackedPk(vec![1, 0x0B, 1, b'k']),
                db_version: 4
            },
            RowRef {
                table: "t".into(),
                pk: PackedPk(vec![1, 9, 2]),
                db_version: 5
            },
            RowRef {
                table: "u".into(),
                pk: PackedPk(vec![1, 0x0B, 1, b'z']),
                db_version: 5
            },
            RowRef {
                table: "t".into(),
                pk: PackedPk(vec![1, 9, 3]),
                db_version: 6
            },
            RowRef {
                table: "u".into(),
                pk: PackedPk(vec![1, 0x0B, 1, b'm']),
                db_version: 6
            },
        ]
    );
    let pk1 = PackedPk::pack(&[Value::Integer(1)]).unwrap();
    let whole = d.row_changes("t", std::slice::from_ref(&pk1)).unwrap();
    assert_eq!(
        whole.iter().map(|c| c.cid.as_str()).collect::<Vec<_>>(),
        ["b", "a"]
    );
    assert_eq!(
        d.row_values("t", &pk1).unwrap(),
        Some(vec![Value::Integer(1), Value::from("a2"), Value::from("b")])
    );
    assert_eq!(
        d.row_values("t", &PackedPk::pack(&[Value::Integer(99)]).unwrap())
            .unwrap(),
        None
    );
    // Evict: row and clocks go, nothing is recorded.
    let v = d.db_version().unwrap();
    assert_eq!(d.evict("t", std::slice::from_ref(&pk1)).unwrap(), 1);
    assert_eq!(table(&d, "t"), ["2|'x'|'y'", "3|3|3"]);
    assert!(
        d.row_changes("t", std::slice::from_ref(&pk1))
            .unwrap()
            .is_empty()
    );
    assert_eq!(d.db_version().unwrap(), v);
    // Replace: back to the given state.
    d.replace_rows("t", std::slice::from_ref(&pk1), &whole)
        .unwrap();
    assert_eq!(table(&d, "t"), ["1|'a2'|'b'", "2|'x'|'y'", "3|3|3"]);
    let cells = |v: Vec<tenantsync_core::Change>| {
        let mut v: Vec<_> = v
            .into_iter()
            .map(|c| (c.cid, c.col_version, c.site_id, c.val, c.cl))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(cells(d.row_changes("t", &[pk1]).unwrap()), cells(whole));
    let err = d.evict("nope", &[]).unwrap_err().to_string();
    assert!(err.contains("no CRR table \"nope\""), "{err}");
}
