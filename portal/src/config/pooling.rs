//! `spec.pooling`: how client connections share server connections: `none` (one backend
//! connection per client), `multiplex` (Redis: many clients' commands pipelined onto a few
//! shared server connections), and PostgreSQL's `session` and `transaction` pooling (a client
//! holds a server connection of a small pool for its session, or for each transaction). Also
//! the byte sizes it is written in (`8Mi`).
//!
//! May import: nothing outside `config`.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::duration::Duration;
use super::engine::Engine;
use super::text::check_dns_name;

/// How client connections share server connections. Absent, or mode none: one backend
/// connection per client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pooling {
    /// none: one backend connection per client (the default); multiplex (redis only): the
    /// commands of all clients are pipelined onto a few shared server connections, and a
    /// client holding per-connection state (MULTI, WATCH, blocking commands, pub/sub, MONITOR,
    /// SELECT of another database, CLIENT TRACKING/REPLY, HELLO 3) is pinned to a dedicated
    /// one while the state lasts; session (postgres): a server connection of the pool for
    /// the client's whole session, reset with DISCARD ALL before the next client; transaction
    /// (postgres): a server connection for each transaction, given back when it ends.
    #[serde(default)]
    pub mode: PoolingMode,
    /// session, transaction: server connections per backend, database, user and set of startup parameters (clients sending the same parameters share a pool).
    /// Default 20.
    #[serde(default = "Pooling::default_pool_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub pool_size: u32,
    /// session, transaction: idle server connections each pool keeps open (at most
    /// poolSize). Default 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub min_idle: u32,
    /// session, transaction: an idle server connection unused this long is closed. Default 10m.
    #[serde(default = "Pooling::default_server_idle_timeout")]
    pub server_idle_timeout: Duration,
    /// session, transaction: a server connection older than this is closed when it is next
    /// idle. Default 1h.
    #[serde(default = "Pooling::default_server_lifetime")]
    pub server_lifetime: Duration,
    /// transaction: prepared statements kept per server connection (least recently used
    /// closed first). Default 200.
    #[serde(default = "Pooling::default_max_prepared_statements")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_prepared_statements: u32,
    /// multiplex: shared server connections per backend. Default 4.
    #[serde(default = "Pooling::default_server_connections")]
    #[schemars(range(min = 1, max = 256))]
    pub server_connections: u32,
    /// multiplex: commands in flight per server connection; a client past it waits.
    /// Default 1024.
    #[serde(default = "Pooling::default_max_in_flight")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_in_flight: u32,
    /// multiplex: bytes of replies a client may leave unread before it is cut (like Redis'
    /// client-output-buffer-limit), as bytes or with a suffix (`64Ki`, `8Mi`, `1Gi`, `500k`,
    /// `8M`). Default 8Mi.
    #[serde(default = "Pooling::default_client_output_limit")]
    pub client_output_limit: ByteSize,
    /// How long a client waits for a server connection (postgres: of its pool, at login too;
    /// redis: a dedicated one for a pinned client) before it gets an error (postgres: SQLSTATE 53300;
    /// 08006 when its backend could not be reached all that time, as in a failover).
    /// Default 5s.
    #[serde(default = "Pooling::default_queue_timeout")]
    pub queue_timeout: Duration,
    /// The users clients authenticate as. Redis: the passwords clients must AUTH with; the
    /// portal answers AUTH and HELLO itself and never forwards a client's password (absent:
    /// no AUTH needed). PostgreSQL (session, transaction): required; the portal runs
    /// SCRAM-SHA-256 with the client and logs in to the backend as that user.
    #[serde(default, skip_serializing_if = "PoolingAuth::is_empty")]
    pub auth: PoolingAuth,
}

impl Default for Pooling {
    fn default() -> Self {
        Pooling {
            mode: PoolingMode::None,
            pool_size: Pooling::default_pool_size(),
            min_idle: 0,
            server_idle_timeout: Pooling::default_server_idle_timeout(),
            server_lifetime: Pooling::default_server_lifetime(),
            max_prepared_statements: Pooling::default_max_prepared_statements(),
            server_connections: Pooling::default_server_connections(),
            max_in_flight: Pooling::default_max_in_flight(),
            client_output_limit: Pooling::default_client_output_limit(),
            queue_timeout: Pooling::default_queue_timeout(),
            auth: PoolingAuth::default(),
        }
    }
}

impl Pooling {
    fn default_pool_size() -> u32 {
        20
    }
    fn default_server_idle_timeout() -> Duration {
        Duration::from_secs(600)
    }
    fn default_server_lifetime() -> Duration {
        Duration::from_secs(3600)
    }
    fn default_max_prepared_statements() -> u32 {
        200
    }
    fn default_server_connections() -> u32 {
        4
    }
    fn default_max_in_flight() -> u32 {
        1024
    }
    fn default_client_output_limit() -> ByteSize {
        ByteSize(8 << 20)
    }
    fn default_queue_timeout() -> Duration {
        Duration::from_secs(5)
    }

    /// Checks what the schema cannot; problems go to `err` with the field's path.
    pub(super) fn check(&self, engine: Engine, err: &mut dyn FnMut(&str, String)) {
        if self.mode == PoolingMode::Multiplex && engine != Engine::Redis {
            err(
                "pooling.mode",
                format!(
                    "multiplex is for engine redis (Redis, KeyDB, Valkey), not {}",
                    engine.as_str()
                ),
            );
        }
        if matches!(self.mode, PoolingMode::Session | PoolingMode::Transaction)
            && engine != Engine::Postgres
        {
            err(
                "pooling.mode",
                format!(
                    "{} is for engine postgres, not {}; {} cannot pool server connections{}",
                    self.mode.as_str(),
                    engine.as_str(),
                    engine.as_str(),
                    if engine == Engine::Redis {
                        " by session or transaction (use multiplex)"
                    } else {
                        ""
                    }
                ),
            );
        }
        if self.pooled() {
            if self.pool_size == 0 {
                err("pooling.poolSize", "must be at least 1".into());
            }
            if self.min_idle > self.pool_size {
                err(
                    "pooling.minIdle",
                    format!(
                        "must be at most poolSize ({}), found {}",
                        self.pool_size, self.min_idle
                    ),
                );
            }
            if self.server_idle_timeout.get().is_zero() {
                err("pooling.serverIdleTimeout", "must be more than 0".into());
            }
            if self.server_lifetime.get().is_zero() {
                err("pooling.serverLifetime", "must be more than 0".into());
            }
            if self.max_prepared_statements == 0 {
                err("pooling.maxPreparedStatements", "must be at least 1".into());
            }
            if self.auth.is_empty() {
                err(
                    "pooling.auth",
                    format!(
                        "{} pooling needs the users clients log in as: set pooling.auth.usersSecret (standalone: usersFile) or pooling.auth.query",
                        self.mode.as_str()
                    ),
                );
            }
        }
        if let Some(query) = self.auth.query.as_deref().filter(|q| !q.trim().is_empty()) {
            if !query.contains("$1") {
                err(
                    "pooling.auth.query",
                    "must take the user name as $1 (for example SELECT passwd FROM pg_shadow WHERE usename = $1)".into(),
                );
            }
        }
        if self.auth.query.is_some() && !self.pooled() {
            err(
                "pooling.auth.query",
                "is for engine postgres with pooling.mode session or transaction".into(),
            );
        }
        if self.server_connections == 0 {
            err("pooling.serverConnections", "must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            err("pooling.maxInFlight", "must be at least 1".into());
        }
        if self.client_output_limit.0 < 1024 {
            err(
                "pooling.clientOutputLimit",
                format!(
                    "must be at least 1Ki, found {} bytes",
                    self.client_output_limit.0
                ),
            );
        }
        if self.queue_timeout.get().is_zero() {
            err("pooling.queueTimeout", "must be more than 0".into());
        }
        if let Some(secret) = &self.auth.users_secret {
            if let Err(m) = check_dns_name(secret) {
                err("pooling.auth.usersSecret", m);
            }
        }
        if self.auth.users_secret.is_some() && self.auth.users_file.is_some() {
            err(
                "pooling.auth",
                "set either usersSecret or usersFile, not both".into(),
            );
        }
    }

    fn pooled(&self) -> bool {
        matches!(self.mode, PoolingMode::Session | PoolingMode::Transaction)
    }

    /// The validated PostgreSQL pooling settings, when the mode is `session` or `transaction`.
    pub fn pg_pool(&self) -> Option<PgPool> {
        self.pooled().then(|| PgPool {
            transaction: self.mode == PoolingMode::Transaction,
            pool_size: self.pool_size.max(1) as usize,
            min_idle: self.min_idle.min(self.pool_size) as usize,
            queue_timeout: self.queue_timeout.get(),
            server_idle_timeout: self.server_idle_timeout.get(),
            server_lifetime: self.server_lifetime.get(),
            max_prepared_statements: self.max_prepared_statements.max(1) as usize,
            users_secret: self.auth.users_secret.clone(),
            users_file: self.auth.users_file.clone(),
            auth_query: self.auth.query.as_deref().map(|q| {
                if q.trim().is_empty() {
                    DEFAULT_AUTH_QUERY.to_string()
                } else {
                    q.to_string()
                }
            }),
        })
    }

    /// The validated multiplexing settings, when the mode is `multiplex`.
    pub fn multiplex(&self) -> Option<Multiplex> {
        (self.mode == PoolingMode::Multiplex).then(|| Multiplex {
            server_connections: self.server_connections.max(1) as usize,
            max_in_flight: self.max_in_flight.max(1) as usize,
            client_output_limit: self.client_output_limit.0 as usize,
            queue_timeout: self.queue_timeout.get(),
            users_secret: self.auth.users_secret.clone(),
            users_file: self.auth.users_file.clone(),
        })
    }
}

/// How client connections share server connections.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolingMode {
    /// One backend connection per client.
    #[default]
    None,
    /// Redis: commands of many clients pipelined onto a few shared server connections.
    Multiplex,
    /// PostgreSQL: a pooled server connection for each client session.
    Session,
    /// PostgreSQL: a pooled server connection for each transaction.
    Transaction,
}

impl PoolingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolingMode::None => "none",
            PoolingMode::Multiplex => "multiplex",
            PoolingMode::Session => "session",
            PoolingMode::Transaction => "transaction",
        }
    }
}

/// The users clients authenticate as.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolingAuth {
    /// Secret (same namespace) mapping each user name to its password; redis: `default` is
    /// the user of a client that sends AUTH with a password only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_secret: Option<String>,
    /// Standalone portal only: path of a YAML map of user name to password (read again when
    /// it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub users_file: Option<String>,
    /// postgres: fetch a user's password verifier (SCRAM-SHA-256 or md5, as `pg_shadow`
    /// keeps it) from the database with the probe credentials, for users not in
    /// usersSecret; the portal checks the client against it and logs in to the backend with
    /// the keys the client's proof reveals (SCRAM passthrough), so no password is stored.
    /// `$1` is the user name; the verifier is the last column of the first row. Empty: the
    /// default query, which reads `pg_shadow` (and so needs a superuser as the probe's user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

impl PoolingAuth {
    pub fn is_empty(&self) -> bool {
        self.users_secret.is_none() && self.users_file.is_none() && self.query.is_none()
    }
}

impl PgPool {
    /// The users part of the settings in the shape [`Multiplex`] gives it, which is what the
    /// credentials sources read the users of `pooling.auth` from.
    pub fn users_lookup(&self) -> Multiplex {
        Multiplex {
            server_connections: 1,
            max_in_flight: 1,
            client_output_limit: 0,
            queue_timeout: self.queue_timeout,
            users_secret: self.users_secret.clone(),
            users_file: self.users_file.clone(),
        }
    }
}

/// What `pooling.auth.query: ""` runs: PgBouncer's classic auth_query, minus expired
/// passwords.
pub const DEFAULT_AUTH_QUERY: &str =
    "SELECT usename, passwd FROM pg_shadow WHERE usename = $1 AND (valuntil IS NULL OR valuntil > now())";

/// Validated `pooling` of mode `session` or `transaction` (PostgreSQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgPool {
    /// Transaction pooling; `false`: session pooling.
    pub transaction: bool,
    pub pool_size: usize,
    pub min_idle: usize,
    pub queue_timeout: std::time::Duration,
    pub server_idle_timeout: std::time::Duration,
    pub server_lifetime: std::time::Duration,
    pub max_prepared_statements: usize,
    pub users_secret: Option<String>,
    pub users_file: Option<String>,
    /// `auth.query` with the default filled in.
    pub auth_query: Option<String>,
}

/// Validated `pooling` of mode `multiplex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Multiplex {
    pub server_connections: usize,
    pub max_in_flight: usize,
    pub client_output_limit: usize,
    pub queue_timeout: std::time::Duration,
    pub users_secret: Option<String>,
    pub users_file: Option<String>,
}

/// The pattern the API server enforces for a byte size written as a string.
pub const BYTE_SIZE_PATTERN: &str = r"^[0-9]+(Ki|Mi|Gi|k|M|G)?$";

/// A number of bytes, written as an integer or a string with a suffix: `Ki`, `Mi`, `Gi`
/// (powers of 1024) or `k`, `M`, `G` (powers of 1000), as Kubernetes quantities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid size {s:?}: expected a number at byte 0; write e.g. 65536, 64Ki or 8Mi"
            ));
        }
        let number: u64 = s[..digits]
            .parse()
            .map_err(|_| format!("invalid size {s:?}: number too large"))?;
        let unit: u64 = match &s[digits..] {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown suffix {other:?} at byte {digits} (Ki, Mi, Gi, k, M or G)"
                ))
            }
        };
        number
            .checked_mul(unit)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    /// The shortest exact form: `8Mi`, `1500`, `64Ki`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, unit) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if self.0 >= unit && self.0 % unit == 0 {
                return write!(f, "{}{suffix}", self.0 / unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes such as 65536, 64Ki or 8Mi")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": BYTE_SIZE_PATTERN},
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FieldError;

    #[test]
    fn byte_sizes_parse_and_print() {
        for (text, bytes) in [
            ("0", 0),
            ("1500", 1500),
            ("64Ki", 65536),
            ("8Mi", 8 << 20),
            ("1Gi", 1 << 30),
            ("500k", 500_000),
            ("8M", 8_000_000),
        ] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.0, bytes, "{text}");
            assert_eq!(size.to_string().parse::<ByteSize>().unwrap(), size);
        }
        for (text, needle) in [
            ("", "byte 0"),
            ("Mi", "byte 0"),
            ("8mb", "unknown suffix \"mb\" at byte 1"),
            ("1.5Mi", "unknown suffix \".5Mi\""),
            ("99999999999Gi", "too large"),
        ] {
            let err = text.parse::<ByteSize>().unwrap_err();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    fn errors(spec: &str) -> Vec<FieldError> {
        let spec = crate::config::parse_yaml(spec).unwrap();
        match spec.validate() {
            Ok(_) => Vec::new(),
            Err(crate::config::ConfigError::Invalid(errors)) => errors,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn multiplex_is_for_redis_only_and_names_the_field() {
        let base = "backends: [{name: a, address: \"127.0.0.1:1\"}]\n";
        let ok = format!("engine: redis\n{base}pooling: {{mode: multiplex, clientOutputLimit: 64Ki, auth: {{usersSecret: users}}}}\n");
        let config = crate::config::parse_yaml(&ok).unwrap().validate().unwrap();
        let m = config.plane.multiplex().cloned().unwrap();
        assert_eq!(
            (m.server_connections, m.max_in_flight, m.client_output_limit),
            (4, 1024, 65536)
        );
        assert_eq!(m.users_secret.as_deref(), Some("users"));
        let pg = format!("engine: postgres\n{base}pooling: {{mode: multiplex}}\n");
        let e = errors(&pg);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "pooling.mode");
        assert!(e[0].message.contains("redis"), "{}", e[0].message);
        let none = format!("engine: postgres\n{base}pooling: {{mode: none}}\n");
        assert!(errors(&none).is_empty());
        let bad = format!("engine: redis\n{base}pooling: {{mode: multiplex, serverConnections: 0, maxInFlight: 0, clientOutputLimit: 10, queueTimeout: 0s, auth: {{usersSecret: Bad_Name, usersFile: /x}}}}\n");
        let fields: Vec<_> = errors(&bad).into_iter().map(|e| e.field).collect();
        for f in [
            "pooling.serverConnections",
            "pooling.maxInFlight",
            "pooling.clientOutputLimit",
            "pooling.queueTimeout",
            "pooling.auth.usersSecret",
            "pooling.auth",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} missing in {fields:?}");
        }
        let wrong = format!("engine: redis\n{base}pooling: {{mode: transaction}}\n");
        let e = errors(&wrong);
        assert!(e.iter().any(|e| e.field == "pooling.mode"), "{e:?}");
        let wrong = format!("engine: redis\n{base}pooling: {{mode: bouncing}}\n");
        let err = crate::config::parse_yaml(&wrong).unwrap_err().to_string();
        assert!(err.contains("pooling.mode"), "{err}");
        let size =
            format!("engine: redis\n{base}pooling: {{mode: multiplex, clientOutputLimit: 8mb}}\n");
        let err = crate::config::parse_yaml(&size).unwrap_err().to_string();
        assert!(err.contains("pooling.clientOutputLimit"), "{err}");
    }

    #[test]
    fn postgres_pooling_fields_defaults_and_errors_name_the_field() {
        let base = "backends: [{name: a, address: \"127.0.0.1:1\"}]\n";
        let ok = format!("engine: postgres\n{base}pooling: {{mode: transaction, auth: {{usersFile: /u.yaml}}}}\n");
        let config = crate::config::parse_yaml(&ok).unwrap().validate().unwrap();
        assert!(config.plane.multiplex().is_none());
        let p = config.plane.pg_pool().cloned().unwrap();
        assert!(p.transaction);
        assert_eq!(
            (p.pool_size, p.min_idle, p.max_prepared_statements),
            (20, 0, 200)
        );
        assert_eq!(p.queue_timeout, std::time::Duration::from_secs(5));
        assert_eq!(p.server_idle_timeout, std::time::Duration::from_secs(600));
        assert_eq!(p.server_lifetime, std::time::Duration::from_secs(3600));
        assert_eq!(p.users_file.as_deref(), Some("/u.yaml"));
        let session = format!("engine: postgres\n{base}pooling: {{mode: session, poolSize: 3, minIdle: 1, queueTimeout: 250ms, serverIdleTimeout: 1m, serverLifetime: 2h, maxPreparedStatements: 7, auth: {{usersSecret: users}}}}\n");
        let p = crate::config::parse_yaml(&session)
            .unwrap()
            .validate()
            .unwrap()
            .plane
            .pg_pool()
            .cloned()
            .unwrap();
        assert!(!p.transaction);
        assert_eq!(
            (p.pool_size, p.min_idle, p.max_prepared_statements),
            (3, 1, 7)
        );
        assert_eq!(p.queue_timeout, std::time::Duration::from_millis(250));
        for engine in ["mysql", "etcd", "tcp", "redis"] {
            let spec = format!(
                "engine: {engine}\n{base}pooling: {{mode: transaction, auth: {{usersFile: /u}}}}\n"
            );
            let e = errors(&spec);
            assert!(
                e.iter().any(|e| e.field == "pooling.mode"
                    && e.message.contains("postgres")
                    && e.message.contains(engine)),
                "{engine}: {e:?}"
            );
        }
        let bad = format!("engine: postgres\n{base}pooling: {{mode: transaction, poolSize: 0, minIdle: 2, serverIdleTimeout: 0s, serverLifetime: 0s, maxPreparedStatements: 0}}\n");
        let fields: Vec<_> = errors(&bad).into_iter().map(|e| e.field).collect();
        for f in [
            "pooling.poolSize",
            "pooling.minIdle",
            "pooling.serverIdleTimeout",
            "pooling.serverLifetime",
            "pooling.maxPreparedStatements",
            "pooling.auth",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} missing in {fields:?}");
        }
        // auth.query alone is enough; empty means the default query; a query must take $1.
        let query = |q: &str| {
            format!("engine: postgres\n{base}pooling: {{mode: transaction, auth: {{query: \"{q}\"}}}}\n")
        };
        let p = crate::config::parse_yaml(&query(""))
            .unwrap()
            .validate()
            .unwrap()
            .plane
            .pg_pool()
            .cloned()
            .unwrap();
        assert_eq!(p.auth_query.as_deref(), Some(DEFAULT_AUTH_QUERY));
        let own = "SELECT pw FROM auth.lookup($1)";
        let p = crate::config::parse_yaml(&query(own))
            .unwrap()
            .validate()
            .unwrap()
            .plane
            .pg_pool()
            .cloned()
            .unwrap();
        assert_eq!(p.auth_query.as_deref(), Some(own));
        let e = errors(&query("SELECT passwd FROM pg_shadow"));
        assert!(
            e.iter()
                .any(|e| e.field == "pooling.auth.query" && e.message.contains("$1")),
            "{e:?}"
        );
        let e = errors(&format!(
            "engine: redis\n{base}pooling: {{mode: multiplex, auth: {{query: \"\"}}}}\n"
        ));
        assert!(e.iter().any(|e| e.field == "pooling.auth.query"), "{e:?}");
        let size =
            format!("engine: postgres\n{base}pooling: {{mode: transaction, poolSize: -1}}\n");
        let err = crate::config::parse_yaml(&size).unwrap_err().to_string();
        assert!(err.contains("pooling.poolSize"), "{err}");
    }
}
