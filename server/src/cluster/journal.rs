//! [`LogJournal`]: the engine's [`Journal`] on a shard's log. A seal
//! writes the entry's sequence into the shard's `tenantsync_log` row, takes
//! the transaction's changeset and appends it, blocking the engine thread
//! until JetStream answers (group commit amortises the wait over every
//! push of the group).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;

use super::changeset::Recorder;
use super::log::{Kind, LogError, ShardLog};
use crate::engine::journal::{Journal, SealError};

/// The row holding the sequence of the last log entry a copy of the shard
/// applied: written by every changeset, so a copy that replays an entry
/// checks it follows the one before.
pub(crate) const CREATE_SEQ: &str = "CREATE TABLE IF NOT EXISTS tenantsync_log (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL);
    INSERT OR IGNORE INTO tenantsync_log (id, seq) VALUES (0, 0);";

/// The sequence a copy applied last.
pub(crate) fn applied_seq(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT seq FROM tenantsync_log WHERE id = 0", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|s| s as u64)
}

/// Records that a copy applied entry `seq` (a claim or an image: entries
/// whose changes are not a changeset).
pub(crate) fn set_seq(conn: &Connection, seq: u64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE tenantsync_log SET seq = ?1 WHERE id = 0",
        [seq as i64],
    )
    .map(drop)
}

pub(crate) struct LogJournal {
    log: ShardLog,
    rt: tokio::runtime::Handle,
    recorder: Option<Recorder>,
    /// The last sequence appended or applied.
    seq: u64,
    /// The same, for the node's status.
    shared: Arc<AtomicU64>,
}

impl LogJournal {
    pub(crate) fn new(
        log: ShardLog,
        rt: tokio::runtime::Handle,
        seq: u64,
        shared: Arc<AtomicU64>,
    ) -> LogJournal {
        shared.store(seq, Ordering::Release);
        LogJournal {
            log,
            rt,
            recorder: None,
            seq,
            shared,
        }
    }
}

impl Journal for LogJournal {
    fn seal(&mut self, conn: &Connection) -> Result<(), SealError> {
        let rec = self
            .recorder
            .as_ref()
            .ok_or_else(|| SealError::Unavailable("no change recorder".into()))?;
        let unavailable = |e: &dyn std::fmt::Display| SealError::Unavailable(e.to_string());
        // Nothing recorded since the last seal. (After a rollback the
        // session may hold changes that cancel out: the entry then carries
        // the sequence row alone, which is harmless.)
        if rec.is_empty() {
            return Ok(());
        }
        set_seq(conn, self.seq + 1).map_err(|e| unavailable(&e))?;
        let cs = rec.changeset().map_err(|e| unavailable(&e))?;
        let appended = self
            .rt
            .block_on(self.log.append(self.seq, Kind::Changeset, cs.into()));
        match appended {
            Ok(seq) => {
                self.seq = seq;
                self.shared.store(seq, Ordering::Release);
                Ok(())
            }
            Err(e @ LogError::Fenced { .. }) => Err(SealError::Fenced(e.to_string())),
            Err(e) => Err(unavailable(&e)),
        }
    }

    fn restart(&mut self, conn: &Connection) {
        self.recorder = None;
        match Recorder::start(conn) {
            Ok(r) => self.recorder = Some(r),
            Err(e) => {
                tracing::error!(error = %e, shard = self.log.shard(), "cannot record the shard's changes: its writes are refused")
            }
        }
    }

    fn dirty(&self) -> bool {
        self.recorder.as_ref().is_some_and(|r| !r.is_empty())
    }
}
