//! [`SyncService`]: the handle the edge (HTTP, WebSocket, CLI) uses.
//!
//! This file is the contract between the engine (the one writer thread, the
//! readers, the outboxes: docs/arch/server.md) and the edge (auth, routes,
//! sockets). The edge never touches SQLite; the engine never touches a socket.
//!
//! CONTRACT SKELETON: the bodies are implemented on the engine branch; the
//! signatures and documented behaviour are what both sides build against.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value as Json};
use tenantsync_core::SiteId;
use tenantsync_policy::Identity;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::{
    ErrorBody, PeerReport, PolicyReloadResponse, PullRequest, PullResponse, PushRequest,
    PushResponse, SchemaResponse, SqlRequest, SqlResponse,
};
use tenantsync_protocol::ws::{ClientMsg, ErrorMsg, PushRefusal};

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
        let expires_at = claims
            .get("exp")
            .and_then(Json::as_u64)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
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
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
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

/// A push that was not applied.
#[derive(Debug, Clone, PartialEq)]
pub enum PushError {
    /// Write policies refused rows: nothing applied, the push is consumed
    /// (HTTP 403 with the refusal as body).
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

/// The running service. Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct SyncService {
    _inner: Arc<()>,
}

impl SyncService {
    /// Opens the database, applies the schema, loads and validates the
    /// policies, starts the engine thread and the readers. Refuses to start
    /// on an invalid policy file (every diagnostic in the error).
    pub fn start(_config: ServiceConfig) -> Result<SyncService, StartError> {
        unimplemented!("engine branch")
    }

    /// The server database's site id.
    pub fn server_site_id(&self) -> SiteId {
        unimplemented!("engine branch")
    }

    /// The last committed server version.
    pub fn db_version(&self) -> i64 {
        unimplemented!("engine branch")
    }

    /// `GET /v1/schema`.
    pub fn schema(&self) -> SchemaResponse {
        unimplemented!("engine branch")
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        unimplemented!("engine branch")
    }

    /// The tenant claim's name (for [`Principal::from_claims`]).
    pub fn tenant_claim(&self) -> &str {
        unimplemented!("engine branch")
    }

    /// Starts a WebSocket session after a valid `hello`: binds `site` to the
    /// principal's subject (or refuses with `site_bound_to_other_subject`),
    /// checks the connection limits, and queues `welcome` as the outbox's
    /// first frame. The edge then feeds every further client message to
    /// [`Session::handle`] and writes every frame [`Outbox::next`] yields.
    pub async fn open_session(
        &self,
        _principal: Principal,
        _site: SiteId,
        _client: Option<String>,
    ) -> Result<(Session, Outbox), ApiError> {
        unimplemented!("engine branch")
    }

    /// `POST /v1/push`.
    pub async fn push(&self, _p: &Principal, _req: PushRequest) -> Result<PushResponse, PushError> {
        unimplemented!("engine branch")
    }

    /// `POST /v1/pull` (long-polls up to `min(wait_ms, limits.max_wait)`).
    pub async fn pull(&self, _p: &Principal, _req: PullRequest) -> Result<PullResponse, ApiError> {
        unimplemented!("engine branch")
    }

    /// `POST /v1/sql` (service role only: `forbidden` otherwise).
    pub async fn sql(&self, _p: &Principal, _req: SqlRequest) -> Result<SqlResponse, ApiError> {
        unimplemented!("engine branch")
    }

    /// Replaces the policy set if `policy_sql` is valid (`policy_invalid`
    /// with every diagnostic otherwise; the old set stays). Used by
    /// `POST /v1/admin/policy` (service role checked by the edge) and SIGHUP.
    pub async fn reload_policy(
        &self,
        _policy_name: &str,
        _policy_sql: &str,
    ) -> Result<PolicyReloadResponse, ApiError> {
        unimplemented!("engine branch")
    }

    /// `GET /v1/admin/peers/{site_id}` (service role checked by the edge).
    pub async fn peer_report(&self, _site: SiteId) -> Result<PeerReport, ApiError> {
        unimplemented!("engine branch")
    }

    /// Stops: every session's outbox yields `OutFrame::Close(shutting_down)`,
    /// queued writes are answered `shutting_down`, dirty cursors and held
    /// sets are persisted, the WAL is checkpointed, the database closed.
    /// Returns when done (bounded by `timeout`).
    pub async fn shutdown(&self, _timeout: Duration) {
        unimplemented!("engine branch")
    }
}

/// One WebSocket session's handle into the engine (after `hello`). Dropping
/// it detaches the session (its subscriptions stay resumable).
pub struct Session {
    _private: (),
}

impl Session {
    /// Handles one client message (never `hello`, which opened the session:
    /// a second `hello` is answered `bad_message`). Every answer, data and
    /// error goes through the session's [`Outbox`], in protocol order.
    pub async fn handle(&mut self, _msg: ClientMsg) {
        unimplemented!("engine branch")
    }

    /// Queues an error the edge detected (bad JSON, unknown type, too large).
    pub fn reply_error(&self, _error: ErrorMsg) {
        unimplemented!("engine branch")
    }

    /// The peer's site id.
    pub fn site(&self) -> SiteId {
        unimplemented!("engine branch")
    }
}

/// The frames for one WebSocket session, in order: welcome, answers,
/// `subscribed`, sync chunks, coalesced `changes` checkpoints.
pub struct Outbox {
    _private: (),
}

impl Outbox {
    /// The next frame; `None` when the session is over (after a `Close`).
    pub async fn next(&mut self) -> Option<OutFrame> {
        unimplemented!("engine branch")
    }

    /// Tells the outbox a frame it yielded was written to the socket (for
    /// the delivery-latency histogram and the lagging/drained bookkeeping).
    pub fn written(&mut self) {
        unimplemented!("engine branch")
    }
}
