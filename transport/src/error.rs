//! Typed errors of the wire protocol. Every failed request ends in exactly one
//! of these, and each kind says whether retrying can help.
//! This module must never decide *when* an error happens, only what it means.

use serde::{Deserialize, Serialize};

/// What went wrong, as both ends of the wire understand it.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The instance is not registered with this server (it restarted, or the
    /// actor that held the registration was restarted): register again.
    NotRegistered,
    /// A register for an already registered instance with a different layout,
    /// or memory that does not match the layout.
    LayoutMismatch,
    /// A malformed request: bad block id, wrong counts, empty request, host
    /// memory registered without its memfd (as over TCP, which cannot carry
    /// one), ... Also a bad frame: larger than the limit (before the
    /// handshake, larger than a hello may be), truncated, undecodable, or
    /// carrying descriptors it did not declare; the server closes after it.
    InvalidArgument,
    /// L1 has no room even after evicting everything evictable.
    OutOfMemory,
    /// The server (or the connection to it) is not available right now.
    /// Also the `Refused` frame of a connection over the server's connection
    /// cap (`max_connections`): try again later.
    Unavailable,
    /// The request's deadline passed before it completed. Also the `Refused`
    /// frame of a connection that sent no hello in time, or that sat idle (no
    /// request in flight, nothing received) past the server's idle timeout.
    Timeout,
    /// The connection's credentials were refused (no token over TCP, a
    /// wrong token, a peer uid not allowed), or the request is not allowed
    /// on this server at all (fault injection on a server started without it).
    Unauthorized,
    /// Client and server speak different protocol versions.
    ProtocolMismatch,
    /// The server is shutting down.
    ShuttingDown,
    /// A bug or an internal failure; details in the message.
    Internal,
    /// The connection is authenticated but may not do this: an instance
    /// another session registered, a lease another principal took, a
    /// privileged request (clear, fault injection, full status) without the
    /// admin role, or a server whose uid the client does not trust.
    PermissionDenied,
}

impl ErrorKind {
    /// A stable snake_case name, for metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotRegistered => "not_registered",
            ErrorKind::LayoutMismatch => "layout_mismatch",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::ProtocolMismatch => "protocol_mismatch",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Internal => "internal",
            ErrorKind::PermissionDenied => "permission_denied",
        }
    }

    /// Whether sending the same request again (later, or after registering
    /// again for `NotRegistered`) can succeed.
    pub fn is_retriable(self) -> bool {
        match self {
            ErrorKind::NotRegistered
            | ErrorKind::OutOfMemory
            | ErrorKind::Unavailable
            | ErrorKind::Timeout
            | ErrorKind::ShuttingDown => true,
            ErrorKind::LayoutMismatch
            | ErrorKind::InvalidArgument
            | ErrorKind::Unauthorized
            | ErrorKind::ProtocolMismatch
            | ErrorKind::Internal
            | ErrorKind::PermissionDenied => false,
        }
    }
}

/// An error as it travels in a reply: a kind and a human-readable message.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        WireError { kind, message: message.into() }
    }
    pub fn is_retriable(&self) -> bool {
        self.kind.is_retriable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_kinds_are_retriable() {
        assert!(ErrorKind::NotRegistered.is_retriable());
        assert!(ErrorKind::Unavailable.is_retriable());
        assert!(!ErrorKind::InvalidArgument.is_retriable());
        assert!(!ErrorKind::ProtocolMismatch.is_retriable());
    }
}
