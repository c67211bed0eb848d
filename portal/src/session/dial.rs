//! Dialling a backend: the health view to route by (waiting for a leader within
//! `timeouts.connect`), then the candidates in the routing mode's order, each with its share
//! of the deadline.
//!
//! May import: `config`, `health`, `metrics`, `route` and the session's [`Shared`].

use std::{
    io,
    net::IpAddr,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use tokio::{
    net::TcpStream,
    time::{timeout, Instant},
};
use tracing::{debug, warn};

use super::Shared;
use crate::{
    config::{Address, Config},
    health::HealthView,
    metrics::BackendStats,
    route,
};

pub(super) type Chosen = (String, Arc<BackendStats>);

/// The health view to route a new session by. In `leader` routing without a leader (failover
/// under way, or a conflict), waits up to `timeouts.connect` for one instead of refusing at
/// once; other modes do not wait.
pub(super) async fn wait_for_route(config: &Config, shared: &mut Shared) -> Option<HealthView> {
    let routable = |h: &HealthView| !route::eligible(config, h).is_empty();
    let now = shared.health.borrow_and_update().clone();
    if routable(&now) {
        return Some(now);
    }
    if config.routing != crate::config::RoutingMode::Leader {
        return Some(now);
    }
    debug!("no leader; waiting for one");
    match timeout(
        config.timeouts.connect,
        shared.health.wait_for(|h| routable(h)),
    )
    .await
    {
        Ok(Ok(h)) => Some(h.clone()),
        _ => None,
    }
}

/// Tries the candidates of the routing mode in order within `timeouts.connect` overall. Each
/// attempt gets an equal share of what is left, so a node that does not answer cannot use up
/// the time of the ones after it; a refused node costs nothing.
pub(super) async fn connect(
    config: &Config,
    health: &HealthView,
    client: IpAddr,
    shared: &Shared,
) -> Option<(TcpStream, Chosen)> {
    let state = &shared.state;
    let eligible = route::eligible(config, health);
    if eligible.is_empty() {
        warn!("no backend is routable");
        return None;
    }
    let stats: Vec<Arc<BackendStats>> = config
        .backends
        .iter()
        .map(|b| state.metrics.backend(&b.name))
        .collect();
    let order = route::order(config.routing, &eligible, client, state.ticket(), |i| {
        stats[i].active.load(Relaxed)
    });
    let deadline = Instant::now() + config.timeouts.connect;
    for (k, &i) in order.iter().enumerate() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let share = (deadline - now) / (order.len() - k) as u32;
        let backend = &config.backends[i];
        let error = match timeout(share, connect_one(&backend.address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                tracing::Span::current().record(
                    "backend",
                    tracing::field::display(format_args!("{}/{}", backend.name, backend.address)),
                );
                return Some((stream, (backend.name.clone(), stats[i].clone())));
            }
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {share:?}"),
            ),
        };
        stats[i].connect_errors.fetch_add(1, Relaxed);
        if let Some(checker) = &shared.checker {
            checker.report_connect_failure(&backend.name);
        }
        debug!(backend = %backend.name, address = %backend.address, error = %error, "backend connect failed; trying the next");
    }
    warn!(
        tried = order.len(),
        "every candidate backend refused or timed out"
    );
    None
}

async fn connect_one(address: &Address) -> io::Result<TcpStream> {
    if let Some(ip) = address.ip() {
        return TcpStream::connect((ip, address.port)).await;
    }
    let mut last = None;
    for addr in tokio::net::lookup_host((address.host.as_str(), address.port)).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the name has no address")))
}
