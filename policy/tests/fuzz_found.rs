//! Bugs the fuzzers (fuzz/, docs/TESTING.md "Fuzzing") found, one test each,
//! stated as what the engine must do. Their inputs are replayed too from
//! fuzz/regressions/.

mod common;

use common::{example_engine, example_schema, identity};
use tenantsync_policy::PolicySet;

const ALICE: &str = r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#;

/// `X'..'` with a multi-byte character among its digits sliced a string
/// inside a character and panicked (policy files and subscription queries).
#[test]
fn blob_literals_with_non_hex_characters_are_refused() {
    let err = example_engine()
        .rewrite(&identity(ALICE), "SELECT * FROM todos WHERE title = X'0é0'")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "refused: 1:35: X'0é0' is not a blob literal: it may hold only hex digits (0-9, a-f, A-F)"
    );
    let d = PolicySet::parse(
        "p.sql",
        "CREATE POLICY p ON todos FOR SELECT USING (title <> x'é00');",
        &example_schema(),
    )
    .unwrap_err();
    assert_eq!(
        d.summary_lines(),
        ["p.sql:1:53: X'é00' is not a blob literal: it may hold only hex digits (0-9, a-f, A-F)"]
    );
    // Odd counts keep their own reason.
    let err = example_engine()
        .rewrite(&identity(ALICE), "SELECT * FROM todos WHERE title = X'abc'")
        .unwrap_err();
    assert!(
        err.to_string().contains("an even number of hex digits"),
        "{err}"
    );
}

/// `ESCAPE '<NUL>'` was accepted, and the SQL it gave failed in SQLite
/// ("ESCAPE expression must be a single character": SQLite sees NUL as the
/// end of the text).
#[test]
fn a_nul_escape_character_is_refused() {
    let err = example_engine()
        .rewrite(
            &identity(ALICE),
            "SELECT * FROM todos WHERE title LIKE 'a%' ESCAPE '\0'",
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "refused: 1:50: ESCAPE cannot be the NUL character"
    );
}

/// Runs `f` on a thread with a tokio worker's stack (2 MiB).
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

/// `a = 1 OR a = 2 OR ...` a thousand terms long (ten kilobytes) overflowed
/// a 2 MiB stack and aborted the process: sqlparser builds such chains as
/// trees as deep as they are long, and everything after it recurses.
#[test]
fn deeply_nested_queries_and_policies_are_refused_not_a_stack_overflow() {
    let deep_or = format!(
        "SELECT * FROM todos WHERE {}id = 0",
        "id = 1 OR ".repeat(20_000)
    );
    let deep_plus = format!("SELECT * FROM todos WHERE id = 1{}", " + 1".repeat(20_000));
    for q in [deep_or, deep_plus] {
        let err = on_small_stack(move || {
            example_engine()
                .rewrite(&identity(ALICE), &q)
                .unwrap_err()
                .to_string()
        });
        assert!(err.contains("the statement is too complex"), "{err}");
    }
    let policy = format!(
        "CREATE POLICY p ON todos FOR SELECT USING ({}true);",
        "owner = 'x' OR ".repeat(20_000)
    );
    let lines = on_small_stack(move || {
        PolicySet::parse("p.sql", &policy, &example_schema())
            .unwrap_err()
            .summary_lines()
    });
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("p.sql:1:"), "{lines:?}");
    assert!(lines[0].contains("too complex"), "{lines:?}");
}

/// The most complex query and policies the limit lets through still work on
/// a 2 MiB stack, evaluated and printed, in a debug build.
#[test]
fn the_most_complex_accepted_statements_fit_a_small_stack() {
    let query = format!(
        "SELECT * FROM todos WHERE {}id = 0",
        "id = 1 OR ".repeat(125)
    );
    let policy = format!(
        "CREATE POLICY p ON todos FOR SELECT USING ({}true);\n\
         CREATE POLICY q ON todos AS RESTRICTIVE FOR SELECT USING ({}true);",
        "priority + 1 > 2 OR ".repeat(60),
        "(((((owner || 'x' = 'y'))))) OR ".repeat(40),
    );
    let visible = on_small_stack(move || {
        let schema = example_schema();
        let engine = common::engine(&schema, &policy);
        let q = engine.rewrite(&identity(ALICE), &query).unwrap();
        let ms = tenantsync_policy::MembershipResults::new();
        let row = [1, 0, 0, 0, 0, 0, 3].map(tenantsync_types::Value::Integer);
        (q.matches(&row, &ms), q.snapshot_sql.len() > 1000)
    });
    assert_eq!(visible, (true, true));
}
