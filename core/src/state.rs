//! The per-connection engine state shared by the SQL functions, the
//! `crsql_changes` virtual table, the hooks and the typed API.
//!
//! [`Shared`] splits it in two:
//! - transaction counters in atomics (db_version cache, pending version, seq,
//!   rows impacted, sync bit) that the commit/rollback hooks and the trigger
//!   `WHEN` clause touch without locking — a hook may run while the engine is
//!   inside a call (e.g. `RELEASE` of `crsql_as_crr`'s savepoint commits);
//! - [`State`] behind a mutex: the non-owning inner [`Connection`] with its
//!   statement cache, the CRR table cache and the site-ordinal cache.
//!
//! All callbacks run on the thread that is using the connection (SQLite calls
//! them synchronously), so the mutex is never contended: `try_lock` failing
//! means re-entrancy (a user trigger fired by a merge calling back into the
//! engine), which is refused with [`Error::Reentrant`] instead of deadlocking.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use std::cell::RefCell;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension};
use tenantsync_types::Value;

use crate::clock::RowClock;
use crate::connection::MergeStamping;
use crate::error::version_overflow;
use crate::error::{Error, Result};
use crate::raw::{Bind, RawStmt};
use crate::schema::{self, TableInfo};
use crate::site::SiteId;

/// State shared by everything installed on one connection.
pub(crate) struct Shared {
    pub site_id: SiteId,
    pub read_only: bool,
    /// `crsql_internal_sync_bit()`: non-zero while the engine merges, so the
    /// tracking triggers do not fire.
    pub sync_bit: AtomicI64,
    /// Committed db_version; -1 = unknown (read from storage on next use).
    pub db_version: AtomicI64,
    /// Version reserved by the current write transaction; -1 = none.
    pub pending: AtomicI64,
    /// Whether the current write transaction wrote clock records.
    pub wrote: AtomicBool,
    pub seq: AtomicI64,
    pub rows_impacted: AtomicI64,
    /// Whether data/schema versions were checked in the current write tx.
    pub checked: AtomicBool,
    /// A rollback happened: cached site ordinals may be gone.
    pub dirty: AtomicBool,
    pub merge_equal_values: AtomicBool,
    pub state: Mutex<State>,
}

impl Shared {
    pub fn new(site_id: SiteId, read_only: bool, merge_equal_values: bool, state: State) -> Self {
        Shared {
            site_id,
            read_only,
            sync_bit: AtomicI64::new(0),
            db_version: AtomicI64::new(-1),
            pending: AtomicI64::new(-1),
            wrote: AtomicBool::new(false),
            seq: AtomicI64::new(0),
            rows_impacted: AtomicI64::new(0),
            checked: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            merge_equal_values: AtomicBool::new(merge_equal_values),
            state: Mutex::new(state),
        }
    }

    /// Locks the engine state; fails on re-entrancy instead of deadlocking.
    pub fn lock(&self) -> Result<MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::WouldBlock) => Err(Error::Reentrant),
            // A panic inside a callback: every write the engine makes is
            // transactional, so the caches are the only thing at stake.
            Err(TryLockError::Poisoned(p)) => {
                let mut g = p.into_inner();
                g.invalidate();
                Ok(g)
            }
        }
    }

    /// Commit hook: a transaction that wrote clock records makes its pending
    /// version durable; one that did not leaves db_version alone (fix of
    /// cr-sqlite's no-op-write / next_db_version leaks).
    pub fn on_commit(&self) {
        if self.wrote.swap(false, Relaxed) {
            let pending = self.pending.load(Relaxed);
            let current = self.db_version.load(Relaxed);
            if current >= 0 {
                self.db_version.store(current.max(pending), Relaxed);
            }
        }
        self.reset_tx();
    }

    pub fn on_rollback(&self) {
        self.wrote.store(false, Relaxed);
        self.dirty.store(true, Relaxed);
        self.reset_tx();
    }

    fn reset_tx(&self) {
        self.pending.store(-1, Relaxed);
        self.seq.store(0, Relaxed);
        self.rows_impacted.store(0, Relaxed);
        self.checked.store(false, Relaxed);
    }

    pub fn bump_seq(&self) -> i64 {
        self.seq.fetch_add(1, Relaxed)
    }
}

/// Sets the sync bit for its lifetime (restoring the previous value), so the
/// engine's own base-table writes are not tracked.
pub(crate) struct SyncBitGuard<'a> {
    sh: &'a Shared,
    prev: i64,
}

impl<'a> SyncBitGuard<'a> {
    pub fn new(sh: &'a Shared) -> Self {
        let prev = sh.sync_bit.swap(1, Relaxed);
        SyncBitGuard { sh, prev }
    }
}

impl Drop for SyncBitGuard<'_> {
    fn drop(&mut self) {
        self.sh.sync_bit.store(self.prev, Relaxed);
    }
}

/// Whether the main database is in a write transaction right now.
pub(crate) fn in_write_tx(conn: &Connection) -> bool {
    matches!(
        conn.transaction_state(Some(c"main")),
        Ok(rusqlite::TransactionState::Write)
    )
}

/// Site id ordinals (`crsql_site_id`), cached both ways.
#[derive(Default)]
pub(crate) struct SiteCache {
    by_ord: HashMap<i64, Vec<u8>>,
    by_blob: HashMap<Vec<u8>, i64>,
    /// Ordinals inserted by the current transaction: verified before reuse,
    /// since a `ROLLBACK TO` may have removed them.
    fresh: HashSet<i64>,
    /// The last site id looked up and its ordinal (a batch of changes
    /// usually comes from few sites).
    last: Option<([u8; 16], usize, i64)>,
}

impl SiteCache {
    fn clear(&mut self) {
        self.by_ord.clear();
        self.by_blob.clear();
        self.fresh.clear();
        self.last = None;
    }

    /// The ordinal of a site id, creating it when new. NULL/empty = 0;
    /// anything else must be 16 bytes.
    pub fn ordinal(&mut self, conn: &Connection, blob: &[u8]) -> Result<i64> {
        if blob.is_empty() {
            return Ok(0);
        }
        if blob.len() > 16 {
            return Err(Error::SiteIdTooLong { len: blob.len() });
        }
        if blob.len() < 16 {
            // cr-sqlite stores it; the typed change feed could then not
            // read the database's changes back (a `SiteId` is 16 bytes).
            return Err(Error::SiteIdTooShort { len: blob.len() });
        }
        if let Some((bytes, len, ord)) = &self.last
            && bytes[..*len] == *blob
            && (self.fresh.is_empty() || !self.fresh.contains(ord))
        {
            return Ok(*ord);
        }
        if let Some(&ord) = self.by_blob.get(blob)
            && !self.fresh.contains(&ord)
        {
            self.remember(blob, ord);
            return Ok(ord);
        }
        let found: Option<i64> = conn
            .prepare_cached("SELECT ordinal FROM crsql_site_id WHERE site_id = ?1")?
            .query_row([blob], |r| r.get(0))
            .optional()?;
        let ord = match found {
            Some(ord) => ord,
            None => {
                let ord: i64 = conn
                    .prepare_cached(
                        "INSERT INTO crsql_site_id (site_id) VALUES (?1) RETURNING ordinal",
                    )?
                    .query_row([blob], |r| r.get(0))?;
                self.fresh.insert(ord);
                ord
            }
        };
        self.by_blob.insert(blob.to_vec(), ord);
        self.by_ord.insert(ord, blob.to_vec());
        self.remember(blob, ord);
        Ok(ord)
    }

    /// Whether a site id already has an ordinal (NULL/empty: the local
    /// site, always). Creates nothing.
    fn known(&self, conn: &Connection, blob: &[u8]) -> Result<bool> {
        if blob.is_empty() || self.by_blob.contains_key(blob) {
            return Ok(true);
        }
        Ok(conn
            .prepare_cached("SELECT 1 FROM crsql_site_id WHERE site_id = ?1")?
            .exists([blob])?)
    }

    /// Removes a site id registered by a write that then failed (nothing
    /// references it), from the table and the cache.
    fn forget(&mut self, conn: &Connection, blob: &[u8]) -> Result<()> {
        conn.prepare_cached("DELETE FROM crsql_site_id WHERE site_id = ?1 AND ordinal <> 0")?
            .execute([blob])?;
        if let Some(ord) = self.by_blob.remove(blob) {
            self.by_ord.remove(&ord);
            self.fresh.remove(&ord);
        }
        self.last = None;
        Ok(())
    }

    fn remember(&mut self, blob: &[u8], ord: i64) {
        let mut bytes = [0u8; 16];
        bytes[..blob.len()].copy_from_slice(blob);
        self.last = Some((bytes, blob.len(), ord));
    }

    /// The site id blob of an ordinal.
    pub fn blob(&mut self, conn: &Connection, ord: i64) -> Result<&[u8]> {
        if !self.by_ord.contains_key(&ord) {
            let blob: Vec<u8> = conn
                .prepare_cached("SELECT site_id FROM crsql_site_id WHERE ordinal = ?1")?
                .query_row([ord], |r| r.get(0))
                .optional()?
                .ok_or_else(|| {
                    Error::Invalid(format!("clock references unknown site ordinal {ord}"))
                })?;
            self.by_blob.insert(blob.clone(), ord);
            self.by_ord.insert(ord, blob);
        }
        Ok(&self.by_ord[&ord])
    }
}

/// The mutex-protected part of the engine state.
pub(crate) struct State {
    conn: Option<Connection>,
    tables: Vec<Arc<TableInfo>>,
    by_name: HashMap<String, usize>,
    schema_version: i64,
    data_version: i64,
    db_version_sql: String,
    pub sites: SiteCache,
    pub stamping: MergeStamping,
    /// The table the last lookup by name found (the tracking triggers of a
    /// bulk write name the same table row after row).
    last_table: Option<Arc<TableInfo>>,
    /// Prepared statements by `TableInfo::id`; cleared on schema reload.
    stmts: RefCell<HashMap<u64, TableStmts, BuildIdHasher>>,
}

/// Hashes the `u64` ids of [`TableInfo`] as themselves (they are unique
/// counters), sparing a SipHash per statement lookup on the hot paths.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type BuildIdHasher = std::hash::BuildHasherDefault<IdHasher>;

impl State {
    pub fn new(conn: Connection, stamping: MergeStamping) -> Self {
        State {
            conn: Some(conn),
            tables: Vec::new(),
            by_name: HashMap::new(),
            schema_version: -1,
            data_version: -1,
            db_version_sql: String::new(),
            sites: SiteCache::default(),
            stamping,
            last_table: None,
            stmts: RefCell::new(HashMap::default()),
        }
    }

    /// The inner connection (same SQLite handle as the user's).
    pub fn conn(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("the engine state outlived its connection")
    }

    /// Drops the inner connection, finalizing its cached statements. Must run
    /// before the real connection closes.
    pub fn close(&mut self) {
        self.stmts.borrow_mut().clear();
        self.conn = None;
    }

    /// Forgets every cache (after a panic or an aborted batch).
    pub fn invalidate(&mut self) {
        self.sites.clear();
        self.schema_version = -1;
        self.data_version = -1;
        self.tables.clear();
        self.by_name.clear();
        self.last_table = None;
    }

    /// Makes the caches current: re-reads the CRR list when the schema
    /// changed, forgets the db_version when another connection committed.
    /// Free inside a write transaction after the first call.
    pub fn refresh(&mut self, sh: &Shared) -> Result<()> {
        let in_write = in_write_tx(self.conn());
        if in_write && sh.checked.load(Relaxed) && !sh.dirty.load(Relaxed) {
            return Ok(());
        }
        if sh.dirty.swap(false, Relaxed) {
            self.sites.clear();
            self.schema_version = -1;
        }
        let (dv, sv) = {
            let conn = self.conn();
            let dv: i64 = conn
                .prepare_cached("PRAGMA data_version")?
                .query_row([], |r| r.get(0))?;
            let sv: i64 = conn
                .prepare_cached("PRAGMA schema_version")?
                .query_row([], |r| r.get(0))?;
            (dv, sv)
        };
        if dv != self.data_version {
            self.data_version = dv;
            sh.db_version.store(-1, Relaxed);
        }
        if sv != self.schema_version {
            self.reload_schema()?;
            self.schema_version = sv;
            sh.db_version.store(-1, Relaxed);
        }
        if in_write && !sh.checked.swap(true, Relaxed) {
            self.sites.fresh.clear();
        }
        Ok(())
    }

    /// Re-reads every CRR's metadata.
    pub fn reload_schema(&mut self) -> Result<()> {
        let tables = schema::load_tables(self.conn())?;
        self.by_name = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let mut parts: Vec<String> = tables
            .iter()
            .map(|t| {
                format!(
                    "SELECT max(db_version) AS v FROM {}",
                    schema::dbv_table(&t.name)
                )
            })
            .collect();
        parts.push(
            "SELECT CAST(value AS INTEGER) AS v FROM crsql_master WHERE key = 'pre_compact_dbversion'"
                .to_owned(),
        );
        self.db_version_sql = format!(
            "SELECT coalesce(max(v), 0) FROM ({})",
            parts.join(" UNION ALL ")
        );
        self.tables = tables.into_iter().map(Arc::new).collect();
        self.last_table = None;
        self.stmts.borrow_mut().clear();
        Ok(())
    }

    /// The CRR with this name (re-reading the metadata once on a miss).
    pub fn table(&mut self, name: &str) -> Result<Arc<TableInfo>> {
        if let Some(t) = &self.last_table
            && t.name == name
        {
            return Ok(t.clone());
        }
        if let Some(&i) = self.by_name.get(name) {
            let t = self.tables[i].clone();
            self.last_table = Some(t.clone());
            return Ok(t);
        }
        self.reload_schema()?;
        self.by_name
            .get(name)
            .map(|&i| self.tables[i].clone())
            .ok_or_else(|| Error::UnknownTable {
                table: name.to_owned(),
            })
    }

    /// The ordinal of a site id (created when new; NULL/empty = 0).
    pub fn site_ordinal(&mut self, blob: &[u8]) -> Result<i64> {
        let conn = self
            .conn
            .as_ref()
            .expect("the engine state outlived its connection");
        self.sites.ordinal(conn, blob)
    }

    /// Whether a site id has an ordinal already (creates nothing).
    pub fn site_known(&self, blob: &[u8]) -> Result<bool> {
        let conn = self
            .conn
            .as_ref()
            .expect("the engine state outlived its connection");
        self.sites.known(conn, blob)
    }

    /// Undoes the registration of a site id whose write failed.
    pub fn forget_site(&mut self, blob: &[u8]) -> Result<()> {
        let conn = self
            .conn
            .as_ref()
            .expect("the engine state outlived its connection");
        self.sites.forget(conn, blob)
    }

    /// The site id of an ordinal.
    pub fn site_blob(&mut self, ord: i64) -> Result<&[u8]> {
        let conn = self
            .conn
            .as_ref()
            .expect("the engine state outlived its connection");
        self.sites.blob(conn, ord)
    }

    /// Every CRR, in name order.
    pub fn tables(&self) -> &[Arc<TableInfo>] {
        &self.tables
    }

    /// The committed db_version (cached).
    pub fn db_version(&mut self, sh: &Shared) -> Result<i64> {
        self.refresh(sh)?;
        let v = sh.db_version.load(Relaxed);
        if v >= 0 {
            return Ok(v);
        }
        if self.db_version_sql.is_empty() {
            self.reload_schema()?;
        }
        let v: i64 = self
            .conn()
            .prepare_cached(&self.db_version_sql)?
            .query_row([], |r| r.get(0))?;
        sh.db_version.store(v, Relaxed);
        Ok(v)
    }

    /// The version the current write transaction stamps: `max(db_version + 1,
    /// pending, merging)`, recorded as pending.
    pub fn next_version(&mut self, sh: &Shared, merging: Option<i64>) -> Result<i64> {
        let current = self.db_version(sh)?;
        let mut v = current
            .checked_add(1)
            .ok_or_else(version_overflow)?
            .max(sh.pending.load(Relaxed));
        if let Some(m) = merging {
            v = v.max(m);
        }
        sh.pending.store(v, Relaxed);
        Ok(v)
    }

    /// The version a merged clock gets under the configured stamping.
    pub fn merge_version(&mut self, sh: &Shared, change_version: i64) -> Result<i64> {
        match self.stamping {
            MergeStamping::CrSqlite => self.next_version(sh, Some(change_version)),
            MergeStamping::Local => self.next_version(sh, None),
        }
    }
}

/// The prepared statements of one CRR.
pub(crate) struct TableStmts {
    clock_get: RawStmt,
    clock_insert_new: RawStmt,
    clock_insert: RawStmt,
    clock_update: RawStmt,
    clock_delete: RawStmt,
    dbv_insert: RawStmt,
    dbv_delete: RawStmt,
    dbv_scan_from: RawStmt,
    dbv_scan_after: RawStmt,
    row_get: RawStmt,
    row_delete: RawStmt,
    row_insert_pk: RawStmt,
    /// Upserts of the base row by the set of columns they write (indexes into
    /// `TableInfo::cols`, increasing), most recently prepared last.
    upserts: RefCell<Vec<(Vec<usize>, RawStmt)>>,
}

/// How many column sets' upserts a table keeps prepared.
const UPSERTS_KEPT: usize = 32;

impl TableStmts {
    fn prepare(db: *mut rusqlite::ffi::sqlite3, t: &TableInfo) -> Result<TableStmts> {
        let p = |sql: &str| RawStmt::prepare(db, sql);
        Ok(TableStmts {
            clock_get: p(&t.sql.clock_get)?,
            clock_insert_new: p(&t.sql.clock_insert_new)?,
            clock_insert: p(&t.sql.clock_insert)?,
            clock_update: p(&t.sql.clock_update)?,
            clock_delete: p(&t.sql.clock_delete)?,
            dbv_insert: p(&t.sql.dbv_insert)?,
            dbv_delete: p(&t.sql.dbv_delete)?,
            dbv_scan_from: p(&t.sql.dbv_scan_from)?,
            dbv_scan_after: p(&t.sql.dbv_scan_after)?,
            row_get: p(&t.sql.row_get)?,
            row_delete: p(&t.sql.row_delete)?,
            row_insert_pk: p(&t.sql.row_insert_pk)?,
            upserts: RefCell::new(Vec::new()),
        })
    }
}

/// The clock/dbv-table key of a canonical packed pk.
pub(crate) fn key<'a>(t: &TableInfo, pk: &'a [u8]) -> Result<Bind<'a>> {
    if !t.int_key {
        return Ok(Bind::Blob(pk));
    }
    crate::pack::single_int(pk).map(Bind::Int).ok_or_else(|| {
        Error::Invalid(format!(
            "table {:?} has an INTEGER PRIMARY KEY: pk {} is not one integer",
            t.name,
            hex::encode(pk)
        ))
    })
}

/// The canonical packed pk of a clock/dbv-table key.
pub(crate) fn pk_of_key(t: &TableInfo, key: ValueRef<'_>) -> Vec<u8> {
    match key {
        ValueRef::Integer(i) if t.int_key => crate::pack::pack_int(i),
        ValueRef::Blob(b) => b.to_vec(),
        other => {
            let mut out = Vec::new();
            let _ = crate::pack::pack_into([other], 1, &mut out);
            out
        }
    }
}

impl State {
    fn db(&self) -> *mut rusqlite::ffi::sqlite3 {
        // SAFETY: the handle of the engine's own (non-owning) connection.
        unsafe { self.conn().handle() }
    }

    /// Runs `f` with the prepared statements of `t` (prepared on first use).
    fn with_stmts<R>(&self, t: &TableInfo, f: impl FnOnce(&TableStmts) -> Result<R>) -> Result<R> {
        {
            let map = self.stmts.borrow();
            if let Some(s) = map.get(&t.id) {
                return f(s);
            }
        }
        let prepared = TableStmts::prepare(self.db(), t)?;
        self.stmts.borrow_mut().insert(t.id, prepared);
        let map = self.stmts.borrow();
        f(&map[&t.id])
    }

    /// Deletes the base row with these primary-key values (merge of a delete).
    pub fn delete_row(&self, t: &TableInfo, pk: &[Value]) -> Result<()> {
        let binds: Vec<Bind<'_>> = pk.iter().map(|v| Bind::Value(v.as_value_ref())).collect();
        self.with_stmts(t, |s| s.row_delete.exec(&binds).map(drop))
    }

    /// Creates the base row with these primary-key values if it is missing,
    /// every other column at its default (merge of a create).
    pub fn ensure_row(&self, t: &TableInfo, pk: &[Value]) -> Result<()> {
        let binds: Vec<Bind<'_>> = pk.iter().map(|v| Bind::Value(v.as_value_ref())).collect();
        self.with_stmts(t, |s| s.row_insert_pk.exec(&binds).map(drop))
    }

    /// Writes these columns of the base row, creating it if missing:
    /// `cols` are (index into `TableInfo::cols`, value), indexes increasing.
    pub fn upsert_row(&self, t: &TableInfo, pk: &[Value], cols: &[(usize, Value)]) -> Result<()> {
        let mut binds: Vec<Bind<'_>> = Vec::with_capacity(pk.len() + cols.len());
        binds.extend(pk.iter().map(|v| Bind::Value(v.as_value_ref())));
        binds.extend(cols.iter().map(|(_, v)| Bind::Value(v.as_value_ref())));
        self.with_stmts(t, |s| {
            let mut upserts = s.upserts.borrow_mut();
            let found = upserts.iter().position(|(set, _)| {
                set.len() == cols.len() && set.iter().eq(cols.iter().map(|(i, _)| i))
            });
            let at = match found {
                Some(at) => at,
                None => {
                    let set: Vec<usize> = cols.iter().map(|(i, _)| *i).collect();
                    let stmt = RawStmt::prepare(self.db(), &t.upsert_sql(&set))?;
                    if upserts.len() >= UPSERTS_KEPT {
                        upserts.remove(0);
                    }
                    upserts.push((set, stmt));
                    upserts.len() - 1
                }
            };
            upserts[at].1.exec(&binds).map(drop)
        })
    }

    /// Reads a row's clock record.
    pub fn read_clock(&self, t: &TableInfo, pk: &[u8]) -> Result<Option<RowClock>> {
        let k = key(t, pk)?;
        self.with_stmts(t, |s| {
            let mut out = None;
            s.clock_get.query(&[k], |row| {
                out = Some(RowClock::decode(row.blob(0)).map_err(|e| {
                    Error::Invalid(format!("table {:?}, pk {}: {e}", t.name, hex::encode(pk)))
                })?);
                Ok(false)
            })?;
            Ok(out)
        })
    }

    /// Inserts the clock record of a row that has none; false if it had one.
    pub fn insert_new_clock(
        &self,
        t: &TableInfo,
        pk: &[u8],
        clock: &RowClock,
        version: i64,
    ) -> Result<bool> {
        let k = key(t, pk)?;
        let bytes = clock.encode();
        self.with_stmts(t, |s| {
            if s.clock_insert_new.exec(&[k, Bind::Blob(&bytes)])? == 0 {
                return Ok(false);
            }
            s.dbv_insert.exec(&[Bind::Int(version), k])?;
            Ok(true)
        })
    }

    /// Writes a row's clock record (deleting it when empty) and keeps the dbv
    /// index in step: versions that disappeared are removed, new ones added.
    pub fn write_clock(
        &self,
        t: &TableInfo,
        pk: &[u8],
        old: Option<&RowClock>,
        new: &RowClock,
    ) -> Result<()> {
        let k = key(t, pk)?;
        let old_versions = old.map(RowClock::versions).unwrap_or_default();
        let new_versions = new.versions();
        self.with_stmts(t, |s| {
            if new.is_empty() {
                if old.is_some() {
                    s.clock_delete.exec(&[k])?;
                }
            } else {
                let bytes = new.encode();
                if old.is_some() {
                    s.clock_update.exec(&[k, Bind::Blob(&bytes)])?;
                } else {
                    s.clock_insert.exec(&[k, Bind::Blob(&bytes)])?;
                }
            }
            for v in &old_versions {
                if new_versions.binary_search(v).is_err() {
                    s.dbv_delete.exec(&[Bind::Int(*v), k])?;
                }
            }
            for v in &new_versions {
                if old_versions.binary_search(v).is_err() {
                    s.dbv_insert.exec(&[Bind::Int(*v), k])?;
                }
            }
            Ok(())
        })
    }

    /// Appends up to `limit` (db_version, pk) entries of `t`'s dbv index
    /// within `[lower, upper]`, after `after` when given.
    pub fn dbv_scan(
        &self,
        t: &TableInfo,
        after: Option<(i64, &[u8])>,
        lower: i64,
        upper: i64,
        limit: i64,
        out: &mut std::collections::VecDeque<(i64, Vec<u8>)>,
    ) -> Result<usize> {
        let mut n = 0;
        let mut push = |row: &crate::raw::Row<'_>| {
            out.push_back((row.i64(0), pk_of_key(t, row.value(1))));
            n += 1;
            Ok(true)
        };
        match after {
            None => self.with_stmts(t, |s| {
                s.dbv_scan_from.query(
                    &[Bind::Int(lower), Bind::Int(upper), Bind::Int(limit)],
                    &mut push,
                )
            })?,
            Some((v, pk)) => {
                let k = key(t, pk)?;
                self.with_stmts(t, |s| {
                    s.dbv_scan_after.query(
                        &[Bind::Int(v), k, Bind::Int(upper), Bind::Int(limit)],
                        &mut push,
                    )
                })?
            }
        }
        Ok(n)
    }

    /// The non-PK values of a base row, in `cols` order (None: no row).
    pub fn read_row(&self, t: &TableInfo, pk: &[u8]) -> Result<Option<Vec<Value>>> {
        if t.cols.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let vals = crate::pack::unpack_refs(pk).map_err(|e| Error::pk(&t.name, pk, e))?;
        let binds: Vec<Bind<'_>> = vals.iter().map(|v| Bind::Value(*v)).collect();
        self.with_stmts(t, |s| {
            let mut out = None;
            s.row_get.query(&binds, |row| {
                let mut vals = Vec::with_capacity(t.cols.len());
                for i in 0..t.cols.len() {
                    vals.push(
                        Value::try_from(row.value(i as std::ffi::c_int))
                            .map_err(|e| Error::Invalid(format!("table {:?}: {e}", t.name)))?,
                    );
                }
                out = Some(vals);
                Ok(false)
            })?;
            Ok(out)
        })
    }
}
