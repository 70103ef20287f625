//! Isolation over real sockets, checked against the truth: every replica
//! against its policy and subscriptions evaluated on the server database
//! (`tenantsync_verify`), after moves by the filter column and by
//! the tenant, reconnects mid-stream, a policy reload by SIGHUP, and a
//! crash (SIGKILL) between pushes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tenantsync_client::SyncClient;
use tenantsync_policy::Identity;
use tenantsync_verify::{Check, Truth};

use super::{Serve, client, examples, rows, settled, token, write};

fn identity(sub: &str, tenant: &str) -> Identity {
    Identity::from_json(
        &json!({"sub": sub, "role": "authenticated", "tenant_id": tenant}).to_string(),
    )
    .unwrap()
}

/// Waits until every replica is exactly what its identity may see under
/// `policy` (at most 20 s); panics with the differences otherwise.
async fn verified(db: &Path, policy: &str, clients: &[(&SyncClient, Identity)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut bad = Vec::new();
        for (c, id) in clients {
            settled(c).await;
            let state = c
                .read(|r| Ok(tenantsync_verify::ReplicaState::read(r)))
                .await
                .unwrap()
                .unwrap();
            let truth = Truth::open(db, "policy.sql", policy).unwrap();
            let check: Check = truth.check_state(id, &state).unwrap();
            if !check.ok() {
                bad.push(format!("{:?}: {check}", id.claims()));
            }
        }
        if bad.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicas differ from the truth:\n{}",
            bad.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Service SQL over HTTP (`POST /v1/sql` with a service token).
async fn service_sql(serve: &Serve, sql: &str) {
    let tok = {
        let out = Command::new(super::bin())
            .args([
                "token",
                "--secret",
                super::SECRET,
                "--sub",
                "backend",
                "--role",
                "service",
            ])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/sql", serve.url()))
        .bearer_auth(tok)
        .json(&json!({"statements": [{"sql": sql, "params": []}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert!(
        status.is_success(),
        "{sql}: {status} {}",
        resp.text().await.unwrap()
    );
}

async fn has_todo(c: &SyncClient, id: i64) -> bool {
    !rows(c, &format!("SELECT id FROM todos WHERE id = {id}"))
        .await
        .is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_stay_isolated_through_moves_reconnects_and_a_policy_reload() {
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.sql");
    let policy = std::fs::read_to_string(examples("policy.sql")).unwrap();
    std::fs::write(&policy_path, &policy).unwrap();
    let db = dir.path().join("server.db");
    let serve = Serve::start_with_policy(&db, "127.0.0.1:0", &policy_path);
    service_sql(&serve, "INSERT INTO lists VALUES (1, 'acme', 'alice', 'a'), (2, 'acme', 'alice', 'b'), (3, 'globex', 'carol', 'c')").await;
    service_sql(
        &serve,
        "INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES
           (1, 'acme', 1, 'alice', 'one'), (2, 'acme', 1, 'alice', 'two'), (3, 'acme', 2, 'alice', 'three'),
           (10, 'globex', 3, 'carol', 'ten')",
    )
    .await;
    let alice = client(&serve, "alice", "acme");
    let list1 = client(&serve, "alice", "acme");
    let carol = client(&serve, "carol", "globex");
    alice
        .subscribe("todos", "SELECT * FROM todos")
        .await
        .unwrap();
    alice
        .subscribe("lists", "SELECT * FROM lists")
        .await
        .unwrap();
    list1
        .subscribe("l1", "SELECT * FROM todos WHERE list_id = 1")
        .await
        .unwrap();
    carol
        .subscribe("todos", "SELECT * FROM todos")
        .await
        .unwrap();
    carol
        .subscribe("lists", "SELECT * FROM lists")
        .await
        .unwrap();
    let all = || -> Vec<(&SyncClient, Identity)> {
        vec![
            (&alice, identity("alice", "acme")),
            (&list1, identity("alice", "acme")),
            (&carol, identity("carol", "globex")),
        ]
    };
    verified(&db, &policy, &all()).await;
    assert!(has_todo(&list1, 1).await && !has_todo(&list1, 3).await);

    // Move by the filter column: todo 1 leaves list 1 (evicted from the
    // one-list replica, still in alice's), todo 3 enters it whole.
    write(
        &alice,
        "UPDATE todos SET list_id = 2 WHERE id = 1; UPDATE todos SET list_id = 1 WHERE id = 3",
    )
    .await;
    verified(&db, &policy, &all()).await;
    assert!(!has_todo(&list1, 1).await && has_todo(&list1, 3).await);
    assert!(has_todo(&alice, 1).await);
    assert_eq!(
        rows(
            &list1,
            "SELECT title, owner, tenant_id FROM todos WHERE id = 3"
        )
        .await,
        vec![vec!["three".into(), "alice".into(), "acme".into()]]
    );

    // Move by the tenant (the backend reassigns todo 2 to globex, and its
    // owner): it leaves both acme replicas, evicted, not deleted: it is on
    // the server and arrives whole at carol.
    service_sql(
        &serve,
        "UPDATE todos SET tenant_id = 'globex', owner = 'carol', list_id = 3 WHERE id = 2",
    )
    .await;
    verified(&db, &policy, &all()).await;
    assert!(!has_todo(&alice, 2).await && !has_todo(&list1, 2).await);
    assert_eq!(
        rows(
            &carol,
            "SELECT id, tenant_id, list_id, owner, title, done FROM todos WHERE id = 2"
        )
        .await,
        vec![vec![
            2.into(),
            "globex".into(),
            3.into(),
            "carol".into(),
            "two".into(),
            0.into()
        ]]
    );
    // An eviction spreads nothing: alice's next write does not delete it.
    write(&alice, "UPDATE todos SET title = 'one!' WHERE id = 1").await;
    verified(&db, &policy, &all()).await;
    assert!(has_todo(&carol, 2).await);

    // Reconnects mid-stream: writes keep coming while the clients drop
    // their connections.
    for k in 0..20 {
        service_sql(
            &serve,
            &format!(
                "INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES ({}, 'acme', 1, 'alice', 'burst'), ({}, 'globex', 3, 'carol', 'burst')",
                100 + k,
                200 + k
            ),
        )
        .await;
        if k % 5 == 2 {
            alice.reconnect();
            list1.reconnect();
            carol.reconnect();
        }
    }
    verified(&db, &policy, &all()).await;

    // A policy reload by SIGHUP: done todos are hidden from everyone; the
    // rows leave the replicas as evictions, and come back when the policy
    // file is restored.
    write(&alice, "UPDATE todos SET done = 1 WHERE id IN (3, 100)").await;
    verified(&db, &policy, &all()).await;
    let hidden = format!(
        "{policy}\nCREATE POLICY hide_done ON todos AS RESTRICTIVE FOR SELECT TO authenticated USING (done = 0);\n"
    );
    std::fs::write(&policy_path, &hidden).unwrap();
    let hup = |serve: &Serve| {
        let pid = serve.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    hup(&serve);
    verified(&db, &hidden, &all()).await;
    assert!(!has_todo(&alice, 3).await && !has_todo(&list1, 100).await);
    assert!(has_todo(&list1, 101).await);
    std::fs::write(&policy_path, &policy).unwrap();
    hup(&serve);
    verified(&db, &policy, &all()).await;
    assert!(has_todo(&alice, 3).await && has_todo(&list1, 100).await);
    // Never a row of the other tenant, anywhere.
    for (c, tenant) in [(&alice, "acme"), (&list1, "acme"), (&carol, "globex")] {
        let other = rows(
            c,
            &format!("SELECT count(*) FROM todos WHERE tenant_id <> '{tenant}'"),
        )
        .await;
        assert_eq!(other, vec![vec![0.into()]]);
    }
    for c in [alice, list1, carol] {
        c.close().await.unwrap();
    }
    serve.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_pushes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let serve = Serve::start(&db, "127.0.0.1:0");
    let policy = std::fs::read_to_string(examples("policy.sql")).unwrap();
    let alice = client(&serve, "alice", "acme");
    let phone = client(&serve, "alice", "acme");
    for c in [&alice, &phone] {
        c.subscribe("todos", "SELECT * FROM todos").await.unwrap();
        settled(c).await;
    }
    write(
        &alice,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'before')",
    )
    .await;
    // Acknowledged: the server answered push_ok (not just "nothing pending
    // yet", which the status may say before the write is noticed).
    let acked = alice
        .wait_until(Duration::from_secs(20), |s| s.pushes_ok >= 1 && !s.unpushed)
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .pushed_version;
    assert!(acked > 0);
    // SIGKILL: no shutdown, no checkpoint. The acknowledged push survives.
    let listen = format!("127.0.0.1:{}", serve.url().rsplit(':').next().unwrap());
    let mut serve = serve;
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    alice
        .wait_until(Duration::from_secs(10), |s| !s.connected)
        .await
        .unwrap();
    write(
        &alice,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'alice', 'while down')",
    )
    .await;
    drop(serve);
    let serve = Serve::start(&db, &listen);
    alice
        .wait_until(Duration::from_secs(20), |s| {
            s.connected && s.pushed_version >= acked && !s.unpushed
        })
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    write(
        &phone,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (3, 'acme', 'alice', 'after')",
    )
    .await;
    let id = identity("alice", "acme");
    verified(&db, &policy, &[(&alice, id.clone()), (&phone, id)]).await;
    assert_eq!(
        rows(&phone, "SELECT id, title FROM todos ORDER BY id").await,
        vec![
            vec![1.into(), "before".into()],
            vec![2.into(), "while down".into()],
            vec![3.into(), "after".into()]
        ]
    );
    alice.close().await.unwrap();
    phone.close().await.unwrap();
    serve.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_out_of_order_pushes_and_repulled_ranges_converge() {
    use tenantsync_client::{HttpClient, PushAnswer, Replica};
    use tenantsync_core::{ChangesQuery, SiteFilter};
    use tenantsync_protocol::ErrorCode;
    use tenantsync_protocol::http::{PullRequest, PullSub, PushRequest};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let serve = Serve::start(&db, "127.0.0.1:0");
    let policy = std::fs::read_to_string(examples("policy.sql")).unwrap();
    let http = HttpClient::new(serve.url(), &token("alice", "acme")).unwrap();
    let schema = http.schema().await.unwrap().schema_sql;
    let mut writer = Replica::open_in_memory().unwrap();
    writer.apply_schema(&schema).unwrap();
    let site = writer.site_id();
    for (id, title) in [(1, "one"), (2, "two")] {
        writer
            .conn()
            .conn()
            .execute_batch(&format!(
                "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({id}, 'acme', 'alice', '{title}')"
            ))
            .unwrap();
    }
    let push = |from: i64, to: i64| PushRequest {
        site_id: site,
        from,
        to,
        changes: writer
            .conn()
            .changes(&ChangesQuery {
                since: from,
                until: Some(to),
                site: SiteFilter::Only(site),
                ..ChangesQuery::default()
            })
            .unwrap(),
    };
    let (v1, v2) = (push(0, 1), push(1, 2));
    // Out of order: the second transaction first is a gap, nothing applied.
    let err = http.push(&v2).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Gap), "{err}");
    let ok = |a: PushAnswer| match a {
        PushAnswer::Ok(r) => r,
        PushAnswer::Refused(r) => panic!("refused: {r:?}"),
    };
    assert_eq!(ok(http.push(&v1).await.unwrap()).pushed_version, 1);
    // Duplicates are harmless: answered, nothing written again.
    let dup = ok(http.push(&v1).await.unwrap());
    assert_eq!((dup.pushed_version, dup.server_version), (1, 0));
    assert_eq!(ok(http.push(&v2).await.unwrap()).pushed_version, 2);
    assert_eq!(ok(http.push(&v2).await.unwrap()).server_version, 0);

    // A reader pulls, then re-pulls a range it already has and replays an
    // old answer: it converges all the same.
    let mut reader = Replica::open_in_memory().unwrap();
    reader.apply_schema(&schema).unwrap();
    reader
        .add_subscription("todos", "SELECT * FROM todos")
        .unwrap();
    let reader_site = reader.site_id();
    let pull = |cursor: Option<i64>| PullRequest {
        site_id: reader_site,
        subscriptions: vec![PullSub {
            id: "todos".into(),
            query: "SELECT * FROM todos".into(),
            cursor,
        }],
        wait_ms: 0,
        unsubscribe: vec![],
    };
    let first = http.pull(&pull(None)).await.unwrap();
    reader.apply_pull(&first).unwrap();
    let c1 = first.version;
    ok(http
        .push(&{
            writer
                .conn()
                .conn()
                .execute_batch(
                    "BEGIN; UPDATE todos SET title = 'two!' WHERE id = 2; DELETE FROM todos WHERE id = 1; COMMIT",
                )
                .unwrap();
            push(2, 3)
        })
        .await
        .unwrap());
    let second = http.pull(&pull(Some(c1))).await.unwrap();
    reader.apply_pull(&second).unwrap();
    let again = http.pull(&pull(Some(c1))).await.unwrap();
    reader.apply_pull(&again).unwrap();
    reader.apply_pull(&first).unwrap();
    reader.apply_pull(&second).unwrap();
    let latest = reader.subscription("todos").unwrap().unwrap().cursor;
    let last = http.pull(&pull(latest)).await.unwrap();
    reader.apply_pull(&last).unwrap();
    let truth = Truth::open(&db, "policy.sql", &policy).unwrap();
    let check = truth.check(&identity("alice", "acme"), &reader).unwrap();
    assert!(check.ok(), "{check:?}");
    assert_eq!(check.held, 1);
    serve.stop();
}

/// Regression (issue 6, oracle seed 6): a client's own writes where none of
/// its subscriptions looks (a todo inserted into another list, one inserted
/// and moved out before it was pushed) stayed in its replica for good and
/// went stale. A replica holds what its subscriptions hold, its own writes
/// too: they leave once pushed (the server has them), the ones a
/// subscription takes stay, and none comes back stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_writes_outside_every_subscription_leave_the_replica_once_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let policy = std::fs::read_to_string(examples("policy.sql")).unwrap();
    let db = dir.path().join("server.db");
    let serve = Serve::start(&db, "127.0.0.1:0");
    service_sql(
        &serve,
        "INSERT INTO lists VALUES (1, 'acme', 'alice', 'a'), (2, 'acme', 'alice', 'b')",
    )
    .await;
    let alice = client(&serve, "alice", "acme");
    let list1 = client(&serve, "alice", "acme");
    alice
        .subscribe("todos", "SELECT * FROM todos")
        .await
        .unwrap();
    list1
        .subscribe("l1", "SELECT * FROM todos WHERE list_id = 1")
        .await
        .unwrap();
    let all = || {
        vec![
            (&alice, identity("alice", "acme")),
            (&list1, identity("alice", "acme")),
        ]
    };
    verified(&db, &policy, &all()).await;

    // One push: todo 20 into list 1 (it stays, held), todo 21 into list 2
    // (it leaves); offline, todo 22 inserted into list 1 and moved to list
    // 2 before it was pushed (it leaves too).
    write(
        &list1,
        "INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES
           (20, 'acme', 1, 'alice', 'mine, here'), (21, 'acme', 2, 'alice', 'mine, there')",
    )
    .await;
    verified(&db, &policy, &all()).await;
    assert!(has_todo(&list1, 20).await && !has_todo(&list1, 21).await);
    list1.set_online(false);
    write(
        &list1,
        "INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (22, 'acme', 1, 'alice', 'moved');
         UPDATE todos SET list_id = 2 WHERE id = 22",
    )
    .await;
    assert!(has_todo(&list1, 22).await, "offline, the write is local");
    list1.set_online(true);
    verified(&db, &policy, &all()).await;
    assert!(!has_todo(&list1, 22).await && has_todo(&alice, 22).await);

    // Nothing of them was deleted on the server, and when the backend
    // edits them and moves one into list 1, it arrives current.
    service_sql(
        &serve,
        "UPDATE todos SET title = 'edited' WHERE id IN (21, 22)",
    )
    .await;
    service_sql(&serve, "UPDATE todos SET list_id = 1 WHERE id = 22").await;
    verified(&db, &policy, &all()).await;
    assert_eq!(
        rows(&list1, "SELECT id, title FROM todos ORDER BY id").await,
        vec![
            vec![20.into(), "mine, here".into()],
            vec![22.into(), "edited".into()]
        ]
    );
    assert_eq!(
        rows(&alice, "SELECT count(*) FROM todos").await,
        vec![vec![3.into()]]
    );
    for c in [alice, list1] {
        c.close().await.unwrap();
    }
    serve.stop();
}
