//! `tenantsync bench`: the tenant-isolation load benchmark (contract:
//! docs/BENCH.md). The harness is `tenantsync_loadtest`; this is
//! its command line: flags, the runtime, the table, `--json`, `--report`.

use std::io::Write;
use std::path::PathBuf;

use tenantsync_loadtest::{self as harness, Config};

/// Arguments of `tenantsync bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Tenants.
    #[arg(long, default_value_t = 100)]
    pub tenants: usize,
    /// WebSocket clients per tenant (users of `--devices-per-user` devices).
    #[arg(long, default_value_t = 10)]
    pub clients_per_tenant: usize,
    /// Devices per user: a user's devices share its views.
    #[arg(long, default_value_t = 2)]
    pub devices_per_user: usize,
    /// Clients per tenant that push writes.
    #[arg(long, default_value_t = 2)]
    pub writers_per_tenant: usize,
    /// Writes per second across all tenants (half client pushes, half
    /// service SQL).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of each loaded phase (steady, noisy, reconnect).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The noisy tenant's writes per second (default: as fast as the server
    /// takes them).
    #[arg(long)]
    pub noisy_tenant_rate: Option<f64>,
    /// Share of clients dropped in the reconnect storm (0..=1).
    #[arg(long, default_value_t = 0.2)]
    pub reconnect_share: f64,
    /// Seeded todos per tenant.
    #[arg(long, default_value_t = 40)]
    pub todos_per_tenant: usize,
    /// An external server's base URL instead of a child process
    /// (repeatable: clients are spread over them).
    #[arg(long = "server", value_name = "URL")]
    pub servers: Vec<String>,
    /// Run against a local cluster of N nodes (`tenantsync cluster up`,
    /// NATS from PATH) instead of one server: clients spread over the
    /// nodes, per-node CPU in the output (docs/BENCH.md, "Cluster").
    #[arg(long, value_name = "N")]
    pub cluster: Option<usize>,
    /// The external server's database file, opened read-only for the
    /// isolation check.
    #[arg(long, value_name = "PATH")]
    pub server_db: Option<PathBuf>,
    /// The HS256 secret (the external server's; the child gets it).
    #[arg(
        long,
        env = "TENANTSYNC_JWT_SECRET",
        hide_env_values = true,
        default_value = "tenantsync-bench-secret-0123456789"
    )]
    pub jwt_secret: String,
    /// The child server's `--synchronous` (full or normal).
    #[arg(long, default_value = "full")]
    pub synchronous: String,
    /// The child server's reader threads (per shard).
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// The child server's shards (databases with a writer each).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Connections opened at once during the snapshot phase.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Random seed (site ids, the reconnect storm's clients).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the figures as JSON (docs/BENCH.md, "JSON").
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write report.md, report.json and SVG plots into this directory.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs the command; returns the exit code (0 ok, 1 the run failed, 3 it
/// ran but found leaks or misses).
pub fn run(args: &BenchArgs, out: &mut impl Write, err: &mut impl Write) -> u8 {
    let cfg = Config {
        tenants: args.tenants,
        clients_per_tenant: args.clients_per_tenant,
        devices_per_user: args.devices_per_user,
        writers_per_tenant: args.writers_per_tenant,
        rate: args.rate,
        duration_secs: args.duration,
        noisy_tenant_rate: args.noisy_tenant_rate,
        reconnect_share: args.reconnect_share.clamp(0.0, 1.0),
        todos_per_tenant: args.todos_per_tenant,
        servers: args.servers.clone(),
        cluster: args.cluster,
        server_db: args.server_db.clone(),
        jwt_secret: args.jwt_secret.clone(),
        synchronous: args.synchronous.clone(),
        readers: args.readers,
        shards: args.shards.max(1),
        connect_concurrency: args.connect_concurrency,
        progress: !args.quiet,
        seed: args.seed,
        ..Config::default()
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(err, "error: cannot start the runtime: {e}");
            return 1;
        }
    };
    let report = match rt.block_on(harness::run(cfg)) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "error: {e:#}");
            return 1;
        }
    };
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    let _ = write!(out, "{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            let _ = writeln!(err, "error: cannot write {}: {e}", path.display());
            return 1;
        }
    }
    if let Some(dir) = &args.report
        && let Err(e) = report.write_dir(dir)
    {
        let _ = writeln!(
            err,
            "error: cannot write the report to {}: {e}",
            dir.display()
        );
        return 1;
    }
    if report.isolation.leaks > 0 || report.isolation.misses > 0 {
        let _ = writeln!(
            err,
            "error: isolation check failed: {} leaks, {} misses",
            report.isolation.leaks, report.isolation.misses
        );
        for s in &report.isolation.samples {
            let _ = writeln!(err, "  {s}");
        }
        return 3;
    }
    0
}
