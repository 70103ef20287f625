//! Prepared statements held directly (`sqlite3_stmt`), for the per-row hot
//! paths (tracking triggers, merges, change reads): no statement-cache
//! lookup by SQL text, no copy of bound blobs.
//!
//! A [`RawStmt`] is only ever used through [`RawStmt::exec`] and
//! [`RawStmt::query`], which bind every parameter, step and reset within one
//! call, so borrowed parameters never outlive the call.

use std::ffi::{CStr, c_int};
use std::ptr;

use rusqlite::ffi;
use rusqlite::types::ValueRef;

use crate::error::Result;

/// A parameter.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Bind<'a> {
    Int(i64),
    Blob(&'a [u8]),
    Value(ValueRef<'a>),
}

/// A prepared statement on the engine's connection.
pub(crate) struct RawStmt {
    db: *mut ffi::sqlite3,
    stmt: *mut ffi::sqlite3_stmt,
}

// SAFETY: a RawStmt belongs to the engine state, which lives behind a mutex
// and is only used on the thread that drives the connection (SQLite calls
// every callback synchronously); the connection is opened without SQLite's
// own mutex, which is allowed as long as one thread uses it at a time.
unsafe impl Send for RawStmt {}

fn error(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    // SAFETY: `db` is the open connection the statement was prepared on.
    let msg = unsafe {
        let p = ffi::sqlite3_errmsg(db);
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), msg)
}

impl RawStmt {
    /// Prepares `sql` (persistent) on the connection `db`.
    pub fn prepare(db: *mut ffi::sqlite3, sql: &str) -> Result<RawStmt> {
        let mut stmt = ptr::null_mut();
        // SAFETY: `db` is an open connection; `sql` is valid for its length.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr().cast(),
                c_int::try_from(sql.len()).unwrap_or(c_int::MAX),
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(error(db, rc).into());
        }
        Ok(RawStmt { db, stmt })
    }

    fn bind(&self, binds: &[Bind<'_>]) -> Result<()> {
        for (i, b) in binds.iter().enumerate() {
            let i = i as c_int + 1;
            // SAFETY: the statement is live; blob/text pointers stay valid
            // until `finish` clears the bindings at the end of the call that
            // bound them (SQLITE_STATIC).
            let rc = unsafe {
                match *b {
                    Bind::Int(v) | Bind::Value(ValueRef::Integer(v)) => {
                        ffi::sqlite3_bind_int64(self.stmt, i, v)
                    }
                    Bind::Blob(v) | Bind::Value(ValueRef::Blob(v)) => ffi::sqlite3_bind_blob64(
                        self.stmt,
                        i,
                        v.as_ptr().cast(),
                        v.len() as u64,
                        ffi::SQLITE_STATIC(),
                    ),
                    Bind::Value(ValueRef::Null) => ffi::sqlite3_bind_null(self.stmt, i),
                    Bind::Value(ValueRef::Real(r)) => ffi::sqlite3_bind_double(self.stmt, i, r),
                    Bind::Value(ValueRef::Text(t)) => ffi::sqlite3_bind_text64(
                        self.stmt,
                        i,
                        t.as_ptr().cast(),
                        t.len() as u64,
                        ffi::SQLITE_STATIC(),
                        ffi::SQLITE_UTF8 as u8,
                    ),
                }
            };
            if rc != ffi::SQLITE_OK {
                self.finish();
                return Err(error(self.db, rc).into());
            }
        }
        Ok(())
    }

    fn finish(&self) {
        // SAFETY: the statement is live.
        unsafe {
            ffi::sqlite3_reset(self.stmt);
            ffi::sqlite3_clear_bindings(self.stmt);
        }
    }

    /// Runs a statement that returns no rows; returns the rows it changed.
    pub fn exec(&self, binds: &[Bind<'_>]) -> Result<usize> {
        self.bind(binds)?;
        // SAFETY: the statement is live and fully bound.
        let rc = unsafe { ffi::sqlite3_step(self.stmt) };
        let result = match rc {
            ffi::SQLITE_DONE | ffi::SQLITE_ROW => {
                // SAFETY: `db` is open.
                Ok(unsafe { ffi::sqlite3_changes64(self.db) } as usize)
            }
            rc => Err(error(self.db, rc).into()),
        };
        self.finish();
        result
    }

    /// Runs a query, calling `f` for each row until it returns false.
    pub fn query(
        &self,
        binds: &[Bind<'_>],
        mut f: impl FnMut(&Row<'_>) -> Result<bool>,
    ) -> Result<()> {
        self.bind(binds)?;
        let result = loop {
            // SAFETY: the statement is live and fully bound.
            match unsafe { ffi::sqlite3_step(self.stmt) } {
                ffi::SQLITE_ROW => match f(&Row { stmt: self }) {
                    Ok(true) => continue,
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                },
                ffi::SQLITE_DONE => break Ok(()),
                rc => break Err(error(self.db, rc).into()),
            }
        };
        self.finish();
        result
    }
}

impl Drop for RawStmt {
    fn drop(&mut self) {
        // SAFETY: the statement is live and finalized exactly once; the
        // engine drops its statements before the connection closes.
        unsafe {
            ffi::sqlite3_finalize(self.stmt);
        }
    }
}

/// The current row of a [`RawStmt::query`].
pub(crate) struct Row<'s> {
    stmt: &'s RawStmt,
}

impl Row<'_> {
    pub fn i64(&self, i: c_int) -> i64 {
        // SAFETY: the statement is positioned on a row.
        unsafe { ffi::sqlite3_column_int64(self.stmt.stmt, i) }
    }

    /// A column as a borrowed value (valid while the row is current).
    pub fn value(&self, i: c_int) -> ValueRef<'_> {
        // SAFETY: the statement is positioned on a row; the returned
        // pointers are valid until the next step/reset, which cannot happen
        // while `self` is borrowed.
        unsafe {
            let s = self.stmt.stmt;
            match ffi::sqlite3_column_type(s, i) {
                ffi::SQLITE_INTEGER => ValueRef::Integer(ffi::sqlite3_column_int64(s, i)),
                ffi::SQLITE_FLOAT => ValueRef::Real(ffi::sqlite3_column_double(s, i)),
                ffi::SQLITE_TEXT => {
                    let p = ffi::sqlite3_column_text(s, i);
                    let n = ffi::sqlite3_column_bytes(s, i) as usize;
                    ValueRef::Text(if p.is_null() {
                        &[]
                    } else {
                        std::slice::from_raw_parts(p, n)
                    })
                }
                ffi::SQLITE_BLOB => {
                    let p = ffi::sqlite3_column_blob(s, i);
                    let n = ffi::sqlite3_column_bytes(s, i) as usize;
                    ValueRef::Blob(if p.is_null() {
                        &[]
                    } else {
                        std::slice::from_raw_parts(p.cast(), n)
                    })
                }
                _ => ValueRef::Null,
            }
        }
    }

    /// A BLOB column (empty for anything else).
    pub fn blob(&self, i: c_int) -> &[u8] {
        match self.value(i) {
            ValueRef::Blob(b) => b,
            _ => &[],
        }
    }
}
