//! Sessions: a connection's open and close, its subscriptions (subscribe,
//! unsubscribe, resync), their initial syncs, acknowledgements, and the
//! catch-up of a connection that lagged.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use tenantsync_core::SiteId;
use tenantsync_policy::EffectiveQuery;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::SubscribeMode;
use tenantsync_protocol::ws::ServerMsg;

use super::*;
use crate::contract::{ApiError, OutFrame};
use crate::engine::filters::{FilterId, FxSet, PkSet};
use crate::engine::outbox::{Item, ItemPart, OutboxShared, ViewPart};
use crate::engine::reader::{Job, SyncBase, SyncJob};
use crate::engine::store;
use crate::engine::{ConnId, Engine, OpenOk, SubKey, Who};

impl Engine {
    pub(in crate::engine) fn pk_names(&self, q: &EffectiveQuery) -> Vec<String> {
        self.schema
            .table(&q.table)
            .map(|t| t.pk.iter().map(|&i| t.columns[i].clone()).collect())
            .unwrap_or_default()
    }

    /// Registers a session and queues its `welcome` as the outbox's first
    /// frame (here, so that a `schema` message of a later change comes
    /// after it), with the migrations above `known_schema`.
    pub(in crate::engine) fn open(
        &mut self,
        who: Who,
        site: SiteId,
        client: Option<String>,
        known_schema: Option<i64>,
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
        outbox.push_frame(crate::contract::OutFrame::Text(
            serde_json::to_string(&self.welcome(site, pushed_version, known_schema))
                .expect("messages serialise"),
        ));
        let id = self.subs.next_conn;
        self.subs.next_conn += 1;
        let tx = self.tx.clone();
        outbox.set_drained_hook(Box::new(move || {
            let _ = tx.send(crate::engine::Cmd::Drained { conn: id });
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
        Ok(OpenOk { conn: id })
    }

    fn welcome(&self, site: SiteId, pushed_version: i64, known_schema: Option<i64>) -> ServerMsg {
        let schema_version = self.schema.version();
        let migrations = match known_schema {
            Some(k) if k < schema_version => self
                .schema
                .response
                .migrations
                .iter()
                .filter(|m| m.version > k)
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        ServerMsg::Welcome {
            protocol: tenantsync_protocol::PROTOCOL_VERSION,
            server_site_id: self.db.site_id(),
            db_version: self.version,
            peer: tenantsync_protocol::ws::PeerInfo {
                site_id: site,
                pushed_version,
            },
            limits: tenantsync_protocol::ws::Limits {
                max_message_bytes: self.limits.max_message_bytes,
                max_subscriptions: self.limits.max_subscriptions_per_connection,
            },
            schema_version,
            migrations,
        }
    }

    pub(in crate::engine) fn close(&mut self, conn: ConnId) {
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

    pub(in crate::engine) fn close_all(&mut self) {
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

    pub(in crate::engine) fn send(&self, conn: ConnId, f: OutFrame) {
        if let Some(c) = self.subs.conns.get(&conn) {
            c.outbox.push_frame(f);
        }
    }

    pub(in crate::engine) fn add_tenant_sub(&mut self, tenant: &Arc<str>, d: isize) {
        let n = self.subs.per_tenant.entry(tenant.clone()).or_default();
        *n = n.saturating_add_signed(d);
    }

    /// Takes a subscription off its view (dropping the view's sub entry).
    pub(in crate::engine) fn leave_view(&mut self, key: &SubKey, view: FilterId) {
        let v = self.filters.view_mut(view);
        v.subs.remove(key);
        if v.subs.is_empty() {
            v.idle_since = Some(Instant::now());
        }
    }

    pub(in crate::engine) fn join_view(&mut self, key: &SubKey, view: FilterId) {
        let v = self.filters.view_mut(view);
        v.subs.insert(key.clone());
        v.idle_since = None;
    }

    pub(in crate::engine) fn subscribe(
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
    pub(in crate::engine) fn start_sync(
        &mut self,
        key: &SubKey,
        mode: SubscribeMode,
        base: SyncBase,
    ) {
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

    pub(in crate::engine) fn unsubscribe(&mut self, conn: ConnId, id: &str) {
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

    pub(in crate::engine) fn resync(&mut self, conn: ConnId, id: &str, cursor: i64) {
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

    pub(in crate::engine) fn ack(&mut self, conn: ConnId, cursors: BTreeMap<String, i64>) {
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

    pub(in crate::engine) fn sync_done(
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

    pub(in crate::engine) fn sync_abandoned(&mut self, key: SubKey, epoch: u64) {
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

    pub(in crate::engine) fn drained(&mut self, conn: ConnId) {
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

    pub(in crate::engine) fn retry_lagging(&mut self) {
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
}
