//! `tenantsync demo`: the whole system in one command (docs/CLI.md,
//! "tenantsync demo").
//!
//! Starts the real service and its HTTP/WebSocket edge in process on
//! 127.0.0.1:0 with an SQLite file in a temporary directory (or `--dir`),
//! the examples' schema and policies and seed data; runs several tenants
//! with several `tenantsync-client` replicas each, over real loopback
//! WebSockets, with different subscriptions; the clients write (inserts,
//! updates, moves between lists and owners, deletes, memberships), some go
//! offline and come back, one tries to write into another tenant's rows;
//! then waits for quiescence and checks every replica against its policies
//! and subscriptions evaluated directly on the server database
//! ([`tenantsync_verify`]). Exit 0 when every replica matches.
//!
//! The scenario is a pure function of the options and the seed
//! ([`plan`]); what each client picks to update depends on what it holds
//! at that moment, so runs with one seed differ in timing only.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Map, Value as Json, json};
use tenantsync_client::{ClientConfig, Event, Replica, SyncClient};
use tenantsync_policy::Identity;
use tenantsync_protocol::http::{SqlRequest, SqlStatement};
use tenantsync_server::app::{AppState, Server};
use tenantsync_server::auth::{Authenticator, JwtKey, JwtSettings};
use tenantsync_server::config::EdgeSettings;
use tenantsync_server::{Principal, ServiceConfig, SyncService, Synchronous};
use tenantsync_types::Value;
use tenantsync_verify::{Check, ReplicaState, Truth};

const SCHEMA: &str = include_str!("../../examples/schema.sql");
const POLICY: &str = include_str!("../../examples/policy.sql");
const SEED: &str = include_str!("../../examples/seed.sql");
const POLICY_NAME: &str = "examples/policy.sql";
const TENANT_CLAIM: &str = "tenant_id";

/// `tenantsync demo` options.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Tenants (acme, globex, initech, then tenant4, tenant5, ...).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub tenants: u32,
    /// Clients per tenant, each a user of the tenant with its own replica.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub clients: u32,
    /// How long the clients write.
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Seed of the scenario (which client does what, in which order).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the server database and the replica files in this directory
    /// (default: a temporary directory, removed at the end).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the demo; exit 0 when every replica verified, 1 otherwise (or on
/// an error).
pub fn run(args: &DemoArgs) -> ExitCode {
    if !(args.seconds.is_finite() && args.seconds >= 0.0 && args.seconds <= 3600.0) {
        eprintln!("error: --seconds must be between 0 and 3600");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tenantsync-demo")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            let text = if args.json {
                format!("{}\n", report.json())
            } else {
                report.table()
            };
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// The scenario.

/// What a client subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Every todo it may see, every list and membership of its tenant.
    Everything,
    /// Only the todos it owns.
    Mine,
    /// The todos of one list, and the tenant's lists.
    OneList(i64),
    /// The todos not done yet.
    Open,
}

#[derive(Debug, Clone)]
struct ClientPlan {
    /// `user@tenant`.
    name: String,
    user: String,
    tenant: String,
    tenant_index: usize,
    kind: Kind,
    /// (id, query)
    subs: Vec<(String, String)>,
    /// First todo id this client inserts (its ids never collide).
    id_base: i64,
    /// Offline between these fractions of the write phase.
    offline: Option<(f64, f64)>,
    /// Drops its connection at this fraction (reconnect mid-stream).
    reconnect_at: Option<f64>,
    /// Tries to write into this tenant's rows halfway through.
    intrude: Option<String>,
    seed: u64,
}

const TENANT_NAMES: [&str; 3] = ["acme", "globex", "initech"];

fn tenant_name(i: usize) -> String {
    TENANT_NAMES
        .get(i)
        .map(|s| (*s).to_owned())
        .unwrap_or_else(|| format!("tenant{}", i + 1))
}

/// Users of a tenant: the seed's first (alice, bob for acme; carol, dave
/// for globex), then more.
fn user_name(tenant: usize, i: usize) -> String {
    const NAMES: [&[&str]; 3] = [
        &["alice", "bob", "erin", "oscar"],
        &["carol", "dave", "frank", "grace"],
        &["peter", "milton", "samir", "joanna"],
    ];
    NAMES
        .get(tenant)
        .and_then(|n| n.get(i))
        .map(|s| (*s).to_owned())
        .unwrap_or_else(|| format!("u{}t{}", i + 1, tenant + 1))
}

/// The row a cross-tenant write aims at: tenant 0's, owned by nobody who
/// runs a client (so nobody deletes it).
const VAULT_ID: i64 = 999;
const VAULT_TITLE: &str = "Acquisition plan (confidential)";

/// The lists of a tenant after seeding: (id, owner).
type Lists = BTreeMap<String, Vec<(i64, String)>>;

fn sql_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The clients, a pure function of the options, the seed and the lists.
fn plan(args: &DemoArgs, lists: &Lists) -> Vec<ClientPlan> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let tenants = args.tenants as usize;
    let per = args.clients as usize;
    let mut out = Vec::new();
    for t in 0..tenants {
        let tenant = tenant_name(t);
        let tl = lists.get(&tenant).cloned().unwrap_or_default();
        for i in 0..per {
            let user = user_name(t, i);
            let kind = match i % 4 {
                0 => Kind::Everything,
                1 => Kind::Mine,
                2 => {
                    // A list someone else owns (shared with this user by
                    // the seed), else the user's own.
                    let others: Vec<i64> = tl
                        .iter()
                        .filter(|(_, o)| *o != user)
                        .map(|(id, _)| *id)
                        .collect();
                    let own: Vec<i64> = tl
                        .iter()
                        .filter(|(_, o)| *o == user)
                        .map(|(id, _)| *id)
                        .collect();
                    let pick = if others.is_empty() { own } else { others };
                    if pick.is_empty() {
                        Kind::Mine
                    } else {
                        Kind::OneList(pick[rng.random_range(0..pick.len())])
                    }
                }
                _ => Kind::Open,
            };
            let q = |s: &str| s.to_owned();
            let subs = match kind {
                Kind::Everything => vec![
                    (q("todos"), q("SELECT * FROM todos")),
                    (q("lists"), q("SELECT * FROM lists")),
                    (q("members"), q("SELECT * FROM members")),
                ],
                Kind::Mine => vec![(
                    q("mine"),
                    format!("SELECT * FROM todos WHERE owner = {}", sql_quote(&user)),
                )],
                Kind::OneList(l) => vec![
                    (
                        format!("list{l}"),
                        format!("SELECT * FROM todos WHERE list_id = {l}"),
                    ),
                    (q("lists"), q("SELECT * FROM lists")),
                ],
                Kind::Open => vec![(q("open"), q("SELECT * FROM todos WHERE done = 0"))],
            };
            let index = out.len();
            out.push(ClientPlan {
                name: format!("{user}@{tenant}"),
                user,
                tenant: tenant.clone(),
                tenant_index: t,
                kind,
                subs,
                id_base: 100_000 * (index as i64 + 1),
                offline: (per >= 2 && t % 2 == 0 && i == (t / 2 + 1) % per).then_some((0.3, 0.65)),
                reconnect_at: (t % 2 == 1 && i == 0).then_some(0.5),
                intrude: None,
                seed: rng.random(),
            });
        }
    }
    // The last client of the second tenant writes into the first tenant's
    // rows.
    if tenants >= 2
        && let Some(c) = out.iter_mut().rev().find(|c| c.tenant_index == 1)
    {
        c.intrude = Some(tenant_name(0));
    }
    out
}

// ---------------------------------------------------------------------------
// Seeding through the service role.

fn service_principal() -> Principal {
    let mut claims = Map::new();
    claims.insert("sub".into(), json!("demo-backend"));
    claims.insert("role".into(), json!("service"));
    claims.insert("exp".into(), json!(4_000_000_000u64));
    Principal::from_claims(claims, TENANT_CLAIM)
}

async fn service_sql(
    service: &SyncService,
    statements: Vec<String>,
) -> anyhow::Result<Vec<Vec<Vec<Value>>>> {
    let req = SqlRequest {
        statements: statements
            .into_iter()
            .map(|sql| SqlStatement {
                sql,
                params: vec![],
            })
            .collect(),
        tenant: None,
    };
    let r = service
        .sql(&service_principal(), req)
        .await
        .map_err(|e| anyhow::anyhow!("service SQL: {}: {}", e.code, e.message))?;
    Ok(r.results.into_iter().map(|r| r.rows).collect())
}

/// The statements of a script (each with the comments before it).
fn statements(script: &str) -> anyhow::Result<Vec<String>> {
    // SQLite's parser splits it, on a scratch database with the schema the
    // statements name.
    let scratch = tenantsync_core::CrrConnection::open_in_memory()?;
    scratch.conn().execute_batch(SCHEMA)?;
    Ok(tenantsync_core::script::split(scratch.conn(), script)?)
}

/// examples/seed.sql, then for every user without a list a list of their
/// own shared with the next user of the tenant and a few todos, and tenant
/// 0's vault row. Returns the lists per tenant and the rows written.
async fn seed(service: &SyncService, args: &DemoArgs) -> anyhow::Result<(Lists, usize)> {
    let mut stmts = statements(SEED)?;
    let existing = service_sql(
        service,
        vec!["SELECT id, tenant_id, owner FROM lists".into()],
    )
    .await?;
    let owners: Vec<(String, String)> = existing[0]
        .iter()
        .filter_map(|r| match (&r[1], &r[2]) {
            (Value::Text(t), Value::Text(o)) => Some((t.clone(), o.clone())),
            _ => None,
        })
        .collect();
    let empty = owners.is_empty();
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    let mut next_list = 100;
    let mut next_todo = 1000;
    let per = args.clients.max(2) as usize;
    for t in 0..args.tenants as usize {
        let tenant = tenant_name(t);
        for i in 0..per {
            let user = user_name(t, i);
            let seeded = matches!((t, i), (0, 0) | (0, 1) | (1, 0));
            if seeded || owners.iter().any(|(tt, o)| *tt == tenant && *o == user) {
                continue;
            }
            let next_user = user_name(t, (i + 1) % per);
            let id = next_list;
            next_list += 1;
            stmts.push(format!(
                "INSERT INTO lists (id, tenant_id, owner, name) VALUES ({id}, {}, {}, {})",
                sql_quote(&tenant),
                sql_quote(&user),
                sql_quote(&format!("{user}'s list"))
            ));
            stmts.push(format!(
                "INSERT INTO members (list_id, user_id, tenant_id) VALUES ({id}, {}, {})",
                sql_quote(&next_user),
                sql_quote(&tenant)
            ));
            for k in 0..3 {
                stmts.push(format!(
                    "INSERT INTO todos (id, tenant_id, list_id, owner, title, done, priority) \
                     VALUES ({next_todo}, {}, {id}, {}, {}, {}, {})",
                    sql_quote(&tenant),
                    sql_quote(if k == 2 { &next_user } else { &user }),
                    sql_quote(&format!("task {next_todo}")),
                    i64::from(rng.random_bool(0.3)),
                    rng.random_range(1..4)
                ));
                next_todo += 1;
            }
        }
    }
    stmts.push(format!(
        "INSERT INTO todos (id, tenant_id, list_id, owner, title, done, priority) \
         VALUES ({VAULT_ID}, {}, NULL, 'board', {}, 0, 1)",
        sql_quote(&tenant_name(0)),
        sql_quote(VAULT_TITLE)
    ));
    if !empty {
        bail!("the server database is not empty");
    }
    let n = stmts.len();
    service_sql(service, stmts).await?;
    let rows = service_sql(
        service,
        vec!["SELECT id, tenant_id, owner FROM lists ORDER BY id".into()],
    )
    .await?;
    let mut lists = Lists::new();
    for r in &rows[0] {
        if let (Value::Integer(id), Value::Text(t), Value::Text(o)) = (&r[0], &r[1], &r[2]) {
            lists.entry(t.clone()).or_default().push((*id, o.clone()));
        }
    }
    Ok((lists, n))
}

// ---------------------------------------------------------------------------
// Tokens and identities.

fn claims(user: &str, tenant: &str) -> Map<String, Json> {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let mut m = Map::new();
    m.insert("sub".into(), json!(user));
    m.insert("role".into(), json!("authenticated"));
    m.insert(TENANT_CLAIM.into(), json!(tenant));
    m.insert("exp".into(), json!(exp));
    m
}

fn token(secret: &[u8], claims: &Map<String, Json>) -> anyhow::Result<String> {
    Ok(tenantsync_server::auth::mint_hs256(secret, claims)?)
}

// ---------------------------------------------------------------------------
// Running clients.

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    inserts: AtomicU64,
    updates: AtomicU64,
    moves: AtomicU64,
    deletes: AtomicU64,
    memberships: AtomicU64,
}

struct Running {
    plan: ClientPlan,
    client: SyncClient,
    identity: Identity,
    writes: Arc<AtomicU64>,
    intrusion: Arc<std::sync::Mutex<Option<String>>>,
}

/// What one write step does, decided from random draws and the rows the
/// client holds.
fn step(
    conn: &rusqlite::Connection,
    plan: &ClientPlan,
    lists: &[(i64, String)],
    others: &[String],
    draws: [u64; 4],
    next_id: i64,
) -> rusqlite::Result<Option<&'static str>> {
    // Rows a subscription holds: a row inserted here and moved before the
    // server ever delivered it would stay a local row outside every
    // subscription (docs/CLI.md, "tenantsync demo").
    let held: Vec<(i64, String, Option<i64>, i64)> = {
        let mut st = conn.prepare(
            "SELECT id, owner, list_id, done FROM todos WHERE EXISTS (
               SELECT 1 FROM tenantsync_replica_held h
               WHERE h.tbl = 'todos' AND h.pk = crsql_pack_columns(todos.id))
             ORDER BY id",
        )?;
        st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                r.get(2)?,
                r.get(3)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?
    };
    let mine: Vec<&(i64, String, Option<i64>, i64)> =
        held.iter().filter(|r| r.1 == plan.user).collect();
    let pick = |n: usize, d: u64| (d % n.max(1) as u64) as usize;
    let roll = draws[0] % 100;
    let me = sql_quote(&plan.user);
    let tenant = sql_quote(&plan.tenant);
    // Inserts land in one of this client's subscriptions, so it holds them.
    let insert = |conn: &rusqlite::Connection| -> rusqlite::Result<Option<&'static str>> {
        let list = match plan.kind {
            Kind::OneList(l) => l,
            _ => lists[pick(lists.len(), draws[1])].0,
        };
        conn.execute_batch(&format!(
            "INSERT INTO todos (id, tenant_id, list_id, owner, title, done, priority) \
             VALUES ({next_id}, {tenant}, {list}, {me}, 'todo {next_id}', 0, {})",
            draws[2] % 3 + 1
        ))?;
        Ok(Some("insert"))
    };
    if held.is_empty() || roll < 30 {
        return insert(conn);
    }
    let row = &held[pick(held.len(), draws[1])];
    let id = row.0;
    if roll < 60 {
        let sql = match draws[2] % 3 {
            0 => format!(
                "UPDATE todos SET title = 'edited by {} #{}' WHERE id = {id}",
                plan.user,
                draws[3] % 1000
            ),
            1 => format!("UPDATE todos SET done = 1 - done WHERE id = {id}"),
            _ => format!(
                "UPDATE todos SET priority = {} WHERE id = {id}",
                draws[3] % 5
            ),
        };
        conn.execute_batch(&sql)?;
        return Ok(Some("update"));
    }
    if roll < 75 && lists.len() > 1 {
        // Move it to another list: it leaves one-list views, enters others.
        let target = lists[pick(lists.len(), draws[2])].0;
        conn.execute_batch(&format!(
            "UPDATE todos SET list_id = {target} WHERE id = {id}"
        ))?;
        return Ok(Some("move"));
    }
    if roll < 83 && !mine.is_empty() && !others.is_empty() {
        // Give one of mine to someone else: it leaves owner views.
        let r = mine[pick(mine.len(), draws[2])];
        let to = sql_quote(&others[pick(others.len(), draws[3])]);
        conn.execute_batch(&format!("UPDATE todos SET owner = {to} WHERE id = {}", r.0))?;
        return Ok(Some("move"));
    }
    if roll < 92 && !mine.is_empty() {
        let r = mine[pick(mine.len(), draws[2])];
        conn.execute_batch(&format!("DELETE FROM todos WHERE id = {}", r.0))?;
        return Ok(Some("delete"));
    }
    if plan.kind == Kind::Everything && !others.is_empty() {
        // Share or unshare one of my lists: memberships move todos in and out.
        let own: Vec<i64> = lists
            .iter()
            .filter(|(_, o)| *o == plan.user)
            .map(|(l, _)| *l)
            .collect();
        if !own.is_empty() {
            let l = own[pick(own.len(), draws[2])];
            let who = sql_quote(&others[pick(others.len(), draws[3])]);
            let exists: i64 = conn.query_row(
                &format!("SELECT count(*) FROM members WHERE list_id = {l} AND user_id = {who}"),
                [],
                |r| r.get(0),
            )?;
            if exists > 0 {
                conn.execute_batch(&format!(
                    "DELETE FROM members WHERE list_id = {l} AND user_id = {who}"
                ))?;
            } else {
                conn.execute_batch(&format!(
                    "INSERT INTO members (list_id, user_id, tenant_id) VALUES ({l}, {who}, {tenant})"
                ))?;
            }
            return Ok(Some("membership"));
        }
    }
    insert(conn)
}

/// Waits `after`, changes the schema (`SCHEMA_CHANGE`) while the clients
/// write, and measures how long the connected ones take to migrate in
/// place: the version and the milliseconds (`None`: not all within 20 s).
async fn change_schema_midway(
    service: SyncService,
    running: Vec<Arc<Running>>,
    after: Duration,
    log: ProgressBar,
    plain: bool,
) -> anyhow::Result<(i64, Option<f64>)> {
    tokio::time::sleep(after).await;
    let t = Instant::now();
    let r = service
        .change_schema(SCHEMA_CHANGE)
        .await
        .map_err(|e| anyhow::anyhow!("the schema change was refused: {}", e.message))?;
    let connected: Vec<&Arc<Running>> = running
        .iter()
        .filter(|c| c.client.status().connected)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let live_ms = loop {
        let mut behind = 0;
        for c in &connected {
            if c.client.read(|r| r.schema_version()).await.ok() != Some(r.schema_version) {
                behind += 1;
            }
        }
        if behind == 0 {
            break Some(t.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let line = format!(
        "  schema: {SCHEMA_CHANGE} -> version {}; {} connected clients migrated in place{}",
        r.schema_version,
        connected.len(),
        live_ms.map_or(" (not all within 20 s)".to_owned(), |ms| format!(
            " within {ms:.0} ms"
        ))
    );
    if plain {
        eprintln!("{line}");
    } else {
        log.println(line);
    }
    Ok((r.schema_version, live_ms))
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    c: Arc<Running>,
    lists: Vec<(i64, String)>,
    others: Vec<String>,
    secs: f64,
    counters: Arc<Counters>,
    log: ProgressBar,
    stop: Arc<AtomicBool>,
) {
    let plan = c.plan.clone();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let start = Instant::now();
    let total = Duration::from_secs_f64(secs);
    let mut next_id = plan.id_base;
    let mut offline = false;
    let mut back_done = false;
    let mut reconnected = false;
    let mut intruded = false;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= total || stop.load(Ordering::Relaxed) {
            break;
        }
        let frac = elapsed.as_secs_f64() / secs.max(1e-9);
        if let Some((from, to)) = plan.offline {
            if !offline && !back_done && frac >= from {
                offline = true;
                c.client.set_online(false);
                log.println(format!(
                    "  {} goes offline (keeps writing locally)",
                    plan.name
                ));
            } else if offline && frac >= to {
                offline = false;
                back_done = true;
                c.client.set_online(true);
                log.println(format!(
                    "  {} is back online: pushes what it wrote offline, resumes from its cursors",
                    plan.name
                ));
            }
        }
        if let Some(at) = plan.reconnect_at
            && !reconnected
            && frac >= at
        {
            reconnected = true;
            c.client.reconnect();
            log.println(format!(
                "  {} drops its connection mid-stream and resumes",
                plan.name
            ));
        }
        if let Some(victim) = &plan.intrude
            && !intruded
            && frac >= 0.5
        {
            intruded = true;
            intrude(&c, victim, next_id, &log).await;
            next_id += 1;
        }
        let draws = [rng.random(), rng.random(), rng.random(), rng.random()];
        let id = next_id;
        let (p, l, o) = (plan.clone(), lists.clone(), others.clone());
        match c
            .client
            .write(move |conn| step(conn, &p, &l, &o, draws, id))
            .await
        {
            Ok(Some(what)) => {
                if what == "insert" {
                    next_id += 1;
                }
                c.writes.fetch_add(1, Ordering::Relaxed);
                counters.writes.fetch_add(1, Ordering::Relaxed);
                let counter = match what {
                    "insert" => &counters.inserts,
                    "update" => &counters.updates,
                    "move" => &counters.moves,
                    "delete" => &counters.deletes,
                    _ => &counters.memberships,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(e) => log.println(format!("  {}: local write failed: {e}", plan.name)),
        }
        let pause = rng.random_range(80..250);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    if offline {
        c.client.set_online(true);
    }
}

/// A write into another tenant's rows: an update of its vault row and a
/// new row in its name. The server refuses the push whole; the client
/// quarantines it and drops the rows it may not see.
async fn intrude(c: &Running, victim: &str, id: i64, log: &ProgressBar) {
    let plan = &c.plan;
    let mut events = c.client.events();
    let (victim_q, me) = (sql_quote(victim), sql_quote(&plan.user));
    let sql = format!(
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({VAULT_ID}, {victim_q}, {me}, 'now mine');
         INSERT INTO todos (id, tenant_id, owner, title) VALUES ({id}, {victim_q}, {me}, 'planted')"
    );
    log.println(format!(
        "  {} writes into {victim}'s rows (todo {VAULT_ID} and a new one in {victim}'s name)",
        plan.name
    ));
    if let Err(e) = c.client.write(move |conn| conn.execute_batch(&sql)).await {
        log.println(format!("  {}: the local write failed: {e}", plan.name));
        return;
    }
    let slot = c.intrusion.clone();
    let name = plan.name.clone();
    let log = log.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Ok(Event::PushRefused(b))) => {
                    let (refusal, report) = &*b;
                    let policies: Vec<String> = refusal
                        .rows
                        .iter()
                        .filter_map(|r| r.policy.clone())
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    let text = format!(
                        "{}: {} row(s) refused by {}; {} change(s) quarantined, {} row(s) dropped locally",
                        refusal.code,
                        refusal.rows.len(),
                        if policies.is_empty() {
                            "the policies".to_owned()
                        } else {
                            policies.join(", ")
                        },
                        report.quarantined,
                        report.removed
                    );
                    log.println(format!("  {name}: push refused: {text}"));
                    *slot.lock().unwrap() = Some(text);
                    return;
                }
                Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                _ => return,
            }
        }
    });
}

// ---------------------------------------------------------------------------
// The run.

struct ClientResult {
    name: String,
    tenant: String,
    subs: Vec<(String, String)>,
    check: Option<Check>,
    error: Option<String>,
    writes: u64,
    sessions: u64,
    pushes_ok: u64,
    refused: u64,
    quarantined: usize,
}

struct Report {
    seed: u64,
    tenants: u32,
    clients_per_tenant: u32,
    dir: Option<PathBuf>,
    results: Vec<ClientResult>,
    writes: BTreeMap<&'static str, u64>,
    intrusion: Option<IntrusionResult>,
    schema: Option<SchemaResult>,
    server_version: i64,
    seconds: f64,
    converge_seconds: f64,
}

/// The schema change the demo makes halfway through the writes.
const SCHEMA_CHANGE: &str = "ALTER TABLE todos ADD COLUMN due TEXT";

/// What the schema change did to the clients.
struct SchemaResult {
    version: i64,
    /// Milliseconds until every connected client had migrated.
    live_ms: Option<f64>,
    /// Replicas at the new version at the end, of all.
    migrated: usize,
    of: usize,
}

impl SchemaResult {
    fn ok(&self) -> bool {
        self.migrated == self.of
    }
}

struct IntrusionResult {
    client: String,
    victim: String,
    refusal: Option<String>,
    vault_unchanged: bool,
    planted_absent: bool,
}

impl IntrusionResult {
    fn ok(&self) -> bool {
        self.refusal.is_some() && self.vault_unchanged && self.planted_absent
    }
}

impl Report {
    fn ok(&self) -> bool {
        self.results
            .iter()
            .all(|r| r.check.as_ref().is_some_and(Check::ok))
            && self.intrusion.as_ref().is_none_or(IntrusionResult::ok)
            && self.schema.as_ref().is_none_or(SchemaResult::ok)
    }

    fn totals(&self) -> (usize, usize, usize, usize, usize) {
        let mut t = (0, 0, 0, 0, 0);
        for c in self.results.iter().filter_map(|r| r.check.as_ref()) {
            t.0 += c.held;
            t.1 += c.expected;
            t.2 += c.leaks.len();
            t.3 += c.misses.len();
            t.4 += c.stale.len() + c.held_diffs.len();
        }
        t
    }

    fn verdict(&self) -> String {
        let (held, _, leaks, misses, stale) = self.totals();
        let n = self.results.len();
        if self.ok() {
            format!(
                "verified: all {n} replicas hold exactly what their policies and subscriptions allow \
                 ({held} rows, 0 leaks, 0 misses, 0 stale)"
            )
        } else {
            let bad = self
                .results
                .iter()
                .filter(|r| !r.check.as_ref().is_some_and(Check::ok))
                .count();
            let mut s = format!(
                "FAILED: {bad} of {n} replicas differ from what they may see ({leaks} leaks, {misses} misses, {stale} stale)"
            );
            if let Some(i) = &self.intrusion
                && !i.ok()
            {
                s.push_str("; the cross-tenant write was not refused cleanly");
            }
            if let Some(sc) = &self.schema
                && !sc.ok()
            {
                s.push_str("; not every replica took the schema change");
            }
            s
        }
    }

    fn table(&self) -> String {
        let mut rows: Vec<[String; 8]> = vec![[
            "client".into(),
            "tenant".into(),
            "subscriptions".into(),
            "rows held".into(),
            "expected".into(),
            "leaks".into(),
            "misses".into(),
            "stale".into(),
        ]];
        for r in &self.results {
            let subs = r
                .subs
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>()
                .join("+");
            match &r.check {
                Some(c) => rows.push([
                    r.name.clone(),
                    r.tenant.clone(),
                    subs,
                    c.held.to_string(),
                    c.expected.to_string(),
                    c.leaks.len().to_string(),
                    c.misses.len().to_string(),
                    (c.stale.len() + c.held_diffs.len()).to_string(),
                ]),
                None => rows.push([
                    r.name.clone(),
                    r.tenant.clone(),
                    subs,
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                ]),
            }
        }
        let mut widths = [0usize; 8];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &rows {
            let mut line = String::new();
            for (i, (c, w)) in r.iter().zip(widths).enumerate() {
                if i < 3 {
                    line.push_str(&format!("{c:<w$}  "));
                } else {
                    line.push_str(&format!("{c:>w$}  "));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for r in &self.results {
            if let Some(e) = &r.error {
                out.push_str(&format!("{}: {e}\n", r.name));
            }
            if let Some(c) = &r.check {
                for d in c.leaks.iter().chain(&c.misses).chain(&c.stale).take(10) {
                    out.push_str(&format!("  {}: {d}\n", r.name));
                }
                for h in &c.held_diffs {
                    out.push_str(&format!(
                        "  {}: subscription {} holds {} keys it may not and lacks {}\n",
                        r.name, h.sub, h.extra, h.missing
                    ));
                }
            }
        }
        let w = &self.writes;
        out.push_str(&format!(
            "writes: {} ({} inserts, {} updates, {} moves, {} deletes, {} membership changes); server version {}\n",
            w.get("writes").unwrap_or(&0),
            w.get("inserts").unwrap_or(&0),
            w.get("updates").unwrap_or(&0),
            w.get("moves").unwrap_or(&0),
            w.get("deletes").unwrap_or(&0),
            w.get("memberships").unwrap_or(&0),
            self.server_version
        ));
        if let Some(i) = &self.intrusion {
            out.push_str(&format!(
                "cross-tenant write by {} into {}: {}; {}'s rows unchanged: {}\n",
                i.client,
                i.victim,
                i.refusal.as_deref().unwrap_or("NOT refused"),
                i.victim,
                if i.vault_unchanged && i.planted_absent {
                    "yes"
                } else {
                    "NO"
                }
            ));
        }
        if let Some(sc) = &self.schema {
            out.push_str(&format!(
                "schema change during the writes ({SCHEMA_CHANGE}): version {}; connected clients migrated in place {}; {} of {} replicas at version {}\n",
                sc.version,
                sc.live_ms
                    .map_or("(not all within 20 s)".to_owned(), |ms| format!("within {ms:.0} ms")),
                sc.migrated,
                sc.of,
                sc.version
            ));
        }
        if let Some(d) = &self.dir {
            out.push_str(&format!(
                "files kept in {} (server.db, one replica-<user>-<tenant>.db per client; read them with `tenantsync sql`)\n",
                d.display()
            ));
        }
        out.push_str(&self.verdict());
        out.push('\n');
        out
    }

    fn json(&self) -> Json {
        let (held, expected, leaks, misses, stale) = self.totals();
        let diffs = |v: &[tenantsync_verify::RowDiff]| -> Vec<String> {
            v.iter().take(20).map(|d| d.to_string()).collect()
        };
        json!({
            "ok": self.ok(),
            "verdict": self.verdict(),
            "seed": self.seed,
            "tenants": self.tenants,
            "clients_per_tenant": self.clients_per_tenant,
            "seconds": self.seconds,
            "converge_seconds": self.converge_seconds,
            "server_version": self.server_version,
            "writes": self.writes,
            "rows_held": held,
            "rows_expected": expected,
            "leaks": leaks,
            "misses": misses,
            "stale": stale,
            "intrusion": self.intrusion.as_ref().map(|i| json!({
                "client": i.client,
                "victim": i.victim,
                "refused": i.refusal.is_some(),
                "refusal": i.refusal,
                "victim_rows_unchanged": i.vault_unchanged && i.planted_absent,
            })),
            "schema_change": self.schema.as_ref().map(|sc| json!({
                "statement": SCHEMA_CHANGE,
                "schema_version": sc.version,
                "live_migrated_ms": sc.live_ms,
                "replicas_migrated": sc.migrated,
                "replicas": sc.of,
            })),
            "dir": self.dir.as_ref().map(|d| d.display().to_string()),
            "clients": self.results.iter().map(|r| json!({
                "client": r.name,
                "tenant": r.tenant,
                "subscriptions": r.subs.iter().map(|(id, q)| json!({"id": id, "query": q})).collect::<Vec<_>>(),
                "ok": r.check.as_ref().is_some_and(Check::ok),
                "error": r.error,
                "rows_held": r.check.as_ref().map(|c| c.held),
                "rows_expected": r.check.as_ref().map(|c| c.expected),
                "leaks": r.check.as_ref().map(|c| diffs(&c.leaks)),
                "misses": r.check.as_ref().map(|c| diffs(&c.misses)),
                "stale": r.check.as_ref().map(|c| diffs(&c.stale)),
                "writes": r.writes,
                "sessions": r.sessions,
                "pushes_ok": r.pushes_ok,
                "pushes_refused": r.refused,
                "quarantined": r.quarantined,
            })).collect::<Vec<_>>(),
        })
    }
}

fn phase(n: usize, text: impl std::fmt::Display) {
    eprintln!("[{n}/6] {text}");
}

async fn demo(args: &DemoArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let (_tmp, dir) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            // A new run replaces the files of an earlier one.
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(d.join(format!("server.db{suffix}")));
            }
            (None, d.clone())
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("tenantsync-demo-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    let db_path = dir.join("server.db");
    eprintln!(
        "tenantsync demo: {} tenants x {} clients, {} s of writes, seed {}",
        args.tenants, args.clients, args.seconds, args.seed
    );

    // 1. The server.
    let mut config = ServiceConfig::new(&db_path, SCHEMA, POLICY_NAME, POLICY);
    config.synchronous = Synchronous::Normal;
    config.tenant_claim = TENANT_CLAIM.into();
    let service = tokio::task::spawn_blocking(move || SyncService::start(config))
        .await
        .context("the service start panicked")?
        .with_context(|| format!("cannot start the server on {}", db_path.display()))?;
    let secret: [u8; 32] = rand::random();
    let auth = Authenticator::new(&JwtSettings {
        key: JwtKey::Secret(secret.to_vec()),
        leeway_secs: 0,
        audience: None,
        issuer: None,
        tenant_claim: TENANT_CLAIM.into(),
    })
    .context("the token key")?;
    let state = AppState::new(service.clone(), auth, EdgeSettings::default(), None);
    let server = Server::bind("127.0.0.1:0".parse().expect("an address"), state)
        .await
        .context("cannot listen on 127.0.0.1")?;
    let addr = server.local_addr()?;
    let url = format!("http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    phase(
        1,
        format!(
            "server: listening on {url} (database {})",
            dir.join("server.db").display()
        ),
    );

    let result = scenario(args, &service, &url, &secret, &dir, started).await;

    // Stop the server whatever happened.
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), server_task).await;
    let mut report = result?;
    report.dir = args.dir.clone();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn scenario(
    args: &DemoArgs,
    service: &SyncService,
    url: &str,
    secret: &[u8],
    dir: &Path,
    started: Instant,
) -> anyhow::Result<Report> {
    // 2. Seed.
    let (lists, n) = seed(service, args).await?;
    let plans = plan(args, &lists);
    phase(
        2,
        format!(
            "seed: examples/seed.sql and generated lists, memberships and todos ({n} statements, {} lists in {} tenants)",
            lists.values().map(Vec::len).sum::<usize>(),
            args.tenants
        ),
    );

    // 3. Clients.
    let mut running = Vec::new();
    for p in plans {
        let claims = claims(&p.user, &p.tenant);
        let tok = token(secret, &claims)?;
        let path = dir.join(format!("replica-{}-{}.db", p.user, p.tenant));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        let replica =
            Replica::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut cfg = ClientConfig::new(url, tok);
        cfg.client_name = format!("tenantsync-demo {}", p.name);
        cfg.poll_interval = Some(Duration::from_millis(100));
        cfg.backoff_max = Duration::from_millis(800);
        let client = SyncClient::start(replica, cfg);
        for (id, q) in &p.subs {
            client
                .subscribe(id, q)
                .await
                .with_context(|| format!("{}: subscribe {q}", p.name))?;
        }
        running.push(Arc::new(Running {
            identity: Identity::new(claims),
            plan: p,
            client,
            writes: Arc::new(AtomicU64::new(0)),
            intrusion: Arc::new(std::sync::Mutex::new(None)),
        }));
    }
    for c in &running {
        c.client
            .wait_until(Duration::from_secs(30), |s| {
                s.connected && !s.cursors.is_empty() && s.cursors.keys().all(|k| s.live.contains(k))
            })
            .await
            .map_err(|s| {
                anyhow::anyhow!("{}: the initial sync did not finish: {s:?}", c.plan.name)
            })?;
    }
    let subs: usize = running.iter().map(|c| c.plan.subs.len()).sum();
    phase(
        3,
        format!(
            "clients: {} replicas connected over WebSockets, {subs} subscriptions synced ({:.1} s)",
            running.len(),
            started.elapsed().as_secs_f64()
        ),
    );
    for c in &running {
        eprintln!(
            "  {:<16} {}",
            c.plan.name,
            c.plan
                .subs
                .iter()
                .map(|(_, q)| q.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }

    // 4. Writes.
    phase(
        4,
        format!(
            "writing for {} s: inserts, edits, moves between lists and owners, deletes, shares; halfway, a schema change",
            args.seconds
        ),
    );
    let counters = Arc::new(Counters::default());
    let bar = ProgressBar::with_draw_target(
        Some((args.seconds * 10.0) as u64),
        ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        ProgressStyle::with_template("  {bar:30} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let plain = bar.is_hidden();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in &running {
        let tl = lists.get(&c.plan.tenant).cloned().unwrap_or_default();
        let others: Vec<String> = running
            .iter()
            .filter(|o| o.plan.tenant == c.plan.tenant && o.plan.user != c.plan.user)
            .map(|o| o.plan.user.clone())
            .collect();
        tasks.push(tokio::spawn(drive(
            c.clone(),
            tl,
            others,
            args.seconds,
            counters.clone(),
            bar.clone(),
            stop.clone(),
        )));
    }
    let change = tokio::spawn(change_schema_midway(
        service.clone(),
        running.clone(),
        Duration::from_secs_f64(args.seconds / 2.0),
        bar.clone(),
        plain,
    ));
    let t0 = Instant::now();
    let mut last_line = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (mut ok, mut refused, mut online) = (0, 0, 0);
        for c in &running {
            let s = c.client.status();
            ok += s.pushes_ok;
            refused += s.pushes_refused;
            online += usize::from(s.connected);
        }
        let msg = format!(
            "{} writes, {ok} pushes applied, {refused} refused, {online}/{} online, server version {}",
            counters.writes.load(Ordering::Relaxed),
            running.len(),
            service.db_version()
        );
        bar.set_position((t0.elapsed().as_secs_f64() * 10.0) as u64);
        bar.set_message(msg.clone());
        if plain && last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!("  {msg}");
            last_line = Instant::now();
        }
    }
    bar.finish_and_clear();
    for t in tasks {
        let _ = t.await;
    }

    let change = change.await.context("the schema change panicked")??;

    // 5. Quiescence: every push answered, every subscription live.
    let q0 = Instant::now();
    for c in &running {
        c.client.set_online(true);
    }
    for c in &running {
        if let Err(s) = c
            .client
            .wait_until(Duration::from_secs(30), |s| {
                s.connected && !s.unpushed && s.cursors.keys().all(|k| s.live.contains(k))
            })
            .await
        {
            eprintln!("  {}: not settled after 30 s: {s:?}", c.plan.name);
        }
    }
    phase(
        5,
        format!(
            "quiescence: every write pushed and answered, every subscription live ({:.1} s); server version {}",
            q0.elapsed().as_secs_f64(),
            service.db_version()
        ),
    );

    let mut migrated = 0;
    for c in &running {
        if c.client.read(|r| r.schema_version()).await.ok() == Some(change.0) {
            migrated += 1;
        }
    }
    let schema = Some(SchemaResult {
        version: change.0,
        live_ms: change.1,
        migrated,
        of: running.len(),
    });

    // 6. Verification: poll until every replica matches (deliveries are
    // asynchronous) or 20 s pass; the last check is the verdict.
    let db_path = dir.join("server.db");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut checks: Vec<Option<Result<Check, String>>> = running.iter().map(|_| None).collect();
    loop {
        let mut states = Vec::new();
        for (i, c) in running.iter().enumerate() {
            if matches!(&checks[i], Some(Ok(k)) if k.ok()) {
                states.push(None);
                continue;
            }
            let state = c.client.read(|r| Ok(ReplicaState::read(r))).await;
            states.push(Some(match state {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            }));
        }
        let ids: Vec<Identity> = running.iter().map(|c| c.identity.clone()).collect();
        let path = db_path.clone();
        let round = tokio::task::spawn_blocking(
            move || -> anyhow::Result<Vec<Option<Result<Check, String>>>> {
                let truth = Truth::open(&path, POLICY_NAME, POLICY)?;
                Ok(states
                    .into_iter()
                    .zip(&ids)
                    .map(|(s, id)| {
                        s.map(|s| {
                            s.and_then(|s| truth.check_state(id, &s).map_err(|e| e.to_string()))
                        })
                    })
                    .collect())
            },
        )
        .await
        .context("the verification panicked")??;
        for (slot, new) in checks.iter_mut().zip(round) {
            if let Some(n) = new {
                *slot = Some(n);
            }
        }
        let all_ok = checks.iter().all(|c| matches!(c, Some(Ok(k)) if k.ok()));
        if all_ok || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let converge = q0.elapsed().as_secs_f64();

    // The cross-tenant write changed nothing on the server.
    let intrusion = match running.iter().find(|c| c.plan.intrude.is_some()) {
        None => None,
        Some(c) => {
            let victim = c.plan.intrude.clone().unwrap_or_default();
            let rows = service_sql(
                service,
                vec![
                    format!("SELECT tenant_id, owner, title FROM todos WHERE id = {VAULT_ID}"),
                    format!(
                        "SELECT count(*) FROM todos WHERE id >= {} AND id < {} AND tenant_id <> {}",
                        c.plan.id_base,
                        c.plan.id_base + 100_000,
                        sql_quote(&c.plan.tenant)
                    ),
                ],
            )
            .await?;
            let vault_unchanged = rows[0]
                == vec![vec![
                    Value::Text(victim.clone()),
                    Value::Text("board".into()),
                    Value::Text(VAULT_TITLE.into()),
                ]];
            let planted_absent = rows[1] == vec![vec![Value::Integer(0)]];
            let refusal = c.intrusion.lock().unwrap().clone();
            Some(IntrusionResult {
                client: c.plan.name.clone(),
                victim,
                refusal,
                vault_unchanged,
                planted_absent,
            })
        }
    };
    let ok_count = checks
        .iter()
        .filter(|c| matches!(c, Some(Ok(k)) if k.ok()))
        .count();
    phase(
        6,
        format!(
            "verification: each replica against its policy and subscriptions evaluated on the server database: {ok_count} of {} match ({converge:.1} s after the writes stopped)",
            running.len()
        ),
    );

    let mut results = Vec::new();
    for (c, check) in running.iter().zip(checks) {
        let s = c.client.status();
        let (check, error) = match check {
            Some(Ok(k)) => (Some(k), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, Some("not checked".into())),
        };
        results.push(ClientResult {
            name: c.plan.name.clone(),
            tenant: c.plan.tenant.clone(),
            subs: c.plan.subs.clone(),
            check,
            error,
            writes: c.writes.load(Ordering::Relaxed),
            sessions: s.sessions,
            pushes_ok: s.pushes_ok,
            refused: s.pushes_refused,
            quarantined: s.quarantined,
        });
    }
    for c in running {
        if let Ok(c) = Arc::try_unwrap(c) {
            let _ = c.client.close().await;
        }
    }
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let writes = BTreeMap::from([
        ("writes", load(&counters.writes)),
        ("inserts", load(&counters.inserts)),
        ("updates", load(&counters.updates)),
        ("moves", load(&counters.moves)),
        ("deletes", load(&counters.deletes)),
        ("memberships", load(&counters.memberships)),
    ]);
    Ok(Report {
        seed: args.seed,
        tenants: args.tenants,
        clients_per_tenant: args.clients,
        dir: None,
        results,
        writes,
        intrusion,
        schema,
        server_version: service.db_version(),
        seconds: 0.0,
        converge_seconds: converge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(tenants: u32, clients: u32, seed: u64) -> DemoArgs {
        DemoArgs {
            tenants,
            clients,
            seconds: 1.0,
            seed,
            dir: None,
            json: false,
        }
    }

    fn lists() -> Lists {
        let mut l = Lists::new();
        l.insert(
            "acme".into(),
            vec![(1, "alice".into()), (2, "bob".into()), (100, "erin".into())],
        );
        l.insert(
            "globex".into(),
            vec![(3, "carol".into()), (101, "dave".into())],
        );
        l.insert("initech".into(), vec![(102, "peter".into())]);
        l
    }

    #[test]
    fn the_plan_is_a_function_of_the_seed() {
        let a = plan(&args(3, 4, 7), &lists());
        let b = plan(&args(3, 4, 7), &lists());
        let show = |p: &[ClientPlan]| -> Vec<String> {
            p.iter()
                .map(|c| format!("{} {:?} {:?} {}", c.name, c.kind, c.subs, c.seed))
                .collect()
        };
        assert_eq!(show(&a), show(&b));
        assert_ne!(show(&a), show(&plan(&args(3, 4, 8), &lists())));
        assert_eq!(a.len(), 12);
        // Every kind of subscription, an offline client, a reconnect, and
        // exactly one intruder (of globex, into acme).
        assert!(a.iter().any(|c| c.kind == Kind::Everything));
        assert!(a.iter().any(|c| c.kind == Kind::Mine));
        assert!(a.iter().any(|c| matches!(c.kind, Kind::OneList(_))));
        assert!(a.iter().any(|c| c.kind == Kind::Open));
        assert!(a.iter().any(|c| c.offline.is_some()));
        assert!(a.iter().any(|c| c.reconnect_at.is_some()));
        let intruders: Vec<&ClientPlan> = a.iter().filter(|c| c.intrude.is_some()).collect();
        assert_eq!(intruders.len(), 1);
        assert_eq!(intruders[0].tenant, "globex");
        assert_eq!(intruders[0].intrude.as_deref(), Some("acme"));
        // Ids never collide between clients.
        let mut bases: Vec<i64> = a.iter().map(|c| c.id_base).collect();
        bases.dedup();
        assert_eq!(bases.len(), 12);
    }

    #[test]
    fn one_tenant_has_no_intruder_and_names_run_on() {
        let p = plan(&args(1, 2, 1), &lists());
        assert!(p.iter().all(|c| c.intrude.is_none()));
        assert_eq!(tenant_name(3), "tenant4");
        assert_eq!(user_name(0, 0), "alice");
        assert_eq!(user_name(5, 1), "u2t6");
    }

    #[test]
    fn seed_statements_are_its_inserts() {
        let s = statements(SEED).unwrap();
        let code = |x: &String| {
            x.lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert!(
            s.iter()
                .all(|x| code(x).trim_start().starts_with("INSERT INTO")),
            "{s:?}"
        );
        assert_eq!(s.len(), 6);
    }
}
