//! The expression tree every policy and query is lowered to, its evaluator
//! (SQLite's semantics, see [`crate::sqlite`]) and its SQL printer.
//!
//! A tree straight from a policy file holds literals, claims and subqueries
//! ("unbound"); [`crate::Engine`] binds it for one identity: literals and
//! claims become parameter slots, subqueries become memberships. Only bound
//! trees are evaluated or printed into the SQL the caller runs.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::Write as _;

use tenantsync_types::Value;

use crate::schema::{Affinity, Schema, TableSchema};
use crate::sqlite::{self, ArithOp, Val};

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `IS` (NULL-safe equality)
    Is,
    /// `IS NOT`
    IsNot,
}

impl CmpOp {
    fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Is => "IS",
            CmpOp::IsNot => "IS NOT",
        }
    }
}

/// Identifies a membership subquery within one [`crate::EffectiveQuery`] or
/// [`crate::WritePlan`]: the index into its `memberships`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MembershipId(pub u32);

/// A normalised boolean expression over one table's row.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// A column of the row, by index in table order.
    Column(usize),
    /// A bound parameter slot (0-based; `?1` in SQL is slot 0).
    Param(usize),
    /// A literal (unbound trees only).
    Literal(Value),
    /// A claim of the identity (unbound trees only): `auth.uid()` is `sub`.
    Claim(String),
    /// TRUE or FALSE (printed `1` / `0`).
    Const(bool),
    /// `NOT e`
    Not(Box<Expr>),
    /// `a AND b AND ...`
    And(Vec<Expr>),
    /// `a OR b OR ...`
    Or(Vec<Expr>),
    /// A comparison; `aff` is the affinity SQLite applies to both operands.
    Compare {
        /// Operator.
        op: CmpOp,
        /// Left operand.
        left: Box<Expr>,
        /// Right operand.
        right: Box<Expr>,
        /// Comparison affinity.
        aff: Option<Affinity>,
    },
    /// `e IS [NOT] NULL`
    IsNull {
        /// Operand.
        expr: Box<Expr>,
        /// `IS NOT NULL`.
        negated: bool,
    },
    /// `e [NOT] IN (a, b, ...)`
    InList {
        /// Left operand.
        expr: Box<Expr>,
        /// The list.
        list: Vec<Expr>,
        /// `NOT IN`.
        negated: bool,
        /// Comparison affinity (the left operand's).
        aff: Option<Affinity>,
    },
    /// `e [NOT] IN (SELECT column FROM table WHERE filter)` (unbound trees only).
    InSubquery {
        /// Left operand.
        expr: Box<Expr>,
        /// Index of the subquery's table in the schema.
        table: usize,
        /// Selected column of that table.
        column: usize,
        /// The subquery's own WHERE, over that table's columns.
        filter: Option<Box<Expr>>,
        /// `NOT IN`.
        negated: bool,
        /// Comparison affinity of the left operand with the selected column.
        aff: Option<Affinity>,
    },
    /// `e [NOT] IN <membership>`: a subquery the caller runs (bound trees).
    InMembership {
        /// Left operand.
        expr: Box<Expr>,
        /// Which membership.
        membership: MembershipId,
        /// `NOT IN`.
        negated: bool,
    },
    /// `e [NOT] BETWEEN low AND high`
    Between {
        /// Operand.
        expr: Box<Expr>,
        /// Lower bound.
        low: Box<Expr>,
        /// Upper bound.
        high: Box<Expr>,
        /// `NOT BETWEEN`.
        negated: bool,
        /// Affinities of `expr >= low` and `expr <= high`.
        aff: (Option<Affinity>, Option<Affinity>),
    },
    /// `e [NOT] LIKE pattern [ESCAPE 'c']`
    Like {
        /// Operand.
        expr: Box<Expr>,
        /// Pattern.
        pattern: Box<Expr>,
        /// Escape character.
        escape: Option<char>,
        /// `NOT LIKE`.
        negated: bool,
    },
    /// `a + b` and friends.
    Arith {
        /// Operator.
        op: ArithOp,
        /// Left operand.
        left: Box<Expr>,
        /// Right operand.
        right: Box<Expr>,
    },
    /// `a || b`
    Concat(Box<Expr>, Box<Expr>),
    /// `-e`
    Negate(Box<Expr>),
    /// `+e` (the value, without the column's affinity)
    Plus(Box<Expr>),
    /// `CASE [operand] WHEN .. THEN .. [ELSE ..] END`
    Case {
        /// The base expression of a simple CASE.
        operand: Option<Box<Expr>>,
        /// WHEN/THEN pairs, with the comparison affinity of `operand = when`.
        whens: Vec<(Expr, Expr, Option<Affinity>)>,
        /// ELSE (NULL when absent).
        otherwise: Option<Box<Expr>>,
    },
    /// `coalesce(a, b, ...)` (and `ifnull(a, b)`)
    Coalesce(Vec<Expr>),
    /// `lower(e)`
    Lower(Box<Expr>),
    /// `upper(e)`
    Upper(Box<Expr>),
    /// `length(e)`
    Length(Box<Expr>),
}

/// The three truth values of SQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Truth {
    /// TRUE
    True,
    /// FALSE
    False,
    /// NULL (unknown): a row is selected, or a write allowed, only on TRUE.
    Null,
}

impl Truth {
    fn from_opt(b: Option<bool>) -> Truth {
        match b {
            Some(true) => Truth::True,
            Some(false) => Truth::False,
            None => Truth::Null,
        }
    }

    /// Whether this is TRUE.
    pub fn is_true(self) -> bool {
        self == Truth::True
    }
}

/// The values a membership subquery returned, ready for lookups with the
/// comparison affinity of its `IN`.
#[derive(Clone, Debug, Default)]
pub struct MembershipSet {
    values: Vec<Value>,
    has_null: bool,
    aff: Option<Affinity>,
}

impl MembershipSet {
    /// Builds the set from the rows of the membership's SQL; `aff` is
    /// [`crate::Membership::affinity`].
    pub fn new(values: impl IntoIterator<Item = Value>, aff: Option<Affinity>) -> Self {
        let mut has_null = false;
        let mut vals: Vec<Value> = Vec::new();
        for v in values {
            if v.is_null() {
                has_null = true;
                continue;
            }
            let b = Val::borrow(&v);
            vals.push(match sqlite::apply_affinity(&b, aff) {
                Some(c) => c.into_value(),
                None => v,
            });
        }
        vals.sort_by(|a, b| sqlite::compare(&Val::borrow(a), &Val::borrow(b)));
        vals.dedup_by(|a, b| sqlite::compare(&Val::borrow(a), &Val::borrow(b)) == Ordering::Equal);
        MembershipSet {
            values: vals,
            has_null,
            aff,
        }
    }

    /// The distinct non-NULL values, with the `IN`'s affinity applied, in
    /// SQLite's order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// Whether the subquery returned a NULL (then `x IN set` is NULL, not
    /// FALSE, for values outside it).
    pub fn has_null(&self) -> bool {
        self.has_null
    }

    /// The index keys of the values: a row value `v` is in the set exactly
    /// when [`crate::membership_probe_key`] of `v` (with the set's affinity)
    /// is one of them.
    pub fn index_keys(&self) -> impl Iterator<Item = crate::IndexKey> + '_ {
        self.values.iter().filter_map(crate::IndexKey::from_value)
    }

    /// Number of distinct non-NULL values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it holds no non-NULL value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether a (non-NULL) value is in the set, with the `IN`'s affinity
    /// applied as SQLite would.
    pub fn contains_value(&self, v: &Value) -> bool {
        !v.is_null() && self.contains(&Val::borrow(v))
    }

    fn contains(&self, v: &Val<'_>) -> bool {
        let conv = sqlite::apply_affinity(v, self.aff);
        let probe = conv.as_ref().unwrap_or(v);
        self.values
            .binary_search_by(|x| sqlite::compare(&Val::borrow(x), probe))
            .is_ok()
    }
}

/// The results of the membership subqueries of one query or write plan.
#[derive(Clone, Debug, Default)]
pub struct MembershipResults {
    sets: Vec<Option<MembershipSet>>,
}

impl MembershipResults {
    /// No results yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the set of a membership.
    pub fn insert(&mut self, id: MembershipId, set: MembershipSet) {
        let i = id.0 as usize;
        if self.sets.len() <= i {
            self.sets.resize(i + 1, None);
        }
        self.sets[i] = Some(set);
    }

    /// The set of a membership, if recorded.
    pub fn get(&self, id: MembershipId) -> Option<&MembershipSet> {
        self.sets.get(id.0 as usize).and_then(Option::as_ref)
    }
}

static EMPTY_SET: MembershipSet = MembershipSet {
    values: Vec::new(),
    has_null: false,
    aff: None,
};

pub(crate) struct Env<'a> {
    pub(crate) row: &'a [Value],
    pub(crate) params: &'a [Value],
    pub(crate) memberships: &'a MembershipResults,
}

fn and3(a: Option<bool>, b: impl FnOnce() -> Option<bool>) -> Option<bool> {
    match a {
        Some(false) => Some(false),
        a => match (a, b()) {
            (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
    }
}

fn or3(a: Option<bool>, b: impl FnOnce() -> Option<bool>) -> Option<bool> {
    match a {
        Some(true) => Some(true),
        a => match (a, b()) {
            (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
    }
}

fn bool_val(b: Option<bool>) -> Val<'static> {
    match b {
        None => Val::Null,
        Some(b) => Val::Int(i64::from(b)),
    }
}

impl Expr {
    /// Evaluates the expression as a condition over `row` (table column
    /// order): TRUE, FALSE or NULL, exactly as SQLite's WHERE would see it.
    /// A membership missing from `memberships` counts as an empty set.
    pub fn eval(&self, row: &[Value], params: &[Value], memberships: &MembershipResults) -> Truth {
        let env = Env {
            row,
            params,
            memberships,
        };
        Truth::from_opt(self.truth(&env))
    }

    pub(crate) fn truth(&self, env: &Env<'_>) -> Option<bool> {
        match self {
            Expr::Const(b) => Some(*b),
            Expr::Not(e) => e.truth(env).map(|b| !b),
            Expr::And(items) => {
                let mut acc = Some(true);
                for e in items {
                    acc = and3(acc, || e.truth(env));
                    if acc == Some(false) {
                        break;
                    }
                }
                acc
            }
            Expr::Or(items) => {
                let mut acc = Some(false);
                for e in items {
                    acc = or3(acc, || e.truth(env));
                    if acc == Some(true) {
                        break;
                    }
                }
                acc
            }
            other => sqlite::truth(&other.value(env)),
        }
    }

    pub(crate) fn value<'a>(&self, env: &Env<'a>) -> Val<'a> {
        match self {
            Expr::Column(i) => env.row.get(*i).map_or(Val::Null, Val::borrow),
            Expr::Param(i) => env.params.get(*i).map_or(Val::Null, Val::borrow),
            Expr::Literal(v) => Val::borrow(v).into_value_static(),
            Expr::Claim(_) | Expr::InSubquery { .. } => Val::Null,
            Expr::Const(_) | Expr::Not(_) | Expr::And(_) | Expr::Or(_) => bool_val(self.truth(env)),
            Expr::Compare {
                op,
                left,
                right,
                aff,
            } => {
                let (l, r) = (left.value(env), right.value(env));
                bool_val(compare_op(*op, &l, &r, *aff))
            }
            Expr::IsNull { expr, negated } => {
                let v = expr.value(env);
                Val::Int(i64::from(v.is_null() != *negated))
            }
            Expr::InList {
                expr,
                list,
                negated,
                aff,
            } => {
                let v = expr.value(env);
                let r = if v.is_null() {
                    if list.is_empty() { Some(false) } else { None }
                } else {
                    let mut saw_null = false;
                    let mut found = false;
                    for item in list {
                        let x = item.value(env);
                        match sqlite::compare_with_affinity(&v, &x, *aff) {
                            Some(Ordering::Equal) => {
                                found = true;
                                break;
                            }
                            None => saw_null = true,
                            _ => {}
                        }
                    }
                    if found {
                        Some(true)
                    } else if saw_null {
                        None
                    } else {
                        Some(false)
                    }
                };
                bool_val(if *negated { r.map(|b| !b) } else { r })
            }
            Expr::InMembership {
                expr,
                membership,
                negated,
            } => {
                let set = env.memberships.get(*membership).unwrap_or(&EMPTY_SET);
                let v = expr.value(env);
                let r = if set.values.is_empty() && !set.has_null {
                    Some(false)
                } else if v.is_null() {
                    None
                } else if set.contains(&v) {
                    Some(true)
                } else if set.has_null {
                    None
                } else {
                    Some(false)
                };
                bool_val(if *negated { r.map(|b| !b) } else { r })
            }
            Expr::Between {
                expr,
                low,
                high,
                negated,
                aff,
            } => {
                let v = expr.value(env);
                let lo = low.value(env);
                let ge = compare_op(CmpOp::Ge, &v, &lo, aff.0);
                let r = and3(ge, || {
                    let hi = high.value(env);
                    compare_op(CmpOp::Le, &v, &hi, aff.1)
                });
                bool_val(if *negated { r.map(|b| !b) } else { r })
            }
            Expr::Like {
                expr,
                pattern,
                escape,
                negated,
            } => {
                let v = expr.value(env);
                let p = pattern.value(env);
                let r = match (sqlite::to_text(&p), sqlite::to_text(&v)) {
                    (Some(p), Some(t)) => Some(sqlite::like(&p, &t, *escape)),
                    _ => None,
                };
                bool_val(if *negated { r.map(|b| !b) } else { r })
            }
            Expr::Arith { op, left, right } => {
                sqlite::arith(*op, &left.value(env), &right.value(env))
            }
            Expr::Concat(a, b) => sqlite::concat(&a.value(env), &b.value(env)),
            Expr::Negate(e) => sqlite::arith(ArithOp::Sub, &Val::Int(0), &e.value(env)),
            Expr::Plus(e) => e.value(env),
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => {
                let base = operand.as_ref().map(|o| o.value(env));
                for (when, then, aff) in whens {
                    let hit = match &base {
                        Some(b) => {
                            let w = when.value(env);
                            compare_op(CmpOp::Eq, b, &w, *aff) == Some(true)
                        }
                        None => when.truth(env) == Some(true),
                    };
                    if hit {
                        return then.value(env);
                    }
                }
                otherwise.as_ref().map_or(Val::Null, |e| e.value(env))
            }
            Expr::Coalesce(items) => {
                for e in items {
                    let v = e.value(env);
                    if !v.is_null() {
                        return v;
                    }
                }
                Val::Null
            }
            Expr::Lower(e) => sqlite::ascii_case(&e.value(env), false),
            Expr::Upper(e) => sqlite::ascii_case(&e.value(env), true),
            Expr::Length(e) => sqlite::length(&e.value(env)),
        }
    }

    /// The affinity of the expression as an operand (`sqlite3ExprAffinity`):
    /// a column's, or none.
    pub(crate) fn affinity(&self, table: &TableSchema) -> Option<Affinity> {
        match self {
            Expr::Column(i) => Some(table.columns[*i].affinity()),
            _ => None,
        }
    }

    /// Visits every direct child expression.
    /// Whether the expression reads a column of the row (directly; a
    /// subquery's own columns do not count).
    pub(crate) fn mentions_column(&self) -> bool {
        let mut stack = vec![self];
        while let Some(e) = stack.pop() {
            if matches!(e, Expr::Column(_)) {
                return true;
            }
            stack.extend(e.children());
        }
        false
    }

    /// The length in bytes of the text form of a bound expression that
    /// reads no column (a pattern, once its claims are bound); `None` when
    /// it reads the row or is NULL.
    pub(crate) fn constant_text_len(&self, params: &[Value]) -> Option<usize> {
        if self.mentions_column() {
            return None;
        }
        match self {
            Expr::Param(i) => match params.get(*i)? {
                Value::Null => None,
                Value::Text(t) => Some(t.len()),
                Value::Blob(b) => Some(b.len()),
                other => Some(other.to_string().len()),
            },
            _ => None,
        }
    }

    pub(crate) fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::Column(_)
            | Expr::Param(_)
            | Expr::Literal(_)
            | Expr::Claim(_)
            | Expr::Const(_) => vec![],
            Expr::Not(e)
            | Expr::IsNull { expr: e, .. }
            | Expr::Negate(e)
            | Expr::Plus(e)
            | Expr::Lower(e)
            | Expr::Upper(e)
            | Expr::Length(e)
            | Expr::InMembership { expr: e, .. } => vec![e],
            Expr::InSubquery { expr, .. } => vec![expr],
            Expr::And(v) | Expr::Or(v) | Expr::Coalesce(v) => v.iter().collect(),
            Expr::Compare { left, right, .. } | Expr::Arith { left, right, .. } => {
                vec![left, right]
            }
            Expr::Concat(a, b) => vec![a, b],
            Expr::InList { expr, list, .. } => {
                let mut v = vec![expr.as_ref()];
                v.extend(list.iter());
                v
            }
            Expr::Between {
                expr, low, high, ..
            } => vec![expr, low, high],
            Expr::Like { expr, pattern, .. } => vec![expr, pattern],
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => {
                let mut v: Vec<&Expr> = operand.iter().map(|b| b.as_ref()).collect();
                for (w, t, _) in whens {
                    v.push(w);
                    v.push(t);
                }
                v.extend(otherwise.iter().map(|b| b.as_ref()));
                v
            }
        }
    }
}

impl Val<'_> {
    fn into_value_static(self) -> Val<'static> {
        match self {
            Val::Null => Val::Null,
            Val::Int(i) => Val::Int(i),
            Val::Real(r) => Val::Real(r),
            Val::Text(t) => Val::Text(Cow::Owned(t.into_owned())),
            Val::Blob(b) => Val::Blob(Cow::Owned(b.into_owned())),
        }
    }
}

fn compare_op(op: CmpOp, l: &Val<'_>, r: &Val<'_>, aff: Option<Affinity>) -> Option<bool> {
    match op {
        CmpOp::Is | CmpOp::IsNot => {
            let eq = match (l.is_null(), r.is_null()) {
                (true, true) => true,
                (true, false) | (false, true) => false,
                _ => sqlite::compare_with_affinity(l, r, aff) == Some(Ordering::Equal),
            };
            Some(eq == (op == CmpOp::Is))
        }
        _ => sqlite::compare_with_affinity(l, r, aff).map(|o| match op {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::Ne => o != Ordering::Equal,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::Le => o != Ordering::Greater,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Ge => o != Ordering::Less,
            CmpOp::Is | CmpOp::IsNot => unreachable!(),
        }),
    }
}

/// Quotes an SQL identifier: `"name"`, doubling inner quotes.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Prints bound expressions as SQLite SQL. Every non-atomic operand is
/// parenthesised, so no operator of one part can bind into another.
pub(crate) struct Printer<'a> {
    pub(crate) schema: &'a Schema,
    /// For each membership id: (table index, column index, bound filter).
    pub(crate) memberships: &'a [crate::engine::BoundMembership],
    /// Qualify columns of the outermost table with its name.
    pub(crate) qualify: bool,
}

impl Printer<'_> {
    pub(crate) fn print(&self, e: &Expr, table: &TableSchema, out: &mut String) {
        self.print_in(e, table, out, self.qualify)
    }

    fn child(&self, e: &Expr, table: &TableSchema, out: &mut String, q: bool) {
        let atomic = matches!(
            e,
            Expr::Column(_)
                | Expr::Param(_)
                | Expr::Literal(_)
                | Expr::Const(_)
                | Expr::Case { .. }
                | Expr::Coalesce(_)
                | Expr::Lower(_)
                | Expr::Upper(_)
                | Expr::Length(_)
        );
        if atomic {
            self.print_in(e, table, out, q);
        } else {
            out.push('(');
            self.print_in(e, table, out, q);
            out.push(')');
        }
    }

    fn print_in(&self, e: &Expr, table: &TableSchema, out: &mut String, q: bool) {
        match e {
            Expr::Column(i) => {
                if q {
                    out.push_str(&quote_ident(&table.name));
                    out.push('.');
                }
                out.push_str(&quote_ident(&table.columns[*i].name));
            }
            Expr::Param(i) => {
                let _ = write!(out, "?{}", i + 1);
            }
            Expr::Literal(v) => {
                let _ = write!(out, "{v}");
            }
            Expr::Claim(c) => {
                // Never printed in bound trees; kept readable for debugging.
                let _ = write!(out, "auth.claim('{}')", c.replace('\'', "''"));
            }
            Expr::Const(b) => out.push_str(if *b { "1" } else { "0" }),
            Expr::Not(x) => {
                out.push_str("NOT ");
                self.child(x, table, out, q);
            }
            Expr::And(items) | Expr::Or(items) => {
                let sep = if matches!(e, Expr::And(_)) {
                    " AND "
                } else {
                    " OR "
                };
                for (k, x) in items.iter().enumerate() {
                    if k > 0 {
                        out.push_str(sep);
                    }
                    self.child(x, table, out, q);
                }
            }
            Expr::Compare {
                op, left, right, ..
            } => {
                self.child(left, table, out, q);
                out.push(' ');
                out.push_str(op.sql());
                out.push(' ');
                self.child(right, table, out, q);
            }
            Expr::IsNull { expr, negated } => {
                self.child(expr, table, out, q);
                out.push_str(if *negated { " IS NOT NULL" } else { " IS NULL" });
            }
            Expr::InList {
                expr,
                list,
                negated,
                ..
            } => {
                self.child(expr, table, out, q);
                out.push_str(if *negated { " NOT IN (" } else { " IN (" });
                for (k, x) in list.iter().enumerate() {
                    if k > 0 {
                        out.push_str(", ");
                    }
                    self.child(x, table, out, q);
                }
                out.push(')');
            }
            Expr::InSubquery {
                expr,
                table: t,
                column,
                filter,
                negated,
                ..
            } => {
                self.child(expr, table, out, q);
                let inner = &self.schema.tables[*t];
                out.push_str(if *negated { " NOT IN (" } else { " IN (" });
                self.subquery(inner, *column, filter.as_deref(), out);
                out.push(')');
            }
            Expr::InMembership {
                expr,
                membership,
                negated,
            } => {
                self.child(expr, table, out, q);
                let m = &self.memberships[membership.0 as usize];
                let inner = &self.schema.tables[m.table];
                out.push_str(if *negated { " NOT IN (" } else { " IN (" });
                self.subquery(inner, m.column, Some(&m.filter), out);
                out.push(')');
            }
            Expr::Between {
                expr,
                low,
                high,
                negated,
                ..
            } => {
                self.child(expr, table, out, q);
                out.push_str(if *negated {
                    " NOT BETWEEN "
                } else {
                    " BETWEEN "
                });
                self.child(low, table, out, q);
                out.push_str(" AND ");
                self.child(high, table, out, q);
            }
            Expr::Like {
                expr,
                pattern,
                escape,
                negated,
            } => {
                self.child(expr, table, out, q);
                out.push_str(if *negated { " NOT LIKE " } else { " LIKE " });
                self.child(pattern, table, out, q);
                if let Some(c) = escape {
                    let _ = write!(out, " ESCAPE {}", Value::Text(c.to_string()));
                }
            }
            Expr::Arith { op, left, right } => {
                self.child(left, table, out, q);
                out.push_str(match op {
                    ArithOp::Add => " + ",
                    ArithOp::Sub => " - ",
                    ArithOp::Mul => " * ",
                    ArithOp::Div => " / ",
                    ArithOp::Rem => " % ",
                });
                self.child(right, table, out, q);
            }
            Expr::Concat(a, b) => {
                self.child(a, table, out, q);
                out.push_str(" || ");
                self.child(b, table, out, q);
            }
            Expr::Negate(x) => {
                out.push('-');
                self.child(x, table, out, q);
            }
            Expr::Plus(x) => {
                out.push('+');
                self.child(x, table, out, q);
            }
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => {
                out.push_str("CASE");
                if let Some(o) = operand {
                    out.push(' ');
                    self.child(o, table, out, q);
                }
                for (w, t, _) in whens {
                    out.push_str(" WHEN ");
                    self.child(w, table, out, q);
                    out.push_str(" THEN ");
                    self.child(t, table, out, q);
                }
                if let Some(o) = otherwise {
                    out.push_str(" ELSE ");
                    self.child(o, table, out, q);
                }
                out.push_str(" END");
            }
            Expr::Coalesce(items) => {
                out.push_str("coalesce(");
                for (k, x) in items.iter().enumerate() {
                    if k > 0 {
                        out.push_str(", ");
                    }
                    self.print_in(x, table, out, q);
                }
                out.push(')');
            }
            Expr::Lower(x) | Expr::Upper(x) | Expr::Length(x) => {
                out.push_str(match e {
                    Expr::Lower(_) => "lower(",
                    Expr::Upper(_) => "upper(",
                    _ => "length(",
                });
                self.print_in(x, table, out, q);
                out.push(')');
            }
        }
    }

    /// `SELECT "c" FROM "t" WHERE <filter>`; columns inside are qualified with
    /// the subquery's own table, which always binds to the innermost FROM.
    pub(crate) fn subquery(
        &self,
        inner: &TableSchema,
        column: usize,
        filter: Option<&Expr>,
        out: &mut String,
    ) {
        let _ = write!(
            out,
            "SELECT {}.{} FROM {}",
            quote_ident(&inner.name),
            quote_ident(&inner.columns[column].name),
            quote_ident(&inner.name)
        );
        if let Some(f) = filter {
            out.push_str(" WHERE ");
            self.print_in(f, inner, out, true);
        }
    }
}
