//! The client side for actor-system hosts: [`WorkerClient`], an actix actor
//! over the tokio client core of the `kvcoord-client` crate (re-exported
//! here), which holds all client behaviour.

mod worker;

pub use kvcoord_client::{BlockingClient, Client, ClientConfig, LookupResult, Pending, Registration, RetrieveResult};
pub use worker::{Call, WorkerClient, WorkerHandle};
