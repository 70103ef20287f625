//! tenantsync-protocol: the wire messages of the tenantsync sync protocol,
//! version 1, shared by the server and the client. docs/PROTOCOL.md is the
//! specification; this crate is its executable form.
//!
//! Module map:
//! - [`change`]: a change (one `crsql_changes` row) on the wire, as a
//!   9-element JSON array, and the fast encoder the server's fan-out uses.
//! - [`ws`]: WebSocket messages, [`ClientMsg`] and [`ServerMsg`].
//! - [`http`]: request and response bodies of the HTTP endpoints.
//! - [`json`]: [`json::decode`], serde_json after the check that no
//!   integer is outside `i64` (serde would read it as a REAL).
//! - [`error`]: [`ErrorCode`], every error the protocol can answer, with its
//!   HTTP status and whether a WebSocket closes after it.
//!
//! Values use `tenantsync_types::Value`'s exact JSON encoding; packed primary
//! keys and site ids are lowercase hex.

pub mod change;
pub mod error;
pub mod http;
pub mod json;
pub mod ws;

pub use change::{RowKey, WireChanges};
pub use error::ErrorCode;
pub use ws::{ClientMsg, ServerMsg, SubPart, SubscribeMode};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest clock (causal length, col_version, seq, db_version) a peer
/// may jump to: 2^53 - 1, the largest integer every client reads exactly
/// from JSON (JavaScript's `Number.MAX_SAFE_INTEGER`). Past it a clock only
/// moves one step at a time (docs/PROTOCOL.md, "Clocks").
pub const MAX_CLOCK: i64 = (1 << 53) - 1;

/// How far ahead of what the server holds a pushed clock may be: 2^32,
/// four billion writes of one cell (or deletes of one row) between two
/// syncs (docs/PROTOCOL.md, "Clocks").
pub const MAX_CLOCK_STEP: i64 = 1 << 32;

/// Default limit on one message (WebSocket frame or HTTP body), in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
