//! The HTTP handlers of docs/PROTOCOL.md §8 and their extractors.
//!
//! - [`Caller`]: the verified `Authorization: Bearer` token (`unauthorized`,
//!   `token_expired`, `token_not_yet_valid`: 401).
//! - [`ServiceCaller`]: a caller with the service role (`forbidden`: 403).
//! - [`JsonBody`]: a JSON body under the message limit (`too_large`: 413;
//!   `bad_message`: 400 naming the field at fault).
//! - [`HttpError`]: an [`ApiError`] as a response: the code's status and the
//!   body `{code, message, diagnostics?, pushed_version?, retry_after_ms?}`.
//!
//! Extractors run in that order (token, role, body), so an unauthenticated
//! request is refused before its body is read.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{
    FromRequest, FromRequestParts, OptionalFromRequestParts, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tenantsync_core::SiteId;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::{
    PolicyReloadRequest, PullRequest, PushRequest, SchemaChangeRequest, SqlRequest,
};

use crate::app::AppState;
use crate::service::{ApiError, Principal, PushError};

/// An error answer.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl HttpError {
    fn new(code: ErrorCode, message: impl Into<String>) -> HttpError {
        HttpError(ApiError::new(code, message))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        error_response(status, &self.0)
    }
}

fn error_response(status: StatusCode, e: &ApiError) -> Response {
    crate::app::count_edge_error(e.code);
    (status, Json(e.body())).into_response()
}

/// The verified caller of a request.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        match header_principal(&parts.headers, state).await? {
            Some(p) => Ok(Caller(p)),
            None => Err(HttpError::new(
                ErrorCode::Unauthorized,
                "no token: send `Authorization: Bearer <token>`",
            )),
        }
    }
}

impl OptionalFromRequestParts<AppState> for Caller {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Option<Self>, HttpError> {
        Ok(header_principal(&parts.headers, state).await?.map(Caller))
    }
}

/// The principal of the `Authorization` header: `None` without one, an
/// error when it does not verify.
async fn header_principal(
    headers: &HeaderMap,
    state: &AppState,
) -> Result<Option<Principal>, HttpError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| {
        HttpError::new(
            ErrorCode::Unauthorized,
            "the Authorization header is not ASCII text",
        )
    })?;
    let p = state.auth().authenticate_header(value).await?;
    let span = tracing::Span::current();
    span.record("subject", p.subject.as_str());
    span.record("tenant", p.tenant.as_deref().unwrap_or(""));
    Ok(Some(p))
}

/// A verified caller with the service role.
pub struct ServiceCaller(pub Principal);

impl FromRequestParts<AppState> for ServiceCaller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let Caller(p) =
            <Caller as FromRequestParts<AppState>>::from_request_parts(parts, state).await?;
        if !p.service {
            return Err(HttpError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} {} needs a token with role `service` (the token of `{}` has not)",
                    parts.method,
                    parts.uri.path(),
                    p.subject
                ),
            ));
        }
        Ok(ServiceCaller(p))
    }
}

/// A JSON request body of type `T`, read under the message limit.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        tenantsync_protocol::json::decode(&bytes)
            .map(JsonBody)
            .map_err(|e| {
                HttpError::new(ErrorCode::BadMessage, format!("invalid request body: {e}"))
            })
    }
}

fn body_rejection(r: BytesRejection) -> HttpError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        HttpError::new(
            ErrorCode::TooLarge,
            "the request body is over the limit (limits.max_message_bytes)",
        )
    } else {
        HttpError::new(
            ErrorCode::BadMessage,
            format!("cannot read the request body: {}", r.body_text()),
        )
    }
}

fn json<T: serde::Serialize>(value: T) -> Response {
    Json(value).into_response()
}

fn refuse_when_shutting_down(state: &AppState) -> Result<(), HttpError> {
    if state.shutting_down() {
        return Err(HttpError::new(
            ErrorCode::ShuttingDown,
            "the server is shutting down",
        ));
    }
    Ok(())
}

/// `GET /v1/sync`: the WebSocket upgrade. A token in the `Authorization`
/// header is checked here (401 without upgrading when it does not verify);
/// without one the session must bring it in `hello.token`.
pub async fn sync(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Option<Caller>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, HttpError> {
    refuse_when_shutting_down(&state)?;
    let upgrade = upgrade.map_err(|r| {
        HttpError::new(
            ErrorCode::BadMessage,
            format!("GET /v1/sync is a WebSocket endpoint: {}", r.body_text()),
        )
    })?;
    let principal = caller.map(|Caller(p)| p);
    let relay = crate::ws::Relay {
        upgrade_auth: headers.get(header::AUTHORIZATION).cloned(),
        forwarded: headers.contains_key(crate::forward::FORWARDED),
    };
    let max = state.edge().max_message_bytes;
    let cap = crate::ws::transport_cap(max);
    let tracker = state.tracker().clone();
    Ok(upgrade
        .max_message_size(cap)
        .max_frame_size(cap)
        .read_buffer_size(crate::ws::READ_BUFFER)
        .write_buffer_size(crate::ws::WRITE_BUFFER)
        .max_write_buffer_size(crate::ws::write_buffer_cap(max))
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket: WebSocket| {
            tracker.track_future(async move {
                metrics::gauge!("tenantsync_ws_sockets").increment(1.0);
                let (sink, stream) = socket.split();
                crate::ws::run_session(
                    sink,
                    stream,
                    state.ws_context(),
                    state.service(),
                    principal,
                    relay,
                )
                .await;
                metrics::gauge!("tenantsync_ws_sockets").decrement(1.0);
            })
        }))
}

/// `POST /v1/push`.
pub async fn push(
    State(state): State<AppState>,
    headers: HeaderMap,
    Caller(p): Caller,
    JsonBody(req): JsonBody<PushRequest>,
) -> Result<Response, HttpError> {
    refuse_when_shutting_down(&state)?;
    tracing::Span::current().record("peer", tracing::field::display(&req.site_id));
    if let Some(base) = crate::forward::target(&state, &headers, p.tenant.as_deref()) {
        return Ok(forward_json(&state, &base, "/v1/push", &headers, &req).await);
    }
    match state.service().push(&p, req).await {
        Ok(r) => Ok(json(r)),
        Err(PushError::Refused(refusal)) => {
            crate::app::count_edge_error(refusal.code);
            Ok((StatusCode::FORBIDDEN, Json(*refusal)).into_response())
        }
        Err(PushError::Api(e)) => Err(e.into()),
    }
}

/// `POST /v1/pull` (long-poll with `wait_ms`).
pub async fn pull(
    State(state): State<AppState>,
    headers: HeaderMap,
    Caller(p): Caller,
    JsonBody(req): JsonBody<PullRequest>,
) -> Result<Response, HttpError> {
    refuse_when_shutting_down(&state)?;
    tracing::Span::current().record("peer", tracing::field::display(&req.site_id));
    if let Some(base) = crate::forward::target(&state, &headers, p.tenant.as_deref()) {
        return Ok(forward_json(&state, &base, "/v1/pull", &headers, &req).await);
    }
    Ok(json(state.service().pull(&p, req).await?))
}

/// `GET /v1/schema`.
pub async fn schema(
    State(state): State<AppState>,
    headers: HeaderMap,
    Caller(p): Caller,
) -> Response {
    if let Some(base) = crate::forward::target(&state, &headers, p.tenant.as_deref()) {
        return crate::forward::http(
            &state,
            &base,
            Method::GET,
            "/v1/schema",
            &headers,
            Vec::new(),
        )
        .await;
    }
    json(state.service().schema())
}

/// Passes a request with a JSON body on to the node running the shard.
async fn forward_json<T: serde::Serialize>(
    state: &AppState,
    base: &str,
    path: &str,
    headers: &HeaderMap,
    body: &T,
) -> Response {
    let body = serde_json::to_vec(body).expect("a request serializes");
    crate::forward::http(state, base, Method::POST, path, headers, body).await
}

/// `GET /v1/health` (no token): 200 `{status: "ok"}`, 503 `shutting_down`
/// once a shutdown began. It says nothing of the data: no version, no
/// count (docs/POLICY.md, "What a client can observe").
pub async fn health(State(state): State<AppState>) -> Result<Response, HttpError> {
    refuse_when_shutting_down(&state)?;
    Ok(json(serde_json::json!({ "status": "ok" })))
}

/// `GET /v1/health/live` (no token): 200 `{status: "alive"}` while the
/// process answers, shutting down included (an orchestrator restarts a
/// process that stops answering, not one that is busy).
pub async fn live() -> Response {
    json(serde_json::json!({ "status": "alive" }))
}

/// `GET /v1/health/ready` (no token): 200 `{status: "ready"}` when the
/// server takes traffic; 503 `{status: "not_ready", reasons: [...]}` while
/// it shuts down, before its token key set was read, or while a shard
/// cannot write (its engine stopped or its last commit failed). A load
/// balancer sends traffic by it; the reasons name no tenant.
pub async fn ready(State(state): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    if state.shutting_down() {
        reasons.push("the server is shutting down".to_owned());
    }
    if !state.auth().is_ready() {
        reasons.push("the token key set (JWKS) has not been read yet".to_owned());
    }
    reasons.extend(state.service().not_ready());
    if reasons.is_empty() {
        return json(serde_json::json!({ "status": "ready" }));
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "status": "not_ready", "reasons": reasons })),
    )
        .into_response()
}

/// `GET /metrics` (service role): the Prometheus text format. Its counters
/// count every tenant's traffic, so they are not for clients.
pub async fn metrics(State(state): State<AppState>, _caller: ServiceCaller) -> Response {
    let text = match state.metrics() {
        Some(render) => render(),
        None => "# no metrics recorder is installed in this process\n".to_owned(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `POST /v1/sql` (service role).
pub async fn sql(
    State(state): State<AppState>,
    headers: HeaderMap,
    ServiceCaller(p): ServiceCaller,
    JsonBody(req): JsonBody<SqlRequest>,
) -> Result<Response, HttpError> {
    refuse_when_shutting_down(&state)?;
    let tenant = req.tenant.as_deref().or(p.tenant.as_deref());
    if let Some(base) = crate::forward::target(&state, &headers, tenant) {
        return Ok(forward_json(&state, &base, "/v1/sql", &headers, &req).await);
    }
    let statements = req.statements.len();
    let result = state.service().sql(&p, req).await;
    match &result {
        Ok(r) => tracing::info!(target: "tenantsync::service_call", subject = %p.subject,
            endpoint = "/v1/sql", statements, db_version = r.db_version, "service SQL applied"),
        Err(e) => tracing::info!(target: "tenantsync::service_call", subject = %p.subject,
            endpoint = "/v1/sql", statements, code = %e.code, "service SQL refused: {}", e.message),
    }
    Ok(json(result?))
}

/// `POST /v1/admin/policy` (service role): replaces the policy set, or
/// answers 400 `policy_invalid` with every diagnostic (the old set stays).
pub async fn reload_policy(
    State(state): State<AppState>,
    ServiceCaller(p): ServiceCaller,
    JsonBody(req): JsonBody<PolicyReloadRequest>,
) -> Result<Response, HttpError> {
    refuse_when_shutting_down(&state)?;
    const SOURCE: &str = "POST /v1/admin/policy";
    match state.service().reload_policy(SOURCE, &req.policy_sql).await {
        Ok(r) => {
            if let Some(node) = state.cluster()
                && let Err(e) = node.publish_policy(SOURCE, &req.policy_sql).await
            {
                return Err(HttpError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the policies are in force on this node's shards, but the cluster did not take them ({e}); post them again"
                    ),
                ));
            }
            tracing::info!(target: "tenantsync::service_call", subject = %p.subject,
                endpoint = "/v1/admin/policy", changed_views = r.changed_views,
                moved_subscriptions = r.moved_subscriptions, "policies reloaded");
            Ok(json(r))
        }
        Err(e) => {
            tracing::info!(target: "tenantsync::service_call", subject = %p.subject,
                endpoint = "/v1/admin/policy", code = %e.code, "policy reload refused");
            crate::app::log_refused_reload(SOURCE, &e);
            Err(e.into())
        }
    }
}

/// `POST /v1/admin/schema` (service role): `{"schema_sql"}` applied as a
/// schema change on every shard (`SyncService::change_schema`); 400
/// `schema_refused` with the reason and nothing applied.
pub async fn change_schema(
    State(state): State<AppState>,
    ServiceCaller(p): ServiceCaller,
    JsonBody(req): JsonBody<SchemaChangeRequest>,
) -> Result<Response, HttpError> {
    refuse_when_shutting_down(&state)?;
    match state.service().change_schema(&req.schema_sql).await {
        Ok(r) => {
            tracing::info!(target: "tenantsync::service_call", subject = %p.subject,
                endpoint = "/v1/admin/schema", schema_version = r.schema_version,
                changed = r.changed, "schema change");
            Ok(json(r))
        }
        Err(e) => {
            tracing::warn!(target: "tenantsync::service_call", subject = %p.subject,
                endpoint = "/v1/admin/schema", code = %e.code, "schema change refused: {}", e.message);
            Err(e.into())
        }
    }
}

/// `GET /v1/admin/status` (service role): `{status, db_version, shards:
/// [{shard, db_version, connections, subscriptions, views, pull_states,
/// peers_in_memory}]}` (`db_version` is the highest), what `/v1/health`
/// tells no one.
pub async fn admin_status(
    State(state): State<AppState>,
    _caller: ServiceCaller,
) -> Result<Response, HttpError> {
    refuse_when_shutting_down(&state)?;
    let service = state.service();
    let shards = service.shard_status();
    Ok(json(serde_json::json!({
        "status": "ok",
        "db_version": service.db_version(),
        "schema_version": service.schema_version(),
        "shards": shards,
    })))
}

/// `GET /v1/admin/cluster[?tenant=T]` (service role): the live nodes
/// (id, url, alive), the shards (id, owner, term, this node's place in it
/// and the log sequence it applied) and, with a tenant, its shard and
/// owner (docs/CLUSTER.md). 404 on a server that is not a node of a
/// cluster.
pub async fn admin_cluster(
    State(state): State<AppState>,
    _caller: ServiceCaller,
    Query(q): Query<ClusterQuery>,
) -> Response {
    match state.cluster() {
        Some(node) => json(node.status(q.tenant.as_deref())),
        None => error_response(
            StatusCode::NOT_FOUND,
            &ApiError::new(
                ErrorCode::BadMessage,
                "this server is not a node of a cluster (docs/CLUSTER.md)",
            ),
        ),
    }
}

/// The query of `GET /v1/admin/cluster`.
#[derive(Debug, serde::Deserialize)]
pub struct ClusterQuery {
    /// A tenant whose shard and owner to show.
    pub tenant: Option<String>,
}

/// `GET /v1/admin/peers/{site_id}` (service role).
pub async fn peer_report(
    State(state): State<AppState>,
    ServiceCaller(p): ServiceCaller,
    Path(site): Path<String>,
) -> Result<Response, HttpError> {
    let site: SiteId = site
        .parse()
        .map_err(|e: <SiteId as std::str::FromStr>::Err| {
            HttpError::new(ErrorCode::BadMessage, e.to_string())
        })?;
    tracing::info!(target: "tenantsync::service_call", subject = %p.subject,
        endpoint = "/v1/admin/peers", %site, "peer report");
    Ok(json(state.service().peer_report(site).await?))
}

/// Any other path: 404 with a `bad_message` body.
pub async fn not_found(method: Method, uri: Uri) -> Response {
    let e = ApiError::new(
        ErrorCode::BadMessage,
        format!(
            "no endpoint {method} {} (docs/PROTOCOL.md §8 lists them)",
            uri.path()
        ),
    );
    error_response(StatusCode::NOT_FOUND, &e)
}

/// A known path with another method: 405 with a `bad_message` body.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let e = ApiError::new(
        ErrorCode::BadMessage,
        format!("{} does not take {method}", uri.path()),
    );
    error_response(StatusCode::METHOD_NOT_ALLOWED, &e)
}
