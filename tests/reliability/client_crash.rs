//! Client crash: `tenantsync replica sync` (a child process) SIGKILLed while
//! it downloads or applies a large pull (20,000 rows), at delays growing
//! from 100 ms until a run completes. After every kill the replica file
//! holds all of a pull or none of it (its row count is the one before or the
//! one after), and the run that completes converges to the oracle. Then the
//! same again for a second large change: the completing run *resumes* from
//! the cursor persisted by the first phase (mode `resume`, not a refetch).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tenantsync_client::Replica;
use tenantsync_policy::Identity;

use crate::common::*;

const QUERY: &str = "SELECT * FROM todos";

fn count(db: &Path) -> i64 {
    if !db.exists() {
        return 0;
    }
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT count(*) FROM todos", [], |r| r.get(0))
        .unwrap_or(0)
}

/// Runs `replica sync` and kills it after `delays[k]`, for growing k, until
/// a run ends by itself; returns the completing run's JSON report, the
/// number of kills, and whether a killed run had committed the whole pull
/// already (killed between its commit and its exit). After each kill the
/// replica has `before` or `after` rows.
fn sync_through_kills(
    url: &str,
    tok: &str,
    db: &Path,
    before: i64,
    after: i64,
) -> (Json, usize, bool) {
    let mut kills = 0;
    let mut committed = false;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut child = Command::new(bin())
            .args(["replica", "sync", "--server", url, "--token", tok, "--db"])
            .arg(db)
            .args(["--subscribe", QUERY, "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() >= delay {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match finished {
            Some(status) => {
                let out = child.wait_with_output().unwrap();
                assert!(status.success(), "replica sync failed: {status:?}");
                let report: Json = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(count(db), after, "the completed run has every row");
                return (report, kills, committed);
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                let n = count(db);
                committed |= n == after;
                assert!(
                    n == before || n == after,
                    "after a kill at {delay:?} the replica has {n} rows: half a pull (before {before}, after {after})"
                );
                delay = delay.mul_f64(1.5);
            }
        }
    }
}

fn check_oracle(db: &Path, server_db: &Path, who: &Identity) {
    let policy_sql = std::fs::read_to_string(examples("policy.sql")).unwrap();
    let replica = Replica::open(db).unwrap();
    let st = tenantsync_verify::ReplicaState::read(&replica).unwrap();
    if let Some(d) = diff(&truth(server_db, &policy_sql), who, &st) {
        panic!("the replica differs from the oracle: {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_pull_keeps_all_or_nothing_and_resumes_from_its_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ServeSpec {
        db: dir.path().join("server.db"),
        schema: examples("schema.sql"),
        policy: examples("policy.sql"),
        synchronous: "normal",
    };
    let serve = Serve::start(&spec, 0);
    let url = serve.url();
    let http = reqwest::Client::new();
    let insert = |from: i64, to: i64| {
        format!(
            "INSERT INTO todos (id, tenant_id, owner, title) \
             WITH RECURSIVE k(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM k WHERE i < {to}) \
             SELECT i, 'acme', 'alice', 'row ' || i || ' {}' FROM k",
            "t".repeat(80)
        )
    };
    service_sql(&http, &url, &insert(1, 20_000)).await.unwrap();
    let cl = claims("alice", "acme");
    let tok = token(&cl);
    let who = Identity::new(cl);
    let db = dir.path().join("alice.db");

    let (url2, tok2, db2) = (url.clone(), tok.clone(), db.clone());
    let (report, kills1, committed) =
        tokio::task::spawn_blocking(move || sync_through_kills(&url2, &tok2, &db2, 0, 20_000))
            .await
            .unwrap();
    // The completing run took the snapshot, unless a killed run had
    // committed it (killed between commit and exit): then it resumes with
    // nothing new (found once by a clean-clone CI run).
    let part = &report["subscriptions"][0];
    if committed {
        assert_eq!(
            (&part["mode"], &part["rows_received"]),
            (&Json::from("resume"), &Json::from(0)),
            "{report}"
        );
    } else {
        assert_eq!(part["mode"], "snapshot", "{report}");
    }
    check_oracle(&db, &spec.db, &who);

    // A second large change: 10,000 new rows and 5,000 updated.
    service_sql(&http, &url, &insert(20_001, 30_000))
        .await
        .unwrap();
    service_sql(&http, &url, "UPDATE todos SET done = 1 WHERE id % 4 = 0")
        .await
        .unwrap();
    let (url2, tok2, db2) = (url.clone(), tok.clone(), db.clone());
    let (report, kills2, _) =
        tokio::task::spawn_blocking(move || sync_through_kills(&url2, &tok2, &db2, 20_000, 30_000))
            .await
            .unwrap();
    assert_eq!(
        report["subscriptions"][0]["mode"], "resume",
        "the persisted cursor is resumed: {report}"
    );
    check_oracle(&db, &spec.db, &who);
    eprintln!(
        "client crash: {kills1} kills during the first pull, {kills2} during the resumed one"
    );
    assert!(kills1 + kills2 >= 4, "too few kills: {kills1} + {kills2}");
    serve.stop();
}
