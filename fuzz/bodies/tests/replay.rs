//! Replays every kept fuzz input through its target's body: the seeds
//! (`fuzz/seeds/<target>/`, hand-written starting points) and the inputs
//! that found bugs (`fuzz/regressions/<target>/`). A body panics when a
//! property fails, so a bug a fuzzer found stays fixed without cargo-fuzz.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use tenantsync_fuzz_bodies::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files of `fuzz/<kind>/<target>/`, sorted (none when it is missing).
fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.expect("read a directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs the target on each kept input; returns how many ran. Fails naming
/// every input whose property fails.
fn replay(target: &str, kind: &str) -> usize {
    let (_, body) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let files = inputs(kind, target);
    let mut failures = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("read a kept input");
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} inputs fail:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
    files.len()
}

#[track_caller]
fn check(target: &str) {
    let seeds = replay(target, "seeds");
    assert!(seeds > 0, "no seeds for {target} in fuzz/seeds/{target}");
    replay(target, "regressions");
}

#[test]
fn protocol_decode_inputs_hold() {
    check("protocol_decode");
}

#[test]
fn pk_value_inputs_hold() {
    check("pk_value");
}

#[test]
fn policy_parse_inputs_hold() {
    check("policy_parse");
}

#[test]
fn rewrite_inputs_hold() {
    check("rewrite");
}

#[test]
fn changes_insert_inputs_hold() {
    check("changes_insert");
}

#[test]
fn every_target_is_replayed() {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "protocol_decode",
            "pk_value",
            "policy_parse",
            "rewrite",
            "changes_insert"
        ]
    );
    for name in names {
        let bin = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(bin.is_file(), "no cargo-fuzz binary {}", bin.display());
    }
}
