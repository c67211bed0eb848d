//! The database engine behind a portal (`spec.engine`) and what it decides when the spec
//! does not: the port, and the routing mode ([`RoutingMode`], the ways new sessions are spread
//! over the backends).
//!
//! May import: nothing outside `config`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The database engine behind the portal.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Redis, KeyDB or Valkey.
    Redis,
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
    /// etcd (v3, HTTP health endpoint).
    Etcd,
    /// Any TCP service; health is a connect (or custom steps).
    Tcp,
}

impl Engine {
    /// The engine's well-known port; `None` for tcp, which has none.
    pub fn default_port(self) -> Option<u16> {
        match self {
            Engine::Redis => Some(6379),
            Engine::Postgres => Some(5432),
            Engine::Mysql => Some(3306),
            Engine::Etcd => Some(2379),
            Engine::Tcp => None,
        }
    }

    /// The routing mode used when `routing.mode` is absent.
    pub fn default_routing(self) -> RoutingMode {
        match self {
            Engine::Tcp => RoutingMode::First,
            _ => RoutingMode::Leader,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Redis => "redis",
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
            Engine::Etcd => "etcd",
            Engine::Tcp => "tcp",
        }
    }
}

/// How new sessions are spread over healthy backends.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// Only the node that the engine probe reports as the writable leader.
    Leader,
    /// The first healthy node in list order (the others are backups).
    First,
    /// Each healthy node in turn.
    Roundrobin,
    /// The healthy node with the fewest open sessions.
    Leastconn,
    /// A hash of the client IP, so one client keeps reaching one node.
    Source,
}

impl RoutingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Leader => "leader",
            RoutingMode::First => "first",
            RoutingMode::Roundrobin => "roundrobin",
            RoutingMode::Leastconn => "leastconn",
            RoutingMode::Source => "source",
        }
    }
}
