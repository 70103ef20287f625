//! One load client: a WebSocket session of one device of one user, with the
//! bench's subscriptions, that tracks the rows each subscription holds
//! from the protocol messages alone (no replica database: see
//! docs/BENCH.md, "Load clients"), pushes tagged inserts when the driver
//! asks, acknowledges its cursors, and drops and resumes its session on
//! demand (the reconnect storm).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tenantsync_core::{Change, PackedPk, SiteId};
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::ws::{ClientMsg, ServerMsg};
use tenantsync_types::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use super::stats::{Phase, Stats};
use super::tenant::{self, PUSHED_ID_BASE, SUBSCRIPTIONS};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Who a client is.
#[derive(Debug, Clone)]
pub struct Who {
    /// Tenant index.
    pub tenant: usize,
    /// User index within the tenant.
    pub user: usize,
    /// Client index within the tenant.
    pub index: usize,
    /// Its site id.
    pub site: SiteId,
    /// Its bearer token.
    pub token: String,
    /// The WebSocket URL of its server.
    pub url: String,
}

/// What the driver tells a client.
#[derive(Debug)]
pub enum Command {
    /// Push one tagged insert, sent at `sent_ns` on the run clock.
    Write { id: u64, sent_ns: u64 },
    /// Write as fast as the server takes it (closed loop), or stop.
    Flood(bool),
    /// Drop the connection abruptly and resume from the cursors.
    Reconnect,
    /// Report the held rows of every subscription.
    Held(oneshot::Sender<Held>),
    /// Close the session and end.
    Stop,
}

/// What a client holds: per subscription id, the todo or list ids.
pub type Held = Vec<(String, HashSet<i64>)>;

/// The client's state of one subscription.
#[derive(Default)]
struct Sub {
    cursor: Option<i64>,
    held: HashSet<i64>,
    /// Chunks of an initial sync in progress.
    staged: Option<Staged>,
    /// A resync was sent; parts are ignored until its sync completes.
    resyncing: bool,
    /// Its sync of this session is applied.
    synced: bool,
}

/// One snapshot chunk: its version, its rows (id, alive), its evictions.
type Chunk = (i64, Vec<(i64, bool)>, Vec<i64>);

struct Staged {
    reset: bool,
    chunks: Vec<Chunk>,
}

/// A push in flight: its text and the writes it carries.
struct InFlight {
    id: String,
    from: i64,
    to: i64,
    text: String,
    writes: Vec<(u64, u64)>,
}

/// The largest number of queued writes a client keeps before it drops new
/// ones (load it could not offer).
const QUEUE: usize = 256;

/// Runs a client until `Stop`. `ready` is told once every subscription's
/// first sync is applied.
pub async fn run(
    who: Who,
    stats: Arc<Stats>,
    mut rx: mpsc::Receiver<Command>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut c = Client {
        subs: SUBSCRIPTIONS
            .iter()
            .map(|(id, _)| ((*id).to_owned(), Sub::default()))
            .collect(),
        who,
        stats,
        local_version: 0,
        pushed_version: 0,
        queue: Vec::new(),
        inflight: None,
        retry_at: None,
        ack_at: None,
        flood: false,
        pushes: 0,
    };
    let mut ready = Some(ready);
    let mut ws = match c.connect().await {
        Ok(ws) => ws,
        Err(e) => {
            c.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            let _ = ready.take().map(|r| r.send(Err(e)));
            // Keep answering the driver so it never waits on a dead client.
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Held(tx) => {
                        let _ = tx.send(Vec::new());
                    }
                    Command::Stop => return,
                    _ => {}
                }
            }
            return;
        }
    };
    // While reconnecting: when the drop happened.
    let mut resuming: Option<Instant> = None;
    loop {
        let retry = c.retry_at;
        let ack = c.ack_at;
        tokio::select! {
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        // The server closed (or the socket failed): resume.
                        c.stats.error(format!("client {}@t{}: session ended", c.who.index, c.who.tenant));
                        match c.reconnect().await {
                            Some(w) => { ws = w; continue; }
                            None => return,
                        }
                    }
                    Some(Ok(_)) => continue,
                };
                let was_live = c.live();
                if let Err(e) = c.handle(&mut ws, text.as_str()).await {
                    c.stats.error(e);
                }
                if c.live() && !was_live {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(()));
                    }
                    if let Some(t0) = resuming.take() {
                        c.stats.resumed(t0.elapsed());
                    }
                }
            }
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    Command::Write { id, sent_ns } => {
                        if c.queue.len() >= QUEUE {
                            c.stats.now().dropped.fetch_add(1, Ordering::Relaxed);
                        } else {
                            c.queue.push((id, sent_ns));
                        }
                    }
                    Command::Flood(on) => c.flood = on,
                    Command::Reconnect => {
                        resuming = Some(Instant::now());
                        // Abrupt: no close frame, the socket is just gone.
                        drop(ws);
                        match c.reconnect().await {
                            Some(w) => ws = w,
                            None => return,
                        }
                    }
                    Command::Held(tx) => {
                        let _ = tx.send(
                            c.subs.iter().map(|(id, s)| (id.clone(), s.held.clone())).collect(),
                        );
                    }
                    Command::Stop => {
                        let _ = ws.close(None).await;
                        return;
                    }
                }
            }
            _ = sleep_until(retry), if retry.is_some() => {
                c.retry_at = None;
                if let Some(p) = &c.inflight {
                    let t = p.text.clone();
                    let _ = ws.send(Message::text(t)).await;
                }
            }
            _ = sleep_until(ack), if ack.is_some() => {
                c.ack_at = None;
                let cursors = c.subs.iter().filter_map(|(id, s)| s.cursor.map(|v| (id.clone(), v))).collect();
                let _ = ws.send(Message::text(json(&ClientMsg::Ack { cursors }))).await;
            }
        }
        if c.inflight.is_none() && c.retry_at.is_none() && c.live() {
            if c.flood && c.queue.is_empty() {
                let id = c.stats.next_write();
                c.stats.now().issued.fetch_add(1, Ordering::Relaxed);
                c.queue.push((id, c.stats.now_ns()));
            }
            if !c.queue.is_empty() {
                c.push(&mut ws).await;
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn json(m: &ClientMsg) -> String {
    serde_json::to_string(m).expect("client messages serialise")
}

struct Client {
    who: Who,
    stats: Arc<Stats>,
    subs: HashMap<String, Sub>,
    local_version: i64,
    pushed_version: i64,
    queue: Vec<(u64, u64)>,
    inflight: Option<InFlight>,
    retry_at: Option<tokio::time::Instant>,
    ack_at: Option<tokio::time::Instant>,
    flood: bool,
    pushes: u64,
}

impl Client {
    async fn connect(&mut self) -> Result<Ws, String> {
        let what = |e: &dyn std::fmt::Display| {
            format!(
                "client {} of tenant {}: {e}",
                self.who.index, self.who.tenant
            )
        };
        let mut req = self
            .who
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| what(&e))?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.who.token)
                .parse()
                .map_err(|e| what(&e))?,
        );
        // Small buffers: ten thousand of these share the machine.
        let cfg = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0);
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(30),
            tokio_tungstenite::connect_async_with_config(req, Some(cfg), true),
        )
        .await
        .map_err(|_| what(&"connecting timed out"))?
        .map_err(|e: tungstenite::Error| what(&e))?;
        let hello = ClientMsg::Hello {
            protocol: tenantsync_protocol::PROTOCOL_VERSION,
            site_id: self.who.site,
            client: Some("tenantsync-bench".into()),
            token: None,
            schema_version: None,
        };
        ws.send(Message::text(json(&hello)))
            .await
            .map_err(|e| what(&e))?;
        let welcome = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| what(&"no welcome"))?;
        let Some(Ok(Message::Text(t))) = welcome else {
            return Err(what(&format!("no welcome: {welcome:?}")));
        };
        match serde_json::from_str::<ServerMsg>(t.as_str()) {
            Ok(ServerMsg::Welcome { peer, .. }) => {
                self.pushed_version = peer.pushed_version;
                // Versions after pushed_version were never taken: reuse them.
                self.local_version = peer.pushed_version;
            }
            other => return Err(what(&format!("expected welcome, got {other:?}"))),
        }
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        for (id, query) in SUBSCRIPTIONS {
            let s = self.subs.get_mut(*id).expect("every sub");
            s.staged = None;
            s.resyncing = false;
            s.synced = false;
            let m = ClientMsg::Subscribe {
                id: (*id).into(),
                query: (*query).into(),
                cursor: s.cursor,
            };
            ws.send(Message::text(json(&m)))
                .await
                .map_err(|e| what(&e))?;
        }
        Ok(ws)
    }

    /// Reconnects with a short backoff; None after giving up (the run is
    /// ending or the server is gone).
    async fn reconnect(&mut self) -> Option<Ws> {
        // The push in flight may or may not have been applied: the welcome
        // says; queue its writes again if not.
        let lost = self.inflight.take();
        self.retry_at = None;
        let mut delay = Duration::from_millis(50);
        for _ in 0..20 {
            match self.connect().await {
                Ok(ws) => {
                    if let Some(p) = lost {
                        if self.pushed_version < p.to {
                            let mut w = p.writes;
                            w.append(&mut self.queue);
                            self.queue = w;
                        } else {
                            self.accepted(p.writes.len());
                        }
                    }
                    return Some(ws);
                }
                Err(e) => {
                    self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.error(e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        None
    }

    fn accepted(&self, n: usize) {
        self.stats
            .now()
            .accepted
            .fetch_add(n as u64, Ordering::Relaxed);
        if self.who.tenant == self.stats.noisy_tenant() {
            self.stats
                .now()
                .noisy_accepted
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Pushes every queued write, one local version each, in one push.
    async fn push(&mut self, ws: &mut Ws) {
        let writes = std::mem::take(&mut self.queue);
        let from = self.pushed_version;
        let mut changes = Vec::with_capacity(writes.len() * 7);
        for (i, &(id, sent_ns)) in writes.iter().enumerate() {
            let v = from + 1 + i as i64;
            changes.extend(self.insert(id, sent_ns, v));
        }
        let to = from + writes.len() as i64;
        self.local_version = to;
        self.pushes += 1;
        let id = format!("p{}", self.pushes);
        let text = json(&ClientMsg::Push {
            id: id.clone(),
            from,
            to,
            changes,
        });
        let _ = ws.send(Message::text(text.clone())).await;
        self.inflight = Some(InFlight {
            id,
            from,
            to,
            text,
            writes,
        });
    }

    /// The changes of inserting tagged todo `id` at local version `v`: a
    /// new row owned by this user in one of its lists.
    fn insert(&self, id: u64, sent_ns: u64, v: i64) -> Vec<Change> {
        let t = self.who.tenant;
        let u = self.who.user;
        let list = tenant::member_lists(u)[(id % 2) as usize];
        let row_id = PUSHED_ID_BASE + id as i64;
        let pk = PackedPk::pack(&[Value::Integer(row_id)]).expect("an integer packs");
        let cols: [(&str, Value); 6] = [
            ("tenant_id", Value::Text(tenant::tenant_name(t))),
            ("list_id", Value::Integer(tenant::list_id(t, list))),
            ("owner", Value::Text(tenant::user_name(t, u))),
            ("title", Value::Text(tenant::tag(id, sent_ns))),
            ("done", Value::Integer(0)),
            ("priority", Value::Integer((id % 5) as i64)),
        ];
        let mut out = Vec::with_capacity(7);
        out.push(Change {
            table: "todos".into(),
            pk: pk.clone(),
            cid: Change::SENTINEL.into(),
            val: Value::Null,
            col_version: 1,
            db_version: v,
            site_id: self.who.site,
            cl: 1,
            seq: 0,
        });
        for (i, (cid, val)) in cols.into_iter().enumerate() {
            out.push(Change {
                table: "todos".into(),
                pk: pk.clone(),
                cid: cid.into(),
                val,
                col_version: 1,
                db_version: v,
                site_id: self.who.site,
                cl: 1,
                seq: i as i64 + 1,
            });
        }
        out
    }

    async fn handle(&mut self, ws: &mut Ws, text: &str) -> Result<(), String> {
        let now_ns = self.stats.now_ns();
        let msg: ServerMsg =
            serde_json::from_str(text).map_err(|e| format!("bad server message: {e}"))?;
        match msg {
            ServerMsg::Subscribed { id, mode, .. } => {
                // A new sync starts (first, resync or catch-up): the
                // subscription is not live until it completes.
                let s = self.sub(&id)?;
                s.synced = false;
                s.staged = Some(Staged {
                    reset: true,
                    chunks: Vec::new(),
                });
                self.stats.modes[mode as usize].fetch_add(1, Ordering::Relaxed);
            }
            ServerMsg::Snapshot {
                sub,
                version,
                reset,
                changes,
                evict,
                last,
            } => {
                let rows = rows_of(&changes)?;
                self.stats.now().sync_rows.fetch_add(
                    rows.iter().filter(|r| r.1).count() as u64,
                    Ordering::Relaxed,
                );
                let evict = evict
                    .iter()
                    .map(|k| pk_id(&k.pk))
                    .collect::<Result<Vec<_>, _>>()?;
                let s = self.sub(&sub)?;
                let Some(st) = s.staged.as_mut() else {
                    return Err(format!("snapshot chunk of {sub} without subscribed"));
                };
                st.reset = reset;
                st.chunks.push((version, rows, evict));
                if last {
                    let st = s.staged.take().expect("staged");
                    if st.reset {
                        s.held.clear();
                    }
                    for (v, rows, evict) in st.chunks {
                        if v != version {
                            continue;
                        }
                        for (id, alive) in rows {
                            if alive {
                                s.held.insert(id);
                            } else {
                                s.held.remove(&id);
                            }
                        }
                        for id in evict {
                            s.held.remove(&id);
                        }
                    }
                    s.cursor = Some(version);
                    s.resyncing = false;
                    s.synced = true;
                    self.stats.syncs_done.fetch_add(1, Ordering::Relaxed);
                    self.stats.data(now_ns);
                    self.want_ack();
                }
            }
            ServerMsg::Changes { version, subs, .. } => {
                let stats = self.stats.clone();
                let p = stats.now();
                p.messages.fetch_add(1, Ordering::Relaxed);
                self.stats.data(now_ns);
                let mut seen: Vec<(u64, u64)> = Vec::new();
                let mut resync = Vec::new();
                for (id, part) in subs {
                    let s = self.sub(&id)?;
                    let Some(cursor) = s.cursor else { continue };
                    if s.staged.is_some() || s.resyncing || version <= cursor {
                        continue;
                    }
                    if part.from > cursor {
                        p.gaps.fetch_add(1, Ordering::Relaxed);
                        s.resyncing = true;
                        resync.push((id, cursor));
                        continue;
                    }
                    for c in &part.changes {
                        let rid = pk_id(&c.pk)?;
                        if c.cl % 2 == 0 {
                            s.held.remove(&rid);
                        } else {
                            s.held.insert(rid);
                        }
                        if c.cid == "title"
                            && let Value::Text(t) = &c.val
                            && let Some(tag) = tenant::parse_tag(t)
                            && !seen.contains(&tag)
                        {
                            seen.push(tag);
                        }
                    }
                    for k in &part.evict {
                        s.held.remove(&pk_id(&k.pk)?);
                    }
                    s.cursor = Some(version);
                }
                let noisy = self.who.tenant == self.stats.noisy_tenant();
                for (_, sent_ns) in seen {
                    self.stats.delivered(noisy, sent_ns, now_ns);
                }
                for (sub, cursor) in resync {
                    let m = ClientMsg::Resync { sub, cursor };
                    ws.send(Message::text(json(&m)))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                self.want_ack();
            }
            ServerMsg::PushOk {
                id, pushed_version, ..
            } => {
                if let Some(p) = self.inflight.take_if(|p| p.id == id) {
                    self.pushed_version = self.pushed_version.max(pushed_version);
                    self.accepted(p.writes.len());
                }
            }
            ServerMsg::PushRefused(r) => {
                if let Some(p) = self.inflight.take_if(|p| p.id == r.id) {
                    self.refused(p, &format!("{:?}: {}", r.code, r.message));
                }
            }
            ServerMsg::Error(e) => {
                let ours = matches!(&self.inflight, Some(p) if e.reference.as_deref() == Some(p.id.as_str()));
                if ours && e.code == ErrorCode::RateLimited {
                    let ms = e.retry_after_ms.unwrap_or(10).max(1);
                    self.stats
                        .now()
                        .rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                    self.retry_at = Some(tokio::time::Instant::now() + Duration::from_millis(ms));
                } else if ours && e.code == ErrorCode::Gap {
                    // The server holds less than we thought: resend from its
                    // pushed_version (these writes were never applied).
                    let p = self.inflight.take().expect("ours");
                    self.pushed_version = e.pushed_version.unwrap_or(p.from);
                    let mut w = p.writes;
                    w.append(&mut self.queue);
                    self.queue = w;
                } else if ours {
                    let p = self.inflight.take().expect("ours");
                    self.refused(p, &format!("{:?}: {}", e.code, e.message));
                } else {
                    self.stats.error(format!(
                        "client {}@t{}: {:?}: {}",
                        self.who.index, self.who.tenant, e.code, e.message
                    ));
                }
            }
            // Rows are kept as ids: a new schema needs no migration.
            ServerMsg::Schema { .. } => self.stats.schema_seen(),
            ServerMsg::Welcome { .. } | ServerMsg::Unsubscribed { .. } | ServerMsg::Pong { .. } => {
            }
        }
        Ok(())
    }

    fn refused(&mut self, p: InFlight, why: &str) {
        self.stats
            .now()
            .refused
            .fetch_add(p.writes.len() as u64, Ordering::Relaxed);
        self.stats.error(format!(
            "client {}@t{}: push ({}, {}] refused: {why}",
            self.who.index, self.who.tenant, p.from, p.to
        ));
        // Nothing was applied: those versions are free again.
        self.local_version = self.pushed_version;
    }

    fn live(&self) -> bool {
        self.subs.values().all(|s| s.synced)
    }

    fn want_ack(&mut self) {
        if self.ack_at.is_none() {
            self.ack_at = Some(tokio::time::Instant::now() + Duration::from_millis(200));
        }
    }

    fn sub(&mut self, id: &str) -> Result<&mut Sub, String> {
        self.subs
            .get_mut(id)
            .ok_or_else(|| format!("a message for unknown subscription {id}"))
    }
}

/// The integer id of a one-integer packed pk.
fn pk_id(pk: &PackedPk) -> Result<i64, String> {
    match pk.unpack().map_err(|e| e.to_string())?.as_slice() {
        [Value::Integer(i)] => Ok(*i),
        other => Err(format!("unexpected primary key {other:?}")),
    }
}

/// The rows of a chunk's changes: (id, alive) per change.
fn rows_of(changes: &[Change]) -> Result<Vec<(i64, bool)>, String> {
    let mut out: Vec<(i64, bool)> = Vec::new();
    for c in changes {
        let id = pk_id(&c.pk)?;
        let alive = c.cl % 2 == 1;
        match out.last_mut() {
            Some(last) if last.0 == id => last.1 = alive,
            _ => out.push((id, alive)),
        }
    }
    Ok(out)
}

impl Phase {
    /// Whether writes are being offered in this phase.
    pub fn loaded(self) -> bool {
        matches!(
            self,
            Phase::Steady | Phase::Noisy | Phase::Reconnect | Phase::Reload
        )
    }
}
