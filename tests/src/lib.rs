//! Shared helpers for the cross-crate integration tests in `tests/tests/`.
//!
//! - [`crr`]: helpers for the core engine tests (`core_*.rs`): databases with
//!   fixed site ids, compact dumps of `crsql_changes`, SQL and typed syncs.

pub mod crr;
