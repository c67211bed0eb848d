//! Admission: the portal-wide counts (connections, negotiating, generations, draining), the
//! permits that hold a slot under each limit and give it back on drop, the per-client
//! connection rate, and [`admit`], the decision for a client address.
//!
//! May import: `allow`, `config`, `control`, `error` (a listener that cannot be opened),
//! `metrics`, `reload`. Never `session`, `server` or `admin`.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{
            AtomicBool, AtomicU64, AtomicUsize,
            Ordering::{Relaxed, SeqCst},
        },
        Arc, Mutex,
    },
    time::Duration,
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};
use tokio::sync::{watch, Notify};

use crate::{
    allow,
    config::Config,
    control::Control,
    metrics::{flag, gauge, Metrics, Rejection},
    reload::ReloadStatus,
};

/// The counts and permits the serving loop, the sessions and the admin endpoint share.
#[derive(Debug)]
pub struct State {
    pub metrics: Arc<Metrics>,
    pub reload: ReloadStatus,
    /// Runtime overrides of backends' state and weight (the admin endpoint's verbs).
    pub control: Control,
    /// Connections counted against `limits.maxConnections` (admitted or being admitted).
    connections: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, u32>>,
    /// Connections accepted and not yet sessions (`limits.maxNegotiating`).
    negotiating: AtomicUsize,
    /// The same per client address (`limits.maxNegotiatingPerClient`).
    negotiating_per_client: Mutex<HashMap<IpAddr, u32>>,
    /// Accept loops waiting for a negotiation to end (at `limits.maxNegotiating`), and the
    /// notice they wait for.
    slot_waiters: AtomicUsize,
    slot_freed: Notify,
    /// New connections per client address (`limits.connectionRatePerClient`).
    rates: Mutex<RateTable>,
    ticket: AtomicUsize,
    generation: AtomicU64,
    draining: AtomicBool,
    idle: Notify,
}

impl State {
    pub fn new(reload: ReloadStatus) -> Self {
        Self::with_control(reload, Control::default())
    }

    /// [`new`](Self::new) with runtime overrides that others (the Pod's report) also read.
    pub fn with_control(reload: ReloadStatus, control: Control) -> Self {
        State {
            metrics: Arc::new(Metrics::default()),
            reload,
            control,
            connections: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            negotiating: AtomicUsize::new(0),
            negotiating_per_client: Mutex::new(HashMap::new()),
            slot_waiters: AtomicUsize::new(0),
            slot_freed: Notify::new(),
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

    /// From now on the portal accepts no new connection.
    pub fn start_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Counts one more configuration applied; returns its generation.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Relaxed) + 1
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
        let n = self.negotiating.fetch_add(1, SeqCst);
        if n >= max as usize {
            self.negotiating.fetch_sub(1, SeqCst);
            return None;
        }
        Some(NegotiationPermit {
            state: self.clone(),
            client: None,
        })
    }

    /// Resolves once fewer than `max` connections are negotiating. The accept loop waits here
    /// at `limits.maxNegotiating` instead of accepting and closing: the burst waits in the
    /// listen backlog, as behind HAProxy's maxconn, until a negotiation ends. A limit raised by
    /// a reload is seen within 100 ms.
    pub async fn negotiation_slot(&self, max: u32) {
        if self.negotiating() < max as usize {
            return;
        }
        self.slot_waiters.fetch_add(1, SeqCst);
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.negotiating.load(SeqCst) < max as usize {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), freed).await;
        }
        self.slot_waiters.fetch_sub(1, SeqCst);
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
    /// The client's own part of the negotiation (PROXY header, TLS handshake) is over: from
    /// here on the connection waits for the database, which `limits.maxNegotiatingPerClient`
    /// does not count. It stays counted under `limits.maxNegotiating` until it is a session.
    pub fn leave_client(&mut self) {
        if let Some(ip) = self.client.take() {
            self.state.release_negotiating_client(ip);
        }
    }

    /// Counts this connection against `ip`'s negotiating limit `max` (0 = unlimited).
    fn claim_client(&mut self, ip: IpAddr, max: u32) -> Result<(), Rejection> {
        // Unlimited: nothing to count (and no lock to take per connection).
        if self.client.is_some() || max == 0 {
            return Ok(());
        }
        let mut map = self
            .state
            .negotiating_per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return Err(Rejection::NegotiatingPerClientLimit);
        }
        *n += 1;
        self.client = Some(ip);
        Ok(())
    }
}

impl Drop for NegotiationPermit {
    fn drop(&mut self) {
        self.state.negotiating.fetch_sub(1, SeqCst);
        if self.state.slot_waiters.load(SeqCst) > 0 {
            self.state.slot_freed.notify_waiters();
        }
        self.leave_client();
    }
}

impl State {
    fn release_negotiating_client(&self, ip: IpAddr) {
        let mut map = self
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

/// A listening socket for clients whose backlog holds a burst of `max_connections` (HAProxy
/// sizes a frontend's backlog by its maxconn the same way; the kernel caps it at
/// net.core.somaxconn): connections past `limits.maxNegotiating` wait there for their turn.
pub fn listener(
    addr: SocketAddr,
    max_connections: u32,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(max_connections.clamp(1024, 65535))
}

/// The portal's listening sockets: the clients' ([`listener`]) and the admin endpoint's.
pub async fn bind(
    config: &Config,
) -> Result<(tokio::net::TcpListener, tokio::net::TcpListener), crate::error::Error> {
    let bind_error = |what, addr| move |source| crate::error::Error::Bind { what, addr, source };
    let clients = listener(config.listen, config.max_connections)
        .map_err(bind_error("clients", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .map_err(bind_error("the admin endpoint", config.admin))?;
    Ok((clients, admin))
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

/// The admission families: open and negotiating connections, the limit in force, the
/// configuration generation, draining.
#[derive(Debug)]
pub struct AdmissionCollector {
    pub state: Arc<State>,
    pub config: watch::Receiver<Arc<Config>>,
}

impl Collector for AdmissionCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let state = &self.state;
        gauge(
            &mut e,
            "dbportal_connections_active",
            "Open client connections (counted against limits.maxConnections).",
            state.connections(),
        )?;
        gauge(
            &mut e,
            "dbportal_connections_negotiating",
            "Client connections accepted that are not sessions yet (PROXY header, TLS or engine handshake, backend connect), counted against limits.maxNegotiating.",
            state.negotiating(),
        )?;
        gauge(
            &mut e,
            "dbportal_connections_max",
            "limits.maxConnections in force.",
            self.config.borrow().max_connections,
        )?;
        gauge(
            &mut e,
            "dbportal_config_generation",
            "Configurations applied since start (1 = the initial one).",
            state.generation(),
        )?;
        gauge(
            &mut e,
            "dbportal_draining",
            "1 while shutting down.",
            flag(state.draining()),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
