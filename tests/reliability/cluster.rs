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
//! `nats_servers_die_and_come_back_and_nothing_acknowledged_is_lost`: one
//! of the three NATS servers SIGKILLed under load (writes go on), then the
//! other two (writes are refused `unavailable`, none acknowledged), then all
//! three restarted (service resumes); every acknowledged write is there.
//!
//! `a_paused_owner_acknowledges_nothing_it_lost`: an owner SIGSTOPped until
//! its lease lapses, then SIGCONTed with a write waiting for it, cannot
//! acknowledge a write the log does not hold, and rejoins as a standby.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tenantsync_client::{Event, Replica, SyncClient};
use tenantsync_policy::Identity;

use crate::common::*;

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

/// The NATS server of `cluster up` number `i`: its pid.
fn nats_pid(dir: &std::path::Path, i: usize) -> Option<u32> {
    let conf = dir.join(format!("nats-{i}")).join("nats.conf");
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("nats-server -c {}", conf.display())])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_servers_die_and_come_back_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::up(dir.path(), 3, 3);
    let http = reqwest::Client::new();
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    let answered: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, answered, failures, http, urls) = (
            stop.clone(),
            answered.clone(),
            failures.clone(),
            http.clone(),
            urls.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let t = TENANTS[n as usize % TENANTS.len()];
                let sql = format!(
                    "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({n}, '{t}', 'backend', 'b')"
                );
                match tenant_sql(&http, &urls[n as usize % urls.len()], t, &sql).await {
                    Ok(_) => answered.lock().unwrap().push((t.to_owned(), n)),
                    Err(e) => failures.lock().unwrap().push(e),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let count = || answered.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // One of three NATS servers dies: writes go on (once JetStream moved
    // the leadership of the streams that server led, and the nodes
    // connected to it reconnected: a few seconds).
    sigkill(nats_pid(dir.path(), 1).expect("nats-server 1"));
    let before = count();
    let at = Instant::now();
    while count() < before + 20 {
        assert!(
            at.elapsed() < Duration::from_secs(20),
            "writes stopped with one NATS server of three dead"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "with one NATS server dead, 20 more writes in {:?}",
        at.elapsed()
    );

    // All of them: writes fail, clearly.
    for i in [0, 2] {
        sigkill(nats_pid(dir.path(), i).expect("nats-server"));
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let stalled = count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(),
        stalled,
        "a write was acknowledged with every NATS server dead"
    );
    {
        let f = failures.lock().unwrap();
        let last = f.last().expect("failures while NATS is down");
        assert!(
            last.contains("503") && last.contains("unavailable"),
            "{last}"
        );
    }

    // They come back: so does service.
    let mut restarted = Vec::new();
    for i in 0..3 {
        let conf = dir.path().join(format!("nats-{i}")).join("nats.conf");
        restarted.push(
            std::process::Command::new("nats-server")
                .arg("-c")
                .arg(conf)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let at = Instant::now();
    while count() < stalled + 20 {
        assert!(
            at.elapsed() < Duration::from_secs(60),
            "no service 60 s after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "service resumed {:?} after the NATS servers restarted",
        at.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();

    // Every acknowledged write is in the cluster.
    let answered = answered.lock().unwrap().clone();
    for t in TENANTS {
        let sql = format!("SELECT id FROM todos WHERE tenant_id = '{t}'");
        let r = settled_sql(&http, &urls[0], t, &sql).await;
        let there: std::collections::BTreeSet<i64> = r["results"][0]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row[0].as_i64().unwrap())
            .collect();
        let missing: Vec<i64> = answered
            .iter()
            .filter(|(tt, id)| tt == t && !there.contains(id))
            .map(|(_, id)| *id)
            .collect();
        assert!(
            missing.is_empty(),
            "{t}: acknowledged writes lost: {missing:?}"
        );
    }
    eprintln!(
        "{} writes acknowledged, {} refused while NATS was down",
        answered.len(),
        failures.lock().unwrap().len()
    );
    drop(cluster);
    for mut c in restarted {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The rows of `todos` a user's fresh HTTP pull gets, through `url`.
async fn pulled_todos(
    http: &reqwest::Client,
    url: &str,
    sub: &str,
    tenant: &str,
    site: u8,
) -> usize {
    let at = Instant::now();
    loop {
        let r = http
            .post(format!("{url}/v1/pull"))
            .bearer_auth(token(&claims(sub, tenant)))
            .json(&serde_json::json!({
                "site_id": format!("{site:02x}").repeat(16),
                "subscriptions": [{"id": "all", "query": "SELECT * FROM todos"}],
            }))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(r) = r
            && r.status() == 200
        {
            let v: serde_json::Value = r.json().await.unwrap();
            let changes = v["subs"]["all"]["changes"].as_array().map_or(0, Vec::len);
            // A todo row travels as one change per column (its pk aside).
            return changes;
        }
        assert!(
            at.elapsed() < Duration::from_secs(15),
            "{tenant}: no pull answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A policy reload on one node is the cluster's: every node's shards take
/// it, and so does a shard that moves to another node afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_on_one_node_holds_on_every_shard_wherever_it_moves() {
    let dir = tempfile::tempdir().unwrap();
    let shards = 4;
    let cluster = Cluster::up(dir.path(), 2, shards);
    let http = reqwest::Client::new();
    let placement = tenantsync_server::Placement::new(shards, BTreeMap::new());
    let tenants: Vec<String> = (0..shards)
        .map(|k| {
            (0..)
                .map(|i| format!("p{i}"))
                .find(|t| placement.shard_of(Some(t)) == k)
                .unwrap()
        })
        .collect();
    for t in &tenants {
        let sql = format!(
            "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, '{t}', 'u', 'mine')"
        );
        settled_sql(&http, &cluster.nodes[0].url, t, &sql).await;
    }
    for (i, t) in tenants.iter().enumerate() {
        assert!(pulled_todos(&http, &cluster.nodes[1].url, "u", t, i as u8 + 1).await > 0);
    }
    // Hide every todo, posted to one node.
    let policy = std::fs::read_to_string(examples("policy.sql")).unwrap()
        + "\nCREATE POLICY todos_hidden ON todos AS RESTRICTIVE FOR SELECT TO authenticated USING (false);\n";
    let r = http
        .post(format!("{}/v1/admin/policy", cluster.nodes[0].url))
        .bearer_auth(service_token())
        .json(&serde_json::json!({"policy_sql": policy}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // Every shard, whichever node runs it, within a placement round.
    let at = Instant::now();
    loop {
        let mut seen = 0;
        for (i, t) in tenants.iter().enumerate() {
            seen += pulled_todos(&http, &cluster.nodes[1].url, "u", t, 16 + i as u8).await;
        }
        if seen == 0 {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "a shard still shows todos"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The node that took the reload dies: its shards move, still hidden.
    sigkill(cluster.nodes[0].pid);
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (i, t) in tenants.iter().enumerate() {
        assert_eq!(
            pulled_todos(&http, &cluster.nodes[1].url, "u", t, 32 + i as u8).await,
            0,
            "{t}: a moved shard forgot the reloaded policies"
        );
    }
}
