//! HTTP pulls: a pull's subscriptions resolved against what the server
//! remembers (resume or refetch), long-poll registration, and the delivered
//! state an acknowledging pull turns into the cursor.

use std::sync::Arc;
use std::time::Instant;

use tenantsync_core::{PackedPk, SiteId};
use tenantsync_policy::EffectiveQuery;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::SubscribeMode;
use tenantsync_protocol::http::PullSub;

use super::*;
use crate::contract::ApiError;
use crate::engine::filters::PkSet;
use crate::engine::reader::{PullItem, SyncBase};
use crate::engine::store;
use crate::engine::{Engine, SubKey, Who};

impl Engine {
    /// Whether the pull state of (site, sub) holds a row of `table`.
    pub(in crate::engine) fn pull_holds(
        &self,
        site: &SiteId,
        sub: &Arc<str>,
        table: u16,
        pk: &PackedPk,
    ) -> bool {
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
    pub(in crate::engine) fn pull_wait(
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
        let w = crate::engine::longpoll::Waiter {
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

    pub(in crate::engine) fn pull_begin(
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
                // The last answer it was given, if it left memory unacknowledged.
                let delivered = store::load_delivered(self.db.conn(), &site, &ps.id, &ps.query)
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
                        pending: delivered.map(|(c, h)| (c, Arc::new(h))),
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

    pub(in crate::engine) fn pull_end(
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
}
