//! The `crsql_changes` virtual table (read and merge) and the
//! `crsql_unpack_columns(blob)` table-valued function.
//!
//! `crsql_changes` consumes these constraints (the rest SQLite checks):
//! `table =`, `pk =`, `db_version = > >= < <=`, `site_id = IS != IS NOT`.
//! The plan chosen is visible in `EXPLAIN QUERY PLAN` as the index string,
//! e.g. `SCAN crsql_changes VIRTUAL TABLE INDEX 1:dbv> site!=`: a plan with
//! `pk=` reads those rows' clocks directly, one with `dbv...` range-scans the
//! db_version indexes, one with `table=` only walks that table; only a plan
//! named `full` reads everything. Without ORDER BY (or with `ORDER BY
//! db_version[, seq]` ascending, which is consumed) rows come in
//! (db_version, seq) order.

use std::borrow::Cow;
use std::ffi::{CStr, c_int};
use std::marker::PhantomData;
use std::sync::Arc;

use rusqlite::types::ValueRef;
use rusqlite::vtab::{
    Context, CreateVTab, Filters, IndexConstraintOp, IndexInfo, Inserts, UpdateVTab, Updates, VTab,
    VTabConnection, VTabCursor, VTabKind, sqlite3_vtab, sqlite3_vtab_cursor,
};

use crate::error::Error;
use crate::merge::{ChangeRef, merge_single};
use crate::read::{RawChange, ScanSpec, Scanner, SiteMatch};
use crate::state::Shared;

const SCHEMA: &CStr = c"CREATE TABLE x(\"table\" TEXT NOT NULL, \"pk\" BLOB NOT NULL, \"cid\" TEXT NOT NULL, \"val\" ANY, \"col_version\" INTEGER NOT NULL, \"db_version\" INTEGER NOT NULL, \"site_id\" BLOB NOT NULL, \"cl\" INTEGER NOT NULL, \"seq\" INTEGER NOT NULL)";

const COL_TABLE: c_int = 0;
const COL_PK: c_int = 1;
const COL_VAL: c_int = 3;
const COL_DBV: c_int = 5;
const COL_SITE: c_int = 6;
const COL_SEQ: c_int = 8;

/// The `crsql_changes` table.
#[repr(C)]
pub(crate) struct ChangesTab {
    base: sqlite3_vtab,
    shared: Arc<Shared>,
}

/// A constraint the plan consumes, in argv order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Term {
    Table,
    Pk,
    DbvEq,
    DbvGt,
    DbvGe,
    DbvLt,
    DbvLe,
    SiteEq,
    SiteIs,
    SiteNe,
    SiteIsNot,
}

impl Term {
    fn token(self) -> &'static str {
        match self {
            Term::Table => "table=",
            Term::Pk => "pk=",
            Term::DbvEq => "dbv=",
            Term::DbvGt => "dbv>",
            Term::DbvGe => "dbv>=",
            Term::DbvLt => "dbv<",
            Term::DbvLe => "dbv<=",
            Term::SiteEq => "site=",
            Term::SiteIs => "site-is",
            Term::SiteNe => "site!=",
            Term::SiteIsNot => "site-is-not",
        }
    }

    fn parse(s: &str) -> Option<Term> {
        [
            Term::Table,
            Term::Pk,
            Term::DbvEq,
            Term::DbvGt,
            Term::DbvGe,
            Term::DbvLt,
            Term::DbvLe,
            Term::SiteEq,
            Term::SiteIs,
            Term::SiteNe,
            Term::SiteIsNot,
        ]
        .into_iter()
        .find(|t| t.token() == s)
    }

    fn of(column: c_int, op: &IndexConstraintOp) -> Option<Term> {
        use IndexConstraintOp::*;
        Some(match (column, op) {
            (COL_TABLE, SQLITE_INDEX_CONSTRAINT_EQ) => Term::Table,
            (COL_PK, SQLITE_INDEX_CONSTRAINT_EQ) => Term::Pk,
            (COL_DBV, SQLITE_INDEX_CONSTRAINT_EQ) => Term::DbvEq,
            (COL_DBV, SQLITE_INDEX_CONSTRAINT_GT) => Term::DbvGt,
            (COL_DBV, SQLITE_INDEX_CONSTRAINT_GE) => Term::DbvGe,
            (COL_DBV, SQLITE_INDEX_CONSTRAINT_LT) => Term::DbvLt,
            (COL_DBV, SQLITE_INDEX_CONSTRAINT_LE) => Term::DbvLe,
            (COL_SITE, SQLITE_INDEX_CONSTRAINT_EQ) => Term::SiteEq,
            (COL_SITE, SQLITE_INDEX_CONSTRAINT_IS) => Term::SiteIs,
            (COL_SITE, SQLITE_INDEX_CONSTRAINT_NE) => Term::SiteNe,
            (COL_SITE, SQLITE_INDEX_CONSTRAINT_ISNOT) => Term::SiteIsNot,
            _ => return None,
        })
    }
}

unsafe impl<'vtab> VTab<'vtab> for ChangesTab {
    type Aux = Arc<Shared>;
    type Cursor = ChangesCursor<'vtab>;

    fn connect(
        _db: &mut VTabConnection,
        aux: Option<&Arc<Shared>>,
        _module_name: &[u8],
        _database_name: &[u8],
        _table_name: &[u8],
        _args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        let shared = aux
            .cloned()
            .ok_or_else(|| rusqlite::Error::ModuleError("crsql_changes needs the engine".into()))?;
        Ok((
            Cow::Borrowed(SCHEMA),
            ChangesTab {
                base: sqlite3_vtab::default(),
                shared,
            },
        ))
    }

    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        let mut terms: Vec<(usize, Term)> = Vec::new();
        for (i, c) in info.constraints().enumerate() {
            if !c.is_usable() {
                continue;
            }
            if let Some(t) = Term::of(c.column(), &c.operator()) {
                terms.push((i, t));
            }
        }
        for (argv, (i, _)) in terms.iter().enumerate() {
            let mut u = info.constraint_usage(*i);
            u.set_argv_index(argv as c_int + 1);
            u.set_omit(true);
        }
        let has = |t: &[Term]| terms.iter().any(|(_, x)| t.contains(x));
        let (cost, rows, kind) = if has(&[Term::Pk]) && has(&[Term::Table]) {
            (5.0, 5, "")
        } else if has(&[Term::Pk]) {
            (50.0, 10, "")
        } else if has(&[Term::DbvEq]) {
            (100.0, 20, "")
        } else if has(&[Term::DbvGt, Term::DbvGe]) && has(&[Term::DbvLt, Term::DbvLe]) {
            (500.0, 200, "")
        } else if has(&[Term::DbvGt, Term::DbvGe]) {
            (2_000.0, 1_000, "")
        } else if has(&[Term::DbvLt, Term::DbvLe]) {
            (200_000.0, 100_000, "")
        } else if has(&[Term::Table]) {
            (500_000.0, 250_000, "")
        } else {
            (10_000_000.0, 1_000_000, "full")
        };
        let mut idx = terms
            .iter()
            .map(|(_, t)| t.token())
            .collect::<Vec<_>>()
            .join(" ");
        if idx.is_empty() {
            idx = kind.to_owned();
        }
        info.set_idx_str(&idx);
        let need_val = info.col_used() & (1 << COL_VAL) != 0;
        info.set_idx_num(i32::from(need_val));
        info.set_estimated_cost(cost);
        info.set_estimated_rows(rows);
        // Our order is (db_version, seq) ascending: consume a matching ORDER BY.
        let order: Vec<(c_int, bool)> = info
            .order_bys()
            .map(|o| (o.column(), o.is_order_by_desc()))
            .collect();
        let consumed = matches!(
            order.as_slice(),
            [(COL_DBV, false)] | [(COL_DBV, false), (COL_SEQ, false)]
        );
        info.set_order_by_consumed(consumed);
        Ok(true)
    }

    fn open(&'vtab mut self) -> rusqlite::Result<ChangesCursor<'vtab>> {
        Ok(ChangesCursor {
            base: sqlite3_vtab_cursor::default(),
            shared: self.shared.clone(),
            scanner: None,
            batch: Vec::new(),
            pos: 0,
            rowid: 0,
            phantom: PhantomData,
        })
    }
}

impl CreateVTab<'_> for ChangesTab {
    const KIND: VTabKind = VTabKind::EponymousOnly;
}

impl UpdateVTab<'_> for ChangesTab {
    fn delete(&mut self, _arg: ValueRef<'_>) -> rusqlite::Result<()> {
        Err(Error::ChangesReadOnly.into())
    }

    fn insert(&mut self, args: &Inserts<'_>) -> rusqlite::Result<i64> {
        let v: Vec<ValueRef<'_>> = args.iter().collect();
        if v.len() != 11 {
            return Err(Error::Invalid(format!(
                "crsql_changes has 9 columns, got {}",
                v.len().saturating_sub(2)
            ))
            .into());
        }
        let text = |i: usize, what: &str| -> rusqlite::Result<&str> {
            match v[i] {
                ValueRef::Text(t) => std::str::from_utf8(t).map_err(|_| {
                    Error::Invalid(format!("crsql_changes.{what} is not UTF-8")).into()
                }),
                ValueRef::Integer(_) | ValueRef::Real(_) | ValueRef::Blob(_) | ValueRef::Null => {
                    Err(Error::Invalid(format!("crsql_changes.{what} must be TEXT")).into())
                }
            }
        };
        let int = |i: usize| -> i64 {
            match v[i] {
                ValueRef::Integer(n) => n,
                ValueRef::Real(r) => r as i64,
                ValueRef::Text(t) => std::str::from_utf8(t)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0),
                _ => 0,
            }
        };
        let blob = |i: usize| -> &[u8] {
            match v[i] {
                ValueRef::Blob(b) | ValueRef::Text(b) => b,
                _ => &[],
            }
        };
        let cid_owned;
        let cid = match v[4] {
            // cr-sqlite reads cid as text; an integer -1 means the sentinel.
            ValueRef::Integer(n) => {
                cid_owned = n.to_string();
                cid_owned.as_str()
            }
            _ => text(4, "cid")?,
        };
        let change = ChangeRef {
            table: text(2, "table")?,
            pk: blob(3),
            cid,
            val: v[5],
            col_version: int(6),
            db_version: int(7),
            site_id: blob(8),
            cl: int(9),
            seq: int(10),
        };
        let sh = self.shared.clone();
        let mut st = sh.lock()?;
        let _sync = crate::state::SyncBitGuard::new(&sh);
        merge_single(&sh, &mut st, &change)?;
        Ok(0)
    }

    fn update(&mut self, _args: &Updates<'_>) -> rusqlite::Result<()> {
        Err(Error::ChangesReadOnly.into())
    }
}

/// A read of `crsql_changes`.
#[repr(C)]
pub(crate) struct ChangesCursor<'vtab> {
    base: sqlite3_vtab_cursor,
    shared: Arc<Shared>,
    scanner: Option<Scanner>,
    batch: Vec<RawChange>,
    pos: usize,
    rowid: i64,
    phantom: PhantomData<&'vtab ChangesTab>,
}

impl ChangesCursor<'_> {
    fn fetch(&mut self) -> rusqlite::Result<()> {
        self.batch.clear();
        self.pos = 0;
        let Some(scanner) = self.scanner.as_mut() else {
            return Ok(());
        };
        let mut st = self.shared.lock()?;
        if let Some(b) = scanner.next_batch(&mut st)? {
            self.batch = b;
        } else {
            self.scanner = None;
        }
        Ok(())
    }
}

/// Builds the scan from the plan's terms and their values.
fn spec_from(idx_num: c_int, idx_str: Option<&str>, args: &Filters<'_>) -> ScanSpec {
    let mut spec = ScanSpec {
        need_val: idx_num & 1 != 0,
        ..ScanSpec::default()
    };
    let terms: Vec<Term> = idx_str
        .unwrap_or("")
        .split(' ')
        .filter_map(Term::parse)
        .collect();
    for (i, term) in terms.into_iter().enumerate() {
        let v = args.iter().nth(i).unwrap_or(ValueRef::Null);
        match term {
            Term::Table => match v {
                ValueRef::Text(t) => {
                    let name = String::from_utf8_lossy(t).into_owned();
                    match &spec.tables {
                        Some(ts) if !ts.contains(&name) => spec.empty = true,
                        _ => spec.tables = Some(vec![name]),
                    }
                }
                _ => spec.empty = true,
            },
            Term::Pk => match v {
                ValueRef::Blob(b) => match &spec.pks {
                    Some(ps) if !ps.iter().any(|p| p == b) => spec.empty = true,
                    _ => spec.pks = Some(vec![b.to_vec()]),
                },
                _ => spec.empty = true,
            },
            Term::DbvEq | Term::DbvGt | Term::DbvGe | Term::DbvLt | Term::DbvLe => {
                apply_bound(&mut spec, term, v)
            }
            Term::SiteEq | Term::SiteIs | Term::SiteNe | Term::SiteIsNot => {
                let m = match (term, v) {
                    (Term::SiteIsNot, ValueRef::Null) => SiteMatch::Any,
                    (_, ValueRef::Null) => SiteMatch::Nothing,
                    (Term::SiteEq | Term::SiteIs, ValueRef::Blob(b)) => SiteMatch::Eq(b.to_vec()),
                    (Term::SiteEq | Term::SiteIs, _) => SiteMatch::Nothing,
                    (_, ValueRef::Blob(b)) => SiteMatch::Ne(vec![b.to_vec()]),
                    (_, _) => SiteMatch::Any,
                };
                spec.site = combine_sites(std::mem::take(&mut spec.site), m);
            }
        }
    }
    spec
}

/// Both site conditions at once.
fn combine_sites(a: SiteMatch, b: SiteMatch) -> SiteMatch {
    match (a, b) {
        (SiteMatch::Any, m) | (m, SiteMatch::Any) => m,
        (SiteMatch::Nothing, _) | (_, SiteMatch::Nothing) => SiteMatch::Nothing,
        (SiteMatch::Eq(x), SiteMatch::Eq(y)) => {
            if x == y {
                SiteMatch::Eq(x)
            } else {
                SiteMatch::Nothing
            }
        }
        (SiteMatch::Eq(x), SiteMatch::Ne(list)) | (SiteMatch::Ne(list), SiteMatch::Eq(x)) => {
            if list.contains(&x) {
                SiteMatch::Nothing
            } else {
                SiteMatch::Eq(x)
            }
        }
        (SiteMatch::Ne(mut l1), SiteMatch::Ne(l2)) => {
            l1.extend(l2);
            SiteMatch::Ne(l1)
        }
    }
}

/// Narrows the db_version bounds with one comparison.
fn apply_bound(spec: &mut ScanSpec, term: Term, v: ValueRef<'_>) {
    // The comparison `db_version OP v` under SQLite's rules: integers and
    // reals compare numerically, any number is less than text or blob, and a
    // comparison with NULL is never true.
    // Text that looks like a number compares as that number (the column has
    // INTEGER affinity).
    let numeric = match v {
        ValueRef::Text(t) => {
            let s = std::str::from_utf8(t).unwrap_or("").trim();
            s.parse::<i64>()
                .map(ValueRef::Integer)
                .or_else(|_| s.parse::<f64>().map(ValueRef::Real))
                .unwrap_or(v)
        }
        other => other,
    };
    let (lo, hi): (Option<i64>, Option<i64>) = match numeric {
        ValueRef::Null => {
            spec.empty = true;
            return;
        }
        ValueRef::Integer(n) => match term {
            Term::DbvEq => (Some(n), Some(n)),
            Term::DbvGt => match n.checked_add(1) {
                Some(x) => (Some(x), None),
                None => {
                    spec.empty = true;
                    return;
                }
            },
            Term::DbvGe => (Some(n), None),
            Term::DbvLt => match n.checked_sub(1) {
                Some(x) => (None, Some(x)),
                None => {
                    spec.empty = true;
                    return;
                }
            },
            Term::DbvLe => (None, Some(n)),
            _ => (None, None),
        },
        ValueRef::Real(r) => {
            if r.is_nan() {
                spec.empty = true;
                return;
            }
            let clamp = |x: f64| x.clamp(i64::MIN as f64, i64::MAX as f64) as i64;
            let integral = r.fract() == 0.0;
            match term {
                Term::DbvEq if integral => (Some(clamp(r)), Some(clamp(r))),
                Term::DbvEq => {
                    spec.empty = true;
                    return;
                }
                Term::DbvGt if integral => (Some(clamp(r).saturating_add(1)), None),
                Term::DbvGt | Term::DbvGe => (Some(clamp(r.ceil())), None),
                Term::DbvLt if integral => (None, Some(clamp(r).saturating_sub(1))),
                Term::DbvLt | Term::DbvLe => (None, Some(clamp(r.floor()))),
                _ => (None, None),
            }
        }
        ValueRef::Text(_) | ValueRef::Blob(_) => match term {
            // Every number is less than any text or blob.
            Term::DbvLt | Term::DbvLe => (None, None),
            _ => {
                spec.empty = true;
                return;
            }
        },
    };
    if let Some(lo) = lo {
        spec.lower = spec.lower.max(lo);
    }
    if let Some(hi) = hi {
        spec.upper = spec.upper.min(hi);
    }
}

unsafe impl VTabCursor for ChangesCursor<'_> {
    fn filter(
        &mut self,
        idx_num: c_int,
        idx_str: Option<&str>,
        args: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        let spec = spec_from(idx_num, idx_str, args);
        {
            let sh = self.shared.clone();
            let mut st = sh.lock()?;
            st.refresh(&sh)?;
            self.scanner = Some(Scanner::new(&mut st, spec)?);
        }
        self.rowid = 0;
        self.fetch()
    }

    fn next(&mut self) -> rusqlite::Result<()> {
        self.pos += 1;
        self.rowid += 1;
        if self.pos >= self.batch.len() {
            self.fetch()?;
        }
        Ok(())
    }

    fn eof(&self) -> bool {
        self.pos >= self.batch.len()
    }

    fn column(&self, ctx: &mut Context, i: c_int) -> rusqlite::Result<()> {
        let c = &self.batch[self.pos];
        match i {
            0 => ctx.set_result(&c.table.name),
            1 => ctx.set_result(&*c.pk),
            2 => ctx.set_result(c.cid()),
            3 => ctx.set_result(&c.val),
            4 => ctx.set_result(c.col_version),
            5 => ctx.set_result(c.db_version),
            6 => ctx.set_result(&*c.site),
            7 => ctx.set_result(c.cl),
            8 => ctx.set_result(c.seq),
            _ => Ok(()),
        }
    }

    fn rowid(&self) -> rusqlite::Result<i64> {
        Ok(self.rowid)
    }
}

/// `crsql_unpack_columns(blob)`: one row per packed value (column `cell`).
#[repr(C)]
pub(crate) struct UnpackTab {
    base: sqlite3_vtab,
}

unsafe impl<'vtab> VTab<'vtab> for UnpackTab {
    type Aux = ();
    type Cursor = UnpackCursor<'vtab>;

    fn connect(
        _db: &mut VTabConnection,
        _aux: Option<&()>,
        _module_name: &[u8],
        _database_name: &[u8],
        _table_name: &[u8],
        _args: &[&[u8]],
    ) -> rusqlite::Result<(Cow<'static, CStr>, Self)> {
        Ok((
            Cow::Borrowed(c"CREATE TABLE x(cell ANY, package BLOB HIDDEN)"),
            UnpackTab {
                base: sqlite3_vtab::default(),
            },
        ))
    }

    fn best_index(&self, info: &mut IndexInfo) -> rusqlite::Result<bool> {
        let mut found = None;
        for (i, c) in info.constraints().enumerate() {
            if c.is_usable()
                && c.column() == 1
                && c.operator() == IndexConstraintOp::SQLITE_INDEX_CONSTRAINT_EQ
            {
                found = Some(i);
            }
        }
        let Some(i) = found else {
            return Ok(false);
        };
        let mut u = info.constraint_usage(i);
        u.set_argv_index(1);
        u.set_omit(true);
        info.set_estimated_cost(1.0);
        info.set_estimated_rows(4);
        Ok(true)
    }

    fn open(&'vtab mut self) -> rusqlite::Result<UnpackCursor<'vtab>> {
        Ok(UnpackCursor {
            base: sqlite3_vtab_cursor::default(),
            values: Vec::new(),
            pos: 0,
            phantom: PhantomData,
        })
    }
}

impl CreateVTab<'_> for UnpackTab {
    const KIND: VTabKind = VTabKind::EponymousOnly;
}

#[repr(C)]
pub(crate) struct UnpackCursor<'vtab> {
    base: sqlite3_vtab_cursor,
    values: Vec<tenantsync_types::Value>,
    pos: usize,
    phantom: PhantomData<&'vtab UnpackTab>,
}

unsafe impl VTabCursor for UnpackCursor<'_> {
    fn filter(
        &mut self,
        _idx_num: c_int,
        _idx_str: Option<&str>,
        args: &Filters<'_>,
    ) -> rusqlite::Result<()> {
        self.pos = 0;
        self.values = match args.iter().next() {
            Some(ValueRef::Blob(b)) => crate::pack::unpack(b)
                .map_err(|e| Error::Invalid(format!("crsql_unpack_columns: {e}")))?,
            _ => Vec::new(),
        };
        Ok(())
    }

    fn next(&mut self) -> rusqlite::Result<()> {
        self.pos += 1;
        Ok(())
    }

    fn eof(&self) -> bool {
        self.pos >= self.values.len()
    }

    fn column(&self, ctx: &mut Context, i: c_int) -> rusqlite::Result<()> {
        if i == 0 {
            ctx.set_result(&self.values[self.pos])
        } else {
            Ok(())
        }
    }

    fn rowid(&self) -> rusqlite::Result<i64> {
        Ok(self.pos as i64)
    }
}
