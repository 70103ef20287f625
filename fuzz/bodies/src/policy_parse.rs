//! Target `policy_parse`: arbitrary policy file text through
//! `PolicySet::parse`. The first byte picks the schema (the examples'
//! todo-list schema, the differential test's typed columns, one with
//! quoted, keyword and non-ASCII names and composite BLOB/TEXT keys, an
//! empty one); the rest is the file (lossy UTF-8).
//!
//! Properties:
//! - parsing never panics and ends (libFuzzer's `-timeout` catches hangs);
//! - a refused file has at least one diagnostic, each at an in-range
//!   1-based line and column whose byte offset is the start of its
//!   underlined range, which lies inside the file on character
//!   boundaries; the rendered diagnostics never panic;
//! - an accepted file works: for every CRR and a few identities,
//!   `SELECT * FROM <crr>` rewrites, its snapshot, delta and membership SQL
//!   run on a real core database with the schema, and write plans check
//!   rows without error.

use std::cell::RefCell;

use tenantsync_core::CrrConnection;
use tenantsync_policy::{Diagnostics, Engine, Identity, MembershipResults, PolicySet, Schema};
use tenantsync_types::Value;

use crate::sql::{core_db, policy_schema, query};

/// The schemas a policy file is checked against.
pub const SCHEMAS: &[&str] = &[
    concat!(
        include_str!("../../../examples/schema.sql"),
        "
INSERT INTO lists VALUES (1, 't1', 'alice', 'a'), (2, 't2', 'bob', 'b');
INSERT INTO members VALUES (1, 'bob', 't1'), (2, 'alice', 't2');
INSERT INTO todos VALUES (1, 't1', 1, 'alice', 'x', 0, 1), (2, 't2', 2, 'bob', 'y', 1, NULL);
"
    ),
    "
CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, a INTEGER, b TEXT, c REAL, d NUMERIC, e, tenant TEXT);
CREATE TABLE m (k INTEGER PRIMARY KEY NOT NULL, v TEXT, w INTEGER, tenant TEXT);
SELECT crsql_as_crr('t');
SELECT crsql_as_crr('m');
INSERT INTO t VALUES (1, 1, 'a', 1.5, '2', x'61', 't1'), (2, NULL, '1', -0.0, 'x', 3, 't2');
INSERT INTO m VALUES (1, 'a', 1, 't1'), (2, 'u1', 2, 't2');
",
    "
CREATE TABLE \"Order\" (\"select\" INTEGER PRIMARY KEY NOT NULL, \"from\" TEXT, \"my col\" TEXT, \"é\" INTEGER);
CREATE TABLE docs (org TEXT NOT NULL, id BLOB NOT NULL, body, score REAL, PRIMARY KEY (org, id));
CREATE TABLE acl (doc BLOB NOT NULL, usr TEXT NOT NULL, lvl INTEGER DEFAULT 1, PRIMARY KEY (usr, doc));
CREATE TABLE plain (k TEXT PRIMARY KEY, v);
SELECT crsql_as_crr('Order');
SELECT crsql_as_crr('docs');
SELECT crsql_as_crr('acl');
INSERT INTO \"Order\" VALUES (1, 'a', 'b', 3);
INSERT INTO docs VALUES ('o1', x'01', 'hello', 0.5), ('o2', x'', NULL, NULL);
INSERT INTO acl VALUES (x'01', 'alice', 2);
",
    "",
];

/// Identities every accepted file is rewritten for.
const IDENTITIES: &[&str] = &[
    r#"{"sub":"alice","role":"authenticated","tenant_id":"t1","tenant":"t1","org":"o1"}"#,
    r#"{"sub":"bob","role":"r1","tenant_id":"t2","n":7}"#,
    r#"{}"#,
    r#"{"sub":"x' OR '1'='1","role":"service_role","tenant_id":null,"n":[1,2]}"#,
];

struct Fixture {
    db: CrrConnection,
    schema: Schema,
}

thread_local! {
    static FIXTURES: RefCell<Vec<Fixture>> = RefCell::new(
        SCHEMAS
            .iter()
            .map(|s| {
                let db = core_db(1, s);
                let schema = policy_schema(&db);
                Fixture { db, schema }
            })
            .collect(),
    );
}

/// The target's body.
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    FIXTURES.with(|f| {
        let fixtures = f.borrow();
        let fx = &fixtures[usize::from(which) % fixtures.len()];
        match PolicySet::parse("fuzz.sql", &text, &fx.schema) {
            Err(d) => check_diagnostics(&d),
            Ok(set) => check_accepted(fx, set),
        }
    });
}

/// Byte offset of a 1-based (line, column in characters) position, allowing
/// one column past the end of a line; `None` when out of range.
fn offset_of(source: &str, line: usize, column: usize) -> Option<usize> {
    let mut start = 0;
    for (i, l) in source.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            let text = l.strip_suffix('\n').unwrap_or(l);
            let chars = text.chars().count();
            if column == 0 || column > chars + 1 {
                return None;
            }
            return Some(
                start
                    + text
                        .char_indices()
                        .nth(column - 1)
                        .map_or(text.len(), |(b, _)| b),
            );
        }
        start += l.len();
    }
    // The empty last line after a final newline (or of an empty file).
    let lines = source.split_inclusive('\n').count();
    (line == lines + 1 && column == 1 && (source.is_empty() || source.ends_with('\n')))
        .then_some(source.len())
}

fn check_diagnostics(d: &Diagnostics) {
    let src = &d.source;
    assert!(!d.items.is_empty(), "refused without a diagnostic:\n{src}");
    for item in &d.items {
        let at = offset_of(src, item.line, item.column).unwrap_or_else(|| {
            panic!(
                "diagnostic at {}:{} is outside the file: {}\n{src:?}",
                item.line, item.column, item.message
            )
        });
        let r = &item.range;
        assert!(
            r.start <= r.end
                && r.end <= src.len()
                && src.is_char_boundary(r.start)
                && src.is_char_boundary(r.end),
            "diagnostic range {r:?} ({}) is not inside the file\n{src:?}",
            item.message
        );
        assert_eq!(
            at, r.start,
            "diagnostic {}:{} ({}) underlines from byte {} instead\n{src:?}",
            item.line, item.column, item.message, r.start
        );
        assert!(!item.message.is_empty(), "empty diagnostic message");
    }
    let _ = d.to_string();
    let _ = d.summary_lines();
}

fn check_accepted(fx: &Fixture, set: PolicySet) {
    let engine = Engine::new(set);
    let conn = fx.db.conn();
    for claims in IDENTITIES {
        let id = Identity::from_json(claims).expect("fixed claims parse");
        for t in fx.schema.tables.iter().filter(|t| t.is_crr) {
            let sql = format!("SELECT * FROM \"{}\"", t.name);
            let q = engine
                .rewrite(&id, &sql)
                .unwrap_or_else(|e| panic!("an accepted file refuses {sql}: {e}"));
            let run = |what: &str, sql: &str, params: &[Value]| {
                query(conn, sql, params).unwrap_or_else(|e| {
                    panic!("{what} of an accepted file fails in SQLite: {e}\n{sql}\n{params:?}")
                })
            };
            let rows = run("snapshot SQL", &q.snapshot_sql, &q.params);
            let mut delta_params = q.params.clone();
            delta_params.push(Value::Integer(0));
            run("delta SQL", &q.delta_sql, &delta_params);
            let mut ms = MembershipResults::new();
            for m in &q.memberships {
                let vals = run("membership SQL", &m.sql, &m.params);
                if m.direct {
                    ms.insert(m.id, m.set(vals.into_iter().map(|mut r| r.remove(0))));
                }
            }
            let all = run("reading the table", &sql, &[]);
            let visible = all.iter().filter(|r| q.matches(r, &ms)).count();
            assert_eq!(
                visible,
                rows.len(),
                "the evaluator and SQLite disagree on {sql}\n{}",
                q.snapshot_sql
            );
            let plan = engine
                .write_plan(&id, &t.name)
                .unwrap_or_else(|e| panic!("no write plan for CRR {}: {e}", t.name));
            let mut wms = MembershipResults::new();
            for m in &plan.memberships {
                let vals = run("write membership SQL", &m.sql, &m.params);
                if m.direct {
                    wms.insert(m.id, m.set(vals.into_iter().map(|mut r| r.remove(0))));
                }
            }
            let pairs: Vec<_> = all
                .iter()
                .flat_map(|r| {
                    [
                        (None, Some(r.as_slice())),
                        (Some(r.as_slice()), Some(r.as_slice())),
                        (Some(r.as_slice()), None),
                    ]
                })
                .collect();
            let decisions = plan
                .check(&pairs, &wms)
                .unwrap_or_else(|e| panic!("write check on {}: {e}", t.name));
            assert_eq!(decisions.len(), pairs.len());
        }
    }
}
