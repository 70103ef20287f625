//! tenantsync-policy: row-level-security policies in PostgreSQL's `CREATE POLICY`
//! dialect, subscription rewriting and write checks. Pure: no IO, no SQLite.
//!
//! Module map: nothing yet.
