//! The subcommands of the `tenantsync` CLI, one module each.

pub mod policy;
pub mod serve;
pub mod sql;
