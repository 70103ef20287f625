//! The edge: the tokio side, which never touches SQLite. It authenticates
//! ([`auth`]), configures ([`config`]), routes ([`app`]), answers HTTP
//! ([`http`]) and runs WebSocket sessions ([`ws`]), all through
//! [`crate::SyncService`].

pub mod app;
pub mod auth;
pub mod config;
pub mod http;
pub mod jwks;
pub mod ws;
