//! Interop of tenantsync-core with the real cr-sqlite 0.16.0.

use anyhow::Result;
use tenantsync_tests::RealCrsqlite;
use tenantsync_tests::fuzz::{Config, Run};
use tenantsync_tests::peer::CrPeer;

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("TENANTSYNC_INTEROP_SEED") {
        return vec![s.parse().expect("TENANTSYNC_INTEROP_SEED is a number")];
    }
    let n = std::env::var("TENANTSYNC_INTEROP_SEEDS")
        .map(|s| s.parse().expect("TENANTSYNC_INTEROP_SEEDS is a number"))
        .unwrap_or(40);
    (1..=n).collect()
}

#[test]
fn real_peers_converge_among_themselves() -> Result<()> {
    let real = RealCrsqlite::spawn()?;
    let start = std::time::Instant::now();
    for seed in seeds() {
        let peers = [real.open()?, real.open()?, real.open()?];
        let dyns: Vec<&dyn CrPeer> = peers.iter().map(|p| p as &dyn CrPeer).collect();
        let summary = Run::new(
            dyns,
            Config {
                seed,
                steps: 150,
                pk_updates: vec![false; 3],
            },
        )?
        .run()?;
        eprintln!("seed {seed}: {summary:?}");
    }
    eprintln!("{:?}", start.elapsed());
    Ok(())
}
