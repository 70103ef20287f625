//! Whatever a client sends as a query, or an admin as a policy file, the
//! engine answers with a result or an error: it never panics.

mod common;

use proptest::prelude::*;
use proptest::sample::select;
use tenantsync_policy::PolicySet;

/// SQL-ish token soup: keywords, names, operators, literals, odd characters.
fn soup() -> impl Strategy<Value = String> {
    let token = select(vec![
        "SELECT",
        "*",
        "FROM",
        "todos",
        "lists",
        "members",
        "WHERE",
        "id",
        "owner",
        "=",
        "(",
        ")",
        ",",
        ";",
        "'x'",
        "'é''",
        "\"q\"",
        "1",
        "-",
        "9223372036854775808",
        "1e999",
        "NULL",
        "AND",
        "OR",
        "NOT",
        "IN",
        "LIKE",
        "ESCAPE",
        "BETWEEN",
        "CASE",
        "WHEN",
        "THEN",
        "END",
        "auth.uid()",
        "auth.claim(",
        "CREATE",
        "POLICY",
        "p",
        "ON",
        "FOR",
        "USING",
        "WITH",
        "CHECK",
        "TO",
        "AS",
        "RESTRICTIVE",
        "x'0'",
        "?",
        ":a",
        "$1",
        "--",
        "/*",
        "\n",
        "\t",
        "é",
        "ATTACH",
        "||",
        "%",
        "/",
        "IS",
        "DISTINCT",
        "coalesce(",
        "length(",
        "upper(",
    ]);
    prop::collection::vec(token, 0..30).prop_map(|t| t.join(" "))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn rewrite_never_panics(q in prop_oneof![soup(), any::<String>()]) {
        let engine = common::example_engine();
        let id = common::identity(r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#);
        let _ = engine.rewrite(&id, &q);
        let prefixed = format!("SELECT * FROM todos WHERE {q}");
        if let Ok(v) = engine.rewrite(&id, &prefixed) {
            prop_assert!(v.snapshot_sql.starts_with("SELECT "));
        }
    }

    #[test]
    fn policy_parsing_never_panics(p in prop_oneof![soup(), any::<String>()]) {
        let schema = common::example_schema();
        if let Err(d) = PolicySet::parse("p.sql", &p, &schema) {
            prop_assert!(!d.items.is_empty());
            let _ = d.to_string();
        }
        let wrapped = format!("CREATE POLICY p ON todos FOR SELECT USING ({p});");
        if let Err(d) = PolicySet::parse("p.sql", &wrapped, &schema) {
            // Every diagnostic points inside the file.
            for item in &d.items {
                prop_assert!(item.range.end <= wrapped.len());
                prop_assert!(item.line >= 1);
            }
            let _ = d.to_string();
        }
    }
}
