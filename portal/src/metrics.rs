//! Counters of the data plane, cheap on the hot path, rendered as Prometheus text by the
//! admin endpoint.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
};

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
}

impl CloseReason {
    pub const ALL: [CloseReason; 7] = [
        CloseReason::Done,
        CloseReason::ClientTimeout,
        CloseReason::ServerTimeout,
        CloseReason::Error,
        CloseReason::Policy,
        CloseReason::Backend,
        CloseReason::Shutdown,
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
    pub active: AtomicU64,
    pub sessions: AtomicU64,
    pub connect_errors: AtomicU64,
}

/// The portal's counters.
#[derive(Default)]
pub struct Metrics {
    /// Admin endpoint connections closed at once because [`crate::admin::MAX_CONNECTIONS`]
    /// were open.
    pub admin_refused: AtomicU64,
    pub accepted: AtomicU64,
    pub sessions: AtomicU64,
    pub active_sessions: AtomicU64,
    rejections: [AtomicU64; Rejection::ALL.len()],
    closes: [AtomicU64; CloseReason::ALL.len()],
    bytes: [Shard; SHARDS],
    backends: Mutex<BTreeMap<String, Arc<BackendStats>>>,
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
        map.entry(name.to_string()).or_default().clone()
    }

    /// Every backend seen so far, by name.
    pub fn backends(&self) -> Vec<(String, Arc<BackendStats>)> {
        let map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
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
