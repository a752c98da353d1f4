//! Where a coordinator listens: a Unix socket path (the default) or a TCP
//! address (optionally with TLS). This module owns parsing endpoints,
//! connecting, binding, and telling who is at the other end of a Unix
//! socket (`SO_PEERCRED`); it must never speak the protocol nor decide who
//! is allowed.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::str::FromStr;

use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::stream::{tcp_pair, tls_pair, unix_pair, FrameReader, FrameWriter};

/// The process at the other end of a Unix socket, as the kernel saw it
/// when the connection was made (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

fn peer_credentials(s: &tokio::net::UnixStream) -> std::io::Result<PeerCredentials> {
    let c = s.peer_cred()?;
    Ok(PeerCredentials { uid: c.uid(), gid: c.gid(), pid: c.pid() })
}

/// A coordinator address: `unix:/path`, `tcp://host:port`, or a bare path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(addr) = s.strip_prefix("tcp://") {
            if addr.is_empty() {
                return Err("empty TCP address".into());
            }
            Ok(Endpoint::Tcp(addr.to_string()))
        } else {
            let path = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")).unwrap_or(s);
            if path.is_empty() {
                return Err("empty socket path".into());
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl Endpoint {
    /// Opens a stream to the endpoint.
    pub async fn connect(&self, max_frame: u32) -> std::io::Result<(FrameReader, FrameWriter)> {
        Ok(match self {
            Endpoint::Unix(p) => unix_pair(tokio::net::UnixStream::connect(p).await?, max_frame),
            Endpoint::Tcp(a) => tcp_pair(tokio::net::TcpStream::connect(a).await?, max_frame),
        })
    }

    /// Opens a stream to the endpoint: over TCP with TLS when `tls` is
    /// given (the server's certificate must name the address's host). For a
    /// Unix socket, also who the server is.
    pub async fn connect_with(
        &self,
        max_frame: u32,
        tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
    ) -> std::io::Result<(FrameReader, FrameWriter, Option<PeerCredentials>)> {
        match (self, tls) {
            (Endpoint::Unix(p), _) => {
                let s = tokio::net::UnixStream::connect(p).await?;
                let peer = peer_credentials(&s)?;
                let (r, w) = unix_pair(s, max_frame);
                Ok((r, w, Some(peer)))
            }
            (Endpoint::Tcp(a), None) => {
                let (r, w) = tcp_pair(tokio::net::TcpStream::connect(a).await?, max_frame);
                Ok((r, w, None))
            }
            (Endpoint::Tcp(a), Some(config)) => {
                let name = crate::tls::server_name(a)?;
                let tcp = tokio::net::TcpStream::connect(a).await?;
                let tls = TlsConnector::from(config.clone()).connect(name, tcp).await?;
                let (r, w) = tls_pair(tls.into(), max_frame);
                Ok((r, w, None))
            }
        }
    }

    /// Whether frames to this endpoint can carry file descriptors.
    pub fn passes_fds(&self) -> bool {
        matches!(self, Endpoint::Unix(_))
    }
}

/// How a Unix socket file is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixSocketOptions {
    /// Permission bits of the socket file, set whatever the umask: it is
    /// bound under a temporary name, given these bits (and group), then
    /// renamed into place, so it is never reachable with others.
    pub mode: u32,
    /// Group id to give the socket file.
    pub group: Option<u32>,
    /// The socket's directory must be private: created with mode 0700, an
    /// existing one owned by another user refused, one of ours made 0700.
    pub private_dir: bool,
}

impl Default for UnixSocketOptions {
    fn default() -> Self {
        UnixSocketOptions { mode: 0o600, group: None, private_dir: false }
    }
}

fn other(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, msg)
}

/// Creates `dir` (and missing parents) with mode 0700; with `private`, an
/// existing `dir` must be ours and is made 0700.
fn socket_dir(dir: &std::path::Path, private: bool) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(std::io::Error::new(e.kind(), format!("creating {}: {e}", dir.display()))),
    }
    if private {
        let meta = std::fs::symlink_metadata(dir)?;
        if !meta.is_dir() {
            return Err(other(format!("{} is not a directory", dir.display())));
        }
        // `/proc/self` belongs to the process's effective user.
        let me = std::fs::metadata("/proc/self")?.uid();
        if meta.uid() != me {
            return Err(other(format!("{} belongs to uid {}, not to this user", dir.display(), meta.uid())));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Binds a Unix socket at `path` with `opts`'s mode and group.
fn bind_unix(path: &std::path::Path, opts: &UnixSocketOptions) -> std::io::Result<tokio::net::UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(".kvc{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    let placed = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(opts.mode))?;
        if let Some(gid) = opts.group {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// A bound listener. A Unix socket file is removed when the listener drops,
/// unless another listener has replaced it since (checked by inode).
pub enum Listener {
    Unix { listener: tokio::net::UnixListener, path: PathBuf, inode: u64 },
    Tcp { listener: tokio::net::TcpListener, tls: Option<TlsAcceptor> },
}

/// An accepted connection before its streams are set up: a TLS handshake,
/// if any, is still to come, so the accept loop never waits on a peer.
pub enum Incoming {
    Unix(tokio::net::UnixStream, PeerCredentials),
    Tcp(tokio::net::TcpStream, std::net::SocketAddr, Option<TlsAcceptor>),
}

impl Incoming {
    /// A label for logs: `unix` (with the peer's uid) or the TCP address.
    pub fn label(&self) -> String {
        match self {
            Incoming::Unix(_, c) => format!("unix(uid {})", c.uid),
            Incoming::Tcp(_, addr, None) => addr.to_string(),
            Incoming::Tcp(_, addr, Some(_)) => format!("{addr} (tls)"),
        }
    }

    /// The peer's credentials (Unix sockets only).
    pub fn credentials(&self) -> Option<PeerCredentials> {
        match self {
            Incoming::Unix(_, c) => Some(*c),
            Incoming::Tcp(..) => None,
        }
    }

    /// Whether the connection is (or will be, once set up) encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Incoming::Tcp(_, _, Some(_)))
    }

    /// Sets up the frame streams; a TLS handshake must finish within `limit`.
    pub async fn into_frames(self, max_frame: u32, limit: Duration) -> std::io::Result<(FrameReader, FrameWriter)> {
        match self {
            Incoming::Unix(s, _) => Ok(unix_pair(s, max_frame)),
            Incoming::Tcp(s, _, None) => Ok(tcp_pair(s, max_frame)),
            Incoming::Tcp(s, _, Some(acceptor)) => {
                let tls = tokio::time::timeout(limit, acceptor.accept(s))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
                Ok(tls_pair(tls.into(), max_frame))
            }
        }
    }
}

impl Listener {
    /// Binds `endpoint`; a Unix socket gets mode 0600. A leftover Unix socket
    /// file from a dead server is replaced; one that a live server still
    /// answers on is an error.
    pub async fn bind(endpoint: &Endpoint) -> std::io::Result<Listener> {
        Self::bind_with(endpoint, &UnixSocketOptions::default()).await
    }

    /// [`Listener::bind`] with how to create a Unix socket file.
    pub async fn bind_with(endpoint: &Endpoint, opts: &UnixSocketOptions) -> std::io::Result<Listener> {
        match endpoint {
            Endpoint::Unix(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    socket_dir(dir, opts.private_dir)?;
                }
                if std::fs::symlink_metadata(path).is_ok() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("a server is already listening on {}", path.display()),
                        ));
                    }
                    match std::fs::remove_file(path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                let listener = bind_unix(path, opts)?;
                let inode = std::fs::metadata(path)?.ino();
                Ok(Listener::Unix { listener, path: path.clone(), inode })
            }
            Endpoint::Tcp(addr) => {
                Ok(Listener::Tcp { listener: tokio::net::TcpListener::bind(addr).await?, tls: None })
            }
        }
    }

    /// Binds a TCP address whose connections speak TLS with `acceptor`.
    pub async fn bind_tls(addr: &str, acceptor: TlsAcceptor) -> std::io::Result<Listener> {
        Ok(Listener::Tcp { listener: tokio::net::TcpListener::bind(addr).await?, tls: Some(acceptor) })
    }

    /// The endpoint actually bound (with the real port for `:0`).
    pub fn local_endpoint(&self) -> Endpoint {
        match self {
            Listener::Unix { path, .. } => Endpoint::Unix(path.clone()),
            Listener::Tcp { listener, .. } => {
                Endpoint::Tcp(listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".to_string()))
            }
        }
    }

    /// Accepts one connection, not set up yet (see [`Incoming::into_frames`]).
    pub async fn accept_incoming(&self) -> std::io::Result<Incoming> {
        match self {
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept().await?;
                let c = peer_credentials(&s)?;
                Ok(Incoming::Unix(s, c))
            }
            Listener::Tcp { listener, tls } => {
                let (s, addr) = listener.accept().await?;
                Ok(Incoming::Tcp(s, addr, tls.clone()))
            }
        }
    }

    /// Accepts one connection; returns its frame halves and a peer label
    /// (a TLS handshake, if any, is done here: servers with many peers use
    /// [`Listener::accept_incoming`] so that no peer holds up the loop).
    pub async fn accept(&self, max_frame: u32) -> std::io::Result<(FrameReader, FrameWriter, String)> {
        let incoming = self.accept_incoming().await?;
        let label = incoming.label();
        let (r, w) = incoming.into_frames(max_frame, Duration::from_secs(5)).await?;
        Ok((r, w, label))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, inode, .. } = self {
            if std::fs::metadata(&*path).is_ok_and(|m| m.ino() == *inode) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
