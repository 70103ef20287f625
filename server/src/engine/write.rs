//! The write path: group commits of pushes and service SQL, each in its own
//! savepoint, applied whole or refused whole (docs/arch/server.md, "Write
//! path").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use tenantsync_core::{ApplyOptions, ClockBound, PackedPk, SiteId};
use tenantsync_policy::{MembershipResults, MembershipSet, WritePlan};
use tenantsync_protocol::ErrorCode;
use tenantsync_protocol::RowKey;
use tenantsync_protocol::http::{PushResponse, SqlResponse, SqlResult};
use tenantsync_protocol::ws::{PushRefusal, RefusedRow, ServerMsg};
use tenantsync_types::Value;

use super::filters::{FilterId, Filters, FxMap, FxSet};
use super::{Engine, PushCmd, PushReply, SqlCmd, Write, commit};
use crate::contract::{ApiError, OutFrame, PushError};
use crate::engine::store;
use crate::hook::{HookRow, PushAnswer};

/// A write plan with the membership instances its checks read.
pub(crate) struct PlanEntry {
    plan: WritePlan,
    /// Per direct membership: its instance and the tables its set reads.
    direct: Vec<(tenantsync_policy::MembershipId, FilterId, Vec<u16>)>,
}

/// Cached plans per (identity, table), holding instance references.
#[derive(Default)]
pub(crate) struct Plans {
    map: FxMap<(Arc<str>, u16), Arc<PlanEntry>>,
}

impl Plans {
    pub fn clear(&mut self, filters: &mut Filters) {
        for (_, e) in self.map.drain() {
            for (_, f, _) in &e.direct {
                filters.release_instance(*f);
            }
        }
    }
}

/// One row of a push: its table, its canonical key, the changes naming it.
struct PushRow {
    table: u16,
    pk: PackedPk,
    changes: Vec<tenantsync_core::Change>,
}

/// Why a judged row is not kept.
enum RowVerdict {
    /// Refused by the write policies: the whole push is refused.
    Refused(RefusedRow),
    /// A write the policies skip (a DELETE of a row its writer cannot
    /// read): rolled back, not a refusal.
    Skipped,
}

impl RowVerdict {
    fn into_refusal(self) -> Option<RefusedRow> {
        match self {
            RowVerdict::Refused(r) => Some(r),
            RowVerdict::Skipped => None,
        }
    }
}

/// How the server merges what peers push: a change for a row the server
/// does not hold that would not create it leaves no trace, and clocks are
/// bounded relative to the server's (docs/PROTOCOL.md, "Clocks").
const UNTRUSTED: ApplyOptions = ApplyOptions {
    absent_rows_leave_no_trace: true,
    clock_bound: Some(ClockBound {
        max_step: tenantsync_protocol::MAX_CLOCK_STEP,
        max: tenantsync_protocol::MAX_CLOCK,
    }),
};

/// The refusal reason of a change whose clocks are out of bounds; `None`
/// for any other error.
fn clock_refusal(e: &tenantsync_core::Error) -> Option<String> {
    match e {
        tenantsync_core::Error::Change { source, .. } => clock_refusal(source),
        tenantsync_core::Error::Clock { cid, reason, .. } => Some(format!(
            "column {cid:?}: {reason} (docs/PROTOCOL.md, \"Clocks\")"
        )),
        _ => None,
    }
}

enum Outcome {
    Applied {
        pushed_version: i64,
    },
    Duplicate {
        pushed_version: i64,
    },
    /// The refusal (its `state` and `invisible` still to describe) and
    /// the rows the push touched.
    Refused(Box<(PushRefusal, Vec<(u16, PackedPk)>)>),
    /// Rolled back: the backend's write hook must judge these rows first.
    Ask(Vec<HookRow>),
    Error(ApiError),
}

pub(super) fn refuse_shutting_down(w: Write) {
    let e = ApiError::new(ErrorCode::ShuttingDown, "the server is stopping");
    match w {
        Write::Push(p) => reply_push(p.reply, PushAnswer::Done(Err(PushError::Api(e)))),
        Write::Sql(s) => {
            let _ = s.reply.send(Err(e));
        }
    }
}

fn reply_push(reply: PushReply, r: PushAnswer) {
    match (reply, r) {
        (PushReply::Http(tx), r) => {
            let _ = tx.send(r);
        }
        (PushReply::Ws { outbox, id }, PushAnswer::Done(r)) => {
            outbox.push_frame(push_answer_frame(id, r));
        }
        (PushReply::Ws { outbox, id }, PushAnswer::Ask(_)) => {
            // A WebSocket push to hooked tables takes the HTTP path
            // (`Session::handle`); this one cannot be asked about.
            let e = internal("a WebSocket push reached the write hook without its path");
            outbox.push_frame(push_answer_frame(id, Err(PushError::Api(e))));
        }
    }
}

/// The frame answering a WebSocket push `id`.
pub(crate) fn push_answer_frame(id: String, r: Result<PushResponse, PushError>) -> OutFrame {
    let msg = match r {
        Ok(ok) => ServerMsg::PushOk {
            id,
            pushed_version: ok.pushed_version,
            server_version: ok.server_version,
        },
        Err(PushError::Refused(mut r)) => {
            r.id = id;
            ServerMsg::PushRefused(*r)
        }
        Err(PushError::Api(e)) => ServerMsg::Error(e.ws(Some(id))),
    };
    OutFrame::Text(serde_json::to_string(&msg).expect("messages serialise"))
}

/// A refusal of a push that touched `rows`, naming the `refused` ones;
/// `state` and `invisible` are filled once the group committed
/// (`Engine::describe`).
fn refusal_head(
    rows: &[(u16, PackedPk)],
    refused: Vec<RefusedRow>,
    pushed_version: i64,
) -> PushRefusal {
    let n = refused.len();
    PushRefusal {
        id: String::new(),
        code: ErrorCode::PolicyRefused,
        message: format!(
            "{n} of {} rows refused by write policies: {}",
            rows.len(),
            refused
                .first()
                .map(|r| r.reason.as_str())
                .unwrap_or_default()
        ),
        rows: refused,
        state: Vec::new(),
        invisible: Vec::new(),
        pushed_version,
    }
}

pub(super) fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, e.to_string())
}

/// The tenant a scoped service statement may write (see
/// [`install_scope_guard`]); `None` outside one.
pub(crate) type Scope = Arc<std::sync::Mutex<Option<Arc<str>>>>;

/// Service SQL on a node of several shards is scoped to one tenant: TEMP
/// triggers on every table of the database (on the engine connection only)
/// abort a statement that inserts, updates or deletes a row whose tenant
/// column is not that tenant (before and after the change), or that writes
/// a table without a tenant column (a local table exists once per shard, so
/// no tenant's statement may change it). Outside scoped service SQL
/// `tenantsync_scope()` is NULL and the triggers do nothing (a merged push
/// never sees them act).
pub(crate) fn install_scope_guard(
    db: &tenantsync_core::CrrConnection,
    tenant_column: &str,
    scope: Scope,
) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    let conn = db.conn();
    conn.create_scalar_function(
        "tenantsync_scope",
        0,
        FunctionFlags::SQLITE_UTF8,
        move |_| {
            Ok(scope
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                .map(str::to_owned))
        },
    )?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM main.sqlite_master WHERE type = 'table' AND sql NOT LIKE 'CREATE VIRTUAL%'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let col = q(tenant_column);
    for table in tables
        .iter()
        .filter(|t| !crate::engine::schema::is_internal_table(t))
    {
        let has: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2 COLLATE NOCASE",
            [table.as_str(), tenant_column],
            |r| r.get(0),
        )?;
        let abort = format!(
            "SELECT RAISE(ABORT, 'service SQL scoped to one tenant may only write rows of that tenant (table {})')",
            table.replace('\'', "''")
        );
        for (when, event) in [
            (format!("NEW.{col} IS NOT tenantsync_scope()"), "INSERT"),
            (
                format!(
                    "OLD.{col} IS NOT tenantsync_scope() OR NEW.{col} IS NOT tenantsync_scope()"
                ),
                "UPDATE",
            ),
            (format!("OLD.{col} IS NOT tenantsync_scope()"), "DELETE"),
        ] {
            let cond = if has { when } else { "1".to_owned() };
            conn.execute_batch(&format!(
                "CREATE TEMP TRIGGER IF NOT EXISTS {} BEFORE {event} ON main.{} \
                 WHEN tenantsync_scope() IS NOT NULL AND ({cond}) BEGIN {abort}; END;",
                q(&format!(
                    "tenantsync_scope_{table}_{}",
                    event.to_lowercase()
                )),
                q(table)
            ))?;
        }
    }
    Ok(())
}

/// Tables of the engine's own (SQLite's, cr-sqlite's, tenantsync's): never
/// written by service SQL.
/// The SQLite authorizer for service SQL: no writes to internal tables, no
/// schema changes, ATTACH, PRAGMA or transaction control. It is installed
/// on the engine connection for good and judges only while `guard` is set,
/// i.e. while a service statement is being prepared.
pub(crate) fn install_authorizer(
    db: &mut tenantsync_core::CrrConnection,
    guard: Arc<std::sync::atomic::AtomicBool>,
) -> rusqlite::Result<()> {
    db.conn_mut().authorizer(Some(move |ctx: AuthContext<'_>| {
        if guard.load(std::sync::atomic::Ordering::SeqCst) {
            authorize(ctx)
        } else {
            Authorization::Allow
        }
    }))
}

fn authorize(ctx: AuthContext<'_>) -> Authorization {
    if ctx.accessor.is_some() {
        // Inside a trigger (the CRR tracking): the engine's own work.
        return Authorization::Allow;
    }
    match ctx.action {
        AuthAction::Insert { table_name }
        | AuthAction::Delete { table_name }
        | AuthAction::Update { table_name, .. } => {
            if crate::engine::schema::is_internal_table(table_name) {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        AuthAction::Read { .. } | AuthAction::Select | AuthAction::Recursive => {
            Authorization::Allow
        }
        AuthAction::Function { function_name } => {
            let f = function_name.to_ascii_lowercase();
            if f.starts_with("crsql_") && f != "crsql_db_version" && f != "crsql_site_id" {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        _ => Authorization::Deny,
    }
}

impl Engine {
    fn plan_for(&mut self, who: &super::Who, table: u16) -> Result<Arc<PlanEntry>, ApiError> {
        let key = (who.ident_key.clone(), table);
        if let Some(p) = self.plans.map.get(&key) {
            return Ok(p.clone());
        }
        if self.plans.map.len() > 8192 {
            self.plans.clear(&mut self.filters);
        }
        let tname = self.schema.tables[table as usize].name.clone();
        let plan = self
            .policy
            .write_plan(&who.principal.identity, &tname)
            .map_err(|e| ApiError::new(ErrorCode::BadPush, e.to_string()))?;
        let mut direct = Vec::new();
        for m in plan.memberships.iter().filter(|m| m.direct) {
            let f = self
                .filters
                .instance_for(
                    &self.db,
                    &self.schema,
                    &plan.memberships,
                    m.id,
                    self.version,
                )
                .map_err(internal)?;
            let tables = self.filters.instance(f).tables.clone();
            direct.push((m.id, f, tables));
        }
        let e = Arc::new(PlanEntry { plan, direct });
        self.plans.map.insert(key, e.clone());
        Ok(e)
    }

    /// Runs a group of writes in one transaction and fans the commit out.
    pub(super) fn run_group(&mut self, group: Vec<Write>) {
        // Plans (and the instances they read) are built before the
        // transaction, at the committed version.
        let mut plans: Vec<FxMap<u16, Arc<PlanEntry>>> = Vec::with_capacity(group.len());
        let mut pre: Vec<Option<ApiError>> = Vec::with_capacity(group.len());
        for w in &group {
            let mut m = FxMap::default();
            let mut err = None;
            if let Write::Push(p) = w
                && !p.who.principal.service
            {
                let tables: FxSet<u16> = p
                    .changes
                    .iter()
                    .filter_map(|c| self.schema.table(&c.table).map(|t| t.id))
                    .collect();
                for t in tables {
                    match self.plan_for(&p.who, t) {
                        Ok(e) => {
                            m.insert(t, e);
                        }
                        Err(e) => err = Some(e),
                    }
                }
            }
            plans.push(m);
            pre.push(err);
        }
        let prev = self.version;
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(group.len());
        let mut sql_results: Vec<Option<Vec<SqlResult>>> = Vec::with_capacity(group.len());
        let mut pending_pv: FxMap<SiteId, i64> = FxMap::default();
        let mut touched: FxSet<u16> = FxSet::default();
        if let Err(e) = self.begin_write() {
            self.stats
                .write_failed
                .store(true, std::sync::atomic::Ordering::Release);
            for w in group {
                fail(w, e.to_api());
            }
            return;
        }
        for (i, w) in group.iter().enumerate() {
            if let Some(e) = pre[i].take() {
                outcomes.push(Outcome::Error(e));
                sql_results.push(None);
                continue;
            }
            let sp = match self.db.savepoint("tenantsync_write") {
                Ok(sp) => sp,
                Err(e) => {
                    outcomes.push(Outcome::Error(internal(e)));
                    sql_results.push(None);
                    continue;
                }
            };
            match w {
                Write::Push(p) => {
                    let o = self.push_one(p, &plans[i], &mut pending_pv, &mut touched, &sp);
                    if let Outcome::Error(_) = &o {
                        let _ = self.db.rollback_to(&sp);
                    }
                    let _ = self.db.release(sp);
                    outcomes.push(o);
                    sql_results.push(None);
                }
                Write::Sql(s) => match self.sql_one(s) {
                    Ok(r) => {
                        let _ = self.db.release(sp);
                        for t in &self.schema.tables {
                            touched.insert(t.id);
                        }
                        outcomes.push(Outcome::Applied { pushed_version: 0 });
                        sql_results.push(Some(r));
                    }
                    Err(e) => {
                        let _ = self.db.rollback_to(&sp);
                        let _ = self.db.release(sp);
                        outcomes.push(Outcome::Error(e));
                        sql_results.push(None);
                    }
                },
            }
        }
        if let Err(e) = self.commit_write() {
            self.stats
                .write_failed
                .store(true, std::sync::atomic::Ordering::Release);
            tracing::error!(error = %e, "group commit failed");
            for w in group {
                fail(w, e.to_api());
            }
            return;
        }
        self.stats
            .write_failed
            .store(false, std::sync::atomic::Ordering::Release);
        for (site, v) in pending_pv {
            if let Some(p) = self.peers.get_mut(&site) {
                p.pushed_version = v;
            }
        }
        let version = match self.db.db_version() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the db_version after a commit");
                prev
            }
        };
        self.version = version;
        self.stats
            .version
            .store(version, std::sync::atomic::Ordering::Release);
        // A refusal describes the rows it touched as the server has them
        // at the committed version (after the writes of the group that came
        // after it), the version the pusher's parts are at when it reads the
        // refusal: a row a later write of the group brought into one of its
        // subscriptions is in `state`, not `invisible` (oracle seed 125).
        for (w, o) in group.iter().zip(outcomes.iter_mut()) {
            if let (Write::Push(p), Outcome::Refused(r)) = (w, &mut *o) {
                let (refusal, rows) = &mut **r;
                if let Err(e) = self.describe(p, rows, refusal) {
                    *o = Outcome::Error(e);
                }
            }
        }
        // The commit reaches every subscription before anyone is answered:
        // on a pusher's connection the changes of its commit that its own
        // subscriptions get are queued before its `push_ok` (read your
        // writes; the client settles its pushed rows on that order,
        // docs/PROTOCOL.md §4.3), and a service write's answer means its
        // changes are on their way.
        if version > prev {
            match commit::read_batch(&self.db, &self.schema, prev, version) {
                Ok(rows) => self.fan_out(rows, version),
                Err(e) => tracing::error!(error = %e, version, "reading the commit failed"),
            }
        }
        for ((w, o), r) in group.into_iter().zip(outcomes).zip(sql_results) {
            match w {
                Write::Push(p) => {
                    let res = match o {
                        Outcome::Applied { pushed_version } => {
                            metrics::counter!("tenantsync_changes_in_total")
                                .increment(p.changes.len() as u64);
                            Ok(PushResponse {
                                pushed_version,
                                server_version: version,
                            })
                        }
                        Outcome::Duplicate { pushed_version } => Ok(PushResponse {
                            pushed_version,
                            server_version: 0,
                        }),
                        Outcome::Refused(r) => {
                            metrics::counter!("tenantsync_push_refused_total").increment(1);
                            Err(PushError::Refused(Box::new(r.0)))
                        }
                        Outcome::Ask(rows) => {
                            reply_push(p.reply, PushAnswer::Ask(rows));
                            continue;
                        }
                        Outcome::Error(e) => Err(PushError::Api(e)),
                    };
                    metrics::histogram!("tenantsync_push_seconds")
                        .record(p.received.elapsed().as_secs_f64());
                    reply_push(p.reply, PushAnswer::Done(res));
                }
                Write::Sql(s) => {
                    let res = match (o, r) {
                        (Outcome::Error(e), _) => Err(e),
                        (_, Some(results)) => Ok(SqlResponse {
                            db_version: version,
                            results,
                        }),
                        _ => Err(internal("no result")),
                    };
                    let _ = s.reply.send(res);
                }
            }
        }
    }

    fn membership_sets(
        &self,
        plans: &FxMap<u16, Arc<PlanEntry>>,
        table: u16,
        touched: &FxSet<u16>,
    ) -> Result<MembershipResults, ApiError> {
        let mut r = MembershipResults::new();
        let Some(e) = plans.get(&table) else {
            return Ok(r);
        };
        for (id, inst, tables) in &e.direct {
            let set: MembershipSet = if tables.iter().any(|t| touched.contains(t)) {
                let m = &e.plan.memberships[id.0 as usize];
                let mut stmt = self.db.conn().prepare_cached(&m.sql).map_err(internal)?;
                let vals: Vec<Value> = stmt
                    .query_map(rusqlite::params_from_iter(m.params.iter()), |row| {
                        row.get(0)
                    })
                    .map_err(internal)?
                    .collect::<rusqlite::Result<_>>()
                    .map_err(internal)?;
                m.set(vals)
            } else {
                self.filters.instance(*inst).set.clone()
            };
            r.insert(*id, set);
        }
        Ok(r)
    }

    fn push_one(
        &mut self,
        p: &PushCmd,
        plans: &FxMap<u16, Arc<PlanEntry>>,
        pending_pv: &mut FxMap<SiteId, i64>,
        touched: &mut FxSet<u16>,
        sp: &tenantsync_core::Savepoint,
    ) -> Outcome {
        let pv = match pending_pv.get(&p.site) {
            Some(v) => *v,
            None => match self.bind_peer(&p.who, p.site) {
                Ok(v) => v,
                Err(e) => return Outcome::Error(e),
            },
        };
        if p.to <= pv {
            return Outcome::Duplicate { pushed_version: pv };
        }
        if p.from > pv {
            let mut e = ApiError::new(
                ErrorCode::Gap,
                format!(
                    "the push starts after version {}, the server holds your changes up to {pv}: resend from there",
                    p.from
                ),
            );
            e.pushed_version = Some(pv);
            return Outcome::Error(e);
        }
        let rows = match self.push_rows(p) {
            Ok(r) => r,
            Err(e) => return Outcome::Error(e),
        };
        let mut refused: Vec<RefusedRow> = Vec::new();
        let mut ms_cache: FxMap<u16, Arc<MembershipResults>> = FxMap::default();
        let mut hooked: Vec<HookRow> = Vec::new();
        for row in &rows {
            match self.push_row(p, row, plans, touched, &mut ms_cache, &mut hooked) {
                Ok(Some(r)) => refused.push(r),
                Ok(None) => {}
                Err(e) => return Outcome::Error(e),
            }
        }
        if refused.is_empty() && !hooked.is_empty() {
            match hook_verdicts(p, hooked) {
                Ok(backend) => refused = backend,
                Err(ask) => {
                    if let Err(e) = self.db.rollback_to(sp) {
                        return Outcome::Error(internal(e));
                    }
                    return Outcome::Ask(ask);
                }
            }
        }
        let keys: Vec<(u16, PackedPk)> = rows.into_iter().map(|r| (r.table, r.pk)).collect();
        if !refused.is_empty() {
            if let Err(e) = self.db.rollback_to(sp) {
                return Outcome::Error(internal(e));
            }
            // Not held: pushed_version stays (docs/PROTOCOL.md §7), so a
            // peer that lost this answer resends and is refused again.
            // Its `state` is read after the group commits (`describe`).
            return Outcome::Refused(Box::new((refusal_head(&keys, refused, pv), keys)));
        }
        let new_pv = pv.max(p.to);
        if let Err(e) = store::set_pushed_version(self.db.conn(), &p.site, new_pv) {
            return Outcome::Error(internal(e));
        }
        pending_pv.insert(p.site, new_pv);
        Outcome::Applied {
            pushed_version: new_pv,
        }
    }

    /// The rows a push names, each by the one key the merge writes it under
    /// (the table's canonical key, SQLite's own reading of the pk), with its
    /// changes, in first-named order. A key SQLite would not store (NULL,
    /// a text rowid such as "\u{a0}5", a STRICT mismatch) refuses the push.
    fn push_rows(&self, p: &PushCmd) -> Result<Vec<PushRow>, ApiError> {
        let mut rows: Vec<PushRow> = Vec::new();
        let mut index: FxMap<(u16, PackedPk), usize> = FxMap::default();
        for (i, c) in p.changes.iter().enumerate() {
            let Some(t) = self.schema.table(&c.table) else {
                return Err(ApiError::new(
                    ErrorCode::BadPush,
                    format!("change {i}: table {:?} is not a CRR", c.table),
                ));
            };
            let pk = self.db.canonical_pk(&c.table, &c.pk).map_err(|e| {
                ApiError::new(
                    ErrorCode::BadPush,
                    format!("change {i} names a key SQLite would not store: {e}"),
                )
            })?;
            let k = *index.entry((t.id, pk.clone())).or_insert_with(|| {
                rows.push(PushRow {
                    table: t.id,
                    pk,
                    changes: Vec::new(),
                });
                rows.len() - 1
            });
            rows[k].changes.push(c.clone());
        }
        Ok(rows)
    }

    /// Merges one row of a push in its own savepoint and judges it, with
    /// PostgreSQL's rules: the row as it was and as it is after the merge,
    /// every subquery on the database as it was before this row (earlier
    /// accepted rows of the group included). Returns the refusal, if any;
    /// a refused or skipped row is rolled back. What the merge changed must
    /// be exactly this row: nothing is kept that no check saw.
    fn push_row(
        &mut self,
        p: &PushCmd,
        row: &PushRow,
        plans: &FxMap<u16, Arc<PlanEntry>>,
        touched: &mut FxSet<u16>,
        ms_cache: &mut FxMap<u16, Arc<MembershipResults>>,
        hooked: &mut Vec<HookRow>,
    ) -> Result<Option<RefusedRow>, ApiError> {
        let tname = self.schema.tables[row.table as usize].name.clone();
        let service = p.who.principal.service;
        let before = self
            .db
            .row_values(&tname, &row.pk)
            .map_err(|e| ApiError::new(ErrorCode::BadPush, e.to_string()))?;
        let ms = if service {
            None
        } else {
            Some(match ms_cache.get(&row.table) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(self.membership_sets(plans, row.table, touched)?);
                    ms_cache.insert(row.table, m.clone());
                    m
                }
            })
        };
        let rsp = self.db.savepoint("tenantsync_row").map_err(internal)?;
        let undo = |engine: &Engine, rsp: tenantsync_core::Savepoint| -> Result<(), ApiError> {
            engine.db.rollback_to(&rsp).map_err(internal)?;
            engine.db.release(rsp).map_err(internal)
        };
        let report = match self.db.apply_with(&row.changes, &UNTRUSTED) {
            Ok(r) => r,
            Err(e) => {
                undo(self, rsp)?;
                return match clock_refusal(&e) {
                    Some(reason) => Ok(Some(RefusedRow {
                        table: tname.to_string(),
                        pk: row.pk.clone(),
                        command: if before.is_some() { "UPDATE" } else { "INSERT" }.into(),
                        policy: None,
                        reason,
                    })),
                    None => Err(ApiError::new(
                        ErrorCode::BadPush,
                        format!("the changes cannot be merged: {e}"),
                    )),
                };
            }
        };
        if report.changed.is_empty() {
            // Every change lost, was already there, or named a row that is
            // absent before and after (it leaves no trace).
            self.db.release(rsp).map_err(internal)?;
            return Ok(None);
        }
        if report.changed.len() != 1
            || report.changed[0].0 != *tname
            || report.changed[0].1 != row.pk
        {
            undo(self, rsp)?;
            return Err(internal(format!(
                "a merge of {tname} pk {} changed other rows",
                row.pk
            )));
        }
        let judged = self.hooked.as_ref().is_some_and(|h| h.contains(&row.table));
        let mut after = None;
        if ms.is_some() || judged {
            after = self.db.row_values(&tname, &row.pk).map_err(internal)?;
        }
        if judged {
            // The backend's write hook sees the row as the merge made it.
            let t = &self.schema.tables[row.table as usize];
            let image = |v: &Option<Vec<Value>>| {
                v.as_ref().map(|vals| {
                    t.columns
                        .iter()
                        .cloned()
                        .zip(vals.iter().cloned())
                        .collect()
                })
            };
            hooked.push(HookRow {
                table: tname.to_string(),
                pk: row.pk.clone(),
                before: image(&before),
                after: image(&after),
            });
        }
        if let Some(ms) = ms
            && let Some(refusal) = self.judge_row(plans, row, &tname, before, after, &ms)?
        {
            undo(self, rsp)?;
            return Ok(refusal.into_refusal());
        }
        self.db.release(rsp).map_err(internal)?;
        if touched.insert(row.table) {
            // Memberships reading this table see the row from now on.
            ms_cache.clear();
        }
        Ok(None)
    }

    /// The policy decision on one merged row; `None` when it is allowed.
    fn judge_row(
        &self,
        plans: &FxMap<u16, Arc<PlanEntry>>,
        row: &PushRow,
        tname: &str,
        before: Option<Vec<Value>>,
        after: Option<Vec<Value>>,
        ms: &MembershipResults,
    ) -> Result<Option<RowVerdict>, ApiError> {
        if before.is_none() && after.is_none() {
            return Err(internal(format!(
                "a merge of {tname} pk {} changed a row that is absent before and after",
                row.pk
            )));
        }
        let Some(plan) = plans.get(&row.table) else {
            return Err(internal(format!("no write plan for {tname}")));
        };
        let d = plan
            .plan
            .check(&[(before.as_deref(), after.as_deref())], ms)
            .map_err(|e| ApiError::new(ErrorCode::BadPush, e.to_string()))?
            .swap_remove(0);
        Ok(if d.allowed {
            None
        } else if d.skipped {
            Some(RowVerdict::Skipped)
        } else {
            Some(RowVerdict::Refused(RefusedRow {
                table: tname.to_owned(),
                pk: row.pk.clone(),
                command: serde_json::to_value(d.command)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                policy: d.policies.first().cloned(),
                reason: d.reason,
            }))
        })
    }

    /// Fills a refusal's `state` (whole rows the peer may read, as the
    /// server has them now) and `invisible` (the push's other rows).
    fn describe(
        &mut self,
        p: &PushCmd,
        rows: &[(u16, PackedPk)],
        refusal: &mut PushRefusal,
    ) -> Result<(), ApiError> {
        let mut by_table: BTreeMap<u16, Vec<PackedPk>> = BTreeMap::new();
        for (t, pk) in rows {
            by_table.entry(*t).or_default().push(pk.clone());
        }
        let mut state = Vec::new();
        let mut invisible = Vec::new();
        for (t, pks) in by_table {
            let table = &self.schema.tables[t as usize];
            let q = self
                .policy
                .rewrite(
                    &p.who.principal.identity,
                    &format!("SELECT * FROM \"{}\"", table.name.replace('"', "\"\"")),
                )
                .map_err(internal)?;
            let pk_cond: Vec<String> = table
                .pk
                .iter()
                .enumerate()
                .map(|(k, &c)| {
                    format!(
                        "\"{}\".\"{}\" IS ?{}",
                        table.name.replace('"', "\"\""),
                        table.columns[c].replace('"', "\"\""),
                        q.params.len() + k + 1
                    )
                })
                .collect();
            let sql = format!(
                "SELECT 1 FROM \"{}\" WHERE {} AND ({})",
                table.name.replace('"', "\"\""),
                pk_cond.join(" AND "),
                q.where_sql
            );
            let mut visible = Vec::new();
            for pk in pks {
                let vals = pk.unpack().map_err(internal)?;
                let mut params = q.params.clone();
                params.extend(vals);
                let mut stmt = self.db.conn().prepare_cached(&sql).map_err(internal)?;
                let seen = stmt
                    .exists(rusqlite::params_from_iter(params.iter()))
                    .map_err(internal)?;
                if seen {
                    visible.push(pk);
                } else {
                    invisible.push(RowKey {
                        table: table.name.to_string(),
                        pk,
                    });
                }
            }
            state.extend(commit::whole_changes(&self.db, &table.name, &visible).map_err(internal)?);
        }
        refusal.state = state;
        refusal.invisible = invisible;
        Ok(())
    }

    fn sql_one(&mut self, s: &SqlCmd) -> Result<Vec<SqlResult>, ApiError> {
        if !s.who.principal.service {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "POST /v1/sql needs the service role",
            ));
        }
        let started = Instant::now();
        let mut results = Vec::new();
        let mut changed = 0u64;
        for (i, st) in s.statements.iter().enumerate() {
            let err = |e: rusqlite::Error| {
                ApiError::new(
                    ErrorCode::SqlError,
                    format!(
                        "statement {} ({:?}) failed: {e}; nothing was applied",
                        i + 1,
                        st.sql
                    ),
                )
            };
            let conn = self.db.conn();
            self.guard.store(true, std::sync::atomic::Ordering::SeqCst);
            let prepared = conn.prepare(&st.sql);
            self.guard.store(false, std::sync::atomic::Ordering::SeqCst);
            let _scoped = ScopeGuard::set(&self.scope, s.who.scope.clone());
            let mut stmt = prepared.map_err(err)?;
            let n = stmt.column_count();
            let mut rows = Vec::new();
            {
                let mut q = stmt
                    .query(rusqlite::params_from_iter(st.params.iter()))
                    .map_err(err)?;
                while let Some(r) = q.next().map_err(err)? {
                    let row: Vec<Value> = (0..n)
                        .map(|k| r.get::<_, Value>(k))
                        .collect::<rusqlite::Result<_>>()
                        .map_err(err)?;
                    rows.push(row);
                }
            }
            let changes = if stmt.readonly() { 0 } else { conn.changes() };
            changed += changes;
            results.push(SqlResult { rows, changes });
        }
        tracing::info!(
            subject = %s.who.principal.subject,
            statements = ?s.statements.iter().map(|x| x.sql.as_str()).collect::<Vec<_>>(),
            rows_changed = changed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "service SQL"
        );
        Ok(results)
    }
}

/// Sets the scope for one statement; clears it when dropped.
struct ScopeGuard<'a>(&'a Scope);

impl<'a> ScopeGuard<'a> {
    fn set(scope: &'a Scope, tenant: Option<Arc<str>>) -> ScopeGuard<'a> {
        *scope.lock().unwrap_or_else(|p| p.into_inner()) = tenant;
        ScopeGuard(scope)
    }
}

impl Drop for ScopeGuard<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

fn fail(w: Write, e: ApiError) {
    match w {
        Write::Push(p) => reply_push(p.reply, PushAnswer::Done(Err(PushError::Api(e)))),
        Write::Sql(s) => {
            let _ = s.reply.send(Err(e));
        }
    }
}

/// The rows of a push the backend's write hook judges, against the verdicts
/// the push carries: the rows the backend refused when it judged exactly
/// these rows (`Ok`), else the rows to ask it about (`Err`).
fn hook_verdicts(p: &PushCmd, rows: Vec<HookRow>) -> Result<Vec<RefusedRow>, Vec<HookRow>> {
    let Some(round) = p
        .hook
        .as_ref()
        .filter(|r| r.seen == rows && r.verdicts.len() == rows.len())
    else {
        return Err(rows);
    };
    Ok(rows
        .into_iter()
        .zip(&round.verdicts)
        .filter(|(_, v)| !v.accept)
        .map(|(row, v)| RefusedRow {
            command: match (&row.before, &row.after) {
                (None, _) => "INSERT",
                (Some(_), None) => "DELETE",
                (Some(_), Some(_)) => "UPDATE",
            }
            .to_owned(),
            table: row.table,
            pk: row.pk,
            policy: None,
            reason: format!(
                "refused by the backend: {}",
                v.reason.as_deref().unwrap_or("no reason given")
            ),
        })
        .collect())
}
