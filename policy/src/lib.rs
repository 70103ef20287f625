//! tenantsync-policy: row-level-security policies in PostgreSQL's `CREATE POLICY`
//! dialect, subscription rewriting and write checks. Pure: no IO, no SQLite
//! connection, no network, no async.
//!
//! Module map:
//! - [`schema`]: the schema description the engine works from ([`Schema`],
//!   [`TableSchema`], [`Affinity`]).
//! - [`identity`]: [`Identity`], the claims of a verified token.
//! - `policy`: [`PolicySet::parse`] reads and validates a policy file,
//!   reporting every problem as [`Diagnostics`] (`diag`).
//! - `lower`: sqlparser AST -> [`Expr`], refusing everything outside the
//!   allowed subset.
//! - `lint`: [`PolicySet::tenant_warnings`], policies on a tenant's table
//!   that do not constrain its tenant column.
//! - `limits`: how complex one statement may be, checked on its tokens
//!   before parsing (deep trees would overflow the stack).
//! - `expr`: the expression tree, its evaluator (SQLite semantics) and SQL
//!   printer; [`MembershipSet`], [`MembershipResults`].
//! - `sqlite`: SQLite's value semantics (ordering, affinity, arithmetic,
//!   LIKE, text forms) used by the evaluator.
//! - `engine`: [`Engine`]: [`Engine::rewrite`] a subscription into an
//!   [`EffectiveQuery`], [`Engine::write_plan`] / [`WritePlan::check`] for
//!   pushed rows, [`Engine::replace_policies`].
//!
//! See docs/POLICY.md for the policy language and docs/arch/policy.md for
//! the design.

#![warn(missing_docs)]

mod diag;
mod engine;
mod expr;
pub mod identity;
mod limits;
mod lint;
mod lower;
mod policy;
pub mod schema;
mod sqlite;

pub use diag::{Diagnostic, Diagnostics};
pub use engine::{
    EffectiveQuery, Engine, IndexAtom, IndexKey, Membership, PolicyChange, Predicate, QueryError,
    RowChange, ViewKey, WriteCommand, WriteDecision, WriteError, WritePlan, membership_probe_key,
};
pub use expr::{CmpOp, Expr, MembershipId, MembershipResults, MembershipSet, Truth};
pub use identity::{Identity, IdentityError};
pub use limits::{MAX_LIKE_PATTERN_BYTES, MAX_LITERAL_BYTES, MAX_QUERY_VALUES};
pub use policy::{Policy, PolicyCommand, PolicyKind, PolicySet};
pub use schema::{Affinity, ColumnSchema, Schema, TableSchema};
pub use sqlite::{ArithOp, real_to_text};

// The server shares engines, views and plans across threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<EffectiveQuery>();
    assert_send_sync::<WritePlan>();
    assert_send_sync::<MembershipResults>();
};
