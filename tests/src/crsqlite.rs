//! A real cr-sqlite 0.16.0 peer, driven from Rust.
//!
//! [`RealCrsqlite::spawn`] starts `node tests/interop/peer.mjs`, which loads the
//! `@vlcn.io/crsqlite-wasm@0.16.0` build (SQLite 3.44.0 with the cr-sqlite
//! extension compiled in) and serves JSON-lines requests; one process holds any
//! number of named in-memory databases, each a [`RealPeer`].
//!
//! Values cross the pipe in the project's JSON encoding ([`Value`]'s serde):
//! INTEGER as an exact JSON integer, REAL as a JSON number with a fraction or an
//! exponent, TEXT, NULL, BLOB as `{"blob":"<hex>"}`. The Node side parses
//! integers as `BigInt` and binds every value with the `sqlite3_bind_*` of its
//! own storage class, so `2.0` stays REAL and `2^53+1` stays exact (the
//! `value_types_survive_the_round_trip` test below proves it).
//!
//! Typed API (core's types): [`RealPeer::changes_since`] / [`RealPeer::apply`]
//! with [`Change`], [`RealPeer::site_id`], [`RealPeer::db_version`],
//! [`RealPeer::tables_dump`]; raw SQL: [`RealPeer::exec`], [`RealPeer::query`],
//! [`RealPeer::change_rows`], [`RealPeer::apply_rows`].

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::json;
use tenantsync_types::Value;

use tenantsync_core::{Change, SiteId};

use crate::peer::{Clock, Dump, Rows, SqlPeer, dump};

/// The directory holding `package.json`, `package-lock.json` and `peer.mjs`.
pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// A running Node process serving real cr-sqlite databases.
#[derive(Clone)]
pub struct RealCrsqlite {
    proc: Arc<Mutex<Process>>,
}

struct Process {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<String>>,
    next_id: u64,
    next_db: u64,
}

impl RealCrsqlite {
    /// Starts the Node peer. Fails with a message naming `npm ci` when the npm
    /// packages of `tests/interop` are not installed, and naming Node when it
    /// cannot be started: the interop tests never skip silently.
    pub fn spawn() -> Result<Self> {
        let dir = interop_dir();
        let wasm = dir.join("node_modules/@vlcn.io/crsqlite-wasm/dist/crsqlite.wasm");
        if !wasm.is_file() {
            bail!(
                "the real cr-sqlite build is not installed: {} is missing.\n\
                 Run `npm ci` in {} (CI's .ci/run does it) and run the tests again.",
                wasm.display(),
                dir.display()
            );
        }
        let mut child = Command::new("node")
            .arg("peer.mjs")
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "could not start `node peer.mjs` in {} (Node.js 20+ must be on PATH)",
                    dir.display()
                )
            })?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut err_pipe, &mut buf);
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf));
        });
        let real = RealCrsqlite {
            proc: Arc::new(Mutex::new(Process {
                child,
                stdin: Some(stdin),
                stdout,
                stderr,
                next_id: 0,
                next_db: 0,
            })),
        };
        let versions = real.versions()?;
        ensure!(
            versions == ("3.44.0".to_owned(), 150000),
            "expected the @vlcn.io/crsqlite-wasm 0.16.0 build (SQLite 3.44.0, crsqlite_version 150000), \
             found {versions:?}: run `npm ci` in {}",
            dir.display()
        );
        Ok(real)
    }

    /// SQLite's version and the `crsqlite_version` the build records in
    /// `crsql_master` (150000 for 0.16.0).
    pub fn versions(&self) -> Result<(String, i64)> {
        let v = self.request(json!({"op": "version"}))?;
        let (Some(sqlite), Some(crsqlite)) = (v[0].as_str(), v[1].as_i64()) else {
            bail!("unexpected version answer {v}");
        };
        Ok((sqlite.to_owned(), crsqlite))
    }

    /// Opens a fresh in-memory database in this process.
    pub fn open(&self) -> Result<RealPeer> {
        let name = {
            let mut p = self.proc.lock().unwrap();
            p.next_db += 1;
            format!("db{}", p.next_db)
        };
        self.open_path(&name, ":memory:")
    }

    /// Opens (creating if needed) a database file in the wasm build's in-memory
    /// file system: it survives [`RealPeer::close`] within this process, so a
    /// test can reopen it.
    pub fn open_file(&self, path: &str) -> Result<RealPeer> {
        let name = {
            let mut p = self.proc.lock().unwrap();
            p.next_db += 1;
            format!("db{}", p.next_db)
        };
        self.open_path(&name, path)
    }

    fn open_path(&self, name: &str, path: &str) -> Result<RealPeer> {
        self.request(json!({"op": "open", "db": name, "path": path}))?;
        Ok(RealPeer {
            real: self.clone(),
            name: name.to_owned(),
            open: true,
        })
    }

    /// Sends one request and waits for its answer (`ok` value, or the peer's
    /// error message as an error).
    fn request(&self, mut req: serde_json::Value) -> Result<serde_json::Value> {
        let mut p = self.proc.lock().unwrap();
        p.next_id += 1;
        let id = p.next_id;
        req["id"] = json!(id);
        let mut line = serde_json::to_string(&req)?;
        line.push('\n');
        let sent = match p.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(line.as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        let mut answer = String::new();
        let read = sent.and_then(|()| p.stdout.read_line(&mut answer));
        if !matches!(read, Ok(n) if n > 0) {
            let status = p.child.wait().ok();
            // Let the stderr reader finish.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let stderr = p.stderr.lock().unwrap().clone();
            bail!(
                "the cr-sqlite peer (node peer.mjs) died ({read:?}, exit {status:?}); stderr:\n{stderr}"
            );
        }
        let mut answer: serde_json::Value = serde_json::from_str(&answer)
            .with_context(|| format!("the cr-sqlite peer answered a non-JSON line: {answer}"))?;
        ensure!(
            answer["id"] == json!(id),
            "answer out of order: sent request {id}, got {answer}"
        );
        if let Some(err) = answer.get("err") {
            let code = &answer["code"];
            bail!(
                "real cr-sqlite: {} (code {code})",
                err.as_str().unwrap_or("?")
            );
        }
        Ok(answer["ok"].take())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Closing stdin ends the peer's request loop; it then exits.
        self.stdin.take();
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
    }
}

/// One database of a real cr-sqlite peer process.
pub struct RealPeer {
    real: RealCrsqlite,
    name: String,
    open: bool,
}

fn values(v: serde_json::Value) -> Result<Vec<Value>> {
    serde_json::from_value(v).context("the cr-sqlite peer sent an undecodable value")
}

fn rows(v: serde_json::Value) -> Result<Rows> {
    serde_json::from_value(v).context("the cr-sqlite peer sent an undecodable row")
}

impl RealPeer {
    /// The database's name inside its process (`db1`, `db2`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process this database lives in.
    pub fn process(&self) -> &RealCrsqlite {
        &self.real
    }

    fn request(&self, op: &str, mut req: serde_json::Value) -> Result<serde_json::Value> {
        ensure!(self.open, "database {} is closed", self.name);
        req["op"] = json!(op);
        req["db"] = json!(self.name);
        self.real.request(req)
    }

    /// Runs every statement of `sql` (multi-statement text, no parameters).
    pub fn exec(&self, sql: &str) -> Result<()> {
        self.request("exec", json!({"sql": sql}))
            .with_context(|| format!("exec {sql:?}"))?;
        Ok(())
    }

    /// Runs one statement with parameters; returns its column names and rows.
    pub fn query_with_columns(&self, sql: &str, params: &[Value]) -> Result<(Vec<String>, Rows)> {
        let mut ok = self
            .request("query", json!({"sql": sql, "params": params}))
            .with_context(|| format!("query {sql:?} {params:?}"))?;
        let columns = serde_json::from_value(ok["columns"].take())?;
        Ok((columns, rows(ok["rows"].take())?))
    }

    /// Runs one statement with parameters; returns its rows, typed exactly.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        Ok(self.query_with_columns(sql, params)?.1)
    }

    /// Rows of `SELECT "table", pk, cid, val, col_version, db_version, site_id,
    /// cl, seq FROM crsql_changes <filter>`, each as the nine values SQLite gave.
    pub fn change_rows(&self, filter: &str, params: &[Value]) -> Result<Rows> {
        let ok = self
            .request("changes", json!({"where": filter, "params": params}))
            .with_context(|| format!("crsql_changes {filter:?} {params:?}"))?;
        rows(ok)
    }

    /// `INSERT INTO crsql_changes` every row (nine values each, positional), in
    /// one transaction that is rolled back on any error. Returns
    /// `crsql_rows_impacted()` before the commit.
    pub fn apply_rows(&self, changes: &[Vec<Value>]) -> Result<i64> {
        let ok = self.request("apply", json!({"changes": changes}))?;
        ok["rows_impacted"]
            .as_i64()
            .ok_or_else(|| anyhow!("unexpected apply answer {ok}"))
    }

    /// `crsql_site_id()`.
    pub fn site_id_bytes(&self) -> Result<Vec<u8>> {
        match values(json!([self.request("site_id", json!({}))?]))?.pop() {
            Some(Value::Blob(b)) => Ok(b),
            other => bail!("crsql_site_id() returned {other:?}"),
        }
    }

    /// `crsql_db_version()`.
    pub fn db_version(&self) -> Result<i64> {
        let v = self.request("db_version", json!({}))?;
        v.as_i64()
            .ok_or_else(|| anyhow!("crsql_db_version() returned {v}"))
    }

    /// `crsql_site_id()` as a [`SiteId`].
    pub fn site_id(&self) -> Result<SiteId> {
        let b = self.site_id_bytes()?;
        SiteId::from_slice(&b).ok_or_else(|| anyhow!("crsql_site_id() is {} bytes", b.len()))
    }

    /// The delta feed: `crsql_changes` rows with `db_version > since`
    /// (without those authored by `exclude`), in cr-sqlite's (db_version,
    /// seq) order, as core [`Change`]s.
    pub fn changes_since(&self, since: i64, exclude: Option<&SiteId>) -> Result<Vec<Change>> {
        let rows = match exclude {
            Some(site) => self.change_rows(
                "WHERE db_version > ? AND site_id IS NOT ?",
                &[Value::Integer(since), Value::Blob(site.0.to_vec())],
            )?,
            None => self.change_rows("WHERE db_version > ?", &[Value::Integer(since)])?,
        };
        rows.iter()
            .map(|r| Clock::from_row(r)?.to_change())
            .collect()
    }

    /// Merges `changes` (`INSERT INTO crsql_changes`, one transaction, all or
    /// nothing). Returns how many merges changed something
    /// (`crsql_rows_impacted()` of the batch).
    pub fn apply(&self, changes: &[Change]) -> Result<i64> {
        let rows: Vec<Vec<Value>> = changes
            .iter()
            .map(|c| Clock::from_change(c).to_row())
            .collect();
        self.apply_rows(&rows)
    }

    /// A canonical, typed dump of every CRR table and every clock row, for
    /// comparing peers ([`Dump::diff`]).
    pub fn tables_dump(&self) -> Result<Dump> {
        dump(self)
    }

    /// `crsql_finalize()` then closes the database. A file opened with
    /// [`RealCrsqlite::open_file`] can then be opened again.
    pub fn close(mut self) -> Result<()> {
        self.request("close", json!({}))?;
        self.open = false;
        Ok(())
    }
}

impl Drop for RealPeer {
    fn drop(&mut self) {
        if self.open {
            let _ = self.request("close", json!({}));
        }
    }
}

impl SqlPeer for RealPeer {
    fn exec(&self, sql: &str) -> Result<()> {
        RealPeer::exec(self, sql)
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        RealPeer::query(self, sql, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits(),
            _ => a == b,
        }
    }

    /// Every value goes Rust -> JSON -> Node (bound with its own type) ->
    /// SQLite -> Node (read by its type) -> JSON -> Rust unchanged, and SQLite
    /// saw the right storage class.
    #[test]
    fn value_types_survive_the_round_trip() -> Result<()> {
        let real = RealCrsqlite::spawn()?;
        let db = real.open()?;
        let mut cases = vec![
            (Value::Real(2.0), "real"),
            (Value::Real(-0.0), "real"),
            (Value::Real(0.0), "real"),
            (Value::Real(1e300), "real"),
            (Value::Real(-1e300), "real"),
            (Value::Real(5e-324), "real"),
            (Value::Real(f64::MAX), "real"),
            (Value::Real(f64::MIN_POSITIVE), "real"),
            (Value::Real(0.1 + 0.2), "real"),
            (Value::Real(9007199254740993.0), "real"),
            (Value::Real(1e21), "real"),
            (Value::Real(123456789012345680000.0), "real"),
            (Value::Real(f64::INFINITY), "real"),
            (Value::Real(f64::NEG_INFINITY), "real"),
            (Value::Integer((1 << 53) + 1), "integer"),
            (Value::Integer(-(1 << 53) - 1), "integer"),
            (Value::Integer(i64::MIN), "integer"),
            (Value::Integer(i64::MAX), "integer"),
            (Value::Integer(0), "integer"),
            (Value::Integer(-1), "integer"),
            (Value::Integer(2147483648), "integer"),
            (Value::Text(String::new()), "text"),
            (Value::Text("é ü 日本 🦀 \u{1} \\ \" ' \n\t".into()), "text"),
            (Value::Text("1.0".into()), "text"),
            (Value::Blob(vec![]), "blob"),
            (Value::Blob(vec![0, 0xff, 0x80, 0x0a]), "blob"),
            (Value::Blob((0..=255).collect()), "blob"),
            (Value::Null, "null"),
        ];
        // Arbitrary bit patterns: every finite double must survive (JSON
        // parsing on the Rust side needs serde_json's `float_roundtrip`).
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if f.is_finite() {
                cases.push((Value::Real(f), "real"));
            }
        }
        let params: Vec<Value> = cases.iter().map(|(v, _)| v.clone()).collect();
        // One statement per value keeps it under SQLite's parameter limit.
        for (v, ty) in &cases {
            let rows = db.query("SELECT ?1, typeof(?1)", std::slice::from_ref(v))?;
            assert!(same(&rows[0][0], v), "{v:?} came back as {:?}", rows[0][0]);
            assert_eq!(rows[0][1], Value::Text((*ty).into()), "{v:?}");
        }
        // Stored in an untyped column and read back, too.
        db.exec("CREATE TABLE v (i INTEGER PRIMARY KEY, x)")?;
        for (i, v) in params.iter().enumerate() {
            db.query(
                "INSERT INTO v VALUES (?, ?)",
                &[Value::Integer(i as i64), v.clone()],
            )?;
        }
        let stored = db.query("SELECT x FROM v ORDER BY i", &[])?;
        for (v, row) in params.iter().zip(&stored) {
            assert!(same(&row[0], v), "{v:?} stored as {:?}", row[0]);
        }
        // A REAL-affinity column stores integral reals as integers in the
        // record and reads them back as REAL, losing the sign of -0.0 (SQLite's
        // own behaviour, the same in every build).
        db.exec("CREATE TABLE w (x REAL)")?;
        db.query(
            "INSERT INTO w VALUES (?), (?)",
            &[Value::Real(-0.0), Value::Integer(2)],
        )?;
        let rows = db.query("SELECT x FROM w", &[])?;
        assert!(same(&rows[0][0], &Value::Real(0.0)), "{rows:?}");
        assert!(same(&rows[1][0], &Value::Real(2.0)), "{rows:?}");
        Ok(())
    }

    #[test]
    fn errors_carry_sqlite_messages_and_the_process_survives() -> Result<()> {
        let real = RealCrsqlite::spawn()?;
        let db = real.open()?;
        let err = db.exec("SELECT * FROM nope").unwrap_err();
        assert!(
            format!("{err:#}").contains("no such table: nope"),
            "{err:#}"
        );
        let err = db.query("SELECT 1; SELECT 2", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("one statement"), "{err:#}");
        let err = db.query("SELECT ?", &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("1 parameters, 0 values"),
            "{err:#}"
        );
        assert_eq!(db.query("SELECT 1", &[])?, vec![vec![Value::Integer(1)]]);
        Ok(())
    }

    #[test]
    fn several_databases_per_process_have_their_own_site_ids() -> Result<()> {
        let real = RealCrsqlite::spawn()?;
        let (a, b) = (real.open()?, real.open()?);
        let (sa, sb) = (a.site_id_bytes()?, b.site_id_bytes()?);
        assert_eq!(sa.len(), 16);
        assert_ne!(sa, sb);
        assert_eq!(a.db_version()?, 0);
        a.exec("CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 2.0)")?;
        assert_eq!(a.db_version()?, 1);
        assert_eq!(b.db_version()?, 0);
        Ok(())
    }

    #[test]
    fn apply_is_one_transaction_rolled_back_on_error() -> Result<()> {
        let real = RealCrsqlite::spawn()?;
        let (a, b) = (real.open()?, real.open()?);
        for db in [&a, &b] {
            db.exec("CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t')")?;
        }
        a.exec("INSERT INTO t VALUES (1, 'x'), (2, 'y')")?;
        let mut changes = a.change_rows("", &[])?;
        assert_eq!(changes.len(), 2);
        let mut bad = changes[1].clone();
        bad[2] = Value::Text("no_such_column".into());
        changes.push(bad);
        let err = b.apply_rows(&changes).unwrap_err();
        assert!(format!("{err:#}").contains("change 2"), "{err:#}");
        assert_eq!(
            b.query("SELECT count(*) FROM t", &[])?[0][0],
            Value::Integer(0)
        );
        changes.pop();
        assert_eq!(b.apply_rows(&changes)?, 2);
        assert_eq!(
            b.query("SELECT id, a FROM t ORDER BY id", &[])?,
            vec![
                vec![Value::Integer(1), Value::Text("x".into())],
                vec![Value::Integer(2), Value::Text("y".into())]
            ]
        );
        Ok(())
    }

    #[test]
    fn the_typed_api_syncs_two_real_peers() -> Result<()> {
        let real = RealCrsqlite::spawn()?;
        let (a, b) = (real.open()?, real.open()?);
        for db in [&a, &b] {
            db.exec("CREATE TABLE t (id PRIMARY KEY NOT NULL, v); SELECT crsql_as_crr('t')")?;
        }
        a.exec("INSERT INTO t VALUES (1, 2.0), (9007199254740993, x'00')")?;
        b.exec("INSERT INTO t VALUES (2, 'b')")?;
        let from_a = a.changes_since(0, None)?;
        assert_eq!(from_a.len(), 2);
        assert!(from_a.iter().all(|c| c.site_id == a.site_id().unwrap()));
        assert_eq!(b.apply(&from_a)?, 2);
        assert_eq!(b.apply(&from_a)?, 0, "a second delivery changes nothing");
        // Without echo: b's feed for a holds only b's own row.
        let to_a = b.changes_since(0, Some(&a.site_id()?))?;
        assert_eq!(to_a.len(), 1);
        a.apply(&to_a)?;
        let (da, db) = (a.tables_dump()?, b.tables_dump()?);
        assert_eq!(da.tables, db.tables);
        assert!(da.diff(&db, &Default::default()).is_empty());
        assert_eq!(da.tables["t"].1.len(), 3);
        Ok(())
    }

    #[test]
    fn a_database_file_survives_close_and_reopen() -> Result<()> {
        let real = RealCrsqlite::spawn()?;
        let a = real.open_file("reopen.db")?;
        a.exec("CREATE TABLE t (id PRIMARY KEY NOT NULL, a); SELECT crsql_as_crr('t'); INSERT INTO t VALUES (1, 'x')")?;
        let site = a.site_id_bytes()?;
        a.close()?;
        let a = real.open_file("reopen.db")?;
        assert_eq!(a.site_id_bytes()?, site);
        assert_eq!(a.db_version()?, 1);
        Ok(())
    }
}
