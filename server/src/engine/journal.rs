//! [`Journal`]: where a shard's commits go before they are final, when the
//! shard runs in a cluster (`crate::cluster`): every transaction the
//! engine commits is sealed (appended to the shard's log) before its
//! `COMMIT`, and a seal that fails rolls it back, so nothing is
//! acknowledged that the log does not hold. A write made outside an
//! explicit transaction (a peer's last use, say) is sealed at the end of
//! the engine loop's turn ([`Engine::seal_loose`]). A node of one shard
//! set has no journal, and commits as it always did.

use rusqlite::Connection;
use tenantsync_protocol::ErrorCode;

use super::Engine;
use crate::contract::ApiError;

/// Why a seal failed; the transaction is rolled back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SealError {
    /// Another node appended to the log: this one no longer owns the
    /// shard, and takes no write until it is a standby again.
    #[error("this node no longer owns the shard: {0}")]
    Fenced(String),
    /// The log could not take the entry (the write may be retried).
    #[error("the shard's log is unavailable: {0}")]
    Unavailable(String),
}

/// The log of a shard in a cluster, as the engine sees it.
pub(crate) trait Journal: Send {
    /// Appends what was written since recording last started, inside the
    /// open transaction (the entry's sequence is written into it first).
    /// Nothing written: nothing appended.
    fn seal(&mut self, conn: &Connection) -> Result<(), SealError>;
    /// Starts recording anew, after a commit.
    fn restart(&mut self, conn: &Connection);
    /// Whether something was written since recording started.
    fn dirty(&self) -> bool;
}

/// Why an engine transaction did not commit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommitError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Core(#[from] tenantsync_core::Error),
    #[error(transparent)]
    Seal(#[from] SealError),
}

impl CommitError {
    /// What a writer whose write did not commit is told.
    pub(crate) fn to_api(&self) -> ApiError {
        match self {
            CommitError::Sqlite(e) => ApiError::new(ErrorCode::Internal, e.to_string()),
            CommitError::Core(e) => ApiError::new(ErrorCode::Internal, e.to_string()),
            CommitError::Seal(e) => ApiError::new(
                ErrorCode::Unavailable,
                format!("{e}; nothing was applied, retry"),
            ),
        }
    }
}

impl Engine {
    /// `BEGIN IMMEDIATE`, refused once the shard was fenced.
    pub(in crate::engine) fn begin_write(&mut self) -> Result<(), CommitError> {
        if let Some(why) = &self.fenced {
            return Err(SealError::Fenced(why.clone()).into());
        }
        self.db.conn().execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    /// Seals the open transaction (in a cluster) and commits it; on any
    /// failure rolls it back whole.
    pub(in crate::engine) fn commit_write(&mut self) -> Result<(), CommitError> {
        let sealed = match self.journal.as_mut() {
            Some(j) => j.seal(self.db.conn()),
            None => Ok(()),
        };
        let r = match sealed {
            Ok(()) => self
                .db
                .conn()
                .execute_batch("COMMIT")
                .map_err(CommitError::from),
            Err(e) => Err(e.into()),
        };
        match &r {
            Ok(()) => {
                if let Some(j) = self.journal.as_mut() {
                    j.restart(self.db.conn());
                }
            }
            // Recording goes on: a changeset is the difference between the
            // rows as they were when recording started and as they are, so
            // what the rollback undid drops out of it, and what committed
            // outside a transaction since stays in it.
            Err(e) => {
                let _ = self.db.conn().execute_batch("ROLLBACK");
                if let CommitError::Seal(SealError::Fenced(why)) = e {
                    self.fenced = Some(why.clone());
                    self.stats
                        .fenced
                        .store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }
        r
    }

    /// Rolls the open transaction back (recording goes on, as above).
    pub(in crate::engine) fn rollback_write(&mut self) {
        let _ = self.db.conn().execute_batch("ROLLBACK");
    }

    /// Seals what was written outside a transaction since the last seal
    /// (a peer's binding or last use, a forgotten peer), in one of its own.
    pub(in crate::engine) fn seal_loose(&mut self) {
        if !self.journal.as_ref().is_some_and(|j| j.dirty()) || self.fenced.is_some() {
            return;
        }
        let r = self.begin_write().and_then(|()| self.commit_write());
        if let Err(e) = r {
            tracing::error!(error = %e, "sealing the shard's loose writes failed");
        }
    }
}
