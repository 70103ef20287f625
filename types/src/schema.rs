//! What a database's tables look like: the description the core reads from
//! SQLite ([`Schema`]) and the policy engine validates policies and
//! rewrites queries against (`tenantsync_policy::Schema::from`), so the two
//! never depend on each other and nobody converts one into the other by
//! hand.

use serde::{Deserialize, Serialize};

/// The tables of a database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Schema {
    /// User tables (not SQLite's, not the CRR metadata), by name.
    pub tables: Vec<TableSchema>,
}

impl Schema {
    /// The table with this name.
    pub fn table(&self, name: &str) -> Option<&TableSchema> {
        self.tables.iter().find(|t| t.name == name)
    }
}

/// One table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    /// Its name.
    pub name: String,
    /// Its columns in table order (generated columns excluded, as
    /// `pragma_table_info` does).
    pub columns: Vec<ColumnSchema>,
    /// Whether it is a CRR (tracked and synced).
    pub is_crr: bool,
    /// Whether it is a STRICT table.
    #[serde(default)]
    pub strict: bool,
}

impl TableSchema {
    /// The primary-key columns in PRIMARY KEY order.
    pub fn pk_columns(&self) -> Vec<&ColumnSchema> {
        let mut pks: Vec<&ColumnSchema> = self.columns.iter().filter(|c| c.pk > 0).collect();
        pks.sort_by_key(|c| c.pk);
        pks
    }

    /// Positions (in table order) of the primary-key columns, in PRIMARY KEY
    /// order.
    pub fn pk_positions(&self) -> Vec<usize> {
        let mut pk: Vec<(u32, usize)> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.pk > 0)
            .map(|(i, c)| (c.pk, i))
            .collect();
        pk.sort();
        pk.into_iter().map(|(_, i)| i).collect()
    }

    /// The column with this name.
    pub fn column(&self, name: &str) -> Option<&ColumnSchema> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// One column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSchema {
    /// Its name.
    pub name: String,
    /// The declared type as written (`""` when none).
    pub decl_type: String,
    /// Declared NOT NULL.
    pub not_null: bool,
    /// The DEFAULT expression as written, if any.
    pub default: Option<String>,
    /// 1-based position in the PRIMARY KEY, 0 when not part of it.
    pub pk: u32,
    /// Its collation when declared other than BINARY (`NOCASE`, `RTRIM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collation: Option<String>,
}
