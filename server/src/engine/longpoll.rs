//! Long-polls (`POST /v1/pull` with `wait_ms`) waiting for a commit that
//! concerns them. A commit wakes a waiter only when one of its rows is in a
//! table the waiter's subscriptions depend on and
//!
//! - the table is *tenant-scoped* (every policy reading it pins the tenant
//!   column to the token's tenant, `PolicySet::tenant_scoped_reads`) and
//!   the row's tenant after the commit is the waiter's, or one of the
//!   waiter's subscriptions held the row (it changed or left); a deleted
//!   row of a scoped table the subscription does not read directly (a
//!   membership's) wakes it too, its tenant being unknown;
//! - or the table is not tenant-scoped (any tenant's row may concern it).
//!
//! So one tenant's commits never wake another tenant's long-polls on
//! tenant-scoped tables. The last commits are kept in summary, so a wait
//! registered after commits it has not seen is answered at once only when
//! one of them concerns it.

use std::collections::VecDeque;
use std::sync::Arc;

use tenantsync_core::{PackedPk, SiteId};
use tenantsync_types::Value;
use tokio::sync::oneshot;

use crate::engine::filters::{ChangedRow, FxSet};
use crate::engine::schema::ServerSchema;

/// Commits remembered in summary.
const RECENT: usize = 256;
/// Rows of one commit remembered one by one; a larger commit wakes every
/// waiter on its tables.
const ROWS_PER_COMMIT: usize = 1024;

/// Per table (by id): the index of its tenant column when reads of it are
/// tenant-scoped.
pub(crate) type ReadScope = Vec<Option<usize>>;

/// Computes the [`ReadScope`] of a policy set.
pub(crate) fn read_scope(
    schema: &ServerSchema,
    policy: &tenantsync_policy::PolicySet,
    tenant_column: &str,
) -> ReadScope {
    let flags = policy.tenant_scoped_reads(tenant_column, tenant_column);
    let by_name = |name: &str| {
        policy
            .schema()
            .tables
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case(name))
            .and_then(|i| flags.get(i).copied())
            .unwrap_or(false)
    };
    schema
        .tables
        .iter()
        .map(|t| by_name(&t.name).then(|| t.column(tenant_column)).flatten())
        .collect()
}

/// Whether the subscription (site, id) holds the row (table, pk).
pub(crate) type Holds<'a> = dyn Fn(&SiteId, &Arc<str>, u16, &PackedPk) -> bool + 'a;

/// One changed row as a waiter sees it.
struct Touched {
    table: u16,
    tenant: RowTenant,
    pk: PackedPk,
}

/// The tenant of a changed row after the commit.
enum RowTenant {
    /// Its tenant column's text.
    Is(Arc<str>),
    /// Deleted (or absent): its tenant before is not known here.
    Gone,
    /// Any tenant's subscription may read it (the table is not
    /// tenant-scoped, or the column holds something else than text).
    Any,
}

/// What a commit touched (`None`: too much to list, wakes every waiter on
/// `tables`).
struct Summary {
    version: i64,
    tables: FxSet<u16>,
    rows: Option<Vec<Touched>>,
}

/// A long-poll waiting for a commit.
pub(crate) struct Waiter {
    pub tenant: Arc<str>,
    pub site: SiteId,
    /// Its subscriptions (ids), for the rows they hold.
    pub subs: Vec<Arc<str>>,
    /// The subscriptions' main tables (ids).
    pub main: FxSet<u16>,
    /// Every table they depend on (main and memberships).
    pub tables: FxSet<u16>,
    pub reply: oneshot::Sender<()>,
}

/// The waiting long-polls and the last commits' summaries.
#[derive(Default)]
pub(crate) struct LongPolls {
    waiters: Vec<Waiter>,
    recent: VecDeque<Summary>,
    /// Every commit after this version is in `recent`.
    complete_after: i64,
    /// The last version recorded.
    last: i64,
}

impl LongPolls {
    /// No waiter yet; the database is at `version`.
    pub fn new(version: i64) -> LongPolls {
        LongPolls {
            waiters: Vec::new(),
            recent: VecDeque::new(),
            complete_after: version,
            last: version,
        }
    }

    /// Records a commit and wakes the waiters it concerns; `held` says
    /// whether a subscription of a site holds a row.
    pub fn commit(
        &mut self,
        version: i64,
        rows: &[ChangedRow],
        scope: &ReadScope,
        held: &Holds<'_>,
    ) {
        let summary = summarize(version, rows, scope);
        if !self.waiters.is_empty() {
            let waiters = std::mem::take(&mut self.waiters);
            for w in waiters {
                if w.reply.is_closed() {
                    continue;
                }
                if concerns(&summary, &w, held) {
                    let _ = w.reply.send(());
                } else {
                    self.waiters.push(w);
                }
            }
        }
        if version != self.last + 1 {
            // A version this does not know about (none today): what came
            // before is no longer complete.
            self.recent.clear();
            self.complete_after = version - 1;
        }
        self.last = version;
        if self.recent.len() == RECENT
            && let Some(old) = self.recent.pop_front()
        {
            self.complete_after = old.version;
        }
        self.recent.push_back(summary);
    }

    /// Registers a waiter that has seen the commits up to `since`: answered
    /// at once when a later commit concerns it (or when they are no longer
    /// all remembered).
    pub fn wait(&mut self, w: Waiter, since: i64, held: &Holds<'_>) {
        let now = since < self.complete_after
            || self
                .recent
                .iter()
                .filter(|s| s.version > since)
                .any(|s| concerns(s, &w, held));
        if now {
            let _ = w.reply.send(());
        } else {
            self.waiters.push(w);
        }
    }

    /// Wakes every waiter: a policy reload at `version` (what each sees
    /// may have changed).
    pub fn wake_all(&mut self, version: i64) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(());
        }
        self.recent.clear();
        self.complete_after = version;
        self.last = version;
    }

    /// Waiters (for the status gauges).
    pub fn len(&self) -> usize {
        self.waiters.len()
    }
}

fn summarize(version: i64, rows: &[ChangedRow], scope: &ReadScope) -> Summary {
    let tables: FxSet<u16> = rows.iter().map(|r| r.table).collect();
    let listed = (rows.len() <= ROWS_PER_COMMIT).then(|| {
        rows.iter()
            .map(|r| {
                let col = scope.get(r.table as usize).copied().flatten();
                let tenant = match (col, &r.after) {
                    (None, _) => RowTenant::Any,
                    (Some(_), None) => RowTenant::Gone,
                    (Some(c), Some(after)) => match after.get(c) {
                        Some(Value::Text(t)) => RowTenant::Is(Arc::from(t.as_str())),
                        _ => RowTenant::Any,
                    },
                };
                Touched {
                    table: r.table,
                    tenant,
                    pk: r.pk.clone(),
                }
            })
            .collect()
    });
    Summary {
        version,
        tables,
        rows: listed,
    }
}

fn concerns(s: &Summary, w: &Waiter, held: &Holds<'_>) -> bool {
    if s.tables.is_disjoint(&w.tables) {
        return false;
    }
    let Some(rows) = &s.rows else {
        return true;
    };
    rows.iter()
        .filter(|r| w.tables.contains(&r.table))
        .any(|r| match &r.tenant {
            RowTenant::Any => true,
            RowTenant::Is(t) if **t == *w.tenant => true,
            // Another tenant's row now, or deleted: only if it was held.
            _ if w.main.contains(&r.table) => {
                w.subs.iter().any(|sub| held(&w.site, sub, r.table, &r.pk))
            }
            // A membership table's row of another tenant reads nothing of
            // this one; a deleted one may have been this tenant's.
            RowTenant::Is(_) => false,
            RowTenant::Gone => true,
        })
}
