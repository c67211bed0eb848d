//! One client session, in one task and one span: (PROXY header) → admission → (TLS / engine
//! negotiation hook) → backend connect → splice, watching configuration and health changes.
//!
//! - [`intake`]: from accept to an admitted, negotiated client (`serve`, `serve_proxied`);
//! - [`forward`]: the 1:1 forward to one backend (`proxy`, the open session's task);
//! - [`registry`]: the open sessions and the one task that closes them (`control_sessions`);
//! - [`dial`]: choosing and connecting a backend;
//! - [`multiplex`]: Redis multiplexing (`pooling.mode: multiplex`), in place of the forward;
//! - [`pool`]: PostgreSQL session and transaction pooling (`pooling.mode: session |
//!   transaction`), in place of the forward;
//! - [`reads`]: the read-only listener's channels and its refusal in the engine's words.
//!
//! May import: `admission`, `allow`, `config`, `exec` (pooling), `health`, `metrics`,
//! `proxy_protocol`, `route`, `splice`, `tls`, `wire` (multiplexing). Never `server` or
//! `admin`.

mod dial;
mod forward;
pub(crate) mod hub;
mod intake;
pub mod multiplex;
pub mod pool;
pub mod reads;
mod registry;

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::watch;

pub use forward::proxy;
pub use intake::{serve, serve_proxied};
pub use registry::{
    backend_keeps_sessions, control_sessions, keep_session, Close, Registration, Seen, Sessions,
};

use crate::{
    admission::{ClientPermit, ConnectionPermit, NegotiationPermit, State},
    config::Config,
    health,
    tls::TlsRuntime,
};

/// Where a session comes from and arrives at, as seen by admission and the PROXY header we
/// send.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The client: the TCP peer, or the source of its PROXY header.
    pub client: SocketAddr,
    /// The portal address the client connected to.
    pub local: Option<SocketAddr>,
}

/// A client admitted by intake, handed to its data plane: its stream as negotiated so far and
/// what its admission decided. Dropping it gives every slot back.
#[derive(Debug)]
pub struct Admitted<S> {
    pub stream: S,
    pub peer: Peer,
    /// The client's first bytes, read past what intake needed (behind a PROXY header).
    pub early: Vec<u8>,
    /// Its slots under `limits.maxConnections` and `limits.maxConnectionsPerClient`, held
    /// while it is served.
    pub permits: SessionPermits,
    /// Counted under `limits.maxNegotiating` until the plane has made it a session.
    pub negotiating: NegotiationPermit,
    /// The configuration it was admitted under, and that configuration's generation.
    pub config: Arc<Config>,
    pub generation: u64,
}

/// The slots an admitted client holds while it is served.
pub type SessionPermits = (ConnectionPermit, ClientPermit);

impl<S> Admitted<S> {
    /// The same client on the stream `f` makes of its own.
    pub fn map_stream<T>(self, f: impl FnOnce(S) -> T) -> Admitted<T> {
        let (stream, rest) = self.replace(());
        rest.replace(f(stream)).1
    }

    /// The stream, apart from the rest (for a negotiation that consumes it).
    pub fn take_stream(self) -> (S, Admitted<()>) {
        self.replace(())
    }

    fn replace<T>(self, stream: T) -> (S, Admitted<T>) {
        let rest = Admitted {
            stream,
            peer: self.peer,
            early: self.early,
            permits: self.permits,
            negotiating: self.negotiating,
            config: self.config,
            generation: self.generation,
        };
        (self.stream, rest)
    }
}

impl Admitted<()> {
    /// The same client on the stream a negotiation turned it into.
    pub fn with_stream<T>(self, stream: T) -> Admitted<T> {
        self.replace(stream).1
    }
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
    /// The read-only listener's sessions (`readOnly`), beside the main listener's: the admin
    /// endpoint closes and reports them too. `None` on the read-only listener itself.
    pub reads: Option<Box<Shared>>,
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
            reads: None,
        };
        let drivers = Drivers {
            config_tx,
            _health_tx,
            kill_tx,
        };
        (shared, drivers)
    }
}
