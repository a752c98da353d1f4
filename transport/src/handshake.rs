//! The handshake: `Hello{protocol, client}` -> `Welcome{protocol, epoch, ...}`
//! or `Refused(ProtocolMismatch)`. This module owns both sides of that one
//! exchange and its time limit; it must never handle requests.

use std::time::Duration;

use crate::error::{ErrorKind, WireError};
use crate::frame::FrameError;
use crate::protocol::{ClientFrame, Hello, ServerFrame, Welcome, PROTOCOL_VERSION};
use crate::stream::{FrameReader, FrameWriter};

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("refused by the server: {0}")]
    Refused(WireError),
    #[error("protocol mismatch: we speak {ours}, the peer speaks {theirs}")]
    ProtocolMismatch { ours: u32, theirs: u32 },
    #[error("unexpected first frame: {0}")]
    Unexpected(&'static str),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Client side: says hello and waits for the welcome.
pub async fn hello(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    client: &str,
    protocol: u32,
    limit: Duration,
) -> Result<Welcome, HandshakeError> {
    let exchange = async {
        writer.send(&ClientFrame::Hello(Hello { protocol, client: client.to_string() })).await?;
        match reader.read::<ServerFrame>().await?.0 {
            ServerFrame::Welcome(w) if w.protocol == protocol => Ok(w),
            ServerFrame::Welcome(w) => Err(HandshakeError::ProtocolMismatch { ours: protocol, theirs: w.protocol }),
            ServerFrame::Refused(e) => Err(HandshakeError::Refused(e)),
            ServerFrame::Undecodable(e) => Err(HandshakeError::Refused(e)),
            ServerFrame::Reply(_) => Err(HandshakeError::Unexpected("reply before welcome")),
        }
    };
    tokio::time::timeout(limit, exchange).await.map_err(|_| HandshakeError::Timeout(limit))?
}

/// Server side: waits for the client's hello and answers it. A client of a
/// different protocol version gets `Refused(ProtocolMismatch)` and an error.
pub async fn welcome(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    welcome: &Welcome,
    limit: Duration,
) -> Result<Hello, HandshakeError> {
    let exchange = async {
        let hello = match reader.read::<ClientFrame>().await {
            Ok((ClientFrame::Hello(h), _)) => h,
            Ok((ClientFrame::Request(_), _)) => {
                let e = WireError::new(ErrorKind::InvalidArgument, "first frame must be Hello");
                let _ = writer.send(&ServerFrame::Refused(e)).await;
                return Err(HandshakeError::Unexpected("request before hello"));
            }
            Err(FrameError::Decode(msg)) => {
                let e = WireError::new(ErrorKind::InvalidArgument, format!("undecodable hello: {msg}"));
                let _ = writer.send(&ServerFrame::Refused(e)).await;
                return Err(FrameError::Decode(msg).into());
            }
            Err(e) => return Err(e.into()),
        };
        if hello.protocol != welcome.protocol {
            let e = WireError::new(
                ErrorKind::ProtocolMismatch,
                format!("client speaks protocol {}, server speaks {}", hello.protocol, welcome.protocol),
            );
            let _ = writer.send(&ServerFrame::Refused(e)).await;
            return Err(HandshakeError::ProtocolMismatch { ours: welcome.protocol, theirs: hello.protocol });
        }
        writer.send(&ServerFrame::Welcome(welcome.clone())).await?;
        Ok(hello)
    };
    tokio::time::timeout(limit, exchange).await.map_err(|_| HandshakeError::Timeout(limit))?
}

/// The protocol this build speaks.
pub fn our_protocol() -> u32 {
    PROTOCOL_VERSION
}
