//! Shards (issue 12): a node of several databases with a writer each, a
//! tenant in exactly one of them. What a client sees does not change; what
//! an operator gets: tenants placed by a stable rule, service SQL scoped to
//! one tenant, a layout that refuses to change under its data.

mod common;

use std::collections::BTreeSet;

use common::*;
use tenantsync_core::CrrConnection;
use tenantsync_protocol::http::{SqlRequest, SqlStatement};
use tenantsync_server::{StartError, SyncService, shard_path};

/// Two tenants that the hash puts in different shards of two.
fn split_tenants(s: &SyncService) -> (String, String) {
    let mut first = None;
    for i in 0.. {
        let t = format!("t{i}");
        match first {
            None => first = Some((t.clone(), s.shard_of(Some(&t)))),
            Some((ref f, k)) if s.shard_of(Some(&t)) != k => return (f.clone(), t),
            _ => {}
        }
    }
    unreachable!()
}

fn sql_for(tenant: &str, sql: &str) -> SqlRequest {
    SqlRequest {
        statements: vec![SqlStatement {
            sql: sql.into(),
            params: vec![],
        }],
        tenant: Some(tenant.into()),
    }
}

/// Each tenant's rows live in its own shard's database, nothing of it in
/// the other; clients of both see what they saw on one database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_live_in_their_shard_and_clients_see_no_difference() {
    let s = Server::start_with(|c| c.shards = 2);
    let (a, b) = split_tenants(&s.service);
    for (t, id) in [(&a, 1), (&b, 2)] {
        s.service
            .sql(
                &service_principal(),
                sql_for(
                    t,
                    &format!(
                        "INSERT INTO todos (id, tenant_id, owner, title) VALUES ({id}, '{t}', 'u', 'x')"
                    ),
                ),
            )
            .await
            .unwrap();
    }
    let count = |k: usize, id: i64| -> i64 {
        let db = CrrConnection::open(shard_path(&s.path, k)).unwrap();
        db.conn()
            .query_row("SELECT count(*) FROM todos WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let (ka, kb) = (s.service.shard_of(Some(&a)), s.service.shard_of(Some(&b)));
    assert_ne!(ka, kb);
    assert_eq!((count(ka, 1), count(kb, 1)), (1, 0));
    assert_eq!((count(kb, 2), count(ka, 2)), (1, 0));
    // Clients: a session, a snapshot and a delta, a push, per tenant.
    let mut ra = Replica::new(principal("u", &a), site(1));
    let mut rb = Replica::new(principal("u", &b), site(2));
    for r in [&mut ra, &mut rb] {
        r.connect(&s.service).await;
        r.subscribe("all", "SELECT * FROM todos").await;
        r.pump().await;
    }
    assert_eq!(ra.todo_ids(), BTreeSet::from([1]));
    assert_eq!(rb.todo_ids(), BTreeSet::from([2]));
    ra.exec(&format!(
        "INSERT INTO todos (id, tenant_id, owner, title) VALUES (3, '{a}', 'u', 'mine')"
    ));
    assert_eq!(ra.push().await.as_deref(), Some("p1"));
    ra.pump().await;
    rb.pump().await;
    assert_eq!(ra.todo_ids(), BTreeSet::from([1, 3]));
    assert_eq!(rb.todo_ids(), BTreeSet::from([2]));
    assert_eq!(count(ka, 3), 1);
    // Each shard has its versions.
    assert_eq!(s.service.db_versions().len(), 2);
}

/// With several shards, service SQL names its tenant and writes only that
/// tenant's rows; a statement reaching another tenant's row is refused
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_sql_is_scoped_to_its_tenant() {
    let s = Server::start_with(|c| c.shards = 2);
    let (a, b) = split_tenants(&s.service);
    let ok = |t: &str, sql: String| {
        let svc = s.service.clone();
        let t = t.to_owned();
        async move { svc.sql(&service_principal(), sql_for(&t, &sql)).await }
    };
    ok(&a, format!("INSERT INTO lists VALUES (1, '{a}', 'u', 'l')"))
        .await
        .unwrap();
    // Another tenant's row, by insert or by moving a row there.
    let e = ok(&a, format!("INSERT INTO lists VALUES (2, '{b}', 'u', 'l')"))
        .await
        .unwrap_err();
    assert_eq!(e.code, tenantsync_protocol::ErrorCode::SqlError, "{e:?}");
    assert!(
        e.message.contains("only write rows of that tenant"),
        "{}",
        e.message
    );
    let e = ok(
        &a,
        format!("UPDATE lists SET tenant_id = '{b}' WHERE id = 1"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, tenantsync_protocol::ErrorCode::SqlError);
    // A table without a tenant column cannot be written under a scope.
    let e = ok(&a, "INSERT INTO local_settings VALUES ('k', 'v')".into())
        .await
        .unwrap_err();
    assert_eq!(e.code, tenantsync_protocol::ErrorCode::SqlError);
    // Reads are free; writes of its own rows too.
    ok(&a, "UPDATE lists SET name = 'renamed' WHERE id = 1".into())
        .await
        .unwrap();
    // No tenant at all: refused with the reason.
    let e = s
        .service
        .sql(
            &service_principal(),
            SqlRequest {
                statements: vec![],
                tenant: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, tenantsync_protocol::ErrorCode::BadMessage);
    assert!(e.message.contains("name the tenant"), "{}", e.message);
    // On one shard, any statement, as before.
    let one = Server::start();
    one.sql("INSERT INTO lists VALUES (1, 'x', 'u', 'l'), (2, 'y', 'u', 'l')")
        .await;
}

/// The number of shards is fixed when the database is created; a database
/// written before shards existed is one shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_refuses_another_number_of_shards() {
    let s = Server::start_with(|c| c.shards = 2);
    s.service.shutdown(std::time::Duration::from_secs(5)).await;
    let path = s.path.clone();
    let mut c = config(&path);
    c.shards = 3;
    let e = SyncService::start(c).err().expect("refused");
    assert!(matches!(e, StartError::Layout(_)), "{e}");
    assert!(e.to_string().contains("holds 2 shards"), "{e}");
    let mut c = config(&path);
    c.shards = 2;
    SyncService::start(c).unwrap();

    // A one-shard database from before the layout record: still one shard.
    let old = Server::start();
    old.sql("INSERT INTO lists VALUES (1, 'x', 'u', 'l')").await;
    old.service
        .shutdown(std::time::Duration::from_secs(5))
        .await;
    let db = rusqlite::Connection::open(&old.path).unwrap();
    db.execute_batch("DROP TABLE tenantsync_layout").unwrap();
    drop(db);
    let mut c = config(&old.path);
    c.shards = 2;
    let e = SyncService::start(c).err().expect("refused");
    assert!(e.to_string().contains("holds 1 shard "), "{e}");
    SyncService::start(config(&old.path)).unwrap();
}

/// An override places a tenant; one that would move a tenant whose peers
/// another shard holds refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_place_tenants_and_never_move_data() {
    let s = Server::start_with(|c| {
        c.shards = 2;
        c.shard_overrides.insert("acme".into(), 1);
    });
    assert_eq!(s.service.shard_of(Some("acme")), 1);
    let mut r = Replica::new(principal("alice", "acme"), site(1));
    r.connect(&s.service).await;
    s.service.shutdown(std::time::Duration::from_secs(5)).await;
    let mut c = config(&s.path);
    c.shards = 2;
    c.shard_overrides.insert("acme".into(), 0);
    let e = SyncService::start(c).err().expect("refused");
    assert!(e.to_string().contains("moving a tenant's data"), "{e}");
}

/// A schema change reaches every shard (or none), and a restart keeps the
/// version; tenants of both shards write the new column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_takes_a_schema_change_and_a_restart_keeps_it() {
    let s = Server::start_with(|c| c.shards = 2);
    let r = s
        .service
        .change_schema("ALTER TABLE todos ADD COLUMN due TEXT")
        .await
        .unwrap();
    assert_eq!(r.schema_version, 2);
    let refused = s
        .service
        .change_schema("ALTER TABLE todos DROP COLUMN due")
        .await;
    assert!(refused.is_err());
    let (a, b) = split_tenants(&s.service);
    let s = s.restart_with(|c| c.shards = 2).await;
    assert_eq!(s.service.schema().schema_version, 2);
    for (t, id) in [(&a, 1), (&b, 2)] {
        s.service
            .sql(
                &service_principal(),
                sql_for(
                    t,
                    &format!(
                        "INSERT INTO todos (id, tenant_id, owner, title, due) VALUES ({id}, '{t}', 'u', 'x', 'friday')"
                    ),
                ),
            )
            .await
            .unwrap();
    }
    for k in 0..2 {
        let db = CrrConnection::open(shard_path(&s.path, k)).unwrap();
        let versions: i64 = db
            .conn()
            .query_row("SELECT max(version) FROM tenantsync_schema_log", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(versions, 2, "shard {k}");
    }
}
