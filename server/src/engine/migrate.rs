//! Schema changes and their versions (docs/PROTOCOL.md §5.4).
//!
//! A script runs statement by statement inside the caller's transaction.
//! Each statement is classified by what SQLite's authorizer reports while
//! it is prepared (no SQL parsing of our own): an `ALTER TABLE` of a CRR
//! runs between `crsql_begin_alter` and `crsql_commit_alter`; a statement
//! creating something that exists is skipped (a schema file can be applied
//! at every start). A change from the service role may only add: tables,
//! columns, indexes, views, CRRs (and drop indexes, views and local
//! tables). After the script, every CRR must keep the columns replicas
//! have, in place and typed as before ([`check_kept`]).
//!
//! Each change that did something is recorded in `tenantsync_schema_log`
//! as a new version with the script a replica runs to reach it (the
//! statements that ran, CRR alters wrapped as above).

use std::sync::{Arc, Mutex};

use rusqlite::OptionalExtension;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use tenantsync_core::CrrConnection;
use tenantsync_protocol::http::SchemaMigration;

use super::schema::{is_crr_metadata, is_server_table, is_sqlite_table};

pub(crate) const CREATE_LOG: &str = "CREATE TABLE IF NOT EXISTS tenantsync_schema_log (
  version INTEGER PRIMARY KEY,
  script TEXT NOT NULL,
  applied_at INTEGER NOT NULL
)";

/// Who wrote the script, and so what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The `serve` schema file at start: anything the file says, as
    /// before schema versions existed.
    Start,
    /// A change to a running server (`POST /v1/admin/schema`, the schema
    /// file on reload): additions only.
    Change,
}

/// What a script did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The statements that ran, as written.
    pub applied: Vec<String>,
    /// The statements skipped (what they create exists).
    pub skipped: Vec<String>,
    /// The replica script of the statements that ran.
    pub script: String,
    /// The replica script of every statement, skipped ones included (the
    /// first version of a database that existed before versions did).
    pub full: String,
}

/// What the authorizer saw while a statement was prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Alter(String),
    DropTable(String),
    /// A table the statement creates.
    Creates(String),
    /// A table the statement creates or drops an index on.
    Touches(String),
    Writes(String),
    /// Rows of a table read (a `CREATE TABLE ... AS SELECT` copies them).
    Reads(String),
    Function(String),
    /// A PRAGMA (the server sets its own; it cannot change the journal
    /// inside the script's transaction).
    Pragma,
    /// An action a schema change may not take (its name).
    Other(String),
}

fn seen(action: &AuthAction<'_>) -> Option<Seen> {
    use AuthAction::*;
    let table = |t: &str| Seen::Touches(t.to_owned());
    Some(match action {
        AlterTable { table_name, .. } => Seen::Alter((*table_name).to_owned()),
        DropTable { table_name } => Seen::DropTable((*table_name).to_owned()),
        CreateTable { table_name } => Seen::Creates((*table_name).to_owned()),
        CreateIndex { table_name, .. } | DropIndex { table_name, .. } => table(table_name),
        Insert { table_name } | Delete { table_name } | Update { table_name, .. } => {
            Seen::Writes((*table_name).to_owned())
        }
        Function { function_name } => Seen::Function(function_name.to_ascii_lowercase()),
        Read { table_name, .. } if !is_sqlite_table(table_name) => {
            Seen::Reads((*table_name).to_owned())
        }
        Read { .. }
        | Select
        | Recursive
        | CreateView { .. }
        | DropView { .. }
        | Reindex { .. }
        | Analyze { .. } => return None,
        CreateTrigger { .. } | DropTrigger { .. } => Seen::Other("a trigger".into()),
        CreateTempTable { .. }
        | CreateTempIndex { .. }
        | CreateTempTrigger { .. }
        | CreateTempView { .. }
        | DropTempTable { .. }
        | DropTempIndex { .. }
        | DropTempTrigger { .. }
        | DropTempView { .. } => Seen::Other("a temporary object".into()),
        Transaction { .. } | Savepoint { .. } => {
            Seen::Other("a transaction (the server runs the change in one)".into())
        }
        Pragma { .. } => Seen::Pragma,
        Attach { .. } | Detach { .. } => Seen::Other("ATTACH or DETACH".into()),
        CreateVtable { .. } | DropVtable { .. } => Seen::Other("a virtual table".into()),
        other => Seen::Other(format!("{other:?}")),
    })
}

/// Records what SQLite's authorizer reports while a statement is
/// prepared (installed on the connection for the script's run).
struct Classifier {
    log: Arc<Mutex<Option<Vec<Seen>>>>,
}

impl Classifier {
    fn install(db: &mut CrrConnection) -> Result<Classifier, String> {
        let log: Arc<Mutex<Option<Vec<Seen>>>> = Arc::default();
        let hook = log.clone();
        db.conn_mut()
            .authorizer(Some(move |ctx: AuthContext<'_>| {
                if let Some(v) = hook.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                    && ctx.accessor.is_none()
                    && let Some(s) = seen(&ctx.action)
                {
                    v.push(s);
                }
                Authorization::Allow
            }))
            .map_err(|e| e.to_string())?;
        Ok(Classifier { log })
    }

    /// Prepares `stmt`: whether SQLite takes it, and what it would do.
    fn prepare(&self, db: &CrrConnection, stmt: &str) -> (rusqlite::Result<()>, Vec<Seen>) {
        *self.log.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        let prepared = db.conn().prepare(stmt).map(drop);
        let actions = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        (prepared, actions)
    }
}

/// Runs one statement, an `ALTER TABLE` of the CRR `crr_alter` inside the
/// alter protocol; with the text a replica runs for it.
fn execute(
    db: &CrrConnection,
    stmt: &str,
    crr_alter: Option<&str>,
) -> (Result<(), String>, String) {
    match crr_alter {
        Some(t) => (
            db.alter(t, |c| run_one(c, stmt)).map_err(|e| e.to_string()),
            format!(
                "SELECT crsql_begin_alter('{q}');\n{stmt};\nSELECT crsql_commit_alter('{q}');\n",
                q = t.replace('\'', "''")
            ),
        ),
        None => (
            run_one(db.conn(), stmt).map_err(|e| e.to_string()),
            format!("{stmt};\n"),
        ),
    }
}

/// Runs `sql` (inside the caller's transaction). The connection's
/// authorizer is replaced while it runs: the caller installs its own again.
pub(crate) fn run_script(db: &mut CrrConnection, sql: &str, mode: Mode) -> Result<Applied, String> {
    let classifier = Classifier::install(db)?;
    let crrs: Vec<String> = db
        .schema()
        .map_err(|e| e.to_string())?
        .tables
        .into_iter()
        .filter(|t| t.is_crr)
        .map(|t| t.name)
        .collect();
    let mut out = Applied::default();
    let mut rest = sql;
    let mut n = 0;
    while let Some(next) = tenantsync_core::script::next_statement(db.conn(), rest) {
        let stmt = rest[..next.end]
            .trim()
            .trim_end_matches(';')
            .trim()
            .to_owned();
        rest = &rest[next.end..];
        if stmt.is_empty() {
            continue;
        }
        n += 1;
        let at = |why: &dyn std::fmt::Display| format!("statement {n} ({stmt}): {why}");
        let (prepared, actions) = classifier.prepare(db, &stmt);
        if let Err(e) = prepared.and(next.prepared) {
            if !skippable(&e.to_string()) {
                return Err(at(&e));
            }
            out.full.push_str(&format!("{stmt};\n"));
            out.skipped.push(stmt);
            continue;
        }
        if mode == Mode::Change {
            refuse_unsafe(&actions, &crrs).map_err(|why| at(&why))?;
        } else if actions.contains(&Seen::Pragma) {
            // A replica runs it (in the first version's script); the
            // server keeps its own settings, and cannot change its journal
            // inside the script's transaction.
            tracing::info!(statement = %stmt, "the schema file's PRAGMA is for replicas; the server keeps its own settings");
            out.full.push_str(&format!("{stmt};\n"));
            out.skipped.push(stmt);
            continue;
        }
        let crr_alter = actions.iter().find_map(|a| match a {
            Seen::Alter(t) => crrs.iter().find(|c| c.eq_ignore_ascii_case(t)),
            _ => None,
        });
        let was = fingerprint(db.conn()).map_err(|e| e.to_string())?;
        let (ran, text) = execute(db, &stmt, crr_alter.map(String::as_str));
        out.full.push_str(&text);
        match ran {
            // `IF NOT EXISTS`, `crsql_as_crr` of a CRR: nothing to replay.
            Ok(()) if fingerprint(db.conn()).map_err(|e| e.to_string())? == was => {
                out.skipped.push(stmt)
            }
            Ok(()) => {
                out.script.push_str(&text);
                out.applied.push(stmt);
            }
            Err(e) if skippable(&e) => out.skipped.push(stmt),
            Err(e) => return Err(at(&e)),
        }
    }
    Ok(out)
}

/// The schema as `sqlite_master` has it: equal before and after a
/// statement that changed nothing.
fn fingerprint(c: &rusqlite::Connection) -> rusqlite::Result<String> {
    c.query_row(
        "SELECT group_concat(x, char(10)) FROM (SELECT type || ' ' || name || ' ' || coalesce(sql, '') AS x FROM sqlite_master ORDER BY type, name)",
        [],
        |r| r.get::<_, Option<String>>(0),
    )
    .map(Option::unwrap_or_default)
}

fn run_one(c: &rusqlite::Connection, stmt: &str) -> tenantsync_core::Result<()> {
    let mut st = c.prepare(stmt)?;
    let mut rows = st.raw_query();
    while rows.next()?.is_some() {}
    Ok(())
}

/// A statement creating what exists: skipped, so a schema file can run at
/// every start.
fn skippable(message: &str) -> bool {
    message.contains("already exists") || message.contains("duplicate column name")
}

/// What a change from the service role may not do.
fn refuse_unsafe(actions: &[Seen], crrs: &[String]) -> Result<(), String> {
    let is_crr = |t: &str| crrs.iter().any(|c| c.eq_ignore_ascii_case(t));
    let read = actions.iter().find_map(|a| match a {
        Seen::Reads(t) => Some(t),
        _ => None,
    });
    if let Some(t) = read
        && actions.iter().any(|a| matches!(a, Seen::Creates(_)))
    {
        return Err(format!(
            "it copies rows of {t} (CREATE TABLE ... AS SELECT); create the table, then fill it with POST /v1/sql"
        ));
    }
    for a in actions {
        match a {
            Seen::Alter(t)
            | Seen::DropTable(t)
            | Seen::Creates(t)
            | Seen::Touches(t)
            | Seen::Writes(t)
                if is_server_table(t) || is_crr_metadata(t) =>
            {
                return Err(format!("it touches {t}, a table of the server's own"));
            }
            Seen::DropTable(t) if is_crr(t) => {
                return Err(format!(
                    "it drops {t}, a synced table (replicas hold its rows); a schema change only adds"
                ));
            }
            Seen::Writes(t) if !is_sqlite_table(t) => {
                return Err(format!(
                    "it writes rows of {t}; a schema change changes the schema only (write rows with POST /v1/sql)"
                ));
            }
            Seen::Function(f) if f.starts_with("crsql_") && f != "crsql_as_crr" => {
                return Err(format!(
                    "it calls {f}; a schema change may call crsql_as_crr only (the server runs ALTER TABLE of a CRR between crsql_begin_alter and crsql_commit_alter itself)"
                ));
            }
            Seen::Pragma => {
                return Err("a PRAGMA is not a schema change the server applies".into());
            }
            Seen::Other(what) => {
                return Err(format!("{what} is not a schema change the server applies"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every CRR of `before` is still a CRR with its columns in place, named
/// and typed as they were, and its primary key unchanged: what replicas
/// hold stays valid.
pub(crate) fn check_kept(
    before: &tenantsync_core::Schema,
    after: &tenantsync_core::Schema,
) -> Result<(), String> {
    for old in before.tables.iter().filter(|t| t.is_crr) {
        let Some(new) = after.tables.iter().find(|t| t.name == old.name) else {
            return Err(format!(
                "table {} is a synced table and would be gone (renamed or dropped)",
                old.name
            ));
        };
        if !new.is_crr {
            return Err(format!("table {} would stop being synced", old.name));
        }
        for (i, c) in old.columns.iter().enumerate() {
            match new.columns.get(i) {
                Some(n) if n.name == c.name && n.decl_type == c.decl_type && n.pk == c.pk => {}
                Some(n) if n.name == c.name => {
                    return Err(format!(
                        "column {}.{} would change its type or key ({} to {}): replicas hold it as it is",
                        old.name, c.name, c.decl_type, n.decl_type
                    ));
                }
                _ => {
                    return Err(format!(
                        "column {}.{} would be dropped or renamed: replicas hold it (a synced column stays)",
                        old.name, c.name
                    ));
                }
            }
        }
        if new.columns.iter().skip(old.columns.len()).any(|c| c.pk > 0) {
            return Err(format!("table {}'s primary key would change", old.name));
        }
    }
    Ok(())
}

/// Every CRR still meets the rules of a CRR (core's `crsql_as_crr`
/// checks): an `ALTER TABLE` is checked by `crsql_commit_alter`, but an
/// index is created without it, and a unique one would let two replicas
/// insert rows a merge cannot take both of.
pub(crate) fn check_crrs(
    db: &CrrConnection,
    schema: &tenantsync_core::Schema,
) -> Result<(), String> {
    for t in schema.tables.iter().filter(|t| t.is_crr) {
        db.check_crr(&t.name)
            .map_err(|e| format!("the change breaks a rule of synced tables: {e}"))?;
    }
    Ok(())
}

/// The recorded versions, oldest first.
pub(crate) fn read_log(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<SchemaMigration>> {
    let mut st =
        conn.prepare("SELECT version, script FROM tenantsync_schema_log ORDER BY version")?;
    st.query_map([], |r| {
        Ok(SchemaMigration {
            version: r.get(0)?,
            sql: r.get(1)?,
        })
    })?
    .collect()
}

/// The current version in the caller's read transaction (1 before any
/// record).
pub(crate) fn current_version(conn: &rusqlite::Connection) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row("SELECT max(version) FROM tenantsync_schema_log", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .optional()?
        .flatten()
        .unwrap_or(1))
}

/// Records `script` as the next version; returns it.
pub(crate) fn record(conn: &rusqlite::Connection, script: &str) -> rusqlite::Result<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    conn.execute(
        "INSERT INTO tenantsync_schema_log (version, script, applied_at)
         VALUES ((SELECT coalesce(max(version), 0) + 1 FROM tenantsync_schema_log), ?1, ?2)",
        rusqlite::params![script, now],
    )?;
    conn.query_row("SELECT max(version) FROM tenantsync_schema_log", [], |r| {
        r.get(0)
    })
}

/// At a shard's start: runs the schema file (in one transaction) and
/// returns the shard's versions. The first start records the file as
/// version 1; a file that changed since (it did something) is a new
/// version. A shard behind `leader` (shard 0's versions: a node stopped
/// between the shards' commits of a change) runs the versions it lacks.
pub(crate) fn start(
    db: &mut CrrConnection,
    file: &str,
    leader: Option<&[SchemaMigration]>,
    frozen: bool,
) -> Result<Vec<SchemaMigration>, String> {
    let conn_err = |e: rusqlite::Error| e.to_string();
    db.conn().execute_batch(CREATE_LOG).map_err(conn_err)?;
    db.conn()
        .execute_batch("BEGIN IMMEDIATE")
        .map_err(conn_err)?;
    let r = (|| {
        let before = db.schema().map_err(|e| e.to_string())?;
        let log = read_log(db.conn()).map_err(conn_err)?;
        let applied = run_script(db, file, Mode::Start)?;
        check_kept(&before, &db.schema().map_err(|e| e.to_string())?)?;
        if log.is_empty() {
            record(db.conn(), &applied.full).map_err(conn_err)?;
        } else if frozen && !applied.applied.is_empty() {
            return Err(format!(
                "the schema file adds {} statement(s) to the schema this cluster's shards hold; schema changes are not supported in a cluster yet (docs/CLUSTER.md)",
                applied.applied.len()
            ));
        } else if !applied.applied.is_empty() {
            let v = record(db.conn(), &applied.script).map_err(conn_err)?;
            tracing::info!(
                schema_version = v,
                statements = applied.applied.len(),
                "the schema file changed: a new schema version"
            );
        }
        let mut log = read_log(db.conn()).map_err(conn_err)?;
        if let Some(leader) = leader {
            if leader.len() < log.len() || leader[..log.len()] != log[..] {
                return Err(format!(
                    "this shard's schema versions (1 to {}) are not those of shard 0 (1 to {}): restore the shards' databases from one backup",
                    log.len(),
                    leader.len()
                ));
            }
            for m in &leader[log.len()..] {
                db.conn()
                    .execute_batch(&m.sql)
                    .map_err(|e| format!("catching up schema version {}: {e}", m.version))?;
                record(db.conn(), &m.sql).map_err(conn_err)?;
                tracing::info!(
                    schema_version = m.version,
                    "caught up with shard 0's schema"
                );
            }
            log = read_log(db.conn()).map_err(conn_err)?;
        }
        Ok(log)
    })();
    let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
    db.conn().execute_batch(end).map_err(conn_err)?;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> CrrConnection {
        CrrConnection::open_in_memory().unwrap()
    }

    /// At a start, a PRAGMA is left to replicas, `IF NOT EXISTS` of what
    /// exists and `crsql_as_crr` of a CRR are skipped, an `ALTER TABLE` of
    /// a CRR is wrapped in the alter protocol.
    #[test]
    fn a_start_script_runs_what_is_new_and_wraps_crr_alters() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = CrrConnection::open(dir.path().join("s.db")).unwrap();
        db.conn()
            .execute_batch("PRAGMA journal_mode = WAL")
            .unwrap();
        // Inside the script's transaction this PRAGMA would fail: it is
        // left to replicas.
        let first = "PRAGMA journal_mode = DELETE;
            CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT);
            SELECT crsql_as_crr('t');";
        let log = start(&mut db, first, None, false).unwrap();
        assert_eq!(log.len(), 1);
        assert!(log[0].sql.starts_with("PRAGMA journal_mode = DELETE;\n"));
        let again = format!(
            "{first}
            CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY NOT NULL, a TEXT);
            ALTER TABLE t ADD COLUMN b TEXT;"
        );
        let log = start(&mut db, &again, None, false).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(
            log[1].sql,
            "SELECT crsql_begin_alter('t');\nALTER TABLE t ADD COLUMN b TEXT;\nSELECT crsql_commit_alter('t');\n"
        );
        // The same file at the next start: nothing new, no new version.
        assert_eq!(start(&mut db, &again, None, false).unwrap().len(), 2);
        // Writes after the alter are tracked with the new column.
        db.conn()
            .execute_batch("INSERT INTO t (id, a, b) VALUES (1, 'x', 'y')")
            .unwrap();
        let cids: Vec<String> = db
            .changes(&tenantsync_core::ChangesQuery::default())
            .unwrap()
            .into_iter()
            .map(|c| c.cid)
            .collect();
        assert_eq!(cids, ["a", "b"]);
    }

    /// A shard behind shard 0 runs the versions it lacks; one whose
    /// versions differ refuses to start.
    #[test]
    fn a_shard_behind_catches_up_and_a_diverged_one_refuses() {
        let file =
            "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT); SELECT crsql_as_crr('t');";
        let mut leader = db();
        start(&mut leader, file, None, false).unwrap();
        leader.conn().execute_batch("BEGIN").unwrap();
        let applied =
            run_script(&mut leader, "ALTER TABLE t ADD COLUMN b TEXT", Mode::Change).unwrap();
        record(leader.conn(), &applied.script).unwrap();
        leader.conn().execute_batch("COMMIT").unwrap();
        let log = read_log(leader.conn()).unwrap();

        let mut behind = db();
        let caught = start(&mut behind, file, Some(&log), false).unwrap();
        assert_eq!(caught, log);
        assert!(behind.conn().prepare("SELECT b FROM t").is_ok());

        let mut other = db();
        let diverged = format!("{file} CREATE INDEX t_a ON t (a);");
        let e = start(&mut other, &diverged, Some(&log[..1]), false).unwrap_err();
        assert!(e.contains("not those of shard 0"), "{e}");
    }
}

/// The law of schema changes: a replica that runs the versions' scripts
/// converges with the server, whatever the writes, merges and pushes from
/// the older version around each change (a replica pushes what it wrote on
/// its version at any time; it takes the server's changes only once it has
/// the server's version, as the `schema` message and `welcome` ensure).
#[cfg(test)]
mod law {
    use proptest::prelude::*;
    use tenantsync_core::{ChangesQuery, CrrConnection, Options, SiteFilter, SiteId};

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// The server writes column `col` (of those it has) of row `id`.
        Server { id: i64, col: usize, val: i64 },
        /// The replica writes column `col` (of those it has) of row `id`.
        Replica { id: i64, col: usize, val: i64 },
        /// The replica pushes what it wrote since its last push.
        Push,
        /// The replica migrates to the server's version and pulls.
        Pull,
        /// The server adds a column (with a default, or nullable).
        AddColumn { default: Option<i64> },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4i64, 0..4usize, 0..100i64).prop_map(|(id, col, val)| Op::Server { id, col, val }),
            4 => (0..4i64, 0..4usize, 0..100i64).prop_map(|(id, col, val)| Op::Replica { id, col, val }),
            2 => Just(Op::Push),
            2 => Just(Op::Pull),
            1 => proptest::option::of(0..5i64).prop_map(|default| Op::AddColumn { default }),
        ]
    }

    const BASE: &str = "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, c0 INTEGER);
        SELECT crsql_as_crr('t');";

    fn open(site: u8) -> CrrConnection {
        CrrConnection::open_with(
            ":memory:",
            Options {
                site_id: Some(SiteId([site; 16])),
                ..Options::default()
            },
        )
        .unwrap()
    }

    fn columns(db: &CrrConnection) -> usize {
        db.conn()
            .query_row("SELECT count(*) - 1 FROM pragma_table_info('t')", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap() as usize
    }

    fn write(db: &CrrConnection, id: i64, col: usize, val: i64) {
        let col = col % columns(db);
        db.conn()
            .execute(
                &format!("INSERT INTO t (id, c{col}) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET c{col} = ?2"),
                [id, val],
            )
            .unwrap();
    }

    fn rows(db: &CrrConnection) -> Vec<Vec<Option<i64>>> {
        let mut st = db.conn().prepare("SELECT * FROM t ORDER BY id").unwrap();
        let n = st.column_count();
        st.query_map([], |r| (0..n).map(|i| r.get(i)).collect())
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn changes(
        from: &CrrConnection,
        since: i64,
        site: Option<SiteId>,
    ) -> Vec<tenantsync_core::Change> {
        from.changes(&ChangesQuery {
            since,
            site: site.map_or(SiteFilter::Any, SiteFilter::Only),
            ..ChangesQuery::default()
        })
        .unwrap()
    }

    /// The replica's side: its database, its schema version, and how far
    /// it pushed and pulled.
    struct Replica {
        db: CrrConnection,
        version: i64,
        pushed: i64,
        pulled: i64,
    }

    impl Replica {
        fn push(&mut self, server: &mut CrrConnection) {
            let c = changes(&self.db, self.pushed, Some(SiteId([2; 16])));
            self.pushed = self.db.db_version().unwrap();
            server.apply(&c).unwrap();
        }

        /// Migrates (the scripts above its version), then takes the
        /// server's changes.
        fn pull(&mut self, server: &CrrConnection) {
            for m in read_log(server.conn()).unwrap() {
                if m.version > self.version {
                    self.db.conn().execute_batch(&m.sql).unwrap();
                    self.version = m.version;
                }
            }
            let c = changes(server, self.pulled, None);
            self.pulled = server.db_version().unwrap();
            self.db.apply(&c).unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn replicas_running_the_scripts_converge_with_the_server(ops in prop::collection::vec(op(), 1..40)) {
            let mut server = open(1);
            start(&mut server, BASE, None, false).unwrap();
            let mut replica = Replica { db: open(2), version: 0, pushed: 0, pulled: 0 };
            replica.pull(&server);
            for op in &ops {
                match op {
                    Op::Server { id, col, val } => write(&server, *id, *col, *val),
                    Op::Replica { id, col, val } => write(&replica.db, *id, *col, *val),
                    Op::Push => replica.push(&mut server),
                    Op::Pull => replica.pull(&server),
                    Op::AddColumn { default } => {
                        let name = format!("c{}", columns(&server));
                        let sql = match default {
                            Some(d) => format!("ALTER TABLE t ADD COLUMN {name} INTEGER NOT NULL DEFAULT {d}"),
                            None => format!("ALTER TABLE t ADD COLUMN {name} INTEGER"),
                        };
                        server.conn().execute_batch("BEGIN").unwrap();
                        let before = server.schema().unwrap();
                        let a = run_script(&mut server, &sql, Mode::Change).unwrap();
                        check_kept(&before, &server.schema().unwrap()).unwrap();
                        record(server.conn(), &a.script).unwrap();
                        server.conn().execute_batch("COMMIT").unwrap();
                    }
                }
            }
            replica.push(&mut server);
            replica.pull(&server);
            prop_assert_eq!(columns(&replica.db), columns(&server));
            prop_assert_eq!(rows(&replica.db), rows(&server));
        }
    }
}
