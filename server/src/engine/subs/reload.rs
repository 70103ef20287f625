//! Policy reloads: subscriptions whose effective query changed move to
//! their new view, live ones getting what entered and left. Their rewrites
//! and new views come from the readers (`build`).

use std::sync::Arc;

use tenantsync_core::PackedPk;
use tenantsync_policy::PolicyChange;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::RowKey;

use super::*;
use crate::engine::build::Rewritten;
use crate::engine::filters::{FilterId, FxMap, FxSet};
use crate::engine::outbox::ViewPart;
use crate::engine::store;
use crate::engine::{Engine, SubKey, commit};

impl Engine {
    /// After a policy reload: subscriptions whose effective query changed
    /// move to their new view; live ones get what entered and left as a
    /// part of the reload's own version.
    pub(in crate::engine) fn move_after_reload(
        &mut self,
        change: &PolicyChange,
        version: i64,
        mut rewritten: FxMap<SubKey, Rewritten>,
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
                // As a reader rewrote it (`build`), unless it changed since.
                let q = match rewritten
                    .remove(&key)
                    .and_then(|r| r.of(&sub.identity, &sub.query))
                {
                    Some(r) => r,
                    None => self
                        .policy
                        .rewrite(&sub.identity, &sub.query)
                        .map(Arc::new)
                        .map_err(|e| e.to_string()),
                };
                (sub.view, q)
            };
            let q_new = match q_new {
                Ok(q) => q,
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
                let (entered, left) = self.filters.difference(old_view, new_view);
                let table = self.filters.get(new_view).table;
                let entered: Vec<(u16, PackedPk)> =
                    entered.into_iter().map(|p| (table, p)).collect();
                let whole = if entered.is_empty() {
                    FxMap::default()
                } else {
                    commit::whole_rows(&self.db, &self.schema, entered.clone()).unwrap_or_default()
                };
                let tname = self.schema.tables[table as usize].name.to_string();
                let part = ViewPart {
                    version,
                    entered: entered
                        .iter()
                        .filter_map(|k| whole.get(k).cloned())
                        .collect(),
                    left: left
                        .into_iter()
                        .map(|pk| RowKey {
                            table: tname.clone(),
                            pk,
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
}
