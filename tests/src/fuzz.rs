//! The randomized convergence run of the interop test: several peers of
//! either kind ([`CrPeer`]) make random local writes and exchange
//! `crsql_changes` rows in random order, with drops and duplicates,
//! incrementally and in full, relayed through third peers; at the end every
//! peer must hold identical tables and identical clocks ([`Dump::diff`] under
//! [`TieRule`]).
//!
//! Everything random comes from one seed; the run keeps a log of every step
//! (the SQL of each write, the rows and order of each delivery) that is
//! printed with the seed when the peers do not converge.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use tenantsync_types::Value;

use crate::peer::{Clock, CrPeer, Dump, TieRule, dump, short_site};

/// The CRR schema every peer of a run gets: an integer pk with typed and
/// untyped columns, a composite pk declared in another order than its
/// columns (TEXT + untyped), a text pk, and a pk-only table.
pub const SCHEMA: &str = "
CREATE TABLE items (id INTEGER PRIMARY KEY NOT NULL, a, b, r REAL, n INTEGER);
SELECT crsql_as_crr('items');
CREATE TABLE pairs (k1 TEXT NOT NULL, k2 NOT NULL, v, w DEFAULT 'w0', PRIMARY KEY (k2, k1));
SELECT crsql_as_crr('pairs');
CREATE TABLE names (name TEXT PRIMARY KEY NOT NULL, note);
SELECT crsql_as_crr('names');
CREATE TABLE tags (x NOT NULL, y NOT NULL, PRIMARY KEY (x, y));
SELECT crsql_as_crr('tags');
";

/// Non-key values: every storage class, integers beyond 2^53 and at the i64
/// limits, integral and signed-zero REALs, extreme REALs, non-ASCII and empty
/// text, empty and binary blobs, text that an INTEGER column converts.
fn values() -> Vec<Value> {
    vec![
        Value::Null,
        Value::Integer(0),
        Value::Integer(1),
        Value::Integer(-7),
        Value::Integer((1 << 53) + 1),
        Value::Integer(i64::MIN),
        Value::Integer(i64::MAX),
        Value::Real(1.0),
        Value::Real(2.0),
        Value::Real(-0.0),
        Value::Real(2.5),
        Value::Real(1e300),
        Value::Real(5e-324),
        Value::Text("a".into()),
        Value::Text("b".into()),
        Value::Text("é日".into()),
        Value::Text(String::new()),
        Value::Text("1".into()),
        Value::Blob(vec![]),
        Value::Blob(vec![0x00, 0xff]),
    ]
}

/// One random run's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// Steps (a write or an exchange each).
    pub steps: usize,
    /// Per peer: may it run primary-key UPDATEs? (real cr-sqlite 0.16.0 loses
    /// column values on incremental sync after one, reference §8; tenantsync
    /// fixes that, so only tenantsync peers author them in the random runs).
    pub pk_updates: Vec<bool>,
}

/// A run in progress.
pub struct Run<'p> {
    peers: Vec<&'p dyn CrPeer>,
    sites: Vec<Vec<u8>>,
    /// cursors[dst][src]: the highest db_version of `src` that `dst` has
    /// received in a complete incremental or full pull.
    cursors: Vec<Vec<i64>>,
    rule: TieRule,
    rng: StdRng,
    config: Config,
    log: Vec<String>,
    values: Vec<Value>,
}

impl<'p> Run<'p> {
    /// Creates the schema on every peer.
    pub fn new(peers: Vec<&'p dyn CrPeer>, config: Config) -> Result<Self> {
        assert_eq!(peers.len(), config.pk_updates.len());
        let mut sites = Vec::new();
        for p in &peers {
            p.exec(SCHEMA)
                .with_context(|| format!("schema on {}", p.label()))?;
            sites.push(p.site()?);
        }
        let n = peers.len();
        let mut log = vec![format!("seed {}: peers", config.seed)];
        for (i, p) in peers.iter().enumerate() {
            log.push(format!(
                "  peer {i} = {} site {}",
                p.label(),
                hex::encode(&sites[i])
            ));
        }
        Ok(Run {
            peers,
            sites,
            cursors: vec![vec![0; n]; n],
            rule: TieRule::default(),
            rng: StdRng::seed_from_u64(config.seed),
            config,
            log,
            values: values(),
        })
    }

    /// The steps so far, one line each: the reproducer of a failing seed.
    pub fn log(&self) -> String {
        self.log.join("\n")
    }

    /// Runs the random steps, then the final exchanges, and compares every
    /// peer to peer 0. Errors carry the seed and the step log.
    pub fn run(mut self) -> Result<Summary> {
        let outcome = self.steps_and_compare();
        match outcome {
            Ok(summary) => Ok(summary),
            Err(e) => bail!(
                "{e:#}\n\nreproduce with TENANTSYNC_INTEROP_SEED={} (steps: {})\n{}",
                self.config.seed,
                self.config.steps,
                self.log()
            ),
        }
    }

    fn steps_and_compare(&mut self) -> Result<Summary> {
        for step in 0..self.config.steps {
            if self.rng.random_bool(0.6) {
                self.write(step)?;
            } else {
                self.exchange(step)?;
            }
        }
        // Two rounds of incremental pulls between every ordered pair deliver
        // everything: after the first, the last peer holds every change;
        // in the second, everyone pulls from it.
        let n = self.peers.len();
        for round in 0..2 {
            for dst in 0..n {
                for src in 0..n {
                    if src != dst {
                        self.pull(&format!("final{round}"), dst, src, Pull::Incremental)?;
                    }
                }
            }
        }
        let dumps = self
            .peers
            .iter()
            .map(|p| dump(*p))
            .collect::<Result<Vec<Dump>>>()?;
        let mut report = String::new();
        for i in 1..n {
            let diff = dumps[0].diff(&dumps[i], &self.rule);
            if !diff.is_empty() {
                writeln!(
                    report,
                    "peer 0 ({}) and peer {i} ({}) differ:\n  {}",
                    self.peers[0].label(),
                    self.peers[i].label(),
                    diff.join("\n  ")
                )?;
            }
        }
        if !report.is_empty() {
            bail!("the peers did not converge\n{report}");
        }
        // Converged peers are quiescent: delivering everything again (here
        // peer 1's full feed into peer 0) changes nothing.
        if n > 1 {
            self.pull("quiescence", 0, 1, Pull::Full)?;
            let again = dump(self.peers[0])?;
            let diff = dumps[0].diff(&again, &TieRule::default());
            let moved: Vec<String> = dumps[0]
                .clocks
                .iter()
                .zip(&again.clocks)
                .filter(|(a, b)| a.db_version != b.db_version || a.site_id != b.site_id)
                .map(|(a, b)| format!("{a} became {b}"))
                .collect();
            if !diff.is_empty() || !moved.is_empty() {
                bail!(
                    "re-delivering a converged feed changed peer 0:\n  {}\n  {}",
                    diff.join("\n  "),
                    moved.join("\n  ")
                );
            }
        }
        let rows = dumps[0].tables.values().map(|(_, r)| r.len()).sum();
        Ok(Summary {
            rows,
            clocks: dumps[0].clocks.len(),
            tie_differences: (1..n)
                .map(|i| {
                    let sites: BTreeMap<_, _> = dumps[i]
                        .clocks
                        .iter()
                        .map(|c| (c.key(), &c.site_id))
                        .collect();
                    dumps[0]
                        .clocks
                        .iter()
                        .filter(|c| sites.get(&c.key()).is_some_and(|s| **s != c.site_id))
                        .count()
                })
                .sum(),
        })
    }

    fn value(&mut self) -> Value {
        self.values.choose(&mut self.rng).expect("values").clone()
    }

    fn item_id(&mut self) -> i64 {
        *[1, 2, 3, 4, 5, 6, i64::MAX, -(1 << 53) - 1]
            .choose(&mut self.rng)
            .expect("ids")
    }

    fn pair_key(&mut self) -> (Value, Value) {
        let k1 = ["a", "b", "é", ""].choose(&mut self.rng).expect("k1");
        let k2 = [
            Value::Integer(1),
            Value::Integer(-1),
            Value::Real(2.5),
            Value::Text("z".into()),
            Value::Blob(vec![1]),
            Value::Integer((1 << 53) + 1),
        ]
        .choose(&mut self.rng)
        .expect("k2")
        .clone();
        (Value::Text((*k1).into()), k2)
    }

    fn name(&mut self) -> Value {
        Value::Text((*["x", "y", "日本", ""].choose(&mut self.rng).expect("names")).into())
    }

    fn tag(&mut self) -> (Value, Value) {
        let x = Value::Integer(self.rng.random_range(1..=3));
        let y = [
            Value::Integer(1),
            Value::Text("p".into()),
            Value::Blob(vec![0xff]),
            Value::Real(2.5),
        ]
        .choose(&mut self.rng)
        .expect("y")
        .clone();
        (x, y)
    }

    /// One random write statement.
    fn statement(&mut self, pk_updates: bool) -> String {
        match self.rng.random_range(0..20) {
            0 => {
                let id = self.item_id();
                let (a, b, r, n) = (self.value(), self.value(), self.value(), self.value());
                format!("INSERT OR IGNORE INTO items VALUES ({id}, {a}, {b}, {r}, {n})")
            }
            1 => {
                let id = self.item_id();
                let (a, b, r, n) = (self.value(), self.value(), self.value(), self.value());
                format!("INSERT OR REPLACE INTO items VALUES ({id}, {a}, {b}, {r}, {n})")
            }
            2 => {
                let id = self.item_id();
                let (a, b, r) = (self.value(), self.value(), self.value());
                format!(
                    "INSERT INTO items (id, a, b) VALUES ({id}, {a}, {b}) \
                     ON CONFLICT (id) DO UPDATE SET a = excluded.a, r = {r}"
                )
            }
            3 | 4 => {
                let id = self.item_id();
                let col = *["a", "b", "r", "n"].choose(&mut self.rng).expect("col");
                let v = self.value();
                format!("UPDATE items SET {col} = {v} WHERE id = {id}")
            }
            5 => {
                let id = self.item_id();
                let (a, n) = (self.value(), self.value());
                format!("UPDATE items SET a = {a}, n = {n} WHERE id = {id}")
            }
            6 => {
                let id = self.item_id();
                let b = self.value();
                format!("UPDATE items SET b = {b} WHERE id >= {id}")
            }
            7 => {
                let id = self.item_id();
                format!("DELETE FROM items WHERE id = {id}")
            }
            8 => {
                let id = self.item_id();
                format!("INSERT OR IGNORE INTO items (id) VALUES ({id})")
            }
            9 if pk_updates => {
                let (from, to) = (self.item_id(), self.item_id());
                format!("UPDATE OR IGNORE items SET id = {to} WHERE id = {from}")
            }
            9 | 10 => {
                let (k1, k2) = self.pair_key();
                let (v, w) = (self.value(), self.value());
                let verb = if self.rng.random_bool(0.5) {
                    "IGNORE"
                } else {
                    "REPLACE"
                };
                format!("INSERT OR {verb} INTO pairs VALUES ({k1}, {k2}, {v}, {w})")
            }
            11 => {
                let (k1, k2) = self.pair_key();
                let v = self.value();
                format!("INSERT OR IGNORE INTO pairs (k1, k2, v) VALUES ({k1}, {k2}, {v})")
            }
            12 => {
                let (k1, k2) = self.pair_key();
                let col = *["v", "w"].choose(&mut self.rng).expect("col");
                let v = self.value();
                format!("UPDATE pairs SET {col} = {v} WHERE k1 = {k1} AND k2 = {k2}")
            }
            13 => {
                let (k1, k2) = self.pair_key();
                if self.rng.random_bool(0.5) {
                    format!("DELETE FROM pairs WHERE k1 = {k1} AND k2 = {k2}")
                } else {
                    format!("DELETE FROM pairs WHERE k1 = {k1}")
                }
            }
            14 => {
                let name = self.name();
                let note = self.value();
                let verb = if self.rng.random_bool(0.5) {
                    "IGNORE"
                } else {
                    "REPLACE"
                };
                format!("INSERT OR {verb} INTO names VALUES ({name}, {note})")
            }
            15 => {
                let name = self.name();
                let note = self.value();
                format!("UPDATE names SET note = {note} WHERE name = {name}")
            }
            16 => {
                let name = self.name();
                format!("DELETE FROM names WHERE name = {name}")
            }
            17 => {
                let (x, y) = self.tag();
                let verb = if self.rng.random_bool(0.7) {
                    "IGNORE"
                } else {
                    "REPLACE"
                };
                format!("INSERT OR {verb} INTO tags VALUES ({x}, {y})")
            }
            18 => {
                let (x, y) = self.tag();
                if self.rng.random_bool(0.5) {
                    format!("DELETE FROM tags WHERE x = {x} AND y = {y}")
                } else {
                    format!("DELETE FROM tags WHERE x = {x}")
                }
            }
            _ => {
                // Resurrection: delete and re-create in one go.
                let id = self.item_id();
                let a = self.value();
                format!(
                    "DELETE FROM items WHERE id = {id}; INSERT INTO items (id, a) VALUES ({id}, {a})"
                )
            }
        }
    }

    /// A random local write on a random peer: one statement, a transaction
    /// of several (committed or rolled back), then records what it authored.
    fn write(&mut self, step: usize) -> Result<()> {
        let p = self.rng.random_range(0..self.peers.len());
        let pk = self.config.pk_updates[p];
        let sql = match self.rng.random_range(0..10) {
            0..=5 => self.statement(pk),
            6..=8 => {
                let k = self.rng.random_range(2..=4);
                let body: Vec<String> = (0..k).map(|_| self.statement(pk)).collect();
                format!("BEGIN; {}; COMMIT", body.join("; "))
            }
            _ => {
                let body = self.statement(pk);
                format!("BEGIN; {body}; ROLLBACK")
            }
        };
        self.log.push(format!("{step}: peer {p} exec {sql}"));
        let peer = self.peers[p];
        let before = peer.version()?;
        peer.exec(&sql)
            .with_context(|| format!("step {step}: peer {p} ({})", peer.label()))?;
        // What this write produced: the clock rows with a db_version above
        // the one before it. They carry this peer's site id, except cells a
        // primary-key UPDATE moved to the new key (they keep their author).
        let own = peer.changes("WHERE db_version > ?", &[Value::Integer(before)])?;
        for c in &own {
            self.rule.record_local(c);
        }
        Ok(())
    }

    /// A random delivery between two random peers.
    fn exchange(&mut self, step: usize) -> Result<()> {
        let n = self.peers.len();
        if n < 2 {
            return Ok(());
        }
        let src = self.rng.random_range(0..n);
        let mut dst = self.rng.random_range(0..n - 1);
        if dst >= src {
            dst += 1;
        }
        let mode = match self.rng.random_range(0..10) {
            0..=4 => Pull::Incremental,
            5 | 6 => Pull::IncrementalNotEcho,
            7 | 8 => Pull::Lossy,
            _ => Pull::Full,
        };
        self.pull(&step.to_string(), dst, src, mode)
    }

    /// `dst` pulls from `src`; the batch is shuffled, partly duplicated and
    /// (lossy pulls) partly dropped, and applied in one or more transactions.
    fn pull(&mut self, step: &str, dst: usize, src: usize, mode: Pull) -> Result<()> {
        let since = match mode {
            Pull::Full => 0,
            _ => self.cursors[dst][src],
        };
        let exclude = match mode {
            Pull::IncrementalNotEcho => Some(self.sites[dst].clone()),
            _ => None,
        };
        let rows = self.peers[src].feed(since, exclude.as_deref())?;
        let shipped_max = rows.iter().map(|c| c.db_version).max();
        let mut batch: Vec<Clock> = rows;
        if mode == Pull::Lossy {
            let keep = self.rng.random_range(0.3..0.9);
            batch.retain(|_| self.rng.random_bool(keep));
        }
        // Duplicates.
        let dups: Vec<Clock> = batch
            .iter()
            .filter(|_| self.rng.random_bool(0.1))
            .cloned()
            .collect();
        batch.extend(dups);
        let ordered = self.rng.random_bool(0.3);
        if !ordered {
            batch.shuffle(&mut self.rng);
        }
        let chunks = if batch.len() > 1 && self.rng.random_bool(0.3) {
            self.rng.random_range(2..=batch.len().min(4))
        } else {
            1
        };
        self.log.push(format!(
            "{step}: peer {dst} <- peer {src} {mode:?} since {since}{}: {} rows in {chunks} transaction(s){}",
            if ordered { "" } else { ", shuffled" },
            batch.len(),
            batch.iter().fold(String::new(), |mut s, c| {
                let _ = write!(s, "\n      {c}");
                s
            })
        ));
        let size = batch.len().div_ceil(chunks).max(1);
        for chunk in batch.chunks(size) {
            self.peers[dst].merge(chunk).with_context(|| {
                format!(
                    "step {step}: peer {dst} ({}) applying {} rows from peer {src}",
                    self.peers[dst].label(),
                    chunk.len()
                )
            })?;
        }
        if mode != Pull::Lossy
            && let Some(max) = shipped_max
        {
            self.cursors[dst][src] = self.cursors[dst][src].max(max);
        }
        Ok(())
    }

    /// The site ids of the peers, for messages.
    pub fn sites(&self) -> BTreeMap<String, usize> {
        self.sites
            .iter()
            .enumerate()
            .map(|(i, s)| (short_site(s), i))
            .collect()
    }
}

/// How a pull selects and delivers rows.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pull {
    /// `db_version > cursor`; the cursor advances to the highest db_version
    /// shipped.
    Incremental,
    /// `db_version > cursor AND site_id IS NOT <receiver>` (what the vlcn
    /// ws-server sends: no echo of the receiver's own writes).
    IncrementalNotEcho,
    /// A random subset of `db_version > cursor`, as if messages were lost;
    /// the cursor stays.
    Lossy,
    /// Everything (`db_version > 0`).
    Full,
}

/// What a converged run ended with.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// Live rows over all tables.
    pub rows: usize,
    /// Clock rows (crsql_changes rows) per peer.
    pub clocks: usize,
    /// Cells whose site id differs from peer 0's on some peer (equal-value
    /// ties, excused by [`TieRule`]).
    pub tie_differences: usize,
}
