//! Splitting an SQL script into statements by SQLite's own parser (its
//! tail pointer): [`next_statement`]. The one splitter of the project: the
//! CLI's `sql`, the server's schema script and the demo's seed use it, so a
//! `;` inside a string, a comment or a trigger body never splits.

use rusqlite::Connection;

/// The first statement of a script, as SQLite parsed it.
#[derive(Debug)]
pub struct NextStatement {
    /// Where the statement ends in the script (after its `;`, if any): the
    /// statement is `script[..end]`, the rest of the script `script[end..]`.
    pub end: usize,
    /// Whether SQLite prepares it on the connection (with the schema it has
    /// now); the error names what SQLite refused (syntax, an unknown table,
    /// a table that exists already...).
    pub prepared: rusqlite::Result<()>,
}

/// The first statement of `script` on `conn`: `None` when only blanks and
/// comments remain. A statement SQLite refuses still ends at the `;` that
/// completes it for SQLite's tokenizer (`sqlite3_complete`), or at the end
/// of the script when none does, so the rest of the script stays whole.
pub fn next_statement(conn: &Connection, script: &str) -> Option<NextStatement> {
    use std::ffi::{c_char, c_int};
    if script.trim().is_empty() {
        return None;
    }
    let Ok(len) = c_int::try_from(script.len()) else {
        return Some(NextStatement {
            end: script.len(),
            prepared: Err(rusqlite::Error::InvalidQuery),
        });
    };
    let mut stmt = std::ptr::null_mut();
    let mut tail: *const c_char = std::ptr::null();
    // SAFETY: the handle is valid while `conn` is borrowed and is used on
    // this thread only; `script` outlives the call and `len` is its exact
    // length (no NUL terminator needed); the statement (possibly NULL,
    // which sqlite3_finalize accepts) is finalized right away.
    let (rc, empty) = unsafe {
        let rc = rusqlite::ffi::sqlite3_prepare_v2(
            conn.handle(),
            script.as_ptr().cast(),
            len,
            &mut stmt,
            &mut tail,
        );
        let empty = stmt.is_null();
        rusqlite::ffi::sqlite3_finalize(stmt);
        (rc, empty)
    };
    let end = if tail.is_null() {
        script.len()
    } else {
        // SAFETY: SQLite sets `tail` to a point inside `script` or one past
        // its end (also when the prepare fails), so both pointers are in the
        // same allocation.
        let end = unsafe { tail.offset_from(script.as_ptr().cast::<c_char>()) };
        usize::try_from(end)
            .unwrap_or(script.len())
            .min(script.len())
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        if empty {
            // Only comments and blanks (or a lone `;`) up to `end`.
            return match end {
                0 => None,
                _ => next_statement(conn, &script[end..]).map(|n| NextStatement {
                    end: n.end + end,
                    prepared: n.prepared,
                }),
            };
        }
        return Some(NextStatement {
            end: end.max(1),
            prepared: Ok(()),
        });
    }
    // SQLite's parser stops at the first error, which may lie inside the
    // statement (`CREATE TABLE t` that exists stops after `t`): the
    // statement ends at the first `;` after which SQLite's own tokenizer
    // calls the text complete.
    let end = complete_end(script).unwrap_or(script.len());
    let prepared = match conn.prepare(&script[..end]) {
        Err(e) => Err(e),
        Ok(_) => Err(rusqlite::Error::InvalidQuery),
    };
    Some(NextStatement { end, prepared })
}

/// Where the first complete statement of `script` ends (after its `;`),
/// by `sqlite3_complete` (strings, comments and trigger bodies included);
/// `None` when no `;` completes one.
fn complete_end(script: &str) -> Option<usize> {
    script.match_indices(';').map(|(i, _)| i + 1).find(|&end| {
        std::ffi::CString::new(&script[..end]).is_ok_and(|text| {
            // SAFETY: `text` is NUL-terminated and outlives the call,
            // which only reads it.
            unsafe { rusqlite::ffi::sqlite3_complete(text.as_ptr()) != 0 }
        })
    })
}

/// Every statement of `script` prepared on `conn` without running any:
/// their texts (trimmed), or the first statement SQLite refuses. For
/// scripts whose statements do not depend on each other's effects (a
/// seed of rows on an existing schema); a schema script is run statement
/// by statement with [`next_statement`] instead.
pub fn split(conn: &Connection, script: &str) -> Result<Vec<String>, rusqlite::Error> {
    let mut out = Vec::new();
    let mut rest = script;
    while let Some(n) = next_statement(conn, rest) {
        n.prepared?;
        out.push(rest[..n.end].trim().to_owned());
        rest = &rest[n.end..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statements(conn: &Connection, script: &str) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let mut rest = script;
        while let Some(n) = next_statement(conn, rest) {
            out.push((rest[..n.end].trim().to_owned(), n.prepared.is_ok()));
            if n.prepared.is_ok() {
                conn.execute_batch(&rest[..n.end]).unwrap();
            }
            rest = &rest[n.end..];
        }
        out
    }

    #[test]
    fn semicolons_in_strings_comments_and_triggers_do_not_split() {
        let conn = Connection::open_in_memory().unwrap();
        let script = "-- a; comment\nCREATE TABLE t (a TEXT DEFAULT ';');\n/* b; */ CREATE TABLE \"x;y\" (b);\n\
                      CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'x;'; DELETE FROM t; END;\n\
                      INSERT INTO t VALUES ('1;2')\n-- the end;\n";
        let got = statements(&conn, script);
        assert_eq!(
            got,
            vec![
                ("-- a; comment\nCREATE TABLE t (a TEXT DEFAULT ';');".to_owned(), true),
                ("/* b; */ CREATE TABLE \"x;y\" (b);".to_owned(), true),
                (
                    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'x;'; DELETE FROM t; END;"
                        .to_owned(),
                    true
                ),
                ("INSERT INTO t VALUES ('1;2')\n-- the end;".to_owned(), true),
            ]
        );
    }

    #[test]
    fn a_refused_statement_still_ends_at_its_semicolon() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a)").unwrap();
        let script = "CREATE TABLE t (a); SELECT * FROM nowhere; SELECT 1;";
        let got = statements(&conn, script);
        assert_eq!(
            got,
            vec![
                ("CREATE TABLE t (a);".to_owned(), false),
                ("SELECT * FROM nowhere;".to_owned(), false),
                ("SELECT 1;".to_owned(), true),
            ]
        );
        let e = next_statement(&conn, script).unwrap().prepared.unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert!(next_statement(&conn, " ; -- nothing\n/* more */").is_none());
        assert_eq!(
            split(
                &conn,
                "INSERT INTO t VALUES (1); INSERT INTO t VALUES (';')"
            )
            .unwrap(),
            ["INSERT INTO t VALUES (1);", "INSERT INTO t VALUES (';')"]
        );
    }
}
