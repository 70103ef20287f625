//! The server's configuration: one [`Config`] read from layers, validated
//! once at start into [`Settings`].
//!
//! Layers, highest first: command-line flags, environment variables
//! (`TENANTSYNC_<KEY>`, e.g. `TENANTSYNC_JWT_SECRET`,
//! `TENANTSYNC_LIMITS_MAX_MESSAGE_BYTES`), the TOML file given with
//! `--config`, the defaults. Each key is taken from the highest layer that
//! sets it, except the token key: `jwt.alg`, `jwt.secret`,
//! `jwt.public_key` and `jwt.jwks` are taken together from the highest layer
//! that sets any of them (so a flag `--jwt-public-key` or `--jwks` replaces
//! a secret in the file instead of conflicting with it). Relative paths in the file are relative
//! to the file's directory; on the command line and in the environment, to
//! the working directory.
//!
//! `config.example.toml` at the repository root documents every key;
//! docs/CLI.md ("serve") is the reference.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::{JwtAlg, JwtKey, JwtSettings};
use crate::jwks::JwksSource;
use crate::service::{Limits, ServiceConfig, Synchronous, WriteHook};

/// The default listen address (loopback: exposing the server is a choice).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// One layer of configuration; every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The server database (created if missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<PathBuf>,
    /// The schema script, applied idempotently at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<PathBuf>,
    /// The policy file; re-read on SIGHUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PathBuf>,
    /// `ip:port` to listen on (port 0: any free port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The claim naming an identity's tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_claim: Option<String>,
    /// Reader threads for initial syncs and pulls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readers: Option<usize>,
    /// SQLite `synchronous` for the server database: `full` or `normal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous: Option<Synchronous>,
    /// Shards: databases with a writer each, tenants spread over them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
    /// `[shard_overrides]`: tenant = shard index (the file only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_overrides: Option<std::collections::BTreeMap<String, usize>>,
    /// How long a shutdown may take before sockets are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Log lines as `text` (the default) or `json` (JSON lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// Token verification.
    #[serde(default, skip_serializing_if = "JwtConfig::is_empty")]
    pub jwt: JwtConfig,
    /// Limits (docs/PROTOCOL.md §10).
    #[serde(default, skip_serializing_if = "LimitsConfig::is_empty")]
    pub limits: LimitsConfig,
    /// WebSocket session timing.
    #[serde(default, skip_serializing_if = "WebSocketConfig::is_empty")]
    pub websocket: WebSocketConfig,
    /// The backend's write hook.
    #[serde(default, skip_serializing_if = "WriteHookConfig::is_empty")]
    pub write_hook: WriteHookConfig,
    /// Running as a node of a cluster (docs/CLUSTER.md).
    #[serde(default, skip_serializing_if = "ClusterSection::is_empty")]
    pub cluster: ClusterSection,
}

/// `[cluster]` (docs/CLUSTER.md): set `nats` to run as a node of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// NATS server URLs, comma-separated (JetStream enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<String>,
    /// The cluster's name (default `tenantsync`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// This node's id: unique in the cluster, the same across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The URL other nodes reach this one at (default `http://<listen>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Where this node keeps its copies of the shards (default: `<db>.cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Copies JetStream keeps of each log (default 1; 3 on 3 NATS servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
    /// How long a node's lease outlives its last renewal, in ms (default 3000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
}

impl ClusterSection {
    fn is_empty(&self) -> bool {
        self == &ClusterSection::default()
    }

    fn resolve(
        &self,
        db: &Path,
        listen: SocketAddr,
    ) -> Result<Option<crate::cluster::ClusterConfig>, ConfigError> {
        let Some(nats) = &self.nats else {
            if self.is_empty() {
                return Ok(None);
            }
            return Err(invalid(
                "cluster.nats",
                "the other [cluster] keys need cluster.nats (the NATS servers)",
            ));
        };
        let node_id = self.node_id.clone().ok_or_else(|| {
            invalid(
                "cluster.node_id",
                "a node of a cluster needs an id, unique in the cluster and the same across restarts",
            )
        })?;
        if node_id.is_empty()
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "cluster.node_id",
                format!("{node_id:?}: letters, digits, - and _ only"),
            ));
        }
        let name = self.name.clone().unwrap_or_else(|| "tenantsync".into());
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid(
                "cluster.name",
                format!("{name:?}: letters, digits and _ only"),
            ));
        }
        let url = match &self.url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None if listen.port() == 0 => {
                return Err(invalid(
                    "cluster.url",
                    "with listen on port 0 the node's URL cannot be known: give cluster.url or a port",
                ));
            }
            None => format!("http://{listen}"),
        };
        let replicas = self.replicas.unwrap_or(1);
        if !(1..=5).contains(&replicas) {
            return Err(invalid("cluster.replicas", "must be between 1 and 5"));
        }
        let lease = self.lease_ms.unwrap_or(3000);
        if !(1000..=60_000).contains(&lease) {
            return Err(invalid(
                "cluster.lease_ms",
                "must be between 1000 and 60000",
            ));
        }
        let dir = self.dir.clone().unwrap_or_else(|| {
            let mut d = db.as_os_str().to_owned();
            d.push(".cluster");
            PathBuf::from(d)
        });
        Ok(Some(crate::cluster::ClusterConfig {
            nats: nats.clone(),
            name,
            node_id,
            url,
            dir,
            replicas,
            lease: Duration::from_millis(lease),
        }))
    }
}

/// `[write_hook]` (docs/SAAS.md, "Backend write validation").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteHookConfig {
    /// The endpoint pushed rows are POSTed to (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Comma-separated tables whose rows it judges (default: every table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<String>,
    /// How long one call may take, in milliseconds (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Calls after a failed one (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// When no call succeeds: `refuse` the push (default) or `accept` it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
}

impl WriteHookConfig {
    fn is_empty(&self) -> bool {
        self == &WriteHookConfig::default()
    }

    fn resolve(&self) -> Result<Option<WriteHook>, ConfigError> {
        let Some(url) = &self.url else {
            if self.is_empty() {
                return Ok(None);
            }
            return Err(invalid(
                "write_hook.url",
                "is required with the other write_hook keys",
            ));
        };
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return Err(invalid(
                "write_hook.url",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }
        let accept_on_failure = match self.on_failure.as_deref().unwrap_or("refuse") {
            "refuse" => false,
            "accept" => true,
            other => {
                return Err(invalid(
                    "write_hook.on_failure",
                    format!("{other:?} is neither refuse nor accept"),
                ));
            }
        };
        let timeout_ms = self.timeout_ms.unwrap_or(2000);
        if timeout_ms == 0 {
            return Err(invalid("write_hook.timeout_ms", "must be at least 1"));
        }
        Ok(Some(WriteHook {
            url: url.clone(),
            tables: self
                .tables
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            timeout: Duration::from_millis(timeout_ms),
            retries: self.retries.unwrap_or(1),
            accept_on_failure,
        }))
    }
}

/// `[jwt]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `hs256` (with `secret`), `rs256` or `eddsa` (with `public_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<JwtAlg>,
    /// The HS256 shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// A PEM file with the RS256, ES256 or EdDSA public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PathBuf>,
    /// A JSON Web Key Set: a file, or an `http(s)://` URL (an identity
    /// provider's `.well-known/jwks.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// How often the key set is read again, in seconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_refresh_secs: Option<u64>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leeway_secs: Option<u64>,
    /// If set, tokens must carry it in `aud`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// If set, tokens must carry it as `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// `[limits]` (docs/PROTOCOL.md §10).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest WebSocket message or HTTP body, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    /// Largest pull answer, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pull_bytes: Option<usize>,
    /// Subscriptions per WebSocket connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions_per_connection: Option<usize>,
    /// Subscriptions per tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions_per_tenant: Option<usize>,
    /// WebSocket connections per tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_tenant: Option<usize>,
    /// WebSocket connections in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Pushes per second per tenant, sustained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_rate_per_tenant: Option<f64>,
    /// Pushes per tenant in a burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_burst_per_tenant: Option<f64>,
    /// Bytes of changes per second per tenant, sustained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_bytes_per_tenant: Option<f64>,
    /// Peers (site ids) per tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_peers_per_tenant: Option<u64>,
    /// Days a peer that is not connected is remembered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_retention_days: Option<u64>,
    /// Items a connection's outbox holds before the peer lags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_items: Option<usize>,
    /// Bytes a connection's outbox holds before the peer lags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox_bytes: Option<usize>,
    /// Longest long-poll wait, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
}

/// `[websocket]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    /// A session that receives nothing (not even a pong) for this long is
    /// closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// Time from the upgrade to a valid `hello`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hello_timeout_secs: Option<u64>,
    /// How often the server sends a ping frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ping_interval_secs: Option<u64>,
}

impl JwtConfig {
    fn is_empty(&self) -> bool {
        self == &JwtConfig::default()
    }
}

impl LimitsConfig {
    fn is_empty(&self) -> bool {
        self == &LimitsConfig::default()
    }
}

impl WebSocketConfig {
    fn is_empty(&self) -> bool {
        self == &WebSocketConfig::default()
    }
}

/// The type of a key's value, for reading it from an environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Integer,
    Number,
}

/// Every key, as a dotted TOML path, with its type.
const KEYS: &[(&str, Kind)] = &[
    ("db", Kind::Text),
    ("schema", Kind::Text),
    ("policy", Kind::Text),
    ("listen", Kind::Text),
    ("tenant_claim", Kind::Text),
    ("readers", Kind::Integer),
    ("synchronous", Kind::Text),
    ("shards", Kind::Integer),
    ("shutdown_timeout_secs", Kind::Integer),
    ("log_format", Kind::Text),
    ("jwt.alg", Kind::Text),
    ("jwt.secret", Kind::Text),
    ("jwt.public_key", Kind::Text),
    ("jwt.jwks", Kind::Text),
    ("jwt.jwks_refresh_secs", Kind::Integer),
    ("jwt.leeway_secs", Kind::Integer),
    ("jwt.audience", Kind::Text),
    ("jwt.issuer", Kind::Text),
    ("limits.max_message_bytes", Kind::Integer),
    ("limits.max_pull_bytes", Kind::Integer),
    ("limits.max_subscriptions_per_connection", Kind::Integer),
    ("limits.max_subscriptions_per_tenant", Kind::Integer),
    ("limits.max_connections_per_tenant", Kind::Integer),
    ("limits.max_connections", Kind::Integer),
    ("limits.push_rate_per_tenant", Kind::Number),
    ("limits.push_burst_per_tenant", Kind::Number),
    ("limits.push_bytes_per_tenant", Kind::Number),
    ("limits.max_peers_per_tenant", Kind::Integer),
    ("limits.peer_retention_days", Kind::Integer),
    ("limits.outbox_items", Kind::Integer),
    ("limits.outbox_bytes", Kind::Integer),
    ("limits.max_wait_ms", Kind::Integer),
    ("websocket.idle_timeout_secs", Kind::Integer),
    ("websocket.hello_timeout_secs", Kind::Integer),
    ("websocket.ping_interval_secs", Kind::Integer),
    ("write_hook.url", Kind::Text),
    ("write_hook.tables", Kind::Text),
    ("write_hook.timeout_ms", Kind::Integer),
    ("write_hook.retries", Kind::Integer),
    ("write_hook.on_failure", Kind::Text),
    ("cluster.nats", Kind::Text),
    ("cluster.name", Kind::Text),
    ("cluster.node_id", Kind::Text),
    ("cluster.url", Kind::Text),
    ("cluster.dir", Kind::Text),
    ("cluster.replicas", Kind::Integer),
    ("cluster.lease_ms", Kind::Integer),
];

/// The prefix of the environment variables the configuration reads.
pub const ENV_PREFIX: &str = "TENANTSYNC_";

/// Environment variables with the prefix that are not configuration keys
/// but are known (read by the command line, not by [`Config::from_env`]).
pub const ENV_NOT_KEYS: &[&str] = &["TENANTSYNC_CONFIG", "TENANTSYNC_LOG"];

/// Every configuration key, as a dotted path (`jwt.secret`).
pub fn keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|(k, _)| *k)
}

/// The environment variable of a key: `jwt.secret` -> `TENANTSYNC_JWT_SECRET`.
pub fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}

/// A configuration that cannot be used; every message names the key, the
/// file or the variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required key is missing in every layer.
    #[error("{what} is not configured: give {flag}, {env} or `{key}` in the config file")]
    Missing {
        /// In words.
        what: &'static str,
        /// The key.
        key: &'static str,
        /// The flag.
        flag: &'static str,
        /// The environment variable.
        env: String,
    },
    /// A value is out of range or contradicts another.
    #[error("`{key}`: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// The config file is not valid TOML or has an unknown or ill-typed key.
    #[error("{path}: {message}")]
    File {
        /// The config file.
        path: PathBuf,
        /// The TOML parser's message (with line and column).
        message: String,
    },
    /// An environment variable has a value of the wrong type.
    #[error("{var}={value:?}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// Its value (secrets are not shown).
        value: String,
        /// Why.
        reason: String,
    },
    /// A file named by the configuration cannot be read.
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        /// What the file is (schema, policy file, public key).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
}

impl Config {
    /// Reads a TOML config file. Relative paths in it are made relative to
    /// the file's directory.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "config file",
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::from_toml(&text).map_err(|message| ConfigError::File {
            path: path.to_owned(),
            message,
        })?;
        if let Some(dir) = path.parent() {
            config.rebase(dir);
        }
        Ok(config)
    }

    /// Parses TOML text (paths kept as written).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Reads the `TENANTSYNC_<KEY>` variables among `vars`. Returns the layer
    /// and the names of the variables with the prefix that are neither keys
    /// nor in [`ENV_NOT_KEYS`] (probably typos: the caller warns).
    pub fn from_env<I, K, V>(vars: I) -> Result<(Config, Vec<String>), ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut table = toml::Table::new();
        let mut unknown = Vec::new();
        for (var, value) in vars {
            let (var, value) = (var.as_ref(), value.as_ref());
            if !var.starts_with(ENV_PREFIX) || ENV_NOT_KEYS.contains(&var) {
                continue;
            }
            let Some((key, kind)) = KEYS.iter().find(|(k, _)| env_var(k) == var) else {
                unknown.push(var.to_owned());
                continue;
            };
            let shown = || {
                if *key == "jwt.secret" {
                    "<secret>".to_owned()
                } else {
                    value.to_owned()
                }
            };
            let v = match kind {
                Kind::Text => toml::Value::String(value.to_owned()),
                Kind::Integer => {
                    toml::Value::Integer(value.trim().parse().map_err(|_| ConfigError::Env {
                        var: var.to_owned(),
                        value: shown(),
                        reason: "expected a whole number".into(),
                    })?)
                }
                Kind::Number => {
                    toml::Value::Float(value.trim().parse().map_err(|_| ConfigError::Env {
                        var: var.to_owned(),
                        value: shown(),
                        reason: "expected a number".into(),
                    })?)
                }
            };
            insert_path(&mut table, key, v);
        }
        let config = toml::Value::Table(table)
            .try_into::<Config>()
            .map_err(|e| ConfigError::Env {
                var: "TENANTSYNC_*".into(),
                value: String::new(),
                reason: e.to_string().trim_end().to_owned(),
            })?;
        Ok((config, unknown))
    }

    /// This layer with `over` on top: every key `over` sets wins (the token
    /// key's three settings as one, see the module docs).
    pub fn overlay(self, over: Config) -> Config {
        let mut base = self;
        if over.jwt.alg.is_some()
            || over.jwt.secret.is_some()
            || over.jwt.public_key.is_some()
            || over.jwt.jwks.is_some()
        {
            base.jwt.alg = None;
            base.jwt.secret = None;
            base.jwt.public_key = None;
            base.jwt.jwks = None;
        }
        let mut merged = to_table(&base);
        merge_tables(&mut merged, to_table(&over));
        toml::Value::Table(merged)
            .try_into()
            .expect("two valid layers merge into a valid layer")
    }

    /// Makes the relative paths of this layer relative to `dir`.
    fn rebase(&mut self, dir: &Path) {
        for p in [
            &mut self.db,
            &mut self.schema,
            &mut self.policy,
            &mut self.jwt.public_key,
            &mut self.cluster.dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        if let Some(j) = &mut self.jwt.jwks
            && let JwksSource::File(p) = JwksSource::parse(j)
            && p.is_relative()
        {
            *j = dir.join(p).to_string_lossy().into_owned();
        }
    }

    /// Validates the configuration and reads the files it names (schema,
    /// policy, public key) into [`Settings`].
    pub fn resolve(&self) -> Result<Settings, ConfigError> {
        let db = required(&self.db, "the server database", "db", "--db")?;
        let schema_path = required(&self.schema, "the schema script", "schema", "--schema")?;
        let policy_path = required(&self.policy, "the policy file", "policy", "--policy")?;
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| ConfigError::Invalid {
            key: "listen",
            reason: format!("{listen_text:?} is not an `ip:port` address (e.g. 127.0.0.1:8080)"),
        })?;
        let tenant_claim = self
            .tenant_claim
            .clone()
            .unwrap_or_else(|| "tenant_id".into());
        if tenant_claim.is_empty() {
            return Err(invalid("tenant_claim", "must not be empty"));
        }
        let readers = self.readers.unwrap_or(2);
        if !(1..=256).contains(&readers) {
            return Err(invalid("readers", "must be between 1 and 256"));
        }
        let shards = self.shards.unwrap_or(1);
        if !(1..=256).contains(&shards) {
            return Err(invalid("shards", "must be between 1 and 256"));
        }
        let shard_overrides = self.shard_overrides.clone().unwrap_or_default();
        if let Some((t, s)) = shard_overrides.iter().find(|(_, s)| **s >= shards) {
            return Err(ConfigError::Invalid {
                key: "shard_overrides",
                reason: format!(
                    "tenant {t:?} = {s}: shards are numbered 0 to {}",
                    shards - 1
                ),
            });
        }
        let limits = self.limits.resolve()?;
        let jwt = self.jwt.resolve(tenant_claim.clone())?;
        let ws = &self.websocket;
        let secs =
            |v: Option<u64>, default: u64, key: &'static str| -> Result<Duration, ConfigError> {
                match v.unwrap_or(default) {
                    0 => Err(invalid(key, "must be at least 1 second")),
                    n => Ok(Duration::from_secs(n)),
                }
            };
        let idle_timeout = secs(ws.idle_timeout_secs, 60, "websocket.idle_timeout_secs")?;
        let ping_interval = secs(ws.ping_interval_secs, 20, "websocket.ping_interval_secs")?;
        if ping_interval >= idle_timeout {
            return Err(invalid(
                "websocket.ping_interval_secs",
                "must be shorter than websocket.idle_timeout_secs (pings keep healthy sessions alive)",
            ));
        }
        let edge = EdgeSettings {
            max_message_bytes: limits.max_message_bytes,
            idle_timeout,
            hello_timeout: secs(ws.hello_timeout_secs, 10, "websocket.hello_timeout_secs")?,
            ping_interval,
            shutdown_timeout: secs(self.shutdown_timeout_secs, 10, "shutdown_timeout_secs")?,
        };
        let schema_sql = read(&schema_path, "schema script")?;
        let policy_sql = read(&policy_path, "policy file")?;
        let mut service = ServiceConfig::new(
            db,
            schema_sql,
            policy_path.display().to_string(),
            policy_sql,
        );
        service.tenant_claim = tenant_claim;
        service.limits = limits;
        service.readers = readers;
        service.synchronous = self.synchronous.unwrap_or_default();
        service.shards = shards;
        service.shard_overrides = shard_overrides;
        service.write_hook = self.write_hook.resolve()?;
        let cluster = self.cluster.resolve(&service.db_path, listen)?;
        Ok(Settings {
            cluster,
            service,
            listen,
            jwt,
            edge,
            policy_path,
            schema_path,
            log_format: self.log_format.unwrap_or_default(),
        })
    }
}

impl JwtConfig {
    fn resolve(&self, tenant_claim: String) -> Result<JwtSettings, ConfigError> {
        let given = [
            self.secret.is_some(),
            self.public_key.is_some(),
            self.jwks.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(invalid(
                "jwt",
                "give one of jwt.secret (hs256), jwt.public_key (rs256, es256, eddsa) or jwt.jwks (a key set), not several",
            ));
        }
        let key = if let Some(secret) = &self.secret {
            match self.alg.unwrap_or(JwtAlg::Hs256) {
                JwtAlg::Hs256 => {}
                alg => {
                    return Err(invalid(
                        "jwt.alg",
                        format!("{alg} verifies with jwt.public_key, but jwt.secret is given"),
                    ));
                }
            }
            if secret.len() < 16 {
                return Err(invalid(
                    "jwt.secret",
                    "must be at least 16 bytes (HS256 is only as strong as its secret)",
                ));
            }
            JwtKey::Secret(secret.clone().into_bytes())
        } else if let Some(path) = &self.public_key {
            let alg = match self.alg {
                Some(JwtAlg::Hs256) => {
                    return Err(invalid(
                        "jwt.alg",
                        "hs256 verifies with jwt.secret, but jwt.public_key is given",
                    ));
                }
                Some(alg) => alg,
                None => {
                    return Err(invalid(
                        "jwt.alg",
                        "give rs256, es256 or eddsa with jwt.public_key (--jwt-alg)",
                    ));
                }
            };
            let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
                what: "JWT public key",
                path: path.clone(),
                source,
            })?;
            JwtKey::PublicPem { alg, pem }
        } else if let Some(jwks) = &self.jwks {
            if let Some(alg) = self.alg {
                return Err(invalid(
                    "jwt.alg",
                    format!(
                        "a key set's keys fix their algorithms; drop jwt.alg ({alg}) with jwt.jwks"
                    ),
                ));
            }
            if jwks.trim().is_empty() {
                return Err(invalid(
                    "jwt.jwks",
                    "is empty (a file or an http(s):// URL)",
                ));
            }
            let refresh = self.jwks_refresh_secs.unwrap_or(300);
            if refresh == 0 {
                return Err(invalid("jwt.jwks_refresh_secs", "must be at least 1"));
            }
            JwtKey::Jwks {
                source: JwksSource::parse(jwks),
                refresh: Duration::from_secs(refresh),
            }
        } else {
            return Err(ConfigError::Missing {
                what: "the token key",
                key: "jwt.secret",
                flag: "--jwt-secret (or --jwt-public-key with --jwt-alg, or --jwks)",
                env: env_var("jwt.secret"),
            });
        };
        let settings = JwtSettings {
            key,
            leeway_secs: self.leeway_secs.unwrap_or(0),
            audience: self.audience.clone(),
            issuer: self.issuer.clone(),
            tenant_claim,
        };
        // Check the key now, so a bad PEM stops the start with its path.
        crate::auth::Authenticator::new(&settings).map_err(|e| ConfigError::Invalid {
            key: if self.public_key.is_some() {
                "jwt.public_key"
            } else {
                "jwt.secret"
            },
            reason: match &self.public_key {
                Some(p) => format!("{}: {e}", p.display()),
                None => e.to_string(),
            },
        })?;
        Ok(settings)
    }
}

impl LimitsConfig {
    fn resolve(&self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let limits = Limits {
            max_message_bytes: self.max_message_bytes.unwrap_or(d.max_message_bytes),
            max_pull_bytes: self.max_pull_bytes.unwrap_or(d.max_pull_bytes),
            max_subscriptions_per_connection: self
                .max_subscriptions_per_connection
                .unwrap_or(d.max_subscriptions_per_connection),
            max_subscriptions_per_tenant: self
                .max_subscriptions_per_tenant
                .unwrap_or(d.max_subscriptions_per_tenant),
            max_connections_per_tenant: self
                .max_connections_per_tenant
                .unwrap_or(d.max_connections_per_tenant),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            push_rate_per_tenant: self.push_rate_per_tenant.unwrap_or(d.push_rate_per_tenant),
            push_burst_per_tenant: self
                .push_burst_per_tenant
                .unwrap_or(d.push_burst_per_tenant),
            push_bytes_per_tenant: self
                .push_bytes_per_tenant
                .unwrap_or(d.push_bytes_per_tenant),
            max_peers_per_tenant: self.max_peers_per_tenant.unwrap_or(d.max_peers_per_tenant),
            peer_retention: self.peer_retention_days.map_or(d.peer_retention, |days| {
                Duration::from_secs(days.saturating_mul(24 * 3600))
            }),
            outbox_items: self.outbox_items.unwrap_or(d.outbox_items),
            outbox_bytes: self.outbox_bytes.unwrap_or(d.outbox_bytes),
            max_wait: self.max_wait_ms.map_or(d.max_wait, Duration::from_millis),
        };
        // 1 KiB is the smallest message limit that still fits a hello, an
        // error answer and small pushes.
        if limits.max_message_bytes < 1024 || limits.max_message_bytes > 1 << 30 {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be between 1024 and 1073741824",
            ));
        }
        if limits.max_pull_bytes < limits.max_message_bytes {
            return Err(invalid(
                "limits.max_pull_bytes",
                "must be at least limits.max_message_bytes",
            ));
        }
        for (key, v) in [
            (
                "limits.max_subscriptions_per_connection",
                limits.max_subscriptions_per_connection,
            ),
            (
                "limits.max_subscriptions_per_tenant",
                limits.max_subscriptions_per_tenant,
            ),
            (
                "limits.max_connections_per_tenant",
                limits.max_connections_per_tenant,
            ),
            ("limits.max_connections", limits.max_connections),
            ("limits.outbox_items", limits.outbox_items),
            (
                "limits.max_peers_per_tenant",
                limits.max_peers_per_tenant.min(usize::MAX as u64) as usize,
            ),
            (
                "limits.peer_retention_days",
                (limits.peer_retention.as_secs() / (24 * 3600)) as usize,
            ),
            ("limits.outbox_bytes", limits.outbox_bytes),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (key, v) in [
            ("limits.push_rate_per_tenant", limits.push_rate_per_tenant),
            ("limits.push_burst_per_tenant", limits.push_burst_per_tenant),
            ("limits.push_bytes_per_tenant", limits.push_bytes_per_tenant),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(key, "must be a positive number"));
            }
        }
        if limits.push_burst_per_tenant < 1.0 {
            return Err(invalid(
                "limits.push_burst_per_tenant",
                "must be at least 1 (one push)",
            ));
        }
        if limits.push_bytes_per_tenant < 1024.0 {
            return Err(invalid(
                "limits.push_bytes_per_tenant",
                "must be at least 1024 (bytes per second)",
            ));
        }
        if limits.max_wait > Duration::from_secs(300) {
            return Err(invalid(
                "limits.max_wait_ms",
                "must be at most 300000 (5 minutes)",
            ));
        }
        Ok(limits)
    }
}

/// A validated configuration, ready to start the server with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How to start the engine.
    pub service: ServiceConfig,
    /// Where to listen.
    pub listen: SocketAddr,
    /// How to verify tokens.
    pub jwt: JwtSettings,
    /// The edge's own settings.
    pub edge: EdgeSettings,
    /// The policy file (re-read on SIGHUP).
    pub policy_path: PathBuf,
    /// The schema script (re-read on SIGHUP: what it adds is a schema
    /// change).
    pub schema_path: PathBuf,
    /// How log lines are written (the binary installs the subscriber).
    pub log_format: LogFormat,
    /// Set: this server is a node of a cluster (docs/CLUSTER.md).
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// How the server writes its log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, with the spans it is in.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format `{s}` (expected text or json)")),
        }
    }
}

/// What the HTTP/WebSocket edge needs beyond the service.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeSettings {
    /// Largest WebSocket message or HTTP body (`limits.max_message_bytes`).
    pub max_message_bytes: usize,
    /// A session that receives nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Time from the upgrade to a valid `hello`.
    pub hello_timeout: Duration,
    /// Interval of the server's ping frames.
    pub ping_interval: Duration,
    /// Bound on each shutdown step.
    pub shutdown_timeout: Duration,
}

impl Default for EdgeSettings {
    fn default() -> Self {
        EdgeSettings {
            max_message_bytes: tenantsync_protocol::DEFAULT_MAX_MESSAGE_BYTES,
            idle_timeout: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

fn required(
    value: &Option<PathBuf>,
    what: &'static str,
    key: &'static str,
    flag: &'static str,
) -> Result<PathBuf, ConfigError> {
    value.clone().ok_or_else(|| ConfigError::Missing {
        what,
        key,
        flag,
        env: env_var(key),
    })
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

fn read(path: &Path, what: &'static str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn to_table(config: &Config) -> toml::Table {
    match toml::Value::try_from(config).expect("a config serialises") {
        toml::Value::Table(t) => t,
        _ => unreachable!("a struct serialises as a table"),
    }
}

fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn insert_path(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    match dotted.split_once('.') {
        None => {
            table.insert(dotted.to_owned(), value);
        }
        Some((head, rest)) => {
            let sub = table
                .entry(head.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(sub) = sub {
                insert_path(sub, rest, value);
            }
        }
    }
}
