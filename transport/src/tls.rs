//! TLS for TCP endpoints (rustls with the ring provider): the server's
//! acceptor from a PEM certificate chain and key, the client's connector
//! trusting the CAs of a PEM file (only those: a self-signed deployment
//! passes its own certificate).
//!
//! This module owns building TLS configurations from files. It must never
//! open sockets or speak the protocol; `endpoint.rs` wraps streams with what
//! it builds.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A client's TLS configuration (what [`client_config`] builds).
pub type ClientTls = Arc<ClientConfig>;

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> std::io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("{}: no PEM certificate in it", path.display())));
    }
    Ok(certs)
}

/// The server side: the certificate chain (`cert`, PEM, leaf first) and its
/// private key (`key`, PEM: PKCS#8, PKCS#1 or SEC1).
pub fn acceptor(cert: &Path, key: &Path) -> std::io::Result<TlsAcceptor> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(format!("{}: {e}", key.display())))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid(format!("certificate and key: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client side: trusts exactly the certificates in `ca` (PEM).
pub fn client_config(ca: &Path) -> std::io::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).map_err(|e| invalid(format!("{}: {e}", ca.display())))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A connector over `config`.
pub fn connector(config: Arc<ClientConfig>) -> TlsConnector {
    TlsConnector::from(config)
}

/// The name the server's certificate must carry for `addr` (`host:port`):
/// its host, a DNS name or an IP address.
pub fn server_name(addr: &str) -> std::io::Result<ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|e| invalid(format!("TLS server name {host:?}: {e}")))
}
