//! What the two hubs of shared server connections, Redis multiplexing's and PostgreSQL
//! pooling's, have in common: the task that retires the pools of a backend no longer
//! routable (a demoted leader) after each configuration or health change ([`RouteWatch`]),
//! the backend a client's traffic goes to now ([`first_choice`]: the routing mode's first
//! choice, waiting up to `timeouts.connect` for one during a failover), opening a server
//! connection ([`open_server`]: TCP, then TLS when `tls.backend` is on, within
//! [`within_connect`]), and the histograms with buckets of their own that their reports
//! encode ([`bucketed_histogram`]).
//!
//! May import: `config`, `health`, `route`, `tls` and the session's [`Shared`](super::Shared).

use std::{
    fmt,
    future::Future,
    io,
    net::IpAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
    time::timeout,
};

use super::Shared;
use crate::{
    config::{Backend, Config},
    health::HealthView,
    route,
    tls::{BackendConnector, MaybeTls},
};

/// The task of a hub that retires its pools on a route change, started once.
#[derive(Debug, Default)]
pub(crate) struct RouteWatch(OnceLock<()>);

impl RouteWatch {
    /// Starts (the first time only) the task that calls `retire` with `hub` after each
    /// configuration or health change, until either channel closes or the hub is dropped.
    pub(crate) fn start<T: Send + Sync + 'static>(
        &self,
        hub: &Arc<T>,
        mut config: watch::Receiver<Arc<Config>>,
        mut health: watch::Receiver<HealthView>,
        retire: fn(&T, &Config, &HealthView),
    ) {
        if self.0.set(()).is_err() {
            return;
        }
        let hub = Arc::downgrade(hub);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = health.changed() => if r.is_err() { break },
                    r = config.changed() => if r.is_err() { break },
                }
                let Some(hub) = hub.upgrade() else { break };
                let config = config.borrow().clone();
                let view = health.borrow().clone();
                retire(&hub, &config, &view);
            }
        });
    }
}

/// `name/address` of each backend that health and leadership allow (administrative states
/// aside): the shared server connections of multiplexing and pooling to any other backend
/// are retired.
pub(crate) fn routable_bases(config: &Config, view: &HealthView) -> Vec<String> {
    route::eligible_by_health(config, view)
        .into_iter()
        .map(|i| format!("{}/{}", config.backends[i].name, config.backends[i].address))
        .collect()
}

/// The index of the backend the routing mode chooses first now for a client at `ip`
/// (`ticket`: its round-robin position), waiting up to `timeouts.connect` for one (a
/// failover). `Err` carries that wait when none came.
pub(crate) async fn first_choice(
    config: &Config,
    shared: &Shared,
    ip: IpAddr,
    ticket: usize,
) -> Result<usize, Duration> {
    let mut health = shared.health.clone();
    let overrides = shared.state.control.current();
    let order = |view: &HealthView| {
        let eligible = route::eligible(config, view, &overrides);
        let weights = route::weights(config, view, &overrides, std::time::Instant::now());
        route::order(config.routing, &eligible, ip, ticket, |i| weights[i], |_| 0)
            .first()
            .copied()
    };
    if let Some(i) = order(&health.borrow_and_update()) {
        return Ok(i);
    }
    let wait = config.timeouts.connect;
    let chosen = match timeout(wait, health.wait_for(|v| order(v).is_some())).await {
        Ok(Ok(view)) => order(&view).ok_or(wait),
        _ => Err(wait),
    };
    chosen
}

/// Opens a TCP connection to `backend` (no delay), then TLS when `connector` is set, after
/// PostgreSQL's SSLRequest when `ssl_request`. Unbounded: the caller bounds the whole login
/// with [`within_connect`].
pub(crate) async fn open_server(
    backend: &Backend,
    connector: Option<&BackendConnector>,
    ssl_request: bool,
) -> io::Result<MaybeTls<TcpStream>> {
    open_server_as(backend, connector, ssl_request, Ok).await
}

/// [`open_server`] with the TCP stream made into `S` (`wrap`) once connected.
pub(crate) async fn open_server_as<S>(
    backend: &Backend,
    connector: Option<&BackendConnector>,
    ssl_request: bool,
    wrap: impl FnOnce(TcpStream) -> io::Result<S>,
) -> io::Result<MaybeTls<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let address = &backend.address;
    let tcp = match address.ip() {
        Some(ip) => TcpStream::connect((ip, address.port)).await?,
        None => TcpStream::connect((address.host.as_str(), address.port)).await?,
    };
    let _ = tcp.set_nodelay(true);
    let mut tcp = wrap(tcp)?;
    let Some(connector) = connector else {
        return Ok(MaybeTls::Plain(tcp));
    };
    if ssl_request {
        crate::tls::postgres_ssl_request(&mut tcp)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    let name = connector
        .server_name_for(&address.host)
        .map_err(|e| io::Error::other(e.to_string()))?;
    connector
        .handshake(tcp, name, None)
        .await
        .map_err(|e| io::Error::other(e.to_string()))
}

/// `work` (opening and logging in a server connection) within `deadline`
/// (`timeouts.connect`), else a `TimedOut` error that says so.
pub(crate) async fn within_connect<T>(
    deadline: Duration,
    work: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    timeout(deadline, work).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {deadline:?}"),
        ))
    })
}

/// A histogram with buckets of its own: `counts[i]` observations at most `bound(i)`, the
/// last count (where `bound` gives `None`) for larger ones.
pub(crate) fn bucketed_histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    sum: f64,
    counts: &[u64],
    bound: impl Fn(usize) -> Option<f64>,
) -> fmt::Result {
    let mut cumulative = 0;
    let mut buckets = Vec::with_capacity(counts.len());
    for (i, n) in counts.iter().enumerate() {
        cumulative += n;
        buckets.push((bound(i).unwrap_or(f64::INFINITY), cumulative));
    }
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, cumulative, &buckets, None)
}
