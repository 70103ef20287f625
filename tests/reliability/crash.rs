//! Crash and restart: `tenantsync serve` on one database, SIGKILLed at
//! random moments (right after a big push, right after a subscription to a
//! big table, or at a random time) while WebSocket clients push and
//! subscribe continuously and the backend writes through service SQL, then
//! restarted on the same database and port (synchronous NORMAL and FULL in
//! turn). After each kill, on the dead server's database: every push the
//! server acknowledged (`push_ok`) and every service write it answered is
//! there, and each peer's `pushed_version` covers what it was told. After
//! the last restart: every replica converges to exactly what its policy and
//! subscriptions allow (the oracle on the server database), every write is
//! on the server, no push was refused.
//!
//! `TENANTSYNC_CRASH_KILLS` (default 21) sets the number of kills,
//! `TENANTSYNC_CRASH_SEED` the seed (default: from the clock, printed).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tenantsync_client::{Event, Replica, SyncClient};
use tenantsync_core::SiteId;
use tenantsync_policy::Identity;
use tenantsync_types::Value;

use crate::common::*;

/// A peer: (name, sub, tenant, subscriptions (id, query)).
type PeerSpec = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// One acknowledged-or-not write of a row's title.
#[derive(Clone, Debug)]
struct Write {
    id: i64,
    title: String,
    /// The replica's db_version that committed it (0: a service write).
    version: i64,
    /// For service writes: the server answered 200.
    answered: bool,
}

/// Who writes, what it wrote, and how far the server acknowledged it.
struct Writer {
    name: String,
    who: Identity,
    site: Option<SiteId>,
    log: Arc<Mutex<Vec<Write>>>,
    /// The highest `to` of a `push_ok` (client writers).
    acked_to: Arc<AtomicI64>,
}

impl Writer {
    fn acked(&self, w: &Write) -> bool {
        match self.site {
            Some(_) => w.version <= self.acked_to.load(Ordering::SeqCst),
            None => w.answered,
        }
    }
}

/// The writer's writes must be on the server: for each row, the server's
/// title is the last acknowledged write's or a later one's. Returns how many
/// acknowledged writes were checked.
fn check_acked(
    writer: &Writer,
    titles: &BTreeMap<i64, String>,
    pushed: &BTreeMap<Vec<u8>, i64>,
    at: &str,
) -> usize {
    let log = writer.log.lock().unwrap().clone();
    if let Some(site) = writer.site {
        let acked_to = writer.acked_to.load(Ordering::SeqCst);
        let pv = pushed.get(&site.0.to_vec()).copied().unwrap_or(0);
        assert!(
            pv >= acked_to,
            "{at}: {}: the server was told up to {acked_to} and its pushed_version is {pv}",
            writer.name
        );
    }
    let mut by_row: BTreeMap<i64, Vec<&Write>> = BTreeMap::new();
    for w in &log {
        by_row.entry(w.id).or_default().push(w);
    }
    let mut checked = 0;
    for (id, writes) in by_row {
        let Some(k) = writes.iter().rposition(|w| writer.acked(w)) else {
            continue;
        };
        checked += k + 1;
        let have = titles.get(&id);
        assert!(
            writes[k..].iter().any(|w| Some(&w.title) == have),
            "{at}: {}: row {id} was acknowledged as {:?} and the server has {have:?} (later writes {:?})",
            writer.name,
            writes[k].title,
            writes[k + 1..].iter().map(|w| &w.title).collect::<Vec<_>>()
        );
    }
    checked
}

/// Reads the dead server's database (a plain SQLite connection: WAL
/// recovery needs one that may write the -shm).
fn dead_db(db: &Path) -> (BTreeMap<i64, String>, BTreeMap<Vec<u8>, i64>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let titles = conn
        .prepare("SELECT id, title FROM todos")
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, Option<String>>(1)?.unwrap_or_default(),
            ))
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let pushed = conn
        .prepare("SELECT site_id, pushed_version FROM tenantsync_peers")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    (titles, pushed)
}

/// A client's writer task: inserts and updates of its own rows, every
/// 10-60 ms, until `stop`.
fn spawn_writes(
    c: Arc<SyncClient>,
    log: Arc<Mutex<Vec<Write>>>,
    base: i64,
    (owner, tenant): (String, String),
    seed: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut n = 0i64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let existing = log.lock().unwrap().len() as i64;
            let (id, sql) = if existing == 0 || rng.random_bool(0.5) {
                let id = base + n;
                (
                    id,
                    format!(
                        "INSERT INTO todos (id, tenant_id, owner, title, done) VALUES ({id}, '{tenant}', '{owner}', 'w{id}-{n}', 0)"
                    ),
                )
            } else {
                let id = base + rng.random_range(1..=n);
                let done = rng.random_range(0..2);
                (
                    id,
                    format!("UPDATE todos SET title = 'w{id}-{n}', done = {done} WHERE id = {id}"),
                )
            };
            let title = format!("w{id}-{n}");
            let r = c
                .write(move |conn| {
                    let changed = conn.execute(&sql, [])?;
                    let v: i64 = conn.query_row("SELECT crsql_db_version()", [], |r| r.get(0))?;
                    Ok((changed, v))
                })
                .await
                .unwrap();
            if r.0 == 1 {
                log.lock().unwrap().push(Write {
                    id,
                    title,
                    version: r.1,
                    answered: false,
                });
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
        }
    })
}

/// One transaction of `n` inserts (a big push).
async fn big_write(
    c: &SyncClient,
    log: &Mutex<Vec<Write>>,
    base: i64,
    n: i64,
    (owner, tenant): (&str, &str),
) {
    let sql = format!(
        "INSERT INTO todos (id, tenant_id, owner, title) \
         WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < {n}) \
         SELECT {base} + i, '{tenant}', '{owner}', 'big' || ({base} + i) || '{pad}' FROM k",
        pad = "x".repeat(200)
    );
    let v = c
        .write(move |conn| {
            conn.execute(&sql, [])?;
            conn.query_row("SELECT crsql_db_version()", [], |r| r.get::<_, i64>(0))
        })
        .await
        .unwrap();
    let pad = "x".repeat(200);
    let mut log = log.lock().unwrap();
    for i in 0..n {
        log.push(Write {
            id: base + i,
            title: format!("big{}{pad}", base + i),
            version: v,
            answered: false,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_and_replicas_converge_after_restarts() {
    let kills = env_or("TENANTSYNC_CRASH_KILLS", 21) as usize;
    let seed = env_or(
        "TENANTSYNC_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    eprintln!("crash: {kills} kills, TENANTSYNC_CRASH_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let policy_sql = std::fs::read_to_string(examples("policy.sql")).unwrap();
    let mut spec = ServeSpec {
        db: dir.path().join("server.db"),
        schema: examples("schema.sql"),
        policy: examples("policy.sql"),
        synchronous: "normal",
    };
    let mut serve = Serve::start(&spec, 0);
    let port = serve.port;
    let url = serve.url();
    let http = reqwest::Client::new();

    // The big table: 3000 todos of erin's (a ~3 MB snapshot).
    service_sql(
        &http,
        &url,
        &format!(
            "INSERT INTO todos (id, tenant_id, owner, title) \
             WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 3000) \
             SELECT i, 'acme', 'erin', 'seed' || i || '{}' FROM k",
            "s".repeat(100)
        ),
    )
    .await
    .unwrap();

    // Writers: four peers (alice with two devices) and the backend.
    let peers: &[PeerSpec] = &[
        (
            "alice-laptop",
            "alice",
            "acme",
            &[
                ("all", "SELECT * FROM todos"),
                ("lists", "SELECT * FROM lists"),
            ],
        ),
        (
            "alice-phone",
            "alice",
            "acme",
            &[("open", "SELECT * FROM todos WHERE done = 0")],
        ),
        ("bob", "bob", "acme", &[("all", "SELECT * FROM todos")]),
        (
            "carol",
            "carol",
            "globex",
            &[
                ("all", "SELECT * FROM todos"),
                ("mine", "SELECT * FROM todos WHERE owner = 'carol'"),
            ],
        ),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers: Vec<Writer> = Vec::new();
    let mut tasks = Vec::new();
    let mut clients: Vec<Arc<SyncClient>> = Vec::new();
    for (k, (name, sub, tenant, subs)) in peers.iter().enumerate() {
        let cl = claims(sub, tenant);
        let replica = Replica::open_in_memory().unwrap();
        let site = replica.site_id();
        let c = Arc::new(client(&url, &cl, replica));
        for (id, q) in *subs {
            c.subscribe(id, q).await.unwrap();
        }
        live(&c).await;
        let w = Writer {
            name: name.to_string(),
            who: Identity::new(cl),
            site: Some(site),
            log: Arc::new(Mutex::new(Vec::new())),
            acked_to: Arc::new(AtomicI64::new(0)),
        };
        let mut events = c.events();
        let acked = w.acked_to.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(Event::Pushed { to, .. }) => {
                        acked.fetch_max(to, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        clients.push(c.clone());
        tasks.push(spawn_writes(
            c,
            w.log.clone(),
            (k as i64 + 1) * 100_000,
            (sub.to_string(), tenant.to_string()),
            rng.random(),
            stop.clone(),
        ));
        writers.push(w);
    }
    // The backend: updates of erin's rows through service SQL.
    let backend = Writer {
        name: "service SQL".into(),
        who: Identity::new(claims("backend", "ops")),
        site: None,
        log: Arc::new(Mutex::new(Vec::new())),
        acked_to: Arc::new(AtomicI64::new(0)),
    };
    let service_task = {
        let (log, stop, http, url) = (backend.log.clone(), stop.clone(), http.clone(), url.clone());
        let mut rng = StdRng::seed_from_u64(rng.random());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let id = rng.random_range(1..=3000);
                let title = format!("svc{id}-{n}");
                let i = {
                    let mut log = log.lock().unwrap();
                    log.push(Write {
                        id,
                        title: title.clone(),
                        version: 0,
                        answered: false,
                    });
                    log.len() - 1
                };
                let sql = format!("UPDATE todos SET title = '{title}' WHERE id = {id}");
                if service_sql(&http, &url, &sql).await.is_ok() {
                    log.lock().unwrap()[i].answered = true;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(20..80))).await;
            }
        })
    };
    // erin subscribes to big parts of her table, again and again.
    let erin_claims = claims("erin", "acme");
    let erin = client(&url, &erin_claims, Replica::open_in_memory().unwrap());
    erin.subscribe("big0", "SELECT * FROM todos").await.unwrap();

    let (mut mid_push, mut mid_snapshot, mut checked) = (0, 0, 0);
    let mut big_base = 900_000;
    let mut last_big = "big0".to_string();
    for k in 0..kills {
        // Let the clients get back to work (some reconnect, some not yet).
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..600))).await;
        match k % 3 {
            0 => {
                // Mid-push: a 150-row transaction, then the kill within 40 ms.
                let w = rng.random_range(0..writers.len());
                let (_, sub, tenant, _) = peers[w];
                big_write(&clients[w], &writers[w].log, big_base, 150, (sub, tenant)).await;
                big_base += 1000;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
                mid_push += 1;
            }
            1 => {
                // Mid-snapshot: a new subscription to most of erin's 3000 rows.
                let id = format!("big{k}");
                erin.unsubscribe(&last_big).await.unwrap();
                erin.subscribe(
                    &id,
                    &format!(
                        "SELECT * FROM todos WHERE id > {}",
                        rng.random_range(0..500)
                    ),
                )
                .await
                .unwrap();
                last_big = id;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
                mid_snapshot += 1;
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await,
        }
        serve.kill9();
        let (titles, pushed) = dead_db(&spec.db);
        for w in writers.iter().chain([&backend]) {
            checked += check_acked(w, &titles, &pushed, &format!("after kill {}", k + 1));
        }
        spec.synchronous = if k % 2 == 0 { "full" } else { "normal" };
        serve = Serve::start(&spec, port);
    }
    eprintln!(
        "crash: {kills} kills survived ({mid_push} right after a big push, {mid_snapshot} right after a big subscribe); {checked} acknowledged writes checked on the dead database"
    );

    // Quiescence: stop writing, let everything settle, compare with the oracle.
    stop.store(true, Ordering::SeqCst);
    service_task.await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let mut view: Vec<(&SyncClient, &Identity, &str)> = writers
        .iter()
        .zip(&clients)
        .map(|(w, c)| (&**c, &w.who, w.name.as_str()))
        .collect();
    let erin_id = Identity::new(erin_claims);
    view.push((&erin, &erin_id, "erin"));
    converge(&view, &spec.db, &policy_sql, Duration::from_secs(60)).await;

    // Every write is on the server now, each row with its last title.
    let titles: BTreeMap<i64, String> = server_rows(&spec.db, "todos")
        .iter()
        .map(|r| match (&r[0], &r[4]) {
            (Value::Integer(id), Value::Text(t)) => (*id, t.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    for (k, w) in writers.iter().chain([&backend]).enumerate() {
        let log = w.log.lock().unwrap().clone();
        let mut last: BTreeMap<i64, &str> = BTreeMap::new();
        for x in &log {
            last.insert(x.id, &x.title);
        }
        if w.site.is_none() {
            // An unanswered service write may or may not have committed.
            continue;
        }
        for (id, t) in last {
            assert_eq!(
                titles.get(&id).map(String::as_str),
                Some(t),
                "{}: row {id}",
                w.name
            );
        }
        let st = clients[k].status();
        assert_eq!(st.pushes_refused, 0, "{}: {st:?}", w.name);
        assert_eq!(st.quarantined, 0, "{}: {st:?}", w.name);
    }
    drop(view);
    for c in clients {
        Arc::into_inner(c)
            .expect("no other owner")
            .close()
            .await
            .unwrap();
    }
    erin.close().await.unwrap();
    serve.stop();
}
