//! Convergence: 3-5 peers make random writes (inserts, updates, deletes,
//! resurrections, primary-key updates; composite and text/blob keys, NULLs,
//! blobs, big integers, integral reals) and exchange changes in random
//! order, with drops and duplicates, through incremental pulls
//! (`db_version > cursor`), full pulls and relays. After a final round of
//! pulls every peer holds the same rows and the same clocks.

use proptest::prelude::*;
use tenantsync_core::{Change, ChangesQuery, CrrConnection, MergeStamping, Options};
use tenantsync_tests::crr::{apply_sql, rows, site};

const SCHEMA: &str = "
    CREATE TABLE t (id PRIMARY KEY NOT NULL, a, b); SELECT crsql_as_crr('t');
    CREATE TABLE c (k1 NOT NULL, k2 NOT NULL, v, PRIMARY KEY (k1, k2)); SELECT crsql_as_crr('c');
    CREATE TABLE p (x NOT NULL, y NOT NULL, PRIMARY KEY (x, y)); SELECT crsql_as_crr('p');
    CREATE TABLE i (id INTEGER PRIMARY KEY NOT NULL, v); SELECT crsql_as_crr('i');";

const VALUES: &[&str] = &[
    "NULL",
    "1",
    "2",
    "1.0",
    "2.5",
    "'a'",
    "'b'",
    "x'01'",
    "x''",
    "9223372036854775807",
    "-9223372036854775808",
    "9007199254740993",
];
const TEXT_KEYS: &[&str] = &["'k'", "'é'", "x'00ff'", "''", "-1"];

#[derive(Clone, Debug)]
enum Op {
    /// INSERT (0 plain, 1 OR IGNORE, 2 OR REPLACE) into t.
    InsertT {
        peer: usize,
        id: i64,
        a: usize,
        b: usize,
        mode: u8,
    },
    UpdateT {
        peer: usize,
        id: i64,
        col: bool,
        v: usize,
    },
    DeleteT {
        peer: usize,
        id: i64,
    },
    /// Primary-key update of t.
    MoveT {
        peer: usize,
        from: i64,
        to: i64,
    },
    UpsertC {
        peer: usize,
        k1: usize,
        k2: i64,
        v: usize,
    },
    DeleteC {
        peer: usize,
        k1: usize,
    },
    InsertP {
        peer: usize,
        x: i64,
        y: i64,
    },
    DeleteP {
        peer: usize,
        x: i64,
    },
    /// A write to the INTEGER PRIMARY KEY table (0 insert-or-replace,
    /// 1 update, 2 delete, 3 key update).
    WriteI {
        peer: usize,
        id: i64,
        v: usize,
        kind: u8,
    },
    /// A transaction of two writes.
    Tx {
        peer: usize,
        id: i64,
        a: usize,
        k1: usize,
    },
    /// `to` asks `from` for changes since its cursor (or since 0).
    Send {
        from: usize,
        to: usize,
        full: bool,
        via_sql: bool,
    },
    /// Deliver an in-flight message (and maybe deliver it twice).
    Deliver {
        pick: usize,
        twice: bool,
    },
    /// Lose an in-flight message.
    Drop {
        pick: usize,
    },
}

fn op(peers: usize) -> impl Strategy<Value = Op> {
    let p = 0..peers;
    let v = 0..VALUES.len();
    let id = 0i64..5;
    prop_oneof![
        4 => (p.clone(), id.clone(), v.clone(), v.clone(), 0u8..3).prop_map(|(peer, id, a, b, mode)| Op::InsertT { peer, id, a, b, mode }),
        4 => (p.clone(), id.clone(), any::<bool>(), v.clone()).prop_map(|(peer, id, col, v)| Op::UpdateT { peer, id, col, v }),
        2 => (p.clone(), id.clone()).prop_map(|(peer, id)| Op::DeleteT { peer, id }),
        1 => (p.clone(), id.clone(), id.clone()).prop_map(|(peer, from, to)| Op::MoveT { peer, from, to }),
        2 => (p.clone(), 0..TEXT_KEYS.len(), 0i64..2, v.clone()).prop_map(|(peer, k1, k2, v)| Op::UpsertC { peer, k1, k2, v }),
        1 => (p.clone(), 0..TEXT_KEYS.len()).prop_map(|(peer, k1)| Op::DeleteC { peer, k1 }),
        2 => (p.clone(), 0i64..3, 0i64..2).prop_map(|(peer, x, y)| Op::InsertP { peer, x, y }),
        1 => (p.clone(), 0i64..3).prop_map(|(peer, x)| Op::DeleteP { peer, x }),
        3 => (p.clone(), id.clone(), v.clone(), 0u8..4).prop_map(|(peer, id, v, kind)| Op::WriteI { peer, id, v, kind }),
        1 => (p.clone(), id.clone(), v.clone(), 0..TEXT_KEYS.len()).prop_map(|(peer, id, a, k1)| Op::Tx { peer, id, a, k1 }),
        6 => (p.clone(), p.clone(), prop::bool::weighted(0.2), any::<bool>()).prop_map(|(from, to, full, via_sql)| Op::Send { from, to, full, via_sql }),
        6 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(pick, twice)| Op::Deliver { pick, twice }),
        1 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
    ]
}

struct Msg {
    to: usize,
    from: usize,
    since: i64,
    until: i64,
    changes: Vec<Change>,
    via_sql: bool,
}

struct World {
    peers: Vec<CrrConnection>,
    /// cursor[to][from]: versions of `from` that `to` holds contiguously.
    cursor: Vec<Vec<i64>>,
    in_flight: Vec<Msg>,
}

impl World {
    fn new(n: usize, merge_equal_values: bool) -> World {
        let peers: Vec<CrrConnection> = (0..n)
            .map(|i| {
                let d = CrrConnection::open_with(
                    ":memory:",
                    Options {
                        site_id: Some(site(0x10 * (i as u8 + 1))),
                        merge_equal_values: Some(merge_equal_values),
                        merge_stamping: if i == 0 {
                            MergeStamping::Local
                        } else {
                            MergeStamping::CrSqlite
                        },
                        ..Options::default()
                    },
                )
                .unwrap();
                d.conn().execute_batch(SCHEMA).unwrap();
                d
            })
            .collect();
        World {
            cursor: vec![vec![0; n]; n],
            peers,
            in_flight: Vec::new(),
        }
    }

    fn write(&self, peer: usize, sql: &str) {
        // Constraint violations (a plain insert of an existing key, a key
        // update onto an existing key) are expected and leave no trace.
        let _ = self.peers[peer].conn().execute_batch(sql);
    }

    fn send(&mut self, from: usize, to: usize, full: bool, via_sql: bool) {
        if from == to {
            return;
        }
        let since = if full { 0 } else { self.cursor[to][from] };
        let changes = self.peers[from]
            .changes(&ChangesQuery {
                since,
                ..Default::default()
            })
            .unwrap();
        // Cursors advance from shipped rows, never from crsql_db_version().
        let until = changes.iter().map(|c| c.db_version).max().unwrap_or(since);
        self.in_flight.push(Msg {
            to,
            from,
            since,
            until,
            changes,
            via_sql,
        });
    }

    fn deliver(&mut self, m: &Msg) {
        let to = &self.peers[m.to];
        if m.via_sql {
            apply_sql(to, &m.changes);
        } else {
            // `apply` needs &mut; the peers vector owns the connections.
            let to = &mut self.peers[m.to];
            to.apply(&m.changes).unwrap();
        }
        let c = &mut self.cursor[m.to][m.from];
        if m.since <= *c {
            *c = (*c).max(m.until);
        }
    }

    fn run(&mut self, op: &Op) {
        match *op {
            Op::InsertT {
                peer,
                id,
                a,
                b,
                mode,
            } => {
                let verb = ["INSERT", "INSERT OR IGNORE", "INSERT OR REPLACE"][mode as usize];
                self.write(
                    peer,
                    &format!("{verb} INTO t VALUES ({id}, {}, {})", VALUES[a], VALUES[b]),
                );
            }
            Op::UpdateT { peer, id, col, v } => {
                let c = if col { "a" } else { "b" };
                self.write(
                    peer,
                    &format!("UPDATE t SET {c} = {} WHERE id = {id}", VALUES[v]),
                );
            }
            Op::DeleteT { peer, id } => self.write(peer, &format!("DELETE FROM t WHERE id = {id}")),
            Op::MoveT { peer, from, to } => {
                self.write(peer, &format!("UPDATE t SET id = {to} WHERE id = {from}"))
            }
            Op::UpsertC { peer, k1, k2, v } => self.write(
                peer,
                &format!(
                    "INSERT INTO c VALUES ({}, {k2}, {}) ON CONFLICT DO UPDATE SET v = excluded.v",
                    TEXT_KEYS[k1], VALUES[v]
                ),
            ),
            Op::DeleteC { peer, k1 } => {
                self.write(peer, &format!("DELETE FROM c WHERE k1 = {}", TEXT_KEYS[k1]))
            }
            Op::InsertP { peer, x, y } => {
                self.write(peer, &format!("INSERT OR IGNORE INTO p VALUES ({x}, {y})"))
            }
            Op::DeleteP { peer, x } => self.write(peer, &format!("DELETE FROM p WHERE x = {x}")),
            Op::WriteI { peer, id, v, kind } => {
                let sql = match kind {
                    0 => format!("INSERT OR REPLACE INTO i VALUES ({id}, {})", VALUES[v]),
                    1 => format!("UPDATE i SET v = {} WHERE id = {id}", VALUES[v]),
                    2 => format!("DELETE FROM i WHERE id = {id}"),
                    _ => format!("UPDATE i SET id = {} WHERE id = {id}", v % 5),
                };
                self.write(peer, &sql);
            }
            Op::Tx { peer, id, a, k1 } => {
                let tx = format!(
                    "BEGIN; INSERT OR REPLACE INTO t VALUES ({id}, {}, 'tx'); INSERT OR IGNORE INTO c VALUES ({}, 7, {}); COMMIT;",
                    VALUES[a], TEXT_KEYS[k1], VALUES[a]
                );
                if self.peers[peer].conn().execute_batch(&tx).is_err() {
                    let _ = self.peers[peer].conn().execute_batch("ROLLBACK");
                }
            }
            Op::Send {
                from,
                to,
                full,
                via_sql,
            } => self.send(from, to, full, via_sql),
            Op::Deliver { pick, twice } => {
                if !self.in_flight.is_empty() {
                    let m = self.in_flight.remove(pick % self.in_flight.len());
                    self.deliver(&m);
                    if twice {
                        self.deliver(&m);
                    }
                }
            }
            Op::Drop { pick } => {
                if !self.in_flight.is_empty() {
                    let i = pick % self.in_flight.len();
                    self.in_flight.remove(i);
                }
            }
        }
    }

    /// Delivers what is in flight, then pulls incrementally between every
    /// pair until nothing moves.
    fn settle(&mut self) {
        while let Some(m) = self.in_flight.pop() {
            self.deliver(&m);
        }
        let n = self.peers.len();
        for _round in 0..n + 1 {
            for to in 0..n {
                for from in 0..n {
                    self.send(from, to, false, false);
                    let m = self.in_flight.pop();
                    if let Some(m) = m {
                        self.deliver(&m);
                    }
                }
            }
        }
    }

    /// Rows, and per cell (col_version, cl[, site]), of one peer.
    fn state(&self, peer: usize, with_sites: bool) -> (Vec<String>, Vec<String>) {
        let d = &self.peers[peer];
        let mut data = rows(d, "SELECT 't', * FROM t ORDER BY id");
        data.extend(rows(d, "SELECT 'c', * FROM c ORDER BY k1, k2"));
        data.extend(rows(d, "SELECT 'p', * FROM p ORDER BY x, y"));
        data.extend(rows(d, "SELECT 'i', * FROM i ORDER BY id"));
        let site = if with_sites { "hex(site_id)" } else { "''" };
        // cr-sqlite ignores a cl-1 sentinel for a row that is alive at cl 1
        // through its cells alone, so whether such a row also has a cl-1
        // sentinel depends on delivery order; it changes nothing (its cl is 1
        // either way). PK-only rows always have theirs.
        let clocks = rows(
            d,
            &format!(
                "SELECT \"table\", hex(pk), cid, val, col_version, cl, {site} FROM crsql_changes
                 WHERE NOT (cid = '-1' AND col_version = 1 AND \"table\" != 'p') ORDER BY 1, 2, 3"
            ),
        );
        (data, clocks)
    }
}

fn check_convergence(n: usize, ops: &[Op], merge_equal_values: bool) -> Result<(), TestCaseError> {
    let mut w = World::new(n, merge_equal_values);
    for op in ops {
        w.run(op);
    }
    w.settle();
    let first = w.state(0, merge_equal_values);
    for i in 1..n {
        let other = w.state(i, merge_equal_values);
        prop_assert_eq!(&first.0, &other.0, "rows of peer 0 and peer {}", i);
        prop_assert_eq!(&first.1, &other.1, "clocks of peer 0 and peer {}", i);
    }
    Ok(())
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (3usize..=5).prop_flat_map(|n| (Just(n), prop::collection::vec(op(n), 1..120)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn peers_converge((n, ops) in scenario()) {
        check_convergence(n, &ops, false)?;
    }

    #[test]
    fn peers_converge_with_identical_site_ids_under_merge_equal_values((n, ops) in scenario()) {
        check_convergence(n, &ops, true)?;
    }
}
