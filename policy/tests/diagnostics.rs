//! The policy-file table: valid files load, invalid ones report every problem
//! as `<file>:<line>:<col>: <message>` with the offending text underlined.

mod common;

use tenantsync_policy::PolicySet;

/// Loads `policy` against the example schema: "ok" or the rendered diagnostics.
fn check(policy: &str) -> String {
    match PolicySet::parse("policy.sql", policy, &common::example_schema()) {
        Ok(set) => format!("ok: {} policies", set.policies().len()),
        Err(d) => d.to_string(),
    }
}

#[test]
fn the_example_policy_is_valid() {
    insta::assert_snapshot!(check(common::EXAMPLE_POLICY), @"ok: 10 policies");
}

#[test]
fn valid_files() {
    let cases = [
        "",
        "-- only a comment\n",
        "CREATE POLICY p ON todos USING (true);",
        "CREATE POLICY p ON todos FOR SELECT USING (owner = auth.uid())",
        "CREATE POLICY p ON todos AS RESTRICTIVE FOR SELECT TO public USING (tenant_id = auth.claim('tenant_id'));",
        "CREATE POLICY p ON todos FOR INSERT TO a, b WITH CHECK (priority BETWEEN 1 AND 5 AND title LIKE 'x%' ESCAPE '!');",
        "CREATE POLICY p ON todos FOR UPDATE USING (coalesce(owner, '') = lower(auth.uid())) WITH CHECK (length(title) < 100);",
        "CREATE POLICY p ON todos FOR SELECT USING (CASE WHEN done = 1 THEN priority > 2 ELSE owner IS NOT NULL END);",
        "CREATE POLICY p ON todos FOR SELECT USING (todos.id % 2 = 0 OR -priority < 3 OR title || 'x' = 'ax');",
        "CREATE POLICY p ON todos FOR DELETE USING (list_id IN (1, 2, 3) AND owner NOT IN ('a'));",
    ];
    for c in cases {
        assert!(check(c).starts_with("ok"), "{c}\n{}", check(c));
    }
}

#[test]
fn unknown_names() {
    insta::assert_snapshot!(check(
        "CREATE POLICY p ON todo FOR SELECT USING (owner = auth.uid());\n\
         CREATE POLICY q ON todos FOR SELECT USING (ownr = auth.uid() AND tenant = 'x');\n"
    ));
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    insta::assert_snapshot!(check(
        "CREATE POLICY a ON todos FOR SELECT USING (random() > 0);\n\
         CREATE POLICY b ON todos FOR SELECT USING (load_extension('x') IS NULL);\n\
         CREATE POLICY c ON todos FOR SELECT USING (upper(title, 1) = 'A');\n\
         CREATE POLICY d ON todos FOR SELECT USING (auth.claim(owner) = 'x');\n\
         CREATE POLICY e ON todos FOR SELECT USING (title ~ 'x');\n\
         CREATE POLICY f ON todos FOR SELECT USING (CAST(priority AS TEXT) = '1');\n"
    ));
}

#[test]
fn tables_that_cannot_carry_policies() {
    insta::assert_snapshot!(check(
        "CREATE POLICY a ON local_settings FOR SELECT USING (true);\n\
         CREATE POLICY b ON todos__crsql_clock FOR SELECT USING (true);\n\
         CREATE POLICY c ON sqlite_master FOR SELECT USING (true);\n\
         CREATE POLICY d ON other.todos FOR SELECT USING (true);\n"
    ));
}

#[test]
fn clauses_each_command_takes() {
    insta::assert_snapshot!(check(
        "CREATE POLICY a ON todos FOR SELECT USING (true) WITH CHECK (true);\n\
         CREATE POLICY b ON todos FOR INSERT USING (true);\n\
         CREATE POLICY c ON todos FOR DELETE WITH CHECK (true);\n\
         CREATE POLICY d ON todos FOR UPDATE WITH CHECK (true);\n\
         CREATE POLICY e ON todos FOR SELECT USING (true);\n\
         CREATE POLICY e ON todos FOR SELECT USING (false);\n\
         CREATE POLICY f ON todos FOR SELECT TO CURRENT_USER USING (true);\n"
    ));
}

#[test]
fn syntax_errors_and_other_statements() {
    insta::assert_snapshot!(check(
        "CREATE POLICY a ON todos FOR SELECT USING (owner = );\n\
         DROP TABLE todos;\n\
         CREATE POLICY b ON todos FOR SELECT USING (ownr = 1);\n\
         ATTACH DATABASE 'x.db' AS x;\n"
    ));
}

#[test]
fn subqueries_are_uncorrelated_and_over_crrs() {
    insta::assert_snapshot!(check(
        "CREATE POLICY a ON todos FOR SELECT USING (list_id IN (SELECT id FROM lists WHERE lists.owner = todos.owner));\n\
         CREATE POLICY b ON todos FOR SELECT USING (list_id IN (SELECT id, owner FROM lists));\n\
         CREATE POLICY c ON todos FOR SELECT USING (list_id IN (SELECT key FROM local_settings));\n\
         CREATE POLICY d ON todos FOR SELECT USING (EXISTS (SELECT 1 FROM lists));\n\
         CREATE POLICY e ON todos FOR SELECT USING (list_id IN (SELECT id FROM lists ORDER BY id LIMIT 1));\n"
    ));
}

#[test]
fn cycles_through_subqueries_are_refused() {
    insta::assert_snapshot!(check(
        "CREATE POLICY a ON lists FOR SELECT USING (id IN (SELECT list_id FROM members WHERE user_id = auth.uid()));\n\
         CREATE POLICY b ON members FOR SELECT USING (list_id IN (SELECT id FROM lists WHERE owner = auth.uid()));\n\
         CREATE POLICY c ON todos FOR SELECT USING (id IN (SELECT id FROM todos WHERE owner = auth.uid()));\n\
         -- A write policy reading its own table is fine: reading applies SELECT policies only.\n\
         CREATE POLICY d ON todos FOR INSERT WITH CHECK (list_id IN (SELECT list_id FROM todos));\n"
    ));
}
