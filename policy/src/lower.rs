//! Lowering sqlparser's AST into [`Expr`], validating as it goes: only the
//! allowed subset gets through, everything else becomes a [`Problem`] naming
//! what was refused and where.

use sqlparser::ast::{
    self, BinaryOperator, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectNamePart,
    SelectItem, SetExpr, Spanned, TableFactor, UnaryOperator,
};
use sqlparser::tokenizer::Span;
use tenantsync_types::Value;

use crate::expr::{CmpOp, Expr};
use crate::schema::{Schema, TableSchema, is_internal_table};
use crate::sqlite::{self, ArithOp};

/// One problem found while lowering, at a source span.
#[derive(Clone, Debug)]
pub(crate) struct Problem {
    pub(crate) span: Span,
    pub(crate) message: String,
}

/// The table an expression is evaluated over, and the names that qualify it.
pub(crate) struct Scope<'a> {
    pub(crate) table: &'a TableSchema,
    pub(crate) qualifiers: Vec<String>,
}

impl<'a> Scope<'a> {
    pub(crate) fn new(schema: &'a Schema, table_index: usize, alias: Option<&str>) -> Self {
        let table = &schema.tables[table_index];
        let mut qualifiers = vec![table.name.clone()];
        if let Some(a) = alias {
            qualifiers.push(a.to_owned());
        }
        Scope { table, qualifiers }
    }
}

/// A subquery met while lowering: (table index, span) — for cycle detection.
pub(crate) type SubqueryRef = (usize, Span);

pub(crate) struct Lowerer<'a> {
    pub(crate) schema: &'a Schema,
    pub(crate) problems: Vec<Problem>,
    /// Span used when a node has none.
    pub(crate) fallback: Span,
    pub(crate) subqueries: Vec<SubqueryRef>,
}

const ALLOWED_FUNCTIONS: &str =
    "auth.uid(), auth.role(), auth.claim('name'), coalesce, ifnull, lower, upper, length";

fn ident_name(id: &ast::Ident) -> String {
    id.value.clone()
}

fn object_name_parts(name: &ast::ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => i.value.clone(),
            other => other.to_string(),
        })
        .collect()
}

fn is_real_span(s: Span) -> bool {
    s.start.line > 0
}

impl<'a> Lowerer<'a> {
    pub(crate) fn new(schema: &'a Schema, fallback: Span) -> Self {
        Lowerer {
            schema,
            problems: Vec::new(),
            fallback,
            subqueries: Vec::new(),
        }
    }

    pub(crate) fn problem(&mut self, span: Span, message: impl Into<String>) {
        let span = if is_real_span(span) {
            span
        } else {
            self.fallback
        };
        self.problems.push(Problem {
            span,
            message: message.into(),
        });
    }

    /// Resolves a table a policy or query names: it must exist, not be
    /// internal, and be a CRR.
    pub(crate) fn crr_table(&mut self, name: &ast::ObjectName, what: &str) -> Option<usize> {
        let parts = object_name_parts(name);
        let span = name.span();
        let table_name = match parts.as_slice() {
            [t] => t.clone(),
            [schema, t] if schema.eq_ignore_ascii_case("main") => t.clone(),
            _ => {
                self.problem(
                    span,
                    format!(
                        "`{name}` is not a table of the main database: {what} may only name a CRR table"
                    ),
                );
                return None;
            }
        };
        if is_internal_table(&table_name) {
            self.problem(
                span,
                format!(
                    "table `{table_name}` is internal (SQLite or cr-sqlite bookkeeping): {what} may only name a CRR table"
                ),
            );
            return None;
        }
        let Some(i) = self.schema.table_index(&table_name) else {
            self.problem(span, format!("unknown table `{table_name}`"));
            return None;
        };
        if !self.schema.tables[i].is_crr {
            self.problem(
                span,
                format!(
                    "table `{table_name}` is a local table, not a CRR: {what} may only name a CRR table (`SELECT crsql_as_crr('{table_name}')`)"
                ),
            );
            return None;
        }
        Some(i)
    }

    fn column(&mut self, scope: &Scope<'_>, id: &ast::Ident) -> Option<Expr> {
        match scope.table.column_index(&id.value) {
            Some(i) => Some(Expr::Column(i)),
            None => {
                let hint = if id.quote_style == Some('"') {
                    format!(
                        " (\"{}\" is an identifier: write text in single quotes, '{}')",
                        id.value, id.value
                    )
                } else {
                    String::new()
                };
                self.problem(
                    id.span,
                    format!(
                        "unknown column `{}` in table `{}`{hint}",
                        id.value, scope.table.name
                    ),
                );
                None
            }
        }
    }

    pub(crate) fn expr(&mut self, e: &ast::Expr, scope: &Scope<'_>) -> Option<Expr> {
        use ast::Expr as A;
        match e {
            A::Identifier(id) => {
                if id.quote_style.is_none() {
                    let lower = id.value.to_ascii_lowercase();
                    if lower == "true" || lower == "false" {
                        return Some(Expr::Literal(Value::Integer(i64::from(lower == "true"))));
                    }
                }
                self.column(scope, id)
            }
            A::CompoundIdentifier(parts) => match parts.as_slice() {
                [q, c]
                    if scope
                        .qualifiers
                        .iter()
                        .any(|n| n.eq_ignore_ascii_case(&q.value)) =>
                {
                    self.column(scope, c)
                }
                [q, c] => {
                    self.problem(
                        e.span(),
                        format!(
                            "`{}.{}` does not name a column of `{}`: an expression may only use its own table's columns (subqueries cannot refer to the outer row)",
                            q.value, c.value, scope.table.name
                        ),
                    );
                    None
                }
                _ => {
                    self.problem(e.span(), format!("`{e}` is not a column name"));
                    None
                }
            },
            A::Value(v) => self.literal(&v.value, v.span),
            A::Nested(inner) => self.expr(inner, scope),
            A::UnaryOp {
                op: UnaryOperator::Minus,
                expr: inner,
            } if matches!(inner.as_ref(), A::Value(v) if matches!(&v.value, ast::Value::Number(n, _) if n == "9223372036854775808")) =>
            {
                // As SQLite: the one integer literal whose negation fits.
                Some(Expr::Literal(Value::Integer(i64::MIN)))
            }
            A::UnaryOp { op, expr } => {
                let inner = self.expr(expr, scope)?;
                match op {
                    UnaryOperator::Not => Some(Expr::Not(Box::new(inner))),
                    UnaryOperator::Minus => Some(match inner {
                        Expr::Literal(Value::Integer(i)) if i != i64::MIN => {
                            Expr::Literal(Value::Integer(-i))
                        }
                        Expr::Literal(Value::Real(r)) => Expr::Literal(Value::Real(-r)),
                        other => Expr::Negate(Box::new(other)),
                    }),
                    UnaryOperator::Plus => Some(Expr::Plus(Box::new(inner))),
                    other => {
                        self.problem(e.span(), format!("operator `{other}` is not allowed"));
                        None
                    }
                }
            }
            A::BinaryOp { left, op, right } => self.binary(e, left, op, right, scope),
            A::IsNull(x) | A::IsNotNull(x) => {
                let inner = self.expr(x, scope)?;
                Some(Expr::IsNull {
                    expr: Box::new(inner),
                    negated: matches!(e, A::IsNotNull(_)),
                })
            }
            A::IsDistinctFrom(a, b) | A::IsNotDistinctFrom(a, b) => {
                let (l, r) = (self.expr(a, scope), self.expr(b, scope));
                let (l, r) = (l?, r?);
                let op = if matches!(e, A::IsDistinctFrom(..)) {
                    CmpOp::IsNot
                } else {
                    CmpOp::Is
                };
                Some(self.compare(op, l, r, scope))
            }
            A::In {
                expr,
                target,
                negated,
                ..
            } => {
                let lhs = self.expr(expr, scope);
                match target {
                    ast::InTarget::List(list) => {
                        let items: Vec<Option<Expr>> =
                            list.iter().map(|x| self.expr(x, scope)).collect();
                        let lhs = lhs?;
                        let items: Option<Vec<Expr>> = items.into_iter().collect();
                        let aff = sqlite::comparison_affinity(lhs.affinity(scope.table), None);
                        Some(Expr::InList {
                            expr: Box::new(lhs),
                            list: items?,
                            negated: *negated,
                            aff,
                        })
                    }
                    ast::InTarget::Subquery(q) => {
                        let sub = self.subquery(q);
                        let (lhs, (table, column, filter)) = (lhs?, sub?);
                        let inner_aff = self.schema.tables[table].columns[column].affinity();
                        let aff =
                            sqlite::comparison_affinity(lhs.affinity(scope.table), Some(inner_aff));
                        Some(Expr::InSubquery {
                            expr: Box::new(lhs),
                            table,
                            column,
                            filter: filter.map(Box::new),
                            negated: *negated,
                            aff,
                        })
                    }
                    _ => {
                        self.problem(
                            e.span(),
                            "only `IN (value, ...)` and `IN (SELECT column FROM crr_table WHERE ...)` are allowed",
                        );
                        None
                    }
                }
            }
            A::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let (x, l, h) = (
                    self.expr(expr, scope),
                    self.expr(low, scope),
                    self.expr(high, scope),
                );
                let (x, l, h) = (x?, l?, h?);
                let xa = x.affinity(scope.table);
                let aff = (
                    sqlite::comparison_affinity(xa, l.affinity(scope.table)),
                    sqlite::comparison_affinity(xa, h.affinity(scope.table)),
                );
                Some(Expr::Between {
                    expr: Box::new(x),
                    low: Box::new(l),
                    high: Box::new(h),
                    negated: *negated,
                    aff,
                })
            }
            A::Like {
                negated,
                any,
                expr,
                pattern,
                escape_char,
            } => {
                if *any {
                    self.problem(e.span(), "`LIKE ANY` is not allowed");
                    return None;
                }
                let (x, p) = (self.expr(expr, scope), self.expr(pattern, scope));
                let escape = match escape_char.as_deref() {
                    None => None,
                    Some(A::Value(v)) => match &v.value {
                        // SQLite reads an ESCAPE of NUL as the empty text
                        // and refuses it.
                        ast::Value::SingleQuotedString(s) if s == "\0" => {
                            self.problem(v.span, "ESCAPE cannot be the NUL character");
                            return None;
                        }
                        ast::Value::SingleQuotedString(s) if s.chars().count() == 1 => {
                            s.chars().next()
                        }
                        _ => {
                            self.problem(
                                v.span,
                                "ESCAPE must be a single character in quotes, e.g. ESCAPE '\\'",
                            );
                            return None;
                        }
                    },
                    Some(other) => {
                        self.problem(
                            other.span(),
                            "ESCAPE must be a single character in quotes, e.g. ESCAPE '\\'",
                        );
                        return None;
                    }
                };
                let p = p?;
                if p.mentions_column() {
                    self.problem(
                        pattern.span(),
                        "a LIKE pattern must not depend on the row (use a literal or a claim): a row's text as a pattern could fail every query over the table",
                    );
                    return None;
                }
                Some(Expr::Like {
                    expr: Box::new(x?),
                    pattern: Box::new(p),
                    escape,
                    negated: *negated,
                })
            }
            A::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                let op = operand.as_ref().map(|o| self.expr(o, scope));
                let mut whens = Vec::new();
                let mut ok = true;
                for c in conditions {
                    let (w, t) = (self.expr(&c.condition, scope), self.expr(&c.result, scope));
                    match (w, t) {
                        (Some(w), Some(t)) => whens.push((w, t)),
                        _ => ok = false,
                    }
                }
                let otherwise = else_result.as_ref().map(|x| self.expr(x, scope));
                let operand = match op {
                    Some(None) => return None,
                    Some(Some(o)) => Some(o),
                    None => None,
                };
                let otherwise = match otherwise {
                    Some(None) => return None,
                    Some(Some(o)) => Some(Box::new(o)),
                    None => None,
                };
                if !ok {
                    return None;
                }
                let oa = operand.as_ref().and_then(|o| o.affinity(scope.table));
                let whens = whens
                    .into_iter()
                    .map(|(w, t)| {
                        let aff = if operand.is_some() {
                            sqlite::comparison_affinity(oa, w.affinity(scope.table))
                        } else {
                            None
                        };
                        (w, t, aff)
                    })
                    .collect();
                Some(Expr::Case {
                    operand: operand.map(Box::new),
                    whens,
                    otherwise,
                })
            }
            A::Function(f) => self.function(e, f, scope),
            A::Subquery(_) | A::Exists { .. } => {
                self.problem(
                    e.span(),
                    "only `column IN (SELECT column FROM crr_table WHERE ...)` subqueries are allowed",
                );
                None
            }
            A::Cast { .. } => {
                self.problem(
                    e.span(),
                    "`CAST` is not allowed: compare values of the right type instead",
                );
                None
            }
            A::ILike { .. } => {
                self.problem(
                    e.span(),
                    "`ILIKE` is not allowed: SQLite's LIKE is already case-insensitive for ASCII",
                );
                None
            }
            A::Collate { .. } => {
                self.problem(
                    e.span(),
                    "`COLLATE` is not allowed: comparisons use SQLite's BINARY collation",
                );
                None
            }
            _ => {
                self.problem(
                    e.span(),
                    format!("`{e}` is not allowed: policies and queries may use columns, literals, comparisons, AND/OR/NOT, IN, IS [NOT] NULL, BETWEEN, LIKE, arithmetic, ||, CASE and {ALLOWED_FUNCTIONS}"),
                );
                None
            }
        }
    }

    fn literal(&mut self, v: &ast::Value, span: Span) -> Option<Expr> {
        use ast::Value as V;
        let value = match v {
            V::Number(n, _) => match n.parse::<i64>() {
                Ok(i) => Value::Integer(i),
                Err(_) => match n.parse::<f64>() {
                    Ok(r) => Value::Real(r),
                    Err(_) => {
                        self.problem(span, format!("`{n}` is not a number SQLite reads"));
                        return None;
                    }
                },
            },
            V::SingleQuotedString(s) => Value::Text(s.clone()),
            V::Boolean(b) => Value::Integer(i64::from(*b)),
            V::Null => Value::Null,
            V::HexStringLiteral(h) => match hex_decode(h) {
                Some(b) => Value::Blob(b),
                None => {
                    let why = if h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        "it needs an even number of hex digits"
                    } else {
                        "it may hold only hex digits (0-9, a-f, A-F)"
                    };
                    self.problem(span, format!("X'{h}' is not a blob literal: {why}"));
                    return None;
                }
            },
            V::Placeholder(p) => {
                self.problem(
                    span,
                    format!("parameter `{p}` is not allowed: write the value itself (every value is sent as a bound parameter)"),
                );
                return None;
            }
            V::DoubleQuotedString(s) => {
                self.problem(
                    span,
                    format!("\"{s}\" is a double-quoted string: use single quotes for text ('{s}'), double quotes only for identifiers"),
                );
                return None;
            }
            other => {
                self.problem(span, format!("literal `{other}` is not allowed"));
                return None;
            }
        };
        Some(Expr::Literal(value))
    }

    fn compare(&self, op: CmpOp, l: Expr, r: Expr, scope: &Scope<'_>) -> Expr {
        let aff = sqlite::comparison_affinity(l.affinity(scope.table), r.affinity(scope.table));
        Expr::Compare {
            op,
            left: Box::new(l),
            right: Box::new(r),
            aff,
        }
    }

    fn binary(
        &mut self,
        e: &ast::Expr,
        left: &ast::Expr,
        op: &BinaryOperator,
        right: &ast::Expr,
        scope: &Scope<'_>,
    ) -> Option<Expr> {
        use BinaryOperator as B;
        let allowed = matches!(
            op,
            B::And
                | B::Or
                | B::Eq
                | B::NotEq
                | B::Lt
                | B::LtEq
                | B::Gt
                | B::GtEq
                | B::Plus
                | B::Minus
                | B::Multiply
                | B::Divide
                | B::Modulo
                | B::StringConcat
                | B::Is
                | B::IsNot
        );
        if !allowed {
            self.problem(e.span(), format!("operator `{op}` is not allowed"));
            return None;
        }
        let (l, r) = (self.expr(left, scope), self.expr(right, scope));
        let (l, r) = (l?, r?);
        let arith = |o: ArithOp, l: Expr, r: Expr| Expr::Arith {
            op: o,
            left: Box::new(l),
            right: Box::new(r),
        };
        Some(match op {
            B::And => flatten(true, l, r),
            B::Or => flatten(false, l, r),
            B::Eq => self.compare(CmpOp::Eq, l, r, scope),
            B::NotEq => self.compare(CmpOp::Ne, l, r, scope),
            B::Lt => self.compare(CmpOp::Lt, l, r, scope),
            B::LtEq => self.compare(CmpOp::Le, l, r, scope),
            B::Gt => self.compare(CmpOp::Gt, l, r, scope),
            B::GtEq => self.compare(CmpOp::Ge, l, r, scope),
            B::Is => self.compare(CmpOp::Is, l, r, scope),
            B::IsNot => self.compare(CmpOp::IsNot, l, r, scope),
            B::Plus => arith(ArithOp::Add, l, r),
            B::Minus => arith(ArithOp::Sub, l, r),
            B::Multiply => arith(ArithOp::Mul, l, r),
            B::Divide => arith(ArithOp::Div, l, r),
            B::Modulo => arith(ArithOp::Rem, l, r),
            B::StringConcat => Expr::Concat(Box::new(l), Box::new(r)),
            _ => unreachable!("checked above"),
        })
    }

    fn function(&mut self, e: &ast::Expr, f: &ast::Function, scope: &Scope<'_>) -> Option<Expr> {
        let parts: Vec<String> = object_name_parts(&f.name)
            .into_iter()
            .map(|p| p.to_ascii_lowercase())
            .collect();
        let name = parts.join(".");
        if f.filter.is_some() || f.over.is_some() || !f.within_group.is_empty() {
            self.problem(
                e.span(),
                format!("`{e}`: aggregate and window functions are not allowed"),
            );
            return None;
        }
        let args: Vec<&ast::Expr> = match &f.args {
            FunctionArguments::None => vec![],
            FunctionArguments::List(list) => {
                if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
                    self.problem(e.span(), format!("`{e}`: aggregate forms are not allowed"));
                    return None;
                }
                let mut out = Vec::new();
                for a in &list.args {
                    match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => out.push(x),
                        _ => {
                            self.problem(
                                e.span(),
                                format!("`{e}`: only plain arguments are allowed"),
                            );
                            return None;
                        }
                    }
                }
                out
            }
            FunctionArguments::Subquery(_) => {
                self.problem(
                    e.span(),
                    format!("`{e}`: subquery arguments are not allowed"),
                );
                return None;
            }
        };
        let arity = |s: &mut Self, want: &str, ok: bool| -> bool {
            if !ok {
                s.problem(
                    e.span(),
                    format!("{name}() takes {want}, got {}", args.len()),
                );
            }
            ok
        };
        match name.as_str() {
            "auth.uid" => {
                arity(self, "no arguments", args.is_empty()).then(|| Expr::Claim("sub".into()))
            }
            "auth.role" => {
                arity(self, "no arguments", args.is_empty()).then(|| Expr::Claim("role".into()))
            }
            "auth.claim" => {
                if !arity(
                    self,
                    "one argument, the claim's name in quotes",
                    args.len() == 1,
                ) {
                    return None;
                }
                match args[0] {
                    ast::Expr::Value(v) => match &v.value {
                        ast::Value::SingleQuotedString(s) => Some(Expr::Claim(s.clone())),
                        _ => {
                            self.problem(v.span, "auth.claim() takes the claim's name as a quoted string, e.g. auth.claim('tenant_id')");
                            None
                        }
                    },
                    other => {
                        self.problem(other.span(), "auth.claim() takes the claim's name as a quoted string, e.g. auth.claim('tenant_id')");
                        None
                    }
                }
            }
            "lower" | "upper" | "length" => {
                if !arity(self, "one argument", args.len() == 1) {
                    return None;
                }
                let x = Box::new(self.expr(args[0], scope)?);
                Some(match name.as_str() {
                    "lower" => Expr::Lower(x),
                    "upper" => Expr::Upper(x),
                    _ => Expr::Length(x),
                })
            }
            "coalesce" | "ifnull" => {
                let ok = if name == "ifnull" {
                    arity(self, "two arguments", args.len() == 2)
                } else {
                    arity(self, "at least two arguments", args.len() >= 2)
                };
                if !ok {
                    return None;
                }
                let items: Vec<Option<Expr>> = args.iter().map(|a| self.expr(a, scope)).collect();
                Some(Expr::Coalesce(
                    items.into_iter().collect::<Option<Vec<_>>>()?,
                ))
            }
            _ => {
                let why = match name.as_str() {
                    "random" | "randomblob" | "changes" | "last_insert_rowid" | "total_changes"
                    | "date" | "time" | "datetime" | "julianday" | "unixepoch" | "strftime"
                    | "current_timestamp" | "now" => " (its result is not a function of the row)",
                    "load_extension" | "readfile" | "writefile" | "edit" | "fts3_tokenizer" => {
                        " (it has side effects)"
                    }
                    _ => "",
                };
                self.problem(
                    f.name.span(),
                    format!("function `{name}()` is not allowed{why}: allowed functions are {ALLOWED_FUNCTIONS}"),
                );
                None
            }
        }
    }

    /// Refuses every comparison (`=`, `<`, `IN`, `BETWEEN`, `CASE x WHEN`)
    /// of a column of `table` (or of a subquery's table) declared with a
    /// collation other than BINARY: SQLite compares it under that collation
    /// (`'ACME' = 'acme'` under NOCASE), and the evaluator that matches
    /// changed rows and judges writes compares bytes. One reading for both,
    /// or none: such a schema gets a clear error, never two answers.
    pub(crate) fn check_collations(&mut self, e: &Expr, table: usize, span: Span) {
        let mut stack = vec![(e, table)];
        while let Some((e, t)) = stack.pop() {
            let collated = |x: &Expr| match x {
                Expr::Column(c) => {
                    self.schema.tables[t].columns[*c]
                        .collation
                        .as_deref()
                        .map(|coll| {
                            (
                                self.schema.tables[t].columns[*c].name.clone(),
                                coll.to_owned(),
                            )
                        })
                }
                _ => None,
            };
            let operands: Vec<&Expr> = match e {
                Expr::Compare { left, right, .. } => vec![left, right],
                Expr::InList { expr, list, .. } => {
                    let mut v = vec![expr.as_ref()];
                    v.extend(list.iter());
                    v
                }
                Expr::Between {
                    expr, low, high, ..
                } => vec![expr, low, high],
                Expr::Case {
                    operand: Some(op),
                    whens,
                    ..
                } => {
                    let mut v = vec![op.as_ref()];
                    v.extend(whens.iter().map(|(w, _, _)| w));
                    v
                }
                Expr::InSubquery {
                    expr,
                    table: sub,
                    column,
                    filter,
                    ..
                } => {
                    if let Some(coll) = &self.schema.tables[*sub].columns[*column].collation {
                        let name = format!(
                            "{}.{}",
                            self.schema.tables[*sub].name,
                            self.schema.tables[*sub].columns[*column].name
                        );
                        self.collation_problem(span, &name, coll);
                    }
                    if let Some(f) = filter {
                        stack.push((f, *sub));
                    }
                    vec![expr.as_ref()]
                }
                _ => vec![],
            };
            let found: Vec<(String, String)> =
                operands.iter().filter_map(|x| collated(x)).collect();
            for (name, coll) in found {
                let name = format!("{}.{name}", self.schema.tables[t].name);
                self.collation_problem(span, &name, &coll);
            }
            for c in e.children() {
                stack.push((c, t));
            }
        }
    }

    fn collation_problem(&mut self, span: Span, column: &str, collation: &str) {
        self.problem(
            span,
            format!(
                "column `{column}` is declared COLLATE {collation}: tenantsync compares values as bytes (BINARY) wherever it evaluates a condition, so a comparison of this column could match differently in a snapshot and in a live change. Declare the column without COLLATE (store the values normalized, e.g. lower-cased), or compare `lower({column})`"
            ),
        );
    }

    /// `SELECT column FROM crr_table [WHERE ...]`, uncorrelated.
    fn subquery(&mut self, q: &ast::Query) -> Option<(usize, usize, Option<Expr>)> {
        let span = q.span();
        let refuse = |s: &mut Self, what: &str| {
            s.problem(
                span,
                format!("{what}: a subquery must be `SELECT column FROM crr_table [WHERE ...]`"),
            );
            None
        };
        if q.with.is_some()
            || q.order_by.is_some()
            || q.limit_clause.is_some()
            || q.fetch.is_some()
            || !q.locks.is_empty()
        {
            return refuse(
                self,
                "WITH, ORDER BY, LIMIT and locking clauses are not allowed in a subquery",
            );
        }
        let SetExpr::Select(sel) = q.body.as_ref() else {
            return refuse(self, "set operations are not allowed in a subquery");
        };
        let (table_index, alias) = self.single_table(sel, "a subquery")?;
        let scope = Scope::new(self.schema, table_index, alias.as_deref());
        if sel.projection.len() != 1 {
            return refuse(self, "the subquery must select exactly one column");
        }
        let column = match &sel.projection[0] {
            SelectItem::UnnamedExpr(x) => match self.expr(x, &scope)? {
                Expr::Column(c) => c,
                _ => return refuse(self, "the subquery must select a plain column"),
            },
            _ => return refuse(self, "the subquery must select exactly one plain column"),
        };
        let filter = match &sel.selection {
            Some(w) => Some(self.expr(w, &scope)?),
            None => None,
        };
        self.subqueries.push((table_index, span));
        Some((table_index, column, filter))
    }

    /// Checks a SELECT names one CRR table and nothing else the subset
    /// excludes; returns the table index and alias.
    pub(crate) fn single_table(
        &mut self,
        sel: &ast::Select,
        what: &str,
    ) -> Option<(usize, Option<String>)> {
        let span = sel.span();
        let refuse = |s: &mut Self, m: String| {
            s.problem(span, m);
        };
        if sel.distinct.is_some() || sel.top.is_some() || sel.into.is_some() {
            refuse(
                self,
                format!("DISTINCT, TOP and INTO are not allowed in {what}"),
            );
            return None;
        }
        let group_by_empty = match &sel.group_by {
            ast::GroupByExpr::Expressions(v, m) => v.is_empty() && m.is_empty(),
            ast::GroupByExpr::All(_) => false,
        };
        if !group_by_empty
            || sel.having.is_some()
            || !sel.named_window.is_empty()
            || sel.qualify.is_some()
            || !sel.lateral_views.is_empty()
            || sel.prewhere.is_some()
            || !sel.connect_by.is_empty()
            || !sel.cluster_by.is_empty()
            || !sel.distribute_by.is_empty()
            || !sel.sort_by.is_empty()
        {
            refuse(
                self,
                format!("GROUP BY, HAVING and WINDOW are not allowed in {what}"),
            );
            return None;
        }
        if sel.from.len() != 1 || !sel.from[0].joins.is_empty() {
            refuse(
                self,
                format!("{what} must read exactly one table (no joins)"),
            );
            return None;
        }
        match &sel.from[0].relation {
            TableFactor::Table {
                name, alias, args, ..
            } if args.is_none() => {
                let t = self.crr_table(name, what)?;
                Some((t, alias.as_ref().map(|a| ident_name(&a.name))))
            }
            other => {
                self.problem(
                    other.span(),
                    format!("{what} must read a table, not `{other}`"),
                );
                None
            }
        }
    }
}

fn flatten(and: bool, l: Expr, r: Expr) -> Expr {
    let mut items = Vec::new();
    for x in [l, r] {
        match (and, x) {
            (true, Expr::And(v)) | (false, Expr::Or(v)) => items.extend(v),
            (_, other) => items.push(other),
        }
    }
    if and {
        Expr::And(items)
    } else {
        Expr::Or(items)
    }
}

/// The bytes of an `X'..'` literal's digits; `None` unless they are an even
/// number of ASCII hex digits (any other character, multi-byte ones
/// included, is refused, never sliced through).
fn hex_decode(h: &str) -> Option<Vec<u8>> {
    let digits = h.as_bytes();
    if !digits.len().is_multiple_of(2) || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
        })
        .collect()
}
