//! SQLite's session extension, the little of it a cluster node uses:
//! [`Recorder`] records what one transaction writes to every table of a
//! connection's main database (a changeset), and [`apply`] replays a
//! changeset on another copy, refusing any conflict (a copy that is not the
//! one the changeset was recorded against). The bundled SQLite is built
//! with `SQLITE_ENABLE_SESSION` (`.cargo/config.toml`); rusqlite's safe
//! wrapper would need libclang at build time, so the few C functions are
//! declared here.
//!
//! A changeset holds row changes only, never schema changes, and only of
//! tables with a primary key (every table of a tenantsync database has
//! one).

use std::ffi::{c_char, c_int, c_void};
use std::ptr;

use rusqlite::Connection;
use rusqlite::ffi;

#[allow(non_camel_case_types)]
type sqlite3_session = c_void;
#[allow(non_camel_case_types)]
type sqlite3_changeset_iter = c_void;
#[allow(non_camel_case_types)]
type sqlite3_changegroup = c_void;

unsafe extern "C" {
    fn sqlite3session_create(
        db: *mut ffi::sqlite3,
        z_db: *const c_char,
        pp_session: *mut *mut sqlite3_session,
    ) -> c_int;
    fn sqlite3session_delete(p_session: *mut sqlite3_session);
    fn sqlite3session_attach(p_session: *mut sqlite3_session, z_tab: *const c_char) -> c_int;
    fn sqlite3session_isempty(p_session: *mut sqlite3_session) -> c_int;
    fn sqlite3session_changeset(
        p_session: *mut sqlite3_session,
        pn_changeset: *mut c_int,
        pp_changeset: *mut *mut c_void,
    ) -> c_int;
    fn sqlite3changeset_apply(
        db: *mut ffi::sqlite3,
        n_changeset: c_int,
        p_changeset: *mut c_void,
        x_filter: Option<unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int>,
        x_conflict: Option<
            unsafe extern "C" fn(*mut c_void, c_int, *mut sqlite3_changeset_iter) -> c_int,
        >,
        p_ctx: *mut c_void,
    ) -> c_int;
    fn sqlite3changegroup_new(pp: *mut *mut sqlite3_changegroup) -> c_int;
    fn sqlite3changegroup_add(p: *mut sqlite3_changegroup, n: c_int, data: *mut c_void) -> c_int;
    fn sqlite3changegroup_output(
        p: *mut sqlite3_changegroup,
        pn: *mut c_int,
        pp: *mut *mut c_void,
    ) -> c_int;
    fn sqlite3changegroup_delete(p: *mut sqlite3_changegroup);
}

/// `SQLITE_CHANGESET_ABORT`: a conflict handler's answer that undoes the
/// whole apply.
const CHANGESET_ABORT: c_int = 2;

/// Why recording or replaying a changeset failed.
#[derive(Debug, thiserror::Error)]
pub enum ChangesetError {
    #[error("the session extension failed ({what}): SQLite error code {code}")]
    Sqlite { what: &'static str, code: c_int },
    #[error(
        "the changeset does not apply to this copy of the shard (a row it changes differs or is missing): the copy diverged from the log"
    )]
    Conflict,
    #[error("a changeset of {0} bytes is over SQLite's limit")]
    TooLarge(usize),
}

fn check(what: &'static str, code: c_int) -> Result<(), ChangesetError> {
    if code == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(ChangesetError::Sqlite { what, code })
    }
}

/// Records every row change made through one connection to its main
/// database, from [`Recorder::start`] until it is dropped.
pub struct Recorder {
    session: *mut sqlite3_session,
}

// The session belongs to the connection's thread: a `Recorder` is created,
// used and dropped by the engine thread that owns the connection, and only
// moves between threads together with it.
unsafe impl Send for Recorder {}

impl Recorder {
    /// Starts recording changes to every table of `conn`'s main database
    /// (tables created later included).
    pub fn start(conn: &Connection) -> Result<Recorder, ChangesetError> {
        let mut session = ptr::null_mut();
        // SAFETY: the handle is the live connection's; the session is
        // deleted (Drop) before the engine closes the connection, which
        // owns both on one thread.
        let rc = unsafe { sqlite3session_create(conn.handle(), c"main".as_ptr(), &mut session) };
        check("sqlite3session_create", rc)?;
        let recorder = Recorder { session };
        // SAFETY: a valid session; NULL attaches every table.
        check("sqlite3session_attach", unsafe {
            sqlite3session_attach(recorder.session, ptr::null())
        })?;
        Ok(recorder)
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        // SAFETY: a valid session.
        unsafe { sqlite3session_isempty(self.session) != 0 }
    }

    /// The changes recorded so far, as a changeset.
    pub fn changeset(&self) -> Result<Vec<u8>, ChangesetError> {
        let mut n: c_int = 0;
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: a valid session; SQLite allocates the buffer, copied and
        // freed here.
        let rc = unsafe { sqlite3session_changeset(self.session, &mut n, &mut p) };
        let out = if p.is_null() || n <= 0 {
            Vec::new()
        } else {
            // SAFETY: SQLite wrote `n` bytes at `p`.
            unsafe { std::slice::from_raw_parts(p as *const u8, n as usize) }.to_vec()
        };
        // SAFETY: `p` came from SQLite's allocator (or is NULL).
        unsafe { ffi::sqlite3_free(p) };
        check("sqlite3session_changeset", rc)?;
        Ok(out)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // SAFETY: created by sqlite3session_create, deleted once.
        unsafe { sqlite3session_delete(self.session) }
    }
}

/// Several changesets, in order, as one: what applying them one after the
/// other would do (SQLite's changegroup), so a copy that is behind applies
/// a run of entries with one pass over each table.
pub fn combine(changesets: &[&[u8]]) -> Result<Vec<u8>, ChangesetError> {
    let mut group = ptr::null_mut();
    // SAFETY: a new changegroup, deleted below on every path.
    check("sqlite3changegroup_new", unsafe {
        sqlite3changegroup_new(&mut group)
    })?;
    let r = (|| {
        for cs in changesets {
            let n = c_int::try_from(cs.len()).map_err(|_| ChangesetError::TooLarge(cs.len()))?;
            // SAFETY: SQLite reads `n` bytes of the buffer, which outlives
            // the call.
            check("sqlite3changegroup_add", unsafe {
                sqlite3changegroup_add(group, n, cs.as_ptr() as *mut c_void)
            })?;
        }
        let mut n: c_int = 0;
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: a valid changegroup; SQLite allocates the output, copied
        // and freed here.
        let rc = unsafe { sqlite3changegroup_output(group, &mut n, &mut p) };
        let out = if p.is_null() || n <= 0 {
            Vec::new()
        } else {
            // SAFETY: SQLite wrote `n` bytes at `p`.
            unsafe { std::slice::from_raw_parts(p as *const u8, n as usize) }.to_vec()
        };
        // SAFETY: `p` came from SQLite's allocator (or is NULL).
        unsafe { ffi::sqlite3_free(p) };
        check("sqlite3changegroup_output", rc)?;
        Ok(out)
    })();
    // SAFETY: created above, deleted once.
    unsafe { sqlite3changegroup_delete(group) };
    r
}

unsafe extern "C" fn abort_on_conflict(
    _ctx: *mut c_void,
    _kind: c_int,
    _iter: *mut sqlite3_changeset_iter,
) -> c_int {
    CHANGESET_ABORT
}

/// Applies a changeset to `conn`'s main database (inside the caller's
/// transaction, if one is open), or nothing: any conflict aborts it whole.
pub fn apply(conn: &Connection, changeset: &[u8]) -> Result<(), ChangesetError> {
    let n =
        c_int::try_from(changeset.len()).map_err(|_| ChangesetError::TooLarge(changeset.len()))?;
    // SAFETY: the buffer outlives the call and SQLite only reads it; the
    // conflict handler takes no context.
    let rc = unsafe {
        sqlite3changeset_apply(
            conn.handle(),
            n,
            changeset.as_ptr() as *mut c_void,
            None,
            Some(abort_on_conflict),
            ptr::null_mut(),
        )
    };
    match rc {
        ffi::SQLITE_OK => Ok(()),
        ffi::SQLITE_ABORT => Err(ChangesetError::Conflict),
        code => Err(ChangesetError::Sqlite {
            what: "sqlite3changeset_apply",
            code,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT);
        CREATE TABLE w (k TEXT NOT NULL, n INTEGER NOT NULL, v BLOB, PRIMARY KEY (k, n)) WITHOUT ROWID;";

    fn pair() -> (Connection, Connection) {
        let a = Connection::open_in_memory().unwrap();
        let b = Connection::open_in_memory().unwrap();
        a.execute_batch(SCHEMA).unwrap();
        b.execute_batch(SCHEMA).unwrap();
        (a, b)
    }

    fn dump(c: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for q in [
            "SELECT id || ':' || ifnull(a, '-') FROM t ORDER BY id",
            "SELECT k || n || ':' || hex(v) FROM w ORDER BY k, n",
        ] {
            let mut st = c.prepare(q).unwrap();
            out.extend(
                st.query_map([], |r| r.get::<_, String>(0))
                    .unwrap()
                    .map(Result::unwrap),
            );
        }
        out
    }

    #[test]
    fn a_recorded_transaction_replays_to_the_same_rows() {
        let (a, b) = pair();
        let rounds = [
            "INSERT INTO t VALUES (1, 'x'), (2, 'y'); INSERT INTO w VALUES ('k', 1, x'00ff')",
            "UPDATE t SET a = 'z' WHERE id = 1; DELETE FROM t WHERE id = 2; INSERT INTO w VALUES ('k', 2, NULL)",
            "DELETE FROM w; INSERT INTO t VALUES (2, NULL)",
        ];
        for sql in rounds {
            a.execute_batch("BEGIN").unwrap();
            let rec = Recorder::start(&a).unwrap();
            a.execute_batch(sql).unwrap();
            assert!(!rec.is_empty());
            let cs = rec.changeset().unwrap();
            drop(rec);
            a.execute_batch("COMMIT").unwrap();
            b.execute_batch("BEGIN").unwrap();
            apply(&b, &cs).unwrap();
            b.execute_batch("COMMIT").unwrap();
            assert_eq!(dump(&a), dump(&b), "after {sql}");
        }
    }

    #[test]
    fn combined_changesets_replay_as_the_run_of_them() {
        let (a, b) = pair();
        let mut sets = Vec::new();
        for sql in [
            "INSERT INTO t VALUES (1, 'x'), (2, 'y')",
            "UPDATE t SET a = 'z' WHERE id = 1; INSERT INTO w VALUES ('k', 1, x'01')",
            "DELETE FROM t WHERE id = 2; UPDATE w SET v = x'02'",
        ] {
            let rec = Recorder::start(&a).unwrap();
            a.execute_batch(sql).unwrap();
            sets.push(rec.changeset().unwrap());
        }
        let refs: Vec<&[u8]> = sets.iter().map(Vec::as_slice).collect();
        apply(&b, &combine(&refs).unwrap()).unwrap();
        assert_eq!(dump(&a), dump(&b));
    }

    #[test]
    fn a_copy_that_diverged_refuses_the_changeset_whole() {
        let (a, b) = pair();
        a.execute_batch("INSERT INTO t VALUES (1, 'x')").unwrap();
        b.execute_batch("INSERT INTO t VALUES (1, 'other')")
            .unwrap();
        let rec = Recorder::start(&a).unwrap();
        a.execute_batch("INSERT INTO t VALUES (5, 'new'); UPDATE t SET a = 'y' WHERE id = 1")
            .unwrap();
        let cs = rec.changeset().unwrap();
        assert!(matches!(apply(&b, &cs), Err(ChangesetError::Conflict)));
        assert_eq!(dump(&b), vec!["1:other".to_owned()], "nothing half-applied");
        let idle = Recorder::start(&a).unwrap();
        assert!(idle.is_empty());
    }
}
