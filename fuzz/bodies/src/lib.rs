//! tenantsync-fuzz-bodies: the bodies of the cargo-fuzz targets in `fuzz/`,
//! as plain functions. Each `run(data)` decodes its input, exercises one
//! surface and panics (with what went wrong) when a property fails; the
//! cargo-fuzz binaries in `fuzz/fuzz_targets/` only call it, and the
//! workspace test `tests/replay.rs` of this crate calls it on every input
//! kept in `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/`, so a
//! bug a fuzzer found stays fixed without cargo-fuzz.
//!
//! Module map:
//! - [`protocol_decode`]: JSON into the protocol's messages and HTTP bodies;
//!   what decodes re-encodes to text that decodes to the same value.
//! - [`pk_value`]: packed primary keys (`PackedPk`) and `Value`'s JSON and
//!   SQL-literal forms; pack/unpack/canonical laws.
//! - [`policy_parse`]: policy files through `PolicySet::parse` on several
//!   schemas; diagnostics point inside the file, accepted policies give SQL
//!   that SQLite runs.
//! - [`rewrite`]: subscription queries and claims through `Engine::rewrite`;
//!   the rewritten SQL selects exactly the rows the reference evaluator
//!   says the identity may see, on a real core database.
//! - [`changes_insert`]: arbitrary `crsql_changes` rows through SQL and
//!   `CrrConnection::apply`; errors change nothing, merges are idempotent,
//!   both surfaces agree.
//! - `input`: [`input::Input`], the byte reader the structured targets decode
//!   their inputs with.
//!
//! See docs/TESTING.md, "Fuzzing", for what each target proves and how to
//! run it.

pub mod changes_insert;
pub mod input;
pub mod pk_value;
pub mod policy_parse;
pub mod protocol_decode;
pub mod rewrite;
mod sql;

/// A target's body: panics when a property fails on the input.
pub type Body = fn(&[u8]);

/// Every target by name, as `fuzz/run.sh`, the replay test and the
/// cargo-fuzz binaries name them.
pub const TARGETS: &[(&str, Body)] = &[
    ("protocol_decode", protocol_decode::run),
    ("pk_value", pk_value::run),
    ("policy_parse", policy_parse::run),
    ("rewrite", rewrite::run),
    ("changes_insert", changes_insert::run),
];
