//! Upkeep: acknowledged cursors and held rows persisted in batches, the
//! last answers of pulls leaving memory kept, expiry of idle
//! subscriptions' views, and the gauges.

use std::time::Duration;

use super::*;
use crate::engine::filters::FilterId;
use crate::engine::journal::CommitError;
use crate::engine::store;
use crate::engine::{Engine, SubKey};

impl Engine {
    /// Writes acknowledged state of dirty subscriptions (all of them when
    /// `all`, else a bounded batch).
    pub(in crate::engine) fn persist(&mut self, all: bool) {
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
            self.begin_write()?;
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
            Ok::<(), CommitError>(())
        })();
        let r = r.and_then(|()| self.commit_write());
        if let Err(e) = r {
            self.rollback_write();
            tracing::error!(error = %e, "persisting subscriptions failed");
        }
    }

    /// Stores the unacknowledged last answer of each pull state leaving
    /// memory (idle for `idle`, or all of them), in one transaction, so
    /// its next pull resumes.
    pub(in crate::engine) fn keep_deliveries(&mut self, idle: Option<Duration>) {
        let leaving: Vec<_> = self
            .subs
            .pulls
            .iter()
            .filter(|(_, p)| idle.is_none_or(|g| p.last_used.elapsed() >= g))
            .filter_map(|(key, p)| p.pending.as_ref().map(|(c, h)| (key, &p.query, *c, h)))
            .collect();
        if leaving.is_empty() {
            return;
        }
        let rows: Vec<_> = leaving
            .into_iter()
            .map(|((site, sub), query, cursor, held)| {
                (*site, sub.clone(), query.clone(), cursor, held.clone())
            })
            .collect();
        let r = self.begin_write().and_then(|()| {
            let conn = self.db.conn();
            for (site, sub, query, cursor, held) in &rows {
                store::save_delivered(conn, site, sub, query, *cursor, held)?;
            }
            Ok::<(), CommitError>(())
        });
        let r = r.and_then(|()| self.commit_write());
        if let Err(e) = r {
            self.rollback_write();
            tracing::warn!(error = %e, "keeping pulls' last answers failed");
        }
    }

    pub(in crate::engine) fn expire(&mut self) {
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

    pub(in crate::engine) fn gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let st = &self.stats;
        st.connections.store(self.subs.conns.len() as u64, Relaxed);
        st.subscriptions.store(self.subs.subs.len() as u64, Relaxed);
        st.views.store(self.filters.views.len() as u64, Relaxed);
        st.views_building.store(self.builds.out() as u64, Relaxed);
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
}
