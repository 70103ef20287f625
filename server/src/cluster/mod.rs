//! A cluster of nodes (docs/CLUSTER.md): every shard's commits go to a
//! replicated NATS JetStream log before they are acknowledged; which node
//! owns which shard lives in JetStream's key-value store; every other node
//! keeps a standby copy of the shard by applying its log.
//!
//! - [`changeset`]: SQLite's session extension, recording what a
//!   transaction wrote and replaying it on a copy.
//! - [`log`]: [`log::ShardLog`], a shard's log (append with the sequence
//!   it must follow, read, tail).
//! - [`journal`]: the engine's journal on a shard's log (a commit is
//!   appended before it is final).
//! - [`standby`]: a copy of a shard kept at the log's end.
//! - [`node`]: [`Node`], a node's life in the cluster: heartbeats,
//!   placement, takeover, handover.

pub mod changeset;
pub(crate) mod journal;
pub mod log;
pub mod node;
pub(crate) mod standby;

pub use node::{ClusterConfig, ClusterError, Node};
