//! tenantsync-server: the multi-tenant partial-sync service.
//!
//! docs/PROTOCOL.md is what it promises on the wire; docs/arch/server.md is
//! the design (read it before changing anything here).
//!
//! Module map:
//! - [`service`]: [`SyncService`], the handle the edge uses: start, sessions
//!   ([`Session`], [`Outbox`]), push, pull, service SQL, policy reload, peer
//!   reports, shutdown. Its types are the contract between the engine and
//!   the edge; its bodies only talk to the engine and readers by channels.
//! - `engine`: the engine thread, the only writer: the loop and its
//!   commands, group commits of pushes and service SQL (`engine::write`),
//!   CommitBatches (`engine::commit`), views, membership instances and the
//!   equality index (`engine::filters`), subscriptions, held-set tracking
//!   and fan-out (`engine::subs`).
//! - `reader`: the reader pool (snapshot, resume, refetch, pull jobs; fair
//!   per tenant).
//! - `outbox`: per-connection bounded queues; coalescing of whole-commit
//!   items into `changes` checkpoints; the encoded-once change types.
//! - `store`: the server's own tables (`tenantsync_peers`,
//!   `tenantsync_subscriptions`).
//! - `schema`: the schema as the engine and the policy engine see it.
//! - `fair`: per-tenant round-robin queues.
//! - `bench` (hidden): hooks for the criterion benchmarks.
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

#[doc(hidden)]
pub mod bench;

pub mod app;
pub mod auth;
pub mod config;
mod engine;
mod fair;
pub mod http;
mod outbox;
mod reader;
mod schema;
pub mod service;
mod store;
pub mod ws;

const DEFAULT_MAX: usize = tenantsync_protocol::DEFAULT_MAX_MESSAGE_BYTES;

pub use service::{
    ApiError, Limits, OutFrame, Outbox, Principal, PushError, ServiceConfig, Session, StartError,
    SyncService, Synchronous,
};
