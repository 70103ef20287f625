//! tenantsync-core: a single-tenant CRR engine, wire-compatible with cr-sqlite 0.16.
//!
//! Module map (filled in as the engine lands; see docs/ARCHITECTURE.md):
//! nothing yet.
