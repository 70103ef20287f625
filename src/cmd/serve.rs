//! `tenantsync serve`: runs the sync server (docs/CLI.md, "tenantsync
//! serve"; the protocol is docs/PROTOCOL.md).
//!
//! Reads the configuration (flags > `TENANTSYNC_*` environment > the
//! `--config` file > defaults), installs the tracing subscriber and the
//! Prometheus recorder (this binary is the only place that does), starts the
//! service (refusing an invalid policy file with every diagnostic), binds,
//! prints `listening on http://<addr>` and serves until SIGINT or SIGTERM.
//! SIGHUP re-reads the policy file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tenantsync_server::app::{self, AppState, Server};
use tenantsync_server::auth::{Authenticator, JwtAlg};
use tenantsync_server::cluster::Node;
use tenantsync_server::config::{self, Config, LimitsConfig, LogFormat};
use tenantsync_server::{SyncService, Synchronous};

/// `tenantsync serve` flags. Every flag can also be set in the config file
/// or the environment (config.example.toml lists every key).
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// A TOML config file (every key: config.example.toml) [env: TENANTSYNC_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The server database, created if missing [env: TENANTSYNC_DB]
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// The schema script, applied idempotently at start [env: TENANTSYNC_SCHEMA]
    #[arg(long, value_name = "FILE")]
    pub schema: Option<PathBuf>,
    /// The policy file; SIGHUP re-reads it [env: TENANTSYNC_POLICY]
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// ip:port to listen on, port 0 for any free one [default: 127.0.0.1:8080] [env: TENANTSYNC_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// HS256 secret for bearer tokens (prefer the environment variable) [env: TENANTSYNC_JWT_SECRET]
    #[arg(long, value_name = "SECRET")]
    pub jwt_secret: Option<String>,
    /// PEM public key for RS256 or EdDSA tokens (with --jwt-alg) [env: TENANTSYNC_JWT_PUBLIC_KEY]
    #[arg(long, value_name = "PEM_FILE")]
    pub jwt_public_key: Option<PathBuf>,
    /// The one token algorithm of --jwt-public-key: rs256, es256, eddsa (hs256 with a secret) [env: TENANTSYNC_JWT_ALG]
    #[arg(long, value_name = "ALG", value_parser = parse_alg)]
    pub jwt_alg: Option<JwtAlg>,
    /// A JSON Web Key Set, a file or an http(s):// URL (an identity provider's jwks.json); the token's kid picks the key [env: TENANTSYNC_JWT_JWKS]
    #[arg(long, value_name = "FILE_OR_URL")]
    pub jwks: Option<String>,
    /// Tokens must carry this `iss` [env: TENANTSYNC_JWT_ISSUER]
    #[arg(long, value_name = "ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Tokens must carry this in `aud` [env: TENANTSYNC_JWT_AUDIENCE]
    #[arg(long, value_name = "AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Log lines as text or json (JSON lines) [default: text] [env: TENANTSYNC_LOG_FORMAT]
    #[arg(long, value_name = "FORMAT", value_parser = parse_log_format)]
    pub log_format: Option<LogFormat>,
    /// The claim naming the tenant [default: tenant_id] [env: TENANTSYNC_TENANT_CLAIM]
    #[arg(long, value_name = "CLAIM")]
    pub tenant_claim: Option<String>,
    /// Reader threads for initial syncs and pulls [default: 2] [env: TENANTSYNC_READERS]
    #[arg(long, value_name = "N")]
    pub readers: Option<usize>,
    /// SQLite synchronous: full or normal [default: full] [env: TENANTSYNC_SYNCHRONOUS]
    #[arg(long, value_name = "MODE", value_parser = parse_synchronous)]
    pub synchronous: Option<Synchronous>,
    /// Shards: databases with a writer each, tenants spread over them; fixed when the database is created [default: 1] [env: TENANTSYNC_SHARDS]
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Largest WebSocket message or HTTP body [default: 4194304] [env: TENANTSYNC_LIMITS_MAX_MESSAGE_BYTES]
    #[arg(long, value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest pull answer [default: 67108864] [env: TENANTSYNC_LIMITS_MAX_PULL_BYTES]
    #[arg(long, value_name = "BYTES")]
    pub max_pull_bytes: Option<usize>,
    /// Subscriptions per connection [default: 100] [env: TENANTSYNC_LIMITS_MAX_SUBSCRIPTIONS_PER_CONNECTION]
    #[arg(long, value_name = "N")]
    pub max_subscriptions_per_connection: Option<usize>,
    /// Subscriptions per tenant [default: 100000] [env: TENANTSYNC_LIMITS_MAX_SUBSCRIPTIONS_PER_TENANT]
    #[arg(long, value_name = "N")]
    pub max_subscriptions_per_tenant: Option<usize>,
    /// WebSocket connections per tenant [default: 10000] [env: TENANTSYNC_LIMITS_MAX_CONNECTIONS_PER_TENANT]
    #[arg(long, value_name = "N")]
    pub max_connections_per_tenant: Option<usize>,
    /// WebSocket connections in all [default: 100000] [env: TENANTSYNC_LIMITS_MAX_CONNECTIONS]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Pushes per second per tenant [default: 2000] [env: TENANTSYNC_LIMITS_PUSH_RATE_PER_TENANT]
    #[arg(long, value_name = "RATE")]
    pub push_rate_per_tenant: Option<f64>,
    /// Pushes per tenant in a burst [default: 4000] [env: TENANTSYNC_LIMITS_PUSH_BURST_PER_TENANT]
    #[arg(long, value_name = "N")]
    pub push_burst_per_tenant: Option<f64>,
    /// Bytes of changes pushed per second per tenant [default: 1048576] [env: TENANTSYNC_LIMITS_PUSH_BYTES_PER_TENANT]
    #[arg(long, value_name = "BYTES")]
    pub push_bytes_per_tenant: Option<f64>,
    /// Run as a node of a cluster on these NATS servers (comma-separated; docs/CLUSTER.md) [env: TENANTSYNC_CLUSTER_NATS]
    #[arg(long, value_name = "URLS")]
    pub cluster_nats: Option<String>,
    /// The cluster's name [default: tenantsync] [env: TENANTSYNC_CLUSTER_NAME]
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// This node's id, unique in the cluster and the same across restarts [env: TENANTSYNC_CLUSTER_NODE_ID]
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// The URL other nodes reach this one at [default: http://<listen>] [env: TENANTSYNC_CLUSTER_URL]
    #[arg(long, value_name = "URL")]
    pub node_url: Option<String>,
    /// Where this node keeps its copies of the shards [default: <db>.cluster] [env: TENANTSYNC_CLUSTER_DIR]
    #[arg(long, value_name = "DIR")]
    pub cluster_dir: Option<PathBuf>,
    /// Copies JetStream keeps of each shard's log [default: 1] [env: TENANTSYNC_CLUSTER_REPLICAS]
    #[arg(long, value_name = "N")]
    pub cluster_replicas: Option<usize>,
    /// How long a node's lease outlives its last renewal, in ms [default: 3000] [env: TENANTSYNC_CLUSTER_LEASE_MS]
    #[arg(long, value_name = "MS")]
    pub cluster_lease_ms: Option<u64>,
}

fn parse_alg(s: &str) -> Result<JwtAlg, String> {
    s.parse()
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

fn parse_synchronous(s: &str) -> Result<Synchronous, String> {
    match s.to_ascii_lowercase().as_str() {
        "full" => Ok(Synchronous::Full),
        "normal" => Ok(Synchronous::Normal),
        _ => Err(format!("expected full or normal, got `{s}`")),
    }
}

impl ServeArgs {
    /// The command line's layer of the configuration.
    fn layer(&self) -> Config {
        let mut c = Config {
            db: self.db.clone(),
            schema: self.schema.clone(),
            policy: self.policy.clone(),
            listen: self.listen.clone(),
            tenant_claim: self.tenant_claim.clone(),
            readers: self.readers,
            synchronous: self.synchronous,
            shards: self.shards,
            log_format: self.log_format,
            limits: LimitsConfig {
                max_message_bytes: self.max_message_bytes,
                max_pull_bytes: self.max_pull_bytes,
                max_subscriptions_per_connection: self.max_subscriptions_per_connection,
                max_subscriptions_per_tenant: self.max_subscriptions_per_tenant,
                max_connections_per_tenant: self.max_connections_per_tenant,
                max_connections: self.max_connections,
                push_rate_per_tenant: self.push_rate_per_tenant,
                push_burst_per_tenant: self.push_burst_per_tenant,
                push_bytes_per_tenant: self.push_bytes_per_tenant,
                ..LimitsConfig::default()
            },
            ..Config::default()
        };
        c.cluster = config::ClusterSection {
            nats: self.cluster_nats.clone(),
            name: self.cluster_name.clone(),
            node_id: self.node_id.clone(),
            url: self.node_url.clone(),
            dir: self.cluster_dir.clone(),
            replicas: self.cluster_replicas,
            lease_ms: self.cluster_lease_ms,
        };
        c.jwt.secret = self.jwt_secret.clone();
        c.jwt.public_key = self.jwt_public_key.clone();
        c.jwt.alg = self.jwt_alg;
        c.jwt.jwks = self.jwks.clone();
        c.jwt.issuer = self.jwt_issuer.clone();
        c.jwt.audience = self.jwt_audience.clone();
        c
    }
}

/// Runs the server; the exit code is 0 after a clean shutdown, 1 when it
/// could not start.
pub fn run(args: &ServeArgs) -> ExitCode {
    let (settings, notes) = match settings(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    init_tracing(settings.log_format);
    for note in notes {
        tracing::warn!("{note}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tenantsync-edge")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr: text (colours only on a terminal) or JSON lines, each
/// line with the spans it is in (a session's tenant, subject and peer).
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("TENANTSYNC_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    const SECONDS: &[f64] = &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the Prometheus recorder")
}

/// The configuration from every layer, and what to warn about once logging
/// is set up.
fn settings(args: &ServeArgs) -> anyhow::Result<(config::Settings, Vec<String>)> {
    let file_path = args
        .config
        .clone()
        .or_else(|| std::env::var_os("TENANTSYNC_CONFIG").map(PathBuf::from));
    let file = match &file_path {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    let (env, unknown) = Config::from_env(std::env::vars())?;
    let notes = unknown
        .into_iter()
        .map(|var| {
            format!("{var} is not a configuration variable (see config.example.toml); ignored")
        })
        .collect();
    Ok((file.overlay(env).overlay(args.layer()).resolve()?, notes))
}

async fn serve(settings: config::Settings) -> anyhow::Result<()> {
    let handle = install_metrics()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let auth = Authenticator::new(&settings.jwt).context("the token key")?;
    auth.start().await.context("the token key set")?;

    let service_config = settings.service.clone();
    let db = service_config.db_path.clone();
    let (service, node) = match settings.cluster.clone() {
        Some(cluster) => {
            let id = cluster.node_id.clone();
            let (node, service) = Node::start(cluster, service_config)
                .await
                .with_context(|| format!("cannot start cluster node {id}"))?;
            (service, Some(node))
        }
        None => {
            let service = tokio::task::spawn_blocking(move || SyncService::start(service_config))
                .await
                .context("the service start panicked")?
                .with_context(|| format!("cannot start the server on {}", db.display()))?;
            (service, None)
        }
    };

    let render: app::MetricsRender = Arc::new(move || handle.render());
    let state = AppState::new(service.clone(), auth, settings.edge.clone(), Some(render));
    let state = match &node {
        Some(n) => state.with_cluster(n.clone()),
        None => state,
    };
    let server = match Server::bind(settings.listen, state).await {
        Ok(s) => s,
        Err(e) => {
            service.shutdown(settings.edge.shutdown_timeout).await;
            return Err(anyhow::anyhow!("cannot listen on {}: {e}", settings.listen));
        }
    };
    let signals = app::Signals::install().context("cannot install the signal handlers")?;
    let addr = server.local_addr()?;
    tracing::info!(%addr, db = %db.display(), keys = %settings.jwt.describe(), "serving");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }

    let policy_path = settings.policy_path.clone();
    let schema_path = settings.schema_path.clone();
    let signal = async move {
        let reload = || {
            let service = service.clone();
            let path = policy_path.clone();
            let schema = schema_path.clone();
            let node = node.clone();
            async move {
                // Failures are logged by the reloads, with every diagnostic.
                let _ = app::reload_schema_file(&service, &schema).await;
                let reloaded = app::reload_policy_file(&service, &path).await;
                // In a cluster, the file becomes the cluster's.
                if let (Ok(_), Some(node)) = (reloaded, node)
                    && let Ok(text) = tokio::fs::read_to_string(&path).await
                    && let Err(e) = node
                        .publish_policy(&path.display().to_string(), &text)
                        .await
                {
                    tracing::error!(error = %e, "the reloaded policies did not reach the cluster");
                }
            }
        };
        signals.stop(reload).await;
        if let Some(node) = node {
            // Stops its shards first and gives the lease back: they move
            // to other nodes at once.
            node.stop().await;
        }
    };
    server.run(signal).await;
    Ok(())
}
