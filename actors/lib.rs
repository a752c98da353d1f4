//! kvcoord: a KV-cache coordinator for LLM inference, as an actix actor
//! system.
//!
//! - [`server`]: the coordinator (supervisor, instance, copy-lane and
//!   session actors, the L1 store). Start it with [`server::Coordinator::start`]
//!   inside an actix `System`, or run the `kvcoord serve` binary.
//! - [`client`]: the worker-client actor that a TP worker uses to register,
//!   store, look up and retrieve, and that re-registers by itself after a
//!   server restart.

pub mod client;
pub mod config;
pub mod gpu_workload;
pub mod server;
pub mod workload;

pub use config::ServerConfig;
pub use server::Coordinator;
