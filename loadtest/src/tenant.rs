//! The bench's data model over examples/schema.sql and policy.sql: tenants,
//! users with several devices, lists, memberships, todos; the bearer tokens
//! the load clients and the service writes carry.
//!
//! Per tenant `t`: `users` users (`u<i>@t<t>`), each with `devices` devices
//! (one load client each, its own site id); `LISTS` lists, list `l` owned
//! by user `l % users`; user `u` is a member of lists `u % LISTS` and
//! `(u + 1) % LISTS`; `todos` seeded todos, todo `k` owned by user
//! `k % users` in list `k % LISTS`, open when `k % 3 != 0`.
//!
//! Every client subscribes to [`SUBSCRIPTIONS`]: the tenant's lists (one
//! view per tenant: the lists policy reads only the tenant claim), and two
//! todo queries whose effective queries depend on the user (owner or member
//! of the list), so devices of one user share those views.

use std::time::{SystemTime, UNIX_EPOCH};

use tenantsync_protocol::http::SqlStatement;
use tenantsync_types::Value;

/// Lists per tenant.
pub const LISTS: usize = 4;

/// The subscriptions of every client: (id, query).
pub const SUBSCRIPTIONS: &[(&str, &str)] = &[
    ("lists", "SELECT * FROM lists"),
    ("todos", "SELECT * FROM todos"),
    ("open", "SELECT * FROM todos WHERE done = 0"),
];

/// Ids of rows the bench inserts (pushed todos) start here; seeded todos
/// are below.
pub const PUSHED_ID_BASE: i64 = 1_000_000_000;

/// The shape of every tenant.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Users per tenant.
    pub users: usize,
    /// Devices (load clients) per user.
    pub devices: usize,
    /// Seeded todos per tenant.
    pub todos: usize,
}

impl Shape {
    /// `clients` clients per tenant as users of `devices` devices (the
    /// last user may have fewer).
    pub fn new(clients: usize, devices: usize, todos: usize) -> Shape {
        let devices = devices.max(1);
        Shape {
            users: clients.div_ceil(devices).max(1),
            devices,
            todos,
        }
    }
}

/// The tenant claim of tenant `t`.
pub fn tenant_name(t: usize) -> String {
    format!("t{t}")
}

/// The subject of user `u` of tenant `t`.
pub fn user_name(t: usize, u: usize) -> String {
    format!("u{u}@t{t}")
}

/// The id of list `l` of tenant `t`.
pub fn list_id(t: usize, l: usize) -> i64 {
    (t * LISTS + l) as i64 + 1
}

/// The id of seeded todo `k` of tenant `t`.
pub fn todo_id(t: usize, k: usize, shape: &Shape) -> i64 {
    (t * shape.todos + k) as i64 + 1
}

/// The lists user `u` is a member of.
pub fn member_lists(u: usize) -> [usize; 2] {
    [u % LISTS, (u + 1) % LISTS]
}

/// The statements that seed tenant `t` (one `POST /v1/sql`).
pub fn seed_statements(t: usize, shape: &Shape) -> Vec<SqlStatement> {
    let tenant = Value::Text(tenant_name(t));
    let mut out = Vec::new();
    let stmt = |sql: &str, params: Vec<Value>| SqlStatement {
        sql: sql.into(),
        params,
    };
    for l in 0..LISTS {
        out.push(stmt(
            "INSERT INTO lists (id, tenant_id, owner, name) VALUES (?1, ?2, ?3, ?4)",
            vec![
                Value::Integer(list_id(t, l)),
                tenant.clone(),
                Value::Text(user_name(t, l % shape.users)),
                Value::Text(format!("list {l}")),
            ],
        ));
    }
    for u in 0..shape.users {
        for l in member_lists(u) {
            out.push(stmt(
                "INSERT OR IGNORE INTO members (list_id, user_id, tenant_id) VALUES (?1, ?2, ?3)",
                vec![
                    Value::Integer(list_id(t, l)),
                    Value::Text(user_name(t, u)),
                    tenant.clone(),
                ],
            ));
        }
    }
    for k in 0..shape.todos {
        out.push(stmt(
            "INSERT INTO todos (id, tenant_id, list_id, owner, title, done, priority) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            vec![
                Value::Integer(todo_id(t, k, shape)),
                tenant.clone(),
                Value::Integer(list_id(t, k % LISTS)),
                Value::Text(user_name(t, k % shape.users)),
                Value::Text(format!("seed {k}")),
                Value::Integer(i64::from(k % 3 == 0)),
                Value::Integer((k % 5) as i64),
            ],
        ));
    }
    out
}

/// Mints HS256 tokens valid for a day.
#[derive(Clone)]
pub struct Tokens {
    secret: Vec<u8>,
}

impl Tokens {
    /// Tokens signed with `secret`.
    pub fn new(secret: &str) -> Tokens {
        Tokens {
            secret: secret.as_bytes().to_vec(),
        }
    }

    fn mint(&self, claims: serde_json::Value) -> String {
        let claims = claims.as_object().expect("claims are an object");
        tenantsync_server::auth::mint_hs256(&self.secret, claims).expect("HS256 signs")
    }

    fn exp() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 86_400
    }

    /// A user's token (`role: authenticated`).
    pub fn user(&self, t: usize, u: usize) -> String {
        self.mint(serde_json::json!({
            "sub": user_name(t, u),
            "role": "authenticated",
            "tenant_id": tenant_name(t),
            "exp": Self::exp(),
        }))
    }

    /// A backend's token for tenant `t` (`role: service`, with the tenant
    /// claim, so the server's fair queue counts its writes for `t`).
    pub fn service(&self, t: Option<usize>) -> String {
        let mut c = serde_json::json!({
            "sub": "bench-backend",
            "role": "service",
            "exp": Self::exp(),
        });
        if let Some(t) = t {
            c["tenant_id"] = serde_json::Value::String(tenant_name(t));
        }
        self.mint(c)
    }

    /// The claims of user `u` of tenant `t`, as the server's policies see
    /// them (for the isolation check).
    pub fn user_claims(t: usize, u: usize) -> serde_json::Map<String, serde_json::Value> {
        let serde_json::Value::Object(m) = serde_json::json!({
            "sub": user_name(t, u),
            "role": "authenticated",
            "tenant_id": tenant_name(t),
        }) else {
            unreachable!()
        };
        m
    }
}

/// The title a bench write carries: its id and its send time (ns since
/// the run's clock started), so a client that receives it knows the
/// write-to-delivery latency on the one clock of the machine.
pub fn tag(write: u64, sent_ns: u64) -> String {
    format!("bench:{write}:{sent_ns}")
}

/// The (write id, send time) of a tagged title.
pub fn parse_tag(title: &str) -> Option<(u64, u64)> {
    let rest = title.strip_prefix("bench:")?;
    let (w, t) = rest.split_once(':')?;
    Some((w.parse().ok()?, t.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_read_back() {
        assert_eq!(parse_tag(&tag(17, 123_456)), Some((17, 123_456)));
        assert_eq!(parse_tag("seed 3"), None);
        assert_eq!(parse_tag("bench:x:1"), None);
    }

    #[test]
    fn shapes_cover_every_client() {
        let s = Shape::new(10, 2, 40);
        assert_eq!((s.users, s.devices), (5, 2));
        let s = Shape::new(3, 2, 40);
        assert_eq!(s.users, 2);
        assert_eq!(seed_statements(0, &s).len(), LISTS + 2 * 2 + 40);
    }
}
