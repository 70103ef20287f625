//! The contract the edge and the engine share, and nothing else: who calls
//! ([`Principal`]), what the service enforces ([`Limits`]) and how it is
//! started ([`ServiceConfig`]), what it answers when something is wrong
//! ([`ApiError`], [`PushError`]) and what it hands the WebSocket writer
//! ([`OutFrame`]). A leaf module: it imports neither side.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value as Json};
use tenantsync_policy::Identity;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::ErrorBody;
use tenantsync_protocol::ws::{ErrorMsg, PushRefusal};

/// SQLite's `synchronous` for the server database (docs/arch/server.md,
/// "Durability").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: an acknowledged push survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints: an acknowledged push survives a process crash,
    /// the last transactions may be lost on power loss.
    Normal,
}

/// Limits the service enforces (docs/PROTOCOL.md §10).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket message or HTTP body accepted, in bytes.
    pub max_message_bytes: usize,
    /// Largest pull answer, in bytes.
    pub max_pull_bytes: usize,
    /// Subscriptions per WebSocket connection.
    pub max_subscriptions_per_connection: usize,
    /// Subscriptions per tenant (all its peers together).
    pub max_subscriptions_per_tenant: usize,
    /// Open WebSocket connections per tenant.
    pub max_connections_per_tenant: usize,
    /// Open WebSocket connections in all.
    pub max_connections: usize,
    /// Pushes (changesets) per second per tenant, sustained.
    pub push_rate_per_tenant: f64,
    /// Pushes a tenant may send in a burst.
    pub push_burst_per_tenant: f64,
    /// Bytes of changes per second per tenant, sustained; a burst may
    /// reach twice `max_message_bytes` (or the rate, if larger).
    pub push_bytes_per_tenant: f64,
    /// Peers (site ids) a tenant may have bound; a new one over it is
    /// `limit_exceeded` until others are forgotten.
    pub max_peers_per_tenant: u64,
    /// How long a peer that is not connected is remembered (its site
    /// binding, pushed version and subscription cursors).
    pub peer_retention: Duration,
    /// Items a connection's outbox holds before the peer counts as lagging.
    pub outbox_items: usize,
    /// Bytes a connection's outbox holds before the peer counts as lagging.
    pub outbox_bytes: usize,
    /// Longest long-poll wait (`wait_ms` is capped to it).
    pub max_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: tenantsync_protocol::DEFAULT_MAX_MESSAGE_BYTES,
            max_pull_bytes: 64 * 1024 * 1024,
            max_subscriptions_per_connection: 100,
            max_subscriptions_per_tenant: 100_000,
            max_connections_per_tenant: 10_000,
            max_connections: 100_000,
            push_rate_per_tenant: 2000.0,
            push_burst_per_tenant: 4000.0,
            push_bytes_per_tenant: 1024.0 * 1024.0,
            max_peers_per_tenant: 100_000,
            peer_retention: Duration::from_secs(90 * 24 * 3600),
            outbox_items: 1024,
            outbox_bytes: 16 * 1024 * 1024,
            max_wait: Duration::from_secs(30),
        }
    }
}

/// How to start the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The server database (created if missing).
    pub db_path: PathBuf,
    /// The schema script, applied idempotently at start (CREATE TABLE IF NOT
    /// EXISTS semantics: tables that exist are kept; `crsql_as_crr` is
    /// idempotent).
    pub schema_sql: String,
    /// The policy file's name (for diagnostics) and text.
    pub policy_name: String,
    /// The policy file's text.
    pub policy_sql: String,
    /// The claim that names an identity's tenant.
    pub tenant_claim: String,
    /// Limits.
    pub limits: Limits,
    /// Reader threads for syncs and pulls.
    pub readers: usize,
    /// Durability of the server database.
    pub synchronous: Synchronous,
    /// How many shards (databases with their own writer) the node runs; a
    /// database keeps the number it was created with.
    pub shards: usize,
    /// Tenants placed in a given shard instead of by hash.
    pub shard_overrides: std::collections::BTreeMap<String, usize>,
    /// How long idle state stays in memory: a detached subscription, a
    /// pull state no pull named, a peer neither connected nor active (the
    /// database keeps what they acknowledged). 60 s.
    pub idle_grace: std::time::Duration,
    /// A backend endpoint that sees pushed rows before they commit.
    pub write_hook: Option<WriteHook>,
}

/// `[write_hook]`: a backend endpoint that sees every pushed row of its
/// tables as it would be after the merge, after the policy checks and
/// before the commit, and accepts or refuses each (docs/SAAS.md).
#[derive(Debug, Clone, PartialEq)]
pub struct WriteHook {
    /// `http://` or `https://` URL it is POSTed to.
    pub url: String,
    /// The tables whose rows it sees (empty: every table).
    pub tables: Vec<String>,
    /// How long one call may take.
    pub timeout: std::time::Duration,
    /// Calls after a failed one (a timeout, no connection, an error status
    /// or an answer that is not a verdict per row).
    pub retries: u32,
    /// What a push gets when every call failed: refused (the default) or
    /// accepted.
    pub accept_on_failure: bool,
}

impl ServiceConfig {
    /// A configuration with the defaults: tenant claim `tenant_id`, default
    /// limits, 2 readers, `synchronous=FULL`.
    pub fn new(
        db_path: impl Into<PathBuf>,
        schema_sql: impl Into<String>,
        policy_name: impl Into<String>,
        policy_sql: impl Into<String>,
    ) -> Self {
        ServiceConfig {
            db_path: db_path.into(),
            schema_sql: schema_sql.into(),
            policy_name: policy_name.into(),
            policy_sql: policy_sql.into(),
            tenant_claim: "tenant_id".into(),
            limits: Limits::default(),
            readers: 2,
            synchronous: Synchronous::Full,
            shards: 1,
            shard_overrides: std::collections::BTreeMap::new(),
            idle_grace: std::time::Duration::from_secs(60),
            write_hook: None,
        }
    }
}

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened or the schema not applied.
    #[error("cannot open the server database {path}: {source}")]
    Database {
        /// The database path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: tenantsync_core::Error,
    },
    /// The schema script failed.
    #[error("the schema script failed: {0}")]
    Schema(String),
    /// The policy file is invalid: every diagnostic, rendered
    /// `<file>:<line>:<col>: <message>`.
    #[error("the policy file is invalid:\n{}", .diagnostics.join("\n"))]
    Policy {
        /// Each diagnostic.
        diagnostics: Vec<String>,
    },
    /// The shards on disk are not the ones configured.
    #[error("{0}")]
    Layout(String),
    /// A thread could not be started.
    #[error("cannot start the service: {0}")]
    Io(#[from] std::io::Error),
}

/// Who is calling: the claims of a verified token. Built by the edge from a
/// token it verified; nothing else creates one.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The claims, for policies.
    pub identity: Arc<Identity>,
    /// `sub`.
    pub subject: String,
    /// The tenant claim (as text), if present.
    pub tenant: Option<String>,
    /// `role == "service"`: bypasses row-level security.
    pub service: bool,
    /// `exp`.
    pub expires_at: Option<SystemTime>,
}

impl Principal {
    /// A principal from verified claims; `tenant_claim` names the tenant.
    /// `sub` must be a non-empty string (the edge refuses tokens without one).
    pub fn from_claims(claims: Map<String, Json>, tenant_claim: &str) -> Principal {
        let subject = claims
            .get("sub")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned();
        let tenant = claims.get(tenant_claim).and_then(|v| match v {
            Json::String(s) => Some(s.clone()),
            Json::Null => None,
            other => Some(other.to_string()),
        });
        let service = claims.get("role").and_then(Json::as_str) == Some("service");
        // The edge verified the claim: an unreadable one cannot reach here.
        let expires_at =
            crate::auth::claim_time(&claims, "exp", crate::auth::Round::Down).unwrap_or(None);
        Principal {
            identity: Arc::new(Identity::new(claims)),
            subject,
            tenant,
            service,
            expires_at,
        }
    }
}

/// An error answer of the service: what the edge turns into an HTTP error
/// body or a WebSocket `error` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The protocol's code (HTTP status from it).
    pub code: ErrorCode,
    /// Human-readable, naming what was wrong.
    pub message: String,
    /// For `policy_invalid`: every diagnostic.
    pub diagnostics: Vec<String>,
    /// For `gap`.
    pub pushed_version: Option<i64>,
    /// For `rate_limited`.
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    /// An error with a code and a message. An `internal` error's message
    /// (an SQLite error, the effective SQL of a policy, a path) never
    /// reaches a client: it goes to the log under an incident number, and
    /// the client reads only that number.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        let mut message = message.into();
        if code == ErrorCode::Internal {
            message = incident(&message);
        }
        ApiError {
            code,
            message,
            diagnostics: Vec::new(),
            pushed_version: None,
            retry_after_ms: None,
        }
    }

    /// The HTTP error body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
            diagnostics: self.diagnostics.clone(),
            pushed_version: self.pushed_version,
            retry_after_ms: self.retry_after_ms,
        }
    }

    /// The WebSocket `error` message answering request `reference`.
    pub fn ws(&self, reference: Option<String>) -> ErrorMsg {
        ErrorMsg {
            code: self.code,
            message: self.message.clone(),
            reference,
            pushed_version: self.pushed_version,
            retry_after_ms: self.retry_after_ms,
        }
    }
}

/// Logs an internal error's detail and returns what a client may read of
/// it: an incident number to find it in the log.
fn incident(detail: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = format!("{:x}-{n}", std::process::id());
    tracing::error!(incident = %id, detail, "internal error");
    format!("internal error (incident {id}; the server's log has the details)")
}

/// A push that was not applied.
#[derive(Debug, Clone, PartialEq)]
pub enum PushError {
    /// Write policies refused rows: nothing applied, `pushed_version`
    /// unchanged (HTTP 403 with the refusal as body).
    Refused(Box<PushRefusal>),
    /// Any other error (gap, bad_push, site_mismatch, rate_limited, ...).
    Api(ApiError),
}

/// One frame for the WebSocket writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    /// A text frame: one server message's JSON.
    Text(String),
    /// Send this `error`, then a close frame, and end the session.
    Close {
        /// Why.
        code: ErrorCode,
        /// In words.
        message: String,
    },
}
