//! [`CrrConnection`]: a rusqlite connection with the CRR engine installed,
//! and the typed API beside the SQL one.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tenantsync_types::Value;

use crate::change::{Change, ChangesQuery, RowRef, SiteFilter};
use crate::crr;
use crate::error::{Error, Result};
use crate::functions;
use crate::merge::{ApplyOptions, ApplyReport, ApplyStats, ChangeRef, merge_batch};
use crate::pack::{PackedPk, canonicalize};
use crate::read::{RawChange, ScanSpec, Scanner, SiteMatch, read_row_all};
use crate::schema::{self, Schema};
use crate::site::SiteId;
use crate::state::{Shared, State, SyncBitGuard};

/// The layout version of our own tables, recorded in `crsql_master` under
/// `tenantsync_core_version`.
pub const LAYOUT_VERSION: i64 = 1;

/// A savepoint opened by [`CrrConnection::savepoint`].
#[derive(Debug)]
#[must_use = "release or roll back the savepoint"]
pub struct Savepoint {
    name: String,
    saved: (i64, bool, i64, i64),
}

/// Which local db_version merged clocks are stamped with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MergeStamping {
    /// cr-sqlite's rule: `max(local db_version + 1, pending, change.db_version)`,
    /// so a receiver's db_version never lags a sender's (Lamport-style).
    #[default]
    CrSqlite,
    /// The local transaction's version (`max(local + 1, pending)`), ignoring
    /// the sender's: a peer sending a huge db_version cannot inflate ours.
    /// For a server that merges from untrusted clients.
    Local,
}

/// How to open a database.
#[derive(Debug, Clone)]
pub struct Options {
    /// Open read-only (the database must have been opened read-write once).
    pub read_only: bool,
    /// Set (and persist) `merge-equal-values`; None keeps the stored setting.
    pub merge_equal_values: Option<bool>,
    /// Stamping of merged clocks.
    pub merge_stamping: MergeStamping,
    /// Site id for a new database (tests); ignored when one exists.
    pub site_id: Option<SiteId>,
    /// How long a statement waits for another connection's lock.
    pub busy_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            read_only: false,
            merge_equal_values: None,
            merge_stamping: MergeStamping::CrSqlite,
            site_id: None,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// A SQLite connection with the CRR engine installed: cr-sqlite's SQL
/// surface (`crsql_as_crr`, `crsql_changes`, ...) and a typed API.
///
/// Write through [`CrrConnection::conn`] with ordinary SQL; writes to CRRs
/// are tracked. Do not install commit or rollback hooks on it: the engine
/// uses them.
pub struct CrrConnection {
    // Field order matters for Drop: `Drop::drop` first drops the engine's
    // inner connection (finalizing its statements), then `conn` closes.
    conn: Connection,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CrrConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrrConnection")
            .field("site_id", &self.shared.site_id)
            .field("read_only", &self.shared.read_only)
            .finish()
    }
}

impl Drop for CrrConnection {
    fn drop(&mut self) {
        // SQLite frees a connection's client data (where rusqlite keeps the
        // hook closures) before it rolls back a transaction left open at
        // close, and then calls the rollback hook: a use after free. So end
        // an open transaction while the hooks are alive, then unregister
        // them before anything closes.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let _ = self.conn.commit_hook(None::<fn() -> bool>);
        let _ = self.conn.rollback_hook(None::<fn()>);
        // The inner connection shares the handle: its cached statements must
        // be finalized before sqlite3_close, or the close fails.
        if let Ok(mut st) = self.shared.state.lock() {
            st.close();
        } else if let Err(p) = self.shared.state.lock() {
            p.into_inner().close();
        }
    }
}

impl CrrConnection {
    /// Opens (creating if needed) a database file: WAL, synchronous=NORMAL.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Options::default())
    }

    /// Opens a private in-memory database.
    pub fn open_in_memory() -> Result<Self> {
        Self::open_with(":memory:", Options::default())
    }

    /// Opens with options.
    pub fn open_with(path: impl AsRef<Path>, opts: Options) -> Result<Self> {
        let flags = if opts.read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(path, flags)?;
        Self::from_connection(conn, opts)
    }

    fn from_connection(mut conn: Connection, opts: Options) -> Result<Self> {
        conn.busy_timeout(opts.busy_timeout)?;
        if !opts.read_only {
            let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        }
        check_layout(&conn)?;
        let site_id = if opts.read_only {
            read_site_id(&conn)?.ok_or(Error::NotInitialized)?
        } else {
            bootstrap(&conn, opts.site_id)?
        };
        let mut merge_equal_values = functions::stored_merge_equal_values(&conn)?;
        if let Some(v) = opts.merge_equal_values {
            if !opts.read_only && v != merge_equal_values {
                conn.execute(
                    "INSERT OR REPLACE INTO crsql_master (key, value) VALUES (?1, ?2)",
                    rusqlite::params![crr::config_key(crate::MERGE_EQUAL_VALUES), i64::from(v)],
                )?;
            }
            merge_equal_values = v;
        }
        // SAFETY: the inner connection borrows the handle of `conn`, which
        // `CrrConnection` owns and closes only after `Drop::drop` dropped the
        // inner connection (see the field comment). All use of both happens
        // on the thread that holds the `CrrConnection`.
        let inner = unsafe { Connection::from_handle(conn.handle())? };
        inner.set_prepared_statement_cache_capacity(1024);
        let shared = Arc::new(Shared::new(
            site_id,
            opts.read_only,
            merge_equal_values,
            State::new(inner, opts.merge_stamping),
        ));
        functions::install(&conn, &shared)?;
        let s = shared.clone();
        conn.commit_hook(Some(move || {
            s.on_commit();
            false
        }))?;
        let s = shared.clone();
        conn.rollback_hook(Some(move || s.on_rollback()))?;
        {
            let mut st = shared.lock()?;
            st.refresh(&shared)?;
        }
        Ok(CrrConnection { conn, shared })
    }

    /// The connection, for ordinary SQL (tracked).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The connection, mutably (for `transaction()`).
    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// This database's site id.
    pub fn site_id(&self) -> SiteId {
        self.shared.site_id
    }

    /// Whether the connection was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    /// The committed db_version (`crsql_db_version()`).
    pub fn db_version(&self) -> Result<i64> {
        let mut st = self.shared.lock()?;
        st.db_version(&self.shared)
    }

    /// Makes a table a CRR (`crsql_as_crr`): idempotent; existing rows get
    /// clocks.
    pub fn as_crr(&self, table: &str) -> Result<()> {
        let mut st = self.shared.lock()?;
        crr::as_crr(&self.shared, &mut st, None, table)
    }

    /// Whether `table` meets the rules of a CRR (`crsql_as_crr`'s checks:
    /// one non-nullable primary key, no other unique index, no checked
    /// foreign key, ...): for a CRR whose schema changed by other means
    /// than `crsql_commit_alter` (an index created on it).
    pub fn check_crr(&self, table: &str) -> Result<()> {
        crate::schema::check_compatible(&self.conn, table).map(drop)
    }

    /// Stops tracking a table (`crsql_as_table`).
    pub fn as_table(&self, table: &str) -> Result<()> {
        let mut st = self.shared.lock()?;
        crr::as_table(&self.shared, &mut st, table)
    }

    /// Runs a schema change of a CRR: `crsql_begin_alter`, `f` (e.g.
    /// `ALTER TABLE t ADD COLUMN c`), `crsql_commit_alter`, atomically.
    pub fn alter<T>(&self, table: &str, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        {
            let mut st = self.shared.lock()?;
            crr::begin_alter(&self.shared, &mut st, None, table)?;
        }
        match f(&self.conn) {
            Ok(v) => {
                let mut st = self.shared.lock()?;
                crr::commit_alter(&self.shared, &mut st, None, table)?;
                Ok(v)
            }
            Err(e) => {
                let _ = self
                    .conn
                    .execute_batch("ROLLBACK TO crsql_alter; RELEASE crsql_alter");
                Err(e)
            }
        }
    }

    /// The database's tables and columns, and which are CRRs.
    pub fn schema(&self) -> Result<Schema> {
        let mut st = self.shared.lock()?;
        st.refresh(&self.shared)?;
        let crrs: Vec<String> = st.tables().iter().map(|t| t.name.clone()).collect();
        schema::describe(st.conn(), &crrs)
    }

    /// Whether `table` is a CRR.
    pub fn is_crr(&self, table: &str) -> Result<bool> {
        let mut st = self.shared.lock()?;
        st.refresh(&self.shared)?;
        Ok(st.table(table).is_ok())
    }

    /// The `merge-equal-values` setting.
    pub fn merge_equal_values(&self) -> bool {
        self.shared.merge_equal_values.load(Relaxed)
    }

    /// Sets and persists `merge-equal-values` (0.16.3's site-id tie-break).
    pub fn set_merge_equal_values(&self, on: bool) -> Result<()> {
        let st = self.shared.lock()?;
        crr::set_merge_equal_values(&self.shared, &st, on)
    }

    /// The stamping of merged clocks.
    pub fn merge_stamping(&self) -> MergeStamping {
        self.shared.lock().map(|st| st.stamping).unwrap_or_default()
    }

    /// Changes the stamping of merged clocks (not persisted).
    pub fn set_merge_stamping(&self, stamping: MergeStamping) -> Result<()> {
        self.shared.lock()?.stamping = stamping;
        Ok(())
    }

    /// Gives the current write transaction a db_version of its own even if
    /// it changes no CRR row: records it as `pre_compact_dbversion` (the
    /// floor `crsql_db_version()` never goes below, as after a compaction)
    /// and returns it. A server uses it to mark an event that changes what
    /// subscribers see without changing data (a policy reload) with a
    /// version nothing else has. Must run inside a write transaction; the
    /// version is the committed db_version once the transaction commits.
    pub fn bump_db_version(&self) -> Result<i64> {
        if self.shared.read_only {
            return Err(Error::Invalid("the connection is read-only".into()));
        }
        if self.conn.is_autocommit() {
            return Err(Error::Invalid(
                "bump_db_version needs an open write transaction".into(),
            ));
        }
        let sh = &*self.shared;
        let mut st = sh.lock()?;
        let v = st.next_version(sh, None)?;
        st.conn().execute(
            "INSERT INTO crsql_master (key, value) VALUES ('pre_compact_dbversion', ?1)
             ON CONFLICT (key) DO UPDATE SET value = max(CAST(value AS INTEGER), excluded.value)",
            [v],
        )?;
        sh.wrote.store(true, Relaxed);
        Ok(v)
    }

    /// Opens a savepoint of the caller's transaction and remembers the
    /// engine's transaction counters, so that [`CrrConnection::rollback_to`]
    /// undoes a write whole: its rows and the db_version it would have
    /// consumed. (A plain `ROLLBACK TO` in SQL undoes the rows, but the
    /// connection would still count the version as used.)
    pub fn savepoint(&self, name: &str) -> Result<Savepoint> {
        let sh = &*self.shared;
        let _st = sh.lock()?;
        let saved = (
            sh.pending.load(Relaxed),
            sh.wrote.load(Relaxed),
            sh.seq.load(Relaxed),
            sh.rows_impacted.load(Relaxed),
        );
        self.conn
            .execute_batch(&format!("SAVEPOINT \"{}\"", name.replace('"', "\"\"")))?;
        Ok(Savepoint {
            name: name.to_owned(),
            saved,
        })
    }

    /// Rolls back to a savepoint of [`CrrConnection::savepoint`] (which stays
    /// open) and restores the transaction counters it remembered.
    pub fn rollback_to(&self, sp: &Savepoint) -> Result<()> {
        let sh = &*self.shared;
        let mut st = sh.lock()?;
        self.conn
            .execute_batch(&format!("ROLLBACK TO \"{}\"", sp.name.replace('"', "\"\"")))?;
        sh.pending.store(sp.saved.0, Relaxed);
        sh.wrote.store(sp.saved.1, Relaxed);
        sh.seq.store(sp.saved.2, Relaxed);
        sh.rows_impacted.store(sp.saved.3, Relaxed);
        st.invalidate();
        Ok(())
    }

    /// Releases a savepoint of [`CrrConnection::savepoint`].
    pub fn release(&self, sp: Savepoint) -> Result<()> {
        self.conn
            .execute_batch(&format!("RELEASE \"{}\"", sp.name.replace('"', "\"\"")))?;
        Ok(())
    }

    /// Changes matching `q`, in (db_version, seq) order.
    pub fn changes(&self, q: &ChangesQuery) -> Result<Vec<Change>> {
        let mut st = self.shared.lock()?;
        st.refresh(&self.shared)?;
        // Keys name rows as the merge does (the table's canonical key); a
        // key the table could not hold names no row.
        let table = match &q.table {
            Some(t) if q.pks.is_some() => Some(st.table(t)?),
            _ => None,
        };
        let spec = ScanSpec {
            lower: q.since.saturating_add(1),
            upper: q.until.unwrap_or(i64::MAX),
            tables: q.table.clone().map(|t| vec![t]),
            pks: q.pks.as_ref().map(|pks| {
                pks.iter()
                    .filter_map(|p| match &table {
                        Some(t) => t.canonical_key(&p.0).ok().map(|(c, _)| c),
                        None => Some(
                            canonicalize(&p.0)
                                .map(|(c, _)| c)
                                .unwrap_or_else(|_| p.0.clone()),
                        ),
                    })
                    .collect()
            }),
            site: match q.site {
                SiteFilter::Any => SiteMatch::Any,
                SiteFilter::Only(s) => SiteMatch::Eq(s.0.to_vec()),
                SiteFilter::Exclude(s) => SiteMatch::Ne(vec![s.0.to_vec()]),
            },
            need_val: true,
            empty: q.since == i64::MAX,
        };
        let mut scanner = Scanner::new(&mut st, spec)?;
        let mut out = Vec::new();
        while let Some(batch) = scanner.next_batch(&mut st)? {
            for raw in batch {
                out.push(to_change(raw)?);
            }
            if q.limit.is_some_and(|l| out.len() >= l) {
                break;
            }
        }
        Ok(out)
    }

    /// Every change after `since`, optionally without those authored by one
    /// site: `SELECT * FROM crsql_changes WHERE db_version > ? AND site_id IS NOT ?`.
    pub fn changes_since(&self, since: i64, exclude_site: Option<&SiteId>) -> Result<Vec<Change>> {
        self.changes(&ChangesQuery {
            since,
            site: exclude_site.map_or(SiteFilter::Any, |s| SiteFilter::Exclude(*s)),
            ..ChangesQuery::default()
        })
    }

    /// Merges changes, atomically: in one transaction, or in a savepoint of
    /// the caller's transaction. On error nothing is applied and the error
    /// names the change.
    pub fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats> {
        self.apply_with(changes, &ApplyOptions::default())
            .map(|r| r.stats)
    }

    /// [`CrrConnection::apply`] with the options of a merge of untrusted
    /// changes; reports the rows it changed.
    pub fn apply_with(&mut self, changes: &[Change], opts: &ApplyOptions) -> Result<ApplyReport> {
        self.with_batch("tenantsync_apply", |sh, st| {
            merge_batch(sh, st, changes.iter().map(change_ref), opts)
        })
    }

    /// (table, pk, db_version) of every row with a clock stamped in
    /// `(since, until]`, once per row (its highest such version), ordered by
    /// that version.
    pub fn changed_rows(&self, since: i64, until: Option<i64>) -> Result<Vec<RowRef>> {
        let mut st = self.shared.lock()?;
        st.refresh(&self.shared)?;
        let upper = until.unwrap_or(i64::MAX);
        let mut out: Vec<RowRef> = Vec::new();
        for t in st.tables().to_vec() {
            let sql = format!(
                "SELECT pk, max(db_version) FROM {} WHERE db_version > ?1 AND db_version <= ?2 GROUP BY pk",
                schema::dbv_table(&t.name)
            );
            let mut stmt = st.conn().prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params![since, upper], |r| {
                Ok(RowRef {
                    table: t.name.clone(),
                    pk: PackedPk(crate::state::pk_of_key(&t, r.get_ref(0)?)),
                    db_version: r.get(1)?,
                })
            })?;
            for r in rows {
                out.push(r?);
            }
        }
        out.sort_by(|a, b| (a.db_version, &a.table, &a.pk).cmp(&(b.db_version, &b.table, &b.pk)));
        Ok(out)
    }

    /// The whole clock state of these rows (sentinel and every cell, with
    /// current values), in (db_version, seq) order: what a replica needs
    /// when a row enters its view.
    pub fn row_changes(&self, table: &str, pks: &[PackedPk]) -> Result<Vec<Change>> {
        let mut st = self.shared.lock()?;
        st.refresh(&self.shared)?;
        st.table(table)?;
        drop(st);
        self.changes(&ChangesQuery {
            since: i64::MIN,
            table: Some(table.to_owned()),
            pks: Some(pks.to_vec()),
            ..ChangesQuery::default()
        })
    }

    /// The one reading of a key named from outside ([`crate::schema`]'s
    /// `TableInfo::canonical_key`): the packed key of the row a merge of a
    /// change with this pk writes, and [`CrrConnection::row_values`] reads.
    /// Refuses, naming the column, a key SQLite would not store (NULL, a
    /// rowid that is not an integer, a STRICT type mismatch).
    pub fn canonical_pk(&self, table: &str, pk: &PackedPk) -> Result<PackedPk> {
        let mut st = self.shared.lock()?;
        st.refresh(&self.shared)?;
        let t = st.table(table)?;
        Ok(PackedPk(t.canonical_key(&pk.0)?.0))
    }

    /// The current values of a base row in table column order (None: no
    /// such row).
    pub fn row_values(&self, table: &str, pk: &PackedPk) -> Result<Option<Vec<Value>>> {
        let mut st = self.shared.lock()?;
        st.refresh(&self.shared)?;
        let t = st.table(table)?;
        let (canon, _) = t.canonical_key(&pk.0)?;
        read_row_all(&st, &t, &canon)
    }

    /// Removes rows and their clock state without recording deletes: for
    /// partial replicas dropping rows that left their view (nothing syncs).
    /// Returns how many of the rows existed.
    pub fn evict(&mut self, table: &str, pks: &[PackedPk]) -> Result<usize> {
        let raw: Vec<Vec<u8>> = pks.iter().map(|p| p.0.clone()).collect();
        let mut st = self.shared.lock()?;
        crr::evict(&self.shared, &mut st, table, &raw)
    }

    /// Makes these rows exactly the given state: evicts them, then merges
    /// `changes` (their full clock state, e.g. from the server's
    /// [`CrrConnection::row_changes`]), atomically.
    pub fn replace_rows(
        &mut self,
        table: &str,
        pks: &[PackedPk],
        changes: &[Change],
    ) -> Result<ApplyStats> {
        let raw: Vec<Vec<u8>> = pks.iter().map(|p| p.0.clone()).collect();
        let table = table.to_owned();
        self.with_batch("tenantsync_replace", |sh, st| {
            crr::evict(sh, st, &table, &raw)?;
            merge_batch(
                sh,
                st,
                changes.iter().map(change_ref),
                &ApplyOptions::default(),
            )
            .map(|r| r.stats)
        })
    }

    /// Runs a merge batch in a savepoint with the sync bit set; on error the
    /// savepoint and the transaction counters are rolled back.
    fn with_batch<R>(
        &mut self,
        name: &str,
        f: impl FnOnce(&Shared, &mut State) -> Result<R>,
    ) -> Result<R> {
        if self.shared.read_only {
            return Err(Error::Invalid("the connection is read-only".into()));
        }
        let sh = &*self.shared;
        let mut st = sh.lock()?;
        let saved = (
            sh.pending.load(Relaxed),
            sh.wrote.load(Relaxed),
            sh.seq.load(Relaxed),
            sh.rows_impacted.load(Relaxed),
        );
        st.conn().execute_batch(&format!("SAVEPOINT {name}"))?;
        let result = {
            let _sync = SyncBitGuard::new(sh);
            f(sh, &mut st)
        };
        match result {
            Ok(stats) => {
                st.conn().execute_batch(&format!("RELEASE {name}"))?;
                Ok(stats)
            }
            Err(e) => {
                let _ = st
                    .conn()
                    .execute_batch(&format!("ROLLBACK TO {name}; RELEASE {name}"));
                sh.pending.store(saved.0, Relaxed);
                sh.wrote.store(saved.1, Relaxed);
                sh.seq.store(saved.2, Relaxed);
                sh.rows_impacted.store(saved.3, Relaxed);
                st.invalidate();
                Err(e)
            }
        }
    }
}

fn change_ref(c: &Change) -> ChangeRef<'_> {
    ChangeRef {
        table: &c.table,
        pk: &c.pk.0,
        cid: &c.cid,
        val: c.val.as_value_ref(),
        col_version: c.col_version,
        db_version: c.db_version,
        site_id: &c.site_id.0,
        cl: c.cl,
        seq: c.seq,
    }
}

fn to_change(raw: RawChange) -> Result<Change> {
    let site_id = SiteId::from_slice(&raw.site).ok_or_else(|| Error::SiteIdNot16 {
        hex: hex::encode(&raw.site),
        len: raw.site.len(),
    })?;
    Ok(Change {
        cid: raw.cid().to_owned(),
        table: raw.table.name.clone(),
        pk: PackedPk(raw.pk.to_vec()),
        val: raw.val,
        col_version: raw.col_version,
        db_version: raw.db_version,
        site_id,
        cl: raw.cl,
        seq: raw.seq,
    })
}

/// Refuses databases laid out by the cr-sqlite extension or by a newer
/// tenantsync-core.
fn check_layout(conn: &Connection) -> Result<()> {
    let pks_table: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%\\_\\_crsql\\_pks' ESCAPE '\\' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(t) = pks_table {
        return Err(Error::ForeignLayout {
            detail: format!("it has the lookaside table {t:?}"),
        });
    }
    let has_master: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'crsql_master'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if !has_master {
        return Ok(());
    }
    let ours: Option<i64> = conn
        .query_row(
            "SELECT CAST(value AS INTEGER) FROM crsql_master WHERE key = 'tenantsync_core_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let theirs: Option<String> = conn
        .query_row(
            "SELECT CAST(value AS TEXT) FROM crsql_master WHERE key = 'crsqlite_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match (ours, theirs) {
        (None, Some(v)) => Err(Error::ForeignLayout {
            detail: format!("crsql_master records crsqlite_version {v}"),
        }),
        (Some(v), _) if v > LAYOUT_VERSION => Err(Error::LayoutVersion {
            found: v,
            supported: LAYOUT_VERSION,
        }),
        _ => Ok(()),
    }
}

fn read_site_id(conn: &Connection) -> Result<Option<SiteId>> {
    let exists: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'crsql_site_id'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if !exists {
        return Ok(None);
    }
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT site_id FROM crsql_site_id WHERE ordinal = 0",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match blob {
        None => Ok(None),
        Some(b) => SiteId::from_slice(&b).map(Some).ok_or_else(|| {
            Error::Invalid(format!(
                "crsql_site_id ordinal 0 is {} bytes, not 16",
                b.len()
            ))
        }),
    }
}

/// Creates our global tables on first open and returns the site id.
fn bootstrap(conn: &Connection, wanted: Option<SiteId>) -> Result<SiteId> {
    if let Some(site) = read_site_id(conn)?
        && has_meta_tables(conn)?
    {
        return Ok(site);
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS crsql_master (key TEXT PRIMARY KEY, value ANY);
             CREATE TABLE IF NOT EXISTS crsql_site_id (site_id BLOB NOT NULL, ordinal INTEGER PRIMARY KEY);
             CREATE UNIQUE INDEX IF NOT EXISTS crsql_site_id_site_id ON crsql_site_id (site_id);
             CREATE TABLE IF NOT EXISTS crsql_tracked_peers (\"site_id\" BLOB NOT NULL, \"version\" INTEGER NOT NULL, \"seq\" INTEGER DEFAULT 0, \"tag\" INTEGER, \"event\" INTEGER, PRIMARY KEY (\"site_id\", \"tag\", \"event\")) STRICT;",
        )?;
        schema::create_meta_tables(conn)?;
        conn.execute(
            "INSERT OR IGNORE INTO crsql_master (key, value) VALUES ('tenantsync_core_version', ?1)",
            [LAYOUT_VERSION],
        )?;
        let site = match read_site_id(conn)? {
            Some(s) => s,
            None => {
                let site = match wanted {
                    Some(s) => s,
                    None => {
                        let b: Vec<u8> =
                            conn.query_row("SELECT randomblob(16)", [], |r| r.get(0))?;
                        SiteId::from_random(b.try_into().expect("randomblob(16)"))
                    }
                };
                conn.execute(
                    "INSERT INTO crsql_site_id (site_id, ordinal) VALUES (?1, 0)",
                    [site.0.as_slice()],
                )?;
                site
            }
        };
        Ok(site)
    })();
    match result {
        Ok(site) => {
            conn.execute_batch("COMMIT")?;
            Ok(site)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn has_meta_tables(conn: &Connection) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [schema::TABLES],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false))
}
