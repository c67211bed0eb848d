//! The validation of a parsed spec into a [`Config`]: everything a schema cannot check,
//! every problem found (not just the first) as a [`FieldError`] naming its field, and the
//! defaults resolved.
//!
//! May import: nothing outside `config`.

use std::net::SocketAddr;

use super::address::Address;
use super::duration::Duration;
use super::engine::{Engine, RoutingMode};
use super::error::{ConfigError, FieldError};
use super::pooling::{ByteSize, PoolingMode};
use super::resolved::{
    AdminLimitValues, Backend, Config, DataPlane, Health, Step, TimeoutValues, ADMIN_BODY_BYTES,
    ADMIN_HEADER_BYTES, MAX_PEERS,
};
use super::spec::DatabasePortalSpec;
use super::spec_read_only::ReadOnlyValues;
use super::spec_tls::TlsMode;
use super::text::{check_dns_label, check_dns_name, parse_cidr, unescape};

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

        let read_only = self.read_only.as_ref().filter(|r| r.enabled).map(|ro| {
            if self.engine == Engine::Tcp {
                err(
                    "readOnly",
                    "needs an engine whose probe reports replicas (redis, postgres, mysql, etcd)"
                        .into(),
                );
            }
            let ro_port = match ro.port {
                Some(0) => {
                    err("readOnly.port", "must be between 1 and 65535".into());
                    0
                }
                Some(p) => p,
                None => port.checked_add(1).unwrap_or_else(|| {
                    err(
                        "readOnly.port",
                        "the default is port + 1, past 65535 here: set it".into(),
                    );
                    0
                }),
            };
            if ro_port == port && port != 0 {
                err(
                    "readOnly.port",
                    format!("{ro_port} is the main listener's port too: choose another"),
                );
            }
            let ro_listen = match &ro.listen {
                None => SocketAddr::from(([0, 0, 0, 0], ro_port)),
                Some(text) => text.parse().unwrap_or_else(|e| {
                    err(
                        "readOnly.listen",
                        format!("invalid socket address {text:?}: {e}"),
                    );
                    SocketAddr::from(([0, 0, 0, 0], 0))
                }),
            };
            if ro_listen == admin && ro_listen.port() != 0 {
                err(
                    "readOnly.port",
                    format!("{ro_listen} is the admin endpoint's address too: choose another"),
                );
            }
            // A clash of the default address is the port's, reported above.
            if ro.listen.is_some() && ro_listen == listen && ro_listen.port() != 0 {
                err(
                    "readOnly.listen",
                    format!("{ro_listen} is the main listener's address too"),
                );
            }
            ReadOnlyValues {
                port: ro_port,
                listen: ro_listen,
                routing: ro.routing.mode(),
                max_lag: ro.max_lag.get(),
                fallback_to_leader: ro.fallback_to_leader,
            }
        });

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
            plane: match self.pooling.as_ref() {
                Some(p) => match (p.multiplex(), p.pg_pool()) {
                    (Some(m), _) => DataPlane::Multiplex(m),
                    (None, Some(pg)) => DataPlane::Pool(pg),
                    (None, None) => DataPlane::Forward,
                },
                None => DataPlane::Forward,
            },
            peers,
            name: self.name.clone().filter(|n| !n.is_empty()),
            read_only,
            serves_reads: false,
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
