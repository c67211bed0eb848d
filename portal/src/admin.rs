//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics` (Prometheus text) and
//! `/status` (JSON).

use std::{convert::Infallible, fmt::Write as _, sync::atomic::Ordering::Relaxed, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tracing::debug;

use crate::{
    health::{Caveat, Role},
    metrics::{CloseReason, Direction, Rejection},
    route,
    session::Shared,
};

/// Admin connections served at once; more are closed at accept (counted in
/// `dbportal_admin_connections_refused_total`), so a client cannot spend the process's
/// descriptors through the endpoint. Probes and a scraper need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head (request line and headers) read; larger requests get 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body announced; the endpoint reads no body, larger ones get 413.
pub const MAX_BODY: u64 = 64 * 1024;
/// An admin connection lasts at most this long (a scraper reconnects; a slow client cannot
/// keep a slot).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves the admin endpoint until `stop` becomes true.
pub async fn serve(listener: TcpListener, shared: Shared, mut stop: watch::Receiver<bool>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            r = stop.changed() => {
                if r.is_err() || *stop.borrow_and_update() {
                    return;
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.state.metrics.admin_refused.fetch_add(1, Relaxed);
            debug!("admin connection closed: {MAX_CONNECTIONS} open already");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = respond(&shared, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(MAX_HEAD)
                .max_headers(64)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY)
        || req.headers().contains_key(header::TRANSFER_ENCODING)
    {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            TEXT,
            format!("request bodies are limited to {MAX_BODY} bytes (and not chunked)\n"),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" => {
            let (ready, why) = readiness(shared);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, TEXT, why + "\n")
        }
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(shared),
        ),
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            status(shared).to_string() + "\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /healthz, /readyz, /metrics, /status\n".into(),
        ),
    }
}

/// Ready when not draining and some backend is routable; the text says why (and mentions a
/// refused configuration, which does not make the portal unready: it serves the last good one).
pub fn readiness(shared: &Shared) -> (bool, String) {
    let config = shared.config.borrow().clone();
    let health = shared.health.borrow().clone();
    let reload = shared.state.reload.snapshot();
    let stale = match &reload.last_error {
        Some(e) if reload.stale => {
            format!("; serving the last good configuration, the newest was refused: {e}")
        }
        _ => String::new(),
    };
    if shared.state.draining() {
        return (false, "not ready: draining (shutting down)".into());
    }
    let eligible = route::eligible(&config, &health);
    if eligible.is_empty() {
        let detail: Vec<String> = config
            .backends
            .iter()
            .map(|b| match health.get(&b.name) {
                Some(h) => format!(
                    "{} down{}",
                    b.name,
                    h.last_error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
                None => format!("{} unknown", b.name),
            })
            .collect();
        return (
            false,
            format!(
                "not ready: no routable backend: {}{stale}",
                detail.join(", ")
            ),
        );
    }
    let names: Vec<&str> = eligible
        .iter()
        .map(|&i| config.backends[i].name.as_str())
        .collect();
    (
        true,
        format!(
            "ready: routing {} to {}{stale}",
            config.routing.as_str(),
            names.join(", ")
        ),
    )
}

fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `/status` document.
pub fn status(shared: &Shared) -> serde_json::Value {
    let config = shared.config.borrow().clone();
    let health = shared.health.borrow().clone();
    let state = &shared.state;
    let m = &state.metrics;
    let eligible = route::eligible(&config, &health);
    let backends: Vec<_> = config
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let h = health.get(&b.name);
            let s = m.backend(&b.name);
            json!({
                "name": b.name,
                "address": b.address.to_string(),
                "up": route::is_up(&health, &b.name),
                "role": h.map(|h| h.role).unwrap_or_default().as_str(),
                "routable": eligible.contains(&i),
                "state": match (route::is_up(&health, &b.name), h.and_then(|h| h.caveat)) {
                    (false, _) => "down",
                    (true, Some(c)) => c.as_str(),
                    (true, None) => "up",
                },
                "lastError": h.and_then(|h| h.last_error.clone()),
                "engineLeader": h.and_then(|h| h.engine_leader),
                "activeSessions": s.active.load(Relaxed),
                "sessionsTotal": s.sessions.load(Relaxed),
                "connectErrors": s.connect_errors.load(Relaxed),
            })
        })
        .collect();
    let (ready, readiness) = readiness(shared);
    json!({
        "ready": ready,
        "readiness": readiness,
        "draining": state.draining(),
        "engine": config.engine.as_str(),
        "routing": config.routing.as_str(),
        "leader": health.leader_name(),
        "leaderConflict": health.conflict,
        "leaderChanges": health.stats.changes,
        "lastLeaderChange": health.stats.last_change.map(unix_seconds),
        "leaderlessSince": health.stats.leaderless_since.map(unix_seconds),
        "failovers": health.stats.failovers,
        "lastFailoverSeconds": health.stats.last_failover.map(|d| d.as_secs_f64()),
        "maxFailoverSeconds": health.stats.max_failover.map(|d| d.as_secs_f64()),
        "leaderConflicts": health.stats.conflicts,
        "fastProbing": health.stats.fast_probing,
        "sessionsCut": m.closes(CloseReason::Backend),
        "backends": backends,
        "connections": {
            "active": state.connections(),
            "negotiating": state.negotiating(),
            "maxNegotiating": config.max_negotiating,
            "maxNegotiatingPerClient": config.max_negotiating_per_client,
            "connectionRatePerClient": config.connection_rate_per_client,
            "sessions": m.active_sessions.load(Relaxed),
            "max": config.max_connections,
            "maxPerClient": config.max_connections_per_client,
            "accepted": m.accepted.load(Relaxed),
            "sessionsTotal": m.sessions.load(Relaxed),
            "rejected": Rejection::ALL.iter().map(|r| (r.as_str().to_string(), json!(m.rejections(*r)))).collect::<serde_json::Map<_, _>>(),
        },
        "config": {
            "generation": state.generation(),
            "reload": state.reload.snapshot(),
        },
        "tls": shared.tls.status_json(),
    })
}

/// The `/metrics` text.
pub fn metrics(shared: &Shared) -> String {
    let config = shared.config.borrow().clone();
    let health = shared.health.borrow().clone();
    let state = &shared.state;
    let m = &state.metrics;
    let reload = state.reload.snapshot();
    let (ready, _) = readiness(shared);
    let leader = health.leader_name();
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let b = |v: bool| if v { 1.0 } else { 0.0 };
    family(
        "dbportal_sessions_active",
        "gauge",
        "Client sessions connected to a backend.",
        &one(m.active_sessions.load(Relaxed) as f64),
    );
    family(
        "dbportal_connections_active",
        "gauge",
        "Open client connections (counted against limits.maxConnections).",
        &one(state.connections() as f64),
    );
    family(
        "dbportal_connections_negotiating",
        "gauge",
        "Client connections accepted that are not sessions yet (PROXY header, TLS or engine handshake, backend connect), counted against limits.maxNegotiating.",
        &one(state.negotiating() as f64),
    );
    family(
        "dbportal_admin_connections_refused_total",
        "counter",
        "Admin endpoint connections closed at once because the endpoint's connection cap was reached.",
        &one(m.admin_refused.load(Relaxed) as f64),
    );
    family(
        "dbportal_connections_max",
        "gauge",
        "limits.maxConnections in force.",
        &one(f64::from(config.max_connections)),
    );
    family(
        "dbportal_connections_accepted_total",
        "counter",
        "Client connections accepted.",
        &one(m.accepted.load(Relaxed) as f64),
    );
    family(
        "dbportal_sessions_total",
        "counter",
        "Client sessions connected to a backend.",
        &one(m.sessions.load(Relaxed) as f64),
    );
    family(
        "dbportal_rejections_total",
        "counter",
        "Client connections closed before reaching a backend, by reason.",
        &Rejection::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.as_str()),
                    m.rejections(*r) as f64,
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        "dbportal_sessions_closed_total",
        "counter",
        "Sessions ended, by reason.",
        &CloseReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.as_str()),
                    m.closes(*r) as f64,
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        "dbportal_bytes_total",
        "counter",
        "Bytes copied, by direction.",
        &[
            (
                "{direction=\"client_to_backend\"}".into(),
                m.bytes(Direction::ClientToBackend) as f64,
            ),
            (
                "{direction=\"backend_to_client\"}".into(),
                m.bytes(Direction::BackendToClient) as f64,
            ),
        ],
    );
    let per_backend = |f: &dyn Fn(&str) -> f64| -> Vec<(String, f64)> {
        config
            .backends
            .iter()
            .map(|b| (format!("{{backend=\"{}\"}}", b.name), f(&b.name)))
            .collect()
    };
    family(
        "dbportal_backend_up",
        "gauge",
        "Whether the backend is healthy (1) or down (0).",
        &per_backend(&|n| b(route::is_up(&health, n))),
    );
    family(
        "dbportal_backend_leader",
        "gauge",
        "Whether the backend is the current leader.",
        &per_backend(&|n| b(leader == Some(n))),
    );
    family(
        "dbportal_backend_role",
        "gauge",
        "Role of each backend from its latest successful probe (1 for the role it has).",
        &config
            .backends
            .iter()
            .flat_map(|be| {
                let r = health.get(&be.name).map(|h| h.role).unwrap_or_default();
                [
                    Role::Leader,
                    Role::SharedLeader,
                    Role::Replica,
                    Role::Unknown,
                ]
                .into_iter()
                .map(move |x| {
                    (
                        format!("{{backend=\"{}\",role=\"{}\"}}", be.name, x.as_str()),
                        b(r == x),
                    )
                })
            })
            .collect::<Vec<_>>(),
    );
    family(
        "dbportal_backend_caveat",
        "gauge",
        "Whether an up backend answered with a caveat (busy: a long Redis script or function; misconf: cannot persist, refuses writes); it stays routable and keeps its role.",
        &config
            .backends
            .iter()
            .flat_map(|be| {
                let c = health.get(&be.name).and_then(|h| h.caveat);
                Caveat::ALL.into_iter().map(move |x| {
                    (
                        format!("{{backend=\"{}\",caveat=\"{}\"}}", be.name, x.as_str()),
                        b(c == Some(x)),
                    )
                })
            })
            .collect::<Vec<_>>(),
    );
    family(
        "dbportal_leader_conflict",
        "gauge",
        "1 while several backends claim to lead (no session is routed).",
        &one(b(health.conflict)),
    );
    family(
        "dbportal_leader_changes_total",
        "counter",
        "Times the leader moved to another backend.",
        &one(health.stats.changes as f64),
    );
    family(
        "dbportal_leader_last_change_timestamp_seconds",
        "gauge",
        "Unix time of the last leader change (0: none yet).",
        &one(health.stats.last_change.map(unix_seconds).unwrap_or(0.0)),
    );
    family(
        "dbportal_leader_conflicts_total",
        "counter",
        "Times a leader conflict began.",
        &one(health.stats.conflicts as f64),
    );
    family(
        "dbportal_leader_sessions_cut_total",
        "counter",
        "Sessions cut because their backend stopped being the leader.",
        &one(m.closes(CloseReason::Backend) as f64),
    );
    family(
        "dbportal_leader_failover_seconds",
        "summary",
        "Time from losing a leader to having a new one.",
        &[
            ("_sum".into(), health.stats.failover_total.as_secs_f64()),
            ("_count".into(), health.stats.failovers as f64),
        ],
    );
    family(
        "dbportal_leader_failover_max_seconds",
        "gauge",
        "Longest time without a leader since start.",
        &one(health.stats.max_failover.map_or(0.0, |d| d.as_secs_f64())),
    );
    family(
        "dbportal_health_fast_probing",
        "gauge",
        "1 while backends are probed at the fast interval (a leader is being sought).",
        &one(b(health.stats.fast_probing)),
    );
    family(
        "dbportal_backend_sessions_active",
        "gauge",
        "Open sessions per backend.",
        &per_backend(&|n| m.backend(n).active.load(Relaxed) as f64),
    );
    family(
        "dbportal_backend_sessions_total",
        "counter",
        "Sessions per backend.",
        &per_backend(&|n| m.backend(n).sessions.load(Relaxed) as f64),
    );
    family(
        "dbportal_backend_connect_errors_total",
        "counter",
        "Failed connection attempts per backend (refused, unreachable or timed out).",
        &per_backend(&|n| m.backend(n).connect_errors.load(Relaxed) as f64),
    );
    family(
        "dbportal_config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
        &[
            ("{result=\"ok\"}".into(), reload.reloads_ok as f64),
            ("{result=\"failed\"}".into(), reload.reloads_failed as f64),
        ],
    );
    family(
        "dbportal_config_last_reload_successful",
        "gauge",
        "Whether the latest configuration reload succeeded.",
        &one(b(reload.last_reload_ok)),
    );
    family(
        "dbportal_config_last_reload_success_timestamp_seconds",
        "gauge",
        "Unix time of the last configuration applied.",
        &one(reload.last_success_unix),
    );
    family(
        "dbportal_config_stale",
        "gauge",
        "1 when the newest configuration was refused and an older one is serving.",
        &one(b(reload.stale)),
    );
    family(
        "dbportal_config_generation",
        "gauge",
        "Configurations applied since start (1 = the initial one).",
        &one(state.generation() as f64),
    );
    family(
        "dbportal_ready",
        "gauge",
        "Whether /readyz reports ready.",
        &one(b(ready)),
    );
    family(
        "dbportal_draining",
        "gauge",
        "1 while shutting down.",
        &one(b(state.draining())),
    );
    shared.tls.render_metrics(&mut out);
    out
}
