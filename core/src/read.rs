//! Reading changes: the engine behind `SELECT ... FROM crsql_changes` and
//! [`crate::CrrConnection::changes`].
//!
//! A range read walks every CRR's `"<t>__crsql_dbv"` index from the lower
//! db_version bound (a k-way merge over the tables, in chunks), gathers the
//! rows stamped with the smallest pending db_version, reads each row's clock
//! record and (when `val` is wanted) its base row once, and emits the clocks
//! carrying that db_version sorted by seq. Output is therefore in exact
//! (db_version, seq) order and memory holds one transaction's changes.
//! A read restricted to primary keys reads those rows' clocks directly.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rusqlite::types::ToSqlOutput;
use tenantsync_types::Value;

use crate::clock::Clock;
use crate::error::Result;
use crate::merge::pk_refs;
use crate::schema::TableInfo;
use crate::state::State;

/// How the site filter compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum SiteMatch {
    /// No filter.
    #[default]
    Any,
    /// Only changes authored by this site.
    Eq(Vec<u8>),
    /// Changes authored by none of these sites.
    Ne(Vec<Vec<u8>>),
    /// Nothing matches (a comparison with NULL).
    Nothing,
}

/// What to read.
#[derive(Clone, Debug)]
pub(crate) struct ScanSpec {
    /// Inclusive db_version bounds.
    pub lower: i64,
    pub upper: i64,
    /// Restrict to these tables (None: all CRRs).
    pub tables: Option<Vec<String>>,
    /// Restrict to these packed pks (exact bytes).
    pub pks: Option<Vec<Vec<u8>>>,
    pub site: SiteMatch,
    /// Whether `val` must be read from the base table.
    pub need_val: bool,
    /// Whether the spec can match nothing (contradictory constraints).
    pub empty: bool,
}

impl Default for ScanSpec {
    fn default() -> Self {
        ScanSpec {
            lower: i64::MIN,
            upper: i64::MAX,
            tables: None,
            pks: None,
            site: SiteMatch::Any,
            need_val: true,
            empty: false,
        }
    }
}

/// One change as read, before conversion to SQL values or [`crate::Change`].
#[derive(Clone, Debug)]
pub(crate) struct RawChange {
    pub table: Arc<TableInfo>,
    pub pk: Arc<[u8]>,
    /// Index into `table.cols`; None = sentinel.
    pub col: Option<usize>,
    pub val: Value,
    pub col_version: i64,
    pub db_version: i64,
    pub site: Arc<[u8]>,
    pub cl: i64,
    pub seq: i64,
}

impl RawChange {
    pub fn cid(&self) -> &str {
        match self.col {
            Some(i) => &self.table.cols[i].name,
            None => crate::merge::SENTINEL,
        }
    }
}

const CHUNK: i64 = 512;

struct TableCursor {
    t: Arc<TableInfo>,
    buf: VecDeque<(i64, Vec<u8>)>,
    last: Option<(i64, Vec<u8>)>,
    exhausted: bool,
}

impl TableCursor {
    fn fill(&mut self, st: &State, spec: &ScanSpec) -> Result<()> {
        let after = self.last.as_ref().map(|(v, pk)| (*v, pk.as_slice()));
        let got = st.dbv_scan(&self.t, after, spec.lower, spec.upper, CHUNK, &mut self.buf)?;
        if let Some(back) = self.buf.back() {
            self.last = Some(back.clone());
        }
        if (got as i64) < CHUNK {
            self.exhausted = true;
        }
        Ok(())
    }
}

enum Mode {
    Range(Vec<TableCursor>),
    Pks { done: bool },
}

/// Produces changes one db_version (range reads) or one key set (pk reads) at
/// a time.
pub(crate) struct Scanner {
    spec: ScanSpec,
    mode: Mode,
    sites: HashMap<i64, Arc<[u8]>>,
}

impl Scanner {
    pub fn new(st: &mut State, spec: ScanSpec) -> Result<Scanner> {
        let tables: Vec<Arc<TableInfo>> = match &spec.tables {
            None => st.tables().to_vec(),
            Some(names) => {
                let mut out = Vec::new();
                for n in names {
                    // An unknown table simply matches nothing.
                    if let Ok(t) = st.table(n) {
                        out.push(t);
                    }
                }
                out
            }
        };
        let mode = if spec.pks.is_some() {
            Mode::Pks { done: false }
        } else {
            Mode::Range(
                tables
                    .into_iter()
                    .map(|t| TableCursor {
                        t,
                        buf: VecDeque::new(),
                        last: None,
                        exhausted: false,
                    })
                    .collect(),
            )
        };
        let mut s = Scanner {
            spec,
            mode,
            sites: HashMap::new(),
        };
        if s.spec.empty || s.spec.lower > s.spec.upper || s.spec.site == SiteMatch::Nothing {
            s.mode = Mode::Pks { done: true };
        }
        Ok(s)
    }

    /// The next batch of changes in (db_version, seq) order; None when done.
    pub fn next_batch(&mut self, st: &mut State) -> Result<Option<Vec<RawChange>>> {
        match &mut self.mode {
            Mode::Pks { done } => {
                if *done {
                    return Ok(None);
                }
                *done = true;
                let tables: Vec<Arc<TableInfo>> = match &self.spec.tables {
                    None => st.tables().to_vec(),
                    Some(names) => names.iter().filter_map(|n| st.table(n).ok()).collect(),
                };
                let pks = self.spec.pks.clone().unwrap_or_default();
                let mut out = Vec::new();
                for t in &tables {
                    for pk in &pks {
                        let (lo, hi) = (self.spec.lower, self.spec.upper);
                        self.row(
                            st,
                            t,
                            pk,
                            |c| c.db_version >= lo && c.db_version <= hi,
                            &mut out,
                        )?;
                    }
                }
                out.sort_by_key(|c| (c.db_version, c.seq));
                Ok(if out.is_empty() { None } else { Some(out) })
            }
            Mode::Range(_) => loop {
                let Mode::Range(cursors) = &mut self.mode else {
                    unreachable!()
                };
                let mut version: Option<i64> = None;
                for tc in cursors.iter_mut() {
                    if tc.buf.is_empty() && !tc.exhausted {
                        tc.fill(st, &self.spec)?;
                    }
                    if let Some((v, _)) = tc.buf.front() {
                        version = Some(version.map_or(*v, |m: i64| m.min(*v)));
                    }
                }
                let Some(v) = version else {
                    return Ok(None);
                };
                let mut rows: Vec<(Arc<TableInfo>, Vec<u8>)> = Vec::new();
                for tc in cursors.iter_mut() {
                    loop {
                        while tc.buf.front().is_some_and(|(dv, _)| *dv == v) {
                            let (_, pk) = tc.buf.pop_front().expect("front checked");
                            rows.push((tc.t.clone(), pk));
                        }
                        if tc.buf.is_empty() && !tc.exhausted {
                            tc.fill(st, &self.spec)?;
                            continue;
                        }
                        break;
                    }
                }
                let mut out = Vec::new();
                for (t, pk) in &rows {
                    self.row(st, t, pk, |c| c.db_version == v, &mut out)?;
                }
                if !out.is_empty() {
                    out.sort_by_key(|c| c.seq);
                    return Ok(Some(out));
                }
            },
        }
    }

    /// Appends the clocks of one row that pass `keep` and the site filter.
    fn row(
        &mut self,
        st: &mut State,
        t: &Arc<TableInfo>,
        pk: &[u8],
        keep: impl Fn(&Clock) -> bool,
        out: &mut Vec<RawChange>,
    ) -> Result<()> {
        let Some(clock) = st.read_clock(t, pk)? else {
            return Ok(());
        };
        let cl = clock.reported_cl();
        let mut picked: Vec<(Option<usize>, Clock)> = Vec::new();
        for (slot, c) in clock.entries() {
            if !keep(&c) {
                continue;
            }
            let col = if slot == 0 {
                None
            } else {
                match t.slot_col(slot) {
                    Some(i) => Some(i),
                    None => continue,
                }
            };
            let site = self.site(st, c.site)?;
            let pass = match &self.spec.site {
                SiteMatch::Any => true,
                SiteMatch::Eq(s) => **s == *site,
                SiteMatch::Ne(list) => !list.iter().any(|s| **s == *site),
                SiteMatch::Nothing => false,
            };
            if pass {
                picked.push((col, c));
            }
        }
        if picked.is_empty() {
            return Ok(());
        }
        let values = if self.spec.need_val && picked.iter().any(|(c, _)| c.is_some()) {
            st.read_row(t, pk)?
        } else {
            None
        };
        let pk: Arc<[u8]> = Arc::from(pk);
        for (col, c) in picked {
            let val = match (col, &values) {
                (Some(i), Some(vals)) => vals[i].clone(),
                _ => Value::Null,
            };
            let site = self.site(st, c.site)?;
            out.push(RawChange {
                table: t.clone(),
                pk: pk.clone(),
                col,
                val,
                col_version: c.col_version,
                db_version: c.db_version,
                site,
                cl,
                seq: c.seq,
            });
        }
        Ok(())
    }

    fn site(&mut self, st: &mut State, ord: i64) -> Result<Arc<[u8]>> {
        if let Some(s) = self.sites.get(&ord) {
            return Ok(s.clone());
        }
        let s: Arc<[u8]> = Arc::from(st.site_blob(ord)?);
        self.sites.insert(ord, s.clone());
        Ok(s)
    }
}

/// Every column of a base row in table order (None: no row).
pub(crate) fn read_row_all(st: &State, t: &TableInfo, pk: &[u8]) -> Result<Option<Vec<Value>>> {
    let vals = pk_refs(t, pk)?;
    let mut stmt = st.conn().prepare_cached(&t.sql.row_get_all)?;
    for (i, v) in vals.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, ToSqlOutput::Borrowed(*v))?;
    }
    let mut rows = stmt.raw_query();
    match rows.next()? {
        None => Ok(None),
        Some(r) => {
            let mut out = Vec::with_capacity(t.all_columns.len());
            for i in 0..t.all_columns.len() {
                out.push(r.get::<_, Value>(i)?);
            }
            Ok(Some(out))
        }
    }
}
