//! One client session, in one task and one span: (PROXY header) → admission → (TLS / engine
//! negotiation hook) → backend connect → splice, watching configuration and health changes.
//!
//! - [`intake`]: from accept to an admitted, negotiated client (`serve`, `serve_proxied`);
//! - [`forward`]: the 1:1 forward to one backend (`proxy`, the open session's task);
//! - [`registry`]: the open sessions and the one task that closes them (`control_sessions`);
//! - [`dial`]: choosing and connecting a backend;
//! - [`multiplex`]: Redis multiplexing (`pooling.mode: multiplex`), in place of the forward;
//! - [`pool`]: PostgreSQL session and transaction pooling (`pooling.mode: session |
//!   transaction`), in place of the forward.
//!
//! May import: `admission`, `allow`, `config`, `health`, `metrics`, `proxy_protocol`,
//! `route`, `splice`, `tls`, `wire` (multiplexing). Never `server` or `admin`.

mod dial;
mod forward;
mod intake;
pub mod multiplex;
pub mod pool;
mod registry;

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::watch;

pub use forward::proxy;
pub use intake::{serve, serve_proxied};
pub use registry::{
    backend_keeps_sessions, control_sessions, keep_session, Close, Registration, Sessions,
};

use crate::{admission::State, config::Config, health, tls::TlsRuntime};

/// Where a session comes from and arrives at, as seen by admission and the PROXY header we
/// send.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The client: the TCP peer, or the source of its PROXY header.
    pub client: SocketAddr,
    /// The portal address the client connected to.
    pub local: Option<SocketAddr>,
}

/// What every session task receives.
#[derive(Clone, Debug)]
pub struct Shared {
    pub state: Arc<State>,
    /// The open sessions, checked again on each configuration or health change.
    pub sessions: Arc<Sessions>,
    pub config: watch::Receiver<Arc<Config>>,
    pub health: watch::Receiver<health::HealthView>,
    /// The health checker, to report backends that refuse sessions (starts fast probing).
    pub checker: Option<health::HealthHandle>,
    /// Becomes `true` when the drain timeout ran out: close now.
    pub kill: watch::Receiver<bool>,
    /// TLS termination: the certificate in force and the engine negotiation.
    pub tls: Arc<TlsRuntime>,
    /// Redis multiplexing: the shared server connections and their counters.
    pub mux: Arc<multiplex::Hub>,
    /// PostgreSQL pooling: the pools and their counters.
    pub pg: Arc<pool::PgHub>,
}

/// `name/address` of each backend that health and leadership allow (administrative states
/// aside): the shared server connections of multiplexing and pooling to any other backend
/// are retired.
pub(crate) fn routable_bases(config: &Config, view: &health::HealthView) -> Vec<String> {
    crate::route::eligible_by_health(config, view)
        .into_iter()
        .map(|i| format!("{}/{}", config.backends[i].name, config.backends[i].address))
        .collect()
}

/// Calls `on_change` with `hub` after each configuration or health change, until either
/// channel closes or the hub is dropped.
pub(crate) fn on_route_change<T: Send + Sync + 'static>(
    hub: &Arc<T>,
    mut config: watch::Receiver<Arc<Config>>,
    mut health: watch::Receiver<health::HealthView>,
    on_change: fn(&T, &Config, &health::HealthView),
) {
    let hub = Arc::downgrade(hub);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = health.changed() => if r.is_err() { break },
                r = config.changed() => if r.is_err() { break },
            }
            let Some(hub) = hub.upgrade() else { break };
            let config = config.borrow().clone();
            let view = health.borrow().clone();
            on_change(&hub, &config, &view);
        }
    });
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::health::HealthView;

    /// The senders that drive a test's `Shared`; dropping one ends its channel.
    pub(crate) struct Drivers {
        pub config_tx: tokio::sync::watch::Sender<Arc<Config>>,
        pub _health_tx: tokio::sync::watch::Sender<HealthView>,
        pub kill_tx: tokio::sync::watch::Sender<bool>,
    }

    /// What the sessions share, serving `config` with no health checker and no TLS.
    pub(crate) fn shared(config: Arc<Config>) -> (Shared, Drivers) {
        let state = Arc::new(State::new(crate::reload::ReloadStatus::default()));
        let (config_tx, config_rx) = tokio::sync::watch::channel(config.clone());
        let (_health_tx, health) = tokio::sync::watch::channel(HealthView::default());
        let (kill_tx, kill) = tokio::sync::watch::channel(false);
        let shared = Shared {
            state,
            sessions: Arc::default(),
            config: config_rx,
            health,
            checker: None,
            kill,
            tls: crate::tls::TlsRuntime::new_or_closed(&config),
            mux: Arc::default(),
            pg: Arc::default(),
        };
        let drivers = Drivers {
            config_tx,
            _health_tx,
            kill_tx,
        };
        (shared, drivers)
    }
}
