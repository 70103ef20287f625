//! The schema description the engine works from: tables, columns with their
//! declared types (hence SQLite affinities), primary keys, and which tables are
//! CRRs. `core` produces the facts; the CLI and the server convert them.

pub use tenantsync_types::Affinity;

/// One column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnSchema {
    /// The column's name as declared.
    pub name: String,
    /// The declared type (`INTEGER`, `TEXT`, `VARCHAR(10)`...), if any.
    pub decl_type: Option<String>,
}

impl ColumnSchema {
    /// A column with a declared type.
    pub fn new(name: impl Into<String>, decl_type: Option<&str>) -> Self {
        ColumnSchema {
            name: name.into(),
            decl_type: decl_type.map(str::to_owned),
        }
    }

    /// The column's affinity.
    pub fn affinity(&self) -> Affinity {
        Affinity::from_decl_type(self.decl_type.as_deref())
    }
}

/// One table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    /// The table's name as declared.
    pub name: String,
    /// Columns in table order (the order rows are given in).
    pub columns: Vec<ColumnSchema>,
    /// Indexes into `columns` of the primary key, in key order.
    pub pk: Vec<usize>,
    /// Whether the table is a CRR (`SELECT crsql_as_crr('t')`). Only CRRs can
    /// carry policies and be subscribed to.
    pub is_crr: bool,
}

impl TableSchema {
    /// The index of a column by name (ASCII case-insensitive, as SQLite).
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(name))
    }
}

/// The tables of a database.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schema {
    /// Every table, CRR or local.
    pub tables: Vec<TableSchema>,
}

impl Schema {
    /// A table by name (ASCII case-insensitive, as SQLite).
    pub fn table(&self, name: &str) -> Option<&TableSchema> {
        self.table_index(name).map(|i| &self.tables[i])
    }

    pub(crate) fn table_index(&self, name: &str) -> Option<usize> {
        self.tables
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case(name))
    }
}

/// Tables no policy or subscription may name: SQLite's own (`sqlite_*`) and
/// cr-sqlite's bookkeeping (`crsql_*`, `*__crsql_*`), whatever the schema says.
pub fn is_internal_table(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("sqlite_") || lower.starts_with("crsql_") || lower.contains("__crsql_")
}
