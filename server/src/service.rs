//! [`SyncService`]: the handle the edge (HTTP, WebSocket, CLI) uses.
//!
//! This file is the contract between the engine (the one writer thread, the
//! readers, the outboxes: docs/arch/server.md) and the edge (auth, routes,
//! sockets). The edge never touches SQLite; the engine never touches a socket.
//!
//! The signatures and documented behaviour are what both sides build
//! against; the bodies talk to the engine thread and the readers through
//! channels (no SQLite here, nothing blocking on the runtime).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fallible_iterator::FallibleIterator;
use tenantsync_core::{Change, CrrConnection, MergeStamping, Options};
use tenantsync_policy::{EffectiveQuery, Engine as PolicyEngine, PolicySet};
use tenantsync_protocol::ws::ServerMsg;
use tokio::sync::oneshot;

use crate::engine::{
    Cmd, Engine, PolicyState, PushCmd, PushReply, SharedPolicy, SqlCmd, Tuning, Who, Write,
};
use crate::outbox::{Drain, OutboxShared};
use crate::reader::{Job, PullJob, Readers};
use crate::schema::ServerSchema;

use serde_json::{Map, Value as Json};
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

/// Logs the policies that do not constrain the tenant column (named as the
/// tenant claim): `tenantsync policy check` shows the same warnings.
pub(crate) fn warn_cross_tenant(set: &PolicySet, tenant_claim: &str) {
    if let Some(w) = set.tenant_warnings(tenant_claim, tenant_claim) {
        for d in &w.items {
            tracing::warn!(file = %w.file, line = d.line, column = d.column, "{}", d.message);
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

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Inner {
    tx: mpsc::Sender<Cmd>,
    schema: Arc<ServerSchema>,
    policy: SharedPolicy,
    limits: Limits,
    tenant_claim: String,
    server_site: tenantsync_core::SiteId,
    version: Arc<AtomicI64>,
    readers: Arc<Readers>,
    rates: Mutex<HashMap<Arc<str>, Bucket>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            let (reply, _rx) = oneshot::channel();
            let _ = self.tx.send(Cmd::Shutdown { reply });
        }
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

fn stopped() -> ApiError {
    ApiError::new(ErrorCode::ShuttingDown, "the server is stopping")
}

/// The running service. Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct SyncService {
    inner: Arc<Inner>,
}

/// Splits an SQL script into statements: `;` outside strings, quoted
/// identifiers and comments ends one, except inside `CREATE TRIGGER ...
/// END`.
pub(crate) fn split_sql(sql: &str) -> Vec<&str> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, words: &mut Vec<String>| {
        if !word.is_empty() {
            words.push(std::mem::take(word).to_ascii_uppercase());
        }
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b'\'' | b'"' | b'`' | b'[' => {
                flush(&mut word, &mut words);
                let close = if c == b'[' { b']' } else { c };
                i += 1;
                while i < b.len() {
                    if b[i] == close {
                        if close != b']' && i + 1 < b.len() && b[i + 1] == close {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                flush(&mut word, &mut words);
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                flush(&mut word, &mut words);
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b';' => {
                flush(&mut word, &mut words);
                let trigger = words.first().is_some_and(|w| w == "CREATE")
                    && words.iter().take(4).any(|w| w == "TRIGGER");
                if !trigger || words.last().is_some_and(|w| w == "END") {
                    let stmt = sql[start..=i].trim();
                    if stmt.len() > 1 {
                        out.push(stmt);
                    }
                    start = i + 1;
                    words.clear();
                }
            }
            c if c.is_ascii_alphanumeric() || c == b'_' => word.push(c as char),
            _ => flush(&mut word, &mut words),
        }
        i += 1;
    }
    let rest = sql[start.min(sql.len())..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Runs a schema script statement by statement; a statement creating
/// something that exists is skipped (so a script without `IF NOT EXISTS`
/// can be applied at every start).
fn apply_schema(db: &CrrConnection, sql: &str) -> Result<(), String> {
    for stmt in split_sql(sql) {
        let r = (|| {
            let mut batch = rusqlite::Batch::new(db.conn(), stmt);
            while let Some(mut st) = batch.next()? {
                let mut rows = st.raw_query();
                while rows.next()?.is_some() {}
            }
            Ok::<(), rusqlite::Error>(())
        })();
        if let Err(e) = r {
            let m = e.to_string();
            if !m.contains("already exists") {
                return Err(format!("{m} (in: {stmt})"));
            }
        }
    }
    Ok(())
}

/// Why a change is not one cr-sqlite emits (docs/TESTING.md, "Fuzzing":
/// ill-formed changes merge, but not idempotently, so a server refuses
/// them): a causal length below 1, a column change of a deleted row (even
/// `cl`), a sentinel whose `col_version` is not its causal length or whose
/// value is not NULL, a column version below 1, a negative `seq`.
fn ill_formed(c: &Change) -> Option<String> {
    if c.cl < 1 {
        return Some(format!("its causal length {} is below 1", c.cl));
    }
    if c.seq < 0 {
        return Some(format!("its seq {} is negative", c.seq));
    }
    if c.is_sentinel() {
        if c.col_version != c.cl {
            return Some(format!(
                "a sentinel's col_version ({}) must equal its causal length ({})",
                c.col_version, c.cl
            ));
        }
        if c.val != tenantsync_types::Value::Null {
            return Some("a sentinel's value must be null".into());
        }
    } else {
        if c.cl % 2 == 0 {
            return Some(format!(
                "a column change must have an odd causal length (a live row), not {}",
                c.cl
            ));
        }
        if c.col_version < 1 {
            return Some(format!("its col_version {} is below 1", c.col_version));
        }
    }
    None
}

/// Cheap checks of a push before it reaches the engine.
pub(crate) fn validate_push(
    schema: &ServerSchema,
    site: &tenantsync_core::SiteId,
    from: i64,
    to: i64,
    changes: &[Change],
) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadPush, m);
    if to < from {
        return Err(bad(format!(
            "the range ({from}, {to}] is empty: `to` must be at least `from`"
        )));
    }
    if to > tenantsync_protocol::MAX_CLOCK {
        return Err(bad(format!(
            "`to` {to} is above {}, the largest version a peer may push (docs/PROTOCOL.md, \"Clocks\")",
            tenantsync_protocol::MAX_CLOCK
        )));
    }
    for (i, c) in changes.iter().enumerate() {
        if c.site_id != *site {
            return Err(ApiError::new(
                ErrorCode::SiteMismatch,
                format!(
                    "change {i} was authored by site {}, not by the pushing peer {site}: push only your own changes",
                    c.site_id
                ),
            ));
        }
        if c.db_version <= from || c.db_version > to {
            return Err(bad(format!(
                "change {i} has db_version {}, outside the push's range ({from}, {to}]",
                c.db_version
            )));
        }
        let Some(t) = schema.table(&c.table) else {
            return Err(bad(format!(
                "change {i}: table {:?} is not a CRR of this server",
                c.table
            )));
        };
        if !c.is_sentinel() && t.column(&c.cid).is_none() {
            return Err(bad(format!(
                "change {i}: table {:?} has no column {:?}",
                c.table, c.cid
            )));
        }
        if let Some(why) = ill_formed(c) {
            return Err(bad(format!(
                "change {i} ({:?}, pk {}, column {:?}) is not a change cr-sqlite emits: {why}",
                c.table, c.pk, c.cid
            )));
        }
        match c.pk.unpack() {
            Ok(v) if v.len() == t.pk.len() => {}
            Ok(v) => {
                return Err(bad(format!(
                    "change {i}: the pk of {:?} has {} values, the table's key has {}",
                    c.table,
                    v.len(),
                    t.pk.len()
                )));
            }
            Err(e) => {
                return Err(bad(format!(
                    "change {i}: the pk {} does not decode: {e}",
                    c.pk
                )));
            }
        }
    }
    Ok(())
}

impl SyncService {
    /// Opens the database, applies the schema, loads and validates the
    /// policies, starts the engine thread and the readers. Refuses to start
    /// on an invalid policy file (every diagnostic in the error).
    pub fn start(config: ServiceConfig) -> Result<SyncService, StartError> {
        let db_err = |e| StartError::Database {
            path: config.db_path.clone(),
            source: e,
        };
        let db = CrrConnection::open_with(
            &config.db_path,
            Options {
                merge_stamping: MergeStamping::Local,
                ..Options::default()
            },
        )
        .map_err(db_err)?;
        let sync = match config.synchronous {
            Synchronous::Full => "PRAGMA synchronous = FULL",
            Synchronous::Normal => "PRAGMA synchronous = NORMAL",
        };
        db.conn()
            .execute_batch(sync)
            .map_err(|e| db_err(e.into()))?;
        apply_schema(&db, &config.schema_sql).map_err(StartError::Schema)?;
        db.conn()
            .execute_batch(crate::store::CREATE)
            .map_err(|e| StartError::Schema(e.to_string()))?;
        let schema = Arc::new(ServerSchema::read(&db, &config.schema_sql).map_err(db_err)?);
        let set = PolicySet::parse(&config.policy_name, &config.policy_sql, &schema.policy)
            .map_err(|d| StartError::Policy {
                diagnostics: d.to_string().lines().map(str::to_owned).collect(),
            })?;
        warn_cross_tenant(&set, &config.tenant_claim);
        let policy = PolicyEngine::new(set);
        let shared: SharedPolicy = Arc::new(RwLock::new(PolicyState {
            epoch: 0,
            engine: Arc::new(policy.clone()),
        }));
        let server_site = db.site_id();
        let (tx, rx) = mpsc::channel();
        let readers = Arc::new(Readers::start(
            config.readers,
            &config.db_path,
            schema.clone(),
            tx.clone(),
            config.limits.max_message_bytes,
        )?);
        let version = Arc::new(AtomicI64::new(0));
        let engine = Engine::new(
            db,
            schema.clone(),
            policy,
            shared.clone(),
            config.limits.clone(),
            tx.clone(),
            readers.clone(),
            Tuning::default(),
            version.clone(),
            Arc::from(config.tenant_claim.as_str()),
        )
        .map_err(db_err)?;
        let thread = std::thread::Builder::new()
            .name("tenantsync-engine".into())
            .spawn(move || engine.run(rx))?;
        tracing::info!(db = %config.db_path.display(), site = %server_site, "tenantsync service started");
        Ok(SyncService {
            inner: Arc::new(Inner {
                tx,
                schema,
                policy: shared,
                limits: config.limits,
                tenant_claim: config.tenant_claim,
                server_site,
                version,
                readers,
                rates: Mutex::new(HashMap::new()),
                thread: Mutex::new(Some(thread)),
                stopped: AtomicBool::new(false),
            }),
        })
    }

    /// The server database's site id.
    pub fn server_site_id(&self) -> tenantsync_core::SiteId {
        self.inner.server_site
    }

    /// The last committed server version.
    pub fn db_version(&self) -> i64 {
        self.inner.version.load(Ordering::Acquire)
    }

    /// `GET /v1/schema`.
    pub fn schema(&self) -> SchemaResponse {
        self.inner.schema.response.clone()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The tenant claim's name (for [`Principal::from_claims`]).
    pub fn tenant_claim(&self) -> &str {
        &self.inner.tenant_claim
    }

    fn send(&self, c: Cmd) -> Result<(), ApiError> {
        if self.inner.stopped.load(Ordering::Acquire) {
            return Err(stopped());
        }
        self.inner.tx.send(c).map_err(|_| stopped())
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| stopped())
    }

    fn policy(&self) -> (u64, Arc<PolicyEngine>) {
        let p = self.inner.policy.read().unwrap_or_else(|p| p.into_inner());
        (p.epoch, p.engine.clone())
    }

    /// Takes one push from the tenant's token bucket.
    fn rate(&self, tenant: &Arc<str>) -> Result<(), ApiError> {
        let l = &self.inner.limits;
        let mut rates = self.inner.rates.lock().unwrap_or_else(|p| p.into_inner());
        let b = rates.entry(tenant.clone()).or_insert(Bucket {
            tokens: l.push_burst_per_tenant,
            at: Instant::now(),
        });
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * l.push_rate_per_tenant)
            .min(l.push_burst_per_tenant);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - b.tokens) / l.push_rate_per_tenant.max(1e-9) * 1000.0).ceil() as u64;
            let mut e = ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "tenant {:?} is over its push rate of {}/s; retry after {wait} ms",
                    &**tenant, l.push_rate_per_tenant
                ),
            );
            e.retry_after_ms = Some(wait.max(1));
            Err(e)
        }
    }

    /// Starts a WebSocket session after a valid `hello`: binds `site` to the
    /// principal's subject (or refuses with `site_bound_to_other_subject`),
    /// checks the connection limits, and queues `welcome` as the outbox's
    /// first frame. The edge then feeds every further client message to
    /// [`Session::handle`] and writes every frame [`Outbox::next`] yields.
    pub async fn open_session(
        &self,
        principal: Principal,
        site: tenantsync_core::SiteId,
        client: Option<String>,
    ) -> Result<(Session, Outbox), ApiError> {
        let l = &self.inner.limits;
        let outbox = Arc::new(OutboxShared::new(
            site,
            l.max_message_bytes,
            l.outbox_items,
            l.outbox_bytes,
        ));
        let who = Who::new(&principal);
        let ok = self
            .ask(|reply| Cmd::Open {
                who: who.clone(),
                site,
                client,
                outbox: outbox.clone(),
                reply,
            })
            .await??;
        let welcome = ServerMsg::Welcome {
            protocol: tenantsync_protocol::PROTOCOL_VERSION,
            server_site_id: self.inner.server_site,
            db_version: ok.db_version,
            peer: tenantsync_protocol::ws::PeerInfo {
                site_id: site,
                pushed_version: ok.pushed_version,
            },
            limits: tenantsync_protocol::ws::Limits {
                max_message_bytes: l.max_message_bytes,
                max_subscriptions: l.max_subscriptions_per_connection,
            },
        };
        outbox.push_frame(OutFrame::Text(
            serde_json::to_string(&welcome).expect("messages serialise"),
        ));
        Ok((
            Session {
                service: self.clone(),
                conn: ok.conn,
                site,
                who,
                outbox: outbox.clone(),
                subs: HashSet::new(),
            },
            Outbox {
                drain: Drain::new(outbox),
            },
        ))
    }

    /// `POST /v1/push`.
    pub async fn push(&self, p: &Principal, req: PushRequest) -> Result<PushResponse, PushError> {
        validate_push(
            &self.inner.schema,
            &req.site_id,
            req.from,
            req.to,
            &req.changes,
        )
        .map_err(PushError::Api)?;
        let who = Who::new(p);
        self.rate(&who.tenant).map_err(PushError::Api)?;
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Write(Write::Push(PushCmd {
            who,
            site: req.site_id,
            from: req.from,
            to: req.to,
            changes: req.changes,
            reply: PushReply::Http(tx),
            received: Instant::now(),
        })))
        .map_err(PushError::Api)?;
        rx.await.map_err(|_| PushError::Api(stopped()))?
    }

    /// `POST /v1/pull` (long-polls up to `min(wait_ms, limits.max_wait)`).
    pub async fn pull(&self, p: &Principal, req: PullRequest) -> Result<PullResponse, ApiError> {
        let (epoch, policy) = self.policy();
        let mut subs = Vec::new();
        let mut seen = HashSet::new();
        for s in req.subscriptions {
            if !seen.insert(s.id.clone()) {
                return Err(ApiError::new(
                    ErrorCode::BadMessage,
                    format!("subscription id {:?} is listed twice", s.id),
                ));
            }
            let q = policy.rewrite(&p.identity, &s.query).map_err(|e| {
                ApiError::new(
                    ErrorCode::QueryRefused,
                    format!("subscription {:?}: {e}", s.id),
                )
            })?;
            subs.push((s, Arc::new(q)));
        }
        let who = Who::new(p);
        let site = req.site_id;
        let meta: Vec<(String, String, String)> = subs
            .iter()
            .map(|(s, q)| (s.id.clone(), s.query.clone(), q.table.clone()))
            .collect();
        let tables: Vec<String> = subs
            .iter()
            .flat_map(|(_, q)| q.depends_on.clone())
            .collect();
        let items = self
            .ask(|reply| Cmd::PullBegin {
                who: who.clone(),
                site,
                subs,
                unsubscribe: req.unsubscribe,
                epoch,
                reply,
            })
            .await??;
        let wait = Duration::from_millis(req.wait_ms).min(self.inner.limits.max_wait);
        let deadline = Instant::now() + wait;
        let items = Arc::new(items);
        loop {
            let (tx, rx) = oneshot::channel();
            let job_items = items
                .iter()
                .map(|i| crate::reader::PullItem {
                    id: i.id.clone(),
                    q: i.q.clone(),
                    mode: i.mode,
                    base: i.base.clone(),
                })
                .collect();
            self.inner.readers.submit(
                &who.tenant,
                Job::Pull(PullJob {
                    site,
                    items: job_items,
                    max_bytes: self.inner.limits.max_pull_bytes,
                    reply: tx,
                }),
            );
            let r = rx.await.map_err(|_| stopped())??;
            let now = Instant::now();
            if r.any || now >= deadline || items.is_empty() {
                let done = r
                    .held
                    .iter()
                    .zip(&meta)
                    .map(|((id, h), (_, query, table))| {
                        (
                            id.clone(),
                            query.clone(),
                            table.clone(),
                            r.response.version,
                            h.clone(),
                        )
                    })
                    .collect();
                self.send(Cmd::PullEnd { site, done })?;
                return Ok(r.response);
            }
            let (wtx, wrx) = oneshot::channel();
            self.send(Cmd::PullWait {
                tables: tables.clone(),
                since: r.response.version,
                reply: wtx,
            })?;
            let _ = tokio::time::timeout(deadline - now, wrx).await;
        }
    }

    /// `POST /v1/sql` (service role only: `forbidden` otherwise).
    pub async fn sql(&self, p: &Principal, req: SqlRequest) -> Result<SqlResponse, ApiError> {
        if !p.service {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "POST /v1/sql needs a token with the service role",
            ));
        }
        let who = Who::new(p);
        self.ask(|reply| {
            Cmd::Write(Write::Sql(SqlCmd {
                who,
                statements: req.statements,
                reply,
            }))
        })
        .await?
    }

    /// Replaces the policy set if `policy_sql` is valid (`policy_invalid`
    /// with every diagnostic otherwise; the old set stays). Used by
    /// `POST /v1/admin/policy` (service role checked by the edge) and SIGHUP.
    pub async fn reload_policy(
        &self,
        policy_name: &str,
        policy_sql: &str,
    ) -> Result<PolicyReloadResponse, ApiError> {
        let (name, sql) = (policy_name.to_owned(), policy_sql.to_owned());
        self.ask(|reply| Cmd::Reload { name, sql, reply }).await?
    }

    /// `GET /v1/admin/peers/{site_id}` (service role checked by the edge).
    pub async fn peer_report(&self, site: tenantsync_core::SiteId) -> Result<PeerReport, ApiError> {
        self.ask(|reply| Cmd::Report { site, reply }).await?
    }

    /// Stops: every session's outbox yields `OutFrame::Close(shutting_down)`,
    /// queued writes are answered `shutting_down`, dirty cursors and held
    /// sets are persisted, the WAL is checkpointed, the database closed.
    /// Returns when done (bounded by `timeout`).
    pub async fn shutdown(&self, timeout: Duration) {
        if self.inner.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Cmd::Shutdown { reply: tx }).is_err() {
            return;
        }
        let _ = tokio::time::timeout(timeout, rx).await;
        let t = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = t {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// One WebSocket session's handle into the engine (after `hello`). Dropping
/// it detaches the session (its subscriptions stay resumable).
pub struct Session {
    service: SyncService,
    conn: crate::engine::ConnId,
    site: tenantsync_core::SiteId,
    who: Who,
    outbox: Arc<OutboxShared>,
    subs: HashSet<String>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.service.inner.tx.send(Cmd::Close { conn: self.conn });
    }
}

impl Session {
    fn frame(&self, m: &ServerMsg) {
        self.outbox.push_frame(OutFrame::Text(
            serde_json::to_string(m).expect("messages serialise"),
        ));
    }

    fn error(&self, e: ApiError, reference: Option<String>) {
        if e.code.closes_connection() {
            self.outbox.push_frame(OutFrame::Close {
                code: e.code,
                message: e.message,
            });
        } else {
            self.frame(&ServerMsg::Error(e.ws(reference)));
        }
    }

    fn send(&self, c: Cmd) {
        if let Err(e) = self.service.send(c) {
            self.error(e, None);
        }
    }

    /// Handles one client message (never `hello`, which opened the session:
    /// a second `hello` is answered `bad_message`). Every answer, data and
    /// error goes through the session's [`Outbox`], in protocol order.
    pub async fn handle(&mut self, msg: ClientMsg) {
        if self
            .who
            .principal
            .expires_at
            .is_some_and(|t| t <= SystemTime::now())
        {
            self.error(
                ApiError::new(
                    ErrorCode::TokenExpired,
                    "the session's token expired; reconnect with a fresh one",
                ),
                None,
            );
            return;
        }
        match msg {
            ClientMsg::Hello { .. } => self.error(
                ApiError::new(
                    ErrorCode::BadMessage,
                    "hello was already received on this session",
                ),
                None,
            ),
            ClientMsg::Subscribe { id, query, cursor } => {
                let l = &self.service.inner.limits;
                if !self.subs.contains(&id) && self.subs.len() >= l.max_subscriptions_per_connection
                {
                    let m = format!(
                        "this connection has its maximum of {} subscriptions",
                        l.max_subscriptions_per_connection
                    );
                    self.error(ApiError::new(ErrorCode::LimitExceeded, m), Some(id));
                    return;
                }
                let (epoch, policy) = self.service.policy();
                let q: EffectiveQuery = match policy.rewrite(&self.who.principal.identity, &query) {
                    Ok(q) => q,
                    Err(e) => {
                        self.error(
                            ApiError::new(ErrorCode::QueryRefused, e.to_string()),
                            Some(id),
                        );
                        return;
                    }
                };
                self.subs.insert(id.clone());
                self.send(Cmd::Subscribe {
                    conn: self.conn,
                    id: Arc::from(id.as_str()),
                    query,
                    cursor,
                    q: Arc::new(q),
                    epoch,
                });
            }
            ClientMsg::Unsubscribe { id } => {
                self.subs.remove(&id);
                self.send(Cmd::Unsubscribe {
                    conn: self.conn,
                    id,
                });
            }
            ClientMsg::Resync { sub, cursor } => self.send(Cmd::Resync {
                conn: self.conn,
                id: sub,
                cursor,
            }),
            ClientMsg::Ack { cursors } => self.send(Cmd::Ack {
                conn: self.conn,
                cursors,
            }),
            ClientMsg::Push {
                id,
                from,
                to,
                changes,
            } => {
                let inner = &self.service.inner;
                if let Err(e) = validate_push(&inner.schema, &self.site, from, to, &changes)
                    .and_then(|()| self.service.rate(&self.who.tenant))
                {
                    self.error(e, Some(id));
                    return;
                }
                self.send(Cmd::Write(Write::Push(PushCmd {
                    who: self.who.clone(),
                    site: self.site,
                    from,
                    to,
                    changes,
                    reply: PushReply::Ws {
                        outbox: self.outbox.clone(),
                        id,
                    },
                    received: Instant::now(),
                })));
            }
            ClientMsg::Ping { id } => self.frame(&ServerMsg::Pong { id }),
        }
    }

    /// Queues an error the edge detected (bad JSON, unknown type, too large).
    pub fn reply_error(&self, error: ErrorMsg) {
        if error.code.closes_connection() {
            self.outbox.push_frame(OutFrame::Close {
                code: error.code,
                message: error.message,
            });
        } else {
            self.frame(&ServerMsg::Error(error));
        }
    }

    /// The peer's site id.
    pub fn site(&self) -> tenantsync_core::SiteId {
        self.site
    }
}

/// The frames for one WebSocket session, in order: welcome, answers,
/// `subscribed`, sync chunks, coalesced `changes` checkpoints.
pub struct Outbox {
    drain: Drain,
}

impl Outbox {
    /// The next frame; `None` when the session is over (after a `Close`).
    pub async fn next(&mut self) -> Option<OutFrame> {
        self.drain.next().await
    }

    /// Tells the outbox a frame it yielded was written to the socket (for
    /// the delivery-latency histogram and the lagging/drained bookkeeping).
    pub fn written(&mut self) {
        self.drain.written();
    }
}

#[cfg(test)]
mod tests {
    use super::split_sql;
    use tenantsync_core::Change;

    #[test]
    fn scripts_split_into_statements() {
        let sql = "-- a; comment\nCREATE TABLE t (a TEXT DEFAULT ';');\n/* b; */ CREATE TABLE \"x;y\" (b);\n\
                   CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'x;'; DELETE FROM t; END;\n\
                   SELECT crsql_as_crr('t')";
        assert_eq!(
            split_sql(sql),
            vec![
                "-- a; comment\nCREATE TABLE t (a TEXT DEFAULT ';');",
                "/* b; */ CREATE TABLE \"x;y\" (b);",
                "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 'x;'; DELETE FROM t; END;",
                "SELECT crsql_as_crr('t')",
            ]
        );
    }

    /// Regression (issue 6): ill-formed changes merge in cr-sqlite 0.16, but
    /// not idempotently, so a push carrying one is refused before the
    /// engine (docs/TESTING.md, "Fuzzing").
    #[test]
    fn ill_formed_changes_are_named() {
        fn change(cid: &str, val: tenantsync_types::Value, col_version: i64, cl: i64) -> Change {
            Change {
                table: "t".into(),
                pk: tenantsync_core::PackedPk::pack(&[tenantsync_types::Value::Integer(1)])
                    .unwrap(),
                cid: cid.into(),
                val,
                col_version,
                db_version: 1,
                site_id: tenantsync_core::SiteId([1; 16]),
                cl,
                seq: 0,
            }
        }
        use tenantsync_types::Value::{Integer, Null};
        let check = |c: Change, expected: Option<&str>| {
            let got = super::ill_formed(&c);
            match expected {
                None => assert_eq!(got, None, "{c:?}"),
                Some(e) => assert!(got.as_deref().unwrap_or("").contains(e), "{c:?}: {got:?}"),
            }
        };
        check(change("a", Integer(5), 1, 1), None);
        check(change("a", Integer(5), 4, 3), None);
        check(change("-1", Null, 1, 1), None);
        check(change("-1", Null, 2, 2), None);
        check(change("a", Integer(5), 1, 2), Some("odd causal length"));
        check(
            change("a", Integer(5), 0, 1),
            Some("col_version 0 is below 1"),
        );
        check(
            change("-1", Null, 3, 1),
            Some("must equal its causal length"),
        );
        check(change("-1", Integer(1), 1, 1), Some("value must be null"));
        check(change("-1", Null, 0, 0), Some("causal length 0 is below 1"));
        let mut neg = change("a", Integer(5), 1, 1);
        neg.seq = -1;
        check(neg, Some("seq -1 is negative"));
    }
}
