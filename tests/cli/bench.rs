//! `tenantsync bench` (docs/BENCH.md): the CI smoke. A tiny run as a child
//! process; the JSON contract's keys, every client checked, no leaks and no
//! misses. No timing is asserted (the machine is shared).

use std::process::Command;

use serde_json::Value;

/// The keys the contract promises under `obj`, each by its path.
#[track_caller]
fn has(obj: &Value, path: &str) -> Value {
    let mut v = obj;
    for k in path.split('.') {
        v = v
            .get(k)
            .unwrap_or_else(|| panic!("the bench JSON lacks {path} (at {k}): {obj:#}"));
    }
    v.clone()
}

#[test]
fn a_tiny_run_keeps_the_json_contract_with_no_leaks_and_no_misses() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let report = dir.path().join("report");
    let out = Command::new(env!("CARGO_BIN_EXE_tenantsync"))
        .args([
            "bench",
            "--tenants",
            "3",
            "--clients-per-tenant",
            "2",
            "--duration",
            "1",
            "--rate",
            "50",
            "--quiet",
            "--synchronous",
            "normal",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run tenantsync bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("isolation: 6 clients"), "{stdout}");

    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(has(&j, "config.tenants"), 3);
    assert_eq!(has(&j, "config.clients_per_tenant"), 2);
    for phase in ["steady", "noisy", "reconnect", "reload"] {
        for k in ["writes_per_s", "deliveries_per_s"] {
            assert!(
                has(&j, &format!("phases.{phase}.{k}")).is_number(),
                "{phase}.{k}"
            );
        }
        for q in ["p50", "p90", "p99", "max"] {
            assert!(has(&j, &format!("phases.{phase}.latency_ms.{q}")).is_number());
        }
    }
    for q in ["p50", "p90", "p99", "max"] {
        assert!(has(&j, &format!("phases.noisy.quiet_tenants_latency_ms.{q}")).is_number());
    }
    assert!(has(&j, "phases.snapshot.seconds").is_number());
    // The reload rewrote the views of `todos` and answered.
    assert!(has(&j, "phases.reload.reload_ms").as_f64().unwrap() > 0.0);
    assert!(
        has(&j, "phases.reload.answer.changed_views").is_number(),
        "{:#}",
        j["phases"]["reload"]["answer"]
    );
    // The schema change reached every connection.
    assert_eq!(has(&j, "phases.schema.answer.schema_version"), 2);
    assert_eq!(has(&j, "phases.schema.connections"), 6);
    assert_eq!(
        has(&j, "phases.schema.delivered"),
        6,
        "{:#}",
        j["phases"]["schema"]
    );
    assert!(has(&j, "phases.schema.delay_ms.p99").is_number());
    // Each shard's figures, with its database.
    assert_eq!(j["shards"].as_array().map(Vec::len), Some(1));
    assert!(j["shards"][0]["db"].is_string(), "{:#}", j["shards"]);
    // 3 tenants x 2 clients x 3 subscriptions, every one synced.
    assert_eq!(has(&j, "phases.snapshot.subscriptions"), 18);
    assert!(has(&j, "phases.snapshot.rows").as_u64().unwrap() > 0);
    assert!(has(&j, "memory.rss_mb").is_number());
    assert!(has(&j, "memory.bytes_per_subscription").is_number());
    // Writes were accepted and delivered in the steady phase.
    assert!(has(&j, "phases.steady.writes_per_s").as_f64().unwrap() > 0.0);
    assert!(has(&j, "phases.steady.deliveries_per_s").as_f64().unwrap() > 0.0);
    assert_eq!(has(&j, "isolation.quiescent"), true);
    assert_eq!(has(&j, "isolation.clients_checked"), 6);
    assert_eq!(has(&j, "isolation.subscriptions_checked"), 18);
    assert_eq!(has(&j, "isolation.leaks"), 0, "{:#}", j["isolation"]);
    assert_eq!(has(&j, "isolation.misses"), 0, "{:#}", j["isolation"]);

    for f in [
        "report.md",
        "report.json",
        "latency.svg",
        "noisy.svg",
        "memory.svg",
    ] {
        let text = std::fs::read_to_string(report.join(f)).unwrap();
        assert!(!text.is_empty(), "{f}");
        if f.ends_with(".svg") {
            assert!(text.starts_with("<svg"), "{f}: {text}");
        }
    }
}

/// `--cluster 3`: the same bench on a local cluster (`tenantsync cluster
/// up`, NATS from PATH), clients spread over the nodes, each node's CPU in
/// the JSON, the isolation check over the first node's copies of every
/// shard.
#[test]
fn a_tiny_run_on_a_cluster_of_three_checks_isolation_and_reports_each_node() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tenantsync"))
        .args([
            "bench",
            "--cluster",
            "3",
            "--tenants",
            "6",
            "--clients-per-tenant",
            "2",
            "--duration",
            "1",
            "--rate",
            "50",
            "--quiet",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run tenantsync bench --cluster 3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stderr}", out.status);
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let nodes = has(&j, "nodes");
    assert_eq!(nodes.as_array().map(Vec::len), Some(3), "{nodes:#}");
    for n in nodes.as_array().unwrap() {
        assert!(
            n["url"].is_string() && n["steady_cpu_cores"].is_number(),
            "{n:#}"
        );
    }
    assert!(has(&j, "phases.steady.writes_per_s").as_f64().unwrap() > 0.0);
    assert_eq!(has(&j, "isolation.quiescent"), true);
    assert_eq!(has(&j, "isolation.clients_checked"), 12);
    assert_eq!(has(&j, "isolation.leaks"), 0, "{:#}", j["isolation"]);
    assert_eq!(has(&j, "isolation.misses"), 0, "{:#}", j["isolation"]);
}
