//! [`Shard`]: one server database with its engine thread (the only writer)
//! and its reader pool, holding a set of tenants. A node runs several;
//! [`crate::SyncService`] routes each tenant to its own (docs/arch/server.md,
//! "Shards"). Everything here is per shard: versions, cursors, peers and
//! their site bindings, subscriptions, the policy set's epoch.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tenantsync_core::{CrrConnection, MergeStamping, Options, SiteId};
use tenantsync_policy::{Engine as PolicyEngine, PolicySet};
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::{
    PeerReport, PolicyReloadResponse, PullRequest, PullResponse, SqlResponse, SqlStatement,
};
use tokio::sync::oneshot;

use super::migrate;
use super::outbox::OutboxShared;
use super::reader::{Job, PullItem, PullJob, Readers};
use super::schema::{SchemaCell, ServerSchema};
use super::{
    Cmd, Engine, OpenOk, PolicyState, ShardStats, SharedPolicy, SqlCmd, Tuning, Who, Write,
};
use crate::contract::{ApiError, Limits, StartError, Synchronous};

/// How to start one shard.
#[derive(Debug, Clone)]
pub(crate) struct ShardConfig {
    /// Its index among the node's shards.
    pub index: usize,
    pub db_path: PathBuf,
    pub schema_sql: String,
    pub policy_name: String,
    pub policy_sql: String,
    pub tenant_claim: String,
    pub limits: Limits,
    pub readers: usize,
    pub synchronous: Synchronous,
    /// How long idle state stays in memory (`ServiceConfig::idle_grace`).
    pub grace: std::time::Duration,
    /// The tables the backend's write hook judges (`None`: no hook).
    pub hook_tables: Option<Vec<String>>,
    /// Shard 0's schema versions (for the other shards: one behind runs
    /// what it lacks, [`migrate::start`]).
    pub leader_schema: Option<Vec<tenantsync_protocol::http::SchemaMigration>>,
    /// A shard of a cluster: its schema is the one its log holds, and a
    /// schema file that would change it is refused ([`migrate::start`]).
    pub frozen_schema: bool,
}

struct Inner {
    tx: mpsc::Sender<Cmd>,
    schema: Arc<SchemaCell>,
    policy: SharedPolicy,
    limits: Limits,
    site: SiteId,
    stats: Arc<ShardStats>,
    db_path: PathBuf,
    readers: Arc<Readers>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            let (reply, _rx) = oneshot::channel();
            let _ = self.tx.send(Cmd::Shutdown { reply });
        }
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

pub(crate) fn stopped() -> ApiError {
    ApiError::new(ErrorCode::ShuttingDown, "the server is stopping")
}

/// A running shard. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Shard {
    inner: Arc<Inner>,
}

impl Shard {
    /// Opens the shard's database, applies the schema, loads and validates
    /// the policies, starts its engine thread and readers.
    pub fn start(config: &ShardConfig) -> Result<Shard, StartError> {
        Shard::start_with(config, None)
    }

    /// [`Shard::start`], with every commit passing through `journal` (a
    /// shard of a cluster, `crate::cluster`).
    pub(crate) fn start_with(
        config: &ShardConfig,
        journal: Option<Box<dyn super::journal::Journal>>,
    ) -> Result<Shard, StartError> {
        let db_err = |e| StartError::Database {
            path: config.db_path.clone(),
            source: e,
        };
        let mut db = CrrConnection::open_with(
            &config.db_path,
            Options {
                merge_stamping: MergeStamping::Local,
                ..Options::default()
            },
        )
        .map_err(db_err)?;
        let sync = match config.synchronous {
            Synchronous::Full => "PRAGMA synchronous = FULL",
            Synchronous::Normal => "PRAGMA synchronous = NORMAL",
        };
        db.conn()
            .execute_batch(sync)
            .map_err(|e| db_err(e.into()))?;
        let log = migrate::start(
            &mut db,
            &config.schema_sql,
            config.leader_schema.as_deref(),
            config.frozen_schema,
        )
        .map_err(StartError::Schema)?;
        db.conn()
            .execute_batch(super::store::CREATE)
            .map_err(|e| StartError::Schema(e.to_string()))?;
        let schema = Arc::new(ServerSchema::read(&db, log).map_err(db_err)?);
        let cell = Arc::new(SchemaCell::new(schema.clone()));
        let set = PolicySet::parse(&config.policy_name, &config.policy_sql, &schema.policy)
            .map_err(|d| StartError::Policy {
                diagnostics: d.to_string().lines().map(str::to_owned).collect(),
            })?;
        if config.index == 0 {
            warn_cross_tenant(&set, &config.tenant_claim);
            for table in unindexed_tenant_tables(&db, &schema, &config.tenant_claim) {
                tracing::warn!(
                    table = %table,
                    "table {table} has the tenant column {} but no index starting with it: every subscription's snapshot and every membership reads all tenants' rows of it (CREATE INDEX ... ON {table} ({}))",
                    config.tenant_claim,
                    config.tenant_claim
                );
            }
        }
        let policy = PolicyEngine::new(set);
        let shared: SharedPolicy = Arc::new(RwLock::new(PolicyState {
            epoch: 0,
            engine: Arc::new(policy.clone()),
        }));
        let site = db.site_id();
        let (tx, rx) = mpsc::channel();
        let readers = Arc::new(Readers::start(
            config.readers,
            &config.db_path,
            cell.clone(),
            tx.clone(),
            config.limits.max_message_bytes,
        )?);
        let stats = Arc::new(ShardStats {
            index: config.index,
            ..ShardStats::default()
        });
        let engine = Engine::new(
            db,
            cell.clone(),
            policy,
            shared.clone(),
            config.limits.clone(),
            tx.clone(),
            readers.clone(),
            Tuning {
                grace: config.grace,
                ..Tuning::default()
            },
            stats.clone(),
            Arc::from(config.tenant_claim.as_str()),
        )
        .map_err(db_err)?;
        let engine = match &config.hook_tables {
            Some(t) => engine.with_write_hook(t).map_err(StartError::Schema)?,
            None => engine,
        };
        let engine = match journal {
            Some(j) => engine.with_journal(j),
            None => engine,
        };
        let thread = std::thread::Builder::new()
            .name(format!("tenantsync-engine-{}", config.index))
            .spawn(move || engine.run(rx))?;
        tracing::info!(shard = config.index, db = %config.db_path.display(), site = %site, "shard started");
        Ok(Shard {
            inner: Arc::new(Inner {
                tx,
                schema: cell,
                policy: shared,
                limits: config.limits.clone(),
                site,
                stats,
                db_path: config.db_path.clone(),
                readers,
                thread: Mutex::new(Some(thread)),
                stopped: AtomicBool::new(false),
            }),
        })
    }

    /// Its index among the node's shards.
    pub fn index(&self) -> usize {
        self.inner.stats.index
    }

    /// Why it takes no writes, in a cluster: another node appended to its
    /// log (it is to become a standby).
    pub fn fenced(&self) -> bool {
        self.inner.stats.fenced.load(Ordering::Acquire)
    }

    /// Its database's site id (the `server_site_id` its peers see).
    pub fn site_id(&self) -> SiteId {
        self.inner.site
    }

    /// Its last committed version.
    pub fn db_version(&self) -> i64 {
        self.inner.stats.version.load(Ordering::Acquire)
    }

    /// Why it cannot take writes now, if it cannot: its engine thread
    /// ended, or its last group commit failed (until one succeeds).
    pub fn not_ready(&self) -> Option<&'static str> {
        let ended = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|t| t.is_finished());
        if ended {
            Some("its engine is not running")
        } else if self.inner.stats.write_failed.load(Ordering::Acquire) {
            Some("its last commit failed")
        } else {
            None
        }
    }

    /// What it holds, as `/v1/admin/status` shows it.
    pub fn status(&self) -> serde_json::Value {
        let mut v = self.inner.stats.json();
        v["db"] = self.inner.db_path.display().to_string().into();
        v
    }

    /// The schema in force.
    pub fn schema(&self) -> Arc<ServerSchema> {
        self.inner.schema.get()
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Sends a command to the engine thread.
    pub fn send(&self, c: Cmd) -> Result<(), ApiError> {
        if self.inner.stopped.load(Ordering::Acquire) {
            return Err(stopped());
        }
        self.inner.tx.send(c).map_err(|_| stopped())
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| stopped())
    }

    /// The policy set in force and its epoch.
    pub fn policy(&self) -> (u64, Arc<PolicyEngine>) {
        let p = self.inner.policy.read().unwrap_or_else(|p| p.into_inner());
        (p.epoch, p.engine.clone())
    }

    /// Registers a WebSocket session (binding its site id to `who`).
    pub async fn open(
        &self,
        who: Who,
        site: SiteId,
        client: Option<String>,
        known_schema: Option<i64>,
        outbox: Arc<OutboxShared>,
    ) -> Result<OpenOk, ApiError> {
        self.ask(|reply| Cmd::Open {
            who,
            site,
            client,
            known_schema,
            outbox,
            reply,
        })
        .await?
    }

    /// An HTTP pull (long-polls up to `min(wait_ms, limits.max_wait)`).
    pub async fn pull(
        &self,
        who: Who,
        req: PullRequest,
        subs: Vec<(
            tenantsync_protocol::http::PullSub,
            Arc<tenantsync_policy::EffectiveQuery>,
        )>,
        epoch: u64,
    ) -> Result<PullResponse, ApiError> {
        let site = req.site_id;
        let meta: Vec<(String, String, String)> = subs
            .iter()
            .map(|(s, q)| (s.id.clone(), s.query.clone(), q.table.clone()))
            .collect();
        let waits: Vec<(Arc<str>, String, Vec<String>)> = subs
            .iter()
            .map(|(s, q)| {
                (
                    Arc::from(s.id.as_str()),
                    q.table.clone(),
                    q.depends_on.clone(),
                )
            })
            .collect();
        let (items, pushed_version) = self
            .ask(|reply| Cmd::PullBegin {
                who: who.clone(),
                site,
                subs,
                unsubscribe: req.unsubscribe,
                epoch,
                reply,
            })
            .await??;
        let wait = Duration::from_millis(req.wait_ms).min(self.inner.limits.max_wait);
        let deadline = Instant::now() + wait;
        let items = Arc::new(items);
        loop {
            let (tx, rx) = oneshot::channel();
            let job_items = items
                .iter()
                .map(|i| PullItem {
                    id: i.id.clone(),
                    q: i.q.clone(),
                    mode: i.mode,
                    base: i.base.clone(),
                })
                .collect();
            self.inner.stats.pull_reads.fetch_add(1, Ordering::Relaxed);
            self.inner.readers.submit(
                &who.tenant,
                Job::Pull(PullJob {
                    site,
                    items: job_items,
                    max_bytes: self.inner.limits.max_pull_bytes,
                    reply: tx,
                }),
            );
            let mut r = rx.await.map_err(|_| stopped())??;
            r.response.pushed_version = pushed_version;
            let now = Instant::now();
            if r.any || now >= deadline || items.is_empty() {
                let done = r
                    .held
                    .iter()
                    .zip(&meta)
                    .map(|((id, h), (_, query, table))| {
                        (
                            id.clone(),
                            query.clone(),
                            table.clone(),
                            r.response.version,
                            h.clone(),
                        )
                    })
                    .collect();
                self.send(Cmd::PullEnd { site, done })?;
                return Ok(r.response);
            }
            let (wtx, wrx) = oneshot::channel();
            self.send(Cmd::PullWait {
                who: who.clone(),
                site,
                subs: waits.clone(),
                since: r.response.version,
                reply: wtx,
            })?;
            let _ = tokio::time::timeout(deadline - now, wrx).await;
        }
    }

    /// Service SQL, in one transaction of this shard.
    pub async fn sql(
        &self,
        who: Who,
        statements: Vec<SqlStatement>,
    ) -> Result<SqlResponse, ApiError> {
        self.ask(|reply| {
            Cmd::Write(Write::Sql(SqlCmd {
                who,
                statements,
                reply,
            }))
        })
        .await?
    }

    /// Replaces the policy set (validated whole first).
    pub async fn reload_policy(
        &self,
        name: &str,
        sql: &str,
    ) -> Result<PolicyReloadResponse, ApiError> {
        let (name, sql) = (name.to_owned(), sql.to_owned());
        self.ask(|reply| Cmd::Reload { name, sql, reply }).await?
    }

    /// A peer's report, when this shard knows the site.
    pub async fn peer_report(&self, site: SiteId) -> Result<PeerReport, ApiError> {
        self.ask(|reply| Cmd::Report { site, reply }).await?
    }

    /// Stops the shard (see [`crate::SyncService::shutdown`]).
    pub async fn shutdown(&self, timeout: Duration) {
        if self.inner.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Cmd::Shutdown { reply: tx }).is_err() {
            return;
        }
        let _ = tokio::time::timeout(timeout, rx).await;
        let t = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = t {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Logs the policies that do not constrain the tenant column (named as the
/// tenant claim): `tenantsync policy check` shows the same warnings.
/// The CRRs with the tenant column where no index (nor the primary key)
/// starts with it.
pub(crate) fn unindexed_tenant_tables(
    db: &tenantsync_core::CrrConnection,
    schema: &ServerSchema,
    tenant_column: &str,
) -> Vec<String> {
    let first_columns = |table: &str| -> rusqlite::Result<Vec<String>> {
        db.conn()
            .prepare(
                "SELECT ii.name FROM pragma_index_list(?1) AS il, pragma_index_info(il.name) AS ii WHERE ii.seqno = 0",
            )?
            .query_map([table], |r| r.get(0))?
            .collect()
    };
    schema
        .tables
        .iter()
        .filter(|t| {
            let Some(col) = t
                .columns
                .iter()
                .position(|c| c.eq_ignore_ascii_case(tenant_column))
            else {
                return false;
            };
            if t.pk.first() == Some(&col) {
                return false;
            }
            match first_columns(&t.name) {
                Ok(firsts) => !firsts.iter().any(|c| c.eq_ignore_ascii_case(tenant_column)),
                Err(_) => false,
            }
        })
        .map(|t| t.name.to_string())
        .collect()
}

pub(crate) fn warn_cross_tenant(set: &PolicySet, tenant_claim: &str) {
    if let Some(w) = set.tenant_warnings(tenant_claim, tenant_claim) {
        for d in &w.items {
            tracing::warn!(file = %w.file, line = d.line, column = d.column, "{}", d.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant column is indexed when an index (or the primary key)
    /// starts with it; a later column of an index does not count.
    #[test]
    fn tables_whose_tenant_column_no_index_starts_with() {
        let db = tenantsync_core::CrrConnection::open_in_memory().unwrap();
        let sql = "
            CREATE TABLE a (id INTEGER PRIMARY KEY NOT NULL, tenant_id TEXT);
            CREATE TABLE b (id INTEGER PRIMARY KEY NOT NULL, tenant_id TEXT);
            CREATE INDEX b_t ON b (tenant_id, id);
            CREATE TABLE c (id INTEGER PRIMARY KEY NOT NULL, tenant_id TEXT);
            CREATE INDEX c_t ON c (id, tenant_id);
            CREATE TABLE d (tenant_id TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (tenant_id, id));
            CREATE TABLE e (id INTEGER PRIMARY KEY NOT NULL, other TEXT);
            SELECT crsql_as_crr('a'); SELECT crsql_as_crr('b'); SELECT crsql_as_crr('c');
            SELECT crsql_as_crr('d'); SELECT crsql_as_crr('e');";
        let mut db = db;
        let log = migrate::start(&mut db, sql, None, false).unwrap();
        let schema = ServerSchema::read(&db, log).unwrap();
        assert_eq!(
            unindexed_tenant_tables(&db, &schema, "tenant_id"),
            ["a", "c"]
        );
    }
}
