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
//! Data is seeded (no randomness between runs).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rusqlite::params;
use tenantsync_core::{Change, CrrConnection};

const ROWS: i64 = 100_000;

/// Deterministic pseudo-random text (a 64-bit LCG).
fn text(i: i64) -> String {
    let mut x = (i as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut s = String::with_capacity(24);
    for _ in 0..16 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        s.push((b'a' + (x >> 59) as u8 % 26) as char);
    }
    s
}

struct Shape {
    name: &'static str,
    ddl: &'static str,
    insert: &'static str,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "2col",
        ddl: "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER)",
        insert: "INSERT INTO t VALUES (?1, ?2, ?3)",
    },
    Shape {
        name: "4col",
        ddl: "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER, c REAL, d BLOB)",
        insert: "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)",
    },
];

fn insert_rows(conn: &rusqlite::Connection, shape: &Shape, n: i64) {
    conn.execute_batch("BEGIN").unwrap();
    {
        let mut stmt = conn.prepare(shape.insert).unwrap();
        for i in 0..n {
            if shape.name == "2col" {
                stmt.execute(params![i, text(i), i * 7]).unwrap();
            } else {
                stmt.execute(params![
                    i,
                    text(i),
                    i * 7,
                    i as f64 * 0.5,
                    text(i).into_bytes()
                ])
                .unwrap();
            }
        }
    }
    conn.execute_batch("COMMIT").unwrap();
}

fn plain(shape: &Shape) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_in_memory().unwrap();
    c.execute_batch(shape.ddl).unwrap();
    c
}

fn crr(shape: &Shape) -> CrrConnection {
    let c = CrrConnection::open_in_memory().unwrap();
    c.conn().execute_batch(shape.ddl).unwrap();
    c.as_crr("t").unwrap();
    c
}

/// Gives a plain table the trigger-only floor of our layout: per new row,
/// one clock row keyed by the id and one `(db_version, id)` row, written by
/// SQL with constant values (no engine, no function call).
fn add_sql_trigger(conn: &rusqlite::Connection) {
    conn.execute_batch(
        "CREATE TABLE clock (pk INTEGER PRIMARY KEY, clock BLOB);
         CREATE TABLE dbv (db_version INTEGER NOT NULL, pk INTEGER NOT NULL, PRIMARY KEY (db_version, pk)) WITHOUT ROWID;
         CREATE TRIGGER t_track AFTER INSERT ON t BEGIN
           INSERT OR IGNORE INTO clock (pk, clock) VALUES (NEW.id, x'0101020000010202000001');
           INSERT OR IGNORE INTO dbv (db_version, pk) VALUES (1, NEW.id);
         END;",
    )
    .unwrap();
}

fn bench_insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert_100k");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(ROWS as u64));
    for shape in &SHAPES {
        g.bench_function(format!("plain_{}", shape.name), |b| {
            b.iter_batched(
                || plain(shape),
                |conn| insert_rows(&conn, shape, ROWS),
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("sql_trigger_{}", shape.name), |b| {
            b.iter_batched(
                || {
                    let c = plain(shape);
                    add_sql_trigger(&c);
                    c
                },
                |conn| insert_rows(&conn, shape, ROWS),
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("crr_{}", shape.name), |b| {
            b.iter_batched(
                || crr(shape),
                |db| insert_rows(db.conn(), shape, ROWS),
                BatchSize::PerIteration,
            )
        });
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
    let mut path = move || {
        k += 1;
        dir.path().join(format!("db{k}.sqlite"))
    };
    let mut plain_wal = |trigger: bool| {
        let c = rusqlite::Connection::open(path()).unwrap();
        c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .unwrap();
        c.execute_batch(shape.ddl).unwrap();
        if trigger {
            add_sql_trigger(&c);
        }
        c
    };
    g.bench_function(format!("plain_{}", shape.name), |b| {
        b.iter_batched(
            || plain_wal(false),
            |conn| insert_rows(&conn, shape, ROWS),
            BatchSize::PerIteration,
        )
    });
    g.bench_function(format!("sql_trigger_{}", shape.name), |b| {
        b.iter_batched(
            || plain_wal(true),
            |conn| insert_rows(&conn, shape, ROWS),
            BatchSize::PerIteration,
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let mut k = 0;
    g.bench_function(format!("crr_{}", shape.name), |b| {
        b.iter_batched(
            || {
                k += 1;
                let db = CrrConnection::open(dir.path().join(format!("crr{k}.sqlite"))).unwrap();
                db.conn().execute_batch(shape.ddl).unwrap();
                db.as_crr("t").unwrap();
                db
            },
            |db| insert_rows(db.conn(), shape, ROWS),
            BatchSize::PerIteration,
        )
    });
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
            ins.execute(params![
                c.table,
                c.pk.0,
                c.cid,
                c.val,
                c.col_version,
                c.db_version,
                c.site_id.0.as_slice(),
                c.cl,
                c.seq
            ])
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
