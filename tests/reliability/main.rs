//! Reliability (issue 6, docs/TESTING.md "Reliability"): the real
//! `tenantsync serve` and real clients over real sockets, crashed, restarted
//! and compared with an oracle evaluated on the server database.
//!
//! - `crash`: the server SIGKILLed at random moments, at least 20 times per
//!   run, while clients push and subscribe.
//! - `client_crash`: `tenantsync replica sync` SIGKILLed in the middle of
//!   applying a large pull, restarted until it converges.
//! - `oracle`: seeded random policies, identities, subscriptions, writes and
//!   disconnects; at quiescence every replica equals the oracle.
//! - `cluster`: `tenantsync cluster up`, owners SIGKILLed (one during a
//!   handover), clients resuming through a gateway node, the oracle.
//! - `common`: the child-process server, tokens, clients, the oracle.

mod client_crash;
mod cluster;
mod common;
mod crash;
mod oracle;
