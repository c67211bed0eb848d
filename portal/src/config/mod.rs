//! Configuration: the shared `DatabasePortal` spec, its parsing from YAML with errors that name
//! the field, and validation into [`Config`], the typed value the portal runs on.
//!
//! May import: nothing from the rest of the crate; every layer reads it.

mod address;
mod duration;
mod pooling;
mod spec;
mod spec_tls;

use std::{fmt, net::SocketAddr, path::Path};

use ipnet::IpNet;

pub use address::{Address, AddressError};
pub use duration::{Duration, DurationError, DURATION_PATTERN};
pub use pooling::{
    ByteSize, Multiplex, PgPool, Pooling, PoolingAuth, PoolingMode, BYTE_SIZE_PATTERN,
};
pub use spec::*;
pub use spec_tls::*;

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
    /// `pooling` of mode `multiplex` (Redis); `None`: one backend connection per client.
    pub multiplex: Option<Multiplex>,
    /// `pooling` of mode `session` or `transaction` (PostgreSQL).
    pub pg_pool: Option<PgPool>,
    /// `peers`, sorted by name: a PostgreSQL cancel key carries its portal's place here.
    pub peers: Vec<(String, Address)>,
    /// This portal's name among the peers (`name`; in a cluster, the Pod's).
    pub name: Option<String>,
    /// The spec this was validated from, for reports and for the operator.
    pub spec: DatabasePortalSpec,
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

/// One thing wrong with a configuration, with the field it is about (`backends[1].address`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not have the shape of a configuration.
    #[error("{0}")]
    Parse(FieldError),
    /// The YAML has the right shape but values that cannot work.
    #[error("{}", join(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// The fields named by this error (the first is the most relevant).
    pub fn fields(&self) -> Vec<&str> {
        match self {
            ConfigError::Read { .. } => Vec::new(),
            ConfigError::Parse(e) => vec![e.field.as_str()],
            ConfigError::Invalid(errors) => errors.iter().map(|e| e.field.as_str()).collect(),
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reads and validates a standalone configuration file.
pub fn load_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_yaml(&text)?.validate_standalone()
}

/// Parses YAML into a spec. Unknown keys are refused (a typo must not silently become a
/// default), and every error names the field it is about.
pub fn parse_yaml(text: &str) -> Result<DatabasePortalSpec, ConfigError> {
    if text.trim().is_empty() || text.trim() == "---" {
        return Err(ConfigError::Parse(FieldError {
            field: "(document)".into(),
            message: "the configuration is empty".into(),
        }));
    }
    let mut unknown = Vec::new();
    let deserializer = serde_yaml::Deserializer::from_str(text);
    let mut on_unknown = |path: serde_ignored::Path| unknown.push(field_path(&path));
    let ignoring = serde_ignored::Deserializer::new(deserializer, &mut on_unknown);
    let spec: DatabasePortalSpec = serde_path_to_error::deserialize(ignoring).map_err(|e| {
        let mut field = e.path().to_string();
        if field == "." {
            field.clear();
        }
        let message = e.into_inner().to_string();
        // serde names a missing field only in its message; put it in the path too.
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            field = if field.is_empty() {
                missing.to_string()
            } else {
                format!("{field}.{missing}")
            };
        }
        if field.is_empty() {
            field = "(document)".into();
        }
        ConfigError::Parse(FieldError { field, message })
    })?;
    if !unknown.is_empty() {
        return Err(ConfigError::Invalid(
            unknown
                .into_iter()
                .map(|path| FieldError {
                    field: path,
                    message: "unknown field".into(),
                })
                .collect(),
        ));
    }
    Ok(spec)
}

/// `backends[0].foo` rather than serde_ignored's `backends.0.foo`.
fn field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

impl DatabasePortalSpec {
    /// Checks everything a schema cannot, resolves defaults and returns the typed
    /// configuration, or every problem found (not just the first).
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let mut err = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.to_string(),
                message,
            })
        };

        let port = match (self.port, self.engine.default_port()) {
            (Some(0), _) => {
                err("port", "must be between 1 and 65535".into());
                0
            }
            (Some(p), _) => p,
            (None, Some(p)) => p,
            (None, None) => {
                err("port", "required for engine tcp".into());
                0
            }
        };

        if self.backends.is_empty() {
            err("backends", "at least one backend is required".into());
        }
        if self.backends.len() > 16 {
            err(
                "backends",
                format!("at most 16 backends, found {}", self.backends.len()),
            );
        }
        let mut backends = Vec::with_capacity(self.backends.len());
        for (i, b) in self.backends.iter().enumerate() {
            if let Err(m) = check_dns_label(&b.name) {
                err(&format!("backends[{i}].name"), m);
            } else if self.backends[..i].iter().any(|o| o.name == b.name) {
                err(
                    &format!("backends[{i}].name"),
                    format!("duplicate backend name {:?}", b.name),
                );
            }
            if !(1..=256).contains(&b.weight) {
                err(
                    &format!("backends[{i}].weight"),
                    format!("{} is out of range; a weight is 1 to 256", b.weight),
                );
            }
            match b.address.parse::<Address>() {
                Ok(address) => backends.push(Backend {
                    name: b.name.clone(),
                    address,
                    weight: u32::from(b.weight),
                    backup: b.backup,
                    max_connections: b.max_connections,
                    slow_start: b.slow_start.get(),
                    state: b.state,
                }),
                Err(e) => err(&format!("backends[{i}].address"), e.to_string()),
            }
        }

        let mut peers: Vec<(String, Address)> = Vec::with_capacity(self.peers.len());
        for (i, p) in self.peers.iter().enumerate() {
            if p.name.is_empty() {
                err(&format!("peers[{i}].name"), "must not be empty".into());
            } else if self.peers[..i].iter().any(|o| o.name == p.name) {
                err(
                    &format!("peers[{i}].name"),
                    format!("duplicate peer name {:?}", p.name),
                );
            }
            match p.address.parse::<Address>() {
                Ok(address) => peers.push((p.name.clone(), address)),
                Err(e) => err(&format!("peers[{i}].address"), e.to_string()),
            }
        }
        if self.peers.len() > MAX_PEERS {
            err(
                "peers",
                format!(
                    "{} peers; a cancel key has room for {MAX_PEERS}",
                    self.peers.len()
                ),
            );
        }
        peers.sort_by(|a, b| a.0.cmp(&b.0));

        if self.admin_token_for_reads && self.admin_token_file.as_deref().unwrap_or("").is_empty() {
            err(
                "adminTokenForReads",
                "needs adminTokenFile (the token reads must carry)".into(),
            );
        }

        let routing = self
            .routing
            .mode
            .unwrap_or_else(|| self.engine.default_routing());
        if routing == RoutingMode::Leader && self.engine == Engine::Tcp {
            err(
                "routing.mode",
                "leader needs an engine whose probe reports a role (redis, postgres, mysql, etcd); use first for tcp".into(),
            );
        }

        let hc = &self.health_check;
        if hc.interval.get().is_zero() {
            err("healthCheck.interval", "must be more than 0".into());
        }
        if hc.rise == 0 {
            err("healthCheck.rise", "must be at least 1".into());
        }
        if hc.fall == 0 {
            err("healthCheck.fall", "must be at least 1".into());
        }
        if let Some(secret) = &hc.credentials_secret {
            if let Err(m) = check_dns_name(secret) {
                err("healthCheck.credentialsSecret", m);
            }
        }
        let mut steps = Vec::with_capacity(hc.steps.len());
        for (i, step) in hc.steps.iter().enumerate() {
            let send = match step.send.as_deref().map(unescape).transpose() {
                Ok(v) => v.unwrap_or_default(),
                Err(m) => {
                    err(&format!("healthCheck.steps[{i}].send"), m);
                    Vec::new()
                }
            };
            let expect = match step.expect.as_deref().map(unescape).transpose() {
                Ok(v) => v.unwrap_or_default(),
                Err(m) => {
                    err(&format!("healthCheck.steps[{i}].expect"), m);
                    Vec::new()
                }
            };
            if step.send.is_none() && step.expect.is_none() {
                err(
                    &format!("healthCheck.steps[{i}]"),
                    "a step needs send, expect or both".into(),
                );
            }
            steps.push(Step { send, expect });
        }

        if self.limits.max_connections == 0 {
            err("limits.maxConnections", "must be at least 1".into());
        }
        if self.limits.max_negotiating == 0 {
            err("limits.maxNegotiating", "must be at least 1".into());
        }

        for (name, d) in [
            ("timeouts.client", self.timeouts.client),
            ("timeouts.server", self.timeouts.server),
            ("timeouts.connect", self.timeouts.connect),
            ("timeouts.check", self.timeouts.check),
            ("timeouts.handshake", self.timeouts.handshake),
        ] {
            if d.get().is_zero() {
                err(name, "must be more than 0".into());
            }
        }

        let admin_limits = &self.admin_limits;
        if admin_limits.max_connections == 0 {
            err("adminLimits.maxConnections", "must be at least 1".into());
        }
        for (name, size, range) in [
            (
                "adminLimits.maxHeaderBytes",
                admin_limits.max_header_bytes,
                ADMIN_HEADER_BYTES,
            ),
            (
                "adminLimits.maxBodyBytes",
                admin_limits.max_body_bytes,
                ADMIN_BODY_BYTES,
            ),
        ] {
            if !range.contains(&size.0) {
                err(
                    name,
                    format!(
                        "{size} is out of range; it is {} to {}",
                        ByteSize(*range.start()),
                        ByteSize(*range.end())
                    ),
                );
            }
        }
        if admin_limits.connection_lifetime.is_zero() {
            err(
                "adminLimits.connectionLifetime",
                "must be more than 0".into(),
            );
        }

        let mut allowed_cidrs = Vec::with_capacity(self.allowed_cidrs.len());
        for (i, text) in self.allowed_cidrs.iter().enumerate() {
            match parse_cidr(text) {
                Ok(net) => allowed_cidrs.push(net),
                Err(m) => err(&format!("allowedCIDRs[{i}]"), m),
            }
        }

        let mut proxy_trusted = Vec::with_capacity(self.proxy_protocol.trusted_cidrs.len());
        for (i, text) in self.proxy_protocol.trusted_cidrs.iter().enumerate() {
            match parse_cidr(text) {
                Ok(net) => proxy_trusted.push(net),
                Err(m) => err(&format!("proxyProtocol.trustedCIDRs[{i}]"), m),
            }
        }
        if self.proxy_protocol.accept && self.proxy_protocol.trusted_cidrs.is_empty() {
            err(
                "proxyProtocol.trustedCIDRs",
                "required when proxyProtocol.accept is true: the addresses of the load balancers allowed to send a PROXY header (a header from any other peer would let a client choose its own address)".into(),
            );
        }

        for (i, name) in self.tls.dns_names.iter().enumerate() {
            let wildcard_free = name.strip_prefix("*.").unwrap_or(name);
            if let Err(m) = check_dns_name(wildcard_free) {
                err(&format!("tls.dnsNames[{i}]"), m);
            }
        }
        if let Some(issuer) = &self.tls.issuer_ref {
            if issuer.name.is_empty() {
                err("tls.issuerRef.name", "must not be empty".into());
            }
        }
        if self.tls.issuer_ref.is_some() && !self.tls.secret_name.is_empty() {
            err(
                "tls.secretName",
                "set either tls.issuerRef or tls.secretName, not both".into(),
            );
        }
        if !self.tls.secret_name.is_empty() {
            if let Err(m) = check_dns_name(&self.tls.secret_name) {
                err("tls.secretName", m);
            }
        }

        if !(1..=8).contains(&self.portal.replicas) {
            err("portal.replicas", "must be between 1 and 8".into());
        }

        let listen = match &self.listen {
            None => SocketAddr::from(([0, 0, 0, 0], port)),
            Some(text) => text.parse().unwrap_or_else(|e| {
                err("listen", format!("invalid socket address {text:?}: {e}"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            }),
        };
        let admin = match &self.admin {
            None => SocketAddr::from(([0, 0, 0, 0], 8404)),
            Some(text) => text.parse().unwrap_or_else(|e| {
                err("admin", format!("invalid socket address {text:?}: {e}"));
                SocketAddr::from(([0, 0, 0, 0], 0))
            }),
        };

        if let Some(pooling) = &self.pooling {
            pooling.check(self.engine, &mut err);
            if matches!(
                pooling.mode,
                PoolingMode::Session | PoolingMode::Transaction
            ) && self.tls.mode == TlsMode::Passthrough
            {
                err(
                    "pooling.mode",
                    format!(
                        "{} pooling speaks PostgreSQL to the client, which tls.mode passthrough forbids: use tls.mode terminate or disabled",
                        pooling.mode.as_str()
                    ),
                );
            }
        }

        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        Ok(Config {
            engine: self.engine,
            port,
            backends,
            routing,
            close_sessions_on_leader_change: self.routing.close_sessions_on_leader_change,
            health: Health {
                interval: hc.interval.get(),
                rise: hc.rise,
                fall: hc.fall,
                credentials_secret: hc.credentials_secret.clone(),
                credentials: hc.credentials.clone(),
                steps,
            },
            max_connections: self.limits.max_connections,
            max_connections_per_client: self.limits.max_connections_per_client,
            max_negotiating: self.limits.max_negotiating,
            max_negotiating_per_client: self.limits.max_negotiating_per_client,
            connection_rate_per_client: self.limits.connection_rate_per_client,
            timeouts: TimeoutValues {
                client: self.timeouts.client.get(),
                server: self.timeouts.server.get(),
                connect: self.timeouts.connect.get(),
                check: self.timeouts.check.get(),
                handshake: self.timeouts.handshake.get(),
            },
            allowed_cidrs,
            tls: self.tls.clone(),
            proxy_protocol: self.proxy_protocol.clone(),
            proxy_trusted,
            listen,
            admin,
            drain_timeout: self
                .drain_timeout
                .map(Duration::get)
                .unwrap_or(std::time::Duration::from_secs(30)),
            admin_token_file: self
                .admin_token_file
                .as_deref()
                .filter(|f| !f.is_empty())
                .map(std::path::PathBuf::from),
            admin_token_for_reads: self.admin_token_for_reads,
            admin_limits: AdminLimitValues {
                max_connections: admin_limits.max_connections as usize,
                max_header_bytes: admin_limits.max_header_bytes.0 as usize,
                max_body_bytes: admin_limits.max_body_bytes.0,
                connection_lifetime: admin_limits.connection_lifetime.get(),
            },
            access_log: self.portal.access_log,
            multiplex: self.pooling.as_ref().and_then(Pooling::multiplex),
            pg_pool: self.pooling.as_ref().and_then(Pooling::pg_pool),
            peers,
            name: self.name.clone().filter(|n| !n.is_empty()),
            spec: self.clone(),
        })
    }

    /// [`validate`](Self::validate) plus what a standalone portal needs: certificate files
    /// when it terminates TLS.
    pub fn validate_standalone(&self) -> Result<Config, ConfigError> {
        let result = self.validate();
        let mut missing = Vec::new();
        if self.tls.mode == TlsMode::Terminate {
            for (field, value) in [
                ("tls.certFile", &self.tls.cert_file),
                ("tls.keyFile", &self.tls.key_file),
            ] {
                if value.as_deref().unwrap_or("").is_empty() {
                    missing.push(FieldError {
                        field: field.into(),
                        message: "required when tls.mode is terminate (the default); set tls.mode: disabled for plaintext".into(),
                    });
                }
            }
        }
        match result {
            _ if missing.is_empty() => result,
            Ok(_) => Err(ConfigError::Invalid(missing)),
            Err(ConfigError::Invalid(mut errors)) => {
                errors.extend(missing);
                Err(ConfigError::Invalid(errors))
            }
            Err(other) => Err(other),
        }
    }
}

/// A CIDR (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (one host).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "invalid CIDR {text:?}: expected an address and prefix length such as 10.0.0.0/8 or 2001:db8::/32"
    ))
}

/// A DNS label per RFC 1123: lowercase letters, digits and '-', 1 to 63 characters.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("{name:?} must be 1 to 63 characters (a DNS label)"));
    }
    if let Some((i, c)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{name:?} has {c:?} at byte {i}; a DNS label has only lowercase letters, digits and '-'"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "{name:?} must start and end with a letter or digit (a DNS label)"
        ));
    }
    Ok(())
}

/// A DNS name: dot-separated labels, at most 253 characters.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    for label in name.split('.') {
        check_dns_label(label).map_err(|m| format!("{name:?} is not a DNS name: {m}"))?;
    }
    Ok(())
}

/// Resolves `\r`, `\n`, `\t`, `\0`, `\\` and `\xNN` in a probe string.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let escape = bytes.get(i + 1).copied();
        match escape {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = text
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        format!("bad \\x escape at byte {i}: two hex digits expected")
                    })?;
                out.push(hex);
                i += 2;
            }
            Some(other) => return Err(format!("unknown escape \\{} at byte {i}", other as char)),
            None => return Err(format!("lone backslash at byte {i}")),
        }
        i += 2;
    }
    Ok(out)
}

/// Reads the text file at `path` if it holds at most `max` bytes of UTF-8; a larger file is
/// refused before it is read whole (`InvalidData`: "larger than N bytes"), a binary one names
/// the offset of its first invalid byte. For the configuration and the files it names.
pub fn read_limited(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(invalid(format!("larger than {max} bytes")));
    }
    String::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

#[cfg(test)]
mod tests;
