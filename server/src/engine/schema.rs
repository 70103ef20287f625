//! The server's view of its schema: the policy engine's [`Schema`] (CRRs and
//! local tables, without the server's own `tenantsync_*` tables), per-CRR
//! facts the engine needs (column names, primary-key positions) and the
//! `GET /v1/schema` answer.

use std::sync::Arc;

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

/// Runs a schema script statement by statement; a statement creating
/// something that exists is skipped (so a script without `IF NOT EXISTS`
/// can be applied at every start).
pub(crate) fn apply_schema(db: &CrrConnection, sql: &str) -> Result<(), String> {
    let mut rest = sql;
    while let Some(n) = tenantsync_core::script::next_statement(db.conn(), rest) {
        let stmt = rest[..n.end].trim();
        rest = &rest[n.end..];
        let r = n.prepared.and_then(|()| {
            let mut st = db.conn().prepare(stmt)?;
            let mut rows = st.raw_query();
            while rows.next()?.is_some() {}
            Ok(())
        });
        if let Err(e) = r {
            let m = e.to_string();
            if !m.contains("already exists") {
                return Err(format!("{m} (in: {stmt})"));
            }
        }
    }
    Ok(())
}
