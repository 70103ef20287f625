//! [`SyncService`]: the handle the edge (HTTP, WebSocket, CLI) uses.
//!
//! A node runs several shards (`engine::shard`): each one database with its
//! engine thread and readers, holding a set of tenants. The service routes
//! every call to the shard of the caller's tenant ([`Placement`]); a
//! tenant's peers, versions and cursors live in that one shard, so nothing
//! a client sees tells shards apart. The bodies talk to the engines and the
//! readers through channels (no SQLite here, nothing blocking on the
//! runtime); the types the edge and the engine share are in
//! [`crate::contract`].

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tenantsync_policy::EffectiveQuery;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::{
    PeerReport, PolicyReloadResponse, PullRequest, PullResponse, PushRequest, PushResponse,
    SchemaChangeResponse, SchemaResponse, SqlRequest, SqlResponse,
};
use tenantsync_protocol::ws::{ClientMsg, ErrorMsg, ServerMsg};
use tokio::sync::oneshot;

pub use crate::contract::{
    ApiError, Limits, OutFrame, Principal, PushError, ServiceConfig, StartError, Synchronous,
    WriteHook,
};
use crate::engine::evolve::SchemaCmd;
use crate::engine::outbox::{Drain, OutboxShared};
use crate::engine::push_check::{push_bytes, validate_push};
use crate::engine::shard::{Shard, ShardConfig, stopped};
use crate::engine::{Cmd, PushCmd, PushReply, Who, Write};
use crate::hook::{HookClient, HookRound, PushAnswer};
use crate::placement::Placement;

/// Pushes and bytes of changes per second per tenant, token buckets per
/// tenant (governor's, keyed; bytes counted in KiB): tenants that stop
/// pushing are forgotten.
pub(crate) struct PushRates {
    limiter: governor::DefaultKeyedRateLimiter<Arc<str>>,
    per_second: f64,
    kib: governor::DefaultKeyedRateLimiter<Arc<str>>,
    bytes_per_second: f64,
}

impl PushRates {
    fn new(l: &Limits) -> PushRates {
        let rate = NonZeroU32::new(l.push_rate_per_tenant.max(1.0).round() as u32)
            .unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(l.push_burst_per_tenant.max(1.0).round() as u32)
            .unwrap_or(NonZeroU32::MIN);
        let kib = |b: f64| {
            NonZeroU32::new((b / 1024.0).ceil().max(1.0) as u32).unwrap_or(NonZeroU32::MIN)
        };
        let kib_rate = kib(l.push_bytes_per_tenant);
        let kib_burst = kib((2.0 * l.max_message_bytes as f64).max(l.push_bytes_per_tenant));
        PushRates {
            limiter: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            per_second: l.push_rate_per_tenant,
            kib: governor::RateLimiter::keyed(
                governor::Quota::per_second(kib_rate).allow_burst(kib_burst),
            ),
            bytes_per_second: l.push_bytes_per_tenant,
        }
    }

    /// Takes one push of `bytes` (see [`push_bytes`]) from the tenant's
    /// buckets: `rate_limited` with the wait when either is empty.
    fn take(&self, tenant: &Arc<str>, bytes: usize) -> Result<(), ApiError> {
        use governor::clock::Clock;
        let limited = |wait: std::time::Duration, what: String| {
            let wait = wait.as_millis().max(1) as u64;
            let mut e = ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "tenant {:?} is over its {what}; retry after {wait} ms",
                    &**tenant
                ),
            );
            e.retry_after_ms = Some(wait);
            e
        };
        // The limiter's own clock: a new DefaultClock calibrates itself.
        let now = self.kib.clock().now();
        let kib = NonZeroU32::new(bytes.div_ceil(1024).max(1) as u32).unwrap_or(NonZeroU32::MIN);
        match self.kib.check_key_n(tenant, kib) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                return Err(limited(
                    not_until.wait_time_from(now),
                    format!(
                        "budget of {} bytes of changes per second",
                        self.bytes_per_second
                    ),
                ));
            }
            // Larger than a burst: it waits for nothing, it never fits.
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "a push of about {bytes} bytes of changes is over the largest burst of this tenant's byte budget"
                    ),
                ));
            }
        }
        self.limiter.check_key(tenant).map_err(|not_until| {
            limited(
                not_until.wait_time_from(now),
                format!("push rate of {}/s", self.per_second),
            )
        })
    }

    /// Forgets the tenants whose buckets are full again.
    fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.kib.retain_recent();
    }
}

/// Where a shard runs for this node: here, or (in a cluster) on another
/// node, while this one keeps a standby copy (`crate::cluster`).
#[derive(Default)]
struct Slot {
    shard: std::sync::RwLock<Option<Shard>>,
    /// The URL of the node that runs it, when another node does.
    elsewhere: std::sync::RwLock<Option<String>>,
}

impl Slot {
    fn get(&self) -> Option<Shard> {
        self.shard.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Inner {
    shards: Vec<Slot>,
    placement: Placement,
    rates: Arc<PushRates>,
    limits: Limits,
    tenant_claim: String,
    /// The backend's write hook, when configured.
    hook: Option<Arc<HookClient>>,
    /// Held by the schema change in progress.
    schema_change: tokio::sync::Mutex<()>,
}

/// The running service. Cheap to clone; every clone is the same service.
#[derive(Clone)]
pub struct SyncService {
    inner: Arc<Inner>,
}

pub use crate::engine::layout::shard_path;

impl SyncService {
    /// Opens every shard's database, applies the schema, loads and validates
    /// the policies, starts the engines and readers. Refuses to start on an
    /// invalid policy file (every diagnostic in the error), or when the
    /// number of shards is not the one the database was created with.
    pub fn start(config: ServiceConfig) -> Result<SyncService, StartError> {
        let placement = Placement::new(config.shards, config.shard_overrides.clone());
        for (tenant, &s) in placement.overrides() {
            if s >= placement.shards() {
                return Err(StartError::Layout(format!(
                    "shard override {tenant:?} = {s}: there are {} shards (0 to {})",
                    placement.shards(),
                    placement.shards() - 1
                )));
            }
        }
        crate::engine::layout::check(&config.db_path, placement.shards())?;
        let mut shards: Vec<Shard> = Vec::with_capacity(placement.shards());
        for k in 0..placement.shards() {
            let mut c = shard_config(&config, k, shard_path(&config.db_path, k));
            c.leader_schema = shards
                .first()
                .map(|s: &Shard| s.schema().response.migrations.clone());
            shards.push(Shard::start(&c)?);
        }
        crate::engine::layout::record(&config.db_path, placement.shards())?;
        crate::engine::layout::check_overrides(&config.db_path, &placement)?;
        let service = SyncService::empty(config, placement);
        for (k, s) in shards.into_iter().enumerate() {
            service.install(k, s);
        }
        Ok(service)
    }

    /// A service that runs none of its shards yet: a cluster node installs
    /// each as it takes it over (`crate::cluster`).
    pub(crate) fn empty(config: ServiceConfig, placement: Placement) -> SyncService {
        SyncService {
            inner: Arc::new(Inner {
                shards: (0..placement.shards()).map(|_| Slot::default()).collect(),
                placement,
                rates: Arc::new(PushRates::new(&config.limits)),
                limits: config.limits,
                tenant_claim: config.tenant_claim,
                hook: config.write_hook.map(|h| Arc::new(HookClient::new(h))),
                schema_change: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Runs `shard` as shard `k` of this node.
    pub(crate) fn install(&self, k: usize, shard: Shard) {
        *self.inner.shards[k]
            .shard
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(shard);
    }

    /// Stops routing to shard `k` here (the caller stops it).
    pub(crate) fn uninstall(&self, k: usize) -> Option<Shard> {
        self.inner.shards[k]
            .shard
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Records which node runs shard `k` when this one does not (`None`:
    /// this one, or none known).
    pub(crate) fn set_elsewhere(&self, k: usize, url: Option<String>) {
        *self.inner.shards[k]
            .elsewhere
            .write()
            .unwrap_or_else(|p| p.into_inner()) = url;
    }

    /// The URL of the node a request of `tenant` goes to, when this node
    /// does not run its shard and knows which does (a cluster).
    pub fn forward_to(&self, tenant: Option<&str>) -> Option<String> {
        let slot = &self.inner.shards[self.inner.placement.shard_of(tenant)];
        if slot.get().is_some() {
            return None;
        }
        slot.elsewhere
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Shard `k`, when this node runs it.
    pub(crate) fn shard_at(&self, k: usize) -> Result<Shard, ApiError> {
        self.inner.shards[k].get().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("shard {k} is not served by this node now (it moved, or is moving); retry"),
            )
        })
    }

    /// The shards this node runs.
    fn local(&self) -> Vec<Shard> {
        self.inner.shards.iter().filter_map(Slot::get).collect()
    }

    fn shard(&self, p: &Principal) -> Result<Shard, ApiError> {
        self.shard_at(self.inner.placement.shard_of(p.tenant.as_deref()))
    }

    /// The node's shards and the tenant rule.
    pub fn placement(&self) -> &Placement {
        &self.inner.placement
    }

    /// The shard of a tenant.
    pub fn shard_of(&self, tenant: Option<&str>) -> usize {
        self.inner.placement.shard_of(tenant)
    }

    /// The site id of shard 0's database (every shard has its own; a peer
    /// sees its tenant's in `welcome.server_site_id`).
    pub fn server_site_id(&self) -> tenantsync_core::SiteId {
        self.local().first().map(Shard::site_id).unwrap_or_default()
    }

    /// The highest committed version of any shard.
    pub fn db_version(&self) -> i64 {
        self.db_versions().into_iter().max().unwrap_or(0)
    }

    /// What each shard holds (version, connections, subscriptions, views,
    /// pull states, peers in memory), by shard, for `/v1/admin/status`.
    pub fn shard_status(&self) -> Vec<serde_json::Value> {
        self.local().iter().map(Shard::status).collect()
    }

    /// Why the service cannot take writes now (empty when it can): per
    /// shard, its engine not running or its last commit failed. Says
    /// nothing of any tenant.
    pub fn not_ready(&self) -> Vec<String> {
        self.local()
            .iter()
            .filter_map(|s| {
                s.not_ready()
                    .map(|why| format!("shard {}: {why}", s.index()))
            })
            .collect()
    }

    /// Each shard's last committed version, by shard.
    pub fn db_versions(&self) -> Vec<i64> {
        self.local().iter().map(Shard::db_version).collect()
    }

    /// `GET /v1/schema`.
    pub fn schema(&self) -> SchemaResponse {
        match self.local().first() {
            Some(s) => s.schema().response.clone(),
            // A cluster node that runs no shard yet.
            None => SchemaResponse {
                schema_version: 0,
                schema_sql: String::new(),
                migrations: Vec::new(),
                tables: Vec::new(),
            },
        }
    }

    /// The schema version in force.
    pub fn schema_version(&self) -> i64 {
        self.local().first().map_or(0, |s| s.schema().version())
    }

    /// Applies a schema change on every shard, or on none: each shard
    /// runs and checks it in an open transaction (`engine::evolve`); when
    /// all can take it, shard 0 commits first, then the others (a node
    /// stopped in between catches the others up at its next start). One
    /// change at a time. `POST /v1/admin/schema` (service role checked by
    /// the edge) and the schema file on SIGHUP.
    pub async fn change_schema(&self, sql: &str) -> Result<SchemaChangeResponse, ApiError> {
        let _one = self.inner.schema_change.lock().await;
        let mut pending = Vec::new();
        let local = self.local();
        if local.len() < self.inner.shards.len() {
            return Err(ApiError::new(
                ErrorCode::SchemaRefused,
                "schema changes are not supported in a cluster yet: change the schema file and start the cluster on a new directory, or run one node",
            ));
        }
        for shard in &local {
            let (prepared, prepared_rx) = tokio::sync::oneshot::channel();
            let (decide_tx, decide) = std::sync::mpsc::channel();
            let (done, done_rx) = tokio::sync::oneshot::channel();
            shard.send(Cmd::Schema(SchemaCmd {
                sql: sql.to_owned(),
                prepared,
                decide,
                done,
            }))?;
            pending.push((prepared_rx, decide_tx, done_rx));
        }
        let mut verdicts = Vec::new();
        for (prepared_rx, _, _) in &mut pending {
            verdicts.push(prepared_rx.await.unwrap_or_else(|_| Err(stopped())));
        }
        let first = verdicts.iter().find_map(|v| v.as_ref().ok()).cloned();
        let refusal = verdicts.into_iter().find_map(Result::err);
        let go = refusal.is_none();
        for (_, decide, done_rx) in pending {
            let _ = decide.send(go);
            if go {
                done_rx.await.unwrap_or_else(|_| Err(stopped()))?;
            }
        }
        match (refusal, first) {
            (Some(e), _) => Err(e),
            (None, Some(answer)) => Ok(answer),
            (None, None) => Err(stopped()),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The tenant claim's name (for [`Principal::from_claims`]).
    pub fn tenant_claim(&self) -> &str {
        &self.inner.tenant_claim
    }

    /// Starts a WebSocket session after a valid `hello`: binds `site` to the
    /// principal's identity (or refuses with `site_bound_to_other_subject`),
    /// checks the connection limits, and queues `welcome` as the outbox's
    /// first frame (with the migrations above `known_schema`, the hello's
    /// schema version). The edge then feeds every further client message to
    /// [`Session::handle`] and writes every frame [`Outbox::next`] yields.
    pub async fn open_session(
        &self,
        principal: Principal,
        site: tenantsync_core::SiteId,
        client: Option<String>,
        known_schema: Option<i64>,
    ) -> Result<(Session, Outbox), ApiError> {
        self.inner.rates.forget_idle();
        let shard = self.shard(&principal)?;
        let l = shard.limits().clone();
        let outbox = Arc::new(OutboxShared::new(
            site,
            l.max_message_bytes,
            l.outbox_items,
            l.outbox_bytes,
        ));
        let who = Who::new(&principal);
        let ok = shard
            .open(who.clone(), site, client, known_schema, outbox.clone())
            .await?;
        Ok((
            Session {
                shard,
                rates: self.inner.rates.clone(),
                hook: self.inner.hook.clone(),
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
        let shard = self.shard(p).map_err(PushError::Api)?;
        validate_push(
            &shard.schema(),
            &req.site_id,
            req.from,
            req.to,
            &req.changes,
        )
        .map_err(PushError::Api)?;
        let who = Who::new(p);
        self.inner
            .rates
            .take(&who.tenant, push_bytes(&req.changes))
            .map_err(PushError::Api)?;
        let push = HookedPush {
            who,
            site: req.site_id,
            from: req.from,
            to: req.to,
            changes: req.changes,
        };
        push.run(&shard, self.inner.hook.as_deref()).await
    }

    /// `POST /v1/pull` (long-polls up to `min(wait_ms, limits.max_wait)`).
    pub async fn pull(&self, p: &Principal, req: PullRequest) -> Result<PullResponse, ApiError> {
        let shard = self.shard(p)?;
        let (epoch, policy) = shard.policy();
        let mut subs = Vec::new();
        let mut seen = HashSet::new();
        for s in &req.subscriptions {
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
            subs.push((s.clone(), Arc::new(q)));
        }
        shard.pull(Who::new(p), req, subs, epoch).await
    }

    /// `POST /v1/sql` (service role only: `forbidden` otherwise). It runs on
    /// the shard of the request's `tenant` (else of the token's tenant
    /// claim), in one transaction. With one shard any statement is allowed;
    /// with several, a statement may write only rows of that tenant
    /// (docs/CLI.md, "Service SQL and shards").
    pub async fn sql(&self, p: &Principal, req: SqlRequest) -> Result<SqlResponse, ApiError> {
        if !p.service {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "POST /v1/sql needs a token with the service role",
            ));
        }
        let tenant = req.tenant.clone().or_else(|| p.tenant.clone());
        let shards = self.inner.placement.shards();
        if shards > 1 && tenant.is_none() {
            return Err(ApiError::new(
                ErrorCode::BadMessage,
                format!(
                    "this server has {shards} shards: name the tenant the statements are for (\"tenant\" in the body, or the token's {} claim)",
                    self.inner.tenant_claim
                ),
            ));
        }
        let shard = self.shard_at(self.inner.placement.shard_of(tenant.as_deref()))?;
        let mut who = Who::new(p);
        who.scope = (shards > 1).then(|| Arc::from(tenant.as_deref().unwrap_or("")));
        shard.sql(who, req.statements).await
    }

    /// Replaces the policy set on every shard if `policy_sql` is valid
    /// (`policy_invalid` with every diagnostic otherwise; the old set
    /// stays). Used by `POST /v1/admin/policy` (service role checked by the
    /// edge) and SIGHUP.
    pub async fn reload_policy(
        &self,
        policy_name: &str,
        policy_sql: &str,
    ) -> Result<PolicyReloadResponse, ApiError> {
        // Every shard has the same schema: the first validates for all.
        let local = self.local();
        let Some((first, rest)) = local.split_first() else {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "this node runs no shard now; reload the policies on a node that does",
            ));
        };
        let mut total = first.reload_policy(policy_name, policy_sql).await?;
        for s in rest {
            let r = s.reload_policy(policy_name, policy_sql).await?;
            total.changed_views += r.changed_views;
            total.moved_subscriptions += r.moved_subscriptions;
        }
        Ok(total)
    }

    /// `GET /v1/admin/peers/{site_id}` (service role checked by the edge):
    /// the report of the shard that knows the site.
    pub async fn peer_report(&self, site: tenantsync_core::SiteId) -> Result<PeerReport, ApiError> {
        let mut last = None;
        for s in &self.local() {
            match s.peer_report(site).await {
                Ok(r) => return Ok(r),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            ApiError::new(ErrorCode::Unavailable, "this node runs no shard now")
        }))
    }

    /// Stops every shard: every session's outbox yields
    /// `OutFrame::Close(shutting_down)`, queued writes are answered
    /// `shutting_down`, dirty cursors and held sets are persisted, the WAL
    /// is checkpointed, the databases closed. Returns when done (bounded by
    /// `timeout`).
    pub async fn shutdown(&self, timeout: Duration) {
        let local = self.local();
        let all = local.iter().map(|s| s.shutdown(timeout));
        futures_util::future::join_all(all).await;
    }
}

/// The configuration of shard `k` of a node, its database at `db_path`.
pub(crate) fn shard_config(
    config: &ServiceConfig,
    k: usize,
    db_path: std::path::PathBuf,
) -> ShardConfig {
    ShardConfig {
        index: k,
        db_path,
        schema_sql: config.schema_sql.clone(),
        policy_name: config.policy_name.clone(),
        policy_sql: config.policy_sql.clone(),
        tenant_claim: config.tenant_claim.clone(),
        limits: config.limits.clone(),
        readers: config.readers,
        synchronous: config.synchronous,
        grace: config.idle_grace,
        hook_tables: config.write_hook.as_ref().map(|h| h.tables.clone()),
        leader_schema: None,
        frozen_schema: false,
    }
}

/// Overrides as the configuration gives them.
pub type ShardOverrides = BTreeMap<String, usize>;

/// One WebSocket session's handle into the engine (after `hello`). Dropping
/// it detaches the session (its subscriptions stay resumable).
pub struct Session {
    shard: Shard,
    rates: Arc<PushRates>,
    hook: Option<Arc<HookClient>>,
    conn: crate::engine::ConnId,
    site: tenantsync_core::SiteId,
    who: Who,
    outbox: Arc<OutboxShared>,
    subs: HashSet<String>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.shard.send(Cmd::Close { conn: self.conn });
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
        if let Err(e) = self.shard.send(c) {
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
                let l = self.shard.limits();
                if !self.subs.contains(&id) && self.subs.len() >= l.max_subscriptions_per_connection
                {
                    let m = format!(
                        "this connection has its maximum of {} subscriptions",
                        l.max_subscriptions_per_connection
                    );
                    self.error(ApiError::new(ErrorCode::LimitExceeded, m), Some(id));
                    return;
                }
                let (epoch, policy) = self.shard.policy();
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
                if let Err(e) = validate_push(&self.shard.schema(), &self.site, from, to, &changes)
                    .and_then(|()| self.rates.take(&self.who.tenant, push_bytes(&changes)))
                {
                    self.error(e, Some(id));
                    return;
                }
                if let Some(hook) = &self.hook {
                    // The backend judges it: this session's later messages
                    // wait for the answer, in order (docs/SAAS.md).
                    let push = HookedPush {
                        who: self.who.clone(),
                        site: self.site,
                        from,
                        to,
                        changes,
                    };
                    let r = push.run(&self.shard, Some(hook)).await;
                    self.outbox
                        .push_frame(crate::engine::push_answer_frame(id, r));
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
                    hook: None,
                })));
            }
            ClientMsg::Ping { id } => self.frame(&ServerMsg::Pong { id }),
        }
    }

    /// Waits until the session's outbox is within its bounds: the edge
    /// reads the peer's next message only then, so answers the peer does
    /// not read never pile up (docs/arch/server.md, "Bounds").
    pub async fn room(&self) {
        self.outbox.room().await;
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

/// A push on its way to the engine, asking the backend's write hook when
/// the engine says so (`crate::hook`).
struct HookedPush {
    who: Who,
    site: tenantsync_core::SiteId,
    from: i64,
    to: i64,
    changes: Vec<tenantsync_core::Change>,
}

/// How often a push is run again because a concurrent write changed the
/// rows the backend judged.
const HOOK_ROUNDS: usize = 3;

impl HookedPush {
    async fn run(
        self,
        shard: &Shard,
        hook: Option<&HookClient>,
    ) -> Result<PushResponse, PushError> {
        let mut round: Option<Arc<HookRound>> = None;
        for _ in 0..=HOOK_ROUNDS {
            let (tx, rx) = oneshot::channel();
            shard
                .send(Cmd::Write(Write::Push(PushCmd {
                    who: self.who.clone(),
                    site: self.site,
                    from: self.from,
                    to: self.to,
                    changes: self.changes.clone(),
                    reply: PushReply::Http(tx),
                    received: Instant::now(),
                    hook: round.take(),
                })))
                .map_err(PushError::Api)?;
            let answer = rx
                .await
                .map_err(|_| PushError::Api(crate::engine::shard::stopped()))?;
            match (answer, hook) {
                (PushAnswer::Done(r), _) => return r,
                (PushAnswer::Ask(rows), Some(hook)) => {
                    let verdicts = hook.judge(&self.who.principal, self.site, &rows).await;
                    round = Some(Arc::new(HookRound {
                        seen: rows,
                        verdicts,
                    }));
                }
                (PushAnswer::Ask(_), None) => {
                    return Err(PushError::Api(ApiError::new(
                        ErrorCode::Internal,
                        "the engine asked for a write hook this service does not have",
                    )));
                }
            }
        }
        let mut e = ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "the rows changed {HOOK_ROUNDS} times while the backend judged them; push again"
            ),
        );
        e.retry_after_ms = Some(100);
        Err(PushError::Api(e))
    }
}
