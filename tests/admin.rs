//! Operating kvcoord: the admin HTTP API, metrics, `kvcoord status` and
//! configuration, against a running `kvcoord serve` process.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::*;
use kvcoord_harness::prefix_hashes;
use kvcoord_transport::{ReplyBody, RequestBody, StatusReport};

/// A minimal HTTP/1.1 request; returns (status code, body).
fn http(addr: &str, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// The admin address, asked of the server over its socket.
async fn admin_addr(server: &ServerProcess) -> String {
    let conn = raw(server).await;
    match conn.request(RequestBody::Status, Duration::from_secs(5), vec![]).await.unwrap() {
        ReplyBody::Status(r) => r.admin.expect("admin is on"),
        other => panic!("{other:?}"),
    }
}

/// Parses OpenMetrics/Prometheus text: every sample line is `name{labels} value`.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l}"));
            (name.to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in: {l}")))
        })
        .collect()
}

fn sample(all: &[(String, f64)], name: &str) -> f64 {
    all.iter().filter(|(n, _)| n == name).map(|(_, v)| *v).sum()
}

#[actix_rt::test]
async fn metrics_parse_as_prometheus_text_and_move_after_real_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&server).await;
    let (code, before) = http(&admin, "GET", "/metrics", &[]);
    assert_eq!(code, 200);
    let before = samples(&before);
    let mut w = worker(&server, 1, 0, 1).await;
    let h = prefix_hashes("test-model", 1, 0, 2, 256);
    let (blocks, _) = w.store_prefix(&h).await.unwrap();
    let found = w.client.lookup(w.key, h.clone(), true).await;
    w.retrieve_and_verify(&h, &blocks, found.lease).await.unwrap();
    let (_, after) = http(&admin, "GET", "/metrics", &[]);
    assert!(after.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    let after = samples(&after);
    let store_ok = r#"kvcoord_requests_total{op="store",outcome="ok"}"#;
    assert_eq!(sample(&after, store_ok), 1.0);
    assert_eq!(
        sample(&after, "kvcoord_bytes_stored_total") - sample(&before, "kvcoord_bytes_stored_total"),
        (2 << 20) as f64
    );
    assert_eq!(sample(&after, "kvcoord_bytes_retrieved_total"), (2 << 20) as f64);
    assert_eq!(sample(&after, "kvcoord_lookup_hit_chunks_total"), 2.0);
    assert_eq!(sample(&after, "kvcoord_instances"), 1.0);
    assert_eq!(sample(&after, "kvcoord_l1_objects"), 2.0);
    assert!(sample(&after, "kvcoord_l1_used_bytes") >= (2 << 20) as f64);
    assert_eq!(sample(&after, r#"kvcoord_request_duration_seconds_count{op="store"}"#), 1.0);
    assert!(after.iter().any(|(n, _)| n.starts_with("kvcoord_server_info{")), "epoch and version as info");
}

#[actix_rt::test]
async fn status_lists_a_registered_instance_and_drops_it_after_unregister() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--admin", "127.0.0.1:0", "--admin-token", "s3cret-admin"]);
    let admin = admin_addr(&server).await;
    let w = worker(&server, 0xabc, 2, 4).await;
    // Without the admin token: no instance keys, no model names.
    let (code, body) = http(&admin, "GET", "/status", &[]);
    assert_eq!(code, 200);
    let report: StatusReport = serde_json::from_str(&body).unwrap();
    assert!(report.instances.is_empty() && report.instances_hidden, "{body}");
    assert!(!body.contains("test-model") && !body.contains(&0xabc_u64.to_string()), "{body}");
    assert_eq!(report.stats.instances, 1, "the counts stay");
    let bearer = ["Authorization: Bearer s3cret-admin"];
    let (code, body) = http(&admin, "GET", "/status", &bearer);
    assert_eq!(code, 200);
    let report: StatusReport = serde_json::from_str(&body).unwrap();
    assert_eq!(report.instances.len(), 1);
    let i = &report.instances[0];
    assert_eq!((i.engine, i.rank, i.world_size, i.model.as_str()), (0xabc, 2, 4, "test-model"));
    assert_eq!(i.layout, small_layout());
    assert_eq!(report.backend, "host");
    w.client.unregister(w.key).await.unwrap();
    let (_, body) = http(&admin, "GET", "/status", &bearer);
    let report: StatusReport = serde_json::from_str(&body).unwrap();
    assert!(report.instances.is_empty());
}

#[actix_rt::test]
async fn clear_is_refused_without_its_guard() {
    let dir = tempfile::tempdir().unwrap();
    let open = ServerProcess::start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&open).await;
    let (code, body) = http(&admin, "POST", "/clear", &[]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("--admin-token"));

    let dir2 = tempfile::tempdir().unwrap();
    let guarded = ServerProcess::start(dir2.path(), &["--admin", "127.0.0.1:0", "--admin-token", "s3cret"]);
    let admin = admin_addr(&guarded).await;
    let mut w = worker(&guarded, 5, 0, 1).await;
    w.store_prefix(&prefix_hashes("test-model", 5, 0, 2, 256)).await.unwrap();
    assert_eq!(http(&admin, "POST", "/clear", &[]).0, 401);
    assert_eq!(http(&admin, "POST", "/clear", &["Authorization: Bearer wrong"]).0, 401);
    assert_eq!(w.client.stats().await.unwrap().objects, 2, "refused clears drop nothing");
    let (code, body) = http(&admin, "POST", "/clear", &["Authorization: Bearer s3cret"]);
    assert_eq!((code, body.contains("\"cleared\":2")), (200, true), "{body}");
    assert_eq!(w.client.stats().await.unwrap().objects, 0);
}

#[actix_rt::test]
async fn health_and_readiness_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--admin", "127.0.0.1:0"]);
    let admin = admin_addr(&server).await;
    assert_eq!(http(&admin, "GET", "/healthz", &[]).0, 200);
    assert_eq!(http(&admin, "GET", "/readyz", &[]).0, 200);
    assert_eq!(http(&admin, "GET", "/nope", &[]).0, 404);
}

#[actix_rt::test]
async fn kvcoord_status_shows_a_running_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "status-admin-token-0123456789\n").unwrap();
    let token_arg = token_file.to_str().unwrap().to_string();
    let server = ServerProcess::start(dir.path(), &["--admin-token-file", &token_arg]);
    let mut w = worker(&server, 0x42, 0, 1).await;
    w.store_prefix(&prefix_hashes("test-model", 0x42, 0, 2, 256)).await.unwrap();
    let socket = server.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kvcoord")).args(["status", "--socket"]).arg(&socket).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("INSTANCES (hidden"), "no admin token, no instances: {text}");
    assert!(!text.contains("0000000000000042") && !text.contains("test-model"), "{text}");

    let socket = server.socket.clone();
    let token = token_arg.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kvcoord"))
            .args(["status", "--admin-token-file", &token, "--socket"])
            .arg(&socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("INSTANCES (1)"), "{text}");
    assert!(text.contains("0000000000000042"), "{text}");
    assert!(text.contains("2.0 MiB of 1.0 GiB used") || text.contains("2.0 MiB of 1 GiB used"), "{text}");
    assert!(text.contains("test-model"), "{text}");

    let socket = server.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kvcoord"))
            .args(["status", "--json", "--socket"])
            .arg(&socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report: StatusReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.stats.objects, 2);

    let out = Command::new(env!("CARGO_BIN_EXE_kvcoord"))
        .args(["status", "--socket", "/tmp/kvcoord-nobody.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no coordinator"));
}

fn print_config(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvcoord"))
        .args(["serve", "--print-config"])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn configuration_precedence_is_flag_then_environment_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kvcoord.toml");
    std::fs::write(&file, "chunk_tokens = 64\ncopy_lanes = 3\ngrace_ms = 100\n").unwrap();
    let f = file.to_str().unwrap();
    let out = print_config(
        &[("KVCOORD_COPY_LANES", "5"), ("KVCOORD_GRACE_MS", "200")],
        &["--config", f, "--grace-ms", "300"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("chunk_tokens = 64"), "file: {text}");
    assert!(text.contains("copy_lanes = 5"), "environment over file: {text}");
    assert!(text.contains("grace_ms = 300"), "flag over environment: {text}");
}

#[test]
fn bad_configuration_fails_start_naming_the_key() {
    let out = print_config(&[("KVCOORD_ADMIN", "not-an-address")], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`admin`"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "l1_size = \"lots\"\n").unwrap();
    let out = print_config(&[], &["--config", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("l1_size"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = print_config(&[("KVCOORD_COPY_LANES", "many")], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("copy-lanes"));
}
