//! The portal's serving loop: accept with back-off, admission (limits, allow-list), one task
//! per session, the admin endpoint beside it, and a drain on shutdown.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, Notify},
};
use tracing::{debug, info, warn, Instrument};

use crate::{
    allow,
    config::Config,
    error::Error,
    health::{self, HealthView},
    metrics::{Metrics, Rejection},
    reload::{self, ReloadStatus},
    session,
};

/// Everything the serving loop, the sessions and the admin endpoint share.
#[derive(Debug)]
pub struct State {
    pub metrics: Arc<Metrics>,
    /// The open sessions, checked again on each configuration or health change.
    pub sessions: Arc<session::Sessions>,
    pub reload: ReloadStatus,
    /// Connections counted against `limits.maxConnections` (admitted or being admitted).
    connections: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, u32>>,
    /// Connections accepted and not yet sessions (`limits.maxNegotiating`).
    negotiating: AtomicUsize,
    /// The same per client address (`limits.maxNegotiatingPerClient`).
    negotiating_per_client: Mutex<HashMap<IpAddr, u32>>,
    /// New connections per client address (`limits.connectionRatePerClient`).
    rates: Mutex<RateTable>,
    ticket: AtomicUsize,
    generation: AtomicU64,
    draining: AtomicBool,
    idle: Notify,
}

impl State {
    pub fn new(reload: ReloadStatus) -> Self {
        State {
            metrics: Arc::new(Metrics::default()),
            sessions: Arc::default(),
            reload,
            connections: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            negotiating: AtomicUsize::new(0),
            negotiating_per_client: Mutex::new(HashMap::new()),
            rates: Mutex::new(RateTable::new()),
            ticket: AtomicUsize::new(0),
            generation: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
        }
    }

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    /// Configurations applied since start (1 = the initial one).
    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// A routing ticket (round robin position).
    pub fn ticket(&self) -> usize {
        self.ticket.fetch_add(1, Relaxed)
    }

    /// Takes a connection slot unless `max` are taken.
    pub fn try_connection(self: &Arc<Self>, max: u32) -> Option<ConnectionPermit> {
        let n = self.connections.fetch_add(1, Relaxed);
        if n >= max as usize {
            self.release_connection();
            return None;
        }
        Some(ConnectionPermit(self.clone()))
    }

    fn release_connection(&self) {
        if self.connections.fetch_sub(1, Relaxed) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Takes a slot for client `ip` unless `max` (0 = unlimited) are taken.
    pub fn try_client(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<ClientPermit> {
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientPermit(self.clone(), ip))
    }

    /// Connections accepted that are not sessions yet.
    pub fn negotiating(&self) -> usize {
        self.negotiating.load(Relaxed)
    }

    /// Takes a negotiation slot unless `max` are taken.
    pub fn try_negotiating(self: &Arc<Self>, max: u32) -> Option<NegotiationPermit> {
        let n = self.negotiating.fetch_add(1, Relaxed);
        if n >= max as usize {
            self.negotiating.fetch_sub(1, Relaxed);
            return None;
        }
        Some(NegotiationPermit {
            state: self.clone(),
            client: None,
        })
    }

    /// Counts a new connection of `ip`; false when it makes more than `per_second` (0 =
    /// unlimited) in the last second. Refused attempts count too, so a client that keeps
    /// flooding stays refused.
    pub fn rate_ok(&self, ip: IpAddr, per_second: u32) -> bool {
        if per_second == 0 {
            return true;
        }
        let mut table = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        table.hit(ip, std::time::Instant::now()) <= per_second
    }

    /// Resolves when no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.connections() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A slot under `limits.maxConnections`, released on drop.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<State>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.release_connection();
    }
}

/// A slot under `limits.maxConnectionsPerClient`, released on drop.
#[derive(Debug)]
pub struct ClientPermit(Arc<State>, IpAddr);

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let mut map = self.0.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// A connection being negotiated, counted under `limits.maxNegotiating` (and, once its client
/// address is known, `limits.maxNegotiatingPerClient`) until it becomes a session or closes;
/// released on drop.
#[derive(Debug)]
pub struct NegotiationPermit {
    state: Arc<State>,
    client: Option<IpAddr>,
}

impl NegotiationPermit {
    /// Counts this connection against `ip`'s negotiating limit `max` (0 = unlimited).
    fn claim_client(&mut self, ip: IpAddr, max: u32) -> Result<(), Rejection> {
        if self.client.is_some() {
            return Ok(());
        }
        let mut map = self
            .state
            .negotiating_per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if max != 0 && *n >= max {
            if *n == 0 {
                map.remove(&ip);
            }
            return Err(Rejection::NegotiatingPerClientLimit);
        }
        *n += 1;
        self.client = Some(ip);
        Ok(())
    }
}

impl Drop for NegotiationPermit {
    fn drop(&mut self) {
        self.state.negotiating.fetch_sub(1, Relaxed);
        if let Some(ip) = self.client {
            let mut map = self
                .state
                .negotiating_per_client
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// New connections per client address over a sliding second (HAProxy's estimate: this
/// second's count plus last second's, weighted by how much of it the window still covers).
#[derive(Debug)]
struct RateTable {
    start: std::time::Instant,
    /// Second (since `start`) of the latest purge of stale entries.
    purged: u64,
    entries: HashMap<IpAddr, RateEntry>,
}

#[derive(Debug, Clone, Copy)]
struct RateEntry {
    second: u64,
    current: u32,
    previous: u32,
}

impl RateTable {
    fn new() -> Self {
        RateTable {
            start: std::time::Instant::now(),
            purged: 0,
            entries: HashMap::new(),
        }
    }

    /// Counts one connection of `ip` at `now`; returns the estimated rate including it.
    fn hit(&mut self, ip: IpAddr, now: std::time::Instant) -> u32 {
        let ms = now.saturating_duration_since(self.start).as_millis() as u64;
        let second = ms / 1000;
        if second > self.purged {
            // Entries idle for two seconds estimate 0: drop them, so the table holds only the
            // clients of the last two seconds.
            self.entries.retain(|_, e| e.second + 1 >= second);
            self.purged = second;
        }
        let e = self.entries.entry(ip).or_insert(RateEntry {
            second,
            current: 0,
            previous: 0,
        });
        if e.second != second {
            e.previous = if e.second + 1 == second { e.current } else { 0 };
            e.current = 0;
            e.second = second;
        }
        e.current = e.current.saturating_add(1);
        // Rounded up: a client at its limit stays there rather than slipping one through.
        let left = 1000 - ms % 1000;
        e.current + (u64::from(e.previous) * left).div_ceil(1000) as u32
    }
}

/// Admission of a client once its address is known: the allow-list, the new-connection rate,
/// the negotiating limit and then the sessions limit of that address. Pure apart from the
/// counts and permits it takes.
pub fn admit(
    state: &Arc<State>,
    config: &Config,
    client: IpAddr,
    negotiating: &mut NegotiationPermit,
) -> Result<ClientPermit, Rejection> {
    if !allow::is_allowed(&config.allowed_cidrs, client) {
        return Err(Rejection::Allowlist);
    }
    let client = allow::canonical(client);
    if !state.rate_ok(client, config.connection_rate_per_client) {
        return Err(Rejection::RateLimit);
    }
    negotiating.claim_client(client, config.max_negotiating_per_client)?;
    state
        .try_client(client, config.max_connections_per_client)
        .ok_or(Rejection::PerClientLimit)
}

/// What every session task receives.
#[derive(Clone, Debug)]
pub struct Shared {
    pub state: Arc<State>,
    pub config: watch::Receiver<Arc<Config>>,
    pub health: watch::Receiver<HealthView>,
    /// The health checker, to report backends that refuse sessions (starts fast probing).
    pub checker: Option<health::HealthHandle>,
    /// Becomes `true` when the drain timeout ran out: close now.
    pub kill: watch::Receiver<bool>,
    /// TLS termination: the certificate in force and the engine negotiation.
    pub tls: Arc<crate::tls::TlsRuntime>,
}

/// Serves client connections from `listener` and the admin endpoint on `admin` with the
/// configurations published on `config` and the health views on `health`, until `shutdown`
/// resolves; then stops accepting, lets open sessions finish for the configuration's
/// `drainTimeout`, closes the rest and returns.
pub async fn run(
    listener: TcpListener,
    admin: TcpListener,
    config: watch::Receiver<Arc<Config>>,
    health: impl Into<health::HealthSource>,
    reload: ReloadStatus,
    shutdown: impl Future<Output = ()>,
) {
    let tls = crate::tls::TlsRuntime::new_or_closed(&config.borrow());
    run_with_tls(listener, admin, config, health, reload, tls, shutdown).await
}

/// [`run`] with a TLS runtime made by the caller, who may feed it certificates (a portal in a
/// cluster hands over its TLS Secret's pair).
pub async fn run_with_tls(
    listener: TcpListener,
    admin: TcpListener,
    config: watch::Receiver<Arc<Config>>,
    health: impl Into<health::HealthSource>,
    reload: ReloadStatus,
    tls: Arc<crate::tls::TlsRuntime>,
    shutdown: impl Future<Output = ()>,
) {
    let health = health.into();
    let state = Arc::new(State::new(reload));
    let (kill_tx, kill) = watch::channel(false);
    let (admin_stop, admin_stopped) = watch::channel(false);
    let tls_task = tls.spawn(config.clone(), crate::tls::CERT_POLL_INTERVAL);
    let shared = Shared {
        state: state.clone(),
        config,
        health: health.view,
        checker: health.checker,
        kill,
        tls,
    };
    let admin_task = tokio::spawn(crate::admin::serve(admin, shared.clone(), admin_stopped));
    let generations = tokio::spawn(count_generations(shared.config.clone(), state.clone()));
    let control = tokio::spawn(session::control_sessions(shared.clone()));
    let shards = match Shards::start(Shards::count()) {
        Ok(shards) => Some(shards),
        Err(e) => {
            warn!(error = %e, "no data plane threads; sessions run on the main runtime");
            None
        }
    };

    accept_loop(&listener, &shared, shards.as_ref(), shutdown).await;
    drop(listener);

    state.draining.store(true, Relaxed);
    let grace = shared.config.borrow().drain_timeout;
    info!(connections = state.connections(), grace = ?grace, "shutting down: no new connections, draining open sessions");
    if tokio::time::timeout(grace, state.wait_idle())
        .await
        .is_err()
    {
        warn!(
            connections = state.connections(),
            "drain timeout reached; closing the remaining sessions"
        );
        let _ = kill_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), state.wait_idle()).await;
    }
    info!("drained");
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
    generations.abort();
    control.abort();
    tls_task.abort();
    drop(shards);
}

/// The data plane's threads: each runs a single-threaded runtime of its own (its own epoll
/// and timers), and a session lives on one of them from accept to close. A session's socket
/// events, its wake-ups and its polls then stay on one thread: no work stealing, no waking of
/// another worker per readiness event, as in a proxy with one event loop per thread.
struct Shards {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    next: AtomicUsize,
}

impl Shards {
    /// One per core, or `TOKIO_WORKER_THREADS`.
    fn count() -> usize {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    fn start(count: usize) -> io::Result<Shards> {
        let mut shards = Shards {
            handles: Vec::with_capacity(count),
            stops: Vec::with_capacity(count),
            next: AtomicUsize::new(0),
        };
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            shards.handles.push(runtime.handle().clone());
            shards.stops.push(stop);
            std::thread::Builder::new()
                .name(format!("portal-data-{i}"))
                .spawn(move || {
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    // Dropping the runtime drops the sessions still on it.
                })?;
        }
        Ok(shards)
    }

    /// Runs a session on the next thread, round robin. The socket is moved to that thread's
    /// event loop.
    fn spawn<F, Fut>(&self, stream: TcpStream, session: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Ok(std) = stream.into_std() else { return };
        let i = self.next.fetch_add(1, Relaxed) % self.handles.len();
        self.handles[i].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(stream) => session(stream).await,
                Err(e) => warn!(error = %e, "a session's socket could not be registered"),
            }
        });
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// Where sessions run: on the data plane's threads, or on the caller's runtime.
fn spawn_session<F, Fut>(shards: Option<&Shards>, stream: TcpStream, span: tracing::Span, f: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    match shards {
        Some(shards) => shards.spawn(stream, move |s| f(s).instrument(span)),
        None => {
            tokio::spawn(f(stream).instrument(span));
        }
    }
}

async fn count_generations(mut config: watch::Receiver<Arc<Config>>, state: Arc<State>) {
    while config.changed().await.is_ok() {
        let c = config.borrow_and_update().clone();
        let g = state.generation.fetch_add(1, Relaxed) + 1;
        info!(
            generation = g,
            backends = c.backends.len(),
            routing = c.routing.as_str(),
            allowed_cidrs = c.allowed_cidrs.len(),
            max_connections = c.max_connections,
            "configuration applied"
        );
        for b in &c.backends {
            state.metrics.backend(&b.name);
        }
    }
}

async fn accept_loop(
    listener: &TcpListener,
    shared: &Shared,
    shards: Option<&Shards>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let state = &shared.state;
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::ZERO;
                x
            }
            Err(e) if per_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: retrying at once would spin.
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                warn!(error = %e, backoff = ?backoff, "accept failed; backing off");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        state.metrics.accepted.fetch_add(1, Relaxed);
        let config = shared.config.borrow().clone();
        let Some(permit) = state.try_connection(config.max_connections) else {
            state.metrics.reject(Rejection::Limit);
            debug!(client = %peer, max = config.max_connections, "closed: maxConnections reached");
            continue;
        };
        let Some(mut negotiating) = state.try_negotiating(config.max_negotiating) else {
            state.metrics.reject(Rejection::NegotiatingLimit);
            debug!(client = %peer, max = config.max_negotiating, "closed: limits.maxNegotiating reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("session", client = %peer, backend = tracing::field::Empty);
        if config.proxy_protocol.accept {
            // Only the trusted load balancers may say who the client is.
            if config.proxy_trusted.is_empty()
                || !allow::is_allowed(&config.proxy_trusted, peer.ip())
            {
                state.metrics.reject(Rejection::UntrustedProxy);
                debug!(client = %peer, "closed: not in proxyProtocol.trustedCIDRs, its PROXY header would not be believed");
                continue;
            }
            // Admission waits for the address the header carries.
            let shared = shared.clone();
            spawn_session(shards, stream, span, move |stream| {
                session::serve_proxied(stream, peer, permit, negotiating, config, shared)
            });
        } else {
            match admit(state, &config, peer.ip(), &mut negotiating) {
                Ok(client) => {
                    let shared = shared.clone();
                    spawn_session(shards, stream, span, move |stream| {
                        session::serve(stream, peer, (permit, client), negotiating, config, shared)
                    });
                }
                Err(why) => {
                    state.metrics.reject(why);
                    debug!(client = %peer, reason = why.as_str(), "closed before any backend connection");
                }
            }
        }
    }
}

/// Errors that concern one connection only (it died in the backlog): accept the next.
fn per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| Error::Signal {
        signal: "SIGINT",
        source,
    })?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}

/// The standalone portal: loads `path` (or the embedded default), listens on its `listen` and
/// `admin` addresses, follows changes of the file, and serves until `shutdown` resolves.
pub async fn standalone(
    path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (text, origin) = match &path {
        Some(p) => {
            let text = reload::read_config(p).map_err(|source| Error::Config {
                origin: p.display().to_string(),
                source: crate::config::ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                },
            })?;
            (text, p.display().to_string())
        }
        None => (
            reload::DEFAULT_CONFIG.to_string(),
            "embedded default".to_string(),
        ),
    };
    let config = reload::parse_standalone(&text).map_err(|source| Error::Config {
        origin: origin.clone(),
        source,
    })?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            what: "clients",
            addr: config.listen,
            source,
        })?;
    let admin = TcpListener::bind(config.admin)
        .await
        .map_err(|source| Error::Bind {
            what: "the admin endpoint",
            addr: config.admin,
            source,
        })?;
    info!(
        config = %origin,
        listen = %local(&listener),
        admin = %local(&admin),
        engine = config.engine.as_str(),
        backends = config.backends.len(),
        "portal listening"
    );
    // A portal that cannot load its certificate does not start.
    crate::tls::TlsRuntime::check(&config)?;
    let status = ReloadStatus::loaded(origin);
    let (tx, rx) = watch::channel(Arc::new(config));
    let health = health::spawn_checker(rx.clone(), Arc::new(health::StandaloneCredentials));
    let watcher =
        path.map(|p| tokio::spawn(reload::watch_file(p, text, tx.clone(), status.clone())));
    run(listener, admin, rx, health, status, shutdown).await;
    if let Some(w) = watcher {
        w.abort();
    }
    drop(tx);
    Ok(())
}

fn local(l: &TcpListener) -> String {
    l.local_addr()
        .map_or_else(|e| e.to_string(), |a: SocketAddr| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_table_estimates_a_sliding_second_and_forgets_idle_clients() {
        let mut t = RateTable::new();
        let at = |ms: u64| t.start + Duration::from_millis(ms);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "::1".parse().unwrap());
        let (t0, t1, t2, t3) = (at(100), at(900), at(1500), at(3200));
        for i in 1..=10 {
            assert_eq!(t.hit(a, t0), i);
        }
        assert_eq!(t.hit(b, t1), 1, "clients are counted apart");
        // Half of the next second: last second's 10 weigh half.
        assert_eq!(t.hit(a, t2), 1 + 5);
        // Two seconds later the old counts are gone, and so is the idle entry of b.
        assert_eq!(t.hit(a, t3), 1);
        assert!(!t.entries.contains_key(&b));
    }

    #[test]
    fn negotiation_permits_count_per_client_and_release_on_drop() {
        let state = Arc::new(State::new(ReloadStatus::default()));
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let mut first = state.try_negotiating(3).unwrap();
        first.claim_client(ip, 1).unwrap();
        let mut second = state.try_negotiating(3).unwrap();
        assert_eq!(
            second.claim_client(ip, 1),
            Err(Rejection::NegotiatingPerClientLimit)
        );
        let third = state.try_negotiating(3).unwrap();
        assert!(state.try_negotiating(3).is_none(), "the portal-wide limit");
        assert_eq!(state.negotiating(), 3);
        drop(first);
        second.claim_client(ip, 1).unwrap();
        drop((second, third));
        assert_eq!(state.negotiating(), 0);
        assert!(state.negotiating_per_client.lock().unwrap().is_empty());
    }
}
