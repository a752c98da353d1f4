//! The handshake: `Hello{protocol, client, token}` -> `Welcome{protocol,
//! epoch, tenant, ...}` or `Refused(kind)`. This module owns both sides of
//! that one exchange, its time limit and its frame limit; it must never
//! handle requests, and never decides who is allowed in (the server passes
//! that decision in as a function of the hello).
//!
//! Before the handshake a peer is unknown, so its first frame may be at most
//! [`HANDSHAKE_MAX_FRAME_BYTES`]. Every first frame the server cannot use
//! (oversized, truncated, undecodable, with descriptors it did not declare,
//! too slow, not a `Hello`) is answered with a `Refused` frame naming why,
//! before the server closes; only a peer that closes without sending a byte,
//! or whose socket fails, gets no answer.

use std::time::Duration;

use crate::error::{ErrorKind, WireError};
use crate::frame::FrameError;

/// The largest first frame a server reads before the handshake (a `Hello`
/// is a version and a client name).
pub const HANDSHAKE_MAX_FRAME_BYTES: u32 = 64 * 1024;
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
    token: Option<&str>,
    protocol: u32,
    limit: Duration,
) -> Result<Welcome, HandshakeError> {
    let exchange = async {
        let hello = Hello { protocol, client: client.to_string(), token: token.map(str::to_string) };
        writer.send(&ClientFrame::Hello(hello)).await?;
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

/// Server side: waits for the client's hello and answers it with `welcome`
/// (every hello is let in). See [`welcome_with`].
pub async fn welcome(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    welcome: &Welcome,
    limit: Duration,
) -> Result<Hello, HandshakeError> {
    let w = welcome.clone();
    welcome_with(reader, writer, w.protocol, move |_| Ok((w, ())), limit).await.map(|(h, _)| h)
}

/// Server side: waits for the client's hello and answers it. A client of a
/// different protocol version (than `protocol`) gets
/// `Refused(ProtocolMismatch)` and an error; a first frame that cannot be a
/// hello gets `Refused(InvalidArgument)`, a hello that does not come within
/// `limit` gets `Refused(Timeout)`. Otherwise `admit` decides: its welcome
/// is sent, or its error is sent as `Refused` (e.g. a wrong token) and
/// returned as [`HandshakeError::Refused`].
pub async fn welcome_with<A>(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    protocol: u32,
    admit: impl FnOnce(&Hello) -> Result<(Welcome, A), WireError>,
    limit: Duration,
) -> Result<(Hello, A), HandshakeError> {
    let configured = reader.max_frame();
    reader.set_max_frame(configured.min(HANDSHAKE_MAX_FRAME_BYTES));
    let first = tokio::time::timeout(limit, reader.read::<ClientFrame>()).await;
    reader.set_max_frame(configured);
    let refuse = |kind, msg: String| ServerFrame::Refused(WireError::new(kind, msg));
    let hello = match first {
        Ok(Ok((ClientFrame::Hello(h), _))) => h,
        Ok(Ok((ClientFrame::Request(_), _))) => {
            let f = refuse(ErrorKind::InvalidArgument, "first frame must be Hello".into());
            let _ = tokio::time::timeout(limit, writer.send(&f)).await;
            return Err(HandshakeError::Unexpected("request before hello"));
        }
        // Nothing came, or the socket failed: there is no one to tell.
        Ok(Err(e @ (FrameError::Closed | FrameError::Io(_)))) => return Err(e.into()),
        Ok(Err(e)) => {
            let msg = match &e {
                FrameError::Decode(m) => format!("undecodable hello: {m}"),
                other => format!("bad first frame: {other}"),
            };
            let _ = tokio::time::timeout(limit, writer.send(&refuse(ErrorKind::InvalidArgument, msg))).await;
            return Err(e.into());
        }
        Err(_) => {
            let f = refuse(ErrorKind::Timeout, format!("no hello within {} ms", limit.as_millis()));
            let _ = tokio::time::timeout(limit, writer.send(&f)).await;
            return Err(HandshakeError::Timeout(limit));
        }
    };
    let answer = async {
        if hello.protocol != protocol {
            let e = WireError::new(
                ErrorKind::ProtocolMismatch,
                format!("client speaks protocol {}, server speaks {}", hello.protocol, protocol),
            );
            let _ = writer.send(&ServerFrame::Refused(e)).await;
            return Err(HandshakeError::ProtocolMismatch { ours: protocol, theirs: hello.protocol });
        }
        match admit(&hello) {
            Ok((welcome, admitted)) => {
                writer.send(&ServerFrame::Welcome(welcome)).await?;
                Ok((hello, admitted))
            }
            Err(e) => {
                let _ = writer.send(&ServerFrame::Refused(e.clone())).await;
                Err(HandshakeError::Refused(e))
            }
        }
    };
    tokio::time::timeout(limit, answer).await.map_err(|_| HandshakeError::Timeout(limit))?
}

/// The protocol this build speaks.
pub fn our_protocol() -> u32 {
    PROTOCOL_VERSION
}
