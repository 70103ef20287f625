//! Bodies of the HTTP endpoints (docs/PROTOCOL.md §6-§10).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenantsync_types::Value;
use tenantsync_types::{Change, SiteId};

use crate::change::{RowKey, array_list};
use crate::error::ErrorCode;
use crate::ws::SubscribeMode;

/// `POST /v1/push`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// The pushing peer.
    pub site_id: SiteId,
    /// Exclusive start of the peer's version range.
    pub from: i64,
    /// Inclusive end.
    pub to: i64,
    /// The peer's changes in the range.
    #[serde(with = "array_list")]
    pub changes: Vec<Change>,
}

/// `POST /v1/push` success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// The peer's pushed_version after the push.
    pub pushed_version: i64,
    /// The server version the push committed in (0 for a duplicate).
    pub server_version: i64,
}

/// One subscription of a pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullSub {
    /// Subscription id.
    pub id: String,
    /// The query.
    pub query: String,
    /// The peer's cursor (absent: a new subscription).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<i64>,
}

/// `POST /v1/pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// The pulling peer.
    pub site_id: SiteId,
    /// Its subscriptions.
    pub subscriptions: Vec<PullSub>,
    /// Long-poll: wait up to this long for something after the cursors.
    #[serde(default)]
    pub wait_ms: u64,
    /// Subscriptions to end (the server forgets their cursors).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsubscribe: Vec<String>,
}

/// One subscription's answer in a pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullPart {
    /// What this part is.
    pub mode: SubscribeMode,
    /// Exclusive start of the range (0 for a snapshot).
    pub from: i64,
    /// Drop the subscription's rows that this part does not hold.
    pub reset: bool,
    /// Changes.
    #[serde(default, with = "array_list", skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// Rows that left the subscription.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evict: Vec<RowKey>,
}

/// `POST /v1/pull` answer: every part covers up to `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullResponse {
    /// Server version every part reaches.
    pub version: i64,
    /// The peer's `pushed_version` when the pull began (it only grows): an
    /// HTTP-only peer pushes from there (docs/PROTOCOL.md §8).
    #[serde(default)]
    pub pushed_version: i64,
    /// Subscription id -> its part.
    pub subs: BTreeMap<String, PullPart>,
    /// The server's schema version: a replica behind it migrates before
    /// it applies the parts (docs/PROTOCOL.md §5.4).
    #[serde(default = "first_schema_version")]
    pub schema_version: i64,
}

/// A column in `GET /v1/schema`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    /// Name.
    pub name: String,
    /// Declared type, as written.
    #[serde(rename = "type")]
    pub decl_type: String,
    /// 1-based position in the primary key, 0 if not part of it.
    pub pk: u32,
}

/// A table in `GET /v1/schema`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    /// Name.
    pub name: String,
    /// Columns in table order.
    pub columns: Vec<ColumnInfo>,
    /// Whether it is a CRR (synced).
    pub crr: bool,
}

/// `GET /v1/schema`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaResponse {
    /// The schema version (1: the schema the server first started with;
    /// each applied schema change adds one).
    #[serde(default = "first_schema_version")]
    pub schema_version: i64,
    /// The script a new replica runs: every migration's script, in order.
    pub schema_sql: String,
    /// Every version's script, oldest first: a replica at version `k` runs
    /// those above `k`, each in one transaction (docs/PROTOCOL.md §5.4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<SchemaMigration>,
    /// The synced tables.
    pub tables: Vec<TableInfo>,
}

/// One schema version's script in `GET /v1/schema`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaMigration {
    /// The version the script brings a replica to.
    pub version: i64,
    /// Statements any cr-sqlite 0.16 replica runs as they are (an
    /// `ALTER TABLE` of a CRR comes between `crsql_begin_alter` and
    /// `crsql_commit_alter`).
    pub sql: String,
}

pub(crate) fn first_schema_version() -> i64 {
    1
}

/// `POST /v1/admin/schema` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaChangeRequest {
    /// The statements of the change.
    pub schema_sql: String,
}

/// `POST /v1/admin/schema` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaChangeResponse {
    /// The schema version now (unchanged when every statement was skipped).
    pub schema_version: i64,
    /// Whether the change made a new version.
    pub changed: bool,
    /// The statements that ran.
    pub applied: Vec<String>,
    /// Statements skipped because what they create already exists.
    pub skipped: Vec<String>,
}

/// One statement of `POST /v1/sql`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlStatement {
    /// One SQL statement.
    pub sql: String,
    /// Bound parameters `?1..?n`.
    #[serde(default)]
    pub params: Vec<Value>,
}

/// `POST /v1/sql`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// Statements, run in one transaction.
    pub statements: Vec<SqlStatement>,
    /// The tenant they are for, on a server of several shards (default:
    /// the token's tenant claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// One statement's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SqlResult {
    /// Rows it returned.
    pub rows: Vec<Vec<Value>>,
    /// Rows it changed.
    pub changes: u64,
}

/// `POST /v1/sql` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SqlResponse {
    /// The server version after the transaction.
    pub db_version: i64,
    /// One result per statement.
    pub results: Vec<SqlResult>,
}

/// `POST /v1/admin/policy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyReloadRequest {
    /// The new policy file's text.
    pub policy_sql: String,
}

/// `POST /v1/admin/policy` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReloadResponse {
    /// Views whose effective predicate changed.
    pub changed_views: usize,
    /// Subscriptions moved to a new view (they receive move-ins/evictions).
    pub moved_subscriptions: usize,
}

/// One subscription in `GET /v1/admin/peers/{site_id}`: what the peer
/// holds and whether the current policy still allows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldReport {
    /// Subscription id.
    pub id: String,
    /// The query.
    pub query: String,
    /// The CRR.
    pub table: String,
    /// The version the peer acknowledged.
    pub acked_version: i64,
    /// Rows the peer holds for it, as of `acked_version`.
    pub held_rows: usize,
    /// Held rows the current policy and query no longer allow: they leave
    /// with the next delivery; empty once the peer acknowledged it.
    pub not_allowed: Vec<RowKey>,
    /// Rows sent to the peer after `acked_version`, not yet acknowledged:
    /// (entering, leaving).
    pub unacked_entering: usize,
    /// See `unacked_entering`.
    pub unacked_leaving: usize,
}

/// `GET /v1/admin/peers/{site_id}`: revocation with proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    /// The peer.
    pub site_id: SiteId,
    /// The token subject the site id is bound to.
    pub subject: String,
    /// The tenant claim of that subject's last token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Highest of the peer's own versions the server holds contiguously.
    pub pushed_version: i64,
    /// Whether the peer is connected now.
    pub connected: bool,
    /// Its subscriptions.
    pub subscriptions: Vec<HeldReport>,
    /// True when no subscription holds a row the policy does not allow:
    /// the peer provably holds nothing beyond what its policy allows.
    pub clean: bool,
}

/// An HTTP error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// Every diagnostic, for `policy_invalid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<String>,
    /// With `gap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_version: Option<i64>,
    /// With `rate_limited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}
