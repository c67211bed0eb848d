//! The counters of PostgreSQL pooling, for all pools of a portal: kept by the client tasks and
//! the pools, read at scrape time by [`report`](super::report).
//!
//! May import: the rest of `pool`.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

/// Counters of all pools, read at scrape time.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Clients logged in now.
    pub clients: AtomicU64,
    /// Clients holding a server connection now.
    pub active: AtomicU64,
    /// Clients waiting in a queue now.
    pub waiting: AtomicU64,
    pub transactions: AtomicU64,
    pub queries: AtomicU64,
    pub queue_timeouts: AtomicU64,
    pub auth_failures: AtomicU64,
    pub server_opened: AtomicU64,
    pub server_closed: AtomicU64,
    pub server_errors: AtomicU64,
    /// Transactions in flight failed because their server connection went (failover).
    pub failed_in_flight: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// CancelRequests forwarded to a server, to the peer portal that gave out the key, and
    /// dropped (unknown key, idle client, unreachable).
    pub cancels: AtomicU64,
    pub cancels_to_peers: AtomicU64,
    pub cancels_dropped: AtomicU64,
    /// Named statements found prepared on the server connection, and prepared there anew.
    pub prepared_hits: AtomicU64,
    pub prepared_misses: AtomicU64,
    /// Clients pinned now, and pins, by reason (in `PinReason::ALL` order).
    pub pinned: [std::sync::atomic::AtomicI64; super::pinning::PinReason::ALL.len()],
    pub pins: [AtomicU64; super::pinning::PinReason::ALL.len()],
    /// Wait for a server connection: sum in microseconds and bucket counts.
    pub wait_sum_us: AtomicU64,
    pub wait_buckets: [AtomicU64; WAIT_BUCKETS.len() + 1],
}

/// Upper bounds (seconds) of the wait histogram's buckets.
pub const WAIT_BUCKETS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

impl PoolStats {
    pub fn pin(&self, reason: super::pinning::PinReason, delta: i64) {
        let i = super::pinning::PinReason::ALL
            .iter()
            .position(|&r| r == reason)
            .expect("listed");
        self.pinned[i].fetch_add(delta, Relaxed);
        if delta > 0 {
            self.pins[i].fetch_add(1, Relaxed);
        }
    }

    pub fn record_wait(&self, waited: Duration) {
        let secs = waited.as_secs_f64();
        self.wait_sum_us
            .fetch_add(waited.as_micros() as u64, Relaxed);
        let i = WAIT_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(WAIT_BUCKETS.len());
        self.wait_buckets[i].fetch_add(1, Relaxed);
    }
}
