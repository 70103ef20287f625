//! View builds off the writer thread. A subscription whose view does not
//! exist yet, and a policy reload that moves subscriptions to new views,
//! do not run the views' queries on the engine connection: a reader
//! computes them ([`Prebuilt`]) at the version of its own read transaction
//! while the engine keeps committing, and the engine then installs the new
//! filters and catches them up with the rows its commits changed since
//! that version (kept here while a build is out).
//!
//! What waits on a build keeps its order: the subscription and every later
//! command of its connection are parked until the view is installed; a
//! reload is answered once its views are installed and it has run, and the
//! reloads after it wait their turn.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tenantsync_policy::{EffectiveQuery, Engine as PolicyEngine, Identity, ViewKey};
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::PolicyReloadResponse;
use tokio::sync::oneshot;

use crate::contract::ApiError;
use crate::engine::filters::{ChangedRow, FilterId, FxMap, FxSet, Prebuilt, latest_images};
use crate::engine::reader::Job;
use crate::engine::{Cmd, ConnId, Engine, SubKey};

/// A build a reader runs.
pub(crate) struct BuildJob {
    pub id: u64,
    pub queries: Vec<Arc<EffectiveQuery>>,
    /// A reload's subscriptions, rewritten by the reader under the new
    /// policies first (their new views are built too).
    pub rewrite: Option<Rewrite>,
}

/// Subscriptions to rewrite under a reload's policies.
pub(crate) struct Rewrite {
    pub policy: Arc<PolicyEngine>,
    pub subs: Vec<(SubKey, Arc<Identity>, String)>,
}

/// A subscription rewritten by a reader under a reload's policies.
pub(crate) struct Rewritten {
    pub identity: Arc<Identity>,
    pub query: String,
    pub result: Result<Arc<EffectiveQuery>, String>,
}

impl Rewritten {
    /// The rewrite of `sub`'s query, if this is still it.
    pub fn of(
        self,
        identity: &Identity,
        query: &str,
    ) -> Option<Result<Arc<EffectiveQuery>, String>> {
        (*self.identity == *identity && self.query == query).then_some(self.result)
    }
}

/// What a reader's build returns.
pub(crate) struct Built {
    pub pre: Prebuilt,
    pub rewritten: Vec<(SubKey, Rewritten)>,
}

impl Rewrite {
    /// Rewrites every subscription (once per identity and query); the
    /// queries to build are the distinct ones that are allowed.
    pub fn run(&self) -> (Vec<(SubKey, Rewritten)>, Vec<Arc<EffectiveQuery>>) {
        let mut seen: FxMap<(*const Identity, &str), Result<Arc<EffectiveQuery>, String>> =
            FxMap::default();
        let mut keys: FxSet<ViewKey> = FxSet::default();
        let mut queries = Vec::new();
        let mut out = Vec::with_capacity(self.subs.len());
        for (key, identity, query) in &self.subs {
            let result = seen
                .entry((Arc::as_ptr(identity), query.as_str()))
                .or_insert_with(|| {
                    self.policy
                        .rewrite(identity, query)
                        .map(Arc::new)
                        .map_err(|e| e.to_string())
                })
                .clone();
            if let Ok(q) = &result
                && keys.insert(q.key.clone())
            {
                queries.push(q.clone());
            }
            out.push((
                key.clone(),
                Rewritten {
                    identity: identity.clone(),
                    query: query.clone(),
                    result,
                },
            ));
        }
        (out, queries)
    }
}

type ReloadReply = oneshot::Sender<Result<PolicyReloadResponse, ApiError>>;

/// A policy reload waiting for its views.
pub(crate) struct ParkedReload {
    name: String,
    sql: String,
    reply: ReloadReply,
}

struct Pending {
    queries: Vec<Arc<EffectiveQuery>>,
    /// The engine's version when it was asked for: the reader's is at
    /// least this.
    requested_at: i64,
    started: Instant,
    /// Connections whose first parked command waits for it.
    conns: Vec<ConnId>,
    /// Whether the reload in progress waits for it.
    for_reload: bool,
}

/// The builds out and what waits on them.
#[derive(Default)]
pub(crate) struct Builds {
    next: u64,
    out: FxMap<u64, Pending>,
    /// View keys being built, to their build.
    keys: FxMap<ViewKey, u64>,
    /// The rows each commit changed since the oldest build out was asked
    /// for, by commit version.
    log: VecDeque<(i64, Vec<ChangedRow>)>,
    /// Per connection: its commands held behind a build, in order.
    parked: FxMap<ConnId, VecDeque<Cmd>>,
    /// The reload waiting for its views, and how many builds it waits
    /// for; later reloads queue behind it.
    reloading: Option<(ParkedReload, usize)>,
    /// Its subscriptions as the readers rewrote them.
    rewritten: FxMap<SubKey, Rewritten>,
    /// Builds back from the readers, installed at the end of the loop's
    /// turn.
    ready: Vec<(Pending, Result<Built, String>)>,
    reloads: VecDeque<ParkedReload>,
}

impl Builds {
    /// Whether commits must be kept for a build.
    pub fn logging(&self) -> bool {
        !self.out.is_empty()
    }

    /// Keeps a commit's rows for the builds out.
    pub fn log(&mut self, version: i64, rows: &[ChangedRow]) {
        if self.logging() {
            self.log.push_back((version, rows.to_vec()));
        }
    }

    /// The rows changed after `since`, each once with its latest after-image.
    fn changed_after(&self, since: i64) -> Vec<ChangedRow> {
        latest_images(
            self.log
                .iter()
                .filter(|(v, _)| *v > since)
                .map(|(_, rows)| rows.as_slice()),
        )
    }

    /// Drops the commits no build out needs.
    fn prune(&mut self) {
        match self.out.values().map(|p| p.requested_at).min() {
            None => self.log.clear(),
            Some(oldest) => {
                while self.log.front().is_some_and(|(v, _)| *v <= oldest) {
                    self.log.pop_front();
                }
            }
        }
    }

    /// Number of builds out (for the gauges).
    pub fn out(&self) -> usize {
        self.out.len()
    }
}

impl Engine {
    /// Runs a session command taken from the queue: parked behind its
    /// connection's build if one is out, parked for a build if it is a
    /// subscription whose view does not exist, handled otherwise.
    pub(in crate::engine) fn run_session(&mut self, c: Cmd) {
        let conn = c.session_conn().expect("only session commands are queued");
        if let Some(q) = self.builds.parked.get_mut(&conn) {
            q.push_back(c);
            return;
        }
        self.resume_conn(conn, VecDeque::from([c]), false);
    }

    /// Handles a connection's commands in order until one needs a build
    /// (it and the rest are parked); `direct` handles the first as it is.
    fn resume_conn(&mut self, conn: ConnId, mut cmds: VecDeque<Cmd>, mut direct: bool) {
        while let Some(mut c) = cmds.pop_front() {
            if !direct && let Some(q) = self.needs_build(&mut c) {
                cmds.push_front(c);
                self.builds.parked.insert(conn, cmds);
                let tenant = self.subs.conns.get(&conn).map(|k| k.who.tenant.clone());
                self.request_build(
                    vec![q],
                    None,
                    tenant.unwrap_or_else(|| Arc::from("")),
                    |p| p.conns.push(conn),
                );
                return;
            }
            direct = false;
            if let Some(n) = self.deferred.get_mut(&conn) {
                *n -= 1;
                if *n == 0 {
                    self.deferred.remove(&conn);
                }
            }
            self.handle(c);
        }
    }

    /// The query a subscription needs a view built for, if it needs one.
    /// A subscription rewritten under older policies is rewritten now
    /// (its command carries the result); a refused one needs nothing.
    fn needs_build(&mut self, c: &mut Cmd) -> Option<Arc<EffectiveQuery>> {
        let Cmd::Subscribe {
            conn,
            query,
            q,
            epoch,
            ..
        } = c
        else {
            return None;
        };
        let who = &self.subs.conns.get(conn)?.who;
        if *epoch != self.policy_gen {
            *q = Arc::new(self.policy.rewrite(&who.principal.identity, query).ok()?);
            *epoch = self.policy_gen;
        }
        if self.filters.views.contains_key(&q.key) {
            return None;
        }
        Some(q.clone())
    }

    /// Asks a reader for the views of `queries` (joining a build out for
    /// the same view), with `wait` registering what waits on it.
    fn request_build(
        &mut self,
        queries: Vec<Arc<EffectiveQuery>>,
        rewrite: Option<Rewrite>,
        tenant: Arc<str>,
        wait: impl FnOnce(&mut Pending),
    ) {
        if let [q] = queries.as_slice()
            && let Some(id) = self.builds.keys.get(&q.key)
            && let Some(p) = self.builds.out.get_mut(id)
        {
            return wait(p);
        }
        let id = self.builds.next;
        self.builds.next += 1;
        for q in &queries {
            self.builds.keys.insert(q.key.clone(), id);
        }
        let mut p = Pending {
            queries: queries.clone(),
            requested_at: self.version,
            started: Instant::now(),
            conns: Vec::new(),
            for_reload: false,
        };
        wait(&mut p);
        self.builds.out.insert(id, p);
        self.readers.submit(
            &tenant,
            Job::Build(BuildJob {
                id,
                queries,
                rewrite,
            }),
        );
    }

    /// A reader's build came back: it is installed with the others that
    /// came back in the same turn of the loop ([`Engine::install_ready`]).
    pub(in crate::engine) fn built(&mut self, id: u64, result: Result<Built, String>) {
        let Some(p) = self.builds.out.remove(&id) else {
            return;
        };
        for q in &p.queries {
            if self.builds.keys.get(&q.key) == Some(&id) {
                self.builds.keys.remove(&q.key);
            }
        }
        self.builds.ready.push((p, result));
    }

    /// Installs the builds that came back, brings every filter they created
    /// to the engine's version in one catch-up (from the oldest build's
    /// version: a row's latest after-image applied to a filter already past
    /// its change leaves it as it is), then lets what waited run.
    pub(in crate::engine) fn install_ready(&mut self) {
        if self.builds.ready.is_empty() {
            return;
        }
        let ready = std::mem::take(&mut self.builds.ready);
        let started = Instant::now();
        let mut created: Vec<(FilterId, i64)> = Vec::new();
        let mut oldest = i64::MAX;
        let mut done: Vec<(Pending, bool)> = Vec::with_capacity(ready.len());
        for (p, result) in ready {
            let ok = match result {
                Ok(b) => {
                    let mut queries = p.queries.clone();
                    for (key, r) in b.rewritten {
                        if let Ok(q) = &r.result {
                            queries.push(q.clone());
                        }
                        self.builds.rewritten.insert(key, r);
                    }
                    match self.install(&queries, &b.pre, &mut created) {
                        Ok(()) => {
                            oldest = oldest.min(b.pre.version);
                            true
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "installing a view build failed");
                            false
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a view build failed");
                    false
                }
            };
            done.push((p, ok));
        }
        if !created.is_empty() {
            let rows = self.builds.changed_after(oldest);
            tracing::debug!(
                builds = done.len(),
                filters = created.len(),
                at = oldest,
                caught_up = rows.len(),
                "views installed"
            );
            if let Err(e) =
                self.filters
                    .catch_up(&self.db, &self.schema, &created, &rows, self.version)
            {
                // Not exact: the new views go, and what waited runs as it
                // would without a build.
                tracing::warn!(error = %e, "catching up new views failed");
                for (f, _) in created {
                    if self.filters.is_view(f) {
                        self.filters.drop_view(f);
                    }
                }
                done.iter_mut().for_each(|(_, ok)| *ok = false);
            }
        }
        self.builds.prune();
        tracing::debug!(
            builds = done.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "builds installed"
        );
        for (p, ok) in done {
            metrics::histogram!("tenantsync_view_build_seconds").record(p.started.elapsed());
            for conn in p.conns {
                if let Some(cmds) = self.builds.parked.remove(&conn) {
                    // After a failed build, a subscription gets its view's
                    // error as it would without one.
                    self.resume_conn(conn, cmds, !ok);
                }
            }
            if p.for_reload {
                self.reload_built();
            }
        }
    }

    /// One of the reload's builds came back: the reload runs once all did,
    /// then the next one starts.
    fn reload_built(&mut self) {
        let Some((_, left)) = &mut self.builds.reloading else {
            return;
        };
        *left -= 1;
        if *left > 0 {
            return;
        }
        let (r, _) = self.builds.reloading.take().expect("a reload waits");
        let rewritten = std::mem::take(&mut self.builds.rewritten);
        let res = self.reload(&r.name, &r.sql, rewritten);
        let _ = r.reply.send(res);
        while self.builds.reloading.is_none()
            && let Some(next) = self.builds.reloads.pop_front()
        {
            self.reload_request(next.name, next.sql, next.reply);
        }
    }

    /// Installs the prebuilt views of `queries`, adding the filters it
    /// creates to `created`.
    fn install(
        &mut self,
        queries: &[Arc<EffectiveQuery>],
        pre: &Prebuilt,
        created: &mut Vec<(FilterId, i64)>,
    ) -> Result<(), String> {
        for q in queries {
            let (_, c) = self
                .filters
                .install(&self.db, &self.schema, q, self.version, pre)
                .map_err(|e| e.to_string())?;
            created.extend(c.into_iter().map(|f| (f, pre.version)));
        }
        Ok(())
    }

    /// A policy reload: its new views are built by a reader first, then it
    /// runs (`Engine::reload`) and is answered; one reload at a time.
    pub(in crate::engine) fn reload_request(
        &mut self,
        name: String,
        sql: String,
        reply: ReloadReply,
    ) {
        if self.builds.reloading.is_some() {
            self.builds
                .reloads
                .push_back(ParkedReload { name, sql, reply });
            return;
        }
        let per_tenant = match self.reload_views(&name, &sql) {
            Ok(q) => q,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let Some((policy, per_tenant)) = per_tenant else {
            let r = self.reload(&name, &sql, FxMap::default());
            let _ = reply.send(r);
            return;
        };
        // One build per tenant: readers rewrite its subscriptions and
        // build their views side by side, each in its tenant's turn.
        let mut builds = 0;
        for (tenant, subs) in per_tenant {
            let rewrite = Rewrite {
                policy: policy.clone(),
                subs,
            };
            self.request_build(Vec::new(), Some(rewrite), tenant, |p| {
                if !std::mem::replace(&mut p.for_reload, true) {
                    builds += 1;
                }
            });
        }
        self.builds.reloading = Some((ParkedReload { name, sql, reply }, builds));
    }

    /// The policies a reload to `sql` brings and, per tenant, the
    /// subscriptions it affects (`None` when it affects none).
    #[allow(clippy::type_complexity)]
    fn reload_views(
        &self,
        name: &str,
        sql: &str,
    ) -> Result<
        Option<(
            Arc<PolicyEngine>,
            FxMap<Arc<str>, Vec<(SubKey, Arc<Identity>, String)>>,
        )>,
        ApiError,
    > {
        let set = self.parse_policies(name, sql)?;
        let mut next = self.policy.clone();
        let change = next.replace_policies(set);
        let mut out: FxMap<Arc<str>, Vec<(SubKey, Arc<Identity>, String)>> = FxMap::default();
        for (key, sub) in &self.subs.subs {
            if change.affects(&sub.q) {
                out.entry(sub.tenant.clone()).or_default().push((
                    key.clone(),
                    sub.identity.clone(),
                    sub.query.clone(),
                ));
            }
        }
        Ok((!out.is_empty()).then(|| (Arc::new(next), out)))
    }

    /// At shutdown: reloads waiting for views are told the server stops.
    pub(in crate::engine) fn refuse_parked_reloads(&mut self) {
        let waiting = self.builds.reloading.take().map(|(r, _)| r);
        self.builds.rewritten.clear();
        let queued: Vec<ParkedReload> = self.builds.reloads.drain(..).collect();
        for r in waiting.into_iter().chain(queued) {
            let _ = r.reply.send(Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the server is stopping",
            )));
        }
    }
}
