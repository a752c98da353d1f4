//! kvcoord-client: what a TP worker (or an engine's scheduler) links to talk
//! to a coordinator. It needs only tokio.
//!
//! - [`Client`]: the async core. Request/reply over a reconnecting
//!   connection, the server epoch, and the rule that every registration is
//!   registered again exactly once per new epoch (or `NotRegistered` reply)
//!   before any other request reaches that server.
//! - [`BlockingClient`]: the same calls for code that is not async (language
//!   bindings): it owns a small tokio runtime and blocks the calling thread,
//!   or hands back a [`Pending`] reply to poll.
//!
//! An actix adapter for actor-system embedders lives in the `kvcoord` crate
//! (`kvcoord::client::WorkerClient`); it adds no behaviour.

mod blocking;
mod client;
mod config;
mod registrations;
pub mod tensors;

pub use blocking::{BlockingClient, Pending, PendingError};
pub use client::{Client, LookupResult, RetrieveResult};
pub use config::{parse_endpoint, ClientConfig};
pub use registrations::Registration;
