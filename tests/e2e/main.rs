//! End to end over real sockets: the real `tenantsync serve` binary on a
//! loopback port, tokens minted by `tenantsync token`, and clients that are
//! the real `tenantsync-client` (`SyncClient` over WebSockets) or the real
//! `tenantsync replica sync` command run as a child process, with
//! `tenantsync sql` reading the replica files (the README's shell flow).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tenantsync_client::{ClientConfig, Replica, SyncClient};
use tenantsync_types::Value;

const SECRET: &str = "e2e-secret-at-least-16-bytes";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tenantsync")
}

fn examples(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file)
}

/// A `tenantsync serve` child process.
struct Serve {
    child: Child,
    addr: String,
    db: PathBuf,
}

impl Serve {
    fn start(db: &Path, listen: &str) -> Serve {
        let mut child = Command::new(bin())
            .args(["serve", "--db"])
            .arg(db)
            .arg("--schema")
            .arg(examples("schema.sql"))
            .arg("--policy")
            .arg(examples("policy.sql"))
            .args([
                "--listen",
                listen,
                "--jwt-secret",
                SECRET,
                "--synchronous",
                "normal",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tenantsync serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Serve {
            child,
            addr,
            db: db.to_owned(),
        }
    }

    fn url(&self) -> &str {
        &self.addr
    }

    /// SIGTERM, wait for the clean shutdown.
    fn stop(mut self) -> (PathBuf, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.addr.rsplit(':').next().unwrap().to_owned();
        (self.db.clone(), format!("127.0.0.1:{port}"))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run tenantsync")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `tenantsync token` for a user of a tenant.
fn token(sub: &str, tenant: &str) -> String {
    let out = run(&[
        "token".as_ref(),
        "--secret".as_ref(),
        SECRET.as_ref(),
        "--sub".as_ref(),
        sub.as_ref(),
        "--claim".as_ref(),
        format!("tenant_id={tenant}").as_ref(),
        "--ttl".as_ref(),
        "1h".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

fn client(serve: &Serve, sub: &str, tenant: &str) -> SyncClient {
    let mut cfg = ClientConfig::new(serve.url(), token(sub, tenant));
    cfg.poll_interval = Some(Duration::from_millis(50));
    cfg.backoff_max = Duration::from_millis(500);
    SyncClient::start(Replica::open_in_memory().unwrap(), cfg)
}

/// Runs `SELECT` on the client's replica.
async fn rows(c: &SyncClient, sql: &str) -> Vec<Vec<Value>> {
    let sql = sql.to_owned();
    c.read(move |r| {
        let conn = r.conn().conn();
        let mut stmt = conn.prepare(&sql)?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |row| (0..n).map(|i| row.get::<_, Value>(i)).collect())?
            .collect::<rusqlite::Result<Vec<Vec<Value>>>>()?;
        Ok(rows)
    })
    .await
    .unwrap()
}

async fn titles(c: &SyncClient) -> Vec<String> {
    rows(c, "SELECT title FROM todos ORDER BY id")
        .await
        .into_iter()
        .map(|r| match &r[0] {
            Value::Text(t) => t.clone(),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Waits until `titles(c)` is `expected` (at most 20 s).
async fn converge(c: &SyncClient, expected: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = titles(c).await;
        if now == expected {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "expected {expected:?}, have {now:?}; status {:?}",
                c.status()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn write(c: &SyncClient, sql: &str) {
    let sql = sql.to_owned();
    c.write(move |conn| conn.execute_batch(&sql)).await.unwrap();
}

/// Waits until the client is live on every subscription and has pushed
/// everything.
async fn settled(c: &SyncClient) {
    c.wait_until(Duration::from_secs(20), |s| {
        s.connected && !s.unpushed && s.cursors.keys().all(|k| s.live.contains(k))
    })
    .await
    .unwrap_or_else(|s| panic!("not settled: {s:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_over_websockets_writes_propagate_and_stay_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("server.db"), "127.0.0.1:0");
    let alice = client(&serve, "alice", "acme");
    let phone = client(&serve, "alice", "acme");
    let bob = client(&serve, "bob", "globex");
    for c in [&alice, &phone, &bob] {
        c.subscribe("todos", "SELECT * FROM todos").await.unwrap();
        settled(c).await;
    }
    write(
        &alice,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'milk')",
    )
    .await;
    write(
        &bob,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'globex', 'bob', 'bolts')",
    )
    .await;
    converge(&phone, &["milk"]).await;
    settled(&bob).await;
    settled(&alice).await;
    // Live edits both ways between alice's two devices.
    write(&phone, "UPDATE todos SET title = 'oat milk' WHERE id = 1").await;
    converge(&alice, &["oat milk"]).await;
    write(&alice, "UPDATE todos SET done = 1 WHERE id = 1").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(&phone, "SELECT done FROM todos WHERE id = 1").await != vec![vec![Value::Integer(1)]]
    {
        assert!(Instant::now() < deadline, "done never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Isolation: after all of it, each tenant holds only its own rows.
    settled(&bob).await;
    assert_eq!(titles(&bob).await, vec!["bolts"]);
    assert_eq!(titles(&alice).await, vec!["oat milk"]);
    assert_eq!(titles(&phone).await, vec!["oat milk"]);
    assert_eq!(bob.status().pushes_refused, 0);
    for c in [alice, phone, bob] {
        c.close().await.unwrap();
    }
    serve.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_over_the_socket_is_quarantined_and_the_rest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("server.db"), "127.0.0.1:0");
    let alice = client(&serve, "alice", "acme");
    let bob = client(&serve, "bob", "globex");
    for c in [&alice, &bob] {
        c.subscribe("todos", "SELECT * FROM todos").await.unwrap();
        settled(c).await;
    }
    write(
        &alice,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'milk')",
    )
    .await;
    settled(&alice).await;
    // Bob writes a row into acme: refused; his replica drops it and keeps
    // the change in quarantine.
    write(
        &bob,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (7, 'acme', 'bob', 'sneaky')",
    )
    .await;
    bob.wait_until(Duration::from_secs(20), |s| {
        s.pushes_refused == 1 && !s.unpushed
    })
    .await
    .unwrap_or_else(|s| panic!("no refusal: {s:?}"));
    assert!(titles(&bob).await.is_empty());
    let q = bob.read(|r| r.quarantine()).await.unwrap();
    assert!(
        q.iter()
            .any(|e| e.change.val == Value::Text("sneaky".into())),
        "{q:?}"
    );
    // His next write in his own tenant goes through.
    write(
        &bob,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (8, 'globex', 'bob', 'ok')",
    )
    .await;
    bob.wait_until(Duration::from_secs(20), |s| s.pushes_ok >= 1 && !s.unpushed)
        .await
        .unwrap();
    assert_eq!(titles(&bob).await, vec!["ok"]);
    // Alice never saw either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(titles(&alice).await, vec!["milk"]);
    alice.close().await.unwrap();
    bob.close().await.unwrap();
    serve.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_and_resume_after_going_offline_and_after_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("server.db"), "127.0.0.1:0");
    let alice = client(&serve, "alice", "acme");
    let phone = client(&serve, "alice", "acme");
    for c in [&alice, &phone] {
        c.subscribe("todos", "SELECT * FROM todos").await.unwrap();
        settled(c).await;
    }
    write(
        &alice,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'one')",
    )
    .await;
    converge(&phone, &["one"]).await;

    // The phone goes offline; both sides write; back online they converge.
    phone.set_online(false);
    phone
        .wait_until(Duration::from_secs(10), |s| !s.connected)
        .await
        .unwrap();
    write(
        &alice,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'alice', 'two')",
    )
    .await;
    write(
        &phone,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (3, 'acme', 'alice', 'offline')",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(titles(&phone).await, vec!["one", "offline"]);
    phone.set_online(true);
    converge(&phone, &["one", "two", "offline"]).await;
    converge(&alice, &["one", "two", "offline"]).await;
    assert_eq!(phone.status().sessions, 2);

    // A dropped connection mid-stream: reconnect and resume.
    phone.reconnect();
    write(&alice, "UPDATE todos SET title = 'two!' WHERE id = 2").await;
    converge(&phone, &["one", "two!", "offline"]).await;

    // The server restarts on the same port: both reconnect with backoff,
    // resume from their cursors, nothing acknowledged is lost.
    let (db, listen) = serve.stop();
    phone
        .wait_until(Duration::from_secs(10), |s| !s.connected)
        .await
        .unwrap();
    write(
        &phone,
        "UPDATE todos SET title = 'during restart' WHERE id = 3",
    )
    .await;
    let serve = Serve::start(&db, &listen);
    converge(&alice, &["one", "two!", "during restart"]).await;
    write(&alice, "UPDATE todos SET title = 'after' WHERE id = 1").await;
    converge(&phone, &["after", "two!", "during restart"]).await;
    settled(&phone).await;
    settled(&alice).await;
    assert!(phone.status().sessions >= 4, "{:?}", phone.status());
    let replica = phone.close().await.unwrap();
    assert!(!replica.has_unpushed().unwrap());
    alice.close().await.unwrap();
    serve.stop();
}

fn replica_sync(serve: &Serve, tok: &str, db: &Path, subs: &[&str], json: bool) -> Output {
    let mut args: Vec<std::ffi::OsString> = vec![
        "replica".into(),
        "sync".into(),
        "--server".into(),
        serve.url().into(),
        "--token".into(),
        tok.into(),
        "--db".into(),
        db.into(),
    ];
    for s in subs {
        args.push("--subscribe".into());
        args.push((*s).into());
    }
    if json {
        args.push("--json".into());
    }
    Command::new(bin())
        .args(&args)
        .output()
        .expect("run replica sync")
}

fn sql(db: &Path, script: &str) -> String {
    let out = run(&["sql".as_ref(), db.as_os_str(), script.as_ref()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{script}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn replica_sync_from_a_shell_serve_token_sync_sql() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(&dir.path().join("server.db"), "127.0.0.1:0");
    let alice = token("alice", "acme");
    let bob = token("bob", "globex");
    let a = dir.path().join("alice.db");
    let b = dir.path().join("bob.db");
    let todos = "SELECT * FROM todos";

    // A new replica: the schema comes from the server; nothing to push yet.
    let out = replica_sync(&serve, &alice, &a, &[todos, "SELECT * FROM lists"], false);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with("schema: fetched from the server (new replica)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("pushed 0 changes in 0 pushes"), "{stdout}");
    assert!(
        stdout.contains("SELECT * FROM todos: snapshot, 0 rows received"),
        "{stdout}"
    );

    // Local writes with `tenantsync sql`, pushed by the next round.
    sql(
        &a,
        "INSERT INTO lists (id, tenant_id, owner, name) VALUES (1, 'acme', 'alice', 'groceries');
         INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (1, 'acme', 1, 'alice', 'milk')",
    );
    let out = replica_sync(&serve, &alice, &a, &[todos, "SELECT * FROM lists"], true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["exit_code"], 0);
    assert_eq!(j["pushes"], 1);
    assert!(j["pushed_changes"].as_u64().unwrap() >= 2, "{j}");
    assert_eq!(j["subscriptions"][1]["mode"], "resume", "{j}");

    // Bob, another tenant, gets nothing of acme.
    let out = replica_sync(&serve, &bob, &b, &[todos], false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(sql(&b, "SELECT count(*) FROM todos"), "[0]\n");

    // Bob writes into acme: the push is refused (exit 3), the change is in
    // quarantine, his replica matches the server again.
    sql(
        &b,
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'bob', 'sneaky')",
    );
    let out = replica_sync(&serve, &bob, &b, &[todos], false);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{}{stderr}", text(&out.stdout));
    assert!(stderr.contains("refused: policy_refused"), "{stderr}");
    assert!(text(&out.stdout).contains("push refused: policy_refused"));
    assert_eq!(sql(&b, "SELECT count(*) FROM todos"), "[0]\n");
    assert_eq!(
        sql(
            &b,
            "SELECT reason, code, tbl, val FROM tenantsync_replica_quarantine WHERE cid = 'title'"
        ),
        "[\"push_refused\",\"policy_refused\",\"todos\",\"sneaky\"]\n"
    );
    // The next round is clean: the refused push was consumed.
    let out = replica_sync(&serve, &bob, &b, &[todos], false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("pushed 0 changes"));

    // A second replica of alice's gets her rows; an edit travels back.
    let a2 = dir.path().join("alice2.db");
    let out = replica_sync(&serve, &alice, &a2, &[todos], false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(sql(&a2, "SELECT id, title FROM todos"), "[1,\"milk\"]\n");
    sql(&a2, "UPDATE todos SET title = 'oat milk' WHERE id = 1");
    assert_eq!(
        replica_sync(&serve, &alice, &a2, &[todos], false)
            .status
            .code(),
        Some(0)
    );
    let out = replica_sync(&serve, &alice, &a, &[todos, "SELECT * FROM lists"], false);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(sql(&a, "SELECT id, title FROM todos"), "[1,\"oat milk\"]\n");
    // Dropping a subscription (not listed any more) removes its rows.
    let out = replica_sync(&serve, &alice, &a, &[todos], false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("unsubscribed q"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(sql(&a, "SELECT count(*) FROM lists"), "[0]\n");
    assert_eq!(sql(&a, "SELECT count(*) FROM todos"), "[1]\n");

    // Errors: a bad token is the server's error, exit 1.
    let out = replica_sync(
        &serve,
        "not-a-token",
        &dir.path().join("x.db"),
        &[todos],
        false,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("unauthorized"),
        "{}",
        text(&out.stderr)
    );
    serve.stop();
}
