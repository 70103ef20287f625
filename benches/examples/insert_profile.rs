//! One run of one insert or apply configuration, for instruction counts
//! (the machine is shared and noisy; callgrind's counts are not):
//!
//! ```sh
//! cargo build --release -p tenantsync-benches --example insert_profile
//! valgrind --tool=callgrind target/release/examples/insert_profile <config> <memory|wal> [rows]
//! ```
//!
//! `<config>`: `plain`, `noop_trigger`, `sql_clock`, `sql_trigger`,
//! `cell_rows`, `crr` (see `tenantsync_benches::Tracking`): inserts `rows`
//! (default 20000) rows of the 2-column bench table in one transaction.
//! `apply`: builds the changes of `rows` rows, then merges them into a fresh
//! CRR; add `--toggle-collect='*CrrConnection*apply*'` to count the merge
//! alone. The figures of docs/arch/core.md, "Write tracking", come from
//! these runs (`Ir` total / rows).
//!
//! `insert_profile ab <config>,<config>,... <memory|wal> [rows] [rounds]`
//! times the configurations in turn, round after round (default 100000 rows,
//! 11 rounds), and prints each one's median and its ratio to the first: on
//! a loaded machine, interleaving keeps the ratio honest where separate
//! criterion groups drift apart.

use std::time::Instant;

use tenantsync_benches::{Db, SHAPES, Tracking, insert_rows};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: insert_profile <plain|noop_trigger|sql_clock|sql_trigger|cell_rows|crr|apply> <memory|wal> [rows]  or  insert_profile ab <config>,<config>,... <memory|wal> [rows] [rounds]";
    let config = args.next().expect(usage);
    if config == "ab" {
        let configs: Vec<Tracking> = args
            .next()
            .expect(usage)
            .split(',')
            .map(|c| Tracking::from_name(c).expect(usage))
            .collect();
        let storage = args.next().expect(usage);
        let rows: i64 = args.next().map_or(100_000, |n| n.parse().expect(usage));
        let rounds: usize = args.next().map_or(11, |n| n.parse().expect(usage));
        return ab(&configs, &storage, rows, rounds);
    }
    let storage = args.next().expect(usage);
    let rows: i64 = args.next().map_or(20_000, |n| n.parse().expect(usage));
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| match storage.as_str() {
        "memory" => None,
        "wal" => Some(dir.path().join(name)),
        _ => panic!("{usage}"),
    };
    let shape = &SHAPES[0];
    if config == "apply" {
        let source = Db::new(Tracking::Crr, shape, path("source.db").as_deref());
        insert_rows(source.conn(), shape, rows);
        let Db::Crr(source) = source else {
            unreachable!()
        };
        let changes = source.changes_since(0, None).unwrap();
        let Db::Crr(mut target) = Db::new(Tracking::Crr, shape, path("target.db").as_deref())
        else {
            unreachable!()
        };
        let stats = target.apply(&changes).unwrap();
        eprintln!("applied {} of {} changes", stats.applied, changes.len());
        return;
    }
    let tracking = Tracking::from_name(&config).expect(usage);
    let db = Db::new(tracking, shape, path("t.db").as_deref());
    insert_rows(db.conn(), shape, rows);
}

/// Times `configs` in turn for `rounds` rounds; prints medians and ratios.
fn ab(configs: &[Tracking], storage: &str, rows: i64, rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let shape = &SHAPES[0];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for (i, &t) in configs.iter().enumerate() {
            let path = dir.path().join(format!("{}-{round}.db", t.name()));
            let db = Db::new(t, shape, (storage == "wal").then_some(path.as_path()));
            let start = Instant::now();
            insert_rows(db.conn(), shape, rows);
            times[i].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = median(&mut times[0].clone());
    for (t, v) in configs.iter().zip(&mut times) {
        let m = median(v);
        println!(
            "{storage} {:<13} median {m:8.1} ms  {:6.2}x {}",
            t.name(),
            m / base,
            configs[0].name()
        );
    }
}
