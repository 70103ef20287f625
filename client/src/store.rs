//! The replica's own tables, beside the CRR tables, in the same database
//! file (docs/PROTOCOL.md §11.1). They are plain tables: never synced.
//!
//! - `tenantsync_replica_meta (key, value)`: `pushed_version` (the server's
//!   word), `push_floor`, `server_site_id`, `schema_applied`,
//!   `schema_version`.
//! - `tenantsync_replica_subs (id, query, tbl, cursor)`: one row per
//!   subscription; `cursor` NULL means "needs a full sync" (new, its query
//!   replaced, or some of its rows could not be restored after a refused push).
//! - `tenantsync_replica_held (sub, tbl, pk)`: the rows each subscription
//!   holds (canonical packed pks).
//! - `tenantsync_replica_merged (lo, hi)`: local db_versions `(lo, hi]`
//!   written by merges of server data: changes authored by this site in them
//!   came from the server and are never pushed again.
//! - `tenantsync_replica_quarantine`: local changes that were refused or had
//!   to make way for an eviction, with why (see [`crate::Quarantined`]).
//! - `tenantsync_replica_settle (tbl, pk, server_version)`: rows this
//!   replica pushed that no subscription held when the push was
//!   acknowledged (in server version `server_version`): once the server's
//!   deliveries up to that version are applied, those still unheld leave
//!   the replica (`Replica::settle_pushed`).

use rusqlite::{Connection, OptionalExtension, params};

/// Creates the replica's tables if missing (idempotent).
pub(crate) fn create(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS tenantsync_replica_meta (
           key TEXT PRIMARY KEY NOT NULL, value ANY);
         CREATE TABLE IF NOT EXISTS tenantsync_replica_subs (
           id TEXT PRIMARY KEY NOT NULL,
           query TEXT NOT NULL,
           tbl TEXT,
           cursor INTEGER);
         CREATE TABLE IF NOT EXISTS tenantsync_replica_held (
           sub TEXT NOT NULL, tbl TEXT NOT NULL, pk BLOB NOT NULL,
           PRIMARY KEY (sub, tbl, pk)) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS tenantsync_replica_held_row
           ON tenantsync_replica_held (tbl, pk);
         CREATE TABLE IF NOT EXISTS tenantsync_replica_merged (
           lo INTEGER PRIMARY KEY NOT NULL, hi INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS tenantsync_replica_quarantine (
           id INTEGER PRIMARY KEY,
           at_ms INTEGER NOT NULL,
           reason TEXT NOT NULL,
           code TEXT,
           command TEXT,
           policy TEXT,
           detail TEXT NOT NULL,
           push_from INTEGER,
           push_to INTEGER,
           -- Unused since evictions wait for the answer of a push in flight
           -- (kept so older replica files open unchanged).
           in_push INTEGER NOT NULL DEFAULT 0,
           tbl TEXT NOT NULL, pk BLOB NOT NULL, cid TEXT NOT NULL, val ANY,
           col_version INTEGER NOT NULL, db_version INTEGER NOT NULL,
           site_id BLOB NOT NULL, cl INTEGER NOT NULL, seq INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS tenantsync_replica_settle (
           tbl TEXT NOT NULL, pk BLOB NOT NULL, server_version INTEGER NOT NULL,
           PRIMARY KEY (tbl, pk)) WITHOUT ROWID;
         UPDATE tenantsync_replica_quarantine SET in_push = 0 WHERE in_push <> 0;
         COMMIT;",
    )
}

/// An integer from the meta table.
pub(crate) fn meta_i64(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT value FROM tenantsync_replica_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

/// A blob from the meta table.
pub(crate) fn meta_blob(conn: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.query_row(
        "SELECT value FROM tenantsync_replica_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .optional()
}

/// Sets a meta value.
pub(crate) fn set_meta(
    conn: &Connection,
    key: &str,
    value: impl rusqlite::ToSql,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO tenantsync_replica_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

pub(crate) const PUSHED_VERSION: &str = "pushed_version";
pub(crate) const PUSH_FLOOR: &str = "push_floor";
pub(crate) const SERVER_SITE_ID: &str = "server_site_id";
pub(crate) const SCHEMA_APPLIED: &str = "schema_applied";
pub(crate) const SCHEMA_VERSION: &str = "schema_version";
