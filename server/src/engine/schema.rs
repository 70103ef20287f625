//! The server's view of its schema: the policy engine's [`Schema`] (CRRs and
//! local tables, without the server's own `tenantsync_*` tables), per-CRR
//! facts the engine needs (column names, primary-key positions), the
//! `GET /v1/schema` answer and the [`SchemaCell`] holding the one in force.

use std::sync::Arc;

use tenantsync_core::CrrConnection;
use tenantsync_policy::Schema;
use tenantsync_protocol::http::{ColumnInfo, SchemaMigration, SchemaResponse, TableInfo};

/// Tables the server keeps for itself (never synced, never in policies).
pub(crate) fn is_server_table(name: &str) -> bool {
    name.to_ascii_lowercase().starts_with("tenantsync_")
}

/// cr-sqlite's tables (clocks, site ids, its master table).
pub(crate) fn is_crr_metadata(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    l.starts_with("crsql_") || l.contains("__crsql_")
}

/// SQLite's own tables (`sqlite_master`, ...).
pub(crate) fn is_sqlite_table(name: &str) -> bool {
    name.to_ascii_lowercase().starts_with("sqlite_")
}

/// A table no client or service statement writes: SQLite's, cr-sqlite's
/// or the server's.
pub(crate) fn is_internal_table(name: &str) -> bool {
    is_sqlite_table(name) || is_crr_metadata(name) || is_server_table(name)
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
    /// The CRRs. A table keeps its index across schema changes (new ones
    /// are appended), so the ids views and plans hold stay valid.
    pub tables: Vec<Table>,
    pub response: SchemaResponse,
}

impl ServerSchema {
    /// The schema of `db` at the versions of `log` (oldest first; the
    /// last is the current version).
    pub fn read(
        db: &CrrConnection,
        log: Vec<SchemaMigration>,
    ) -> tenantsync_core::Result<ServerSchema> {
        Self::read_after(db, log, None)
    }

    /// The schema after a change: tables keep the ids they had in `self`.
    pub fn evolve(
        &self,
        db: &CrrConnection,
        log: Vec<SchemaMigration>,
    ) -> tenantsync_core::Result<ServerSchema> {
        Self::read_after(db, log, Some(self))
    }

    fn read_after(
        db: &CrrConnection,
        log: Vec<SchemaMigration>,
        before: Option<&ServerSchema>,
    ) -> tenantsync_core::Result<ServerSchema> {
        let mut core = db.schema()?;
        core.tables.retain(|t| !is_server_table(&t.name));
        let policy = Schema::from(&core);
        let mut crrs: Vec<&tenantsync_core::TableSchema> =
            core.tables.iter().filter(|t| t.is_crr).collect();
        // Tables known before first, at their old index; new ones after.
        let old_index = |name: &str| {
            before
                .and_then(|b| b.tables.iter().position(|t| &*t.name == name))
                .unwrap_or(usize::MAX)
        };
        crrs.sort_by_key(|t| old_index(&t.name));
        let mut tables = Vec::new();
        let mut infos = Vec::new();
        for t in crrs {
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
        let schema_version = log.last().map_or(1, |m| m.version);
        let schema_sql = log.iter().map(|m| m.sql.as_str()).collect::<String>();
        Ok(ServerSchema {
            policy,
            tables,
            response: SchemaResponse {
                schema_version,
                schema_sql,
                migrations: log,
                tables: infos,
            },
        })
    }

    /// The schema version.
    pub fn version(&self) -> i64 {
        self.response.schema_version
    }

    /// The CRR named `name` (exactly, as core names it).
    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| &*t.name == name)
    }
}

/// The schema in force, shared by a shard's engine (which replaces it at a
/// schema change), its readers and the service.
#[derive(Debug)]
pub(crate) struct SchemaCell(std::sync::RwLock<Arc<ServerSchema>>);

impl SchemaCell {
    pub fn new(s: Arc<ServerSchema>) -> SchemaCell {
        SchemaCell(std::sync::RwLock::new(s))
    }

    pub fn get(&self) -> Arc<ServerSchema> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, s: Arc<ServerSchema>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = s;
    }
}
