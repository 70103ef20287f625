//! tenantsync-protocol: the wire messages of the tenantsync sync protocol,
//! version 1, shared by the server and the client. docs/PROTOCOL.md is the
//! specification; this crate is its executable form.
//!
//! Module map:
//! - [`change`]: a change (one `crsql_changes` row) on the wire, as a
//!   9-element JSON array, and the fast encoder the server's fan-out uses.
//! - [`ws`]: WebSocket messages, [`ClientMsg`] and [`ServerMsg`].
//! - [`http`]: request and response bodies of the HTTP endpoints.
//! - [`error`]: [`ErrorCode`], every error the protocol can answer, with its
//!   HTTP status and whether a WebSocket closes after it.
//!
//! Values use `tenantsync_types::Value`'s exact JSON encoding; packed primary
//! keys and site ids are lowercase hex.

pub mod change;
pub mod error;
pub mod http;
pub mod ws;

pub use change::{RowKey, WireChanges};
pub use error::ErrorCode;
pub use ws::{ClientMsg, ServerMsg, SubPart, SubscribeMode};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default limit on one message (WebSocket frame or HTTP body), in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
