//! The on-disk layout of a node's shards: how many there are is recorded
//! in shard 0's database when it is created (`tenantsync_layout`), and a
//! server started with another number refuses with a clear message rather
//! than lose tenants (their rows are in the shards the recorded rule put
//! them in). A database written before shards existed has no record: it is
//! one shard, and keeps working as one.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::contract::StartError;
use crate::placement::Placement;

const CREATE: &str =
    "CREATE TABLE IF NOT EXISTS tenantsync_layout (key TEXT PRIMARY KEY, value INTEGER NOT NULL)";

/// The database file of shard `k`: the configured path for shard 0, the
/// path with `.shard<k>` appended for the others.
pub fn shard_path(db: &Path, k: usize) -> std::path::PathBuf {
    if k == 0 {
        db.to_owned()
    } else {
        let mut s = db.as_os_str().to_owned();
        s.push(format!(".shard{k}"));
        std::path::PathBuf::from(s)
    }
}

fn layout_err(path: &Path, e: rusqlite::Error) -> StartError {
    StartError::Layout(format!(
        "cannot read the shard layout of {}: {e}",
        path.display()
    ))
}

/// The number of shards recorded in an existing database (`None`: a new
/// database; `Some(1)` for one written before shards existed).
fn recorded(db: &Path) -> Result<Option<usize>, StartError> {
    if !db.exists() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| layout_err(db, e))?;
    let has_table: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tenantsync_layout'",
            [],
            |_| Ok(true),
        )
        .optional()
        .map_err(|e| layout_err(db, e))?
        .unwrap_or(false);
    if !has_table {
        let has_data: bool = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'crsql_site_id'",
                [],
                |_| Ok(true),
            )
            .optional()
            .map_err(|e| layout_err(db, e))?
            .unwrap_or(false);
        return Ok(has_data.then_some(1));
    }
    let n: Option<i64> = conn
        .query_row(
            "SELECT value FROM tenantsync_layout WHERE key = 'shards'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| layout_err(db, e))?;
    Ok(n.map(|n| n.max(1) as usize))
}

/// Refuses a start with another number of shards than the database has.
pub(crate) fn check(db: &Path, shards: usize) -> Result<(), StartError> {
    match recorded(db)? {
        Some(n) if n != shards => Err(StartError::Layout(format!(
            "{} holds {n} shard{} and the server was started with {shards}: tenants live in the shard the recorded number puts them in, so the number cannot change. Start with --shards {n} (or `shards = {n}`), or export the data and import it into a new database",
            db.display(),
            if n == 1 { "" } else { "s" }
        ))),
        _ => Ok(()),
    }
}

/// Records the number of shards in shard 0 (once).
pub(crate) fn record(db: &Path, shards: usize) -> Result<(), StartError> {
    let conn = Connection::open(db).map_err(|e| layout_err(db, e))?;
    conn.execute_batch(CREATE).map_err(|e| layout_err(db, e))?;
    conn.execute(
        "INSERT OR IGNORE INTO tenantsync_layout (key, value) VALUES ('shards', ?1)",
        [shards as i64],
    )
    .map_err(|e| layout_err(db, e))?;
    Ok(())
}

/// Refuses an override that would move a tenant another shard already
/// holds peers of (moving a tenant's data is not supported).
pub(crate) fn check_overrides(db: &Path, placement: &Placement) -> Result<(), StartError> {
    for (tenant, &to) in placement.overrides() {
        for k in (0..placement.shards()).filter(|k| *k != to) {
            let path = shard_path(db, k);
            let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| layout_err(&path, e))?;
            let held: bool = conn
                .query_row(
                    "SELECT 1 FROM tenantsync_peers WHERE tenant = ?1 LIMIT 1",
                    [tenant],
                    |_| Ok(true),
                )
                .optional()
                .map_err(|e| layout_err(&path, e))?
                .unwrap_or(false);
            if held {
                return Err(StartError::Layout(format!(
                    "the shard override puts tenant {tenant:?} in shard {to}, but shard {k} holds its peers: moving a tenant's data is not supported. Remove the override"
                )));
            }
        }
    }
    Ok(())
}
