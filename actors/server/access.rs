//! Who a connection is. In the handshake its credentials (the Unix socket
//! peer's uid and gid from `SO_PEERCRED`, and the token of its hello) become
//! a [`Principal`]: the tenant it acts as and whether it has the admin role.
//!
//! This module owns the tenant table and the tokens, loaded from their files
//! at start, and compares tokens in constant time (blake3 digests compared
//! with `subtle`, every token compared, so neither the position nor the
//! length of a match shows in the timing). It must never serve requests,
//! and never logs a token.
//!
//! Rules:
//! - Unix socket: the peer's uid must be root, the server's own uid, one of
//!   `allowed_uids`, or its gid one of `allowed_gids`; else
//!   `Refused(Unauthorized)`. A token is optional; without one the peer is
//!   the default tenant without the admin role.
//! - TCP (plain or TLS): a token is required.
//! - A token that matches nothing is `Refused(Unauthorized)`, wherever it
//!   comes from. The admin token gives the default tenant with the admin role.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kvcoord_transport::{ErrorKind, Hello, PeerCredentials, WireError};
use subtle::ConstantTimeEq;

use crate::config::{ConfigError, ServerConfig, DEFAULT_TENANT};

/// A tenant, by its index in the tenant table (0 is the default tenant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TenantId(pub u16);

impl TenantId {
    pub const DEFAULT: TenantId = TenantId(0);
}

/// Who a session acts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    pub tenant: TenantId,
    /// May clear, inject faults and see the full status.
    pub admin: bool,
}

/// One tenant as the server runs it.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    /// Tenants with the same namespace share chunks.
    pub namespace: String,
    /// L1 bytes its chunks may take.
    pub l1_quota: Option<u64>,
}

#[derive(Clone, Copy)]
enum Grants {
    Tenant(TenantId),
    Admin,
}

/// The tenants, the digests of their tokens, and who may use the socket.
pub struct AccessTable {
    tenants: Vec<Tenant>,
    tokens: Vec<([u8; 32], Grants)>,
    allowed_uids: Vec<u32>,
    allowed_gids: Vec<u32>,
}

/// How a connection reached the server.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Unix(PeerCredentials),
    Tcp,
}

fn digest(token: &[u8]) -> [u8; 32] {
    *blake3::hash(token).as_bytes()
}

/// The token in `path`: its first line, without surrounding whitespace.
fn read_token(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    let bad = |why: String| ConfigError { key, why: format!("{}: {why}", path.display()) };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(key, file = %path.display(), "a token file is readable by group or others; chmod 600 it");
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 {
        return Err(bad("the token must be at least 16 characters".into()));
    }
    Ok(token)
}

impl AccessTable {
    /// Loads every token file of `config`; a missing, unreadable or too
    /// short token, or one token given twice, is a configuration error.
    pub fn load(config: &ServerConfig) -> Result<AccessTable, ConfigError> {
        let mut tenants =
            vec![Tenant { name: DEFAULT_TENANT.into(), namespace: DEFAULT_TENANT.into(), l1_quota: None }];
        tenants[0].l1_quota = config.l1_quota.map(|q| q.as_u64());
        let mut tokens = Vec::new();
        if let Some(path) = &config.token_file {
            tokens.push((digest(read_token("token_file", path)?.as_bytes()), Grants::Tenant(TenantId::DEFAULT)));
        }
        let admin = match (&config.admin_token, &config.admin_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(read_token("admin_token_file", path)?),
            (None, None) => None,
        };
        if let Some(t) = admin {
            tokens.push((digest(t.as_bytes()), Grants::Admin));
        }
        for t in &config.tenants {
            let id = TenantId(tenants.len() as u16);
            tokens.push((digest(read_token("tenants", &t.token_file)?.as_bytes()), Grants::Tenant(id)));
            tenants.push(Tenant {
                name: t.name.clone(),
                namespace: t.namespace().to_string(),
                l1_quota: t.l1_quota.map(|q| q.as_u64()),
            });
        }
        for (i, (d, _)) in tokens.iter().enumerate() {
            if tokens[..i].iter().any(|(e, _)| e == d) {
                return Err(ConfigError { key: "tenants", why: "two credentials share one token".into() });
            }
        }
        // `/proc/self` belongs to the process's effective user.
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
        let mut allowed_uids = config.allowed_uids.clone();
        if allowed_uids.is_empty() {
            allowed_uids.push(me);
        }
        Ok(AccessTable { tenants, tokens, allowed_uids, allowed_gids: config.allowed_gids.clone() })
    }

    pub fn tenants(&self) -> &[Tenant] {
        &self.tenants
    }

    pub fn tenant(&self, id: TenantId) -> &Tenant {
        &self.tenants[id.0 as usize]
    }

    /// What `token` grants, comparing it with every known token in constant time.
    fn grants(&self, token: &str) -> Option<Grants> {
        let given = digest(token.as_bytes());
        let mut found = None;
        for (d, grants) in &self.tokens {
            if bool::from(d.ct_eq(&given)) {
                found = Some(*grants);
            }
        }
        found
    }

    /// Whether any admin token is configured.
    pub fn has_admin(&self) -> bool {
        self.tokens.iter().any(|(_, g)| matches!(g, Grants::Admin))
    }

    /// Whether `token` is the admin token (constant time).
    pub fn is_admin_token(&self, token: &str) -> bool {
        matches!(self.grants(token), Some(Grants::Admin))
    }

    /// Decides who the peer of a hello is, or why it may not connect.
    pub fn admit(&self, hello: &Hello, transport: Transport) -> Result<Principal, WireError> {
        let refuse = |msg: String| Err(WireError::new(ErrorKind::Unauthorized, msg));
        if let Transport::Unix(c) = transport {
            let allowed = c.uid == 0 || self.allowed_uids.contains(&c.uid) || self.allowed_gids.contains(&c.gid);
            if !allowed {
                return refuse(format!(
                    "uid {} (gid {}) may not use this socket (allowed_uids, allowed_gids)",
                    c.uid, c.gid
                ));
            }
        }
        match (hello.token.as_deref(), transport) {
            (None, Transport::Unix(_)) => Ok(Principal { tenant: TenantId::DEFAULT, admin: false }),
            (None, Transport::Tcp) => refuse("a TCP client must present a token".into()),
            (Some(token), _) => match self.grants(token) {
                Some(Grants::Tenant(tenant)) => Ok(Principal { tenant, admin: false }),
                Some(Grants::Admin) => Ok(Principal { tenant: TenantId::DEFAULT, admin: true }),
                None => refuse("wrong token".into()),
            },
        }
    }
}

/// The refusal of a privileged request from a session without the admin role.
pub fn needs_admin(what: &str) -> WireError {
    WireError::new(
        ErrorKind::PermissionDenied,
        format!("{what} needs the admin role: connect with the admin token (admin_token)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(token: Option<&str>) -> Hello {
        Hello { protocol: 4, client: "t".into(), token: token.map(str::to_string) }
    }

    fn table(dir: &Path) -> AccessTable {
        let write = |name: &str, token: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("{token}\n")).unwrap();
            p
        };
        let config = ServerConfig {
            token_file: Some(write("default", "default-token-0123456789")),
            admin_token: Some("admin-token-0123456789".into()),
            tenants: vec![crate::config::TenantConfig {
                name: "a".into(),
                token_file: write("a", "tenant-a-token-0123456789"),
                l1_quota: None,
                namespace: None,
            }],
            allowed_uids: vec![1000],
            ..Default::default()
        };
        AccessTable::load(&config).unwrap()
    }

    #[test]
    fn tokens_map_to_tenants_and_the_admin_role_and_wrong_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(dir.path());
        let tcp = Transport::Tcp;
        assert_eq!(t.admit(&hello(Some("tenant-a-token-0123456789")), tcp).unwrap().tenant, TenantId(1));
        assert_eq!(
            t.admit(&hello(Some("default-token-0123456789")), tcp).unwrap(),
            Principal { tenant: TenantId::DEFAULT, admin: false }
        );
        assert!(t.admit(&hello(Some("admin-token-0123456789")), tcp).unwrap().admin);
        assert_eq!(t.admit(&hello(Some("tenant-a-token-012345678")), tcp).unwrap_err().kind, ErrorKind::Unauthorized);
        assert_eq!(t.admit(&hello(None), tcp).unwrap_err().kind, ErrorKind::Unauthorized, "TCP needs a token");
        assert_eq!(t.tenant(TenantId(1)).namespace, "a");
    }

    #[test]
    fn unix_peers_are_checked_by_uid_and_gid_root_always_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(dir.path());
        let unix = |uid, gid| Transport::Unix(PeerCredentials { uid, gid, pid: None });
        assert_eq!(t.admit(&hello(None), unix(1000, 5)).unwrap().tenant, TenantId::DEFAULT);
        assert!(t.admit(&hello(None), unix(0, 0)).is_ok(), "root");
        assert_eq!(t.admit(&hello(None), unix(1001, 5)).unwrap_err().kind, ErrorKind::Unauthorized);
        let e = t.admit(&hello(Some("admin-token-0123456789")), unix(1001, 5)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized, "a token does not let a foreign uid in");
    }

    #[test]
    fn short_missing_or_shared_tokens_fail_start_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let c = ServerConfig { token_file: Some(short), ..Default::default() };
        assert_eq!(AccessTable::load(&c).err().unwrap().key, "token_file");
        let c = ServerConfig { token_file: Some(dir.path().join("missing")), ..Default::default() };
        assert_eq!(AccessTable::load(&c).err().unwrap().key, "token_file");
        let same = dir.path().join("same");
        std::fs::write(&same, "same-token-0123456789\n").unwrap();
        let c = ServerConfig {
            token_file: Some(same.clone()),
            tenants: vec![crate::config::TenantConfig {
                name: "b".into(),
                token_file: same,
                l1_quota: None,
                namespace: None,
            }],
            ..Default::default()
        };
        assert_eq!(AccessTable::load(&c).err().unwrap().key, "tenants");
    }
}
