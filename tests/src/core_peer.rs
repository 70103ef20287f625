//! A tenantsync-core database as a [`CrPeer`], so the interop tests drive
//! both kinds of peer through one interface.
//!
//! A [`CorePeer`] alternates between the two ways the core offers to read
//! and merge changes: the typed Rust API (`changes_since`, `apply`) and the
//! SQL surface (`SELECT ... FROM crsql_changes`, `INSERT INTO crsql_changes`),
//! so both paths meet real cr-sqlite peers in every run.

use std::cell::{Cell, RefCell};

use anyhow::{Context, Result, anyhow};
use tenantsync_core::{CrrConnection, Options, SiteId};
use tenantsync_types::Value;

use crate::peer::{Clock, CrPeer, Rows, SqlPeer, changes_by_sql};

/// Which of the core's interfaces a [`CorePeer`] reads and merges through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `changes_since` / `apply`.
    Typed,
    /// `SELECT ... FROM crsql_changes` / `INSERT INTO crsql_changes`.
    Sql,
    /// Typed and SQL by turns (every read and every merge switches).
    Alternate,
}

/// A tenantsync-core database in memory.
pub struct CorePeer {
    conn: RefCell<CrrConnection>,
    label: String,
    path: Path,
    /// Counts reads and merges, for [`Path::Alternate`].
    calls: Cell<u64>,
}

impl CorePeer {
    /// A fresh in-memory database with a random site id, alternating paths.
    pub fn open(label: &str) -> Result<CorePeer> {
        Self::open_with(label, Path::Alternate, Options::default())
    }

    /// A fresh in-memory database with a random site id using `path`.
    pub fn open_path(label: &str, path: Path) -> Result<CorePeer> {
        Self::open_with(label, path, Options::default())
    }

    /// A fresh in-memory database opened with `options`.
    pub fn open_with(label: &str, path: Path, options: Options) -> Result<CorePeer> {
        let conn = CrrConnection::open_with(":memory:", options)
            .with_context(|| format!("open core peer {label}"))?;
        Ok(CorePeer {
            conn: RefCell::new(conn),
            label: format!("core#{label}"),
            path,
            calls: Cell::new(0),
        })
    }

    /// The connection, for the core's own API.
    pub fn connection(&self) -> std::cell::Ref<'_, CrrConnection> {
        self.conn.borrow()
    }

    /// Whether this call takes the typed API (else SQL).
    fn typed(&self) -> bool {
        let n = self.calls.get();
        self.calls.set(n + 1);
        match self.path {
            Path::Typed => true,
            Path::Sql => false,
            Path::Alternate => n.is_multiple_of(2),
        }
    }
}

impl SqlPeer for CorePeer {
    fn exec(&self, sql: &str) -> Result<()> {
        SqlPeer::exec(self.conn.borrow().conn(), sql)
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        SqlPeer::query(self.conn.borrow().conn(), sql, params)
    }
}

impl CrPeer for CorePeer {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn site(&self) -> Result<Vec<u8>> {
        Ok(self.conn.borrow().site_id().0.to_vec())
    }

    fn version(&self) -> Result<i64> {
        Ok(self.conn.borrow().db_version()?)
    }

    fn changes(&self, filter: &str, params: &[Value]) -> Result<Vec<Clock>> {
        changes_by_sql(self, filter, params)
    }

    fn feed(&self, since: i64, exclude: Option<&[u8]>) -> Result<Vec<Clock>> {
        if !self.typed() {
            return crate::peer::feed_by_sql(self, since, exclude);
        }
        let exclude = exclude
            .map(|s| SiteId::from_slice(s).ok_or_else(|| anyhow!("site id length")))
            .transpose()?;
        let changes = self.conn.borrow().changes_since(since, exclude.as_ref())?;
        Ok(changes.iter().map(Clock::from_change).collect())
    }

    fn merge(&self, changes: &[Clock]) -> Result<()> {
        if self.typed() {
            let changes = changes
                .iter()
                .map(Clock::to_change)
                .collect::<Result<Vec<_>>>()?;
            self.conn.borrow_mut().apply(&changes)?;
        } else {
            let mut guard = self.conn.borrow_mut();
            let tx = guard.conn_mut().transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )?;
                for (i, c) in changes.iter().enumerate() {
                    stmt.execute(rusqlite::params_from_iter(c.to_row()))
                        .with_context(|| format!("INSERT INTO crsql_changes row {i}: {c}"))?;
                }
            }
            tx.commit()?;
        }
        Ok(())
    }
}
