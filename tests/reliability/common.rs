//! What the reliability suites share: the real `tenantsync serve` as a child
//! process (started, SIGKILLed, restarted on the same database and port),
//! tokens, service SQL over HTTP, clients, and the oracle: a subscription's
//! rows evaluated directly on the server database (the policy rewrite of
//! `tenantsync-policy` run as SQL), compared with a replica.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use tenantsync_client::{ClientConfig, Replica, SyncClient};
use tenantsync_core::{CrrConnection, Options};
use tenantsync_policy::Identity;
use tenantsync_types::Value;
use tenantsync_verify::{ReplicaState, Truth, crr_rows};

pub const SECRET: &str = "reliability-secret-32-bytes-long!";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tenantsync")
}

pub fn examples(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file)
}

/// An environment variable as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How `serve` is started.
#[derive(Clone, Debug)]
pub struct ServeSpec {
    pub db: PathBuf,
    pub schema: PathBuf,
    pub policy: PathBuf,
    /// `full` or `normal`.
    pub synchronous: &'static str,
}

/// A `tenantsync serve` child process.
pub struct Serve {
    child: Child,
    pub port: u16,
}

impl Serve {
    /// Starts `serve` on `port` (0: any) and waits for its listening line.
    /// A port still held by the killed process is retried for 5 s.
    pub fn start(spec: &ServeSpec, port: u16) -> Serve {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Serve::try_start(spec, port) {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("serve did not start ({e}), retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("serve did not start: {e}"),
            }
        }
    }

    fn try_start(spec: &ServeSpec, port: u16) -> Result<Serve, String> {
        let mut child = Command::new(bin())
            .args(["serve", "--db"])
            .arg(&spec.db)
            .arg("--schema")
            .arg(&spec.schema)
            .arg("--policy")
            .arg(&spec.policy)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--jwt-secret", SECRET, "--synchronous", spec.synchronous])
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tenantsync serve");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let status = child.wait();
            return Err(format!("first line {line:?}, exit {status:?}"));
        };
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Ok(Serve { child, port })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no shutdown, no checkpoint, no last persistence.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }

    /// SIGTERM and the clean shutdown.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user's claims (role `authenticated`).
pub fn claims(sub: &str, tenant: &str) -> serde_json::Map<String, Json> {
    let Json::Object(m) = json!({"sub": sub, "role": "authenticated", "tenant_id": tenant}) else {
        unreachable!()
    };
    m
}

/// An HS256 token for these claims, valid for an hour.
pub fn token(claims: &serde_json::Map<String, Json>) -> String {
    let mut c = claims.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    c.insert("exp".into(), json!(now + 3600));
    tenantsync_server::auth::mint_hs256(SECRET.as_bytes(), &c).unwrap()
}

pub fn service_token() -> String {
    let mut c = claims("backend", "ops");
    c.insert("role".into(), json!("service"));
    token(&c)
}

/// Service SQL over HTTP: Ok when the server answered 200 (acknowledged).
pub async fn service_sql(http: &reqwest::Client, url: &str, sql: &str) -> Result<Json, String> {
    post_sql(
        http,
        url,
        json!({"statements": [{"sql": sql, "params": []}]}),
    )
    .await
}

/// `POST /v1/sql` with a service token and `body`: the answer when 200.
async fn post_sql(http: &reqwest::Client, url: &str, body: Json) -> Result<Json, String> {
    let r = http
        .post(format!("{url}/v1/sql"))
        .bearer_auth(service_token())
        .json(&body)
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

/// A WebSocket client on an in-memory replica, quick to reconnect.
pub fn client(url: &str, claims: &serde_json::Map<String, Json>, replica: Replica) -> SyncClient {
    let mut cfg = ClientConfig::new(url, token(claims));
    cfg.poll_interval = Some(Duration::from_millis(50));
    cfg.backoff_min = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(300);
    cfg.connect_timeout = Duration::from_secs(3);
    SyncClient::start(replica, cfg)
}

/// Waits (at most 20 s) until the client is connected and live on every
/// subscription: its replica has the server's schema.
pub async fn live(c: &SyncClient) {
    c.wait_until(Duration::from_secs(20), |s| {
        s.connected && s.cursors.keys().all(|k| s.live.contains(k))
    })
    .await
    .unwrap_or_else(|s| panic!("never live: {s:?}"));
}

/// The oracle: `tenantsync_verify` on the server database (each
/// subscription's query rewritten for the identity and run there as SQL),
/// compared with whole replicas: nothing it may not see, nothing missing,
/// every value equal, and each subscription's held keys its visible rows.
pub fn truth(db: &Path, policy_sql: &str) -> Truth {
    Truth::open(db, "policy.sql", policy_sql).unwrap_or_else(|e| panic!("the oracle: {e}"))
}

/// Every row of a table on the server database.
pub fn server_rows(db: &Path, table: &str) -> Vec<Vec<Value>> {
    let db = CrrConnection::open_with(
        db,
        Options {
            read_only: true,
            ..Options::default()
        },
    )
    .unwrap();
    crr_rows(&db)
        .unwrap()
        .into_iter()
        .filter(|((t, _), _)| t == table)
        .map(|(_, row)| row)
        .collect()
}

/// A replica checked against the oracle: None when it is exactly what
/// `who` may see through its subscriptions.
pub fn diff(truth: &Truth, who: &Identity, replica: &ReplicaState) -> Option<String> {
    let check = truth
        .check_state(who, replica)
        .unwrap_or_else(|e| panic!("the oracle: {e}"));
    (!check.ok()).then(|| check.to_string())
}

/// Waits until every client is connected, live on every subscription and
/// has pushed everything, then until each replica equals the oracle (the
/// last deliveries may still be on their way): panics with the differences
/// after `within`.
pub async fn converge(
    clients: &[(&SyncClient, &Identity, &str)],
    db: &Path,
    policy_sql: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    for (c, _, name) in clients {
        c.wait_until(deadline.saturating_duration_since(Instant::now()), |s| {
            s.connected && !s.unpushed && s.cursors.keys().all(|k| s.live.contains(k))
        })
        .await
        .unwrap_or_else(|s| panic!("{name} never settled: {s:?}"));
    }
    loop {
        let truth = truth(db, policy_sql);
        let mut diffs = Vec::new();
        for (c, who, name) in clients {
            let st = c
                .read(|r| Ok(ReplicaState::read(r)))
                .await
                .unwrap()
                .unwrap();
            if let Some(d) = diff(&truth, who, &st) {
                let st = c.status();
                diffs.push(format!(
                    "{name}: {d}\n  (pushes ok {}, refused {}, quarantined {}, sessions {})",
                    st.pushes_ok, st.pushes_refused, st.quarantined, st.sessions
                ));
            }
        }
        if diffs.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for (c, _, name) in clients {
                eprintln!("{name}:\n{}", inside(c).await);
            }
            panic!("replicas differ from the oracle:\n{}", diffs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a replica has inside, for a failure's trace: versions, cursors,
/// every clock (own or from elsewhere), the quarantine and the rows waiting
/// to settle.
async fn inside(c: &SyncClient) -> String {
    c.read(|r| {
        let site = r.site_id();
        let mut out = vec![format!(
            "  local version {}, pushed_version {}, subscriptions {:?}",
            r.local_version()?,
            r.pushed_version()?,
            r.subscriptions()?
                .iter()
                .map(|s| (s.id.clone(), s.query.clone(), s.cursor))
                .collect::<Vec<_>>()
        )];
        for ch in r.conn().changes_since(0, None)? {
            out.push(format!(
                "  clock {} {:?} {} v{} {} cl{} cv{}",
                ch.table,
                ch.pk.unpack().unwrap_or_default(),
                ch.cid,
                ch.db_version,
                if ch.site_id == site {
                    "own"
                } else {
                    "from elsewhere"
                },
                ch.cl,
                ch.col_version
            ));
        }
        for q in r.quarantine()? {
            out.push(format!(
                "  quarantined {:?} {:?} {:?} v{}: {}",
                q.reason,
                q.change.table,
                q.change.pk.unpack().unwrap_or_default(),
                q.change.db_version,
                q.detail
            ));
        }
        for (k, v) in r.unsettled()? {
            out.push(format!(
                "  to settle {} {:?} at server version {v}",
                k.table,
                k.pk.unpack().unwrap_or_default()
            ));
        }
        Ok(out.join("\n"))
    })
    .await
    .unwrap_or_else(|e| format!("  unreadable: {e}"))
}

// --- A cluster of real processes (docs/CLUSTER.md) ---

/// A node: its id, URL and process id.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub id: String,
    pub url: String,
    pub pid: u32,
}

/// `tenantsync cluster up` running, and the nodes the test joined.
pub struct Cluster {
    up: Child,
    pub dir: PathBuf,
    pub nodes: Vec<NodeInfo>,
    joined: Vec<Child>,
}

impl Cluster {
    pub fn up(dir: &Path, nodes: usize, shards: usize) -> Cluster {
        Cluster::up_with(dir, nodes, shards, &examples("policy.sql"))
    }

    /// [`Cluster::up`] with another policy file.
    pub fn up_with(dir: &Path, nodes: usize, shards: usize, policy: &Path) -> Cluster {
        let mut up = Command::new(bin())
            .args(["cluster", "up", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir)
            .arg("--schema")
            .arg(examples("schema.sql"))
            .arg("--policy")
            .arg(policy)
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
    pub fn join(&mut self, id: &str, shards: usize) -> NodeInfo {
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

    pub fn node(&self, id: &str) -> &NodeInfo {
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

pub fn sigkill(pid: u32) {
    // SAFETY: a plain kill(2) of a process this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// `GET /v1/admin/cluster?tenant=T` on `url`: (shard, owner id).
pub async fn owner_of(http: &reqwest::Client, url: &str, tenant: &str) -> Option<(usize, String)> {
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
pub async fn cluster_status(http: &reqwest::Client, url: &str) -> Json {
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
pub async fn tenant_sql(
    http: &reqwest::Client,
    url: &str,
    tenant: &str,
    sql: &str,
) -> Result<Json, String> {
    let body = json!({"tenant": tenant, "statements": [{"sql": sql, "params": []}]});
    post_sql(http, url, body).await
}

/// Service SQL retried while the tenant's shard moves (at most 15 s).
pub async fn settled_sql(http: &reqwest::Client, url: &str, tenant: &str, sql: &str) -> Json {
    let at = Instant::now();
    loop {
        match tenant_sql(http, url, tenant, sql).await {
            Ok(r) => return r,
            Err(e) if at.elapsed() > Duration::from_secs(15) => panic!("{tenant}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
