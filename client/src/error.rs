//! [`ReplicaError`]: what the replica refuses, with the subscription, table,
//! row or version involved.

use tenantsync_protocol::RowKey;

/// The result type of the replica.
pub type Result<T, E = ReplicaError> = std::result::Result<T, E>;

/// An error of the replica. Every operation that fails leaves the replica as
/// it was: its transaction is rolled back whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The CRR engine refused something (a change that does not merge, a
    /// table that is not a CRR, ...).
    #[error("core: {0}")]
    Core(#[from] tenantsync_core::Error),

    /// SQLite refused something on the replica's own tables.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// A server message that breaks the protocol (docs/PROTOCOL.md), e.g. a
    /// `changes` message with `more` followed by one of another version.
    #[error("protocol: {0}")]
    Protocol(String),

    /// A row key whose packed pk does not decode.
    #[error("row {table}/{pk}: the packed primary key does not decode: {reason}", pk = .row.pk)]
    BadRowKey {
        /// The table (also in `row`).
        table: String,
        /// The row.
        row: RowKey,
        /// Why.
        reason: String,
    },

    /// One local transaction's changes are larger than a push may be: it
    /// cannot be pushed whole (a transaction is never split).
    #[error(
        "local transaction {db_version} has {bytes} bytes of changes, over the push limit of {limit} bytes: it cannot be pushed"
    )]
    TransactionTooLarge {
        /// The local db_version of the transaction.
        db_version: i64,
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },

    /// A subscription id that the replica does not have.
    #[error("no subscription {id:?} in this replica")]
    UnknownSubscription {
        /// The id.
        id: String,
    },

    /// A subscription id or query that cannot be used.
    #[error("subscription {id:?}: {reason}")]
    BadSubscription {
        /// The id.
        id: String,
        /// Why.
        reason: String,
    },

    /// The schema script from the server failed on the replica.
    #[error("the server's schema script failed on the replica: {0}")]
    Schema(String),

    /// The replica's thread is gone (it panicked, or the handle was closed).
    #[error("the replica thread has stopped")]
    Closed,
}

impl ReplicaError {
    pub(crate) fn protocol(msg: impl Into<String>) -> ReplicaError {
        ReplicaError::Protocol(msg.into())
    }
}
