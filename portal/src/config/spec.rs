//! The `DatabasePortal` resource: one type that is both the CRD's spec and the portal's
//! standalone configuration file (portal-only keys are left out of the CRD schema). The
//! sections of the spec are here, except TLS ([`spec_tls`](super::spec_tls)), the portal
//! pods ([`spec_pods`](super::spec_pods)), pooling ([`pooling`](super::pooling)) and the
//! portal-only keys ([`spec_portal`](super::spec_portal)); the status is in
//! [`spec_status`](super::spec_status).
//!
//! May import: nothing outside `config`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::Duration;
use super::engine::{Engine, RoutingMode};
use super::pooling::Pooling;
use super::spec_pods::PortalPods;
use super::spec_portal::{AdminLimits, Credentials, Peer};
use super::spec_read_only::ReadOnly;
use super::spec_status::DatabasePortalStatus;
use super::spec_tls::Tls;

/// Pattern of a backend address: `host:port`, IPv6 in brackets (`[::1]:6379`).
pub const ADDRESS_PATTERN: &str =
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}$";
/// Pattern of a DNS label (RFC 1123), used for backend names.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A portal in front of a database: two highly available, TLS-terminating, allow-listed
/// connection strings that follow the database's writable leader.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "dbportal.dev",
    version = "v1alpha1",
    kind = "DatabasePortal",
    plural = "databaseportals",
    shortname = "dbp",
    namespaced,
    status = "DatabasePortalStatus",
    printcolumn = r#"{"name":"Engine","type":"string","jsonPath":".spec.engine","description":"Database engine"}"#,
    printcolumn = r#"{"name":"Leader","type":"string","jsonPath":".status.leader","description":"Backend the ready portals agree leads"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready","description":"Ready portals / desired portals"}"#,
    printcolumn = r#"{"name":"Reads","type":"string","jsonPath":".status.readOnly.summary","description":"Backends serving the read-only Service (readOnly)"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A portal in front of a database cluster: portal pods with one Service each, TLS, an allow-list of client networks, connection limits and timeouts, following the cluster's leader."
)]
#[serde(rename_all = "camelCase")]
pub struct DatabasePortalSpec {
    /// The database engine behind the portal. It selects the health probe, the default port
    /// and how TLS is terminated (PostgreSQL and MySQL negotiate TLS inside their protocol).
    pub engine: Engine,

    /// Port of the portal Services and of the portal listener. Default by engine: redis 6379,
    /// postgres 5432, mysql 3306, etcd 2379; required for tcp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,

    /// The database nodes, in priority order (1 to 16, names unique DNS labels).
    #[schemars(length(min = 1, max = 16))]
    pub backends: Vec<BackendSpec>,

    /// Which backend receives new client sessions.
    #[serde(default)]
    pub routing: Routing,

    /// How backends are probed for health and role.
    #[serde(default)]
    pub health_check: HealthCheck,

    /// Connection limits of each portal.
    #[serde(default)]
    pub limits: Limits,

    /// Inactivity and connect deadlines.
    #[serde(default)]
    pub timeouts: Timeouts,

    /// Client networks allowed to connect, as CIDRs (IPv4 or IPv6; a bare address is a
    /// single host). Empty or absent: everyone may connect. IPv4 ranges also match
    /// IPv4-mapped IPv6 clients (::ffff:10.1.2.3), and IPv6 ranges containing mapped addresses
    /// match IPv4 clients: ::/0 admits every IPv4 client too. To admit only IPv6 clients, list
    /// IPv6 prefixes such as 2000::/3.
    #[serde(
        default,
        rename = "allowedCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub allowed_cidrs: Vec<String>,

    /// TLS between clients and the portal.
    #[serde(default)]
    pub tls: Tls,

    /// The portal pods.
    #[serde(default)]
    pub portal: PortalPods,

    /// How client connections share server connections (absent: one per client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<Pooling>,

    /// PROXY protocol on the client side (from a load balancer) and towards the backends.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,

    /// A second, read-only connection string: a listener on another port, with the same TLS,
    /// allow-list, limits, timeouts, PROXY protocol and pooling, that routes to the replicas
    /// within a lag bound (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<ReadOnly>,

    /// Standalone portal only: listen address (default `0.0.0.0:<port>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub listen: Option<String>,

    /// Standalone portal only: address of the HTTP admin endpoint (default `0.0.0.0:8404`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub admin: Option<String>,

    /// Standalone portal only: how long SIGTERM waits for open sessions (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub drain_timeout: Option<Duration>,

    /// Portal only: a file holding the bearer token that the admin endpoint's state-changing
    /// requests must carry (re-read when it changes). In a cluster the operator sets it to
    /// its per-DatabasePortal Secret. Absent: state-changing requests are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub admin_token_file: Option<String>,

    /// Portal only: reads of the admin endpoint (`/`, `/status`, `/metrics`) need the token
    /// too. `/healthz` and `/readyz` never do. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(skip)]
    pub admin_token_for_reads: bool,

    /// Portal only: the portals of one DatabasePortal, to which a PostgreSQL CancelRequest for
    /// a key one of them gave out is forwarded (pooling mode session or transaction). A portal
    /// skips its own name. In a cluster the operator writes every portal of the
    /// DatabasePortal here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(skip)]
    pub peers: Vec<Peer>,

    /// Standalone portal only: this portal's name among `peers` (in a cluster: its Pod's
    /// name, `--pod-name` / `POD_NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub name: Option<String>,

    /// Portal only: the admin endpoint's own limits (connections at once, request sizes, how
    /// long a connection lasts), so that a client cannot spend the process's descriptors or
    /// memory through it. Read for each new admin connection: a reload applies to the next
    /// ones.
    #[serde(default, skip_serializing_if = "AdminLimits::is_default")]
    #[schemars(skip)]
    pub admin_limits: AdminLimits,
}

/// One database node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    /// Unique name of the node (a DNS label), used in status, metrics and logs.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// `host:port` of the node; IPv6 addresses in brackets, as `[::1]:6379`.
    #[schemars(length(min = 3, max = 261), regex(pattern = ADDRESS_PATTERN))]
    pub address: String,
    /// Share of new sessions in routing modes roundrobin, leastconn and source, relative to
    /// the other backends (1 to 256, default 1).
    #[serde(
        default = "BackendSpec::default_weight",
        skip_serializing_if = "BackendSpec::is_default_weight"
    )]
    #[schemars(range(min = 1, max = 256))]
    pub weight: u16,
    /// A backup node takes new sessions only when no other backend may (every routing mode
    /// except leader, which always follows the leader). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backup: bool,
    /// Sessions this backend takes at once, per portal; 0 (default) = unlimited. Past it a new
    /// session goes to the next eligible backend, or waits (up to `timeouts.connect`) for a
    /// free place.
    #[serde(default, skip_serializing_if = "BackendSpec::is_zero")]
    pub max_connections: u32,
    /// After the node comes back up, its weight ramps from little to its full value over this
    /// duration, so a cold node is not flooded. Default 0s (at once).
    #[serde(default, skip_serializing_if = "Duration::is_zero")]
    pub slow_start: Duration,
    /// Administrative state: ready (default), drain (no new sessions, open ones continue) or
    /// maint (no new sessions). The portals' admin endpoint can override it at runtime.
    #[serde(default, skip_serializing_if = "BackendState::is_ready")]
    pub state: BackendState,
}

impl BackendSpec {
    pub fn default_weight() -> u16 {
        1
    }
    fn is_default_weight(w: &u16) -> bool {
        *w == 1
    }
    fn is_zero(n: &u32) -> bool {
        *n == 0
    }
}

/// Administrative state of a backend.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new sessions (when healthy and routable).
    #[default]
    Ready,
    /// Takes no new sessions; open sessions continue.
    Drain,
    /// Maintenance: takes no new sessions; open sessions continue unless cut.
    Maint,
}

impl BackendState {
    pub fn is_ready(&self) -> bool {
        *self == BackendState::Ready
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Ready => "ready",
            BackendState::Drain => "drain",
            BackendState::Maint => "maint",
        }
    }
}

/// Which backend receives new client sessions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Routing {
    /// leader: only the node the engine probe reports as the writable leader; first: the first
    /// healthy node in list order; roundrobin; leastconn: fewest open sessions; source: hash of
    /// the client IP. Default: leader (tcp engine: first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RoutingMode>,
    /// Cut every session to a node at once when it stops being the leader, so that no client
    /// keeps writing to a demoted node. Default true.
    #[serde(default = "yes")]
    pub close_sessions_on_leader_change: bool,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            mode: None,
            close_sessions_on_leader_change: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// How backends are probed for health and role.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Time between two probes of one backend. Default 1s.
    #[serde(default = "HealthCheck::default_interval")]
    pub interval: Duration,
    /// Consecutive successes that mark a node up. Default 2.
    #[serde(default = "HealthCheck::default_rise")]
    #[schemars(range(min = 1, max = 100))]
    pub rise: u32,
    /// Consecutive failures that mark a node down. Default 3.
    #[serde(default = "HealthCheck::default_fall")]
    #[schemars(range(min = 1, max = 100))]
    pub fall: u32,
    /// Optional Secret (same namespace) with keys `username` and `password`, used by the Redis
    /// (AUTH), PostgreSQL and MySQL probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Standalone portal only: probe credentials, inline or as the path of a YAML file with
    /// `username` and `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub credentials: Option<Credentials>,
    /// Optional custom probe replacing the engine's built-in one: each step sends `send` (if
    /// set) and waits until what arrives contains `expect` (if set), within `timeouts.check`.
    /// `\r`, `\n`, `\t`, `\\` and `\xNN` escapes are understood.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub steps: Vec<ProbeStep>,
}

impl HealthCheck {
    fn default_interval() -> Duration {
        Duration::from_secs(1)
    }
    fn default_rise() -> u32 {
        2
    }
    fn default_fall() -> u32 {
        3
    }
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Self::default_interval(),
            rise: Self::default_rise(),
            fall: Self::default_fall(),
            credentials_secret: None,
            credentials: None,
            steps: Vec::new(),
        }
    }
}

/// One step of a custom probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ProbeStep {
    /// Bytes to send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// A substring that must arrive before `timeouts.check` runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
}

/// Connection limits of each portal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Sessions per portal. Past it a new client is closed at once; open sessions are not
    /// affected. Default 2000.
    #[serde(default = "Limits::default_max")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: u32,
    /// Sessions per client IP address; 0 means unlimited (default).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_connections_per_client: u32,
    /// Connections still negotiating per portal: accepted but not yet a session (waiting for
    /// a PROXY header, in the TLS handshake or the PostgreSQL/MySQL startup, connecting to the
    /// database). At it the portal accepts no new connection until a negotiation ends (the
    /// burst waits in the listen backlog), so slow or half-open clients cannot hold every slot
    /// of maxConnections. Default 1000.
    #[serde(default = "Limits::default_max_negotiating")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_negotiating: u32,
    /// Connections in their own part of the negotiation (the TLS handshake) per client IP
    /// address, past which a new one is closed at once; the wait for the database
    /// is not counted. 0 means unlimited (default): one application's pool, or many clients
    /// behind one NAT or node address, open thousands at once.
    #[serde(default = "Limits::default_max_negotiating_per_client")]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_negotiating_per_client: u32,
    /// New connections per second per client IP address (HAProxy's conn_rate); past it a new
    /// connection is closed at once. 0 means unlimited (default).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000000))]
    pub connection_rate_per_client: u32,
}

impl Limits {
    fn default_max() -> u32 {
        2000
    }
    fn default_max_negotiating() -> u32 {
        1000
    }
    fn default_max_negotiating_per_client() -> u32 {
        0
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: Self::default_max(),
            max_connections_per_client: 0,
            max_negotiating: Self::default_max_negotiating(),
            max_negotiating_per_client: Self::default_max_negotiating_per_client(),
            connection_rate_per_client: 0,
        }
    }
}

/// Inactivity and connect deadlines, written like 500ms, 30s, 1m, 24h or 1d.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// A session is closed when its client sends nothing for this long. Default 1d.
    #[serde(default = "Timeouts::one_day")]
    pub client: Duration,
    /// A session is closed when its database sends nothing for this long. Default 1d.
    #[serde(default = "Timeouts::one_day")]
    pub server: Duration,
    /// Deadline of the portal's connection to a database node, across all nodes it tries.
    /// Default 1m.
    #[serde(default = "Timeouts::one_minute")]
    pub connect: Duration,
    /// Deadline of one health check, connect and exchange. Default 2s.
    #[serde(default = "Timeouts::two_seconds")]
    pub check: Duration,
    /// Deadline of a client's negotiation: the PROXY header, the TLS handshake, PostgreSQL's
    /// SSLRequest and startup, MySQL's handshake. With PostgreSQL pooling it covers the
    /// startup packet and the authentication; the login's wait for a server connection is
    /// bounded by pooling.queueTimeout instead. Default 5s.
    #[serde(default = "Timeouts::five_seconds")]
    pub handshake: Duration,
}

impl Timeouts {
    fn one_day() -> Duration {
        Duration::from_secs(86_400)
    }
    fn one_minute() -> Duration {
        Duration::from_secs(60)
    }
    fn two_seconds() -> Duration {
        Duration::from_secs(2)
    }
    fn five_seconds() -> Duration {
        Duration::from_secs(5)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client: Self::one_day(),
            server: Self::one_day(),
            connect: Self::one_minute(),
            check: Self::two_seconds(),
            handshake: Self::five_seconds(),
        }
    }
}

/// PROXY protocol settings.
// The CRD carries no CEL rule (`x-kubernetes-validations`) for "trustedCIDRs is required when
// accept is true": Kubernetes before 1.25 does not enforce one, and kubectl before 1.23 refuses
// a CRD that has one. The operator refuses such a spec (InvalidSpec naming
// `proxyProtocol.trustedCIDRs`) and the portal such a file, on every version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
pub struct ProxyProtocol {
    /// Expect a PROXY protocol v1 or v2 header from a load balancer in front of the portal, and
    /// apply allowedCIDRs and per-client limits to the client address it carries. A connection
    /// without a valid header is closed. Requires trustedCIDRs.
    #[serde(default)]
    pub accept: bool,
    /// Send a PROXY protocol v2 header to the database so it sees the real client.
    #[serde(default)]
    pub send: bool,
    /// The peers allowed to send a PROXY header (the load balancers in front of the portal),
    /// as CIDRs; required when accept is true. A connection from any other peer is closed
    /// before its header is read, and counted as a rejection (reason untrusted_proxy): a
    /// header's client address is believed only from these peers.
    #[serde(
        default,
        rename = "trustedCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub trusted_cidrs: Vec<String>,
}
