//! Frames over a socket: [`FrameReader`] and [`FrameWriter`] over the two
//! halves of a Unix or TCP stream. On Unix sockets a frame may carry file
//! descriptors (SCM_RIGHTS), sent with the frame's first byte.
//!
//! This module owns socket I/O and the read buffer. It must never interpret
//! frames beyond their header. Buffer growth is bounded by the frame limit.

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
/// SCM_MAX_FD: the kernel never passes more in one message, so a buffer this
/// size is never truncated (a truncated one would leak the descriptors).
const MAX_FDS_PER_READ: usize = 253;

/// The read half of a connection.
pub enum ReadHalf {
    Unix(unix::OwnedReadHalf),
    Tcp(tcp::OwnedReadHalf),
}

/// The write half of a connection.
pub enum WriteHalf {
    Unix(unix::OwnedWriteHalf),
    Tcp(tcp::OwnedWriteHalf),
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

impl FrameReader {
    fn new(half: ReadHalf, max_frame: u32) -> Self {
        let cmsg = match half {
            ReadHalf::Unix(_) => nix::cmsg_space!([RawFd; MAX_FDS_PER_READ]),
            ReadHalf::Tcp(_) => Vec::new(),
        };
        FrameReader { half, buf: vec![0; INITIAL_BUFFER], start: 0, end: 0, fds: VecDeque::new(), cmsg, max_frame }
    }

    /// Reads and decodes the next frame. `Err(Closed)` at a clean end of stream.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<(T, Vec<OwnedFd>), FrameError> {
        let (payload, fds) = self.next_raw().await?;
        let msg = frame::decode(&self.buf[payload.0..payload.1])?;
        Ok((msg, fds))
    }

    /// The next frame's payload range in `buf`, and its descriptors.
    async fn next_raw(&mut self) -> Result<((usize, usize), Vec<OwnedFd>), FrameError> {
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

    /// Ensures `buf[start..]` can hold `total` bytes (bounded by the limit,
    /// which `parse_header` already enforced).
    fn make_room(&mut self, total: usize) {
        if self.buf.len() - self.start >= total && self.end < self.buf.len() {
            return;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.buf.len() < total {
            self.buf.resize(total.next_power_of_two().max(total), 0);
        }
    }

    async fn fill(&mut self) -> Result<usize, FrameError> {
        let end = self.end;
        let n = match &mut self.half {
            ReadHalf::Tcp(r) => r.read(&mut self.buf[end..]).await?,
            ReadHalf::Unix(r) => {
                let sock: &tokio::net::UnixStream = r.as_ref();
                let raw = sock.as_raw_fd();
                loop {
                    sock.readable().await?;
                    let (buf, cmsg) = (&mut self.buf[end..], &mut self.cmsg);
                    let res = sock.try_io(Interest::READABLE, || {
                        let mut iov = [IoSliceMut::new(buf)];
                        let msg = recvmsg::<()>(raw, &mut iov, Some(cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                            .map_err(std::io::Error::from)?;
                        let mut fds = Vec::new();
                        for c in msg.cmsgs().map_err(std::io::Error::from)? {
                            if let ControlMessageOwned::ScmRights(r) = c {
                                fds.extend(r);
                            }
                        }
                        Ok((msg.bytes, fds))
                    });
                    match res {
                        Ok((n, fds)) => {
                            for fd in fds {
                                // SAFETY: the kernel has just installed `fd` in
                                // our descriptor table for this message; nothing
                                // else in the process knows it, so we own it.
                                self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
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

/// Writes queued frames until the queue closes or a write fails, coalescing
/// whatever is queued into one write (frames with descriptors go alone).
pub async fn write_loop(mut writer: FrameWriter, mut rx: tokio::sync::mpsc::UnboundedReceiver<OutFrame>) {
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
