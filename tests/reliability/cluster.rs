//! The cluster (issue 13, docs/CLUSTER.md) with real processes: `tenantsync
//! cluster up` (3 NATS servers with replicated streams, 3 nodes), clients
//! connected through one node (the gateway: every session and push is
//! relayed to the owner of its tenant's shard), the backend writing through
//! the others. The owner of a busy shard is SIGKILLed, again after a node
//! joins (during the handover it starts), and again after another joins.
//! After each kill the moved shard takes writes again within 10 s; at the
//! end every write the cluster acknowledged is there and every replica
//! equals the oracle on the gateway's copy of its tenant's shard. How many
//! of the clients' syncs after a reconnect were refetches rather than
//! resumes is printed (docs/CLUSTER.md, "Not yet").
//!
//! `a_paused_owner_acknowledges_nothing_it_lost`: an owner SIGSTOPped until
//! its lease lapses, then SIGCONTed with a write waiting for it, cannot
//! acknowledge a write the log does not hold, and rejoins as a standby.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tenantsync_client::{Event, Replica, SyncClient};
use tenantsync_policy::Identity;

use crate::common::*;

/// A node: its id, URL and process id.
#[derive(Clone, Debug)]
struct NodeInfo {
    id: String,
    url: String,
    pid: u32,
}

/// `tenantsync cluster up` running, and the nodes the test joined.
struct Cluster {
    up: Child,
    dir: PathBuf,
    nodes: Vec<NodeInfo>,
    joined: Vec<Child>,
}

impl Cluster {
    fn up(dir: &Path, nodes: usize, shards: usize) -> Cluster {
        let mut up = Command::new(bin())
            .args(["cluster", "up", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir)
            .arg("--schema")
            .arg(examples("schema.sql"))
            .arg("--policy")
            .arg(examples("policy.sql"))
            .args(["--jwt-secret", SECRET, "--shards", &shards.to_string()])
            .args(["--lease-ms", "2000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tenantsync cluster up");
        let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
        let mut infos = Vec::new();
        loop {
            let line = lines
                .next()
                .expect("cluster up ended before `cluster ready`")
                .unwrap();
            if line == "cluster ready" {
                break;
            }
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!((f[0], f[3]), ("node", "pid"), "{line}");
            infos.push(NodeInfo {
                id: f[1].into(),
                url: f[2].into(),
                pid: f[4].parse().unwrap(),
            });
        }
        assert_eq!(infos.len(), nodes);
        std::thread::spawn(move || for _ in lines {});
        Cluster {
            up,
            dir: dir.to_owned(),
            nodes: infos,
            joined: Vec::new(),
        }
    }

    /// Starts another node (`tenantsync serve` with cluster flags) on the
    /// cluster's NATS servers.
    fn join(&mut self, id: &str, shards: usize) -> NodeInfo {
        let layout: Json =
            serde_json::from_slice(&std::fs::read(self.dir.join("cluster.json")).unwrap()).unwrap();
        let nats: Vec<String> = layout["nats_ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let ndir = self.dir.join(id);
        std::fs::create_dir_all(&ndir).unwrap();
        let mut child = Command::new(bin())
            .args(["serve", "--db"])
            .arg(ndir.join("server.db"))
            .arg("--schema")
            .arg(examples("schema.sql"))
            .arg("--policy")
            .arg(examples("policy.sql"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--jwt-secret", SECRET, "--shards", &shards.to_string()])
            .args(["--cluster-nats", &nats.join(",")])
            .args(["--node-id", id, "--node-url", &url])
            .args(["--cluster-replicas", &nats.len().to_string()])
            .args(["--cluster-lease-ms", "2000"])
            .arg("--cluster-dir")
            .arg(ndir.join("shards"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening on"), "{id}: {line:?}");
        let info = NodeInfo {
            id: id.into(),
            url,
            pid: child.id(),
        };
        self.joined.push(child);
        self.nodes.push(info.clone());
        info
    }

    fn node(&self, id: &str) -> &NodeInfo {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.joined {
            let _ = c.kill();
            let _ = c.wait();
        }
        // SAFETY: a plain kill(2) of the child this test started.
        unsafe { libc::kill(self.up.id() as i32, libc::SIGTERM) };
        let _ = self.up.wait();
    }
}

fn sigkill(pid: u32) {
    // SAFETY: a plain kill(2) of a process this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// `GET /v1/admin/cluster?tenant=T` on `url`: (shard, owner id).
async fn owner_of(http: &reqwest::Client, url: &str, tenant: &str) -> Option<(usize, String)> {
    let v: Json = http
        .get(format!("{url}/v1/admin/cluster?tenant={tenant}"))
        .bearer_auth(service_token())
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some((
        v["tenant"]["shard"].as_u64()? as usize,
        v["tenant"]["owner"].as_str()?.to_owned(),
    ))
}

/// `GET /v1/admin/cluster` on `url` (null when it does not answer).
async fn cluster_status(http: &reqwest::Client, url: &str) -> Json {
    let r = http
        .get(format!("{url}/v1/admin/cluster"))
        .bearer_auth(service_token())
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match r {
        Ok(r) => r.json().await.unwrap_or(Json::Null),
        Err(_) => Json::Null,
    }
}

/// Service SQL for one tenant through `url`.
async fn tenant_sql(
    http: &reqwest::Client,
    url: &str,
    tenant: &str,
    sql: &str,
) -> Result<Json, String> {
    let r = http
        .post(format!("{url}/v1/sql"))
        .bearer_auth(service_token())
        .json(&serde_json::json!({"tenant": tenant, "statements": [{"sql": sql, "params": []}]}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body: Json = r.json().await.map_err(|e| e.to_string())?;
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// Service SQL retried while the tenant's shard moves (at most 15 s).
async fn settled_sql(http: &reqwest::Client, url: &str, tenant: &str, sql: &str) -> Json {
    let at = Instant::now();
    loop {
        match tenant_sql(http, url, tenant, sql).await {
            Ok(r) => return r,
            Err(e) if at.elapsed() > Duration::from_secs(15) => panic!("{tenant}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owners_shards_move_with_every_acknowledged_write_and_clients_resume() {
    let dir = tempfile::tempdir().unwrap();
    let shards = 6;
    let mut cluster = Cluster::up(dir.path(), 3, shards);
    let gateway = cluster.nodes[0].clone();
    let http = reqwest::Client::new();
    let policy_sql = std::fs::read_to_string(examples("policy.sql")).unwrap();
    let placement = tenantsync_server::Placement::new(shards, BTreeMap::new());

    // Clients: two users of each tenant, all through the gateway.
    let mut clients: Vec<(Arc<SyncClient>, Identity, String, String)> = Vec::new();
    let resets = Arc::new(AtomicU64::new(0));
    for t in TENANTS {
        for u in ["u1", "u2"] {
            let cl = claims(&format!("{t}-{u}"), t);
            let c = Arc::new(client(
                &gateway.url,
                &cl,
                Replica::open_in_memory().unwrap(),
            ));
            c.subscribe("all", "SELECT * FROM todos").await.unwrap();
            live(&c).await;
            let mut events = c.events();
            let resets = resets.clone();
            tokio::spawn(async move {
                let mut session = 0;
                loop {
                    match events.recv().await {
                        Ok(Event::Connected { session: s, .. }) => session = s,
                        Ok(Event::Synced(r)) if session > 1 => {
                            let reset = r.parts.iter().filter(|p| p.reset).count() as u64;
                            resets.fetch_add(reset, Ordering::SeqCst);
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    }
                }
            });
            clients.push((c, Identity::new(cl), format!("{t}-{u}"), t.to_owned()));
        }
    }

    // Writers: each client inserts its own rows; the backend inserts rows
    // of every tenant through the other nodes (relayed to the owners).
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (k, (c, _, name, tenant)) in clients.iter().enumerate() {
        let (c, stop, name, tenant) = (c.clone(), stop.clone(), name.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let id = (k as i64 + 1) * 1_000_000 + n;
                let sql = format!(
                    "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({id}, '{tenant}', '{name}', 'c{id}')"
                );
                c.write(move |conn| conn.execute(&sql, []).map(drop))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }));
    }
    let answered: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let backend = {
        let (stop, answered, http) = (stop.clone(), answered.clone(), http.clone());
        let urls: Vec<String> = cluster.nodes[1..].iter().map(|n| n.url.clone()).collect();
        let gw = gateway.url.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let t = TENANTS[n as usize % TENANTS.len()];
                let id = 50_000_000 + n;
                let sql = format!(
                    "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({id}, '{t}', 'backend', 'b{id}')"
                );
                // Through a node that may be dead: then through the gateway.
                let url = &urls[n as usize % urls.len()];
                let ok = tenant_sql(&http, url, t, &sql).await.is_ok()
                    || tenant_sql(&http, &gw, t, &sql).await.is_ok();
                if ok {
                    answered.lock().unwrap().push((t.to_owned(), id));
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };

    let mut failovers = Vec::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if round > 0 {
            // A node joins: shards move to it by handover. Round 1 kills
            // during that handover, round 2 after it settled.
            cluster.join(&format!("join{round}"), shards);
            let settle = if round == 1 { 300 } else { 6000 };
            tokio::time::sleep(Duration::from_millis(settle)).await;
        }
        // The owner of a shard that is not the gateway, and a tenant of it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (tenant, owner) = loop {
            let v = cluster_status(&http, &gateway.url).await;
            let found = v["shards"].as_array().into_iter().flatten().find_map(|sh| {
                let owner = sh["owner"].as_str()?;
                let live = cluster.nodes.iter().any(|n| n.id == owner);
                (owner != gateway.id && live)
                    .then(|| (sh["id"].as_u64().unwrap() as usize, owner.to_owned()))
            });
            if let Some((k, owner)) = found {
                let t = (0..)
                    .map(|i| format!("probe{i}"))
                    .find(|t| placement.shard_of(Some(t)) == k)
                    .unwrap();
                break (t, owner);
            }
            assert!(
                Instant::now() < deadline,
                "no shard owned elsewhere than the gateway"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let tenant = tenant.as_str();
        let killed = cluster.node(&owner).clone();
        let at = Instant::now();
        sigkill(killed.pid);
        // The moved shard takes a write again.
        let mut n = 0;
        loop {
            n += 1;
            let sql = format!(
                "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({}, '{tenant}', 'probe', 'p')",
                60_000_000 + round * 10_000 + n
            );
            if tenant_sql(&http, &gateway.url, tenant, &sql).await.is_ok() {
                answered
                    .lock()
                    .unwrap()
                    .push((tenant.to_owned(), 60_000_000 + round * 10_000 + n));
                break;
            }
            assert!(
                at.elapsed() < Duration::from_secs(10),
                "round {round}: {tenant}'s shard not served 10 s after {} died",
                killed.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failovers.push(at.elapsed());
        eprintln!(
            "round {round}: killed {} (owner of {tenant}'s shard); writes again after {:?}",
            killed.id,
            at.elapsed()
        );
        cluster.nodes.retain(|x| x.id != killed.id);
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    backend.await.unwrap();

    // Every answered backend write is in the cluster.
    let answered = answered.lock().unwrap().clone();
    let mut by_tenant: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (t, id) in &answered {
        by_tenant.entry(t.as_str()).or_default().push(*id);
    }
    for (t, ids) in &by_tenant {
        let sql = format!("SELECT id FROM todos WHERE tenant_id = '{t}' AND id >= 50000000");
        let r = settled_sql(&http, &gateway.url, t, &sql).await;
        let there: std::collections::BTreeSet<i64> = r["results"][0]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row[0].as_i64().unwrap())
            .collect();
        let missing: Vec<&i64> = ids.iter().filter(|id| !there.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{t}: answered service writes missing: {missing:?}"
        );
    }

    // Every replica equals the oracle on the gateway's copy of its shard.
    for t in TENANTS {
        let (shard, _) = owner_of(&http, &gateway.url, t).await.unwrap();
        let db = cluster
            .dir
            .join(&gateway.id)
            .join("shards")
            .join(format!("shard-{shard}.db"));
        let group: Vec<(&SyncClient, &Identity, &str)> = clients
            .iter()
            .filter(|(_, _, _, tenant)| tenant == t)
            .map(|(c, who, name, _)| (&**c, who, name.as_str()))
            .collect();
        converge(&group, &db, &policy_sql, Duration::from_secs(60)).await;
    }
    // Not yet guaranteed (docs/CLUSTER.md, "Not yet"): a subscription
    // whose last acknowledged cursor the dead owner had not persisted yet
    // is refetched, not resumed. Reported, not asserted.
    let resets = resets.load(Ordering::SeqCst);
    let max = failovers.iter().max().unwrap();
    let mut sorted = failovers.clone();
    sorted.sort();
    eprintln!(
        "failover (kill to the moved shard's first accepted write): median {:?}, max {max:?}; {} service writes answered; {resets} subscription syncs after a reconnect were refetches",
        sorted[sorted.len() / 2],
        answered.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_acknowledges_nothing_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let shards = 3;
    let cluster = Cluster::up(dir.path(), 3, shards);
    let gateway = cluster.nodes[0].clone();
    let http = reqwest::Client::new();
    let placement = tenantsync_server::Placement::new(shards, BTreeMap::new());
    // A tenant whose shard another node owns.
    let v = cluster_status(&http, &gateway.url).await;
    let (k, owner) = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|sh| {
            let o = sh["owner"].as_str()?;
            (o != gateway.id).then(|| (sh["id"].as_u64().unwrap() as usize, o.to_owned()))
        })
        .expect("a shard owned elsewhere than the gateway");
    let tenant = (0..)
        .map(|i| format!("t{i}"))
        .find(|t| placement.shard_of(Some(t)) == k)
        .unwrap();
    let paused = cluster.node(&owner).clone();
    let insert = |id: i64| {
        format!(
            "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({id}, '{tenant}', 'u', 'x')"
        )
    };
    tenant_sql(&http, &paused.url, &tenant, &insert(1))
        .await
        .unwrap();

    // SIGSTOP until another node serves the shard.
    // SAFETY: plain kill(2)s of a process this test's cluster started.
    unsafe { libc::kill(paused.pid as i32, libc::SIGSTOP) };
    let at = Instant::now();
    loop {
        if tenant_sql(&http, &gateway.url, &tenant, &insert(2))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(15),
            "the shard never moved"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in 3..20 {
        tenant_sql(&http, &gateway.url, &tenant, &insert(id))
            .await
            .unwrap();
    }
    // A write waits in the paused owner's socket; then it wakes.
    let waiting = {
        let (http, url, tenant, sql) = (
            http.clone(),
            paused.url.clone(),
            tenant.clone(),
            insert(100),
        );
        tokio::spawn(async move { tenant_sql(&http, &url, &tenant, &sql).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    unsafe { libc::kill(paused.pid as i32, libc::SIGCONT) };
    let answer = waiting.await.unwrap();
    let sql = format!("SELECT id FROM todos WHERE tenant_id = '{tenant}' ORDER BY id");
    let r = settled_sql(&http, &gateway.url, &tenant, &sql).await;
    let ids: Vec<i64> = r["results"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row[0].as_i64().unwrap())
        .collect();
    // Acknowledged means in the log; refused means nowhere.
    assert_eq!(
        ids.contains(&100),
        answer.is_ok(),
        "the woken owner's answer {answer:?} and the cluster's rows {ids:?} disagree"
    );
    assert!((1..20).all(|id| ids.contains(&id)), "{ids:?}");
    // It rejoins as a standby of the shard.
    let at = Instant::now();
    loop {
        let v = cluster_status(&http, &paused.url).await;
        if v["shards"][k]["here"] == "standby" && v["shards"][k]["owner"] != paused.id.as_str() {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(15),
            "never a standby again: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the woken owner answered {answer:?}");
}
