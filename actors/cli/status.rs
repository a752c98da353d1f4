//! `kvcoord status`: a running coordinator, for people (tables, sizes like
//! `3.2 GiB`) or, with `--json`, for machines. It asks over the coordinator's
//! own socket, so it needs no admin API.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use kvcoord_memory::{BlockShape, KvLayout};
use kvcoord_transport::{ConnectOptions, Connection, Endpoint, ReplyBody, RequestBody, StatusReport};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The coordinator's Unix socket (default: the server's default socket).
    #[arg(long, env = "KVCOORD_SOCKET", default_value_os_t = crate::config::default_socket_path())]
    socket: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// A file holding the admin token: the instances (keys, models, owners)
    /// are shown only to the admin.
    #[arg(long, env = "KVCOORD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{:.1}s", ms as f64 / 1e3),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn layout(l: &KvLayout) -> String {
    let shape = match l.shape {
        BlockShape::Mha { kv_heads, head_dim } => format!("MHA {kv_heads}x{head_dim}"),
        BlockShape::Mla { latent } => format!("MLA {latent}"),
    };
    let p = &l.placement;
    let runs = if p.runs_per_block == 1 {
        format!("1 run of {}", ByteSize(p.run_bytes))
    } else {
        format!("{} runs of {} every {}", p.runs_per_block, ByteSize(p.run_bytes), ByteSize(p.run_stride))
    };
    format!(
        "{}L {}x{}tok {} {:?}, block = {runs}, block stride {}, layer stride {}, at +{}",
        l.num_layers,
        l.num_blocks,
        l.block_tokens,
        shape,
        l.dtype,
        ByteSize(p.block_stride),
        ByteSize(p.layer_stride),
        p.layer_offset
    )
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

fn print_report(r: &StatusReport) {
    let s = &r.stats;
    println!("kvcoord {}  epoch {}  up {}  backend {}", r.version, r.epoch, duration(r.uptime_ms), r.backend);
    println!("listening  {}", r.endpoints.join(", "));
    println!("admin      {}", r.admin.as_deref().map(|a| format!("http://{a}")).unwrap_or_else(|| "off".into()));
    println!("devices    {}", r.devices.join(", "));
    println!(
        "L1         {} of {} used ({}), {} objects, {} evictions",
        ByteSize(s.l1_used),
        ByteSize(s.l1_capacity),
        percent(s.l1_used, s.l1_capacity),
        s.objects,
        s.evictions
    );
    if s.disk_capacity > 0 {
        println!(
            "disk       {} of {} used, {} objects, {} read back, {} backlog, {} write errors, {} corrupt dropped",
            ByteSize(s.disk_used),
            ByteSize(s.disk_capacity),
            s.disk_objects,
            s.disk_hits,
            ByteSize(s.disk_backlog),
            s.disk_write_errors,
            s.disk_corrupt
        );
    }
    if let Some(remote) = &r.remote {
        println!(
            "remote     {} {} for {}{}",
            remote.endpoint,
            if remote.up { "UP" } else { "DOWN" },
            duration(remote.since_ms),
            remote.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
        );
        println!(
            "           {} hits, {} misses, {} in, {} out, {} written, queue {} ({}), {} dropped writes, {} refused values, {} failed calls",
            s.remote_hits,
            s.remote_misses,
            ByteSize(s.remote_bytes_in),
            ByteSize(s.remote_bytes_out),
            s.remote_writes,
            s.remote_queue_depth,
            ByteSize(s.remote_queue_bytes),
            s.remote_dropped_writes,
            s.remote_rejected,
            s.remote_failed_calls
        );
    }
    println!("leases     {} ({} objects pinned)", s.leases, s.pinned_objects);
    println!(
        "lookups    {} (hit {} of {} chunks asked)   stores {}   retrieves {}",
        s.lookups,
        percent(s.lookup_hit_chunks, s.lookup_asked_chunks),
        s.lookup_asked_chunks,
        s.stores,
        s.retrieves
    );
    println!("traffic    {} stored, {} retrieved", ByteSize(s.bytes_stored), ByteSize(s.bytes_retrieved));
    println!(
        "clients    {} connected, {} connections so far, {} registrations, {} again, {} reclaimed, {} actor restarts",
        s.sessions, s.connections, s.registrations, s.reregistrations, s.reclaimed_instances, s.actor_restarts
    );
    println!();
    if r.instances_hidden {
        println!("INSTANCES (hidden: shown only with the admin token, --admin-token-file)");
        return;
    }
    println!("INSTANCES ({})", r.instances.len());
    if r.instances.is_empty() {
        return;
    }
    println!(
        "{:<18} {:>4} {:<20} {:>3} {:<34} {:>10} {:>8} {:>8}",
        "ENGINE", "RANK", "MODEL", "WS", "LAYOUT", "MEMORY", "SESSION", "IDLE"
    );
    for i in &r.instances {
        println!(
            "{:<18} {:>4} {:<20} {:>3} {:<34} {:>10} {:>8} {:>8}",
            format!("{:016x}", i.engine),
            i.rank,
            i.model,
            i.world_size,
            layout(&i.layout),
            ByteSize(i.bytes).to_string(),
            if i.orphaned { format!("{}*", i.owner_session) } else { i.owner_session.to_string() },
            duration(i.idle_ms)
        );
    }
    if r.instances.iter().any(|i| i.orphaned) {
        println!("* the owner's connection closed; the instance is dropped after the grace period");
    }
}

pub fn run(args: StatusArgs) -> i32 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let token = match &args.admin_token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t.lines().next().unwrap_or("").trim().to_string()),
            Err(e) => {
                eprintln!("kvcoord status: {}: {e}", path.display());
                return 2;
            }
        },
        None => None,
    };
    let result = rt.block_on(async {
        let opts = ConnectOptions { token, ..ConnectOptions::default() };
        let conn = Connection::open(&Endpoint::Unix(args.socket.clone()), &opts)
            .await
            .map_err(|e| format!("no coordinator at {}: {e}", args.socket.display()))?;
        match conn.request(RequestBody::Status, Duration::from_secs(5), Vec::new()).await {
            Ok(ReplyBody::Status(r)) => Ok(r),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    });
    match result {
        Ok(report) if args.json => {
            println!("{}", serde_json::to_string_pretty(&report).expect("the report serialises"));
            0
        }
        Ok(report) => {
            print_report(&report);
            0
        }
        Err(e) => {
            eprintln!("kvcoord status: {e}");
            1
        }
    }
}
