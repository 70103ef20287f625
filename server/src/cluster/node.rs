//! [`Node`]: one node of a cluster. Every half second it renews its lease
//! (its key in the `nodes` bucket, which expires `lease` after the last
//! renewal), reads the live nodes and each shard's owner (the `shards`
//! bucket, changed only by compare-and-set on the key's revision), and
//! acts:
//!
//! - each shard belongs to one live node, picked by rendezvous hashing of
//!   (shard, node id), so a node joining or leaving moves only its share;
//! - the picked node takes a shard over when no live node owns it (never
//!   owned, or its owner's lease lapsed): it sets itself as owner (CAS),
//!   lets its standby reach the log's end, appends a claim (fencing any
//!   append of the old owner), and starts the shard's engine on its copy;
//! - an owner that is not the picked node any more (a node joined) hands
//!   the shard over: it stops its engine, then names the picked node owner
//!   (CAS), which takes it over as above;
//! - an owner whose append was refused (another node appended), or whose
//!   key names another node, stops its engine and becomes a standby.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::journal::{CREATE_SEQ, LogJournal, set_seq};
use super::log::{Kind, LogError, ShardLog};
use super::standby::{Standby, open_copy, remove_db};
use crate::contract::{ServiceConfig, StartError};
use crate::engine::shard::Shard;
use crate::placement::Placement;
use crate::service::{SyncService, shard_config};

/// How a node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URLs (comma-separated for several).
    pub nats: String,
    /// The cluster's name (its streams and buckets are named after it).
    pub name: String,
    /// This node's id, unique in the cluster and stable across restarts.
    pub node_id: String,
    /// The URL clients and other nodes reach this node at.
    pub url: String,
    /// Where this node keeps its copies of the shards.
    pub dir: PathBuf,
    /// Copies JetStream keeps of each log and bucket (3 on a cluster of 3
    /// NATS servers).
    pub replicas: usize,
    /// How long a node's lease lasts after its last renewal.
    pub lease: Duration,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Log(#[from] LogError),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Owner {
    node: String,
    term: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeRecord {
    url: String,
}

enum Local {
    Standby(Standby),
    /// Running the shard's engine, since the claim of `term`.
    Owner {
        shard: Shard,
        seq: Arc<AtomicU64>,
        term: u64,
    },
    /// Between the two (a takeover or a handover in progress).
    Moving,
}

struct State {
    locals: Vec<Local>,
    /// Live nodes (id -> record) as last read.
    live: BTreeMap<String, NodeRecord>,
    /// Each shard's owner as last read.
    owners: Vec<Option<Owner>>,
    /// Each shard's node by the placement rule, for the live nodes.
    picks: Vec<Option<String>>,
    /// The revision of the cluster's policy key this node applied.
    policy_rev: u64,
}

struct Inner {
    config: ClusterConfig,
    service_config: ServiceConfig,
    service: SyncService,
    logs: Vec<ShardLog>,
    nodes: kv::Store,
    shards: kv::Store,
    state: tokio::sync::Mutex<State>,
    status: Mutex<serde_json::Value>,
    stopping: AtomicBool,
    /// The cluster's policy file (name, text) when one was reloaded since
    /// the nodes started: what a shard this node takes over starts with.
    policy: Mutex<Option<(String, String)>>,
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

fn js_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::JetStream(e.to_string())
}

/// Each shard's node among `live`: rendezvous hashing of (shard, node),
/// capped so that no node gets more than its even share (`ceil(shards /
/// nodes)`): a shard goes to the highest-ranked node with room. The same
/// live set gives every node the same answer; a node joining or leaving
/// moves few shards besides its share.
fn assign(shards: usize, live: &BTreeMap<String, NodeRecord>) -> Vec<Option<String>> {
    if live.is_empty() {
        return vec![None; shards];
    }
    let cap = shards.div_ceil(live.len());
    let mut load: BTreeMap<&str, usize> = live.keys().map(|k| (k.as_str(), 0)).collect();
    (0..shards)
        .map(|k| {
            let mut ranked: Vec<&str> = live.keys().map(String::as_str).collect();
            ranked.sort_by_key(|id| std::cmp::Reverse(weight(k, id)));
            let pick = ranked
                .into_iter()
                .find(|id| load[id] < cap)
                .expect("the caps hold every shard");
            *load.get_mut(pick).expect("a live node") += 1;
            Some(pick.to_owned())
        })
        .collect()
}

/// Rendezvous weight of (shard, node): FNV-1a of `shard/node`.
fn weight(shard: usize, node: &str) -> u64 {
    crate::placement::fnv1a64(format!("{shard}/{node}").as_bytes())
}

impl Node {
    /// Joins the cluster: opens the shards' logs and the placement
    /// buckets, starts a standby of every shard, and the node's loop. The
    /// returned service runs the shards this node comes to own.
    pub async fn start(
        config: ClusterConfig,
        service_config: ServiceConfig,
    ) -> Result<(Node, SyncService), ClusterError> {
        let connect_err = |reason: String| ClusterError::Connect {
            url: config.nats.clone(),
            reason,
        };
        let servers = config
            .nats
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| connect_err(e.to_string()))?;
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let js = jetstream::new(client);
        let bucket = |suffix: &str| format!("tenantsync_{}_{suffix}", config.name);
        let nodes = settle(|| {
            js.create_key_value(kv::Config {
                bucket: bucket("nodes"),
                history: 1,
                max_age: config.lease,
                num_replicas: config.replicas,
                ..Default::default()
            })
        })
        .await?;
        let shards = settle(|| {
            js.create_key_value(kv::Config {
                bucket: bucket("shards"),
                history: 1,
                num_replicas: config.replicas,
                ..Default::default()
            })
        })
        .await?;
        let placement = Placement::new(
            service_config.shards,
            service_config.shard_overrides.clone(),
        );
        std::fs::create_dir_all(&config.dir).map_err(|e| {
            StartError::Layout(format!("cannot create {}: {e}", config.dir.display()))
        })?;
        let mut logs = Vec::new();
        let mut locals = Vec::new();
        for k in 0..placement.shards() {
            let log = settle(|| ShardLog::open(&js, &config.name, k, config.replicas)).await?;
            locals.push(Local::Standby(Standby::start(
                log.clone(),
                shard_file(&config, k),
            )));
            logs.push(log);
        }
        let service = SyncService::empty(service_config.clone(), placement.clone());
        let node = Node {
            inner: Arc::new(Inner {
                state: tokio::sync::Mutex::new(State {
                    locals,
                    live: BTreeMap::new(),
                    owners: vec![None; placement.shards()],
                    picks: vec![None; placement.shards()],
                    policy_rev: 0,
                }),
                config,
                service_config,
                service: service.clone(),
                logs,
                nodes,
                shards,
                status: Mutex::new(serde_json::Value::Null),
                stopping: AtomicBool::new(false),
                policy: Mutex::new(None),
            }),
        };
        let looping = node.clone();
        tokio::spawn(async move { looping.run().await });
        Ok((node, service))
    }

    async fn run(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.inner.stopping.load(Ordering::Acquire) {
            tick.tick().await;
            if let Err(e) = self.turn().await {
                tracing::warn!(error = %e, "cluster: a placement round failed");
            }
        }
    }

    /// One round: renew the lease, read the placement, act on each shard.
    async fn turn(&self) -> Result<(), ClusterError> {
        let me = self.inner.config.node_id.clone();
        let record = serde_json::to_vec(&NodeRecord {
            url: self.inner.config.url.clone(),
        })
        .expect("a node record serializes");
        self.inner
            .nodes
            .put(&me, record.into())
            .await
            .map_err(js_err)?;
        let mut live = BTreeMap::new();
        let mut keys = self.inner.nodes.keys().await.map_err(js_err)?;
        while let Some(k) = keys.next().await {
            let k = k.map_err(js_err)?;
            let v = self.inner.nodes.get(&k).await.map_err(js_err)?;
            if let Some(r) = v.and_then(|v| serde_json::from_slice::<NodeRecord>(&v).ok()) {
                live.insert(k, r);
            }
        }
        let mut st = self.inner.state.lock().await;
        st.live = live;
        self.follow_policy(&mut st).await?;
        let picks = assign(self.inner.logs.len(), &st.live);
        st.picks = picks.clone();
        for (k, picked) in picks.into_iter().enumerate() {
            let key = format!("shard{k}");
            let entry = self.inner.shards.entry(&key).await.map_err(js_err)?;
            let (owner, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    (serde_json::from_slice::<Owner>(&e.value).ok(), e.revision)
                }
                Some(e) => (None, e.revision),
                None => (None, 0),
            };
            st.owners[k] = owner.clone();
            let owner_live = owner
                .as_ref()
                .is_some_and(|o| st.live.contains_key(&o.node));
            let term = owner.as_ref().map_or(0, |o| o.term);
            let mine = owner.as_ref().is_some_and(|o| o.node == me);
            match &st.locals[k] {
                Local::Owner {
                    shard, term: ran, ..
                } => {
                    // Another term (even one naming this node again): the
                    // engine runs on a copy another owner has moved past.
                    if !mine || shard.fenced() || *ran != term {
                        self.demote(&mut st, k).await;
                    } else if let Some(p) = picked.filter(|p| *p != me) {
                        // A node joined and this shard is its share.
                        self.demote(&mut st, k).await;
                        let next = Owner {
                            node: p.clone(),
                            term: term + 1,
                        };
                        let v = serde_json::to_vec(&next).expect("serializes");
                        if let Err(e) = self.inner.shards.update(&key, v.into(), revision).await {
                            tracing::warn!(shard = k, error = %e, "cluster: handover lost a race");
                        } else {
                            tracing::info!(shard = k, to = %p, "cluster: shard handed over");
                        }
                    }
                }
                Local::Standby(_) if mine => {
                    self.take_over(&mut st, k, term).await;
                }
                Local::Standby(_)
                    if !owner_live
                        && picked.as_deref() == Some(me.as_str())
                        && !self.alive(owner.as_ref()).await =>
                {
                    let next = Owner {
                        node: me.clone(),
                        term: term + 1,
                    };
                    let v = serde_json::to_vec(&next).expect("serializes");
                    let claimed = if entry.is_none() {
                        self.inner
                            .shards
                            .create(&key, v.into())
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    } else {
                        self.inner
                            .shards
                            .update(&key, v.into(), revision)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    };
                    match claimed {
                        Ok(()) => {
                            st.owners[k] = Some(next.clone());
                            self.take_over(&mut st, k, next.term).await;
                        }
                        Err(e) => {
                            tracing::info!(shard = k, error = %e, "cluster: another node claimed the shard first")
                        }
                    }
                }
                _ => {}
            }
        }
        for k in 0..st.owners.len() {
            let elsewhere = st.owners[k]
                .as_ref()
                .filter(|o| o.node != me)
                .and_then(|o| st.live.get(&o.node))
                .map(|r| r.url.clone());
            self.inner.service.set_elsewhere(k, elsewhere);
        }
        self.publish_status(&st);
        Ok(())
    }

    /// Applies the cluster's policy file when another node reloaded it
    /// (`publish_policy`): this node's shards take it, and so does every
    /// shard it takes over later.
    async fn follow_policy(&self, st: &mut State) -> Result<(), ClusterError> {
        let Some(e) = self.inner.shards.entry(POLICY_KEY).await.map_err(js_err)? else {
            return Ok(());
        };
        if e.revision <= st.policy_rev {
            return Ok(());
        }
        st.policy_rev = e.revision;
        let Ok((name, sql)) = serde_json::from_slice::<(String, String)>(&e.value) else {
            tracing::error!("cluster: the policy key is not (name, text); ignored");
            return Ok(());
        };
        *self.inner.policy.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((name.clone(), sql.clone()));
        match self.inner.service.reload_policy(&name, &sql).await {
            Ok(r) => {
                tracing::info!(policy = %name, changed_views = r.changed_views, "cluster: took the cluster's new policies")
            }
            Err(e) if e.code == tenantsync_protocol::ErrorCode::Unavailable => {}
            Err(e) => {
                tracing::error!(policy = %name, error = %e.message, "cluster: the cluster's new policies do not load here")
            }
        }
        Ok(())
    }

    /// Makes a policy file reloaded on this node (already in force on its
    /// shards) the cluster's: every other node takes it at its next round,
    /// and every shard that starts later starts with it.
    pub async fn publish_policy(&self, name: &str, sql: &str) -> Result<(), ClusterError> {
        let v = serde_json::to_vec(&(name, sql)).expect("serializes");
        let mut st = self.inner.state.lock().await;
        let rev = self
            .inner
            .shards
            .put(POLICY_KEY, v.into())
            .await
            .map_err(js_err)?;
        st.policy_rev = rev;
        *self.inner.policy.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((name.to_owned(), sql.to_owned()));
        Ok(())
    }

    /// Whether `owner`'s lease is held, read now (the live list of the
    /// round may predate a node that just started).
    async fn alive(&self, owner: Option<&Owner>) -> bool {
        match owner {
            Some(o) => matches!(self.inner.nodes.get(&o.node).await, Ok(Some(_))),
            None => false,
        }
    }

    /// Stops the shard's engine (if it runs here) and starts a standby.
    async fn demote(&self, st: &mut State, k: usize) {
        let old = std::mem::replace(&mut st.locals[k], Local::Moving);
        if let Local::Owner { shard, .. } = old {
            self.inner.service.uninstall(k);
            shard.shutdown(Duration::from_secs(5)).await;
            drop(shard);
            tracing::info!(shard = k, "cluster: stopped owning the shard; standby now");
        }
        st.locals[k] = Local::Standby(Standby::start(
            self.inner.logs[k].clone(),
            shard_file(&self.inner.config, k),
        ));
    }

    /// Takes shard `k` over: the copy reaches the log's end, a claim is
    /// appended after it, and the engine starts on the copy. On any failure
    /// the shard stays a standby here (the next round tries again).
    async fn take_over(&self, st: &mut State, k: usize, term: u64) {
        let log = self.inner.logs[k].clone();
        let path = shard_file(&self.inner.config, k);
        let Local::Standby(standby) = std::mem::replace(&mut st.locals[k], Local::Moving) else {
            return;
        };
        let r = async {
            let last = log.last_seq().await?;
            if last == 0 {
                standby.stop().await;
                return self.genesis(k, &log, &path, term).await;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while standby.applied() < last && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let applied = standby.stop().await;
            let claim = serde_json::to_vec(&Owner {
                node: self.inner.config.node_id.clone(),
                term,
            })
            .expect("serializes");
            let seq = log.append(applied, Kind::Claim, claim.into()).await?;
            let db = open_copy(&path).map_err(StartError::Layout)?;
            set_seq(db.conn(), seq).map_err(|e| StartError::Layout(e.to_string()))?;
            drop(db);
            self.start_shard(k, &log, seq, term)
        }
        .await;
        match r {
            Ok(local) => {
                tracing::info!(shard = k, node = %self.inner.config.node_id, "cluster: took the shard over");
                st.locals[k] = local;
            }
            Err(e) => {
                tracing::warn!(shard = k, error = %e, "cluster: taking the shard over failed; standby again");
                st.locals[k] = Local::Standby(Standby::start(log, path));
            }
        }
    }

    /// The first owner of a shard whose log is empty: creates its
    /// database, appends it whole as the log's first entry, and starts it.
    async fn genesis(
        &self,
        k: usize,
        log: &ShardLog,
        path: &std::path::Path,
        term: u64,
    ) -> Result<Local, ClusterError> {
        remove_db(path);
        let mut c = shard_config(&self.inner.service_config, k, path.to_owned());
        c.frozen_schema = true;
        let made = Shard::start(&c)?;
        made.shutdown(Duration::from_secs(5)).await;
        drop(made);
        let image = {
            let db = open_copy(path).map_err(StartError::Layout)?;
            let conn = db.conn();
            let err = |e: rusqlite::Error| StartError::Layout(format!("shard {k}: {e}"));
            conn.execute_batch(CREATE_SEQ).map_err(err)?;
            set_seq(conn, 1).map_err(err)?;
            let tmp = path.with_extension("image");
            let _ = std::fs::remove_file(&tmp);
            conn.execute("VACUUM INTO ?1", [tmp.to_string_lossy()])
                .map_err(err)?;
            let bytes = std::fs::read(&tmp).map_err(|e| StartError::Layout(e.to_string()))?;
            let _ = std::fs::remove_file(&tmp);
            bytes
        };
        let seq = log.append(0, Kind::Image, image.into()).await?;
        tracing::info!(shard = k, "cluster: created the shard and its log");
        self.start_shard(k, log, seq, term)
    }

    fn start_shard(
        &self,
        k: usize,
        log: &ShardLog,
        seq: u64,
        term: u64,
    ) -> Result<Local, ClusterError> {
        let mut c = shard_config(
            &self.inner.service_config,
            k,
            shard_file(&self.inner.config, k),
        );
        c.frozen_schema = true;
        let policy = self
            .inner
            .policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((name, sql)) = policy {
            c.policy_name = name;
            c.policy_sql = sql;
        }
        let shared = Arc::new(AtomicU64::new(seq));
        let journal = LogJournal::new(
            log.clone(),
            tokio::runtime::Handle::current(),
            seq,
            shared.clone(),
        );
        let shard = Shard::start_with(&c, Some(Box::new(journal)))?;
        self.inner.service.install(k, shard.clone());
        Ok(Local::Owner {
            shard,
            seq: shared,
            term,
        })
    }

    fn publish_status(&self, st: &State) {
        let me = &self.inner.config.node_id;
        let nodes: Vec<_> = st
            .live
            .iter()
            .map(|(id, r)| serde_json::json!({"id": id, "url": r.url, "alive": true}))
            .collect();
        let shards: Vec<_> = st
            .locals
            .iter()
            .enumerate()
            .map(|(k, l)| {
                let owner = st.owners[k].as_ref();
                let applied = match l {
                    Local::Owner { seq, .. } => seq.load(Ordering::Acquire),
                    Local::Standby(s) => s.applied(),
                    Local::Moving => 0,
                };
                serde_json::json!({
                    "id": k,
                    "owner": owner.map(|o| o.node.clone()),
                    "owner_url": owner.and_then(|o| st.live.get(&o.node)).map(|r| r.url.clone()),
                    "term": owner.map_or(0, |o| o.term),
                    // Owned by the node the placement rule picks (no
                    // handover due).
                    "placed": owner.is_some_and(|o| st.picks[k].as_deref() == Some(o.node.as_str())),
                    "here": match l { Local::Owner { .. } => "owner", Local::Standby(_) => "standby", Local::Moving => "moving" },
                    "log_sequence_applied": applied,
                })
            })
            .collect();
        *self.inner.status.lock().unwrap_or_else(|p| p.into_inner()) = serde_json::json!({
            "node": me,
            "nodes": nodes,
            "shards": shards,
        });
    }

    /// `GET /v1/admin/cluster`: the live nodes, each shard's owner and this
    /// node's log position in it; with a tenant, its shard and owner.
    pub fn status(&self, tenant: Option<&str>) -> serde_json::Value {
        let mut v = self
            .inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(t) = tenant {
            let k = self.inner.service.shard_of(Some(t));
            let shard = v["shards"][k].clone();
            v["tenant"] = serde_json::json!({
                "tenant": t,
                "shard": k,
                "owner": shard["owner"],
                "owner_url": shard["owner_url"],
            });
        }
        v
    }

    /// Leaves the cluster: stops the loop, the shards this node runs and
    /// its standbys, and gives up its lease (its shards move at once).
    pub async fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        let mut st = self.inner.state.lock().await;
        for k in 0..st.locals.len() {
            match std::mem::replace(&mut st.locals[k], Local::Moving) {
                Local::Owner { shard, .. } => {
                    self.inner.service.uninstall(k);
                    shard.shutdown(Duration::from_secs(5)).await;
                }
                Local::Standby(s) => {
                    s.stop().await;
                }
                Local::Moving => {}
            }
        }
        let _ = self.inner.nodes.delete(&self.inner.config.node_id).await;
    }
}

/// The key of the `shards` bucket holding the cluster's policy file.
const POLICY_KEY: &str = "policy";

/// How long a node waits at start for JetStream to take its streams and
/// buckets (a NATS cluster elects its JetStream leader after it starts).
const SETTLE: Duration = Duration::from_secs(60);

/// Runs `f` until it succeeds, for at most [`SETTLE`].
async fn settle<T, E: std::fmt::Display, F, Fut>(mut f: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(js_err(e)),
            Err(e) => {
                tracing::info!(error = %e, "cluster: JetStream not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

fn shard_file(config: &ClusterConfig, k: usize) -> PathBuf {
    config.dir.join(format!("shard-{k}.db"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ids: &[&str]) -> BTreeMap<String, NodeRecord> {
        ids.iter()
            .map(|id| (id.to_string(), NodeRecord { url: String::new() }))
            .collect()
    }

    #[test]
    fn shards_spread_evenly_and_a_join_moves_only_what_it_must() {
        let three = assign(12, &live(&["a", "b", "c"]));
        for id in ["a", "b", "c"] {
            assert_eq!(three.iter().filter(|o| o.as_deref() == Some(id)).count(), 4);
        }
        let four = assign(12, &live(&["a", "b", "c", "d"]));
        for id in ["a", "b", "c", "d"] {
            assert_eq!(four.iter().filter(|o| o.as_deref() == Some(id)).count(), 3);
        }
        let moved = three.iter().zip(&four).filter(|(x, y)| x != y).count();
        assert!(moved <= 6, "{moved} of 12 moved for a fourth node");
        assert_eq!(assign(3, &live(&[])), vec![None, None, None]);
        assert_eq!(assign(5, &live(&["a", "b"])), assign(5, &live(&["b", "a"])));
    }
}
