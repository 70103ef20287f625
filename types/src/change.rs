//! [`Change`]: one row of `crsql_changes`, the unit every tenantsync part
//! exchanges (the wire, the core, the server, the clients).

use serde::{Deserialize, Serialize};

use crate::Value;
use crate::pack::PackedPk;
use crate::site::SiteId;

/// One row of `crsql_changes`: one cell's (or a row sentinel's) clock and
/// current value. Field order and meaning are cr-sqlite's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The CRR.
    pub table: String,
    /// The packed primary key.
    pub pk: PackedPk,
    /// The column, or `"-1"` for the row sentinel.
    pub cid: String,
    /// The column's current value (NULL for the sentinel).
    pub val: Value,
    /// The cell's version (for the sentinel: the causal length).
    pub col_version: i64,
    /// The db_version of the transaction that wrote this clock on the
    /// database it was read from.
    pub db_version: i64,
    /// The site that authored the write.
    pub site_id: SiteId,
    /// The row's causal length (odd: alive, even: deleted).
    pub cl: i64,
    /// Order of the write within its transaction.
    pub seq: i64,
}

impl Change {
    /// The sentinel cid.
    pub const SENTINEL: &'static str = "-1";

    /// Whether this is a row sentinel (create / delete record).
    pub fn is_sentinel(&self) -> bool {
        self.cid == Self::SENTINEL
    }

    /// Its nine `crsql_changes` values in column order (`table, pk, cid,
    /// val, col_version, db_version, site_id, cl, seq`), borrowed: what
    /// `INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)` binds
    /// (`rusqlite::params_from_iter(c.sql_params())`). The one way a change
    /// becomes SQL parameters.
    #[cfg(feature = "rusqlite")]
    pub fn sql_params(&self) -> [rusqlite::types::ToSqlOutput<'_>; 9] {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        let val = match &self.val {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        };
        [
            ValueRef::Text(self.table.as_bytes()),
            ValueRef::Blob(&self.pk.0),
            ValueRef::Text(self.cid.as_bytes()),
            val,
            ValueRef::Integer(self.col_version),
            ValueRef::Integer(self.db_version),
            ValueRef::Blob(&self.site_id.0),
            ValueRef::Integer(self.cl),
            ValueRef::Integer(self.seq),
        ]
        .map(ToSqlOutput::Borrowed)
    }
}
