//! `tenantsync policy check|explain|diff`: the policy engine on the command
//! line. The contract (output formats, exit codes) is in docs/POLICY.md.
//!
//! Exit codes: 0 done; 1 the policy file has problems or the query is
//! refused; 2 any other error (unreadable file, bad claims, database error).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use tenantsync_core::CrrConnection;
use tenantsync_policy::{
    EffectiveQuery, Engine, Identity, MembershipResults, PolicySet, Schema, TableSchema,
};
use tenantsync_types::Value;

/// The `policy` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate a policy file: prints `ok` (exit 0) or every problem (exit
    /// 1). Warnings (a policy on a tenant's table that does not constrain
    /// its tenant column) come before `ok` and do not fail the check.
    Check {
        /// The schema SQL file (CREATE TABLE ...; SELECT crsql_as_crr('t');),
        /// or a server's database (its schema as changed since).
        #[arg(long)]
        schema: PathBuf,
        /// The policy file.
        policy: PathBuf,
        /// The column that holds a row's tenant.
        #[arg(long, default_value = "tenant_id")]
        tenant_column: String,
        /// The token claim that names the caller's tenant.
        #[arg(long, default_value = "tenant_id")]
        tenant_claim: String,
    },
    /// Show the effective SQL and parameters of a query for an identity,
    /// and with --db the rows it would receive.
    Explain {
        /// The schema SQL file.
        #[arg(long)]
        schema: PathBuf,
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The identity's claims as a JSON object.
        #[arg(long)]
        claims: String,
        /// The subscription query.
        #[arg(long)]
        query: String,
        /// A database to read the rows from.
        #[arg(long)]
        db: Option<PathBuf>,
        /// For each row, the permissive policies that granted it (needs --db).
        #[arg(long, requires = "db")]
        why: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// For each identity, the rows it would gain and lose if the new policy
    /// file replaced the old one.
    Diff {
        /// The schema SQL file.
        #[arg(long)]
        schema: PathBuf,
        /// The database to compare on.
        #[arg(long)]
        db: PathBuf,
        /// The policy file in force.
        #[arg(long)]
        from: PathBuf,
        /// The policy file to deploy.
        #[arg(long)]
        to: PathBuf,
        /// Claims of an identity (JSON object); repeat for several.
        #[arg(long, required = true)]
        claims: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

/// Output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// For people.
    Text,
    /// One JSON object (per identity for diff) per line.
    Json,
}

/// Why a command stopped.
enum Failure {
    /// Exit 1: the input was understood and refused.
    Refused(String),
    /// Exit 2: anything else.
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Error(e)
    }
}

type Outcome = Result<(), Failure>;

/// Runs a subcommand; returns the exit code.
pub fn run(cmd: &PolicyCommand, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let result = match cmd {
        PolicyCommand::Check {
            schema,
            policy,
            tenant_column,
            tenant_claim,
        } => check(schema, policy, tenant_column, tenant_claim, out),
        PolicyCommand::Explain {
            schema,
            policy,
            claims,
            query,
            db,
            why,
            format,
        } => explain(
            schema,
            policy,
            claims,
            query,
            db.as_deref(),
            *why,
            *format,
            out,
        ),
        PolicyCommand::Diff {
            schema,
            db,
            from,
            to,
            claims,
            format,
        } => diff(schema, db, from, to, claims, *format, out),
    };
    match result {
        Ok(()) => 0,
        Err(Failure::Refused(msg)) => {
            if !msg.is_empty() {
                let _ = writeln!(err, "{}", msg.trim_end());
            }
            1
        }
        Err(Failure::Error(e)) => {
            let _ = writeln!(err, "error: {e:#}");
            2
        }
    }
}

/// Runs a schema file on an in-memory database with the core loaded and
/// describes its tables for the policy engine. A server's database file
/// may stand for the schema file: its schema is read as it is now, every
/// schema change included (docs/POLICY.md, "Checking a policy file").
pub fn load_schema(path: &Path) -> anyhow::Result<Schema> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read schema file {}", path.display()))?;
    if bytes.starts_with(b"SQLite format 3\0") {
        let db = CrrConnection::open_with(
            path,
            tenantsync_core::Options {
                read_only: true,
                ..tenantsync_core::Options::default()
            },
        )
        .with_context(|| format!("cannot open the database {}", path.display()))?;
        let mut core_schema = db.schema().context("cannot read the database's schema")?;
        core_schema
            .tables
            .retain(|t| !t.name.to_ascii_lowercase().starts_with("tenantsync_"));
        return Ok(Schema::from(&core_schema));
    }
    let sql = String::from_utf8(bytes)
        .with_context(|| format!("schema file {} is not UTF-8 text", path.display()))?;
    let db = CrrConnection::open_in_memory().context("cannot open an in-memory database")?;
    db.conn()
        .execute_batch(&sql)
        .with_context(|| format!("schema file {} failed", path.display()))?;
    let core_schema = db.schema().context("cannot read the schema back")?;
    Ok(Schema::from(&core_schema))
}

fn load_policy(path: &Path, schema: &Schema) -> Result<PolicySet, Failure> {
    let source = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    PolicySet::parse(&path.display().to_string(), &source, schema)
        .map_err(|d| Failure::Refused(d.to_string()))
}

fn identity(claims: &str) -> Result<Identity, Failure> {
    Identity::from_json(claims)
        .map_err(|e| Failure::Error(anyhow::anyhow!("--claims {claims}: {e}")))
}

fn open_db(path: &Path) -> anyhow::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open database {}", path.display()))
}

fn rows(conn: &Connection, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Vec<Value>>> {
    let mut stmt = conn
        .prepare(sql)
        .with_context(|| format!("the database does not match the schema: {sql}"))?;
    let n = stmt.column_count();
    let rows = stmt
        .query_map(rusqlite::params_from_iter(params.iter()), |r| {
            (0..n).map(|i| r.get::<_, Value>(i)).collect()
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn memberships(conn: &Connection, q: &EffectiveQuery) -> anyhow::Result<MembershipResults> {
    let mut results = MembershipResults::new();
    for m in q.memberships.iter().filter(|m| m.direct) {
        let values = rows(conn, &m.sql, &m.params)?
            .into_iter()
            .map(|mut r| r.remove(0));
        results.insert(m.id, m.set(values));
    }
    Ok(results)
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("values serialise")
}

fn check(
    schema: &Path,
    policy: &Path,
    tenant_column: &str,
    tenant_claim: &str,
    out: &mut dyn Write,
) -> Outcome {
    let schema = load_schema(schema)?;
    let source = std::fs::read_to_string(policy)
        .with_context(|| format!("cannot read policy file {}", policy.display()))?;
    match PolicySet::parse(&policy.display().to_string(), &source, &schema) {
        Ok(set) => {
            if let Some(w) = set.tenant_warnings(tenant_column, tenant_claim) {
                writeln!(out, "{w}").context("stdout")?;
            }
            writeln!(out, "ok").context("stdout")?;
            Ok(())
        }
        Err(d) => {
            writeln!(out, "{d}").context("stdout")?;
            // Reported on stdout; the exit code says it.
            Err(Failure::Refused(String::new()))
        }
    }
}

/// Rows read from the database, and the granting policies of each.
type Rows = (Vec<Vec<Value>>, Vec<Vec<String>>);

#[derive(Serialize)]
struct ExplainJson<'a> {
    sql: &'a str,
    params: &'a [Value],
    #[serde(skip_serializing_if = "Option::is_none")]
    rows: Option<&'a [Vec<Value>]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    why: Option<&'a [Vec<String>]>,
}

#[allow(clippy::too_many_arguments)]
fn explain(
    schema: &Path,
    policy: &Path,
    claims: &str,
    query: &str,
    db: Option<&Path>,
    why: bool,
    format: Format,
    out: &mut dyn Write,
) -> Outcome {
    let schema = load_schema(schema)?;
    let engine = Engine::new(load_policy(policy, &schema)?);
    let id = identity(claims)?;
    let q = engine
        .rewrite(&id, query)
        .map_err(|e| Failure::Refused(e.to_string()))?;
    // (rows, granting policies per row)
    let mut found: Option<Rows> = None;
    if let Some(db) = db {
        let conn = open_db(db)?;
        let got = rows(&conn, &q.snapshot_sql, &q.params)?;
        let mut whys = Vec::new();
        if why {
            let ms = memberships(&conn, &q)?;
            let table = engine
                .schema()
                .table(&q.table)
                .expect("rewritten table exists");
            let pk_pos: Vec<usize> = table
                .pk
                .iter()
                .map(|&k| {
                    let name = &table.columns[k].name;
                    q.snapshot_columns
                        .iter()
                        .position(|c| c == name)
                        .expect("pk selected")
                })
                .collect();
            let by_pk = format!(
                "SELECT * FROM \"{}\" WHERE {}",
                table.name.replace('"', "\"\""),
                table
                    .pk
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| format!(
                        "\"{}\" IS ?{}",
                        table.columns[k].name.replace('"', "\"\""),
                        i + 1
                    ))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            );
            for r in &got {
                let key: Vec<Value> = pk_pos.iter().map(|&i| r[i].clone()).collect();
                let full = rows(&conn, &by_pk, &key)?;
                let names = full
                    .first()
                    .map(|row| {
                        q.granting_policies(row, &ms)
                            .into_iter()
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                whys.push(names);
            }
        }
        found = Some((got, whys));
    }
    match format {
        Format::Json => {
            let obj = ExplainJson {
                sql: &q.snapshot_sql,
                params: &q.params,
                rows: found.as_ref().map(|(r, _)| r.as_slice()),
                why: found.as_ref().filter(|_| why).map(|(_, w)| w.as_slice()),
            };
            writeln!(out, "{}", json(&obj)).context("stdout")?;
        }
        Format::Text => {
            writeln!(out, "sql: {}", q.snapshot_sql).context("stdout")?;
            writeln!(out, "params:").context("stdout")?;
            for (i, p) in q.params.iter().enumerate() {
                writeln!(out, "  ?{} = {}", i + 1, json(p)).context("stdout")?;
            }
            if let Some((got, whys)) = &found {
                writeln!(out, "rows: {}", got.len()).context("stdout")?;
                for (i, r) in got.iter().enumerate() {
                    match whys.get(i) {
                        Some(w) if why => {
                            writeln!(out, "  {}  -- granted by {}", json(r), w.join(", "))
                        }
                        _ => writeln!(out, "  {}", json(r)),
                    }
                    .context("stdout")?;
                }
            }
        }
    }
    Ok(())
}

#[derive(Serialize, Default)]
struct TableDiff {
    gained: Vec<Vec<Value>>,
    lost: Vec<Vec<Value>>,
}

#[derive(Serialize)]
struct DiffJson<'a> {
    claims: &'a serde_json::Map<String, serde_json::Value>,
    tables: &'a BTreeMap<String, TableDiff>,
}

/// Rows keyed by their primary key's JSON.
fn visible(
    conn: &Connection,
    engine: &Engine,
    id: &Identity,
    table: &TableSchema,
) -> Result<BTreeMap<String, Vec<Value>>, Failure> {
    let q = engine
        .rewrite(
            id,
            &format!("SELECT * FROM \"{}\"", table.name.replace('"', "\"\"")),
        )
        .map_err(|e| Failure::Refused(e.to_string()))?;
    Ok(rows(conn, &q.snapshot_sql, &q.params)?
        .into_iter()
        .map(|r| {
            let key: Vec<&Value> = table.pk.iter().map(|&k| &r[k]).collect();
            (json(&key), r)
        })
        .collect())
}

#[allow(clippy::too_many_arguments)]
fn diff(
    schema: &Path,
    db: &Path,
    from: &Path,
    to: &Path,
    claims: &[String],
    format: Format,
    out: &mut dyn Write,
) -> Outcome {
    let schema = load_schema(schema)?;
    let old = Engine::new(load_policy(from, &schema)?);
    let new = Engine::new(load_policy(to, &schema)?);
    let conn = open_db(db)?;
    for c in claims {
        let id = identity(c)?;
        let mut tables: BTreeMap<String, TableDiff> = BTreeMap::new();
        for t in schema.tables.iter().filter(|t| t.is_crr) {
            let before = visible(&conn, &old, &id, t)?;
            let after = visible(&conn, &new, &id, t)?;
            let d = TableDiff {
                gained: after
                    .iter()
                    .filter(|(k, r)| before.get(*k) != Some(r))
                    .map(|(_, r)| r.clone())
                    .collect(),
                lost: before
                    .iter()
                    .filter(|(k, r)| after.get(*k) != Some(r))
                    .map(|(_, r)| r.clone())
                    .collect(),
            };
            if !d.gained.is_empty() || !d.lost.is_empty() {
                tables.insert(t.name.clone(), d);
            }
        }
        match format {
            Format::Json => {
                let obj = DiffJson {
                    claims: id.claims(),
                    tables: &tables,
                };
                writeln!(out, "{}", json(&obj)).context("stdout")?;
            }
            Format::Text => {
                writeln!(out, "identity {}", json(id.claims())).context("stdout")?;
                if tables.is_empty() {
                    writeln!(out, "  no change").context("stdout")?;
                }
                for (name, d) in &tables {
                    writeln!(out, "  {name}: +{} -{}", d.gained.len(), d.lost.len())
                        .context("stdout")?;
                    for r in &d.gained {
                        writeln!(out, "    + {}", json(r)).context("stdout")?;
                    }
                    for r in &d.lost {
                        writeln!(out, "    - {}", json(r)).context("stdout")?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const SCHEMA: &str = "examples/schema.sql";
    const POLICY: &str = "examples/policy.sql";
    const ALICE: &str = r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: PolicyCommand,
    }

    /// Runs `tenantsync policy <args>`: (exit code, stdout, stderr).
    fn run_cli(args: &[&str]) -> (u8, String, String) {
        let cli = Cli::try_parse_from(std::iter::once("policy").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(&cli.cmd, &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    /// A tenantsync database (core loaded) with the example schema and rows.
    fn demo_db(dir: &Path) -> PathBuf {
        let path = dir.join("demo.db");
        let db = CrrConnection::open(&path).unwrap();
        db.conn()
            .execute_batch(&std::fs::read_to_string(SCHEMA).unwrap())
            .unwrap();
        db.conn()
            .execute_batch(
                "INSERT INTO lists VALUES (1, 't1', 'alice', 'groceries'), (2, 't2', 'bob', 'b'), (3, 't1', 'carol', 'trip');
                 INSERT INTO members VALUES (3, 'alice', 't1');
                 INSERT INTO todos VALUES (1, 't1', 1, 'alice', 'milk', 0, 1),
                   (2, 't2', 2, 'bob', 'other tenant', 0, 2),
                   (3, 't1', 3, 'carol', 'book hotel', 1, 3),
                   (5, 't1', NULL, 'dave', 'not shared', 0, NULL);",
            )
            .unwrap();
        path
    }

    #[test]
    fn check_prints_ok_or_every_diagnostic() {
        assert_eq!(
            run_cli(&["check", "--schema", SCHEMA, POLICY]),
            (0, "ok\n".into(), String::new())
        );
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.sql");
        std::fs::write(
            &bad,
            "CREATE POLICY p ON todos FOR SELECT USING (ownr = 1);\nCREATE POLICY q ON nope USING (random());\n",
        )
        .unwrap();
        let (code, out, err) = run_cli(&["check", "--schema", SCHEMA, bad.to_str().unwrap()]);
        assert_eq!((code, err.as_str()), (1, ""));
        let out = out.replace(bad.to_str().unwrap(), "bad.sql");
        insta::assert_snapshot!(out, @r"
        bad.sql:1:44: unknown column `ownr` in table `todos`
          |
        1 | CREATE POLICY p ON todos FOR SELECT USING (ownr = 1);
          |                                            ^^^^
        bad.sql:2:20: unknown table `nope`
          |
        2 | CREATE POLICY q ON nope USING (random());
          |                    ^^^^
        ");
    }

    /// A server's database stands for the schema as it is now: a policy on
    /// a column a schema change added checks against it, not against the
    /// original file.
    #[test]
    fn check_takes_a_servers_database_as_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let db = demo_db(dir.path());
        CrrConnection::open(&db)
            .unwrap()
            .alter("todos", |c| {
                c.execute_batch("ALTER TABLE todos ADD COLUMN due TEXT")?;
                Ok(())
            })
            .unwrap();
        let policy = dir.path().join("due.sql");
        std::fs::write(
            &policy,
            "CREATE POLICY due ON todos FOR SELECT USING (due IS NOT NULL AND tenant_id = auth.claim('tenant_id'));\n",
        )
        .unwrap();
        let p = policy.to_str().unwrap();
        assert_eq!(
            run_cli(&["check", "--schema", db.to_str().unwrap(), p]),
            (0, "ok\n".into(), String::new())
        );
        let (code, out, _) = run_cli(&["check", "--schema", SCHEMA, p]);
        assert_eq!(code, 1);
        assert!(out.contains("unknown column `due`"), "{out}");
    }

    #[test]
    fn check_reports_unreadable_files_as_errors() {
        let (code, _, err) = run_cli(&["check", "--schema", SCHEMA, "no/such/file.sql"]);
        assert_eq!(code, 2);
        assert!(
            err.starts_with("error: cannot read policy file no/such/file.sql"),
            "{err}"
        );
    }

    #[test]
    fn explain_shows_sql_params_rows_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let db = demo_db(dir.path());
        let (code, out, err) = run_cli(&[
            "explain",
            "--schema",
            SCHEMA,
            "--policy",
            POLICY,
            "--claims",
            ALICE,
            "--query",
            "SELECT * FROM todos WHERE priority > 0",
            "--db",
            db.to_str().unwrap(),
            "--why",
        ]);
        assert_eq!((code, err.as_str()), (0, ""));
        insta::assert_snapshot!(out);
    }

    #[test]
    fn explain_json_is_one_object() {
        let dir = tempfile::tempdir().unwrap();
        let db = demo_db(dir.path());
        let (code, out, _) = run_cli(&[
            "explain",
            "--schema",
            SCHEMA,
            "--policy",
            POLICY,
            "--claims",
            ALICE,
            "--query",
            "SELECT title FROM todos",
            "--db",
            db.to_str().unwrap(),
            "--format",
            "json",
        ]);
        assert_eq!(code, 0);
        assert_eq!(out.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v["rows"],
            serde_json::json!([[1, "milk"], [3, "book hotel"]])
        );
        assert_eq!(v["params"][0], "alice");
        assert!(
            v["sql"]
                .as_str()
                .unwrap()
                .starts_with("SELECT \"id\", \"title\" FROM \"todos\" WHERE")
        );
        assert!(v.get("why").is_none());
        // Without --db: no rows key.
        let (_, out, _) = run_cli(&[
            "explain",
            "--schema",
            SCHEMA,
            "--policy",
            POLICY,
            "--claims",
            ALICE,
            "--query",
            "SELECT * FROM lists",
            "--format",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["params", "sql"]
        );
    }

    #[test]
    fn explain_refuses_with_a_reason() {
        let cases = [
            (
                "DELETE FROM todos",
                1,
                "refused: only SELECT is allowed in a subscription, found `DELETE FROM`\n",
            ),
            (
                "SELECT * FROM local_settings",
                1,
                "refused: 1:15: table `local_settings` is a local table, not a CRR: a subscription may only name a CRR table (`SELECT crsql_as_crr('local_settings')`)\n",
            ),
            (
                "SELECT * FROM todos; ATTACH 'x' AS y",
                1,
                "refused: a subscription is one SELECT statement, found 2 statements\n",
            ),
        ];
        for (query, code, msg) in cases {
            let (c, out, err) = run_cli(&[
                "explain", "--schema", SCHEMA, "--policy", POLICY, "--claims", ALICE, "--query",
                query,
            ]);
            assert_eq!((c, out.as_str(), err.as_str()), (code, "", msg), "{query}");
        }
        let (c, _, err) = run_cli(&[
            "explain",
            "--schema",
            SCHEMA,
            "--policy",
            POLICY,
            "--claims",
            "{nope",
            "--query",
            "SELECT * FROM todos",
        ]);
        assert_eq!(c, 2);
        assert!(
            err.starts_with("error: --claims {nope: claims are not valid JSON"),
            "{err}"
        );
    }

    #[test]
    fn diff_lists_rows_gained_and_lost_per_identity() {
        let dir = tempfile::tempdir().unwrap();
        let db = demo_db(dir.path());
        let new = dir.path().join("new.sql");
        let policy = std::fs::read_to_string(POLICY).unwrap().replace(
            "USING (list_id IN (SELECT list_id FROM members WHERE user_id = auth.uid()));",
            "USING (done = 0);",
        );
        std::fs::write(&new, policy).unwrap();
        let (code, out, err) = run_cli(&[
            "diff",
            "--schema",
            SCHEMA,
            "--db",
            db.to_str().unwrap(),
            "--from",
            POLICY,
            "--to",
            new.to_str().unwrap(),
            "--claims",
            ALICE,
            "--claims",
            r#"{"sub":"bob","role":"authenticated","tenant_id":"t2"}"#,
        ]);
        assert_eq!((code, err.as_str()), (0, ""));
        insta::assert_snapshot!(out, @r#"
        identity {"role":"authenticated","sub":"alice","tenant_id":"t1"}
          todos: +1 -1
            + [5,"t1",null,"dave","not shared",0,null]
            - [3,"t1",3,"carol","book hotel",1,3]
        identity {"role":"authenticated","sub":"bob","tenant_id":"t2"}
          no change
        "#);
    }

    #[test]
    fn explain_with_a_bad_policy_file_prints_its_diagnostics() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.sql");
        std::fs::write(
            &bad,
            "CREATE POLICY p ON todos FOR SELECT USING (now() > 0);\n",
        )
        .unwrap();
        let (code, out, err) = run_cli(&[
            "explain",
            "--schema",
            SCHEMA,
            "--policy",
            bad.to_str().unwrap(),
            "--claims",
            ALICE,
            "--query",
            "SELECT * FROM todos",
        ]);
        assert_eq!((code, out.as_str()), (1, ""));
        let first = err
            .lines()
            .next()
            .unwrap()
            .replace(bad.to_str().unwrap(), "bad.sql");
        assert_eq!(
            first,
            "bad.sql:1:44: function `now()` is not allowed (its result is not a function of the row): allowed functions are auth.uid(), auth.role(), auth.claim('name'), coalesce, ifnull, lower, upper, length"
        );
    }

    #[test]
    fn diff_json_is_one_object_per_identity() {
        let dir = tempfile::tempdir().unwrap();
        let db = demo_db(dir.path());
        let (code, out, _) = run_cli(&[
            "diff",
            "--schema",
            SCHEMA,
            "--db",
            db.to_str().unwrap(),
            "--from",
            POLICY,
            "--to",
            POLICY,
            "--claims",
            ALICE,
            "--claims",
            "{}",
            "--format",
            "json",
        ]);
        assert_eq!(code, 0);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                serde_json::json!({"claims": {"sub": "alice", "role": "authenticated", "tenant_id": "t1"}, "tables": {}}),
                serde_json::json!({"claims": {}, "tables": {}}),
            ]
        );
    }
}
