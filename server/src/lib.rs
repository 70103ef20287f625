//! tenantsync-server: the multi-tenant partial-sync service.
//!
//! docs/PROTOCOL.md is what it promises on the wire; docs/arch/server.md is
//! the design (read it before changing anything here).
//!
//! Module map:
//! - [`service`]: [`SyncService`], the handle the edge uses: start, sessions
//!   ([`Session`], [`Outbox`]), push, pull, service SQL, policy reload, peer
//!   reports, shutdown. Its types are the contract between the engine and
//!   the edge.

pub mod service;

pub use service::{
    ApiError, Limits, OutFrame, Outbox, Principal, PushError, ServiceConfig, Session, StartError,
    SyncService, Synchronous,
};
