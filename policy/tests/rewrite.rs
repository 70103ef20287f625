//! Rewriting subscriptions: the effective SQL and parameters, view keys,
//! index covers, memberships, and every refusal.

mod common;

use common::{example_engine, identity};
use rusqlite::functions::FunctionFlags;
use tenantsync_policy::{Engine, IndexAtom, IndexKey, QueryError};
use tenantsync_types::Value;

const ALICE: &str = r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#;

fn show(engine: &Engine, claims: &str, query: &str) -> String {
    match engine.rewrite(&identity(claims), query) {
        Ok(q) => {
            let mut s = format!(
                "snapshot: {}\nparams: {}\n",
                q.snapshot_sql,
                serde_json::to_string(&q.params).unwrap()
            );
            for m in &q.memberships {
                s.push_str(&format!(
                    "membership {} (direct: {}): {} {}\n",
                    m.id.0,
                    m.direct,
                    m.sql,
                    serde_json::to_string(&m.params).unwrap()
                ));
            }
            s.push_str(&format!("cover: {:?}", q.index_cover));
            s
        }
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn per_owner_and_membership_policies_combine() {
    insta::assert_snapshot!(show(
        &example_engine(),
        ALICE,
        "SELECT * FROM todos WHERE list_id = 7"
    ));
}

#[test]
fn the_query_where_cannot_escape_the_policy() {
    // The precedence trap: the query's OR stays inside its parentheses.
    insta::assert_snapshot!(show(
        &example_engine(),
        ALICE,
        "select id, title from todos where 1=1 or tenant_id = 'other'"
    ));
}

#[test]
fn claims_are_parameters_never_sql() {
    let evil =
        r#"{"sub":"x' OR 1=1 --","role":"authenticated","tenant_id":"t1'); DROP TABLE todos; --"}"#;
    let q = example_engine()
        .rewrite(&identity(evil), "SELECT * FROM lists")
        .unwrap();
    assert!(!q.snapshot_sql.contains("DROP"), "{}", q.snapshot_sql);
    assert!(!q.snapshot_sql.contains("OR 1=1"), "{}", q.snapshot_sql);
    assert!(
        q.params
            .contains(&Value::Text("t1'); DROP TABLE todos; --".into()))
    );
    insta::assert_snapshot!(q.snapshot_sql);
}

#[test]
fn roles_without_policies_get_nothing() {
    insta::assert_snapshot!(show(
        &example_engine(),
        r#"{"sub":"bob","role":"anon","tenant_id":"t1"}"#,
        "SELECT * FROM lists"
    ), @r#"
    snapshot: SELECT "id", "tenant_id", "owner", "name" FROM "lists" WHERE 0
    params: []
    cover: Some([])
    "#);
}

#[test]
fn missing_claims_are_null() {
    let q = example_engine()
        .rewrite(
            &identity(r#"{"role":"authenticated"}"#),
            "SELECT * FROM lists",
        )
        .unwrap();
    assert!(q.params.iter().all(Value::is_null), "{:?}", q.params);
    assert_eq!(q.index_cover, Some(vec![]));
}

#[test]
fn delta_sql_joins_changes_to_rows_by_pk() {
    let q = example_engine()
        .rewrite(
            &identity(ALICE),
            "SELECT * FROM members WHERE user_id = 'bob'",
        )
        .unwrap();
    insta::assert_snapshot!(q.delta_sql);
    assert_eq!(q.delta_since_param, q.params.len() + 1);
    assert_eq!(q.snapshot_columns, ["list_id", "user_id", "tenant_id"]);
}

#[test]
fn selected_columns_come_after_missing_pk_columns() {
    let q = example_engine()
        .rewrite(&identity(ALICE), "SELECT title, done FROM todos")
        .unwrap();
    assert_eq!(q.columns, ["title", "done"]);
    assert_eq!(q.snapshot_columns, ["id", "title", "done"]);
}

#[test]
fn every_generated_sql_prepares_on_sqlite() {
    let (conn, _) = common::database(common::EXAMPLE_SCHEMA);
    // Stand-ins for core's vtab and function, so the delta SQL can be prepared.
    conn.execute_batch(
        "CREATE TABLE crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq)",
    )
    .unwrap();
    conn.create_scalar_function("tenantsync_pk_value", 2, FunctionFlags::SQLITE_UTF8, |_| {
        Ok(0)
    })
    .unwrap();
    let engine = example_engine();
    for query in [
        "SELECT * FROM todos",
        "SELECT * FROM todos WHERE list_id IN (1, 2) AND title LIKE 'a%'",
        "SELECT * FROM members",
        "SELECT name FROM lists WHERE owner = auth.uid()",
    ] {
        let q = engine.rewrite(&identity(ALICE), query).unwrap();
        common::query(&conn, &q.snapshot_sql, &q.params);
        let mut delta_params = q.params.clone();
        delta_params.push(Value::Integer(0));
        common::query(&conn, &q.delta_sql, &delta_params);
        for m in &q.memberships {
            common::query(&conn, &m.sql, &m.params);
        }
    }
}

#[test]
fn equal_meaning_gives_equal_keys() {
    let engine = example_engine();
    let key = |claims: &str, q: &str| engine.rewrite(&identity(claims), q).unwrap().key;
    let a = key(ALICE, "SELECT * FROM todos WHERE list_id = 7");
    assert_eq!(a, key(ALICE, "select   *\nfrom TODOS where (LIST_ID = 7)"));
    assert_eq!(
        a,
        key(ALICE, "SELECT * FROM todos AS t WHERE t.list_id = 7")
    );
    // Another user with the same claims that matter shares nothing here:
    // the policies use `sub`, so the parameters differ.
    let bob = r#"{"sub":"bob","role":"authenticated","tenant_id":"t1"}"#;
    assert_ne!(a, key(bob, "SELECT * FROM todos WHERE list_id = 7"));
    assert_ne!(a, key(ALICE, "SELECT * FROM todos WHERE list_id = 8"));
    assert_ne!(a, key(ALICE, "SELECT id FROM todos WHERE list_id = 7"));
    // Claims the policies do not read do not split views.
    let alice2 = r#"{"sub":"alice","role":"authenticated","tenant_id":"t1","iat":123}"#;
    assert_eq!(a, key(alice2, "SELECT * FROM todos WHERE list_id = 7"));
}

#[test]
fn index_cover_follows_and_or() {
    let engine = example_engine();
    let cover = |q: &str| engine.rewrite(&identity(ALICE), q).unwrap().index_cover;
    // AND picks the side with fewer atoms: the query's `id = 5`.
    assert_eq!(
        cover("SELECT * FROM lists WHERE id = 5"),
        Some(vec![IndexAtom::Eq {
            column: 0,
            value: IndexKey::Int(5)
        }])
    );
    // Column affinity is applied to the value: INTEGER id vs text '5'.
    assert_eq!(
        cover("SELECT * FROM lists WHERE id = '5'"),
        Some(vec![IndexAtom::Eq {
            column: 0,
            value: IndexKey::Int(5)
        }])
    );
    // OR needs both sides: `name LIKE` has no cover, so the policy's
    // (tenant_id = 't1' OR owner = 'alice') is the cover.
    assert_eq!(
        cover("SELECT * FROM lists WHERE id IN (1, 2) OR name LIKE 'x%'"),
        Some(vec![
            IndexAtom::Eq {
                column: 1,
                value: IndexKey::Text("t1".into())
            },
            IndexAtom::Eq {
                column: 2,
                value: IndexKey::Text("alice".into())
            }
        ])
    );
    // Both sides of an OR covered: the union (a policy `USING (true)` has
    // no cover, so the query's is taken).
    let open = common::engine(
        &common::example_schema(),
        "CREATE POLICY p ON lists FOR SELECT USING (true);",
    );
    let q = open
        .rewrite(
            &identity(ALICE),
            "SELECT * FROM lists WHERE id IN (1, 2) OR id = 3",
        )
        .unwrap();
    assert_eq!(q.index_cover.map(|c| c.len()), Some(3));
    let q = open
        .rewrite(
            &identity(ALICE),
            "SELECT * FROM lists WHERE id IN (1, 2) OR name = 'x' OR id > 3",
        )
        .unwrap();
    assert_eq!(q.index_cover, None);
}

/// Every top-level AND term with a cover is an alternative: a server
/// indexing thousands of views picks the one least shared (the tenant's
/// `tenant_id = 't1'` rather than every tenant's `done = 0`).
#[test]
fn each_covered_and_term_is_an_alternative() {
    let engine = example_engine();
    let q = engine
        .rewrite(&identity(ALICE), "SELECT * FROM todos WHERE done = 0")
        .unwrap();
    let eq = |column: usize, value: IndexKey| IndexAtom::Eq { column, value };
    assert!(
        q.index_covers.contains(&vec![eq(5, IndexKey::Int(0))]),
        "{:?}",
        q.index_covers
    );
    assert!(
        q.index_covers
            .contains(&vec![eq(1, IndexKey::Text("t1".into()))]),
        "{:?}",
        q.index_covers
    );
    assert!(q.index_covers.iter().all(|c| !c.is_empty()));
    assert_eq!(
        q.index_cover.as_ref().map(Vec::len),
        q.index_covers.iter().map(Vec::len).min()
    );
}

fn refused(query: &str) -> String {
    match example_engine().rewrite(&identity(ALICE), query) {
        Ok(q) => panic!("{query} was accepted: {}", q.snapshot_sql),
        Err(e) => e.to_string(),
    }
}

#[test]
fn refusals_are_clear_errors() {
    let cases = [
        "SELECT * FROM todos; SELECT * FROM lists",
        "DELETE FROM todos",
        "INSERT INTO todos (id) VALUES (1)",
        "UPDATE todos SET done = 1",
        "ATTACH DATABASE 'x.db' AS x",
        "PRAGMA table_info(todos)",
        "-- why not\nVACUUM",
        "SELECT * FROM todos__crsql_clock",
        "SELECT * FROM sqlite_master",
        "SELECT * FROM crsql_changes",
        "SELECT * FROM local_settings",
        "SELECT * FROM nope",
        "SELECT * FROM todos WHERE random() > 0",
        "SELECT * FROM todos WHERE load_extension('evil')",
        "SELECT * FROM todos, lists",
        "SELECT * FROM todos JOIN lists ON todos.list_id = lists.id",
        "SELECT count(*) FROM todos",
        "SELECT * FROM todos ORDER BY id LIMIT 10",
        "SELECT * FROM todos UNION SELECT * FROM todos",
        "SELECT * FROM todos WHERE id = ?",
        "SELECT * FROM todos WHERE nope = 1",
        "SELECT * FROM todos WHERE list_id IN (SELECT list_id FROM todos__crsql_clock)",
        "SELECT * FROM todos WHERE",
        "",
        "SELEC * FROM todos",
        "SELECT * FROM todos WHERE title = \"x\"",
        "SELECT * FROM todos WHERE title GLOB 'a*'",
    ];
    let out: Vec<String> = cases
        .iter()
        .map(|q| format!("{q:?}\n  -> {}", refused(q)))
        .collect();
    insta::assert_snapshot!(out.join("\n"));
}

#[test]
fn sqlite_spellings_are_accepted() {
    let engine = example_engine();
    let sql = |q: &str| engine.rewrite(&identity(ALICE), q).unwrap().snapshot_sql;
    let is =
        sql("SELECT * FROM todos WHERE done IS 1 AND priority IS NOT NULL AND owner IS NOT 'bob'");
    assert_eq!(
        is,
        sql(
            "SELECT * FROM todos WHERE done IS NOT DISTINCT FROM 1 AND priority IS NOT NULL AND owner IS DISTINCT FROM 'bob'"
        )
    );
    assert_eq!(
        sql("SELECT * FROM todos WHERE done == 1"),
        sql("SELECT * FROM todos WHERE done = 1")
    );
    assert_eq!(sql("SELECT * FROM main.todos"), sql("SELECT * FROM todos"));
    // As in SQLite, -9223372036854775808 is the INTEGER i64::MIN, not a REAL.
    let q = engine
        .rewrite(
            &identity(ALICE),
            "SELECT * FROM todos WHERE priority > -9223372036854775808",
        )
        .unwrap();
    assert_eq!(q.params[0], Value::Integer(i64::MIN));
}

#[test]
fn syntax_errors_carry_a_position() {
    match example_engine().rewrite(&identity(ALICE), "SELECT * FROM todos WHERE (id = 1") {
        Err(QueryError::Syntax { line, column, .. }) => assert_eq!((line, column), (1, 34)),
        other => panic!("{other:?}"),
    }
}
