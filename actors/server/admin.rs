//! The admin HTTP API (actix-web, inside the coordinator's actix System),
//! bound to 127.0.0.1 by default:
//!
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: accepting and serving (503 while shutting down).
//! - `GET /status`: JSON [`kvcoord_transport::StatusReport`]; the instances
//!   (keys, models, owners) only with `Authorization: Bearer <admin token>`.
//! - `GET /metrics`: Prometheus (OpenMetrics) text, with per-tenant series
//!   (`kvcoord_tenant_*{tenant="..."}`: lookups, hits, bytes, evictions, L1 use).
//! - `POST /clear`: drops every L1 object; refused unless the server was
//!   started with an admin token, and then only with
//!   `Authorization: Bearer <token>` (compared in constant time).
//!
//! It must never serve the data path or change registrations.

use std::sync::Arc;

use actix::Addr;
use actix_web::{http::StatusCode, web, App, HttpRequest, HttpResponse, HttpServer};

use super::counters::Counters;
use super::metrics::TenantFigures;
use super::state::ServerShared;
use super::supervisor::{GetStats, GetStatus, Supervisor};

struct AdminState {
    shared: Arc<ServerShared>,
    supervisor: Addr<Supervisor>,
}

fn json_error(code: StatusCode, msg: &str) -> HttpResponse {
    HttpResponse::build(code).content_type("application/json").body(serde_json::json!({ "error": msg }).to_string())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    if state.shared.is_shutting_down() {
        HttpResponse::ServiceUnavailable().content_type("text/plain").body("shutting down\n")
    } else {
        HttpResponse::Ok().content_type("text/plain").body("ready\n")
    }
}

/// Whether the request carries the admin token as its bearer token
/// (compared in constant time).
fn is_admin(state: &AdminState, req: &HttpRequest) -> bool {
    let given =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|t| state.shared.access.is_admin_token(t))
}

async fn status(state: web::Data<AdminState>, req: HttpRequest) -> HttpResponse {
    let admin = is_admin(&state, &req);
    match state.supervisor.send(GetStatus).await {
        Ok(mut report) => {
            // Instance keys and model names only with the admin token.
            if !admin {
                report.hide_instances();
            }
            match serde_json::to_string_pretty(&report) {
                Ok(body) => HttpResponse::Ok().content_type("application/json").body(body),
                Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        Err(_) => json_error(StatusCode::SERVICE_UNAVAILABLE, "supervisor unavailable"),
    }
}

/// Every tenant's figures now.
fn tenant_figures(shared: &ServerShared) -> Vec<TenantFigures> {
    let usage = shared.l1.tenant_usage();
    shared
        .access
        .tenants()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let c = &shared.tenant_counters[i];
            let u = usage.get(i).copied().unwrap_or_default();
            TenantFigures {
                name: t.name.clone(),
                lookup_asked_chunks: Counters::get(&c.lookup_asked_chunks),
                lookup_hit_chunks: Counters::get(&c.lookup_hit_chunks),
                bytes_stored: Counters::get(&c.bytes_stored),
                bytes_retrieved: Counters::get(&c.bytes_retrieved),
                evictions: u.evictions,
                l1_used: u.used,
                l1_quota: t.l1_quota.unwrap_or(0),
            }
        })
        .collect()
}

async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    state.shared.metrics.update_tenants(&tenant_figures(&state.shared));
    match state.supervisor.send(GetStats).await {
        Ok(stats) => HttpResponse::Ok()
            .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
            .body(state.shared.metrics.render(&stats)),
        Err(_) => json_error(StatusCode::SERVICE_UNAVAILABLE, "supervisor unavailable"),
    }
}

async fn clear(state: web::Data<AdminState>, req: HttpRequest) -> HttpResponse {
    if !state.shared.access.has_admin() {
        return json_error(StatusCode::FORBIDDEN, "clear is disabled: start kvcoord with --admin-token(-file)");
    }
    if !is_admin(&state, &req) {
        return json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let objects = state.shared.l1.clear();
    tracing::info!(objects, "L1 cleared through the admin API");
    HttpResponse::Ok().content_type("application/json").body(serde_json::json!({ "cleared": objects }).to_string())
}

/// Binds and starts the admin server; returns the address bound.
pub fn start(addr: &str, shared: Arc<ServerShared>, supervisor: Addr<Supervisor>) -> std::io::Result<String> {
    let data = web::Data::new(AdminState { shared, supervisor });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/status", web::get().to(status))
            .route("/metrics", web::get().to(metrics))
            .route("/clear", web::post().to(clear))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(addr)?;
    let bound = server.addrs().first().map(|a| a.to_string()).unwrap_or_else(|| addr.to_string());
    actix_rt::spawn(server.run());
    Ok(bound)
}
