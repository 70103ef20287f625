//! CRR table metadata: what a CRR looks like to the engine ([`TableInfo`]),
//! the `crsql_as_crr` compatibility rules, the DDL of our clock tables and
//! triggers, and the public [`Schema`] description.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};
use tenantsync_types::Value;
use tenantsync_types::affinity::{Affinity, ColumnType, StrictType};

/// Per-table metadata table: every CRR and its next free slot number.
pub(crate) const TABLES: &str = "crsql_tenantsync_tables";
/// Per-column metadata table: pk ordinal and cell slot of every tracked column.
pub(crate) const COLUMNS: &str = "crsql_tenantsync_columns";

/// `"name"` with embedded quotes doubled.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub(crate) fn clock_table(table: &str) -> String {
    ident(&format!("{table}__crsql_clock"))
}

pub(crate) fn dbv_table(table: &str) -> String {
    ident(&format!("{table}__crsql_dbv"))
}

/// One tracked column.
#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub name: String,
    /// Cell slot in the clock record (1-based); 0 for PK columns.
    pub slot: u32,
}

/// Everything the engine needs about one CRR, with its SQL text prepared.
#[derive(Debug)]
pub(crate) struct TableInfo {
    /// Unique per loaded instance (keys its prepared statements).
    pub id: u64,
    pub name: String,
    /// The clock and dbv tables are keyed by the integer itself (the table's
    /// primary key is an `INTEGER PRIMARY KEY` rowid alias) instead of the
    /// packed pk blob: integer keys are cheaper to compare and append.
    pub int_key: bool,
    /// PK columns in PRIMARY KEY order.
    pub pks: Vec<Column>,
    /// How each PK column converts what is written to it (its affinity,
    /// its STRICT type, or the rowid's INTEGER-only rule), in key order:
    /// [`TableInfo::canonical_key`] applies it.
    pub pk_types: Vec<ColumnType>,
    /// Non-PK tracked columns in slot order (= trigger argument order).
    pub cols: Vec<Column>,
    /// `slot_index[slot]` = index into `cols`.
    pub slot_index: Vec<Option<usize>>,
    /// All columns (PK and not) in table order, for `row_values`.
    pub all_columns: Vec<String>,
    pub sql: TableSql,
}

/// SQL text for the statements the engine runs on one CRR (prepared through
/// the connection's statement cache).
#[derive(Debug)]
pub(crate) struct TableSql {
    pub clock_get: String,
    pub clock_insert_new: String,
    pub clock_insert: String,
    pub clock_update: String,
    pub clock_delete: String,
    pub clock_scan_first: String,
    pub clock_scan: String,
    pub dbv_insert: String,
    pub dbv_delete: String,
    pub dbv_scan_from: String,
    pub dbv_scan_after: String,
    pub row_get: String,
    pub row_get_all: String,
    pub row_exists: String,
    pub row_delete: String,
    pub row_insert_pk: String,
}

impl TableInfo {
    pub fn new(
        name: String,
        int_key: bool,
        pks: Vec<Column>,
        pk_types: Vec<ColumnType>,
        cols: Vec<Column>,
        all_columns: Vec<String>,
    ) -> Self {
        assert_eq!(pks.len(), pk_types.len(), "one type per key column");
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let max_slot = cols.iter().map(|c| c.slot).max().unwrap_or(0) as usize;
        let mut slot_index = vec![None; max_slot + 1];
        for (i, c) in cols.iter().enumerate() {
            slot_index[c.slot as usize] = Some(i);
        }
        let t = ident(&name);
        let clock = clock_table(&name);
        let dbv = dbv_table(&name);
        let pk_where = pks
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = ?{}", ident(&c.name), i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let pk_list = pks
            .iter()
            .map(|c| ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let pk_params = (1..=pks.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let col_list = if cols.is_empty() {
            "NULL".to_owned()
        } else {
            cols.iter()
                .map(|c| ident(&c.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let all_list = all_columns
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = TableSql {
            clock_get: format!("SELECT clock FROM {clock} WHERE pk = ?1"),
            clock_insert_new: format!("INSERT OR IGNORE INTO {clock} (pk, clock) VALUES (?1, ?2)"),
            clock_insert: format!("INSERT INTO {clock} (pk, clock) VALUES (?1, ?2)"),
            clock_update: format!("UPDATE {clock} SET clock = ?2 WHERE pk = ?1"),
            clock_delete: format!("DELETE FROM {clock} WHERE pk = ?1"),
            clock_scan_first: format!("SELECT pk, clock FROM {clock} ORDER BY pk LIMIT ?1"),
            clock_scan: format!("SELECT pk, clock FROM {clock} WHERE pk > ?1 ORDER BY pk LIMIT ?2"),
            dbv_insert: format!("INSERT OR IGNORE INTO {dbv} (db_version, pk) VALUES (?1, ?2)"),
            dbv_delete: format!("DELETE FROM {dbv} WHERE db_version = ?1 AND pk = ?2"),
            dbv_scan_from: format!(
                "SELECT db_version, pk FROM {dbv} WHERE db_version >= ?1 AND db_version <= ?2 \
                 ORDER BY db_version, pk LIMIT ?3"
            ),
            dbv_scan_after: format!(
                "SELECT db_version, pk FROM {dbv} WHERE (db_version, pk) > (?1, ?2) \
                 AND db_version <= ?3 ORDER BY db_version, pk LIMIT ?4"
            ),
            row_get: format!("SELECT {col_list} FROM {t} WHERE {pk_where}"),
            row_get_all: format!("SELECT {all_list} FROM {t} WHERE {pk_where}"),
            row_exists: format!("SELECT 1 FROM {t} WHERE {pk_where}"),
            row_delete: format!("DELETE FROM {t} WHERE {pk_where}"),
            row_insert_pk: format!("INSERT OR IGNORE INTO {t} ({pk_list}) VALUES ({pk_params})"),
        };
        TableInfo {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            name,
            int_key,
            pks,
            pk_types,
            cols,
            slot_index,
            all_columns,
            sql,
        }
    }

    /// The one reading of a primary key named from outside (a merged
    /// change, a read or an eviction by key): its values as SQLite stores
    /// them in the key's columns, packed minimally. Both the row a merge
    /// writes and the clock it keys are found by this key, so two encodings
    /// of one row (`'5'` and `5` for an INTEGER key) are one row, and a
    /// value SQLite would refuse (`'\u{a0}5'` for a rowid, a BLOB in a
    /// STRICT INTEGER key) or NULL is refused here, naming the column.
    pub fn canonical_key(&self, raw: &[u8]) -> Result<(Vec<u8>, Vec<Value>)> {
        let vals = crate::pack::unpack(raw).map_err(|e| Error::pk(&self.name, raw, e))?;
        if vals.len() != self.pks.len() {
            return Err(Error::PkArity {
                table: self.name.clone(),
                pk: hex::encode(raw),
                expected: self.pks.len(),
                got: vals.len(),
            });
        }
        let refuse = |i: usize, reason: String| Error::PkValue {
            table: self.name.clone(),
            pk: hex::encode(raw),
            column: self.pks[i].name.clone(),
            reason: reason.into(),
        };
        let mut out = Vec::with_capacity(vals.len());
        for (i, v) in vals.iter().enumerate() {
            if v.is_null() {
                return Err(refuse(i, "is NULL: a CRR's key is never NULL".into()));
            }
            let stored = self.pk_types[i]
                .store(v)
                .map_err(|m| refuse(i, m.to_string()))?;
            if let Some(reason) = self.ambiguous_key(i, &stored) {
                return Err(refuse(i, reason));
            }
            out.push(stored);
        }
        let packed = crate::pack::PackedPk::pack(&out)
            .map_err(|e| Error::pk(&self.name, raw, e))?
            .0;
        Ok((packed, out))
    }

    /// Why a stored key value cannot name one row (`None` when it can): a
    /// REAL equal to an integer (5.0, 0.0, -0.0) in a key column that
    /// converts no number, where SQLite takes 5 and 5.0 for one key and the
    /// clocks would take them for two. A deliberate difference from
    /// cr-sqlite 0.16, which accepts them and diverges (docs/arch/core.md,
    /// "Keys"); 2.5 or 1e300, which no integer equals, are fine.
    pub fn ambiguous_key(&self, i: usize, stored: &Value) -> Option<String> {
        const TWO_63: f64 = 9_223_372_036_854_775_808.0;
        let integral =
            matches!(stored, Value::Real(r) if r.fract() == 0.0 && (-TWO_63..TWO_63).contains(r));
        (integral && self.pk_types[i].keeps_numbers_apart()).then(|| {
            "holds a REAL equal to an integer, but its type converts no number (no declared type, BLOB, or STRICT ANY): SQLite takes 5 and 5.0 for one key, the clocks for two. Write the INTEGER, or declare the column INTEGER, REAL, NUMERIC or TEXT".to_owned()
        })
    }

    /// Index into `cols` of the column with this name.
    pub fn col_index(&self, name: &str) -> Option<usize> {
        self.cols.iter().position(|c| c.name == name)
    }

    /// Index into `cols` of the column with this slot.
    pub fn slot_col(&self, slot: u32) -> Option<usize> {
        self.slot_index.get(slot as usize).copied().flatten()
    }

    /// `INSERT INTO t (pks.., cols..) VALUES (..) ON CONFLICT DO UPDATE SET ..`
    /// for the non-PK columns whose indexes are given.
    pub fn upsert_sql(&self, col_indexes: &[usize]) -> String {
        let n = self.pks.len();
        let names = self
            .pks
            .iter()
            .chain(col_indexes.iter().map(|&i| &self.cols[i]))
            .map(|c| ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let params = (1..=n + col_indexes.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let set = col_indexes
            .iter()
            .map(|&i| {
                let c = ident(&self.cols[i].name);
                format!("{c} = excluded.{c}")
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "INSERT INTO {} ({names}) VALUES ({params}) ON CONFLICT DO UPDATE SET {set}",
            ident(&self.name)
        )
    }
}

/// Creates the global metadata tables if missing.
pub(crate) fn create_meta_tables(conn: &Connection) -> Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {TABLES} (name TEXT NOT NULL PRIMARY KEY, next_slot INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS {COLUMNS} (tbl TEXT NOT NULL, name TEXT NOT NULL, pk INTEGER NOT NULL, slot INTEGER, PRIMARY KEY (tbl, name)) WITHOUT ROWID;"
    ))?;
    Ok(())
}

/// `pragma_table_info` of one table: (name, declared type, notnull, default,
/// pk ordinal), and each column's collation when it is not BINARY.
pub(crate) fn table_columns(conn: &Connection, table: &str) -> Result<Vec<ColumnSchema>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(?1) ORDER BY cid",
    )?;
    let rows = stmt.query_map([table], |r| {
        Ok(ColumnSchema {
            name: r.get(0)?,
            decl_type: r.get(1)?,
            not_null: r.get::<_, i64>(2)? != 0,
            default: r.get(3)?,
            pk: r.get::<_, i64>(4)? as u32,
            collation: None,
        })
    })?;
    let mut cols = rows.collect::<Result<Vec<_>, _>>()?;
    for c in &mut cols {
        let (_, coll, ..) = conn.column_metadata(None::<&str>, table, c.name.as_str())?;
        c.collation = coll
            .map(|c| c.to_string_lossy().into_owned())
            .filter(|c| !c.eq_ignore_ascii_case("BINARY"));
    }
    Ok(cols)
}

/// Loads every CRR's [`TableInfo`] from our metadata and `pragma_table_info`.
pub(crate) fn load_tables(conn: &Connection) -> Result<Vec<TableInfo>> {
    let exists: bool = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [TABLES],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if !exists {
        return Ok(Vec::new());
    }
    let names: Vec<String> = conn
        .prepare_cached(&format!("SELECT name FROM {TABLES} ORDER BY name"))?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        out.push(load_table(conn, name)?);
    }
    Ok(out)
}

pub(crate) fn load_table(conn: &Connection, name: String) -> Result<TableInfo> {
    let mut meta: HashMap<String, (u32, Option<u32>)> = HashMap::new();
    {
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT name, pk, slot FROM {COLUMNS} WHERE tbl = ?1"
        ))?;
        let rows = stmt.query_map([&name], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u32,
                r.get::<_, Option<i64>>(2)?.map(|s| s as u32),
            ))
        })?;
        for row in rows {
            let (n, pk, slot) = row?;
            meta.insert(n, (pk, slot));
        }
    }
    let present = table_columns(conn, &name)?;
    let all_columns = present.iter().map(|c| c.name.clone()).collect();
    let mut pks: Vec<(u32, Column)> = Vec::new();
    let mut cols: Vec<Column> = Vec::new();
    for (n, (pk, slot)) in &meta {
        if *pk > 0 {
            pks.push((
                *pk,
                Column {
                    name: n.clone(),
                    slot: 0,
                },
            ));
        } else if let Some(slot) = slot {
            cols.push(Column {
                name: n.clone(),
                slot: *slot,
            });
        }
    }
    pks.sort_by_key(|(o, _)| *o);
    cols.sort_by_key(|c| c.slot);
    let key_type: Option<String> = conn
        .query_row(
            "SELECT type FROM pragma_table_info(?1) WHERE name = 'pk'",
            [format!("{name}__crsql_clock")],
            |r| r.get(0),
        )
        .optional()?;
    let int_key = key_type.is_some_and(|t| t.eq_ignore_ascii_case("integer"));
    let pks: Vec<Column> = pks.into_iter().map(|(_, c)| c).collect();
    let pk_types = key_column_types(conn, &name, &present, &pks)?;
    Ok(TableInfo::new(
        name,
        int_key,
        pks,
        pk_types,
        cols,
        all_columns,
    ))
}

/// Checks cr-sqlite's rules for a CRR (reference §5) and returns the
/// table's columns. Messages name the table, the column and the rule.
pub(crate) fn check_compatible(conn: &Connection, table: &str) -> Result<Vec<ColumnSchema>> {
    let refuse = |reason: String| Error::NotCrrCompatible {
        table: table.to_owned(),
        reason,
    };
    if table.contains('"') {
        return Err(refuse(
            "table names containing '\"' are not supported (cr-sqlite fails on them too)".into(),
        ));
    }
    if table.starts_with("crsql_") || table.starts_with("sqlite_") || table.contains("__crsql_") {
        return Err(refuse("this name is reserved for CRR metadata".into()));
    }
    let kind: Option<String> = conn
        .query_row(
            "SELECT type FROM sqlite_master WHERE name = ?1 AND type IN ('table', 'view')",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    match kind.as_deref() {
        Some("table") => {}
        Some(_) => return Err(refuse("it is a view, not a table".into())),
        None => return Err(refuse("no such table".into())),
    }
    let sql: String = conn.query_row(
        "SELECT coalesce(sql, '') FROM sqlite_master WHERE name = ?1 AND type = 'table'",
        [table],
        |r| r.get(0),
    )?;
    if sql.to_ascii_lowercase().starts_with("create virtual table") {
        return Err(refuse("virtual tables cannot be CRRs".into()));
    }
    let cols = table_columns(conn, table)?;
    if let Some(c) = cols.iter().find(|c| c.name.contains('"')) {
        return Err(refuse(format!(
            "column {:?}: names containing '\"' are not supported",
            c.name
        )));
    }
    // 1. No unique index besides the primary key.
    let unique: Option<String> = conn
        .query_row(
            "SELECT name FROM pragma_index_list(?1) WHERE origin != 'pk' AND \"unique\" = 1 LIMIT 1",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(index) = unique {
        let on: Vec<String> = conn
            .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")?
            .query_map([&index], |r| r.get::<_, Option<String>>(0))?
            .filter_map(|r| r.transpose())
            .collect::<Result<_, _>>()?;
        return Err(refuse(format!(
            "unique index {index:?} on ({}) besides the primary key; CRRs allow no UNIQUE constraint other than the primary key (merges could violate it)",
            on.join(", ")
        )));
    }
    // 2./3. A primary key, every column of it NOT NULL.
    let pk_cols: Vec<&ColumnSchema> = cols.iter().filter(|c| c.pk > 0).collect();
    if pk_cols.is_empty() {
        return Err(refuse(
            "it has no primary key; CRRs need a non-nullable primary key".into(),
        ));
    }
    if let Some(c) = pk_cols.iter().find(|c| !c.not_null) {
        let hint = if pk_cols.len() == 1 && c.decl_type.eq_ignore_ascii_case("integer") {
            " (INTEGER PRIMARY KEY columns must also be declared NOT NULL)"
        } else {
            ""
        };
        return Err(refuse(format!(
            "primary key column {:?} is nullable; CRRs need every primary key column NOT NULL{hint}",
            c.name
        )));
    }
    // 3b. Key columns compare with BINARY: under NOCASE or RTRIM two keys
    // that pack differently ('a' and 'A') would be one row to SQLite and
    // two to the clocks (cr-sqlite 0.16 accepts them, and diverges).
    for c in &pk_cols {
        if let Some(coll) = &c.collation {
            return Err(refuse(format!(
                "primary key column {:?} is declared COLLATE {coll}: two keys SQLite holds equal would be two rows to the clocks. Key columns must use the default BINARY collation (normalize the values instead, e.g. lower-case them)",
                c.name
            )));
        }
    }
    // 4. No AUTOINCREMENT.
    if sql.to_ascii_lowercase().contains("autoincrement") {
        return Err(refuse(
            "it uses AUTOINCREMENT; two peers would assign unrelated rows the same key. Use a key that identifies the row (or a UUID)".into(),
        ));
    }
    // 5. No checked foreign keys.
    let fk: Option<(String, String)> = conn
        .query_row(
            "SELECT \"from\", \"table\" FROM pragma_foreign_key_list(?1) LIMIT 1",
            [table],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((from, to)) = fk {
        return Err(refuse(format!(
            "column {from:?} REFERENCES {to:?}: CRRs may not have checked foreign key constraints (they can be violated by row level security or replication)"
        )));
    }
    // 6. NOT NULL non-PK columns need a DEFAULT (merges insert partial rows).
    let nn: Option<String> = conn
        .query_row(
            "SELECT name FROM pragma_table_xinfo(?1) WHERE \"notnull\" = 1 AND dflt_value IS NULL AND pk = 0 LIMIT 1",
            [table],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(c) = nn {
        return Err(refuse(format!(
            "column {c:?} is NOT NULL without a DEFAULT; merges insert partial rows, so make it nullable or give it a default"
        )));
    }
    Ok(cols)
}

/// How each key column converts the values written to it: the rowid's
/// INTEGER-only rule for an `INTEGER PRIMARY KEY` alias, the column's type
/// in a STRICT table, else its declared type's affinity.
fn key_column_types(
    conn: &Connection,
    table: &str,
    present: &[ColumnSchema],
    pks: &[Column],
) -> Result<Vec<ColumnType>> {
    let strict = is_strict(conn, table)?;
    let rowid = has_rowid_alias_pk(conn, table, present)?;
    pks.iter()
        .map(|k| {
            let decl = present
                .iter()
                .find(|c| c.name == k.name)
                .map(|c| c.decl_type.as_str())
                .unwrap_or("");
            Ok(if rowid {
                ColumnType::Rowid
            } else if strict {
                ColumnType::Strict(StrictType::from_decl_type(decl).ok_or_else(|| {
                    Error::Invalid(format!(
                        "table {table:?}: STRICT column {:?} has type {decl:?}",
                        k.name
                    ))
                })?)
            } else {
                ColumnType::Affinity(Affinity::from_decl_type(Some(decl)))
            })
        })
        .collect()
}

/// Whether the table is STRICT.
pub(crate) fn is_strict(conn: &Connection, table: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT strict FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
            [table],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .is_some_and(|s| s != 0))
}

/// Whether the table's primary key is a single `INTEGER PRIMARY KEY`
/// rowid alias (which only ever holds integers).
pub(crate) fn has_rowid_alias_pk(
    conn: &Connection,
    table: &str,
    cols: &[ColumnSchema],
) -> Result<bool> {
    let pks: Vec<&ColumnSchema> = cols.iter().filter(|c| c.pk > 0).collect();
    let [pk] = pks.as_slice() else {
        return Ok(false);
    };
    if !pk.decl_type.eq_ignore_ascii_case("integer") {
        return Ok(false);
    }
    let without_rowid: bool = conn
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
            [table],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .is_some_and(|wr| wr != 0);
    if without_rowid {
        return Ok(false);
    }
    // `INTEGER PRIMARY KEY DESC` is not an alias: reading an alias compiles
    // to the Rowid opcode, any other column to Column. NOT INDEXED keeps an
    // index on another column from turning the read into an index scan
    // (`todos (list_id)` did: its key read compiled to neither).
    let mut stmt = conn.prepare(&format!(
        "EXPLAIN SELECT {} FROM {} NOT INDEXED",
        ident(&pk.name),
        ident(table)
    ))?;
    let mut rows = stmt.query([])?;
    let mut rowid = false;
    while let Some(r) = rows.next()? {
        let op: String = r.get(1)?;
        match op.as_str() {
            "Rowid" => rowid = true,
            "Column" => return Ok(false),
            _ => {}
        }
    }
    Ok(rowid)
}

/// Creates the clock and dbv tables of a CRR, keyed by the packed pk blob
/// or, for rowid-alias keys, by the integer.
pub(crate) fn create_clock_tables(conn: &Connection, table: &str, int_key: bool) -> Result<()> {
    let (clock_pk, without_rowid) = if int_key {
        ("pk INTEGER PRIMARY KEY", "")
    } else {
        ("pk BLOB NOT NULL PRIMARY KEY", " WITHOUT ROWID")
    };
    let dbv_pk = if int_key {
        "pk INTEGER NOT NULL"
    } else {
        "pk BLOB NOT NULL"
    };
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} ({clock_pk}, clock BLOB){without_rowid};
         CREATE TABLE IF NOT EXISTS {} (db_version INTEGER NOT NULL, {dbv_pk}, PRIMARY KEY (db_version, pk)) WITHOUT ROWID;",
        clock_table(table),
        dbv_table(table)
    ))?;
    Ok(())
}

/// Drops the clock and dbv tables of a CRR.
pub(crate) fn drop_clock_tables(conn: &Connection, table: &str) -> Result<()> {
    conn.execute_batch(&format!(
        "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {};",
        clock_table(table),
        dbv_table(table)
    ))?;
    Ok(())
}

pub(crate) fn trigger_names(table: &str) -> [String; 3] {
    [
        ident(&format!("{table}__crsql_itrig")),
        ident(&format!("{table}__crsql_utrig")),
        ident(&format!("{table}__crsql_dtrig")),
    ]
}

/// Drops the tracking triggers of a table if they exist.
pub(crate) fn drop_triggers(conn: &Connection, table: &str) -> Result<()> {
    for name in trigger_names(table) {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {name};"))?;
    }
    Ok(())
}

/// (Re)creates the tracking triggers of a CRR.
pub(crate) fn create_triggers(conn: &Connection, info: &TableInfo) -> Result<()> {
    drop_triggers(conn, &info.name)?;
    let t = ident(&info.name);
    let name = literal(&info.name);
    let [itrig, utrig, dtrig] = trigger_names(&info.name);
    let list = |prefix: &str, cols: &[Column]| {
        cols.iter()
            .map(|c| format!("{prefix}.{}", ident(&c.name)))
            .collect::<Vec<_>>()
    };
    let mut upd = vec![name.clone()];
    upd.extend(list("NEW", &info.pks));
    upd.extend(list("OLD", &info.pks));
    upd.extend(list("NEW", &info.cols));
    upd.extend(list("OLD", &info.cols));
    let mut ins = vec![name.clone()];
    ins.extend(list("NEW", &info.pks));
    let mut del = vec![name];
    del.extend(list("OLD", &info.pks));
    conn.execute_batch(&format!(
        "CREATE TRIGGER {itrig} AFTER INSERT ON {t} WHEN crsql_internal_sync_bit() = 0 BEGIN SELECT crsql_after_insert({}); END;
         CREATE TRIGGER {utrig} AFTER UPDATE ON {t} WHEN crsql_internal_sync_bit() = 0 BEGIN SELECT crsql_after_update({}); END;
         CREATE TRIGGER {dtrig} AFTER DELETE ON {t} WHEN crsql_internal_sync_bit() = 0 BEGIN SELECT crsql_after_delete({}); END;",
        ins.join(", "),
        upd.join(", "),
        del.join(", ")
    ))?;
    Ok(())
}

/// Writes the metadata rows of a CRR: slots for new non-PK columns, PK
/// ordinals, and forgets columns that no longer exist. Returns whether the
/// primary key changed (compared with the metadata already stored).
pub(crate) fn sync_metadata(conn: &Connection, table: &str, cols: &[ColumnSchema]) -> Result<bool> {
    let next_slot: Option<i64> = conn
        .query_row(
            &format!("SELECT next_slot FROM {TABLES} WHERE name = ?1"),
            [table],
            |r| r.get(0),
        )
        .optional()?;
    let mut next_slot = next_slot.unwrap_or(1);
    let mut old: HashMap<String, (u32, Option<i64>)> = HashMap::new();
    {
        let mut stmt = conn.prepare(&format!(
            "SELECT name, pk, slot FROM {COLUMNS} WHERE tbl = ?1"
        ))?;
        let rows = stmt.query_map([table], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u32,
                r.get(2)?,
            ))
        })?;
        for row in rows {
            let (n, pk, slot) = row?;
            old.insert(n, (pk, slot));
        }
    }
    let mut old_pks: Vec<(u32, &String)> = old
        .iter()
        .filter(|(_, (pk, _))| *pk > 0)
        .map(|(n, (pk, _))| (*pk, n))
        .collect();
    old_pks.sort();
    let mut new_pks: Vec<(u32, &String)> = cols
        .iter()
        .filter(|c| c.pk > 0)
        .map(|c| (c.pk, &c.name))
        .collect();
    new_pks.sort();
    let pk_changed = !old.is_empty() && old_pks != new_pks;
    conn.execute(&format!("DELETE FROM {COLUMNS} WHERE tbl = ?1"), [table])?;
    let mut ins = conn.prepare(&format!(
        "INSERT INTO {COLUMNS} (tbl, name, pk, slot) VALUES (?1, ?2, ?3, ?4)"
    ))?;
    for c in cols {
        let slot = if c.pk > 0 {
            None
        } else {
            match old.get(&c.name) {
                Some((0, Some(s))) if !pk_changed => Some(*s),
                _ => {
                    let s = next_slot;
                    next_slot += 1;
                    Some(s)
                }
            }
        };
        ins.execute(params![table, c.name, c.pk, slot])?;
    }
    conn.execute(
        &format!("INSERT OR REPLACE INTO {TABLES} (name, next_slot) VALUES (?1, ?2)"),
        params![table, next_slot],
    )?;
    Ok(pk_changed)
}

/// Removes a table's metadata rows.
pub(crate) fn delete_metadata(conn: &Connection, table: &str) -> Result<()> {
    conn.execute(&format!("DELETE FROM {COLUMNS} WHERE tbl = ?1"), [table])?;
    conn.execute(&format!("DELETE FROM {TABLES} WHERE name = ?1"), [table])?;
    Ok(())
}

/// The tables of a database as [`Schema::tables`] lists them.
pub(crate) fn describe(conn: &Connection, crrs: &[String]) -> Result<Schema> {
    let names: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
             AND name NOT LIKE 'crsql\\_%' ESCAPE '\\' AND name NOT LIKE '%\\_\\_crsql\\_%' ESCAPE '\\'
             ORDER BY name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        let columns = table_columns(conn, &name)?;
        let is_crr = crrs.contains(&name);
        let strict = is_strict(conn, &name)?;
        tables.push(TableSchema {
            name,
            columns,
            is_crr,
            strict,
        });
    }
    Ok(Schema { tables })
}

pub use tenantsync_types::schema::{ColumnSchema, Schema, TableSchema};
