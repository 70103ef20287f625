//! The randomized isolation oracle. Per seed: a policy file composed from
//! templates (per tenant, per owner, membership subqueries, nested
//! memberships, value filters, restrictive policies; write policies per
//! tenant or per owner), a real `tenantsync serve` with it, WebSocket clients
//! with random identities and random subscriptions, random concurrent
//! writes through the peers (some refused by the write policies) and through
//! service SQL, random disconnects and reconnects. At quiescence every
//! replica equals the oracle: its policy and subscriptions evaluated
//! directly on the server database (nothing it may not see, nothing
//! missing, every value equal).
//!
//! `TENANTSYNC_ORACLE_SEEDS` (default 20) seeds from `TENANTSYNC_ORACLE_SEED`
//! (default 1); `TENANTSYNC_ORACLE_STEPS` (default 40) actions per seed. A
//! failing seed prints its whole trace (policy, subscriptions, actions,
//! client events, each replica's inside) and the line that reruns it.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tenantsync_client::{Event, Replica, SyncClient};
use tenantsync_policy::Identity;

use crate::common::*;

const TENANTS: &[&str] = &["t1", "t2"];
const USERS: &[&str] = &["u1", "u2", "u3", "u4"];

/// SELECT policies of todos: a permissive set is 1-3 of these.
const TODOS_READ: &[&str] = &[
    "tenant_id = auth.claim('tenant_id')",
    "owner = auth.uid()",
    "list_id IN (SELECT list_id FROM members WHERE user_id = auth.uid())",
    "list_id IN (SELECT id FROM lists WHERE owner = auth.uid())",
    "priority >= 2 AND tenant_id = auth.claim('tenant_id')",
    "list_id IN (SELECT list_id FROM members WHERE user_id = auth.uid() AND tenant_id = auth.claim('tenant_id'))",
];
/// Restrictive policies of todos (none, or one of these).
const TODOS_RESTRICT: &[&str] = &[
    "tenant_id = auth.claim('tenant_id')",
    "done = 0 OR owner = auth.uid()",
];
const LISTS_READ: &[&str] = &[
    "tenant_id = auth.claim('tenant_id')",
    "owner = auth.uid()",
    "id IN (SELECT list_id FROM members WHERE user_id = auth.uid())",
];
const MEMBERS_READ: &[&str] = &[
    "tenant_id = auth.claim('tenant_id')",
    "user_id = auth.uid()",
];
/// Write policies (FOR INSERT/UPDATE/DELETE), per table: tenant or owner.
const WRITE_TENANT: &str = "tenant_id = auth.claim('tenant_id')";

const QUERIES: &[&str] = &[
    "SELECT * FROM todos",
    "SELECT * FROM todos WHERE done = 0",
    "SELECT * FROM todos WHERE list_id = 1",
    "SELECT * FROM todos WHERE list_id IN (2, 3) AND priority > 1",
    "SELECT * FROM todos WHERE owner = 'u1'",
    "SELECT * FROM lists",
    "SELECT * FROM members",
];

fn some<'a>(rng: &mut StdRng, from: &[&'a str], max: usize) -> Vec<&'a str> {
    let n = rng.random_range(1..=max.min(from.len()));
    from.choose_multiple(rng, n).copied().collect()
}

/// A random policy file over the examples' schema.
fn policy(rng: &mut StdRng) -> String {
    let mut p = String::new();
    let read = |p: &mut String, table: &str, exprs: Vec<&str>| {
        for (i, e) in exprs.iter().enumerate() {
            p.push_str(&format!(
                "CREATE POLICY {table}_read_{i} ON {table} FOR SELECT TO authenticated USING ({e});\n"
            ));
        }
    };
    read(&mut p, "todos", some(rng, TODOS_READ, 3));
    read(&mut p, "lists", some(rng, LISTS_READ, 2));
    read(&mut p, "members", some(rng, MEMBERS_READ, 2));
    if rng.random_bool(0.6) {
        let e = TODOS_RESTRICT.choose(rng).unwrap();
        p.push_str(&format!(
            "CREATE POLICY todos_restrict ON todos AS RESTRICTIVE FOR SELECT TO authenticated USING ({e});\n"
        ));
    }
    for table in ["todos", "lists", "members"] {
        let owner = if table == "members" {
            "user_id"
        } else {
            "owner"
        };
        let check = if rng.random_bool(0.5) {
            WRITE_TENANT.to_owned()
        } else {
            format!("{WRITE_TENANT} AND {owner} = auth.uid()")
        };
        for cmd in ["INSERT", "UPDATE", "DELETE"] {
            let clause = match cmd {
                "INSERT" => format!("WITH CHECK ({check})"),
                "UPDATE" => format!("USING ({check}) WITH CHECK ({check})"),
                _ => format!("USING ({check})"),
            };
            p.push_str(&format!(
                "CREATE POLICY {table}_{} ON {table} FOR {cmd} TO authenticated {clause};\n",
                cmd.to_lowercase()
            ));
        }
    }
    p
}

/// A random write to a random row: SQL for a peer's replica or for the
/// service endpoint (mostly in the writer's tenant, sometimes not).
fn random_write(rng: &mut StdRng, user: &str, tenant: &str) -> String {
    let t = if rng.random_bool(0.85) {
        tenant
    } else {
        TENANTS.choose(rng).unwrap()
    };
    let u = if rng.random_bool(0.7) {
        user
    } else {
        USERS.choose(rng).unwrap()
    };
    let id = rng.random_range(1..=30);
    let list = rng.random_range(1..=4);
    match rng.random_range(0..10) {
        0..=2 => format!(
            "INSERT OR REPLACE INTO todos (id, tenant_id, list_id, owner, title, done, priority) \
             VALUES ({id}, '{t}', {list}, '{u}', 'x{}', {}, {})",
            rng.random_range(0..1000),
            rng.random_range(0..2),
            rng.random_range(1..4)
        ),
        3 => format!("UPDATE todos SET done = 1 - done WHERE id = {id}"),
        4 => format!("UPDATE todos SET tenant_id = '{t}', owner = '{u}' WHERE id = {id}"),
        5 => format!(
            "UPDATE todos SET list_id = {list}, priority = {} WHERE id = {id}",
            rng.random_range(1..4)
        ),
        6 => format!("DELETE FROM todos WHERE id = {id}"),
        7 => format!(
            "INSERT OR REPLACE INTO members (list_id, user_id, tenant_id) VALUES ({list}, '{u}', '{t}')"
        ),
        8 => format!("DELETE FROM members WHERE list_id = {list} AND user_id = '{u}'"),
        _ => format!(
            "INSERT OR REPLACE INTO lists (id, tenant_id, owner, name) VALUES ({list}, '{t}', '{u}', 'l{}')",
            rng.random_range(0..100)
        ),
    }
}

/// Traces a client's events (stderr, shown when the seed fails).
fn trace_events(name: String, client: &SyncClient) {
    let mut rx = client.events();
    tokio::spawn(async move {
        while let Ok(e) = rx.recv().await {
            let line = match e {
                Event::Synced(r) | Event::Checkpoint(r) => format!(
                    "applied v{}: {:?}, gaps {:?}, stale {:?}, removed {}",
                    r.version,
                    r.parts
                        .iter()
                        .map(|p| format!(
                            "{} {:?}->{} got {} deleted {} released {}",
                            p.sub,
                            p.cursor_before,
                            p.version,
                            p.rows_received,
                            p.rows_deleted,
                            p.rows_released
                        ))
                        .collect::<Vec<_>>(),
                    r.gaps.iter().map(|g| &g.sub).collect::<Vec<_>>(),
                    r.stale,
                    r.rows_removed
                ),
                Event::PushRefused(b) => {
                    let (f, rep) = &*b;
                    format!(
                        "push refused: {} rows named, {} state changes, {} invisible; restored {} removed {} refetch {:?}",
                        f.rows.len(),
                        f.state.len(),
                        f.invisible.len(),
                        rep.restored,
                        rep.removed,
                        rep.refetch
                    )
                }
                other => format!("{other:?}"),
            };
            eprintln!("  [{name}] {line}");
        }
    });
}

struct Peer {
    name: String,
    user: &'static str,
    tenant: &'static str,
    who: Identity,
    client: SyncClient,
}

async fn one_seed(seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let policy_sql = policy(&mut rng);
    eprintln!("  policy:\n{policy_sql}");
    let policy_path = dir.path().join("policy.sql");
    std::fs::write(&policy_path, &policy_sql).unwrap();
    let spec = ServeSpec {
        db: dir.path().join("server.db"),
        schema: examples("schema.sql"),
        policy: policy_path,
        synchronous: "normal",
    };
    let serve = Serve::start(&spec, 0);
    let url = serve.url();
    let http = reqwest::Client::new();
    for l in 1..=4 {
        let (t, u) = (TENANTS[l % 2], USERS[l % USERS.len()]);
        service_sql(
            &http,
            &url,
            &format!("INSERT INTO lists VALUES ({l}, '{t}', '{u}', 'list{l}')"),
        )
        .await
        .unwrap();
    }
    // 3-6 peers with random identities (a user may have two devices).
    let mut peers = Vec::new();
    for k in 0..rng.random_range(3..=6) {
        let user = *USERS.choose(&mut rng).unwrap();
        let tenant = *TENANTS.choose(&mut rng).unwrap();
        let cl = claims(user, tenant);
        let client = client(&url, &cl, Replica::open_in_memory().unwrap());
        for (i, q) in some(&mut rng, QUERIES, 3).into_iter().enumerate() {
            eprintln!("  peer{k} ({user}@{tenant}) subscribes s{i}: {q}");
            client.subscribe(&format!("s{i}"), q).await.unwrap();
        }
        live(&client).await;
        trace_events(format!("peer{k}"), &client);
        peers.push(Peer {
            name: format!("peer{k} ({user}@{tenant})"),
            user,
            tenant,
            who: Identity::new(cl),
            client,
        });
    }
    // The trace (stderr, shown when the seed fails): every action in order.
    for step in 0..steps {
        let p = &peers[rng.random_range(0..peers.len())];
        let who = &p.name;
        match rng.random_range(0..20) {
            0..=9 => {
                let sql = random_write(&mut rng, p.user, p.tenant);
                eprintln!("  {step}: {who} writes: {sql}");
                p.client
                    .write(move |c| c.execute_batch(&sql))
                    .await
                    .unwrap();
            }
            10..=13 => {
                let u = *USERS.choose(&mut rng).unwrap();
                let t = *TENANTS.choose(&mut rng).unwrap();
                let sql = random_write(&mut rng, u, t);
                eprintln!("  {step}: service writes: {sql}");
                service_sql(&http, &url, &sql).await.unwrap();
            }
            14 => {
                eprintln!("  {step}: {who} reconnects");
                p.client.reconnect()
            }
            15 => {
                eprintln!("  {step}: {who} goes offline");
                p.client.set_online(false)
            }
            16 => {
                eprintln!("  {step}: {who} goes online");
                p.client.set_online(true)
            }
            17 => {
                let q = QUERIES.choose(&mut rng).unwrap();
                let id = format!("s{}", rng.random_range(0..4));
                eprintln!("  {step}: {who} subscribes {id}: {q}");
                p.client.subscribe(&id, q).await.unwrap();
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
    }
    for p in &peers {
        p.client.set_online(true);
    }
    let view: Vec<(&SyncClient, &Identity, &str)> = peers
        .iter()
        .map(|p| (&p.client, &p.who, p.name.as_str()))
        .collect();
    let converged = tokio::time::timeout(
        Duration::from_secs(90),
        converge(&view, &spec.db, &policy_sql, Duration::from_secs(30)),
    )
    .await;
    assert!(converged.is_ok(), "seed {seed}: no convergence");
    drop(view);
    for p in peers {
        p.client.close().await.unwrap();
    }
    serve.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_policies_identities_subscriptions_and_writes_converge_to_the_oracle() {
    let seeds = env_or("TENANTSYNC_ORACLE_SEEDS", 20);
    let first = env_or("TENANTSYNC_ORACLE_SEED", 1);
    let steps = env_or("TENANTSYNC_ORACLE_STEPS", 40) as usize;
    for seed in first..first + seeds {
        eprintln!(
            "oracle: seed {seed} (TENANTSYNC_ORACLE_SEED={seed} TENANTSYNC_ORACLE_SEEDS=1 reruns it)"
        );
        let t = std::time::Instant::now();
        let r = tokio::spawn(one_seed(seed, steps)).await;
        if let Err(e) = r {
            panic!("seed {seed} failed: {e}");
        }
        eprintln!("oracle: seed {seed} converged in {:?}", t.elapsed());
    }
    eprintln!("oracle: {seeds} seeds converged");
}
