//! tenantsync-server: the multi-tenant partial-sync service (tokio + axum).
//!
//! Module map: nothing yet.
