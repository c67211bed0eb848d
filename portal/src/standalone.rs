//! The standalone portal: its configuration from a file (or the embedded default), followed
//! as it changes; its probes' credentials from files. Prepares what the serving loop serves,
//! as `cluster` does in a cluster.
//!
//! May import: `admission` (the listeners), `config`, `error`, `health`, `reload`, `tls`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use tokio::{net::TcpListener, sync::watch};
use tracing::info;

use crate::{
    config::{Config, ConfigError},
    error::Error,
    health::{self, HealthHandle},
    reload::{self, Following, ReloadStatus},
    tls::TlsRuntime,
};

/// A standalone portal ready to serve.
#[derive(Debug)]
pub struct Standalone {
    pub listener: TcpListener,
    pub admin: TcpListener,
    pub config: watch::Receiver<Arc<Config>>,
    pub health: HealthHandle,
    pub reload: ReloadStatus,
    /// The file's follower; stops when dropped.
    pub following: Following,
}

/// Loads `path` (or the embedded default), binds its `listen` and `admin` addresses, starts the
/// health checker and the file's follower: everything the serving loop needs.
pub async fn start(path: Option<PathBuf>) -> Result<Standalone, Error> {
    let (text, origin) = match &path {
        Some(p) => {
            let text = reload::read_config(p).map_err(|source| Error::Config {
                origin: p.display().to_string(),
                source: ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                },
            })?;
            (text, p.display().to_string())
        }
        None => (
            reload::DEFAULT_CONFIG.to_string(),
            "embedded default".to_string(),
        ),
    };
    let config = reload::parse_standalone(&text).map_err(|source| Error::Config {
        origin: origin.clone(),
        source,
    })?;
    let (listener, admin) = crate::admission::bind(&config).await?;
    info!(
        config = %origin,
        listen = %local(&listener),
        admin = %local(&admin),
        engine = config.engine.as_str(),
        backends = config.backends.len(),
        "portal listening"
    );
    // A portal that cannot load its certificate does not start.
    TlsRuntime::check(&config)?;
    let status = ReloadStatus::loaded(origin);
    let (tx, rx) = watch::channel(Arc::new(config));
    let health = health::spawn_checker(rx.clone(), Arc::new(health::StandaloneCredentials));
    let mut following = Following::default();
    if let Some(p) = path {
        following.tasks.push(tokio::spawn(reload::watch_file(
            p,
            text,
            tx.clone(),
            status.clone(),
        )));
    }
    following.sender = Some(tx);
    Ok(Standalone {
        listener,
        admin,
        config: rx,
        health,
        reload: status,
        following,
    })
}

fn local(l: &TcpListener) -> String {
    l.local_addr()
        .map_or_else(|e| e.to_string(), |a: SocketAddr| a.to_string())
}
