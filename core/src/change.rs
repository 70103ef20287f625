//! The typed change types: [`Change`], [`ChangesQuery`], [`SiteFilter`], [`RowRef`].

use serde::{Deserialize, Serialize};
use tenantsync_types::Value;

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

/// Which authors a change read keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SiteFilter {
    /// Every change.
    #[default]
    Any,
    /// Only changes authored by this site (`site_id = ?`).
    Only(SiteId),
    /// Changes not authored by this site (`site_id IS NOT ?`): what to send
    /// a peer without echoing its own writes back.
    Exclude(SiteId),
}

/// What [`crate::CrrConnection::changes`] reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesQuery {
    /// Changes with db_version greater than this.
    pub since: i64,
    /// Changes with db_version at most this (None: no upper bound).
    pub until: Option<i64>,
    /// Only this CRR.
    pub table: Option<String>,
    /// Only these rows (packed pks; any encoding is canonicalized).
    pub pks: Option<Vec<PackedPk>>,
    /// Author filter.
    pub site: SiteFilter,
    /// Stop after the db_version in which the number of changes reaches this;
    /// a result never splits a db_version (a transaction).
    pub limit: Option<usize>,
}

/// A row with a clock stamped in a version range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowRef {
    /// The CRR.
    pub table: String,
    /// The packed primary key.
    pub pk: PackedPk,
    /// The highest db_version of the row's clocks inside the range.
    pub db_version: i64,
}
