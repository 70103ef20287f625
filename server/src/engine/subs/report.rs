//! The peer report of `GET /v1/admin/peers/{site_id}`: what a peer holds
//! at its acknowledged cursors, and what the policy no longer allows.

use std::sync::Arc;
use std::time::Instant;

use tenantsync_core::SiteId;
use tenantsync_policy::Identity;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::RowKey;
use tenantsync_protocol::http::{HeldReport, PeerReport};

use super::*;
use crate::contract::ApiError;
use crate::engine::Engine;
use crate::engine::filters::{FxSet, PkSet};
use crate::engine::store;

impl Engine {
    pub(in crate::engine) fn report(&mut self, site: SiteId) -> Result<PeerReport, ApiError> {
        if !self.peers.contains_key(&site)
            && let Ok(Some(row)) = store::load_peer(self.db.conn(), &site)
        {
            self.peers.insert(
                site,
                crate::engine::Peer {
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
