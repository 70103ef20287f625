//! The edge: the tokio side, which never touches SQLite. It authenticates
//! ([`auth`]), configures ([`config`]), routes ([`app`]), answers HTTP
//! ([`http`]) and runs WebSocket sessions ([`ws`]), all through
//! [`crate::SyncService`]; in a cluster it forwards what another node
//! serves ([`forward`]).

pub mod app;
pub mod auth;
pub mod config;
pub mod forward;
pub mod http;
pub mod jwks;
pub mod ws;
