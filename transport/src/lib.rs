//! kvcoord-transport: the wire protocol, its framing and handshake, and the
//! client connections (plain and reconnecting) that both the worker clients
//! and the tests use.
//!
//! Layers, bottom up: `frame` (bytes of one frame) -> `stream` (frames over a
//! socket, with descriptors) -> `handshake` -> `connection` (requests and
//! replies) -> `reconnect` (staying connected). Nothing here may know about
//! the coordinator's actors, memory or policy: it only moves typed messages.

pub mod chunk_hash;
pub mod connection;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod protocol;
pub mod reconnect;
pub mod stream;
pub mod tls;

pub use chunk_hash::{chunk_hashes, ChunkHash};
pub use connection::{ConnectError, ConnectOptions, Connection, RequestError};
pub use endpoint::{Endpoint, Incoming, Listener, PeerCredentials};
pub use error::{ErrorKind, WireError};
pub use protocol::*;
pub use reconnect::{LinkState, ReconnectOptions, ReconnectingClient};
