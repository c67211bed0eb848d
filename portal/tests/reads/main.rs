//! The read-only listener (`readOnly`) of the standalone portal on real replication: a
//! PostgreSQL primary with two streaming standbys, a Redis primary with two replicas, a
//! MariaDB primary with a replica, a three-member etcd cluster. Each: reads spread over the
//! replicas within `maxLag` only, a write through the read-only listener refused by the server,
//! a replica that lags or breaks leaves the set and comes back, a promotion moves the node from
//! the read-only listener to the main one, and when no replica qualifies the leader serves
//! (`fallbackToLeader: true`) or the client is refused in its engine's words (`false`).

#[path = "../common/mod.rs"]
mod common;

mod etcd;
mod mariadb;
mod postgres;
mod redis;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use common::*;

/// A portal with a read-only listener, and that listener's address.
struct ReadPortal {
    portal: Standalone,
    reads: SocketAddr,
}

impl std::ops::Deref for ReadPortal {
    type Target = Standalone;

    fn deref(&self) -> &Standalone {
        &self.portal
    }
}

impl ReadPortal {
    /// A standalone portal for `engine` in front of `backends` (name, address), probing every
    /// 200 ms, with `readOnly` given as the YAML flow map's inside (`maxLag: 2s, ...`) and
    /// `extra` YAML.
    async fn start(
        engine: &str,
        backends: &[(&str, SocketAddr)],
        read_only: &str,
        extra: &str,
    ) -> ReadPortal {
        let reads = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let sep = if read_only.is_empty() { "" } else { ", " };
        let extra = format!(
            "readOnly: {{listen: \"{reads}\"{sep}{read_only}}}\n{extra}\n{}",
            if extra.contains("healthCheck") {
                ""
            } else {
                "healthCheck: {interval: 200ms}\n"
            }
        );
        let portal = PortalBuilder::new(&yaml(engine, backends, &extra))
            .standalone()
            .await;
        ReadPortal { portal, reads }
    }

    /// Waits up to `limit` until exactly `names` serve reads.
    async fn wait_serving(&self, names: &[&str], limit: Duration) {
        self.wait_status(&format!("reads served by {names:?}"), limit, |s| {
            serving(s) == names
        })
        .await;
    }
}

fn serving(status: &serde_json::Value) -> Vec<String> {
    status["readOnly"]["serving"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The distinct answers of `n` calls of `ask` (each a new client connection).
async fn answers<F, Fut>(n: usize, mut ask: F) -> BTreeSet<String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        seen.insert(ask().await);
    }
    seen
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}
