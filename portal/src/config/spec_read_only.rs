//! `spec.readOnly`: the second, read-only connection string of a portal — a listener beside
//! the main one, with the same TLS, allow-list, limits, timeouts, PROXY protocol and pooling,
//! that routes to replicas within a lag bound instead of the leader — and its validated form.
//!
//! May import: nothing outside `config`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::Duration;
use super::engine::RoutingMode;

/// The read-only listener (`readOnly`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadOnly {
    /// Open the read-only listener. Default true (the block's presence turns it on); false
    /// keeps the settings but closes the listener.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Port of the read-only listener and of the Service `<name>-portal-ro` (the per-portal
    /// Services serve it too). Default: `port` + 1 (redis 6380, postgres 5433, mysql 3307,
    /// etcd 2380).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// How sessions are spread over the replicas that qualify: roundrobin (each in turn, by
    /// weight) or leastconn (fewest open sessions per weight). Default roundrobin.
    #[serde(default)]
    pub routing: ReadRouting,
    /// The most a replica may lag behind the leader and still take reads (a duration, such
    /// as 500ms, 10s, 1m). A replica whose replication is broken (PostgreSQL: no WAL
    /// receiver; Redis: link to the master down; MySQL: a replication thread stopped) never
    /// qualifies. Default 10s.
    #[serde(default = "ReadOnly::default_max_lag")]
    pub max_lag: Duration,
    /// When no replica qualifies, send reads to the leader (true), or refuse new clients with
    /// the engine's own error (false: PostgreSQL 57P03, Redis -LOADING, a MySQL error
    /// packet, etcd HTTP 503 or an HTTP/2 GOAWAY). Default true.
    #[serde(default = "yes")]
    pub fallback_to_leader: bool,
    /// Standalone portal only: listen address of the read-only listener (default
    /// `0.0.0.0:<readOnly.port>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub listen: Option<String>,
}

impl ReadOnly {
    fn default_max_lag() -> Duration {
        Duration::from_secs(10)
    }
}

impl Default for ReadOnly {
    fn default() -> Self {
        ReadOnly {
            enabled: true,
            port: None,
            routing: ReadRouting::default(),
            max_lag: ReadOnly::default_max_lag(),
            fallback_to_leader: true,
            listen: None,
        }
    }
}

fn yes() -> bool {
    true
}

/// How reads are spread over the replicas that qualify.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadRouting {
    /// Each qualifying replica in turn, by weight.
    #[default]
    Roundrobin,
    /// The qualifying replica with the fewest open sessions per weight.
    Leastconn,
}

impl ReadRouting {
    /// The routing mode the read-only listener's sessions are routed by.
    pub fn mode(self) -> RoutingMode {
        match self {
            ReadRouting::Roundrobin => RoutingMode::Roundrobin,
            ReadRouting::Leastconn => RoutingMode::Leastconn,
        }
    }
}

/// The read-only listener, validated (present only when `readOnly.enabled`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadOnlyValues {
    pub port: u16,
    pub listen: std::net::SocketAddr,
    pub routing: RoutingMode,
    pub max_lag: std::time::Duration,
    pub fallback_to_leader: bool,
}
