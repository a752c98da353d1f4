//! Frames over a socket: [`FrameReader`] and [`FrameWriter`] over the two
//! halves of a Unix or TCP stream. On Unix sockets a frame may carry file
//! descriptors (SCM_RIGHTS), sent with the frame's first byte.
//!
//! This module owns socket I/O and the read buffer. It must never interpret
//! frames beyond their header.
//!
//! Resource rules (a peer must not be able to break them):
//! - the read buffer grows with the bytes actually received, never with the
//!   length a header declares, and shrinks back once a large frame is done;
//! - every received descriptor is an [`OwnedFd`] the moment `recvmsg`
//!   returns, so every error path closes it; descriptors beyond what the
//!   frames can carry ([`FrameError::StrayFds`]) are closed and the stream
//!   refused.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{tcp, unix};

use crate::frame::{self, FrameError, HEADER_BYTES};

const INITIAL_BUFFER: usize = 64 * 1024;
/// An empty buffer larger than this goes back to [`INITIAL_BUFFER`].
const SHRINK_ABOVE: usize = 4 * INITIAL_BUFFER;
/// SCM_MAX_FD: the kernel never passes more in one message, so a buffer this
/// size is never truncated (a truncated one would leak the descriptors).
const MAX_FDS_PER_READ: usize = 253;
/// Most descriptors that may wait for their frame: a Unix stream socket
/// returns at most one sender message's descriptors per `recvmsg`, and the
/// reader only reads again once every complete frame is taken, so at most a
/// partial frame's and one new message's descriptors can be queued.
const MAX_QUEUED_FDS: usize = 2 * frame::MAX_FDS_PER_FRAME as usize;

/// A TLS session over TCP, either end.
pub type TlsTcp = tokio_rustls::TlsStream<tokio::net::TcpStream>;

/// The read half of a connection.
pub enum ReadHalf {
    Unix(unix::OwnedReadHalf),
    Tcp(tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsTcp>),
}

/// The write half of a connection.
pub enum WriteHalf {
    Unix(unix::OwnedWriteHalf),
    Tcp(tcp::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsTcp>),
}

/// Reads whole frames, and the descriptors that came with them.
pub struct FrameReader {
    half: ReadHalf,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    fds: VecDeque<OwnedFd>,
    cmsg: Vec<u8>,
    max_frame: u32,
}

/// Writes whole frames.
pub struct FrameWriter {
    half: WriteHalf,
    max_frame: u32,
}

/// Splits a Unix stream into a frame reader and writer.
pub fn unix_pair(stream: tokio::net::UnixStream, max_frame: u32) -> (FrameReader, FrameWriter) {
    let (r, w) = stream.into_split();
    (FrameReader::new(ReadHalf::Unix(r), max_frame), FrameWriter { half: WriteHalf::Unix(w), max_frame })
}

/// Splits a TCP stream into a frame reader and writer.
pub fn tcp_pair(stream: tokio::net::TcpStream, max_frame: u32) -> (FrameReader, FrameWriter) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    (FrameReader::new(ReadHalf::Tcp(r), max_frame), FrameWriter { half: WriteHalf::Tcp(w), max_frame })
}

/// Splits a TLS session into a frame reader and writer.
pub fn tls_pair(stream: TlsTcp, max_frame: u32) -> (FrameReader, FrameWriter) {
    let _ = stream.get_ref().0.set_nodelay(true);
    let (r, w) = tokio::io::split(stream);
    (FrameReader::new(ReadHalf::Tls(r), max_frame), FrameWriter { half: WriteHalf::Tls(w), max_frame })
}

impl FrameReader {
    fn new(half: ReadHalf, max_frame: u32) -> Self {
        let cmsg = match half {
            ReadHalf::Unix(_) => nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]),
            ReadHalf::Tcp(_) | ReadHalf::Tls(_) => Vec::new(),
        };
        FrameReader { half, buf: vec![0; INITIAL_BUFFER], start: 0, end: 0, fds: VecDeque::new(), cmsg, max_frame }
    }

    /// Changes the largest frame this reader accepts (e.g. a small limit
    /// before the handshake, the configured one after).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// The largest frame this reader accepts now.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Bytes the read buffer holds now (received or not): what one
    /// connection's reader costs.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.len()
    }

    /// Reads and decodes the next frame. `Err(Closed)` at a clean end of stream.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<(T, Vec<OwnedFd>), FrameError> {
        let (payload, fds) = self.next_raw().await?;
        let msg = frame::decode(&self.buf[payload.0..payload.1])?;
        Ok((msg, fds))
    }

    /// The next frame's payload range in `buf`, and its descriptors. On any
    /// error every queued descriptor is closed.
    async fn next_raw(&mut self) -> Result<((usize, usize), Vec<OwnedFd>), FrameError> {
        let r = self.next_raw_inner().await;
        if r.is_err() {
            self.fds.clear();
        }
        r
    }

    async fn next_raw_inner(&mut self) -> Result<((usize, usize), Vec<OwnedFd>), FrameError> {
        if self.start == self.end && self.buf.len() > SHRINK_ABOVE {
            self.buf = vec![0; INITIAL_BUFFER];
            (self.start, self.end) = (0, 0);
        }
        loop {
            let have = self.end - self.start;
            if have >= HEADER_BYTES {
                let mut h = [0u8; HEADER_BYTES];
                h.copy_from_slice(&self.buf[self.start..self.start + HEADER_BYTES]);
                let header = frame::parse_header(&h, self.max_frame)?;
                let total = HEADER_BYTES + header.len as usize;
                if have >= total {
                    let payload = (self.start + HEADER_BYTES, self.start + total);
                    self.start += total;
                    // Descriptors arrive with the first byte of their frame,
                    // so by now every one this frame declared is queued.
                    let want = header.fds as usize;
                    if self.fds.len() < want {
                        return Err(FrameError::FdMismatch { declared: want, received: self.fds.len() });
                    }
                    let fds = self.fds.drain(..want).collect();
                    if self.start == self.end && !self.fds.is_empty() {
                        // Nothing left that they could belong to.
                        return Err(FrameError::StrayFds { count: self.fds.len() });
                    }
                    return Ok((payload, fds));
                }
                self.make_room(total);
            } else {
                self.make_room(HEADER_BYTES);
            }
            let n = self.fill().await?;
            if n == 0 {
                return Err(if self.end == self.start {
                    FrameError::Closed
                } else {
                    FrameError::Truncated { got: self.end - self.start, want: HEADER_BYTES }
                });
            }
        }
    }

    /// Makes room to receive more of a frame of `total` bytes (header
    /// included) that starts at `start`. The buffer grows (doubling) only
    /// when it is full of received bytes, and never past `total`, so a
    /// header declaring a large frame costs nothing until its bytes arrive.
    fn make_room(&mut self, total: usize) {
        if self.end < self.buf.len() && self.buf.len() - self.start >= total.min(self.buf.len()) {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // Full of one partial frame: `total > end` here.
            let grown = (self.buf.len() * 2).min(total).max(self.end + 1);
            self.buf.resize(grown, 0);
        }
    }

    async fn fill(&mut self) -> Result<usize, FrameError> {
        let end = self.end;
        let n = match &mut self.half {
            ReadHalf::Tcp(r) => r.read(&mut self.buf[end..]).await?,
            ReadHalf::Tls(r) => r.read(&mut self.buf[end..]).await?,
            ReadHalf::Unix(r) => {
                let sock: &tokio::net::UnixStream = r.as_ref();
                let raw = sock.as_raw_fd();
                loop {
                    sock.readable().await?;
                    let (buf, cmsg) = (&mut self.buf[end..], &mut self.cmsg);
                    let res = sock.try_io(Interest::READABLE, || {
                        // A header the kernel does not overwrite reads as "no
                        // descriptors", never as a stale message.
                        cmsg.fill(0);
                        let mut iov = [IoSliceMut::new(buf)];
                        let (n, truncated, mut fds) = {
                            let msg = recvmsg::<()>(raw, &mut iov, Some(cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                                .map_err(std::io::Error::from)?;
                            let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                            // Own every descriptor before anything can fail,
                            // so every path below closes them.
                            let mut fds = Vec::new();
                            if !truncated {
                                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                                    if let ControlMessageOwned::ScmRights(r) = c {
                                        // SAFETY: the kernel has just installed
                                        // these in our table for this message;
                                        // nothing else in the process knows them.
                                        fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                                    }
                                }
                            }
                            (msg.bytes, truncated, fds)
                        };
                        if truncated {
                            // nix will not iterate a truncated buffer, but
                            // the kernel installed the descriptors that fit
                            // (e.g. up to our descriptor limit): take them.
                            fds = truncated_rights(cmsg);
                        }
                        Ok((n, fds, truncated))
                    });
                    match res {
                        Ok((n, fds, truncated)) => {
                            if truncated {
                                // Some descriptors were dropped by the kernel
                                // (e.g. our descriptor limit): the frame
                                // cannot be whole. `fds` closes on return.
                                return Err(FrameError::StrayFds { count: fds.len() });
                            }
                            if self.fds.len() + fds.len() > MAX_QUEUED_FDS {
                                return Err(FrameError::StrayFds { count: self.fds.len() + fds.len() });
                            }
                            self.fds.extend(fds);
                            break n;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        };
        self.end += n;
        Ok(n)
    }
}

/// The descriptors of the one SCM_RIGHTS message at the start of `cmsg`
/// after a truncated `recvmsg` (the kernel writes a whole header for the
/// descriptors it installed), owned.
fn truncated_rights(cmsg: &[u8]) -> Vec<OwnedFd> {
    use nix::libc;
    let word = std::mem::size_of::<usize>();
    // SAFETY: CMSG_LEN only computes a length.
    let data = unsafe { libc::CMSG_LEN(0) } as usize;
    if cmsg.len() < data {
        return Vec::new();
    }
    let len = usize::from_ne_bytes(cmsg[..word].try_into().expect("a word"));
    let level = i32::from_ne_bytes(cmsg[word..word + 4].try_into().expect("an int"));
    let kind = i32::from_ne_bytes(cmsg[word + 4..word + 8].try_into().expect("an int"));
    if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS || len < data || len > cmsg.len() {
        return Vec::new();
    }
    cmsg[data..len]
        .chunks_exact(4)
        // SAFETY: the kernel installed these descriptors for this message.
        .map(|b| unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(b.try_into().expect("an int"))) })
        .collect()
}

impl FrameWriter {
    /// The frame limit this writer encodes against.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Encodes and writes one frame without descriptors.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let bytes = frame::encode(msg, 0, self.max_frame)?;
        self.write_all(&bytes).await
    }

    /// Writes already-encoded frames.
    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        match &mut self.half {
            WriteHalf::Unix(w) => w.write_all(bytes).await?,
            WriteHalf::Tcp(w) => w.write_all(bytes).await?,
            WriteHalf::Tls(w) => {
                // rustls may hold encrypted records until flushed.
                w.write_all(bytes).await?;
                w.flush().await?
            }
        }
        Ok(())
    }

    /// Writes one encoded frame with `fds` attached to its first byte.
    pub async fn write_with_fds(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FrameError> {
        if fds.is_empty() {
            return self.write_all(bytes).await;
        }
        let WriteHalf::Unix(w) = &mut self.half else {
            return Err(FrameError::FdMismatch { declared: fds.len(), received: 0 });
        };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = {
            let sock: &tokio::net::UnixStream = w.as_ref();
            let sockfd = sock.as_raw_fd();
            loop {
                sock.writable().await?;
                let res = sock.try_io(Interest::WRITABLE, || {
                    sendmsg::<()>(
                        sockfd,
                        &[IoSlice::new(bytes)],
                        &[ControlMessage::ScmRights(&raw)],
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(std::io::Error::from)
                });
                match res {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        w.write_all(&bytes[sent..]).await?;
        Ok(())
    }
}

/// One encoded frame waiting to be written, with the descriptors it carries.
pub struct OutFrame {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// A queue of frames for [`write_loop`]: bounded (the server, so a peer
/// that never reads its replies stops the requests that produce them) or
/// unbounded (a client, whose requests are bounded by their callers).
pub trait OutQueue: Send {
    /// Waits for at least one frame; moves at most `limit` into `buf`.
    /// Returns 0 once the queue is closed and empty.
    fn recv_many(&mut self, buf: &mut Vec<OutFrame>, limit: usize) -> impl std::future::Future<Output = usize> + Send;
}

impl OutQueue for tokio::sync::mpsc::UnboundedReceiver<OutFrame> {
    fn recv_many(&mut self, buf: &mut Vec<OutFrame>, limit: usize) -> impl std::future::Future<Output = usize> + Send {
        tokio::sync::mpsc::UnboundedReceiver::recv_many(self, buf, limit)
    }
}

impl OutQueue for tokio::sync::mpsc::Receiver<OutFrame> {
    fn recv_many(&mut self, buf: &mut Vec<OutFrame>, limit: usize) -> impl std::future::Future<Output = usize> + Send {
        tokio::sync::mpsc::Receiver::recv_many(self, buf, limit)
    }
}

/// Writes queued frames until the queue closes or a write fails, coalescing
/// whatever is queued into one write (frames with descriptors go alone).
pub async fn write_loop(mut writer: FrameWriter, mut rx: impl OutQueue) {
    let mut batch = Vec::with_capacity(64);
    let mut bytes = Vec::with_capacity(64 * 1024);
    while rx.recv_many(&mut batch, 256).await > 0 {
        for out in batch.drain(..) {
            if out.fds.is_empty() {
                bytes.extend_from_slice(&out.bytes);
                continue;
            }
            if !bytes.is_empty() && writer.write_all(&bytes).await.is_err() {
                return;
            }
            bytes.clear();
            let fds: Vec<BorrowedFd<'_>> = out.fds.iter().map(std::os::fd::AsFd::as_fd).collect();
            if let Err(e) = writer.write_with_fds(&out.bytes, &fds).await {
                tracing::debug!(error = %e, "write with descriptors failed");
                return;
            }
        }
        if !bytes.is_empty() && writer.write_all(&bytes).await.is_err() {
            return;
        }
        bytes.clear();
        if bytes.capacity() > 4 << 20 {
            bytes = Vec::with_capacity(64 * 1024);
        }
    }
}
