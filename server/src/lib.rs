//! tenantsync-server: the multi-tenant partial-sync service.
//!
//! docs/PROTOCOL.md is what it promises on the wire; docs/arch/server.md is
//! the design (read it before changing anything here).
//!
//! Module map:
//! - [`contract`]: the types the edge and the engine share (a leaf):
//!   [`Principal`], [`Limits`], [`ServiceConfig`], [`ApiError`],
//!   [`PushError`], [`OutFrame`].
//! - [`service`]: [`SyncService`], the handle the edge uses: it routes each
//!   tenant to its shard ([`placement`]) and runs sessions ([`Session`],
//!   [`Outbox`]), push, pull, service SQL, policy reload, peer reports,
//!   shutdown; its bodies only talk to the engines by channels.
//! - [`placement`]: [`Placement`], the stable tenant -> shard rule.
//! - [`cluster`]: a node of a cluster (docs/CLUSTER.md): each shard's
//!   commits appended to its NATS JetStream log before they are final,
//!   standby copies following the logs, placement in JetStream KV.
//! - `hook`: the backend's write hook (the rows a push would make, the
//!   verdicts, the client that asks); `outbound`: outbound HTTP(S) calls
//!   (the write hook, an identity provider's key set), a leaf.
//! - `engine` (one shard's side, OS threads, synchronous):
//!   - `engine::shard`: a shard: its database, engine thread and readers;
//!     `engine::layout`, the shards on disk.
//!   - the engine thread, the only writer of its shard: the loop and its
//!     commands, group commits of pushes and service SQL (`engine::write`,
//!     `engine::push_check`), CommitBatches (`engine::commit`), views,
//!     membership instances and the equality index (`engine::filters`),
//!     subscriptions, held-set tracking and fan-out (`engine::subs`).
//!   - `engine::reader`: the reader pool (snapshot, resume, refetch, pull
//!     jobs; fair per tenant).
//!   - `engine::outbox`: per-connection bounded queues; coalescing of
//!     whole-commit items into `changes` checkpoints.
//!   - `engine::store`: the server's own tables (`tenantsync_peers`,
//!     `tenantsync_subscriptions`); `engine::schema`, the schema as the
//!     engine and the policy engine see it; `engine::fair`, per-tenant
//!     round-robin queues.
//! - `bench` (hidden): hooks for the criterion benchmarks.
//! - `edge` (the tokio side, which never touches SQLite), re-exported here:
//!   - [`auth`]: bearer JWT verification ([`auth::Authenticator`]) into a
//!     [`Principal`]; [`jwks`], keys from a JSON Web Key Set, refreshed.
//!   - [`config`]: the server's [`config::Config`] (TOML file, environment,
//!     flags), validated into [`config::Settings`].
//!   - [`app`]: [`app::AppState`], the [`app::router`] of PROTOCOL.md §8,
//!     [`app::Server`] (serve and the shutdown sequence), SIGHUP's policy
//!     reload.
//!   - [`http`]: the HTTP handlers, their extractors and error answers.
//!   - [`ws`]: the WebSocket session (hello, then the reader, outbox pump and
//!     pinger loops), generic over `Sink`/`Stream`.
//!   - [`forward`]: in a cluster, a request for a shard another node runs
//!     passed on to it (HTTP), a session relayed to it (WebSocket).

#[doc(hidden)]
pub mod bench;

pub mod cluster;
pub mod contract;
mod edge;
mod engine;
mod hook;
mod outbound;
pub mod placement;
pub mod service;

pub use edge::{app, auth, config, forward, http, jwks, ws};

const DEFAULT_MAX: usize = tenantsync_protocol::DEFAULT_MAX_MESSAGE_BYTES;

pub use placement::Placement;
pub use service::{
    ApiError, Limits, OutFrame, Outbox, Principal, PushError, ServiceConfig, Session, StartError,
    SyncService, Synchronous, WriteHook, shard_path,
};
