//! The health families: each backend's state, role and caveat, the leader, its changes and
//! failovers, fast probing; read from the configuration and the health view in force at scrape
//! time.
//!
//! May import: `config`, `metrics` and the rest of `health`.

use std::{fmt, sync::Arc, time::SystemTime};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};
use tokio::sync::watch;

use super::{Caveat, CheckTimes, HealthView, Role};
use crate::{
    config::{Config, Engine},
    metrics::{counter, counters, flag, gauge, gauges, histogram, histograms},
};

/// The health families of the backends of the configuration in force.
#[derive(Debug)]
pub struct HealthCollector {
    pub config: watch::Receiver<Arc<Config>>,
    pub health: watch::Receiver<HealthView>,
    /// The checks' counts and durations (none without a checker).
    pub checks: Option<Arc<CheckTimes>>,
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Collector for HealthCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let config = self.config.borrow().clone();
        let health = self.health.borrow().clone();
        let leader = health.leader_name();
        let per_backend = |f: &dyn Fn(&str) -> bool| {
            config
                .backends
                .iter()
                .map(|b| ([("backend", b.name.as_str())], flag(f(&b.name))))
                .collect::<Vec<_>>()
        };
        if let Some(checks) = &self.checks {
            let stats: Vec<_> = config
                .backends
                .iter()
                .map(|b| (b.name.as_str(), checks.get(&b.name)))
                .collect();
            histograms(
                &mut e,
                "dbportal_backend_check_seconds",
                "Duration of each backend's health checks.",
                stats
                    .iter()
                    .map(|(n, s)| ([("backend", *n)], s.total.as_secs_f64(), s.checks)),
            )?;
            counters(
                &mut e,
                "dbportal_backend_check_failures",
                "Failed health checks per backend.",
                stats.iter().map(|(n, s)| ([("backend", *n)], s.failures)),
            )?;
        }
        gauges(
            &mut e,
            "dbportal_backend_up",
            "Whether the backend is healthy (1) or down (0).",
            per_backend(&|n| health.is_up(n)),
        )?;
        gauges(
            &mut e,
            "dbportal_backend_leader",
            "Whether the backend is the current leader.",
            per_backend(&|n| leader == Some(n)),
        )?;
        gauges(
            &mut e,
            "dbportal_backend_role",
            "Role of each backend from its latest successful probe (1 for the role it has).",
            config.backends.iter().flat_map(|be| {
                let r = health.get(&be.name).map(|h| h.role).unwrap_or_default();
                [
                    Role::Leader,
                    Role::SharedLeader,
                    Role::Replica,
                    Role::Unknown,
                ]
                .into_iter()
                .map(move |x| {
                    (
                        [("backend", be.name.as_str()), ("role", x.as_str())],
                        flag(r == x),
                    )
                })
            }),
        )?;
        gauges(
            &mut e,
            "dbportal_backend_caveat",
            "Whether an up backend answered with a caveat (busy: a long Redis script or function; misconf: cannot persist, refuses writes); it stays routable and keeps its role.",
            config.backends.iter().flat_map(|be| {
                let c = health.get(&be.name).and_then(|h| h.caveat);
                Caveat::ALL.into_iter().map(move |x| {
                    (
                        [("backend", be.name.as_str()), ("caveat", x.as_str())],
                        flag(c == Some(x)),
                    )
                })
            }),
        )?;
        if let Some(checks) = &self.checks {
            let lags: Vec<_> = config
                .backends
                .iter()
                .filter_map(|b| Some((b.name.as_str(), checks.get(&b.name).lag?)))
                .collect();
            gauges(
                &mut e,
                "dbportal_backend_replication_lag_seconds",
                "How far each replica that is up lags behind the leader, in time (absent for the leader and for replicas whose lag is not known yet).",
                lags.iter()
                    .filter_map(|(n, l)| Some(([("backend", *n)], l.time?.as_secs_f64()))),
            )?;
            gauges(
                &mut e,
                "dbportal_backend_replication_lag_bytes",
                "How far each replica that is up lags behind the leader's position, in bytes (PostgreSQL WAL, Redis replication offset).",
                lags.iter()
                    .filter(|_| matches!(config.engine, Engine::Postgres | Engine::Redis))
                    .filter_map(|(n, l)| Some(([("backend", *n)], l.behind? as i64))),
            )?;
        }
        let stats = &health.stats;
        gauge(
            &mut e,
            "dbportal_leader_conflict",
            "1 while several backends claim to lead (no session is routed).",
            flag(health.conflict),
        )?;
        counter(
            &mut e,
            "dbportal_leader_changes",
            "Times the leader moved to another backend.",
            stats.changes,
        )?;
        gauge(
            &mut e,
            "dbportal_leader_last_change_timestamp_seconds",
            "Unix time of the last leader change (0: none yet).",
            stats.last_change.map(unix_seconds).unwrap_or(0.0),
        )?;
        counter(
            &mut e,
            "dbportal_leader_conflicts",
            "Times a leader conflict began.",
            stats.conflicts,
        )?;
        histogram(
            &mut e,
            "dbportal_leader_failover_seconds",
            "Time from losing a leader to having a new one.",
            stats.failover_total.as_secs_f64(),
            stats.failovers,
        )?;
        gauge(
            &mut e,
            "dbportal_leader_failover_max_seconds",
            "Longest time without a leader since start.",
            stats.max_failover.map_or(0.0, |d| d.as_secs_f64()),
        )?;
        gauge(
            &mut e,
            "dbportal_health_fast_probing",
            "1 while backends are probed at the fast interval (a leader is being sought).",
            flag(stats.fast_probing),
        )
    }
}
