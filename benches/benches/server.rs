//! The server engine's hot paths (`cargo bench -p tenantsync-benches --bench server`):
//!
//! - `match_one_change/{views}`: one changed todo matched against 100 ..
//!   10,000 views (one per user, examples' policies: `tenant_id = ?` and
//!   `owner = ?` covers, a membership per view): found by the equality
//!   index and the reverse index, so the time stays flat as views grow;
//! - `build_checkpoint/{subs}`: a `changes` message built from 10 queued
//!   commits of 10 changes each for 10 .. 1000 subscriptions (changes
//!   encoded once, spliced per subscription);
//! - `apply_push`: one pushed row through the whole write path (checks in
//!   the session, write policies before/after, group commit, fan-out to
//!   100 subscriptions of 100 views) on a WAL file, `synchronous=NORMAL`.
//!
//! Seeded data, one run per figure; read ratios, not absolutes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tenantsync_core::{Change, ChangesQuery, CrrConnection, Options, SiteFilter, SiteId};
use tenantsync_protocol::http::{PushRequest, SqlRequest, SqlStatement};
use tenantsync_protocol::ws::ClientMsg;
use tenantsync_server::bench::{Checkpoint, Matching};
use tenantsync_server::{Principal, ServiceConfig, SyncService, Synchronous};

const SCHEMA: &str = include_str!("../../examples/schema.sql");
const POLICY: &str = include_str!("../../examples/policy.sql");

fn principal(sub: &str, tenant: &str) -> Principal {
    let serde_json::Value::Object(m) = serde_json::json!({
        "sub": sub, "role": "authenticated", "tenant_id": tenant, "exp": 4_000_000_000u64
    }) else {
        unreachable!()
    };
    Principal::from_claims(m, "tenant_id")
}

fn match_one_change(c: &mut Criterion) {
    let mut g = c.benchmark_group("match_one_change");
    g.throughput(Throughput::Elements(1));
    for views in [100, 1_000, 10_000] {
        let mut m = Matching::new(SCHEMA, POLICY, views);
        assert_eq!(m.views(), views);
        assert_eq!(m.match_one(), 1, "the change touches its owner's view only");
        g.bench_with_input(BenchmarkId::from_parameter(views), &views, |b, _| {
            b.iter(|| black_box(m.match_one()))
        });
    }
    g.finish();
}

fn build_checkpoint(c: &mut Criterion) {
    let mut g = c.benchmark_group("build_checkpoint");
    for subs in [10, 100, 1000] {
        let cp = Checkpoint::new(10, subs, 10);
        g.throughput(Throughput::Elements((10 * 10 * subs) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(subs), &subs, |b, _| {
            b.iter(|| black_box(cp.build()))
        });
    }
    g.finish();
}

fn apply_push(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServiceConfig::new(dir.path().join("bench.db"), SCHEMA, "policy.sql", POLICY);
    cfg.synchronous = Synchronous::Normal;
    cfg.limits.push_rate_per_tenant = 1e9;
    cfg.limits.push_burst_per_tenant = 1e9;
    cfg.limits.push_bytes_per_tenant = 1e12;
    let service = SyncService::start(cfg).unwrap();
    // 100 users of one tenant, each subscribed (100 views, 100 sessions).
    let mut sessions = Vec::new();
    rt.block_on(async {
        let svc = principal("svc", "t0");
        let _ = svc;
        for u in 0..100 {
            let (mut s, mut o) = service
                .open_session(principal(&format!("u{u}"), "t0"), SiteId([u as u8 + 1; 16]), None, None)
                .await
                .unwrap();
            s.handle(ClientMsg::Subscribe {
                id: "all".into(),
                query: "SELECT * FROM todos".into(),
                cursor: None,
            })
            .await;
            let drain = tokio::spawn(async move {
                while let Some(_f) = o.next().await {
                    o.written();
                }
            });
            sessions.push((s, drain));
        }
        let _ = service
            .sql(
                &{
                    let serde_json::Value::Object(m) =
                        serde_json::json!({"sub": "backend", "role": "service", "exp": 4_000_000_000u64})
                    else {
                        unreachable!()
                    };
                    Principal::from_claims(m, "tenant_id")
                },
                SqlRequest {
                    statements: vec![SqlStatement {
                        sql: "SELECT 1".into(),
                        params: vec![],
                    }], tenant: None,
                },
            )
            .await;
    });
    // The pushing peer: user u0's replica.
    let site = SiteId([200; 16]);
    let replica = CrrConnection::open_with(
        ":memory:",
        Options {
            site_id: Some(site),
            ..Options::default()
        },
    )
    .unwrap();
    replica.conn().execute_batch(SCHEMA).unwrap();
    let who = principal("u0", "t0");
    let mut pushed = 0i64;
    let mut next_id = 1_000_000i64;
    let mut g = c.benchmark_group("apply_push");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("one_row_100_views", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                next_id += 1;
                replica
                    .conn()
                    .execute(
                        "INSERT INTO todos VALUES (?1, 't0', 1, 'u0', 'pushed', 0, 1)",
                        [next_id],
                    )
                    .unwrap();
                let to = replica.db_version().unwrap();
                let changes: Vec<Change> = replica
                    .changes(&ChangesQuery {
                        since: pushed,
                        until: Some(to),
                        site: SiteFilter::Only(site),
                        ..ChangesQuery::default()
                    })
                    .unwrap();
                let req = PushRequest {
                    site_id: site,
                    from: pushed,
                    to,
                    changes,
                };
                let t = Instant::now();
                let r = rt.block_on(service.push(&who, req)).unwrap();
                total += t.elapsed();
                pushed = r.pushed_version;
            }
            total
        })
    });
    g.finish();
    rt.block_on(service.shutdown(Duration::from_secs(10)));
    drop(sessions);
}

criterion_group!(benches, match_one_change, build_checkpoint, apply_push);
criterion_main!(benches);
