//! Plain HTTP: [`HttpClient`] (`GET /v1/schema`, one `POST /v1/push`, one
//! `POST /v1/pull`) and [`sync_round`], one whole round of push and pull as
//! `tenantsync replica sync` runs it (docs/CLI.md).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::http::{
    ErrorBody, PullRequest, PullResponse, PullSub, PushRequest, PushResponse, SchemaResponse,
};
use tenantsync_protocol::ws::PushRefusal;

use crate::error::ReplicaError;
use crate::handle::ReplicaHandle;
use crate::replica::{ApplyReport, RefusalReport, RemoveReport};

/// An HTTP call that failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The server answered an error body.
    #[error("{method} {path}: HTTP {status}: {}: {}", .body.code, .body.message)]
    Server {
        /// `GET`, `POST`.
        method: &'static str,
        /// The endpoint.
        path: &'static str,
        /// The HTTP status.
        status: u16,
        /// The error body.
        body: ErrorBody,
    },
    /// The server answered something that is not the protocol's.
    #[error("{method} {path}: HTTP {status}: unexpected answer: {detail}")]
    Unexpected {
        /// `GET`, `POST`.
        method: &'static str,
        /// The endpoint.
        path: &'static str,
        /// The HTTP status.
        status: u16,
        /// What was wrong, with the start of the body.
        detail: String,
    },
    /// No answer: connection refused, timeout, ...
    #[error("{method} {path}: {source}")]
    Transport {
        /// `GET`, `POST`.
        method: &'static str,
        /// The endpoint.
        path: &'static str,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}

impl HttpError {
    /// The protocol's error code, when the server gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            HttpError::Server { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

/// The answer to a push.
#[derive(Debug, Clone, PartialEq)]
pub enum PushAnswer {
    /// Applied (or a duplicate).
    Ok(PushResponse),
    /// Refused whole by the write policies.
    Refused(Box<PushRefusal>),
}

/// A client of a server's HTTP endpoints with one bearer token.
#[derive(Debug, Clone)]
pub struct HttpClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl HttpClient {
    /// A client of the server at `base` (`http://127.0.0.1:8080`).
    pub fn new(base: &str, token: &str) -> Result<HttpClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()?;
        let base = base.trim_end_matches('/');
        let base = if let Some(rest) = base.strip_prefix("ws://") {
            format!("http://{rest}")
        } else if let Some(rest) = base.strip_prefix("wss://") {
            format!("https://{rest}")
        } else if base.starts_with("http://") || base.starts_with("https://") {
            base.to_owned()
        } else {
            format!("http://{base}")
        };
        Ok(HttpClient {
            base,
            token: token.to_owned(),
            http,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /v1/schema`.
    pub async fn schema(&self) -> Result<SchemaResponse, HttpError> {
        const PATH: &str = "/v1/schema";
        let resp = self
            .http
            .get(format!("{}{PATH}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| HttpError::Transport {
                method: "GET",
                path: PATH,
                source,
            })?;
        decode("GET", PATH, resp).await
    }

    /// `POST /v1/push`.
    pub async fn push(&self, req: &PushRequest) -> Result<PushAnswer, HttpError> {
        const PATH: &str = "/v1/push";
        let resp = self.post(PATH, req).await?;
        let status = resp.status().as_u16();
        let bytes = body("POST", PATH, resp).await?;
        if status == 403
            && let Ok(refusal) = serde_json::from_slice::<RefusalBody>(&bytes)
        {
            return Ok(PushAnswer::Refused(Box::new(refusal.into_refusal())));
        }
        parse("POST", PATH, status, &bytes).map(PushAnswer::Ok)
    }

    /// `POST /v1/pull`.
    pub async fn pull(&self, req: &PullRequest) -> Result<PullResponse, HttpError> {
        const PATH: &str = "/v1/pull";
        let resp = self.post(PATH, req).await?;
        decode("POST", PATH, resp).await
    }

    async fn post(
        &self,
        path: &'static str,
        body: &impl Serialize,
    ) -> Result<reqwest::Response, HttpError> {
        let json = serde_json::to_vec(body).expect("request bodies serialise");
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(json)
            .send()
            .await
            .map_err(|source| HttpError::Transport {
                method: "POST",
                path,
                source,
            })
    }
}

/// A refusal body: the `push_refused` fields without `type`.
#[derive(serde::Deserialize)]
struct RefusalBody {
    #[serde(default)]
    id: String,
    code: ErrorCode,
    message: String,
    rows: Vec<tenantsync_protocol::ws::RefusedRow>,
    #[serde(with = "tenantsync_protocol::change::array_list")]
    state: Vec<tenantsync_core::Change>,
    invisible: Vec<tenantsync_protocol::RowKey>,
    pushed_version: i64,
}

impl RefusalBody {
    fn into_refusal(self) -> PushRefusal {
        PushRefusal {
            id: self.id,
            code: self.code,
            message: self.message,
            rows: self.rows,
            state: self.state,
            invisible: self.invisible,
            pushed_version: self.pushed_version,
        }
    }
}

async fn body(
    method: &'static str,
    path: &'static str,
    resp: reqwest::Response,
) -> Result<Vec<u8>, HttpError> {
    resp.bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|source| HttpError::Transport {
            method,
            path,
            source,
        })
}

async fn decode<T: serde::de::DeserializeOwned>(
    method: &'static str,
    path: &'static str,
    resp: reqwest::Response,
) -> Result<T, HttpError> {
    let status = resp.status().as_u16();
    let bytes = body(method, path, resp).await?;
    parse(method, path, status, &bytes)
}

fn parse<T: serde::de::DeserializeOwned>(
    method: &'static str,
    path: &'static str,
    status: u16,
    bytes: &[u8],
) -> Result<T, HttpError> {
    let start = || String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
    if (200..300).contains(&status) {
        tenantsync_protocol::json::decode(bytes).map_err(|e| HttpError::Unexpected {
            method,
            path,
            status,
            detail: format!("{e}: {}", start()),
        })
    } else {
        match serde_json::from_slice::<ErrorBody>(bytes) {
            Ok(body) => Err(HttpError::Server {
                method,
                path,
                status,
                body,
            }),
            Err(_) => Err(HttpError::Unexpected {
                method,
                path,
                status,
                detail: start(),
            }),
        }
    }
}

/// What one round should do.
#[derive(Debug, Clone, Default)]
pub struct RoundOptions {
    /// The subscriptions, `(id, query)`. When not empty, this is the
    /// replica's whole set: stored subscriptions not listed are removed.
    /// When empty, the stored subscriptions are synced.
    pub subscriptions: Vec<(String, String)>,
    /// Largest push, in bytes (the server's message limit).
    pub max_push_bytes: usize,
}

/// One subscription's outcome in a round.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SubRound {
    /// The id.
    pub id: String,
    /// The query.
    pub query: String,
    /// `snapshot`, `resume` or `refetch` (as the server answered).
    pub mode: Option<String>,
    /// Rows delivered alive.
    pub rows_received: usize,
    /// Rows delivered deleted.
    pub rows_deleted: usize,
    /// Rows the subscription stopped holding.
    pub rows_released: usize,
    /// The cursor after the round.
    pub cursor: Option<i64>,
}

/// A refused push, as the round reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusedPush {
    /// The range.
    pub from: i64,
    /// The range.
    pub to: i64,
    /// The server's error code.
    pub code: String,
    /// The server's message.
    pub message: String,
    /// The server's refused rows: `table pk: command refused by policy: reason`.
    pub rows: Vec<String>,
    /// What the replica did.
    pub report: RefusalReport,
}

/// What [`sync_round`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoundReport {
    /// The server's schema was fetched and applied (a new replica).
    pub schema_applied: bool,
    /// The replica's schema version after the round.
    pub schema_version: i64,
    /// The version the replica migrated from, when it did (docs/PROTOCOL.md
    /// §5.4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrated_from: Option<i64>,
    /// Changes pushed and applied.
    pub pushed_changes: usize,
    /// Pushes applied.
    pub pushes: usize,
    /// The server's pushed_version after the round.
    pub pushed_version: i64,
    /// Refused pushes.
    pub refused: Vec<RefusedPush>,
    /// Per subscription.
    pub subscriptions: Vec<SubRound>,
    /// Subscriptions removed (stored but not listed).
    pub unsubscribed: Vec<String>,
    /// Rows removed from the replica (held by no subscription any more).
    pub rows_removed: usize,
    /// Local changes quarantined in this round (by refusals).
    pub quarantined: usize,
    /// The server version every subscription reached.
    pub version: Option<i64>,
}

/// Brings the replica to the server's schema when it is below version
/// `at_least` (1: a new replica; a pull answer's `schema_version`): one
/// `GET /v1/schema`, then the migrations above the replica's version.
async fn migrate(
    replica: &ReplicaHandle,
    http: &HttpClient,
    at_least: i64,
    report: &mut RoundReport,
) -> Result<(), RoundError> {
    if replica.run(|r| r.schema_version()).await? >= at_least {
        return Ok(());
    }
    let schema = http.schema().await?;
    let (from, to) = replica.run(move |r| r.migrate(&schema)).await?;
    if to > from {
        if from == 0 {
            report.schema_applied = true;
        } else {
            report.migrated_from = Some(report.migrated_from.unwrap_or(from));
        }
    }
    Ok(())
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The replica refused something.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// An HTTP call failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The pull kept answering gaps.
    #[error("the server kept answering gaps for {subs:?} after {attempts} pulls")]
    Gaps {
        /// The subscriptions.
        subs: Vec<String>,
        /// Pulls made.
        attempts: usize,
    },
}

/// One round over HTTP (docs/CLI.md, `tenantsync replica sync`): fetch and
/// run the server's schema on a new replica, and migrate the replica before
/// applying a pull answer read at a newer schema version; make the replica's subscriptions
/// `opts.subscriptions`; push every unsynced local change (a refused push
/// is quarantined and restored, and the round goes on); pull every
/// subscription up to date (and unsubscribe the removed ones), applied in
/// one transaction with the cursors. A refused push is in
/// [`RoundReport::refused`], not an error.
pub async fn sync_round(
    replica: &ReplicaHandle,
    http: &HttpClient,
    opts: &RoundOptions,
) -> Result<RoundReport, RoundError> {
    let mut report = RoundReport::default();
    // 1. Schema.
    migrate(replica, http, 1, &mut report).await?;
    // 2. Subscriptions.
    if !opts.subscriptions.is_empty() {
        let wanted = opts.subscriptions.clone();
        let removed = replica
            .run(move |r| {
                for (id, query) in &wanted {
                    r.add_subscription(id, query)?;
                }
                let keep: BTreeSet<&str> = wanted.iter().map(|(i, _)| i.as_str()).collect();
                Ok(r.subscriptions()?
                    .into_iter()
                    .filter(|s| !keep.contains(s.id.as_str()))
                    .map(|s| s.id)
                    .collect::<Vec<_>>())
            })
            .await?;
        report.unsubscribed = removed;
    }
    // 3. Push.
    let site = replica.call(|r| r.site_id()).await?;
    let max = if opts.max_push_bytes == 0 {
        tenantsync_protocol::DEFAULT_MAX_MESSAGE_BYTES
    } else {
        opts.max_push_bytes
    };
    let mut gaps = 0;
    loop {
        let Some(batch) = replica.run(move |r| r.next_push(max)).await? else {
            break;
        };
        match http.push(&batch.to_http(site)).await {
            Ok(PushAnswer::Ok(ok)) => {
                let (pv, sv) = (ok.pushed_version, ok.server_version);
                replica.run(move |r| r.push_ok(pv, sv)).await?;
                report.pushes += 1;
                report.pushed_changes += batch.changes.len();
            }
            Ok(PushAnswer::Refused(refusal)) => {
                let (b, rf) = (batch.clone(), (*refusal).clone());
                let done = replica.run(move |r| r.push_refused(&b, &rf)).await?;
                report.quarantined += done.quarantined;
                report.refused.push(RefusedPush {
                    from: batch.from,
                    to: batch.to,
                    code: refusal.code.to_string(),
                    message: refusal.message.clone(),
                    rows: refusal
                        .rows
                        .iter()
                        .map(|r| {
                            format!(
                                "{} {}: {} refused{}: {}",
                                r.table,
                                r.pk,
                                r.command,
                                r.policy
                                    .as_deref()
                                    .map(|p| format!(" by policy {p}"))
                                    .unwrap_or_default(),
                                r.reason
                            )
                        })
                        .collect(),
                    report: done,
                });
            }
            Err(HttpError::Server { body, .. })
                if body.code == ErrorCode::Gap && body.pushed_version.is_some() && gaps < 3 =>
            {
                gaps += 1;
                replica.call(|r| r.push_abandoned()).await?;
                let pv = body.pushed_version.unwrap_or(0);
                replica.run(move |r| r.set_pushed_version(pv, 0)).await?;
            }
            Err(HttpError::Server { body, .. })
                if body.code == ErrorCode::RateLimited && gaps < 3 =>
            {
                gaps += 1;
                replica.call(|r| r.push_abandoned()).await?;
                let wait = body.retry_after_ms.unwrap_or(1000).min(30_000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(e) => {
                replica.call(|r| r.push_abandoned()).await?;
                return Err(e.into());
            }
        }
    }
    report.pushed_version = replica.run(|r| r.pushed_version()).await?;
    // 4. Pull.
    let unsubscribe = report.unsubscribed.clone();
    let mut parts: BTreeMap<String, SubRound> = BTreeMap::new();
    let mut attempts = 0;
    loop {
        let subs = replica.run(|r| r.subscriptions()).await?;
        let subs: Vec<_> = subs
            .into_iter()
            .filter(|s| !unsubscribe.contains(&s.id))
            .collect();
        if subs.is_empty() && unsubscribe.is_empty() {
            break;
        }
        let req = PullRequest {
            site_id: site,
            subscriptions: subs
                .iter()
                .map(|s| PullSub {
                    id: s.id.clone(),
                    query: s.query.clone(),
                    cursor: s.cursor,
                })
                .collect(),
            wait_ms: 0,
            unsubscribe: if attempts == 0 {
                unsubscribe.clone()
            } else {
                Vec::new()
            },
        };
        let resp = http.pull(&req).await?;
        attempts += 1;
        migrate(replica, http, resp.schema_version, &mut report).await?;
        let modes: BTreeMap<String, String> = resp
            .subs
            .iter()
            .map(|(id, p)| {
                let m = serde_json::to_value(p.mode)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                (id.clone(), m)
            })
            .collect();
        let applied: ApplyReport = replica.run(move |r| r.apply_pull(&resp)).await?;
        report.version = Some(applied.version);
        report.rows_removed += applied.rows_removed;
        for s in &subs {
            let e = parts.entry(s.id.clone()).or_insert_with(|| SubRound {
                id: s.id.clone(),
                query: s.query.clone(),
                ..SubRound::default()
            });
            if let Some(m) = modes.get(&s.id) {
                e.mode = Some(m.clone());
            }
        }
        for p in &applied.parts {
            if let Some(e) = parts.get_mut(&p.sub) {
                e.rows_received += p.rows_received;
                e.rows_deleted += p.rows_deleted;
                e.rows_released += p.rows_released;
            }
        }
        if applied.gaps.is_empty() {
            break;
        }
        if attempts >= 3 {
            return Err(RoundError::Gaps {
                subs: applied.gaps.into_iter().map(|g| g.sub).collect(),
                attempts,
            });
        }
    }
    // 5. Removed subscriptions leave the replica.
    for id in &unsubscribe {
        let i = id.clone();
        let done: RemoveReport = replica.run(move |r| r.remove_subscription(&i)).await?;
        report.rows_removed += done.rows_removed;
    }
    let cursors: BTreeMap<String, Option<i64>> = replica
        .run(|r| {
            Ok(r.subscriptions()?
                .into_iter()
                .map(|s| (s.id, s.cursor))
                .collect())
        })
        .await?;
    for (id, e) in parts.iter_mut() {
        e.cursor = cursors.get(id).copied().flatten();
    }
    report.subscriptions = parts.into_values().collect();
    report.pushed_version = replica.run(|r| r.pushed_version()).await?;
    report.schema_version = replica.run(|r| r.schema_version()).await?;
    Ok(report)
}
