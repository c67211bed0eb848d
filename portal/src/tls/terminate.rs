//! Engine-aware TLS termination for one connection, in two phases around the backend connect.
//!
//! May import: `config` and the rest of `tls`.

use std::{sync::Arc, time::Duration};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};

use super::{
    mysql, pg_sasl, postgres, BackendConnector, CertStore, MaybeTls, Rewind, Served, TlsError,
};
use crate::config::{Config, Engine, TlsMode};

/// How long a client has to finish its TLS negotiation (and, for MySQL, the authentication
/// exchange that the portal relays) when no configuration says otherwise: the default of
/// `timeouts.handshake`. Long enough for a slow client on a bad network, short enough that a
/// silent scanner does not hold a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection does about TLS, for one configuration. Cheap to clone; the served
/// certificate is read from the store's `watch` channel at each `accept`, so a rotation
/// reaches new handshakes without a new `Terminator`.
#[derive(Clone)]
pub struct Terminator {
    engine: Engine,
    mode: TlsMode,
    certs: Option<watch::Receiver<Arc<Served>>>,
    backend: Option<BackendConnector>,
    handshake_timeout: Duration,
    /// PostgreSQL clients' TLS records are kept by the portal after the handshake
    /// ([`records`](super::records)): for pooled clients, which mostly idle.
    own_records: bool,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("engine", &self.engine)
            .field("mode", &self.mode)
            .field("backend_tls", &self.backend.is_some())
            .field("handshake_timeout", &self.handshake_timeout)
            .field("own_records", &self.own_records)
            .finish()
    }
}

/// A client after the first phase.
pub struct Accepted<C> {
    state: State<C>,
}

enum State<C> {
    Ready(MaybeTls<Rewind<C>>),
    /// MySQL: the server speaks first, so nothing happens until the backend is connected.
    Mysql(Rewind<C>, Option<Arc<ServerConfig>>),
}

impl<C> Accepted<C> {
    /// The client stream, once negotiated (`None` for MySQL before [`Terminator::connect`]).
    pub fn stream(&self) -> Option<&MaybeTls<Rewind<C>>> {
        match &self.state {
            State::Ready(s) => Some(s),
            State::Mysql(..) => None,
        }
    }

    /// The negotiated client stream itself (`Err` for MySQL, whose negotiation needs the
    /// backend): for data planes that talk to the client on their own, as Redis multiplexing.
    pub fn into_stream(self) -> Result<MaybeTls<Rewind<C>>, Self> {
        match self.state {
            State::Ready(s) => Ok(s),
            state => Err(Accepted { state }),
        }
    }
}

/// Both streams, ready for the byte pump.
pub struct Established<C, B> {
    pub client: MaybeTls<Rewind<C>>,
    pub backend: MaybeTls<B>,
}

impl Terminator {
    pub fn new(
        engine: Engine,
        mode: TlsMode,
        certs: Option<watch::Receiver<Arc<Served>>>,
        backend: Option<BackendConnector>,
    ) -> Self {
        Terminator {
            engine,
            mode,
            certs,
            backend,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            own_records: false,
        }
    }

    /// The terminator for a configuration. `certs` is required when `tls.mode` is
    /// `terminate`. Backend TLS is ignored in passthrough mode, where the client's own TLS
    /// goes through to the backend.
    pub fn from_config(config: &Config, certs: Option<&CertStore>) -> Result<Self, TlsError> {
        let mode = config.tls.mode;
        let certs = match (mode, certs) {
            (TlsMode::Terminate, None) => {
                return Err(TlsError::BadCertificate(
                    "tls.mode is terminate but no certificate is loaded".into(),
                ))
            }
            (TlsMode::Terminate, Some(store)) => Some(store.subscribe()),
            _ => None,
        };
        let backend = match mode {
            TlsMode::Passthrough => None,
            _ => BackendConnector::from_settings(config.tls.backend.as_ref())?,
        };
        Ok(Terminator::new(config.engine, mode, certs, backend)
            .with_handshake_timeout(config.timeouts.handshake)
            .with_own_records(config.plane.pg_pool().is_some()))
    }

    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// PostgreSQL clients' TLS records kept by the portal after the handshake (pooling).
    pub fn with_own_records(mut self, own: bool) -> Self {
        self.own_records = own;
        self
    }

    /// TLS to the backends (`tls.backend`), when enabled.
    pub fn backend(&self) -> Option<&BackendConnector> {
        self.backend.as_ref()
    }

    /// Nothing to negotiate on either side: the data plane may pump the raw sockets.
    pub fn is_transparent(&self) -> bool {
        match self.mode {
            TlsMode::Passthrough => true,
            TlsMode::Disabled => self.backend.is_none(),
            TlsMode::Terminate => false,
        }
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The server config new handshakes use now.
    fn served(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.certs
            .as_ref()
            .map(|rx| rx.borrow().config.clone())
            .ok_or_else(|| TlsError::BadCertificate("no certificate loaded".into()))
    }

    /// Phase one, before a backend is chosen: the TLS handshake (or PostgreSQL's negotiation),
    /// within the handshake deadline. A client that fails here never costs a backend
    /// connection.
    pub async fn accept<C>(&self, client: C) -> Result<Accepted<C>, TlsError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        self.accept_with(client, Vec::new()).await
    }

    /// [`accept`](Self::accept) for a client whose first bytes were already read (behind a
    /// PROXY header): `early` is replayed before the stream.
    pub async fn accept_with<C>(&self, client: C, early: Vec<u8>) -> Result<Accepted<C>, TlsError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let client = Rewind::with_prefix(client, early);
        let plain = |c| {
            Ok(Accepted {
                state: State::Ready(MaybeTls::Plain(c)),
            })
        };
        match (self.mode, self.engine) {
            (TlsMode::Passthrough, _) => plain(client),
            (TlsMode::Disabled, _) if self.backend.is_none() => plain(client),
            (TlsMode::Disabled, Engine::Postgres) => {
                // Backend TLS only: decline the client's SSLRequest so it starts up in
                // plaintext, which the portal then encrypts.
                let stream = self
                    .deadline(postgres::accept(client, None, false, false))
                    .await?;
                Ok(Accepted {
                    state: State::Ready(stream),
                })
            }
            (TlsMode::Disabled, Engine::Mysql) => Ok(Accepted {
                state: State::Mysql(client, None),
            }),
            (TlsMode::Disabled, _) => plain(client),
            (TlsMode::Terminate, Engine::Mysql) => Ok(Accepted {
                state: State::Mysql(client, Some(self.served()?)),
            }),
            (TlsMode::Terminate, Engine::Postgres) => {
                let config = self.served()?;
                let stream = self
                    .deadline(postgres::accept(
                        client,
                        Some(&config),
                        true,
                        self.own_records,
                    ))
                    .await?;
                Ok(Accepted {
                    state: State::Ready(stream),
                })
            }
            (TlsMode::Terminate, Engine::Redis | Engine::Etcd | Engine::Tcp) => {
                let config = self.served()?;
                let tls = self
                    .deadline(async {
                        tokio_rustls::TlsAcceptor::from(config)
                            .accept(client)
                            .await
                            .map_err(|e| TlsError::Handshake(e.to_string()))
                    })
                    .await?;
                Ok(Accepted {
                    state: State::Ready(MaybeTls::Tls(Box::new(tls.into()))),
                })
            }
        }
    }

    /// Phase two, on an open backend connection: MySQL's in-protocol upgrade and TLS to the
    /// backend, within the handshake deadline. `backend_host` is the host of the node's
    /// address, the name verified in its certificate unless `serverName` is set.
    pub async fn connect<C, B>(
        &self,
        accepted: Accepted<C>,
        mut backend: B,
        backend_host: &str,
    ) -> Result<Established<C, B>, TlsError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let backend_tls = match &self.backend {
            Some(connector) => Some((connector, connector.server_name_for(backend_host)?)),
            None => None,
        };
        match accepted.state {
            State::Mysql(client, config) => {
                let (client, backend) = self
                    .deadline(mysql::negotiate(
                        client,
                        backend,
                        config.as_ref(),
                        backend_tls,
                    ))
                    .await?;
                Ok(Established { client, backend })
            }
            State::Ready(mut client) => {
                let Some((connector, name)) = backend_tls else {
                    return Ok(Established {
                        client,
                        backend: MaybeTls::Plain(backend),
                    });
                };
                // etcd serves gRPC (h2) and HTTP/1.1 on one port and picks by ALPN: offer the
                // backend what the client chose.
                let alpn = match self.engine {
                    Engine::Etcd | Engine::Tcp => client.alpn().map(<[u8]>::to_vec),
                    _ => None,
                };
                let engine = self.engine;
                let mut backend = self
                    .deadline(async move {
                        if engine == Engine::Postgres {
                            postgres::ssl_request(&mut backend).await?;
                        }
                        connector.handshake(backend, name, alpn.as_deref()).await
                    })
                    .await?;
                if engine == Engine::Postgres {
                    // SCRAM channel binding cannot cross the re-encryption (see `pg_sasl`).
                    let client_tls = client.is_tls();
                    self.deadline(pg_sasl::relay_startup(
                        &mut client,
                        &mut backend,
                        client_tls,
                    ))
                    .await?;
                }
                Ok(Established { client, backend })
            }
        }
    }

    /// Both phases at once, for callers that already hold the backend connection.
    pub async fn establish<C, B>(
        &self,
        client: C,
        backend: B,
        backend_host: &str,
    ) -> Result<Established<C, B>, TlsError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let accepted = self.accept(client).await?;
        self.connect(accepted, backend, backend_host).await
    }

    async fn deadline<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, TlsError>>,
    ) -> Result<T, TlsError> {
        tokio::time::timeout(self.handshake_timeout, work)
            .await
            .unwrap_or(Err(TlsError::HandshakeTimeout(self.handshake_timeout)))
    }
}

/// The part of a session's negotiation that needs the backend connection: the data plane
/// calls [`finish`](Negotiation::finish) once it has connected, and pumps the streams it gets.
/// [`Untouched`] costs nothing, so the plain-TCP path keeps its raw sockets.
pub trait Negotiation<S>: Send + Sized {
    type Client: AsyncRead + AsyncWrite + Unpin + Send;
    type Server: AsyncRead + AsyncWrite + Unpin + Send;
    /// Whether `finish` talks to the backend (then anything that must precede the engine's
    /// own bytes, such as a PROXY header, is written before it).
    const NEGOTIATES: bool;

    fn finish(
        self,
        server: S,
        backend_host: String,
    ) -> impl std::future::Future<Output = Result<(Self::Client, Self::Server), TlsError>> + Send;
}

/// No TLS and no engine negotiation: the streams as they are.
#[derive(Debug)]
pub struct Untouched<C>(pub C);

impl<C, S> Negotiation<S> for Untouched<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    type Client = C;
    type Server = S;
    const NEGOTIATES: bool = false;

    async fn finish(self, server: S, _backend_host: String) -> Result<(C, S), TlsError> {
        Ok((self.0, server))
    }
}

/// A client past [`Terminator::accept`], waiting for its backend.
pub struct Pending<C> {
    pub terminator: Arc<Terminator>,
    pub accepted: Accepted<C>,
}

impl<C, S> Negotiation<S> for Pending<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    type Client = MaybeTls<Rewind<C>>;
    type Server = MaybeTls<S>;
    const NEGOTIATES: bool = true;

    async fn finish(
        self,
        server: S,
        backend_host: String,
    ) -> Result<(Self::Client, Self::Server), TlsError> {
        let Established { client, backend } = self
            .terminator
            .connect(self.accepted, server, &backend_host)
            .await?;
        Ok((client, backend))
    }
}
