//! A real server on 127.0.0.1:0 (the service on a temporary database with
//! examples/ schema and policies, behind the axum edge), and clients for it:
//! HTTP with reqwest, WebSocket with tokio-tungstenite.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tenantsync_core::{ChangesQuery, CrrConnection, Options, SiteFilter, SiteId};
use tenantsync_server::app::{AppState, MetricsRender, Server};
use tenantsync_server::auth::{Authenticator, JwtKey, JwtSettings};
use tenantsync_server::config::EdgeSettings;
use tenantsync_server::{ServiceConfig, SyncService, Synchronous};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::tokens;

pub const SCHEMA: &str = include_str!("../../../examples/schema.sql");
pub const POLICY: &str = include_str!("../../../examples/policy.sql");
pub const SECRET: &str = "edge tests' HS256 secret, 32 B!";

/// What `/metrics` renders in these tests (the binary renders its
/// Prometheus exporter; tests/cli checks that one).
pub const METRICS_TEXT: &str = "# TYPE edge_test_metric counter\nedge_test_metric 1\n";

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Edge settings for tests: a small message limit (4 KiB) so oversized
/// frames are cheap, default timeouts.
pub fn edge() -> EdgeSettings {
    EdgeSettings {
        max_message_bytes: 4096,
        ..EdgeSettings::default()
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(edge(), |_| {}).await
    }

    pub async fn start_with(edge: EdgeSettings, f: impl FnOnce(&mut ServiceConfig)) -> TestServer {
        let jwt = JwtSettings {
            key: JwtKey::Secret(SECRET.as_bytes().to_vec()),
            leeway_secs: 0,
            audience: None,
            issuer: None,
            tenant_claim: "tenant_id".into(),
        };
        TestServer::start_with_jwt(edge, jwt, f).await
    }

    /// A server verifying tokens as `jwt` says (a key set is read first,
    /// as `serve` does).
    pub async fn start_with_jwt(
        edge: EdgeSettings,
        jwt: JwtSettings,
        f: impl FnOnce(&mut ServiceConfig),
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            ServiceConfig::new(dir.path().join("server.db"), SCHEMA, "policy.sql", POLICY);
        config.synchronous = Synchronous::Normal;
        config.limits.max_message_bytes = edge.max_message_bytes;
        f(&mut config);
        let service = tokio::task::spawn_blocking(move || SyncService::start(config))
            .await
            .unwrap()
            .unwrap();
        let auth = Authenticator::new(&jwt).unwrap();
        auth.start().await.unwrap();
        let render: MetricsRender = std::sync::Arc::new(|| METRICS_TEXT.to_owned());
        let state = AppState::new(service, auth, edge, Some(render));
        let server = Server::bind("127.0.0.1:0".parse().unwrap(), state.clone())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone().cancelled_owned()));
        TestServer {
            addr,
            state,
            dir,
            stop,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn service(&self) -> &SyncService {
        self.state.service()
    }

    /// Starts the shutdown and waits for the server to stop (at most 30 s).
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the server stops")
            .unwrap();
    }

    /// Begins the shutdown and returns the server's task, to await later.
    pub fn begin_stop(self) -> (tokio::task::JoinHandle<()>, tempfile::TempDir) {
        self.stop.cancel();
        (self.task, self.dir)
    }

    pub async fn ws(&self, token: Option<&str>) -> Ws {
        Ws::connect(self.addr, token).await.expect("upgrade")
    }

    /// Runs service SQL over HTTP.
    pub async fn sql(&self, sql: &str) -> Json {
        let r = reqwest::Client::new()
            .post(self.url("/v1/sql"))
            .bearer_auth(service_token())
            .json(&json!({"statements": [{"sql": sql, "params": []}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{sql}");
        r.json().await.unwrap()
    }
}

pub fn user_token(sub: &str, tenant: &str) -> String {
    tokens::hs256(SECRET, &tokens::claims(sub, tenant, 3600))
}

pub fn service_token() -> String {
    tokens::hs256(SECRET, &tokens::service_claims(3600))
}

pub fn site(n: u8) -> SiteId {
    let mut b = [0u8; 16];
    b[0] = 0xed;
    b[15] = n;
    SiteId(b)
}

pub fn hello(site: SiteId, token: Option<&str>) -> Json {
    let mut h =
        json!({"type": "hello", "protocol": 1, "site_id": site.to_string(), "client": "edge-test"});
    if let Some(t) = token {
        h["token"] = json!(t);
    }
    h
}

/// A WebSocket client.
pub struct Ws {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the server sent, seen by a test.
#[derive(Debug)]
pub enum Got {
    Msg(Json),
    Close(Option<(u16, String)>),
    /// The connection ended without a close frame.
    Ended,
}

impl Ws {
    pub async fn connect(
        addr: SocketAddr,
        token: Option<&str>,
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let mut req = format!("ws://{addr}/v1/sync")
            .into_client_request()
            .unwrap();
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (socket, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Ws { socket })
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.socket
            .send(Message::Text(text.into().into()))
            .await
            .unwrap();
    }

    pub async fn send(&mut self, msg: Json) {
        self.send_text(msg.to_string()).await;
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.socket
            .send(Message::Binary(bytes.into()))
            .await
            .unwrap();
    }

    /// The next message or close (pings and pongs skipped), within 10 s.
    pub async fn next(&mut self) -> Got {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.socket.next())
                .await
                .expect("the server answers within 10 s");
            match frame {
                None | Some(Err(_)) => return Got::Ended,
                Some(Ok(Message::Text(t))) => {
                    return Got::Msg(serde_json::from_str(t.as_str()).unwrap());
                }
                Some(Ok(Message::Close(c))) => {
                    return Got::Close(c.map(|CloseFrame { code, reason }| {
                        (u16::from(code), reason.as_str().to_owned())
                    }));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next message, which must be one.
    pub async fn msg(&mut self) -> Json {
        match self.next().await {
            Got::Msg(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The next message, which must be of type `ty`.
    pub async fn expect(&mut self, ty: &str) -> Json {
        let m = self.msg().await;
        assert_eq!(m["type"], ty, "{m}");
        m
    }

    /// The next message must be an `error` with `code` whose message
    /// contains `text`.
    pub async fn expect_error(&mut self, code: &str, text: &str) -> Json {
        let m = self.msg().await;
        assert_eq!(
            (m["type"].as_str(), m["code"].as_str()),
            (Some("error"), Some(code)),
            "{m}"
        );
        let message = m["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(text),
            "{message:?} should contain {text:?}"
        );
        m
    }

    /// The session must end with an `error` `code` and a close frame with
    /// `close_code` and the code as reason.
    pub async fn expect_closed_with(&mut self, code: &str, close_code: u16) {
        self.expect_error(code, "").await;
        match self.next().await {
            Got::Close(Some((c, reason))) => assert_eq!((c, reason.as_str()), (close_code, code)),
            other => panic!("expected a close frame {close_code}, got {other:?}"),
        }
    }

    /// hello, then the welcome.
    pub async fn open(&mut self, site: SiteId, token: Option<&str>) -> Json {
        self.send(hello(site, token)).await;
        self.expect("welcome").await
    }

    pub async fn ping(&mut self, id: &str) {
        self.send(json!({"type": "ping", "id": id})).await;
        let m = self.expect("pong").await;
        assert_eq!(m["id"], id);
    }
}

/// A replica's own changes, as a push body would carry them: `sql` run on a
/// fresh in-memory replica with `site`'s id, then its changes `(0, v]`.
pub fn local_changes(site: SiteId, sql: &str) -> (i64, Vec<tenantsync_core::Change>) {
    let db = CrrConnection::open_with(
        ":memory:",
        Options {
            site_id: Some(site),
            ..Options::default()
        },
    )
    .unwrap();
    db.conn().execute_batch(SCHEMA).unwrap();
    db.conn().execute_batch(sql).unwrap();
    let to = db.db_version().unwrap();
    let changes = db
        .changes(&ChangesQuery {
            since: 0,
            until: Some(to),
            site: SiteFilter::Only(site),
            ..ChangesQuery::default()
        })
        .unwrap();
    (to, changes)
}
