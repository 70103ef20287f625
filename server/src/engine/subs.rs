//! Connections and subscriptions: registration, initial syncs, fan-out of
//! view parts to outboxes, acknowledgements and the exact tracking of what
//! each subscription holds (docs/arch/server.md, "Subscriptions").
//!
//! What a subscription holds at version `v` (for `v` between its
//! acknowledged cursor and the last version queued to it) is derived, not
//! stored per version: from the held set at the acknowledged cursor (or of
//! a later completed sync) forward through the queued parts that moved rows,
//! or, while it has been live since, from its view's rows backward through
//! those parts.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tenantsync_core::{PackedPk, SiteId};
use tenantsync_policy::{EffectiveQuery, Identity, PolicyChange};
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::RowKey;
use tenantsync_protocol::SubscribeMode;
use tenantsync_protocol::http::{HeldReport, PeerReport, PullSub};
use tenantsync_protocol::ws::{ErrorMsg, ServerMsg};

use super::filters::{ChangedRow, Draft, FilterId, FxMap, FxSet, PkSet};
use super::{ConnId, Engine, OpenOk, SubKey, Who, commit};
use crate::contract::{ApiError, OutFrame};
use crate::engine::outbox::{Item, ItemPart, OutboxShared, ViewPart};
use crate::engine::reader::{Job, PullItem, SyncBase, SyncJob};
use crate::engine::store;

/// Parts of one version per connection: (subscription id, part).
type PerConn = FxMap<ConnId, Vec<(Arc<str>, Arc<ViewPart>)>>;

pub(crate) struct Conn {
    pub site: SiteId,
    pub who: Who,
    pub outbox: Arc<OutboxShared>,
    pub subs: FxSet<Arc<str>>,
    pub lagging: bool,
    pub span: tracing::Span,
}

pub(crate) enum State {
    /// Its initial sync is being read; parts of its view are buffered.
    Pending {
        base: SyncBase,
        buffer: Vec<Arc<ViewPart>>,
        overflow: bool,
        /// A policy reload moved it: resync when this sync is done.
        moved: bool,
    },
    Live,
    /// Its outbox was full: caught up from `base` when it drains.
    Lagging {
        base: SyncBase,
    },
    /// Its session ended.
    Detached {
        since: Instant,
    },
}

pub(crate) enum Inflight {
    Part(Arc<ViewPart>),
    Sync { version: i64, held: Arc<PkSet> },
}

pub(crate) struct Sub {
    pub key: SubKey,
    pub query: String,
    pub q: Arc<EffectiveQuery>,
    pub identity: Arc<Identity>,
    pub tenant: Arc<str>,
    pub conn: Option<ConnId>,
    pub view: FilterId,
    pub state: State,
    pub epoch: u64,
    /// `epoch`, shared with the sync job in flight.
    pub current: Arc<std::sync::atomic::AtomicU64>,
    /// Acknowledged cursor.
    pub acked: Option<i64>,
    /// Held at `acked`; None: derive it from the view (live since).
    pub acked_set: Option<Arc<PkSet>>,
    pub inflight: VecDeque<Inflight>,
    /// The cursor the peer reaches with what was queued.
    pub queued: i64,
    pub dirty: bool,
    pub held_dirty: bool,
    pub span: tracing::Span,
}

/// Pull (HTTP) subscriptions: no view, the last answer's state.
pub(crate) struct PullState {
    pub query: String,
    pub table: String,
    pub acked: Option<(i64, Arc<PkSet>)>,
    pub pending: Option<(i64, Arc<PkSet>)>,
    pub dirty: bool,
    /// Last pull that named it: unused for the grace period, it leaves
    /// memory (the acknowledged state is stored).
    pub last_used: Instant,
}

#[derive(Default)]
pub(crate) struct Subs {
    pub conns: FxMap<ConnId, Conn>,
    pub next_conn: ConnId,
    pub subs: FxMap<SubKey, Sub>,
    pub pulls: FxMap<SubKey, PullState>,
    pub per_tenant: FxMap<Arc<str>, usize>,
    pub conns_per_tenant: FxMap<Arc<str>, usize>,
}

fn apply_fwd(h: &mut PkSet, p: &ViewPart) {
    for r in &p.entered {
        h.insert(r.pk.clone());
    }
    for k in &p.left {
        h.remove(&k.pk);
    }
    for r in &p.deleted {
        h.remove(&r.pk);
    }
}

fn apply_back(h: &mut PkSet, p: &ViewPart) {
    for r in &p.entered {
        h.remove(&r.pk);
    }
    for k in &p.left {
        h.insert(k.pk.clone());
    }
    for r in &p.deleted {
        h.insert(r.pk.clone());
    }
}

impl Sub {
    fn is_live(&self) -> bool {
        matches!(self.state, State::Live)
    }

    /// What the peer holds at `v` (None: unknown, a refetch).
    /// `unqueued`: a part of the view already applied to the view's rows
    /// but not queued to this subscription.
    pub fn held_at(
        &self,
        v: i64,
        filters: &super::filters::Filters,
        unqueued: Option<&ViewPart>,
    ) -> Option<PkSet> {
        if self.acked.is_some_and(|a| v < a) || v > self.queued {
            return None;
        }
        let mut start: Option<(usize, &Arc<PkSet>)> = None;
        for (i, e) in self.inflight.iter().enumerate() {
            if let Inflight::Sync { version, held } = e
                && *version <= v
            {
                start = Some((i, held));
            }
        }
        let fwd = |from: usize, mut h: PkSet| {
            for e in self.inflight.iter().skip(from) {
                if let Inflight::Part(p) = e
                    && p.version <= v
                {
                    apply_fwd(&mut h, p);
                }
            }
            h
        };
        match (start, &self.acked_set) {
            (Some((i, h)), _) => Some(fwd(i + 1, (**h).clone())),
            (None, Some(s)) => {
                self.acked?;
                Some(fwd(0, (**s).clone()))
            }
            (None, None) => {
                if !self.is_live() {
                    return None;
                }
                let mut h = filters.pks(self.view);
                if let Some(p) = unqueued {
                    apply_back(&mut h, p);
                }
                for e in self.inflight.iter().rev() {
                    if let Inflight::Part(p) = e
                        && p.version > v
                    {
                        apply_back(&mut h, p);
                    }
                }
                Some(h)
            }
        }
    }

    /// Makes the held set at `acked` explicit (before leaving `Live`).
    fn materialize(&mut self, filters: &super::filters::Filters, unqueued: Option<&ViewPart>) {
        if self.acked_set.is_none() {
            let a = self.acked.unwrap_or(0);
            let h = self.held_at(a, filters, unqueued).unwrap_or_default();
            self.acked_set = Some(Arc::new(h));
        }
    }
}

fn subscribed_frame(
    sub: &str,
    q: &EffectiveQuery,
    pk: Vec<String>,
    mode: SubscribeMode,
    cursor: Option<i64>,
) -> OutFrame {
    OutFrame::Text(
        serde_json::to_string(&ServerMsg::Subscribed {
            id: sub.to_owned(),
            table: q.table.clone(),
            columns: q.columns.clone(),
            pk,
            view: q.key.fingerprint(),
            mode,
            cursor,
        })
        .expect("messages serialise"),
    )
}

fn error_frame(code: ErrorCode, message: String, reference: Option<&str>) -> OutFrame {
    let mut e = ErrorMsg::new(code, message);
    e.reference = reference.map(str::to_owned);
    OutFrame::Text(serde_json::to_string(&ServerMsg::Error(e)).expect("messages serialise"))
}

impl Engine {
    fn pk_names(&self, q: &EffectiveQuery) -> Vec<String> {
        self.schema
            .table(&q.table)
            .map(|t| t.pk.iter().map(|&i| t.columns[i].clone()).collect())
            .unwrap_or_default()
    }

    pub(super) fn open(
        &mut self,
        who: Who,
        site: SiteId,
        client: Option<String>,
        outbox: Arc<OutboxShared>,
    ) -> Result<OpenOk, ApiError> {
        if self.stopping {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the server is stopping",
            ));
        }
        let s = &self.subs;
        if s.conns.len() >= self.limits.max_connections {
            return Err(ApiError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the server has its maximum of {} connections",
                    self.limits.max_connections
                ),
            ));
        }
        let n = s.conns_per_tenant.get(&who.tenant).copied().unwrap_or(0);
        if n >= self.limits.max_connections_per_tenant {
            return Err(ApiError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "tenant {:?} has its maximum of {} connections",
                    &*who.tenant, self.limits.max_connections_per_tenant
                ),
            ));
        }
        let pushed_version = self.bind_peer(&who, site)?;
        let id = self.subs.next_conn;
        self.subs.next_conn += 1;
        let tx = self.tx.clone();
        outbox.set_drained_hook(Box::new(move || {
            let _ = tx.send(super::Cmd::Drained { conn: id });
        }));
        let span = tracing::info_span!("connection", conn = id, site = %site, subject = %who.principal.subject, tenant = %who.tenant, client = client.as_deref().unwrap_or(""));
        span.in_scope(|| tracing::info!("session opened"));
        *self
            .subs
            .conns_per_tenant
            .entry(who.tenant.clone())
            .or_default() += 1;
        self.subs.conns.insert(
            id,
            Conn {
                site,
                who,
                outbox,
                subs: FxSet::default(),
                lagging: false,
                span,
            },
        );
        metrics::gauge!("tenantsync_connections", "shard" => self.stats.index.to_string())
            .set(self.subs.conns.len() as f64);
        Ok(OpenOk {
            conn: id,
            pushed_version,
            db_version: self.version,
        })
    }

    pub(super) fn close(&mut self, conn: ConnId) {
        let Some(c) = self.subs.conns.remove(&conn) else {
            return;
        };
        c.span.in_scope(|| tracing::info!("session closed"));
        if let Some(n) = self.subs.conns_per_tenant.get_mut(&c.who.tenant) {
            *n = n.saturating_sub(1);
        }
        for id in c.subs {
            let key = (c.site, id);
            if let Some(sub) = self.subs.subs.get_mut(&key)
                && sub.conn == Some(conn)
            {
                sub.materialize(&self.filters, None);
                sub.conn = None;
                sub.state = State::Detached {
                    since: Instant::now(),
                };
                sub.dirty = true;
                sub.held_dirty = true;
            }
        }
        metrics::gauge!("tenantsync_connections", "shard" => self.stats.index.to_string())
            .set(self.subs.conns.len() as f64);
    }

    pub(super) fn close_all(&mut self) {
        let ids: Vec<ConnId> = self.subs.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.subs.conns.get(&id) {
                c.outbox.push_frame(OutFrame::Close {
                    code: ErrorCode::ShuttingDown,
                    message: "the server is stopping".into(),
                });
            }
            self.close(id);
        }
    }

    fn send(&self, conn: ConnId, f: OutFrame) {
        if let Some(c) = self.subs.conns.get(&conn) {
            c.outbox.push_frame(f);
        }
    }

    fn add_tenant_sub(&mut self, tenant: &Arc<str>, d: isize) {
        let n = self.subs.per_tenant.entry(tenant.clone()).or_default();
        *n = n.saturating_add_signed(d);
    }

    /// Takes a subscription off its view (dropping the view's sub entry).
    fn leave_view(&mut self, key: &SubKey, view: FilterId) {
        let v = self.filters.view_mut(view);
        v.subs.remove(key);
        if v.subs.is_empty() {
            v.idle_since = Some(Instant::now());
        }
    }

    fn join_view(&mut self, key: &SubKey, view: FilterId) {
        let v = self.filters.view_mut(view);
        v.subs.insert(key.clone());
        v.idle_since = None;
    }

    pub(super) fn subscribe(
        &mut self,
        conn: ConnId,
        id: Arc<str>,
        query: String,
        cursor: Option<i64>,
        mut q: Arc<EffectiveQuery>,
        epoch: u64,
    ) {
        let Some(c) = self.subs.conns.get(&conn) else {
            return;
        };
        let site = c.site;
        let who = c.who.clone();
        if epoch != self.policy_gen {
            match self.policy.rewrite(&who.principal.identity, &query) {
                Ok(x) => q = Arc::new(x),
                Err(e) => {
                    self.send(
                        conn,
                        error_frame(ErrorCode::QueryRefused, e.to_string(), Some(&id)),
                    );
                    return;
                }
            }
        }
        let key: SubKey = (site, id.clone());
        let existing = self.subs.subs.remove(&key);
        let epoch0 = existing.as_ref().map_or(0, |s| s.epoch);
        if existing.is_none() {
            let n = self.subs.per_tenant.get(&who.tenant).copied().unwrap_or(0);
            if n >= self.limits.max_subscriptions_per_tenant {
                self.send(
                    conn,
                    error_frame(
                        ErrorCode::LimitExceeded,
                        format!(
                            "tenant {:?} has its maximum of {} subscriptions",
                            &*who.tenant, self.limits.max_subscriptions_per_tenant
                        ),
                        Some(&id),
                    ),
                );
                return;
            }
        }
        let view = match self
            .filters
            .view_for(&self.db, &self.schema, &q, self.version)
        {
            Ok(v) => v,
            Err(e) => {
                if let Some(old) = existing {
                    self.subs.subs.insert(key, old);
                }
                self.send(
                    conn,
                    error_frame(ErrorCode::Internal, e.to_string(), Some(&id)),
                );
                return;
            }
        };
        // Where the sync starts.
        let (mode, base, acked, acked_set) = match existing {
            Some(old) => {
                if let Some(oc) = old.conn
                    && oc != conn
                    && let Some(c) = self.subs.conns.get_mut(&oc)
                {
                    c.subs.remove(&id);
                }
                self.leave_view(&key, old.view);

                match cursor {
                    Some(cur) if old.query == query => {
                        match old.held_at(cur, &self.filters, None) {
                            Some(h) => {
                                let h = Arc::new(h);
                                (
                                    SubscribeMode::Resume,
                                    SyncBase {
                                        cursor: Some(cur),
                                        held: h.clone(),
                                        reset: false,
                                    },
                                    Some(cur),
                                    Some(h),
                                )
                            }
                            None => (
                                SubscribeMode::Refetch,
                                SyncBase {
                                    cursor: Some(cur),
                                    held: Arc::default(),
                                    reset: true,
                                },
                                None,
                                Some(Arc::default()),
                            ),
                        }
                    }
                    Some(cur) => (
                        SubscribeMode::Refetch,
                        SyncBase {
                            cursor: Some(cur),
                            held: Arc::default(),
                            reset: true,
                        },
                        None,
                        Some(Arc::default()),
                    ),
                    None => (
                        SubscribeMode::Snapshot,
                        SyncBase::snapshot(),
                        None,
                        Some(Arc::default()),
                    ),
                }
            }
            None => {
                self.add_tenant_sub(&who.tenant, 1);
                let stored = store::load_sub(self.db.conn(), &site, &id).ok().flatten();
                match (cursor, stored) {
                    (Some(cur), Some(row)) if row.query == query && row.cursor == cur => {
                        let h = Arc::new(row.held);
                        (
                            SubscribeMode::Resume,
                            SyncBase {
                                cursor: Some(cur),
                                held: h.clone(),
                                reset: false,
                            },
                            Some(cur),
                            Some(h),
                        )
                    }
                    (Some(cur), _) => (
                        SubscribeMode::Refetch,
                        SyncBase {
                            cursor: Some(cur),
                            held: Arc::default(),
                            reset: true,
                        },
                        None,
                        Some(Arc::default()),
                    ),
                    (None, _) => (
                        SubscribeMode::Snapshot,
                        SyncBase::snapshot(),
                        None,
                        Some(Arc::default()),
                    ),
                }
            }
        };
        self.join_view(&key, view);
        let span = tracing::info_span!(parent: &self.subs.conns[&conn].span, "subscription", sub = %id, view = %q.key.fingerprint(), table = %q.table);
        span.in_scope(|| tracing::debug!(?mode, "subscribed"));
        let sub = Sub {
            key: key.clone(),
            query,
            q: q.clone(),
            identity: who.principal.identity.clone(),
            tenant: who.tenant.clone(),
            conn: Some(conn),
            view,
            state: State::Live,
            epoch: epoch0,
            current: Arc::new(std::sync::atomic::AtomicU64::new(epoch0)),
            acked,
            acked_set,
            inflight: VecDeque::new(),
            queued: base.cursor.unwrap_or(0),
            dirty: true,
            held_dirty: true,
            span,
        };
        self.subs.subs.insert(key.clone(), sub);
        if let Some(c) = self.subs.conns.get_mut(&conn) {
            c.subs.insert(id);
        }
        self.start_sync(&key, mode, base);
    }

    /// Starts an initial sync (the subscription becomes pending).
    fn start_sync(&mut self, key: &SubKey, mode: SubscribeMode, base: SyncBase) {
        let pk = {
            let Some(sub) = self.subs.subs.get(key) else {
                return;
            };
            self.pk_names(&sub.q)
        };
        let Some(sub) = self.subs.subs.get_mut(key) else {
            return;
        };
        if sub.is_live() {
            sub.materialize(&self.filters, None);
        }
        let Some(conn) = sub.conn.and_then(|c| self.subs.conns.get(&c)) else {
            return;
        };
        sub.epoch += 1;
        sub.current
            .store(sub.epoch, std::sync::atomic::Ordering::Release);
        sub.state = State::Pending {
            base: base.clone(),
            buffer: Vec::new(),
            overflow: false,
            moved: false,
        };
        conn.outbox.push_frame(subscribed_frame(
            &key.1,
            &sub.q,
            pk,
            mode,
            if mode == SubscribeMode::Resume {
                base.cursor
            } else {
                None
            },
        ));
        let job = SyncJob {
            sub: key.clone(),
            epoch: sub.epoch,
            current: sub.current.clone(),
            q: sub.q.clone(),
            base,
            outbox: conn.outbox.clone(),
        };
        self.readers.submit(&sub.tenant, Job::Sync(job));
    }

    pub(super) fn unsubscribe(&mut self, conn: ConnId, id: &str) {
        let Some(c) = self.subs.conns.get_mut(&conn) else {
            return;
        };
        let site = c.site;
        if !c.subs.remove(id) {
            self.send(
                conn,
                error_frame(
                    ErrorCode::UnknownSubscription,
                    format!("no active subscription {id:?}"),
                    Some(id),
                ),
            );
            return;
        }
        let key: SubKey = (site, Arc::from(id));
        if let Some(sub) = self.subs.subs.remove(&key) {
            self.leave_view(&key, sub.view);
            self.add_tenant_sub(&sub.tenant, -1);
        }
        let _ = store::delete_sub(self.db.conn(), &site, id);
        self.send(
            conn,
            OutFrame::Text(
                serde_json::to_string(&ServerMsg::Unsubscribed { id: id.to_owned() })
                    .expect("serialise"),
            ),
        );
    }

    pub(super) fn resync(&mut self, conn: ConnId, id: &str, cursor: i64) {
        let Some(c) = self.subs.conns.get(&conn) else {
            return;
        };
        let key: SubKey = (c.site, Arc::from(id));
        let Some(sub) = self
            .subs
            .subs
            .get_mut(&key)
            .filter(|s| s.conn == Some(conn))
        else {
            self.send(
                conn,
                error_frame(
                    ErrorCode::UnknownSubscription,
                    format!("no active subscription {id:?}"),
                    Some(id),
                ),
            );
            return;
        };
        let held = match &sub.state {
            State::Live => sub.held_at(cursor, &self.filters, None),
            _ => {
                sub.materialize(&self.filters, None);
                sub.held_at(cursor, &self.filters, None)
            }
        };
        let (mode, base) = match held {
            Some(h) => (
                SubscribeMode::Resume,
                SyncBase {
                    cursor: Some(cursor),
                    held: Arc::new(h),
                    reset: false,
                },
            ),
            None => (
                SubscribeMode::Refetch,
                SyncBase {
                    cursor: Some(cursor),
                    held: Arc::default(),
                    reset: true,
                },
            ),
        };
        self.start_sync(&key, mode, base);
    }

    pub(super) fn ack(&mut self, conn: ConnId, cursors: BTreeMap<String, i64>) {
        let Some(c) = self.subs.conns.get(&conn) else {
            return;
        };
        let site = c.site;
        let mut unknown = Vec::new();
        for (id, v) in cursors {
            let key: SubKey = (site, Arc::from(id.as_str()));
            let Some(sub) = self
                .subs
                .subs
                .get_mut(&key)
                .filter(|s| s.conn == Some(conn))
            else {
                unknown.push(id);
                continue;
            };
            let v = v.min(sub.queued);
            if sub.acked.is_some_and(|a| v <= a) {
                continue;
            }
            let later_sync = sub
                .inflight
                .iter()
                .any(|e| matches!(e, Inflight::Sync { version, .. } if *version > v));
            let has_sync_le = sub
                .inflight
                .iter()
                .any(|e| matches!(e, Inflight::Sync { version, .. } if *version <= v));
            if sub.acked.is_none() && !has_sync_le {
                // Nothing of it reached the peer at v.
                continue;
            }
            let new_set = if sub.is_live() && !later_sync {
                None
            } else {
                match sub.held_at(v, &self.filters, None) {
                    Some(h) => Some(Arc::new(h)),
                    None => continue,
                }
            };
            let mut moved = false;
            while let Some(front) = sub.inflight.front() {
                let ver = match front {
                    Inflight::Part(p) => p.version,
                    Inflight::Sync { version, .. } => *version,
                };
                if ver > v {
                    break;
                }
                moved |= match front {
                    Inflight::Part(p) => p.moves_rows(),
                    Inflight::Sync { .. } => true,
                };
                sub.inflight.pop_front();
            }
            sub.acked = Some(v);
            sub.acked_set = new_set;
            sub.dirty = true;
            sub.held_dirty |= moved;
        }
        for id in unknown {
            self.send(
                conn,
                error_frame(
                    ErrorCode::UnknownSubscription,
                    format!("ack of {id:?}, which is not an active subscription"),
                    Some(&id),
                ),
            );
        }
    }

    pub(super) fn sync_done(
        &mut self,
        key: SubKey,
        epoch: u64,
        version: i64,
        held: Arc<PkSet>,
        last: String,
    ) {
        let now = self.version;
        let pending_parts = self.tuning.pending_parts;
        let Some(sub) = self.subs.subs.get_mut(&key) else {
            return;
        };
        if sub.epoch != epoch {
            return;
        }
        let State::Pending {
            buffer,
            overflow,
            moved,
            ..
        } = std::mem::replace(&mut sub.state, State::Live)
        else {
            return;
        };
        let _ = pending_parts;
        if let Some(c) = sub.conn.and_then(|c| self.subs.conns.get(&c)) {
            c.outbox.push_frame(OutFrame::Text(last));
        }
        sub.inflight.push_back(Inflight::Sync {
            version,
            held: held.clone(),
        });
        sub.queued = sub.queued.max(version);
        sub.dirty = true;
        sub.held_dirty = true;
        sub.span
            .in_scope(|| tracing::debug!(version, rows = held.len(), "initial sync done"));
        let resume = SyncBase {
            cursor: Some(version),
            held: held.clone(),
            reset: false,
        };
        if overflow || moved {
            sub.state = State::Lagging {
                base: resume.clone(),
            };
            self.start_sync(&key, SubscribeMode::Resume, resume);
            return;
        }
        let rest: Vec<Arc<ViewPart>> = buffer.into_iter().filter(|p| p.version > version).collect();
        if rest.is_empty() {
            return;
        }
        let Some(conn) = sub.conn.and_then(|c| self.subs.conns.get(&c)) else {
            return;
        };
        let item = Item {
            version: now,
            bytes: rest.iter().map(|p| p.bytes).sum(),
            parts: rest
                .iter()
                .map(|p| ItemPart {
                    sub: key.1.clone(),
                    from: version,
                    part: p.clone(),
                })
                .collect(),
            committed: Instant::now(),
        };
        match conn.outbox.try_push_item(item) {
            Ok(()) => {
                for p in rest {
                    if p.moves_rows() {
                        sub.inflight.push_back(Inflight::Part(p));
                    }
                }
                sub.queued = now;
            }
            Err(_) => {
                conn.outbox
                    .lagging
                    .store(true, std::sync::atomic::Ordering::Release);
                sub.state = State::Lagging { base: resume };
            }
        }
    }

    pub(super) fn sync_abandoned(&mut self, key: SubKey, epoch: u64) {
        let Some(sub) = self.subs.subs.get_mut(&key) else {
            return;
        };
        if sub.epoch != epoch {
            return;
        }
        if let State::Pending { base, .. } = &sub.state {
            let base = base.clone();
            sub.state = State::Lagging { base };
            if let Some(c) = sub.conn.and_then(|c| self.subs.conns.get_mut(&c)) {
                c.lagging = true;
                c.outbox
                    .lagging
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }

    pub(super) fn drained(&mut self, conn: ConnId) {
        let Some(c) = self.subs.conns.get_mut(&conn) else {
            return;
        };
        c.lagging = false;
        let site = c.site;
        let ids: Vec<Arc<str>> = c.subs.iter().cloned().collect();
        for id in ids {
            let key = (site, id);
            let base = match self.subs.subs.get(&key).map(|s| &s.state) {
                Some(State::Lagging { base }) => base.clone(),
                _ => continue,
            };
            let mode = if base.reset {
                if base.cursor.is_some() {
                    SubscribeMode::Refetch
                } else {
                    SubscribeMode::Snapshot
                }
            } else {
                SubscribeMode::Resume
            };
            self.start_sync(&key, mode, base);
        }
    }

    pub(super) fn retry_lagging(&mut self) {
        let ready: Vec<ConnId> = self
            .subs
            .conns
            .iter()
            .filter(|(_, c)| {
                c.outbox.queued_bytes() <= c.outbox.max_bytes / 2
                    && c.subs.iter().any(|id| {
                        matches!(
                            self.subs.subs.get(&(c.site, id.clone())).map(|s| &s.state),
                            Some(State::Lagging { .. })
                        )
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        for c in ready {
            if let Some(x) = self.subs.conns.get(&c) {
                x.outbox
                    .lagging
                    .store(false, std::sync::atomic::Ordering::Release);
            }
            self.drained(c);
        }
    }

    /// Fans one commit out: updates filters, builds each touched view's
    /// part once, queues one item per connection.
    pub(super) fn fan_out(&mut self, rows: Vec<ChangedRow>, version: i64) {
        let started = Instant::now();
        let mut longpolls = std::mem::take(&mut self.longpolls);
        longpolls.commit(version, &rows, &self.read_scope, &|s, sub, t, pk| {
            self.pull_holds(s, sub, t, pk)
        });
        self.longpolls = longpolls;
        let drafts = match self.filters.apply_commit(&self.db, &self.schema, &rows) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, version, "fan-out failed");
                return;
            }
        };
        if drafts.is_empty() {
            return;
        }
        let wanted: Vec<(u16, PackedPk)> = drafts
            .iter()
            .flat_map(|(f, d)| {
                let t = self.filters.get(*f).table;
                d.entered.iter().map(move |pk| (t, pk.clone()))
            })
            .collect();
        let whole = match commit::whole_rows(&self.db, &self.schema, wanted) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, version, "reading entering rows failed");
                return;
            }
        };
        let mut per_conn: PerConn = FxMap::default();
        for (f, d) in drafts {
            let table = self.filters.get(f).table;
            let part = Arc::new(self.part_of(table, &d, &rows, &whole, version));
            let subs: Vec<SubKey> = {
                let v = self.filters.view_mut(f);
                v.last_part = version;
                v.subs.iter().cloned().collect()
            };
            for key in subs {
                let Some(sub) = self.subs.subs.get_mut(&key) else {
                    continue;
                };
                match &mut sub.state {
                    State::Live => {
                        if let Some(c) = sub.conn {
                            per_conn
                                .entry(c)
                                .or_default()
                                .push((key.1.clone(), part.clone()));
                        }
                    }
                    State::Pending {
                        buffer, overflow, ..
                    } => {
                        if !*overflow {
                            buffer.push(part.clone());
                            if buffer.len() > self.tuning.pending_parts {
                                buffer.clear();
                                *overflow = true;
                            }
                        }
                    }
                    State::Lagging { .. } | State::Detached { .. } => {}
                }
            }
        }
        for (conn, parts) in per_conn {
            self.queue_item(conn, parts, version);
        }
        metrics::histogram!("tenantsync_fanout_seconds").record(started.elapsed().as_secs_f64());
    }

    fn part_of(
        &self,
        table: u16,
        d: &Draft,
        rows: &[ChangedRow],
        whole: &FxMap<(u16, PackedPk), Arc<crate::engine::outbox::RowChanges>>,
        version: i64,
    ) -> ViewPart {
        let tname = &self.schema.tables[table as usize].name;
        ViewPart {
            version,
            deltas: d.deltas.iter().map(|&i| rows[i].delta.clone()).collect(),
            deleted: d.deleted.iter().map(|&i| rows[i].delta.clone()).collect(),
            entered: d
                .entered
                .iter()
                .filter_map(|pk| whole.get(&(table, pk.clone())).cloned())
                .collect(),
            left: d
                .left
                .iter()
                .map(|pk| RowKey {
                    table: tname.to_string(),
                    pk: pk.clone(),
                })
                .collect(),
            bytes: 0,
        }
        .finish()
    }

    /// Queues one connection's parts of one version; a full outbox makes
    /// its live subscriptions lagging.
    fn queue_item(&mut self, conn: ConnId, parts: Vec<(Arc<str>, Arc<ViewPart>)>, version: i64) {
        let Some(c) = self.subs.conns.get(&conn) else {
            return;
        };
        let site = c.site;
        let item = Item {
            version,
            bytes: parts.iter().map(|(_, p)| p.bytes + 32).sum(),
            parts: parts
                .iter()
                .map(|(sub, p)| ItemPart {
                    sub: sub.clone(),
                    from: self
                        .subs
                        .subs
                        .get(&(site, sub.clone()))
                        .map_or(0, |s| s.queued),
                    part: p.clone(),
                })
                .collect(),
            committed: Instant::now(),
        };
        match c.outbox.try_push_item(item) {
            Ok(()) => {
                for (id, p) in parts {
                    if let Some(sub) = self.subs.subs.get_mut(&(site, id)) {
                        sub.queued = version;
                        if p.moves_rows() {
                            sub.inflight.push_back(Inflight::Part(p));
                            sub.held_dirty = true;
                        }
                    }
                }
            }
            Err(_) => {
                c.outbox
                    .lagging
                    .store(true, std::sync::atomic::Ordering::Release);
                let ids: Vec<Arc<str>> = c.subs.iter().cloned().collect();
                let unqueued: FxMap<Arc<str>, Arc<ViewPart>> = parts.into_iter().collect();
                if let Some(c) = self.subs.conns.get_mut(&conn) {
                    c.lagging = true;
                }
                metrics::counter!("tenantsync_lagging_total").increment(1);
                for id in ids {
                    let key = (site, id.clone());
                    let Some(sub) = self.subs.subs.get_mut(&key) else {
                        continue;
                    };
                    if !sub.is_live() {
                        continue;
                    }
                    let p = unqueued.get(&id).map(|p| &**p);
                    let held = sub
                        .held_at(sub.queued, &self.filters, p)
                        .unwrap_or_default();
                    sub.materialize(&self.filters, p);
                    sub.state = State::Lagging {
                        base: SyncBase {
                            cursor: Some(sub.queued),
                            held: Arc::new(held),
                            reset: false,
                        },
                    };
                }
            }
        }
    }

    /// Whether the pull state of (site, sub) holds a row of `table`.
    fn pull_holds(&self, site: &SiteId, sub: &Arc<str>, table: u16, pk: &PackedPk) -> bool {
        let name = &self.schema.tables[table as usize].name;
        self.subs
            .pulls
            .get(&(*site, sub.clone()))
            .filter(|p| p.table.eq_ignore_ascii_case(name))
            .and_then(|p| p.pending.as_ref().or(p.acked.as_ref()))
            .is_some_and(|(_, h)| h.contains(pk))
    }

    /// A long-poll that saw the commits up to `since` waits for one that
    /// concerns it (`longpoll`).
    pub(super) fn pull_wait(
        &mut self,
        who: &Who,
        site: SiteId,
        subs: Vec<(Arc<str>, String, Vec<String>)>,
        since: i64,
        reply: tokio::sync::oneshot::Sender<()>,
    ) {
        let id = |n: &str| self.schema.table(n).map(|t| t.id);
        let main = subs.iter().filter_map(|(_, t, _)| id(t)).collect();
        let tables = subs
            .iter()
            .flat_map(|(_, t, deps)| std::iter::once(t).chain(deps))
            .filter_map(|t| id(t))
            .collect();
        let w = super::longpoll::Waiter {
            tenant: who.tenant.clone(),
            site,
            subs: subs.into_iter().map(|(s, _, _)| s).collect(),
            main,
            tables,
            reply,
        };
        let mut longpolls = std::mem::take(&mut self.longpolls);
        longpolls.wait(w, since, &|s, sub, t, pk| self.pull_holds(s, sub, t, pk));
        self.longpolls = longpolls;
    }

    /// After a policy reload: subscriptions whose effective query changed
    /// move to their new view; live ones get what entered and left as a
    /// part of the reload's own version.
    pub(super) fn move_after_reload(
        &mut self,
        change: &PolicyChange,
        version: i64,
    ) -> (usize, usize) {
        let keys: Vec<SubKey> = self.subs.subs.keys().cloned().collect();
        let mut changed_views: FxSet<FilterId> = FxSet::default();
        let mut moved = 0;
        let mut per_conn: PerConn = FxMap::default();
        for key in keys {
            let (old_view, q_new) = {
                let sub = &self.subs.subs[&key];
                if !change.affects(&sub.q) {
                    continue;
                }
                let q = self.policy.rewrite(&sub.identity, &sub.query);
                (sub.view, q)
            };
            let q_new = match q_new {
                Ok(q) => Arc::new(q),
                Err(e) => {
                    // The query is no longer allowed: everything leaves.
                    let held = self.filters.pks(old_view);
                    let sub = self.subs.subs.remove(&key).expect("present");
                    self.leave_view(&key, old_view);
                    self.add_tenant_sub(&sub.tenant, -1);
                    let _ = store::delete_sub(self.db.conn(), &key.0, &key.1);
                    if let Some(c) = sub.conn {
                        if let Some(cn) = self.subs.conns.get_mut(&c) {
                            cn.subs.remove(&key.1);
                        }
                        if sub.is_live() {
                            let left = held
                                .into_iter()
                                .map(|pk| RowKey {
                                    table: sub.q.table.clone(),
                                    pk,
                                })
                                .collect();
                            let part = ViewPart {
                                version,
                                left,
                                ..ViewPart::default()
                            }
                            .finish();
                            per_conn
                                .entry(c)
                                .or_default()
                                .push((key.1.clone(), Arc::new(part)));
                        }
                        self.send(
                            c,
                            error_frame(
                                ErrorCode::QueryRefused,
                                format!("after the policy reload: {e}"),
                                Some(&key.1),
                            ),
                        );
                    }
                    moved += 1;
                    continue;
                }
            };
            if q_new.key == self.subs.subs[&key].q.key {
                continue;
            }
            let new_view = match self
                .filters
                .view_for(&self.db, &self.schema, &q_new, version)
            {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build a view after the reload");
                    continue;
                }
            };
            changed_views.insert(old_view);
            moved += 1;
            self.leave_view(&key, old_view);
            self.join_view(&key, new_view);
            let live = self.subs.subs[&key].is_live();
            if live {
                let old_rows = self.filters.pks(old_view);
                let new_rows = self.filters.pks(new_view);
                let table = self.filters.get(new_view).table;
                let entered: Vec<(u16, PackedPk)> = new_rows
                    .iter()
                    .filter(|p| !old_rows.contains(*p))
                    .map(|p| (table, p.clone()))
                    .collect();
                let whole =
                    commit::whole_rows(&self.db, &self.schema, entered.clone()).unwrap_or_default();
                let tname = self.schema.tables[table as usize].name.to_string();
                let part = ViewPart {
                    version,
                    entered: entered
                        .iter()
                        .filter_map(|k| whole.get(k).cloned())
                        .collect(),
                    left: old_rows
                        .iter()
                        .filter(|p| !new_rows.contains(*p))
                        .map(|pk| RowKey {
                            table: tname.clone(),
                            pk: pk.clone(),
                        })
                        .collect(),
                    ..ViewPart::default()
                }
                .finish();
                let sub = self.subs.subs.get_mut(&key).expect("present");
                sub.view = new_view;
                sub.q = q_new;
                if let Some(c) = sub.conn {
                    per_conn
                        .entry(c)
                        .or_default()
                        .push((key.1.clone(), Arc::new(part)));
                }
            } else {
                let sub = self.subs.subs.get_mut(&key).expect("present");
                sub.view = new_view;
                sub.q = q_new;
                if let State::Pending { moved, .. } = &mut sub.state {
                    *moved = true;
                }
            }
        }
        for (conn, parts) in per_conn {
            self.queue_item(conn, parts, version);
        }
        (changed_views.len(), moved)
    }

    pub(super) fn heartbeat(&mut self) {
        let version = self.version;
        let conns: Vec<ConnId> = self.subs.conns.keys().copied().collect();
        let empty = Arc::new(ViewPart {
            version,
            ..ViewPart::default()
        });
        for conn in conns {
            let c = &self.subs.conns[&conn];
            let site = c.site;
            let quiet: Vec<(Arc<str>, Arc<ViewPart>)> = c
                .subs
                .iter()
                .filter(|id| {
                    self.subs
                        .subs
                        .get(&(site, (*id).clone()))
                        .is_some_and(|s| s.is_live() && s.queued < version)
                })
                .map(|id| (id.clone(), empty.clone()))
                .collect();
            if !quiet.is_empty() {
                self.queue_item(conn, quiet, version);
            }
        }
    }

    /// Writes acknowledged state of dirty subscriptions (all of them when
    /// `all`, else a bounded batch).
    pub(super) fn persist(&mut self, all: bool) {
        let limit = if all {
            usize::MAX
        } else {
            self.tuning.persist_batch
        };
        let mut rows = Vec::new();
        for sub in self.subs.subs.values_mut() {
            if rows.len() >= limit {
                break;
            }
            if !sub.dirty {
                continue;
            }
            let Some(acked) = sub.acked else {
                continue;
            };
            let held = if sub.held_dirty {
                let h = sub.held_at(acked, &self.filters, None);
                match h {
                    Some(h) => Some(h),
                    None => continue,
                }
            } else {
                None
            };
            sub.dirty = false;
            sub.held_dirty = false;
            rows.push((
                sub.key.clone(),
                sub.query.clone(),
                sub.q.table.clone(),
                acked,
                held,
            ));
        }
        for (key, p) in self.subs.pulls.iter_mut() {
            if rows.len() >= limit {
                break;
            }
            if !p.dirty {
                continue;
            }
            p.dirty = false;
            if let Some((c, h)) = &p.acked {
                rows.push((
                    key.clone(),
                    p.query.clone(),
                    p.table.clone(),
                    *c,
                    Some((**h).clone()),
                ));
            }
        }
        if rows.is_empty() {
            return;
        }
        let r = (|| {
            self.db.conn().execute_batch("BEGIN IMMEDIATE")?;
            for (key, query, table, cursor, held) in &rows {
                // A cursor-only update of a row never stored writes it whole.
                let exists =
                    held.is_some() || store::load_sub(self.db.conn(), &key.0, &key.1)?.is_some();
                if exists {
                    store::save_sub(
                        self.db.conn(),
                        &key.0,
                        &key.1,
                        query,
                        table,
                        *cursor,
                        held.as_ref(),
                    )?;
                }
            }
            self.db.conn().execute_batch("COMMIT")
        })();
        if let Err(e) = r {
            let _ = self.db.conn().execute_batch("ROLLBACK");
            tracing::error!(error = %e, "persisting subscriptions failed");
        }
    }

    pub(super) fn expire(&mut self) {
        let grace = self.tuning.grace;
        let gone: Vec<SubKey> = self
            .subs
            .subs
            .iter()
            .filter(
                |(_, s)| matches!(s.state, State::Detached { since } if since.elapsed() >= grace),
            )
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            self.persist(true);
        }
        for key in gone {
            if let Some(sub) = self.subs.subs.remove(&key) {
                self.leave_view(&key, sub.view);
                self.add_tenant_sub(&sub.tenant, -1);
            }
        }
        let idle = self.tuning.view_idle;
        let drop: Vec<FilterId> = self
            .filters
            .view_ids()
            .into_iter()
            .filter(|f| {
                let v = self.filters.view(*f);
                v.subs.is_empty() && v.idle_since.is_some_and(|t| t.elapsed() >= idle)
            })
            .collect();
        for f in drop {
            self.filters.drop_view(f);
        }
    }

    pub(super) fn gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let st = &self.stats;
        st.connections.store(self.subs.conns.len() as u64, Relaxed);
        st.subscriptions.store(self.subs.subs.len() as u64, Relaxed);
        st.views.store(self.filters.views.len() as u64, Relaxed);
        st.pull_states.store(self.subs.pulls.len() as u64, Relaxed);
        st.peers_in_memory.store(self.peers.len() as u64, Relaxed);
        st.long_polls.store(self.longpolls.len() as u64, Relaxed);
        metrics::gauge!("tenantsync_subscriptions", "shard" => self.stats.index.to_string())
            .set(self.subs.subs.len() as f64);
        metrics::gauge!("tenantsync_views", "shard" => self.stats.index.to_string())
            .set(self.filters.views.len() as f64);
        metrics::gauge!("tenantsync_membership_instances", "shard" => self.stats.index.to_string())
            .set(self.filters.instance_count() as f64);
        let lag = self
            .subs
            .subs
            .values()
            .map(|s| self.version - s.acked.unwrap_or(0))
            .max()
            .unwrap_or(0);
        metrics::gauge!("tenantsync_cursor_lag", "shard" => self.stats.index.to_string())
            .set(lag as f64);
    }

    pub(super) fn pull_begin(
        &mut self,
        who: &Who,
        site: SiteId,
        subs: Vec<(PullSub, Arc<EffectiveQuery>)>,
        unsubscribe: Vec<String>,
        epoch: u64,
    ) -> Result<(Vec<PullItem>, i64), ApiError> {
        let pushed_version = self.bind_peer(who, site)?;
        for id in unsubscribe {
            self.subs.pulls.remove(&(site, Arc::from(id.as_str())));
            let _ = store::delete_sub(self.db.conn(), &site, &id);
        }
        let mut out = Vec::new();
        for (ps, mut q) in subs {
            if epoch != self.policy_gen {
                q = Arc::new(
                    self.policy
                        .rewrite(&who.principal.identity, &ps.query)
                        .map_err(|e| {
                            ApiError::new(
                                ErrorCode::QueryRefused,
                                format!("subscription {:?}: {e}", ps.id),
                            )
                        })?,
                );
            }
            let key: SubKey = (site, Arc::from(ps.id.as_str()));
            if !self.subs.pulls.contains_key(&key) {
                let stored = store::load_sub(self.db.conn(), &site, &ps.id)
                    .ok()
                    .flatten();
                self.subs.pulls.insert(
                    key.clone(),
                    PullState {
                        query: ps.query.clone(),
                        table: q.table.clone(),
                        acked: stored.and_then(|r| {
                            (r.query == ps.query).then(|| (r.cursor, Arc::new(r.held)))
                        }),
                        pending: None,
                        dirty: false,
                        last_used: Instant::now(),
                    },
                );
            }
            let st = self.subs.pulls.get_mut(&key).expect("inserted");
            st.last_used = Instant::now();
            if st.query != ps.query {
                st.query = ps.query.clone();
                st.table = q.table.clone();
                st.acked = None;
                st.pending = None;
            }
            let (mode, base) = match ps.cursor {
                None => (SubscribeMode::Snapshot, SyncBase::snapshot()),
                Some(c) => {
                    if let Some((v, h)) = st.pending.clone().filter(|(v, _)| *v == c) {
                        st.acked = Some((v, h.clone()));
                        st.pending = None;
                        st.dirty = true;
                        (
                            SubscribeMode::Resume,
                            SyncBase {
                                cursor: Some(c),
                                held: h,
                                reset: false,
                            },
                        )
                    } else if let Some((_, h)) = st.acked.clone().filter(|(v, _)| *v == c) {
                        (
                            SubscribeMode::Resume,
                            SyncBase {
                                cursor: Some(c),
                                held: h,
                                reset: false,
                            },
                        )
                    } else {
                        (
                            SubscribeMode::Refetch,
                            SyncBase {
                                cursor: Some(c),
                                held: Arc::default(),
                                reset: true,
                            },
                        )
                    }
                }
            };
            out.push(PullItem {
                id: ps.id,
                q,
                mode,
                base,
            });
        }
        Ok((out, pushed_version))
    }

    pub(super) fn pull_end(
        &mut self,
        site: SiteId,
        done: Vec<(String, String, String, i64, Arc<PkSet>)>,
    ) {
        for (id, query, table, version, held) in done {
            let key: SubKey = (site, Arc::from(id.as_str()));
            let st = self.subs.pulls.entry(key).or_insert_with(|| PullState {
                query: query.clone(),
                table: table.clone(),
                acked: None,
                pending: None,
                dirty: false,
                last_used: Instant::now(),
            });
            st.pending = Some((version, held));
            st.last_used = Instant::now();
        }
    }

    pub(super) fn report(&mut self, site: SiteId) -> Result<PeerReport, ApiError> {
        if !self.peers.contains_key(&site)
            && let Ok(Some(row)) = store::load_peer(self.db.conn(), &site)
        {
            self.peers.insert(
                site,
                super::Peer {
                    subject: row.subject,
                    tenant: row.tenant,
                    claims: row.claims.unwrap_or_else(|| "{}".into()),
                    pushed_version: row.pushed_version,
                    last_used: Instant::now(),
                },
            );
        }
        let Some(peer) = self.peers.get(&site) else {
            return Err(ApiError::new(
                ErrorCode::BadMessage,
                format!("no peer with site id {site}"),
            ));
        };
        let (subject, tenant, pushed_version) = (
            peer.subject.clone(),
            peer.tenant.clone(),
            peer.pushed_version,
        );
        let stored_identity =
            Arc::new(tenantsync_policy::Identity::from_json(&peer.claims).unwrap_or_default());
        let connected = self.subs.conns.values().any(|c| c.site == site);
        // (id, query, table, identity, acked, held, entering, leaving)
        type Entry = (
            String,
            String,
            String,
            Arc<Identity>,
            i64,
            PkSet,
            usize,
            usize,
        );
        let mut entries: Vec<Entry> = Vec::new();
        let mut seen: FxSet<String> = FxSet::default();
        for (key, sub) in self.subs.subs.iter().filter(|(k, _)| k.0 == site) {
            let acked = sub.acked.unwrap_or(0);
            let held = if sub.acked.is_some() {
                sub.held_at(acked, &self.filters, None).unwrap_or_default()
            } else {
                PkSet::default()
            };
            let (mut ent, mut lea) = (0, 0);
            for e in &sub.inflight {
                if let Inflight::Part(p) = e {
                    ent += p.entered.len();
                    lea += p.left.len() + p.deleted.len();
                }
            }
            seen.insert(key.1.to_string());
            entries.push((
                key.1.to_string(),
                sub.query.clone(),
                sub.q.table.clone(),
                sub.identity.clone(),
                acked,
                held,
                ent,
                lea,
            ));
        }
        for (key, p) in self.subs.pulls.iter().filter(|(k, _)| k.0 == site) {
            if let Some((c, h)) = &p.acked {
                seen.insert(key.1.to_string());
                entries.push((
                    key.1.to_string(),
                    p.query.clone(),
                    p.table.clone(),
                    stored_identity.clone(),
                    *c,
                    (**h).clone(),
                    0,
                    0,
                ));
            }
        }
        if let Ok(rows) = store::load_subs_of(self.db.conn(), &site) {
            for (id, row) in rows {
                if seen.contains(&id) {
                    continue;
                }
                entries.push((
                    id,
                    row.query,
                    row.table,
                    stored_identity.clone(),
                    row.cursor,
                    row.held,
                    0,
                    0,
                ));
            }
        }
        let mut reports = Vec::new();
        for (id, query, table, identity, acked, held, ent, lea) in entries {
            let not_allowed = match self.policy.rewrite(&identity, &query) {
                Ok(q) => {
                    let q = Arc::new(q);
                    match self
                        .filters
                        .view_for(&self.db, &self.schema, &q, self.version)
                    {
                        Ok(view) => {
                            let t = self.filters.get(view).table;
                            let mut out: Vec<RowKey> = held
                                .iter()
                                .filter(|pk| !self.filters.contains(view, t, pk))
                                .map(|pk| RowKey {
                                    table: table.clone(),
                                    pk: pk.clone(),
                                })
                                .collect();
                            out.sort();
                            out
                        }
                        Err(e) => return Err(ApiError::new(ErrorCode::Internal, e.to_string())),
                    }
                }
                Err(_) => {
                    let mut out: Vec<RowKey> = held
                        .iter()
                        .map(|pk| RowKey {
                            table: table.clone(),
                            pk: pk.clone(),
                        })
                        .collect();
                    out.sort();
                    out
                }
            };
            reports.push(HeldReport {
                id,
                query,
                table,
                acked_version: acked,
                held_rows: held.len(),
                not_allowed,
                unacked_entering: ent,
                unacked_leaving: lea,
            });
        }
        reports.sort_by(|a, b| a.id.cmp(&b.id));
        let clean = reports.iter().all(|r| r.not_allowed.is_empty());
        Ok(PeerReport {
            site_id: site,
            subject,
            tenant,
            pushed_version,
            connected,
            subscriptions: reports,
            clean,
        })
    }
}
