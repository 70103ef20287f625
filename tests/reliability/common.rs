//! What the reliability suites share: the real `tenantsync serve` as a child
//! process (started, SIGKILLed, restarted on the same database and port),
//! tokens, service SQL over HTTP, clients, and the oracle: a subscription's
//! rows evaluated directly on the server database (the policy rewrite of
//! `tenantsync-policy` run as SQL), compared with a replica.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value as Json, json};
use tenantsync_client::{ClientConfig, Replica, SyncClient};
use tenantsync_core::{CrrConnection, Options, PackedPk};
use tenantsync_policy::{Engine, Identity, PolicySet, Schema};
use tenantsync_types::Value;

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
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn service_token() -> String {
    let mut c = claims("backend", "ops");
    c.insert("role".into(), json!("service"));
    token(&c)
}

/// Service SQL over HTTP: Ok when the server answered 200 (acknowledged).
pub async fn service_sql(http: &reqwest::Client, url: &str, sql: &str) -> Result<Json, String> {
    let r = http
        .post(format!("{url}/v1/sql"))
        .bearer_auth(service_token())
        .json(&json!({"statements": [{"sql": sql, "params": []}]}))
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

/// Rows of a table keyed by packed primary key.
pub type Rows = BTreeMap<PackedPk, Vec<Value>>;

/// Every row of `sql`'s result, keyed by the columns at `pk`.
pub fn rows_of(conn: &rusqlite::Connection, sql: &str, params: &[Value], pk: &[usize]) -> Rows {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let n = stmt.column_count();
    stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
        (0..n)
            .map(|i| r.get::<_, Value>(i))
            .collect::<rusqlite::Result<Vec<Value>>>()
    })
    .unwrap()
    .map(|r| {
        let r = r.unwrap();
        let key: Vec<Value> = pk.iter().map(|&i| r[i].clone()).collect();
        (PackedPk::pack(&key).unwrap(), r)
    })
    .collect()
}

/// The oracle: the server database, read-only, and the policies.
pub struct Truth {
    pub db: CrrConnection,
    pub engine: Engine,
    pub schema: Schema,
}

impl Truth {
    pub fn open(db: &Path, policy_sql: &str) -> Truth {
        let db = CrrConnection::open_with(
            db,
            Options {
                read_only: true,
                ..Options::default()
            },
        )
        .unwrap();
        let schema = policy_schema(&db);
        let set = PolicySet::parse("policy.sql", policy_sql, &schema)
            .unwrap_or_else(|d| panic!("the policy parses: {d:?}"));
        Truth {
            db,
            engine: Engine::new(set),
            schema,
        }
    }

    pub fn pk_of(&self, table: &str) -> Vec<usize> {
        self.schema.table(table).unwrap().pk.clone()
    }

    /// The table and rows `query` gives `who`: the policy and the query
    /// evaluated on the server database.
    pub fn visible(&self, who: &Identity, query: &str) -> (String, Rows) {
        let q = self
            .engine
            .rewrite(who, query)
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        let sql = format!("SELECT * FROM \"{}\" WHERE {}", q.table, q.where_sql);
        let rows = rows_of(self.db.conn(), &sql, &q.params, &self.pk_of(&q.table));
        (q.table, rows)
    }

    /// Every row of a table.
    pub fn all(&self, table: &str) -> Rows {
        rows_of(
            self.db.conn(),
            &format!("SELECT * FROM \"{table}\""),
            &[],
            &self.pk_of(table),
        )
    }

    /// The CRRs and their key columns.
    pub fn crrs(&self) -> Vec<(String, Vec<usize>)> {
        self.schema
            .tables
            .iter()
            .filter(|t| t.is_crr)
            .map(|t| (t.name.clone(), t.pk.clone()))
            .collect()
    }

    /// Where a replica differs from what its subscriptions and policy allow
    /// (None: it is exactly that): per subscription the held keys, per
    /// table the rows (values) of the union of its subscriptions.
    pub fn diff(&self, who: &Identity, replica: &ReplicaState) -> Option<String> {
        let mut want: BTreeMap<String, Rows> = BTreeMap::new();
        let mut out = Vec::new();
        for (id, query, held) in &replica.subs {
            let (table, rows) = self.visible(who, query);
            let keys: BTreeSet<PackedPk> = rows.keys().cloned().collect();
            if *held != keys {
                out.push(format!(
                    "subscription {id} ({query}): holds {} rows, the oracle {}; extra {:?}, missing {:?}",
                    held.len(),
                    keys.len(),
                    unpack_all(held.difference(&keys)),
                    unpack_all(keys.difference(held)),
                ));
            }
            want.entry(table).or_default().extend(rows);
        }
        let held: BTreeSet<&PackedPk> = replica.subs.iter().flat_map(|s| &s.2).collect();
        for (name, have) in &replica.tables {
            let want = want.remove(name).unwrap_or_default();
            // A row the replica wrote itself that none of its subscriptions
            // holds stays in it (its own data: the client never evicts what
            // no subscription delivered). Allowed only when no clock of it
            // came from elsewhere.
            let have: Rows = have
                .iter()
                .filter(|(k, _)| {
                    want.contains_key(*k)
                        || held.contains(k)
                        || replica.foreign.contains(&(name.clone(), (*k).clone()))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let have = &have;
            if *have != want {
                let wrong: Vec<_> = have
                    .iter()
                    .filter(|(k, v)| want.get(*k) != Some(*v))
                    .map(|(_, v)| v.clone())
                    .take(5)
                    .collect();
                let missing: Vec<_> = want
                    .iter()
                    .filter(|(k, _)| !have.contains_key(*k))
                    .map(|(_, v)| v.clone())
                    .take(5)
                    .collect();
                out.push(format!(
                    "table {name}: {} rows, the oracle {}; wrong or extra {wrong:?}, missing {missing:?}",
                    have.len(),
                    want.len()
                ));
            }
        }
        (!out.is_empty()).then(|| out.join("\n"))
    }
}

/// What a replica holds: its subscriptions (id, query, held keys) and the
/// rows of every CRR.
#[derive(Debug, Default)]
pub struct ReplicaState {
    pub subs: Vec<(String, String, BTreeSet<PackedPk>)>,
    pub tables: BTreeMap<String, Rows>,
    /// Rows with a clock another site authored (they came from the server).
    pub foreign: BTreeSet<(String, PackedPk)>,
}

impl ReplicaState {
    pub fn read(replica: &Replica, crrs: &[(String, Vec<usize>)]) -> ReplicaState {
        let mut st = ReplicaState::default();
        for s in replica.subscriptions().unwrap() {
            let held = replica
                .held(&s.id)
                .unwrap()
                .into_iter()
                .map(|k| k.pk.canonical().unwrap())
                .collect();
            st.subs.push((s.id.clone(), s.query.clone(), held));
        }
        for (name, pk) in crrs {
            let rows = rows_of(
                replica.conn().conn(),
                &format!("SELECT * FROM \"{name}\""),
                &[],
                pk,
            );
            st.tables.insert(name.clone(), rows);
        }
        let changes = replica
            .conn()
            .changes(&tenantsync_core::ChangesQuery {
                since: 0,
                site: tenantsync_core::SiteFilter::Exclude(replica.site_id()),
                ..Default::default()
            })
            .unwrap();
        for c in changes {
            st.foreign.insert((c.table, c.pk.canonical().unwrap()));
        }
        st
    }

    /// The state of a live client's replica.
    pub async fn of(c: &SyncClient, crrs: &[(String, Vec<usize>)]) -> ReplicaState {
        let crrs = crrs.to_vec();
        c.read(move |r| Ok(ReplicaState::read(r, &crrs)))
            .await
            .unwrap()
    }
}

fn unpack_all<'a>(pks: impl Iterator<Item = &'a PackedPk>) -> Vec<Vec<Value>> {
    pks.take(5).map(|p| p.unpack().unwrap()).collect()
}

/// The policy engine's view of the server database's tables (the
/// client's verifier builds it; one conversion for every oracle).
pub fn policy_schema(db: &CrrConnection) -> Schema {
    tenantsync_client::verify::policy_schema(db).unwrap()
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
        let truth = Truth::open(db, policy_sql);
        let crrs = truth.crrs();
        let mut diffs = Vec::new();
        for (c, who, name) in clients {
            let st = ReplicaState::of(c, &crrs).await;
            if let Some(d) = truth.diff(who, &st) {
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
            panic!("replicas differ from the oracle:\n{}", diffs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
