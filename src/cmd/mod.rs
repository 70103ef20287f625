//! The subcommands of the `tenantsync` CLI, one module each.

pub mod bench;
pub mod demo;
pub mod policy;
pub mod replica;
pub mod serve;
pub mod sql;
pub mod token;
