//! The server: the router of docs/PROTOCOL.md §8, the listener, and the
//! shutdown sequence.
//!
//! - [`AppState`]: what every handler shares (the service, the token
//!   verifier, the edge settings, the `/metrics` renderer, the shutdown
//!   tokens and the tracker of WebSocket tasks).
//! - [`router`]: the routes (handlers in [`crate::http`] and
//!   [`crate::ws`]).
//! - [`Server`]: binds, serves until a shutdown signal, then shuts down in
//!   order: stop accepting; close sockets still before `hello`
//!   (`shutting_down`); [`SyncService::shutdown`] (open sessions get
//!   `shutting_down` and a close frame through their outbox; cursors are
//!   persisted, the WAL checkpointed); wait for the WebSocket tasks; wait
//!   for HTTP requests in flight. Each wait is bounded by
//!   `shutdown_timeout`; sockets still open after it are closed at once.
//!   axum's graceful shutdown does not track upgraded connections, so the
//!   WebSocket tasks run under a [`TaskTracker`].
//! - [`reload_schema_file`], [`reload_policy_file`], [`Signals`]: SIGHUP's
//!   schema and policy reloads, SIGINT and SIGTERM.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::{PolicyReloadResponse, SchemaChangeResponse};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::EdgeSettings;
use crate::service::{ApiError, SyncService};

/// Renders the Prometheus text for `GET /metrics` (the binary passes its
/// exporter's handle; the library installs no recorder).
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    service: SyncService,
    auth: Authenticator,
    edge: EdgeSettings,
    metrics: Option<MetricsRender>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    /// Set when this server is a node of a cluster.
    cluster: Option<crate::cluster::Node>,
}

impl AppState {
    /// The state for `service`, verifying tokens with `auth`.
    pub fn new(
        service: SyncService,
        auth: Authenticator,
        edge: EdgeSettings,
        metrics: Option<MetricsRender>,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                service,
                auth,
                edge,
                metrics,
                shutdown: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
                tracker: TaskTracker::new(),
                cluster: None,
            }),
        }
    }

    /// This state for a node of a cluster (before the state is shared).
    pub fn with_cluster(mut self, node: crate::cluster::Node) -> AppState {
        Arc::get_mut(&mut self.inner)
            .expect("with_cluster before the state is shared")
            .cluster = Some(node);
        self
    }

    /// The cluster node this server is, if it is one.
    pub fn cluster(&self) -> Option<&crate::cluster::Node> {
        self.inner.cluster.as_ref()
    }

    /// The service.
    pub fn service(&self) -> &SyncService {
        &self.inner.service
    }

    /// The token verifier.
    pub fn auth(&self) -> &Authenticator {
        &self.inner.auth
    }

    /// The edge settings.
    pub fn edge(&self) -> &EdgeSettings {
        &self.inner.edge
    }

    /// Whether the server is shutting down.
    pub fn shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    pub(crate) fn metrics(&self) -> Option<&MetricsRender> {
        self.inner.metrics.as_ref()
    }

    pub(crate) fn ws_context(&self) -> crate::ws::Context<'_> {
        crate::ws::Context {
            auth: &self.inner.auth,
            edge: &self.inner.edge,
            shutdown: &self.inner.shutdown,
            hard_stop: &self.inner.hard_stop,
        }
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }
}

/// The routes of docs/PROTOCOL.md §8.
pub fn router(state: AppState) -> Router {
    let body_limit = state.edge().max_message_bytes;
    Router::new()
        .route("/v1/sync", get(crate::http::sync))
        .route("/v1/push", post(crate::http::push))
        .route("/v1/pull", post(crate::http::pull))
        .route("/v1/schema", get(crate::http::schema))
        .route("/v1/health", get(crate::http::health))
        .route("/v1/health/live", get(crate::http::live))
        .route("/v1/health/ready", get(crate::http::ready))
        .route("/metrics", get(crate::http::metrics))
        .route("/v1/sql", post(crate::http::sql))
        .route("/v1/admin/policy", post(crate::http::reload_policy))
        .route("/v1/admin/schema", post(crate::http::change_schema))
        .route("/v1/admin/status", get(crate::http::admin_status))
        .route("/v1/admin/cluster", get(crate::http::admin_cluster))
        .route("/v1/admin/peers/{site_id}", get(crate::http::peer_report))
        .fallback(crate::http::not_found)
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// Per request: a tracing span, a count and a duration by endpoint and
/// status.
async fn observe(req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().clone();
    // Who asks, once the token verified (`http::header_principal`), and
    // the peer of a push or pull: in every line logged for the request.
    let span = tracing::info_span!(
        "http",
        %method,
        endpoint = %endpoint,
        tenant = tracing::field::Empty,
        subject = tracing::field::Empty,
        peer = tracing::field::Empty,
    );
    let started = Instant::now();
    let response = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let status = response.status().as_u16();
    span.in_scope(|| tracing::debug!(status, "answered"));
    metrics::counter!(
        "tenantsync_http_requests_total",
        "endpoint" => endpoint.clone(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("tenantsync_http_request_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Counts an error answer the edge itself gives (auth, parse, limits).
pub(crate) fn count_edge_error(code: ErrorCode) {
    metrics::counter!("tenantsync_edge_errors_total", "code" => code.as_str()).increment(1);
}

/// A bound listener with its state, ready to serve.
pub struct Server {
    listener: TcpListener,
    state: AppState,
}

impl Server {
    /// Binds `addr` (port 0: any free port).
    pub async fn bind(addr: SocketAddr, state: AppState) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Server { listener, state })
    }

    /// The address it listens on (with the real port).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` resolves, then shuts down (see the module
    /// docs). Returns when everything is closed or the timeouts passed.
    pub async fn run(self, signal: impl Future<Output = ()> + Send + 'static) {
        let Server { listener, state } = self;
        let timeout = state.edge().shutdown_timeout;
        let stop_accepting = state.inner.shutdown.clone();
        let serve = axum::serve(listener, router(state.clone()))
            .with_graceful_shutdown(stop_accepting.cancelled_owned())
            .into_future();
        let mut serve = tokio::spawn(serve);
        tokio::select! {
            _ = signal => {}
            res = &mut serve => {
                // Serving ended by itself: an accept loop failure.
                tracing::error!(?res, "the HTTP server stopped");
            }
        }
        shutdown(&state, timeout).await;
        if !serve.is_finished() {
            match tokio::time::timeout(timeout, &mut serve).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!("HTTP requests still in flight after {timeout:?}: dropped");
                    serve.abort();
                }
            }
        }
        tracing::info!("stopped");
    }
}

async fn shutdown(state: &AppState, timeout: Duration) {
    tracing::info!("shutting down: no new connections");
    state.inner.shutdown.cancel();
    if tokio::time::timeout(timeout, state.service().shutdown(timeout))
        .await
        .is_err()
    {
        tracing::warn!("the service did not stop within {timeout:?}");
    }
    let tracker = state.tracker();
    tracker.close();
    if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            "WebSocket sessions still open after {timeout:?}: closing them now"
        );
        state.inner.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
}

/// Why a policy file reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read; the old policies stay.
    #[error("cannot read the policy file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The service refused the new policies (`policy_invalid` with every
    /// diagnostic); the old ones stay.
    #[error("{0}")]
    Refused(ApiError),
}

/// Re-reads the policy file and replaces the policy set if it is valid
/// (SIGHUP). A bad file keeps the old set; every diagnostic is logged.
pub async fn reload_policy_file(
    service: &SyncService,
    path: &Path,
) -> Result<PolicyReloadResponse, ReloadError> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(source) => {
            tracing::error!(path = %path.display(), error = %source,
                "policy reload: cannot read the file; the current policies stay");
            return Err(ReloadError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    match service
        .reload_policy(&path.display().to_string(), &text)
        .await
    {
        Ok(r) => {
            tracing::info!(path = %path.display(), changed_views = r.changed_views,
                moved_subscriptions = r.moved_subscriptions, "policies reloaded");
            Ok(r)
        }
        Err(e) => {
            log_refused_reload(&path.display().to_string(), &e);
            Err(ReloadError::Refused(e))
        }
    }
}

/// Re-reads the schema script and applies what it adds as a schema change
/// (SIGHUP, before the policy file: new policies may read new columns).
/// Statements creating what exists are skipped, so an unchanged file
/// changes nothing; a refused change is logged and nothing is applied.
pub async fn reload_schema_file(
    service: &SyncService,
    path: &Path,
) -> Result<SchemaChangeResponse, ReloadError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|source| {
        tracing::error!(path = %path.display(), error = %source,
                "schema reload: cannot read the file; the schema stays");
        ReloadError::Read {
            path: path.to_owned(),
            source,
        }
    })?;
    match service.change_schema(&text).await {
        Ok(r) => {
            if r.changed {
                tracing::info!(path = %path.display(), schema_version = r.schema_version,
                    statements = r.applied.len(), "schema changed");
            }
            Ok(r)
        }
        Err(e) => {
            tracing::error!(path = %path.display(), code = %e.code,
                "schema reload refused: {}; the schema stays", e.message);
            for d in &e.diagnostics {
                tracing::error!(path = %path.display(), "{d}");
            }
            Err(ReloadError::Refused(e))
        }
    }
}

pub(crate) fn log_refused_reload(source: &str, e: &ApiError) {
    tracing::error!(source, code = %e.code, "policy reload refused: {}; the current policies stay", e.message);
    for d in &e.diagnostics {
        tracing::error!(source, "{d}");
    }
}

/// The process signals the server reacts to: SIGINT and SIGTERM stop it,
/// SIGHUP reloads the policy file. Installed by [`Signals::install`] (before
/// the address is announced, so no signal is missed); for the binary.
#[cfg(unix)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves at SIGINT or SIGTERM; runs `on_hangup` at every SIGHUP
    /// before that.
    pub async fn stop<F, Fut>(mut self, mut on_hangup: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            tokio::select! {
                _ = self.term.recv() => { tracing::info!("SIGTERM"); return; }
                _ = self.int.recv() => { tracing::info!("SIGINT"); return; }
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading the policy file");
                    on_hangup().await;
                }
            }
        }
    }
}
