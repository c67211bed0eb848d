//! Dialling a backend: the health view to route by (waiting for a leader within
//! `timeouts.connect`), then the candidates in the routing mode's order (by weight, backup
//! last, drained and maintained backends left out), each on a place under its
//! `maxConnections` and with its share of the deadline; when all are full, the queue.
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
    metrics::{BackendStats, Place, Queue},
    route,
};

pub(super) type Chosen = (String, Place);

/// The health view to route a new session by. In `leader` routing without a leader (failover
/// under way, or a conflict), waits up to `timeouts.connect` for one instead of refusing at
/// once; other modes do not wait.
pub(super) async fn wait_for_route(config: &Config, shared: &mut Shared) -> Option<HealthView> {
    let overrides = shared.state.control.current();
    let routable = |h: &HealthView| !route::eligible(config, h, &overrides).is_empty();
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

/// Tries the candidates of the routing mode in order within `timeouts.connect` overall,
/// each on a [`Place`] taken under its `maxConnections`. Each attempt gets an equal share of
/// what is left, so a node that does not answer cannot use up the time of the ones after
/// it; a refused node costs nothing. When every candidate is at its `maxConnections`, the
/// session waits in the portal's queue for a place until the deadline.
pub(super) async fn connect(
    config: &Config,
    health: &HealthView,
    client: IpAddr,
    shared: &Shared,
) -> Option<(TcpStream, Chosen)> {
    let state = &shared.state;
    let stats: Vec<Arc<BackendStats>> = config
        .backends
        .iter()
        .map(|b| state.metrics.backend(&b.name))
        .collect();
    let deadline = Instant::now() + config.timeouts.connect;
    let ticket = state.ticket();
    let mut health = health.clone();
    let mut queued: Option<Queued> = None;
    loop {
        let overrides = state.control.current();
        let eligible = route::eligible(config, &health, &overrides);
        if eligible.is_empty() {
            warn!("no backend is routable");
            return None;
        }
        let weights = route::weights(config, &health, &overrides, std::time::Instant::now());
        let order = route::order(
            config.routing,
            &eligible,
            client,
            ticket,
            |i| weights[i],
            |i| stats[i].active.load(Relaxed),
        );
        // The notification is armed before the places are tried, so a place freed in between
        // is not missed.
        let queue = state.metrics.queue.clone();
        let freed = queue.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let mut tried = 0;
        for (k, &i) in order.iter().enumerate() {
            let backend = &config.backends[i];
            let Some(place) = stats[i].try_place(backend.max_connections) else {
                continue;
            };
            drop(queued.take());
            tried += 1;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let share = (deadline - now) / (order.len() - k) as u32;
            let error = match timeout(share, connect_one(&backend.address)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    stats[i].connects.fetch_add(1, Relaxed);
                    stats[i]
                        .connect_micros
                        .fetch_add(now.elapsed().as_micros() as u64, Relaxed);
                    tracing::Span::current().record(
                        "backend",
                        tracing::field::display(format_args!(
                            "{}/{}",
                            backend.name, backend.address
                        )),
                    );
                    return Some((stream, (backend.name.clone(), place)));
                }
                Ok(Err(e)) => e,
                Err(_) => io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {share:?}"),
                ),
            };
            drop(place);
            stats[i].connect_errors.fetch_add(1, Relaxed);
            if let Some(checker) = &shared.checker {
                checker.report_connect_failure(&backend.name);
            }
            debug!(backend = %backend.name, address = %backend.address, error = %error, "backend connect failed; trying the next");
        }
        if tried > 0 {
            warn!(tried, "every candidate backend refused or timed out");
            return None;
        }
        // Every candidate is at its maxConnections: wait for a place.
        if queued.is_none() {
            debug!("every candidate backend is at its maxConnections; queued");
            queued = Some(Queued::new(queue.clone()));
        }
        if timeout(deadline.saturating_duration_since(Instant::now()), freed)
            .await
            .is_err()
        {
            if let Some(q) = queued.take() {
                q.timed_out();
            }
            warn!(
                waited = ?config.timeouts.connect,
                "no backend had room within timeouts.connect (maxConnections)"
            );
            return None;
        }
        health = shared.health.borrow().clone();
    }
}

/// A session waiting in the queue: counted in `waiting` while it lives, its wait recorded
/// when it leaves.
struct Queued {
    queue: Arc<Queue>,
    since: Instant,
    timed_out: bool,
}

impl Queued {
    fn new(queue: Arc<Queue>) -> Queued {
        queue.waiting.fetch_add(1, Relaxed);
        Queued {
            queue,
            since: Instant::now(),
            timed_out: false,
        }
    }

    fn timed_out(mut self) {
        self.timed_out = true;
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let q = &self.queue;
        q.waiting.fetch_sub(1, Relaxed);
        q.waited.fetch_add(1, Relaxed);
        q.wait_micros
            .fetch_add(self.since.elapsed().as_micros() as u64, Relaxed);
        if self.timed_out {
            q.timeouts.fetch_add(1, Relaxed);
        }
    }
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
