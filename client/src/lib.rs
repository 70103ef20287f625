//! tenantsync-client: a partial replica that syncs with a tenantsync server.
//!
//! Module map: nothing yet.
