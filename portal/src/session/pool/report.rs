//! What PostgreSQL pooling reports: its `/metrics` families (a `Collector`, read from the
//! [`PoolStats`](super::PoolStats) atomics and the pools at scrape time) and its part of
//! `/status`.
//!
//! May import: `metrics`, the rest of `pool` and the session's [`hub`](crate::session::hub).

use std::{
    collections::BTreeMap,
    fmt,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};
use serde_json::json;

use super::{pinning::PinReason, pools::PgHub, stats::WAIT_BUCKETS};
use crate::{
    metrics::{counter, counters, gauge, gauges},
    session::hub::bucketed_histogram,
};

/// The pooler's families, for `admin::registry`.
#[derive(Debug)]
pub struct PoolCollector(pub Arc<PgHub>);

impl Collector for PoolCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let hub = &self.0;
        let s = &hub.stats;
        let pools = hub.pools();
        let labels = |p: &super::server::Pool| {
            [
                ("backend", p.backend.name.clone()),
                ("database", p.database.clone()),
                ("user", p.user.clone()),
            ]
        };
        gauges(
            &mut e,
            "dbportal_pool_clients",
            "PostgreSQL clients logged in to the pooler, by state: active (holding a server connection), waiting (queued for one), idle.",
            {
                let (clients, active, waiting) = (
                    s.clients.load(Relaxed) as i64,
                    s.active.load(Relaxed) as i64,
                    s.waiting.load(Relaxed) as i64,
                );
                [
                    ([("state", "active")], active),
                    ([("state", "waiting")], waiting),
                    ([("state", "idle")], (clients - active - waiting).max(0)),
                ]
            },
        )?;
        // The pools of one backend, database and user (one per set of startup parameters)
        // count together.
        let mut per_labels: BTreeMap<[(&str, String); 3], [i64; 4]> = BTreeMap::new();
        for p in &pools {
            let (open, idle) = p.counts();
            let active = p.active.load(Relaxed) as usize;
            let sum = per_labels.entry(labels(p)).or_default();
            sum[0] += active as i64;
            sum[1] += idle as i64;
            sum[2] += open.saturating_sub(idle + active) as i64;
            sum[3] += p.waiting() as i64;
        }
        let mut conns = Vec::new();
        for (l, [active, idle, opening, _]) in &per_labels {
            for (state, n) in [("active", active), ("idle", idle), ("opening", opening)] {
                let mut l = l.to_vec();
                l.push(("state", state.into()));
                conns.push((l, *n));
            }
        }
        gauges(
            &mut e,
            "dbportal_pool_server_connections",
            "Pooled PostgreSQL server connections, per backend, database and user, by state (active, idle, opening).",
            conns,
        )?;
        gauges(
            &mut e,
            "dbportal_pool_waiting_clients",
            "Clients queued for a server connection, per pool.",
            per_labels.iter().map(|(l, sum)| (l.clone(), sum[3])),
        )?;
        let counts: Vec<u64> = s.wait_buckets.iter().map(|b| b.load(Relaxed)).collect();
        bucketed_histogram(
            &mut e,
            "dbportal_pool_wait_seconds",
            "Time a client waited for a server connection of its pool (including opening one).",
            s.wait_sum_us.load(Relaxed) as f64 / 1e6,
            &counts,
            |i| WAIT_BUCKETS.get(i).copied(),
        )?;
        counter(
            &mut e,
            "dbportal_pool_transactions",
            "Transactions that ended (ReadyForQuery with status I) on a pooled server connection in transaction mode.",
            s.transactions.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_pool_queries",
            "Queries (simple Query and extended-protocol Execute messages) sent to pooled server connections.",
            s.queries.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_pool_queue_timeouts",
            "Transactions refused after waiting pooling.queueTimeout for a server connection (53300: the pool was busy; 08006: its backend could not be reached).",
            s.queue_timeouts.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_pool_auth_failures",
            "Client logins refused by the pooler (wrong password, unknown user, unsupported mechanism).",
            s.auth_failures.load(Relaxed),
        )?;
        counters(
            &mut e,
            "dbportal_pool_server_connection_events",
            "Pooled server connections opened, closed, and failed to open.",
            [
                ([("event", "opened")], s.server_opened.load(Relaxed)),
                ([("event", "closed")], s.server_closed.load(Relaxed)),
                ([("event", "failed")], s.server_errors.load(Relaxed)),
            ],
        )?;
        counter(
            &mut e,
            "dbportal_pool_failed_in_flight",
            "Transactions that failed with an ErrorResponse because their server connection closed (a failover, a lost server).",
            s.failed_in_flight.load(Relaxed),
        )?;
        counter(
            &mut e,
            "dbportal_pool_protocol_errors",
            "Clients closed for malformed PostgreSQL messages, and malformed server messages.",
            s.protocol_errors.load(Relaxed),
        )?;
        counters(
            &mut e,
            "dbportal_pool_cancels",
            "CancelRequests a client sent to this portal: forwarded to the server running the client's query, sent to the peer portal that gave out the key, or dropped (unknown key, idle client, server or peer unreachable).",
            [
                ([("result", "forwarded")], s.cancels.load(Relaxed)),
                ([("result", "peer")], s.cancels_to_peers.load(Relaxed)),
                ([("result", "dropped")], s.cancels_dropped.load(Relaxed)),
            ],
        )?;
        counters(
            &mut e,
            "dbportal_pool_prepared_statements",
            "Uses of a client's named prepared statement (Parse, Bind, Describe): found prepared on the server connection (hit), or prepared there first (miss).",
            [
                ([("result", "hit")], s.prepared_hits.load(Relaxed)),
                ([("result", "miss")], s.prepared_misses.load(Relaxed)),
            ],
        )?;
        gauges(
            &mut e,
            "dbportal_pool_pinned_clients",
            "Clients pinned to their server connection until they disconnect, by the session state that pinned them.",
            PinReason::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| ([("reason", r.as_str())], s.pinned[i].load(Relaxed))),
        )?;
        counters(
            &mut e,
            "dbportal_pool_pins",
            "Times a client was pinned to its server connection, by reason.",
            PinReason::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| ([("reason", r.as_str())], s.pins[i].load(Relaxed))),
        )?;
        gauge(
            &mut e,
            "dbportal_pool_pools",
            "Pools (backend, database, user) open now.",
            pools.len() as i64,
        )
    }
}

/// The pooler's part of `/status`.
pub fn status(hub: &PgHub) -> serde_json::Value {
    let s = &hub.stats;
    let pools: Vec<_> = hub
        .pools()
        .iter()
        .map(|p| {
            let (open, idle) = p.counts();
            json!({
                "backend": p.backend.name,
                "database": p.database,
                "user": p.user,
                "startup": p.startup.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                "open": open,
                "idle": idle,
                "active": p.active.load(Relaxed),
                "waiting": p.waiting(),
            })
        })
        .collect();
    json!({
        "clients": s.clients.load(Relaxed),
        "activeClients": s.active.load(Relaxed),
        "waitingClients": s.waiting.load(Relaxed),
        "transactions": s.transactions.load(Relaxed),
        "queries": s.queries.load(Relaxed),
        "queueTimeouts": s.queue_timeouts.load(Relaxed),
        "failedInFlight": s.failed_in_flight.load(Relaxed),
        "pools": pools,
    })
}
