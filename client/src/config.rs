//! Client settings: where the coordinator is, the credentials to present,
//! and how long each kind of request may take. Plain data; nothing here
//! talks to the network.

use std::path::Path;
use std::time::Duration;

use kvcoord_transport::tls::ClientTls;
use kvcoord_transport::{Endpoint, ErrorKind, ReconnectOptions, WireError};

/// Client settings.
#[derive(Clone)]
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
    /// The token presented in the handshake (a tenant's, or the admin's):
    /// required over TCP, optional on the Unix socket. Overrides
    /// `reconnect.connect.token`.
    pub token: Option<String>,
    /// TLS for a TCP endpoint, trusting only the given CAs (see
    /// [`ClientConfig::with_tls_ca`]). Overrides `reconnect.connect.tls`.
    pub tls: Option<ClientTls>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint)
            .field("reconnect", &self.reconnect)
            .field("request_timeout", &self.request_timeout)
            .field("register_timeout", &self.register_timeout)
            .field("disconnected_wait", &self.disconnected_wait)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ClientConfig {
    pub fn new(endpoint: Endpoint) -> Self {
        ClientConfig {
            endpoint,
            reconnect: ReconnectOptions::default(),
            request_timeout: Duration::from_secs(10),
            register_timeout: Duration::from_secs(30),
            disconnected_wait: Duration::from_millis(20),
            token: None,
            tls: None,
        }
    }

    /// Presents `token` in the handshake.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Speaks TLS to a TCP endpoint, verifying the server's certificate
    /// against the CA certificates (PEM) in `ca` only. A CA file that cannot
    /// be read or holds no certificate is `InvalidArgument`.
    pub fn with_tls_ca(mut self, ca: &Path) -> Result<Self, WireError> {
        let tls = kvcoord_transport::tls::client_config(ca)
            .map_err(|e| WireError::new(ErrorKind::InvalidArgument, format!("TLS CA: {e}")))?;
        self.tls = Some(tls);
        Ok(self)
    }

    /// The connection options with this configuration's credentials.
    pub fn reconnect_options(&self) -> ReconnectOptions {
        let mut r = self.reconnect.clone();
        if self.token.is_some() {
            r.connect.token.clone_from(&self.token);
        }
        if self.tls.is_some() {
            r.connect.tls.clone_from(&self.tls);
        }
        r
    }
}

/// Parses an endpoint URL strictly: `unix:///path/to/socket` (or
/// `unix:/path`) or `tcp://host:port`. Anything else is `InvalidArgument`
/// (the transport's own parser also takes a bare path; bindings use this one
/// so that a typo is an error, not a socket path).
pub fn parse_endpoint(url: &str) -> Result<Endpoint, WireError> {
    let bad = |why: &str| {
        WireError::new(
            ErrorKind::InvalidArgument,
            format!("endpoint {url:?}: {why}; expected unix:///path/to/socket or tcp://host:port"),
        )
    };
    if let Some(addr) = url.strip_prefix("tcp://") {
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() || host.contains('/') {
            return Err(bad("no host"));
        }
        port.parse::<u16>().map_err(|_| bad("the port is not a number from 0 to 65535"))?;
        Ok(Endpoint::Tcp(addr.to_string()))
    } else if let Some(path) = url.strip_prefix("unix://").or_else(|| url.strip_prefix("unix:")) {
        if path.is_empty() {
            return Err(bad("empty socket path"));
        }
        Ok(Endpoint::Unix(path.into()))
    } else {
        Err(bad("unknown scheme"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_strictly() {
        assert_eq!(parse_endpoint("unix:///tmp/kv.sock").unwrap(), Endpoint::Unix("/tmp/kv.sock".into()));
        assert_eq!(parse_endpoint("unix:/tmp/kv.sock").unwrap(), Endpoint::Unix("/tmp/kv.sock".into()));
        assert_eq!(parse_endpoint("tcp://127.0.0.1:7070").unwrap(), Endpoint::Tcp("127.0.0.1:7070".into()));
        assert_eq!(parse_endpoint("tcp://[::1]:7070").unwrap(), Endpoint::Tcp("[::1]:7070".into()));
        for bad in
            ["", "/tmp/kv.sock", "http://x:1", "unix://", "tcp://host", "tcp://:80", "tcp://h:99999", "tcp://h:x"]
        {
            let e = parse_endpoint(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad}");
            assert!(e.message.contains("expected unix:///"), "{}", e.message);
        }
    }
}
