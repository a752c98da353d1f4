//! Client settings: where the coordinator is and how long each kind of
//! request may take. Plain data; nothing here talks to the network.

use std::time::Duration;

use kvcoord_transport::{Endpoint, ReconnectOptions};

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub endpoint: Endpoint,
    pub reconnect: ReconnectOptions,
    /// Deadline of store, lookup and retrieve requests.
    pub request_timeout: Duration,
    /// Deadline of a register request (the server may take seconds per worker
    /// to open CUDA memory and create streams).
    pub register_timeout: Duration,
    /// How long a request waits for a connection before failing fast.
    pub disconnected_wait: Duration,
}

impl ClientConfig {
    pub fn new(endpoint: Endpoint) -> Self {
        ClientConfig {
            endpoint,
            reconnect: ReconnectOptions::default(),
            request_timeout: Duration::from_secs(10),
            register_timeout: Duration::from_secs(30),
            disconnected_wait: Duration::from_millis(20),
        }
    }
}
