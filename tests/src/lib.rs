//! Shared helpers for the cross-crate integration tests in `tests/tests/`.
//!
//! Module map:
//! - [`crr`]: helpers for the core engine tests (`core_*.rs`): databases with
//!   fixed site ids, compact dumps of `crsql_changes`, SQL and typed syncs.
//! - [`crsqlite`]: a real cr-sqlite 0.16.0 peer (`@vlcn.io/crsqlite-wasm` under
//!   Node, `tests/interop/peer.mjs`) driven over JSON lines: [`RealCrsqlite`]
//!   (the process) and [`RealPeer`] (one database in it).
//! - [`peer`]: [`SqlPeer`], what both kinds of peer (real cr-sqlite and a
//!   tenantsync-core connection) do through SQL, [`Dump`], a canonical typed
//!   dump of a peer's CRR tables and clocks for comparing peers, and
//!   [`CrPeer`], the change feed and merges of either kind of peer.
//! - [`core_peer`]: [`core_peer::CorePeer`], a tenantsync-core database as a
//!   [`CrPeer`] (typed API or SQL).
//! - [`fuzz`]: the seeded random convergence run of the interop test.
//! - [`postgres`]: [`postgres::PgServer`], a real PostgreSQL 15 cluster on
//!   loopback for the differential test of write decisions.

pub mod core_peer;
pub mod crr;
pub mod crsqlite;
pub mod fuzz;
pub mod peer;
pub mod postgres;

pub use crsqlite::{RealCrsqlite, RealPeer};
pub use peer::{CrPeer, Dump, SqlPeer, TieRule, dump};
