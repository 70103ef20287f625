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
//! - The edge (tokio side), which never touches SQLite:
//!   - [`auth`]: bearer JWT verification ([`auth::Authenticator`]) into a
//!     [`Principal`].
//!   - [`config`]: the server's [`config::Config`] (TOML file, environment,
//!     flags), validated into [`config::Settings`].
//!   - [`app`]: [`app::AppState`], the [`app::router`] of PROTOCOL.md §8,
//!     [`app::Server`] (serve and the shutdown sequence), SIGHUP's policy
//!     reload.
//!   - [`http`]: the HTTP handlers, their extractors and error answers.
//!   - [`ws`]: the WebSocket session (hello, then the reader, outbox pump and
//!     pinger loops), generic over `Sink`/`Stream`.

pub mod app;
pub mod auth;
pub mod config;
pub mod http;
pub mod service;
pub mod ws;

pub use service::{
    ApiError, Limits, OutFrame, Outbox, Principal, PushError, ServiceConfig, Session, StartError,
    SyncService, Synchronous,
};
