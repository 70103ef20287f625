//! [`Standby`]: a node's copy of a shard it does not own, kept at the log's
//! end by applying every entry in order, one entry one transaction, on a
//! thread of its own. A copy starts from the log's first entry (the shard's
//! database whole) when it has none; a copy that an entry does not apply to
//! (it diverged: this node wrote something the log refused) is thrown away
//! and rebuilt from the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tenantsync_core::CrrConnection;
use tokio::sync::oneshot;

use super::changeset;
use super::journal::{applied_seq, set_seq};
use super::log::{Entry, Kind, ShardLog};

/// A running standby copy.
pub(crate) struct Standby {
    stop: mpsc::Sender<oneshot::Sender<u64>>,
    thread: Option<JoinHandle<()>>,
    applied: Arc<AtomicU64>,
}

/// Removes a database file and its WAL companions.
pub(crate) fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Opens a copy for applying entries: with the core's functions (the
/// CRRs' triggers call them), its sync bit set so they record nothing (the
/// entries carry the clocks), and `synchronous = NORMAL`.
pub(crate) fn open_copy(path: &Path) -> Result<CrrConnection, String> {
    let db = CrrConnection::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    db.conn()
        .query_row("SELECT crsql_internal_sync_bit(1)", [], |_| Ok(()))
        .map_err(|e| e.to_string())?;
    // The log is the truth: a copy that loses its last transactions to a
    // power cut applies them again from the log (WAL keeps it whole).
    db.conn()
        .execute_batch("PRAGMA synchronous = NORMAL")
        .map_err(|e| e.to_string())?;
    Ok(db)
}

/// Why an entry did not apply.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// The copy is not the one the entry follows: it must be rebuilt.
    #[error("the copy diverged from the log: {0}")]
    Diverged(String),
    /// Something that may pass (the database busy): apply it again.
    #[error("{0}")]
    Transient(String),
}

/// Applies one entry to a copy that applied every entry before it.
pub(crate) fn apply(db: &CrrConnection, e: &Entry) -> Result<(), ApplyError> {
    let conn = db.conn();
    let transient = |x: rusqlite::Error| ApplyError::Transient(x.to_string());
    conn.execute_batch("BEGIN IMMEDIATE").map_err(transient)?;
    let r = match e.kind {
        Kind::Changeset => changeset::apply(conn, &e.payload).map_err(|x| match x {
            changeset::ChangesetError::Conflict => ApplyError::Diverged(x.to_string()),
            other => ApplyError::Transient(other.to_string()),
        }),
        Kind::Claim => set_seq(conn, e.seq).map_err(transient),
        Kind::Image => Err(ApplyError::Diverged(
            "an image past the log's first entry".to_owned(),
        )),
    }
    .and_then(|()| match applied_seq(conn) {
        Ok(s) if s == e.seq => Ok(()),
        Ok(s) => Err(ApplyError::Diverged(format!(
            "after entry {} the copy records {s}",
            e.seq
        ))),
        Err(x) => Err(transient(x)),
    });
    let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
    conn.execute_batch(end).map_err(transient)?;
    r
}

/// The most entries a copy applies as one run.
const MAX_RUN: usize = 512;

/// Applies consecutive entries: one alone as it is, a run of changesets
/// combined into one (the sequence row then moves from the run's first
/// predecessor to its last entry, which [`apply`] checks).
fn apply_run(db: &CrrConnection, run: &[Entry]) -> Result<(), ApplyError> {
    let [first, .., last] = run else {
        return apply(db, &run[0]);
    };
    if run.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
        return Err(ApplyError::Diverged(format!(
            "entries {} to {} are not consecutive",
            first.seq, last.seq
        )));
    }
    let sets: Vec<&[u8]> = run.iter().map(|e| &e.payload[..]).collect();
    let combined = changeset::combine(&sets).map_err(|e| ApplyError::Transient(e.to_string()))?;
    apply(
        db,
        &Entry {
            seq: last.seq,
            kind: Kind::Changeset,
            payload: combined.into(),
        },
    )
}

/// Writes the log's first entry (the database whole) as the copy at `path`.
pub(crate) async fn restore(log: &ShardLog, path: &Path) -> Result<(), String> {
    let first = log.get(1).await.map_err(|e| e.to_string())?;
    if first.kind != Kind::Image {
        return Err(format!(
            "shard {}: the log's first entry is not an image",
            log.shard()
        ));
    }
    remove_db(path);
    std::fs::write(path, &first.payload).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let db = open_copy(path)?;
    set_seq(db.conn(), 1).map_err(|e| e.to_string())?;
    Ok(())
}

impl Standby {
    /// Starts keeping the copy at `path` at the end of `log`.
    pub(crate) fn start(log: ShardLog, path: PathBuf) -> Standby {
        let applied = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = mpsc::channel();
        let shared = applied.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tenantsync-standby-{}", log.shard()))
            .spawn(move || follow(log, path, shared, stop_rx))
            .expect("spawning a standby thread");
        Standby {
            stop,
            thread: Some(thread),
            applied,
        }
    }

    /// The last entry applied.
    pub(crate) fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Stops applying (after the entry in progress) and closes the copy:
    /// the last entry applied.
    pub(crate) async fn stop(mut self) -> u64 {
        let (tx, rx) = oneshot::channel();
        let _ = self.stop.send(tx);
        let seq = rx.await.unwrap_or_else(|_| self.applied());
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        seq
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let (tx, _rx) = oneshot::channel();
        let _ = self.stop.send(tx);
    }
}

fn follow(
    log: ShardLog,
    path: PathBuf,
    applied: Arc<AtomicU64>,
    stop: mpsc::Receiver<oneshot::Sender<u64>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return tracing::error!(error = %e, "standby runtime"),
    };
    // The NATS client spawns tasks when its subscriptions drop.
    let _context = rt.enter();
    let shard = log.shard();
    let retry = Duration::from_millis(500);
    loop {
        let restored = if path.exists() {
            Ok(())
        } else {
            rt.block_on(restore(&log, &path))
        };
        if let Err(e) = restored {
            tracing::warn!(shard, error = %e, "standby: cannot restore the shard's copy yet");
            if wait_or_stop(&stop, retry, &applied) {
                return;
            }
            continue;
        }
        let db = match open_copy(&path) {
            Ok(db) => db,
            Err(e) => {
                tracing::error!(shard, error = %e, "standby: cannot open the copy; rebuilding it");
                remove_db(&path);
                continue;
            }
        };
        let mut seq = match applied_seq(db.conn()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(shard, error = %e, "standby: the copy has no log position; rebuilding it");
                drop(db);
                remove_db(&path);
                continue;
            }
        };
        applied.store(seq, Ordering::Release);
        let mut tail = match rt.block_on(log.tail(seq + 1)) {
            Ok(t) => Box::pin(t),
            Err(e) => {
                tracing::warn!(shard, error = %e, "standby: cannot read the log");
                if wait_or_stop(&stop, retry, &applied) {
                    return;
                }
                continue;
            }
        };
        // An entry read while gathering a run, to apply after it.
        let mut held: Option<Entry> = None;
        loop {
            if let Ok(reply) = stop.try_recv() {
                let _ = reply.send(seq);
                return;
            }
            let next = match held.take() {
                Some(e) => Ok(Some(Ok(e))),
                None => rt.block_on(async {
                    tokio::time::timeout(Duration::from_millis(100), tail.next()).await
                }),
            };
            match next {
                Err(_) => continue,
                Ok(Some(Ok(entry))) if entry.seq <= seq => continue,
                Ok(Some(Ok(entry))) => {
                    // A copy that is behind applies the changesets already
                    // read as one run (one transaction, one pass per table).
                    let mut run = vec![entry];
                    while run.len() < MAX_RUN && run[0].kind == Kind::Changeset {
                        match tail.next().now_or_never() {
                            Some(Some(Ok(e))) if e.kind == Kind::Changeset => run.push(e),
                            Some(Some(Ok(e))) => {
                                held = Some(e);
                                break;
                            }
                            _ => break,
                        }
                    }
                    let last = run[run.len() - 1].seq;
                    match apply_run(&db, &run) {
                        Ok(()) => {
                            seq = last;
                            applied.store(seq, Ordering::Release);
                        }
                        Err(ApplyError::Transient(e)) => {
                            tracing::warn!(shard, seq = last, error = %e, "standby: entries did not apply; applying them again");
                            if wait_or_stop(&stop, retry, &applied) {
                                return;
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::error!(shard, seq = last, error = %e, "standby: rebuilding the copy from the log");
                            drop(tail);
                            drop(db);
                            remove_db(&path);
                            break;
                        }
                    }
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(shard, error = %e, "standby: reading the log failed; reading again");
                    break;
                }
                Ok(None) => break,
            }
        }
    }
}

/// Waits `d`, or answers a stop: whether to stop.
fn wait_or_stop(
    stop: &mpsc::Receiver<oneshot::Sender<u64>>,
    d: Duration,
    applied: &AtomicU64,
) -> bool {
    match stop.recv_timeout(d) {
        Ok(reply) => {
            let _ = reply.send(applied.load(Ordering::Acquire));
            true
        }
        Err(mpsc::RecvTimeoutError::Timeout) => false,
        Err(mpsc::RecvTimeoutError::Disconnected) => true,
    }
}
