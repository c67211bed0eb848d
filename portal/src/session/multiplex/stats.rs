//! The counters of multiplexing, for all its connections and clients: kept by the client
//! tasks, the pools and the shared connections' writers, read at scrape time by
//! [`report`](super::report).
//!
//! May import: nothing outside `multiplex`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use super::commands::PinReason;

/// Counters of the multiplexer, read by `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct MuxStats {
    pub clients: AtomicI64,
    pub commands: AtomicU64,
    pub batches: AtomicU64,
    /// Batches of at most 1, 2, 4, … 512 commands, and more.
    pub batch_buckets: [AtomicU64; BATCH_BUCKETS.len() + 1],
    pub pinned: [AtomicI64; PinReason::ALL.len()],
    pub pins: [AtomicU64; PinReason::ALL.len()],
    pub pinned_reused: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub malformed: AtomicU64,
    pub replies_failed: AtomicU64,
    pub server_connections_opened: AtomicU64,
    pub server_connections_closed: AtomicU64,
    /// Commands sent on a server connection opened for them alone (SCRIPT KILL, FUNCTION
    /// KILL, SHUTDOWN).
    pub out_of_band: AtomicU64,
}

/// Upper bounds of the batch size histogram's buckets.
pub const BATCH_BUCKETS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

impl MuxStats {
    pub(super) fn record_batch(&self, commands: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.commands.fetch_add(commands, Relaxed);
        let i = BATCH_BUCKETS
            .iter()
            .position(|&b| commands <= b)
            .unwrap_or(BATCH_BUCKETS.len());
        self.batch_buckets[i].fetch_add(1, Relaxed);
    }

    pub fn pin(&self, reason: PinReason, delta: i64) {
        let i = PinReason::ALL
            .iter()
            .position(|&r| r == reason)
            .expect("listed");
        self.pinned[i].fetch_add(delta, Relaxed);
        if delta > 0 {
            self.pins[i].fetch_add(1, Relaxed);
        }
    }
}
