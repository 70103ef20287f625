//! The replica's behaviour against real core databases: a second
//! `CrrConnection` plays the server's database, and its real changes
//! (`changes`, `row_changes`) are fed to the replica as the protocol's
//! messages.

use std::collections::BTreeMap;

use anyhow::Result;
use tenantsync_client::{QuarantineReason, Replica, SubscriptionChange};
use tenantsync_core::{
    Change, ChangesQuery, CrrConnection, MergeStamping, Options, PackedPk, Value,
};
use tenantsync_protocol::http::{PullPart, PullResponse};
use tenantsync_protocol::ws::{PushRefusal, RefusedRow};
use tenantsync_protocol::{ErrorCode, RowKey, SubPart, SubscribeMode};

const SCHEMA: &str = "
    CREATE TABLE todos (id INTEGER PRIMARY KEY NOT NULL, list_id INTEGER, title TEXT, done INTEGER NOT NULL DEFAULT 0);
    SELECT crsql_as_crr('todos');";

/// The server's database: a real core database, stamping merges with its
/// own versions as the server does.
struct Server {
    db: CrrConnection,
}

impl Server {
    fn new() -> Result<Server> {
        let db = CrrConnection::open_with(
            ":memory:",
            Options {
                merge_stamping: MergeStamping::Local,
                ..Options::default()
            },
        )?;
        db.conn().execute_batch(SCHEMA)?;
        Ok(Server { db })
    }

    /// Runs SQL in one transaction; returns the new server version.
    fn exec(&self, sql: &str) -> Result<i64> {
        self.db
            .conn()
            .execute_batch(&format!("BEGIN; {sql}; COMMIT"))?;
        Ok(self.db.db_version()?)
    }

    fn version(&self) -> i64 {
        self.db.db_version().unwrap()
    }

    /// Whole rows, every clock (what a row entering a view gets).
    fn rows(&self, ids: &[i64]) -> Vec<Change> {
        let pks: Vec<PackedPk> = ids.iter().map(|&i| pk(i)).collect();
        self.db.row_changes("todos", &pks).unwrap()
    }

    /// Every change in (since, until].
    fn delta(&self, since: i64, until: i64) -> Vec<Change> {
        self.db
            .changes(&ChangesQuery {
                since,
                until: Some(until),
                ..ChangesQuery::default()
            })
            .unwrap()
    }
}

fn pk(id: i64) -> PackedPk {
    PackedPk::pack(&[Value::Integer(id)]).unwrap()
}

fn key(id: i64) -> RowKey {
    RowKey {
        table: "todos".into(),
        pk: pk(id),
    }
}

fn new_replica() -> Result<Replica> {
    let mut r = Replica::open_in_memory()?;
    r.apply_schema(SCHEMA)?;
    Ok(r)
}

/// (id, title) of every todo in the replica.
fn todos(r: &Replica) -> Vec<(i64, String)> {
    let mut stmt = r
        .conn()
        .conn()
        .prepare("SELECT id, coalesce(title, '') FROM todos ORDER BY id")
        .unwrap();
    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(|x| x.unwrap())
        .collect()
}

fn ids(r: &Replica) -> Vec<i64> {
    todos(r).into_iter().map(|(i, _)| i).collect()
}

/// The ids a subscription holds.
fn held(r: &Replica, sub: &str) -> Vec<i64> {
    r.held(sub)
        .unwrap()
        .into_iter()
        .map(|k| match k.pk.unpack().unwrap()[0] {
            Value::Integer(i) => i,
            ref v => panic!("pk {v:?}"),
        })
        .collect()
}

fn cursor(r: &Replica, sub: &str) -> Option<i64> {
    r.subscription(sub).unwrap().unwrap().cursor
}

fn part(from: i64, changes: Vec<Change>, evict: Vec<RowKey>) -> SubPart {
    SubPart {
        from,
        changes,
        evict,
    }
}

fn parts(list: Vec<(&str, SubPart)>) -> BTreeMap<String, SubPart> {
    list.into_iter().map(|(s, p)| (s.to_owned(), p)).collect()
}

/// What the replica holds: its rows and, per subscription, its held ids
/// and cursor.
#[track_caller]
fn check(r: &Replica, rows: &[(i64, &str)], subs: &[(&str, &[i64], Option<i64>)]) {
    let expected: Vec<(i64, String)> = rows.iter().map(|(i, t)| (*i, t.to_string())).collect();
    assert_eq!(todos(r), expected, "rows");
    for (sub, ids, c) in subs {
        assert_eq!(held(r, sub), ids.to_vec(), "held by {sub}");
        assert_eq!(cursor(r, sub), *c, "cursor of {sub}");
    }
}

/// A replica subscribed to `all` (every todo) and synced with the server's
/// rows 1..=3 at the server's version.
fn synced(server: &Server) -> Result<Replica> {
    let mut r = new_replica()?;
    r.add_subscription("all", "SELECT * FROM todos")?;
    r.begin_sync("all", "todos")?;
    let v = server.version();
    r.apply_snapshot("all", v, true, server.rows(&[1, 2, 3]), vec![], true)?;
    Ok(r)
}

fn seeded() -> Result<Server> {
    let s = Server::new()?;
    s.exec(
        "INSERT INTO todos (id, list_id, title) VALUES (1, 1, 'milk'), (2, 1, 'bread'), (3, 2, 'tea')",
    )?;
    Ok(s)
}

#[test]
fn a_snapshot_is_applied_at_its_last_chunk() -> Result<()> {
    let server = seeded()?;
    let v = server.version();
    let mut r = new_replica()?;
    assert_eq!(
        r.add_subscription("all", "SELECT * FROM todos")?,
        SubscriptionChange::Added
    );
    r.begin_sync("all", "todos")?;
    let first = r.apply_snapshot("all", v, true, server.rows(&[1, 2]), vec![], false)?;
    assert!(first.is_none());
    check(&r, &[], &[("all", &[], None)]);
    let report = r
        .apply_snapshot("all", v, true, server.rows(&[3]), vec![], true)?
        .expect("applied at the last chunk");
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v))],
    );
    assert_eq!(report.parts[0].rows_received, 3);
    assert_eq!(report.cursors(), BTreeMap::from([("all".to_owned(), v)]));
    // The replica's clocks are the server's: same changes, site ids included.
    let mine = r.conn().row_changes("todos", &[pk(1)])?;
    let theirs = server.rows(&[1]);
    let strip = |c: &[Change]| -> Vec<(String, Value, i64, String)> {
        c.iter()
            .map(|c| {
                (
                    c.cid.clone(),
                    c.val.clone(),
                    c.col_version,
                    c.site_id.to_string(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&mine), strip(&theirs));
    // Server data is never pushed back.
    assert_eq!(r.next_push(1 << 20)?, None);
    Ok(())
}

#[test]
fn a_new_sync_drops_the_chunks_of_an_unfinished_one() -> Result<()> {
    let server = seeded()?;
    let v = server.version();
    let mut r = new_replica()?;
    r.add_subscription("all", "SELECT * FROM todos")?;
    r.begin_sync("all", "todos")?;
    r.apply_snapshot("all", v, true, server.rows(&[1, 2]), vec![], false)?;
    // The session dropped; the new sync delivers only row 3.
    r.begin_sync("all", "todos")?;
    r.apply_snapshot("all", v, true, server.rows(&[3]), vec![], true)?;
    check(&r, &[(3, "tea")], &[("all", &[3], Some(v))]);
    Ok(())
}

#[test]
fn a_reset_drops_the_rows_the_sync_did_not_deliver_without_a_delete() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v = server.version();
    // A refetch (reset) that no longer includes row 2.
    let report = r
        .apply_snapshot("all", v, true, server.rows(&[1, 3]), vec![], true)?
        .unwrap();
    check(&r, &[(1, "milk"), (3, "tea")], &[("all", &[1, 3], Some(v))]);
    assert_eq!(report.parts[0].rows_released, 1);
    assert_eq!(report.rows_removed, 1);
    // Removed without a delete: no clock of row 2 is left, nothing to push.
    assert!(r.conn().row_changes("todos", &[pk(2)])?.is_empty());
    assert_eq!(r.next_push(1 << 20)?, None);
    Ok(())
}

#[test]
fn a_resume_sync_evicts_and_keeps_what_it_says() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    let v = server.exec("UPDATE todos SET title = 'oat milk' WHERE id = 1")?;
    // Resume: the change of row 1 after the cursor, row 2 left.
    r.begin_sync("all", "todos")?;
    r.apply_snapshot("all", v, false, server.delta(v0, v), vec![key(2)], true)?;
    check(
        &r,
        &[(1, "oat milk"), (3, "tea")],
        &[("all", &[1, 3], Some(v))],
    );
    Ok(())
}

#[test]
fn an_eviction_keeps_a_row_another_subscription_holds() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    r.add_subscription("list1", "SELECT * FROM todos WHERE list_id = 1")?;
    r.begin_sync("list1", "todos")?;
    r.apply_snapshot("list1", v0, true, server.rows(&[1, 2]), vec![], true)?;
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v0)), ("list1", &[1, 2], Some(v0))],
    );
    // Row 1 moves to list 2: it leaves list1, stays in all.
    let v1 = server.exec("UPDATE todos SET list_id = 2 WHERE id = 1")?;
    let report = r
        .apply_changes(
            v1,
            parts(vec![
                ("all", part(v0, server.delta(v0, v1), vec![])),
                ("list1", part(v0, vec![], vec![key(1)])),
            ]),
            false,
        )?
        .unwrap();
    assert_eq!(report.rows_removed, 0);
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v1)), ("list1", &[2], Some(v1))],
    );
    // Then `all` lets go of row 2 too (e.g. a policy change): list1 still
    // holds it. And of row 1, which nobody holds any more: removed.
    let v2 = server.exec("UPDATE todos SET done = 1 WHERE id = 3")?;
    let report = r
        .apply_changes(
            v2,
            parts(vec![(
                "all",
                part(v1, server.delta(v1, v2), vec![key(1), key(2)]),
            )]),
            false,
        )?
        .unwrap();
    assert_eq!(report.rows_removed, 1);
    check(
        &r,
        &[(2, "bread"), (3, "tea")],
        &[("all", &[3], Some(v2)), ("list1", &[2], Some(v1))],
    );
    assert_eq!(r.next_push(1 << 20)?, None, "evictions never spread");
    Ok(())
}

/// A row that leaves every subscription while it has a local change the
/// server does not hold yet stays until the change is pushed and answered
/// (PROTOCOL.md §11 rule 6): the write goes up like any other, and the row
/// leaves (without a delete) once the push is acknowledged.
#[test]
fn evicting_a_row_with_unpushed_local_changes_keeps_it_until_they_are_pushed() -> Result<()> {
    let mut server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    r.conn()
        .conn()
        .execute("UPDATE todos SET title = 'soy milk' WHERE id = 1", [])?;
    let v1 = server.exec("UPDATE todos SET list_id = 9 WHERE id = 1")?;
    let report = r
        .apply_changes(
            v1,
            parts(vec![("all", part(v0, vec![], vec![key(1)]))]),
            false,
        )?
        .unwrap();
    assert_eq!(report.rows_removed, 0);
    assert!(
        ids(&r).contains(&1),
        "the row stays while its write is unpushed"
    );
    assert!(r.quarantine()?.is_empty());
    let batch = r.next_push(1 << 20)?.expect("the write goes up");
    assert_eq!(batch.changes.len(), 1);
    assert_eq!(batch.changes[0].val, Value::Text("soy milk".into()));
    server.db.apply(&batch.changes)?;
    let pushed = server.version();
    r.push_ok(batch.to, pushed)?;
    r.settle_pushed(pushed)?;
    check(
        &r,
        &[(2, "bread"), (3, "tea")],
        &[("all", &[2, 3], Some(v1))],
    );
    assert!(r.quarantine()?.is_empty());
    assert_eq!(r.next_push(1 << 20)?, None, "no delete of it is pushed");
    Ok(())
}

#[test]
fn deletes_spread_as_deletes_both_ways() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    r.add_subscription("list1", "SELECT * FROM todos WHERE list_id = 1")?;
    let v0 = server.version();
    r.apply_snapshot("list1", v0, true, server.rows(&[1, 2]), vec![], true)?;
    // The server deletes row 2: both subscriptions get the delete.
    let v1 = server.exec("DELETE FROM todos WHERE id = 2")?;
    let delete = server.delta(v0, v1);
    assert!(
        delete.iter().all(|c| c.cid == "-1" && c.cl == 2),
        "{delete:?}"
    );
    let report = r
        .apply_changes(v1, parts(vec![("all", part(v0, delete, vec![]))]), false)?
        .unwrap();
    assert_eq!(report.parts[0].rows_deleted, 1);
    // Deleted rows leave every subscription, and the tombstone stays.
    check(
        &r,
        &[(1, "milk"), (3, "tea")],
        &[("all", &[1, 3], Some(v1)), ("list1", &[1], Some(v0))],
    );
    let tomb = r.conn().row_changes("todos", &[pk(2)])?;
    assert_eq!(tomb.len(), 1);
    assert_eq!((tomb[0].cid.as_str(), tomb[0].cl), ("-1", 2));
    // A local delete is pushed as a delete.
    r.conn()
        .conn()
        .execute("DELETE FROM todos WHERE id = 3", [])?;
    let batch = r.next_push(1 << 20)?.expect("a delete to push");
    assert_eq!(batch.changes.len(), 1);
    assert_eq!(
        (batch.changes[0].cid.as_str(), batch.changes[0].cl),
        ("-1", 2)
    );
    server.db.merge_sql(&batch.changes)?;
    assert_eq!(server.db.row_values("todos", &pk(3))?, None);
    Ok(())
}

/// `apply` on a shared reference for the test server.
trait ApplyShared {
    fn merge_sql(&self, changes: &[Change]) -> Result<()>;
}

impl ApplyShared for CrrConnection {
    fn merge_sql(&self, changes: &[Change]) -> Result<()> {
        // INSERT INTO crsql_changes: the SQL surface merges like `apply`.
        let mut stmt = self
            .conn()
            .prepare("INSERT INTO crsql_changes VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")?;
        self.conn().execute_batch("BEGIN")?;
        for c in changes {
            stmt.execute(rusqlite::params_from_iter(c.sql_params()))?;
        }
        self.conn().execute_batch("COMMIT")?;
        Ok(())
    }
}

#[test]
fn a_part_that_starts_after_the_cursor_is_a_gap_and_changes_nothing() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    let v1 = server.exec("UPDATE todos SET title = 'a' WHERE id = 1")?;
    let v2 = server.exec("UPDATE todos SET title = 'b' WHERE id = 2")?;
    // (v1, v2] arrives without (v0, v1]: a gap.
    let report = r
        .apply_changes(
            v2,
            parts(vec![("all", part(v1, server.delta(v1, v2), vec![]))]),
            false,
        )?
        .unwrap();
    assert!(report.parts.is_empty());
    assert_eq!(report.gaps.len(), 1);
    assert_eq!((report.gaps[0].cursor, report.gaps[0].from), (Some(v0), v1));
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v0))],
    );
    // The resync brings (v0, v2]; the late (v0, v1] is then a duplicate.
    r.apply_changes(
        v2,
        parts(vec![("all", part(v0, server.delta(v0, v2), vec![]))]),
        false,
    )?;
    let late = r
        .apply_changes(
            v1,
            parts(vec![("all", part(v0, server.delta(v0, v1), vec![]))]),
            false,
        )?
        .unwrap();
    assert_eq!(late.stale, vec!["all".to_owned()]);
    check(
        &r,
        &[(1, "a"), (2, "b"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v2))],
    );
    // A part of a subscription the replica does not have is skipped.
    let other = r
        .apply_changes(
            v2 + 1,
            parts(vec![("gone", part(v2, vec![], vec![]))]),
            false,
        )?
        .unwrap();
    assert_eq!(other.unknown, vec!["gone".to_owned()]);
    Ok(())
}

#[test]
fn a_checkpoint_with_more_is_applied_whole_with_its_last_message() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    let v1 = server.exec(
        "UPDATE todos SET title = 'x' WHERE id = 1; UPDATE todos SET title = 'y' WHERE id = 2",
    )?;
    let delta = server.delta(v0, v1);
    let (a, b) = delta.split_at(1);
    let first = r.apply_changes(v1, parts(vec![("all", part(v0, a.to_vec(), vec![]))]), true)?;
    assert!(first.is_none());
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v0))],
    );
    let report = r
        .apply_changes(
            v1,
            parts(vec![("all", part(v0, b.to_vec(), vec![]))]),
            false,
        )?
        .unwrap();
    assert_eq!(report.parts[0].changes, 2);
    check(
        &r,
        &[(1, "x"), (2, "y"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v1))],
    );
    // A message of another version while a checkpoint is incomplete is a
    // protocol error; the incomplete checkpoint is dropped.
    r.apply_changes(v1 + 1, parts(vec![("all", part(v1, vec![], vec![]))]), true)?;
    let err = r
        .apply_changes(
            v1 + 2,
            parts(vec![("all", part(v1, vec![], vec![]))]),
            false,
        )
        .unwrap_err();
    assert!(err.to_string().contains("was incomplete"), "{err}");
    Ok(())
}

#[test]
fn an_empty_part_only_advances_the_cursor() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    r.apply_changes(
        v0 + 10,
        parts(vec![("all", part(v0, vec![], vec![]))]),
        false,
    )?;
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v0 + 10))],
    );
    Ok(())
}

#[test]
fn a_failed_apply_changes_nothing() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    let v1 = server.exec("UPDATE todos SET title = 'z' WHERE id = 1")?;
    let mut bad = server.delta(v0, v1);
    let mut unknown = bad[0].clone();
    unknown.table = "nope".into();
    bad.push(unknown);
    let err = r
        .apply_changes(v1, parts(vec![("all", part(v0, bad, vec![key(2)]))]), false)
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v0))],
    );
    Ok(())
}

/// `n` local transactions, each inserting one todo, ids from `first`.
fn local_txs(r: &Replica, first: i64, n: i64) -> Result<()> {
    for i in 0..n {
        r.conn().conn().execute(
            "INSERT INTO todos (id, list_id, title) VALUES (?1, 1, ?2)",
            rusqlite::params![first + i, format!("local {i} {}", "x".repeat(100))],
        )?;
    }
    Ok(())
}

#[test]
fn pushes_are_whole_transactions_in_order_under_the_byte_limit() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    local_txs(&r, 100, 3)?;
    let one = r.next_push(1 << 20)?.unwrap();
    assert_eq!(one.transactions, 3);
    let per_tx = one.bytes / 3;
    r.push_abandoned();
    // Room for two transactions: the first push holds two, ends at the
    // second's version; the next one starts there.
    let limit = tenantsync_client::replica::PUSH_OVERHEAD + per_tx * 2 + per_tx / 2;
    let a = r.next_push(limit)?.unwrap();
    assert_eq!((a.from, a.transactions), (0, 2));
    let versions: Vec<i64> = a.changes.iter().map(|c| c.db_version).collect();
    assert!(versions.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(a.to, *versions.last().unwrap());
    assert!(a.changes.iter().all(|c| c.site_id == r.site_id()));
    r.push_ok(a.to, 0)?;
    assert_eq!(r.pushed_version()?, a.to);
    let b = r.next_push(limit)?.unwrap();
    assert_eq!((b.from, b.transactions), (a.to, 1));
    assert!(
        b.changes
            .iter()
            .all(|c| c.db_version > a.to && c.db_version <= b.to)
    );
    r.push_ok(b.to, 0)?;
    assert_eq!(r.next_push(limit)?, None);
    assert!(!r.has_unpushed()?);
    // A transaction over the limit cannot be pushed.
    local_txs(&r, 200, 1)?;
    let err = r
        .next_push(tenantsync_client::replica::PUSH_OVERHEAD + 10)
        .unwrap_err();
    assert!(err.to_string().contains("over the push limit"), "{err}");
    Ok(())
}

#[test]
fn a_gap_answer_makes_the_replica_push_again_from_the_servers_version() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    local_txs(&r, 100, 2)?;
    let a = r.next_push(1 << 20)?.unwrap();
    r.push_ok(a.to, 0)?;
    assert_eq!(r.next_push(1 << 20)?, None);
    // The server lost what it had of this replica (restored from a backup):
    // it says pushed_version 0; everything is pushed again.
    r.set_pushed_version(0, 0)?;
    let again = r.next_push(1 << 20)?.unwrap();
    assert_eq!(again.from, 0);
    assert_eq!(again.changes, a.changes);
    Ok(())
}

#[test]
fn changes_that_came_from_the_server_are_never_pushed_again() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    // The replica writes row 7 and pushes it; the server applies it.
    r.conn().conn().execute(
        "INSERT INTO todos (id, list_id, title) VALUES (7, 1, 'mine')",
        [],
    )?;
    let batch = r.next_push(1 << 20)?.unwrap();
    server.db.merge_sql(&batch.changes)?;
    r.push_ok(batch.to, 0)?;
    // Row 7 enters `all` (sent whole even though this replica wrote it:
    // so that the subscription holds it); equal clocks, nothing re-stamped.
    let v0 = cursor(&r, "all").unwrap();
    let v1 = server.version();
    let entered = r
        .apply_changes(
            v1,
            parts(vec![("all", part(v0, server.rows(&[7]), vec![]))]),
            false,
        )?
        .unwrap();
    assert_eq!(entered.merged.applied, 0);
    assert_eq!(held(&r, "all"), vec![1, 2, 3, 7]);
    // Then it leaves, and comes back whole: now its clocks, which carry this
    // replica's site id, are re-stamped with new local versions by the merge.
    let v2 = server.exec("UPDATE todos SET done = 1 WHERE id = 3")?;
    r.apply_changes(
        v2,
        parts(vec![("all", part(v1, vec![], vec![key(7)]))]),
        false,
    )?;
    assert_eq!(ids(&r), vec![1, 2, 3]);
    let v3 = server.exec("UPDATE todos SET done = 1 WHERE id = 2")?;
    r.apply_changes(
        v3,
        parts(vec![("all", part(v2, server.rows(&[7]), vec![]))]),
        false,
    )?;
    assert_eq!(ids(&r), vec![1, 2, 3, 7]);
    let own_after = r.conn().changes(&ChangesQuery {
        since: batch.to,
        site: tenantsync_core::SiteFilter::Only(r.site_id()),
        ..ChangesQuery::default()
    })?;
    assert!(
        !own_after.is_empty(),
        "the merge re-stamped this site's clocks"
    );
    assert_eq!(r.next_push(1 << 20)?, None);
    assert!(!r.has_unpushed()?);
    // A local write after it is pushed, alone.
    r.conn()
        .conn()
        .execute("UPDATE todos SET title = 'mine, edited' WHERE id = 7", [])?;
    let next = r.next_push(1 << 20)?.unwrap();
    assert_eq!(next.changes.len(), 1);
    assert_eq!(next.changes[0].val, Value::Text("mine, edited".into()));
    Ok(())
}

fn refusal(
    batch_to: i64,
    rows: Vec<RefusedRow>,
    state: Vec<Change>,
    invisible: Vec<RowKey>,
) -> PushRefusal {
    PushRefusal {
        id: "p1".into(),
        code: ErrorCode::PolicyRefused,
        message: "refused by write policies".into(),
        rows,
        state,
        invisible,
        pushed_version: batch_to,
    }
}

fn refused_row(id: i64, command: &str) -> RefusedRow {
    RefusedRow {
        table: "todos".into(),
        pk: pk(id),
        command: command.into(),
        policy: Some("todos_same_tenant".into()),
        reason: "restrictive policy todos_same_tenant failed".into(),
    }
}

#[test]
fn a_refused_push_is_quarantined_and_the_rows_restored_to_the_servers_state() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    r.conn().conn().execute_batch(
        "BEGIN;
         UPDATE todos SET title = 'hijacked' WHERE id = 1;
         INSERT INTO todos (id, list_id, title) VALUES (9, 5, 'elsewhere');
         COMMIT;",
    )?;
    let batch = r.next_push(1 << 20)?.unwrap();
    let pushed = batch.changes.clone();
    // A later local write to row 1, while the push is in flight.
    r.conn()
        .conn()
        .execute("UPDATE todos SET done = 1 WHERE id = 1", [])?;
    let refused = refusal(
        batch.to,
        vec![refused_row(1, "UPDATE"), refused_row(9, "INSERT")],
        server.rows(&[1]),
        vec![key(9)],
    );
    let report = r.push_refused(&batch, &refused)?;
    assert_eq!((report.restored, report.removed), (1, 1));
    assert!(report.refetch.is_empty());
    // Row 1 is exactly the server's again, with the server's clocks; row 9
    // is gone.
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(server.version()))],
    );
    let strip = |c: Vec<Change>| -> Vec<(String, Value, i64, String)> {
        let mut v: Vec<_> = c
            .into_iter()
            .map(|c| (c.cid, c.val, c.col_version, c.site_id.to_string()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(
        strip(r.conn().row_changes("todos", &[pk(1)])?),
        strip(server.rows(&[1]))
    );
    // Everything refused is in quarantine, with the server's reasons; the
    // later local change too.
    let q = r.quarantine()?;
    assert_eq!(q.len(), pushed.len() + 1);
    for c in &pushed {
        let e = q
            .iter()
            .find(|e| &e.change == c)
            .expect("pushed change quarantined");
        assert_eq!(e.reason, QuarantineReason::PushRefused);
        assert_eq!(e.code.as_deref(), Some("policy_refused"));
        assert_eq!(e.policy.as_deref(), Some("todos_same_tenant"));
        assert_eq!(e.push_range, Some((batch.from, batch.to)));
    }
    assert!(
        q.iter()
            .any(|e| e.change.cid == "done" && e.change.val == Value::Integer(1))
    );
    // The push is consumed; what the restore merged is not pushed.
    assert_eq!(r.pushed_version()?, batch.to);
    assert_eq!(r.next_push(1 << 20)?, None);
    Ok(())
}

/// Regression (issue 6, the isolation oracle): a refused row that the peer
/// may read but that none of its subscriptions holds was restored from the
/// refusal's `state` and then stayed in the replica, never updated again.
#[test]
fn a_refused_row_no_subscription_holds_is_removed_not_restored() -> Result<()> {
    let server = seeded()?;
    server.exec("INSERT INTO todos (id, list_id, title) VALUES (7, 9, 'theirs')")?;
    let mut r = synced(&server)?;
    r.conn().conn().execute(
        "INSERT INTO todos (id, list_id, title) VALUES (7, 9, 'mine')",
        [],
    )?;
    let batch = r.next_push(1 << 20)?.unwrap();
    // The peer may read row 7 (it is in `state`), but its only
    // subscription, `all`, never delivered it.
    let refused = refusal(
        batch.to,
        vec![refused_row(7, "UPDATE")],
        server.rows(&[7]),
        vec![],
    );
    let report = r.push_refused(&batch, &refused)?;
    assert_eq!((report.restored, report.removed), (1, 1));
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(server.version()))],
    );
    assert_eq!(r.quarantine()?.len(), batch.changes.len());
    assert_eq!(r.next_push(1 << 20)?, None);
    Ok(())
}

#[test]
fn rows_of_a_refused_push_the_server_did_not_describe_are_fetched_again() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    r.conn().conn().execute_batch(
        "BEGIN;
         UPDATE todos SET title = 'bad' WHERE id = 1;
         UPDATE todos SET title = 'fine' WHERE id = 2;
         COMMIT;",
    )?;
    let batch = r.next_push(1 << 20)?.unwrap();
    // The server names row 1 only; row 2 was refused with it (whole push).
    let refused = refusal(
        batch.to,
        vec![refused_row(1, "UPDATE")],
        server.rows(&[1]),
        vec![],
    );
    let report = r.push_refused(&batch, &refused)?;
    assert_eq!(report.refetch, vec!["all".to_owned()]);
    // Row 2 is removed locally (its server state is unknown here) and the
    // subscription needs a full sync, which brings it back exactly.
    check(&r, &[(1, "milk"), (3, "tea")], &[("all", &[1, 3], None)]);
    let q = r.quarantine()?;
    assert_eq!(q.len(), 2);
    let fine = q
        .iter()
        .find(|e| e.change.val == Value::Text("fine".into()))
        .unwrap();
    assert!(fine.detail.contains("refused whole"), "{}", fine.detail);
    assert_eq!(fine.policy, None);
    // Meanwhile live parts are gaps (no cursor), until the full sync.
    let v = server.version();
    let gap = r
        .apply_changes(v + 1, parts(vec![("all", part(v, vec![], vec![]))]), false)?
        .unwrap();
    assert_eq!(gap.gaps.len(), 1);
    r.begin_sync("all", "todos")?;
    r.apply_snapshot("all", v, true, server.rows(&[1, 2, 3]), vec![], true)?;
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v))],
    );
    assert_eq!(r.next_push(1 << 20)?, None);
    Ok(())
}

/// Regression (oracle seed 226): a row that leaves every subscription while
/// a push of its local changes is in flight stays until the answer. The
/// server may hold those changes and sends them back to no one (echo
/// filtering): had the row been dropped with them, an older snapshot could
/// bring it back without them, stale for good. Applied: the row settles
/// like any pushed row (nothing quarantined, nothing lost); refused: the
/// refusal's rules apply.
#[test]
fn an_eviction_during_a_push_in_flight_waits_for_the_answer() -> Result<()> {
    for applied in [true, false] {
        let mut server = seeded()?;
        let mut r = synced(&server)?;
        let v0 = server.version();
        r.conn()
            .conn()
            .execute("UPDATE todos SET title = 'in flight' WHERE id = 3", [])?;
        let batch = r.next_push(1 << 20)?.unwrap();
        // Row 3 leaves before the answer: it stays, held by nothing.
        let v1 = server.exec("UPDATE todos SET list_id = 8 WHERE id = 3")?;
        let report = r
            .apply_changes(
                v1,
                parts(vec![("all", part(v0, vec![], vec![key(3)]))]),
                false,
            )?
            .unwrap();
        assert_eq!(report.rows_removed, 0);
        assert!(ids(&r).contains(&3) && !held(&r, "all").contains(&3));
        if applied {
            server.db.apply(&batch.changes)?;
            r.push_ok(batch.to, server.version())?;
            assert_eq!(r.settle_pushed(server.version())?, 1);
        } else {
            let refused = refusal(
                batch.to,
                vec![refused_row(3, "UPDATE")],
                vec![],
                vec![key(3)],
            );
            r.push_refused(&batch, &refused)?;
            assert_eq!(r.quarantine()?.len(), 1, "the refused change");
        }
        assert_eq!(ids(&r), [1, 2], "applied: {applied}");
        if applied {
            assert!(r.quarantine()?.is_empty());
        }
        assert_eq!(r.next_push(1 << 20)?, None);
    }
    Ok(())
}

/// A replica subscribed to list 1 only, synced with rows 1 and 2.
fn on_list1(server: &Server, path: Option<&std::path::Path>) -> Result<Replica> {
    let mut r = match path {
        Some(p) => Replica::open(p)?,
        None => Replica::open_in_memory()?,
    };
    r.apply_schema(SCHEMA)?;
    r.add_subscription("list1", "SELECT * FROM todos WHERE list_id = 1")?;
    r.apply_snapshot(
        "list1",
        server.version(),
        true,
        server.rows(&[1, 2]),
        vec![],
        true,
    )?;
    Ok(r)
}

/// Regression (issue 6, oracle seed 6; the case left open in issue 4): a
/// row the client wrote where none of its subscriptions looks was never
/// delivered back, so nothing ever removed it; it stayed in the replica and
/// went stale. Now a replica holds what its subscriptions hold, its own
/// writes too: once the push is acknowledged and the deliveries of its
/// commit are in, the pushed rows no subscription took leave (no delete).
#[test]
fn a_pushed_row_no_subscription_holds_leaves_once_the_deliveries_are_in() -> Result<()> {
    let mut server = seeded()?;
    let mut r = on_list1(&server, None)?;
    let v0 = server.version();
    r.conn().conn().execute_batch(
        "INSERT INTO todos (id, list_id, title) VALUES (7, 9, 'elsewhere'), (8, 1, 'here');",
    )?;
    let batch = r.next_push(1 << 20)?.unwrap();
    server.db.apply(&batch.changes)?;
    let v1 = server.version();
    // On the WebSocket the commit's deliveries come first: row 8 entered
    // list 1 (every clock, not echo-filtered), row 7 entered nothing.
    r.apply_changes(
        v1,
        parts(vec![("list1", part(v0, server.rows(&[8]), vec![]))]),
        false,
    )?;
    r.push_ok(batch.to, v1)?;
    assert_eq!(r.unsettled()?.len(), 1, "row 7 waits to settle");
    assert_eq!(r.settle_pushed(v1)?, 1);
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (8, "here")],
        &[("list1", &[1, 2, 8], Some(v1))],
    );
    assert!(r.unsettled()?.is_empty());
    // The eviction spreads nothing.
    assert_eq!(r.next_push(1 << 20)?, None);
    // The server still has row 7: a later subscription brings it back.
    assert_eq!(server.rows(&[7]).len(), 3);
    Ok(())
}

/// Over HTTP the answer comes before the pull: the rows wait to settle
/// (across a restart too) until a pull at or after the push's server
/// version has been applied.
#[test]
fn pushed_rows_settle_at_the_next_pull_and_survive_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("replica.db");
    let mut server = seeded()?;
    let v0 = server.version();
    {
        let mut r = on_list1(&server, Some(&path))?;
        r.conn().conn().execute_batch(
            "INSERT INTO todos (id, list_id, title) VALUES (7, 9, 'elsewhere'), (8, 1, 'here');",
        )?;
        let batch = r.next_push(1 << 20)?.unwrap();
        server.db.apply(&batch.changes)?;
        r.push_ok(batch.to, server.version())?;
        // Nothing is removed before the deliveries are in.
        assert_eq!(ids(&r), [1, 2, 7, 8]);
    }
    let mut r = Replica::open(&path)?;
    assert_eq!(r.unsettled()?.len(), 2, "rows 7 and 8 wait to settle");
    let v1 = server.version();
    let report = r.apply_pull(&PullResponse {
        version: v1,
        pushed_version: 0,
        schema_version: 1,
        subs: BTreeMap::from([(
            "list1".to_owned(),
            PullPart {
                mode: SubscribeMode::Resume,
                from: v0,
                reset: false,
                changes: server.rows(&[8]),
                evict: vec![],
            },
        )]),
    })?;
    assert_eq!(report.rows_removed, 1);
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (8, "here")],
        &[("list1", &[1, 2, 8], Some(v1))],
    );
    assert!(r.unsettled()?.is_empty());
    Ok(())
}

/// Regression (oracle seed 122): the answer to a push was lost (the client
/// went offline right after sending it) and the server said at the next
/// `welcome` that it held the push: that acknowledgement must settle the
/// pushed rows too, or a row no subscription holds stays for good.
#[test]
fn a_push_acknowledged_by_the_next_welcome_settles_too() -> Result<()> {
    let mut server = seeded()?;
    let mut r = on_list1(&server, None)?;
    r.conn().conn().execute(
        "INSERT INTO todos (id, list_id, title) VALUES (7, 9, 'lost answer')",
        [],
    )?;
    let batch = r.next_push(1 << 20)?.unwrap();
    server.db.apply(&batch.changes)?;
    // The connection dropped before the answer.
    r.push_abandoned();
    let welcome_version = server.version();
    r.set_pushed_version(batch.to, welcome_version)?;
    assert_eq!(r.unsettled()?.len(), 1);
    assert_eq!(r.next_push(1 << 20)?, None, "nothing is pushed twice");
    // Once every subscription caught up past the welcome.
    assert_eq!(r.settle_pushed(welcome_version)?, 1);
    assert_eq!(ids(&r), [1, 2]);
    Ok(())
}

/// Regression (oracle seed 161): nothing settles while a subscription waits
/// for its full sync. Its snapshot may predate the push, and the server
/// sends the push's own changes to the rows of that snapshot echo-filtered:
/// a pushed row dropped before the snapshot came back without them, stale.
#[test]
fn pushed_rows_wait_for_every_full_sync_before_they_settle() -> Result<()> {
    let mut server = seeded()?;
    let mut r = on_list1(&server, None)?;
    server.exec("INSERT INTO todos (id, list_id, title) VALUES (7, 9, 'old')")?;
    let before_push = server.version();
    // A new subscription that will hold row 7, not synced yet; this
    // replica writes row 7 meanwhile (its value wins the tie on the server).
    r.add_subscription("all", "SELECT * FROM todos")?;
    r.conn().conn().execute(
        "INSERT INTO todos (id, list_id, title) VALUES (7, 9, 'zzz')",
        [],
    )?;
    let batch = r.next_push(1 << 20)?.unwrap();
    server.db.apply(&batch.changes)?;
    let v = server.version();
    r.push_ok(batch.to, v)?;
    assert_eq!(r.settle_pushed(v)?, 0, "`all` has no cursor yet");
    assert_eq!(ids(&r), [1, 2, 7]);
    // Its snapshot was read before the push: row 7 as it was.
    r.apply_snapshot(
        "all",
        before_push,
        true,
        server_rows_at(&server, &[1, 2, 3, 7], "old"),
        vec![],
        true,
    )?;
    assert_eq!(r.settle_pushed(v)?, 0, "row 7 is held now");
    assert!(r.unsettled()?.is_empty());
    assert!(
        todos(&r).contains(&(7, "zzz".to_owned())),
        "{:?}",
        todos(&r)
    );
    Ok(())
}

/// Regression (oracle seed 226): while a subscription waits for its full
/// sync, a row with a change of this site that leaves the others stays
/// (held by nothing) instead of being dropped: the pending snapshot may be
/// older than that change, which the server sends back to no one, so a
/// dropped row would come back without it. It settles once the syncs are
/// done.
#[test]
fn a_row_with_own_changes_is_not_dropped_while_a_full_sync_is_pending() -> Result<()> {
    let mut server = seeded()?;
    let mut r = synced(&server)?;
    let old = server.version();
    r.conn()
        .conn()
        .execute("UPDATE todos SET title = 'zzz' WHERE id = 3", [])?;
    let batch = r.next_push(1 << 20)?.unwrap();
    server.db.apply(&batch.changes)?;
    let pushed = server.version();
    r.push_ok(batch.to, pushed)?;
    // A second subscription is added (no cursor yet); row 3 leaves `all`.
    r.add_subscription("list2", "SELECT * FROM todos WHERE list_id = 2")?;
    let v = server.exec("UPDATE todos SET done = 1 WHERE id = 1")?;
    let report = r
        .apply_changes(
            v,
            parts(vec![("all", part(old, vec![], vec![key(3)]))]),
            false,
        )?
        .unwrap();
    assert_eq!(report.rows_removed, 0, "row 3 has a change of this site");
    assert!(ids(&r).contains(&3));
    // The snapshot of `list2` was read before the push: row 3 as it was.
    let before: Vec<Change> = server
        .rows(&[3])
        .into_iter()
        .map(|mut c| {
            if c.cid == "title" {
                c.val = Value::Text("tea".into());
                c.col_version = 1;
                c.site_id = server.db.site_id();
            }
            c
        })
        .collect();
    r.apply_snapshot("list2", old, true, before, vec![], true)?;
    assert_eq!(r.settle_pushed(v)?, 0);
    assert!(
        todos(&r).contains(&(3, "zzz".to_owned())),
        "{:?}",
        todos(&r)
    );
    assert_eq!(held(&r, "list2"), [3]);
    assert!(r.unsettled()?.is_empty());
    assert_eq!(r.next_push(1 << 20)?, None);
    Ok(())
}

/// The server's rows, with row 7's title as it was before the push (a
/// snapshot read earlier).
fn server_rows_at(server: &Server, ids: &[i64], title7: &str) -> Vec<Change> {
    server
        .rows(ids)
        .into_iter()
        .map(|mut c| {
            if c.pk == pk(7) && c.cid == "title" {
                c.val = Value::Text(title7.into());
                c.col_version = 1;
            }
            c
        })
        .collect()
}

/// A pushed row written again while its push was in flight keeps its place
/// until that write is acknowledged too (and nothing is quarantined: the
/// server gets the write).
#[test]
fn a_pushed_row_written_again_settles_with_its_last_push() -> Result<()> {
    let mut server = seeded()?;
    let mut r = on_list1(&server, None)?;
    r.conn().conn().execute(
        "INSERT INTO todos (id, list_id, title) VALUES (7, 9, 'one')",
        [],
    )?;
    let first = r.next_push(1 << 20)?.unwrap();
    r.conn()
        .conn()
        .execute("UPDATE todos SET title = 'two' WHERE id = 7", [])?;
    server.db.apply(&first.changes)?;
    r.push_ok(first.to, server.version())?;
    assert_eq!(r.settle_pushed(server.version())?, 0);
    assert_eq!(ids(&r), [1, 2, 7]);
    let second = r.next_push(1 << 20)?.unwrap();
    assert_eq!(second.changes.len(), 1);
    server.db.apply(&second.changes)?;
    r.push_ok(second.to, server.version())?;
    assert_eq!(r.settle_pushed(server.version())?, 1);
    assert_eq!(ids(&r), [1, 2]);
    assert!(r.quarantine()?.is_empty());
    let title: String =
        server
            .db
            .conn()
            .query_row("SELECT title FROM todos WHERE id = 7", [], |row| row.get(0))?;
    assert_eq!(title, "two");
    Ok(())
}

#[test]
fn unsubscribing_removes_the_rows_no_other_subscription_holds() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    r.add_subscription("list2", "SELECT * FROM todos WHERE list_id = 2")?;
    r.apply_snapshot("list2", v0, true, server.rows(&[3]), vec![], true)?;
    let report = r.remove_subscription("all")?;
    assert_eq!(report.rows_removed, 2);
    check(&r, &[(3, "tea")], &[("list2", &[3], Some(v0))]);
    assert!(r.subscription("all")?.is_none());
    assert!(r.remove_subscription("all").is_err());
    assert_eq!(r.next_push(1 << 20)?, None);
    Ok(())
}

#[test]
fn replacing_a_query_needs_a_full_sync_whose_reset_drops_the_old_rows() -> Result<()> {
    let server = seeded()?;
    let mut r = synced(&server)?;
    let v0 = server.version();
    assert_eq!(
        r.add_subscription("all", "SELECT * FROM todos")?,
        SubscriptionChange::Unchanged
    );
    assert_eq!(
        r.add_subscription("all", "SELECT * FROM todos WHERE list_id = 2")?,
        SubscriptionChange::Replaced
    );
    assert_eq!(cursor(&r, "all"), None);
    r.begin_sync("all", "todos")?;
    r.apply_snapshot("all", v0, true, server.rows(&[3]), vec![], true)?;
    check(&r, &[(3, "tea")], &[("all", &[3], Some(v0))]);
    Ok(())
}

#[test]
fn a_pull_answer_is_applied_in_one_transaction() -> Result<()> {
    let server = seeded()?;
    let mut r = new_replica()?;
    r.add_subscription("list1", "SELECT * FROM todos WHERE list_id = 1")?;
    r.add_subscription("list2", "SELECT * FROM todos WHERE list_id = 2")?;
    let v0 = server.version();
    let snapshot = |changes: Vec<Change>| PullPart {
        mode: SubscribeMode::Snapshot,
        from: 0,
        reset: true,
        changes,
        evict: vec![],
    };
    let resp = PullResponse {
        version: v0,
        pushed_version: 0,
        schema_version: 1,
        subs: BTreeMap::from([
            ("list1".to_owned(), snapshot(server.rows(&[1, 2]))),
            ("list2".to_owned(), snapshot(server.rows(&[3]))),
        ]),
    };
    let report = r.apply_pull(&resp)?;
    assert_eq!(report.parts.len(), 2);
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("list1", &[1, 2], Some(v0)), ("list2", &[3], Some(v0))],
    );
    // The next pull resumes: row 2 moves to list 2.
    let v1 = server.exec("UPDATE todos SET list_id = 2 WHERE id = 2")?;
    let resume = |changes: Vec<Change>, evict: Vec<RowKey>| PullPart {
        mode: SubscribeMode::Resume,
        from: v0,
        reset: false,
        changes,
        evict,
    };
    let resp = PullResponse {
        version: v1,
        pushed_version: 0,
        schema_version: 1,
        subs: BTreeMap::from([
            ("list1".to_owned(), resume(vec![], vec![key(2)])),
            ("list2".to_owned(), resume(server.rows(&[2]), vec![])),
        ]),
    };
    let report = r.apply_pull(&resp)?;
    assert_eq!(
        report.rows_removed, 0,
        "row 2 moved between subscriptions: kept"
    );
    check(
        &r,
        &[(1, "milk"), (2, "bread"), (3, "tea")],
        &[("list1", &[1], Some(v1)), ("list2", &[2, 3], Some(v1))],
    );
    // A resume part after the cursor is a gap: nothing of the answer
    // changes that subscription.
    let resp = PullResponse {
        version: v1 + 5,
        pushed_version: 0,
        schema_version: 1,
        subs: BTreeMap::from([(
            "list1".to_owned(),
            PullPart {
                from: v1 + 2,
                ..resume(vec![], vec![key(1)])
            },
        )]),
    };
    let report = r.apply_pull(&resp)?;
    assert_eq!(report.gaps.len(), 1);
    assert_eq!(cursor(&r, "list1"), Some(v1));
    assert_eq!(held(&r, "list1"), vec![1]);
    Ok(())
}

#[test]
fn cursors_held_rows_and_pushed_version_survive_reopening() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("replica.db");
    let server = seeded()?;
    let v0 = server.version();
    let site;
    {
        let mut r = Replica::open(&path)?;
        r.apply_schema(SCHEMA)?;
        site = r.site_id();
        r.add_subscription("all", "SELECT * FROM todos")?;
        r.apply_snapshot("all", v0, true, server.rows(&[1, 2, 3]), vec![], true)?;
        local_txs(&r, 100, 1)?;
        let b = r.next_push(1 << 20)?.unwrap();
        r.push_ok(b.to, 0)?;
        r.set_server_site_id(server.db.site_id())?;
    }
    let r = Replica::open(&path)?;
    assert_eq!(r.site_id(), site);
    assert!(!r.is_new()?);
    check(
        &r,
        &[
            (1, "milk"),
            (2, "bread"),
            (3, "tea"),
            (100, &format!("local 0 {}", "x".repeat(100))),
        ],
        &[("all", &[1, 2, 3], Some(v0))],
    );
    assert!(r.pushed_version()? > 0);
    assert!(!r.has_unpushed()?);
    assert_eq!(r.server_site_id()?, Some(server.db.site_id()));
    Ok(())
}

#[test]
fn a_crash_between_commit_and_ack_resumes_from_the_persisted_cursor() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("replica.db");
    let server = seeded()?;
    let v0 = server.version();
    let at_v0 = server.rows(&[1, 2, 3]);
    let v1 = server.exec("UPDATE todos SET title = 'one' WHERE id = 1")?;
    let v2 = server.exec("UPDATE todos SET title = 'two' WHERE id = 2")?;
    {
        let mut r = Replica::open(&path)?;
        r.apply_schema(SCHEMA)?;
        r.add_subscription("all", "SELECT * FROM todos")?;
        r.apply_snapshot("all", v0, true, at_v0, vec![], true)?;
        // Commit (v0, v1], then "crash" before the ack and before (v1, v2]
        // is read: the process ends here.
        r.apply_changes(
            v1,
            parts(vec![("all", part(v0, server.delta(v0, v1), vec![]))]),
            false,
        )?;
        // A staged, unfinished checkpoint is lost with the process.
        r.apply_changes(
            v2,
            parts(vec![("all", part(v1, server.delta(v1, v2), vec![]))]),
            true,
        )?;
    }
    let mut r = Replica::open(&path)?;
    // The cursor the client resubscribes with is the committed one.
    assert_eq!(cursor(&r, "all"), Some(v1));
    assert_eq!(todos(&r)[0], (1, "one".to_owned()));
    assert_eq!(todos(&r)[1], (2, "bread".to_owned()));
    // The server did not see the ack: it resumes from its own acked cursor
    // v0; the resume chunks repeat (v0, v1] (harmless) and bring (v1, v2].
    r.begin_sync("all", "todos")?;
    r.apply_snapshot("all", v2, false, server.delta(v0, v2), vec![], true)?;
    check(
        &r,
        &[(1, "one"), (2, "two"), (3, "tea")],
        &[("all", &[1, 2, 3], Some(v2))],
    );
    Ok(())
}

#[test]
fn a_new_replica_needs_the_schema() -> Result<()> {
    let mut r = Replica::open_in_memory()?;
    assert!(r.is_new()?);
    let err = r.apply_schema("CREATE TABLE broken (").unwrap_err();
    assert!(err.to_string().contains("schema script failed"), "{err}");
    assert!(r.is_new()?);
    r.apply_schema(SCHEMA)?;
    assert!(!r.is_new()?);
    assert!(r.conn().is_crr("todos")?);
    Ok(())
}
