//! tenantsync-loadtest: the tenant-isolation load harness behind `tenantsync bench`
//! (docs/BENCH.md): a real server (a `tenantsync serve` child process on a
//! temp database, or external servers), seeded tenants, thousands of load
//! clients over real WebSockets, the phases (snapshot, steady, noisy
//! neighbour, reconnect storm), and the isolation check at quiescence.
//!
//! Module map:
//! - [`tenant`]: the data model (tenants, users, devices, lists, todos),
//!   the subscriptions, tokens, and the latency tag written in titles.
//! - [`client`]: one load client (WebSocket session, held-row tracking
//!   from protocol messages, pushes, acks, drop and resume).
//! - [`stats`]: the shared counters and latency samples.
//! - [`server`]: the child server, /proc sampling, the fd limit.
//! - [`verify`]: the isolation check against the server database.
//! - [`report`]: [`Report`] (the JSON contract), table, report dir.

pub mod client;
pub mod report;
pub mod server;
pub mod stats;
pub mod tenant;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use tenantsync_core::SiteId;
use tenantsync_protocol::http::{SqlRequest, SqlStatement};
use tenantsync_types::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};

pub use report::Report;
use report::{
    LoadPhase, Memory, Modes, NoisyPhase, NoisyTenant, Phases, ReconnectPhase, ReloadPhase,
    SchemaPhase, SnapshotPhase,
};
use server::{ChildOptions, ChildServer, ProcSample};
use stats::{Phase, Stats};
use tenant::{SUBSCRIPTIONS, Shape, Tokens};

/// A run's configuration (the command's flags).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Tenants.
    pub tenants: usize,
    /// Load clients (WebSocket connections) per tenant.
    pub clients_per_tenant: usize,
    /// Devices per user (clients of one user share its views).
    pub devices_per_user: usize,
    /// Clients per tenant that push (the others only read).
    pub writers_per_tenant: usize,
    /// Writes per second across all tenants (half pushes, half service SQL).
    pub rate: f64,
    /// Seconds of each loaded phase (steady, noisy, reconnect).
    pub duration_secs: f64,
    /// The noisy tenant's rate; None: as fast as the server takes it.
    pub noisy_tenant_rate: Option<f64>,
    /// Share of clients dropped in the reconnect storm.
    pub reconnect_share: f64,
    /// Seeded todos per tenant.
    pub todos_per_tenant: usize,
    /// External servers (none: start a child).
    pub servers: Vec<String>,
    /// Start a local cluster of this many nodes (`tenantsync cluster up`)
    /// instead of one server; clients are spread over the nodes.
    pub cluster: Option<usize>,
    /// The external server's database (for the isolation check).
    pub server_db: Option<PathBuf>,
    /// The HS256 secret tokens are signed with.
    #[serde(skip)]
    pub jwt_secret: String,
    /// `--synchronous` of the child server.
    pub synchronous: String,
    /// `--readers` of the child server.
    pub readers: usize,
    /// `--shards` of the child server.
    pub shards: usize,
    /// Connections opened at once.
    pub connect_concurrency: usize,
    /// Service writes in flight at most.
    pub service_concurrency: usize,
    /// The binary to run `serve` with.
    #[serde(skip)]
    pub exe: Option<PathBuf>,
    /// Show progress bars.
    #[serde(skip)]
    pub progress: bool,
    /// Random seed.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tenants: 100,
            clients_per_tenant: 10,
            devices_per_user: 2,
            writers_per_tenant: 2,
            rate: 1000.0,
            duration_secs: 10.0,
            noisy_tenant_rate: None,
            reconnect_share: 0.2,
            todos_per_tenant: 40,
            servers: Vec::new(),
            cluster: None,
            server_db: None,
            jwt_secret: "tenantsync-bench-secret-0123456789".into(),
            synchronous: "full".into(),
            readers: 2,
            shards: 1,
            connect_concurrency: 128,
            service_concurrency: 64,
            exe: None,
            progress: true,
            seed: 1,
        }
    }
}

/// One client as the driver sees it.
struct Handle {
    tenant: usize,
    user: usize,
    index: usize,
    tx: mpsc::Sender<client::Command>,
}

/// Shared by the drivers.
struct Ctx {
    cfg: Config,
    stats: Arc<Stats>,
    clients: Vec<Handle>,
    /// `clients` index of client 0 of each tenant.
    first: Vec<usize>,
    http: reqwest::Client,
    base: String,
    service_tokens: Vec<String>,
    service: Arc<Semaphore>,
}

/// Runs the bench.
pub async fn run(cfg: Config) -> anyhow::Result<Report> {
    if cfg.tenants == 0 || cfg.clients_per_tenant == 0 {
        bail!("--tenants and --clients-per-tenant must be at least 1");
    }
    let nofile = server::raise_nofile();
    let conns = cfg.tenants * cfg.clients_per_tenant;
    if cfg.servers.is_empty() && (conns as u64) + 256 > nofile {
        bail!(
            "{conns} connections need more open files than the limit allows ({nofile}): lower --tenants or --clients-per-tenant"
        );
    }
    let mp = MultiProgress::with_draw_target(if cfg.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let note = |m: &str| {
        let _ = mp.println(m);
    };

    // The server.
    let exe = match &cfg.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().context("cannot find the tenantsync binary")?,
    };
    let cluster = match cfg.cluster {
        Some(n) if cfg.servers.is_empty() => {
            let shards = if cfg.shards > 1 {
                cfg.shards
            } else {
                2 * n.max(1)
            };
            Some(server::ClusterChild::start(
                &exe,
                &cfg.jwt_secret,
                n.max(1),
                shards,
            )?)
        }
        Some(_) => bail!("--cluster starts its own nodes: not with --server"),
        None => None,
    };
    let child = if cfg.servers.is_empty() && cluster.is_none() {
        Some(ChildServer::start(&ChildOptions {
            exe,
            secret: cfg.jwt_secret.clone(),
            synchronous: cfg.synchronous.clone(),
            readers: cfg.readers,
            extra: vec!["--shards".into(), cfg.shards.to_string()],
        })?)
    } else {
        None
    };
    let bases: Vec<String> = match (&child, &cluster) {
        (Some(c), _) => vec![c.url.clone()],
        (None, Some(c)) => c.nodes.iter().map(|n| n.url.clone()).collect(),
        (None, None) => cfg.servers.clone(),
    };
    let pid = child.as_ref().map(ChildServer::pid);
    note(&format!("server: {} (pid {pid:?})", bases.join(", ")));

    let stats = Arc::new(Stats::default());
    let tokens = Tokens::new(&cfg.jwt_secret);
    let shape = Shape::new(
        cfg.clients_per_tenant,
        cfg.devices_per_user,
        cfg.todos_per_tenant,
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.service_concurrency.max(16))
        .timeout(Duration::from_secs(60))
        .build()?;
    let service_tokens: Vec<String> = (0..cfg.tenants).map(|t| tokens.service(Some(t))).collect();

    // Seed every tenant through the service endpoint.
    let seed_bar = mp.add(bar(cfg.tenants as u64, "seeding tenants"));
    {
        let sem = Arc::new(Semaphore::new(8));
        let mut tasks = tokio::task::JoinSet::new();
        for (t, tok) in service_tokens.iter().enumerate() {
            let permit = sem.clone().acquire_owned().await?;
            let req = SqlRequest {
                statements: tenant::seed_statements(t, &shape),
                tenant: None,
            };
            let (http, url, tok, b) = (
                http.clone(),
                format!("{}/v1/sql", bases[0]),
                tok.clone(),
                seed_bar.clone(),
            );
            tasks.spawn(async move {
                let _p = permit;
                let r = http.post(url).bearer_auth(tok).json(&req).send().await?;
                let status = r.status();
                if !status.is_success() {
                    bail!(
                        "seeding tenant {t}: {status}: {}",
                        r.text().await.unwrap_or_default()
                    );
                }
                b.inc(1);
                Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
    }
    seed_bar.finish_and_clear();
    let before = sample_settled(pid).await;

    // Snapshot: every client connects, subscribes, syncs.
    stats.set_phase(Phase::Snapshot);
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut clients = Vec::with_capacity(conns);
    let mut first = Vec::with_capacity(cfg.tenants);
    let mut ready = Vec::with_capacity(conns);
    let sampling = Arc::new(AtomicBool::new(true));
    let samples = tokio::spawn(memory_sampler(pid, stats.clone(), sampling.clone()));
    let t0 = Instant::now();
    let cpu0 = sample(pid);
    let conn_bar = mp.add(bar(conns as u64, "clients live"));
    let gate = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
    for t in 0..cfg.tenants {
        first.push(clients.len());
        for i in 0..cfg.clients_per_tenant {
            let user = i / shape.devices;
            let mut site = [0u8; 16];
            rng.fill(&mut site);
            let who = client::Who {
                tenant: t,
                user,
                index: i,
                site: SiteId(site),
                token: tokens.user(t, user),
                url: tenantsync_client::ws::sync_url(&bases[clients.len() % bases.len()]),
            };
            let (tx, rx) = mpsc::channel(1024);
            let (rtx, rrx) = oneshot::channel();
            let permit = gate.clone().acquire_owned().await?;
            let b = conn_bar.clone();
            tokio::spawn(client::run(who, stats.clone(), rx, rtx));
            ready.push(tokio::spawn(async move {
                let r = rrx.await.unwrap_or(Err("client ended".into()));
                drop(permit);
                b.inc(1);
                r
            }));
            clients.push(Handle {
                tenant: t,
                user,
                index: i,
                tx,
            });
        }
    }
    let mut connect_failures = Vec::new();
    for r in ready {
        if let Err(e) = r.await? {
            connect_failures.push(e);
        }
    }
    let snap_secs = t0.elapsed().as_secs_f64();
    conn_bar.finish_and_clear();
    let cpu1 = sample(pid);
    sampling.store(false, Ordering::Relaxed);
    let mut mem_samples = samples.await?;
    let after = sample_settled(pid).await;
    mem_samples.push((
        stats.syncs_done.load(Ordering::Relaxed),
        mb(after.map(|s| s.rss)),
    ));
    let metrics = server_metrics(&http, &bases[0], &tokens.service(None)).await;
    if !connect_failures.is_empty() {
        note(&format!(
            "{} clients could not connect; first: {}",
            connect_failures.len(),
            connect_failures[0]
        ));
    }
    let snapshot = SnapshotPhase {
        seconds: snap_secs,
        rows: stats.phases[Phase::Snapshot as usize]
            .sync_rows
            .load(Ordering::Relaxed),
        connections: conns - connect_failures.len(),
        subscriptions: stats.syncs_done.load(Ordering::Relaxed),
        connect_errors: connect_failures.len() as u64,
        server_cpu_cores: cores(cpu0, cpu1, snap_secs),
    };
    note(&format!(
        "snapshot: {} subscriptions live in {:.2} s ({} rows)",
        snapshot.subscriptions, snapshot.seconds, snapshot.rows
    ));

    let ctx = Arc::new(Ctx {
        stats: stats.clone(),
        clients,
        first,
        http: http.clone(),
        base: bases[0].clone(),
        service_tokens,
        service: Arc::new(Semaphore::new(cfg.service_concurrency.max(1))),
        cfg: cfg.clone(),
    });
    let dur = Duration::from_secs_f64(cfg.duration_secs);
    let noisy_t = 0usize;

    // Steady (and, in a cluster, each node's CPU during it).
    let node_cpu0: Vec<Option<f64>> = cluster
        .iter()
        .flat_map(|c| &c.nodes)
        .map(|n| server::sample(Some(n.pid)).map(|s| s.cpu))
        .collect();
    let steady = load_phase(&ctx, &mp, Phase::Steady, dur, pid, |_| {}).await;
    let nodes: Vec<serde_json::Value> = cluster
        .iter()
        .flat_map(|c| &c.nodes)
        .zip(node_cpu0)
        .map(|(n, c0)| {
            let cpu = server::sample(Some(n.pid))
                .map(|s| s.cpu)
                .zip(c0)
                .map(|(c1, c0)| c1 - c0);
            let writes = steady.writes_per_s * steady.seconds;
            serde_json::json!({
                "id": n.id,
                "url": n.url,
                "steady_cpu_cores": cpu.map(|c| c / steady.seconds.max(1e-9)),
                "steady_cpu_us_per_write": cpu.filter(|_| writes > 0.0).map(|c| c / writes * 1e6),
            })
        })
        .collect();
    // Noisy neighbour.
    stats.set_noisy_tenant(noisy_t);
    let noisy = load_phase(&ctx, &mp, Phase::Noisy, dur, pid, |ctx| {
        start_noisy(ctx, noisy_t);
    })
    .await;
    stop_noisy(&ctx, noisy_t).await;
    let (nq, nn, _) = stats.latency(Phase::Noisy);
    let noisy_acc = stats.phases[Phase::Noisy as usize]
        .noisy_accepted
        .load(Ordering::Relaxed);
    // Reconnect storm.
    let modes0 = modes(&stats);
    let rows0 = stats.phases[Phase::Reconnect as usize]
        .sync_rows
        .load(Ordering::Relaxed);
    let dropped = ((ctx.clients.len() as f64) * cfg.reconnect_share).round() as usize;
    let reconnect = load_phase(&ctx, &mp, Phase::Reconnect, dur, pid, |ctx| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(ctx.cfg.seed + 7);
        let mut idx: Vec<usize> = (0..ctx.clients.len()).collect();
        for i in 0..dropped.min(idx.len()) {
            let j = rng.random_range(i..idx.len());
            idx.swap(i, j);
            let _ = ctx.clients[idx[i]].tx.try_send(client::Command::Reconnect);
        }
    })
    .await;
    let modes1 = modes(&stats);
    // A policy reload halfway through a steady phase.
    let posted: std::sync::Mutex<Option<tokio::task::JoinHandle<(f64, serde_json::Value)>>> =
        std::sync::Mutex::default();
    let reload = load_phase(&ctx, &mp, Phase::Reload, dur, pid, |ctx| {
        let (ctx, token) = (ctx.clone(), tokens.service(None));
        *posted.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::spawn(async move {
            tokio::time::sleep(dur / 2).await;
            post_reload(&ctx, &token).await
        }));
    })
    .await;
    // A reload slower than the rest of the phase is waited for (and
    // reported as it took).
    let handle = posted.lock().unwrap_or_else(|e| e.into_inner()).take();
    let (reload_ms, reload_answer) = match handle {
        Some(h) => match tokio::time::timeout(Duration::from_secs(120), h).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => (0.0, serde_json::json!({ "error": e.to_string() })),
            Err(_) => (0.0, serde_json::json!({ "error": "no answer in 120 s" })),
        },
        None => (0.0, serde_json::Value::Null),
    };

    // Settle: writes stopped, wait for quiescence.
    stats.set_phase(Phase::Settle);
    let spin = mp.add(ProgressBar::new_spinner().with_message("waiting for quiescence"));
    spin.enable_steady_tick(Duration::from_millis(200));
    let quiet = settle(&ctx).await;
    spin.finish_and_clear();
    if !quiet {
        note(
            "warning: the run did not reach quiescence in 60 s; the isolation check may count misses",
        );
    }

    // A schema change with every client connected and the writes stopped:
    // how long its `schema` message takes to reach every connection. Not
    // on an external server: its schema is not the bench's to change.
    let schema = if ctx.cfg.servers.is_empty() && ctx.cfg.cluster.is_none() {
        schema_change(&ctx, &tokens.service(None)).await
    } else {
        SchemaPhase {
            answer: serde_json::json!({ "skipped": if ctx.cfg.cluster.is_some() {
                "a cluster refuses schema changes (docs/CLUSTER.md, \"Not yet\")"
            } else {
                "an external server's schema is not changed"
            } }),
            ..SchemaPhase::default()
        }
    };

    if let Some(c) = &cluster
        && !copies_current(&http, &c.nodes, &tokens.service(None)).await
    {
        note(
            "warning: the first node's copies did not catch up with the shards' owners in 30 s; the isolation check may count stale rows",
        );
    }
    // What each shard holds, and where (the isolation check reads them).
    let shards = shard_status(&http, &bases[0], &tokens.service(None)).await;
    // Isolation.
    let spin = mp.add(ProgressBar::new_spinner().with_message("isolation check"));
    spin.enable_steady_tick(Duration::from_millis(200));
    let dbs: Vec<PathBuf> = match (&child, &cfg.server_db) {
        (None, _) if cluster.is_some() => {
            cluster.as_ref().map(|c| c.dbs.clone()).unwrap_or_default()
        }
        (Some(_), _) => shards
            .iter()
            .filter_map(|s| s["db"].as_str().map(PathBuf::from))
            .collect(),
        (None, Some(db)) => vec![db.clone()],
        (None, None) => Vec::new(),
    };
    let mut isolation = isolation(&ctx, dbs).await?;
    isolation.quiescent = quiet;
    spin.finish_and_clear();

    // Stop.
    for c in &ctx.clients {
        let _ = c.tx.send(client::Command::Stop).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let peak = mem_samples.iter().map(|s| s.1).fold(0.0, f64::max).max(
        [
            steady.server_rss_mb,
            noisy.server_rss_mb,
            reconnect.server_rss_mb,
        ]
        .into_iter()
        .flatten()
        .fold(0.0, f64::max),
    );
    if let Some(c) = child {
        c.stop()?;
    }

    let subs = metrics.get("tenantsync_subscriptions").copied();
    let views = metrics.get("tenantsync_views").copied();
    let connections = metrics.get("tenantsync_connections").copied();
    let grown = match (before, after) {
        (Some(b), Some(a)) => Some(a.rss as f64 - b.rss as f64),
        _ => None,
    };
    let per = |n: Option<f64>| match (grown, n) {
        (Some(g), Some(n)) if n > 0.0 => Some(g / n),
        _ => None,
    };
    let quiet_ratio = (steady.quiet_tenants_latency_ms.p99 > 0.0)
        .then(|| nq.p99 / steady.quiet_tenants_latency_ms.p99);
    let errors = stats
        .error_samples
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(Report {
        config: serde_json::to_value(&cfg)?,
        phases: Phases {
            snapshot,
            steady,
            noisy: NoisyPhase {
                quiet_p99_ratio: quiet_ratio,
                noisy_tenant: NoisyTenant {
                    tenant: noisy_t,
                    writes_per_s: noisy_acc as f64 / noisy.seconds.max(1e-9),
                    latency_ms: nn,
                },
                load: noisy,
            },
            reconnect: ReconnectPhase {
                clients: dropped,
                resume_ms: stats.resume_times(),
                modes: Modes {
                    snapshot: modes1.snapshot - modes0.snapshot,
                    resume: modes1.resume - modes0.resume,
                    refetch: modes1.refetch - modes0.refetch,
                },
                rows_resent: stats.phases[Phase::Reconnect as usize]
                    .sync_rows
                    .load(Ordering::Relaxed)
                    - rows0,
                load: reconnect,
            },
            reload: ReloadPhase {
                load: reload,
                reload_ms,
                answer: reload_answer,
            },
            schema,
        },
        memory: Memory {
            rss_mb: after.map(|s| mb(Some(s.rss))),
            rss_before_clients_mb: before.map(|s| mb(Some(s.rss))),
            rss_peak_mb: pid.map(|_| peak),
            bytes_per_subscription: per(subs),
            bytes_per_view: per(views),
            bytes_per_connection: per(connections),
            subscriptions: subs,
            views,
            connections,
            samples: mem_samples,
        },
        shards,
        nodes,
        isolation,
        errors,
    })
}

fn bar(n: u64, what: &str) -> ProgressBar {
    ProgressBar::new(n)
        .with_style(
            ProgressStyle::with_template("{msg:>18} [{bar:40}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        )
        .with_message(what.to_owned())
}

fn sample(pid: Option<u32>) -> Option<ProcSample> {
    pid.and_then(|p| server::sample(Some(p)))
}

/// RSS after a moment's rest (allocator and queues settle).
async fn sample_settled(pid: Option<u32>) -> Option<ProcSample> {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sample(pid)
}

fn mb(b: Option<u64>) -> f64 {
    b.map_or(0.0, |b| b as f64 / (1024.0 * 1024.0))
}

fn cores(a: Option<ProcSample>, b: Option<ProcSample>, secs: f64) -> Option<f64> {
    Some((b?.cpu - a?.cpu) / secs.max(1e-9))
}

async fn memory_sampler(
    pid: Option<u32>,
    stats: Arc<Stats>,
    on: Arc<AtomicBool>,
) -> Vec<(u64, f64)> {
    let mut out = Vec::new();
    while on.load(Ordering::Relaxed) {
        if let Some(s) = sample(pid) {
            out.push((stats.syncs_done.load(Ordering::Relaxed), mb(Some(s.rss))));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    out
}

/// The server's gauges from `/metrics` (name without labels -> value).
/// The reload of the reload phase: the bench policy plus a SELECT policy
/// on `todos` that grants nothing, so every `todos` view is rewritten.
/// Returns (milliseconds, the answer or the error).
async fn post_reload(ctx: &Ctx, service_token: &str) -> (f64, serde_json::Value) {
    let policy = format!(
        "{}\nCREATE POLICY bench_reload ON todos FOR SELECT TO authenticated USING (false);\n",
        server::POLICY_SQL
    );
    let started = Instant::now();
    let r = ctx
        .http
        .post(format!("{}/v1/admin/policy", ctx.base))
        .bearer_auth(service_token)
        .json(&tenantsync_protocol::http::PolicyReloadRequest { policy_sql: policy })
        .send()
        .await;
    let answer = match r {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    (started.elapsed().as_secs_f64() * 1000.0, answer)
}

/// The schema change of the settle phase (`ALTER TABLE todos ADD COLUMN
/// bench_note TEXT`, `POST /v1/admin/schema`): its answer, and the delay
/// until each connection received the `schema` message (waiting up to 30
/// s for all of them).
async fn schema_change(ctx: &Ctx, service_token: &str) -> SchemaPhase {
    let started = Instant::now();
    ctx.stats.schema_posted();
    let r = ctx
        .http
        .post(format!("{}/v1/admin/schema", ctx.base))
        .bearer_auth(service_token)
        .json(&tenantsync_protocol::http::SchemaChangeRequest {
            schema_sql: "ALTER TABLE todos ADD COLUMN bench_note TEXT".into(),
        })
        .send()
        .await;
    let answer_ms = started.elapsed().as_secs_f64() * 1000.0;
    let answer = match r {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let connections = ctx.clients.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctx.stats.schema_count() < connections && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (delivered, delay_ms) = ctx.stats.schema_delays();
    SchemaPhase {
        answer_ms,
        answer,
        connections,
        delivered,
        delay_ms,
    }
}

/// `GET /v1/admin/status`'s shards (empty when it cannot be read).
/// In a cluster, waits (at most 30 s) until the first node's copy of
/// every shard has applied what the shard's owner has appended, so the
/// isolation check reads current copies. Whether it got there.
async fn copies_current(
    http: &reqwest::Client,
    nodes: &[server::ClusterNode],
    service_token: &str,
) -> bool {
    let status = |url: String| async move {
        let r = http
            .get(format!("{url}/v1/admin/cluster"))
            .bearer_auth(service_token)
            .send()
            .await
            .ok()?;
        r.json::<serde_json::Value>().await.ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut views = Vec::new();
        for n in nodes {
            views.push(status(n.url.clone()).await.unwrap_or_default());
        }
        let first = &views[0];
        let current = first["shards"].as_array().is_some_and(|shards| {
            shards.iter().enumerate().all(|(k, s)| {
                let owner = nodes.iter().position(|n| s["owner"] == n.id.as_str());
                owner.is_some_and(|o| {
                    let appended = views[o]["shards"][k]["log_sequence_applied"].as_u64();
                    let here = s["log_sequence_applied"].as_u64();
                    appended.zip(here).is_some_and(|(a, h)| h >= a)
                })
            })
        });
        if current {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn shard_status(
    http: &reqwest::Client,
    base: &str,
    service_token: &str,
) -> Vec<serde_json::Value> {
    let r = http
        .get(format!("{base}/v1/admin/status"))
        .bearer_auth(service_token)
        .send()
        .await;
    let Ok(r) = r else { return Vec::new() };
    r.json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| v["shards"].as_array().cloned())
        .unwrap_or_default()
}

async fn server_metrics(
    http: &reqwest::Client,
    base: &str,
    service_token: &str,
) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    let Ok(r) = http
        .get(format!("{base}/metrics"))
        .bearer_auth(service_token)
        .send()
        .await
    else {
        return out;
    };
    let Ok(text) = r.text().await else { return out };
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let mut it = l.split_whitespace();
        if let (Some(k), Some(v)) = (it.next(), it.next())
            && let Ok(v) = v.parse::<f64>()
        {
            let name = k.split('{').next().unwrap_or(k);
            *out.entry(name.to_owned()).or_insert(0.0) += v;
        }
    }
    out
}

fn modes(stats: &Stats) -> Modes {
    let m = |i: usize| stats.modes[i].load(Ordering::Relaxed);
    Modes {
        snapshot: m(0),
        resume: m(1),
        refetch: m(2),
    }
}

/// Runs one loaded phase: the steady driver for `dur`, with `start` run
/// at its beginning.
async fn load_phase(
    ctx: &Arc<Ctx>,
    mp: &MultiProgress,
    phase: Phase,
    dur: Duration,
    pid: Option<u32>,
    start: impl FnOnce(&Arc<Ctx>),
) -> LoadPhase {
    let stats = &ctx.stats;
    stats.set_phase(phase);
    let cpu0 = sample(pid);
    let me0 = server::sample(None);
    let t0 = Instant::now();
    start(ctx);
    let pb = mp.add(
        ProgressBar::new(dur.as_millis() as u64).with_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:40}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        ),
    );
    pb.set_prefix(format!("{phase:?}").to_lowercase());
    let mut issued = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_msg = Instant::now();
    let c = &stats.phases[phase as usize];
    while t0.elapsed() < dur {
        tick.tick().await;
        let due = (t0.elapsed().as_secs_f64() * ctx.cfg.rate) as u64;
        while issued < due {
            issue(ctx, issued);
            issued += 1;
        }
        if last_msg.elapsed() > Duration::from_millis(500) {
            last_msg = Instant::now();
            let s = t0.elapsed().as_secs_f64();
            pb.set_position(t0.elapsed().as_millis() as u64);
            pb.set_message(format!(
                "{:.0} writes/s, {:.0} deliveries/s",
                c.accepted.load(Ordering::Relaxed) as f64 / s,
                c.deliveries.load(Ordering::Relaxed) as f64 / s
            ));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = sample(pid);
    let me1 = server::sample(None);
    pb.finish_and_clear();
    // Let the phase's last writes arrive before reading its latencies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (quiet, _, all) = stats.latency(phase);
    let l = LoadPhase {
        seconds: secs,
        writes_offered: c.issued.load(Ordering::Relaxed),
        writes_per_s: c.accepted.load(Ordering::Relaxed) as f64 / secs,
        deliveries_per_s: c.deliveries.load(Ordering::Relaxed) as f64 / secs,
        latency_ms: all,
        quiet_tenants_latency_ms: quiet,
        writes_refused: c.refused.load(Ordering::Relaxed),
        rate_limited: c.rate_limited.load(Ordering::Relaxed),
        writes_dropped: c.dropped.load(Ordering::Relaxed),
        gaps: c.gaps.load(Ordering::Relaxed),
        server_cpu_cores: cores(cpu0, cpu1, secs),
        bench_cpu_cores: cores(me0, me1, secs),
        server_rss_mb: cpu1.map(|s| mb(Some(s.rss))),
    };
    let _ = mp.println(format!(
        "{:<10} {:.0} writes/s, {:.0} deliveries/s, p50 {:.1} ms, p99 {:.1} ms",
        format!("{phase:?}").to_lowercase(),
        l.writes_per_s,
        l.deliveries_per_s,
        l.latency_ms.p50,
        l.latency_ms.p99
    ));
    l
}

/// Issues write number `n` of the steady load: tenants in turn; pushes
/// from the tenant's writers and service statements alternate.
fn issue(ctx: &Arc<Ctx>, n: u64) {
    let cfg = &ctx.cfg;
    let tenants = cfg.tenants as u64;
    let t = (n % tenants) as usize;
    let round = n / tenants;
    let stats = &ctx.stats;
    let id = stats.next_write();
    let sent_ns = stats.now_ns();
    stats.now().issued.fetch_add(1, Ordering::Relaxed);
    if round.is_multiple_of(2) {
        let writers = cfg.writers_per_tenant.clamp(1, cfg.clients_per_tenant) as u64;
        let w = ((round / 2) % writers) as usize;
        let h = &ctx.clients[ctx.first[t] + w];
        if h.tx
            .try_send(client::Command::Write { id, sent_ns })
            .is_err()
        {
            stats.now().dropped.fetch_add(1, Ordering::Relaxed);
        }
    } else {
        let Ok(permit) = ctx.service.clone().try_acquire_owned() else {
            stats.now().dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            service_write(&ctx, t, id, sent_ns, round).await;
            drop(permit);
        });
    }
}

/// One service write for tenant `t`: a tagged update of a seeded todo
/// (which may flip `done`, moving it in or out of the `open`
/// subscription), or every eighth one a delete of the tenant's oldest
/// pushed todo.
async fn service_write(ctx: &Ctx, t: usize, id: u64, sent_ns: u64, round: u64) {
    let shape_todos = ctx.cfg.todos_per_tenant.max(1);
    let stmt = if round % 16 == 15 {
        SqlStatement {
            sql: "DELETE FROM todos WHERE id = (SELECT min(id) FROM todos WHERE tenant_id = ?1 AND id >= ?2)".into(),
            params: vec![
                Value::Text(tenant::tenant_name(t)),
                Value::Integer(tenant::PUSHED_ID_BASE),
            ],
        }
    } else {
        let k = (id as usize * 7919) % shape_todos;
        let shape = Shape::new(
            ctx.cfg.clients_per_tenant,
            ctx.cfg.devices_per_user,
            shape_todos,
        );
        SqlStatement {
            sql: "UPDATE todos SET title = ?1, done = ?2 WHERE id = ?3".into(),
            params: vec![
                Value::Text(tenant::tag(id, sent_ns)),
                Value::Integer(i64::from(id.is_multiple_of(3))),
                Value::Integer(tenant::todo_id(t, k, &shape)),
            ],
        }
    };
    let req = SqlRequest {
        statements: vec![stmt],
        tenant: None,
    };
    let r = ctx
        .http
        .post(format!("{}/v1/sql", ctx.base))
        .bearer_auth(&ctx.service_tokens[t])
        .json(&req)
        .send()
        .await;
    let stats = &ctx.stats;
    match r {
        Ok(r) if r.status().is_success() => {
            stats.now().accepted.fetch_add(1, Ordering::Relaxed);
            if t == stats.noisy_tenant() {
                stats.now().noisy_accepted.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(r) if r.status().as_u16() == 429 => {
            stats.now().rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        Ok(r) => {
            stats.now().refused.fetch_add(1, Ordering::Relaxed);
            let s = r.status();
            stats.error(format!(
                "service write: {s}: {}",
                r.text().await.unwrap_or_default()
            ));
        }
        Err(e) => {
            stats.now().refused.fetch_add(1, Ordering::Relaxed);
            stats.error(format!("service write: {e}"));
        }
    }
}

/// The noisy tenant starts: every one of its clients pushes in a closed
/// loop, and service writers loop for it, or it runs at its own rate.
fn start_noisy(ctx: &Arc<Ctx>, t: usize) {
    let from = ctx.first[t];
    let n = ctx.cfg.clients_per_tenant;
    match ctx.cfg.noisy_tenant_rate {
        None => {
            for h in &ctx.clients[from..from + n] {
                let _ = h.tx.try_send(client::Command::Flood(true));
            }
            for _ in 0..8 {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let mut round = 1u64;
                    while ctx.stats.phase() == Phase::Noisy {
                        let id = ctx.stats.next_write();
                        let now = ctx.stats.now_ns();
                        ctx.stats.now().issued.fetch_add(1, Ordering::Relaxed);
                        service_write(&ctx, t, id, now, round).await;
                        round += 2;
                    }
                });
            }
        }
        Some(rate) => {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let mut k = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                while ctx.stats.phase() == Phase::Noisy {
                    tick.tick().await;
                    let due = (t0.elapsed().as_secs_f64() * rate) as u64;
                    while k < due {
                        let id = ctx.stats.next_write();
                        let sent_ns = ctx.stats.now_ns();
                        ctx.stats.now().issued.fetch_add(1, Ordering::Relaxed);
                        if k.is_multiple_of(2) {
                            let h = &ctx.clients[from + (k as usize / 2) % n];
                            let _ = h.tx.try_send(client::Command::Write { id, sent_ns });
                        } else if let Ok(p) = ctx.service.clone().try_acquire_owned() {
                            let c = ctx.clone();
                            tokio::spawn(async move {
                                service_write(&c, t, id, sent_ns, k).await;
                                drop(p);
                            });
                        }
                        k += 1;
                    }
                }
            });
        }
    }
}

async fn stop_noisy(ctx: &Ctx, t: usize) {
    let from = ctx.first[t];
    for h in &ctx.clients[from..from + ctx.cfg.clients_per_tenant] {
        let _ = h.tx.send(client::Command::Flood(false)).await;
    }
}

/// Waits until no data arrived for 1.5 s and every offered write was
/// answered (at most 60 s); false on the timeout.
async fn settle(ctx: &Ctx) -> bool {
    let stats = &ctx.stats;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let sum = |f: fn(&stats::PhaseCounters) -> u64| stats.phases.iter().map(f).sum::<u64>();
        let answered = sum(|p| p.accepted.load(Ordering::Relaxed))
            + sum(|p| p.refused.load(Ordering::Relaxed))
            + sum(|p| p.dropped.load(Ordering::Relaxed));
        let issued = sum(|p| p.issued.load(Ordering::Relaxed));
        let idle = stats
            .now_ns()
            .saturating_sub(stats.last_data_ns.load(Ordering::Relaxed));
        if answered >= issued
            && idle > 1_500_000_000
            && ctx.service.available_permits() == ctx.cfg.service_concurrency.max(1)
        {
            return true;
        }
    }
    false
}

/// Every client's held rows against the server database.
async fn isolation(ctx: &Ctx, dbs: Vec<PathBuf>) -> anyhow::Result<verify::Isolation> {
    if dbs.is_empty() {
        return Ok(verify::Isolation {
            samples: vec!["not checked: no server database (give --server-db)".into()],
            ..Default::default()
        });
    }
    let mut held = Vec::with_capacity(ctx.clients.len());
    for c in &ctx.clients {
        let (tx, rx) = oneshot::channel();
        if c.tx.send(client::Command::Held(tx)).await.is_err() {
            held.push(None);
            continue;
        }
        held.push(rx.await.ok());
    }
    let who: Vec<(usize, usize, usize)> = ctx
        .clients
        .iter()
        .map(|c| (c.tenant, c.user, c.index))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut truth = verify::Truth::open(&dbs, server::POLICY_SQL)?;
        let mut out = verify::Isolation::default();
        for ((t, u, i), h) in who.into_iter().zip(held) {
            let name = format!(
                "client {i} (user {}) of tenant {t}",
                tenant::user_name(t, u)
            );
            let Some(h) = h.filter(|h| !h.is_empty()) else {
                out.samples
                    .push(format!("{name}: not connected, not checked"));
                continue;
            };
            let subs: Vec<(&str, &str, &std::collections::HashSet<i64>)> = h
                .iter()
                .map(|(id, rows)| {
                    let q = SUBSCRIPTIONS.iter().find(|s| s.0 == id).map_or("", |s| s.1);
                    (id.as_str(), q, rows)
                })
                .collect();
            truth.check(&name, &Tokens::user_claims(t, u), &subs, &mut out)?;
        }
        Ok(out)
    })
    .await?
}
