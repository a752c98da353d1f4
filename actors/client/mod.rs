//! The client side: what a TP worker embeds to talk to a coordinator.
//!
//! [`WorkerClient`] is an actor (one per TP worker) on top of a reconnecting
//! connection; [`WorkerHandle`] is its typed async API.

mod registrations;
mod worker;

pub use registrations::Registration;
pub use worker::{LookupResult, RetrieveResult, WorkerClient, WorkerConfig, WorkerHandle};
