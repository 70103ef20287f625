//! tenantsync-core: a single-tenant CRR engine on rusqlite, wire-compatible
//! with cr-sqlite 0.16 (same `crsql_changes` rows, same packed keys, same
//! merge rules), with its own compact clock storage.
//!
//! Module map:
//! - [`connection`]: [`CrrConnection`] (open, the typed API), [`Options`],
//!   [`MergeStamping`].
//! - `functions`: the SQL surface installed on a connection (`crsql_*`
//!   functions, `tenantsync_pk_value`).
//! - `vtab`: the `crsql_changes` virtual table (reads with index-served
//!   constraints, merges on INSERT) and `crsql_unpack_columns`.
//! - `tracking`: what the CRR triggers do on local INSERT/UPDATE/DELETE.
//! - `merge`: cr-sqlite's merge rules, row-grouped ([`ApplyStats`]).
//! - `read`: change reads over the db_version index.
//! - `crr`: `crsql_as_crr`, backfill, begin/commit alter, eviction.
//! - `schema`: CRR metadata, compatibility rules, DDL; [`Schema`].
//! - `state`: per-connection engine state (db_version, seq, caches), the
//!   clock-record IO and the merge's base-row writes, on held statements.
//! - `raw`: directly held prepared statements for the hot paths.
//! - `clock`: the per-row clock record encoding.
//! - [`pack`], [`site`]: re-exported from `tenantsync-types` (cr-sqlite's
//!   packed primary keys [`PackedPk`], the [`SiteId`] type), where the wire
//!   crate reads them without SQLite.
//! - [`change`]: the change types [`Change`] (from `tenantsync-types`),
//!   [`ChangesQuery`], [`RowRef`].
//! - [`error`]: the [`Error`] type.
//! - [`script`]: SQL scripts split into statements by SQLite's parser.
//!
//! See docs/arch/core.md for the storage layout and the invariants.

pub mod change;
mod clock;
pub mod connection;
mod crr;
pub mod error;
mod functions;
mod merge;
pub use tenantsync_types::pack;
mod raw;
mod read;
pub mod schema;
pub mod script;
pub use tenantsync_types::site;
mod state;
mod tracking;
mod vtab;

pub use change::{Change, ChangesQuery, RowRef, SiteFilter};
pub use connection::{CrrConnection, LAYOUT_VERSION, MergeStamping, Options, Savepoint};
pub use error::{Error, Result};
pub use merge::{ApplyOptions, ApplyReport, ApplyStats, ClockBound};
pub use pack::{PackedPk, PkError};
pub use schema::{ColumnSchema, Schema, TableSchema};
pub use site::SiteId;
pub use tenantsync_types::Value;

/// The name of cr-sqlite's one setting (`crsql_config_set`).
pub const MERGE_EQUAL_VALUES: &str = "merge-equal-values";

const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<CrrConnection>();
};
