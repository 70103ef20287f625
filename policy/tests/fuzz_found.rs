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
