//! The server's view of its schema: the policy engine's [`Schema`] (CRRs and
//! local tables, without the server's own `tenantsync_*` tables), per-CRR
//! facts the engine needs (column names, primary-key positions) and the
//! `GET /v1/schema` answer.

use std::sync::Arc;

use fallible_iterator::FallibleIterator;
use tenantsync_core::CrrConnection;
use tenantsync_policy::Schema;
use tenantsync_protocol::http::{ColumnInfo, SchemaResponse, TableInfo};

/// Tables the server keeps for itself (never synced, never in policies).
pub(crate) fn is_server_table(name: &str) -> bool {
    name.to_ascii_lowercase().starts_with("tenantsync_")
}

/// One CRR as the engine uses it.
#[derive(Debug)]
pub(crate) struct Table {
    /// Index in [`ServerSchema::tables`].
    pub id: u16,
    pub name: Arc<str>,
    pub columns: Vec<String>,
    /// Column indexes of the primary key, in key order.
    pub pk: Vec<usize>,
}

impl Table {
    /// The column index of `cid` (`None` for an unknown column).
    pub fn column(&self, cid: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == cid)
    }
}

/// Everything the server knows about its schema.
#[derive(Debug)]
pub(crate) struct ServerSchema {
    pub policy: Schema,
    /// The CRRs.
    pub tables: Vec<Table>,
    pub response: SchemaResponse,
}

impl ServerSchema {
    pub fn read(db: &CrrConnection, schema_sql: &str) -> tenantsync_core::Result<ServerSchema> {
        let mut core = db.schema()?;
        core.tables.retain(|t| !is_server_table(&t.name));
        let policy = Schema::from(&core);
        let mut tables = Vec::new();
        let mut infos = Vec::new();
        for t in core.tables.iter().filter(|t| t.is_crr) {
            infos.push(TableInfo {
                name: t.name.clone(),
                columns: t
                    .columns
                    .iter()
                    .map(|c| ColumnInfo {
                        name: c.name.clone(),
                        decl_type: c.decl_type.clone(),
                        pk: c.pk,
                    })
                    .collect(),
                crr: true,
            });
            tables.push(Table {
                id: tables.len() as u16,
                name: Arc::from(t.name.as_str()),
                columns: t.columns.iter().map(|c| c.name.clone()).collect(),
                pk: t.pk_positions(),
            });
        }
        Ok(ServerSchema {
            policy,
            tables,
            response: SchemaResponse {
                schema_sql: schema_sql.to_owned(),
                tables: infos,
            },
        })
    }

    /// The CRR named `name` (exactly, as core names it).
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| &*t.name == name)
    }
}

/// Splits an SQL script into statements: `;` outside strings, quoted
/// identifiers and comments ends one, except inside `CREATE TRIGGER ...
/// END`.
pub(crate) fn split_sql(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, words: &mut Vec<String>| {
        if !word.is_empty() {
            words.push(std::mem::take(word).to_ascii_uppercase());
        }
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' | b'"' | b'`' | b'[' => {
                flush(&mut word, &mut words);
                let close = if c == b'[' { b']' } else { c };
                i += 1;
                while i < b.len() {
                    if b[i] == close {
                        if close != b']' && i + 1 < b.len() && b[i + 1] == close {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                flush(&mut word, &mut words);
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                flush(&mut word, &mut words);
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b';' => {
                flush(&mut word, &mut words);
                let trigger = words.first().is_some_and(|w| w == "CREATE")
                    && words.iter().take(4).any(|w| w == "TRIGGER");
                if !trigger || words.last().is_some_and(|w| w == "END") {
                    let stmt = sql[start..=i].trim();
                    if stmt.len() > 1 {
                        out.push(stmt);
                    }
                    start = i + 1;
                    words.clear();
                }
            }
            c if c.is_ascii_alphanumeric() || c == b'_' => word.push(c as char),
            _ => flush(&mut word, &mut words),
        }
        i += 1;
    }
    let rest = sql[start.min(sql.len())..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Runs a schema script statement by statement; a statement creating
/// something that exists is skipped (so a script without `IF NOT EXISTS`
/// can be applied at every start).
pub(crate) fn apply_schema(db: &CrrConnection, sql: &str) -> Result<(), String> {
    for stmt in split_sql(sql) {
        let r = (|| {
            let mut batch = rusqlite::Batch::new(db.conn(), stmt);
            while let Some(mut st) = batch.next()? {
                let mut rows = st.raw_query();
                while rows.next()?.is_some() {}
            }
            Ok::<(), rusqlite::Error>(())
        })();
        if let Err(e) = r {
            let m = e.to_string();
            if !m.contains("already exists") {
                return Err(format!("{m} (in: {stmt})"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_sql;

    #[test]
    fn scripts_split_into_statements() {
        let sql = "-- a; comment\nCREATE TABLE t (a TEXT DEFAULT ';');\n/* b; */ CREATE TABLE \"x;y\" (b);\n\
                   CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'x;'; DELETE FROM t; END;\n\
                   SELECT crsql_as_crr('t')";
        assert_eq!(
            split_sql(sql),
            vec![
                "-- a; comment\nCREATE TABLE t (a TEXT DEFAULT ';');",
                "/* b; */ CREATE TABLE \"x;y\" (b);",
                "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'x;'; DELETE FROM t; END;",
                "SELECT crsql_as_crr('t')",
            ]
        );
    }
}
