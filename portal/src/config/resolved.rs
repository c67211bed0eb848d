//! [`Config`]: a configuration that passed validation, every value typed and every default
//! resolved, with its parts ([`Backend`], [`Health`], [`TimeoutValues`],
//! [`AdminLimitValues`]) and the bounds validation holds them to.
//!
//! May import: nothing outside `config`.

use std::net::SocketAddr;

use ipnet::IpNet;

use super::address::Address;
use super::engine::{Engine, RoutingMode};
use super::pooling::{Multiplex, PgPool};
use super::spec::{BackendState, DatabasePortalSpec, ProxyProtocol};
use super::spec_portal::Credentials;
use super::spec_read_only::ReadOnlyValues;
use super::spec_tls::Tls;

/// The most `peers` a configuration may list: a cancel key gives its portal's place in 8 bits.
pub const MAX_PEERS: usize = 255;

/// A configuration that passed validation; every value is typed and every default resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub engine: Engine,
    pub port: u16,
    pub backends: Vec<Backend>,
    pub routing: RoutingMode,
    pub close_sessions_on_leader_change: bool,
    pub health: Health,
    pub max_connections: u32,
    /// 0 = unlimited.
    pub max_connections_per_client: u32,
    /// Connections negotiating (not yet sessions), per portal (at least 1).
    pub max_negotiating: u32,
    /// Connections negotiating per client address; 0 = unlimited.
    pub max_negotiating_per_client: u32,
    /// New connections per second per client address; 0 = unlimited.
    pub connection_rate_per_client: u32,
    pub timeouts: TimeoutValues,
    /// Empty = everyone. Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub allowed_cidrs: Vec<IpNet>,
    pub tls: Tls,
    pub proxy_protocol: ProxyProtocol,
    /// `proxyProtocol.trustedCIDRs`, parsed: the peers whose PROXY header is believed.
    pub proxy_trusted: Vec<IpNet>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub drain_timeout: std::time::Duration,
    /// The admin endpoint's bearer token file (`adminTokenFile`); none = state-changing
    /// requests are refused.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Reads of the admin endpoint need the token too (`adminTokenForReads`).
    pub admin_token_for_reads: bool,
    /// The admin endpoint's limits (`adminLimits`).
    pub admin_limits: AdminLimitValues,
    /// One log line per closed session (`portal.accessLog`).
    pub access_log: bool,
    /// Where an admitted client's traffic goes (`pooling.mode`).
    pub plane: DataPlane,
    /// `peers`, sorted by name: a PostgreSQL cancel key carries its portal's place here.
    pub peers: Vec<(String, Address)>,
    /// This portal's name among the peers (`name`; in a cluster, the Pod's).
    pub name: Option<String>,
    /// The read-only listener (`readOnly`, when enabled).
    pub read_only: Option<ReadOnlyValues>,
    /// This configuration is the read-only listener's (see [`Config::for_reads`]): its
    /// `routing` and `listen` are `readOnly`'s, and its sessions go to replicas.
    pub serves_reads: bool,
    /// The spec this was validated from, for reports and for the operator.
    pub spec: DatabasePortalSpec,
}

impl Config {
    /// The configuration the read-only listener serves by: this one with `readOnly`'s routing
    /// and listen address; `None` without a read-only listener.
    pub fn for_reads(&self) -> Option<Config> {
        let ro = self.read_only.as_ref()?;
        Some(Config {
            routing: ro.routing,
            listen: ro.listen,
            port: ro.port,
            serves_reads: true,
            ..self.clone()
        })
    }
}

/// The data plane that serves every client of a portal, from `pooling.mode`.
#[derive(Debug, Clone, PartialEq)]
pub enum DataPlane {
    /// No pooling: one backend connection per client, bytes copied both ways.
    Forward,
    /// `multiplex` (Redis): commands on a few shared server connections.
    Multiplex(Multiplex),
    /// `session` or `transaction` (PostgreSQL): transactions on pooled server connections.
    Pool(PgPool),
}

impl DataPlane {
    /// Multiplexing's settings, if this plane multiplexes.
    pub fn multiplex(&self) -> Option<&Multiplex> {
        match self {
            DataPlane::Multiplex(m) => Some(m),
            _ => None,
        }
    }

    /// Pooling's settings, if this plane pools.
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match self {
            DataPlane::Pool(p) => Some(p),
            _ => None,
        }
    }
}

/// A validated backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    pub address: Address,
    /// 1 to 256.
    pub weight: u32,
    pub backup: bool,
    /// Sessions at once on this backend, per portal; 0 = unlimited.
    pub max_connections: u32,
    /// Ramp-up of the weight after the node comes back up; zero = none.
    pub slow_start: std::time::Duration,
    /// The state the configuration gives (the admin endpoint may override it at runtime).
    pub state: BackendState,
}

impl Backend {
    /// Whether `other` is probed the same way (same name and address): its weight, state
    /// and limits may differ.
    pub fn probes_like(&self, other: &Backend) -> bool {
        self.name == other.name && self.address == other.address
    }
}

/// Validated health-check settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub interval: std::time::Duration,
    pub rise: u32,
    pub fall: u32,
    pub credentials_secret: Option<String>,
    pub credentials: Option<Credentials>,
    /// Custom probe with escapes resolved; empty = the engine's built-in probe.
    pub steps: Vec<Step>,
}

/// One custom probe step, as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub send: Vec<u8>,
    pub expect: Vec<u8>,
}

/// Validated timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutValues {
    pub client: std::time::Duration,
    pub server: std::time::Duration,
    pub connect: std::time::Duration,
    pub check: std::time::Duration,
    pub handshake: std::time::Duration,
}

/// The admin endpoint's validated limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminLimitValues {
    /// At least 1.
    pub max_connections: usize,
    /// [`ADMIN_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// [`ADMIN_BODY_BYTES`].
    pub max_body_bytes: u64,
    pub connection_lifetime: std::time::Duration,
}

/// The range of `adminLimits.maxHeaderBytes`: the HTTP parser's read buffer holds at least
/// 8 KiB; past 1 MiB a request head is no admin request.
pub const ADMIN_HEADER_BYTES: std::ops::RangeInclusive<u64> = 8 << 10..=1 << 20;
/// The range of `adminLimits.maxBodyBytes`: the verbs' JSON bodies fit in 1 KiB.
pub const ADMIN_BODY_BYTES: std::ops::RangeInclusive<u64> = 1 << 10..=1 << 20;
