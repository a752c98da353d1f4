//! The coordinator's configuration: defaults, the TOML file, and validation.
//! Flags (in the binary) override the file, which overrides the defaults.
//! This module must never start anything.

use std::path::PathBuf;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Which copy backend serves registered memory.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// CUDA when a driver is present, else the host backend.
    Auto,
    /// Shared-memory KV caches, CPU copies.
    Host,
    /// CUDA IPC KV caches, GPU copies.
    Cuda,
}

/// How a device's copy lane (its GPU worker) moves blocks between device
/// memory and pinned L1: the configurable subset of the engine's
/// [`CopyMethod`](kvcoord_memory::cuda::CopyMethod), with the same names.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GpuCopy {
    /// The copy kernel gathers into a device staging buffer, then one
    /// contiguous DMA per object (and the reverse); 64 MiB of device memory
    /// per stream. [`CopyMethod::Staged`](kvcoord_memory::cuda::CopyMethod::Staged).
    Staged,
    /// The copy kernel copies straight between device blocks and pinned host
    /// memory; no device memory of its own.
    /// [`CopyMethod::Direct`](kvcoord_memory::cuda::CopyMethod::Direct).
    Direct,
}

impl GpuCopy {
    /// The engine's method of the same name.
    pub fn method(self) -> kvcoord_memory::cuda::CopyMethod {
        self.into()
    }
}

impl From<GpuCopy> for kvcoord_memory::cuda::CopyMethod {
    fn from(c: GpuCopy) -> Self {
        match c {
            GpuCopy::Staged => kvcoord_memory::cuda::CopyMethod::Staged,
            GpuCopy::Direct => kvcoord_memory::cuda::CopyMethod::Direct,
        }
    }
}

/// Log line format.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Everything a coordinator needs to start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Unix socket path clients connect to. Default: [`default_socket_path`].
    pub socket: PathBuf,
    /// Permission bits of the Unix socket file, in octal (`"0600"`: only the
    /// server's user may connect), set whatever the umask.
    pub socket_mode: String,
    /// Group (name or numeric id) given the Unix socket file; with a
    /// `socket_mode` like `"0660"`, its members may connect too.
    pub socket_group: Option<String>,
    /// Most client connections open at once (handshaking or not); the next
    /// one gets a `Refused(Unavailable)` frame and is closed.
    pub max_connections: u32,
    /// Milliseconds after which a connection with no request in flight that
    /// sent nothing is closed (`Refused(Timeout)`); 0: never.
    pub idle_timeout_ms: u64,
    /// Requests of one connection served at once; beyond it the server stops
    /// reading that connection until replies have been written.
    pub max_in_flight_per_session: u32,
    /// Optional TCP address (`host:port`) as well.
    pub tcp: Option<String>,
    /// L1 capacity.
    #[serde(serialize_with = "exact_size")]
    pub l1_size: ByteSize,
    /// Take (and, on CUDA, pin) all of L1 at start instead of as it fills, so
    /// no store pays for page pinning.
    pub l1_prealloc: bool,
    /// Tokens per chunk (a whole number of every layout's blocks).
    pub chunk_tokens: u32,
    pub backend: BackendChoice,
    /// Host copy lanes (copy-lane actors for memfd memory).
    pub copy_lanes: u32,
    /// CUDA streams per direction (store, retrieve) of each GPU worker.
    pub gpu_streams: u32,
    /// How GPU workers copy.
    pub gpu_copy: GpuCopy,
    /// How long a closed connection's instances are kept for a reconnect.
    pub grace_ms: u64,
    /// How long a lookup's lease pins its chunks at most.
    pub lease_ttl_ms: u64,
    pub max_frame_bytes: u32,
    pub max_chunks_per_request: u32,
    /// Upper bound on any request's deadline.
    pub max_deadline_ms: u64,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout_ms: u64,
    /// Accept fault-injection requests (tests only).
    pub fault_injection: bool,
    pub log_format: LogFormat,
    /// Admin HTTP API address (`host:port`), or `off`.
    pub admin: String,
    /// Directory of the disk tier (off when unset).
    pub disk_dir: Option<PathBuf>,
    /// Capacity of the disk tier.
    #[serde(serialize_with = "exact_size")]
    pub disk_size: ByteSize,
    /// The admin token: the bearer token of the admin HTTP API (`POST
    /// /clear`, the full `/status`) and, presented in a client's hello, the
    /// admin role on the socket and TCP (clear, fault injection, full
    /// status). Without one (and without `admin_token_file`) nobody has the
    /// admin role. Redacted by `--print-config`.
    pub admin_token: Option<String>,
    /// The shared remote tier on one Redis/Valkey server:
    /// `redis://[user:pass@]host:port[/db]`, or `rediss://` for TLS (off
    /// when unset).
    pub remote: Option<String>,
    /// The shared remote tier on a Redis Cluster: seed node URLs.
    pub remote_cluster: Vec<String>,
    /// Limit of every call to the remote tier (never past a request's deadline).
    pub remote_timeout_ms: u64,
    /// Bytes of objects waiting to be written to the remote tier at most
    /// (they hold L1 memory; at most a quarter of L1 is used); beyond it the
    /// oldest pending writes are dropped.
    pub remote_queue_size: ByteSize,
    /// Writes to the remote tier in flight at once.
    pub remote_writers: u32,
    /// Prefix of every remote key: coordinators share objects only under
    /// the same prefix.
    pub remote_key_prefix: String,
    /// A file holding the admin token (its first line), instead of
    /// `admin_token` on the command line.
    pub admin_token_file: Option<PathBuf>,
    /// A file holding the token (its first line) of the default tenant
    /// (`default`): what TCP clients present. Unix socket peers that send no
    /// token are the default tenant too.
    pub token_file: Option<PathBuf>,
    /// Unix socket peers (by `SO_PEERCRED` uid) allowed to connect, besides
    /// root. Empty: only the server's own uid (and root).
    pub allowed_uids: Vec<u32>,
    /// Unix socket peers allowed by their primary gid (`SO_PEERCRED`).
    pub allowed_gids: Vec<u32>,
    /// TLS certificate chain (PEM) for the TCP listener; required with
    /// `tls_key` when `tcp` is not a loopback address.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the TCP listener.
    pub tls_key: Option<PathBuf>,
    /// L1 bytes the default tenant may hold (none: no cap but L1's size).
    pub l1_quota: Option<ByteSize>,
    /// Further tenants, each with its own token, namespace and quota
    /// (`[[tenants]]` tables).
    pub tenants: Vec<TenantConfig>,
}

/// One tenant: a token that maps to it, its namespace of cached chunks and
/// its share of L1.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Its name (in metrics, logs and the welcome); `default` is taken.
    pub name: String,
    /// A file holding its token (first line).
    pub token_file: PathBuf,
    /// L1 bytes its chunks may take; beyond it its own least recently used
    /// chunks are evicted first. None: no cap but L1's size.
    #[serde(default)]
    pub l1_quota: Option<ByteSize>,
    /// The namespace its chunks live in: tenants naming the same namespace
    /// share (and can read) each other's chunks; by default a tenant's
    /// namespace is its own name. `default` is the default tenant's.
    #[serde(default)]
    pub namespace: Option<String>,
}

impl TenantConfig {
    /// The namespace its chunks live in.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(&self.name)
    }
}

/// The name of the tenant of token-less Unix socket peers and of `token_file`.
pub const DEFAULT_TENANT: &str = "default";

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: default_socket_path(),
            socket_mode: "0600".to_string(),
            socket_group: None,
            max_connections: 1024,
            idle_timeout_ms: 300_000,
            max_in_flight_per_session: 1024,
            tcp: None,
            l1_size: ByteSize::gib(1),
            l1_prealloc: false,
            chunk_tokens: 256,
            backend: BackendChoice::Auto,
            copy_lanes: 2,
            gpu_streams: kvcoord_memory::cuda::engine::DEFAULT_STREAMS_PER_DIRECTION as u32,
            gpu_copy: GpuCopy::Staged,
            grace_ms: 5_000,
            lease_ttl_ms: 10_000,
            max_frame_bytes: kvcoord_transport::frame::DEFAULT_MAX_FRAME_BYTES,
            max_chunks_per_request: 4096,
            max_deadline_ms: 120_000,
            shutdown_timeout_ms: 5_000,
            fault_injection: false,
            log_format: LogFormat::Human,
            admin: "127.0.0.1:9464".to_string(),
            disk_dir: None,
            disk_size: ByteSize::gib(100),
            admin_token: None,
            remote: None,
            remote_cluster: Vec::new(),
            remote_timeout_ms: 1_000,
            remote_queue_size: ByteSize::mib(256),
            remote_writers: 4,
            remote_key_prefix: "kvcoord".to_string(),
            admin_token_file: None,
            token_file: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            tls_cert: None,
            tls_key: None,
            l1_quota: None,
            tenants: Vec::new(),
        }
    }
}

/// Whether `addr` (`host:port`) can only be reached from this host.
pub fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Writes a byte size exactly, in the largest binary unit that divides it
/// (`"64 GiB"`, `"1536 MiB"`, `"1000001 B"`), so that `--print-config`
/// reads back as the same configuration: `ByteSize`'s own text rounds to
/// one decimal (1000001 bytes printed as "976.6 KiB" read back as 1000038).
fn exact_size<S: serde::Serializer>(size: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
    let bytes = size.as_u64();
    let units =
        [(1u64 << 60, "EiB"), (1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    let text = match units.iter().find(|(unit, _)| bytes != 0 && bytes.is_multiple_of(*unit)) {
        Some((unit, name)) => format!("{} {name}", bytes / unit),
        None => format!("{bytes} B"),
    };
    s.serialize_str(&text)
}

/// The directory of the default socket: `$XDG_RUNTIME_DIR/kvcoord` when the
/// session has a runtime directory, else `/run/kvcoord`. The server creates
/// it with mode 0700 and refuses one that another user owns.
pub fn default_socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("kvcoord"),
        None => PathBuf::from("/run/kvcoord"),
    }
}

/// The default Unix socket: `kvcoord.sock` in [`default_socket_dir`].
pub fn default_socket_path() -> PathBuf {
    default_socket_dir().join("kvcoord.sock")
}

/// The longest time any `*_ms` setting may name (30 days): longer ones would
/// overflow a deadline computed from them.
pub const MAX_MS: u64 = 30 * 24 * 3600 * 1000;

/// Parses permission bits written in octal (`"0600"`, `"660"`, `"0o660"`).
pub fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777)
}

/// URL schemes of the remote tier (`s`: TLS).
const REMOTE_SCHEMES: [&str; 4] = ["redis", "rediss", "valkey", "valkeys"];

fn check_remote_url(url: &str) -> Result<(), String> {
    let u = url::Url::parse(url).map_err(|e| format!("{}: {e}", redact_url(url)))?;
    if !REMOTE_SCHEMES.contains(&u.scheme()) {
        return Err(format!(
            "{}: the scheme must be redis://, rediss:// (TLS), valkey:// or valkeys://",
            redact_url(url)
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{}: names no host", redact_url(url)));
    }
    Ok(())
}

/// `url` with its password (if any) replaced by `***`; text that is not a
/// URL is returned whole only if it has no `@` (which could hide one).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) if url.contains('@') => "<unparsable URL, redacted>".to_string(),
        Err(_) => url.to_string(),
    }
}

/// A configuration value that cannot be used; names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration `{key}`: {why}")]
pub struct ConfigError {
    pub key: &'static str,
    pub why: String,
}

impl ServerConfig {
    /// Reads a TOML file; keys not given keep their defaults.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { key: "config", why: format!("{}: {e}", path.display()) })?;
        toml::from_str(&text).map_err(|e| ConfigError { key: "config", why: format!("{}: {e}", path.display()) })
    }

    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why: &str| Err(ConfigError { key, why: why.to_string() });
        if self.chunk_tokens == 0 {
            return bad("chunk_tokens", "must be positive");
        }
        if self.chunk_tokens > 1 << 24 {
            return bad("chunk_tokens", "must be at most 16777216");
        }
        if !(1..=64).contains(&self.copy_lanes) {
            return bad("copy_lanes", "must be between 1 and 64");
        }
        if !(1..=16).contains(&self.gpu_streams) {
            return bad("gpu_streams", "must be between 1 and 16");
        }
        if self.l1_size.as_u64() < (1 << 20) {
            return bad("l1_size", "must be at least 1 MiB");
        }
        if self.max_frame_bytes < 4096 || self.max_frame_bytes > kvcoord_transport::frame::HARD_MAX_FRAME_BYTES {
            return bad("max_frame_bytes", "must be between 4 KiB and 64 MiB");
        }
        if self.max_chunks_per_request == 0 {
            return bad("max_chunks_per_request", "must be positive");
        }
        // Request deadlines are clamped to [1, max_deadline_ms].
        if self.max_deadline_ms == 0 {
            return bad("max_deadline_ms", "must be positive");
        }
        if self.socket.as_os_str().is_empty() {
            return bad("socket", "must not be empty");
        }
        // sun_path holds 108 bytes with the terminating NUL.
        if self.socket.as_os_str().len() > 107 {
            return bad("socket", "must be at most 107 bytes (the kernel's limit on a socket path)");
        }
        match parse_mode(&self.socket_mode) {
            None => return bad("socket_mode", "must be octal permission bits, e.g. \"0600\""),
            Some(m) if m & 0o600 != 0o600 => {
                return bad("socket_mode", "must let the owner read and write (0600 at least)")
            }
            Some(_) => {}
        }
        if self.socket_group.as_deref().is_some_and(str::is_empty) {
            return bad("socket_group", "must not be empty");
        }
        if self.tcp.as_deref().is_some_and(|a| a.is_empty() || !a.contains(':')) {
            return bad("tcp", "must be an address like 127.0.0.1:7070");
        }
        if !(1..=1 << 20).contains(&self.max_connections) {
            return bad("max_connections", "must be between 1 and 1048576");
        }
        if !(1..=1 << 20).contains(&self.max_in_flight_per_session) {
            return bad("max_in_flight_per_session", "must be between 1 and 1048576");
        }
        if self.idle_timeout_ms != 0 && self.idle_timeout_ms < 100 {
            return bad("idle_timeout_ms", "must be 0 (off) or at least 100");
        }
        if self.lease_ttl_ms == 0 {
            return bad("lease_ttl_ms", "must be positive (a lease of 0 ms pins nothing)");
        }
        for (key, v) in [
            ("grace_ms", self.grace_ms),
            ("lease_ttl_ms", self.lease_ttl_ms),
            ("max_deadline_ms", self.max_deadline_ms),
            ("shutdown_timeout_ms", self.shutdown_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if v > MAX_MS {
                return bad(key, "must be at most 30 days (2592000000 ms)");
            }
        }
        if let Some(addr) = self.admin_addr() {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return bad("admin", "must be `off` or an address like 127.0.0.1:9464");
            }
        }
        if self.disk_dir.is_some() && self.disk_size.as_u64() < (1 << 20) {
            return bad("disk_size", "must be at least 1 MiB");
        }
        if self.admin_token.as_deref().is_some_and(str::is_empty) {
            return bad("admin_token", "must not be empty");
        }
        if self.remote.is_some() && !self.remote_cluster.is_empty() {
            return bad("remote", "give `remote` (one server) or `remote_cluster` (seed nodes), not both");
        }
        if let Some(url) = &self.remote {
            check_remote_url(url).map_err(|why| ConfigError { key: "remote", why })?;
        }
        for url in &self.remote_cluster {
            check_remote_url(url).map_err(|why| ConfigError { key: "remote_cluster", why })?;
        }
        if !(1..=600_000).contains(&self.remote_timeout_ms) {
            return bad("remote_timeout_ms", "must be between 1 and 600000");
        }
        if self.remote_queue_size.as_u64() < (1 << 20) {
            return bad("remote_queue_size", "must be at least 1 MiB");
        }
        if !(1..=256).contains(&self.remote_writers) {
            return bad("remote_writers", "must be between 1 and 256");
        }
        if self.remote_key_prefix.is_empty()
            || self.remote_key_prefix.len() > 64
            || !self.remote_key_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return bad("remote_key_prefix", "must be 1 to 64 characters of letters, digits, `-`, `_` or `.`");
        }
        if self.admin_token.is_some() && self.admin_token_file.is_some() {
            return bad("admin_token_file", "give the admin token once: admin_token or admin_token_file");
        }
        self.validate_access()
    }

    /// The access-control keys: tenants, tokens, TCP and TLS.
    fn validate_access(&self) -> Result<(), ConfigError> {
        let bad = |key, why: String| Err(ConfigError { key, why });
        let mut names = std::collections::HashSet::from([DEFAULT_TENANT]);
        if self.tenants.len() > 1024 {
            return bad("tenants", "at most 1024 tenants".into());
        }
        for t in &self.tenants {
            let ok = |s: &str| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic());
            if !ok(&t.name) || !ok(t.namespace()) {
                return bad(
                    "tenants",
                    format!("tenant {:?}: names and namespaces are 1-64 printable ASCII characters", t.name),
                );
            }
            if !names.insert(&t.name) {
                return bad("tenants", format!("tenant name {:?} is taken (`default` is the default tenant)", t.name));
            }
            if t.l1_quota.is_some_and(|q| q.as_u64() == 0) {
                return bad("tenants", format!("tenant {:?}: l1_quota must be positive", t.name));
            }
        }
        if self.l1_quota.is_some_and(|q| q.as_u64() == 0) {
            return bad("l1_quota", "must be positive".into());
        }
        if let Some(tcp) = &self.tcp {
            if self.token_file.is_none() && self.tenants.is_empty() {
                return bad(
                    "tcp",
                    "a TCP listener needs a token: set token_file (or [[tenants]]); TCP clients must present one"
                        .into(),
                );
            }
            if !is_loopback(tcp) && (self.tls_cert.is_none() || self.tls_key.is_none()) {
                return bad(
                    "tcp",
                    format!("{tcp} is not a loopback address: set tls_cert and tls_key (TLS is required off-host)"),
                );
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_key", "tls_cert and tls_key go together".into());
        }
        if self.tls_cert.is_some() && self.tcp.is_none() {
            return bad("tls_cert", "TLS is for the TCP listener: set tcp too".into());
        }
        Ok(())
    }

    /// Whether a remote tier is configured.
    pub fn remote_on(&self) -> bool {
        self.remote.is_some() || !self.remote_cluster.is_empty()
    }

    /// The configuration with secrets replaced (for `--print-config` and
    /// logs): every password in a remote URL by `***`, the admin token by
    /// `<redacted>`. Token files are paths, shown as they are.
    pub fn redacted(&self) -> ServerConfig {
        let mut c = ServerConfig {
            remote: self.remote.as_deref().map(redact_url),
            remote_cluster: self.remote_cluster.iter().map(|u| redact_url(u)).collect(),
            ..self.clone()
        };
        if c.admin_token.is_some() {
            c.admin_token = Some("<redacted>".into());
        }
        c
    }

    /// The admin API address, unless it is `off`.
    pub fn admin_addr(&self) -> Option<&str> {
        (self.admin != "off").then_some(self.admin.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_only_what_it_names() {
        let c: ServerConfig = toml::from_str("l1_size = \"64MiB\"\nchunk_tokens = 128").unwrap();
        assert_eq!(c.l1_size, ByteSize::mib(64));
        assert_eq!(c.chunk_tokens, 128);
        assert_eq!(c.copy_lanes, ServerConfig::default().copy_lanes);
    }

    /// Found by the `config` fuzz target (`fuzz/regressions/config/`):
    /// sizes that are no one-decimal multiple of a unit were printed rounded.
    #[test]
    fn printed_byte_sizes_read_back_exactly() {
        for bytes in [0, 1, 1_000_001, 1 << 30, 3 << 29, (1 << 40) + 1, u64::MAX, 1 << 60, 1_234 << 10] {
            let c = ServerConfig { l1_size: ByteSize(bytes), disk_size: ByteSize(bytes ^ 1), ..Default::default() };
            let printed = toml::to_string_pretty(&c).unwrap();
            let back: ServerConfig = toml::from_str(&printed).unwrap();
            assert_eq!((back.l1_size, back.disk_size), (c.l1_size, c.disk_size), "{printed}");
        }
        let printed = toml::to_string_pretty(&ServerConfig::default()).unwrap();
        assert!(printed.contains("l1_size = \"1 GiB\""), "{printed}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        assert!(toml::from_str::<ServerConfig>("l1_sise = 3").unwrap_err().to_string().contains("l1_sise"));
        let c = ServerConfig { copy_lanes: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().key, "copy_lanes");
    }

    #[test]
    fn values_that_would_panic_later_are_refused() {
        assert!(ServerConfig::default().validate().is_ok());
        let c = ServerConfig { max_deadline_ms: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().key, "max_deadline_ms", "clamp(1, 0) would panic on every request");
        let c = ServerConfig { max_deadline_ms: 1, ..Default::default() };
        assert!(c.validate().is_ok());
        let c = ServerConfig { max_chunks_per_request: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().key, "max_chunks_per_request");
        let c = ServerConfig { max_frame_bytes: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().key, "max_frame_bytes");
        let c = ServerConfig { chunk_tokens: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().key, "chunk_tokens");
    }

    #[test]
    fn caps_timeouts_and_socket_settings_are_validated_naming_the_key() {
        let key = |c: ServerConfig| c.validate().unwrap_err().key;
        let d = ServerConfig::default;
        assert_eq!(key(ServerConfig { max_connections: 0, ..d() }), "max_connections");
        assert_eq!(key(ServerConfig { max_connections: u32::MAX, ..d() }), "max_connections");
        assert_eq!(key(ServerConfig { max_in_flight_per_session: 0, ..d() }), "max_in_flight_per_session");
        assert_eq!(key(ServerConfig { idle_timeout_ms: 5, ..d() }), "idle_timeout_ms");
        assert!(ServerConfig { idle_timeout_ms: 0, ..d() }.validate().is_ok(), "0 turns the idle timeout off");
        assert_eq!(key(ServerConfig { idle_timeout_ms: u64::MAX, ..d() }), "idle_timeout_ms");
        assert_eq!(key(ServerConfig { lease_ttl_ms: 0, ..d() }), "lease_ttl_ms");
        assert_eq!(key(ServerConfig { lease_ttl_ms: u64::MAX, ..d() }), "lease_ttl_ms", "Instant + ttl would panic");
        assert_eq!(key(ServerConfig { grace_ms: u64::MAX, ..d() }), "grace_ms");
        assert_eq!(key(ServerConfig { max_deadline_ms: u64::MAX, ..d() }), "max_deadline_ms");
        assert_eq!(key(ServerConfig { shutdown_timeout_ms: u64::MAX, ..d() }), "shutdown_timeout_ms");
        assert_eq!(key(ServerConfig { chunk_tokens: u32::MAX, ..d() }), "chunk_tokens");
        for bad_mode in ["", "rw", "0800", "1777", "0400", "0o000", "12345"] {
            assert_eq!(key(ServerConfig { socket_mode: bad_mode.into(), ..d() }), "socket_mode", "{bad_mode:?}");
        }
        for good_mode in ["0600", "660", "0o660", "0777"] {
            assert!(ServerConfig { socket_mode: good_mode.into(), ..d() }.validate().is_ok(), "{good_mode}");
        }
        assert_eq!(key(ServerConfig { socket_group: Some(String::new()), ..d() }), "socket_group");
        assert_eq!(key(ServerConfig { socket: PathBuf::from("/".repeat(200)), ..d() }), "socket");
        assert_eq!(key(ServerConfig { tcp: Some("7070".into()), ..d() }), "tcp");
        assert_eq!(key(ServerConfig { copy_lanes: 65, ..d() }), "copy_lanes");
        assert_eq!(key(ServerConfig { gpu_streams: 0, ..d() }), "gpu_streams");
        assert_eq!(key(ServerConfig { l1_size: ByteSize::kib(4), ..d() }), "l1_size");
        assert_eq!(key(ServerConfig { max_frame_bytes: u32::MAX, ..d() }), "max_frame_bytes");
        assert_eq!(key(ServerConfig { admin: "nowhere".into(), ..d() }), "admin");
        assert_eq!(key(ServerConfig { admin_token: Some(String::new()), ..d() }), "admin_token");
        let disk = ServerConfig { disk_dir: Some("/tmp/x".into()), disk_size: ByteSize::kib(1), ..d() };
        assert_eq!(key(disk), "disk_size");
    }

    #[test]
    fn remote_settings_are_validated_and_passwords_never_printed() {
        let key = |c: ServerConfig| c.validate().unwrap_err().key;
        let d = ServerConfig::default;
        let ok = ServerConfig { remote: Some("redis://user:s3cret@127.0.0.1:6379/2".into()), ..d() };
        assert!(ok.validate().is_ok());
        assert!(ServerConfig { remote: Some("rediss://h:6380".into()), ..d() }.validate().is_ok());
        assert_eq!(key(ServerConfig { remote: Some("http://h:1".into()), ..d() }), "remote");
        assert_eq!(key(ServerConfig { remote: Some("not a url".into()), ..d() }), "remote");
        let both = ServerConfig { remote_cluster: vec!["redis://a:1".into()], ..ok.clone() };
        assert_eq!(key(both), "remote");
        assert_eq!(key(ServerConfig { remote_cluster: vec!["redis://".into()], ..d() }), "remote_cluster");
        assert_eq!(key(ServerConfig { remote_timeout_ms: 0, ..d() }), "remote_timeout_ms");
        assert_eq!(key(ServerConfig { remote_writers: 0, ..d() }), "remote_writers");
        assert_eq!(key(ServerConfig { remote_key_prefix: "a b".into(), ..d() }), "remote_key_prefix");
        assert_eq!(key(ServerConfig { remote_queue_size: ByteSize::kib(1), ..d() }), "remote_queue_size");

        let cluster = vec!["redis://:pw1@h1:1".to_string(), "rediss://u:pw2@h2:2".to_string()];
        let printed = toml::to_string(&ServerConfig { remote_cluster: cluster, ..ok }.redacted()).unwrap();
        assert!(!printed.contains("s3cret") && !printed.contains("pw1") && !printed.contains("pw2"), "{printed}");
        assert!(printed.contains("redis://user:***@127.0.0.1:6379/2"), "{printed}");
        assert_eq!(redact_url("garbage@host"), "<unparsable URL, redacted>");
    }

    #[test]
    fn the_default_socket_lives_in_a_private_runtime_directory() {
        let p = default_socket_path();
        assert_eq!(p.file_name().unwrap(), "kvcoord.sock");
        assert_eq!(p.parent().unwrap(), default_socket_dir());
        assert!(default_socket_dir().ends_with("kvcoord"));
        assert_eq!(parse_mode("0600"), Some(0o600));
        assert_eq!(parse_mode("0o660"), Some(0o660));
    }

    #[test]
    fn tcp_needs_a_token_and_off_loopback_tls_and_tenants_are_checked() {
        let key = |c: ServerConfig| c.validate().unwrap_err().key;
        let d = ServerConfig::default;
        let token = || Some(PathBuf::from("/etc/kvcoord/t"));
        assert_eq!(key(ServerConfig { tcp: Some("127.0.0.1:7070".into()), ..d() }), "tcp", "no token");
        assert!(ServerConfig { tcp: Some("127.0.0.1:7070".into()), token_file: token(), ..d() }.validate().is_ok());
        assert!(ServerConfig { tcp: Some("localhost:7070".into()), token_file: token(), ..d() }.validate().is_ok());
        assert!(ServerConfig { tcp: Some("[::1]:7070".into()), token_file: token(), ..d() }.validate().is_ok());
        for public in ["0.0.0.0:7070", "10.1.2.3:7070", "[::]:7070", "myhost:7070"] {
            let c = ServerConfig { tcp: Some(public.into()), token_file: token(), ..d() };
            assert_eq!(c.validate().unwrap_err().key, "tcp", "{public} without TLS");
            let tls = ServerConfig { tls_cert: token(), tls_key: token(), ..c };
            assert!(tls.validate().is_ok(), "{public} with TLS");
        }
        let c = ServerConfig { tcp: Some("127.0.0.1:1".into()), token_file: token(), tls_cert: token(), ..d() };
        assert_eq!(key(c), "tls_key", "a certificate without its key");
        assert_eq!(key(ServerConfig { tls_cert: token(), tls_key: token(), ..d() }), "tls_cert", "TLS without TCP");
        let tenant = |name: &str| TenantConfig {
            name: name.into(),
            token_file: PathBuf::from("/t"),
            l1_quota: None,
            namespace: None,
        };
        assert_eq!(key(ServerConfig { tenants: vec![tenant("default")], ..d() }), "tenants", "the default's name");
        assert_eq!(key(ServerConfig { tenants: vec![tenant("a"), tenant("a")], ..d() }), "tenants");
        assert_eq!(key(ServerConfig { tenants: vec![tenant("a b")], ..d() }), "tenants", "printable, no spaces");
        let zero = TenantConfig { l1_quota: Some(ByteSize::b(0)), ..tenant("a") };
        assert_eq!(key(ServerConfig { tenants: vec![zero], ..d() }), "tenants");
        assert_eq!(key(ServerConfig { l1_quota: Some(ByteSize::b(0)), ..d() }), "l1_quota");
        let both = ServerConfig { admin_token: Some("x".into()), admin_token_file: token(), ..d() };
        assert_eq!(key(both), "admin_token_file");
        let tcp_by_tenant = ServerConfig { tcp: Some("127.0.0.1:1".into()), tenants: vec![tenant("a")], ..d() };
        assert!(tcp_by_tenant.validate().is_ok(), "a tenant's token is a token");
    }

    #[test]
    fn print_config_redacts_the_admin_token_only() {
        let c = ServerConfig {
            admin_token: Some("hunter2-hunter2".into()),
            token_file: Some("/t".into()),
            ..Default::default()
        };
        let text = toml::to_string_pretty(&c.redacted()).unwrap();
        assert!(!text.contains("hunter2") && text.contains("<redacted>"), "{text}");
        assert!(text.contains("token_file = \"/t\""), "paths stay: {text}");
    }
}
