//! The engine thread: the only writer of the server database and the place
//! where every visibility decision is taken, at an exact version
//! (docs/arch/server.md, "The engine loop").
//!
//! - [`Cmd`]: what the async side and the readers send it.
//! - `build`: views built by a reader, installed and caught up by the
//!   engine; what waits on them (a subscription and its connection's later
//!   commands, a policy reload) parked in order.
//! - `filters`: views, membership instances, the equality index, `holders`.
//! - `commit`: the CommitBatch (changes of a commit, encoded once).
//! - `subs`: subscriptions (pending, live, lagging, detached) and their
//!   exact held-set tracking; connections; fan-out to outboxes.
//! - `write`: pushes (policy checks before/after, refusals with state) and
//!   service SQL (under an authorizer), in fair group commits.
//! - `migrate`: schema scripts (classified by SQLite's authorizer, CRR
//!   alters wrapped) and the schema versions; `evolve`: a schema change
//!   in two phases on the engine thread.

mod build;
mod commit;
pub(crate) mod evolve;
pub(crate) mod fair;
pub(crate) mod filters;
pub(crate) mod journal;
pub(crate) mod layout;
mod longpoll;
pub(crate) mod migrate;
pub(crate) mod outbox;
pub(crate) mod push_check;
pub(crate) mod reader;
pub(crate) mod schema;
pub(crate) mod shard;
pub(crate) mod store;
mod subs;
mod write;

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tenantsync_core::{CrrConnection, SiteId};
use tenantsync_policy::{EffectiveQuery, Engine as PolicyEngine, PolicySet};
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::{
    PeerReport, PolicyReloadResponse, PullSub, SqlResponse, SqlStatement,
};
use tokio::sync::oneshot;

pub(crate) use filters::PkSet;
use filters::{FxMap, FxSet};
pub(crate) use write::push_answer_frame;

use crate::contract::{ApiError, Limits, Principal};
use crate::engine::fair::FairQueue;
use crate::engine::outbox::OutboxShared;
use crate::engine::reader::{PullItem, Readers};
use crate::engine::schema::{SchemaCell, ServerSchema};

/// A subscription's identity: (peer site, subscription id).
pub(crate) type SubKey = (SiteId, Arc<str>);
pub(crate) type ConnId = u64;

/// The policies every session rewrites with (the engine replaces them).
pub(crate) struct PolicyState {
    pub epoch: u64,
    pub engine: Arc<PolicyEngine>,
}

pub(crate) type SharedPolicy = Arc<RwLock<PolicyState>>;

/// Who wrote: what the engine needs of a principal.
#[derive(Clone)]
pub(crate) struct Who {
    pub principal: Principal,
    /// The claims' canonical JSON (caches are keyed by it).
    pub ident_key: Arc<str>,
    pub tenant: Arc<str>,
    /// Service SQL on a node of several shards: the one tenant whose rows
    /// its statements may write.
    pub scope: Option<Arc<str>>,
}

impl Who {
    pub fn new(p: &Principal) -> Who {
        Who {
            ident_key: Arc::from(
                serde_json::to_string(p.identity.claims()).expect("claims serialise"),
            ),
            tenant: Arc::from(p.tenant.as_deref().unwrap_or("")),
            scope: None,
            principal: p.clone(),
        }
    }
}

/// A session opened: its connection (the `welcome` is queued already).
pub(crate) struct OpenOk {
    pub conn: ConnId,
}

pub(crate) enum PushReply {
    Ws {
        outbox: Arc<OutboxShared>,
        id: String,
    },
    /// The HTTP path (and a WebSocket push to hooked tables): may be
    /// asked to consult the backend first (`crate::hook`).
    Http(oneshot::Sender<crate::hook::PushAnswer>),
}

pub(crate) struct PushCmd {
    pub who: Who,
    pub site: SiteId,
    pub from: i64,
    pub to: i64,
    pub changes: Vec<tenantsync_core::Change>,
    pub reply: PushReply,
    pub received: Instant,
    /// The backend's verdicts on this push's rows (its second run).
    pub hook: Option<Arc<crate::hook::HookRound>>,
}

pub(crate) struct SqlCmd {
    pub who: Who,
    pub statements: Vec<SqlStatement>,
    pub reply: oneshot::Sender<Result<SqlResponse, ApiError>>,
}

pub(crate) enum Write {
    Push(PushCmd),
    Sql(SqlCmd),
}

pub(crate) enum Cmd {
    Open {
        who: Who,
        site: SiteId,
        client: Option<String>,
        /// The schema version the peer's hello says it has.
        known_schema: Option<i64>,
        outbox: Arc<OutboxShared>,
        reply: oneshot::Sender<Result<OpenOk, ApiError>>,
    },
    Close {
        conn: ConnId,
    },
    Subscribe {
        conn: ConnId,
        id: Arc<str>,
        query: String,
        cursor: Option<i64>,
        q: Arc<EffectiveQuery>,
        epoch: u64,
    },
    Unsubscribe {
        conn: ConnId,
        id: String,
    },
    Resync {
        conn: ConnId,
        id: String,
        cursor: i64,
    },
    Ack {
        conn: ConnId,
        cursors: BTreeMap<String, i64>,
    },
    Write(Write),
    PullBegin {
        who: Who,
        site: SiteId,
        subs: Vec<(PullSub, Arc<EffectiveQuery>)>,
        unsubscribe: Vec<String>,
        epoch: u64,
        reply: oneshot::Sender<Result<(Vec<PullItem>, i64), ApiError>>,
    },
    PullEnd {
        site: SiteId,
        done: Vec<(String, String, String, i64, Arc<PkSet>)>,
    },
    PullWait {
        who: Who,
        site: SiteId,
        /// (subscription id, its main table, every table it depends on).
        subs: Vec<(Arc<str>, String, Vec<String>)>,
        since: i64,
        reply: oneshot::Sender<()>,
    },
    Reload {
        name: String,
        sql: String,
        reply: oneshot::Sender<Result<PolicyReloadResponse, ApiError>>,
    },
    Report {
        site: SiteId,
        reply: oneshot::Sender<Result<PeerReport, ApiError>>,
    },
    SyncDone {
        sub: SubKey,
        epoch: u64,
        version: i64,
        held: Arc<PkSet>,
        /// The last chunk's text (queued by the engine).
        last: String,
    },
    SyncAbandoned {
        sub: SubKey,
        epoch: u64,
    },
    Drained {
        conn: ConnId,
    },
    /// A reader's view build (`build`).
    Built {
        id: u64,
        result: Result<build::Built, String>,
    },
    /// A schema change (`evolve`).
    Schema(evolve::SchemaCmd),
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// What a shard holds, published by its engine every tick (and the
/// version at every commit) for `/v1/admin/status`.
#[derive(Default)]
pub(crate) struct ShardStats {
    /// The shard's index (the `shard` label of its gauges).
    pub index: usize,
    pub version: std::sync::atomic::AtomicI64,
    pub connections: std::sync::atomic::AtomicU64,
    pub subscriptions: std::sync::atomic::AtomicU64,
    pub views: std::sync::atomic::AtomicU64,
    /// View builds out on the readers.
    pub views_building: std::sync::atomic::AtomicU64,
    pub pull_states: std::sync::atomic::AtomicU64,
    pub peers_in_memory: std::sync::atomic::AtomicU64,
    pub long_polls: std::sync::atomic::AtomicU64,
    /// Pulls read by the readers (a long-poll reads again when woken).
    pub pull_reads: std::sync::atomic::AtomicU64,
    /// Whether the last group commit failed to begin or commit (the shard
    /// cannot write: the server is not ready).
    pub write_failed: std::sync::atomic::AtomicBool,
    /// In a cluster: another node appended to the shard's log.
    pub fenced: std::sync::atomic::AtomicBool,
}

impl ShardStats {
    /// As the status endpoint shows it.
    pub fn json(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "shard": self.index,
            "db_version": self.version.load(std::sync::atomic::Ordering::Acquire),
            "connections": self.connections.load(Relaxed),
            "subscriptions": self.subscriptions.load(Relaxed),
            "views": self.views.load(Relaxed),
            "views_building": self.views_building.load(Relaxed),
            "pull_states": self.pull_states.load(Relaxed),
            "peers_in_memory": self.peers_in_memory.load(Relaxed),
            "long_polls": self.long_polls.load(Relaxed),
            "pull_reads": self.pull_reads.load(Relaxed),
        })
    }
}

impl Cmd {
    /// The connection of a session command (one whose order on its
    /// connection matters: subscribe, unsubscribe, resync, ack, close).
    fn session_conn(&self) -> Option<ConnId> {
        match self {
            Cmd::Subscribe { conn, .. }
            | Cmd::Unsubscribe { conn, .. }
            | Cmd::Resync { conn, .. }
            | Cmd::Ack { conn, .. }
            | Cmd::Close { conn } => Some(*conn),
            _ => None,
        }
    }
}

/// Tunables of the engine loop.
#[derive(Debug, Clone)]
pub(crate) struct Tuning {
    /// Writes per tenant per group commit.
    pub quantum: usize,
    /// Writes per group commit.
    pub max_group: usize,
    /// How long a detached subscription stays in memory.
    pub grace: Duration,
    /// How long a view without subscriptions is kept.
    pub view_idle: Duration,
    /// Subscription rows persisted per tick.
    pub persist_batch: usize,
    /// Parts buffered for a pending subscription before it falls back to a
    /// resume.
    pub pending_parts: usize,
    /// How often quiet subscriptions get an empty part.
    pub heartbeat: Duration,
    /// The engine time subscriptions (their view creation) may take
    /// between two group commits.
    pub session_budget: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            quantum: 8,
            max_group: 256,
            grace: Duration::from_secs(60),
            view_idle: Duration::from_secs(30),
            persist_batch: 2000,
            pending_parts: 4096,
            heartbeat: Duration::from_secs(10),
            session_budget: Duration::from_millis(10),
        }
    }
}

struct Peer {
    subject: String,
    tenant: Option<String>,
    claims: String,
    pushed_version: i64,
    /// Last bound (a session opened, a push, a pull): a peer neither
    /// connected nor used for the grace period leaves memory.
    last_used: Instant,
}

pub(crate) struct Engine {
    db: CrrConnection,
    schema: Arc<ServerSchema>,
    /// Where the schema in force is published (readers, service).
    cell: Arc<SchemaCell>,
    policy: PolicyEngine,
    policy_gen: u64,
    shared_policy: SharedPolicy,
    /// The version the engine's connection reads at (last commit).
    version: i64,
    limits: Limits,
    tuning: Tuning,
    tx: Sender<Cmd>,
    readers: Arc<Readers>,
    writes: FairQueue<Write>,
    /// Subscriptions waiting for their turn, per tenant, with the later
    /// commands of their connections (kept in order behind them).
    sessions: FairQueue<Cmd>,
    /// Connections with commands in `sessions` or parked behind a build,
    /// and how many.
    deferred: FxMap<ConnId, usize>,
    builds: build::Builds,
    peers: FxMap<SiteId, Peer>,
    filters: filters::Filters,
    subs: subs::Subs,
    plans: write::Plans,
    longpolls: longpoll::LongPolls,
    /// Per table: its tenant column when reads of it are tenant-scoped.
    read_scope: longpoll::ReadScope,
    last_tick: Instant,
    last_heartbeat: Instant,
    /// When idle peers, pull states and expired peers were last swept.
    last_sweep: Instant,
    last_retention: Option<Instant>,
    stopping: bool,
    /// Set while a service statement is prepared (the authorizer judges).
    guard: Arc<std::sync::atomic::AtomicBool>,
    /// The committed version and what the shard holds, for
    /// [`crate::SyncService::db_version`] and `/v1/admin/status`.
    stats: Arc<ShardStats>,
    /// The claim (and column) naming a tenant.
    tenant_claim: Arc<str>,
    /// The tenant scoped service SQL may write (`write::install_scope_guard`).
    scope: write::Scope,
    /// The tables whose pushed rows the backend's write hook judges
    /// (`None`: no hook).
    hooked: Option<FxSet<u16>>,
    /// Whether the hook judges every table (tables added later too).
    hook_all: bool,
    /// In a cluster: the shard's log, which every commit passes through.
    journal: Option<Box<dyn journal::Journal>>,
    /// Why the shard takes no more writes (another node appended to its log).
    fenced: Option<String>,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: CrrConnection,
        cell: Arc<SchemaCell>,
        policy: PolicyEngine,
        shared_policy: SharedPolicy,
        limits: Limits,
        tx: Sender<Cmd>,
        readers: Arc<Readers>,
        tuning: Tuning,
        stats: Arc<ShardStats>,
        tenant_claim: Arc<str>,
    ) -> tenantsync_core::Result<Engine> {
        let mut db = db;
        let schema = cell.get();
        let version = db.db_version()?;
        let guard = Arc::new(std::sync::atomic::AtomicBool::new(false));
        write::install_authorizer(&mut db, guard.clone())?;
        let scope: write::Scope = Arc::default();
        let read_scope = longpoll::read_scope(&schema, policy.policies(), &tenant_claim);
        write::install_scope_guard(&db, &tenant_claim, scope.clone())?;
        stats
            .version
            .store(version, std::sync::atomic::Ordering::Release);
        Ok(Engine {
            db,
            schema,
            cell,
            policy,
            policy_gen: 0,
            shared_policy,
            version,
            limits,
            tuning,
            tx,
            readers,
            writes: FairQueue::default(),
            sessions: FairQueue::default(),
            deferred: FxMap::default(),
            builds: build::Builds::default(),
            peers: FxMap::default(),
            filters: filters::Filters::default(),
            subs: subs::Subs::default(),
            plans: write::Plans::default(),
            longpolls: longpoll::LongPolls::new(version),
            read_scope,
            last_tick: Instant::now(),
            last_sweep: Instant::now(),
            last_retention: None,
            last_heartbeat: Instant::now(),
            stopping: false,
            guard,
            stats,
            tenant_claim,
            scope,
            hooked: None,
            hook_all: false,
            journal: None,
            fenced: None,
        })
    }

    /// Every commit passes through `journal` (a shard of a cluster).
    pub fn with_journal(mut self, mut journal: Box<dyn journal::Journal>) -> Engine {
        journal.restart(self.db.conn());
        self.journal = Some(journal);
        self
    }

    /// Pushed rows of `tables` (every table when empty) go to the backend's
    /// write hook before they commit; an unknown table is an error naming it.
    pub fn with_write_hook(mut self, tables: &[String]) -> Result<Engine, String> {
        let mut set = FxSet::default();
        if tables.is_empty() {
            set.extend(self.schema.tables.iter().map(|t| t.id));
            self.hook_all = true;
        }
        for name in tables {
            let t = self
                .schema
                .table(name)
                .ok_or_else(|| format!("write_hook.tables names {name:?}, which is not a CRR"))?;
            set.insert(t.id);
        }
        self.hooked = Some(set);
        Ok(self)
    }

    /// The loop: runs until `Shutdown` (or every sender is gone).
    pub fn run(mut self, rx: Receiver<Cmd>) {
        let tick = Duration::from_millis(250);
        loop {
            let wait = if self.writes.is_empty() && self.sessions.is_empty() {
                tick.saturating_sub(self.last_tick.elapsed())
            } else {
                Duration::ZERO
            };
            let first = match rx.recv_timeout(wait) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.stop();
                    return;
                }
            };
            let mut shutdown = None;
            let mut batch: Vec<Cmd> = first.into_iter().collect();
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            for c in batch {
                match c {
                    Cmd::Shutdown { reply } => shutdown = Some(reply),
                    Cmd::Write(w) => {
                        let tenant = match &w {
                            Write::Push(p) => p.who.tenant.clone(),
                            Write::Sql(s) => s.who.tenant.clone(),
                        };
                        self.writes.push(&tenant, w);
                    }
                    other => self.admit(other),
                }
            }
            if let Some(reply) = shutdown {
                self.stop();
                let _ = reply.send(());
                return;
            }
            self.install_ready();
            self.run_sessions();
            if !self.writes.is_empty() {
                let group = self.writes.take(self.tuning.quantum, self.tuning.max_group);
                self.run_group(group);
            }
            if self.last_tick.elapsed() >= tick {
                self.last_tick = Instant::now();
                self.tick();
            }
            self.seal_loose();
        }
    }

    /// Handles a command now, or queues it for its tenant's turn: a
    /// subscription (its view may need a query over the tenant's rows), and
    /// any later command of a connection that has one queued, so each
    /// connection's commands keep their order.
    fn admit(&mut self, c: Cmd) {
        let Some(conn) = c.session_conn() else {
            return self.handle(c);
        };
        if !matches!(c, Cmd::Subscribe { .. }) && !self.deferred.contains_key(&conn) {
            return self.handle(c);
        }
        let tenant = self
            .subs
            .conns
            .get(&conn)
            .map(|k| k.who.tenant.clone())
            .unwrap_or_else(|| Arc::from(""));
        *self.deferred.entry(conn).or_default() += 1;
        self.sessions.push(&tenant, c);
    }

    /// Runs queued subscriptions, one per tenant in turn, for at most the
    /// session budget: a tenant's burst of subscriptions never holds the
    /// next group commit for longer than that and one subscription, nor
    /// another tenant's subscription for more than one turn. A
    /// subscription whose view must be built waits for a reader (`build`)
    /// without holding anyone.
    fn run_sessions(&mut self) {
        let started = Instant::now();
        let mut one = Vec::with_capacity(1);
        while !self.sessions.is_empty() && started.elapsed() < self.tuning.session_budget {
            self.sessions.take_turn(1, &mut one);
            for c in one.drain(..) {
                self.run_session(c);
            }
        }
    }

    fn handle(&mut self, c: Cmd) {
        match c {
            Cmd::Open {
                who,
                site,
                client,
                known_schema,
                outbox,
                reply,
            } => {
                let r = self.open(who, site, client, known_schema, outbox);
                let _ = reply.send(r);
            }
            Cmd::Close { conn } => self.close(conn),
            Cmd::Schema(cmd) => self.change_schema(cmd),
            Cmd::Subscribe {
                conn,
                id,
                query,
                cursor,
                q,
                epoch,
            } => self.subscribe(conn, id, query, cursor, q, epoch),
            Cmd::Unsubscribe { conn, id } => self.unsubscribe(conn, &id),
            Cmd::Resync { conn, id, cursor } => self.resync(conn, &id, cursor),
            Cmd::Ack { conn, cursors } => self.ack(conn, cursors),
            Cmd::PullBegin {
                who,
                site,
                subs,
                unsubscribe,
                epoch,
                reply,
            } => {
                let r = self.pull_begin(&who, site, subs, unsubscribe, epoch);
                let _ = reply.send(r);
            }
            Cmd::PullEnd { site, done } => self.pull_end(site, done),
            Cmd::PullWait {
                who,
                site,
                subs,
                since,
                reply,
            } => self.pull_wait(&who, site, subs, since, reply),
            Cmd::Reload { name, sql, reply } => self.reload_request(name, sql, reply),
            Cmd::Built { id, result } => self.built(id, result),
            Cmd::Report { site, reply } => {
                let r = self.report(site);
                let _ = reply.send(r);
            }
            Cmd::SyncDone {
                sub,
                epoch,
                version,
                held,
                last,
            } => self.sync_done(sub, epoch, version, held, last),
            Cmd::SyncAbandoned { sub, epoch } => self.sync_abandoned(sub, epoch),
            Cmd::Drained { conn } => self.drained(conn),
            Cmd::Write(_) | Cmd::Shutdown { .. } => unreachable!("handled by the loop"),
        }
    }

    /// Loads (or creates, binding it to `who`) the peer of a site.
    fn bind_peer(&mut self, who: &Who, site: SiteId) -> Result<i64, ApiError> {
        let internal = |e: rusqlite::Error| ApiError::new(ErrorCode::Internal, e.to_string());
        if !self.peers.contains_key(&site)
            && let Some(row) = store::load_peer(self.db.conn(), &site).map_err(internal)?
        {
            store::touch_peer(self.db.conn(), &site).map_err(internal)?;
            self.peers.insert(
                site,
                Peer {
                    subject: row.subject,
                    tenant: row.tenant,
                    claims: row.claims.unwrap_or_else(|| "{}".into()),
                    pushed_version: row.pushed_version,
                    last_used: Instant::now(),
                },
            );
        }
        let claims = who.ident_key.to_string();
        let tenant = who.principal.tenant.clone();
        match self.peers.get_mut(&site) {
            // Identity is (tenant, subject): the same `sub` in another
            // tenant is another identity, and never resumes this site.
            Some(p) if p.subject != who.principal.subject || p.tenant != tenant => {
                Err(ApiError::new(
                    ErrorCode::SiteBoundToOtherSubject,
                    format!(
                        "site id {site} is bound to another identity (tenant and subject); a peer uses its own site id"
                    ),
                ))
            }
            Some(p) => {
                p.last_used = Instant::now();
                if p.claims != claims {
                    p.claims = claims.clone();
                    store::upsert_peer(
                        self.db.conn(),
                        &site,
                        &who.principal.subject,
                        tenant.as_deref(),
                        &claims,
                    )
                    .map_err(internal)?;
                }
                Ok(p.pushed_version)
            }
            None => {
                let known =
                    store::count_peers_of(self.db.conn(), tenant.as_deref()).map_err(internal)?;
                if known >= self.limits.max_peers_per_tenant {
                    return Err(ApiError::new(
                        ErrorCode::LimitExceeded,
                        format!(
                            "this tenant has its maximum of {} peers (site ids); a peer not connected for {} days is forgotten",
                            self.limits.max_peers_per_tenant,
                            self.limits.peer_retention.as_secs() / (24 * 3600)
                        ),
                    ));
                }
                store::upsert_peer(
                    self.db.conn(),
                    &site,
                    &who.principal.subject,
                    tenant.as_deref(),
                    &claims,
                )
                .map_err(internal)?;
                self.peers.insert(
                    site,
                    Peer {
                        subject: who.principal.subject.clone(),
                        tenant,
                        claims,
                        pushed_version: 0,
                        last_used: Instant::now(),
                    },
                );
                Ok(0)
            }
        }
    }

    /// The policies in force become the sessions' (a new epoch: a
    /// subscription rewritten under the old ones is rewritten again).
    fn publish_policy(&mut self) {
        self.policy_gen += 1;
        let mut st = self
            .shared_policy
            .write()
            .unwrap_or_else(|p| p.into_inner());
        st.epoch = self.policy_gen;
        st.engine = Arc::new(self.policy.clone());
    }

    /// A policy file read against the schema, or the error a reload answers.
    fn parse_policies(&self, name: &str, sql: &str) -> Result<PolicySet, ApiError> {
        PolicySet::parse(name, sql, &self.schema.policy).map_err(|d| {
            let mut e = ApiError::new(
                ErrorCode::PolicyInvalid,
                format!("the policy file {name} is invalid; the old policies stay"),
            );
            e.diagnostics = d.to_string().lines().map(str::to_owned).collect();
            e
        })
    }

    /// Replaces the policies now (their new views are built, see
    /// `build::reload_request`; any other is created here).
    fn reload(
        &mut self,
        name: &str,
        sql: &str,
        rewritten: FxMap<SubKey, build::Rewritten>,
    ) -> Result<PolicyReloadResponse, ApiError> {
        let set = self.parse_policies(name, sql)?;
        shard::warn_cross_tenant(&set, &self.tenant_claim);
        let change = self.policy.replace_policies(set);
        self.publish_policy();
        self.plans.clear(&mut self.filters);
        // The reload gets a version of its own: what subscribers see changes
        // at it, and a cursor names one state.
        let bumped = (|| {
            self.begin_write()?;
            if let Err(e) = self.db.bump_db_version() {
                self.rollback_write();
                return Err(journal::CommitError::Core(e));
            }
            self.commit_write()?;
            Ok(self.db.db_version()?)
        })();
        let version = bumped.map_err(|e| e.to_api())?;
        self.version = version;
        self.stats
            .version
            .store(version, std::sync::atomic::Ordering::Release);
        let moving = Instant::now();
        let (changed_views, moved) = self.move_after_reload(&change, version, rewritten);
        self.read_scope =
            longpoll::read_scope(&self.schema, self.policy.policies(), &self.tenant_claim);
        self.longpolls.wake_all(version);
        tracing::info!(
            policy = name,
            changed_views,
            moved,
            version,
            move_ms = moving.elapsed().as_millis() as u64,
            "policies reloaded"
        );
        Ok(PolicyReloadResponse {
            changed_views,
            moved_subscriptions: moved,
        })
    }

    fn tick(&mut self) {
        self.persist(false);
        self.expire();
        if self.last_sweep.elapsed() >= SWEEP.min(self.tuning.grace) {
            self.last_sweep = Instant::now();
            self.sweep_idle();
        }
        if self
            .last_retention
            .is_none_or(|t| t.elapsed() >= RETENTION_SWEEP)
        {
            self.last_retention = Some(Instant::now());
            self.forget_old_peers();
        }
        self.retry_lagging();
        if self.last_heartbeat.elapsed() >= self.tuning.heartbeat {
            self.last_heartbeat = Instant::now();
            self.heartbeat();
        }
        self.gauges();
    }

    fn stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        for w in self.writes.drain_all() {
            write::refuse_shutting_down(w);
        }
        self.refuse_parked_reloads();
        self.close_all();
        self.persist(true);
        self.keep_deliveries(None);
        if let Err(e) = self
            .db
            .conn()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        {
            tracing::warn!(error = %e, "checkpoint at shutdown failed");
        }
        self.readers.stop();
        tracing::info!(version = self.version, "engine stopped");
    }
}

/// How often idle peers and pull states are looked for.
const SWEEP: Duration = Duration::from_secs(5);
/// How often peers past `limits.peer_retention` are forgotten.
const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

impl Engine {
    /// Memory holds what is in use: a pull state unused for the grace
    /// period and a peer neither connected nor used for it leave memory
    /// (their state is in the database; the next use loads it again).
    fn sweep_idle(&mut self) {
        let grace = self.tuning.grace;
        let idle_pulls = self
            .subs
            .pulls
            .values()
            .any(|p| p.last_used.elapsed() >= grace);
        if idle_pulls {
            self.persist(true);
            self.keep_deliveries(Some(grace));
            self.subs.pulls.retain(|_, p| p.last_used.elapsed() < grace);
        }
        let connected: FxSet<SiteId> = self.subs.conns.values().map(|c| c.site).collect();
        let pulling: FxSet<SiteId> = self.subs.pulls.keys().map(|(s, _)| *s).collect();
        let idle: Vec<SiteId> = self
            .peers
            .iter()
            .filter(|(s, p)| {
                p.last_used.elapsed() >= grace && !connected.contains(*s) && !pulling.contains(*s)
            })
            .map(|(s, _)| *s)
            .collect();
        for site in idle {
            if let Err(e) = store::touch_peer(self.db.conn(), &site) {
                tracing::warn!(error = %e, %site, "recording a peer's last use failed");
                continue;
            }
            self.peers.remove(&site);
        }
    }

    /// Forgets peers not seen for `limits.peer_retention` (never a
    /// connected one), with their subscription state.
    fn forget_old_peers(&mut self) {
        let connected: FxSet<SiteId> = self.subs.conns.values().map(|c| c.site).collect();
        let peers = &self.peers;
        let keep = |s: &SiteId| connected.contains(s) || peers.contains_key(s);
        match store::forget_peers(self.db.conn(), self.limits.peer_retention, &keep) {
            Ok(0) => {}
            Ok(n) => tracing::info!(peers = n, "forgot peers past their retention"),
            Err(e) => tracing::warn!(error = %e, "forgetting old peers failed"),
        }
    }
}
