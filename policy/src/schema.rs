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
    /// Its collation when not BINARY: comparisons of such a column are
    /// refused (docs/POLICY.md, "Collations").
    pub collation: Option<String>,
    /// Its affinity: from the declared type, except that a STRICT table's
    /// `ANY` column converts nothing (BLOB affinity) where an ordinary
    /// table's column declared `ANY` is NUMERIC.
    pub affinity: Affinity,
}

impl ColumnSchema {
    /// A column with a declared type (and the BINARY collation).
    pub fn new(name: impl Into<String>, decl_type: Option<&str>) -> Self {
        ColumnSchema {
            name: name.into(),
            decl_type: decl_type.map(str::to_owned),
            collation: None,
            affinity: Affinity::from_decl_type(decl_type),
        }
    }

    /// The column's affinity.
    pub fn affinity(&self) -> Affinity {
        self.affinity
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

impl From<&tenantsync_types::schema::Schema> for Schema {
    /// The tables as the core describes them (`CrrConnection::schema`).
    fn from(s: &tenantsync_types::schema::Schema) -> Schema {
        Schema {
            tables: s.tables.iter().map(TableSchema::from).collect(),
        }
    }
}

impl From<&tenantsync_types::schema::TableSchema> for TableSchema {
    fn from(t: &tenantsync_types::schema::TableSchema) -> TableSchema {
        TableSchema {
            name: t.name.clone(),
            columns: t
                .columns
                .iter()
                .map(|c| {
                    let decl = (!c.decl_type.is_empty()).then_some(c.decl_type.as_str());
                    let strict_any = t.strict && c.decl_type.eq_ignore_ascii_case("ANY");
                    ColumnSchema {
                        collation: c.collation.clone(),
                        affinity: if strict_any {
                            Affinity::Blob
                        } else {
                            Affinity::from_decl_type(decl)
                        },
                        ..ColumnSchema::new(c.name.clone(), decl)
                    }
                })
                .collect(),
            pk: t.pk_positions(),
            is_crr: t.is_crr,
        }
    }
}

/// Tables no policy or subscription may name: SQLite's own (`sqlite_*`) and
/// cr-sqlite's bookkeeping (`crsql_*`, `*__crsql_*`), whatever the schema says.
pub fn is_internal_table(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("sqlite_") || lower.starts_with("crsql_") || lower.contains("__crsql_")
}
