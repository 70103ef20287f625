//! The SQL surface installed on every connection: cr-sqlite's functions,
//! the tracking functions the triggers call, `crsql_changes`,
//! `crsql_unpack_columns`, and our own `tenantsync_pk_value(pk, i)`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::ValueRef;
use rusqlite::vtab::Module;
use rusqlite::{Connection, OptionalExtension};
use tenantsync_types::Value;

use crate::crr;
use crate::error::version_overflow;
use crate::error::{Error, Result};
use crate::pack::{pack_into, unpack_refs};
use crate::state::{Shared, in_write_tx};
use crate::tracking;
use crate::vtab::{ChangesTab, UnpackTab};

const CHANGES_MODULE: Module<'static, ChangesTab> = Module::update_module();
const UNPACK_MODULE: Module<'static, UnpackTab> = Module::read_only_module();

fn args<'a>(ctx: &'a Context<'_>) -> Vec<ValueRef<'a>> {
    (0..ctx.len()).map(|i| ctx.get_raw(i)).collect()
}

fn text_arg<'a>(ctx: &'a Context<'_>, i: usize, what: &str) -> Result<&'a str> {
    match ctx.get_raw(i) {
        ValueRef::Text(t) => {
            std::str::from_utf8(t).map_err(|_| Error::Invalid(format!("{what} is not UTF-8")))
        }
        _ => Err(Error::Invalid(format!("{what} must be text"))),
    }
}

/// `(schema, table)` or `(table)`.
fn schema_table<'a>(ctx: &'a Context<'_>, f: &str) -> Result<(Option<&'a str>, &'a str)> {
    match ctx.len() {
        1 => Ok((None, text_arg(ctx, 0, "the table name")?)),
        2 => Ok((
            Some(text_arg(ctx, 0, "the schema name")?),
            text_arg(ctx, 1, "the table name")?,
        )),
        n => Err(Error::Invalid(format!(
            "{f} takes the table name or the schema and table names ({n} arguments given)"
        ))),
    }
}

/// Installs everything on `conn`.
pub(crate) fn install(conn: &Connection, sh: &Arc<Shared>) -> Result<()> {
    let utf8 = FunctionFlags::SQLITE_UTF8;
    let det = utf8 | FunctionFlags::SQLITE_DETERMINISTIC | FunctionFlags::SQLITE_INNOCUOUS;
    // Called from the CRR triggers, which must work with trusted_schema=OFF.
    let trig = utf8 | FunctionFlags::SQLITE_INNOCUOUS;

    conn.create_module("crsql_changes", &CHANGES_MODULE, Some(sh.clone()))?;
    conn.create_module("crsql_unpack_columns", &UNPACK_MODULE, None)?;

    let site = sh.site_id;
    conn.create_scalar_function(
        "crsql_site_id",
        0,
        utf8 | FunctionFlags::SQLITE_INNOCUOUS,
        move |_| Ok(site.0.to_vec()),
    )?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_internal_sync_bit", -1, trig, move |ctx| {
        if ctx.len() == 1 {
            let v: i64 = ctx.get(0)?;
            s.sync_bit.store(v, Relaxed);
        }
        Ok(s.sync_bit.load(Relaxed))
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_db_version", 0, utf8, move |_| {
        let mut st = s.lock()?;
        Ok(st.db_version(&s)?)
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_next_db_version", -1, utf8, move |ctx| {
        let given: Option<i64> = if !ctx.is_empty() { ctx.get(0)? } else { None };
        let mut st = s.lock()?;
        // A reservation must live exactly as long as a write transaction
        // (whose commit/rollback hooks end it). Inside an explicit
        // transaction that has not written yet, take the write lock now so
        // the reservation holds for the writes that follow; elsewhere (an
        // autocommit read, a read-only connection) nothing is reserved,
        // since a transaction without writes ends without a hook and the
        // reservation would leak into the next one (cr-sqlite's bug).
        if !in_write_tx(st.conn()) && !st.conn().is_autocommit() && !s.read_only {
            let _ = st
                .conn()
                .prepare_cached("DELETE FROM crsql_master WHERE 0")
                .and_then(|mut stmt| stmt.execute([]));
        }
        if in_write_tx(st.conn()) {
            Ok(st.next_version(&s, given)?)
        } else {
            let current = st.db_version(&s)?;
            let mut v = current
                .checked_add(1)
                .ok_or_else(version_overflow)?
                .max(s.pending.load(Relaxed));
            if let Some(g) = given {
                v = v.max(g);
            }
            Ok(v)
        }
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_increment_and_get_seq", 0, utf8, move |_| {
        Ok(s.bump_seq())
    })?;
    let s = sh.clone();
    conn.create_scalar_function("crsql_get_seq", 0, utf8, move |_| Ok(s.seq.load(Relaxed)))?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_rows_impacted", 0, utf8, move |_| {
        Ok(s.rows_impacted.load(Relaxed))
    })?;

    conn.create_scalar_function("crsql_finalize", 0, utf8, |_| Ok("finalized"))?;

    conn.create_scalar_function("crsql_pack_columns", -1, det, |ctx| {
        let vals = args(ctx);
        let mut out = Vec::with_capacity(1 + vals.len() * 9);
        pack_into(vals.iter().copied(), vals.len(), &mut out)
            .map_err(|e| Error::Invalid(format!("crsql_pack_columns: {e}")))?;
        Ok(out)
    })?;

    conn.create_scalar_function("tenantsync_pk_value", 2, det, |ctx| {
        let pk = match ctx.get_raw(0) {
            ValueRef::Blob(b) => b,
            ValueRef::Null => return Ok(Value::Null),
            _ => {
                return Err(Error::Invalid(
                    "tenantsync_pk_value: the first argument must be a packed pk blob".into(),
                )
                .into());
            }
        };
        let i: i64 = ctx.get(1)?;
        let vals =
            unpack_refs(pk).map_err(|e| Error::Invalid(format!("tenantsync_pk_value: {e}")))?;
        let v = usize::try_from(i).ok().and_then(|i| vals.get(i)).copied();
        Ok(match v {
            Some(v) => Value::try_from(v).expect("unpack_refs checked UTF-8"),
            None => Value::Null,
        })
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_as_crr", -1, utf8, move |ctx| {
        let (schema, table) = schema_table(ctx, "crsql_as_crr")?;
        let mut st = s.lock()?;
        crr::as_crr(&s, &mut st, schema, table)?;
        Ok("OK")
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_as_table", -1, utf8, move |ctx| {
        let (_, table) = schema_table(ctx, "crsql_as_table")?;
        let mut st = s.lock()?;
        crr::as_table(&s, &mut st, table)?;
        Ok("OK")
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_begin_alter", -1, utf8, move |ctx| {
        let (schema, table) = schema_table(ctx, "crsql_begin_alter")?;
        let mut st = s.lock()?;
        crr::begin_alter(&s, &mut st, schema, table)?;
        Ok("OK")
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_commit_alter", -1, utf8, move |ctx| {
        let (schema, table) = schema_table(ctx, "crsql_commit_alter")?;
        let mut st = s.lock()?;
        crr::commit_alter(&s, &mut st, schema, table)?;
        Ok("OK")
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_config_set", 2, utf8, move |ctx| {
        let name = text_arg(ctx, 0, "the setting name")?;
        if name != crate::MERGE_EQUAL_VALUES {
            return Err(Error::UnknownSetting {
                name: name.to_owned(),
            }
            .into());
        }
        let on = match ctx.get_raw(1) {
            ValueRef::Integer(n) => n != 0,
            ValueRef::Real(r) => r != 0.0,
            ValueRef::Text(t) => !matches!(t, b"0" | b"" | b"false"),
            ValueRef::Null => false,
            ValueRef::Blob(b) => !b.is_empty(),
        };
        let st = s.lock()?;
        crr::set_merge_equal_values(&s, &st, on)?;
        Ok(i64::from(on))
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_config_get", 1, utf8, move |ctx| {
        let name = text_arg(ctx, 0, "the setting name")?;
        if name != crate::MERGE_EQUAL_VALUES {
            return Err(Error::UnknownSetting {
                name: name.to_owned(),
            }
            .into());
        }
        Ok(i64::from(s.merge_equal_values.load(Relaxed)))
    })?;

    let s = sh.clone();
    conn.create_scalar_function("crsql_after_insert", -1, trig, move |ctx| {
        let a = args(ctx);
        let mut st = s.lock()?;
        tracking::after_insert(&s, &mut st, &a)?;
        Ok(0i64)
    })?;
    let s = sh.clone();
    conn.create_scalar_function("crsql_after_update", -1, trig, move |ctx| {
        let a = args(ctx);
        let mut st = s.lock()?;
        tracking::after_update(&s, &mut st, &a)?;
        Ok(0i64)
    })?;
    let s = sh.clone();
    conn.create_scalar_function("crsql_after_delete", -1, trig, move |ctx| {
        let a = args(ctx);
        let mut st = s.lock()?;
        tracking::after_delete(&s, &mut st, &a)?;
        Ok(0i64)
    })?;
    Ok(())
}

/// Reads `config.merge-equal-values` from `crsql_master`.
pub(crate) fn stored_merge_equal_values(conn: &Connection) -> Result<bool> {
    let v: Option<i64> = conn
        .query_row(
            "SELECT CAST(value AS INTEGER) FROM crsql_master WHERE key = ?1",
            [crr::config_key(crate::MERGE_EQUAL_VALUES)],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.unwrap_or(0) != 0)
}
