//! `tenantsync demo` as a child process (docs/CLI.md, "tenantsync demo"):
//! the whole system runs, and every replica verifies.

use std::process::Command;

fn demo(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tenantsync"))
        .arg("demo")
        .args(args)
        .output()
        .expect("run tenantsync demo");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_small_demo_runs_and_verifies_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, stdout, stderr) = demo(&[
        "--tenants",
        "2",
        "--clients",
        "3",
        "--seconds",
        "2",
        "--seed",
        "3",
        "--dir",
        d,
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    // The phases, on stderr.
    for p in [
        "[1/6] server: listening on http://127.0.0.1:",
        "[3/6] clients: 6 replicas",
        "[6/6] verification",
    ] {
        assert!(stderr.contains(p), "{p}: {stderr}");
    }
    // The table: a header and one line per client, then the verdict.
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("client"), "{stdout}");
    assert!(
        lines[0].contains("rows held") && lines[0].contains("leaks") && lines[0].contains("misses")
    );
    for who in [
        "alice@acme",
        "bob@acme",
        "erin@acme",
        "carol@globex",
        "dave@globex",
        "frank@globex",
    ] {
        assert!(lines.iter().any(|l| l.starts_with(who)), "{who}: {stdout}");
    }
    assert!(
        stdout.contains("cross-tenant write by frank@globex into acme: policy_refused"),
        "{stdout}"
    );
    assert!(
        lines.last().unwrap().starts_with(
            "verified: all 6 replicas hold exactly what their policies and subscriptions allow"
        ),
        "{stdout}"
    );
    // --dir keeps the files.
    assert!(dir.path().join("server.db").is_file());
    assert!(dir.path().join("replica-alice-acme.db").is_file());
}

#[test]
fn the_json_result_says_what_each_replica_holds() {
    let (code, stdout, stderr) = demo(&[
        "--tenants",
        "3",
        "--clients",
        "2",
        "--seconds",
        "1.5",
        "--seed",
        "9",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let j: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["leaks"], 0);
    assert_eq!(j["misses"], 0);
    assert_eq!(j["stale"], 0);
    assert_eq!(j["seed"], 9);
    let clients = j["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 6);
    for c in clients {
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["rows_held"], c["rows_expected"], "{c}");
        assert!(!c["subscriptions"].as_array().unwrap().is_empty());
    }
    let tenants: std::collections::BTreeSet<&str> = clients
        .iter()
        .map(|c| c["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, ["acme", "globex", "initech"].into_iter().collect());
    assert_eq!(j["intrusion"]["refused"], true, "{j}");
    assert_eq!(j["intrusion"]["victim_rows_unchanged"], true);
    assert!(j["writes"]["writes"].as_u64().unwrap() > 0);
}

#[test]
fn bad_options_are_usage_errors() {
    let (code, _, stderr) = demo(&["--tenants", "0"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) = demo(&["--seconds", "-1"]);
    assert_eq!(code, Some(2), "{stderr}");
}
