//! [`SyncClient`]: the live WebSocket client (docs/PROTOCOL.md §4, §11).
//!
//! One tokio task keeps a session with the server: fetch the server's
//! schema over HTTP if the replica is new, connect with a bearer token,
//! `hello`, push what is pending, subscribe every subscription with
//! its cursor, apply what arrives, acknowledge after each local commit,
//! push local writes as they happen, and on any failure reconnect with
//! exponential backoff and resume from the persisted cursors. The replica
//! lives on its own thread ([`ReplicaHandle`]); the task only awaits it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tenantsync_protocol::http::SchemaMigration;
use tenantsync_protocol::ws::{ErrorMsg, PushRefusal};
use tenantsync_protocol::{ClientMsg, ErrorCode, PROTOCOL_VERSION, ServerMsg};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::error::{ReplicaError, Result};
use crate::handle::ReplicaHandle;
use crate::replica::{
    ApplyReport, PushBatch, RefusalReport, RemoveReport, Replica, SubscriptionChange,
};

/// Gives the bearer token for each connection attempt (so an expired
/// token can be replaced between reconnects).
pub type TokenSource = Arc<dyn Fn() -> String + Send + Sync>;

/// How a [`SyncClient`] connects and behaves.
#[derive(Clone)]
pub struct ClientConfig {
    /// The server's base URL (`http://127.0.0.1:8080`, `ws://...`, or the
    /// full `.../v1/sync`); http becomes ws and https wss.
    pub url: String,
    /// The bearer token of each connection.
    pub token: TokenSource,
    /// Sent in `hello.client` (for the server's logs).
    pub client_name: String,
    /// First reconnect delay; doubles (with jitter) up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// How often to look for local writes made without
    /// [`SyncClient::notify`] (e.g. by another connection to the file);
    /// None: only on notify.
    pub poll_interval: Option<Duration>,
    /// How often to send `ping` (the server closes idle sessions).
    pub ping_interval: Duration,
    /// How long connecting and the `welcome` may take.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("client_name", &self.client_name)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// A configuration with a fixed token and the defaults: backoff 100 ms
    /// to 5 s, polling every 250 ms, ping every 20 s, 10 s to connect.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> ClientConfig {
        let token = token.into();
        ClientConfig {
            url: url.into(),
            token: Arc::new(move || token.clone()),
            client_name: concat!("tenantsync-client/", env!("CARGO_PKG_VERSION")).into(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            poll_interval: Some(Duration::from_millis(250)),
            ping_interval: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// The same with a token source.
    pub fn with_token_source(mut self, token: TokenSource) -> ClientConfig {
        self.token = token;
        self
    }
}

/// The WebSocket URL of a server base URL (`http://h:p` -> `ws://h:p/v1/sync`).
pub fn sync_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_owned()
    } else {
        format!("ws://{base}")
    };
    if base.ends_with("/v1/sync") {
        base
    } else {
        format!("{base}/v1/sync")
    }
}

/// What the client is doing, for applications and tests
/// ([`SyncClient::wait_until`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// A session is open (welcome received).
    pub connected: bool,
    /// Sessions opened so far.
    pub sessions: u64,
    /// The highest server version seen (welcome, syncs, checkpoints).
    pub server_version: i64,
    /// Every subscription's persisted cursor.
    pub cursors: BTreeMap<String, Option<i64>>,
    /// Subscriptions whose initial sync in this session is applied.
    pub live: BTreeSet<String>,
    /// The server's pushed_version for this replica.
    pub pushed_version: i64,
    /// The replica's db_version.
    pub local_version: i64,
    /// Whether local changes wait to be pushed (or are in flight).
    pub unpushed: bool,
    /// Pushes applied by the server.
    pub pushes_ok: u64,
    /// Pushes refused by the server.
    pub pushes_refused: u64,
    /// Changes in the quarantine table.
    pub quarantined: usize,
    /// The last error (connection, server or local), if any.
    pub last_error: Option<String>,
}

/// Something that happened, for logs and progress displays.
#[derive(Debug, Clone)]
pub enum Event {
    /// A session opened.
    Connected {
        /// Its number (1, 2, ...).
        session: u64,
        /// The server's version at welcome.
        server_version: i64,
        /// The server's pushed_version for this replica.
        pushed_version: i64,
    },
    /// The session ended; the client reconnects after `retry_in` (unless
    /// offline or closed).
    Disconnected {
        /// Why.
        reason: String,
        /// The delay before the next attempt.
        retry_in: Duration,
    },
    /// A subscription's initial sync was applied.
    Synced(Box<ApplyReport>),
    /// A checkpoint was applied.
    Checkpoint(Box<ApplyReport>),
    /// A push was applied by the server.
    Pushed {
        /// Its range.
        from: i64,
        /// Its range.
        to: i64,
        /// Changes in it.
        changes: usize,
        /// The server version it committed in (0: a duplicate).
        server_version: i64,
    },
    /// A push was refused; its changes are in quarantine.
    PushRefused(Box<(PushRefusal, RefusalReport)>),
    /// The replica migrated to the server's new schema (docs/PROTOCOL.md
    /// §5.4).
    SchemaMigrated {
        /// The schema version before.
        from: i64,
        /// The schema version now.
        to: i64,
    },
    /// A `resync` was sent after a gap or a failed apply.
    Resync {
        /// The subscription.
        sub: String,
        /// The cursor sent.
        cursor: i64,
    },
    /// The server answered an error.
    ServerError(ErrorMsg),
    /// A local error (the replica refused something).
    Error(String),
}

enum Cmd {
    Subscribe(String),
    Unsubscribe(String),
    LocalWrite,
    SetOnline(bool),
    Reconnect,
    Shutdown(oneshot::Sender<()>),
}

/// The live client: a replica kept in sync over a WebSocket by a background
/// task. Create it inside a tokio runtime.
pub struct SyncClient {
    replica: ReplicaHandle,
    cmd: mpsc::UnboundedSender<Cmd>,
    status: watch::Receiver<Status>,
    events: broadcast::Sender<Event>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncClient")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl SyncClient {
    /// Starts the client: the replica moves to its own thread, the session
    /// task starts connecting.
    pub fn start(replica: Replica, config: ClientConfig) -> SyncClient {
        let handle = ReplicaHandle::spawn(replica);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(Status::default());
        let (events, _) = broadcast::channel(1024);
        let worker = Worker {
            backoff: config.backoff_min,
            cfg: config,
            replica: handle.clone(),
            cmd_rx,
            status: status_tx,
            events: events.clone(),
            online: true,
            pending_unsubscribe: BTreeSet::new(),
            sessions: 0,
            pushes: 0,
        };
        let task = tokio::spawn(worker.run());
        SyncClient {
            replica: handle,
            cmd: cmd_tx,
            status: status_rx,
            events,
            task,
        }
    }

    /// The replica (to read, or to write with [`SyncClient::write`]).
    pub fn replica(&self) -> &ReplicaHandle {
        &self.replica
    }

    /// Adds (or replaces) a subscription: persisted in the replica, then
    /// subscribed on the live session (or at the next connect).
    pub async fn subscribe(&self, id: &str, query: &str) -> Result<SubscriptionChange> {
        let (i, q) = (id.to_owned(), query.to_owned());
        let change = self
            .replica
            .run(move |r| r.add_subscription(&i, &q))
            .await?;
        let _ = self.cmd.send(Cmd::Subscribe(id.to_owned()));
        Ok(change)
    }

    /// Removes a subscription: its rows no other subscription holds leave
    /// the replica; the server is told (now, or at the next connect while
    /// this client runs).
    pub async fn unsubscribe(&self, id: &str) -> Result<RemoveReport> {
        let i = id.to_owned();
        let report = self.replica.run(move |r| r.remove_subscription(&i)).await?;
        let _ = self.cmd.send(Cmd::Unsubscribe(id.to_owned()));
        Ok(report)
    }

    /// Tells the client the application wrote to the replica (through
    /// another connection): push now.
    pub fn notify(&self) {
        let _ = self.cmd.send(Cmd::LocalWrite);
    }

    /// Runs `f` with the replica's connection on its thread (write CRR rows
    /// with ordinary SQL), then pushes what it wrote.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let out = self
            .replica
            .run(move |r| f(r.conn().conn()).map_err(ReplicaError::from))
            .await?;
        self.notify();
        Ok(out)
    }

    /// Runs `f` with the replica on its thread (reads).
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Replica) -> Result<T> + Send + 'static,
    {
        self.replica.run(move |r| f(r)).await
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// A receiver of events (a slow receiver misses old ones).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Waits until `pred` holds for the status, at most `within`.
    pub async fn wait_until(
        &self,
        within: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> std::result::Result<Status, Status> {
        let mut rx = self.status.clone();
        let deadline = Instant::now() + within;
        loop {
            {
                let s = rx.borrow_and_update();
                if pred(&s) {
                    return Ok(s.clone());
                }
            }
            match timeout(
                deadline.saturating_duration_since(Instant::now()),
                rx.changed(),
            )
            .await
            {
                Ok(Ok(())) => continue,
                _ => return Err(rx.borrow().clone()),
            }
        }
    }

    /// Goes offline (closes the session, does not reconnect) or back online.
    pub fn set_online(&self, online: bool) {
        let _ = self.cmd.send(Cmd::SetOnline(online));
    }

    /// Drops the session now and reconnects (resuming from the cursors).
    pub fn reconnect(&self) {
        let _ = self.cmd.send(Cmd::Reconnect);
    }

    /// Closes the session (with a close frame), stops the task and gives
    /// the replica back.
    pub async fn close(self) -> Result<Replica> {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
        self.replica.close().await
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a session ended.
enum End {
    Shutdown(oneshot::Sender<()>),
    Offline,
    Reconnect,
    Failed { reason: String, welcomed: bool },
}

struct Worker {
    cfg: ClientConfig,
    replica: ReplicaHandle,
    cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    status: watch::Sender<Status>,
    events: broadcast::Sender<Event>,
    online: bool,
    pending_unsubscribe: BTreeSet<String>,
    sessions: u64,
    pushes: u64,
    backoff: Duration,
}

impl Worker {
    async fn run(mut self) {
        loop {
            if !self.online {
                match self.cmd_rx.recv().await {
                    None => return,
                    Some(Cmd::Shutdown(ack)) => {
                        let _ = ack.send(());
                        return;
                    }
                    Some(Cmd::SetOnline(on)) => self.online = on,
                    Some(Cmd::Unsubscribe(id)) => {
                        self.pending_unsubscribe.insert(id);
                    }
                    Some(_) => {}
                }
                continue;
            }
            let end = self.session().await;
            self.status.send_modify(|s| {
                s.connected = false;
                s.live.clear();
            });
            match end {
                End::Shutdown(ack) => {
                    let _ = ack.send(());
                    return;
                }
                End::Offline => {}
                End::Reconnect => self.backoff = self.cfg.backoff_min,
                End::Failed { reason, welcomed } => {
                    if welcomed {
                        self.backoff = self.cfg.backoff_min;
                    }
                    let delay = jitter(self.backoff);
                    tracing::debug!(%reason, ?delay, "sync session ended");
                    self.status
                        .send_modify(|s| s.last_error = Some(reason.clone()));
                    let _ = self.events.send(Event::Disconnected {
                        reason,
                        retry_in: delay,
                    });
                    self.backoff = (self.backoff * 2).min(self.cfg.backoff_max);
                    let until = Instant::now() + delay;
                    loop {
                        tokio::select! {
                            _ = sleep_until(until) => break,
                            cmd = self.cmd_rx.recv() => match cmd {
                                None => return,
                                Some(Cmd::Shutdown(ack)) => { let _ = ack.send(()); return; }
                                Some(Cmd::SetOnline(false)) => { self.online = false; break; }
                                Some(Cmd::Reconnect) => break,
                                Some(Cmd::Unsubscribe(id)) => { self.pending_unsubscribe.insert(id); }
                                Some(_) => {}
                            }
                        }
                    }
                }
            }
        }
    }

    /// Runs the server's migrations above the replica's schema version, to
    /// version `to` (at `welcome` and at a `schema` message, before any
    /// later message is applied; docs/PROTOCOL.md §5.4). Migrations that do
    /// not follow the replica's version end the session: the next `welcome`
    /// brings every one it lacks.
    async fn migrate(
        &mut self,
        to: i64,
        migrations: Vec<SchemaMigration>,
    ) -> std::result::Result<(), String> {
        let (from, now) = self
            .replica
            .run(move |r| r.apply_migrations(to, &migrations))
            .await
            .map_err(|e| format!("cannot migrate the replica's schema: {e}"))?;
        if now > from {
            let _ = self.events.send(Event::SchemaMigrated { from, to: now });
        }
        Ok(())
    }

    /// Connects and runs one session until it ends.
    async fn session(&mut self) -> End {
        let token = (self.cfg.token)();
        let url = sync_url(&self.cfg.url);
        let mut request = match url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return failed(format!("bad server URL {url}: {e}"), false),
        };
        match format!("Bearer {token}").parse() {
            Ok(v) => {
                request.headers_mut().insert("authorization", v);
            }
            Err(e) => return failed(format!("the token cannot be a header: {e}"), false),
        }
        let ws = match timeout(self.cfg.connect_timeout, connect_async(request)).await {
            Err(_) => return failed(format!("connecting to {url} timed out"), false),
            Ok(Err(e)) => return failed(describe_connect_error(&url, e), false),
            Ok(Ok((ws, _))) => ws,
        };
        let (sink, stream) = ws.split();
        let mut s = Session {
            sink,
            stream,
            syncing: BTreeSet::new(),
            live: BTreeSet::new(),
            inflight: None,
            push_blocked: false,
            push_retry_at: None,
            max_bytes: tenantsync_protocol::DEFAULT_MAX_MESSAGE_BYTES,
            last_local: i64::MIN,
            settle_up_to: 0,
        };
        match self.open(&mut s).await {
            Ok(()) => {}
            Err(reason) => return failed(reason, false),
        }
        let mut ping = tokio::time::interval(self.cfg.ping_interval);
        ping.reset();
        let mut poll =
            tokio::time::interval(self.cfg.poll_interval.unwrap_or(Duration::from_secs(3600)));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = s.push_retry_at;
            let step: std::result::Result<(), String> = tokio::select! {
                frame = s.stream.next() => match frame {
                    None => Err("the server closed the connection".into()),
                    Some(Err(e)) => Err(format!("connection error: {e}")),
                    Some(Ok(Message::Text(text))) => self.on_text(&mut s, text.as_str()).await,
                    Some(Ok(Message::Close(frame))) => Err(match frame {
                        Some(f) => format!("the server closed the connection: {} {}", f.code, f.reason),
                        None => "the server closed the connection".into(),
                    }),
                    Some(Ok(_)) => Ok(()),
                },
                cmd = self.cmd_rx.recv() => match cmd {
                    None => {
                        let _ = s.sink.close().await;
                        return End::Offline;
                    }
                    Some(Cmd::Shutdown(ack)) => {
                        self.abandon(&mut s).await;
                        let _ = s.sink.close().await;
                        return End::Shutdown(ack);
                    }
                    Some(Cmd::SetOnline(false)) => {
                        self.online = false;
                        self.abandon(&mut s).await;
                        let _ = s.sink.close().await;
                        return End::Offline;
                    }
                    Some(Cmd::SetOnline(true)) => Ok(()),
                    Some(Cmd::Reconnect) => {
                        self.abandon(&mut s).await;
                        let _ = s.sink.close().await;
                        return End::Reconnect;
                    }
                    Some(Cmd::Subscribe(id)) => self.subscribe_one(&mut s, &id).await,
                    Some(Cmd::Unsubscribe(id)) => {
                        s.syncing.remove(&id);
                        s.live.remove(&id);
                        send(&mut s.sink, &ClientMsg::Unsubscribe { id }).await
                    }
                    Some(Cmd::LocalWrite) => self.try_push(&mut s).await,
                },
                _ = ping.tick() => send(&mut s.sink, &ClientMsg::Ping { id: None }).await,
                _ = poll.tick(), if self.cfg.poll_interval.is_some() => self.poll_local(&mut s).await,
                _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    s.push_retry_at = None;
                    self.try_push(&mut s).await
                }
            };
            if let Err(reason) = step {
                self.abandon(&mut s).await;
                return failed(reason, true);
            }
        }
    }

    /// hello, welcome, resubscribe, first push.
    async fn open(&mut self, s: &mut Session) -> std::result::Result<(), String> {
        let site = self
            .replica
            .call(|r| r.site_id())
            .await
            .map_err(|e| e.to_string())?;
        let known_schema = self
            .replica
            .run(|r| r.schema_version())
            .await
            .map_err(|e| e.to_string())?;
        send(
            &mut s.sink,
            &ClientMsg::Hello {
                protocol: PROTOCOL_VERSION,
                site_id: site,
                client: Some(self.cfg.client_name.clone()),
                token: None,
                schema_version: Some(known_schema),
            },
        )
        .await?;
        let welcome = timeout(self.cfg.connect_timeout, async {
            loop {
                match s.stream.next().await {
                    None => {
                        return Err("the server closed the connection before welcome".to_owned());
                    }
                    Some(Err(e)) => return Err(format!("connection error before welcome: {e}")),
                    Some(Ok(Message::Text(t))) => {
                        return tenantsync_protocol::json::decode::<ServerMsg>(t.as_bytes())
                            .map_err(|e| format!("unreadable server message before welcome: {e}"));
                    }
                    Some(Ok(Message::Close(f))) => {
                        return Err(format!(
                            "the server closed the connection before welcome{}",
                            f.map(|f| format!(": {} {}", f.code, f.reason))
                                .unwrap_or_default()
                        ));
                    }
                    Some(Ok(_)) => continue,
                }
            }
        })
        .await
        .map_err(|_| "no welcome from the server in time".to_owned())??;
        let (server_site, db_version, pushed_version, max_bytes, (schema_version, migrations)) =
            match welcome {
                ServerMsg::Welcome {
                    server_site_id,
                    db_version,
                    peer,
                    limits,
                    schema_version,
                    migrations,
                    ..
                } => (
                    server_site_id,
                    db_version,
                    peer.pushed_version,
                    limits.max_message_bytes,
                    (schema_version, migrations),
                ),
                ServerMsg::Error(e) => {
                    let _ = self.events.send(Event::ServerError(e.clone()));
                    return Err(format!(
                        "the server refused the session: {}: {}",
                        e.code, e.message
                    ));
                }
                other => return Err(format!("expected welcome, got {other:?}")),
            };
        s.max_bytes = max_bytes;
        s.settle_up_to = db_version;
        self.migrate(schema_version, migrations).await?;
        self.replica
            .run(move |r| {
                r.drop_staged();
                r.push_abandoned();
                r.set_server_site_id(server_site)?;
                r.set_pushed_version(pushed_version, db_version)
            })
            .await
            .map_err(|e| e.to_string())?;
        self.sessions += 1;
        let session = self.sessions;
        self.status.send_modify(|st| {
            st.connected = true;
            st.sessions = session;
            st.server_version = st.server_version.max(db_version);
            st.last_error = None;
        });
        let _ = self.events.send(Event::Connected {
            session,
            server_version: db_version,
            pushed_version,
        });
        for id in std::mem::take(&mut self.pending_unsubscribe) {
            send(&mut s.sink, &ClientMsg::Unsubscribe { id }).await?;
        }
        let subs = self
            .replica
            .run(|r| r.subscriptions())
            .await
            .map_err(|e| e.to_string())?;
        for sub in subs {
            s.syncing.insert(sub.id.clone());
            send(
                &mut s.sink,
                &ClientMsg::Subscribe {
                    id: sub.id,
                    query: sub.query,
                    cursor: sub.cursor,
                },
            )
            .await?;
        }
        self.try_push(s).await?;
        self.refresh_status(s).await;
        Ok(())
    }

    async fn subscribe_one(
        &mut self,
        s: &mut Session,
        id: &str,
    ) -> std::result::Result<(), String> {
        let i = id.to_owned();
        let sub = self.replica.run(move |r| r.subscription(&i)).await;
        match sub {
            Ok(Some(sub)) => {
                s.syncing.insert(sub.id.clone());
                s.live.remove(&sub.id);
                send(
                    &mut s.sink,
                    &ClientMsg::Subscribe {
                        id: sub.id,
                        query: sub.query,
                        cursor: sub.cursor,
                    },
                )
                .await
            }
            Ok(None) => Ok(()),
            Err(e) => {
                self.local_error(e);
                Ok(())
            }
        }
    }

    async fn on_text(&mut self, s: &mut Session, text: &str) -> std::result::Result<(), String> {
        let msg: ServerMsg = match tenantsync_protocol::json::decode(text.as_bytes()) {
            Ok(m) => m,
            Err(e) => {
                self.local_error(format!("unreadable server message: {e}"));
                return Ok(());
            }
        };
        match msg {
            ServerMsg::Welcome { .. } | ServerMsg::Pong { .. } | ServerMsg::Unsubscribed { .. } => {
            }
            ServerMsg::Schema {
                schema_version,
                migrations,
            } => return self.migrate(schema_version, migrations).await,
            ServerMsg::Subscribed { id, table, .. } => {
                s.syncing.insert(id.clone());
                s.live.remove(&id);
                if let Err(e) = self.replica.run(move |r| r.begin_sync(&id, &table)).await {
                    self.local_error(e);
                }
            }
            ServerMsg::Snapshot {
                sub,
                version,
                reset,
                changes,
                evict,
                last,
            } => {
                let id = sub.clone();
                let result = self
                    .replica
                    .run(move |r| r.apply_snapshot(&id, version, reset, changes, evict, last))
                    .await;
                match result {
                    Ok(Some(report)) => {
                        send(
                            &mut s.sink,
                            &ClientMsg::Ack {
                                cursors: report.cursors(),
                            },
                        )
                        .await?;
                        s.syncing.remove(&sub);
                        s.live.insert(sub);
                        if s.syncing.is_empty() {
                            // Every subscription is live: what was
                            // acknowledged meanwhile (at the welcome, by a
                            // lost answer, or by push_ok) settles.
                            let up_to = s.settle_up_to;
                            if let Err(e) = self.replica.run(move |r| r.settle_pushed(up_to)).await
                            {
                                self.local_error(e);
                            }
                        }
                        self.status
                            .send_modify(|st| st.server_version = st.server_version.max(version));
                        let _ = self.events.send(Event::Synced(Box::new(report)));
                        self.refresh_status(s).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.local_error(e);
                        self.resync(s, &sub, None).await?;
                    }
                }
            }
            ServerMsg::Changes {
                version,
                subs,
                more,
            } => {
                let ids: Vec<String> = subs.keys().cloned().collect();
                let result = self
                    .replica
                    .run(move |r| r.apply_changes(version, subs, more))
                    .await;
                match result {
                    Ok(Some(report)) => {
                        if !report.parts.is_empty() {
                            send(
                                &mut s.sink,
                                &ClientMsg::Ack {
                                    cursors: report.cursors(),
                                },
                            )
                            .await?;
                        }
                        for gap in &report.gaps {
                            if !s.syncing.contains(&gap.sub) {
                                self.resync(s, &gap.sub, gap.cursor).await?;
                            }
                        }
                        self.status
                            .send_modify(|st| st.server_version = st.server_version.max(version));
                        let _ = self.events.send(Event::Checkpoint(Box::new(report)));
                        self.refresh_status(s).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.local_error(e);
                        let _ = self.replica.call(|r| r.drop_staged()).await;
                        for id in ids {
                            if !s.syncing.contains(&id) {
                                self.resync(s, &id, None).await?;
                            }
                        }
                    }
                }
            }
            ServerMsg::PushOk {
                id,
                pushed_version,
                server_version,
            } => {
                if s.inflight.as_ref().is_some_and(|(i, _)| *i == id) {
                    let (_, batch) = s.inflight.take().expect("checked");
                    // The server answers after queueing the commit's
                    // changes: what of the push entered a subscription is
                    // applied by now, so the rest settles.
                    s.settle_up_to = s.settle_up_to.max(server_version);
                    let up_to = s.settle_up_to;
                    let settle = s.syncing.is_empty();
                    let done = self.replica.run(move |r| {
                        r.push_ok(pushed_version, server_version)?;
                        if settle {
                            r.settle_pushed(up_to)?;
                        }
                        Ok(())
                    });
                    if let Err(e) = done.await {
                        self.local_error(e);
                    }
                    self.status.send_modify(|st| st.pushes_ok += 1);
                    let _ = self.events.send(Event::Pushed {
                        from: batch.from,
                        to: batch.to,
                        changes: batch.changes.len(),
                        server_version,
                    });
                    self.try_push(s).await?;
                    self.refresh_status(s).await;
                }
            }
            ServerMsg::PushRefused(refusal) => {
                if s.inflight.as_ref().is_some_and(|(i, _)| *i == refusal.id) {
                    let (_, batch) = s.inflight.take().expect("checked");
                    let r2 = refusal.clone();
                    let result = self.replica.run(move |r| r.push_refused(&batch, &r2)).await;
                    self.status.send_modify(|st| st.pushes_refused += 1);
                    match result {
                        Ok(report) => {
                            for sub in &report.refetch {
                                self.resync(s, sub, Some(0)).await?;
                            }
                            let _ = self
                                .events
                                .send(Event::PushRefused(Box::new((refusal, report))));
                        }
                        Err(e) => self.local_error(e),
                    }
                    self.try_push(s).await?;
                    self.refresh_status(s).await;
                }
            }
            ServerMsg::Error(e) => return self.on_error(s, e).await,
        }
        Ok(())
    }

    async fn on_error(&mut self, s: &mut Session, e: ErrorMsg) -> std::result::Result<(), String> {
        let _ = self.events.send(Event::ServerError(e.clone()));
        self.status
            .send_modify(|st| st.last_error = Some(format!("{}: {}", e.code, e.message)));
        if e.code.closes_connection() {
            return Err(format!(
                "the server ended the session: {}: {}",
                e.code, e.message
            ));
        }
        let Some(reference) = e.reference.as_deref() else {
            return Ok(());
        };
        if s.inflight.as_ref().is_some_and(|(i, _)| i == reference) {
            s.inflight = None;
            let _ = self.replica.call(|r| r.push_abandoned()).await;
            match e.code {
                ErrorCode::Gap => {
                    let pv = e.pushed_version.unwrap_or(0);
                    if let Err(err) = self.replica.run(move |r| r.set_pushed_version(pv, 0)).await {
                        self.local_error(err);
                    }
                    self.try_push(s).await?;
                }
                ErrorCode::RateLimited => {
                    let wait = Duration::from_millis(e.retry_after_ms.unwrap_or(1000).max(1));
                    s.push_retry_at = Some(Instant::now() + wait);
                }
                _ => {
                    // A push the server cannot take (bad_push, too_large,
                    // site_mismatch, internal): not retried in this session.
                    s.push_blocked = true;
                }
            }
        } else if s.syncing.remove(reference) {
            // A subscribe or resync refused (query_refused, limit_exceeded):
            // not live in this session.
            s.live.remove(reference);
        }
        Ok(())
    }

    async fn resync(
        &mut self,
        s: &mut Session,
        sub: &str,
        cursor: Option<i64>,
    ) -> std::result::Result<(), String> {
        let cursor = match cursor {
            Some(c) => c,
            None => {
                let id = sub.to_owned();
                self.replica
                    .run(move |r| r.subscription(&id))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|x| x.cursor)
                    .unwrap_or(0)
            }
        };
        s.syncing.insert(sub.to_owned());
        s.live.remove(sub);
        let _ = self.events.send(Event::Resync {
            sub: sub.to_owned(),
            cursor,
        });
        send(
            &mut s.sink,
            &ClientMsg::Resync {
                sub: sub.to_owned(),
                cursor,
            },
        )
        .await
    }

    async fn try_push(&mut self, s: &mut Session) -> std::result::Result<(), String> {
        if s.inflight.is_some() || s.push_blocked || s.push_retry_at.is_some() {
            return Ok(());
        }
        let max = s.max_bytes;
        match self
            .replica
            .run(move |r| Ok((r.next_push(max)?, r.local_version()?)))
            .await
        {
            Ok((Some(batch), local)) => {
                s.last_local = local;
                self.pushes += 1;
                let id = format!("p{}", self.pushes);
                send(&mut s.sink, &batch.to_ws(id.clone())).await?;
                s.inflight = Some((id, batch));
                self.status.send_modify(|st| st.unpushed = true);
            }
            Ok((None, local)) => s.last_local = local,
            Err(e) => {
                if matches!(e, ReplicaError::TransactionTooLarge { .. }) {
                    s.push_blocked = true;
                }
                self.local_error(e);
            }
        }
        Ok(())
    }

    async fn poll_local(&mut self, s: &mut Session) -> std::result::Result<(), String> {
        let local = match self.replica.run(|r| r.local_version()).await {
            Ok(v) => v,
            Err(e) => {
                self.local_error(e);
                return Ok(());
            }
        };
        if local != s.last_local {
            self.try_push(s).await?;
            self.refresh_status(s).await;
        }
        Ok(())
    }

    /// A session ends: its push in flight gets no answer.
    async fn abandon(&mut self, s: &mut Session) {
        if s.inflight.take().is_some() {
            let _ = self.replica.call(|r| r.push_abandoned()).await;
        }
        let _ = self.replica.call(|r| r.drop_staged()).await;
    }

    async fn refresh_status(&mut self, s: &Session) {
        let inflight = s.inflight.is_some();
        let snapshot = self
            .replica
            .run(|r| {
                let cursors: BTreeMap<String, Option<i64>> = r
                    .subscriptions()?
                    .into_iter()
                    .map(|x| (x.id, x.cursor))
                    .collect();
                Ok((
                    cursors,
                    r.pushed_version()?,
                    r.local_version()?,
                    r.has_unpushed()?,
                    r.quarantine()?.len(),
                ))
            })
            .await;
        match snapshot {
            Ok((cursors, pv, local, unpushed, quarantined)) => {
                let live = s.live.clone();
                self.status.send_modify(|st| {
                    st.cursors = cursors;
                    st.pushed_version = pv;
                    st.local_version = local;
                    st.unpushed = unpushed || inflight;
                    st.quarantined = quarantined;
                    st.live = live;
                });
            }
            Err(e) => self.local_error(e),
        }
    }

    fn local_error(&self, e: impl std::fmt::Display) {
        let msg = e.to_string();
        tracing::warn!(error = %msg, "tenantsync client");
        self.status
            .send_modify(|st| st.last_error = Some(msg.clone()));
        let _ = self.events.send(Event::Error(msg));
    }
}

struct Session {
    sink: SplitSink<Ws, Message>,
    stream: SplitStream<Ws>,
    /// Subscriptions whose initial sync is under way.
    syncing: BTreeSet<String>,
    /// Subscriptions live in this session.
    live: BTreeSet<String>,
    /// The push in flight (one at a time: a refusal must be handled before
    /// the next push is planned).
    inflight: Option<(String, PushBatch)>,
    push_blocked: bool,
    push_retry_at: Option<Instant>,
    max_bytes: usize,
    last_local: i64,
    /// The highest server version acknowledged in this session
    /// (`welcome.db_version`, `push_ok.server_version`): pushed rows up to
    /// it settle once every subscription is live.
    settle_up_to: i64,
}

async fn send(
    sink: &mut SplitSink<Ws, Message>,
    msg: &ClientMsg,
) -> std::result::Result<(), String> {
    let text = serde_json::to_string(msg).map_err(|e| format!("cannot encode {msg:?}: {e}"))?;
    sink.send(Message::text(text))
        .await
        .map_err(|e| format!("cannot send to the server: {e}"))
}

fn failed(reason: String, welcomed: bool) -> End {
    End::Failed { reason, welcomed }
}

fn describe_connect_error(url: &str, e: tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            match serde_json::from_str::<tenantsync_protocol::http::ErrorBody>(&body) {
                Ok(err) => format!("{url}: HTTP {status}: {}: {}", err.code, err.message),
                Err(_) => format!("{url}: HTTP {status} {body}"),
            }
        }
        other => format!("cannot connect to {url}: {other}"),
    }
}

/// A delay between 75% and 125% of `d` (so many clients do not reconnect
/// in lockstep).
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::sync_url;

    #[test]
    fn sync_urls() {
        for (base, expected) in [
            ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/v1/sync"),
            ("http://127.0.0.1:8080/", "ws://127.0.0.1:8080/v1/sync"),
            ("https://sync.example", "wss://sync.example/v1/sync"),
            ("ws://h:1/v1/sync", "ws://h:1/v1/sync"),
            ("127.0.0.1:9", "ws://127.0.0.1:9/v1/sync"),
        ] {
            assert_eq!(sync_url(base), expected, "{base}");
        }
    }
}
