//! Fan-out: a commit's view parts queued to every connection whose
//! subscriptions they touch (one item per connection), and the heartbeat of
//! empty parts that keeps idle cursors recent.

use std::sync::Arc;
use std::time::Instant;

use tenantsync_core::PackedPk;
use tenantsync_protocol::RowKey;

use super::*;
use crate::engine::filters::{ChangedRow, Draft, FxMap};
use crate::engine::outbox::{Item, ItemPart, ViewPart};
use crate::engine::reader::SyncBase;
use crate::engine::{ConnId, Engine, SubKey, commit};

impl Engine {
    /// Fans one commit out: updates filters, builds each touched view's
    /// part once, queues one item per connection.
    pub(in crate::engine) fn fan_out(&mut self, rows: Vec<ChangedRow>, version: i64) {
        let started = Instant::now();
        let mut longpolls = std::mem::take(&mut self.longpolls);
        longpolls.commit(version, &rows, &self.read_scope, &|s, sub, t, pk| {
            self.pull_holds(s, sub, t, pk)
        });
        self.longpolls = longpolls;
        self.builds.log(version, &rows);
        let drafts = match self
            .filters
            .apply_commit(&self.db, &self.schema, &rows, version)
        {
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

    pub(in crate::engine) fn part_of(
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
    pub(in crate::engine) fn queue_item(
        &mut self,
        conn: ConnId,
        parts: Vec<(Arc<str>, Arc<ViewPart>)>,
        version: i64,
    ) {
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

    pub(in crate::engine) fn heartbeat(&mut self) {
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
}
