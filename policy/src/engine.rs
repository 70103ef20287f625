//! The engine: binds policies for an identity, rewrites subscription queries
//! into effective predicates and SQL, and checks writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use sqlparser::ast::{self, SelectItem, SetExpr, Spanned, Statement};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;
use tenantsync_types::Value;

use crate::expr::{
    CmpOp, Expr, MembershipId, MembershipResults, MembershipSet, Printer, Truth, quote_ident,
};
use crate::identity::Identity;
use crate::lower::{Lowerer, Scope};
use crate::policy::{Policy, PolicyCommand, PolicyKind, PolicySet, split_parser_error};
use crate::schema::{Affinity, Schema, TableSchema};
use crate::sqlite::{self, Val};

/// The RLS engine: a validated policy set over its schema.
#[derive(Clone, Debug)]
pub struct Engine {
    set: Arc<PolicySet>,
}

/// A query refused by [`Engine::rewrite`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Not parseable SQL.
    #[error("syntax error at {line}:{column}: {message}")]
    Syntax {
        /// 1-based line.
        line: u64,
        /// 1-based column.
        column: u64,
        /// sqlparser's message.
        message: String,
    },
    /// Parseable, but outside what a subscription may contain.
    #[error("refused: {}", .reasons.join("; "))]
    Refused {
        /// Each problem, as `<line>:<col>: <message>`.
        reasons: Vec<String>,
    },
}

/// A write batch the engine cannot judge at all (as opposed to a denied row).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The table is unknown, internal or local.
    #[error("cannot write to `{table}`: {reason}")]
    Table {
        /// The table named.
        table: String,
        /// Why.
        reason: String,
    },
    /// A row does not have the table's number of columns.
    #[error("row {index} for `{table}` has {found} values, the table has {expected} columns")]
    RowWidth {
        /// The table.
        table: String,
        /// Index of the pair in the batch.
        index: usize,
        /// The table's column count.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// Neither a before nor an after row.
    #[error("row {index} for `{table}` has neither a before nor an after row")]
    Empty {
        /// The table.
        table: String,
        /// Index of the pair in the batch.
        index: usize,
    },
}

/// A normalised boolean expression over the table's row, with parameters
/// as slots and membership subqueries as [`MembershipId`]s.
#[derive(Clone, Debug, PartialEq)]
pub struct Predicate {
    /// The bound expression.
    pub root: Expr,
}

impl Predicate {
    /// Evaluates the predicate on a row (table column order): exactly what
    /// SQLite's WHERE decides for the same row and parameters.
    pub fn eval(&self, row: &[Value], params: &[Value], memberships: &MembershipResults) -> Truth {
        self.root.eval(row, params, memberships)
    }
}

/// A subquery the caller runs (once per view or write batch) to get the set
/// of values an `IN` tests against.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Membership {
    /// Its id within the query or plan.
    #[serde(serialize_with = "ser_membership_id")]
    pub id: MembershipId,
    /// The table it reads.
    pub table: String,
    /// The column it selects.
    pub column: String,
    /// `SELECT "col" FROM "table" WHERE <its WHERE> AND <the identity's SELECT policies on table>`.
    pub sql: String,
    /// The parameters of `sql` (`?1`..).
    pub params: Vec<Value>,
    /// Whether the predicate tests it directly; `false` for one nested in
    /// another membership's SQL, which the caller need not run itself.
    pub direct: bool,
    /// The comparison affinity of the `IN` (give it to [`MembershipSet::new`]).
    #[serde(skip)]
    pub affinity: Option<Affinity>,
    /// Index of `column` in `table`'s columns.
    #[serde(skip)]
    pub column_index: usize,
    /// The WHERE of `sql` alone (columns qualified with `table`'s name), with
    /// `params`: `SELECT * FROM table WHERE <where_sql>` gives the member rows.
    #[serde(skip)]
    pub where_sql: String,
    /// The subquery's WHERE (its own WHERE AND the identity's SELECT
    /// policies on `table`) as a predicate over a row of `table` (table
    /// column order): a row is a member when it is TRUE, and its `column`
    /// value is then in the set. Its parameters are `params`; its nested
    /// memberships are numbered locally, see `nested`. Evaluating it on
    /// every row of `table` selects exactly what `sql` selects.
    #[serde(skip)]
    pub filter: Predicate,
    /// For each local membership id `i` of `filter` (and of `index_cover`),
    /// `nested[i]` is the id, in the same query or plan, of the membership
    /// it stands for. Evaluate `filter` with a [`MembershipResults`] keyed
    /// by the local ids.
    #[serde(skip)]
    pub nested: Vec<MembershipId>,
    /// Atoms over `table`'s columns such that `filter` TRUE => some atom
    /// true (local membership ids); `None` when no such cover exists.
    #[serde(skip)]
    pub index_cover: Option<Vec<IndexAtom>>,
    /// Every cover of `filter` (one per top-level AND term that has one;
    /// `index_cover` is the shortest): any one suffices.
    #[serde(skip)]
    pub index_covers: Vec<Vec<IndexAtom>>,
}

fn ser_membership_id<S: serde::Serializer>(id: &MembershipId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(id.0)
}

impl Membership {
    /// Builds the set from the values the caller's query returned.
    pub fn set(&self, values: impl IntoIterator<Item = Value>) -> MembershipSet {
        MembershipSet::new(values, self.affinity)
    }
}

/// A value as an index key: numbers that compare equal in SQLite have equal
/// keys (`5`, `5.0`), NULL has none.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum IndexKey {
    /// An integer, or a REAL with an integral value in range.
    Int(i64),
    /// Any other REAL, by its bits.
    Real(u64),
    /// TEXT.
    Text(String),
    /// BLOB.
    Blob(Vec<u8>),
}

impl IndexKey {
    /// The key of a stored value; `None` for NULL (which equals nothing).
    pub fn from_value(v: &Value) -> Option<IndexKey> {
        Some(match v {
            Value::Null => return None,
            Value::Integer(i) => IndexKey::Int(*i),
            Value::Real(r) => {
                // Exactly the REALs that equal some INTEGER: integral, in
                // [-2^63, 2^63).
                if r.fract() == 0.0
                    && (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(r)
                {
                    IndexKey::Int(*r as i64)
                } else {
                    IndexKey::Real(r.to_bits())
                }
            }
            Value::Text(t) => IndexKey::Text(t.clone()),
            Value::Blob(b) => IndexKey::Blob(b.clone()),
        })
    }
}

/// The key under which a stored value `v` is found in an index of
/// membership values built with [`MembershipSet::index_keys`] of a set with
/// comparison affinity `aff` (the `IN`'s, [`Membership::affinity`]): `v`
/// with that affinity applied, as [`IndexKey::from_value`]. `None` for NULL.
pub fn membership_probe_key(v: &Value, aff: Option<Affinity>) -> Option<IndexKey> {
    let b = Val::borrow(v);
    match sqlite::apply_affinity(&b, aff) {
        Some(c) => IndexKey::from_value(&c.into_value()),
        None => IndexKey::from_value(v),
    }
}

/// One way a row can satisfy a predicate: if the predicate is TRUE for a row,
/// at least one atom of its cover is true for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum IndexAtom {
    /// The column's stored value has this key.
    Eq {
        /// Column index in table order.
        column: usize,
        /// The key to probe with [`IndexKey::from_value`] of the row's value.
        value: IndexKey,
    },
    /// The column's value is in a membership's set.
    InMembership {
        /// Column index in table order.
        column: usize,
        /// The membership.
        #[serde(serialize_with = "ser_membership_id")]
        membership: MembershipId,
    },
}

/// Identifies a view: equal for queries of equal meaning (after
/// normalisation: whitespace, keyword case, parentheses) with equal
/// parameters. Compares the full canonical text, so two different views can
/// never collide.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ViewKey(Arc<str>);

impl ViewKey {
    /// The canonical text the key compares.
    pub fn canonical(&self) -> &str {
        &self.0
    }

    /// A short, stable fingerprint for logs (FNV-1a 64 of the canonical text).
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

impl fmt::Display for ViewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// A policy applied to a query, kept to explain which one granted a row.
#[derive(Clone, Debug, PartialEq)]
struct AppliedPolicy {
    name: String,
    kind: PolicyKind,
    expr: Expr,
}

/// The result of rewriting one subscription for one identity.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectiveQuery {
    /// The table subscribed to.
    pub table: String,
    /// The selected columns (all, in table order, for `*`).
    pub columns: Vec<String>,
    /// The columns `snapshot_sql` returns: primary-key columns the selection
    /// lacks, then the selection.
    pub snapshot_columns: Vec<String>,
    /// (query WHERE) AND (the identity's SELECT policies).
    pub predicate: Predicate,
    /// `?1..?n`: every literal and claim, never spliced into SQL text.
    pub params: Vec<Value>,
    /// `SELECT <snapshot_columns> FROM t WHERE <predicate>`.
    pub snapshot_sql: String,
    /// The predicate alone as SQL (`<predicate>` of `snapshot_sql`, columns
    /// qualified with the table's name), with `params`: for callers that
    /// select other columns (`SELECT * FROM t WHERE <where_sql>`).
    pub where_sql: String,
    /// The `crsql_changes` rows of currently visible rows since a version:
    /// bind `params` then the version as `?{delta_since_param}`.
    pub delta_sql: String,
    /// 1-based index of the `since` parameter of `delta_sql` (= params.len() + 1).
    pub delta_since_param: usize,
    /// Equal for equal (normalised query, parameters).
    pub key: ViewKey,
    /// Membership subqueries (run the `direct` ones, give the sets to eval).
    pub memberships: Vec<Membership>,
    /// Atoms such that predicate TRUE => some atom true; `None` when no such
    /// cover exists (evaluate on every change of the table).
    pub index_cover: Option<Vec<IndexAtom>>,
    /// Every cover of the predicate (one per top-level AND term that has
    /// one; `index_cover` is the shortest): any one suffices, so a server
    /// indexing many views picks the one that shares its keys with the
    /// fewest others (`tenant_id = 'acme'` rather than `done = 0`).
    pub index_covers: Vec<Vec<IndexAtom>>,
    /// Tables whose policies or rows the predicate reads (the table itself
    /// and every membership table): a policy change on one of them may
    /// change this view.
    pub depends_on: Vec<String>,
    applied: Vec<AppliedPolicy>,
}

impl EffectiveQuery {
    /// The permissive SELECT policies whose USING is TRUE for a row ("why can
    /// this identity see this row"), in file order. Empty when none.
    pub fn granting_policies(&self, row: &[Value], memberships: &MembershipResults) -> Vec<&str> {
        self.applied
            .iter()
            .filter(|p| p.kind == PolicyKind::Permissive)
            .filter(|p| p.expr.eval(row, &self.params, memberships).is_true())
            .map(|p| p.name.as_str())
            .collect()
    }

    /// Whether a row is visible: the predicate is TRUE.
    pub fn matches(&self, row: &[Value], memberships: &MembershipResults) -> bool {
        self.predicate
            .eval(row, &self.params, memberships)
            .is_true()
    }
}

/// One written row: (before the merge, after it), each in table column
/// order; `None` before = insert, `None` after = delete.
pub type RowChange<'a> = (Option<&'a [Value]>, Option<&'a [Value]>);

/// A membership as bound in one parameter numbering.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BoundMembership {
    pub(crate) table: usize,
    pub(crate) column: usize,
    pub(crate) filter: Expr,
    pub(crate) aff: Option<Affinity>,
    pub(crate) direct: bool,
}

/// Binds unbound policy/query trees for one identity.
struct Binder<'a> {
    set: &'a PolicySet,
    id: &'a Identity,
    params: Vec<Value>,
    memberships: Vec<BoundMembership>,
    depends: BTreeSet<usize>,
}

impl<'a> Binder<'a> {
    fn new(set: &'a PolicySet, id: &'a Identity) -> Self {
        Binder {
            set,
            id,
            params: Vec::new(),
            memberships: Vec::new(),
            depends: BTreeSet::new(),
        }
    }

    fn param(&mut self, v: Value) -> Expr {
        self.params.push(v);
        Expr::Param(self.params.len() - 1)
    }

    fn bind(&mut self, e: &Expr, direct: bool) -> Expr {
        let b = |s: &mut Self, x: &Expr| Box::new(s.bind(x, direct));
        match e {
            Expr::Literal(v) => self.param(v.clone()),
            Expr::Claim(c) => {
                let v = self.id.claim(c);
                self.param(v)
            }
            Expr::InSubquery {
                expr,
                table,
                column,
                filter,
                negated,
                aff,
            } => {
                let lhs = b(self, expr);
                let own = filter.as_ref().map(|f| self.bind(f, false));
                let (pol, _) = self.select_predicate(*table);
                let filter = match own {
                    Some(f) => and(vec![f, pol]),
                    None => pol,
                };
                self.memberships.push(BoundMembership {
                    table: *table,
                    column: *column,
                    filter,
                    aff: *aff,
                    direct,
                });
                Expr::InMembership {
                    expr: lhs,
                    membership: MembershipId((self.memberships.len() - 1) as u32),
                    negated: *negated,
                }
            }
            Expr::Column(_) | Expr::Param(_) | Expr::Const(_) | Expr::InMembership { .. } => {
                e.clone()
            }
            Expr::Not(x) => Expr::Not(b(self, x)),
            Expr::And(v) => Expr::And(v.iter().map(|x| self.bind(x, direct)).collect()),
            Expr::Or(v) => Expr::Or(v.iter().map(|x| self.bind(x, direct)).collect()),
            Expr::Compare {
                op,
                left,
                right,
                aff,
            } => Expr::Compare {
                op: *op,
                left: b(self, left),
                right: b(self, right),
                aff: *aff,
            },
            Expr::IsNull { expr, negated } => Expr::IsNull {
                expr: b(self, expr),
                negated: *negated,
            },
            Expr::InList {
                expr,
                list,
                negated,
                aff,
            } => Expr::InList {
                expr: b(self, expr),
                list: list.iter().map(|x| self.bind(x, direct)).collect(),
                negated: *negated,
                aff: *aff,
            },
            Expr::Between {
                expr,
                low,
                high,
                negated,
                aff,
            } => Expr::Between {
                expr: b(self, expr),
                low: b(self, low),
                high: b(self, high),
                negated: *negated,
                aff: *aff,
            },
            Expr::Like {
                expr,
                pattern,
                escape,
                negated,
            } => Expr::Like {
                expr: b(self, expr),
                pattern: b(self, pattern),
                escape: *escape,
                negated: *negated,
            },
            Expr::Arith { op, left, right } => Expr::Arith {
                op: *op,
                left: b(self, left),
                right: b(self, right),
            },
            Expr::Concat(x, y) => Expr::Concat(b(self, x), b(self, y)),
            Expr::Negate(x) => Expr::Negate(b(self, x)),
            Expr::Plus(x) => Expr::Plus(b(self, x)),
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => Expr::Case {
                operand: operand.as_ref().map(|o| b(self, o)),
                whens: whens
                    .iter()
                    .map(|(w, t, a)| (self.bind(w, direct), self.bind(t, direct), *a))
                    .collect(),
                otherwise: otherwise.as_ref().map(|o| b(self, o)),
            },
            Expr::Coalesce(v) => Expr::Coalesce(v.iter().map(|x| self.bind(x, direct)).collect()),
            Expr::Lower(x) => Expr::Lower(b(self, x)),
            Expr::Upper(x) => Expr::Upper(b(self, x)),
            Expr::Length(x) => Expr::Length(b(self, x)),
        }
    }

    /// The identity's SELECT predicate on a table: (permissive USINGs ORed)
    /// AND each restrictive USING; FALSE when no permissive policy applies.
    fn select_predicate(&mut self, table: usize) -> (Expr, Vec<AppliedPolicy>) {
        let set = self.set;
        self.depends.insert(table);
        let role = self.id.role().map(str::to_owned);
        let applicable: Vec<&Policy> = set
            .for_table(table)
            .filter(|p| {
                p.command.covers(PolicyCommand::Select) && p.applies_to_role(role.as_deref())
            })
            .collect();
        let mut applied = Vec::new();
        let mut perm = Vec::new();
        let mut restr = Vec::new();
        for p in &applicable {
            let Some(u) = p.using_expr() else { continue };
            let bound = self.bind(u, false);
            applied.push(AppliedPolicy {
                name: p.name.clone(),
                kind: p.kind,
                expr: bound.clone(),
            });
            match p.kind {
                PolicyKind::Permissive => perm.push(bound),
                PolicyKind::Restrictive => restr.push(bound),
            }
        }
        let perm = match perm.len() {
            0 => Expr::Const(false),
            1 => perm.pop().expect("one"),
            _ => Expr::Or(perm),
        };
        let mut items = vec![perm];
        items.extend(restr);
        (and(items), applied)
    }

    /// Marks the memberships the top-level predicate refers to as direct.
    fn mark_direct(&mut self, e: &Expr) {
        if let Expr::InMembership { membership, .. } = e {
            self.memberships[membership.0 as usize].direct = true;
        }
        for c in e.children() {
            self.mark_direct(c);
        }
    }
}

fn and(mut items: Vec<Expr>) -> Expr {
    if items.len() == 1 {
        return items.pop().expect("one");
    }
    let mut flat = Vec::new();
    for x in items {
        match x {
            Expr::And(v) => flat.extend(v),
            other => flat.push(other),
        }
    }
    Expr::And(flat)
}

/// Renumbers the parameters of an expression (and of the memberships it
/// prints inline) from 1 in print order, for SQL that stands alone.
struct Localizer<'a> {
    ms: &'a [BoundMembership],
    params: &'a [Value],
    map: BTreeMap<usize, usize>,
    out_params: Vec<Value>,
    out_ms: Vec<BoundMembership>,
    /// The global id each entry of `out_ms` stands for.
    out_global: Vec<MembershipId>,
}

impl Localizer<'_> {
    fn expr(&mut self, e: &Expr) -> Expr {
        match e {
            Expr::Param(i) => {
                let next = self.out_params.len();
                let slot = *self.map.entry(*i).or_insert(next);
                if slot == next {
                    self.out_params.push(self.params[*i].clone());
                }
                Expr::Param(slot)
            }
            Expr::InMembership {
                expr,
                membership,
                negated,
            } => {
                let lhs = self.expr(expr);
                let m = &self.ms[membership.0 as usize];
                let filter = self.expr(&m.filter);
                self.out_ms.push(BoundMembership {
                    filter,
                    ..m.clone()
                });
                self.out_global.push(*membership);
                Expr::InMembership {
                    expr: Box::new(lhs),
                    membership: MembershipId((self.out_ms.len() - 1) as u32),
                    negated: *negated,
                }
            }
            other => map_children(other, &mut |c| self.expr(c)),
        }
    }
}

/// Rebuilds a node with its children mapped (leaves are cloned).
fn map_children(e: &Expr, f: &mut dyn FnMut(&Expr) -> Expr) -> Expr {
    let mut b = |x: &Expr| Box::new(f(x));
    match e {
        Expr::Column(_)
        | Expr::Param(_)
        | Expr::Literal(_)
        | Expr::Claim(_)
        | Expr::Const(_)
        | Expr::InSubquery { .. } => e.clone(),
        Expr::InMembership {
            expr,
            membership,
            negated,
        } => Expr::InMembership {
            expr: b(expr),
            membership: *membership,
            negated: *negated,
        },
        Expr::Not(x) => Expr::Not(b(x)),
        Expr::And(v) => Expr::And(v.iter().map(|x| *b(x)).collect()),
        Expr::Or(v) => Expr::Or(v.iter().map(|x| *b(x)).collect()),
        Expr::Compare {
            op,
            left,
            right,
            aff,
        } => Expr::Compare {
            op: *op,
            left: b(left),
            right: b(right),
            aff: *aff,
        },
        Expr::IsNull { expr, negated } => Expr::IsNull {
            expr: b(expr),
            negated: *negated,
        },
        Expr::InList {
            expr,
            list,
            negated,
            aff,
        } => Expr::InList {
            expr: b(expr),
            list: list.iter().map(|x| *b(x)).collect(),
            negated: *negated,
            aff: *aff,
        },
        Expr::Between {
            expr,
            low,
            high,
            negated,
            aff,
        } => Expr::Between {
            expr: b(expr),
            low: b(low),
            high: b(high),
            negated: *negated,
            aff: *aff,
        },
        Expr::Like {
            expr,
            pattern,
            escape,
            negated,
        } => Expr::Like {
            expr: b(expr),
            pattern: b(pattern),
            escape: *escape,
            negated: *negated,
        },
        Expr::Arith { op, left, right } => Expr::Arith {
            op: *op,
            left: b(left),
            right: b(right),
        },
        Expr::Concat(x, y) => Expr::Concat(b(x), b(y)),
        Expr::Negate(x) => Expr::Negate(b(x)),
        Expr::Plus(x) => Expr::Plus(b(x)),
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => Expr::Case {
            operand: operand.as_ref().map(|o| b(o)),
            whens: whens.iter().map(|(w, t, a)| (*b(w), *b(t), *a)).collect(),
            otherwise: otherwise.as_ref().map(|o| b(o)),
        },
        Expr::Coalesce(v) => Expr::Coalesce(v.iter().map(|x| *b(x)).collect()),
        Expr::Lower(x) => Expr::Lower(b(x)),
        Expr::Upper(x) => Expr::Upper(b(x)),
        Expr::Length(x) => Expr::Length(b(x)),
    }
}

fn public_memberships(
    schema: &Schema,
    ms: &[BoundMembership],
    params: &[Value],
) -> Vec<Membership> {
    ms.iter()
        .enumerate()
        .map(|(i, m)| {
            let mut loc = Localizer {
                ms,
                params,
                map: BTreeMap::new(),
                out_params: Vec::new(),
                out_ms: Vec::new(),
                out_global: Vec::new(),
            };
            let filter = loc.expr(&m.filter);
            let index_covers = covers(&filter, &loc.out_params);
            let index_cover = index_covers.iter().min_by_key(|c| c.len()).cloned();
            let printer = Printer {
                schema,
                memberships: &loc.out_ms,
                qualify: true,
            };
            let inner = &schema.tables[m.table];
            let mut sql = String::new();
            printer.subquery(inner, m.column, Some(&filter), &mut sql);
            let mut where_sql = String::new();
            printer.print(&filter, inner, &mut where_sql);
            Membership {
                id: MembershipId(i as u32),
                table: inner.name.clone(),
                column: inner.columns[m.column].name.clone(),
                sql,
                params: loc.out_params,
                direct: m.direct,
                affinity: m.aff,
                column_index: m.column,
                where_sql,
                filter: Predicate { root: filter },
                nested: loc.out_global,
                index_cover,
                index_covers,
            }
        })
        .collect()
}

/// Every cover of a bound predicate: one per top-level AND term that has
/// one (see [`EffectiveQuery::index_covers`]).
fn covers(e: &Expr, params: &[Value]) -> Vec<Vec<IndexAtom>> {
    let mut out: Vec<Vec<IndexAtom>> = match e {
        Expr::And(items) => items.iter().filter_map(|x| cover(x, params)).collect(),
        _ => cover(e, params).into_iter().collect(),
    };
    out.dedup();
    out
}

/// The index cover of a bound predicate (see [`EffectiveQuery::index_cover`]).
fn cover(e: &Expr, params: &[Value]) -> Option<Vec<IndexAtom>> {
    let atom = |col: usize, p: usize, aff: Option<Affinity>| -> Option<IndexAtom> {
        let v = Val::borrow(&params[p]);
        let conv = sqlite::apply_affinity(&v, aff);
        let v = conv.unwrap_or(v).into_value();
        IndexKey::from_value(&v).map(|value| IndexAtom::Eq { column: col, value })
    };
    match e {
        Expr::Const(false) => Some(vec![]),
        Expr::Compare {
            op: op @ (CmpOp::Eq | CmpOp::Is),
            left,
            right,
            aff,
        } => match (left.as_ref(), right.as_ref()) {
            (Expr::Column(c), Expr::Param(p)) | (Expr::Param(p), Expr::Column(c)) => {
                if params[*p].is_null() {
                    // `c = NULL` is never true; `c IS NULL` has no key.
                    if *op == CmpOp::Eq { Some(vec![]) } else { None }
                } else {
                    Some(atom(*c, *p, *aff).into_iter().collect())
                }
            }
            _ => None,
        },
        Expr::InList {
            expr,
            list,
            negated: false,
            aff,
        } => {
            let Expr::Column(c) = expr.as_ref() else {
                return None;
            };
            let mut out = Vec::new();
            for x in list {
                let Expr::Param(p) = x else { return None };
                out.extend(atom(*c, *p, *aff));
            }
            Some(out)
        }
        Expr::InMembership {
            expr,
            membership,
            negated: false,
        } => match expr.as_ref() {
            Expr::Column(c) => Some(vec![IndexAtom::InMembership {
                column: *c,
                membership: *membership,
            }]),
            _ => None,
        },
        Expr::And(items) => items
            .iter()
            .filter_map(|x| cover(x, params))
            .min_by_key(Vec::len),
        Expr::Or(items) => {
            let mut out: Vec<IndexAtom> = Vec::new();
            for x in items {
                for a in cover(x, params)? {
                    if !out.contains(&a) {
                        out.push(a);
                    }
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// What a policy reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyChange {
    /// Tables whose policies differ between the old and the new set (all
    /// tables when the schema changed).
    pub changed_tables: BTreeSet<String>,
}

impl PolicyChange {
    /// Whether a view may have changed: it reads a table whose policies
    /// changed. Rewrite it again and compare keys to know for sure.
    pub fn affects(&self, q: &EffectiveQuery) -> bool {
        q.depends_on.iter().any(|t| {
            self.changed_tables
                .iter()
                .any(|c| c.eq_ignore_ascii_case(t))
        })
    }
}

fn policy_signature(set: &PolicySet) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in &set.schema.tables {
        m.entry(t.name.to_ascii_lowercase()).or_default();
    }
    for p in &set.policies {
        m.entry(p.table_name.to_ascii_lowercase())
            .or_default()
            .push(format!(
                "{}|{:?}|{:?}|{:?}|{:?}|{:?}",
                p.name, p.kind, p.command, p.roles, p.using, p.with_check
            ));
    }
    m
}

impl Engine {
    /// An engine over a validated policy set (which carries its schema).
    pub fn new(set: PolicySet) -> Engine {
        Engine { set: Arc::new(set) }
    }

    /// The current policy set.
    pub fn policies(&self) -> &PolicySet {
        &self.set
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        &self.set.schema
    }

    /// Replaces the policy set (already validated whole by
    /// [`PolicySet::parse`]: a bad file never gets here) and says which
    /// tables' policies changed.
    pub fn replace_policies(&mut self, new: PolicySet) -> PolicyChange {
        let old_sig = policy_signature(&self.set);
        let new_sig = policy_signature(&new);
        let mut changed = BTreeSet::new();
        if self.set.schema != new.schema {
            changed.extend(new.schema.tables.iter().map(|t| t.name.clone()));
            changed.extend(self.set.schema.tables.iter().map(|t| t.name.clone()));
        } else {
            for (t, sig) in &new_sig {
                if old_sig.get(t) != Some(sig) {
                    changed.insert(self.schema().table(t).map_or(t.clone(), |x| x.name.clone()));
                }
            }
        }
        self.set = Arc::new(new);
        PolicyChange {
            changed_tables: changed,
        }
    }

    /// Rewrites a subscription query for an identity. The query is one
    /// `SELECT * | col, ... FROM crr_table [WHERE ...]` with a WHERE in the
    /// allowed subset.
    pub fn rewrite(&self, id: &Identity, query_sql: &str) -> Result<EffectiveQuery, QueryError> {
        let schema = &*self.set.schema;
        let (table_index, columns, where_expr) = parse_query(schema, query_sql)?;
        let table = &schema.tables[table_index];
        let mut binder = Binder::new(&self.set, id);
        let qw = where_expr.map(|w| binder.bind(&w, true));
        let (pol, applied) = binder.select_predicate(table_index);
        let root = match qw {
            Some(q) => {
                // Keep the query's WHERE as one parenthesised operand.
                let mut items = vec![q];
                match pol {
                    Expr::And(v) => items.extend(v),
                    other => items.push(other),
                }
                Expr::And(items)
            }
            None => pol,
        };
        binder.mark_direct(&root);
        let params = binder.params;
        if let Some(reason) = crate::limits::over_limits(&root, &params) {
            return Err(QueryError::Refused {
                reasons: vec![reason],
            });
        }
        let ms = binder.memberships;
        let column_names: Vec<String> = columns
            .iter()
            .map(|&c| table.columns[c].name.clone())
            .collect();
        let mut snap_cols: Vec<usize> = table
            .pk
            .iter()
            .copied()
            .filter(|k| !columns.contains(k))
            .collect();
        snap_cols.extend(columns.iter().copied());
        let printer = Printer {
            schema,
            memberships: &ms,
            qualify: true,
        };
        let mut pred_sql = String::new();
        printer.print(&root, table, &mut pred_sql);
        let tq = quote_ident(&table.name);
        let snapshot_sql = format!(
            "SELECT {} FROM {tq} WHERE {pred_sql}",
            snap_cols
                .iter()
                .map(|&c| quote_ident(&table.columns[c].name))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let since = params.len() + 1;
        let join = table
            .pk
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                format!(
                    "{tq}.{} = tenantsync_pk_value(c.\"pk\", {i})",
                    quote_ident(&table.columns[c].name)
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let delta_sql = format!(
            "SELECT c.\"table\", c.\"pk\", c.\"cid\", c.\"val\", c.\"col_version\", c.\"db_version\", c.\"site_id\", c.\"cl\", c.\"seq\" \
             FROM crsql_changes AS c JOIN {tq} ON {join} \
             WHERE c.\"table\" = {} AND c.\"db_version\" > ?{since} AND ({pred_sql}) \
             ORDER BY c.\"db_version\", c.\"seq\"",
            Value::Text(table.name.clone())
        );
        let params_json = serde_json::to_string(&params).expect("values serialise");
        let key = ViewKey(Arc::from(format!(
            "{}\n{}\n{}\n{}",
            table.name,
            column_names.join(","),
            pred_sql,
            params_json
        )));
        let memberships = public_memberships(schema, &ms, &params);
        let index_covers = covers(&root, &params);
        let index_cover = index_covers.iter().min_by_key(|c| c.len()).cloned();
        let mut depends: BTreeSet<usize> = binder.depends;
        depends.insert(table_index);
        for m in &ms {
            depends.insert(m.table);
        }
        Ok(EffectiveQuery {
            table: table.name.clone(),
            snapshot_columns: snap_cols
                .iter()
                .map(|&c| table.columns[c].name.clone())
                .collect(),
            columns: column_names,
            predicate: Predicate { root },
            params,
            snapshot_sql,
            where_sql: pred_sql,
            delta_sql,
            delta_since_param: since,
            key,
            memberships,
            index_cover,
            index_covers,
            depends_on: depends
                .iter()
                .map(|&t| schema.tables[t].name.clone())
                .collect(),
            applied,
        })
    }

    /// The bound write policies of a table for an identity, and the
    /// membership subqueries to run once for a whole batch.
    pub fn write_plan(&self, id: &Identity, table: &str) -> Result<WritePlan, WriteError> {
        let schema = &*self.set.schema;
        let Some(ti) = schema.table_index(table) else {
            return Err(WriteError::Table {
                table: table.to_owned(),
                reason: "no such table".into(),
            });
        };
        let t = &schema.tables[ti];
        if crate::schema::is_internal_table(&t.name) || !t.is_crr {
            return Err(WriteError::Table {
                table: t.name.clone(),
                reason: "it is not a CRR (only CRRs are synced)".into(),
            });
        }
        let mut binder = Binder::new(&self.set, id);
        let role = id.role().map(str::to_owned);
        let (select, _) = binder.select_predicate(ti);
        let group = |cmd: PolicyCommand, check: bool, binder: &mut Binder<'_>| {
            let mut g = PolicyGroup::default();
            for p in self.set.for_table(ti) {
                if !p.command.covers(cmd) || !p.applies_to_role(role.as_deref()) {
                    continue;
                }
                let e = if check {
                    p.check_expr()
                } else {
                    p.using_expr()
                };
                let Some(e) = e else { continue };
                let bound = binder.bind(e, true);
                match p.kind {
                    PolicyKind::Permissive => g.permissive.push((p.name.clone(), bound)),
                    PolicyKind::Restrictive => g.restrictive.push((p.name.clone(), bound)),
                }
            }
            g
        };
        let insert = group(PolicyCommand::Insert, true, &mut binder);
        let update_using = group(PolicyCommand::Update, false, &mut binder);
        let update_check = group(PolicyCommand::Update, true, &mut binder);
        let delete = group(PolicyCommand::Delete, false, &mut binder);
        binder.mark_direct(&select);
        let memberships = public_memberships(schema, &binder.memberships, &binder.params);
        Ok(WritePlan {
            table: t.name.clone(),
            columns: t.columns.len(),
            role,
            params: binder.params,
            memberships,
            select,
            insert,
            update_using,
            update_check,
            delete,
        })
    }

    /// Plans and checks a batch in one call (see [`WritePlan::check`]).
    pub fn check_writes(
        &self,
        id: &Identity,
        table: &str,
        rows: &[RowChange<'_>],
        memberships: &MembershipResults,
    ) -> Result<Vec<WriteDecision>, WriteError> {
        self.write_plan(id, table)?.check(rows, memberships)
    }
}

/// The first keyword of `sql` (comments and whitespace skipped), upper-cased,
/// when it starts an SQLite statement other than a query.
fn other_statement_keyword(sql: &str) -> Option<String> {
    let mut s = sql;
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    let kw: String = s
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    const OTHER: &[&str] = &[
        "ALTER",
        "ANALYZE",
        "ATTACH",
        "BEGIN",
        "COMMIT",
        "CREATE",
        "DELETE",
        "DETACH",
        "DROP",
        "END",
        "EXPLAIN",
        "INSERT",
        "PRAGMA",
        "REINDEX",
        "RELEASE",
        "REPLACE",
        "ROLLBACK",
        "SAVEPOINT",
        "UPDATE",
        "VACUUM",
    ];
    OTHER.contains(&kw.as_str()).then_some(kw)
}

/// Parses and validates a subscription query: (table, selected columns, WHERE).
fn parse_query(
    schema: &Schema,
    sql: &str,
) -> Result<(usize, Vec<usize>, Option<Expr>), QueryError> {
    let dialect = SQLiteDialect {};
    if let Some((at, message)) = crate::limits::too_complex(&dialect, sql) {
        return Err(QueryError::Refused {
            reasons: vec![format!("{}:{}: {message}", at.line, at.column)],
        });
    }
    let stmts = Parser::parse_sql(&dialect, sql).map_err(|e| {
        // A statement sqlparser cannot read (SQLite's PRAGMA forms, VACUUM,
        // ...) is refused for what it is, not reported as a syntax error.
        if let Some(kw) = other_statement_keyword(sql) {
            return QueryError::Refused {
                reasons: vec![format!(
                    "only SELECT is allowed in a subscription, found `{kw}`"
                )],
            };
        }
        let (loc, message) = split_parser_error(&e);
        let (line, column) = if loc.line == 0 {
            // sqlparser has no position for "end of input": point just past it.
            let line = sql.lines().count().max(1) as u64;
            let last = sql.lines().last().unwrap_or("");
            (line, last.chars().count() as u64 + 1)
        } else {
            (loc.line, loc.column)
        };
        QueryError::Syntax {
            line,
            column,
            message,
        }
    })?;
    let refused = |m: String| QueryError::Refused { reasons: vec![m] };
    let stmt = match stmts.as_slice() {
        [] => return Err(refused("the query is empty: expected one SELECT".into())),
        [s] => s,
        many => {
            return Err(refused(format!(
                "a subscription is one SELECT statement, found {} statements",
                many.len()
            )));
        }
    };
    let Statement::Query(q) = stmt else {
        let text = stmt.to_string();
        let kw: Vec<&str> = text.split_whitespace().take(2).collect();
        return Err(refused(format!(
            "only SELECT is allowed in a subscription, found `{}`",
            kw.join(" ")
        )));
    };
    let mut lw = Lowerer::new(schema, q.span());
    let result = (|| {
        if q.with.is_some() {
            lw.problem(q.span(), "WITH is not allowed in a subscription");
            return None;
        }
        if q.order_by.is_some()
            || q.limit_clause.is_some()
            || q.fetch.is_some()
            || !q.locks.is_empty()
        {
            lw.problem(
                q.span(),
                "ORDER BY, LIMIT and OFFSET are not allowed: a subscription is the set of rows that match, kept up to date",
            );
            return None;
        }
        let SetExpr::Select(sel) = q.body.as_ref() else {
            lw.problem(q.span(), "UNION, INTERSECT, EXCEPT and VALUES are not allowed: subscribe to one SELECT over one table");
            return None;
        };
        let (ti, alias) = lw.single_table(sel, "a subscription")?;
        let scope = Scope::new(schema, ti, alias.as_deref());
        let table: &TableSchema = &schema.tables[ti];
        let mut cols = Vec::new();
        for item in &sel.projection {
            match item {
                SelectItem::Wildcard(opts) if opts.to_string().is_empty() => {
                    cols.extend(0..table.columns.len());
                }
                SelectItem::QualifiedWildcard(kind, opts)
                    if opts.to_string().is_empty()
                        && scope
                            .qualifiers
                            .iter()
                            .any(|n| n.eq_ignore_ascii_case(kind.to_string().trim_end_matches(".*"))) =>
                {
                    cols.extend(0..table.columns.len());
                }
                SelectItem::UnnamedExpr(e @ (ast::Expr::Identifier(_) | ast::Expr::CompoundIdentifier(_))) => {
                    if let Some(Expr::Column(c)) = lw.expr(e, &scope) {
                        cols.push(c);
                    }
                }
                other => lw.problem(
                    other.span(),
                    format!("`{other}` cannot be selected: a subscription selects `*` or plain columns of its table"),
                ),
            }
        }
        let w = match &sel.selection {
            Some(w) => Some(lw.expr(w, &scope)?),
            None => None,
        };
        if let (Some(w), Some(sel_where)) = (&w, &sel.selection) {
            lw.check_collations(w, ti, sel_where.span());
        }
        Some((ti, cols, w))
    })();
    if !lw.problems.is_empty() {
        return Err(QueryError::Refused {
            reasons: lw
                .problems
                .iter()
                .map(|p| {
                    format!(
                        "{}:{}: {}",
                        p.span.start.line, p.span.start.column, p.message
                    )
                })
                .collect(),
        });
    }
    result.ok_or_else(|| refused("the query was refused".into()))
}

/// Policies of one command, bound for one identity.
#[derive(Clone, Debug, Default, PartialEq)]
struct PolicyGroup {
    permissive: Vec<(String, Expr)>,
    restrictive: Vec<(String, Expr)>,
}

/// INSERT, UPDATE or DELETE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WriteCommand {
    /// No row before, a row after.
    Insert,
    /// A row before and after.
    Update,
    /// A row before, none after.
    Delete,
}

impl WriteCommand {
    fn as_str(self) -> &'static str {
        match self {
            WriteCommand::Insert => "INSERT",
            WriteCommand::Update => "UPDATE",
            WriteCommand::Delete => "DELETE",
        }
    }
}

/// The verdict on one written row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WriteDecision {
    /// Whether the write is allowed.
    pub allowed: bool,
    /// The write changes nothing and is not a refusal: a DELETE of a row
    /// the writer cannot read, which PostgreSQL skips (`allowed` is false).
    pub skipped: bool,
    /// What the write does to the row.
    pub command: WriteCommand,
    /// The policies that decided: those that granted, or the one that refused
    /// (empty when no policy applies at all).
    pub policies: Vec<String>,
    /// Why, in words.
    pub reason: String,
}

/// The write policies of one table bound for one identity.
#[derive(Clone, Debug, PartialEq)]
pub struct WritePlan {
    /// The table.
    pub table: String,
    columns: usize,
    role: Option<String>,
    /// Parameter values the bound policies use.
    pub params: Vec<Value>,
    /// Subqueries to run once for the whole batch.
    pub memberships: Vec<Membership>,
    select: Expr,
    insert: PolicyGroup,
    update_using: PolicyGroup,
    update_check: PolicyGroup,
    delete: PolicyGroup,
}

enum Verdict {
    Granted(String),
    Refused {
        policies: Vec<String>,
        reason: String,
    },
}

impl WritePlan {
    fn role_text(&self) -> String {
        self.role
            .as_deref()
            .map_or("(no role claim)".to_owned(), |r| format!("`{r}`"))
    }

    fn judge(
        &self,
        g: &PolicyGroup,
        cmd: WriteCommand,
        clause: &str,
        row: &[Value],
        ms: &MembershipResults,
    ) -> Verdict {
        if g.permissive.is_empty() {
            return Verdict::Refused {
                policies: vec![],
                reason: format!(
                    "no policy grants {} on `{}` to role {}",
                    cmd.as_str(),
                    self.table,
                    self.role_text()
                ),
            };
        }
        for (name, e) in &g.restrictive {
            if !e.eval(row, &self.params, ms).is_true() {
                return Verdict::Refused {
                    policies: vec![name.clone()],
                    reason: format!(
                        "restrictive policy `{name}` refuses the {} row: its {clause} is not true for it",
                        if clause == "USING" { "existing" } else { "new" }
                    ),
                };
            }
        }
        for (name, e) in &g.permissive {
            if e.eval(row, &self.params, ms).is_true() {
                return Verdict::Granted(name.clone());
            }
        }
        let names: Vec<&str> = g.permissive.iter().map(|(n, _)| n.as_str()).collect();
        Verdict::Refused {
            policies: vec![],
            reason: format!(
                "no permissive {} policy's {clause} is true for the {} row (checked: {})",
                cmd.as_str(),
                if clause == "USING" { "existing" } else { "new" },
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Checks each (before, after) pair, rows in table column order, with
    /// PostgreSQL's rules for a statement that names its row (a sync client
    /// always does: `UPDATE ... WHERE pk = ...`):
    ///
    /// - INSERT (no before): WITH CHECK of the INSERT policies on after;
    /// - UPDATE: the before row must be SELECT-visible and pass the UPDATE
    ///   policies' USING; the after row must pass their WITH CHECK (USING
    ///   when absent) and be SELECT-visible too (PostgreSQL: "new row
    ///   violates row-level security policy");
    /// - DELETE (no after): the before row must be SELECT-visible and pass
    ///   the DELETE policies' USING.
    ///
    /// Permissive policies OR, restrictive AND on top, no applicable
    /// permissive policy = denied. Every subquery reads `ms`, the
    /// membership sets of the database as it was before the row's write
    /// (PostgreSQL evaluates a statement's subqueries on the snapshot
    /// before it, so a row never vouches for itself).
    pub fn check(
        &self,
        rows: &[RowChange<'_>],
        ms: &MembershipResults,
    ) -> Result<Vec<WriteDecision>, WriteError> {
        for (index, (b, a)) in rows.iter().enumerate() {
            for r in [b, a].into_iter().flatten() {
                if r.len() != self.columns {
                    return Err(WriteError::RowWidth {
                        table: self.table.clone(),
                        index,
                        expected: self.columns,
                        found: r.len(),
                    });
                }
            }
            if b.is_none() && a.is_none() {
                return Err(WriteError::Empty {
                    table: self.table.clone(),
                    index,
                });
            }
        }
        Ok(rows
            .iter()
            .map(|(b, a)| self.check_one(*b, *a, ms))
            .collect())
    }

    fn check_one(
        &self,
        before: Option<&[Value]>,
        after: Option<&[Value]>,
        ms: &MembershipResults,
    ) -> WriteDecision {
        let decision = |allowed, command, policies, reason| WriteDecision {
            allowed,
            skipped: false,
            command,
            policies,
            reason,
        };
        let deny = |command, v: Verdict| match v {
            Verdict::Refused { policies, reason } => decision(false, command, policies, reason),
            Verdict::Granted(_) => unreachable!("only refusals are denied"),
        };
        let insert = |new: &[Value]| match self.judge(
            &self.insert,
            WriteCommand::Insert,
            "WITH CHECK",
            new,
            ms,
        ) {
            Verdict::Granted(p) => decision(
                true,
                WriteCommand::Insert,
                vec![p.clone()],
                format!("policy `{p}` (WITH CHECK) grants INSERT of the new row"),
            ),
            v => deny(WriteCommand::Insert, v),
        };
        let visible = |row: &[Value]| self.select.eval(row, &self.params, ms).is_true();
        match (before, after) {
            (None, Some(new)) => insert(new),
            (Some(old), None) if !visible(old) => WriteDecision {
                // PostgreSQL's DELETE skips a row its writer cannot read;
                // so does a push (the writer holds no such row), and it
                // answers as for a row that does not exist.
                allowed: false,
                skipped: true,
                command: WriteCommand::Delete,
                policies: vec![],
                reason: "the row is not visible to the writer: the delete changes nothing".into(),
            },
            (Some(old), Some(new)) if !visible(old) => {
                // Refused, in the words a write of a row that does not exist
                // would get: a refusal does not tell whether another
                // tenant's row holds the key (docs/POLICY.md, "What a
                // client can observe").
                let as_new = insert(new);
                if as_new.allowed {
                    decision(
                        false,
                        WriteCommand::Update,
                        vec![],
                        format!(
                            "the existing row is not visible to role {} (no SELECT policy on `{}` grants it): a row must be readable to be changed",
                            self.role_text(),
                            self.table
                        ),
                    )
                } else {
                    as_new
                }
            }
            (Some(old), new) => {
                let cmd = if new.is_some() {
                    WriteCommand::Update
                } else {
                    WriteCommand::Delete
                };
                let using = if new.is_some() {
                    &self.update_using
                } else {
                    &self.delete
                };
                let g1 = match self.judge(using, cmd, "USING", old, ms) {
                    Verdict::Granted(p) => p,
                    v => return deny(cmd, v),
                };
                let Some(new) = new else {
                    return decision(
                        true,
                        cmd,
                        vec![g1.clone()],
                        format!("policy `{g1}` (USING) grants DELETE of the existing row"),
                    );
                };
                match self.judge(&self.update_check, cmd, "WITH CHECK", new, ms) {
                    Verdict::Granted(_) if !visible(new) => decision(
                        false,
                        cmd,
                        vec![],
                        format!(
                            "the new row would not be visible to role {} (no SELECT policy on `{}` grants it): as in PostgreSQL, an UPDATE may not produce a row its writer cannot read",
                            self.role_text(),
                            self.table
                        ),
                    ),
                    Verdict::Granted(g2) => {
                        let reason = format!(
                            "policy `{g1}` (USING) grants UPDATE of the existing row and `{g2}` (WITH CHECK) accepts the new row"
                        );
                        let mut policies = vec![g1];
                        if !policies.contains(&g2) {
                            policies.push(g2);
                        }
                        decision(true, cmd, policies, reason)
                    }
                    v => deny(cmd, v),
                }
            }
            (None, None) => unreachable!("checked in check()"),
        }
    }
}
