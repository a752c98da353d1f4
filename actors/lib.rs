//! kvcoord: a KV-cache coordinator for LLM inference, as an actix actor
//! system.
//!
//! - [`server`]: the coordinator (supervisor, instance, copy-lane and
//!   session actors, the L1 store, tiers). Start it with
//!   [`server::Coordinator::start`] inside an actix `System`, or run the
//!   `kvcoord serve` binary ([`cli`] is its command line).
//! - [`client`]: the client for actor-system hosts, an actix actor over the
//!   tokio client core of the `kvcoord-client` crate.
//! - [`config`]: the server's configuration.

pub mod cli;
pub mod client;
pub mod config;
pub mod server;

pub use config::ServerConfig;
pub use server::Coordinator;
