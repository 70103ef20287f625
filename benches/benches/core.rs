//! CRR engine costs against plain SQLite on the same rows, same machine, one
//! run (`cargo bench -p tenantsync-benches --bench core`):
//!
//! - `insert_100k/{plain,crr}_{2,4}col`: 100k rows inserted with one prepared
//!   statement in one transaction, into a plain table and into a CRR (the
//!   ratio of the two medians is the write-tracking cost), in memory;
//! - `insert_100k/sql_trigger_{2,4}col`: the same rows into a plain table
//!   whose AFTER INSERT trigger, in plain SQL with constant values, writes
//!   what the core writes for a new row (one clock row keyed by the id, one
//!   `(db_version, id)` row in a WITHOUT ROWID table): the floor any
//!   trigger-based tracker with this layout pays (docs/arch/core.md,
//!   "Write tracking");
//! - `insert_100k_wal/{plain,sql_trigger,crr}_2col`: the same three on a WAL
//!   file with synchronous=NORMAL (what the server runs);
//! - `insert_1row_tx/{plain,crr}`: 1000 single-row transactions on a WAL file;
//! - `changes_since_0/{typed,sql}_{2,4}col`: reading every change of 100k rows;
//! - `apply/{typed,sql}_{2,4}col`: merging those changes into a fresh database.
//!
//! Data is seeded (no randomness between runs); the fixtures are in
//! `benches/src/lib.rs`. For instruction counts of each configuration under
//! callgrind, see `benches/examples/insert_profile.rs`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rusqlite::params;
use tenantsync_benches::{Db, SHAPES, Shape, Tracking, insert_rows, text};
use tenantsync_core::{Change, CrrConnection};

const ROWS: i64 = 100_000;

fn crr(shape: &Shape) -> CrrConnection {
    let c = CrrConnection::open_in_memory().unwrap();
    c.conn().execute_batch(shape.ddl).unwrap();
    c.as_crr("t").unwrap();
    c
}

/// The three configurations the insert groups compare.
const INSERTS: [Tracking; 3] = [Tracking::Plain, Tracking::SqlTrigger, Tracking::Crr];

fn bench_insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert_100k");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(ROWS as u64));
    for shape in &SHAPES {
        for tracking in INSERTS {
            g.bench_function(format!("{}_{}", tracking.name(), shape.name), |b| {
                b.iter_batched(
                    || Db::new(tracking, shape, None),
                    |db| insert_rows(db.conn(), shape, ROWS),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

/// The same inserts on WAL files (synchronous=NORMAL), as the server and
/// the CLI open databases.
fn bench_insert_wal(c: &mut Criterion) {
    let shape = &SHAPES[0];
    let mut g = c.benchmark_group("insert_100k_wal");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(ROWS as u64));
    let dir = tempfile::tempdir().unwrap();
    let mut k = 0;
    for tracking in INSERTS {
        g.bench_function(format!("{}_{}", tracking.name(), shape.name), |b| {
            b.iter_batched(
                || {
                    k += 1;
                    Db::new(
                        tracking,
                        shape,
                        Some(&dir.path().join(format!("db{k}.sqlite"))),
                    )
                },
                |db| insert_rows(db.conn(), shape, ROWS),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn bench_single_row_tx(c: &mut Criterion) {
    const N: i64 = 1000;
    let shape = &SHAPES[0];
    let mut g = c.benchmark_group("insert_1row_tx");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(N as u64));
    let dir = tempfile::tempdir().unwrap();
    let mut k = 0;
    let mut path = || {
        k += 1;
        dir.path().join(format!("db{k}.sqlite"))
    };
    g.bench_function("plain", |b| {
        b.iter_batched(
            || {
                let c = rusqlite::Connection::open(path()).unwrap();
                c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
                    .unwrap();
                c.execute_batch(shape.ddl).unwrap();
                c
            },
            |conn| {
                let mut stmt = conn.prepare(shape.insert).unwrap();
                for i in 0..N {
                    stmt.execute(params![i, text(i), i]).unwrap();
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("crr", |b| {
        b.iter_batched(
            || {
                let c = CrrConnection::open(path()).unwrap();
                c.conn().execute_batch(shape.ddl).unwrap();
                c.as_crr("t").unwrap();
                c
            },
            |db| {
                let mut stmt = db.conn().prepare(shape.insert).unwrap();
                for i in 0..N {
                    stmt.execute(params![i, text(i), i]).unwrap();
                }
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn source(shape: &Shape) -> (CrrConnection, Vec<Change>) {
    let db = crr(shape);
    insert_rows(db.conn(), shape, ROWS);
    let changes = db.changes_since(0, None).unwrap();
    (db, changes)
}

fn apply_sql(db: &CrrConnection, changes: &[Change]) {
    db.conn().execute_batch("BEGIN").unwrap();
    {
        let mut ins = db
            .conn()
            .prepare("INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
            .unwrap();
        for c in changes {
            ins.execute(rusqlite::params_from_iter(c.sql_params()))
                .unwrap();
        }
    }
    db.conn().execute_batch("COMMIT").unwrap();
}

fn bench_read_and_apply(c: &mut Criterion) {
    for shape in &SHAPES {
        let (db, changes) = source(shape);
        let n = changes.len() as u64;
        let mut g = c.benchmark_group("changes_since_0");
        g.sample_size(10).measurement_time(Duration::from_secs(15));
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("typed_{}", shape.name), |b| {
            b.iter(|| black_box(db.changes_since(0, None).unwrap().len()))
        });
        g.bench_function(format!("sql_{}", shape.name), |b| {
            b.iter(|| {
                let mut stmt = db
                    .conn()
                    .prepare_cached("SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes WHERE db_version > 0")
                    .unwrap();
                let mut rows = stmt.query([]).unwrap();
                let mut k = 0usize;
                while let Some(r) = rows.next().unwrap() {
                    black_box(r.get_ref(3).unwrap());
                    k += 1;
                }
                k
            })
        });
        g.finish();
        let mut g = c.benchmark_group("apply");
        g.sample_size(10).measurement_time(Duration::from_secs(20));
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("typed_{}", shape.name), |b| {
            b.iter_batched(
                || {
                    let d = CrrConnection::open_in_memory().unwrap();
                    d.conn().execute_batch(shape.ddl).unwrap();
                    d.as_crr("t").unwrap();
                    d
                },
                |mut d| d.apply(&changes).unwrap(),
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("sql_{}", shape.name), |b| {
            b.iter_batched(
                || {
                    let d = CrrConnection::open_in_memory().unwrap();
                    d.conn().execute_batch(shape.ddl).unwrap();
                    d.as_crr("t").unwrap();
                    d
                },
                |d| apply_sql(&d, &changes),
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

criterion_group!(
    benches,
    bench_insert,
    bench_insert_wal,
    bench_single_row_tx,
    bench_read_and_apply
);
criterion_main!(benches);
