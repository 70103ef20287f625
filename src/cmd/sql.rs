//! `tenantsync sql <DB_PATH> <SQL>`: run an SQL script against a database with
//! the tenantsync core loaded and print the rows of its last query as JSON
//! lines. The contract (output, transactions, errors, exit codes) is
//! docs/CLI.md; this file implements exactly that.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use tenantsync_types::Value;

/// Arguments of `tenantsync sql`.
#[derive(clap::Args, Debug)]
pub struct SqlArgs {
    /// Database file; created (with the core's tables) if it does not exist.
    /// Its directory must exist.
    pub db_path: PathBuf,
    /// One or more SQL statements separated by `;` (BEGIN/COMMIT allowed).
    /// May start with `-` (an SQL comment `-- ...` is a script, not a flag).
    #[arg(allow_hyphen_values = true)]
    pub sql: String,
}

/// Why `tenantsync sql` failed: the message printed to stderr.
#[derive(Debug)]
pub enum SqlError {
    /// The database could not be opened.
    Open { path: PathBuf, reason: String },
    /// Statement `index` (1-based) could not be prepared or run.
    Statement {
        index: usize,
        /// The statement's text; for a statement SQLite could not parse, the
        /// script from that statement on.
        sql: String,
        /// (line, column), both 1-based, in the script where SQLite reports
        /// the error, when it does (parse errors).
        at: Option<(usize, usize)>,
        message: String,
        rolled_back: RolledBack,
    },
    /// The script ended inside a transaction it opened.
    Unterminated { rolled_back: RolledBack },
    /// The final COMMIT of the script's implicit transaction failed.
    Commit { message: String },
}

/// What an error undid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RolledBack {
    /// No transaction was open.
    Nothing,
    /// The script's implicit transaction: nothing of the script was written.
    Script,
    /// The transaction the script had opened; statements the script committed
    /// before it stay.
    OpenTransaction,
}

impl fmt::Display for RolledBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RolledBack::Nothing => Ok(()),
            RolledBack::Script => {
                f.write_str("\n  the script's transaction was rolled back: nothing was written")
            }
            RolledBack::OpenTransaction => f.write_str(
                "\n  the open transaction was rolled back; what the script committed before it stays",
            ),
        }
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SqlError::Open { path, reason } => {
                write!(f, "cannot open database {}: {reason}", path.display())
            }
            SqlError::Statement {
                index,
                sql,
                at,
                message,
                rolled_back,
            } => {
                write!(f, "statement {index} failed: {message}")?;
                match at {
                    Some((line, col)) => {
                        write!(f, "\n  at line {line}, column {col}: {}", snippet(sql))?
                    }
                    None => write!(f, "\n  statement: {}", snippet(sql))?,
                }
                write!(f, "{rolled_back}")
            }
            SqlError::Unterminated { rolled_back } => write!(
                f,
                "the script ended inside a transaction it opened (missing COMMIT){rolled_back}"
            ),
            SqlError::Commit { message } => write!(
                f,
                "COMMIT of the script's transaction failed: {message}{}",
                RolledBack::Script
            ),
        }
    }
}

impl std::error::Error for SqlError {}

/// The statement text for an error message: trimmed, on one line, at most
/// 200 characters.
fn snippet(sql: &str) -> String {
    let one_line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &one_line[..cut]),
        None => one_line,
    }
}

/// Runs the command: opens the database, runs the script, prints the rows.
pub fn run(args: &SqlArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let conn = open(&args.db_path)?;
    let rows = run_script(conn.conn(), &args.sql)?;
    for row in rows {
        serde_json::to_writer(&mut *out, &row)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Opens (creating if needed) the database with the core installed.
pub fn open(path: &Path) -> Result<tenantsync_core::CrrConnection, SqlError> {
    tenantsync_core::CrrConnection::open(path).map_err(|e| {
        let mut reason = e.to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            reason.push_str(&format!(" (directory {} does not exist)", dir.display()));
        }
        SqlError::Open {
            path: path.to_owned(),
            reason,
        }
    })
}

/// How a statement interacts with the implicit transaction.
#[derive(Debug, PartialEq)]
enum Kind {
    /// Ordinary: may run inside the implicit transaction.
    Plain,
    /// BEGIN/COMMIT/END/ROLLBACK/SAVEPOINT/RELEASE, or a statement SQLite
    /// refuses inside a transaction (VACUUM, ATTACH, DETACH): from here on the
    /// script manages its own transactions.
    TakesOver,
}

/// The first keyword of a statement, upper-cased (comments and whitespace
/// skipped).
fn first_keyword(sql: &str) -> String {
    let mut s = sql;
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    s.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

fn kind(sql: &str) -> Kind {
    match first_keyword(sql).as_str() {
        "BEGIN" | "COMMIT" | "END" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" | "VACUUM" | "ATTACH"
        | "DETACH" => Kind::TakesOver,
        _ => Kind::Plain,
    }
}

/// Runs every statement of `sql` in order (split by SQLite's own parser, so
/// strings, comments and `CREATE TRIGGER ... BEGIN ...; END` stay whole) and
/// returns the rows of the last statement that has result columns.
///
/// Transactions (docs/CLI.md): a script without transaction control runs as
/// one transaction, all or nothing. From its first transaction-control
/// statement on, the script manages transactions itself: what ran before is
/// committed, then statements run as written. On an error the transaction
/// open at that moment is rolled back. A script that ends inside its own
/// transaction is an error (rolled back).
pub fn run_script(conn: &Connection, sql: &str) -> Result<Vec<Vec<Value>>, SqlError> {
    let mut implicit = false; // our BEGIN is open
    let mut managed = false; // the script manages transactions
    let mut rows: Vec<Vec<Value>> = Vec::new();
    let mut pos = 0; // byte offset in `sql` where the next statement starts
    let mut index = 0; // 1-based number of the current statement
    // Rolls back whatever transaction is open (after an error); says what
    // that undid. `was_open`: a transaction was open before the failing
    // statement (SQLite may have rolled it back itself already).
    let rollback = |implicit: bool, was_open: bool| -> RolledBack {
        let open = !conn.is_autocommit();
        if open {
            // A failing ROLLBACK leaves nothing better to do: the connection
            // is closed right after, which rolls back as well.
            let _ = conn.execute_batch("ROLLBACK");
        }
        match (open || was_open, implicit) {
            (false, _) => RolledBack::Nothing,
            (true, true) => RolledBack::Script,
            (true, false) => RolledBack::OpenTransaction,
        }
    };
    loop {
        let rest = &sql[pos..];
        let was_open = !conn.is_autocommit();
        let prepared = match tenantsync_core::script::next_statement(conn, rest) {
            None => Ok(None),
            Some(n) => n
                .prepared
                .and_then(|()| match conn.prepare(&rest[..n.end]) {
                    Ok(stmt) => Ok(Some((n.end, Some(stmt)))),
                    // Only comments and whitespace up to a `;`.
                    Err(rusqlite::Error::Empty) => Ok(Some((n.end, None))),
                    Err(e) => Err(e),
                }),
        };
        let (end, mut stmt) = match prepared {
            Ok(None) => break,
            Ok(Some((end, None))) => {
                pos += end;
                continue;
            }
            Ok(Some((end, Some(stmt)))) => (end, stmt),
            Err(e) => {
                let (at, message) = describe_prepare_error(sql, pos, &e);
                return Err(SqlError::Statement {
                    index: index + 1,
                    sql: rest.trim_start().to_owned(),
                    at: Some(at),
                    message,
                    rolled_back: rollback(implicit, was_open),
                });
            }
        };
        index += 1;
        let text = rest[..end].trim_start();
        let start = line_col(sql, pos + (end - rest[..end].trim_start().len()));
        pos += end;
        let fail = |message: String, implicit: bool, was_open: bool| SqlError::Statement {
            index,
            sql: text.to_owned(),
            at: Some(start),
            message,
            rolled_back: rollback(implicit, was_open),
        };
        if !managed && kind(text) == Kind::TakesOver {
            managed = true;
            if implicit {
                implicit = false;
                if let Err(e) = conn.execute_batch("COMMIT") {
                    let message = format!(
                        "committing the statements before it failed: {}",
                        describe(&e)
                    );
                    return Err(fail(message, true, true));
                }
            }
        }
        if !managed && !implicit {
            if let Err(e) = conn.execute_batch("BEGIN") {
                let message = format!("BEGIN of the script's transaction failed: {}", describe(&e));
                return Err(fail(message, false, false));
            }
            implicit = true;
        }
        let was_open = !conn.is_autocommit();
        let n = stmt.column_count();
        let result = (|| -> Result<Vec<Vec<Value>>, String> {
            let mut out = Vec::new();
            let mut q = stmt.raw_query();
            while let Some(row) = q.next().map_err(|e| describe(&e))? {
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    let v = row.get_ref(i).map_err(|e| describe(&e))?;
                    values.push(Value::try_from(v).map_err(|_| {
                        format!(
                            "column {} of row {} is TEXT that is not valid UTF-8; \
                             select it as a BLOB (CAST(x AS BLOB)) to print it",
                            i + 1,
                            out.len() + 1
                        )
                    })?);
                }
                out.push(values);
            }
            Ok(out)
        })();
        drop(stmt);
        match result {
            Ok(r) if n > 0 => rows = r,
            Ok(_) => {}
            Err(message) => return Err(fail(message, implicit, was_open)),
        }
    }
    if implicit {
        if let Err(e) = conn.execute_batch("COMMIT") {
            rollback(true, true);
            return Err(SqlError::Commit {
                message: describe(&e),
            });
        }
    } else if !conn.is_autocommit() {
        return Err(SqlError::Unterminated {
            rolled_back: rollback(false, true),
        });
    }
    Ok(rows)
}

/// SQLite's message for an error, without rusqlite's decorations.
fn describe(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(err, Some(msg)) => {
            format!("{msg} ({})", code_name(err.extended_code))
        }
        rusqlite::Error::SqliteFailure(err, None) => err.to_string(),
        rusqlite::Error::SqlInputError { msg, .. } => msg.clone(),
        other => other.to_string(),
    }
}

/// 1-based (line, column) of byte `at` of `script`.
fn line_col(script: &str, at: usize) -> (usize, usize) {
    let before = &script[..at.min(script.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// For an error while preparing the statement that starts at byte `start` of
/// `script`: where it is ((line, column) of the offset SQLite reports, else of
/// the statement's first token) and SQLite's message.
fn describe_prepare_error(
    script: &str,
    start: usize,
    e: &rusqlite::Error,
) -> ((usize, usize), String) {
    let rest = &script[start..];
    let first_token = start + (rest.len() - rest.trim_start().len());
    match e {
        rusqlite::Error::SqlInputError {
            msg, sql, offset, ..
        } => {
            // `sql` is the text given to prepare, a suffix of the script.
            let base = script.len().saturating_sub(sql.len());
            let at = usize::try_from(*offset)
                .ok()
                .map(|o| base + o.min(sql.len()))
                .filter(|a| script.is_char_boundary(*a))
                .unwrap_or(first_token);
            (line_col(script, at), msg.clone())
        }
        other => (line_col(script, first_token), describe(other)),
    }
}

/// SQLite's name for an extended result code (the common ones).
fn code_name(code: i32) -> String {
    use rusqlite::ffi;
    let name = match code {
        ffi::SQLITE_CONSTRAINT_PRIMARYKEY => "SQLITE_CONSTRAINT_PRIMARYKEY",
        ffi::SQLITE_CONSTRAINT_UNIQUE => "SQLITE_CONSTRAINT_UNIQUE",
        ffi::SQLITE_CONSTRAINT_NOTNULL => "SQLITE_CONSTRAINT_NOTNULL",
        ffi::SQLITE_CONSTRAINT_CHECK => "SQLITE_CONSTRAINT_CHECK",
        ffi::SQLITE_CONSTRAINT_FOREIGNKEY => "SQLITE_CONSTRAINT_FOREIGNKEY",
        ffi::SQLITE_CONSTRAINT_TRIGGER => "SQLITE_CONSTRAINT_TRIGGER",
        ffi::SQLITE_CONSTRAINT_FUNCTION => "SQLITE_CONSTRAINT_FUNCTION",
        ffi::SQLITE_BUSY => "SQLITE_BUSY",
        ffi::SQLITE_CANTOPEN => "SQLITE_CANTOPEN",
        ffi::SQLITE_READONLY => "SQLITE_READONLY",
        ffi::SQLITE_MISUSE => "SQLITE_MISUSE",
        ffi::SQLITE_ERROR => "SQLITE_ERROR",
        other => return format!("SQLite error code {other}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_keywords_skip_comments_and_whitespace() {
        let cases = [
            ("BEGIN", "BEGIN"),
            ("  begin immediate", "BEGIN"),
            ("-- c\n /* d */ Commit", "COMMIT"),
            ("/* unterminated", ""),
            (
                "CREATE TRIGGER x AFTER INSERT ON t BEGIN SELECT 1; END",
                "CREATE",
            ),
            ("select 1", "SELECT"),
        ];
        for (sql, kw) in cases {
            assert_eq!(first_keyword(sql), kw, "{sql:?}");
        }
    }

    #[test]
    fn snippets_are_one_line_and_bounded() {
        assert_eq!(snippet("  SELECT\n  1 "), "SELECT 1");
        let long = "é".repeat(300);
        assert_eq!(snippet(&long).chars().count(), 203);
    }
}
