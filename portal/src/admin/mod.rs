//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics` (OpenMetrics text of the
//! collectors each module owns; this endpoint only registers and encodes them), `/status`
//! (JSON), the stats page `/` and its CSV form `/;csv` ([`page`]), and the state-changing
//! verbs under `/backends/` and `/sessions/` ([`verbs`], behind a bearer token).
//!
//! `/healthz` and `/readyz` never need the token (the kubelet probes them); the page,
//! `/status` and `/metrics` need it when `adminTokenForReads` is set.
//!
//! May import: `admission`, `allow`, `config`, `health`, `metrics`, `reload`, `route`,
//! `session` (its `Shared`, the reports of multiplexing and pooling). Never `server`.

mod page;
mod verbs;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tracing::debug;

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};

use crate::{
    admission::AdmissionCollector,
    config::AdminLimitValues,
    health::HealthCollector,
    metrics::{flag, gauge, CloseReason, DataPlaneCollector, Rejection},
    reload::ReloadCollector,
    route,
    session::Shared,
};

/// Admin connections open now; the guard of one gives its place back when dropped.
struct Open(Arc<AtomicUsize>);

impl Open {
    /// A place among `max` open connections, or none when they are all taken.
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Open> {
        open.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Open(open.clone()))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Serves the admin endpoint until `stop` becomes true.
///
/// Its limits (`adminLimits`) are read from the current configuration for each new
/// connection, so a reload applies them to the next ones: past `maxConnections` a connection
/// is closed at accept (counted in `dbportal_admin_connections_refused_total`), so a client
/// cannot spend the process's descriptors through the endpoint; a request head past
/// `maxHeaderBytes` gets 431 and a body past `maxBodyBytes` 413 (both counted in
/// `dbportal_admin_requests_refused_total`); a connection lasts at most
/// `connectionLifetime`.
pub async fn serve(listener: TcpListener, shared: Shared, mut stop: watch::Receiver<bool>) {
    let open = Arc::new(AtomicUsize::new(0));
    let registry = Arc::new(registry(&shared));
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
        let limits = shared.config.borrow().admin_limits;
        let Some(place) = Open::take(&open, limits.max_connections) else {
            shared.state.metrics.admin_refused.fetch_add(1, Relaxed);
            debug!(
                max = limits.max_connections,
                "admin connection closed: adminLimits.maxConnections open already"
            );
            continue;
        };
        let shared = shared.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let _place = place;
            let metrics = shared.state.metrics.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&shared, &registry, &limits, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(limits.max_header_bytes)
                .max_headers(64)
                .serve_connection(TokioIo::new(stream), service);
            // hyper answers a head too large itself (431, or 414 for a URI past 64 KiB) and
            // ends the connection with that error.
            if let Ok(Err(e)) = tokio::time::timeout(limits.connection_lifetime, connection).await {
                if e.is_parse_too_large() {
                    metrics.admin_header_too_large.fetch_add(1, Relaxed);
                }
            }
        });
    }
}

fn json_reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", body.to_string() + "\n")
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = json_reply(
        StatusCode::UNAUTHORIZED,
        json!({ "error": "a valid bearer token is required (Authorization: Bearer <token>)" }),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
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

async fn respond(
    shared: &Shared,
    registry: &Registry,
    limits: &AdminLimitValues,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let max_body = limits.max_body_bytes;
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > max_body)
        || req.headers().contains_key(header::TRANSFER_ENCODING)
    {
        shared
            .state
            .metrics
            .admin_body_too_large
            .fetch_add(1, Relaxed);
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            TEXT,
            format!("request bodies are limited to {max_body} bytes (and not chunked)\n"),
        );
    }
    let path = req.uri().path().to_string();
    if verbs::is_verb(req.method(), &path) {
        match verbs::authorized(shared, req.headers()) {
            Ok(true) => {}
            Ok(false) => return unauthorized(),
            Err(why) => return json_reply(StatusCode::FORBIDDEN, json!({ "error": why })),
        }
        let method = req.method().clone();
        let body = match http_body_util::BodyExt::collect(http_body_util::Limited::new(
            req.into_body(),
            max_body as usize,
        ))
        .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return json_reply(
                    StatusCode::BAD_REQUEST,
                    json!({ "error": format!("cannot read the body: {e}") }),
                )
            }
        };
        let (status, answer) = verbs::run(shared, &method, &path, &body);
        return json_reply(status, answer);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "GET, or POST/DELETE on /backends/<name>/state|weight and /sessions/close\n".into(),
        );
    }
    let needs_token = !matches!(path.as_str(), "/healthz" | "/readyz")
        && shared.config.borrow().admin_token_for_reads;
    if needs_token {
        match verbs::authorized(shared, req.headers()) {
            Ok(true) => {}
            Ok(false) => return unauthorized(),
            Err(why) => return json_reply(StatusCode::FORBIDDEN, json!({ "error": why })),
        }
    }
    match path.as_str() {
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            page::html(&status(shared)),
        ),
        "/;csv" => reply(
            StatusCode::OK,
            "text/csv; charset=utf-8",
            page::csv(&status(shared)),
        ),
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
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(registry),
        ),
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            status(shared).to_string() + "\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /, /;csv, /healthz, /readyz, /metrics, /status\n".into(),
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
    let overrides = shared.state.control.current();
    let eligible = route::eligible(&config, &health, &overrides);
    if eligible.is_empty() {
        let detail: Vec<String> = config
            .backends
            .iter()
            .map(|b| match health.get(&b.name) {
                Some(h) if h.up => format!("{} {}", b.name, overrides.state(b).as_str()),
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

/// A replica's standing and lag in `/status`: `null` for a leader, a node down, or an engine
/// that reads no replication; the position behind the leader in bytes (PostgreSQL, Redis) or
/// raft entries (etcd).
fn replication(
    engine: crate::config::Engine,
    standing: Option<crate::health::Replicating>,
    lag: Option<crate::health::Lag>,
) -> serde_json::Value {
    let (Some(standing), Some(lag)) = (standing, lag) else {
        return serde_json::Value::Null;
    };
    let unit = if engine == crate::config::Engine::Etcd {
        "lagEntries"
    } else {
        "lagBytes"
    };
    json!({
        "state": standing.as_str(),
        "lagSeconds": lag.time.map(|t| t.as_secs_f64()),
        unit: lag.behind,
        "broken": lag.broken,
    })
}

/// The `/status` document.
pub fn status(shared: &Shared) -> serde_json::Value {
    let config = shared.config.borrow().clone();
    let health = shared.health.borrow().clone();
    let state = &shared.state;
    let m = &state.metrics;
    let overrides = state.control.current();
    let eligible = route::eligible(&config, &health, &overrides);
    let weights = route::weights(&config, &health, &overrides, std::time::Instant::now());
    let checks = shared.checker.as_ref().map(|c| c.checks());
    let backends: Vec<_> = config
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let h = health.get(&b.name);
            let s = m.backend(&b.name);
            let o = overrides.get(&b.name);
            let c = checks.as_ref().map(|c| c.get(&b.name)).unwrap_or_default();
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
                "sessionsMax": s.max_active.load(Relaxed),
                "maxConnections": b.max_connections,
                "connectErrors": s.connect_errors.load(Relaxed),
                "bytesIn": s.bytes_in.load(Relaxed),
                "bytesOut": s.bytes_out.load(Relaxed),
                "adminState": overrides.state(b).as_str(),
                "configState": b.state.as_str(),
                "adminOverride": o.state.is_some() || o.weight.is_some(),
                "overrideSince": o.since.map(unix_seconds),
                "weight": overrides.weight(b),
                "configWeight": b.weight,
                "effectiveWeight": weights[i] as f64 / route::WEIGHT_UNIT as f64,
                "backup": b.backup,
                "slowStartSeconds": b.slow_start.as_secs_f64(),
                "checks": c.checks,
                "checkFailures": c.failures,
                "checkLatencyMs": (c.checks > 0).then_some(c.last.as_secs_f64() * 1000.0),
                "lastChange": h.and_then(|h| h.changed_at).map(unix_seconds),
                "replication": replication(config.engine, h.and_then(|h| h.replicating), c.lag),
            })
        })
        .collect();
    let (ready, readiness) = readiness(shared);
    let q = &m.queue;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
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
        "queue": {
            "waiting": q.waiting.load(Relaxed),
            "waited": q.waited.load(Relaxed),
            "timeouts": q.timeouts.load(Relaxed),
        },
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
        "multiplex": config.plane.multiplex().map(|_| crate::session::multiplex::status(&shared.mux)),
        "pooling": config.plane.pg_pool().map(|_| crate::session::pool::status(&shared.pg)),
        "readOnly": read_only_status(shared, &config, &health),
    })
}

/// The read-only listener in `/status`: its settings, the backends serving reads now, and its
/// pools; `null` without one.
fn read_only_status(
    shared: &Shared,
    config: &crate::config::Config,
    health: &crate::health::HealthView,
) -> serde_json::Value {
    let (Some(ro), Some(reads)) = (&config.read_only, &shared.reads) else {
        return serde_json::Value::Null;
    };
    json!({
        "listen": ro.listen.to_string(),
        "routing": ro.routing.as_str(),
        "maxLagSeconds": ro.max_lag.as_secs_f64(),
        "fallbackToLeader": ro.fallback_to_leader,
        "serving": route::serving_reads(config, health, &shared.state.control.current()),
        "sessions": reads.sessions.len(),
        "multiplex": config.plane.multiplex().map(|_| crate::session::multiplex::status(&reads.mux)),
        "pooling": config.plane.pg_pool().map(|_| crate::session::pool::status(&reads.pg)),
    })
}

/// The registry `/metrics` encodes: every module's collector, each owning its families.
pub fn registry(shared: &Shared) -> Registry {
    let mut registry = Registry::default();
    let config = || shared.config.clone();
    registry.register_collector(Box::new(DataPlaneCollector {
        metrics: shared.state.metrics.clone(),
        config: config(),
        control: shared.state.control.clone(),
    }));
    registry.register_collector(Box::new(AdmissionCollector {
        state: shared.state.clone(),
        config: config(),
    }));
    registry.register_collector(Box::new(HealthCollector {
        config: config(),
        health: shared.health.clone(),
        checks: shared.checker.as_ref().map(|c| c.checks()),
    }));
    registry.register_collector(Box::new(ReloadCollector(shared.state.reload.clone())));
    registry.register_collector(Box::new(ReadyCollector(shared.clone())));
    registry.register_collector(Box::new(shared.tls.clone()));
    registry.register_collector(Box::new(crate::session::multiplex::MultiplexCollector(
        shared.mux.clone(),
    )));
    registry.register_collector(Box::new(crate::session::pool::PoolCollector(
        shared.pg.clone(),
    )));
    registry
}

/// The `/metrics` text (OpenMetrics) of `registry`.
pub fn metrics(registry: &Registry) -> String {
    let mut out = String::with_capacity(8192);
    // Writing to a String cannot fail, nor can the collectors.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// `dbportal_ready`: what `/readyz` says.
#[derive(Debug)]
struct ReadyCollector(Shared);

impl Collector for ReadyCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        gauge(
            &mut e,
            "dbportal_ready",
            "Whether /readyz reports ready.",
            flag(readiness(&self.0).0),
        )
    }
}
