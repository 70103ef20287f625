//! tenantsync-client: a partial replica that syncs with a tenantsync server
//! (docs/PROTOCOL.md is the contract; §11 is what this crate does).
//!
//! Module map:
//! - [`replica`]: [`Replica`], the local partial replica on a core database
//!   and the synchronous, transactional logic of a conforming client:
//!   applying syncs, checkpoints and pull answers (held keys, evictions,
//!   cursors), planning pushes, handling refusals (quarantine and restore).
//! - `store`: the replica's own tables (`tenantsync_replica_*`).
//! - [`handle`]: [`ReplicaHandle`], a thread that owns a [`Replica`], so
//!   async code runs its SQLite work off the runtime.
//! - [`ws`]: [`SyncClient`], the live WebSocket client: hello, push,
//!   subscribe with cursors, apply, ack, reconnect with backoff and resume.
//! - [`http`]: [`HttpClient`] (schema, one push, one pull over HTTP) and
//!   [`sync_round`], one whole round as `tenantsync replica sync` runs it.
//! - [`subid`]: stable subscription ids derived from query text.
//! - [`error`]: the error type, [`ReplicaError`].

pub mod error;
pub mod handle;
pub mod http;
pub mod replica;
mod store;
pub mod subid;
pub mod ws;

pub use error::{ReplicaError, Result};
pub use handle::ReplicaHandle;
pub use http::{
    HttpClient, HttpError, PushAnswer, RoundError, RoundOptions, RoundReport, sync_round,
};
pub use replica::{
    ApplyReport, Gap, MergeCounts, PartReport, PushBatch, QuarantineReason, Quarantined,
    RefusalReport, RemoveReport, Replica, Subscription, SubscriptionChange,
};
pub use ws::{ClientConfig, Event, Status, SyncClient};
