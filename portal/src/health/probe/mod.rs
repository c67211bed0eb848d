//! The engine probes: one connection to one backend, bounded by `timeouts.check` (connect and
//! exchange), answering healthy with a role, or why not.
//!
//! May import: `config`, `tls` (its backend connector), `wire` and the rest of `health`.

mod etcd;
mod mysql;
mod postgres;
mod redis;
mod steps;
pub mod tls;

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{credentials::CredentialsSource, Caveat, Replication, Role};
use crate::config::{Address, Config, Engine, RoutingMode, Step};

/// Why a probe failed; the text goes to the view's `last_error`, the log and `/status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?} (timeouts.check)")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("credentials: {0}")]
    Credentials(String),
    /// The server refused the probe's login: a credentials problem (`healthCheck`'s
    /// credentials are wrong or missing), not a sign that the node is down.
    #[error("login refused (check healthCheck credentials): {0}")]
    Auth(String),
    #[error("still loading its data set")]
    Loading,
    #[error("{0}")]
    Protocol(String),
    #[error("io: {0}")]
    Io(String),
}

impl From<std::io::Error> for ProbeError {
    fn from(e: std::io::Error) -> Self {
        ProbeError::Io(e.to_string())
    }
}

/// Everything a probe needs besides the address, built once per configuration.
#[derive(Clone)]
pub struct ProbeSettings {
    pub engine: Engine,
    /// Custom send/expect steps; empty = the engine's own probe.
    pub steps: Vec<Step>,
    /// Role given to a node that passes custom `steps`: `Leader` for engines with a role (the
    /// steps are then expected to pass on the leader only, as HAProxy's `role:master` check
    /// does), `Unknown` for `tcp`.
    pub steps_role: Role,
    /// `timeouts.check`: one probe, connect and exchange.
    pub timeout: Duration,
    /// TLS to the backends, when `tls.backend.enabled`; an error when it cannot be set up
    /// (every probe then fails with it).
    pub tls: Option<Result<tls::BackendTls, String>>,
    pub health: crate::config::Health,
    pub credentials: Arc<dyn CredentialsSource>,
}

impl std::fmt::Debug for ProbeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeSettings")
            .field("engine", &self.engine)
            .field("steps", &self.steps.len())
            .field("timeout", &self.timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ProbeSettings {
    pub fn new(config: &Config, credentials: Arc<dyn CredentialsSource>) -> Self {
        let tls = config
            .tls
            .backend
            .as_ref()
            .filter(|b| b.enabled)
            .map(tls::BackendTls::new);
        let steps_role = if config.engine == Engine::Tcp && config.routing != RoutingMode::Leader {
            Role::Unknown
        } else {
            Role::Leader
        };
        ProbeSettings {
            engine: config.engine,
            steps: config.health.steps.clone(),
            steps_role,
            timeout: config.timeouts.check,
            tls,
            health: config.health.clone(),
            credentials,
        }
    }

    /// Whether probes on these settings and `other` behave alike (credentials excepted, they
    /// are read at each probe).
    pub fn same_probe(&self, other: &ProbeSettings) -> bool {
        self.engine == other.engine
            && self.steps == other.steps
            && self.steps_role == other.steps_role
    }
}

/// What a successful probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    /// The role routing goes by. Meaningless when `caveat` is [`Caveat::Busy`]: a busy node
    /// answers nothing but `-BUSY`, and keeps the role it had.
    pub role: Role,
    /// Whether the engine counts the node as its own leader, where that is not what `role`
    /// says: etcd's raft leader (`Some(true)`) or follower (`Some(false)`), while every healthy
    /// member is a [`Role::SharedLeader`]. `None` for the other engines.
    pub engine_leader: Option<bool>,
    /// Alive and routable, but not serving everything right now.
    pub caveat: Option<Caveat>,
    /// The node's replication as the engine states it (position, stated lag, a broken link).
    pub replication: Replication,
}

impl From<Role> for Probed {
    fn from(role: Role) -> Self {
        Probed {
            role,
            engine_leader: None,
            caveat: None,
            replication: Replication::default(),
        }
    }
}

impl Probed {
    /// A node that answered `-BUSY` (see [`Caveat::Busy`]).
    pub fn busy() -> Self {
        Probed {
            caveat: Some(Caveat::Busy),
            ..Role::Unknown.into()
        }
    }
}

/// Probes `address` once: healthy with a role, or why not. Never takes longer than
/// `settings.timeout`.
pub async fn probe(settings: &ProbeSettings, address: &Address) -> Result<Role, ProbeError> {
    probe_node(settings, address).await.map(|p| p.role)
}

/// [`probe`], with what the engine says beside the role ([`Probed::engine_leader`]).
pub async fn probe_node(settings: &ProbeSettings, address: &Address) -> Result<Probed, ProbeError> {
    let deadline = tokio::time::Instant::now() + settings.timeout;
    match tokio::time::timeout_at(deadline, run(settings, address, deadline)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(settings.timeout)),
    }
}

async fn run(
    settings: &ProbeSettings,
    address: &Address,
    deadline: tokio::time::Instant,
) -> Result<Probed, ProbeError> {
    let tls = match &settings.tls {
        None => None,
        Some(Ok(tls)) => Some(tls),
        Some(Err(e)) => return Err(ProbeError::Tls(e.clone())),
    };
    if !settings.steps.is_empty() {
        let mut stream = connect_maybe_tls(address, tls).await?;
        steps::run(&mut stream, &settings.steps, deadline).await?;
        return Ok(settings.steps_role.into());
    }
    let credentials = || {
        settings
            .credentials
            .credentials(&settings.health)
            .map_err(ProbeError::Credentials)
    };
    match settings.engine {
        Engine::Tcp => {
            connect_maybe_tls(address, tls).await?;
            Ok(Role::Unknown.into())
        }
        Engine::Redis => {
            let creds = credentials()?;
            let mut stream = connect_maybe_tls(address, tls).await?;
            redis::probe(&mut stream, creds.as_ref()).await
        }
        Engine::Etcd => {
            let mut stream = connect_maybe_tls(address, tls).await?;
            etcd::probe(&mut stream, address).await
        }
        Engine::Postgres => {
            let creds = credentials()?;
            let stream = connect(address).await?;
            postgres::probe(stream, address, tls, creds.as_ref()).await
        }
        Engine::Mysql => {
            let creds = credentials()?;
            mysql::probe(address, tls, creds.as_ref(), deadline).await
        }
    }
}

/// A byte stream to a backend, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(address: &Address) -> Result<TcpStream, ProbeError> {
    let stream = TcpStream::connect((address.host.as_str(), address.port))
        .await
        .map_err(|e| ProbeError::Connect(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connect_maybe_tls(
    address: &Address,
    tls: Option<&tls::BackendTls>,
) -> Result<Box<dyn Io>, ProbeError> {
    let stream = connect(address).await?;
    match tls {
        None => Ok(Box::new(stream)),
        Some(tls) => Ok(Box::new(tls.connect(address, stream).await?)),
    }
}

pub(crate) use crate::wire::excerpt;
