//! Tests of the `tenantsync` binary as outside tools use it: they run the real
//! executable and compare its stdout, stderr and exit code (docs/CLI.md is the
//! contract these tests pin down).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

mod bench;
mod demo;
mod serve;

/// A scratch directory holding one database file.
struct Scratch {
    _dir: TempDir,
    db: PathBuf,
}

fn scratch() -> Scratch {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("test.db");
    Scratch { _dir: dir, db }
}

fn tenantsync(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tenantsync"))
        .args(args)
        .output()
        .expect("run tenantsync")
}

fn sql(db: &Path, script: &str) -> Output {
    tenantsync(&["sql".as_ref(), db.as_os_str(), script.as_ref()])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

/// Runs `script`, expects success, exactly `expected` on stdout and nothing on
/// stderr.
#[track_caller]
fn check(db: &Path, script: &str, expected: &str) {
    let out = sql(db, script);
    assert_eq!(
        (out.status.code(), text(&out.stderr).as_str()),
        (Some(0), ""),
        "script {script:?}"
    );
    assert_eq!(text(&out.stdout), expected, "script {script:?}");
}

/// Runs `script`, expects exit code 1, nothing on stdout and a stderr that
/// contains every one of `expected`.
#[track_caller]
fn check_err(db: &Path, script: &str, expected: &[&str]) {
    let out = sql(db, script);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "script {script:?}: {stderr}");
    assert_eq!(text(&out.stdout), "", "script {script:?}");
    for e in expected {
        assert!(
            stderr.contains(e),
            "script {script:?}: stderr {stderr:?} lacks {e:?}"
        );
    }
    assert!(stderr.starts_with("error: "), "{stderr:?}");
}

#[test]
fn every_type_prints_in_the_value_encoding() {
    let s = scratch();
    let cases = [
        ("SELECT 1, -1, 0", "[1,-1,0]\n"),
        (
            "SELECT -9223372036854775808, 9223372036854775807, 9007199254740993",
            "[-9223372036854775808,9223372036854775807,9007199254740993]\n",
        ),
        ("SELECT 1.0, 2.5, -0.0, 0.1", "[1.0,2.5,-0.0,0.1]\n"),
        ("SELECT 1e300, 5e-324, 1e21", "[1e+300,5e-324,1e+21]\n"),
        (
            "SELECT 9e999, -9e999",
            r#"[{"real":"inf"},{"real":"-inf"}]"#,
        ),
        (
            "SELECT 'é日🦀', '', 'a\"b\\c', char(10)",
            "[\"é日🦀\",\"\",\"a\\\"b\\\\c\",\"\\n\"]\n",
        ),
        (
            "SELECT x'00FF10', x''",
            r#"[{"blob":"00ff10"},{"blob":""}]"#,
        ),
        ("SELECT NULL", "[null]\n"),
        (
            "SELECT CAST(1 AS REAL), typeof(CAST(1 AS REAL))",
            "[1.0,\"real\"]\n",
        ),
    ];
    for (script, expected) in cases {
        let expected = if expected.ends_with('\n') {
            expected.to_owned()
        } else {
            format!("{expected}\n")
        };
        check(&s.db, script, &expected);
    }
}

#[test]
fn reals_stored_as_integers_print_as_reals() {
    let s = scratch();
    check(
        &s.db,
        "CREATE TABLE r (x REAL, y); INSERT INTO r VALUES (1, 1.0), (2.5, 2); \
         SELECT x, typeof(x), y, typeof(y) FROM r ORDER BY x",
        "[1.0,\"real\",1.0,\"real\"]\n[2.5,\"real\",2,\"integer\"]\n",
    );
}

#[test]
fn the_last_statement_with_result_columns_decides_the_output() {
    let s = scratch();
    let cases = [
        (
            "CREATE TABLE t (a); INSERT INTO t VALUES (1), (2); SELECT a FROM t ORDER BY a; \
             SELECT count(*) FROM t; INSERT INTO t VALUES (3)",
            "[2]\n",
        ),
        ("SELECT a FROM t ORDER BY a", "[1]\n[2]\n[3]\n"),
        // A query that yields no rows still wins: nothing is printed.
        ("SELECT 1; SELECT a FROM t WHERE a > 100", ""),
        ("INSERT INTO t VALUES (4) RETURNING a, a * 2", "[4,8]\n"),
        ("DELETE FROM t WHERE a = 4", ""),
        ("", ""),
        ("  -- only a comment\n /* and another */ ;;", ""),
    ];
    for (script, expected) in cases {
        check(&s.db, script, expected);
    }
}

#[test]
fn statements_are_split_by_sqlite_not_by_semicolons() {
    let s = scratch();
    check(
        &s.db,
        "SELECT 'a;b' -- c;d\n; /* x; */ SELECT 'x;', \"y;\" FROM (SELECT 1 AS \"y;\")",
        "[\"x;\",1]\n",
    );
    check(
        &s.db,
        "CREATE TABLE t (a); CREATE TABLE log (x);
         CREATE TRIGGER tr AFTER INSERT ON t BEGIN
           INSERT INTO log VALUES (NEW.a);
           INSERT INTO log VALUES (NEW.a * 10);
         END;
         INSERT INTO t VALUES (2);
         SELECT x FROM log ORDER BY x;",
        "[2]\n[20]\n",
    );
    // A script may start with a comment: `--` there is SQL, not a flag.
    check(&s.db, "-- the whole schema file\nSELECT 7", "[7]\n");
}

#[test]
fn begin_commit_in_the_script() {
    let s = scratch();
    check(
        &s.db,
        "BEGIN; CREATE TABLE t (a); INSERT INTO t VALUES (1); COMMIT; SELECT a FROM t",
        "[1]\n",
    );
    check(&s.db, "SELECT a FROM t", "[1]\n");
    check(
        &s.db,
        "BEGIN; INSERT INTO t VALUES (2); ROLLBACK; INSERT INTO t VALUES (3); SELECT a FROM t ORDER BY a",
        "[1]\n[3]\n",
    );
    check(
        &s.db,
        "SAVEPOINT s; INSERT INTO t VALUES (4); RELEASE s; SELECT count(*) FROM t",
        "[3]\n",
    );
}

#[test]
fn errors_exit_1_and_roll_back() {
    let s = scratch();
    check(&s.db, "CREATE TABLE t (a PRIMARY KEY)", "");

    // Syntax error: the whole script (one implicit transaction) is undone.
    check_err(
        &s.db,
        "INSERT INTO t VALUES (1); SELEC 1",
        &[
            "statement 2 failed",
            "near \"SELEC\": syntax error",
            "rolled back",
        ],
    );
    check(&s.db, "SELECT count(*) FROM t", "[0]\n");

    // Constraint violation.
    check(&s.db, "INSERT INTO t VALUES (1)", "");
    check_err(
        &s.db,
        "INSERT INTO t VALUES (2); INSERT INTO t VALUES (1); INSERT INTO t VALUES (3)",
        &[
            "statement 2 failed",
            "UNIQUE constraint failed: t.a",
            "at line 1, column 27: INSERT INTO t VALUES (1);\n",
            "nothing was written",
        ],
    );
    check(&s.db, "SELECT a FROM t", "[1]\n");

    // Unknown table; the rows printed by earlier statements are not printed.
    check_err(
        &s.db,
        "SELECT a FROM t; SELECT * FROM nope",
        &["statement 2 failed", "no such table: nope"],
    );

    // Inside the script's own transaction: what ran before BEGIN was committed,
    // the open transaction is rolled back.
    check_err(
        &s.db,
        "INSERT INTO t VALUES (5); BEGIN; INSERT INTO t VALUES (6); INSERT INTO nope VALUES (1); COMMIT",
        &[
            "statement 4 failed",
            "no such table: nope",
            "open transaction was rolled back",
        ],
    );
    check(&s.db, "SELECT a FROM t ORDER BY a", "[1]\n[5]\n");

    // A script that leaves its transaction open is refused and rolled back.
    check_err(
        &s.db,
        "BEGIN; INSERT INTO t VALUES (7)",
        &["missing COMMIT", "rolled back"],
    );
    check(&s.db, "SELECT a FROM t ORDER BY a", "[1]\n[5]\n");

    // Text that is not UTF-8 cannot be printed as a JSON string.
    check_err(&s.db, "SELECT CAST(x'ff' AS TEXT)", &["not valid UTF-8"]);
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let s = scratch();
    let db = s.db.parent().unwrap().join("no/such/dir/x.db");
    let out = sql(&db, "SELECT 1");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot open database"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(!db.exists());
}

#[test]
fn usage_errors_exit_2() {
    let out = tenantsync(&["sql".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("<DB_PATH>"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_core_is_loaded_and_crsql_changes_prints_typed_rows() {
    let s = scratch();
    check(
        &s.db,
        "CREATE TABLE todos (id INTEGER PRIMARY KEY NOT NULL, title TEXT, done DEFAULT 0, w REAL);
         SELECT crsql_as_crr('todos')",
        "[\"OK\"]\n",
    );
    // One script = one transaction = one db_version; seq runs on within it;
    // a cell written twice keeps its last seq.
    check(
        &s.db,
        "INSERT INTO todos (id, title, w) VALUES (1, 'milk', 1), (2, 'bread', 2.5);
         UPDATE todos SET done = 1 WHERE id = 1;
         SELECT \"table\", hex(pk), cid, val, col_version, db_version, cl, seq
           FROM crsql_changes ORDER BY db_version, seq",
        concat!(
            "[\"todos\",\"010901\",\"title\",\"milk\",1,1,1,0]\n",
            "[\"todos\",\"010901\",\"w\",1.0,1,1,1,2]\n",
            "[\"todos\",\"010902\",\"title\",\"bread\",1,1,1,3]\n",
            "[\"todos\",\"010902\",\"done\",0,1,1,1,4]\n",
            "[\"todos\",\"010902\",\"w\",2.5,1,1,1,5]\n",
            "[\"todos\",\"010901\",\"done\",1,2,1,1,6]\n",
        ),
    );
    // Blobs (pk, site id) in the value encoding; the site id is the
    // database's own, stable across invocations.
    let site = sql(&s.db, "SELECT crsql_site_id()");
    let site = text(&site.stdout);
    assert!(
        site.starts_with("[{\"blob\":\"") && site.len() == "[{\"blob\":\"\"}]\n".len() + 32,
        "{site}"
    );
    check(
        &s.db,
        "SELECT pk, site_id FROM crsql_changes WHERE cid = 'title' AND pk = x'010902'",
        &format!("[{{\"blob\":\"010902\"}},{}", &site[1..]),
    );
    check(
        &s.db,
        "SELECT crsql_db_version(), crsql_pack_columns(1, 'a', 2.0, NULL, x'ff')",
        "[1,{\"blob\":\"0509010b0161024000000000000000050c01ff\"}]\n",
    );
    // A failed script leaves no clock behind either.
    check_err(
        &s.db,
        "UPDATE todos SET title = 'oat milk' WHERE id = 1; INSERT INTO todos (id) VALUES (1)",
        &["UNIQUE constraint failed: todos.id", "nothing was written"],
    );
    check(
        &s.db,
        "SELECT crsql_db_version(), (SELECT count(*) FROM crsql_changes WHERE db_version > 1), title FROM todos WHERE id = 1",
        "[1,0,\"milk\"]\n",
    );
}

#[test]
fn merges_through_sql_work() {
    let s = scratch();
    check(
        &s.db,
        "CREATE TABLE t (id PRIMARY KEY NOT NULL, v); SELECT crsql_as_crr('t');
         INSERT INTO crsql_changes VALUES ('t', x'010907', 'v', 2.0, 1, 5, x'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 1, 0);
         SELECT id, v, typeof(v), crsql_db_version() FROM t",
        // Inside the script's transaction crsql_db_version() is still the
        // committed version, as in cr-sqlite; the merge stamped 5.
        "[7,2.0,\"real\",0]\n",
    );
    check(&s.db, "SELECT crsql_db_version()", "[5]\n");
    check_err(
        &s.db,
        "UPDATE crsql_changes SET val = 1",
        &["statement 1 failed", "Only INSERT and SELECT"],
    );
}

#[test]
fn a_database_of_the_real_cr_sqlite_is_refused() {
    let s = scratch();
    // What the cr-sqlite extension records in every database it lays out.
    {
        let conn = rusqlite::Connection::open(&s.db).unwrap();
        conn.execute_batch(
            "CREATE TABLE crsql_master (key TEXT PRIMARY KEY, value ANY);
             INSERT INTO crsql_master VALUES ('crsqlite_version', 150000);",
        )
        .unwrap();
    }
    check_err(
        &s.db,
        "SELECT 1",
        &[
            "cannot open database",
            "laid out by the cr-sqlite extension",
        ],
    );
}
