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

use tenantsync_benches::{Db, SHAPES, Tracking, insert_rows};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: insert_profile <plain|noop_trigger|sql_clock|sql_trigger|cell_rows|crr|apply> <memory|wal> [rows]";
    let config = args.next().expect(usage);
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
