//! Warnings about policies that are valid but probably not what a
//! multi-tenant schema wants: [`PolicySet::tenant_warnings`].
//!
//! A table with the tenant column (`tenant_id` by default) holds several
//! tenants' rows; a policy on it that does not compare that column with the
//! token's tenant claim grants across tenants whenever its other condition
//! matches rows of another tenant (`owner = auth.uid()` does, for a user
//! named alike in two tenants). The check is syntactic and conservative: a
//! policy passes when each of its expressions has, as a top-level `AND`
//! term, `<tenant column> = auth.claim('<tenant claim>')` (either side), or
//! when a RESTRICTIVE policy on the table covering its command and roles
//! has that term. Anything else (a tenant checked through a subquery, a
//! table meant to be shared) is silenced with a comment line
//! `-- tenantsync: cross-tenant` inside the policy or right above it.

use crate::diag::Diagnostics;
use crate::expr::{CmpOp, Expr};
use crate::policy::{Policy, PolicyCommand, PolicyKind, PolicySet};

/// The comment that silences the warning for one policy.
pub const SILENCE: &str = "tenantsync: cross-tenant";

impl PolicySet {
    /// One warning (`file:line:col`, with the source line) per policy on a
    /// table that has `tenant_column` whose expressions do not constrain
    /// it to the `tenant_claim` of the token (see the module docs). `None`
    /// when there is nothing to warn about.
    pub fn tenant_warnings(&self, tenant_column: &str, tenant_claim: &str) -> Option<Diagnostics> {
        let mut d = Diagnostics::new(&self.file, &self.source);
        for p in &self.policies {
            let table = &self.schema.tables[p.table];
            let Some(col) = table.column_index(tenant_column) else {
                continue;
            };
            if self.silenced(p) || self.constrained(p, col, tenant_claim) {
                continue;
            }
            let at = sqlparser::tokenizer::Location::new(p.line as u64, p.column as u64);
            d.push(
                sqlparser::tokenizer::Span::new(at, at),
                format!(
                    "warning: policy `{}` on `{}` does not constrain `{}`: it grants rows of every tenant its condition matches. Add `{} = auth.claim('{}')` to it (or a RESTRICTIVE policy that does), or say it is meant with a comment `-- {SILENCE}`",
                    p.name,
                    table.name,
                    table.columns[col].name,
                    table.columns[col].name,
                    tenant_claim
                ),
            );
        }
        (!d.items.is_empty()).then_some(d)
    }

    /// Per table of the schema (by index): whether a token reads only rows
    /// whose `tenant_column` is its `tenant_claim`. True when the table has
    /// the column and every permissive policy granting SELECT on it has the
    /// pin (module docs) as a top-level term of its USING, or a RESTRICTIVE
    /// SELECT policy covering its roles has; a silencing comment does not
    /// count. (A table no policy lets anyone read is scoped too: nothing of
    /// it is read.) Subqueries need no pin: they read under their table's
    /// own policies. The server wakes a tenant's long-polls only for
    /// changes of its own rows in such tables.
    pub fn tenant_scoped_reads(&self, tenant_column: &str, tenant_claim: &str) -> Vec<bool> {
        let reads = |c: PolicyCommand| matches!(c, PolicyCommand::All | PolicyCommand::Select);
        let pinned =
            |e: Option<&Expr>, col: usize| e.is_some_and(|e| pins_tenant(e, col, tenant_claim));
        self.schema
            .tables
            .iter()
            .enumerate()
            .map(|(t, table)| {
                let Some(col) = table.column_index(tenant_column) else {
                    return false;
                };
                let restricted = |p: &Policy| {
                    self.policies.iter().any(|r| {
                        r.kind == PolicyKind::Restrictive
                            && r.table == t
                            && reads(r.command)
                            && (r.roles.is_empty()
                                || (!p.roles.is_empty()
                                    && p.roles.iter().all(|x| r.roles.contains(x))))
                            && pinned(r.using_expr(), col)
                    })
                };
                self.policies
                    .iter()
                    .filter(|p| {
                        p.table == t && p.kind == PolicyKind::Permissive && reads(p.command)
                    })
                    .all(|p| pinned(p.using_expr(), col) || restricted(p))
            })
            .collect()
    }

    fn silenced(&self, p: &Policy) -> bool {
        if p.text.contains(SILENCE) {
            return true;
        }
        // The comment lines right above the statement.
        self.source
            .lines()
            .take(p.line.saturating_sub(1))
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .take_while(|l| l.trim_start().starts_with("--"))
            .any(|l| l.contains(SILENCE))
    }

    fn constrained(&self, p: &Policy, col: usize, claim: &str) -> bool {
        let has = |e: Option<&Expr>| e.is_none_or(|e| pins_tenant(e, col, claim));
        if has(p.using.as_ref()) && has(p.with_check.as_ref()) {
            return true;
        }
        self.policies.iter().any(|r| {
            r.kind == PolicyKind::Restrictive
                && r.table == p.table
                && (r.command == PolicyCommand::All || r.command == p.command)
                && (r.roles.is_empty()
                    || (!p.roles.is_empty() && p.roles.iter().all(|x| r.roles.contains(x))))
                && has(r.using_expr())
                && has(r.check_expr())
        })
    }
}

/// Whether `e` is, or has as a top-level AND term, `column = claim`.
fn pins_tenant(e: &Expr, col: usize, claim: &str) -> bool {
    match e {
        Expr::And(terms) => terms.iter().any(|t| pins_tenant(t, col, claim)),
        Expr::Compare {
            op: CmpOp::Eq | CmpOp::Is,
            left,
            right,
            ..
        } => matches!(
            (left.as_ref(), right.as_ref()),
            (Expr::Column(c), Expr::Claim(n)) | (Expr::Claim(n), Expr::Column(c))
                if *c == col && n == claim
        ),
        _ => false,
    }
}
