//! The `serve` command as a library function, so the `kvcoord` binary and
//! anything that must start a real coordinator process (the harness) run the
//! same code: flags, then `KVCOORD_*` environment variables, then the TOML
//! file, then defaults -> a validated [`ServerConfig`] -> a coordinator that
//! runs until SIGTERM or SIGINT.
//!
//! It must never hold coordinator logic: that is `server`.

use std::path::PathBuf;

use crate::config::{BackendChoice, LogFormat, ServerConfig};
use crate::Coordinator;

/// `kvcoord serve` options. Precedence: flag, then `KVCOORD_*` environment
/// variable, then the TOML file, then the default.
#[derive(clap::Args, Default)]
pub struct ServeArgs {
    /// TOML configuration file (keys as in `--print-config`).
    #[arg(long, env = "KVCOORD_CONFIG")]
    config: Option<PathBuf>,
    /// Unix socket path (default: `$XDG_RUNTIME_DIR/kvcoord/kvcoord.sock`,
    /// else `/run/kvcoord/kvcoord.sock`).
    #[arg(long, env = "KVCOORD_SOCKET")]
    socket: Option<PathBuf>,
    /// Permission bits of the socket file, octal (default 0600), whatever the umask.
    #[arg(long, env = "KVCOORD_SOCKET_MODE")]
    socket_mode: Option<String>,
    /// Group (name or id) given the socket file (with e.g. `--socket-mode 0660`).
    #[arg(long, env = "KVCOORD_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// Most client connections open at once; the next one is refused.
    #[arg(long, env = "KVCOORD_MAX_CONNECTIONS")]
    max_connections: Option<u32>,
    /// Milliseconds before an idle connection (nothing in flight, nothing
    /// received) is closed; 0: never.
    #[arg(long, env = "KVCOORD_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// Requests of one connection served at once; beyond it the server
    /// stops reading that connection until its replies are written.
    #[arg(long, env = "KVCOORD_MAX_IN_FLIGHT_PER_SESSION")]
    max_in_flight_per_session: Option<u32>,
    /// Also listen on this TCP address (host:port).
    #[arg(long, env = "KVCOORD_TCP")]
    tcp: Option<String>,
    /// L1 capacity, e.g. `4GiB`.
    #[arg(long, env = "KVCOORD_L1_SIZE")]
    l1_size: Option<bytesize::ByteSize>,
    /// Take (and pin) all of L1 at start.
    #[arg(long, env = "KVCOORD_L1_PREALLOC")]
    l1_prealloc: bool,
    /// Tokens per chunk.
    #[arg(long, env = "KVCOORD_CHUNK_TOKENS")]
    chunk_tokens: Option<u32>,
    #[arg(long, value_enum, env = "KVCOORD_BACKEND")]
    backend: Option<BackendChoice>,
    /// Host copy lanes (copy-lane actors for memfd memory).
    #[arg(long, env = "KVCOORD_COPY_LANES")]
    copy_lanes: Option<u32>,
    /// CUDA streams per direction (store, retrieve) of each GPU worker.
    #[arg(long, env = "KVCOORD_GPU_STREAMS")]
    gpu_streams: Option<u32>,
    /// How GPU workers copy: through device staging (default) or direct.
    #[arg(long, value_enum, env = "KVCOORD_GPU_COPY")]
    gpu_copy: Option<crate::config::GpuCopy>,
    /// Milliseconds a closed connection's instances are kept.
    #[arg(long, env = "KVCOORD_GRACE_MS")]
    grace_ms: Option<u64>,
    /// Milliseconds a lookup lease lives at most.
    #[arg(long, env = "KVCOORD_LEASE_TTL_MS")]
    lease_ttl_ms: Option<u64>,
    /// Milliseconds a graceful shutdown waits for in-flight requests.
    #[arg(long, env = "KVCOORD_SHUTDOWN_TIMEOUT_MS")]
    shutdown_timeout_ms: Option<u64>,
    /// Largest frame accepted or sent, in bytes (4 KiB to 64 MiB).
    #[arg(long, env = "KVCOORD_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<u32>,
    /// Most chunks one store, retrieve or lookup may name.
    #[arg(long, env = "KVCOORD_MAX_CHUNKS_PER_REQUEST")]
    max_chunks_per_request: Option<u32>,
    /// Upper bound, in milliseconds, on any request's deadline (positive).
    #[arg(long, env = "KVCOORD_MAX_DEADLINE_MS")]
    max_deadline_ms: Option<u64>,
    /// Accept fault-injection requests (for tests; never in production).
    /// `--enable-fault-injection` is an older spelling of the same flag.
    #[arg(long, alias = "enable-fault-injection", env = "KVCOORD_FAULT_INJECTION")]
    fault_injection: bool,
    /// Admin HTTP API address (`host:port`), or `off`.
    #[arg(long, env = "KVCOORD_ADMIN")]
    admin: Option<String>,
    /// Directory of the disk tier (chunks survive a restart); off when unset.
    #[arg(long, env = "KVCOORD_DISK_DIR")]
    disk_dir: Option<PathBuf>,
    /// Capacity of the disk tier, e.g. `100GiB`.
    #[arg(long, env = "KVCOORD_DISK_SIZE")]
    disk_size: Option<bytesize::ByteSize>,
    /// The admin token: bearer token of the admin HTTP API's `POST /clear`
    /// and full `/status`, and the admin role (clear, fault injection, full
    /// status) for a client that presents it. Prefer `--admin-token-file`.
    #[arg(long, env = "KVCOORD_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// The shared remote tier on one Redis/Valkey server:
    /// `redis://[user:pass@]host:port[/db]`, `rediss://` for TLS.
    #[arg(long, env = "KVCOORD_REMOTE")]
    remote: Option<String>,
    /// The shared remote tier on a Redis Cluster: seed node URLs, comma-separated.
    #[arg(long, env = "KVCOORD_REMOTE_CLUSTER", value_delimiter = ',')]
    remote_cluster: Option<Vec<String>>,
    /// Milliseconds every call to the remote tier may take at most.
    #[arg(long, env = "KVCOORD_REMOTE_TIMEOUT_MS")]
    remote_timeout_ms: Option<u64>,
    /// Bytes waiting to be written to the remote tier at most, e.g. `256MiB`;
    /// beyond it the oldest pending writes are dropped.
    #[arg(long, env = "KVCOORD_REMOTE_QUEUE_SIZE")]
    remote_queue_size: Option<bytesize::ByteSize>,
    /// Writes to the remote tier in flight at once.
    #[arg(long, env = "KVCOORD_REMOTE_WRITERS")]
    remote_writers: Option<u32>,
    /// Prefix of every remote key (coordinators share objects only under the same prefix).
    #[arg(long, env = "KVCOORD_REMOTE_KEY_PREFIX")]
    remote_key_prefix: Option<String>,
    /// File holding the admin token (first line).
    #[arg(long, env = "KVCOORD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File holding the default tenant's token (first line); required for `--tcp`.
    #[arg(long, env = "KVCOORD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Unix socket peer uid allowed to connect (repeat; default: the server's own uid; root always).
    #[arg(long = "allow-uid", env = "KVCOORD_ALLOWED_UIDS", value_delimiter = ',')]
    allowed_uids: Vec<u32>,
    /// Unix socket peer gid allowed to connect (repeat).
    #[arg(long = "allow-gid", env = "KVCOORD_ALLOWED_GIDS", value_delimiter = ',')]
    allowed_gids: Vec<u32>,
    /// TLS certificate chain (PEM) for `--tcp` (required off loopback).
    #[arg(long, env = "KVCOORD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for `--tcp`.
    #[arg(long, env = "KVCOORD_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// L1 bytes the default tenant's chunks may take, e.g. `2GiB`.
    #[arg(long, env = "KVCOORD_L1_QUOTA")]
    l1_quota: Option<bytesize::ByteSize>,
    #[arg(long, value_enum, env = "KVCOORD_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

impl ServeArgs {
    pub fn resolve(&self) -> Result<ServerConfig, crate::config::ConfigError> {
        let mut c = match &self.config {
            Some(path) => ServerConfig::from_toml_file(path)?,
            None => ServerConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { c.$field = v.clone(); } )* };
        }
        set!(
            socket,
            socket_mode,
            max_connections,
            idle_timeout_ms,
            max_in_flight_per_session,
            l1_size,
            chunk_tokens,
            backend,
            copy_lanes,
            gpu_streams,
            gpu_copy,
            grace_ms,
            lease_ttl_ms,
            shutdown_timeout_ms,
            log_format,
            disk_size,
            max_frame_bytes,
            max_chunks_per_request,
            max_deadline_ms,
            remote_cluster,
            remote_timeout_ms,
            remote_queue_size,
            remote_writers,
            remote_key_prefix
        );
        if self.remote.is_some() {
            c.remote = self.remote.clone();
        }
        if self.disk_dir.is_some() {
            c.disk_dir = self.disk_dir.clone();
        }
        if self.socket_group.is_some() {
            c.socket_group = self.socket_group.clone();
        }
        if self.tcp.is_some() {
            c.tcp = self.tcp.clone();
        }
        if let Some(a) = &self.admin {
            c.admin = a.clone();
        }
        if self.admin_token.is_some() {
            c.admin_token = self.admin_token.clone();
        }
        for (flag, field) in [
            (&self.admin_token_file, &mut c.admin_token_file),
            (&self.token_file, &mut c.token_file),
            (&self.tls_cert, &mut c.tls_cert),
            (&self.tls_key, &mut c.tls_key),
        ] {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        if !self.allowed_uids.is_empty() {
            c.allowed_uids = self.allowed_uids.clone();
        }
        if !self.allowed_gids.is_empty() {
            c.allowed_gids = self.allowed_gids.clone();
        }
        if self.l1_quota.is_some() {
            c.l1_quota = self.l1_quota;
        }
        if self.fault_injection {
            c.fault_injection = true;
        }
        if self.l1_prealloc {
            c.l1_prealloc = true;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (default info).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs `kvcoord serve` until SIGTERM or SIGINT; returns the process exit
/// code: 0 after a graceful shutdown, 2 for an invalid configuration, 1 when
/// the coordinator cannot start or fails.
pub fn run(args: ServeArgs) -> i32 {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvcoord: {e}");
            return 2;
        }
    };
    if args.print_config {
        // Passwords in remote URLs are never printed.
        print!("{}", toml::to_string_pretty(&config.redacted()).expect("the configuration serialises"));
        return 0;
    }
    init_logging(config.log_format);
    let system = actix_rt::System::new();
    let result: Result<(), String> = system.block_on(async move {
        let coordinator = Coordinator::start(config).await.map_err(|e| e.to_string())?;
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        coordinator.shutdown().await;
        Ok(())
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "kvcoord failed");
            eprintln!("kvcoord: {e}");
            1
        }
    }
}
