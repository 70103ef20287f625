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
//!
//! This module owns the types (a connection, a subscription and its state,
//! a pull state, the registry [`Subs`]) and what a subscription holds
//! ([`Sub::held_at`]); the engine's work on them is split by concern:
//! - `session`: open and close, subscribe, unsubscribe, resync, initial
//!   syncs, acknowledgements, the catch-up of a lagging connection;
//! - `fanout`: a commit's parts queued to connections, the heartbeat;
//! - `pull`: HTTP pulls and long-poll registration;
//! - `reload`: subscriptions moved after a policy reload;
//! - `upkeep`: persistence of cursors and held rows, expiry, gauges;
//! - `report`: the peer report of the admin endpoint.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tenantsync_core::SiteId;
use tenantsync_policy::{EffectiveQuery, Identity};
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::SubscribeMode;
use tenantsync_protocol::ws::{ErrorMsg, ServerMsg};

use crate::contract::OutFrame;
use crate::engine::filters::{FilterId, FxMap, FxSet, PkSet};
use crate::engine::outbox::{OutboxShared, ViewPart};
use crate::engine::reader::SyncBase;
use crate::engine::{ConnId, SubKey, Who};

mod fanout;
mod pull;
mod reload;
mod report;
mod session;
mod upkeep;

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
        filters: &crate::engine::filters::Filters,
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
    fn materialize(
        &mut self,
        filters: &crate::engine::filters::Filters,
        unqueued: Option<&ViewPart>,
    ) {
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
