//! Counters of the data plane, cheap on the hot path (plain atomics, read at scrape time by
//! [`DataPlaneCollector`]), and the helpers every module's collector writes its families with.
//! Each module owns its families (admission, health, reload, TLS, the admin endpoint); the
//! admin endpoint registers the collectors and only encodes.
//!
//! May import: `config`, `control`. Sits beside the layers: anything may import it.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
        NoLabelSet,
    },
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};
use tokio::sync::watch;

use crate::{config::BackendState, config::Config, control::Control};

/// Why a new client was closed before reaching a backend. The name is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// `allowedCIDRs` does not admit the client.
    Allowlist,
    /// `limits.maxConnections` reached.
    Limit,
    /// `limits.maxConnectionsPerClient` reached.
    PerClientLimit,
    /// No backend is routable, or every candidate refused or timed out.
    NoBackend,
    /// `proxyProtocol.accept` and the header is missing, invalid or late.
    ProxyHeader,
    /// The client's TLS/engine negotiation failed (or is not available), or did not end
    /// within `timeouts.handshake`.
    Handshake,
    /// `proxyProtocol.accept` and the peer is not in `proxyProtocol.trustedCIDRs`.
    UntrustedProxy,
    /// `limits.maxNegotiating` connections are negotiating already.
    NegotiatingLimit,
    /// `limits.maxNegotiatingPerClient` connections of this client are negotiating already.
    NegotiatingPerClientLimit,
    /// `limits.connectionRatePerClient` new connections of this client in the last second.
    RateLimit,
}

impl Rejection {
    pub const ALL: [Rejection; 10] = [
        Rejection::Allowlist,
        Rejection::Limit,
        Rejection::PerClientLimit,
        Rejection::NoBackend,
        Rejection::ProxyHeader,
        Rejection::Handshake,
        Rejection::UntrustedProxy,
        Rejection::NegotiatingLimit,
        Rejection::NegotiatingPerClientLimit,
        Rejection::RateLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Allowlist => "allowlist",
            Rejection::Limit => "limit",
            Rejection::PerClientLimit => "per_client_limit",
            Rejection::NoBackend => "no_backend",
            Rejection::ProxyHeader => "proxy_header",
            Rejection::Handshake => "handshake",
            Rejection::UntrustedProxy => "untrusted_proxy",
            Rejection::NegotiatingLimit => "negotiating_limit",
            Rejection::NegotiatingPerClientLimit => "negotiating_per_client_limit",
            Rejection::RateLimit => "rate_limit",
        }
    }
}

/// Why an established session ended. The name is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed (FIN both ways).
    Done,
    /// The client sent nothing for `timeouts.client`.
    ClientTimeout,
    /// The backend sent nothing for `timeouts.server`.
    ServerTimeout,
    /// A read or write failed on either side.
    Error,
    /// A new configuration's `allowedCIDRs` no longer admits the client.
    Policy,
    /// The backend may no longer serve this session (e.g. it stopped being the leader).
    Backend,
    /// Shutdown: the drain timeout ran out.
    Shutdown,
    /// Cut through the admin endpoint (a backend put in maintenance with `cutSessions`, or
    /// `POST /sessions/close`).
    Admin,
    /// The portal refused a TLS record of the client (bad tag, too large, not allowed there).
    TlsRecord,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Done,
        CloseReason::ClientTimeout,
        CloseReason::ServerTimeout,
        CloseReason::Error,
        CloseReason::Policy,
        CloseReason::Backend,
        CloseReason::Shutdown,
        CloseReason::Admin,
        CloseReason::TlsRecord,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::ClientTimeout => "client_timeout",
            CloseReason::ServerTimeout => "server_timeout",
            CloseReason::Error => "error",
            CloseReason::Policy => "policy",
            CloseReason::Backend => "backend",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Admin => "admin",
            CloseReason::TlsRecord => "tls_record",
        }
    }
}

/// Direction of copied bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToBackend = 0,
    BackendToClient = 1,
}

const SHARDS: usize = 8;

/// Byte counters split over cache lines so that worker threads do not contend on one.
#[repr(align(64))]
#[derive(Default)]
struct Shard([AtomicU64; 2]);

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// Per-backend counters; they outlive reloads, keyed by backend name.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub name: String,
    /// Open sessions and sessions being set up (each holds a [`Place`]).
    pub active: AtomicU64,
    /// The most `active` has been.
    pub max_active: AtomicU64,
    pub sessions: AtomicU64,
    pub connect_errors: AtomicU64,
    /// Successful connects and the sum of their durations (µs).
    pub connects: AtomicU64,
    pub connect_micros: AtomicU64,
    /// Bytes of ended sessions, by direction (client to backend, backend to client).
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// The portal's queue, woken when a place frees.
    queue: Arc<Queue>,
}

impl BackendStats {
    /// Takes a place on this backend unless `max` (0 = unlimited) are taken.
    pub fn try_place(self: &Arc<Self>, max: u32) -> Option<Place> {
        let mut now = self.active.load(Relaxed);
        loop {
            if max != 0 && now >= u64::from(max) {
                return None;
            }
            match self
                .active
                .compare_exchange_weak(now, now + 1, Relaxed, Relaxed)
            {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        self.max_active.fetch_max(now + 1, Relaxed);
        Some(Place(self.clone()))
    }
}

/// One session's place on a backend (counted in `active`); given back on drop, waking the
/// sessions queued for a place.
#[derive(Debug)]
pub struct Place(Arc<BackendStats>);

impl Place {
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.0
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
        let queue = &self.0.queue;
        if queue.waiting.load(Relaxed) > 0 {
            queue.freed.notify_waiters();
        }
    }
}

/// New sessions waiting for a place because every candidate backend is at its
/// `maxConnections`.
#[derive(Debug, Default)]
pub struct Queue {
    pub waiting: AtomicU64,
    pub freed: tokio::sync::Notify,
    /// Sessions that waited, the sum of their waits (µs), and those that gave up.
    pub waited: AtomicU64,
    pub wait_micros: AtomicU64,
    pub timeouts: AtomicU64,
}

/// The portal's counters.
#[derive(Default)]
pub struct Metrics {
    /// Admin endpoint connections closed at once because the endpoint's connection cap was
    /// reached.
    pub admin_refused: AtomicU64,
    /// Admin requests answered 431 (their head past `adminLimits.maxHeaderBytes`) and 413
    /// (their body past `adminLimits.maxBodyBytes`).
    pub admin_header_too_large: AtomicU64,
    pub admin_body_too_large: AtomicU64,
    pub accepted: AtomicU64,
    pub sessions: AtomicU64,
    pub active_sessions: AtomicU64,
    rejections: [AtomicU64; Rejection::ALL.len()],
    closes: [AtomicU64; CloseReason::ALL.len()],
    bytes: [Shard; SHARDS],
    backends: Mutex<BTreeMap<String, Arc<BackendStats>>>,
    pub queue: Arc<Queue>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn reject(&self, why: Rejection) {
        self.rejections[why as usize].fetch_add(1, Relaxed);
    }

    pub fn rejections(&self, why: Rejection) -> u64 {
        self.rejections[why as usize].load(Relaxed)
    }

    pub fn closed(&self, why: CloseReason) {
        self.closes[why as usize].fetch_add(1, Relaxed);
    }

    pub fn closes(&self, why: CloseReason) -> u64 {
        self.closes[why as usize].load(Relaxed)
    }

    /// Hot path: one uncontended relaxed add.
    #[inline]
    pub fn add_bytes(&self, dir: Direction, n: u64) {
        self.bytes[shard_index()].0[dir as usize].fetch_add(n, Relaxed);
    }

    pub fn bytes(&self, dir: Direction) -> u64 {
        self.bytes
            .iter()
            .map(|s| s.0[dir as usize].load(Relaxed))
            .sum()
    }

    /// The counters of backend `name`, created on first use.
    pub fn backend(&self, name: &str) -> Arc<BackendStats> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(BackendStats {
                    name: name.to_string(),
                    queue: self.queue.clone(),
                    ..BackendStats::default()
                })
            })
            .clone()
    }

    /// Every backend seen so far, by name.
    pub fn backends(&self) -> Vec<(String, Arc<BackendStats>)> {
        let map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// A counter family without labels, of value `v` (the encoder adds `_total` to `name`).
pub fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeCounterValue,
) -> fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A counter family with one sample per label set (the encoder adds `_total` to `name`).
pub fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge family without labels, of value `v`.
pub fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: impl EncodeGaugeValue,
) -> fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A gauge family with one sample per label set.
pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A histogram without buckets of its own: the sum and count of observations (and the `+Inf`
/// bucket, which holds them all).
pub fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    sum: f64,
    count: u64,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, &[(f64::INFINITY, count)], None)
}

/// A histogram family without buckets of its own, one sample (sum, count) per label set.
pub fn histograms<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, f64, u64)>,
) -> fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, sum, count) in samples {
        family
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &[(f64::INFINITY, count)], None)?;
    }
    Ok(())
}

/// 1 for true, 0 for false.
pub fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// The data plane's families, read from the [`Metrics`] atomics at scrape time; the
/// per-backend ones for the backends of the configuration in force.
#[derive(Debug)]
pub struct DataPlaneCollector {
    pub metrics: Arc<Metrics>,
    pub config: watch::Receiver<Arc<Config>>,
    pub control: Control,
}

impl Collector for DataPlaneCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let config = self.config.borrow().clone();
        let overrides = self.control.current();
        gauges(
            &mut e,
            "dbportal_build_info",
            "The portal's version (always 1).",
            [([("version", env!("CARGO_PKG_VERSION"))], 1i64)],
        )?;
        let q = &m.queue;
        gauge(
            &mut e,
            "dbportal_queue_length",
            "New sessions waiting for a place because every candidate backend is at its maxConnections.",
            q.waiting.load(Relaxed),
        )?;
        histogram(
            &mut e,
            "dbportal_queue_seconds",
            "Time new sessions waited in the queue.",
            q.wait_micros.load(Relaxed) as f64 / 1e6,
            q.waited.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_queue_timeouts",
            "Queued sessions closed because no place freed within timeouts.connect.",
            q.timeouts.load(Relaxed),
        )?;
        gauges(
            &mut e,
            "dbportal_backend_weight",
            "Weight of each backend (the configuration's, or the admin endpoint's override).",
            config.backends.iter().map(|b| {
                (
                    [("backend", b.name.clone())],
                    i64::from(overrides.weight(b)),
                )
            }),
        )?;
        gauges(
            &mut e,
            "dbportal_backend_admin_state",
            "Administrative state of each backend (1 for the state it is in): ready, drain or maint.",
            config.backends.iter().flat_map(|b| {
                let now = overrides.state(b);
                [BackendState::Ready, BackendState::Drain, BackendState::Maint].map(|s| {
                    (
                        [("backend", b.name.clone()), ("state", s.as_str().to_string())],
                        flag(s == now),
                    )
                })
            }),
        )?;
        gauges(
            &mut e,
            "dbportal_backend_sessions_limit",
            "maxConnections of each backend (0 = unlimited).",
            config
                .backends
                .iter()
                .map(|b| ([("backend", b.name.clone())], i64::from(b.max_connections))),
        )?;
        gauge(
            &mut e,
            "dbportal_sessions_active",
            "Client sessions connected to a backend.",
            m.active_sessions.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_admin_connections_refused",
            "Admin endpoint connections closed at once because the endpoint's connection cap was reached.",
            m.admin_refused.load(Relaxed),
        )?;
        counters(
            &mut e,
            "dbportal_admin_requests_refused",
            "Admin endpoint requests refused for their size, by reason: header_too_large (431), body_too_large (413).",
            [
                ("header_too_large", &m.admin_header_too_large),
                ("body_too_large", &m.admin_body_too_large),
            ]
            .map(|(reason, n)| ([("reason", reason)], n.load(Relaxed))),
        )?;
        counter(
            &mut e,
            "dbportal_connections_accepted",
            "Client connections accepted.",
            m.accepted.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_sessions",
            "Client sessions connected to a backend.",
            m.sessions.load(Relaxed),
        )?;
        counters(
            &mut e,
            "dbportal_rejections",
            "Client connections closed before reaching a backend, by reason.",
            Rejection::ALL
                .iter()
                .map(|r| ([("reason", r.as_str())], m.rejections(*r))),
        )?;
        counters(
            &mut e,
            "dbportal_sessions_closed",
            "Sessions ended, by reason.",
            CloseReason::ALL
                .iter()
                .map(|r| ([("reason", r.as_str())], m.closes(*r))),
        )?;
        counters(
            &mut e,
            "dbportal_bytes",
            "Bytes copied, by direction.",
            [
                ("client_to_backend", Direction::ClientToBackend),
                ("backend_to_client", Direction::BackendToClient),
            ]
            .map(|(label, d)| ([("direction", label)], m.bytes(d))),
        )?;
        counter(
            &mut e,
            "dbportal_leader_sessions_cut",
            "Sessions cut because their backend stopped being the leader.",
            m.closes(CloseReason::Backend),
        )?;
        let per_backend = |f: &dyn Fn(&BackendStats) -> u64| {
            config
                .backends
                .iter()
                .map(|b| ([("backend", b.name.clone())], f(&m.backend(&b.name))))
                .collect::<Vec<_>>()
        };
        gauges(
            &mut e,
            "dbportal_backend_sessions_active",
            "Open sessions per backend.",
            per_backend(&|s| s.active.load(Relaxed)),
        )?;
        counters(
            &mut e,
            "dbportal_backend_sessions",
            "Sessions per backend.",
            per_backend(&|s| s.sessions.load(Relaxed)),
        )?;
        counters(
            &mut e,
            "dbportal_backend_connect_errors",
            "Failed connection attempts per backend (refused, unreachable or timed out).",
            per_backend(&|s| s.connect_errors.load(Relaxed)),
        )?;
        gauges(
            &mut e,
            "dbportal_backend_sessions_max",
            "The most sessions each backend has had open at once.",
            per_backend(&|s| s.max_active.load(Relaxed)),
        )?;
        histograms(
            &mut e,
            "dbportal_backend_connect_seconds",
            "Time to connect to each backend (successful connects).",
            config.backends.iter().map(|b| {
                let s = m.backend(&b.name);
                (
                    [("backend", b.name.clone())],
                    s.connect_micros.load(Relaxed) as f64 / 1e6,
                    s.connects.load(Relaxed),
                )
            }),
        )?;
        counters(
            &mut e,
            "dbportal_backend_bytes",
            "Bytes of ended sessions per backend, by direction.",
            config.backends.iter().flat_map(|b| {
                let s = m.backend(&b.name);
                [
                    ("client_to_backend", s.bytes_in.load(Relaxed)),
                    ("backend_to_client", s.bytes_out.load(Relaxed)),
                ]
                .map(|(d, v)| {
                    (
                        [("backend", b.name.clone()), ("direction", d.to_string())],
                        v,
                    )
                })
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_sum_over_threads() {
        let m = Arc::new(Metrics::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.add_bytes(Direction::ClientToBackend, 3);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.bytes(Direction::ClientToBackend), 12_000);
        assert_eq!(m.bytes(Direction::BackendToClient), 0);
    }
}
