//! PostgreSQL pooling (`pooling.mode: transaction | session`): the portal is the server to
//! its clients. One future per client (on its thread's executor, [`crate::exec`]) answers
//! the startup and the SCRAM-SHA-256 exchange itself, then takes a server connection of the
//! pool of its backend, database and user for each transaction (transaction mode: from the
//! first message to the ReadyForQuery with status `I` that ends it, held through blocks, COPY
//! and an extended-protocol sequence until its Sync) or for the whole session (session mode),
//! and replays the reported parameters (client_encoding, DateStyle, TimeZone,
//! application_name, …) on a server connection whose values differ from the client's.
//!
//! When the leader changes, the old leader's pools are retired: a client whose transaction was
//! in flight there gets an ErrorResponse, a client idle between transactions notices nothing
//! and its next transaction goes to the new leader.
//!
//! - [`login`]: the startup packet and the login, with [`auth`] (the client's authentication:
//!   SCRAM, md5, `auth.query`) on [`scram`] (pure, both sides of SCRAM);
//! - [`machine`]: the client's decisions (pure): what to forward, what the portal answers,
//!   when to take a server connection and give it back; [`frontend`]: reading the client's
//!   messages into it; [`backend`]: reading the server's, for the connection the client
//!   [`held`]s;
//! - [`cancel`]: the clients' keys and their CancelRequests, also through a peer portal;
//! - [`conn`]: one server connection, dialled and logged in with a [`secret::Login`];
//!   [`secret`]: the forms of a password (pure);
//! - [`acquire`]: taking a server connection for a transaction and giving it back;
//! - [`server`]: one pool, its queue and the retiring of it; [`pools`]: the portal's pools,
//!   with the clients' cancel keys; [`stats`]: the counters;
//!   [`report`]: the `/metrics` families and the `/status` part;
//! - [`statements`] and [`pinning`]: what the portal reads of the client's SQL, after the
//!   first look of [`sql`].
//!
//! The client task is one type, `Client`, whose methods are split by job over `mod.rs`,
//! `login.rs`, `auth.rs`, `acquire.rs`, `frontend.rs` and `backend.rs`; those call each other
//! as one impl does. Every other file imports only files below it: `secret` and `scram`,
//! `conn`, `server`, `pools`, `cancel`, with `machine` (on `inflight`), `held`, `stats`,
//! `statements` and `pinning` beside.
//!
//! May import: `admission` (the permits it is handed), `config`, `health`, `metrics`,
//! `splice` (the server connections' socket), `tls`, `wire` and the session's
//! [`Shared`](super::Shared), [`Admitted`](super::Admitted) and [`hub`](super::hub).

mod acquire;
mod auth;
mod backend;
mod cancel;
mod conn;
mod frontend;
mod held;
mod inflight;
mod login;
mod machine;
pub mod pinning;
mod pools;
mod report;
pub mod scram;
mod secret;
pub mod server;
mod spare;
mod sql;
pub mod statements;
mod stats;

use std::{
    future::Future,
    io,
    net::IpAddr,
    sync::{atomic::Ordering::Relaxed, Arc},
    task::Poll,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::{timeout, Duration, Instant},
};
use tracing::{debug, warn};

use conn::{DialContext, Params, Startup};
pub use pinning::REPLAYED;
pub use pools::PgHub;
pub use report::{status, PoolCollector};
use server::Pool;
pub use stats::{PoolStats, WAIT_BUCKETS};

use super::{
    registry::{self, Registration},
    Admitted, SessionPermits, Shared,
};
use crate::{
    admission::NegotiationPermit,
    config::{Config, PgPool},
    health::{CredentialsSource, StandaloneCredentials},
    metrics::CloseReason,
    wire::postgres::{error_response, frame, HEADER_LEN},
};

/// The largest authentication message read from a client.
const MAX_AUTH_MESSAGE: usize = 8 << 10;

/// Serves one admitted PostgreSQL client whose TLS (if any) is already negotiated, until it
/// leaves or is closed.
pub fn serve<C>(admitted: Admitted<C>, shared: Shared) -> impl Future<Output = ()>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Taken apart here, not in the task: an idle client's future keeps only what it uses.
    let Admitted {
        stream,
        peer,
        permits,
        negotiating,
        config,
        ..
    } = admitted;
    client_task(
        stream,
        peer.client.ip(),
        permits,
        negotiating,
        config,
        shared,
    )
}

async fn client_task<C>(
    stream: C,
    ip: IpAddr,
    permits: SessionPermits,
    negotiating: NegotiationPermit,
    config: Arc<Config>,
    shared: Shared,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(settings) = config.plane.pg_pool().cloned() else {
        return;
    };
    let hub = shared.pg.clone();
    hub.watch(shared.config.clone(), shared.health.clone());
    let credentials: Arc<dyn CredentialsSource> = match &shared.checker {
        Some(c) => c.credentials(),
        None => Arc::new(StandaloneCredentials),
    };
    let connector = shared.tls.terminator().and_then(|t| t.backend().cloned());
    let metrics = shared.state.metrics.clone();
    metrics.sessions.fetch_add(1, Relaxed);
    metrics.active_sessions.fetch_add(1, Relaxed);
    let waker = std::future::poll_fn(|cx| std::task::Poll::Ready(cx.waker().clone())).await;
    let machine = Machine::new(settings.transaction, settings.max_prepared_statements);
    let mut c = Client {
        io: stream,
        waker,
        cin: Vec::new(),
        ip,
        settings,
        ctx: DialContext {
            config: config.clone(),
            connector,
        },
        config: config.clone(),
        shared,
        hub: hub.clone(),
        credentials,
        user: String::new(),
        database: String::new(),
        startup: Startup::from([]),
        login: Arc::default(),
        params: Params::default(),
        pool: None,
        held: None,
        machine,
        cancel: None,
        registration: None,
        reported: 0,
    };
    let started = Box::pin(c.startup()).await;
    drop(negotiating);
    let reason = match started {
        Ok(true) => {
            let reason = match c.shared.sessions.register_client(&c.shared, ip) {
                Ok(registration) => {
                    if let Some(h) = &c.held {
                        registration.on_backend(Some(&h.pool.backend.name));
                        c.reported = h.pool.id;
                    }
                    c.registration = Some(registration);
                    c.session().await
                }
                // A change published during the login already excludes the client.
                Err(reason) => reason,
            };
            Box::pin(c.end()).await;
            reason
        }
        Ok(false) => CloseReason::Done,
        Err(reason) => reason,
    };
    // An orderly end of a TLS client's connection says so (close_notify); after a refused
    // record this sends the alert if it is still unsent. Bounded: the client may not read.
    let _ = timeout(CLOSE_GRACE, c.io.shutdown()).await;
    metrics.closed(reason);
    metrics.active_sessions.fetch_sub(1, Relaxed);
    drop(permits);
    debug!(reason = reason.as_str(), "client closed");
}

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// A logged-in, registered client's session, until it leaves or is closed.
    async fn session(&mut self) -> CloseReason {
        self.hub.stats.clients.fetch_add(1, Relaxed);
        let reason = self.run().await;
        self.hub.stats.clients.fetch_sub(1, Relaxed);
        reason
    }

    /// After a logged-in client: its server connection given back or closed, its cancel key
    /// forgotten, its pin uncounted.
    async fn end(&mut self) {
        self.finish().await;
        if let Some((key, _)) = &self.cancel {
            self.hub.forget_cancel(*key);
        }
        if let Some(reason) = self.machine.pinned() {
            self.hub.stats.pin(reason, -1);
        }
    }
}

/// How long the end of a session waits for the client to take its close_notify or alert.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why reading from the client failed: a TLS record the portal refused (counted and logged
/// apart, a possible attack), or the client going away.
fn read_failure(e: &io::Error, ip: IpAddr) -> CloseReason {
    match crate::tls::record_error(e) {
        Some(refused) if refused.sent => {
            warn!(client = %ip, error = %refused, "TLS record refused; connection closed");
            CloseReason::TlsRecord
        }
        _ => CloseReason::Done,
    }
}

struct Client<C> {
    /// The client's connection, read and written by this task alone (no split halves and
    /// their lock).
    io: C,
    /// The task's waker: a pool wakes the holders of its connections when it is retired.
    waker: std::task::Waker,
    cin: Vec<u8>,
    ip: IpAddr,
    settings: PgPool,
    ctx: DialContext,
    config: Arc<Config>,
    shared: Shared,
    hub: Arc<PgHub>,
    credentials: Arc<dyn CredentialsSource>,
    user: String,
    database: String,
    /// The startup parameters its server connections are opened with: those the portal does
    /// not replay (`options` and any other setting; see `login::split_startup`).
    startup: Startup,
    /// What the client's server connections log in with (its authentication's outcome).
    login: Arc<secret::Login>,
    /// The client's view of the reported parameters (what it was told with ParameterStatus).
    params: Params,
    /// The pool of the backend the client's transactions go to now.
    pool: Option<Arc<Pool>>,
    held: Option<Held>,
    /// The client's decisions: what is in flight, its statements, whether it is pinned.
    machine: Machine,
    /// The key given to the client, and where a cancel with it goes now.
    cancel: Option<((u32, u32), Arc<CancelSlot>)>,
    /// The client's place in the session registry, once logged in.
    registration: Option<Registration>,
    /// The pool whose backend the registry was told of last ([`Pool::id`]; 0: none).
    reported: u64,
}

use backend::{poll_server, ServerEvent};
use held::Held;
use machine::Machine;
pub use pools::CancelSlot;

/// What woke a client's session loop.
enum Event {
    Closed(CloseReason),
    Server(ServerEvent),
    Client(io::Result<usize>),
    Idle,
}

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn send(&mut self, bytes: &[u8]) -> Result<(), CloseReason> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|_| CloseReason::Error)?;
        self.shared.state.metrics.add_bytes(
            crate::metrics::Direction::BackendToClient,
            bytes.len() as u64,
        );
        Ok(())
    }

    /// Sends a FATAL ErrorResponse and ends the session.
    async fn fatal(&mut self, sqlstate: &str, text: &str) -> CloseReason {
        let _ = self.send(&error_response("FATAL", sqlstate, text)).await;
        let _ = self.io.flush().await;
        let _ = self.io.shutdown().await;
        CloseReason::Error
    }

    /// Reads one typed message of at most `max` bytes from the client (during startup).
    async fn read_message(&mut self, max: usize) -> Result<(u8, Vec<u8>), CloseReason> {
        loop {
            match frame(&self.cin, max) {
                Ok(Some(n)) => {
                    let tag = self.cin[0];
                    let body = self.cin[HEADER_LEN..n].to_vec();
                    self.cin.drain(..n);
                    return Ok((tag, body));
                }
                Ok(None) => {
                    let read = self.io.read_buf(&mut self.cin).await;
                    if read.map_err(|e| match read_failure(&e, self.ip) {
                        CloseReason::Done => CloseReason::Error,
                        refused => refused,
                    })? == 0
                    {
                        return Err(CloseReason::Done);
                    }
                }
                Err(e) => return Err(self.fatal("08P01", &format!("invalid message: {e}")).await),
            }
        }
    }

    async fn run(&mut self) -> CloseReason {
        let metrics = self.shared.state.metrics.clone();
        let idle_timeout = self.config.timeouts.client;
        let mut last_read = Instant::now();
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        // Whether the idle timer's waker is registered for its deadline: it is polled again
        // only once that deadline is past, not at every turn.
        let mut idle_armed = false;
        // Allow-list re-checks, `POST /sessions/close`, the drain and the shutdown reach the
        // client here (the registry closes every session on shutdown).
        let signal = self.registration.as_ref().map(Registration::signal);
        let closed = registry::closed(signal.as_ref());
        tokio::pin!(closed);
        loop {
            if let Err(reason) = self.process().await {
                return reason;
            }
            // No input buffer while idle (most pooled clients are): what the client sends is read
            // onto `cin` ([`crate::tls::poll_read_onto_or`]), which takes one when bytes come.
            spare::give_if_empty(&mut self.cin);
            let (held, io, cin) = (&mut self.held, &mut self.io, &mut self.cin);
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(why) = closed.as_mut().poll(cx) {
                    return Poll::Ready(Event::Closed(why));
                }
                if let Poll::Ready(ev) = poll_server(held.as_mut(), cx) {
                    return Poll::Ready(Event::Server(ev));
                }
                if let Poll::Ready(r) = crate::tls::poll_read_onto_or(io, cx, cin, spare::bytes) {
                    return Poll::Ready(Event::Client(r));
                }
                if !idle_armed || Instant::now() >= idle.deadline() {
                    idle_armed = true;
                    if idle.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Idle);
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Closed(why) => {
                    debug!(reason = why.as_str(), "pooled client closed by the portal");
                    return why;
                }
                Event::Server(ev) => {
                    let r = match ev {
                        ServerEvent::Data(Ok(n)) if n > 0 => self.server_data().await,
                        ServerEvent::Data(_) => {
                            self.server_lost("the server connection was closed").await
                        }
                        ServerEvent::Retired => {
                            self.server_lost("the backend stopped leading (failover)")
                                .await
                        }
                    };
                    if let Err(reason) = r {
                        return reason;
                    }
                }
                Event::Client(Ok(0)) => return CloseReason::Done,
                Event::Client(Err(e)) => return read_failure(&e, self.ip),
                Event::Client(Ok(n)) => {
                    metrics.add_bytes(crate::metrics::Direction::ClientToBackend, n as u64);
                    last_read = Instant::now();
                }
                Event::Idle => {
                    let next = last_read + idle_timeout;
                    if next <= Instant::now() {
                        return CloseReason::ClientTimeout;
                    }
                    idle.as_mut().reset(next);
                    idle_armed = false;
                }
            }
        }
    }

    /// At the end of the session: the held connection goes back, reset with DISCARD ALL in
    /// session mode (and after a pinned transaction-mode client); one left mid-transaction,
    /// or with state DISCARD ALL does not undo (a library loaded, a temporary schema made:
    /// [`conn::LEFTOVERS`]), is closed, so the next client finds a session as a new one.
    async fn finish(&mut self) {
        let Some(h) = &mut self.held else { return };
        let clean = self.machine.is_clean() && h.conn.buffers.read.is_empty() && h.skip == 0;
        if clean && self.machine.keeps_connection() {
            let deadline = self.config.timeouts.server;
            let ok = h.conn.run("DISCARD ALL", deadline).await.is_ok()
                && h.conn.is_as_new(deadline).await;
            h.conn.statements.clear();
            self.release(!ok);
        } else {
            self.release(!clean);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::{TcpListener, TcpStream};

    use crate::splice::Tcp;

    /// Thousands of idle clients share a few maps of reported parameters: a client's copy is
    /// made only when one of its values differs from the server connection's.
    #[test]
    fn reported_parameters_are_shared_until_a_value_differs() {
        let server: super::Params = Arc::new([("TimeZone".into(), "UTC".into())].into());
        let mut client = server.clone();
        super::conn::set_param(&mut client, "TimeZone".into(), "UTC".into());
        assert!(Arc::ptr_eq(&server, &client));
        super::conn::set_param(&mut client, "TimeZone".into(), "Europe/Paris".into());
        assert!(!Arc::ptr_eq(&server, &client));
        assert_eq!(server["TimeZone"], "UTC");
        assert_eq!(client["TimeZone"], "Europe/Paris");
    }

    /// Equal parameter maps held apart become one at their first comparison; different ones
    /// stay apart.
    #[test]
    fn equal_parameters_come_to_share_one_map() {
        let map = |tz: &str| -> super::Params { Arc::new([("TimeZone".into(), tz.into())].into()) };
        let (mut a, mut b, mut c) = (map("UTC"), map("UTC"), map("Europe/Paris"));
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(super::conn::same_params(&mut a, &mut b));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!super::conn::same_params(&mut a, &mut c));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c["TimeZone"], "Europe/Paris");
    }

    /// A pooled client's task is allocated for as long as the client stays, idle or not: the
    /// rare, deep steps (startup, authentication, dialling a server connection) are boxed so
    /// that their state does not widen every idle client's task.
    #[tokio::test]
    async fn a_pooled_clients_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let yaml = "engine: postgres\ntls: {mode: disabled}\nbackends: [{name: a, address: \"127.0.0.1:1\"}]\npooling: {mode: transaction, auth: {usersFile: /nonexistent}}\n";
        let config = Arc::new(crate::config::parse_yaml(yaml).unwrap().validate().unwrap());
        let (shared, _drivers) = crate::session::testing::shared(config.clone());
        let state = shared.state.clone();
        let permits = (
            state.try_connection(10).unwrap(),
            state.try_client(peer.ip(), 0).unwrap(),
        );
        let admitted = crate::session::Admitted {
            stream: Tcp::new(server),
            peer: crate::session::Peer {
                client: peer,
                local: None,
            },
            early: Vec::new(),
            permits,
            negotiating: state.try_negotiating(10).unwrap(),
            config,
            generation: 1,
        };
        let task = super::serve(admitted, shared);
        let size = std::mem::size_of_val(&task);
        println!("pooled client task future: {size} bytes");
        assert!(
            size <= 3_000,
            "a pooled client's future grew to {size} bytes"
        );
    }
}
