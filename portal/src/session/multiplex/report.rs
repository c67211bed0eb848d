//! What the multiplexer reports: its `/metrics` families (a `Collector`, read from the
//! [`MuxStats`](super::MuxStats) atomics and the pools at scrape time) and its part of `/status`.
//!
//! May import: `metrics`, the rest of `multiplex` and the session's [`hub`](crate::session::hub).

use std::{
    fmt,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};
use serde_json::json;

use super::{commands::PinReason, server::Hub, stats::BATCH_BUCKETS};
use crate::{
    metrics::{counter, counters, gauge, gauges},
    session::hub::bucketed_histogram,
};

/// The multiplexer's families, for `admin::registry`.
#[derive(Debug)]
pub struct MultiplexCollector(pub Arc<Hub>);

/// Per backend name: shared connections alive, dedicated connections open, commands in
/// flight, and whether it is retired (its pools are per data-plane thread: summed here).
fn by_backend(hub: &Hub) -> Vec<(String, usize, usize, usize, bool)> {
    let mut out: Vec<(String, usize, usize, usize, bool)> = Vec::new();
    for p in hub.pools() {
        let row = match out.iter_mut().find(|r| *r.0 == *p.name) {
            Some(row) => row,
            None => {
                out.push((p.name.to_string(), 0, 0, 0, true));
                out.last_mut().expect("pushed")
            }
        };
        row.1 += p.alive();
        row.2 += p.pinned_open();
        row.3 += p.in_flight();
        row.4 &= p.is_retired();
    }
    out.sort();
    out
}

impl Collector for MultiplexCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let hub = &self.0;
        let s = &hub.stats;
        let pools = by_backend(hub);
        gauge(
            &mut e,
            "dbportal_multiplex_clients",
            "Clients served by Redis multiplexing now.",
            s.clients.load(Relaxed),
        )?;
        gauges(
            &mut e,
            "dbportal_multiplex_server_connections",
            "Shared server connections open, per backend.",
            pools
                .iter()
                .map(|p| ([("backend", p.0.clone())], p.1 as i64)),
        )?;
        gauges(
            &mut e,
            "dbportal_multiplex_dedicated_connections",
            "Dedicated server connections open (held by pinned clients or idle), per backend.",
            pools
                .iter()
                .map(|p| ([("backend", p.0.clone())], p.2 as i64)),
        )?;
        gauges(
            &mut e,
            "dbportal_multiplex_in_flight",
            "Commands written to shared server connections and not answered yet, per backend.",
            pools
                .iter()
                .map(|p| ([("backend", p.0.clone())], p.3 as i64)),
        )?;
        gauges(
            &mut e,
            "dbportal_multiplex_pinned_clients",
            "Clients holding a dedicated server connection now, by the reason that pinned them.",
            PinReason::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| ([("reason", r.as_str())], s.pinned[i].load(Relaxed))),
        )?;
        counters(
            &mut e,
            "dbportal_multiplex_pins",
            "Times a client was pinned to a dedicated server connection, by reason.",
            PinReason::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| ([("reason", r.as_str())], s.pins[i].load(Relaxed))),
        )?;
        counter(
            &mut e,
            "dbportal_multiplex_commands",
            "Commands written to shared server connections.",
            s.commands.load(Relaxed),
        )?;
        let buckets: Vec<u64> = s.batch_buckets.iter().map(|b| b.load(Relaxed)).collect();
        bucketed_histogram(
            &mut e,
            "dbportal_multiplex_batch_size",
            "Commands per write to a shared server connection.",
            s.commands.load(Relaxed) as f64,
            &buckets,
            |i| BATCH_BUCKETS.get(i).map(|&b| b as f64),
        )?;
        counter(
            &mut e,
            "dbportal_multiplex_slow_consumers_cut",
            "Clients closed because they left more than pooling.clientOutputLimit of replies unread.",
            s.slow_consumers.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_multiplex_protocol_errors",
            "Clients closed with a RESP error for a malformed or too large command.",
            s.malformed.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_multiplex_replies_failed",
            "Commands in flight answered with an error because their server connection was replaced (leader change) or broke.",
            s.replies_failed.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_multiplex_dedicated_reused",
            "Dedicated server connections cleaned with RESET and given to the next pinned client.",
            s.pinned_reused.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_multiplex_out_of_band",
            "Commands sent on a server connection opened for them alone (SCRIPT KILL, FUNCTION KILL, SHUTDOWN), so that they reach a server busy with a script.",
            s.out_of_band.load(Relaxed),
        )
    }
}

/// The `multiplex` part of `/status`.
pub fn status(hub: &Hub) -> serde_json::Value {
    let s = &hub.stats;
    let batches = s.batches.load(Relaxed);
    let commands = s.commands.load(Relaxed);
    json!({
        "clients": s.clients.load(Relaxed),
        "commands": commands,
        "batches": batches,
        "meanBatchSize": if batches == 0 { 0.0 } else { commands as f64 / batches as f64 },
        "pinned": PinReason::ALL.iter().enumerate()
            .map(|(i, r)| (r.as_str().to_string(), json!(s.pinned[i].load(Relaxed))))
            .collect::<serde_json::Map<_, _>>(),
        "slowConsumersCut": s.slow_consumers.load(Relaxed),
        "protocolErrors": s.malformed.load(Relaxed),
        "repliesFailed": s.replies_failed.load(Relaxed),
        "outOfBand": s.out_of_band.load(Relaxed),
        "serverConnectionsOpened": s.server_connections_opened.load(Relaxed),
        "backends": by_backend(hub).into_iter().map(|p| json!({
            "name": p.0,
            "serverConnections": p.1,
            "dedicatedConnections": p.2,
            "inFlight": p.3,
            "retired": p.4,
        })).collect::<Vec<_>>(),
    })
}
