//! The subcommands of the `tenantsync` CLI, one module each.

pub mod bench;
pub mod cluster;
pub mod demo;
pub mod policy;
pub mod replica;
pub mod serve;
pub mod sql;
pub mod token;
