//! The typed change types: [`Change`], [`ChangesQuery`], [`SiteFilter`], [`RowRef`].

use serde::{Deserialize, Serialize};

use crate::pack::PackedPk;
use crate::site::SiteId;

pub use tenantsync_types::change::Change;

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
