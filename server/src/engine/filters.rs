//! Views and membership instances, both *filters*: a predicate over one
//! table's rows with the exact set of rows it selects at the engine's
//! version, maintained from every commit. An instance also keeps the value
//! each member row contributes to its membership set.
//!
//! Finding the filters a changed row touches never evaluates every filter:
//! an equality index (from each filter's index cover: `col = ?`, `col IN
//! (...)`, and one entry per value of a membership set for `col IN
//! (SELECT ...)`), the filters without a cover of the row's table, and the
//! filters that held the row before (`holders`, the reverse index).
//!
//! Per commit, filters are processed by level: instances without nested
//! memberships first, then the instances that read them, then views. A
//! filter one of whose memberships changed in this commit is re-evaluated
//! whole with its SQL on the engine connection (exact at the version);
//! every other candidate is evaluated on the changed row's after-image.
//!
//! A new filter's rows come from its query on the engine connection, or,
//! off the writer thread, from a [`Prebuilt`] a reader computed at a version
//! of its own; [`Filters::catch_up`] then brings the new filters to the
//! engine's version with the rows the commits after it changed.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;
use tenantsync_core::{CrrConnection, PackedPk};
use tenantsync_policy::{
    Affinity, EffectiveQuery, IndexAtom, IndexKey, Membership, MembershipId, MembershipResults,
    MembershipSet, Predicate, ViewKey, membership_probe_key,
};
use tenantsync_types::Value;

use crate::engine::outbox::RowChanges;
use crate::engine::schema::ServerSchema;

pub(crate) type Hasher = foldhash::fast::FixedState;
pub(crate) type FxMap<K, V> = HashMap<K, V, Hasher>;
pub(crate) type FxSet<K> = HashSet<K, Hasher>;
/// A set of packed primary keys (what a subscription holds).
pub(crate) type PkSet = FxSet<PackedPk>;

pub(crate) type FilterId = u32;
pub(crate) type RowId = u32;

/// One row changed by a commit.
#[derive(Clone)]
pub(crate) struct ChangedRow {
    pub table: u16,
    pub pk: PackedPk,
    /// The row after the commit (None: deleted or absent).
    pub after: Option<Vec<Value>>,
    /// The commit's changes of the row, encoded.
    pub delta: Arc<RowChanges>,
}

struct RowEntry {
    table: u16,
    pk: PackedPk,
    holders: SmallVec<[FilterId; 4]>,
}

/// Interned rows: (table, pk) -> RowId, with the filters holding each.
#[derive(Default)]
struct Rows {
    map: FxMap<u16, FxMap<PackedPk, RowId>>,
    entries: Vec<Option<RowEntry>>,
    free: Vec<RowId>,
}

impl Rows {
    fn get(&self, table: u16, pk: &PackedPk) -> Option<RowId> {
        self.map.get(&table).and_then(|m| m.get(pk)).copied()
    }

    fn hold(&mut self, table: u16, pk: &PackedPk, f: FilterId) -> RowId {
        let id = match self.get(table, pk) {
            Some(id) => id,
            None => {
                let e = RowEntry {
                    table,
                    pk: pk.clone(),
                    holders: SmallVec::new(),
                };
                let id = match self.free.pop() {
                    Some(id) => {
                        self.entries[id as usize] = Some(e);
                        id
                    }
                    None => {
                        self.entries.push(Some(e));
                        (self.entries.len() - 1) as RowId
                    }
                };
                self.map.entry(table).or_default().insert(pk.clone(), id);
                id
            }
        };
        let e = self.entries[id as usize].as_mut().expect("live row");
        if !e.holders.contains(&f) {
            e.holders.push(f);
        }
        id
    }

    fn release(&mut self, id: RowId, f: FilterId) {
        let slot = &mut self.entries[id as usize];
        let e = slot.as_mut().expect("live row");
        e.holders.retain(|h| *h != f);
        if e.holders.is_empty() {
            let e = slot.take().expect("live row");
            if let Some(m) = self.map.get_mut(&e.table) {
                m.remove(&e.pk);
            }
            self.free.push(id);
        }
    }

    fn pk(&self, id: RowId) -> &PackedPk {
        &self.entries[id as usize].as_ref().expect("live row").pk
    }

    fn holders(&self, id: RowId) -> &[FilterId] {
        &self.entries[id as usize]
            .as_ref()
            .expect("live row")
            .holders
    }
}

pub(crate) struct InstanceData {
    pub key: String,
    column: usize,
    aff: Option<Affinity>,
    /// Member row -> its value.
    values: FxMap<RowId, Value>,
    /// Distinct values (by index key) -> (value, count).
    counts: FxMap<IndexKey, (Value, u32)>,
    nulls: u32,
    pub set: MembershipSet,
    /// Views, instances and write plans using it.
    pub refs: u32,
    /// Filters whose predicates read it.
    dependents: Vec<FilterId>,
    /// (filter, column) pairs with an `InMembership` index atom on it.
    atom_users: Vec<(FilterId, u16, usize)>,
    /// Tables its set depends on (its own and nested ones').
    pub tables: Vec<u16>,
    /// The last version its set changed at (for a prebuilt instance: the
    /// version it was computed at, since what happened before is unknown).
    changed_at: i64,
}

pub(crate) struct ViewData {
    pub key: ViewKey,
    /// Subscriptions on it (site, sub id).
    pub subs: FxSet<super::SubKey>,
    /// Version of its last part.
    pub last_part: i64,
    /// Since when it has no subscription (dropped after a while).
    pub idle_since: Option<Instant>,
}

pub(crate) enum Kind {
    View(ViewData),
    Instance(InstanceData),
}

pub(crate) struct Filter {
    pub table: u16,
    pred: Predicate,
    params: Vec<Value>,
    where_sql: String,
    /// Sets of its memberships, by local id.
    ms: MembershipResults,
    /// (local id, instance) for each membership it reads.
    deps: Vec<(u32, FilterId)>,
    /// The cover it is indexed under (chosen among `covers` when linked).
    atoms: Option<Vec<IndexAtom>>,
    /// The alternative covers of its predicate.
    covers: Vec<Vec<IndexAtom>>,
    pub level: u32,
    pub rows: FxSet<RowId>,
    pub kind: Kind,
}

type IndexDim = (u16, usize, Option<Affinity>);

/// What one commit (or a re-evaluation) did to one view.
#[derive(Default, Debug)]
pub(crate) struct Draft {
    /// Indexes into the commit's rows: changes of rows that stay.
    pub deltas: Vec<usize>,
    /// Indexes into the commit's rows: held rows deleted.
    pub deleted: Vec<usize>,
    pub entered: Vec<PackedPk>,
    pub left: Vec<PackedPk>,
}

impl Draft {
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
            && self.deleted.is_empty()
            && self.entered.is_empty()
            && self.left.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum FilterError {
    #[error("{0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Core(#[from] tenantsync_core::Error),
    #[error("table {0} is not a CRR")]
    Table(String),
}

/// Every filter, the index and the interned rows.
#[derive(Default)]
pub(crate) struct Filters {
    list: Vec<Option<Filter>>,
    free: Vec<FilterId>,
    rows: Rows,
    eq: FxMap<IndexDim, FxMap<IndexKey, SmallVec<[FilterId; 2]>>>,
    /// Per table: the probe dimensions in use, with reference counts.
    probes: FxMap<u16, Vec<(usize, Option<Affinity>, u32)>>,
    uncovered: FxMap<u16, Vec<FilterId>>,
    pub views: FxMap<ViewKey, FilterId>,
    instances: FxMap<String, FilterId>,
    max_level: u32,
    /// The version of the commit being applied (or of a creation).
    at: i64,
}

/// The rows of new filters, computed at one version by a reader
/// (`SELECT * FROM t WHERE <filter>` for each membership instance and
/// view of the queries), for [`Filters::install`].
#[derive(Default)]
pub(crate) struct Prebuilt {
    /// The version of the read transaction they were computed in.
    pub version: i64,
    instances: FxMap<String, Vec<(PackedPk, Vec<Value>)>>,
    views: FxMap<ViewKey, Vec<PackedPk>>,
}

impl Prebuilt {
    /// Computes the filters of `queries` on `db` (inside the caller's read
    /// transaction, at `version`).
    pub fn compute(
        db: &CrrConnection,
        schema: &ServerSchema,
        queries: &[Arc<EffectiveQuery>],
        version: i64,
    ) -> Result<Prebuilt, FilterError> {
        let mut out = Prebuilt {
            version,
            ..Prebuilt::default()
        };
        for q in queries {
            for m in &q.memberships {
                if let Entry::Vacant(e) = out.instances.entry(instance_key(m)) {
                    e.insert(select(db, schema, &m.table, &m.where_sql, &m.params)?);
                }
            }
            if let Entry::Vacant(e) = out.views.entry(q.key.clone()) {
                let rows = select(db, schema, &q.table, &q.where_sql, &q.params)?;
                e.insert(rows.into_iter().map(|(pk, _)| pk).collect());
            }
        }
        Ok(out)
    }
}

/// The rows changed by a run of commits (oldest first), each once, with its
/// latest after-image: what [`Filters::catch_up`] takes.
pub(crate) fn latest_images<'a>(
    commits: impl Iterator<Item = &'a [ChangedRow]>,
) -> Vec<ChangedRow> {
    let mut at: FxMap<(u16, PackedPk), usize> = FxMap::default();
    let mut out: Vec<ChangedRow> = Vec::new();
    for r in commits.flatten() {
        match at.entry((r.table, r.pk.clone())) {
            Entry::Occupied(e) => out[*e.get()] = r.clone(),
            Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(r.clone());
            }
        }
    }
    out
}

/// Where a new filter's rows come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// Its query on the engine connection, at the engine's version.
    Engine(i64),
    /// A reader's result.
    Built(&'a Prebuilt),
}

/// `SELECT * FROM t WHERE <filter>`: every selected row with its pk.
fn select(
    db: &CrrConnection,
    schema: &ServerSchema,
    table: &str,
    where_sql: &str,
    params: &[Value],
) -> Result<Vec<(PackedPk, Vec<Value>)>, FilterError> {
    let t = schema
        .table(table)
        .ok_or_else(|| FilterError::Table(table.to_owned()))?;
    let sql = format!(
        "SELECT * FROM \"{}\" WHERE {}",
        t.name.replace('"', "\"\""),
        where_sql
    );
    let mut stmt = db.conn().prepare_cached(&sql)?;
    let n = stmt.column_count();
    let rows = stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| {
        (0..n)
            .map(|i| r.get::<_, Value>(i))
            .collect::<rusqlite::Result<Vec<Value>>>()
    })?;
    let mut out = Vec::new();
    for row in rows {
        let row = row?;
        let pkv: Vec<Value> = t.pk.iter().map(|&i| row[i].clone()).collect();
        let pk = PackedPk::pack(&pkv).map_err(|e| {
            FilterError::Core(tenantsync_core::Error::Invalid(format!(
                "cannot pack the primary key of a {} row: {e}",
                t.name
            )))
        })?;
        out.push((pk, row));
    }
    Ok(out)
}

fn instance_key(m: &Membership) -> String {
    format!(
        "{}\n{}",
        m.sql,
        serde_json::to_string(&m.params).expect("values serialise")
    )
}

impl Filters {
    pub fn get(&self, f: FilterId) -> &Filter {
        self.list[f as usize].as_ref().expect("live filter")
    }

    pub fn get_mut(&mut self, f: FilterId) -> &mut Filter {
        self.list[f as usize].as_mut().expect("live filter")
    }

    pub fn view(&self, f: FilterId) -> &ViewData {
        match &self.get(f).kind {
            Kind::View(v) => v,
            Kind::Instance(_) => panic!("filter {f} is not a view"),
        }
    }

    pub fn view_mut(&mut self, f: FilterId) -> &mut ViewData {
        match &mut self.get_mut(f).kind {
            Kind::View(v) => v,
            Kind::Instance(_) => panic!("filter {f} is not a view"),
        }
    }

    pub fn instance(&self, f: FilterId) -> &InstanceData {
        match &self.get(f).kind {
            Kind::Instance(i) => i,
            Kind::View(_) => panic!("filter {f} is not an instance"),
        }
    }

    /// Whether `f` is a live view.
    pub fn is_view(&self, f: FilterId) -> bool {
        self.list
            .get(f as usize)
            .and_then(Option::as_ref)
            .is_some_and(|x| matches!(x.kind, Kind::View(_)))
    }

    pub fn view_ids(&self) -> Vec<FilterId> {
        self.views.values().copied().collect()
    }

    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }

    /// The pks a view (or instance) selects now.
    pub fn pks(&self, f: FilterId) -> PkSet {
        self.get(f)
            .rows
            .iter()
            .map(|r| self.rows.pk(*r).clone())
            .collect()
    }

    /// What `to` selects and `from` does not (entered), and the reverse
    /// (left): two views of one table.
    pub fn difference(&self, from: FilterId, to: FilterId) -> (Vec<PackedPk>, Vec<PackedPk>) {
        let (a, b) = (&self.get(from).rows, &self.get(to).rows);
        let pks = |x: &FxSet<RowId>, y: &FxSet<RowId>| -> Vec<PackedPk> {
            x.difference(y).map(|r| self.rows.pk(*r).clone()).collect()
        };
        (pks(b, a), pks(a, b))
    }

    pub fn contains(&self, f: FilterId, table: u16, pk: &PackedPk) -> bool {
        self.rows
            .get(table, pk)
            .is_some_and(|r| self.get(f).rows.contains(&r))
    }

    fn alloc(&mut self, f: Filter) -> FilterId {
        match self.free.pop() {
            Some(id) => {
                self.list[id as usize] = Some(f);
                id
            }
            None => {
                self.list.push(Some(f));
                (self.list.len() - 1) as FilterId
            }
        }
    }

    /// The instance of membership `id` of `ms` (creating it, and its nested
    /// ones, at the engine's version `version`); takes a reference.
    pub fn instance_for(
        &mut self,
        db: &CrrConnection,
        schema: &ServerSchema,
        ms: &[Membership],
        id: MembershipId,
        version: i64,
    ) -> Result<FilterId, FilterError> {
        self.instance_from(db, schema, ms, id, Source::Engine(version), &mut Vec::new())
    }

    fn instance_from(
        &mut self,
        db: &CrrConnection,
        schema: &ServerSchema,
        ms: &[Membership],
        id: MembershipId,
        src: Source<'_>,
        created: &mut Vec<FilterId>,
    ) -> Result<FilterId, FilterError> {
        let m = &ms[id.0 as usize];
        let key = instance_key(m);
        if let Some(&f) = self.instances.get(&key) {
            if let Kind::Instance(i) = &mut self.get_mut(f).kind {
                i.refs += 1;
            }
            return Ok(f);
        }
        let table = schema
            .table(&m.table)
            .ok_or_else(|| FilterError::Table(m.table.clone()))?
            .id;
        let mut deps = Vec::new();
        let mut level = 0;
        let mut tables = vec![table];
        for (local, g) in m.nested.iter().enumerate() {
            let n = self.instance_from(db, schema, ms, *g, src, created)?;
            level = level.max(self.get(n).level + 1);
            if let Kind::Instance(i) = &self.get(n).kind {
                tables.extend(i.tables.iter().copied());
            }
            deps.push((local as u32, n));
        }
        tables.sort_unstable();
        tables.dedup();
        let (rows, at) = match src {
            Source::Built(p) => match p.instances.get(&key) {
                Some(rows) => (Some(rows), p.version),
                None => (None, self.at),
            },
            Source::Engine(v) => (None, v),
        };
        let f = Filter {
            table,
            pred: m.filter.clone(),
            params: m.params.clone(),
            where_sql: m.where_sql.clone(),
            ms: MembershipResults::new(),
            deps,
            atoms: m.index_cover.clone(),
            covers: m.index_covers.clone(),
            level,
            rows: FxSet::default(),
            kind: Kind::Instance(InstanceData {
                key: key.clone(),
                column: m.column_index,
                aff: m.affinity,
                values: FxMap::default(),
                counts: FxMap::default(),
                nulls: 0,
                set: MembershipSet::new(std::iter::empty(), m.affinity),
                refs: 1,
                dependents: Vec::new(),
                atom_users: Vec::new(),
                tables,
                changed_at: at,
            }),
        };
        self.max_level = self.max_level.max(level);
        let id = self.alloc(f);
        created.push(id);
        self.instances.insert(key, id);
        self.link(id);
        let selected;
        let rows = match rows {
            Some(r) => r,
            None => {
                selected = self.select(db, schema, id)?;
                &selected
            }
        };
        for (pk, row) in rows {
            self.set_member(id, pk, Some(row));
        }
        self.refresh_set(id);
        if let Kind::Instance(i) = &mut self.get_mut(id).kind {
            i.changed_at = at;
        }
        Ok(id)
    }

    /// The view of `q` (creating it, with its queries on the engine
    /// connection, at the engine's version `version`).
    pub fn view_for(
        &mut self,
        db: &CrrConnection,
        schema: &ServerSchema,
        q: &Arc<EffectiveQuery>,
        version: i64,
    ) -> Result<FilterId, FilterError> {
        self.view_from(
            db,
            schema,
            q,
            version,
            Source::Engine(version),
            &mut Vec::new(),
        )
    }

    /// Creates the view of `q` and the instances it needs from `pre` (rows
    /// at `pre.version`), unless it exists; returns the view and the
    /// filters created, which [`Filters::catch_up`] must bring to the
    /// engine's version `version`.
    pub fn install(
        &mut self,
        db: &CrrConnection,
        schema: &ServerSchema,
        q: &Arc<EffectiveQuery>,
        version: i64,
        pre: &Prebuilt,
    ) -> Result<(FilterId, Vec<FilterId>), FilterError> {
        let mut created = Vec::new();
        let v = self.view_from(db, schema, q, version, Source::Built(pre), &mut created)?;
        Ok((v, created))
    }

    fn view_from(
        &mut self,
        db: &CrrConnection,
        schema: &ServerSchema,
        q: &Arc<EffectiveQuery>,
        version: i64,
        src: Source<'_>,
        created: &mut Vec<FilterId>,
    ) -> Result<FilterId, FilterError> {
        if let Some(&f) = self.views.get(&q.key) {
            return Ok(f);
        }
        self.at = version;
        let table = schema
            .table(&q.table)
            .ok_or_else(|| FilterError::Table(q.table.clone()))?
            .id;
        let mut deps = Vec::new();
        for m in q.memberships.iter().filter(|m| m.direct) {
            let n = self.instance_from(db, schema, &q.memberships, m.id, src, created)?;
            deps.push((m.id.0, n));
        }
        let f = Filter {
            table,
            pred: q.predicate.clone(),
            params: q.params.clone(),
            where_sql: q.where_sql.clone(),
            ms: MembershipResults::new(),
            deps,
            atoms: q.index_cover.clone(),
            covers: q.index_covers.clone(),
            level: u32::MAX,
            rows: FxSet::default(),
            kind: Kind::View(ViewData {
                key: q.key.clone(),
                subs: FxSet::default(),
                last_part: version,
                idle_since: Some(Instant::now()),
            }),
        };
        let id = self.alloc(f);
        created.push(id);
        self.views.insert(q.key.clone(), id);
        self.link(id);
        let pks: Vec<PackedPk> = match src {
            Source::Built(p) if p.views.contains_key(&q.key) => p.views[&q.key].clone(),
            _ => self
                .select(db, schema, id)?
                .into_iter()
                .map(|(pk, _)| pk)
                .collect(),
        };
        for pk in pks {
            let r = self.rows.hold(table, &pk, id);
            self.get_mut(id).rows.insert(r);
        }
        Ok(id)
    }

    /// Brings filters created from [`Prebuilt`]s to the engine's version
    /// `version`: `created` pairs each with the version its rows are at,
    /// `rows` are the rows changed by every commit after the oldest of
    /// them, each once with its latest after-image (a row applied to a
    /// filter already past its change leaves it as it is). Only the new
    /// filters move (the others are at the version already). A new filter
    /// is re-evaluated whole when a set it read may have changed unseen:
    /// an older instance whose set changed after the filter's version, or
    /// a new instance built at another version than the filter.
    pub fn catch_up(
        &mut self,
        db: &CrrConnection,
        schema: &ServerSchema,
        created: &[(FilterId, i64)],
        rows: &[ChangedRow],
        version: i64,
    ) -> Result<(), FilterError> {
        let at: FxMap<FilterId, i64> = created
            .iter()
            .copied()
            .filter(|(f, _)| self.list[*f as usize].is_some())
            .collect();
        let only: FxSet<FilterId> = at.keys().copied().collect();
        let reeval: FxSet<FilterId> = at
            .iter()
            .filter(|(f, built)| {
                self.get(**f).deps.iter().any(|(_, i)| match at.get(i) {
                    Some(v) => v != *built,
                    None => self.instance(*i).changed_at > **built,
                })
            })
            .map(|(f, _)| *f)
            .collect();
        self.apply(db, schema, rows, version, Some(&only), reeval)?;
        Ok(())
    }

    /// Registers a filter with its instances and the index.
    fn link(&mut self, id: FilterId) {
        let deps = self.get(id).deps.clone();
        for (local, inst) in &deps {
            let set = self.instance(*inst).set.clone();
            self.get_mut(id).ms.insert(MembershipId(*local), set);
            if let Kind::Instance(i) = &mut self.get_mut(*inst).kind {
                i.dependents.push(id);
            }
        }
        let table = self.get(id).table;
        let covers = std::mem::take(&mut self.get_mut(id).covers);
        if let Some(best) = covers
            .into_iter()
            .min_by_key(|c| self.cover_cost(table, &deps, c))
        {
            self.get_mut(id).atoms = Some(best);
        }
        let atoms = self.get(id).atoms.clone();
        match atoms {
            None => self.uncovered.entry(table).or_default().push(id),
            Some(atoms) => {
                for a in atoms {
                    match a {
                        IndexAtom::Eq { column, value } => {
                            self.index_add((table, column, None), value, id);
                        }
                        IndexAtom::InMembership { column, membership } => {
                            let inst = deps
                                .iter()
                                .find(|(l, _)| *l == membership.0)
                                .map(|(_, i)| *i)
                                .expect("an atom's membership is a dependency");
                            let (aff, keys): (Option<Affinity>, Vec<IndexKey>) = {
                                let i = self.instance(inst);
                                (i.aff, i.set.index_keys().collect())
                            };
                            for k in keys {
                                self.index_add((table, column, aff), k, id);
                            }
                            if let Kind::Instance(i) = &mut self.get_mut(inst).kind {
                                i.atom_users.push((id, table, column));
                            }
                        }
                    }
                }
            }
        }
    }

    /// What indexing a filter under `cover` costs each changed row: the
    /// filters already under its keys (each becomes a candidate with it)
    /// and its keys. The least shared cover wins: a tenant's
    /// `tenant_id = 'acme'` over every tenant's `done = 0`.
    fn cover_cost(&self, table: u16, deps: &[(u32, FilterId)], cover: &[IndexAtom]) -> usize {
        let bucket = |dim: IndexDim, key: &IndexKey| {
            self.eq
                .get(&dim)
                .and_then(|m| m.get(key))
                .map_or(0, |v| v.len())
        };
        cover
            .iter()
            .map(|a| match a {
                IndexAtom::Eq { column, value } => 1 + bucket((table, *column, None), value),
                IndexAtom::InMembership { column, membership } => deps
                    .iter()
                    .find(|(l, _)| *l == membership.0)
                    .map_or(usize::MAX / 4, |(_, inst)| {
                        let i = self.instance(*inst);
                        i.set
                            .index_keys()
                            .map(|k| 1 + bucket((table, *column, i.aff), &k))
                            .sum()
                    }),
            })
            .sum()
    }

    fn index_add(&mut self, dim: IndexDim, key: IndexKey, f: FilterId) {
        let m = self.eq.entry(dim).or_default();
        let v = m.entry(key).or_default();
        if !v.contains(&f) {
            v.push(f);
        }
        let probes = self.probes.entry(dim.0).or_default();
        match probes.iter_mut().find(|p| p.0 == dim.1 && p.1 == dim.2) {
            Some(p) => p.2 += 1,
            None => probes.push((dim.1, dim.2, 1)),
        }
    }

    fn index_remove(&mut self, dim: IndexDim, key: &IndexKey, f: FilterId) {
        if let Some(m) = self.eq.get_mut(&dim) {
            if let Some(v) = m.get_mut(key) {
                let before = v.len();
                v.retain(|x| *x != f);
                if v.len() < before {
                    if v.is_empty() {
                        m.remove(key);
                    }
                    if let Some(probes) = self.probes.get_mut(&dim.0) {
                        if let Some(p) = probes.iter_mut().find(|p| p.0 == dim.1 && p.1 == dim.2) {
                            p.2 -= 1;
                        }
                        probes.retain(|p| p.2 > 0);
                    }
                }
            }
            if m.is_empty() {
                self.eq.remove(&dim);
            }
        }
    }

    /// Drops a view (no subscriptions left) and the instances only it used.
    pub fn drop_view(&mut self, id: FilterId) {
        if let Kind::View(v) = &self.get(id).kind {
            let key = v.key.clone();
            self.views.remove(&key);
        }
        self.unlink(id);
    }

    /// Releases one reference to an instance.
    pub fn release_instance(&mut self, id: FilterId) {
        let gone = match &mut self.get_mut(id).kind {
            Kind::Instance(i) => {
                i.refs -= 1;
                i.refs == 0
            }
            Kind::View(_) => false,
        };
        if gone {
            if let Kind::Instance(i) = &self.get(id).kind {
                let key = i.key.clone();
                self.instances.remove(&key);
            }
            self.unlink(id);
        }
    }

    fn unlink(&mut self, id: FilterId) {
        let f = self.list[id as usize].take().expect("live filter");
        self.free.push(id);
        for r in &f.rows {
            self.rows.release(*r, id);
        }
        match &f.atoms {
            None => {
                if let Some(v) = self.uncovered.get_mut(&f.table) {
                    v.retain(|x| *x != id);
                }
            }
            Some(atoms) => {
                for a in atoms {
                    match a {
                        IndexAtom::Eq { column, value } => {
                            self.index_remove((f.table, *column, None), value, id)
                        }
                        IndexAtom::InMembership { column, membership } => {
                            if let Some((_, inst)) = f.deps.iter().find(|(l, _)| *l == membership.0)
                            {
                                let (aff, keys): (Option<Affinity>, Vec<IndexKey>) = {
                                    let i = self.instance(*inst);
                                    (i.aff, i.set.index_keys().collect())
                                };
                                for k in keys {
                                    self.index_remove((f.table, *column, aff), &k, id);
                                }
                                if let Kind::Instance(i) = &mut self.get_mut(*inst).kind {
                                    i.atom_users.retain(|(x, _, _)| *x != id);
                                }
                            }
                        }
                    }
                }
            }
        }
        for (_, inst) in &f.deps {
            if let Kind::Instance(i) = &mut self.get_mut(*inst).kind {
                i.dependents.retain(|x| *x != id);
            }
            self.release_instance(*inst);
        }
    }

    /// A filter's rows on the engine connection, at the engine's version.
    fn select(
        &self,
        db: &CrrConnection,
        schema: &ServerSchema,
        id: FilterId,
    ) -> Result<Vec<(PackedPk, Vec<Value>)>, FilterError> {
        let f = self.get(id);
        let t = &schema.tables[f.table as usize];
        select(db, schema, &t.name, &f.where_sql, &f.params)
    }

    /// Sets whether a row is a member of instance `id` (with its row
    /// values); returns whether the set of values may have changed.
    fn set_member(&mut self, id: FilterId, pk: &PackedPk, row: Option<&[Value]>) -> bool {
        let table = self.get(id).table;
        let rid = self
            .rows
            .get(table, pk)
            .filter(|r| self.get(id).rows.contains(r));
        let Kind::Instance(i) = &self.get(id).kind else {
            unreachable!()
        };
        let new_val = row.map(|r| r[i.column].clone());
        let old_val = rid.and_then(|r| i.values.get(&r).cloned());
        if old_val == new_val {
            return false;
        }
        let mut changed = false;
        if let Some(old) = &old_val {
            let r = rid.expect("a member row is interned");
            let Kind::Instance(i) = &mut self.get_mut(id).kind else {
                unreachable!()
            };
            i.values.remove(&r);
            changed |= count_remove(i, old);
            self.get_mut(id).rows.remove(&r);
            self.rows.release(r, id);
        }
        if let Some(new) = new_val {
            let r = self.rows.hold(table, pk, id);
            self.get_mut(id).rows.insert(r);
            let Kind::Instance(i) = &mut self.get_mut(id).kind else {
                unreachable!()
            };
            changed |= count_add(i, &new);
            i.values.insert(r, new);
        }
        changed
    }

    /// Rebuilds an instance's set; updates its dependents' sets and index
    /// entries. Returns whether the set changed.
    fn refresh_set(&mut self, id: FilterId) -> bool {
        let (new_set, old_keys, users, dependents) = {
            let Kind::Instance(i) = &self.get(id).kind else {
                unreachable!()
            };
            let mut vals: Vec<Value> = i.counts.values().map(|(v, _)| v.clone()).collect();
            if i.nulls > 0 {
                vals.push(Value::Null);
            }
            let set = MembershipSet::new(vals, i.aff);
            if set.values() == i.set.values() && set.has_null() == i.set.has_null() {
                return false;
            }
            let old: FxSet<IndexKey> = i.set.index_keys().collect();
            (set, old, i.atom_users.clone(), i.dependents.clone())
        };
        let new_keys: FxSet<IndexKey> = new_set.index_keys().collect();
        let aff = self.instance(id).aff;
        for (user, table, column) in &users {
            for k in old_keys.difference(&new_keys) {
                self.index_remove((*table, *column, aff), k, *user);
            }
            for k in new_keys.difference(&old_keys) {
                self.index_add((*table, *column, aff), k.clone(), *user);
            }
        }
        for d in &dependents {
            let locals: Vec<u32> = self
                .get(*d)
                .deps
                .iter()
                .filter(|(_, i)| *i == id)
                .map(|(l, _)| *l)
                .collect();
            for l in locals {
                self.get_mut(*d).ms.insert(MembershipId(l), new_set.clone());
            }
        }
        let at = self.at;
        if let Kind::Instance(i) = &mut self.get_mut(id).kind {
            i.set = new_set;
            i.changed_at = at;
        }
        true
    }

    /// The filters a changed row may touch.
    fn candidates(&self, row: &ChangedRow, out: &mut Vec<FilterId>) {
        out.clear();
        if let Some(after) = &row.after
            && let Some(probes) = self.probes.get(&row.table)
        {
            for (col, aff, _) in probes {
                let Some(key) = membership_probe_key(&after[*col], *aff) else {
                    continue;
                };
                if let Some(fs) = self
                    .eq
                    .get(&(row.table, *col, *aff))
                    .and_then(|m| m.get(&key))
                {
                    out.extend(fs.iter().copied());
                }
            }
        }
        if let Some(u) = self.uncovered.get(&row.table) {
            out.extend(u.iter().copied());
        }
        if let Some(r) = self.rows.get(row.table, &row.pk) {
            out.extend(self.rows.holders(r).iter().copied());
        }
        out.sort_unstable();
        out.dedup();
    }

    /// Applies one commit (at `version`): updates every instance and view
    /// it touches and returns what each touched view gets.
    pub fn apply_commit(
        &mut self,
        db: &CrrConnection,
        schema: &ServerSchema,
        rows: &[ChangedRow],
        version: i64,
    ) -> Result<Vec<(FilterId, Draft)>, FilterError> {
        self.apply(db, schema, rows, version, None, FxSet::default())
    }

    /// [`Filters::apply_commit`] for the filters in `only` (all when
    /// `None`), with `reeval` re-evaluated whole from the start.
    fn apply(
        &mut self,
        db: &CrrConnection,
        schema: &ServerSchema,
        rows: &[ChangedRow],
        version: i64,
        only: Option<&FxSet<FilterId>>,
        mut reeval: FxSet<FilterId>,
    ) -> Result<Vec<(FilterId, Draft)>, FilterError> {
        self.at = version;
        let mut cands: Vec<Vec<FilterId>> = Vec::with_capacity(rows.len());
        let mut buf = Vec::new();
        for r in rows {
            self.candidates(r, &mut buf);
            if let Some(only) = only {
                buf.retain(|f| only.contains(f));
            }
            cands.push(buf.clone());
        }
        let by_key: FxMap<(u16, &PackedPk), usize> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.table, &r.pk), i))
            .collect();
        let mut drafts: FxMap<FilterId, Draft> = FxMap::default();
        let mut levels: Vec<u32> = (0..=self.max_level).collect();
        levels.push(u32::MAX);
        for level in levels {
            let mut changed_sets: Vec<FilterId> = Vec::new();
            // Whole re-evaluation of filters whose memberships changed.
            let mut todo: Vec<FilterId> = reeval
                .iter()
                .copied()
                .filter(|f| {
                    self.list[*f as usize]
                        .as_ref()
                        .is_some_and(|x| x.level == level)
                })
                .collect();
            todo.sort_unstable();
            for f in &todo {
                let sel = self.select(db, schema, *f)?;
                let table = self.get(*f).table;
                match &self.get(*f).kind {
                    Kind::Instance(_) => {
                        let new: FxMap<PackedPk, Vec<Value>> = sel.into_iter().collect();
                        let old: Vec<PackedPk> = self
                            .get(*f)
                            .rows
                            .iter()
                            .map(|r| self.rows.pk(*r).clone())
                            .collect();
                        let mut ch = false;
                        for pk in old {
                            if !new.contains_key(&pk) {
                                ch |= self.set_member(*f, &pk, None);
                            }
                        }
                        for (pk, row) in &new {
                            ch |= self.set_member(*f, pk, Some(row));
                        }
                        if ch && self.refresh_set(*f) {
                            changed_sets.push(*f);
                        }
                    }
                    Kind::View(_) => {
                        let new: FxSet<PackedPk> = sel.into_iter().map(|(pk, _)| pk).collect();
                        let old: Vec<(RowId, PackedPk)> = self
                            .get(*f)
                            .rows
                            .iter()
                            .map(|r| (*r, self.rows.pk(*r).clone()))
                            .collect();
                        let d = drafts.entry(*f).or_default();
                        let mut old_set = FxSet::default();
                        for (rid, pk) in old {
                            if new.contains(&pk) {
                                if let Some(&i) = by_key.get(&(table, &pk)) {
                                    d.deltas.push(i);
                                }
                                old_set.insert(pk);
                            } else {
                                match by_key.get(&(table, &pk)) {
                                    Some(&i) if rows[i].after.is_none() => d.deleted.push(i),
                                    _ => d.left.push(pk.clone()),
                                }
                                self.get_mut(*f).rows.remove(&rid);
                                self.rows.release(rid, *f);
                                old_set.insert(pk);
                            }
                        }
                        for pk in new {
                            if !old_set.contains(&pk) {
                                let r = self.rows.hold(table, &pk, *f);
                                self.get_mut(*f).rows.insert(r);
                                d.entered.push(pk);
                            }
                        }
                    }
                }
            }
            // Incremental evaluation of the other candidates.
            for (i, r) in rows.iter().enumerate() {
                for &f in &cands[i] {
                    let Some(x) = self.list[f as usize].as_ref() else {
                        continue;
                    };
                    if x.level != level || x.table != r.table || reeval.contains(&f) {
                        continue;
                    }
                    let after = r
                        .after
                        .as_deref()
                        .filter(|row| x.pred.eval(row, &x.params, &x.ms).is_true());
                    match &x.kind {
                        Kind::Instance(_) => {
                            if self.set_member(f, &r.pk, after) && self.refresh_set(f) {
                                changed_sets.push(f);
                            }
                        }
                        Kind::View(_) => {
                            let rid = self.rows.get(r.table, &r.pk);
                            let before = rid.is_some_and(|id| x.rows.contains(&id));
                            let d = drafts.entry(f).or_default();
                            match (before, after.is_some()) {
                                (false, true) => {
                                    let id = self.rows.hold(r.table, &r.pk, f);
                                    self.get_mut(f).rows.insert(id);
                                    d.entered.push(r.pk.clone());
                                }
                                (true, true) => d.deltas.push(i),
                                (true, false) => {
                                    if r.after.is_none() {
                                        d.deleted.push(i);
                                    } else {
                                        d.left.push(r.pk.clone());
                                    }
                                    let id = rid.expect("held");
                                    self.get_mut(f).rows.remove(&id);
                                    self.rows.release(id, f);
                                }
                                (false, false) => {}
                            }
                        }
                    }
                }
            }
            for inst in changed_sets {
                let deps = self.instance(inst).dependents.clone();
                reeval.extend(
                    deps.into_iter()
                        .filter(|d| only.is_none_or(|o| o.contains(d))),
                );
            }
        }
        let mut out: Vec<(FilterId, Draft)> =
            drafts.into_iter().filter(|(_, d)| !d.is_empty()).collect();
        out.sort_unstable_by_key(|(f, _)| *f);
        Ok(out)
    }
}

fn count_add(i: &mut InstanceData, v: &Value) -> bool {
    match IndexKey::from_value(v) {
        None => {
            i.nulls += 1;
            i.nulls == 1
        }
        Some(k) => {
            let e = i.counts.entry(k).or_insert_with(|| (v.clone(), 0));
            e.1 += 1;
            e.1 == 1
        }
    }
}

fn count_remove(i: &mut InstanceData, v: &Value) -> bool {
    match IndexKey::from_value(v) {
        None => {
            i.nulls -= 1;
            i.nulls == 0
        }
        Some(k) => {
            let Some(e) = i.counts.get_mut(&k) else {
                return false;
            };
            e.1 -= 1;
            if e.1 == 0 {
                i.counts.remove(&k);
                true
            } else {
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
