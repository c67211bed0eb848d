//! The portal's serving loop: accept with back-off, admission (limits, allow-list), one task
//! per session on the data plane's threads, the admin endpoint beside it, and a drain on
//! shutdown. The top of the crate: it also runs the two ways of starting a portal, a file
//! ([`standalone`]) or a cluster ([`cluster`]), which prepare what it serves.
//!
//! May import: `admin`, `admission`, `allow`, `cluster`, `config`, `control`, `error`,
//! `exec`, `health`, `metrics`, `reload`, `session`, `standalone`, `tls`: any module.
//! Nothing imports it.

use std::{
    future::Future,
    io,
    path::PathBuf,
    sync::{atomic::AtomicUsize, atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn, Instrument};

use crate::{
    admin,
    admission::{admit, State},
    allow, cluster,
    config::Config,
    control::Control,
    error::Error,
    health,
    metrics::Rejection,
    reload::ReloadStatus,
    session::{self, Shared},
    standalone,
    tls::{self, TlsRuntime},
};

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
    let tls = TlsRuntime::new_or_closed(&config.borrow());
    let control = Control::default();
    run_with_tls(
        listener, admin, config, health, reload, control, tls, shutdown,
    )
    .await
}

/// [`run`] with a TLS runtime made by the caller, who may feed it certificates (a portal in a
/// cluster hands over its TLS Secret's pair), and the runtime overrides it reports.
#[allow(clippy::too_many_arguments)]
pub async fn run_with_tls(
    listener: TcpListener,
    admin: TcpListener,
    config: watch::Receiver<Arc<Config>>,
    health: impl Into<health::HealthSource>,
    reload: ReloadStatus,
    control: Control,
    tls: Arc<TlsRuntime>,
    shutdown: impl Future<Output = ()>,
) {
    let health = health.into();
    let state = Arc::new(State::with_control(reload, control));
    let (kill_tx, kill) = watch::channel(false);
    let (admin_stop, admin_stopped) = watch::channel(false);
    let tls_task = tls.spawn(config.clone(), tls::CERT_POLL_INTERVAL);
    let shared = Shared {
        state: state.clone(),
        sessions: Arc::default(),
        config,
        health: health.view,
        checker: health.checker,
        kill,
        tls,
        mux: Arc::default(),
        pg: Arc::default(),
        reads: None,
    };
    let mut shared = shared;
    let current = shared.config.borrow().clone();
    let reads = match read_only_listener(&current).await {
        Some(listener) => {
            let reads = session::reads::for_reads(&shared);
            shared.reads = Some(Box::new(reads.clone()));
            Some((listener, reads))
        }
        None => None,
    };
    let reads_control = reads
        .as_ref()
        .map(|(_, reads)| tokio::spawn(session::control_sessions(reads.clone())));
    let admin_task = tokio::spawn(admin::serve(admin, shared.clone(), admin_stopped));
    let generations = tokio::spawn(count_generations(shared.config.clone(), state.clone()));
    let control = tokio::spawn(session::control_sessions(shared.clone()));
    let shards = match Shards::start(Shards::count()) {
        Ok(shards) => Some(shards),
        Err(e) => {
            warn!(error = %e, "no data plane threads; sessions run on the main runtime");
            None
        }
    };

    match &reads {
        None => accept_loop(&listener, &shared, shards.as_ref(), shutdown).await,
        Some((reads_listener, reads)) => {
            let (stop_tx, mut stop_rx) = watch::channel(false);
            tokio::join!(
                async {
                    accept_loop(&listener, &shared, shards.as_ref(), shutdown).await;
                    let _ = stop_tx.send(true);
                },
                accept_loop(reads_listener, reads, shards.as_ref(), async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                }),
            );
        }
    }
    drop(listener);
    let reads_listener = reads.map(|(l, _)| l);
    drop(reads_listener);

    state.start_draining();
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
    if let Some(c) = reads_control {
        c.abort();
    }
    tls_task.abort();
    drop(shards);
}

/// The read-only listener (`readOnly`), bound at start: a later change of its port or address
/// takes a restart. A port that cannot be bound is logged, and the portal serves without it.
async fn read_only_listener(config: &Config) -> Option<TcpListener> {
    let ro = config.read_only.as_ref()?;
    match TcpListener::bind(ro.listen).await {
        Ok(listener) => {
            info!(listen = %ro.listen, routing = ro.routing.as_str(), max_lag = ?ro.max_lag, "read-only listener");
            Some(listener)
        }
        Err(e) => {
            tracing::error!(listen = %ro.listen, error = %e, "the read-only listener (readOnly) cannot listen; serving without it");
            None
        }
    }
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
                        // The pooled sessions' executor runs beside the thread's tasks.
                        tokio::select! {
                            _ = crate::exec::run() => {}
                            _ = stopped => {}
                        }
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
        let g = state.next_generation();
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
        // At limits.maxNegotiating, accept nothing until a negotiation ends: the burst waits
        // in the listen backlog instead of being closed.
        let max_negotiating = shared.config.borrow().max_negotiating;
        tokio::select! {
            biased;
            _ = &mut shutdown => return,
            _ = state.negotiation_slot(max_negotiating) => {}
        }
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
    let portal = standalone::start(path).await?;
    run(
        portal.listener,
        portal.admin,
        portal.config,
        portal.health,
        portal.reload,
        shutdown,
    )
    .await;
    drop(portal.following);
    Ok(())
}

/// The portal in a cluster: configured by a ConfigMap, its certificate and probe credentials
/// from Secrets, reporting its view on its Pod; serves until `shutdown` resolves.
pub async fn cluster(
    client: kube::Client,
    options: cluster::Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let Some(portal) = cluster::start(client, options, shutdown.as_mut()).await? else {
        return Ok(());
    };
    run_with_tls(
        portal.listener,
        portal.admin,
        portal.config,
        portal.health,
        portal.reload,
        portal.control,
        portal.tls,
        shutdown,
    )
    .await;
    drop(portal.following);
    Ok(())
}
