//! [`Replica`]: a partial replica on a tenantsync core database, and the
//! synchronous, transactional logic of a conforming client
//! (docs/PROTOCOL.md §5-§7, §11). No IO but SQLite; the transports
//! ([`crate::ws`], [`crate::http`]) feed it server messages.
//!
//! Every method that changes the replica runs in one SQLite transaction
//! (`BEGIN IMMEDIATE`): the merged data, the held keys, the cursors, the
//! pushed version and the quarantine move together, or not at all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use tenantsync_core::{
    ApplyStats, Change, ChangesQuery, CrrConnection, Options, PackedPk, SiteFilter, SiteId,
};
use tenantsync_protocol::http::{PullResponse, PushRequest, SchemaMigration, SchemaResponse};
use tenantsync_protocol::ws::{PushRefusal, RefusedRow};
use tenantsync_protocol::{ClientMsg, RowKey, SubPart};

use crate::error::{ReplicaError, Result};
use crate::store;

/// A row: (table, canonical packed pk bytes).
type Row = (String, Vec<u8>);

/// Changes read per page while planning a push.
const PUSH_PAGE: usize = 2048;

/// Bytes of a `push` message besides its changes (type, id, range), with
/// room to spare.
pub const PUSH_OVERHEAD: usize = 256;

/// A subscription as the replica keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscription {
    /// The id, unique in the replica.
    pub id: String,
    /// `SELECT ... FROM <crr> [WHERE ...]`.
    pub query: String,
    /// The CRR, once the server said (`subscribed.table`).
    pub table: Option<String>,
    /// The server version up to which the replica has everything of this
    /// subscription; None: it needs a full sync (new, query replaced, or
    /// rows to restore after a refused push).
    pub cursor: Option<i64>,
}

/// What [`Replica::add_subscription`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionChange {
    /// A new subscription (no cursor yet).
    Added,
    /// The same id and query were there already: nothing changed.
    Unchanged,
    /// The id had another query: the new one replaces it and needs a full
    /// sync (its `reset` drops the old rows the new query does not hold).
    Replaced,
}

/// Merge counts of an apply (see [`tenantsync_core::ApplyStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MergeCounts {
    /// Changes that won and were written.
    pub applied: usize,
    /// Changes that lost to the local state.
    pub lost: usize,
    /// Changes whose state was already there.
    pub duplicates: usize,
}

impl MergeCounts {
    fn add(&mut self, s: &ApplyStats) {
        self.applied += s.applied;
        self.lost += s.lost;
        self.duplicates += s.duplicates;
    }
}

/// What one subscription's part of a sync or checkpoint did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartReport {
    /// The subscription.
    pub sub: String,
    /// Its cursor before (None: it had none).
    pub cursor_before: Option<i64>,
    /// Its cursor now.
    pub version: i64,
    /// Whether the part was a reset (snapshot or refetch).
    pub reset: bool,
    /// Changes in the part.
    pub changes: usize,
    /// Rows delivered alive: the subscription holds them now.
    pub rows_received: usize,
    /// Rows delivered deleted: no subscription holds them now.
    pub rows_deleted: usize,
    /// Rows the subscription stopped holding (evicted, or not delivered
    /// again by a reset).
    pub rows_released: usize,
}

/// A part that was not applied because it does not start where the
/// subscription's cursor is (docs/PROTOCOL.md §5.2): send `resync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The subscription.
    pub sub: String,
    /// Its cursor (None: it needs a full sync).
    pub cursor: Option<i64>,
    /// Where the part started.
    pub from: i64,
}

/// What applying a sync, a checkpoint or a pull answer did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// The server version applied.
    pub version: i64,
    /// The parts applied, in subscription order.
    pub parts: Vec<PartReport>,
    /// Parts not applied: gaps.
    pub gaps: Vec<Gap>,
    /// Parts at or below their subscription's cursor (duplicates): skipped.
    pub stale: Vec<String>,
    /// Parts of subscriptions the replica does not have: skipped.
    pub unknown: Vec<String>,
    /// Rows removed from the replica because no subscription holds them any
    /// more (without recording a delete; a row with local changes not yet
    /// pushed stays until they are pushed and answered).
    pub rows_removed: usize,
    /// Merge counts.
    pub merged: MergeCounts,
}

impl ApplyReport {
    /// The new cursors of the applied parts: what to acknowledge.
    pub fn cursors(&self) -> BTreeMap<String, i64> {
        self.parts
            .iter()
            .map(|p| (p.sub.clone(), p.version))
            .collect()
    }
}

/// The next push: the replica's own changes of its versions `(from, to]`,
/// whole transactions (docs/PROTOCOL.md §7).
#[derive(Debug, Clone, PartialEq)]
pub struct PushBatch {
    /// Exclusive start: the server's `pushed_version` for this replica.
    pub from: i64,
    /// Inclusive end.
    pub to: i64,
    /// Every change this site authored in the range (except those that
    /// came from the server), in (db_version, seq) order.
    pub changes: Vec<Change>,
    /// Local transactions in it.
    pub transactions: usize,
    /// Encoded size of the changes, in bytes.
    pub bytes: usize,
}

impl PushBatch {
    /// The WebSocket `push` message.
    pub fn to_ws(&self, id: impl Into<String>) -> ClientMsg {
        ClientMsg::Push {
            id: id.into(),
            from: self.from,
            to: self.to,
            changes: self.changes.clone(),
        }
    }

    /// The `POST /v1/push` body.
    pub fn to_http(&self, site_id: SiteId) -> PushRequest {
        PushRequest {
            site_id,
            from: self.from,
            to: self.to,
            changes: self.changes.clone(),
        }
    }
}

/// What [`Replica::push_refused`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RefusalReport {
    /// Local changes moved to quarantine.
    pub quarantined: usize,
    /// Rows made exactly the server's state.
    pub restored: usize,
    /// Rows removed locally: invisible to this peer on the server, or of the
    /// refused push but without a server state to restore.
    pub removed: usize,
    /// Subscriptions that held removed rows the server did not describe:
    /// they need a full sync (`resync` from cursor 0, or a pull without a
    /// cursor) to get those rows back exactly as the server has them.
    pub refetch: Vec<String>,
}

/// What [`Replica::remove_subscription`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RemoveReport {
    /// Rows removed from the replica (no other subscription held them; a
    /// row with local changes not yet pushed stays until they are pushed
    /// and answered).
    pub rows_removed: usize,
}

/// Why changes are in quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuarantineReason {
    /// The server refused the push that held them (or they were later local
    /// changes of a refused row).
    PushRefused,
    /// Their row left every subscription before they were pushed (written
    /// by replicas before 2026-12: a row with unpushed changes now stays
    /// until they are pushed, and only a refusal quarantines).
    Evicted,
}

impl QuarantineReason {
    fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::PushRefused => "push_refused",
            QuarantineReason::Evicted => "evicted",
        }
    }

    fn parse(s: &str) -> QuarantineReason {
        match s {
            "push_refused" => QuarantineReason::PushRefused,
            _ => QuarantineReason::Evicted,
        }
    }
}

/// One quarantined local change (a row of `tenantsync_replica_quarantine`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quarantined {
    /// Row id in the quarantine table.
    pub id: i64,
    /// When it was quarantined (Unix milliseconds).
    pub at_ms: i64,
    /// Why.
    pub reason: QuarantineReason,
    /// The server's error code (`policy_refused`, ...), for refusals.
    pub code: Option<String>,
    /// The refused command (`INSERT`, `UPDATE`, `DELETE`), when the server
    /// named the row.
    pub command: Option<String>,
    /// The policy that refused it, when the server named one.
    pub policy: Option<String>,
    /// In words.
    pub detail: String,
    /// The refused push's range, for refusals.
    pub push_range: Option<(i64, i64)>,
    /// The change itself, as it was in the replica.
    #[serde(skip)]
    pub change: Change,
}

/// A sync (snapshot, resume or refetch) whose chunks are staged until the
/// `last` one.
#[derive(Debug, Default)]
struct StagedSync {
    version: i64,
    reset: bool,
    changes: Vec<Change>,
    evict: Vec<RowKey>,
}

/// A `changes` checkpoint split over several messages (`more`).
#[derive(Debug)]
struct StagedCheckpoint {
    version: i64,
    parts: BTreeMap<String, SubPart>,
}

/// One subscription's part to apply.
struct Part<'a> {
    sub: &'a str,
    reset: bool,
    changes: &'a [Change],
    evict: &'a [RowKey],
}

/// Who quarantines and why (for [`Replica::quarantine_rows`]).
struct QuarantineTag<'a> {
    reason: QuarantineReason,
    code: Option<&'a str>,
    detail: &'a str,
    push_range: Option<(i64, i64)>,
}

/// A local partial replica: a core database holding the rows its
/// subscriptions hold, with the client's own tables beside them
/// (`tenantsync_replica_*`, see the `store` module).
///
/// Write to the CRR tables with ordinary SQL through [`Replica::conn`];
/// those writes are tracked and [`Replica::next_push`] finds them.
pub struct Replica {
    conn: CrrConnection,
    site: SiteId,
    syncs: HashMap<String, StagedSync>,
    checkpoint: Option<StagedCheckpoint>,
    /// The push in flight: its end and the rows it carries.
    inflight: Option<Inflight>,
    /// The end of the highest push sent and not answered (a push abandoned
    /// when the connection dropped may have been applied): until the
    /// server's word on it, rows with local changes in it are not evicted.
    unanswered: Option<i64>,
}

/// A push sent and not answered yet.
#[derive(Debug)]
struct Inflight {
    to: i64,
    rows: BTreeSet<Row>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("site", &self.site)
            .field("staged_syncs", &self.syncs.len())
            .field("inflight", &self.inflight)
            .field("unanswered", &self.unanswered)
            .finish()
    }
}

impl Replica {
    /// Opens (creating if needed) a replica database file.
    pub fn open(path: impl AsRef<Path>) -> Result<Replica> {
        Replica::from_connection(CrrConnection::open(path)?)
    }

    /// Opens with core options (e.g. a fixed site id in tests).
    pub fn open_with(path: impl AsRef<Path>, opts: Options) -> Result<Replica> {
        Replica::from_connection(CrrConnection::open_with(path, opts)?)
    }

    /// A private in-memory replica.
    pub fn open_in_memory() -> Result<Replica> {
        Replica::from_connection(CrrConnection::open_in_memory()?)
    }

    /// A replica on an open core connection: creates the replica's tables
    /// if missing.
    pub fn from_connection(conn: CrrConnection) -> Result<Replica> {
        if conn.is_read_only() {
            return Err(ReplicaError::protocol(
                "a replica needs a read-write connection",
            ));
        }
        store::create(conn.conn())?;
        let site = conn.site_id();
        Ok(Replica {
            conn,
            site,
            syncs: HashMap::new(),
            checkpoint: None,
            inflight: None,
            unanswered: None,
        })
    }

    /// The core connection: write to the CRR tables with ordinary SQL.
    pub fn conn(&self) -> &CrrConnection {
        &self.conn
    }

    /// The core connection, mutably. Do not leave a transaction open
    /// across calls to the replica's methods.
    pub fn conn_mut(&mut self) -> &mut CrrConnection {
        &mut self.conn
    }

    /// Gives the connection back.
    pub fn into_connection(self) -> CrrConnection {
        self.conn
    }

    /// This replica's site id.
    pub fn site_id(&self) -> SiteId {
        self.site
    }

    /// The replica's committed db_version (local versions).
    pub fn local_version(&self) -> Result<i64> {
        Ok(self.conn.db_version()?)
    }

    // ---- Bookkeeping ------------------------------------------------------

    /// The server's `pushed_version` for this replica, as it last said.
    pub fn pushed_version(&self) -> Result<i64> {
        Ok(store::meta_i64(self.sql(), store::PUSHED_VERSION)?.unwrap_or(0))
    }

    /// Records what the server says it holds of this replica's changes
    /// (`welcome.peer.pushed_version`, a `gap` error): the next push starts
    /// there. A lower value than before (the server lost data) makes the
    /// replica push again what it pushed after it. A higher one is an
    /// acknowledgement whose answer was lost (the connection dropped after
    /// the server committed the push): as with [`Replica::push_ok`], the
    /// rows of it no subscription holds wait to settle, with
    /// `server_version` (the server's version then, `welcome.db_version`;
    /// 0 when unknown) as their commit's upper bound.
    pub fn set_pushed_version(&mut self, v: i64, server_version: i64) -> Result<()> {
        self.in_tx(|r| {
            let old = r.pushed_version()?;
            if v > old {
                r.acknowledged(v, server_version, None)?;
            }
            store::set_meta(r.sql(), store::PUSHED_VERSION, v)?;
            if v < old {
                store::set_meta(r.sql(), store::PUSH_FLOOR, v)?;
            }
            r.prune_merged()?;
            Ok(())
        })?;
        if self.inflight.as_ref().is_some_and(|f| v < f.to) {
            self.inflight = None;
        }
        // The server's word: what it holds is at or below `v`, the rest is
        // not on the server.
        if self.inflight.is_none() {
            self.unanswered = None;
        }
        Ok(())
    }

    /// The server's site id, once known.
    pub fn server_site_id(&self) -> Result<Option<SiteId>> {
        Ok(store::meta_blob(self.sql(), store::SERVER_SITE_ID)?
            .and_then(|b| SiteId::from_slice(&b)))
    }

    /// Records the server's site id (from `welcome`).
    pub fn set_server_site_id(&mut self, site: SiteId) -> Result<()> {
        store::set_meta(self.sql(), store::SERVER_SITE_ID, site.0.as_slice())?;
        Ok(())
    }

    /// Whether the replica has neither CRR tables nor a schema from a
    /// server: a new replica, which needs the server's schema first.
    pub fn is_new(&self) -> Result<bool> {
        let applied = store::meta_i64(self.sql(), store::SCHEMA_APPLIED)?.unwrap_or(0) != 0;
        Ok(!applied && self.conn.schema()?.tables.iter().all(|t| !t.is_crr))
    }

    /// Runs the server's schema script (`GET /v1/schema`'s `schema_sql`) in
    /// one transaction and records that the replica has it.
    pub fn apply_schema(&mut self, schema_sql: &str) -> Result<()> {
        self.in_tx(|r| {
            r.sql()
                .execute_batch(schema_sql)
                .map_err(|e| ReplicaError::Schema(e.to_string()))?;
            store::set_meta(r.sql(), store::SCHEMA_APPLIED, 1)?;
            Ok(())
        })
    }

    /// The server schema version the replica has: the one recorded by
    /// [`Replica::migrate`]; 1 for a replica with a schema but no record
    /// (made before schema versions, or by [`Replica::apply_schema`]); 0
    /// for a new replica.
    pub fn schema_version(&self) -> Result<i64> {
        if let Some(v) = store::meta_i64(self.sql(), store::SCHEMA_VERSION)? {
            return Ok(v);
        }
        Ok(if self.is_new()? { 0 } else { 1 })
    }

    /// Brings the replica to the server's schema (`GET /v1/schema`) in one
    /// transaction, keeping its rows, clocks, cursors and unpushed
    /// changes: the migrations above its version. Returns the versions
    /// before and after.
    pub fn migrate(&mut self, schema: &SchemaResponse) -> Result<(i64, i64)> {
        if schema.migrations.is_empty() && self.schema_version()? == 0 {
            // A server that lists no migrations: its whole script.
            self.in_tx(|r| {
                r.sql()
                    .execute_batch(&schema.schema_sql)
                    .map_err(|e| ReplicaError::Schema(e.to_string()))?;
                store::set_meta(r.sql(), store::SCHEMA_APPLIED, 1)?;
                store::set_meta(r.sql(), store::SCHEMA_VERSION, schema.schema_version)?;
                Ok(())
            })?;
            return Ok((0, schema.schema_version));
        }
        self.apply_migrations(schema.schema_version, &schema.migrations)
    }

    /// Runs, in one transaction, the migrations of `migrations` above the
    /// replica's version, which must follow it without a hole, and records
    /// version `to` (`welcome`, a `schema` message, `GET /v1/schema`).
    /// Returns the versions before and after; nothing is applied on an
    /// error.
    pub fn apply_migrations(
        &mut self,
        to: i64,
        migrations: &[SchemaMigration],
    ) -> Result<(i64, i64)> {
        let from = self.schema_version()?;
        if from >= to {
            return Ok((from, from));
        }
        self.in_tx(|r| {
            let mut next = from + 1;
            for m in migrations.iter().filter(|m| m.version > from) {
                if m.version != next {
                    return Err(ReplicaError::Schema(format!(
                        "the server's migrations skip from version {} to {}",
                        next - 1,
                        m.version
                    )));
                }
                r.sql().execute_batch(&m.sql).map_err(|e| {
                    ReplicaError::Schema(format!("migration to version {}: {e}", m.version))
                })?;
                next += 1;
            }
            if next <= to {
                return Err(ReplicaError::Schema(format!(
                    "the server is at schema version {to} but sent migrations up to {}",
                    next - 1
                )));
            }
            store::set_meta(r.sql(), store::SCHEMA_APPLIED, 1)?;
            store::set_meta(r.sql(), store::SCHEMA_VERSION, to)?;
            Ok(())
        })?;
        Ok((from, to))
    }

    // ---- Subscriptions ----------------------------------------------------

    /// Every subscription, in id order.
    pub fn subscriptions(&self) -> Result<Vec<Subscription>> {
        let mut stmt = self.sql().prepare_cached(
            "SELECT id, query, tbl, cursor FROM tenantsync_replica_subs ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Subscription {
                id: r.get(0)?,
                query: r.get(1)?,
                table: r.get(2)?,
                cursor: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One subscription.
    pub fn subscription(&self, id: &str) -> Result<Option<Subscription>> {
        Ok(self
            .sql()
            .query_row(
                "SELECT id, query, tbl, cursor FROM tenantsync_replica_subs WHERE id = ?1",
                [id],
                |r| {
                    Ok(Subscription {
                        id: r.get(0)?,
                        query: r.get(1)?,
                        table: r.get(2)?,
                        cursor: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Adds a subscription, or replaces the query of an existing id.
    pub fn add_subscription(&mut self, id: &str, query: &str) -> Result<SubscriptionChange> {
        if id.is_empty() || id.len() > 256 {
            return Err(ReplicaError::BadSubscription {
                id: id.to_owned(),
                reason: "an id is 1 to 256 bytes".into(),
            });
        }
        if query.trim().is_empty() {
            return Err(ReplicaError::BadSubscription {
                id: id.to_owned(),
                reason: "the query is empty".into(),
            });
        }
        let change = self.in_tx(|r| {
            let old = r.subscription(id)?;
            match old {
                Some(s) if s.query == query => Ok(SubscriptionChange::Unchanged),
                Some(_) => {
                    r.sql().execute(
                        "UPDATE tenantsync_replica_subs SET query = ?2, cursor = NULL, tbl = NULL WHERE id = ?1",
                        params![id, query],
                    )?;
                    Ok(SubscriptionChange::Replaced)
                }
                None => {
                    r.sql().execute(
                        "INSERT INTO tenantsync_replica_subs (id, query) VALUES (?1, ?2)",
                        params![id, query],
                    )?;
                    Ok(SubscriptionChange::Added)
                }
            }
        })?;
        if change == SubscriptionChange::Replaced {
            self.syncs.remove(id);
        }
        Ok(change)
    }

    /// Removes a subscription: its held rows that no other subscription
    /// holds leave the replica (without a delete; one with local changes
    /// not yet pushed stays until they are pushed and answered).
    pub fn remove_subscription(&mut self, id: &str) -> Result<RemoveReport> {
        self.syncs.remove(id);
        self.in_tx(|r| {
            if r.subscription(id)?.is_none() {
                return Err(ReplicaError::UnknownSubscription { id: id.to_owned() });
            }
            let held = r.held_set(id)?;
            r.sql()
                .execute("DELETE FROM tenantsync_replica_held WHERE sub = ?1", [id])?;
            r.sql()
                .execute("DELETE FROM tenantsync_replica_subs WHERE id = ?1", [id])?;
            let rows_removed = r.remove_unheld(held.into_iter().collect())?;
            Ok(RemoveReport { rows_removed })
        })
    }

    /// The rows a subscription holds, in (table, pk) order.
    pub fn held(&self, sub: &str) -> Result<Vec<RowKey>> {
        Ok(self
            .held_set(sub)?
            .into_iter()
            .map(|(table, pk)| RowKey {
                table,
                pk: PackedPk(pk),
            })
            .collect())
    }

    /// Whether any subscription holds the row.
    pub fn is_held(&self, table: &str, pk: &PackedPk) -> Result<bool> {
        let pk = canonical(table, pk)?;
        self.held_by_any(&(table.to_owned(), pk))
    }

    // ---- Receiving --------------------------------------------------------

    /// A `subscribed` arrived: a new initial sync of `sub` starts (chunks
    /// staged before are dropped).
    pub fn begin_sync(&mut self, sub: &str, table: &str) -> Result<()> {
        self.syncs.remove(sub);
        self.sql().execute(
            "UPDATE tenantsync_replica_subs SET tbl = ?2 WHERE id = ?1",
            params![sub, table],
        )?;
        Ok(())
    }

    /// A `snapshot` chunk arrived. Chunks are staged in memory; at the
    /// `last` one the whole sync is applied in one transaction and its
    /// report returned (docs/PROTOCOL.md §5.1). Chunks of a subscription the
    /// replica does not have are dropped (`Ok(None)`).
    pub fn apply_snapshot(
        &mut self,
        sub: &str,
        version: i64,
        reset: bool,
        changes: Vec<Change>,
        evict: Vec<RowKey>,
        last: bool,
    ) -> Result<Option<ApplyReport>> {
        if self.subscription(sub)?.is_none() {
            self.syncs.remove(sub);
            return Ok(None);
        }
        let staged = self.syncs.entry(sub.to_owned()).or_default();
        if staged.version != version || staged.reset != reset {
            // A chunk of another sync than the staged one: that sync was
            // restarted (a `subscribed` should have said so).
            *staged = StagedSync {
                version,
                reset,
                ..StagedSync::default()
            };
        }
        staged.changes.extend(changes);
        staged.evict.extend(evict);
        if !last {
            return Ok(None);
        }
        let staged = self.syncs.remove(sub).expect("staged above");
        let parts = [Part {
            sub,
            reset,
            changes: &staged.changes,
            evict: &staged.evict,
        }];
        let report = self.in_tx(|r| r.apply_parts(version, &parts))?;
        Ok(Some(report))
    }

    /// A `changes` message arrived (docs/PROTOCOL.md §5.2). With `more`,
    /// it is staged until the message of the same version without `more`;
    /// then the whole checkpoint is applied in one transaction: parts that
    /// start after their subscription's cursor are gaps (not applied, see
    /// [`ApplyReport::gaps`]), parts at or below it are skipped.
    pub fn apply_changes(
        &mut self,
        version: i64,
        subs: BTreeMap<String, SubPart>,
        more: bool,
    ) -> Result<Option<ApplyReport>> {
        let mut staged = match self.checkpoint.take() {
            Some(s) if s.version == version => s,
            Some(s) => {
                return Err(ReplicaError::protocol(format!(
                    "a changes message of version {version} arrived while the checkpoint of version {} (more: true) was incomplete; it was dropped",
                    s.version
                )));
            }
            None => StagedCheckpoint {
                version,
                parts: BTreeMap::new(),
            },
        };
        for (sub, part) in subs {
            match staged.parts.get_mut(&sub) {
                Some(p) => {
                    p.from = p.from.min(part.from);
                    p.changes.extend(part.changes);
                    p.evict.extend(part.evict);
                }
                None => {
                    staged.parts.insert(sub, part);
                }
            }
        }
        if more {
            self.checkpoint = Some(staged);
            return Ok(None);
        }
        let report = self.in_tx(|r| {
            let mut gaps = Vec::new();
            let mut stale = Vec::new();
            let mut unknown = Vec::new();
            let mut parts = Vec::new();
            for (sub, part) in &staged.parts {
                let Some(s) = r.subscription(sub)? else {
                    unknown.push(sub.clone());
                    continue;
                };
                match s.cursor {
                    Some(c) if version <= c => stale.push(sub.clone()),
                    Some(c) if part.from <= c => parts.push(Part {
                        sub,
                        reset: false,
                        changes: &part.changes,
                        evict: &part.evict,
                    }),
                    cursor => gaps.push(Gap {
                        sub: sub.clone(),
                        cursor,
                        from: part.from,
                    }),
                }
            }
            let mut report = r.apply_parts(version, &parts)?;
            report.gaps = gaps;
            report.stale = stale;
            report.unknown = unknown;
            Ok(report)
        })?;
        Ok(Some(report))
    }

    /// Applies a `POST /v1/pull` answer in one transaction: every part up to
    /// the answer's version (docs/PROTOCOL.md §8). A part that does not reset
    /// and starts after the subscription's cursor is a gap (not applied).
    pub fn apply_pull(&mut self, resp: &PullResponse) -> Result<ApplyReport> {
        let version = resp.version;
        self.in_tx(|r| {
            let mut gaps = Vec::new();
            let mut stale = Vec::new();
            let mut unknown = Vec::new();
            let mut parts = Vec::new();
            for (sub, part) in &resp.subs {
                let Some(s) = r.subscription(sub)? else {
                    unknown.push(sub.clone());
                    continue;
                };
                let apply = Part {
                    sub,
                    reset: part.reset,
                    changes: &part.changes,
                    evict: &part.evict,
                };
                match s.cursor {
                    _ if part.reset => parts.push(apply),
                    Some(c) if version <= c => stale.push(sub.clone()),
                    Some(c) if part.from <= c => parts.push(apply),
                    cursor => gaps.push(Gap {
                        sub: sub.clone(),
                        cursor,
                        from: part.from,
                    }),
                }
            }
            let mut report = r.apply_parts(version, &parts)?;
            // Every subscription is at `version` now: the pushed rows that
            // entered one are held, the others leave.
            report.rows_removed += r.settle(version)?;
            report.gaps = gaps;
            report.stale = stale;
            report.unknown = unknown;
            Ok(report)
        })
    }

    /// Drops what is staged of incomplete syncs and checkpoints (after a
    /// disconnect: the server sends them again).
    pub fn drop_staged(&mut self) {
        self.syncs.clear();
        self.checkpoint = None;
    }

    // ---- Pushing ----------------------------------------------------------

    /// The next push: this replica's own changes after the server's
    /// `pushed_version`, whole local transactions in version order, as many
    /// as fit in `max_bytes` (the server's message limit). None when there
    /// is nothing to push. The batch is in flight until [`Replica::push_ok`],
    /// [`Replica::push_refused`] or [`Replica::push_abandoned`].
    pub fn next_push(&mut self, max_bytes: usize) -> Result<Option<PushBatch>> {
        let budget = max_bytes.saturating_sub(PUSH_OVERHEAD);
        let batch = self.in_tx(|r| {
            let pv = r.pushed_version()?;
            let start = r.push_start()?;
            let merged = r.merged_ranges()?;
            let current = r.conn.db_version()?;
            let mut out: Vec<Change> = Vec::new();
            let mut bytes = 0usize;
            let mut transactions = 0usize;
            let mut to = start;
            let mut since = start;
            let mut full = false;
            'pages: loop {
                let page = r.conn.changes(&ChangesQuery {
                    since,
                    site: SiteFilter::Only(r.site),
                    limit: Some(PUSH_PAGE),
                    ..ChangesQuery::default()
                })?;
                let exhausted = page.len() < PUSH_PAGE;
                let mut i = 0;
                while i < page.len() {
                    let v = page[i].db_version;
                    let j = i + page[i..].iter().take_while(|c| c.db_version == v).count();
                    since = v;
                    if !in_ranges(&merged, v) {
                        let size: usize = page[i..j].iter().map(|c| encoded_len(c) + 1).sum();
                        if bytes + size > budget {
                            if out.is_empty() {
                                return Err(ReplicaError::TransactionTooLarge {
                                    db_version: v,
                                    bytes: size,
                                    limit: budget,
                                });
                            }
                            full = true;
                            break 'pages;
                        }
                        out.extend_from_slice(&page[i..j]);
                        bytes += size;
                        transactions += 1;
                        to = v;
                    }
                    i = j;
                }
                if exhausted || page.is_empty() {
                    break;
                }
            }
            if out.is_empty() {
                // Nothing to push up to `current`: later plans start there.
                store::set_meta(r.sql(), store::PUSH_FLOOR, current.max(start))?;
                r.prune_merged()?;
                return Ok(None);
            }
            if !full {
                // Everything pushable is in: the range may cover the
                // versions after it (merges only), so they are never read
                // again.
                to = to.max(current);
            }
            Ok(Some(PushBatch {
                from: pv,
                to,
                changes: out,
                transactions,
                bytes,
            }))
        })?;
        if let Some(b) = &batch {
            self.inflight = Some(Inflight {
                to: b.to,
                rows: rows_of(&b.changes)?,
            });
            self.unanswered = self.unanswered.max(Some(b.to));
        }
        Ok(batch)
    }

    /// Whether the replica has local changes the server does not hold yet.
    pub fn has_unpushed(&self) -> Result<bool> {
        let start = self.push_start()?;
        let merged = self.merged_ranges()?;
        let mut since = start;
        loop {
            let page = self.conn.changes(&ChangesQuery {
                since,
                site: SiteFilter::Only(self.site),
                limit: Some(PUSH_PAGE),
                ..ChangesQuery::default()
            })?;
            if page.iter().any(|c| !in_ranges(&merged, c.db_version)) {
                return Ok(true);
            }
            match page.last() {
                Some(c) if page.len() >= PUSH_PAGE => since = c.db_version,
                _ => return Ok(false),
            }
        }
    }

    /// The push in flight was applied in server version `server_version`
    /// (0 for a duplicate the server already held): the server now holds
    /// this replica's changes up to `pushed_version`.
    ///
    /// A replica holds what its subscriptions hold, its own writes too: the
    /// rows of the push that no subscription holds yet are recorded to be
    /// settled. The pushed rows that entered a subscription come back in the
    /// server's deliveries of that version (rows entering a view are never
    /// echo-filtered); once those are applied, the ones still unheld leave
    /// the replica ([`Replica::settle_pushed`]).
    pub fn push_ok(&mut self, pushed_version: i64, server_version: i64) -> Result<()> {
        // The batch's rows, when the answer is for the whole of it (a
        // duplicate's range is read back from the clocks instead).
        let pushed = self
            .inflight
            .take()
            .filter(|f| f.to == pushed_version)
            .map(|f| f.rows);
        if self.unanswered.is_some_and(|to| to <= pushed_version) {
            self.unanswered = None;
        }
        self.in_tx(|r| {
            r.acknowledged(pushed_version, server_version, pushed)?;
            store::set_meta(r.sql(), store::PUSHED_VERSION, pushed_version)?;
            r.prune_merged()?;
            Ok(())
        })
    }

    /// The server holds this replica's changes up to `pushed_version`,
    /// committed at or before `server_version` (inside the transaction that
    /// records it): the pushed rows (`pushed`, or read back from the clocks)
    /// that no subscription holds wait to settle.
    fn acknowledged(
        &mut self,
        pushed_version: i64,
        server_version: i64,
        pushed: Option<BTreeSet<Row>>,
    ) -> Result<()> {
        let rows = match pushed {
            Some(rows) => rows,
            None => {
                let start = self.push_start()?;
                if pushed_version <= start {
                    return Ok(());
                }
                let merged = self.merged_ranges()?;
                let own = self.conn.changes(&ChangesQuery {
                    since: start,
                    until: Some(pushed_version),
                    site: SiteFilter::Only(self.site),
                    ..ChangesQuery::default()
                })?;
                rows_of(own.iter().filter(|c| !in_ranges(&merged, c.db_version)))?
            }
        };
        for row in &rows {
            if !self.held_by_any(row)? {
                self.record_settle(row, server_version)?;
            }
        }
        Ok(())
    }

    /// Records a row to settle once the deliveries up to `server_version`
    /// are applied (0: at the next settling).
    fn record_settle(&self, row: &Row, server_version: i64) -> Result<()> {
        self.sql()
            .prepare_cached(
                "INSERT OR REPLACE INTO tenantsync_replica_settle (tbl, pk, server_version)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![row.0, row.1, server_version])?;
        Ok(())
    }

    /// The server's deliveries up to `up_to` are applied: the rows recorded
    /// by [`Replica::push_ok`] (or an acknowledgement through
    /// [`Replica::set_pushed_version`]) with a server version up to it that
    /// no subscription holds now, and that have no local change the server
    /// does not hold yet, leave the replica (without a delete: nothing
    /// spreads). Returns how many left. Transports call it where they know
    /// the deliveries are in: the WebSocket client at `push_ok` (the server
    /// sends it after queueing the commit's changes, docs/PROTOCOL.md §4.3)
    /// and whenever every subscription has become live (up to the highest
    /// version acknowledged); [`Replica::apply_pull`] settles by itself.
    /// While a subscription has no cursor (a full sync is due or under way)
    /// or a sync or checkpoint is staged, it does nothing: a later call
    /// settles.
    pub fn settle_pushed(&mut self, up_to: i64) -> Result<usize> {
        self.in_tx(|r| r.settle(up_to))
    }

    /// Rows recorded to settle, with their server versions.
    pub fn unsettled(&self) -> Result<Vec<(RowKey, i64)>> {
        let mut stmt = self.sql().prepare_cached(
            "SELECT tbl, pk, server_version FROM tenantsync_replica_settle ORDER BY tbl, pk",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                RowKey {
                    table: r.get(0)?,
                    pk: PackedPk(r.get(1)?),
                },
                r.get(2)?,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The push in flight got no answer (the connection dropped): it is
    /// planned again from `pushed_version` next time.
    pub fn push_abandoned(&mut self) {
        self.inflight = None;
    }

    /// The server refused `batch` whole (docs/PROTOCOL.md §7). In one
    /// transaction: every change of the refused rows (those of the push, and
    /// later local ones) moves to quarantine with the server's reasons; rows
    /// in `state` become exactly the server's state; `invisible` rows leave
    /// the replica; rows of the push the server did not describe leave it
    /// too, and the subscriptions that held them need a full sync
    /// ([`RefusalReport::refetch`]). The push is consumed: `pushed_version`
    /// becomes the refusal's.
    pub fn push_refused(
        &mut self,
        batch: &PushBatch,
        refusal: &PushRefusal,
    ) -> Result<RefusalReport> {
        self.inflight = None;
        self.unanswered = None;
        self.in_tx(|r| {
            let before = r.conn.db_version()?;
            let code = refusal.code.as_str();
            // The rows the server named, and why.
            let mut refused: BTreeMap<Row, &RefusedRow> = BTreeMap::new();
            for row in &refusal.rows {
                refused.insert((row.table.clone(), canonical(&row.table, &row.pk)?), row);
            }
            let mut state: BTreeMap<Row, Vec<Change>> = BTreeMap::new();
            for c in &refusal.state {
                state
                    .entry((c.table.clone(), canonical(&c.table, &c.pk)?))
                    .or_default()
                    .push(c.clone());
            }
            let mut invisible: BTreeSet<Row> = BTreeSet::new();
            for k in &refusal.invisible {
                invisible.insert((k.table.clone(), canonical(&k.table, &k.pk)?));
            }
            let mut pushed: BTreeMap<Row, Vec<&Change>> = BTreeMap::new();
            for c in &batch.changes {
                pushed
                    .entry((c.table.clone(), canonical(&c.table, &c.pk)?))
                    .or_default()
                    .push(c);
            }
            let mut rows: BTreeSet<Row> = BTreeSet::new();
            rows.extend(refused.keys().cloned());
            rows.extend(state.keys().cloned());
            rows.extend(invisible.iter().cloned());
            rows.extend(pushed.keys().cloned());

            // 1. Quarantine: the pushed changes of every row, then the later
            //    local changes of those rows (which the restore overwrites).
            let range = Some((batch.from, batch.to));
            let whole = format!(
                "{} (the push was refused whole; this row was not refused itself)",
                refusal.message
            );
            let mut quarantined = 0;
            for row in &rows {
                let named = refused.get(row).copied();
                let detail = named.map_or(whole.as_str(), |n| n.reason.as_str());
                for c in pushed.get(row).into_iter().flatten() {
                    r.insert_quarantine(
                        c,
                        &QuarantineTag {
                            reason: QuarantineReason::PushRefused,
                            code: Some(code),
                            detail,
                            push_range: range,
                        },
                        named,
                    )?;
                    quarantined += 1;
                }
            }
            let later_from = batch.to.max(r.push_start()?);
            let merged = r.merged_ranges()?;
            for (table, pks) in group_by_table(rows.iter()) {
                let later = r.conn.changes(&ChangesQuery {
                    since: later_from,
                    table: Some(table.clone()),
                    pks: Some(pks),
                    site: SiteFilter::Only(r.site),
                    ..ChangesQuery::default()
                })?;
                for c in later.iter().filter(|c| !in_ranges(&merged, c.db_version)) {
                    let key = (c.table.clone(), canonical(&c.table, &c.pk)?);
                    let named = refused.get(&key).copied();
                    r.insert_quarantine(
                        c,
                        &QuarantineTag {
                            reason: QuarantineReason::PushRefused,
                            code: Some(code),
                            detail: "a later local change of a row whose push was refused",
                            push_range: range,
                        },
                        named,
                    )?;
                    quarantined += 1;
                }
            }

            // 2. Restore: the server's state, or removal.
            let mut hi: Option<i64> = None;
            let mut restored = 0;
            let mut by_table: BTreeMap<&str, (Vec<PackedPk>, Vec<Change>)> = BTreeMap::new();
            for ((table, pk), changes) in &state {
                let e = by_table.entry(table.as_str()).or_default();
                e.0.push(PackedPk(pk.clone()));
                e.1.extend(changes.iter().cloned());
            }
            for (table, (pks, changes)) in &by_table {
                let stats = r.conn.replace_rows(table, pks, changes)?;
                hi = hi.max(stats.max_db_version);
                restored += pks.len();
            }
            let mut removed_rows: Vec<Row> = Vec::new();
            for (row, changes) in &state {
                if changes.iter().map(|c| c.cl).max().unwrap_or(0) % 2 == 0 {
                    r.drop_held_everywhere(row)?;
                }
            }
            let mut refetch: BTreeSet<String> = BTreeSet::new();
            for row in &rows {
                if state.contains_key(row) {
                    continue;
                }
                if !invisible.contains(row) {
                    // Neither state nor invisible: the server did not say
                    // what it has. Remove the row and fetch it again.
                    refetch.extend(r.holders(row)?);
                }
                r.drop_held_everywhere(row)?;
                removed_rows.push(row.clone());
            }
            // Restored rows that no subscription holds (the peer may read
            // them, but none of its subscriptions asked for them: a row the
            // push moved out of its subscriptions, or one it wrote without
            // holding it) do not stay: a replica holds what its
            // subscriptions hold. Their local changes are in quarantine.
            // (Found twice: by the demo's verifier and by the isolation
            // oracle of issue 6.)
            for row in state.keys() {
                if !r.held_by_any(row)? && !removed_rows.contains(row) {
                    removed_rows.push(row.clone());
                }
            }
            let mut removed = 0;
            for (table, pks) in group_by_table(removed_rows.iter()) {
                r.conn.evict(&table, &pks)?;
                removed += pks.len();
            }
            for sub in &refetch {
                r.sql().execute(
                    "UPDATE tenantsync_replica_subs SET cursor = NULL WHERE id = ?1",
                    [sub],
                )?;
            }
            r.record_merged(before, hi)?;
            store::set_meta(r.sql(), store::PUSHED_VERSION, refusal.pushed_version)?;
            r.prune_merged()?;
            Ok(RefusalReport {
                quarantined,
                restored,
                removed,
                refetch: refetch.into_iter().collect(),
            })
        })
    }

    // ---- Quarantine -------------------------------------------------------

    /// Every quarantined change, oldest first.
    pub fn quarantine(&self) -> Result<Vec<Quarantined>> {
        let mut stmt = self.sql().prepare_cached(
            "SELECT id, at_ms, reason, code, command, policy, detail, push_from, push_to,
                    tbl, pk, cid, val, col_version, db_version, site_id, cl, seq
             FROM tenantsync_replica_quarantine ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            let site: Vec<u8> = r.get(15)?;
            let from: Option<i64> = r.get(7)?;
            let to: Option<i64> = r.get(8)?;
            Ok(Quarantined {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                reason: QuarantineReason::parse(&r.get::<_, String>(2)?),
                code: r.get(3)?,
                command: r.get(4)?,
                policy: r.get(5)?,
                detail: r.get(6)?,
                push_range: from.zip(to),
                change: Change {
                    table: r.get(9)?,
                    pk: PackedPk(r.get(10)?),
                    cid: r.get(11)?,
                    val: r.get(12)?,
                    col_version: r.get(13)?,
                    db_version: r.get(14)?,
                    site_id: SiteId::from_slice(&site).unwrap_or(SiteId([0; 16])),
                    cl: r.get(16)?,
                    seq: r.get(17)?,
                },
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes quarantined changes (after the application dealt with them).
    pub fn discard_quarantined(&mut self, ids: &[i64]) -> Result<usize> {
        self.in_tx(|r| {
            let mut n = 0;
            for id in ids {
                n += r.sql().execute(
                    "DELETE FROM tenantsync_replica_quarantine WHERE id = ?1",
                    [id],
                )?;
            }
            Ok(n)
        })
    }

    // ---- Internals --------------------------------------------------------

    fn sql(&self) -> &rusqlite::Connection {
        self.conn.conn()
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction.
    fn in_tx<T>(&mut self, f: impl FnOnce(&mut Replica) -> Result<T>) -> Result<T> {
        self.sql().execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => match self.sql().execute_batch("COMMIT") {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = self.sql().execute_batch("ROLLBACK");
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = self.sql().execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Applies parts (inside a transaction): merge, held keys, removals,
    /// cursors.
    fn apply_parts(&mut self, version: i64, parts: &[Part<'_>]) -> Result<ApplyReport> {
        let before = self.conn.db_version()?;
        let mut report = ApplyReport {
            version,
            ..ApplyReport::default()
        };
        let mut hi: Option<i64> = None;
        for p in parts {
            let stats = self.conn.apply(p.changes)?;
            report.merged.add(&stats);
            hi = hi.max(stats.max_db_version);
        }
        let mut candidates: BTreeSet<Row> = BTreeSet::new();
        for p in parts {
            let cursor_before = self.subscription(p.sub)?.and_then(|s| s.cursor);
            let mut pr = PartReport {
                sub: p.sub.to_owned(),
                cursor_before,
                version,
                reset: p.reset,
                changes: p.changes.len(),
                ..PartReport::default()
            };
            let held_before = if p.reset {
                self.held_set(p.sub)?
            } else {
                BTreeSet::new()
            };
            // Rows of the part and their causal length (odd: alive).
            let mut delivered: BTreeMap<Row, i64> = BTreeMap::new();
            for c in p.changes {
                let key = (c.table.clone(), canonical(&c.table, &c.pk)?);
                let cl = delivered.entry(key).or_insert(c.cl);
                *cl = (*cl).max(c.cl);
            }
            let mut alive: BTreeSet<&Row> = BTreeSet::new();
            for (row, cl) in &delivered {
                if cl % 2 == 0 {
                    self.drop_held_everywhere(row)?;
                    pr.rows_deleted += 1;
                } else {
                    self.sql().execute(
                        "INSERT OR IGNORE INTO tenantsync_replica_held (sub, tbl, pk) VALUES (?1, ?2, ?3)",
                        params![p.sub, row.0, row.1],
                    )?;
                    alive.insert(row);
                    pr.rows_received += 1;
                }
            }
            for k in p.evict {
                let row = (k.table.clone(), canonical(&k.table, &k.pk)?);
                if self.release(p.sub, &row)? {
                    pr.rows_released += 1;
                    candidates.insert(row);
                }
            }
            for row in held_before {
                if !alive.contains(&row)
                    && !delivered.contains_key(&row)
                    && self.release(p.sub, &row)?
                {
                    pr.rows_released += 1;
                    candidates.insert(row);
                }
            }
            self.sql().execute(
                "UPDATE tenantsync_replica_subs SET cursor = ?2 WHERE id = ?1",
                params![p.sub, version],
            )?;
            report.parts.push(pr);
        }
        report.rows_removed = self.remove_unheld(candidates.into_iter().collect())?;
        self.record_merged(before, hi)?;
        Ok(report)
    }

    /// Removes those of `rows` that no subscription holds. Returns how
    /// many.
    ///
    /// A row with local changes the server does not hold yet stays
    /// (unheld) until they are pushed and answered (PROTOCOL.md §11 rule
    /// 6): dropping it would take the user's write with it, when the row
    /// only left a filter (its own write, or another device's, moved it
    /// out). The answer settles it like any pushed row: after `push_ok` it
    /// leaves once the deliveries of its commit are applied, unless a
    /// subscription holds it again; a refusal restores or removes it and
    /// quarantines the refused changes. A row with changes in a push not
    /// answered yet is one of these, and must be: the server may hold those
    /// changes and send them back to no one (echo filtering), so a dropped
    /// row coming back from an older snapshot would be stale for good
    /// (oracle seed 226).
    fn remove_unheld(&mut self, rows: Vec<Row>) -> Result<usize> {
        let mut gone = Vec::new();
        for row in rows {
            if !self.held_by_any(&row)? {
                gone.push(row);
            }
        }
        let pending = rows_of(&self.unpushed_changes(&gone)?)?;
        gone.retain(|r| !pending.contains(r));
        // While a full sync is pending, a row with a clock of this site
        // stays too, and settles once the syncs are done: its snapshot may
        // predate this site's change, which the server then sends back to
        // no one (oracle seed 226, the other order).
        if !gone.is_empty() && self.sync_pending()? {
            let mut kept = BTreeSet::new();
            for (table, pks) in group_by_table(gone.iter()) {
                let own = self.conn.changes(&ChangesQuery {
                    since: 0,
                    table: Some(table.clone()),
                    pks: Some(pks),
                    site: SiteFilter::Only(self.site),
                    ..ChangesQuery::default()
                })?;
                kept.extend(rows_of(&own)?);
            }
            for row in &kept {
                self.record_settle(row, 0)?;
            }
            gone.retain(|r| !kept.contains(r));
        }
        let mut removed = 0;
        for (table, pks) in group_by_table(gone.iter()) {
            self.conn.evict(&table, &pks)?;
            removed += pks.len();
        }
        Ok(removed)
    }

    /// The local changes of `rows` the server does not hold yet (after the
    /// push start, not written by merges).
    fn unpushed_changes(&self, rows: &[Row]) -> Result<Vec<Change>> {
        let start = self.push_start()?;
        let merged = self.merged_ranges()?;
        let mut out = Vec::new();
        for (table, pks) in group_by_table(rows.iter()) {
            let own = self.conn.changes(&ChangesQuery {
                since: start,
                table: Some(table.clone()),
                pks: Some(pks),
                site: SiteFilter::Only(self.site),
                ..ChangesQuery::default()
            })?;
            out.extend(
                own.into_iter()
                    .filter(|c| !in_ranges(&merged, c.db_version)),
            );
        }
        Ok(out)
    }

    /// Whether a full sync is due or under way (a subscription without a
    /// cursor, a staged sync) or a checkpoint is staged.
    fn sync_pending(&self) -> Result<bool> {
        Ok(self.checkpoint.is_some()
            || !self.syncs.is_empty()
            || self
                .sql()
                .prepare_cached(
                    "SELECT 1 FROM tenantsync_replica_subs WHERE cursor IS NULL LIMIT 1",
                )?
                .exists([])?)
    }

    /// [`Replica::settle_pushed`] inside a transaction.
    fn settle(&mut self, up_to: i64) -> Result<usize> {
        // Not while a subscription waits for a full sync or one is staged:
        // its snapshot may be older than the push, and the server, which
        // counts the snapshot's rows as held, sends later changes of them
        // echo-filtered. A pushed row dropped now would come back from the
        // snapshot without this replica's own newer change, for good
        // (oracle seed 161).
        if self.sync_pending()? {
            return Ok(0);
        }
        let due: Vec<Row> = {
            let mut stmt = self.sql().prepare_cached(
                "SELECT tbl, pk FROM tenantsync_replica_settle WHERE server_version <= ?1",
            )?;
            let rows = stmt.query_map([up_to], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if due.is_empty() {
            return Ok(0);
        }
        self.sql().execute(
            "DELETE FROM tenantsync_replica_settle WHERE server_version <= ?1",
            [up_to],
        )?;
        let mut unheld = Vec::new();
        for row in due {
            if !self.held_by_any(&row)? {
                unheld.push(row);
            }
        }
        // A row written again since its push keeps its place until that
        // write is acknowledged (its own push_ok records it again).
        let pending = rows_of(&self.unpushed_changes(&unheld)?)?;
        let gone: Vec<Row> = unheld
            .into_iter()
            .filter(|r| !pending.contains(r))
            .collect();
        for (table, pks) in group_by_table(gone.iter()) {
            self.conn.evict(&table, &pks)?;
        }
        Ok(gone.len())
    }

    fn insert_quarantine(
        &self,
        c: &Change,
        tag: &QuarantineTag<'_>,
        refused: Option<&RefusedRow>,
    ) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.sql()
            .prepare_cached(
                "INSERT INTO tenantsync_replica_quarantine
                 (at_ms, reason, code, command, policy, detail, push_from, push_to,
                  tbl, pk, cid, val, col_version, db_version, site_id, cl, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )?
            .execute(rusqlite::params_from_iter(
                params![
                    now,
                    tag.reason.as_str(),
                    tag.code,
                    refused.map(|r| r.command.as_str()),
                    refused.and_then(|r| r.policy.as_deref()),
                    tag.detail,
                    tag.push_range.map(|r| r.0),
                    tag.push_range.map(|r| r.1),
                ]
                .iter()
                .copied()
                .chain(c.sql_params().iter().map(|v| v as &dyn rusqlite::ToSql)),
            ))?;
        Ok(())
    }

    fn held_set(&self, sub: &str) -> Result<BTreeSet<Row>> {
        let mut stmt = self
            .sql()
            .prepare_cached("SELECT tbl, pk FROM tenantsync_replica_held WHERE sub = ?1")?;
        let rows = stmt.query_map([sub], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn held_by_any(&self, row: &Row) -> Result<bool> {
        Ok(self
            .sql()
            .prepare_cached(
                "SELECT 1 FROM tenantsync_replica_held WHERE tbl = ?1 AND pk = ?2 LIMIT 1",
            )?
            .exists(params![row.0, row.1])?)
    }

    fn holders(&self, row: &Row) -> Result<Vec<String>> {
        let mut stmt = self
            .sql()
            .prepare_cached("SELECT sub FROM tenantsync_replica_held WHERE tbl = ?1 AND pk = ?2")?;
        let rows = stmt.query_map(params![row.0, row.1], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// `sub` stops holding `row`; whether it held it.
    fn release(&self, sub: &str, row: &Row) -> Result<bool> {
        Ok(self
            .sql()
            .prepare_cached(
                "DELETE FROM tenantsync_replica_held WHERE sub = ?1 AND tbl = ?2 AND pk = ?3",
            )?
            .execute(params![sub, row.0, row.1])?
            > 0)
    }

    fn drop_held_everywhere(&self, row: &Row) -> Result<()> {
        self.sql()
            .prepare_cached("DELETE FROM tenantsync_replica_held WHERE tbl = ?1 AND pk = ?2")?
            .execute(params![row.0, row.1])?;
        Ok(())
    }

    /// Local versions at or below this hold nothing left to push.
    fn push_start(&self) -> Result<i64> {
        let pv = self.pushed_version()?;
        let floor = store::meta_i64(self.sql(), store::PUSH_FLOOR)?.unwrap_or(0);
        Ok(pv.max(floor))
    }

    /// The merged ranges `(lo, hi]` above the push start, in order.
    fn merged_ranges(&self) -> Result<Vec<(i64, i64)>> {
        let start = self.push_start()?;
        let mut stmt = self.sql().prepare_cached(
            "SELECT lo, hi FROM tenantsync_replica_merged WHERE hi > ?1 ORDER BY lo",
        )?;
        let rows = stmt.query_map([start], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records that local versions `(before, hi]` were written by merges of
    /// server data (inside the transaction that wrote them). Extends the
    /// last range when no local change lies between them.
    fn record_merged(&self, before: i64, hi: Option<i64>) -> Result<()> {
        let Some(hi) = hi.filter(|&h| h > before) else {
            return Ok(());
        };
        let last: Option<(i64, i64)> = self
            .sql()
            .query_row(
                "SELECT lo, hi FROM tenantsync_replica_merged ORDER BY lo DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((lo, last_hi)) = last {
            let between = self.conn.changes(&ChangesQuery {
                since: last_hi,
                until: Some(before),
                site: SiteFilter::Only(self.site),
                limit: Some(1),
                ..ChangesQuery::default()
            })?;
            if last_hi <= before && between.is_empty() {
                self.sql().execute(
                    "UPDATE tenantsync_replica_merged SET hi = ?2 WHERE lo = ?1",
                    params![lo, hi],
                )?;
                return Ok(());
            }
        }
        self.sql().execute(
            "INSERT OR REPLACE INTO tenantsync_replica_merged (lo, hi) VALUES (?1, ?2)",
            params![before, hi],
        )?;
        Ok(())
    }

    fn prune_merged(&self) -> Result<()> {
        let start = self.push_start()?;
        self.sql().execute(
            "DELETE FROM tenantsync_replica_merged WHERE hi <= ?1",
            [start],
        )?;
        Ok(())
    }
}

/// The canonical bytes of a row's packed pk.
fn canonical(table: &str, pk: &PackedPk) -> Result<Vec<u8>> {
    pk.canonical()
        .map(|p| p.0)
        .map_err(|e| ReplicaError::BadRowKey {
            table: table.to_owned(),
            row: RowKey {
                table: table.to_owned(),
                pk: pk.clone(),
            },
            reason: e.to_string(),
        })
}

/// The rows (canonical keys) of some changes.
fn rows_of<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Result<BTreeSet<Row>> {
    changes
        .into_iter()
        .map(|c| Ok((c.table.clone(), canonical(&c.table, &c.pk)?)))
        .collect()
}

fn in_ranges(ranges: &[(i64, i64)], v: i64) -> bool {
    ranges.iter().any(|&(lo, hi)| lo < v && v <= hi)
}

fn encoded_len(c: &Change) -> usize {
    let mut s = String::new();
    tenantsync_protocol::change::encode_change(c, &mut s);
    s.len()
}

fn group_by_table<'a>(rows: impl Iterator<Item = &'a Row>) -> BTreeMap<String, Vec<PackedPk>> {
    let mut out: BTreeMap<String, Vec<PackedPk>> = BTreeMap::new();
    for (table, pk) in rows {
        out.entry(table.clone())
            .or_default()
            .push(PackedPk(pk.clone()));
    }
    out
}
