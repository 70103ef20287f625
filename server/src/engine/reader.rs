//! The reader pool: OS threads with read-only connections (WAL) that serve
//! initial syncs (snapshot, resume, refetch), pulls and view builds, each job inside one
//! read transaction whose version is carried with the result. Jobs queue
//! per tenant and are taken round robin.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use tenantsync_core::{Change, ChangesQuery, CrrConnection, Options, PackedPk, SiteFilter, SiteId};
use tenantsync_policy::EffectiveQuery;
use tenantsync_protocol::RowKey;
use tenantsync_protocol::SubscribeMode;
use tenantsync_protocol::http::{PullPart, PullResponse};
use tenantsync_protocol::ws::ServerMsg;
use tenantsync_types::Value;
use tokio::sync::oneshot;

use crate::contract::ApiError;
use crate::engine::build::{BuildJob, Built, Rewrite};
use crate::engine::fair::FairQueue;
use crate::engine::filters::Prebuilt;
use crate::engine::outbox::OutboxShared;
use crate::engine::schema::SchemaCell;
use crate::engine::{Cmd, PkSet, SubKey};
use tenantsync_protocol::ErrorCode;

/// The size an initial sync's chunks aim at (rows are never split, so a
/// larger row makes a larger chunk).
const SYNC_CHUNK_BYTES: usize = 8 * 1024;

/// How much lower than the engine thread a reader runs (a nice value): on
/// a machine whose cores are all busy, the writer's commits and fan-out go
/// first and the readers' syncs, pulls and view builds take what is left.
const READER_NICE: i32 = 5;

/// Lowers the calling thread's scheduling priority by [`READER_NICE`]
/// (Linux schedules threads one by one; elsewhere, or when refused, the
/// reader keeps the process's priority).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread's own id.
        let r = unsafe {
            let tid = libc::gettid();
            let now = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, now + READER_NICE)
        };
        if r != 0 {
            tracing::debug!("a reader keeps the process's priority");
        }
    }
}

/// Where an initial sync starts from.
#[derive(Debug, Clone)]
pub(crate) struct SyncBase {
    /// The peer's cursor (None: nothing held, a snapshot).
    pub cursor: Option<i64>,
    /// What the peer holds at `cursor`.
    pub held: Arc<PkSet>,
    /// Drop held rows not delivered (snapshot, refetch).
    pub reset: bool,
}

impl SyncBase {
    pub fn snapshot() -> SyncBase {
        SyncBase {
            cursor: None,
            held: Arc::new(PkSet::default()),
            reset: true,
        }
    }
}

pub(crate) struct SyncJob {
    pub sub: SubKey,
    pub epoch: u64,
    /// The subscription's current sync epoch (the engine bumps it when it
    /// starts another sync): a stale job stops queueing chunks.
    pub current: Arc<std::sync::atomic::AtomicU64>,
    pub q: Arc<EffectiveQuery>,
    pub base: SyncBase,
    pub outbox: Arc<OutboxShared>,
}

pub(crate) struct PullItem {
    pub id: String,
    pub q: Arc<EffectiveQuery>,
    pub mode: SubscribeMode,
    pub base: SyncBase,
}

pub(crate) struct PullJob {
    pub site: SiteId,
    pub items: Vec<PullItem>,
    pub max_bytes: usize,
    pub reply: oneshot::Sender<Result<PullResult, ApiError>>,
}

pub(crate) struct PullResult {
    pub response: PullResponse,
    /// Per subscription: what it holds at `response.version`.
    pub held: Vec<(String, Arc<PkSet>)>,
    /// Whether any part carries something.
    pub any: bool,
}

pub(crate) enum Job {
    Sync(SyncJob),
    Pull(PullJob),
    Build(BuildJob),
}

struct Shared {
    q: Mutex<FairQueue<Job>>,
    cv: Condvar,
    stop: AtomicBool,
}

/// The pool's handle.
pub(crate) struct Readers {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Readers {
    pub fn start(
        n: usize,
        path: &std::path::Path,
        schema: Arc<SchemaCell>,
        engine: mpsc::Sender<Cmd>,
        max_message_bytes: usize,
    ) -> std::io::Result<Readers> {
        let shared = Arc::new(Shared {
            q: Mutex::new(FairQueue::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let sh = shared.clone();
            let schema = schema.clone();
            let engine = engine.clone();
            let path = path.to_owned();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tenantsync-reader-{i}"))
                    .spawn(move || {
                        lower_priority();
                        let db = match CrrConnection::open_with(
                            &path,
                            Options {
                                read_only: true,
                                ..Options::default()
                            },
                        ) {
                            Ok(db) => db,
                            Err(e) => {
                                tracing::error!(error = %e, "reader cannot open the database");
                                return;
                            }
                        };
                        let r = Reader {
                            db,
                            schema,
                            engine,
                            max: max_message_bytes,
                        };
                        r.run(&sh);
                    })?,
            );
        }
        Ok(Readers {
            shared,
            threads: Mutex::new(threads),
        })
    }

    pub fn submit(&self, tenant: &Arc<str>, job: Job) {
        self.shared
            .q
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tenant, job);
        self.shared.cv.notify_one();
    }

    pub fn stop(&self) {
        {
            // Under the lock: a reader between its check and its wait
            // cannot miss the wake-up.
            let _q = self.shared.q.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.stop.store(true, Ordering::Release);
        }
        self.shared.cv.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

struct Reader {
    db: CrrConnection,
    schema: Arc<SchemaCell>,
    engine: mpsc::Sender<Cmd>,
    max: usize,
}

/// One sync's result before chunking.
struct Computed {
    /// Changes, grouped by row.
    changes: Vec<Change>,
    evict: Vec<RowKey>,
    /// What the subscription holds after it.
    held: PkSet,
}

impl Reader {
    fn run(&self, sh: &Shared) {
        loop {
            let job = {
                let mut q = sh.q.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if sh.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let mut one = Vec::with_capacity(1);
                    q.take_turn(1, &mut one);
                    if let Some(j) = one.pop() {
                        break j;
                    }
                    q = sh.cv.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            match job {
                Job::Sync(j) => self.sync(j),
                Job::Pull(j) => {
                    let r = self.pull(&j);
                    let _ = j.reply.send(r);
                }
                Job::Build(j) => {
                    let result = self.build(&j);
                    let _ = self.engine.send(Cmd::Built { id: j.id, result });
                }
            }
        }
    }

    fn begin(&self) -> rusqlite::Result<()> {
        self.db.conn().execute_batch("BEGIN")?;
        // Start the read transaction (the snapshot) now.
        self.db
            .conn()
            .query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
        Ok(())
    }

    fn end(&self) {
        let _ = self.db.conn().execute_batch("COMMIT");
    }

    /// A view build: the filters of its queries at this transaction's
    /// version.
    fn build(&self, j: &BuildJob) -> Result<Built, String> {
        let (rewritten, more) = j.rewrite.as_ref().map(Rewrite::run).unwrap_or_default();
        let queries: Vec<Arc<EffectiveQuery>> = j.queries.iter().cloned().chain(more).collect();
        self.begin().map_err(|e| e.to_string())?;
        let pre = (|| {
            let version = self.db.db_version().map_err(|e| e.to_string())?;
            Prebuilt::compute(&self.db, &self.schema.get(), &queries, version)
                .map_err(|e| e.to_string())
        })();
        self.end();
        Ok(Built {
            pre: pre?,
            rewritten,
        })
    }

    fn visible(&self, q: &EffectiveQuery) -> Result<PkSet, String> {
        let schema = self.schema.get();
        let t = schema
            .table(&q.table)
            .ok_or_else(|| format!("{} is not a CRR", q.table))?;
        let cols: Vec<String> =
            t.pk.iter()
                .map(|&i| format!("\"{}\"", t.columns[i].replace('"', "\"\"")))
                .collect();
        let sql = format!(
            "SELECT {} FROM \"{}\" WHERE {}",
            cols.join(", "),
            t.name.replace('"', "\"\""),
            q.where_sql
        );
        let mut stmt = self
            .db
            .conn()
            .prepare_cached(&sql)
            .map_err(|e| e.to_string())?;
        let n = t.pk.len();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(q.params.iter()), |r| {
                (0..n)
                    .map(|i| r.get::<_, Value>(i))
                    .collect::<rusqlite::Result<Vec<Value>>>()
            })
            .map_err(|e| e.to_string())?;
        let mut out = PkSet::default();
        for r in rows {
            let r = r.map_err(|e| e.to_string())?;
            out.insert(PackedPk::pack(&r).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    fn compute(
        &self,
        q: &EffectiveQuery,
        base: &SyncBase,
        site: &SiteId,
    ) -> Result<Computed, String> {
        let v = self.visible(q)?;
        let e = |x: tenantsync_core::Error| x.to_string();
        let mut changes = Vec::new();
        let mut evict = Vec::new();
        let entered: Vec<PackedPk> = if base.cursor.is_none() || base.reset {
            v.iter().cloned().collect()
        } else {
            v.iter()
                .filter(|p| !base.held.contains(*p))
                .cloned()
                .collect()
        };
        let mut entered = entered;
        entered.sort();
        for chunk in entered.chunks(500) {
            changes.extend(self.db.row_changes(&q.table, chunk).map_err(e)?);
        }
        if let (Some(c), false) = (base.cursor, base.reset) {
            let mut kept: Vec<PackedPk> = v
                .iter()
                .filter(|p| base.held.contains(*p))
                .cloned()
                .collect();
            kept.sort();
            for chunk in kept.chunks(500) {
                changes.extend(
                    self.db
                        .changes(&ChangesQuery {
                            since: c,
                            table: Some(q.table.clone()),
                            pks: Some(chunk.to_vec()),
                            site: SiteFilter::Exclude(*site),
                            ..ChangesQuery::default()
                        })
                        .map_err(e)?,
                );
            }
            let mut gone: Vec<PackedPk> = base
                .held
                .iter()
                .filter(|p| !v.contains(*p))
                .cloned()
                .collect();
            gone.sort();
            for pk in gone {
                let exists = self.db.row_values(&q.table, &pk).map_err(e)?.is_some();
                let sentinel: Vec<Change> = if exists {
                    Vec::new()
                } else {
                    self.db
                        .row_changes(&q.table, std::slice::from_ref(&pk))
                        .map_err(e)?
                        .into_iter()
                        .filter(|c| c.is_sentinel() && c.cl % 2 == 0)
                        .collect()
                };
                if sentinel.is_empty() {
                    evict.push(RowKey {
                        table: q.table.clone(),
                        pk,
                    });
                } else {
                    changes.extend(sentinel);
                }
            }
        }
        Ok(Computed {
            changes,
            evict,
            held: v,
        })
    }

    fn sync(&self, j: SyncJob) {
        let site = j.outbox.site;
        let result = (|| {
            self.begin().map_err(|e| e.to_string())?;
            let r = (|| {
                let version = self.db.db_version().map_err(|e| e.to_string())?;
                let c = self.compute(&j.q, &j.base, &site)?;
                Ok::<_, String>((version, c))
            })();
            self.end();
            r
        })();
        let (version, c) = match result {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(sub = %j.sub.1, error = %e, "sync failed");
                let _ = self.engine.send(Cmd::SyncAbandoned {
                    sub: j.sub,
                    epoch: j.epoch,
                });
                return;
            }
        };
        // Chunks: rows are never split across chunks; evictions ride in the
        // last one. Small chunks keep each socket's write buffer small (it
        // keeps the capacity of the largest frame it wrote).
        let budget = (self.max / 2).clamp(1024, SYNC_CHUNK_BYTES);
        let mut chunks: Vec<Vec<Change>> = Vec::new();
        let mut cur: Vec<Change> = Vec::new();
        let mut size = 0usize;
        let mut i = 0;
        let all = c.changes;
        while i < all.len() {
            let mut j2 = i;
            let mut rs = 0;
            while j2 < all.len() && all[j2].pk == all[i].pk && all[j2].table == all[i].table {
                rs += 64 + approx(&all[j2]);
                j2 += 1;
            }
            if !cur.is_empty() && size + rs > budget {
                chunks.push(std::mem::take(&mut cur));
                size = 0;
            }
            cur.extend_from_slice(&all[i..j2]);
            size += rs;
            i = j2;
        }
        chunks.push(cur);
        let n = chunks.len();
        let mut last_text = String::new();
        for (k, changes) in chunks.into_iter().enumerate() {
            let last = k + 1 == n;
            let msg = ServerMsg::Snapshot {
                sub: j.sub.1.to_string(),
                version,
                reset: j.base.reset,
                changes,
                evict: if last { c.evict.clone() } else { Vec::new() },
                last,
            };
            let text = serde_json::to_string(&msg).expect("messages serialise");
            if last {
                // The engine queues the last chunk itself when it records
                // the sync, so the peer cannot acknowledge a sync the engine
                // does not know yet, and nothing of the view can come first.
                last_text = text;
                break;
            }
            let mut tries = 0;
            loop {
                if j.current.load(Ordering::Acquire) != j.epoch {
                    // Another sync replaced this one.
                    return;
                }
                if j.outbox.try_push_text(text.clone()) {
                    break;
                }
                tries += 1;
                if tries > 40 || j.outbox.is_closed() {
                    let _ = self.engine.send(Cmd::SyncAbandoned {
                        sub: j.sub,
                        epoch: j.epoch,
                    });
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = self.engine.send(Cmd::SyncDone {
            sub: j.sub,
            epoch: j.epoch,
            version,
            held: Arc::new(c.held),
            last: last_text,
        });
    }

    fn pull(&self, j: &PullJob) -> Result<PullResult, ApiError> {
        let internal = |e: String| ApiError::new(ErrorCode::Internal, e);
        self.begin().map_err(|e| internal(e.to_string()))?;
        let r = (|| {
            let version = self.db.db_version().map_err(|e| internal(e.to_string()))?;
            let mut subs = BTreeMap::new();
            let mut held = Vec::new();
            let mut bytes = 0usize;
            let mut any = false;
            for it in &j.items {
                let c = self.compute(&it.q, &it.base, &j.site).map_err(internal)?;
                bytes += c.changes.iter().map(|x| 64 + approx(x)).sum::<usize>();
                if bytes > j.max_bytes {
                    return Err(ApiError::new(
                        ErrorCode::TooLarge,
                        format!(
                            "the pull answer is over the limit of {} bytes; use the WebSocket, which streams in chunks",
                            j.max_bytes
                        ),
                    ));
                }
                any |= !c.changes.is_empty() || !c.evict.is_empty() || it.base.reset;
                subs.insert(
                    it.id.clone(),
                    PullPart {
                        mode: it.mode,
                        from: it.base.cursor.unwrap_or(0),
                        reset: it.base.reset,
                        changes: c.changes,
                        evict: c.evict,
                    },
                );
                held.push((it.id.clone(), Arc::new(c.held)));
            }
            // The schema the parts were read with, in the same snapshot.
            let schema_version = super::migrate::current_version(self.db.conn())
                .map_err(|e| internal(e.to_string()))?;
            Ok(PullResult {
                response: PullResponse {
                    version,
                    pushed_version: 0,
                    subs,
                    schema_version,
                },
                held,
                any,
            })
        })();
        self.end();
        r
    }
}

fn approx(c: &Change) -> usize {
    c.table.len()
        + c.pk.0.len() * 2
        + c.cid.len()
        + match &c.val {
            Value::Text(t) => t.len() + 2,
            Value::Blob(b) => b.len() * 2 + 12,
            _ => 24,
        }
}
