//! Policy files: parsing `CREATE POLICY` statements, validating them against
//! the schema, and detecting cycles through subqueries.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sqlparser::ast::{self, CreatePolicyCommand, CreatePolicyType, Spanned, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Span, Token};

use crate::diag::Diagnostics;
use crate::expr::Expr;
use crate::lower::{Lowerer, Scope};
use crate::schema::Schema;

/// PERMISSIVE policies OR together; RESTRICTIVE ones AND on top.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Grants access (ORed with the other permissive policies).
    Permissive,
    /// Restricts access (ANDed); grants nothing alone.
    Restrictive,
}

/// The command a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyCommand {
    /// Every command.
    All,
    /// Reading rows (subscriptions).
    Select,
    /// New rows.
    Insert,
    /// Changed rows.
    Update,
    /// Removed rows.
    Delete,
}

impl PolicyCommand {
    /// `SELECT`, `INSERT`...
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyCommand::All => "ALL",
            PolicyCommand::Select => "SELECT",
            PolicyCommand::Insert => "INSERT",
            PolicyCommand::Update => "UPDATE",
            PolicyCommand::Delete => "DELETE",
        }
    }

    /// Whether a policy for `self` applies to `cmd`.
    pub fn covers(self, cmd: PolicyCommand) -> bool {
        self == PolicyCommand::All || self == cmd
    }
}

/// One validated policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Its name (unique per table).
    pub name: String,
    /// Index of its table in the schema.
    pub table: usize,
    /// The table's name.
    pub table_name: String,
    /// Permissive or restrictive.
    pub kind: PolicyKind,
    /// The command it applies to.
    pub command: PolicyCommand,
    /// The roles it applies to; empty means `public` (every role).
    pub roles: Vec<String>,
    /// USING: which existing rows it covers.
    pub using: Option<Expr>,
    /// WITH CHECK: which resulting rows it accepts.
    pub with_check: Option<Expr>,
    /// 1-based line of the statement in its file.
    pub line: usize,
    /// 1-based column of the statement's first character.
    pub column: usize,
    /// The statement as written (for explain).
    pub text: String,
}

impl Policy {
    /// Whether the policy applies to an identity with this role claim:
    /// `TO public` (or no `TO`) matches every identity, `TO r` only a token
    /// whose `role` claim is the string `r`.
    pub fn applies_to_role(&self, role: Option<&str>) -> bool {
        self.roles.is_empty() || role.is_some_and(|r| self.roles.iter().any(|x| x == r))
    }

    /// The expression guarding existing rows for `cmd`: USING.
    pub fn using_expr(&self) -> Option<&Expr> {
        self.using.as_ref()
    }

    /// The expression guarding resulting rows: WITH CHECK, or USING when the
    /// policy has no WITH CHECK (as PostgreSQL does for ALL and UPDATE).
    pub fn check_expr(&self) -> Option<&Expr> {
        self.with_check.as_ref().or(self.using.as_ref())
    }
}

/// A parsed and validated policy file.
#[derive(Clone, Debug)]
pub struct PolicySet {
    pub(crate) schema: Arc<Schema>,
    pub(crate) policies: Vec<Policy>,
    /// The file's name and text (for diagnostics after the parse).
    pub(crate) file: Arc<str>,
    pub(crate) source: Arc<str>,
}

impl PolicySet {
    /// The name of the file it was read from.
    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// The text it was read from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Parses and validates a policy file against a schema. Every problem is
    /// reported, not only the first.
    pub fn parse(file_name: &str, source: &str, schema: &Schema) -> Result<PolicySet, Diagnostics> {
        let mut diags = Diagnostics::new(file_name, source);
        let mut policies = Vec::new();
        let mut edges: Vec<Edge> = Vec::new();
        let dialect = PostgreSqlDialect {};
        if let Some((at, message)) = crate::limits::too_complex(&dialect, source) {
            diags.push(Span::new(at, at), message);
            return Err(diags);
        }
        let mut parser = match Parser::new(&dialect).try_with_sql(source) {
            Ok(p) => p,
            Err(e) => {
                let (loc, msg) = split_parser_error(&e);
                diags.push(Span::new(loc, loc), msg);
                return Err(diags);
            }
        };
        loop {
            while parser.consume_token(&Token::SemiColon) {}
            let first = parser.peek_token();
            if first.token == Token::EOF {
                break;
            }
            let start = first.span.start;
            match parser.parse_statement() {
                Ok(stmt) => {
                    let end_tok = parser.peek_token();
                    let stmt_span = Span::new(start, end_tok.span.start);
                    let text = slice(source, &diags, start, end_tok.span.start);
                    match stmt {
                        Statement::CreatePolicy(cp) => {
                            if let Some(p) =
                                lower_policy(&cp, schema, &mut diags, stmt_span, text, &mut edges)
                            {
                                if policies.iter().any(|q: &Policy| {
                                    q.table == p.table && q.name.eq_ignore_ascii_case(&p.name)
                                }) {
                                    diags.push(
                                        cp.name.span,
                                        format!(
                                            "policy `{}` is defined twice on table `{}`",
                                            p.name, p.table_name
                                        ),
                                    );
                                } else {
                                    policies.push(p);
                                }
                            }
                        }
                        other => {
                            let kw = other.to_string();
                            let kw: String =
                                kw.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                            diags.push(
                                Span::new(start, start),
                                format!(
                                    "only CREATE POLICY statements are allowed in a policy file, found `{kw}`"
                                ),
                            );
                        }
                    }
                    let next = parser.peek_token();
                    if next.token != Token::SemiColon && next.token != Token::EOF {
                        diags.push(
                            next.span,
                            format!("expected `;` after the statement, found `{}`", next.token),
                        );
                        skip_statement(&mut parser);
                    }
                }
                Err(e) => {
                    let (loc, msg) = split_parser_error(&e);
                    let loc = if loc.line == 0 { start } else { loc };
                    diags.push(Span::new(loc, loc), format!("syntax error: {msg}"));
                    skip_statement(&mut parser);
                }
            }
        }
        detect_cycles(&policies, &edges, schema, &mut diags);
        if diags.is_empty() {
            Ok(PolicySet {
                schema: Arc::new(schema.clone()),
                policies,
                file: Arc::from(file_name),
                source: Arc::from(source),
            })
        } else {
            diags.sort();
            Err(diags)
        }
    }

    /// An empty policy set: every CRR denies everything.
    pub fn empty(schema: &Schema) -> PolicySet {
        PolicySet {
            schema: Arc::new(schema.clone()),
            policies: Vec::new(),
            file: Arc::from(""),
            source: Arc::from(""),
        }
    }

    /// The policies, in file order.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// The schema the set was validated against.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The policies of a table, in file order.
    pub fn for_table(&self, table: usize) -> impl Iterator<Item = &Policy> {
        self.policies.iter().filter(move |p| p.table == table)
    }
}

fn slice(source: &str, diags: &Diagnostics, a: Location, b: Location) -> String {
    let (x, y) = (diags.offset(a), diags.offset(b));
    source
        .get(x..y.max(x))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn skip_statement(parser: &mut Parser<'_>) {
    loop {
        let t = parser.peek_token();
        if t.token == Token::EOF {
            return;
        }
        parser.next_token();
        if t.token == Token::SemiColon {
            return;
        }
    }
}

/// sqlparser puts the position into the message: "... at Line: 3, Column: 7".
pub(crate) fn split_parser_error(e: &ParserError) -> (Location, String) {
    let msg = match e {
        ParserError::TokenizerError(m) | ParserError::ParserError(m) => m.clone(),
        ParserError::RecursionLimitExceeded => "expression nested too deeply".to_owned(),
    };
    if let Some(i) = msg.rfind(" at Line: ") {
        let tail = &msg[i + " at Line: ".len()..];
        if let Some((l, c)) = tail.split_once(", Column: ")
            && let (Ok(l), Ok(c)) = (l.trim().parse::<u64>(), c.trim().parse::<u64>())
        {
            return (Location::new(l, c), msg[..i].to_owned());
        }
    }
    (Location::new(0, 0), msg)
}

/// A policy on `from` that reads `to` through a subquery.
struct Edge {
    from: usize,
    to: usize,
    policy: String,
    span: Span,
    select: bool,
}

fn lower_policy(
    cp: &ast::CreatePolicy,
    schema: &Schema,
    diags: &mut Diagnostics,
    stmt_span: Span,
    text: String,
    edges: &mut Vec<Edge>,
) -> Option<Policy> {
    let mut lw = Lowerer::new(schema, stmt_span);
    let table = lw.crr_table(&cp.table_name, "a policy");
    let command = match cp.command {
        None | Some(CreatePolicyCommand::All) => PolicyCommand::All,
        Some(CreatePolicyCommand::Select) => PolicyCommand::Select,
        Some(CreatePolicyCommand::Insert) => PolicyCommand::Insert,
        Some(CreatePolicyCommand::Update) => PolicyCommand::Update,
        Some(CreatePolicyCommand::Delete) => PolicyCommand::Delete,
    };
    let kind = match cp.policy_type {
        Some(CreatePolicyType::Restrictive) => PolicyKind::Restrictive,
        _ => PolicyKind::Permissive,
    };
    let mut roles = Vec::new();
    for o in cp.to.iter().flatten() {
        match o {
            ast::Owner::Ident(id) => {
                let r = if id.quote_style.is_some() {
                    id.value.clone()
                } else {
                    id.value.to_ascii_lowercase()
                };
                if r == "public" {
                    roles.clear();
                    roles.push(r);
                } else if !roles.contains(&r) {
                    roles.push(r);
                }
            }
            other => lw.problem(
                stmt_span,
                format!("`TO {other}` is not supported: name roles, matched against the token's `role` claim (or `public`)"),
            ),
        }
    }
    if roles.iter().any(|r| r == "public") {
        roles.clear();
    }
    // PostgreSQL's rules on which clauses each command takes.
    match command {
        PolicyCommand::Select | PolicyCommand::Delete => {
            if let Some(w) = &cp.with_check {
                lw.problem(
                    w.span(),
                    format!(
                        "WITH CHECK cannot be applied to a FOR {} policy: it has no resulting row, use USING",
                        command.as_str()
                    ),
                );
            }
            if cp.using.is_none() {
                lw.problem(
                    stmt_span,
                    format!("a FOR {} policy needs USING (...)", command.as_str()),
                );
            }
        }
        PolicyCommand::Insert => {
            if let Some(u) = &cp.using {
                lw.problem(
                    u.span(),
                    "USING cannot be applied to a FOR INSERT policy: there is no existing row, use WITH CHECK",
                );
            }
            if cp.with_check.is_none() {
                lw.problem(stmt_span, "a FOR INSERT policy needs WITH CHECK (...)");
            }
        }
        PolicyCommand::Update | PolicyCommand::All => {
            if cp.using.is_none() {
                lw.problem(
                    stmt_span,
                    format!(
                        "a FOR {} policy needs USING (...) (WITH CHECK defaults to it)",
                        command.as_str()
                    ),
                );
            }
        }
    }
    let (mut using, mut with_check) = (None, None);
    if let Some(t) = table {
        let scope = Scope::new(schema, t, None);
        using = cp.using.as_ref().and_then(|u| lw.expr(u, &scope));
        with_check = cp.with_check.as_ref().and_then(|w| lw.expr(w, &scope));
        for e in using.iter().chain(with_check.iter()) {
            lw.check_collations(e, t, stmt_span);
        }
    }
    let name = cp.name.value.clone();
    for (to, span) in &lw.subqueries {
        if let Some(from) = table {
            edges.push(Edge {
                from,
                to: *to,
                policy: name.clone(),
                span: *span,
                select: command.covers(PolicyCommand::Select),
            });
        }
    }
    let ok = lw.problems.is_empty();
    for p in lw.problems {
        diags.push(p.span, p.message);
    }
    let table = table?;
    if !ok {
        return None;
    }
    Some(Policy {
        name,
        table,
        table_name: schema.tables[table].name.clone(),
        kind,
        command,
        roles,
        using,
        with_check,
        line: stmt_span.start.line as usize,
        column: stmt_span.start.column as usize,
        text,
    })
}

/// Reading table A applies A's SELECT policies; one that reads B through a
/// subquery applies B's SELECT policies, and so on. A cycle would recurse
/// forever (PostgreSQL: "infinite recursion detected in policy").
fn detect_cycles(policies: &[Policy], edges: &[Edge], schema: &Schema, diags: &mut Diagnostics) {
    let _ = policies;
    let select_edges: Vec<&Edge> = edges.iter().filter(|e| e.select).collect();
    let mut graph: BTreeMap<usize, Vec<&Edge>> = BTreeMap::new();
    for e in &select_edges {
        graph.entry(e.from).or_default().push(e);
    }
    let mut reported: BTreeSet<Vec<usize>> = BTreeSet::new();
    for start in graph.keys().copied().collect::<Vec<_>>() {
        // DFS for a path back to `start`.
        let mut stack: Vec<(usize, Vec<&Edge>)> = vec![(start, vec![])];
        let mut seen = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for e in graph.get(&node).into_iter().flatten() {
                let mut p = path.clone();
                p.push(e);
                if e.to == start {
                    let mut key: Vec<usize> = p.iter().map(|e| e.from).collect();
                    key.sort();
                    if reported.insert(key) {
                        let mut names = vec![schema.tables[start].name.clone()];
                        let mut via = Vec::new();
                        for e in &p {
                            names.push(schema.tables[e.to].name.clone());
                            via.push(format!(
                                "`{}` on `{}`",
                                e.policy, schema.tables[e.from].name
                            ));
                        }
                        let last = p.last().expect("non-empty path");
                        diags.push(
                            last.span,
                            format!(
                                "policies form a cycle through subqueries: {} (via {}); reading one of these tables would recurse forever",
                                names.join(" -> "),
                                via.join(", ")
                            ),
                        );
                    }
                } else if seen.insert(e.to) {
                    stack.push((e.to, p));
                }
            }
        }
    }
}
