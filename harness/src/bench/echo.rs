//! The control plane's baseline: a minimal echo server with the same socket
//! type, handshake, framing and reply writer as kvcoord, answering every
//! request with a pong at once. No actors, no L1.

use std::path::PathBuf;
use std::time::Duration;

use kvcoord_transport::frame::DEFAULT_MAX_FRAME_BYTES;
use kvcoord_transport::stream::{write_loop, OutFrame};
use kvcoord_transport::*;

fn welcome() -> Welcome {
    Welcome {
        protocol: PROTOCOL_VERSION,
        epoch: ServerEpoch(1),
        chunk_tokens: 256,
        limits: Limits { max_frame_bytes: DEFAULT_MAX_FRAME_BYTES, max_chunks_per_request: 4096 },
        server: "echo".into(),
        tenant: "default".into(),
        admin: false,
    }
}

/// A minimal echo server: the same handshake, framing and reply writer as
/// kvcoord, answering every request with a pong at once.
pub(crate) fn start_echo(socket: PathBuf) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = Listener::bind(&Endpoint::Unix(socket)).await.expect("echo bind");
            while let Ok((mut r, mut w, _)) = listener.accept(DEFAULT_MAX_FRAME_BYTES).await {
                tokio::spawn(async move {
                    if handshake::welcome(&mut r, &mut w, &welcome(), Duration::from_secs(5)).await.is_err() {
                        return;
                    }
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(write_loop(w, rx));
                    while let Ok((ClientFrame::Request(req), _)) = r.read::<ClientFrame>().await {
                        let pong = Ok(ReplyBody::Pong { epoch: ServerEpoch(1) });
                        let reply = ServerFrame::Reply(Reply { id: req.id, result: pong });
                        let bytes = frame::encode(&reply, 0, DEFAULT_MAX_FRAME_BYTES).expect("encode");
                        if tx.send(OutFrame { bytes, fds: Vec::new() }).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
}
