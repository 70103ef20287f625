//! Test helpers: an in-process service on a temporary database with the
//! examples' schema and policies, principals, and a small test replica that
//! folds protocol messages into a real core database plus per-subscription
//! held sets (the client library will replace it).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use tenantsync_core::{Change, ChangesQuery, CrrConnection, Options, PackedPk, SiteFilter, SiteId};
use tenantsync_policy::Identity;
use tenantsync_protocol::ws::{ClientMsg, PushRefusal, ServerMsg};
use tenantsync_protocol::{RowKey, SubPart};
use tenantsync_server::{OutFrame, Outbox, Principal, ServiceConfig, Session, SyncService};
use tenantsync_types::Value;

pub const SCHEMA: &str = include_str!("../../../examples/schema.sql");
pub const POLICY: &str = include_str!("../../../examples/policy.sql");

pub struct Server {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub service: SyncService,
}

pub fn config(path: &std::path::Path) -> ServiceConfig {
    let mut c = ServiceConfig::new(path, SCHEMA, "policy.sql", POLICY);
    c.synchronous = tenantsync_server::Synchronous::Normal;
    c
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(|_| {})
    }

    pub fn start_with(f: impl FnOnce(&mut ServiceConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let mut c = config(&path);
        f(&mut c);
        let service = SyncService::start(c).unwrap();
        Server { dir, path, service }
    }

    /// Stops and starts again on the same file.
    pub async fn restart(self) -> Server {
        self.restart_with(|_| {}).await
    }

    /// Stops and starts again on the same file, configured by `f`.
    pub async fn restart_with(self, f: impl FnOnce(&mut ServiceConfig)) -> Server {
        self.service.shutdown(Duration::from_secs(10)).await;
        let Server { dir, path, service } = self;
        drop(service);
        let mut c = config(&path);
        f(&mut c);
        let service = SyncService::start(c).unwrap();
        Server { dir, path, service }
    }

    /// Service SQL.
    pub async fn sql(&self, sql: &str) -> i64 {
        let r = self
            .service
            .sql(
                &service_principal(),
                tenantsync_protocol::http::SqlRequest {
                    statements: vec![tenantsync_protocol::http::SqlStatement {
                        sql: sql.into(),
                        params: vec![],
                    }],
                    tenant: None,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        r.db_version
    }
}

pub fn principal(sub: &str, tenant: &str) -> Principal {
    let claims =
        json!({"sub": sub, "role": "authenticated", "tenant_id": tenant, "exp": 4_000_000_000u64});
    let serde_json::Value::Object(m) = claims else {
        unreachable!()
    };
    Principal::from_claims(m, "tenant_id")
}

pub fn service_principal() -> Principal {
    let serde_json::Value::Object(m) =
        json!({"sub": "backend", "role": "service", "exp": 4_000_000_000u64})
    else {
        unreachable!()
    };
    Principal::from_claims(m, "tenant_id")
}

pub fn site(n: u8) -> SiteId {
    let mut b = [0u8; 16];
    b[0] = 0xa0;
    b[15] = n;
    SiteId(b)
}

/// A subscription on the replica side.
#[derive(Debug, Default, Clone)]
pub struct SubState {
    pub query: String,
    pub cursor: Option<i64>,
    pub held: BTreeSet<(String, PackedPk)>,
    pub chunks: Vec<ServerMsg>,
    pub live: bool,
}

pub struct Replica {
    pub who: Principal,
    pub site: SiteId,
    pub db: CrrConnection,
    pub session: Option<(Session, Outbox)>,
    pub subs: BTreeMap<String, SubState>,
    pub pushed_version: i64,
    pub pending_changes: Vec<ServerMsg>,
    /// Everything the server answered that is not data.
    pub log: Vec<ServerMsg>,
    pub next_push: u64,
    /// Every row key any message ever delivered to this replica.
    pub ever: BTreeSet<(String, PackedPk)>,
    pub auto_ack: bool,
    /// Every frame and local statement, for failure messages.
    pub trace: Vec<String>,
}

impl Replica {
    pub fn new(who: Principal, site: SiteId) -> Replica {
        let db = CrrConnection::open_with(
            ":memory:",
            Options {
                site_id: Some(site),
                ..Options::default()
            },
        )
        .unwrap();
        db.conn().execute_batch(SCHEMA).unwrap();
        Replica {
            who,
            site,
            db,
            session: None,
            subs: BTreeMap::new(),
            pushed_version: 0,
            pending_changes: Vec::new(),
            log: Vec::new(),
            next_push: 0,
            ever: BTreeSet::new(),
            auto_ack: true,
            trace: Vec::new(),
        }
    }

    pub async fn connect(&mut self, s: &SyncService) {
        let (session, outbox) = s
            .open_session(self.who.clone(), self.site, Some("test".into()), None)
            .await
            .unwrap();
        self.session = Some((session, outbox));
        // Welcome first.
        let f = self
            .next_frame(Duration::from_secs(5))
            .await
            .expect("welcome");
        match f {
            ServerMsg::Welcome { peer, .. } => {
                self.pushed_version = peer.pushed_version;
                self.evict_unheld_with(true);
            }
            other => panic!("expected welcome, got {other:?}"),
        }
        for s in self.subs.values_mut() {
            s.live = false;
            s.chunks.clear();
        }
    }

    pub fn disconnect(&mut self) {
        self.session = None;
        self.pending_changes.clear();
        for s in self.subs.values_mut() {
            s.live = false;
            s.chunks.clear();
        }
    }

    pub async fn send(&mut self, m: ClientMsg) {
        let (s, _) = self.session.as_mut().expect("connected");
        s.handle(m).await;
    }

    /// Subscribes (resuming with the stored cursor when there is one).
    pub async fn subscribe(&mut self, id: &str, query: &str) {
        let st = self.subs.entry(id.to_owned()).or_default();
        if st.query != query {
            st.cursor = None;
        }
        st.query = query.to_owned();
        st.live = false;
        st.chunks.clear();
        let cursor = st.cursor;
        self.send(ClientMsg::Subscribe {
            id: id.into(),
            query: query.into(),
            cursor,
        })
        .await;
    }

    /// Resubscribes every known subscription with its cursor.
    pub async fn resume_all(&mut self) {
        let subs: Vec<(String, String)> = self
            .subs
            .iter()
            .map(|(k, v)| (k.clone(), v.query.clone()))
            .collect();
        for (id, q) in subs {
            self.subscribe(&id, &q).await;
        }
    }

    async fn next_frame(&mut self, wait: Duration) -> Option<ServerMsg> {
        let (_, outbox) = self.session.as_mut()?;
        match tokio::time::timeout(wait, outbox.next()).await {
            Ok(Some(OutFrame::Text(t))) => {
                outbox.written();
                Some(serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}")))
            }
            Ok(Some(OutFrame::Close { code, message })) => Some(ServerMsg::Error(
                tenantsync_protocol::ws::ErrorMsg::new(code, message),
            )),
            Ok(None) | Err(_) => None,
        }
    }

    /// Reads and applies frames until none arrives for `quiet`.
    pub async fn pump_for(&mut self, quiet: Duration) -> usize {
        let mut n = 0;
        while let Some(m) = self.next_frame(quiet).await {
            self.on_message(m).await;
            n += 1;
        }
        n
    }

    pub async fn pump(&mut self) -> usize {
        self.pump_for(Duration::from_millis(150)).await
    }

    async fn on_message(&mut self, m: ServerMsg) {
        self.trace.push(format!("{m:?}"));
        match m {
            ServerMsg::Subscribed { ref id, .. } => {
                let s = self.subs.entry(id.clone()).or_default();
                s.chunks.clear();
                s.live = false;
                self.log.push(m);
            }
            ServerMsg::Snapshot { ref sub, last, .. } => {
                let sub = sub.clone();
                let s = self.subs.entry(sub.clone()).or_default();
                s.chunks.push(m);
                if last {
                    let chunks = std::mem::take(&mut s.chunks);
                    self.apply_sync(&sub, chunks);
                    if self.auto_ack {
                        self.ack(&[sub.as_str()]).await;
                    }
                }
            }
            ServerMsg::Changes { more, .. } => {
                self.pending_changes.push(m);
                if !more {
                    let msgs = std::mem::take(&mut self.pending_changes);
                    let acked = self.apply_changes(msgs).await;
                    if self.auto_ack && !acked.is_empty() {
                        let ids: Vec<&str> = acked.iter().map(String::as_str).collect();
                        self.ack(&ids).await;
                    }
                }
            }
            ServerMsg::PushRefused(r) => {
                self.on_refused(&r);
                self.pushed_version = self.pushed_version.max(r.pushed_version);
                self.log.push(ServerMsg::PushRefused(r));
            }
            ServerMsg::PushOk { pushed_version, .. } => {
                self.pushed_version = self.pushed_version.max(pushed_version);
                // What was pushed is safe on the server: rows no
                // subscription holds can go.
                self.evict_unheld_with(true);
                self.log.push(m);
            }
            other => self.log.push(other),
        }
    }

    pub async fn ack(&mut self, ids: &[&str]) {
        let cursors: BTreeMap<String, i64> = ids
            .iter()
            .filter_map(|id| Some((id.to_string(), self.subs.get(*id)?.cursor?)))
            .collect();
        if !cursors.is_empty() && self.session.is_some() {
            self.send(ClientMsg::Ack { cursors }).await;
        }
    }

    fn alive(&self, table: &str, pk: &PackedPk) -> bool {
        self.db.row_values(table, pk).unwrap().is_some()
    }

    fn merge(&mut self, changes: &[Change]) {
        for c in changes {
            self.ever.insert((c.table.clone(), c.pk.clone()));
        }
        self.db.apply(changes).unwrap();
    }

    fn apply_sync(&mut self, sub: &str, chunks: Vec<ServerMsg>) {
        let mut rows = BTreeSet::new();
        let mut evict = Vec::new();
        let mut version = 0;
        let mut reset = false;
        let mut all = Vec::new();
        let final_version = match chunks.last() {
            Some(ServerMsg::Snapshot { version, .. }) => *version,
            _ => 0,
        };
        for c in chunks {
            if !matches!(c, ServerMsg::Snapshot { version, .. } if version == final_version) {
                continue;
            }
            let ServerMsg::Snapshot {
                version: v,
                reset: r,
                changes,
                evict: e,
                ..
            } = c
            else {
                unreachable!()
            };
            version = v;
            reset = r;
            for ch in &changes {
                rows.insert((ch.table.clone(), ch.pk.clone()));
            }
            all.extend(changes);
            evict.extend(e);
        }
        self.merge(&all);
        let s = self.subs.get_mut(sub).unwrap();
        if reset {
            s.held.clear();
        }
        for k in &rows {
            s.held.insert(k.clone());
        }
        for k in evict {
            s.held.remove(&(k.table, k.pk));
        }
        s.cursor = Some(version);
        s.live = true;
        self.drop_deleted(&rows);
        self.evict_unheld();
    }

    async fn apply_changes(&mut self, msgs: Vec<ServerMsg>) -> Vec<String> {
        let mut version = 0;
        let mut parts: BTreeMap<String, Vec<SubPart>> = BTreeMap::new();
        for m in msgs {
            let ServerMsg::Changes {
                version: v, subs, ..
            } = m
            else {
                unreachable!()
            };
            version = v;
            for (id, p) in subs {
                parts.entry(id).or_default().push(p);
            }
        }
        let mut resync = Vec::new();
        let mut touched = BTreeSet::new();
        let mut applied = Vec::new();
        let mut all_changes = Vec::new();
        // (subscription, rows with changes, evicted rows)
        type Plan = Vec<(String, BTreeSet<(String, PackedPk)>, Vec<RowKey>)>;
        let mut plan: Plan = Vec::new();
        for (id, ps) in parts {
            let Some(s) = self.subs.get(&id) else {
                continue;
            };
            let from = ps[0].from;
            if !s.live || s.cursor.is_none_or(|c| from > c) {
                if s.live {
                    resync.push((id.clone(), s.cursor.unwrap_or(0)));
                }
                continue;
            }
            let mut rows = BTreeSet::new();
            let mut ev = Vec::new();
            for p in ps {
                for c in &p.changes {
                    rows.insert((c.table.clone(), c.pk.clone()));
                }
                all_changes.extend(p.changes);
                ev.extend(p.evict);
            }
            touched.extend(rows.iter().cloned());
            plan.push((id, rows, ev));
        }
        self.merge(&all_changes);
        for (id, rows, ev) in plan {
            let s = self.subs.get_mut(&id).unwrap();
            for k in rows {
                s.held.insert(k);
            }
            for k in ev {
                s.held.remove(&(k.table, k.pk));
            }
            s.cursor = Some(version);
            applied.push(id);
        }
        self.drop_deleted(&touched);
        self.evict_unheld();
        for (id, cursor) in resync {
            self.send(ClientMsg::Resync { sub: id, cursor }).await;
        }
        applied
    }

    fn drop_deleted(&mut self, rows: &BTreeSet<(String, PackedPk)>) {
        let dead: Vec<(String, PackedPk)> = rows
            .iter()
            .filter(|(t, pk)| !self.alive(t, pk))
            .cloned()
            .collect();
        for s in self.subs.values_mut() {
            for k in &dead {
                s.held.remove(k);
            }
        }
    }

    /// Removes (without a delete) rows that no subscription holds; a row
    /// deleted here (locally, or by a merged delete) is held by none. Rows
    /// with local changes not yet pushed stay (a real client quarantines
    /// them first); rows never delivered stay unless `local_too` (after a
    /// push answer: what was written here is on the server now).
    fn evict_unheld_with(&mut self, local_too: bool) {
        let all: BTreeSet<(String, PackedPk)> = self
            .subs
            .values()
            .flat_map(|s| s.held.iter().cloned())
            .collect();
        self.drop_deleted(&all);
        let held: BTreeSet<(String, PackedPk)> = self
            .subs
            .values()
            .flat_map(|s| s.held.iter().cloned())
            .collect();
        for table in ["lists", "todos", "members"] {
            let pks = self.local_pks(table);
            let gone: Vec<PackedPk> = pks
                .into_iter()
                .filter(|pk| !held.contains(&(table.to_owned(), pk.clone())))
                .filter(|pk| local_too || self.ever.contains(&(table.to_owned(), pk.clone())))
                .filter(|pk| {
                    self.db
                        .changes(&ChangesQuery {
                            since: self.pushed_version,
                            table: Some(table.to_owned()),
                            pks: Some(vec![pk.clone()]),
                            site: SiteFilter::Only(self.site),
                            ..ChangesQuery::default()
                        })
                        .unwrap()
                        .is_empty()
                })
                .collect();
            if !gone.is_empty() {
                self.db.evict(table, &gone).unwrap();
            }
        }
    }

    fn evict_unheld(&mut self) {
        self.evict_unheld_with(false);
    }

    pub fn local_pks(&self, table: &str) -> Vec<PackedPk> {
        let pk_cols = match table {
            "members" => "list_id, user_id",
            _ => "id",
        };
        let mut stmt = self
            .db
            .conn()
            .prepare(&format!("SELECT {pk_cols} FROM {table}"))
            .unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| {
            (0..n)
                .map(|i| r.get::<_, Value>(i))
                .collect::<rusqlite::Result<Vec<Value>>>()
        })
        .unwrap()
        .map(|r| PackedPk::pack(&r.unwrap()).unwrap())
        .collect()
    }

    fn on_refused(&mut self, r: &PushRefusal) {
        // Restore the refused rows to the server's state (quarantine is the
        // client library's; here the local changes are simply dropped).
        let mut by_table: BTreeMap<String, Vec<PackedPk>> = BTreeMap::new();
        for c in &r.state {
            by_table
                .entry(c.table.clone())
                .or_default()
                .push(c.pk.clone());
        }
        for k in &r.invisible {
            by_table
                .entry(k.table.clone())
                .or_default()
                .push(k.pk.clone());
        }
        for (t, pks) in by_table {
            let state: Vec<Change> = r.state.iter().filter(|c| c.table == t).cloned().collect();
            self.db.replace_rows(&t, &pks, &state).unwrap();
        }
        let inv: BTreeSet<(String, PackedPk)> = r
            .invisible
            .iter()
            .map(|k| (k.table.clone(), k.pk.clone()))
            .collect();
        for s in self.subs.values_mut() {
            s.held.retain(|k| !inv.contains(k));
        }
        self.evict_unheld();
    }

    /// Runs SQL on the replica (local writes).
    pub fn exec(&mut self, sql: &str) {
        self.trace
            .push(format!("exec {sql} at {}", self.db.db_version().unwrap()));
        self.db
            .conn()
            .execute_batch(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Pushes every local change after `pushed_version`.
    pub async fn push(&mut self) -> Option<String> {
        let to = self.db.db_version().unwrap();
        if to <= self.pushed_version {
            return None;
        }
        let changes = self
            .db
            .changes(&ChangesQuery {
                since: self.pushed_version,
                until: Some(to),
                site: SiteFilter::Only(self.site),
                ..ChangesQuery::default()
            })
            .unwrap();
        self.next_push += 1;
        let id = format!("p{}", self.next_push);
        self.trace.push(format!(
            "push {id} ({}, {to}] {changes:?}",
            self.pushed_version
        ));
        self.send(ClientMsg::Push {
            id: id.clone(),
            from: self.pushed_version,
            to,
            changes,
        })
        .await;
        Some(id)
    }

    /// The rows the replica has, per table, as (pk, values).
    pub fn rows(&self, table: &str) -> BTreeMap<PackedPk, Vec<Value>> {
        self.local_pks(table)
            .into_iter()
            .map(|pk| {
                let v = self.db.row_values(table, &pk).unwrap().unwrap();
                (pk, v)
            })
            .collect()
    }

    pub fn held(&self, sub: &str) -> BTreeSet<PackedPk> {
        self.subs[sub]
            .held
            .iter()
            .map(|(_, pk)| pk.clone())
            .collect()
    }

    pub fn todo_ids(&self) -> BTreeSet<i64> {
        ids(self.local_pks("todos"))
    }
}

pub fn ids(pks: impl IntoIterator<Item = PackedPk>) -> BTreeSet<i64> {
    pks.into_iter()
        .map(|p| match p.unpack().unwrap()[0] {
            Value::Integer(i) => i,
            ref o => panic!("{o:?}"),
        })
        .collect()
}

/// The truth, evaluated directly on the server database: what a query and
/// the policies give an identity (`tenantsync_verify`, the checker
/// every suite shares).
pub struct Truth(tenantsync_verify::Truth);

impl Truth {
    pub fn open(path: &std::path::Path, policy: &str) -> Truth {
        Truth(
            tenantsync_verify::Truth::open(path, "policy.sql", policy)
                .unwrap_or_else(|e| panic!("the truth: {e}")),
        )
    }

    /// Visible pks of `query` for `who`, with their row values.
    pub fn visible(&self, who: &Identity, query: &str) -> BTreeMap<PackedPk, Vec<Value>> {
        self.0
            .visible(who, query)
            .unwrap_or_else(|e| panic!("{query}: {e}"))
            .into_iter()
            .map(|((_, pk), row)| (pk, row))
            .collect()
    }

    /// The table a query reads.
    pub fn table_of(&self, who: &Identity, query: &str) -> String {
        self.0
            .table_of(who, query)
            .unwrap_or_else(|e| panic!("{query}: {e}"))
    }
}

/// Checks a replica against the truth: for every subscription, its held
/// set and the replica's rows equal what the query and policy give now.
#[track_caller]
pub fn check_replica(truth: &Truth, r: &Replica) {
    let mut expected_rows: BTreeMap<(String, PackedPk), Vec<Value>> = BTreeMap::new();
    for (id, s) in &r.subs {
        let table = truth.table_of(&r.who.identity, &s.query);
        let vis = truth.visible(&r.who.identity, &s.query);
        let held: BTreeSet<PackedPk> = s.held.iter().map(|(_, p)| p.clone()).collect();
        let want: BTreeSet<PackedPk> = vis.keys().cloned().collect();
        assert_eq!(
            ids_any(&held),
            ids_any(&want),
            "{}: subscription {id} ({}) holds {:?}, the policy allows {:?}",
            r.who.subject,
            s.query,
            ids_any(&held),
            ids_any(&want)
        );
        for (pk, v) in vis {
            expected_rows.insert((table.clone(), pk), v);
        }
    }
    for table in ["lists", "todos", "members"] {
        let have = r.rows(table);
        let want: BTreeMap<PackedPk, Vec<Value>> = expected_rows
            .iter()
            .filter(|((t, _), _)| t == table)
            .map(|((_, pk), v)| (pk.clone(), v.clone()))
            .collect();
        assert_eq!(
            have, want,
            "{}: table {table} differs from the truth",
            r.who.subject
        );
    }
}

/// Row keys shown readably.
pub fn ids_any(pks: &BTreeSet<PackedPk>) -> Vec<Vec<Value>> {
    pks.iter().map(|p| p.unpack().unwrap()).collect()
}
