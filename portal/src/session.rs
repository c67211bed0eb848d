//! One client session, in one task and one span: (PROXY header) → admission → (TLS / engine
//! negotiation hook) → backend connect → splice, watching configuration and health changes.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::{timeout, Instant},
};
use tracing::{debug, warn, Instrument};

use crate::{
    allow,
    config::{Address, Config},
    health::HealthView,
    metrics::{BackendStats, CloseReason, Rejection},
    proxy_protocol::{self, Header},
    route,
    server::{admit, ClientPermit, ConnectionPermit, NegotiationPermit, Shared},
    splice::{Splice, Tcp},
    tls::{Negotiation, Pending, Untouched},
};

/// Where a session comes from and arrives at, as seen by admission and the PROXY header we
/// send.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The client: the TCP peer, or the source of its PROXY header.
    pub client: SocketAddr,
    /// The portal address the client connected to.
    pub local: Option<SocketAddr>,
}

/// Whether an open session may go on under a new configuration or health view.
pub fn keep_session(
    config: &Config,
    health: &HealthView,
    client: IpAddr,
    backend: &str,
) -> Result<(), CloseReason> {
    if !allow::is_allowed(&config.allowed_cidrs, client) {
        return Err(CloseReason::Policy);
    }
    if !backend_keeps_sessions(config, health, backend) {
        return Err(CloseReason::Backend);
    }
    Ok(())
}

/// Whether sessions open on `backend` stay open. Backends marked down, or removed from the
/// configuration, keep their open sessions (they fail on their own if the node is gone). In
/// `leader` routing with `closeSessionsOnLeaderChange`, a node that is no longer the leader
/// (demoted, or one of several claiming to lead) loses its sessions at once, so no client
/// keeps writing to it.
pub fn backend_keeps_sessions(config: &Config, health: &HealthView, backend: &str) -> bool {
    if config.routing != crate::config::RoutingMode::Leader
        || !config.close_sessions_on_leader_change
    {
        return true;
    }
    !health.conflict && health.leader_name() == Some(backend)
}

/// A connection already admitted by the accept loop.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    permits: (ConnectionPermit, ClientPermit),
    negotiating: NegotiationPermit,
    config: Arc<Config>,
    shared: Shared,
) {
    let local = if config.proxy_protocol.send {
        stream.local_addr().ok()
    } else {
        None
    };
    let peer = Peer {
        client: peer,
        local,
    };
    negotiate(
        stream,
        peer,
        Vec::new(),
        permits,
        negotiating,
        config,
        shared,
    )
    .await
}

/// A connection whose client address comes from a PROXY header: read it (bounded), then
/// admit.
pub async fn serve_proxied(
    mut stream: TcpStream,
    tcp_peer: SocketAddr,
    permit: ConnectionPermit,
    mut negotiating: NegotiationPermit,
    config: Arc<Config>,
    shared: Shared,
) {
    let state = &shared.state;
    let deadline = config.timeouts.handshake.min(config.timeouts.client);
    let read = Box::pin(timeout(deadline, proxy_protocol::read_header(&mut stream))).await;
    let (header, early) = match read {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            state.metrics.reject(Rejection::ProxyHeader);
            debug!(error = %e, "closed: no valid PROXY header");
            return;
        }
        Err(_) => {
            state.metrics.reject(Rejection::ProxyHeader);
            debug!("closed: no PROXY header within {deadline:?}");
            return;
        }
    };
    let peer = match header {
        Header::Proxy {
            source,
            destination,
        } => Peer {
            client: source,
            local: Some(destination),
        },
        Header::Local => Peer {
            client: tcp_peer,
            local: stream.local_addr().ok(),
        },
    };
    tracing::Span::current().record("client", tracing::field::display(peer.client));
    let client = match admit(state, &config, peer.client.ip(), &mut negotiating) {
        Ok(c) => c,
        Err(why) => {
            state.metrics.reject(why);
            debug!(
                reason = why.as_str(),
                "closed before any backend connection"
            );
            return;
        }
    };
    negotiate(
        stream,
        peer,
        early,
        (permit, client),
        negotiating,
        config,
        shared,
    )
    .await
}

/// The hook where TLS termination and engine-specific negotiation (PostgreSQL SSLRequest,
/// MySQL) turn the TCP stream into the client stream; `proxy` takes any
/// `AsyncRead + AsyncWrite`.
async fn negotiate(
    stream: TcpStream,
    peer: Peer,
    early: Vec<u8>,
    permits: (ConnectionPermit, ClientPermit),
    negotiating: NegotiationPermit,
    config: Arc<Config>,
    shared: Shared,
) {
    let Some(terminator) = shared.tls.terminator() else {
        // TLS is required but no certificate could be loaded: failing closed beats serving
        // plaintext.
        shared.state.metrics.reject(Rejection::Handshake);
        warn!("closed: tls.mode is terminate but no certificate is available");
        return;
    };
    if terminator.is_transparent() {
        // Each phase is boxed: an async fn's future is as large as its largest state, and a
        // plaintext session must not carry the room of a TLS handshake while it idles.
        return Box::pin(proxy(
            Untouched(Tcp::new(stream)),
            peer,
            early,
            permits,
            negotiating,
            config,
            shared,
        ))
        .await;
    }
    // Phase one (TLS handshake, PostgreSQL negotiation) before any backend is used; MySQL's
    // in-protocol upgrade waits for the backend's greeting in `proxy`.
    match Box::pin(terminator.accept_with(Tcp::new(stream), early)).await {
        Ok(accepted) => {
            let pending = Pending {
                terminator,
                accepted,
            };
            Box::pin(proxy(
                pending,
                peer,
                Vec::new(),
                permits,
                negotiating,
                config,
                shared,
            ))
            .await
        }
        Err(e) => {
            shared.state.metrics.reject(Rejection::Handshake);
            shared.tls.record_failure(&e);
            debug!(error = %e, reason = e.label(), "closed: TLS negotiation failed");
        }
    }
}

/// Connects to a backend, finishes the client's negotiation (TLS, engine) against it, and
/// copies bytes both ways until the session ends.
pub async fn proxy<N>(
    client: N,
    peer: Peer,
    early: Vec<u8>,
    permits: (ConnectionPermit, ClientPermit),
    negotiating: NegotiationPermit,
    config: Arc<Config>,
    mut shared: Shared,
) where
    N: Negotiation<Tcp>,
    N::Client: 'static,
    N::Server: 'static,
{
    let state = shared.state.clone();
    let health = match Box::pin(wait_for_route(&config, &mut shared)).await {
        Some(health) => health,
        None => {
            warn!("no backend is routable");
            state.metrics.reject(Rejection::NoBackend);
            return;
        }
    };
    let connected = Box::pin(connect(&config, &health, peer.client.ip(), &shared)).await;
    let Some((server, backend)) = connected else {
        state.metrics.reject(Rejection::NoBackend);
        return;
    };
    let server = Tcp::new(server);
    let (name, stats) = backend;
    let mut to_server = Vec::new();
    if config.proxy_protocol.send {
        let local = peer
            .local
            .or_else(|| server.get_ref().local_addr().ok())
            .unwrap_or(peer.client);
        to_server = proxy_protocol::encode_v2(peer.client, local);
    }
    to_server.extend_from_slice(&early);
    drop(early);
    let (client, server) = if N::NEGOTIATES {
        let mut server = server;
        // The PROXY header precedes the engine's own bytes (a greeting, an SSLRequest).
        if !to_server.is_empty() {
            let write = Box::pin(timeout(
                config.timeouts.connect,
                server.write_all(&to_server),
            ))
            .await;
            if !matches!(write, Ok(Ok(()))) {
                state.metrics.reject(Rejection::NoBackend);
                debug!("closed: the PROXY header could not be sent");
                return;
            }
            to_server = Vec::new();
        }
        let host = config
            .backends
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.address.host.clone())
            .unwrap_or_default();
        match Box::pin(client.finish(server, host)).await {
            Ok(streams) => streams,
            Err(e) => {
                state.metrics.reject(Rejection::Handshake);
                shared.tls.record_failure(&e);
                debug!(error = %e, reason = e.label(), "closed: negotiation with the backend failed");
                return;
            }
        }
    } else {
        match Box::pin(client.finish(server, String::new())).await {
            Ok(streams) => streams,
            Err(_) => return,
        }
    };

    // A session now: no longer counted as negotiating.
    drop(negotiating);
    let metrics = &state.metrics;
    metrics.sessions.fetch_add(1, Relaxed);
    metrics.active_sessions.fetch_add(1, Relaxed);
    stats.active.fetch_add(1, Relaxed);
    stats.sessions.fetch_add(1, Relaxed);
    debug!("session open");
    let registration = match state.sessions.register(&shared, peer.client.ip(), name) {
        Ok(r) => r,
        Err(reason) => {
            // A change published while the session was being set up already excludes it.
            metrics.closed(reason);
            metrics.active_sessions.fetch_sub(1, Relaxed);
            stats.active.fetch_sub(1, Relaxed);
            debug!(reason = reason.as_str(), "session closed");
            return;
        }
    };
    drop(shared);

    let splice = Splice::new(
        client,
        server,
        config.timeouts.client,
        config.timeouts.server,
        to_server,
        metrics.clone(),
    );
    drop(config);
    let established = Established {
        splice,
        registration,
        registered_waker: false,
        metrics: state.metrics.clone(),
        stats,
        permits: Some(permits),
    };
    // The open session runs as a task of its own, sized to what it holds while it idles; the
    // setup's states (connect, negotiation) are freed with this one.
    tokio::spawn(established.instrument(tracing::Span::current()));
}

/// The open sessions, for the checks a configuration or health change makes on each of them.
/// One task ([`control_sessions`]) evaluates them all on each change; a session holds only its
/// slot and a small [`Close`] handle, not watch subscriptions of its own.
#[derive(Debug, Default)]
pub struct Sessions {
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
}

#[derive(Debug)]
struct Entry {
    client: IpAddr,
    backend: String,
    close: Arc<Close>,
}

/// How the control side tells one session to close, and why.
#[derive(Debug, Default)]
pub struct Close {
    closing: AtomicBool,
    state: Mutex<CloseState>,
}

#[derive(Debug, Default)]
struct CloseState {
    reason: Option<CloseReason>,
    waker: Option<Waker>,
}

impl Close {
    /// Asks the session to close with `reason` (the first reason given wins).
    pub fn close(&self, reason: CloseReason) {
        let waker = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.reason.get_or_insert(reason);
            self.closing.store(true, Ordering::Release);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The reason to close, if asked; otherwise registers `cx`'s waker when `register` is set.
    fn poll_reason(&self, cx: &Context<'_>, register: bool) -> Option<CloseReason> {
        if register {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.reason.is_none() {
                st.waker = Some(cx.waker().clone());
            }
        }
        if !self.closing.load(Ordering::Acquire) {
            return None;
        }
        self.state.lock().unwrap_or_else(|e| e.into_inner()).reason
    }
}

impl Sessions {
    /// Registers an open session, unless the configuration, health view or shutdown in force
    /// already means it must close (then the reason).
    pub fn register(
        self: &Arc<Self>,
        shared: &Shared,
        client: IpAddr,
        backend: String,
    ) -> Result<Registration, CloseReason> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: a change published before this point is seen here, one
        // published after it is applied by `control_sessions` to this entry.
        if *shared.kill.borrow() {
            return Err(CloseReason::Shutdown);
        }
        keep_session(
            &shared.config.borrow(),
            &shared.health.borrow(),
            client,
            &backend,
        )?;
        let close = Arc::new(Close::default());
        let entry = Some(Entry {
            client,
            backend,
            close: close.clone(),
        });
        let key = match slots.free.pop() {
            Some(k) => {
                slots.entries[k] = entry;
                k
            }
            None => {
                slots.entries.push(entry);
                slots.entries.len() - 1
            }
        };
        Ok(Registration {
            sessions: self.clone(),
            key,
            close,
        })
    }

    /// Open sessions registered.
    pub fn len(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entries.len() - slots.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes the sessions `decide` gives a reason for.
    fn close_where(&self, mut decide: impl FnMut(IpAddr, &str) -> Option<CloseReason>) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for e in slots.entries.iter().flatten() {
            if let Some(why) = decide(e.client, &e.backend) {
                e.close.close(why);
                closed += 1;
            }
        }
        closed
    }
}

/// An open session's slot in [`Sessions`], freed on drop.
#[derive(Debug)]
pub struct Registration {
    sessions: Arc<Sessions>,
    key: usize,
    close: Arc<Close>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut slots = self
            .sessions
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slots.entries[self.key] = None;
        if slots.entries.len() == slots.free.len() + 1 {
            // The last open session: give the slots back.
            slots.entries = Vec::new();
            slots.free = Vec::new();
        } else {
            slots.free.push(self.key);
        }
    }
}

/// Applies configuration and health changes, and the drain timeout, to every open session:
/// one task for all of them. Runs until the channels close.
pub async fn control_sessions(mut shared: Shared) {
    let sessions = shared.state.sessions.clone();
    let (mut config_open, mut health_open, mut kill_open) = (true, true, true);
    shared.config.borrow_and_update();
    shared.health.borrow_and_update();
    shared.kill.borrow_and_update();
    loop {
        tokio::select! {
            r = shared.config.changed(), if config_open => {
                if r.is_err() { config_open = false; continue; }
            }
            r = shared.health.changed(), if health_open => {
                if r.is_err() { health_open = false; continue; }
            }
            r = shared.kill.changed(), if kill_open => {
                if r.is_err() { kill_open = false; continue; }
            }
            else => return,
        }
        if *shared.kill.borrow_and_update() {
            sessions.close_where(|_, _| Some(CloseReason::Shutdown));
            continue;
        }
        let config = shared.config.borrow_and_update().clone();
        let health = shared.health.borrow_and_update().clone();
        let closed = sessions
            .close_where(|client, backend| keep_session(&config, &health, client, backend).err());
        if closed > 0 {
            debug!(
                closed,
                "sessions closed by a configuration or health change"
            );
        }
    }
}

pin_project_lite::pin_project! {
    /// An open session: the splice until it ends or the control side asks it to close.
    struct Established<C, S> {
        #[pin]
        splice: Splice<C, S>,
        registration: Registration,
        registered_waker: bool,
        metrics: Arc<crate::metrics::Metrics>,
        stats: Arc<BackendStats>,
        permits: Option<(ConnectionPermit, ClientPermit)>,
    }
}

impl<C, S> Future for Established<C, S>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let reason = match this.splice.poll(cx) {
            Poll::Ready(outcome) => {
                if let crate::splice::Outcome::Error(e) = &outcome {
                    debug!(error = %e, "session failed");
                }
                outcome.reason()
            }
            Poll::Pending => {
                // The task's waker does not change while it lives: register it once.
                let register = !*this.registered_waker;
                *this.registered_waker = true;
                match this.registration.close.poll_reason(cx, register) {
                    Some(why) => why,
                    None => return Poll::Pending,
                }
            }
        };
        this.metrics.closed(reason);
        this.metrics.active_sessions.fetch_sub(1, Relaxed);
        this.stats.active.fetch_sub(1, Relaxed);
        this.permits.take();
        debug!(reason = reason.as_str(), "session closed");
        Poll::Ready(())
    }
}

type Chosen = (String, Arc<BackendStats>);

/// The health view to route a new session by. In `leader` routing without a leader (failover
/// under way, or a conflict), waits up to `timeouts.connect` for one instead of refusing at
/// once; other modes do not wait.
async fn wait_for_route(config: &Config, shared: &mut Shared) -> Option<HealthView> {
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
async fn connect(
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The senders that drive a test's `Shared`; dropping one ends its channel.
    struct Drivers {
        config_tx: tokio::sync::watch::Sender<Arc<Config>>,
        _health_tx: tokio::sync::watch::Sender<HealthView>,
        kill_tx: tokio::sync::watch::Sender<bool>,
    }

    /// What the sessions share, serving `config` with no health checker and no TLS.
    fn shared(config: Arc<Config>) -> (Shared, Drivers) {
        let state = Arc::new(crate::server::State::new(
            crate::reload::ReloadStatus::default(),
        ));
        let (config_tx, config_rx) = tokio::sync::watch::channel(config.clone());
        let (_health_tx, health) = tokio::sync::watch::channel(HealthView::default());
        let (kill_tx, kill) = tokio::sync::watch::channel(false);
        let shared = Shared {
            state,
            config: config_rx,
            health,
            checker: None,
            kill,
            tls: crate::tls::TlsRuntime::new_or_closed(&config),
        };
        let drivers = Drivers {
            config_tx,
            _health_tx,
            kill_tx,
        };
        (shared, drivers)
    }

    #[test]
    fn keep_session_follows_the_allow_list() {
        let yaml = "engine: redis\nrouting: {mode: first}\ntls: {mode: disabled}\nbackends: [{name: a, address: \"127.0.0.1:1\"}]\nallowedCIDRs: [127.0.0.2/32]\n";
        let c = crate::config::parse_yaml(yaml).unwrap().validate().unwrap();
        let h = HealthView::default();
        assert_eq!(
            keep_session(&c, &h, "127.0.0.2".parse().unwrap(), "a"),
            Ok(())
        );
        assert_eq!(
            keep_session(&c, &h, "127.0.0.3".parse().unwrap(), "a"),
            Err(CloseReason::Policy)
        );
        assert_eq!(
            keep_session(&c, &h, "::ffff:127.0.0.2".parse().unwrap(), "a"),
            Ok(())
        );
    }

    #[test]
    fn sessions_of_a_node_that_stops_leading_are_cut() {
        let yaml = |close: bool| {
            format!("engine: redis\ntls: {{mode: disabled}}\nrouting: {{closeSessionsOnLeaderChange: {close}}}\nbackends: [{{name: a, address: \"127.0.0.1:1\"}}, {{name: b, address: \"127.0.0.1:2\"}}]\n")
        };
        let c = crate::config::parse_yaml(&yaml(true))
            .unwrap()
            .validate()
            .unwrap();
        let mut h = HealthView::assume_up(["a", "b"]);
        h.leader = Some(0);
        assert!(backend_keeps_sessions(&c, &h, "a"));
        assert!(!backend_keeps_sessions(&c, &h, "b"));
        h.conflict = true;
        h.leader = None;
        assert!(!backend_keeps_sessions(&c, &h, "a"), "a conflict cuts too");
        let keep = crate::config::parse_yaml(&yaml(false))
            .unwrap()
            .validate()
            .unwrap();
        assert!(backend_keeps_sessions(&keep, &h, "a"));
    }

    #[tokio::test]
    async fn a_change_closes_the_sessions_it_excludes_and_only_those() {
        let yaml = |cidrs: &str| {
            format!("engine: tcp\nport: 1\ntls: {{mode: disabled}}\nbackends: [{{name: a, address: \"127.0.0.1:1\"}}]\nallowedCIDRs: [{cidrs}]\n")
        };
        let config = |cidrs: &str| {
            Arc::new(
                crate::config::parse_yaml(&yaml(cidrs))
                    .unwrap()
                    .validate()
                    .unwrap(),
            )
        };
        let (
            shared,
            Drivers {
                config_tx,
                kill_tx,
                _health_tx: _health,
            },
        ) = shared(config("127.0.0.0/8"));
        let state = shared.state.clone();
        let sessions = state.sessions.clone();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let kept = sessions
            .register(&shared, ip("127.0.0.2"), "a".into())
            .unwrap();
        let cut = sessions
            .register(&shared, ip("127.0.0.3"), "a".into())
            .unwrap();
        let gone = sessions
            .register(&shared, ip("127.0.0.4"), "a".into())
            .unwrap();
        drop(gone);
        assert_eq!(sessions.len(), 2);
        let control = tokio::spawn(control_sessions(shared.clone()));
        // A waiting session is woken with the reason.
        let waiting = {
            let close = cut.close.clone();
            tokio::spawn(async move {
                let mut first = true;
                std::future::poll_fn(|cx| {
                    let register = std::mem::take(&mut first);
                    match close.poll_reason(cx, register) {
                        Some(why) => Poll::Ready(why),
                        None => Poll::Pending,
                    }
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        config_tx.send(config("127.0.0.2/32")).unwrap();
        let why = timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(why, CloseReason::Policy);
        let noop = Waker::noop();
        let cx = Context::from_waker(noop);
        assert_eq!(kept.close.poll_reason(&cx, false), None);
        // Registering under a configuration that excludes the client fails at once.
        assert_eq!(
            sessions
                .register(&shared, ip("127.0.0.5"), "a".into())
                .unwrap_err(),
            CloseReason::Policy
        );
        // The slot of a closed session is reused.
        drop(cut);
        let again = sessions
            .register(&shared, ip("127.0.0.2"), "a".into())
            .unwrap();
        assert_eq!(sessions.len(), 2);
        // The drain timeout closes every session.
        kill_tx.send(true).unwrap();
        for close in [&kept.close, &again.close] {
            let close = close.clone();
            let why = timeout(
                Duration::from_secs(10),
                std::future::poll_fn(move |cx| match close.poll_reason(cx, true) {
                    Some(why) => Poll::Ready(why),
                    None => Poll::Pending,
                }),
            )
            .await
            .unwrap();
            assert_eq!(why, CloseReason::Shutdown);
        }
        drop((kept, again));
        assert!(sessions.is_empty());
        control.abort();
    }

    /// What an open, idle session holds in its task besides its sockets' kernel state.
    #[tokio::test]
    async fn an_open_session_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let yaml = format!("engine: tcp\nport: 1\ntls: {{mode: disabled}}\nbackends: [{{name: a, address: \"{addr}\"}}]\n");
        let config = Arc::new(
            crate::config::parse_yaml(&yaml)
                .unwrap()
                .validate()
                .unwrap(),
        );
        let (shared, _drivers) = shared(config);
        let state = shared.state.clone();
        let permits = (
            state.try_connection(10).unwrap(),
            state.try_client(peer.ip(), 0).unwrap(),
        );
        let splice = Splice::new(
            Tcp::new(client),
            Tcp::new(server),
            Duration::from_secs(1),
            Duration::from_secs(1),
            Vec::new(),
            state.metrics.clone(),
        );
        let registration = state
            .sessions
            .register(&shared, peer.ip(), "a".into())
            .unwrap();
        assert_eq!(state.sessions.len(), 1);
        let established = Established {
            splice,
            registration,
            registered_waker: false,
            metrics: state.metrics.clone(),
            stats: state.metrics.backend("a"),
            permits: Some(permits),
        }
        .instrument(tracing::Span::none());
        let size = std::mem::size_of_val(&established);
        println!("open session task future: {size} bytes");
        assert!(size <= 640, "an open session's future grew to {size} bytes");
    }
}
