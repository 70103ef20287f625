//! Local write tracking: the bodies of `crsql_after_insert/update/delete`,
//! which the AFTER triggers of every CRR call with the row's values.
//!
//! Rules (reference §1, §5): one db_version per write transaction, seq
//! incremented per clock write, site ordinal 0, col_version +1 per changed
//! cell, no-op updates write nothing (and, unlike cr-sqlite, reserve no
//! version); deletes keep only a sentinel with the next even causal length;
//! re-inserts bump it to the next odd one and restart cells at 1. A
//! primary-key update tombstones the old key and moves its cells to the new
//! key re-stamped with this transaction's version (cr-sqlite keeps their old
//! db_version, so peers syncing incrementally lose the values).

use rusqlite::types::ValueRef;

use crate::clock::{Clock, RowClock};
use crate::error::{Error, Result};
use crate::pack::pack_into;
use crate::schema::TableInfo;
use crate::state::{Shared, State};

/// cr-sqlite's value equality for change detection: same storage class and
/// same value (`1` and `1.0` differ; `0.0` and `-0.0` do not).
pub(crate) fn same_value(a: ValueRef<'_>, b: ValueRef<'_>) -> bool {
    match (a, b) {
        (ValueRef::Null, ValueRef::Null) => true,
        (ValueRef::Integer(x), ValueRef::Integer(y)) => x == y,
        (ValueRef::Real(x), ValueRef::Real(y)) => x == y,
        (ValueRef::Text(x), ValueRef::Text(y)) => x == y,
        (ValueRef::Blob(x), ValueRef::Blob(y)) => x == y,
        _ => false,
    }
}

fn table_arg<'a>(args: &[ValueRef<'a>]) -> Result<&'a str> {
    match args.first() {
        Some(ValueRef::Text(t)) => {
            std::str::from_utf8(t).map_err(|_| Error::Invalid("table name is not UTF-8".into()))
        }
        _ => Err(Error::Invalid(
            "tracking functions take the table name first".into(),
        )),
    }
}

/// Finds the table and checks the argument count, re-reading the metadata
/// once if it does not match (another connection altered the table).
fn table_for(
    st: &mut State,
    args: &[ValueRef<'_>],
    expected: impl Fn(&TableInfo) -> usize,
) -> Result<std::sync::Arc<TableInfo>> {
    let name = table_arg(args)?;
    let mut t = st.table(name)?;
    if expected(&t) != args.len() {
        st.reload_schema()?;
        t = st.table(name)?;
        if expected(&t) != args.len() {
            return Err(Error::Invalid(format!(
                "table {name:?}: expected {} values, got {} (was the table altered without crsql_begin_alter/crsql_commit_alter?)",
                expected(&t),
                args.len()
            )));
        }
    }
    Ok(t)
}

fn pack(t: &TableInfo, values: &[ValueRef<'_>]) -> Result<Vec<u8>> {
    for (i, v) in values.iter().enumerate() {
        if let ValueRef::Real(r) = v
            && let Some(reason) = t.ambiguous_key(i, &tenantsync_types::Value::Real(*r))
        {
            return Err(Error::PkValue {
                table: t.name.clone(),
                pk: String::new(),
                column: t.pks[i].name.clone(),
                reason: reason.into(),
            });
        }
    }
    let mut pk = Vec::with_capacity(16);
    pack_into(values.iter().copied(), values.len(), &mut pk)
        .map_err(|e| Error::pk(&t.name, &pk, e))?;
    Ok(pk)
}

fn local(col_version: i64, db_version: i64, seq: i64) -> Clock {
    Clock {
        col_version,
        db_version,
        site: 0,
        seq,
    }
}

/// `v + by`, or an error naming the clock: a clock never wraps or sticks at
/// the end of its range (a saturated causal length would stay odd, so the
/// row could never be deleted again).
fn bump(t: &TableInfo, pk: &[u8], cid: &str, v: i64, by: i64) -> Result<i64> {
    v.checked_add(by).ok_or_else(|| Error::Clock {
        table: t.name.clone(),
        pk: hex::encode(pk),
        cid: cid.to_owned(),
        reason: format!("{v} + {by} overflows: the clock is at the end of its range").into(),
    })
}

/// The next odd causal length after `cv` (cr-sqlite: even +1, odd +2).
fn next_alive(t: &TableInfo, pk: &[u8], cv: i64) -> Result<i64> {
    bump(t, pk, "-1", cv, if cv.rem_euclid(2) == 0 { 1 } else { 2 })
}

/// `crsql_after_insert('t', NEW.pk...)`.
pub(crate) fn after_insert(sh: &Shared, st: &mut State, args: &[ValueRef<'_>]) -> Result<()> {
    st.refresh(sh)?;
    let t = table_for(st, args, |t| 1 + t.pks.len())?;
    let v = st.next_version(sh, None)?;
    let pk = pack(&t, &args[1..])?;
    let seq0 = sh.seq.load(std::sync::atomic::Ordering::Relaxed);

    // Fast path: a row never seen before gets cells at col_version 1 (a
    // sentinel at 1 for PK-only tables), in one insert.
    let mut fresh = RowClock::default();
    if t.cols.is_empty() {
        fresh.sentinel = Some(local(1, v, seq0));
    } else {
        for (i, c) in t.cols.iter().enumerate() {
            *fresh.cell_mut(c.slot) = Some(local(1, v, seq0 + i as i64));
        }
    }
    if st.insert_new_clock(&t, &pk, &fresh, v)? {
        let used = t.cols.len().max(1) as i64;
        sh.seq.fetch_add(used, std::sync::atomic::Ordering::Relaxed);
        sh.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
        return Ok(());
    }

    // The key has a clock: a resurrection (after a delete) or INSERT OR
    // REPLACE of a live row.
    let old = st.read_clock(&t, &pk)?.unwrap_or_default();
    let mut new = old.clone();
    if t.cols.is_empty() {
        let seq = sh.bump_seq();
        let cv = match old.sentinel {
            Some(s) => next_alive(&t, &pk, s.col_version)?,
            None => 1,
        };
        new.sentinel = Some(local(cv, v, seq));
    } else {
        // cr-sqlite consumes a seq here even when there is no sentinel.
        let seq = sh.bump_seq();
        if let Some(s) = &mut new.sentinel {
            *s = local(next_alive(&t, &pk, s.col_version)?, v, seq);
        }
        for c in &t.cols {
            let seq = sh.bump_seq();
            let cell = new.cell_mut(c.slot);
            let cv = match cell {
                Some(k) => bump(&t, &pk, &c.name, k.col_version, 1)?,
                None => 1,
            };
            *cell = Some(local(cv, v, seq));
        }
    }
    st.write_clock(&t, &pk, Some(&old), &new)?;
    sh.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// `crsql_after_update('t', NEW.pk..., OLD.pk..., NEW.col..., OLD.col...)`.
pub(crate) fn after_update(sh: &Shared, st: &mut State, args: &[ValueRef<'_>]) -> Result<()> {
    st.refresh(sh)?;
    let t = table_for(st, args, |t| 1 + 2 * t.pks.len() + 2 * t.cols.len())?;
    let np = t.pks.len();
    let nc = t.cols.len();
    let pks_new = &args[1..1 + np];
    let pks_old = &args[1 + np..1 + 2 * np];
    let cols_new = &args[1 + 2 * np..1 + 2 * np + nc];
    let cols_old = &args[1 + 2 * np + nc..];
    let pk_changed = pks_new
        .iter()
        .zip(pks_old)
        .any(|(a, b)| !same_value(*a, *b));
    let changed: Vec<usize> = (0..nc)
        .filter(|&i| !same_value(cols_new[i], cols_old[i]))
        .collect();
    if !pk_changed && changed.is_empty() {
        // A no-op update writes nothing and reserves no version.
        return Ok(());
    }
    let v = st.next_version(sh, None)?;
    let new_pk = pack(&t, pks_new)?;

    let old_new_key = st.read_clock(&t, &new_pk)?;
    let mut clock = old_new_key.clone().unwrap_or_default();
    if pk_changed {
        let old_pk = pack(&t, pks_old)?;
        let old_clock = st.read_clock(&t, &old_pk)?;
        // Tombstone the old key.
        let seq = sh.bump_seq();
        let cv = match old_clock.as_ref().and_then(|c| c.sentinel) {
            Some(s) => bump(&t, &old_pk, "-1", s.col_version, 1)?,
            None => 2,
        };
        let tomb = RowClock {
            sentinel: Some(local(cv, v, seq)),
            cells: Vec::new(),
        };
        st.write_clock(&t, &old_pk, old_clock.as_ref(), &tomb)?;
        // Create the new key.
        let seq = sh.bump_seq();
        let cv = match clock.sentinel {
            Some(s) => next_alive(&t, &new_pk, s.col_version)?,
            None => 1,
        };
        clock.sentinel = Some(local(cv, v, seq));
        // Move the old key's cells, keeping col_version and author but
        // re-stamped with this transaction so incremental pulls see them.
        if let Some(old_clock) = old_clock {
            for (slot, c) in old_clock.entries().filter(|(s, _)| *s != 0) {
                let seq = sh.bump_seq();
                *clock.cell_mut(slot) = Some(Clock {
                    col_version: c.col_version,
                    db_version: v,
                    site: c.site,
                    seq,
                });
            }
        }
    }
    for i in changed {
        let seq = sh.bump_seq();
        let cell = clock.cell_mut(t.cols[i].slot);
        let cv = match cell {
            Some(k) => bump(&t, &new_pk, &t.cols[i].name, k.col_version, 1)?,
            None => 1,
        };
        *cell = Some(local(cv, v, seq));
    }
    st.write_clock(&t, &new_pk, old_new_key.as_ref(), &clock)?;
    sh.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// `crsql_after_delete('t', OLD.pk...)`.
pub(crate) fn after_delete(sh: &Shared, st: &mut State, args: &[ValueRef<'_>]) -> Result<()> {
    st.refresh(sh)?;
    let t = table_for(st, args, |t| 1 + t.pks.len())?;
    let v = st.next_version(sh, None)?;
    let seq = sh.bump_seq();
    let pk = pack(&t, &args[1..])?;
    let old = st.read_clock(&t, &pk)?;
    let cv = match old.as_ref().and_then(|c| c.sentinel) {
        Some(s) => bump(&t, &pk, "-1", s.col_version, 1)?,
        None => 2,
    };
    let tomb = RowClock {
        sentinel: Some(local(cv, v, seq)),
        cells: Vec::new(),
    };
    st.write_clock(&t, &pk, old.as_ref(), &tomb)?;
    sh.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
