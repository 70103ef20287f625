//! [`Error`]: everything the core can refuse, with the table, pk, column and
//! db_version involved.

use crate::pack::PkError;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the CRR engine. Messages name what was wrong; errors raised
/// inside SQL (functions, `crsql_changes`) carry the same text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// SQLite refused something.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// `crsql_as_crr` refused a table (reference §5 rules).
    #[error("table {table:?} cannot be a CRR: {reason}")]
    NotCrrCompatible {
        /// The table.
        table: String,
        /// The rule that is broken, naming the column when there is one.
        reason: String,
    },

    /// A change or call names a table that is not a CRR.
    #[error(
        "no CRR table {table:?} (crsql - could not find the schema information for table {table})"
    )]
    UnknownTable {
        /// The table.
        table: String,
    },

    /// A change names a column the CRR does not track.
    #[error("table {table:?} has no tracked column {column:?}")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The column (`cid`).
        column: String,
    },

    /// A packed primary key could not be decoded.
    #[error("table {table:?}, pk {pk}: {source}")]
    Pk {
        /// The table.
        table: String,
        /// The pk bytes in hex.
        pk: String,
        /// What is wrong with them.
        source: PkError,
    },

    /// A packed primary key has the wrong number of values for the table.
    #[error(
        "table {table:?}, pk {pk}: {got} values but the primary key has {expected} columns (column index out of range)"
    )]
    PkArity {
        /// The table.
        table: String,
        /// The pk bytes in hex.
        pk: String,
        /// Columns in the table's primary key.
        expected: usize,
        /// Values in the packed key.
        got: usize,
    },

    /// A primary-key value SQLite would not store in its column (or NULL,
    /// which a CRR's key never holds).
    #[error("table {table:?}, pk {pk}: primary-key column {column:?} {reason}")]
    PkValue {
        /// The table.
        table: String,
        /// The pk bytes in hex.
        pk: String,
        /// The key column.
        column: String,
        /// Why: NULL, or the datatype mismatch SQLite reports.
        reason: Box<str>,
    },

    /// A clock would run past the largest value it may hold, or a merged
    /// change's clock is beyond the bound the caller set
    /// ([`crate::ApplyOptions::clock_bound`]).
    #[error("table {table:?}, pk {pk}, cid {cid:?}: {reason}")]
    Clock {
        /// The table.
        table: String,
        /// The pk bytes in hex.
        pk: String,
        /// The column id (`-1` for the row's causal length).
        cid: String,
        /// What is out of bounds, with the numbers.
        reason: Box<str>,
    },

    /// A site id longer than 16 bytes.
    #[error("crsql - site id exceeded max length: {len} bytes (at most 16)")]
    SiteIdTooLong {
        /// Its length.
        len: usize,
    },

    /// A merged change's site id is shorter than 16 bytes (and not NULL).
    #[error("site id of {len} bytes: a site id is 16 bytes (NULL for the local site)")]
    SiteIdTooShort {
        /// Its length.
        len: usize,
    },

    /// A stored site id is not 16 bytes, so it has no [`crate::SiteId`].
    #[error("site id {hex} is {len} bytes; the typed API needs 16")]
    SiteIdNot16 {
        /// The site id in hex.
        hex: String,
        /// Its length.
        len: usize,
    },

    /// Applying one change failed; nothing of the batch was applied.
    #[error(
        "change #{index} (table {table:?}, pk {pk}, cid {cid:?}, db_version {db_version}): {source}"
    )]
    Change {
        /// 0-based position of the change in the batch.
        index: usize,
        /// Its table.
        table: String,
        /// Its pk in hex.
        pk: String,
        /// Its column id.
        cid: String,
        /// Its db_version (the sender's).
        db_version: i64,
        /// What went wrong.
        source: Box<Error>,
    },

    /// The database was laid out by the real cr-sqlite extension.
    #[error(
        "this database was laid out by the cr-sqlite extension ({detail}); tenantsync-core keeps its own clock tables and cannot open it. Export its rows (or its crsql_changes) into a fresh database instead"
    )]
    ForeignLayout {
        /// What gave it away.
        detail: String,
    },

    /// A read-only open of a database that was never opened read-write.
    #[error(
        "the database has no tenantsync-core tables (crsql_site_id, crsql_master); open it read-write once first"
    )]
    NotInitialized,

    /// The database was written by a newer tenantsync-core.
    #[error("the database layout version is {found}; this build understands up to {supported}")]
    LayoutVersion {
        /// Found in crsql_master.
        found: i64,
        /// Known to this build.
        supported: i64,
    },

    /// An engine call was made from inside another engine call on the same
    /// connection (e.g. a user trigger fired by a merge calling a crsql_*
    /// function that needs the engine).
    #[error("re-entrant call into the CRR engine (from a trigger fired by the engine?)")]
    Reentrant,

    /// Only the `main` schema holds CRRs.
    #[error("schema {schema:?}: only the main database can hold CRRs")]
    UnsupportedSchema {
        /// The schema name given.
        schema: String,
    },

    /// Schema change misuse (`crsql_begin_alter` / `crsql_commit_alter`).
    #[error("alter of table {table:?}: {reason}")]
    Alter {
        /// The table.
        table: String,
        /// What is wrong.
        reason: String,
    },

    /// `crsql_config_set/get` with a setting that does not exist.
    #[error("Unknown setting name {name:?} (known: merge-equal-values)")]
    UnknownSetting {
        /// The name given.
        name: String,
    },

    /// UPDATE or DELETE on `crsql_changes`.
    #[error("Only INSERT and SELECT statements are allowed against the crsql changes table")]
    ChangesReadOnly,

    /// A bad argument to an SQL function or API call.
    #[error("{0}")]
    Invalid(String),
}

/// The error of a db_version at the end of its range.
pub(crate) fn version_overflow() -> Error {
    Error::Invalid("db_version is at the end of its range: no version follows it".into())
}

impl Error {
    pub(crate) fn pk(table: &str, pk: &[u8], source: PkError) -> Error {
        Error::Pk {
            table: table.to_owned(),
            pk: hex::encode(pk),
            source,
        }
    }
}

impl From<Error> for rusqlite::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Sqlite(e) => e,
            other => rusqlite::Error::UserFunctionError(Box::new(other)),
        }
    }
}
