//! Where a coordinator listens: a Unix socket path (the default) or a TCP
//! address. This module owns parsing endpoints, connecting and binding; it
//! must never speak the protocol.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::stream::{tcp_pair, unix_pair, FrameReader, FrameWriter};

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

    /// Whether frames to this endpoint can carry file descriptors.
    pub fn passes_fds(&self) -> bool {
        matches!(self, Endpoint::Unix(_))
    }
}

/// A bound listener. A Unix socket file is removed when the listener drops,
/// unless another listener has replaced it since (checked by inode).
pub enum Listener {
    Unix { listener: tokio::net::UnixListener, path: PathBuf, inode: u64 },
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Binds `endpoint`. A leftover Unix socket file from a dead server is
    /// replaced; one that a live server still answers on is an error.
    pub async fn bind(endpoint: &Endpoint) -> std::io::Result<Listener> {
        match endpoint {
            Endpoint::Unix(path) => {
                if path.exists() {
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
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let listener = tokio::net::UnixListener::bind(path)?;
                let inode = std::fs::metadata(path)?.ino();
                Ok(Listener::Unix { listener, path: path.clone(), inode })
            }
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
        }
    }

    /// The endpoint actually bound (with the real port for `:0`).
    pub fn local_endpoint(&self) -> Endpoint {
        match self {
            Listener::Unix { path, .. } => Endpoint::Unix(path.clone()),
            Listener::Tcp(l) => {
                Endpoint::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".to_string()))
            }
        }
    }

    /// Accepts one connection; returns its frame halves and a peer label.
    pub async fn accept(&self, max_frame: u32) -> std::io::Result<(FrameReader, FrameWriter, String)> {
        match self {
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept().await?;
                let (r, w) = unix_pair(s, max_frame);
                Ok((r, w, "unix".to_string()))
            }
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let (r, w) = tcp_pair(s, max_frame);
                Ok((r, w, addr.to_string()))
            }
        }
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
