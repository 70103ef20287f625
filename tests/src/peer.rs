//! What every kind of peer can do through SQL, and a canonical dump of a
//! peer's CRR state for comparing peers.
//!
//! [`SqlPeer`] is implemented by the real cr-sqlite peer
//! ([`crate::crsqlite::RealPeer`]) and by any `rusqlite::Connection` (a
//! tenantsync-core database through `CrrConnection::conn()`), so one dump
//! function reads both kinds through the interface they share:
//! `sqlite_master`, the CRR tables themselves and `crsql_changes`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use anyhow::{Context, Result, bail};
use tenantsync_core::{Change, PackedPk, SiteId};
use tenantsync_types::Value;

/// Result rows, each value with its exact storage class.
pub type Rows = Vec<Vec<Value>>;

/// A database reachable through SQL.
pub trait SqlPeer {
    /// Runs every statement of `sql`.
    fn exec(&self, sql: &str) -> Result<()>;
    /// Runs one statement with parameters and returns its rows.
    fn query(&self, sql: &str, params: &[Value]) -> Result<Rows>;
}

impl SqlPeer for rusqlite::Connection {
    fn exec(&self, sql: &str) -> Result<()> {
        self.execute_batch(sql)
            .with_context(|| format!("exec {sql:?}"))
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        let mut stmt = self
            .prepare(sql)
            .with_context(|| format!("prepare {sql:?}"))?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |row| {
                (0..n).map(|i| row.get::<_, Value>(i)).collect()
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Rows>>())
            .with_context(|| format!("query {sql:?} {params:?}"))?;
        Ok(rows)
    }
}

/// The `crsql_changes` columns, in their positional order.
pub const CHANGES_COLUMNS: &str =
    r#""table", pk, cid, val, col_version, db_version, site_id, cl, seq"#;

/// One clock row as `crsql_changes` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Clock {
    pub table: String,
    pub pk: Vec<u8>,
    pub cid: String,
    pub val: Value,
    pub col_version: i64,
    pub db_version: i64,
    pub site_id: Vec<u8>,
    pub cl: i64,
    pub seq: i64,
}

impl Clock {
    /// Reads one `crsql_changes` row (nine values in [`CHANGES_COLUMNS`] order).
    pub fn from_row(row: &[Value]) -> Result<Clock> {
        let text = |v: &Value| match v {
            Value::Text(s) => Ok(s.clone()),
            other => bail!("expected TEXT, got {other:?} in {row:?}"),
        };
        let blob = |v: &Value| match v {
            Value::Blob(b) => Ok(b.clone()),
            other => bail!("expected BLOB, got {other:?} in {row:?}"),
        };
        let int = |v: &Value| match v {
            Value::Integer(i) => Ok(*i),
            other => bail!("expected INTEGER, got {other:?} in {row:?}"),
        };
        let [table, pk, cid, val, cv, dbv, site, cl, seq] = row else {
            bail!("a crsql_changes row has 9 values, got {row:?}");
        };
        Ok(Clock {
            table: text(table)?,
            pk: blob(pk)?,
            cid: text(cid)?,
            val: val.clone(),
            col_version: int(cv)?,
            db_version: int(dbv)?,
            site_id: blob(site)?,
            cl: int(cl)?,
            seq: int(seq)?,
        })
    }

    /// The row as the nine values `INSERT INTO crsql_changes VALUES (...)` takes.
    pub fn to_row(&self) -> Vec<Value> {
        vec![
            Value::Text(self.table.clone()),
            Value::Blob(self.pk.clone()),
            Value::Text(self.cid.clone()),
            self.val.clone(),
            Value::Integer(self.col_version),
            Value::Integer(self.db_version),
            Value::Blob(self.site_id.clone()),
            Value::Integer(self.cl),
            Value::Integer(self.seq),
        ]
    }

    /// A core [`Change`] as a clock row.
    pub fn from_change(c: &Change) -> Clock {
        Clock {
            table: c.table.clone(),
            pk: c.pk.0.clone(),
            cid: c.cid.clone(),
            val: c.val.clone(),
            col_version: c.col_version,
            db_version: c.db_version,
            site_id: c.site_id.0.to_vec(),
            cl: c.cl,
            seq: c.seq,
        }
    }

    /// The clock row as a core [`Change`] (its site id must be 16 bytes).
    pub fn to_change(&self) -> Result<Change> {
        Ok(Change {
            table: self.table.clone(),
            pk: PackedPk(self.pk.clone()),
            cid: self.cid.clone(),
            val: self.val.clone(),
            col_version: self.col_version,
            db_version: self.db_version,
            site_id: SiteId::from_slice(&self.site_id).ok_or_else(|| {
                anyhow::anyhow!("site id {} is not 16 bytes", hex::encode(&self.site_id))
            })?,
            cl: self.cl,
            seq: self.seq,
        })
    }

    /// (table, pk, cid): what identifies a clock across peers.
    pub fn key(&self) -> (&str, &[u8], &str) {
        (&self.table, &self.pk, &self.cid)
    }
}

impl fmt::Display for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "({} {} {} val={} cv={} dbv={} site={} cl={} seq={})",
            self.table,
            hex::encode(&self.pk),
            self.cid,
            self.val,
            self.col_version,
            self.db_version,
            short_site(&self.site_id),
            self.cl,
            self.seq
        )
    }
}

/// The first 3 bytes of a site id in hex, enough to tell peers apart in logs.
pub fn short_site(site: &[u8]) -> String {
    hex::encode(&site[..site.len().min(3)])
}

/// Every CRR table's rows (ordered by primary key) and every clock row
/// (ordered by table, pk bytes, cid) of one peer.
#[derive(Clone, Debug, PartialEq)]
pub struct Dump {
    /// Table name -> (column names, rows in primary-key order).
    pub tables: BTreeMap<String, (Vec<String>, Rows)>,
    pub clocks: Vec<Clock>,
}

/// Names of the CRR tables: those with a `<name>__crsql_clock` table (both
/// cr-sqlite and tenantsync-core keep one per CRR).
pub fn crr_tables(peer: &(impl SqlPeer + ?Sized)) -> Result<Vec<String>> {
    let rows = peer.query(
        r"SELECT substr(name, 1, length(name) - 13) FROM sqlite_master
           WHERE type = 'table' AND name LIKE '%\_\_crsql\_clock' ESCAPE '\' ORDER BY 1",
        &[],
    )?;
    rows.into_iter()
        .map(|r| match &r[0] {
            Value::Text(t) => Ok(t.clone()),
            other => bail!("table name {other:?}"),
        })
        .collect()
}

/// Reads a canonical dump of `peer`.
pub fn dump(peer: &(impl SqlPeer + ?Sized)) -> Result<Dump> {
    let mut tables = BTreeMap::new();
    for table in crr_tables(peer)? {
        let info = peer.query(
            "SELECT name, pk FROM pragma_table_info(?) ORDER BY cid",
            &[Value::Text(table.clone())],
        )?;
        let mut columns = Vec::new();
        let mut pks = Vec::new();
        for row in &info {
            let (Value::Text(name), Value::Integer(pk)) = (&row[0], &row[1]) else {
                bail!("pragma_table_info({table}) row {row:?}");
            };
            columns.push(name.clone());
            if *pk > 0 {
                pks.push((*pk, format!("\"{name}\"")));
            }
        }
        pks.sort();
        let order: Vec<String> = pks.into_iter().map(|(_, c)| c).collect();
        let rows = peer.query(
            &format!("SELECT * FROM \"{table}\" ORDER BY {}", order.join(", ")),
            &[],
        )?;
        tables.insert(table, (columns, rows));
    }
    let mut clocks = peer
        .query(&format!("SELECT {CHANGES_COLUMNS} FROM crsql_changes"), &[])?
        .iter()
        .map(|r| Clock::from_row(r))
        .collect::<Result<Vec<_>>>()?;
    clocks.sort_by(|a, b| a.key().cmp(&b.key()));
    Ok(Dump { tables, clocks })
}

/// What two peers may legitimately disagree on, beyond db_version and seq
/// (always local: a merge stamps its own db_version, and a receiver that keeps
/// its clock keeps its seq).
#[derive(Clone, Debug, Default)]
pub struct TieRule {
    /// Every (table, pk, cid, col_version, val, site) that a local write of
    /// some peer produced (its own writes; and cells a primary-key UPDATE
    /// moved to a new key, which keep their author's site). In cr-sqlite 0.16.0 (`merge-equal-values` off, our default) a
    /// change whose col_version and value equal the receiver's is a no-op: the
    /// receiver keeps its own site id for the cell. Two peers may therefore end
    /// with different site ids on a cell when both sites really wrote that
    /// same value at that same col_version (concurrent equal writes, concurrent
    /// deletes, concurrent resurrections). A difference is accepted only then:
    /// both site ids must be authors of exactly that (cell, col_version, value),
    /// so a peer that stamps a remote change with a wrong site is still caught.
    pub authored: BTreeSet<AuthoredCell>,
    /// Every (table, pk, site) where the site wrote some clock of the row
    /// locally. Sentinels (`cid = '-1'`) need this wider rule: when a column
    /// change with a higher causal length reaches a peer before the sentinel
    /// that made it, the peer creates the sentinel from the column change and
    /// copies *its* site id (reference §3 "out-of-order delivery"); the real
    /// sentinel arriving later is a no-op (same cl). A relay can even forward
    /// an old cell clock zeroed by a resurrection (col_version 0, its site
    /// kept) under the new causal length. So two converged peers may show a
    /// sentinel with equal causal length under any two sites that wrote
    /// clocks of that row.
    pub row_authors: BTreeSet<(String, Vec<u8>, Vec<u8>)>,
}

impl TieRule {
    /// Records a clock row a local write produced (not a merge).
    pub fn record_local(&mut self, c: &Clock) {
        self.authored.insert(AuthoredCell::of(c));
        self.row_authors
            .insert((c.table.clone(), c.pk.clone(), c.site_id.clone()));
    }

    fn excuses(&self, x: &Clock, y: &Clock) -> bool {
        if x.cid == "-1" {
            let author = |c: &Clock| {
                self.row_authors
                    .contains(&(c.table.clone(), c.pk.clone(), c.site_id.clone()))
            };
            author(x) && author(y)
        } else {
            self.authored.contains(&AuthoredCell::of(x))
                && self.authored.contains(&AuthoredCell::of(y))
        }
    }
}

/// One locally written cell clock, as [`TieRule`] records it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuthoredCell {
    pub table: String,
    pub pk: Vec<u8>,
    pub cid: String,
    pub col_version: i64,
    /// The value's JSON encoding (0.0 for -0.0, see [`same_value`]).
    pub val: String,
    pub site_id: Vec<u8>,
}

impl AuthoredCell {
    pub fn of(c: &Clock) -> AuthoredCell {
        AuthoredCell {
            table: c.table.clone(),
            pk: c.pk.clone(),
            cid: c.cid.clone(),
            col_version: c.col_version,
            val: canonical_json(&c.val),
            site_id: c.site_id.clone(),
        }
    }
}

/// Same storage class and same value. REALs compare with `==`: bit for bit
/// except that 0.0 equals -0.0, as in SQLite's comparison and cr-sqlite's
/// merge rule (a tie on equal values keeps the receiver's), so the sign of a
/// zero legitimately differs between converged peers.
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x == y,
        _ => a == b,
    }
}

/// A value's JSON encoding with -0.0 written as 0.0 (see [`same_value`]).
fn canonical_json(v: &Value) -> String {
    match v {
        Value::Real(r) if *r == 0.0 => "0.0".to_owned(),
        other => serde_json::to_string(other).expect("values serialize"),
    }
}

fn same_rows(a: &Rows, b: &Rows) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(u, v)| same_value(u, v)))
}

impl Dump {
    /// Every difference between two peers' dumps that [`TieRule`] does not
    /// excuse, one line each (empty: the peers converged).
    pub fn diff(&self, other: &Dump, rule: &TieRule) -> Vec<String> {
        let mut out = Vec::new();
        let names: BTreeSet<&String> = self.tables.keys().chain(other.tables.keys()).collect();
        for name in names {
            match (self.tables.get(name), other.tables.get(name)) {
                (Some((ca, ra)), Some((cb, rb))) => {
                    if ca != cb {
                        out.push(format!("table {name}: columns {ca:?} vs {cb:?}"));
                    } else if !same_rows(ra, rb) {
                        out.push(format!(
                            "table {name}: rows\n  {}\n  vs\n  {}",
                            fmt_rows(ra),
                            fmt_rows(rb)
                        ));
                    }
                }
                (a, b) => out.push(format!(
                    "table {name}: present {} vs {}",
                    a.is_some(),
                    b.is_some()
                )),
            }
        }
        let mut a = self.clocks.iter().peekable();
        let mut b = other.clocks.iter().peekable();
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(x), Some(y)) if x.key() == y.key() => {
                    if x.col_version != y.col_version || x.cl != y.cl || !same_value(&x.val, &y.val)
                    {
                        out.push(format!("clock {x} vs {y}"));
                    } else if x.site_id != y.site_id && !rule.excuses(x, y) {
                        out.push(format!(
                            "clock {x} vs {y}: site ids differ and are not both authors of this value"
                        ));
                    }
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.key() < y.key() => {
                    if !lone_alive_sentinel(x, other) {
                        out.push(format!("clock {x} only on the first peer"));
                    }
                    a.next();
                }
                (Some(x), None) => {
                    if !lone_alive_sentinel(x, other) {
                        out.push(format!("clock {x} only on the first peer"));
                    }
                    a.next();
                }
                (_, Some(y)) => {
                    if !lone_alive_sentinel(y, self) {
                        out.push(format!("clock {y} only on the second peer"));
                    }
                    b.next();
                }
            }
        }
        out
    }
}

/// A sentinel of causal length 1 (what a primary-key UPDATE writes for the
/// new key) that the other peer lacks while it holds the same row alive at
/// causal length 1 through cell clocks. cr-sqlite 0.16.0 stores such a
/// sentinel only if it arrives before the row's cell clocks: once a row has
/// any clock its local cl is 1, and a '-1' change with cl equal to the local
/// cl is ignored (reference §3). So two real cr-sqlite peers differ here
/// too, depending on delivery order; the sentinel says nothing the cell
/// clocks do not (cl 1 = alive), and any later delete or resurrection
/// replaces it on both.
fn lone_alive_sentinel(c: &Clock, other: &Dump) -> bool {
    c.cid == "-1"
        && c.cl == 1
        && c.col_version == 1
        && other
            .clocks
            .iter()
            .any(|o| o.table == c.table && o.pk == c.pk && o.cid != "-1" && o.cl == 1)
}

fn fmt_rows(rows: &Rows) -> String {
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r.iter().map(Value::to_string).collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A cr-sqlite peer of either kind, as the interop tests drive it: SQL, the
/// change feed and merges.
pub trait CrPeer: SqlPeer {
    /// A short name for logs: `real#1`, `core#2`.
    fn label(&self) -> String;
    /// `crsql_site_id()`.
    fn site(&self) -> Result<Vec<u8>>;
    /// `crsql_db_version()`.
    fn version(&self) -> Result<i64>;
    /// `crsql_changes` rows matching `filter` (SQL after the FROM, e.g.
    /// `WHERE db_version > ?`), in the order the peer gives them.
    fn changes(&self, filter: &str, params: &[Value]) -> Result<Vec<Clock>>;
    /// The delta feed: changes with `db_version > since`, without those
    /// authored by `exclude` when given, in (db_version, seq) order. Through
    /// SQL unless the peer has a typed API.
    fn feed(&self, since: i64, exclude: Option<&[u8]>) -> Result<Vec<Clock>> {
        feed_by_sql(self, since, exclude)
    }
    /// Merges `changes` in one transaction, all or nothing.
    fn merge(&self, changes: &[Clock]) -> Result<()>;
}

/// Rows of `SELECT <CHANGES_COLUMNS> FROM crsql_changes <filter>` through SQL.
pub fn changes_by_sql(
    peer: &(impl SqlPeer + ?Sized),
    filter: &str,
    params: &[Value],
) -> Result<Vec<Clock>> {
    peer.query(
        &format!("SELECT {CHANGES_COLUMNS} FROM crsql_changes {filter}"),
        params,
    )?
    .iter()
    .map(|r| Clock::from_row(r))
    .collect()
}

/// [`CrPeer::feed`] through `crsql_changes`.
pub fn feed_by_sql(
    peer: &(impl CrPeer + ?Sized),
    since: i64,
    exclude: Option<&[u8]>,
) -> Result<Vec<Clock>> {
    match exclude {
        Some(site) => peer.changes(
            "WHERE db_version > ? AND site_id IS NOT ?",
            &[Value::Integer(since), Value::Blob(site.to_vec())],
        ),
        None => peer.changes("WHERE db_version > ?", &[Value::Integer(since)]),
    }
}

impl CrPeer for crate::crsqlite::RealPeer {
    fn label(&self) -> String {
        format!("real#{}", self.name())
    }

    fn site(&self) -> Result<Vec<u8>> {
        self.site_id_bytes()
    }

    fn version(&self) -> Result<i64> {
        self.db_version()
    }

    fn changes(&self, filter: &str, params: &[Value]) -> Result<Vec<Clock>> {
        self.change_rows(filter, params)?
            .iter()
            .map(|r| Clock::from_row(r))
            .collect()
    }

    fn merge(&self, changes: &[Clock]) -> Result<()> {
        let rows: Vec<Vec<Value>> = changes.iter().map(Clock::to_row).collect();
        self.apply_rows(&rows)?;
        Ok(())
    }
}
