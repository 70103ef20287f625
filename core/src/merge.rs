//! Merging remote changes (`INSERT INTO crsql_changes`, [`crate::CrrConnection::apply`]),
//! exactly as cr-sqlite 0.16 decides (reference §3).
//!
//! Consecutive changes of one row are merged as a group: the row's clock
//! record is read once, every change is decided against the in-memory clock,
//! the winning column values are written with one upsert per group (flushed
//! before a delete), and the clock record is written once.

use std::cmp::Ordering;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use rusqlite::types::{ToSqlOutput, ValueRef};
use tenantsync_types::Value;

use crate::clock::{Clock, RowClock};
use crate::error::{Error, Result};
use crate::pack::unpack_refs;
use crate::schema::TableInfo;
use crate::state::{Shared, State};

/// cr-sqlite's tie order when col_versions are equal: storage class first,
/// INTEGER > REAL > TEXT > BLOB > NULL, then numeric / bytewise.
pub(crate) fn compare_values(a: ValueRef<'_>, b: ValueRef<'_>) -> Ordering {
    match (a, b) {
        (ValueRef::Integer(x), ValueRef::Integer(y)) => x.cmp(&y),
        (ValueRef::Real(x), ValueRef::Real(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        (ValueRef::Text(x), ValueRef::Text(y)) => x.cmp(y),
        (ValueRef::Blob(x), ValueRef::Blob(y)) => x.cmp(y),
        _ => storage_class(a).cmp(&storage_class(b)),
    }
}

/// The storage class of a value, for [`compare_values`]' first rule.
fn storage_class(v: ValueRef<'_>) -> u8 {
    match v {
        ValueRef::Integer(_) => 5,
        ValueRef::Real(_) => 4,
        ValueRef::Text(_) => 3,
        ValueRef::Blob(_) => 2,
        ValueRef::Null => 1,
    }
}

/// The same stored value: same storage class, same bytes (REALs by bits).
fn identical(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

/// One incoming change, borrowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChangeRef<'a> {
    pub table: &'a str,
    pub pk: &'a [u8],
    pub cid: &'a str,
    pub val: ValueRef<'a>,
    pub col_version: i64,
    pub db_version: i64,
    /// Empty = NULL (stored as the local ordinal, as cr-sqlite does).
    pub site_id: &'a [u8],
    pub cl: i64,
    pub seq: i64,
}

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It won and was written.
    Applied,
    /// It lost (stale causal length, lower col_version, smaller value).
    Lost,
    /// The same state was already there (equal causal length for a delete
    /// or sentinel; equal col_version and value for a cell).
    Duplicate,
}

/// The sentinel cid.
pub(crate) const SENTINEL: &str = "-1";

/// How a merge treats the changes of a peer it does not trust (a server
/// merging what clients push). The default is cr-sqlite 0.16's merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// A row the database does not hold before the changes and does not
    /// hold after them (a delete or tombstone of a row that does not exist,
    /// or of one already deleted) keeps no trace: its clock is not written,
    /// so no change that nobody could check blocks, pins or revives a key.
    pub absent_rows_leave_no_trace: bool,
    /// Bounds on the clocks a change may carry, relative to the row's.
    pub clock_bound: Option<ClockBound>,
}

/// The clocks a change may carry, relative to what the database holds (the
/// row's causal length for `cl`; the cell's col_version in the same
/// incarnation, 0 in a new one, for `col_version`): at most `max_step`
/// ahead, and above `max` only one step ahead (+1 for a col_version, +2
/// for a causal length), so no clock ever nears the end of `i64` and every
/// authorized writer can always write the row again. A `seq` is at most
/// `max`. docs/PROTOCOL.md, "Clocks", derives the server's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockBound {
    /// The largest step ahead.
    pub max_step: i64,
    /// The largest value of a causal length, col_version or seq.
    pub max: i64,
}

/// What a batch did, with the rows it changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The counts.
    pub stats: ApplyStats,
    /// (table, canonical pk) of every row whose base row or clock the batch
    /// wrote, once each, in the order first written.
    pub changed: Vec<(String, crate::PackedPk)>,
}

/// Base-table writes of a row not yet executed.
#[derive(Default)]
struct PendingRow {
    /// The row must exist (INSERT OR IGNORE of the key).
    ensure: bool,
    /// Winning column values, by index into `TableInfo::cols`.
    cols: Vec<(usize, Value)>,
}

/// The merge of a group of changes of one row.
pub(crate) struct RowMerge {
    pub t: Arc<TableInfo>,
    /// Canonical packed pk.
    pub pk: Vec<u8>,
    pk_vals: Vec<Value>,
    old: Option<RowClock>,
    clock: RowClock,
    pending: PendingRow,
    dirty: bool,
    /// Site ids this row's merge registered (undone if it leaves no trace).
    new_sites: Vec<Vec<u8>>,
}

/// Whether a row clock describes a row that exists (odd causal length).
fn alive(c: &RowClock) -> bool {
    c.local_cl().rem_euclid(2) == 1
}

impl RowMerge {
    /// Starts merging changes of the row `pk` (any encoding) of `t`.
    pub fn begin(st: &State, t: Arc<TableInfo>, pk: &[u8]) -> Result<RowMerge> {
        let key = t.canonical_key(pk);
        Self::begin_canonical(st, t, key)
    }

    /// [`RowMerge::begin`] with `t.canonical_key(pk)` already computed.
    fn begin_canonical(
        st: &State,
        t: Arc<TableInfo>,
        key: Result<(Vec<u8>, Vec<Value>)>,
    ) -> Result<RowMerge> {
        let (canon, pk_vals) = key?;
        let old = st.read_clock(&t, &canon)?;
        let clock = old.clone().unwrap_or_default();
        Ok(RowMerge {
            t,
            pk: canon,
            pk_vals,
            old,
            clock,
            pending: PendingRow::default(),
            dirty: false,
            new_sites: Vec::new(),
        })
    }

    /// Decides one change against the row's clock (reference §3).
    pub fn merge(
        &mut self,
        sh: &Shared,
        st: &mut State,
        c: &ChangeRef<'_>,
        opts: &ApplyOptions,
    ) -> Result<Outcome> {
        if c.site_id.len() > 16 {
            return Err(Error::SiteIdTooLong {
                len: c.site_id.len(),
            });
        }
        if let Some(b) = &opts.clock_bound {
            self.check_bound(c, b)?;
        }
        let local_cl = self.clock.local_cl();
        if c.cl < local_cl {
            return Ok(Outcome::Lost);
        }
        if c.cl.rem_euclid(2) == 0 {
            if c.cl == local_cl {
                return self.sentinel_tie(sh, st, c);
            }
            self.pending = PendingRow::default();
            st.delete_row(&self.t, &self.pk_vals)?;
            let sentinel = self.winner_clock(sh, st, c, c.col_version)?;
            self.clock.sentinel = Some(sentinel);
            self.clock.clear_cells();
            self.dirty = true;
            sh.rows_impacted.fetch_add(1, Relaxed);
            return Ok(Outcome::Applied);
        }
        if c.cid == SENTINEL {
            if c.cl == local_cl {
                return self.sentinel_tie(sh, st, c);
            }
            self.resurrect(sh, st, c, c.col_version)?;
            sh.rows_impacted.fetch_add(1, Relaxed);
            return Ok(Outcome::Applied);
        }
        let col = self
            .t
            .col_index(c.cid)
            .ok_or_else(|| Error::UnknownColumn {
                table: self.t.name.clone(),
                column: c.cid.to_owned(),
            })?;
        let needs_resurrect = c.cl > local_cl;
        let exists = local_cl != 0;
        if needs_resurrect && (exists || c.cl > 1) {
            self.resurrect(sh, st, c, c.cl)?;
            sh.rows_impacted.fetch_add(1, Relaxed);
        }
        let outcome = if needs_resurrect || !exists {
            Outcome::Applied
        } else {
            self.cell_outcome(sh, st, c, col)?
        };
        if outcome != Outcome::Applied {
            return Ok(outcome);
        }
        let value = Value::try_from(c.val).map_err(|e| Error::Invalid(format!("value: {e}")))?;
        match self.pending.cols.iter_mut().find(|(i, _)| *i == col) {
            Some(slot) => slot.1 = value,
            None => self.pending.cols.push((col, value)),
        }
        let clock = self.winner_clock(sh, st, c, c.col_version)?;
        *self.clock.cell_mut(self.t.cols[col].slot) = Some(clock);
        self.dirty = true;
        sh.rows_impacted.fetch_add(1, Relaxed);
        Ok(Outcome::Applied)
    }

    /// Refuses a change whose clocks are beyond `b` (see [`ClockBound`]).
    fn check_bound(&self, c: &ChangeRef<'_>, b: &ClockBound) -> Result<()> {
        let err = |reason: String| Error::Clock {
            table: self.t.name.clone(),
            pk: hex::encode(c.pk),
            cid: c.cid.to_owned(),
            reason: reason.into(),
        };
        if c.seq > b.max {
            return Err(err(format!(
                "its seq {} is above {}, the largest a peer may push",
                c.seq, b.max
            )));
        }
        let local_cl = self.clock.local_cl();
        // A causal length moves by 1 (delete) or 2 (delete and re-create)
        // per step; a col_version by 1 per write of the cell, restarting in
        // a new incarnation.
        let base_cv = match self.t.col_index(c.cid) {
            Some(col) if c.cid != SENTINEL && c.cl == local_cl => self
                .clock
                .cell(self.t.cols[col].slot)
                .map_or(0, |k| k.col_version),
            _ => 0,
        };
        let mut checks = vec![("causal length", c.cl, local_cl, 2)];
        if c.cid != SENTINEL {
            checks.push(("col_version", c.col_version, base_cv, 1));
        }
        for (what, v, held, next) in checks {
            if v > held.saturating_add(b.max_step) {
                return Err(err(format!(
                    "its {what} {v} is more than {} ahead of the {} ({held})",
                    b.max_step,
                    if what == "col_version" {
                        "cell's"
                    } else {
                        "row's"
                    }
                )));
            }
            if v > b.max && v > held.saturating_add(next) {
                return Err(err(format!(
                    "its {what} {v} is above {}: past it a clock only moves one step at a time (the server holds {held})",
                    b.max
                )));
            }
        }
        Ok(())
    }

    /// Executes pending base-table writes and writes the clock record.
    /// Returns whether anything was written.
    pub fn finish(mut self, sh: &Shared, st: &mut State, opts: &ApplyOptions) -> Result<bool> {
        if opts.absent_rows_leave_no_trace
            && self.dirty
            && !self.old.as_ref().is_some_and(alive)
            && !alive(&self.clock)
        {
            // Absent before and after: nothing a check could judge, so
            // nothing is kept (the delete of an absent row ran as a no-op),
            // not even the author's site id.
            for site in &self.new_sites {
                st.forget_site(site)?;
            }
            return Ok(false);
        }
        self.flush(st)?;
        if self.dirty {
            st.write_clock(&self.t, &self.pk, self.old.as_ref(), &self.clock)?;
            sh.wrote.store(true, Relaxed);
        }
        Ok(self.dirty)
    }

    /// The clock a winning change is stored with: its col_version, seq and
    /// author, stamped with the local version per the stamping rule.
    fn winner_clock(
        &mut self,
        sh: &Shared,
        st: &mut State,
        c: &ChangeRef<'_>,
        col_version: i64,
    ) -> Result<Clock> {
        if !c.site_id.is_empty() && !st.site_known(c.site_id)? {
            self.new_sites.push(c.site_id.to_vec());
        }
        let site = st.site_ordinal(c.site_id)?;
        Ok(Clock {
            col_version,
            db_version: st.merge_version(sh, c.db_version)?,
            site,
            seq: c.seq,
        })
    }

    /// Resurrects the row at causal length `cl`: the row is (re)created with
    /// defaults, every cell clock drops to col_version 0 (so any value of the
    /// new incarnation wins) and the sentinel takes the change's author.
    fn resurrect(&mut self, sh: &Shared, st: &mut State, c: &ChangeRef<'_>, cl: i64) -> Result<()> {
        self.pending.ensure = true;
        if self.clock.has_cells() {
            let v = st.merge_version(sh, c.db_version)?;
            for cell in self.clock.cells.iter_mut().flatten() {
                cell.col_version = 0;
                cell.db_version = v;
            }
        }
        let sentinel = self.winner_clock(sh, st, c, cl)?;
        self.clock.sentinel = Some(sentinel);
        self.dirty = true;
        Ok(())
    }

    /// A sentinel (or delete) at the causal length the row already has: a
    /// no-op in cr-sqlite. With `merge-equal-values` on we extend 0.16.3's
    /// site-id tie-break to it (as Corrosion's fork did for concurrent
    /// deletes), so that peers also agree on who authored the sentinel; the
    /// row itself is unchanged either way.
    fn sentinel_tie(&mut self, sh: &Shared, st: &mut State, c: &ChangeRef<'_>) -> Result<Outcome> {
        if !sh.merge_equal_values.load(Relaxed) || c.cid != SENTINEL || c.col_version != c.cl {
            return Ok(Outcome::Duplicate);
        }
        let Some(local) = self.clock.sentinel else {
            return Ok(Outcome::Duplicate);
        };
        if local.col_version != c.col_version {
            return Ok(Outcome::Duplicate);
        }
        let local_site = st.site_blob(local.site)?.to_vec();
        if c.site_id <= local_site.as_slice() {
            return Ok(Outcome::Duplicate);
        }
        let clock = self.winner_clock(sh, st, c, c.col_version)?;
        self.clock.sentinel = Some(clock);
        self.dirty = true;
        sh.rows_impacted.fetch_add(1, Relaxed);
        Ok(Outcome::Applied)
    }

    /// cr-sqlite's `did_cid_win` for equal causal lengths.
    fn cell_outcome(
        &mut self,
        sh: &Shared,
        st: &mut State,
        c: &ChangeRef<'_>,
        col: usize,
    ) -> Result<Outcome> {
        let Some(local) = self.clock.cell(self.t.cols[col].slot) else {
            return Ok(Outcome::Applied);
        };
        match c.col_version.cmp(&local.col_version) {
            Ordering::Greater => return Ok(Outcome::Applied),
            Ordering::Less => return Ok(Outcome::Lost),
            Ordering::Equal => {}
        }
        // The current value as stored: a value this batch wrote to the
        // column is flushed first, so that it is compared after the
        // column's affinity converted it, as `INSERT INTO crsql_changes`
        // (one change at a time) compares it.
        if self.pending.cols.iter().any(|(i, _)| *i == col) {
            self.flush(st)?;
        }
        // A clock without a base row (never in a consistent database): the
        // incoming value restores the row instead of failing the merge.
        let Some(current) = self.read_col(st, col)? else {
            return Ok(Outcome::Applied);
        };
        let mut order = compare_values(c.val, current.as_value_ref());
        if order == Ordering::Greater
            && storage_class(c.val) != storage_class(current.as_value_ref())
            && self.stores_as(st, col, c.val, &current)?
        {
            // The column's affinity turns the incoming value into exactly
            // the current one (1 into a TEXT column holding '1'): the same
            // state, not a win. cr-sqlite 0.16 writes it again and
            // re-stamps the cell every time the change arrives.
            order = Ordering::Equal;
        }
        match order {
            Ordering::Greater => Ok(Outcome::Applied),
            Ordering::Less => Ok(Outcome::Lost),
            Ordering::Equal => {
                if sh.merge_equal_values.load(Relaxed) {
                    let local_site = st.site_blob(local.site)?.to_vec();
                    if c.site_id > local_site.as_slice() {
                        return Ok(Outcome::Applied);
                    }
                }
                Ok(Outcome::Duplicate)
            }
        }
    }

    /// Whether writing `val` to the column stores exactly `current`: writes
    /// it (with the row's other pending writes) and reads it back. When it
    /// does, the table holds what it held; when it does not, the merge
    /// writes the value again as a winner.
    fn stores_as(
        &mut self,
        st: &mut State,
        col: usize,
        val: ValueRef<'_>,
        current: &Value,
    ) -> Result<bool> {
        let value = Value::try_from(val).map_err(|e| Error::Invalid(format!("value: {e}")))?;
        self.pending.cols.push((col, value));
        self.flush(st)?;
        Ok(self
            .read_col(st, col)?
            .is_some_and(|stored| identical(&stored, current)))
    }

    /// The current value of one column of the row (None: no row).
    fn read_col(&self, st: &State, col: usize) -> Result<Option<Value>> {
        Ok(st
            .read_row(&self.t, &self.pk)?
            .map(|mut vals| vals.swap_remove(col)))
    }

    fn flush(&mut self, st: &mut State) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        if !pending.cols.is_empty() {
            // The statement is prepared per column set: bind in column order.
            pending.cols.sort_by_key(|(i, _)| *i);
            st.upsert_row(&self.t, &self.pk_vals, &pending.cols)?;
        } else if pending.ensure {
            st.ensure_row(&self.t, &self.pk_vals)?;
        }
        Ok(())
    }
}

/// Binds borrowed primary-key values to parameters `1..`.
pub(crate) fn bind_pk_refs(
    stmt: &mut rusqlite::Statement<'_>,
    vals: &[ValueRef<'_>],
) -> Result<()> {
    for (i, v) in vals.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, ToSqlOutput::Borrowed(*v))?;
    }
    Ok(())
}

/// Counts of what a batch of changes did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyStats {
    /// Changes that won and were written.
    pub applied: usize,
    /// Changes that lost (stale causal length, lower col_version, smaller
    /// value on a tie).
    pub lost: usize,
    /// Changes whose state was already there.
    pub duplicates: usize,
    /// Distinct rows the batch touched (consecutive changes of a row count once).
    pub rows: usize,
    /// The highest local db_version a merged clock was stamped with, if any.
    pub max_db_version: Option<i64>,
}

impl ApplyStats {
    pub(crate) fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Applied => self.applied += 1,
            Outcome::Lost => self.lost += 1,
            Outcome::Duplicate => self.duplicates += 1,
        }
    }
}

/// Merges one change on its own (the `crsql_changes` INSERT path).
///
/// It runs inside the caller's statement (`INSERT INTO crsql_changes`),
/// where no savepoint can be opened: when it fails, the base-table write
/// that failed undid itself, but a site id registered for the change's
/// author on the way would stay, so a site id that was new is removed again
/// (found by the `changes_insert` fuzz target: a BLOB into a STRICT TEXT
/// column inside a transaction).
pub(crate) fn merge_single(sh: &Shared, st: &mut State, c: &ChangeRef<'_>) -> Result<Outcome> {
    st.refresh(sh)?;
    let known = st.site_known(c.site_id)?;
    let merged = (|| {
        let t = st.table(c.table)?;
        let opts = ApplyOptions::default();
        let mut m = RowMerge::begin(st, t, c.pk)?;
        let outcome = m.merge(sh, st, c, &opts)?;
        m.finish(sh, st, &opts)?;
        Ok(outcome)
    })();
    if merged.is_err() && !known {
        st.forget_site(c.site_id)?;
    }
    merged
}

/// Merges a batch, grouping consecutive changes of one row. Errors carry the
/// failing change's position and identity.
pub(crate) fn merge_batch<'a>(
    sh: &Shared,
    st: &mut State,
    changes: impl Iterator<Item = ChangeRef<'a>>,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    st.refresh(sh)?;
    let mut report = ApplyReport::default();
    let mut changed: std::collections::HashSet<(String, Vec<u8>)> = Default::default();
    // The row being merged, the raw pk it was named with, and the last change
    // merged into it (for error context).
    let mut current: Option<(RowMerge, &'a [u8], usize, ChangeRef<'a>)> = None;
    let ctx = |i: usize, c: &ChangeRef<'_>, e: Error| Error::Change {
        index: i,
        table: c.table.to_owned(),
        pk: hex::encode(c.pk),
        cid: c.cid.to_owned(),
        db_version: c.db_version,
        source: Box::new(e),
    };
    let mut finish = |m: RowMerge, st: &mut State, li: usize, lc: &ChangeRef<'_>| -> Result<()> {
        let (table, pk) = (m.t.name.clone(), m.pk.clone());
        if m.finish(sh, st, opts).map_err(|e| ctx(li, lc, e))?
            && changed.insert((table.clone(), pk.clone()))
        {
            report.changed.push((table, crate::PackedPk(pk)));
        }
        Ok(())
    };
    for (i, c) in changes.enumerate() {
        // The canonical pk, when comparing needed it (reused to begin a row).
        let mut canonical = None;
        let same_row = match &current {
            Some((m, raw, _, _)) => {
                m.t.name == c.table
                    && (*raw == c.pk || {
                        // Same row in another encoding?
                        let canon = m.t.canonical_key(c.pk);
                        let same = matches!(&canon, Ok((k, _)) if *k == m.pk);
                        canonical = Some(canon);
                        same
                    })
            }
            None => false,
        };
        if !same_row {
            if let Some((m, _, li, lc)) = current.take() {
                finish(m, st, li, &lc)?;
            }
            let t = st.table(c.table).map_err(|e| ctx(i, &c, e))?;
            let canonical = canonical.unwrap_or_else(|| t.canonical_key(c.pk));
            let m = RowMerge::begin_canonical(st, t, canonical).map_err(|e| ctx(i, &c, e))?;
            report.stats.rows += 1;
            current = Some((m, c.pk, i, c));
        }
        let (m, _, li, lc) = current.as_mut().expect("set above");
        let o = m.merge(sh, st, &c, opts).map_err(|e| ctx(i, &c, e))?;
        *li = i;
        *lc = c;
        report.stats.count(o);
    }
    if let Some((m, _, li, lc)) = current.take() {
        finish(m, st, li, &lc)?;
    }
    if report.stats.applied > 0 {
        let p = sh.pending.load(Relaxed);
        if p >= 0 {
            report.stats.max_db_version = Some(p);
        }
    }
    Ok(report)
}

/// Unpacks a pk for binding (used by readers).
pub(crate) fn pk_refs<'a>(t: &TableInfo, pk: &'a [u8]) -> Result<Vec<ValueRef<'a>>> {
    unpack_refs(pk).map_err(|e| Error::pk(&t.name, pk, e))
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering::{Equal, Greater, Less};

    use super::*;

    /// cr-sqlite's tie order (reference §3): `a` against `b`.
    #[track_caller]
    fn check(a: ValueRef<'_>, b: ValueRef<'_>, expected: Ordering) {
        assert_eq!(compare_values(a, b), expected, "{a:?} vs {b:?}");
        assert_eq!(compare_values(b, a), expected.reverse(), "{b:?} vs {a:?}");
    }

    #[test]
    fn ties_rank_storage_classes_then_values() {
        use ValueRef::{Blob, Integer, Null, Real, Text};
        // Within a class: numeric, or bytewise with the shorter prefix lower.
        check(Integer(5), Integer(3), Greater);
        check(Integer(-1), Integer(i64::MIN), Greater);
        check(Real(2.5), Real(-0.5), Greater);
        check(Real(0.0), Real(-0.0), Equal);
        check(Text(b"b"), Text(b"a"), Greater);
        check(Text(b"a"), Text(b"B"), Greater);
        check(Text("é".as_bytes()), Text(b"z"), Greater);
        check(Text(b"ab"), Text(b"a"), Greater);
        check(Blob(&[1, 2]), Blob(&[1]), Greater);
        check(Blob(&[]), Blob(&[]), Equal);
        check(Null, Null, Equal);
        // Across classes: INTEGER > REAL > TEXT > BLOB > NULL, whatever the
        // values (not SQLite's own order, where numbers sort below text).
        check(Integer(1), Real(100.5), Greater);
        check(Integer(1), Real(1.0), Greater);
        check(Integer(i64::MIN), Text(b"zzz"), Greater);
        check(Real(2.5), Text(b"a"), Greater);
        check(Text(b"a"), Blob(&[0xff]), Greater);
        check(Blob(&[0]), Null, Greater);
        check(Integer(-5), Null, Greater);
        check(Text(b""), Blob(&[0xff, 0xff]), Greater);
        check(Null, Blob(&[]), Less);
        check(Real(f64::MAX), Integer(i64::MIN), Less);
    }
}
