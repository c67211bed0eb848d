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

/// Admission of a client once its address is known: the allow-list, then the per-client
/// limit. Pure apart from the permit it takes.
pub fn admit(
    state: &Arc<State>,
    config: &Config,
    client: IpAddr,
) -> Result<ClientPermit, Rejection> {
    if !allow::is_allowed(&config.allowed_cidrs, client) {
        return Err(Rejection::Allowlist);
    }
    state
        .try_client(allow::canonical(client), config.max_connections_per_client)
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
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("session", client = %peer, backend = tracing::field::Empty);
        if config.proxy_protocol.accept {
            // Admission waits for the address the header carries.
            let shared = shared.clone();
            spawn_session(shards, stream, span, move |stream| {
                session::serve_proxied(stream, peer, permit, config, shared)
            });
        } else {
            match admit(state, &config, peer.ip()) {
                Ok(client) => {
                    let shared = shared.clone();
                    spawn_session(shards, stream, span, move |stream| {
                        session::serve(stream, peer, (permit, client), config, shared)
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
            let text = std::fs::read_to_string(p).map_err(|source| Error::Config {
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
