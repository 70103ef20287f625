//! tenantsync-benches: shared fixtures for the criterion benchmarks in
//! `benches/benches/` and the profiling example in `benches/examples/`
//! (seeded rows, the table shapes, and the tracking configurations the
//! core's insert cost is measured against: docs/arch/core.md, "Write
//! tracking"). The load harness behind `tenantsync bench` is the crate
//! `tenantsync-loadtest` (`loadtest/`).
//!
//! Module map: one module, this root: [`text`], [`Shape`], [`SHAPES`],
//! [`insert_rows`], [`Tracking`], [`Db`].

use rusqlite::{Connection, params};
use tenantsync_core::CrrConnection;

/// Deterministic pseudo-random text of 16 letters (a 64-bit LCG).
pub fn text(i: i64) -> String {
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

/// A table `t` and the statement that inserts one row into it.
pub struct Shape {
    /// `2col` or `4col` (non-key columns).
    pub name: &'static str,
    /// Its CREATE TABLE.
    pub ddl: &'static str,
    /// Its INSERT of one row.
    pub insert: &'static str,
}

/// The bench tables: an INTEGER PRIMARY KEY and two or four other columns.
pub const SHAPES: [Shape; 2] = [
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

/// Inserts rows `0..n` (seeded values) with one prepared statement in one
/// transaction.
pub fn insert_rows(conn: &Connection, shape: &Shape, n: i64) {
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

/// How inserts into `t` are tracked, from nothing to the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracking {
    /// A plain table.
    Plain,
    /// An AFTER INSERT trigger that calls a no-op function (the cost of
    /// having a trigger at all).
    NoopTrigger,
    /// A pure-SQL trigger writing one clock row keyed by the id.
    SqlClock,
    /// A pure-SQL trigger writing what the core writes for a new row, with
    /// constant values: one clock row keyed by the id and one
    /// `(db_version, id)` row in a WITHOUT ROWID table. The floor of any
    /// trigger-based tracker with the core's layout.
    SqlTrigger,
    /// A pure-SQL trigger writing cr-sqlite-style clock rows: one per non-key
    /// column, keyed `(pk, col)`, with an index on db_version (2-column shape
    /// only; no lookaside table).
    CellRows,
    /// A CRR of tenantsync-core.
    Crr,
}

impl Tracking {
    /// Every configuration, in order of cost.
    pub const ALL: [Tracking; 6] = [
        Tracking::Plain,
        Tracking::NoopTrigger,
        Tracking::SqlClock,
        Tracking::SqlTrigger,
        Tracking::CellRows,
        Tracking::Crr,
    ];

    /// Its name on the command line and in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Tracking::Plain => "plain",
            Tracking::NoopTrigger => "noop_trigger",
            Tracking::SqlClock => "sql_clock",
            Tracking::SqlTrigger => "sql_trigger",
            Tracking::CellRows => "cell_rows",
            Tracking::Crr => "crr",
        }
    }

    /// The configuration with this name.
    pub fn from_name(name: &str) -> Option<Tracking> {
        Tracking::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A database holding table `t` of `shape`, tracked as `tracking` says:
/// in memory, or at `path` in WAL mode with synchronous=NORMAL (as
/// `CrrConnection::open` opens files).
pub enum Db {
    /// A plain rusqlite connection (every configuration but `Crr`).
    Plain(Connection),
    /// A tenantsync-core connection.
    Crr(CrrConnection),
}

impl Db {
    /// Opens and sets up the database.
    pub fn new(tracking: Tracking, shape: &Shape, path: Option<&std::path::Path>) -> Db {
        if tracking == Tracking::Crr {
            let db = match path {
                Some(p) => CrrConnection::open(p).unwrap(),
                None => CrrConnection::open_in_memory().unwrap(),
            };
            db.conn().execute_batch(shape.ddl).unwrap();
            db.as_crr("t").unwrap();
            return Db::Crr(db);
        }
        let conn = match path {
            Some(p) => {
                let c = Connection::open(p).unwrap();
                c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
                    .unwrap();
                c
            }
            None => Connection::open_in_memory().unwrap(),
        };
        conn.execute_batch(shape.ddl).unwrap();
        conn.create_scalar_function(
            "noop",
            -1,
            rusqlite::functions::FunctionFlags::SQLITE_UTF8,
            |_| Ok(0i64),
        )
        .unwrap();
        let body = match tracking {
            Tracking::Plain | Tracking::Crr => None,
            Tracking::NoopTrigger => Some("SELECT noop('t', NEW.id);"),
            Tracking::SqlClock => Some(
                "INSERT OR IGNORE INTO clock (pk, clock) VALUES (NEW.id, x'0101020000010202000001');",
            ),
            Tracking::SqlTrigger => Some(
                "INSERT OR IGNORE INTO clock (pk, clock) VALUES (NEW.id, x'0101020000010202000001');
                 INSERT OR IGNORE INTO dbv (db_version, pk) VALUES (1, NEW.id);",
            ),
            Tracking::CellRows => Some(
                "INSERT INTO cells (pk, col, cv, dbv, seq) VALUES (NEW.id, 'a', 1, 1, 0)
                   ON CONFLICT DO UPDATE SET cv = cv + 1, dbv = 1, seq = 0;
                 INSERT INTO cells (pk, col, cv, dbv, seq) VALUES (NEW.id, 'b', 1, 1, 1)
                   ON CONFLICT DO UPDATE SET cv = cv + 1, dbv = 1, seq = 1;",
            ),
        };
        if let Some(body) = body {
            // Like the core's triggers, every trigger has a WHEN that calls a
            // function (theirs is the sync bit).
            conn.execute_batch(&format!(
                "CREATE TABLE clock (pk INTEGER PRIMARY KEY, clock BLOB);
                 CREATE TABLE dbv (db_version INTEGER NOT NULL, pk INTEGER NOT NULL, PRIMARY KEY (db_version, pk)) WITHOUT ROWID;
                 CREATE TABLE cells (pk INTEGER NOT NULL, col TEXT NOT NULL, cv INTEGER NOT NULL, dbv INTEGER NOT NULL,
                   site INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL, PRIMARY KEY (pk, col)) WITHOUT ROWID, STRICT;
                 CREATE INDEX cells_dbv ON cells (dbv);
                 CREATE TRIGGER t_track AFTER INSERT ON t WHEN noop() = 0 BEGIN {body} END;"
            ))
            .unwrap();
        }
        Db::Plain(conn)
    }

    /// The connection to write through.
    pub fn conn(&self) -> &Connection {
        match self {
            Db::Plain(c) => c,
            Db::Crr(d) => d.conn(),
        }
    }
}
