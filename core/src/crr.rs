//! Turning tables into CRRs and back, schema changes, and local-only
//! removal: `crsql_as_crr`, `crsql_as_table`, `crsql_begin_alter`,
//! `crsql_commit_alter`, backfill of existing rows, and eviction.

use std::sync::atomic::Ordering::Relaxed;

use rusqlite::types::ValueRef;

use crate::clock::{Clock, RowClock};
use crate::error::version_overflow;
use crate::error::{Error, Result};
use crate::pack::pack_into;
use crate::schema::{self, TableInfo, ident};
use crate::state::{Shared, State, SyncBitGuard, pk_of_key};

/// Runs `f` inside `SAVEPOINT name`, rolling back to it on error.
pub(crate) fn in_savepoint<T>(
    st: &mut State,
    name: &str,
    f: impl FnOnce(&mut State) -> Result<T>,
) -> Result<T> {
    st.conn().execute_batch(&format!("SAVEPOINT {name}"))?;
    match f(st) {
        Ok(v) => {
            st.conn().execute_batch(&format!("RELEASE {name}"))?;
            Ok(v)
        }
        Err(e) => {
            let _ = st
                .conn()
                .execute_batch(&format!("ROLLBACK TO {name}; RELEASE {name}"));
            st.invalidate();
            Err(e)
        }
    }
}

fn check_schema(schema: Option<&str>) -> Result<()> {
    match schema {
        None => Ok(()),
        Some(s) if s.eq_ignore_ascii_case("main") => Ok(()),
        Some(s) => Err(Error::UnsupportedSchema {
            schema: s.to_owned(),
        }),
    }
}

fn writable(sh: &Shared) -> Result<()> {
    if sh.read_only {
        return Err(Error::Invalid("the connection is read-only".into()));
    }
    Ok(())
}

/// `crsql_as_crr([schema,] table)`: makes a table a CRR (idempotent) and
/// backfills clocks for its existing rows (cv 1, one new db_version).
pub(crate) fn as_crr(sh: &Shared, st: &mut State, schema: Option<&str>, table: &str) -> Result<()> {
    check_schema(schema)?;
    writable(sh)?;
    st.refresh(sh)?;
    let cols = schema::check_compatible(st.conn(), table)?;
    in_savepoint(st, "crsql_as_crr", |st| {
        let conn = st.conn();
        schema::create_meta_tables(conn)?;
        let int_key = match st.table(table) {
            Ok(existing) => existing.int_key,
            Err(_) => schema::has_rowid_alias_pk(st.conn(), table, &cols)?,
        };
        let conn = st.conn();
        schema::create_clock_tables(conn, table, int_key)?;
        schema::sync_metadata(conn, table, &cols)?;
        let info = schema::load_table(conn, table.to_owned())?;
        schema::create_triggers(conn, &info)?;
        st.reload_schema()?;
        backfill(sh, st, &info, Backfill::AsCrr)
    })
}

/// `crsql_as_table(table)`: stops tracking a table and drops its clocks.
pub(crate) fn as_table(sh: &Shared, st: &mut State, table: &str) -> Result<()> {
    writable(sh)?;
    st.refresh(sh)?;
    let info = st.table(table)?;
    in_savepoint(st, "crsql_as_table", |st| {
        keep_db_version(sh, st)?;
        let conn = st.conn();
        schema::drop_triggers(conn, &info.name)?;
        schema::drop_clock_tables(conn, &info.name)?;
        schema::delete_metadata(conn, &info.name)?;
        st.reload_schema()
    })
}

/// Records the current db_version as `pre_compact_dbversion` so it never
/// goes backwards when clocks are removed.
fn keep_db_version(sh: &Shared, st: &mut State) -> Result<()> {
    let v = st.db_version(sh)?;
    st.conn().execute(
        "INSERT INTO crsql_master (key, value) VALUES ('pre_compact_dbversion', ?1)
         ON CONFLICT (key) DO UPDATE SET value = max(CAST(value AS INTEGER), excluded.value)",
        [v],
    )?;
    Ok(())
}

const ALTER_SAVEPOINT: &str = "crsql_alter";

/// `crsql_begin_alter(table)`: opens a savepoint and drops the triggers so
/// the table can be altered.
pub(crate) fn begin_alter(
    sh: &Shared,
    st: &mut State,
    schema: Option<&str>,
    table: &str,
) -> Result<()> {
    check_schema(schema)?;
    writable(sh)?;
    st.refresh(sh)?;
    let info = st.table(table)?;
    st.conn()
        .execute_batch(&format!("SAVEPOINT {ALTER_SAVEPOINT}"))?;
    if let Err(e) = schema::drop_triggers(st.conn(), &info.name) {
        let _ = st.conn().execute_batch(&format!(
            "ROLLBACK TO {ALTER_SAVEPOINT}; RELEASE {ALTER_SAVEPOINT}"
        ));
        return Err(e);
    }
    Ok(())
}

/// `crsql_commit_alter(table)`: compacts the clocks to the new shape
/// (cells of dropped columns and clocks of vanished rows go, tombstones
/// stay; a changed primary key rebuilds them), backfills cells that differ
/// from their column default at the current db_version, recreates the
/// triggers and releases the savepoint.
pub(crate) fn commit_alter(
    sh: &Shared,
    st: &mut State,
    schema: Option<&str>,
    table: &str,
) -> Result<()> {
    check_schema(schema)?;
    writable(sh)?;
    let result = (|| {
        st.refresh(sh)?;
        let old = st.table(table)?;
        let cols = schema::check_compatible(st.conn(), table)?;
        keep_db_version(sh, st)?;
        let conn = st.conn();
        let pk_changed = schema::sync_metadata(conn, table, &cols)?;
        let int_key = schema::has_rowid_alias_pk(conn, table, &cols)?;
        let rebuild = pk_changed || int_key != old.int_key;
        if rebuild {
            schema::drop_clock_tables(conn, table)?;
            schema::create_clock_tables(conn, table, int_key)?;
        }
        let info = schema::load_table(conn, table.to_owned())?;
        if !rebuild {
            compact(st, &old, &info)?;
        }
        schema::create_triggers(st.conn(), &info)?;
        st.reload_schema()?;
        backfill(sh, st, &info, Backfill::CommitAlter)
    })();
    match result {
        Ok(()) => {
            st.conn()
                .execute_batch(&format!("RELEASE {ALTER_SAVEPOINT}"))?;
            Ok(())
        }
        Err(e) => {
            let _ = st.conn().execute_batch(&format!(
                "ROLLBACK TO {ALTER_SAVEPOINT}; RELEASE {ALTER_SAVEPOINT}"
            ));
            st.invalidate();
            Err(Error::Alter {
                table: table.to_owned(),
                reason: e.to_string(),
            })
        }
    }
}

/// Rewrites every clock record of `old` for the shape of `new`.
fn compact(st: &State, old: &TableInfo, new: &TableInfo) -> Result<()> {
    let conn = st.conn();
    let live_slots: Vec<u32> = new.cols.iter().map(|c| c.slot).collect();
    let mut last: Option<rusqlite::types::Value> = None;
    loop {
        let batch: Vec<(rusqlite::types::Value, Vec<u8>)> = match &last {
            None => conn
                .prepare_cached(&old.sql.clock_scan_first)?
                .query_map([512], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?,
            Some(k) => conn
                .prepare_cached(&old.sql.clock_scan)?
                .query_map(rusqlite::params![k, 512], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?,
        };
        let Some((tail, _)) = batch.last() else {
            break;
        };
        last = Some(tail.clone());
        for (k, bytes) in batch {
            let pk = pk_of_key(old, (&k).into());
            let before = RowClock::decode(&bytes)
                .map_err(|e| Error::Invalid(format!("table {:?}: {e}", old.name)))?;
            let mut after = before.clone();
            for (slot, cell) in after.cells.iter_mut().enumerate() {
                if !live_slots.contains(&(slot as u32 + 1)) {
                    *cell = None;
                }
            }
            let vals = crate::merge::pk_refs(new, &pk)?;
            let exists = vals.len() == new.pks.len() && {
                let mut stmt = conn.prepare_cached(&new.sql.row_exists)?;
                crate::merge::bind_pk_refs(&mut stmt, &vals)?;
                stmt.raw_query().next()?.is_some()
            };
            if !exists {
                after.clear_cells();
                if after
                    .sentinel
                    .is_some_and(|s| s.col_version.rem_euclid(2) != 0)
                {
                    after.sentinel = None;
                }
            }
            if after != before {
                st.write_clock(new, &pk, Some(&before), &after)?;
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backfill {
    /// `crsql_as_crr`: new clocks get a new db_version.
    AsCrr,
    /// `crsql_commit_alter`: new clocks get the current db_version.
    CommitAlter,
}

/// Gives clocks to rows that have none (every cell at col_version 1; a
/// sentinel for PK-only tables) and to cells missing a clock whose value
/// differs from the column default.
fn backfill(sh: &Shared, st: &mut State, t: &TableInfo, mode: Backfill) -> Result<()> {
    // Load the committed version now: the lazy stamping below only touches
    // the atomics.
    st.db_version(sh)?;
    let conn = st.conn();
    let cols = schema::table_columns(conn, &t.name)?;
    let differs: Vec<String> = t
        .cols
        .iter()
        .map(|c| {
            let meta = cols.iter().find(|m| m.name == c.name);
            let dflt = match meta {
                Some(m) => match &m.default {
                    Some(d) => Some(d.clone()),
                    None if !m.not_null => Some("NULL".to_owned()),
                    None => None,
                },
                None => Some("NULL".to_owned()),
            };
            match dflt {
                Some(d) => format!("({} IS NOT ({d}))", ident(&c.name)),
                None => "1".to_owned(),
            }
        })
        .collect();
    let mut select = t.pks.iter().map(|c| ident(&c.name)).collect::<Vec<_>>();
    select.extend(differs);
    let sql = format!("SELECT {} FROM {}", select.join(", "), ident(&t.name));
    let np = t.pks.len();
    let mut version: Option<i64> = None;
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    // The statement reads the base table while clocks are written: both on
    // the same connection, different tables.
    let mut pk = Vec::new();
    while let Some(row) = rows.next()? {
        let vals: Vec<ValueRef<'_>> = (0..np).map(|i| row.get_ref(i)).collect::<Result<_, _>>()?;
        pk.clear();
        pack_into(vals.iter().copied(), np, &mut pk).map_err(|e| Error::pk(&t.name, &pk, e))?;
        let old = st.read_clock(t, &pk)?;
        let mut v = || -> Result<i64> {
            if let Some(v) = version {
                return Ok(v);
            }
            let got = match mode {
                Backfill::AsCrr => next_version_cached(sh)?,
                Backfill::CommitAlter => sh.db_version.load(Relaxed).max(0),
            };
            version = Some(got);
            Ok(got)
        };
        let local = |cv, dbv| Clock {
            col_version: cv,
            db_version: dbv,
            site: 0,
            seq: sh.bump_seq(),
        };
        match old {
            None => {
                let dbv = v()?;
                let mut clock = RowClock::default();
                if t.cols.is_empty() {
                    clock.sentinel = Some(local(1, dbv));
                } else {
                    for c in &t.cols {
                        *clock.cell_mut(c.slot) = Some(local(1, dbv));
                    }
                }
                st.insert_new_clock(t, &pk, &clock, dbv)?;
                sh.wrote.store(true, Relaxed);
            }
            Some(old) => {
                let mut clock = old.clone();
                let alive = old
                    .sentinel
                    .is_none_or(|s| s.col_version.rem_euclid(2) == 1);
                for (i, c) in t.cols.iter().enumerate() {
                    if alive
                        && clock.cell(c.slot).is_none()
                        && row.get::<_, i64>(np + i).unwrap_or(1) != 0
                    {
                        let dbv = v()?;
                        *clock.cell_mut(c.slot) = Some(local(1, dbv));
                    }
                }
                if clock != old {
                    st.write_clock(t, &pk, Some(&old), &clock)?;
                    sh.wrote.store(true, Relaxed);
                }
            }
        }
    }
    Ok(())
}

/// `State::next_version` when the committed version is already cached.
fn next_version_cached(sh: &Shared) -> Result<i64> {
    let current = sh.db_version.load(Relaxed).max(0);
    let v = current
        .checked_add(1)
        .ok_or_else(version_overflow)?
        .max(sh.pending.load(Relaxed));
    sh.pending.store(v, Relaxed);
    Ok(v)
}

/// Removes rows and their clocks without recording deletes (partial
/// replicas dropping rows that left their view). Returns how many rows had
/// clock state or a base row.
pub(crate) fn evict(sh: &Shared, st: &mut State, table: &str, pks: &[Vec<u8>]) -> Result<usize> {
    writable(sh)?;
    st.refresh(sh)?;
    let t = st.table(table)?;
    in_savepoint(st, "crsql_evict", |st| {
        let _sync = SyncBitGuard::new(sh);
        keep_db_version(sh, st)?;
        let conn = st.conn();
        let mut removed = 0;
        for raw in pks {
            let (pk, _) = t.canonical_key(raw)?;
            let vals = crate::merge::pk_refs(&t, &pk)?;
            let mut stmt = conn.prepare_cached(&t.sql.row_delete)?;
            crate::merge::bind_pk_refs(&mut stmt, &vals)?;
            let deleted = stmt.raw_execute()?;
            let old = st.read_clock(&t, &pk)?;
            if let Some(old) = &old {
                st.write_clock(&t, &pk, Some(old), &RowClock::default())?;
            }
            if deleted > 0 || old.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    })
}

/// The persisted `merge-equal-values` setting.
pub(crate) fn config_key(name: &str) -> String {
    format!("config.{name}")
}

/// `crsql_config_set('merge-equal-values', v)`.
pub(crate) fn set_merge_equal_values(sh: &Shared, st: &State, on: bool) -> Result<()> {
    writable(sh)?;
    st.conn().execute(
        "INSERT OR REPLACE INTO crsql_master (key, value) VALUES (?1, ?2)",
        rusqlite::params![config_key(crate::MERGE_EQUAL_VALUES), i64::from(on)],
    )?;
    sh.merge_equal_values.store(on, Relaxed);
    Ok(())
}
