//! PostgreSQL pooling (`pooling.mode: transaction | session`): the portal is the server to
//! its clients. One task per client answers the startup and the SCRAM-SHA-256 exchange
//! itself, then takes a server connection of the pool of its backend, database and user for
//! each transaction (transaction mode: from the first message to the ReadyForQuery with
//! status `I` that ends it, held through blocks, COPY and an extended-protocol sequence until
//! its Sync) or for the whole session (session mode), and replays the reported parameters
//! (client_encoding, DateStyle, TimeZone, application_name, …) on a server connection whose
//! values differ from the client's.
//!
//! When the leader changes, the old leader's pools are retired: a client whose transaction was
//! in flight there gets an ErrorResponse, a client idle between transactions notices nothing
//! and its next transaction goes to the new leader.
//!
//! - [`scram`]: the server side of SCRAM-SHA-256 (pure);
//! - [`server`]: server connections, pools, the queue, the retiring of pools, the counters;
//! - [`report`]: the `/metrics` families and the `/status` part.
//!
//! May import: `admission`, `config`, `health`, `metrics`, `route`, `tls`, `wire` and the
//! session's [`Shared`](super::Shared).

mod auth;
mod cancel;
pub mod pinning;
mod report;
pub mod scram;
pub mod server;
pub mod statements;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf},
    sync::watch,
    time::{timeout, Instant},
};
use tracing::{debug, info};

pub use report::{status, PoolCollector};
use server::{lock, CheckoutError, DialContext, Pool, ServerConn};
pub use server::{PgHub, PoolStats, WAIT_BUCKETS};
use statements::{Definition, Special};

use super::Shared;
use crate::{
    admission::{ClientPermit, ConnectionPermit, NegotiationPermit},
    config::{Config, PgPool},
    health::{CredentialsSource, StandaloneCredentials},
    metrics::CloseReason,
    route,
    wire::postgres::{
        backend_key_data, error_response, frame, is_protocol_3, message, message_len,
        parameter_status, parse_key, parse_parameter_status, ready_for_query, startup_header,
        startup_params, ReadyStatus, CANCEL_REQUEST, CANCEL_REQUEST_LEN, HEADER_LEN, MAX_MESSAGE,
        MAX_STARTUP, PROTOCOL_3_0,
    },
};

/// The reported parameters the portal replays with SET on a server connection whose value
/// differs from the client's (the others, such as server_version, are the server's own).
pub const REPLAYED: [&str; 7] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "search_path",
];

/// Startup parameters a client may send besides user and database: the replayed ones, and
/// libpq's fallback_application_name.
fn startup_parameter(name: &str) -> Option<&'static str> {
    if name == "fallback_application_name" {
        return Some("application_name");
    }
    REPLAYED
        .iter()
        .copied()
        .find(|r| r.eq_ignore_ascii_case(name))
}

/// The query text of a statement's definition.
fn def_query(def: &[u8]) -> &[u8] {
    crate::wire::postgres::cstr(def).map_or(def, |(q, _)| q)
}

/// The largest authentication message read from a client.
const MAX_AUTH_MESSAGE: usize = 8 << 10;

/// Serves one admitted PostgreSQL client whose TLS (if any) is already negotiated, until it
/// leaves or is closed.
pub async fn serve<C>(
    client: C,
    ip: IpAddr,
    permits: (ConnectionPermit, ClientPermit),
    negotiating: NegotiationPermit,
    config: Arc<Config>,
    shared: Shared,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(settings) = config.pg_pool.clone() else {
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
    let (rd, wr) = tokio::io::split(client);
    let mut c = Client {
        rd,
        wr,
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
        login: Arc::default(),
        params: BTreeMap::new(),
        pool: None,
        held: None,
        discard_until_sync: false,
        lost_transaction: false,
        statements: HashMap::new(),
        pinned: None,
        cancel: None,
    };
    let started = timeout(config.timeouts.handshake, c.startup()).await;
    drop(negotiating);
    let reason = match started {
        Ok(Ok(true)) => {
            hub.stats.clients.fetch_add(1, Relaxed);
            let reason = c.run().await;
            c.finish().await;
            if let Some((key, _)) = &c.cancel {
                hub.forget_cancel(*key);
            }
            if let Some(reason) = c.pinned {
                hub.stats.pin(reason, -1);
            }
            hub.stats.clients.fetch_sub(1, Relaxed);
            reason
        }
        Ok(Ok(false)) => CloseReason::Done,
        Ok(Err(reason)) => reason,
        Err(_) => {
            debug!("closed: no startup and authentication within timeouts.handshake");
            CloseReason::ClientTimeout
        }
    };
    metrics.closed(reason);
    metrics.active_sessions.fetch_sub(1, Relaxed);
    drop(permits);
    debug!(reason = reason.as_str(), "client closed");
}

/// A server connection a client holds, with what is in flight on it.
struct Held {
    conn: ServerConn,
    pool: Arc<Pool>,
    retired: watch::Receiver<bool>,
    /// Server bytes not yet forwarded.
    sbuf: Vec<u8>,
    /// Bytes of a server message being forwarded without inspection.
    skip: usize,
    /// What the client waits for, in order.
    expect: VecDeque<Expect>,
    status: ReadyStatus,
}

/// What a client waits for from its server connection, in order.
enum Expect {
    /// The response to a message sent to the server (`tag`): a Query or FunctionCall ends at
    /// ReadyForQuery, as a Sync does; an extended-protocol message at its own completion
    /// message or an error. `swallow`: the portal's own (a re-prepare, an LRU close), not
    /// forwarded unless it fails. `forget`: a Parse whose failure means the server lacks
    /// the statement.
    Server {
        tag: u8,
        swallow: bool,
        forget: Option<Definition>,
    },
    /// An answer of the portal's own, due once everything before it is answered.
    Local(Vec<u8>),
}

impl Held {
    /// Queries, Syncs and FunctionCalls whose ReadyForQuery has not come.
    fn pending(&self) -> usize {
        self.expect
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Expect::Server {
                        tag: b'Q' | b'F' | b'S',
                        ..
                    }
                )
            })
            .count()
    }

    /// Extended-protocol messages sent since the last Sync.
    fn extended(&self) -> bool {
        self.expect
            .iter()
            .rev()
            .find_map(|e| match e {
                Expect::Server { tag, .. } => Some(!matches!(tag, b'Q' | b'F' | b'S')),
                Expect::Local(_) => None,
            })
            .unwrap_or(false)
    }

    fn waits_for_server(&self) -> bool {
        self.expect
            .iter()
            .any(|e| matches!(e, Expect::Server { .. }))
    }

    /// Whether `tag` from the server completes the response to `front`.
    fn completes(front: u8, tag: u8) -> bool {
        match front {
            b'Q' | b'F' | b'S' => tag == b'Z',
            b'P' => tag == b'1',
            b'B' => tag == b'2',
            b'C' => tag == b'3',
            b'D' => matches!(tag, b'T' | b'n'),
            b'E' => matches!(tag, b'C' | b'I' | b's'),
            _ => false,
        }
    }
}

/// The Local answers now due (at the front of `expect`), moved to `out`.
fn due_locals(expect: &mut VecDeque<Expect>, out: &mut Vec<u8>) {
    while let Some(Expect::Local(_)) = expect.front() {
        if let Some(Expect::Local(bytes)) = expect.pop_front() {
            out.extend_from_slice(&bytes);
        }
    }
}

struct Client<C> {
    rd: ReadHalf<C>,
    wr: WriteHalf<C>,
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
    /// What the client's server connections log in with (its authentication's outcome).
    login: Arc<auth::Login>,
    /// The client's view of the reported parameters (what it was told with ParameterStatus).
    params: BTreeMap<String, String>,
    /// The pool of the backend the client's transactions go to now.
    pool: Option<Arc<Pool>>,
    held: Option<Held>,
    /// After an error the portal made up in an extended-protocol sequence: skip to Sync.
    discard_until_sync: bool,
    /// The client's open transaction block was lost with its server connection (failover):
    /// its next message gets an error, then it starts afresh.
    lost_transaction: bool,
    /// The client's named prepared statements.
    statements: HashMap<Vec<u8>, Definition>,
    /// Session state keeps the client on its server connection until it disconnects.
    pinned: Option<pinning::PinReason>,
    /// The key given to the client, and where a cancel with it goes now.
    cancel: Option<((u32, u32), Arc<CancelSlot>)>,
}

pub use cancel::CancelSlot;

enum ServerEvent {
    Data(std::io::Result<usize>),
    Retired,
}

async fn server_event(held: Option<&mut Held>) -> ServerEvent {
    let Some(h) = held else {
        return std::future::pending().await;
    };
    if h.sbuf.capacity() - h.sbuf.len() < 4096 {
        h.sbuf.reserve(16 << 10);
    }
    tokio::select! {
        r = h.conn.stream.read_buf(&mut h.sbuf) => ServerEvent::Data(r),
        _ = h.retired.wait_for(|r| *r) => ServerEvent::Retired,
    }
}

/// `SET name TO 'value'` statements that give a server connection the client's values.
fn replay_sql(client: &BTreeMap<String, String>, server: &BTreeMap<String, String>) -> String {
    let backslashes = server
        .get("standard_conforming_strings")
        .is_some_and(|v| v == "off");
    let mut sql = String::new();
    for name in REPLAYED {
        let Some(want) = client.get(name) else {
            continue;
        };
        if server.get(name) == Some(want) {
            continue;
        }
        let mut value = want.replace('\'', "''");
        if backslashes {
            value = value.replace('\\', "\\\\");
        }
        sql.push_str(&format!("SET {name} TO '{value}';"));
    }
    sql
}

fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    let _ = ring::rand::SystemRandom::new().fill(&mut out);
    out
}

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn send(&mut self, bytes: &[u8]) -> Result<(), CloseReason> {
        self.wr
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
        let _ = self.wr.flush().await;
        let _ = self.wr.shutdown().await;
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
                    if self
                        .rd
                        .read_buf(&mut self.cin)
                        .await
                        .map_err(|_| CloseReason::Error)?
                        == 0
                    {
                        return Err(CloseReason::Done);
                    }
                }
                Err(e) => return Err(self.fatal("08P01", &format!("invalid message: {e}")).await),
            }
        }
    }

    /// Startup and authentication. `Ok(true)`: logged in; `Ok(false)`: a CancelRequest was
    /// served.
    async fn startup(&mut self) -> Result<bool, CloseReason> {
        let mut header = [0u8; 8];
        self.rd
            .read_exact(&mut header)
            .await
            .map_err(|_| CloseReason::Error)?;
        let (len, code) = startup_header(&header);
        if (len, code) == (CANCEL_REQUEST_LEN, CANCEL_REQUEST) {
            let mut key = [0u8; 8];
            self.rd
                .read_exact(&mut key)
                .await
                .map_err(|_| CloseReason::Error)?;
            if let Some(key) = parse_key(&key) {
                self.hub.cancel(key, &self.ctx).await;
            }
            return Ok(false);
        }
        if !is_protocol_3(code) || !(8..=MAX_STARTUP).contains(&len) {
            self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
            return Err(self
                .fatal(
                    "08P01",
                    &format!("unsupported startup packet (length {len}, code {code})"),
                )
                .await);
        }
        let mut body = vec![0u8; len as usize - 8];
        self.rd
            .read_exact(&mut body)
            .await
            .map_err(|_| CloseReason::Error)?;
        let params = match startup_params(&body) {
            Ok(p) => p,
            Err(e) => {
                self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
                return Err(self.fatal("08P01", &e.to_string()).await);
            }
        };
        let mut wanted = BTreeMap::new();
        let mut unknown_options = Vec::new();
        for (name, value) in params {
            match name.as_str() {
                "user" => self.user = value,
                "database" => self.database = value,
                "replication" if value != "false" && value != "0" && value != "off" => {
                    return Err(self
                        .fatal("08P01", "replication connections are not pooled: connect to the database directly")
                        .await)
                }
                "replication" => {}
                "options" if value.trim().is_empty() => {}
                "options" => {
                    return Err(self
                        .fatal("0A000", "startup options (the options parameter, PGOPTIONS) cannot be kept across pooled server connections: set them with SET, or in the database or role settings")
                        .await)
                }
                n if n.starts_with("_pq_.") => unknown_options.push(name),
                n => match startup_parameter(n) {
                    Some(key) => {
                        if key != "application_name" || n != "fallback_application_name" || !wanted.contains_key(key) {
                            wanted.insert(key.to_string(), value);
                        }
                    }
                    None => {
                        return Err(self
                            .fatal("08P01", &format!("unsupported startup parameter: {name} (the pooling portal keeps only {})", REPLAYED.join(", ")))
                            .await)
                    }
                },
            }
        }
        if self.user.is_empty() {
            return Err(self
                .fatal(
                    "28000",
                    "no PostgreSQL user name specified in startup packet",
                )
                .await);
        }
        if self.database.is_empty() {
            self.database = self.user.clone();
        }
        tracing::Span::current().record("user", tracing::field::display(&self.user));
        if code != PROTOCOL_3_0 || !unknown_options.is_empty() {
            // NegotiateProtocolVersion: the portal speaks 3.0 and no protocol options.
            let mut b = 0u32.to_be_bytes().to_vec();
            b.extend_from_slice(&(unknown_options.len() as u32).to_be_bytes());
            for o in &unknown_options {
                b.extend_from_slice(o.as_bytes());
                b.push(0);
            }
            let m = message(b'v', &b);
            self.send(&m).await?;
        }
        self.authenticate().await?;
        self.login(wanted).await?;
        Ok(true)
    }

    /// After authentication: a first server connection, to learn the server's parameters
    /// and apply the client's startup ones (a value the server refuses fails the login), then
    /// ParameterStatus, BackendKeyData and ReadyForQuery.
    async fn login(&mut self, wanted: BTreeMap<String, String>) -> Result<(), CloseReason> {
        let mut conn = match self.acquire_conn().await {
            Ok(c) => c,
            Err((sqlstate, text)) => return Err(self.fatal(sqlstate, &text).await),
        };
        let mut sql = String::new();
        for (name, value) in &wanted {
            if conn.params.get(name) != Some(value) {
                sql.push_str(&format!("SET {name} TO '{}';", value.replace('\'', "''")));
            }
        }
        if !sql.is_empty() {
            if let Err(e) = conn.run(&sql, self.config.timeouts.server).await {
                self.give_back(conn);
                return Err(self
                    .fatal("22023", &format!("invalid startup parameter: {e}"))
                    .await);
            }
        }
        self.params = conn.params.clone();
        let pool = self.pool.clone().expect("acquired");
        let mut out = Vec::with_capacity(512);
        for (k, v) in &self.params {
            out.extend_from_slice(&parameter_status(k, v));
        }
        let (pid, secret) = self.hub.new_key(&self.config);
        let slot = Arc::new(CancelSlot::default());
        self.hub.register_cancel((pid, secret), slot.clone());
        self.cancel = Some(((pid, secret), slot));
        out.extend_from_slice(&backend_key_data(pid, secret));
        out.extend_from_slice(&ready_for_query(ReadyStatus::Idle));
        if self.settings.transaction {
            self.give_back(conn);
        } else {
            self.hold(conn, pool);
        }
        self.send(&out).await?;
        Ok(())
    }

    fn hold(&mut self, conn: ServerConn, pool: Arc<Pool>) {
        if let Some((_, slot)) = &self.cancel {
            *lock(slot) = Some((pool.backend.clone(), conn.key));
        }
        self.hub.stats.active.fetch_add(1, Relaxed);
        pool.active.fetch_add(1, Relaxed);
        self.held = Some(Held {
            conn,
            retired: pool.retired(),
            pool,
            sbuf: Vec::new(),
            skip: 0,
            expect: VecDeque::new(),
            status: ReadyStatus::Idle,
        });
    }

    /// Returns a connection that is not held to its pool.
    fn give_back(&mut self, conn: ServerConn) {
        if let Some(pool) = &self.pool {
            pool.checkin(conn, self.settings.server_lifetime);
        }
    }

    /// Lets go of the held connection (to its pool, or closed when `broken`).
    fn release(&mut self, broken: bool) {
        if let Some(mut h) = self.held.take() {
            if let Some((_, slot)) = &self.cancel {
                *lock(slot) = None;
            }
            self.hub.stats.active.fetch_sub(1, Relaxed);
            h.pool.active.fetch_sub(1, Relaxed);
            h.conn.broken |= broken || !h.sbuf.is_empty() || h.skip > 0;
            h.pool.checkin(h.conn, self.settings.server_lifetime);
        }
    }

    /// The pool to use now: the current one while its backend takes transactions, else the
    /// routing mode's first choice, waiting up to `timeouts.connect` for one (a failover).
    async fn target(&mut self) -> Result<Arc<Pool>, (&'static str, String)> {
        if let Some(p) = &self.pool {
            if !p.is_retired() {
                return Ok(p.clone());
            }
        }
        self.pool = None;
        let backend = self.choose().await?;
        let pool = self
            .hub
            .pool(&backend, &self.database, &self.user, &self.login, &self.ctx);
        self.pool = Some(pool.clone());
        Ok(pool)
    }

    /// The backend the routing mode chooses now, waiting up to `timeouts.connect` for one (a
    /// failover).
    async fn choose(&self) -> Result<crate::config::Backend, (&'static str, String)> {
        let config = self.config.clone();
        let mut health = self.shared.health.clone();
        let ip = self.ip;
        let overrides = self.shared.state.control.current();
        let order = |view: &crate::health::HealthView| {
            let eligible = route::eligible(&config, view, &overrides);
            let weights = route::weights(&config, view, &overrides, std::time::Instant::now());
            route::order(config.routing, &eligible, ip, 0, |i| weights[i], |_| 0)
                .first()
                .copied()
        };
        let now = order(&health.borrow_and_update());
        let i = match now {
            Some(i) => i,
            None => {
                match timeout(
                    config.timeouts.connect,
                    health.wait_for(|v| order(v).is_some()),
                )
                .await
                {
                    Ok(Ok(view)) => {
                        order(&view).ok_or(("08006", "no backend available".to_string()))?
                    }
                    _ => {
                        return Err((
                            "08006",
                            format!(
                                "no backend available (no leader within {:?})",
                                config.timeouts.connect
                            ),
                        ))
                    }
                }
            }
        };
        Ok(config.backends[i].clone())
    }

    /// A server connection of the current pool, after the queue; errors as (SQLSTATE, text).
    async fn acquire_conn(&mut self) -> Result<ServerConn, (&'static str, String)> {
        let started = Instant::now();
        for _ in 0..3 {
            let pool = self.target().await?;
            let left = self
                .settings
                .queue_timeout
                .saturating_sub(started.elapsed());
            match pool.checkout(&self.ctx, &self.login, left).await {
                Ok(c) => {
                    self.hub.stats.record_wait(started.elapsed());
                    return Ok(c);
                }
                Err(CheckoutError::Retired) => continue,
                Err(CheckoutError::Timeout) => {
                    self.hub.stats.queue_timeouts.fetch_add(1, Relaxed);
                    return Err((
                        "53300",
                        format!(
                            "no server connection available within pooling.queueTimeout ({:?}): all {} of the pool are busy",
                            self.settings.queue_timeout, self.settings.pool_size
                        ),
                    ));
                }
                Err(CheckoutError::Dial(e)) => {
                    if e.kind() != std::io::ErrorKind::PermissionDenied {
                        if let Some(checker) = &self.shared.checker {
                            checker.report_connect_failure(&pool.backend.name);
                        }
                        return Err((
                            "08006",
                            format!("the server connection to {} failed: {e}", pool.backend.name),
                        ));
                    }
                    return Err(("28000", format!("the server refused the login: {e}")));
                }
            }
        }
        Err((
            "08006",
            "no backend available: the leader keeps changing".into(),
        ))
    }

    /// Takes a server connection for the client's next transaction and gives it the client's
    /// parameters.
    async fn acquire(&mut self) -> Result<(), (&'static str, String)> {
        let mut conn = self.acquire_conn().await?;
        let pool = self.pool.clone().expect("acquired");
        let sql = replay_sql(&self.params, &conn.params);
        if !sql.is_empty() {
            if let Err(e) = conn.run(&sql, self.config.timeouts.server).await {
                conn.broken = true;
                pool.checkin(conn, self.settings.server_lifetime);
                return Err((
                    "08006",
                    format!("the client's parameters could not be set on a server connection: {e}"),
                ));
            }
        }
        self.hold(conn, pool);
        Ok(())
    }

    /// The portal's answer to a message it cannot forward: an ErrorResponse, then what ends the
    /// client's sequence (ReadyForQuery for a query, skipping to Sync for extended protocol).
    async fn refuse(
        &mut self,
        tag: u8,
        severity: &str,
        sqlstate: &str,
        text: &str,
    ) -> Result<(), CloseReason> {
        let mut out = error_response(severity, sqlstate, text);
        match tag {
            b'Q' | b'S' | b'F' => out.extend_from_slice(&ready_for_query(ReadyStatus::Idle)),
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.discard_until_sync = true,
            _ => {}
        }
        self.send(&out).await
    }

    async fn run(&mut self) -> CloseReason {
        let metrics = self.shared.state.metrics.clone();
        let idle_timeout = self.config.timeouts.client;
        let mut last_read = Instant::now();
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut kill = self.shared.kill.clone();
        loop {
            if let Err(reason) = self.process().await {
                return reason;
            }
            // A small input buffer while idle (most pooled clients are), grown while busy.
            if self.cin.is_empty() && self.cin.capacity() > 16 << 10 {
                self.cin = Vec::new();
            }
            if self.cin.capacity() - self.cin.len() < 1024 {
                self.cin
                    .reserve(if self.cin.is_empty() { 2048 } else { 16 << 10 });
            }
            tokio::select! {
                biased;
                _ = kill.changed() => return CloseReason::Shutdown,
                ev = server_event(self.held.as_mut()) => {
                    let r = match ev {
                        ServerEvent::Data(Ok(n)) if n > 0 => self.server_data().await,
                        ServerEvent::Data(_) => self.server_lost("the server connection was closed").await,
                        ServerEvent::Retired => self.server_lost("the backend stopped leading (failover)").await,
                    };
                    if let Err(reason) = r {
                        return reason;
                    }
                }
                r = self.rd.read_buf(&mut self.cin) => match r {
                    Ok(0) | Err(_) => return CloseReason::Done,
                    Ok(n) => {
                        metrics.add_bytes(crate::metrics::Direction::ClientToBackend, n as u64);
                        last_read = Instant::now();
                    }
                },
                _ = &mut idle => {
                    let next = last_read + idle_timeout;
                    if next <= Instant::now() {
                        return CloseReason::ClientTimeout;
                    }
                    idle.as_mut().reset(next);
                }
            }
        }
    }

    /// At the end of the session: the held connection goes back, reset with DISCARD ALL in
    /// session mode; one left mid-transaction is closed.
    async fn finish(&mut self) {
        let Some(h) = &mut self.held else { return };
        let clean = h.expect.is_empty()
            && h.status == ReadyStatus::Idle
            && h.sbuf.is_empty()
            && h.skip == 0;
        if clean && (!self.settings.transaction || self.pinned.is_some()) {
            let ok = h
                .conn
                .run("DISCARD ALL", self.config.timeouts.server)
                .await
                .is_ok();
            h.conn.statements.clear();
            self.release(!ok);
        } else {
            self.release(!clean);
        }
    }

    /// Handles every complete message the client sent.
    async fn process(&mut self) -> Result<(), CloseReason> {
        let mut pos = 0;
        let mut out: Vec<u8> = Vec::new();
        let result = loop {
            let n = match frame(&self.cin[pos..], MAX_MESSAGE) {
                Ok(Some(n)) => n,
                Ok(None) => break Ok(()),
                Err(e) => {
                    self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
                    debug!(error = %e, "malformed message; closing the client");
                    if !out.is_empty() {
                        let _ = self.write_server(&out).await;
                    }
                    break Err(self.fatal("08P01", &format!("invalid message: {e}")).await);
                }
            };
            let tag = self.cin[pos];
            if self.discard_until_sync {
                if tag == b'S' {
                    self.discard_until_sync = false;
                    if let Err(r) = self.send(&ready_for_query(ReadyStatus::Idle)).await {
                        break Err(r);
                    }
                }
                pos += n;
                continue;
            }
            if tag == b'X' {
                if !out.is_empty() {
                    let _ = self.write_server(&out).await;
                }
                break Err(CloseReason::Done);
            }
            if self.lost_transaction {
                self.lost_transaction = false;
                pos += n;
                let text = "the transaction was lost: its server connection closed (the leader changed); it was rolled back, start it again";
                if let Err(r) = self.refuse(tag, "ERROR", "08006", text).await {
                    break Err(r);
                }
                continue;
            }
            if self.held.is_none() {
                match tag {
                    // A Sync or Flush with nothing in flight: nothing to take a connection for.
                    b'S' => {
                        pos += n;
                        if let Err(r) = self.send(&ready_for_query(ReadyStatus::Idle)).await {
                            break Err(r);
                        }
                        continue;
                    }
                    b'H' | b'c' | b'd' | b'f' => {
                        pos += n;
                        continue;
                    }
                    _ => {}
                }
                // A named Parse then Sync with nothing in flight (libpq's PQprepare): the
                // statement is recorded and prepared on a server connection when it is first
                // used, so a client preparing never waits for a connection (a client in an
                // open transaction may be the one to give one back). An invalid statement
                // fails at its first use.
                if tag == b'P' {
                    if let Some(answer) = self.prepare_locally(pos, n) {
                        pos += n + 5;
                        if let Err(r) = self.send(&answer).await {
                            break Err(r);
                        }
                        continue;
                    }
                }
                // Closing a statement or DEALLOCATE with nothing in flight: answered here.
                if let Some(answer) = self.answer_locally(tag, pos, n) {
                    pos += n;
                    if let Err(r) = self.send(&answer).await {
                        break Err(r);
                    }
                    continue;
                }
                if let Err((sqlstate, text)) = self.acquire().await {
                    if sqlstate == "53300" {
                        break Err(self.fatal(sqlstate, &text).await);
                    }
                    pos += n;
                    if let Err(r) = self.refuse(tag, "ERROR", sqlstate, &text).await {
                        break Err(r);
                    }
                    continue;
                }
            }
            let mut local = Vec::new();
            self.forward(tag, pos, n, &mut out, &mut local);
            if !local.is_empty() {
                if let Err(r) = self.send(&local).await {
                    break Err(r);
                }
            }
            pos += n;
            if out.len() >= 64 << 10 {
                if let Err(r) = self.write_server(&out).await {
                    break Err(r);
                }
                out.clear();
            }
        };
        self.cin.drain(..pos);
        if result.is_ok() && !out.is_empty() {
            self.write_server(&out).await?;
        }
        result
    }

    /// The portal's own answer to a statement Close or a DEALLOCATE (the client's statement is
    /// forgotten; the server connections keep theirs, bounded), when the message is one.
    fn answer_locally(&mut self, tag: u8, pos: usize, n: usize) -> Option<Vec<u8>> {
        let body = &self.cin[pos + HEADER_LEN..pos + n];
        match tag {
            b'C' => match statements::parse_target(body) {
                Some((b'S', name)) if !name.is_empty() => {
                    self.statements.remove(name);
                    Some(message(b'3', &[]))
                }
                _ => None,
            },
            b'Q' => {
                let (tag_text, all) = match statements::special(body)? {
                    Special::Deallocate(name) => {
                        self.statements.remove(name.as_bytes());
                        ("DEALLOCATE", false)
                    }
                    Special::DeallocateAll => ("DEALLOCATE ALL", true),
                    Special::DiscardAll => return None,
                };
                if all {
                    self.statements.clear();
                }
                let status = self.held.as_ref().map_or(ReadyStatus::Idle, |h| h.status);
                let mut out = message(b'C', format!("{tag_text}\0").as_bytes());
                out.extend_from_slice(&ready_for_query(status));
                Some(out)
            }
            _ => None,
        }
    }

    /// ParseComplete and ReadyForQuery for a named Parse at `pos` followed by a Sync, the
    /// statement recorded for its first use; `None` for anything else.
    fn prepare_locally(&mut self, pos: usize, n: usize) -> Option<Vec<u8>> {
        let next = self.cin.get(pos + n..pos + n + 5)?;
        if next != [b'S', 0, 0, 0, 4] {
            return None;
        }
        let (name, def) = statements::parse_parse(&self.cin[pos + HEADER_LEN..pos + n])?;
        if name.is_empty() || statements::special(def_query(&def)).is_some() {
            return None;
        }
        self.statements.insert(name.to_vec(), def);
        let mut out = message(b'1', &[]);
        out.extend_from_slice(&ready_for_query(ReadyStatus::Idle));
        Some(out)
    }

    /// The server's name for a client statement's definition, preparing it there first
    /// (a Parse the client does not see) when the connection lacks it.
    fn ensure(&mut self, def: &Definition, out: &mut Vec<u8>) -> String {
        let max = self.settings.max_prepared_statements;
        let h = self.held.as_mut().expect("held");
        if let Some(name) = h.conn.statements.get(def) {
            self.hub.stats.prepared_hits.fetch_add(1, Relaxed);
            return name;
        }
        self.hub.stats.prepared_misses.fetch_add(1, Relaxed);
        let (name, evicted) = h.conn.statements.insert(def.clone(), max);
        if let Some(old) = evicted {
            out.extend_from_slice(&statements::close_statement(&old));
            h.expect.push_back(Expect::Server {
                tag: b'C',
                swallow: true,
                forget: None,
            });
        }
        out.extend_from_slice(&statements::parse_message(&name, def));
        h.expect.push_back(Expect::Server {
            tag: b'P',
            swallow: true,
            forget: Some(def.clone()),
        });
        name
    }

    /// Queues the client's message at `pos` (`n` bytes) for the held server connection, with
    /// named statements renamed to the server's; answers that are due at once go to `local`.
    fn forward(&mut self, tag: u8, pos: usize, n: usize, out: &mut Vec<u8>, local: &mut Vec<u8>) {
        let body = self.cin[pos + HEADER_LEN..pos + n].to_vec();
        let expect = |this: &mut Self, tag: u8, forget: Option<Definition>| {
            let h = this.held.as_mut().expect("held");
            h.expect.push_back(Expect::Server {
                tag,
                swallow: false,
                forget,
            });
        };
        let mut as_is = true;
        if self.settings.transaction && self.pinned.is_none() && matches!(tag, b'Q' | b'P') {
            let sql = match tag {
                b'Q' => crate::wire::postgres::cstr(&body).map(|(q, _)| q),
                _ => crate::wire::postgres::cstr(&body)
                    .and_then(|(_, rest)| crate::wire::postgres::cstr(rest))
                    .map(|(q, _)| q),
            };
            if let Some(reason) = sql
                .and_then(|q| std::str::from_utf8(q).ok())
                .and_then(pinning::pin_reason)
            {
                self.pinned = Some(reason);
                self.hub.stats.pin(reason, 1);
                info!(
                    reason = reason.as_str(),
                    user = %self.user,
                    "client pinned to its server connection until it disconnects: its session state cannot move to another one"
                );
            }
        }
        match tag {
            b'Q' => {
                self.hub.stats.queries.fetch_add(1, Relaxed);
                if let Some(answer) = self.answer_locally(tag, pos, n) {
                    self.held
                        .as_mut()
                        .expect("held")
                        .expect
                        .push_back(Expect::Local(answer));
                    as_is = false;
                } else {
                    if statements::special(&body) == Some(Special::DiscardAll) {
                        self.statements.clear();
                        self.held.as_mut().expect("held").conn.statements.clear();
                    }
                    expect(self, b'Q', None);
                }
            }
            b'S' | b'F' => expect(self, tag, None),
            b'E' => {
                self.hub.stats.queries.fetch_add(1, Relaxed);
                expect(self, b'E', None);
            }
            b'P' => match statements::parse_parse(&body) {
                Some((_, def)) if statements::special(def_query(&def)).is_some() => {
                    // DEALLOCATE or DISCARD ALL through the extended protocol: the client's
                    // statements are forgotten, and the server's: DEALLOCATE of one name runs
                    // as DEALLOCATE ALL there (the client's name is not the server's), and the
                    // portal prepares again what it needs.
                    if let Some(Special::Deallocate(name)) = statements::special(def_query(&def)) {
                        self.statements.remove(name.as_bytes());
                        out.extend_from_slice(&statements::parse_message(
                            "",
                            b"DEALLOCATE ALL\0\0\0",
                        ));
                    } else {
                        self.statements.clear();
                        out.extend_from_slice(&self.cin[pos..pos + n]);
                    }
                    self.held.as_mut().expect("held").conn.statements.clear();
                    expect(self, b'P', None);
                    as_is = false;
                }
                Some((name, def)) if !name.is_empty() => {
                    self.statements.insert(name.to_vec(), def.clone());
                    let h = self.held.as_mut().expect("held");
                    if h.conn.statements.get(&def).is_some() {
                        self.hub.stats.prepared_hits.fetch_add(1, Relaxed);
                        h.expect.push_back(Expect::Local(message(b'1', &[])));
                    } else {
                        self.hub.stats.prepared_misses.fetch_add(1, Relaxed);
                        let max = self.settings.max_prepared_statements;
                        let (server_name, evicted) = h.conn.statements.insert(def.clone(), max);
                        if let Some(old) = evicted {
                            out.extend_from_slice(&statements::close_statement(&old));
                            h.expect.push_back(Expect::Server {
                                tag: b'C',
                                swallow: true,
                                forget: None,
                            });
                        }
                        out.extend_from_slice(&statements::parse_message(&server_name, &def));
                        expect(self, b'P', Some(def));
                    }
                    as_is = false;
                }
                _ => expect(self, b'P', None),
            },
            b'B' => {
                let named = statements::parse_bind(&body)
                    .filter(|(_, stmt, _)| !stmt.is_empty())
                    .and_then(|(portal, stmt, after)| {
                        let def = self.statements.get(stmt)?.clone();
                        Some((portal.to_vec(), def, after.to_vec()))
                    });
                if let Some((portal, def, after)) = named {
                    let server_name = self.ensure(&def, out);
                    out.extend_from_slice(&statements::bind_message(&portal, &server_name, &after));
                    as_is = false;
                }
                expect(self, b'B', None);
            }
            b'D' => {
                let named = statements::parse_target(&body)
                    .filter(|(kind, name)| *kind == b'S' && !name.is_empty())
                    .and_then(|(_, name)| self.statements.get(name).cloned());
                if let Some(def) = named {
                    let server_name = self.ensure(&def, out);
                    out.extend_from_slice(&statements::target_message(b'D', &server_name));
                    as_is = false;
                }
                expect(self, b'D', None);
            }
            b'C' => {
                if let Some(answer) = self.answer_locally(tag, pos, n) {
                    self.held
                        .as_mut()
                        .expect("held")
                        .expect
                        .push_back(Expect::Local(answer));
                    as_is = false;
                } else {
                    expect(self, b'C', None);
                }
            }
            // Flush, COPY data, done and fail: no answer of their own.
            _ => {}
        }
        if as_is {
            out.extend_from_slice(&self.cin[pos..pos + n]);
        }
        let h = self.held.as_mut().expect("held");
        if !h.waits_for_server() {
            due_locals(&mut h.expect, local);
        }
    }

    async fn write_server(&mut self, out: &[u8]) -> Result<(), CloseReason> {
        let Some(h) = &mut self.held else {
            return Ok(());
        };
        let wrote = timeout(self.config.timeouts.server, h.conn.stream.write_all(out)).await;
        match wrote {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.server_lost("writing to the server connection failed")
                    .await
            }
        }
    }

    /// Forwards what the server sent, following ReadyForQuery, ParameterStatus and the
    /// answers the client waits for (the portal's own answers go in between, its own
    /// messages' answers are dropped); gives the connection back at the end of a transaction
    /// (transaction mode).
    async fn server_data(&mut self) -> Result<(), CloseReason> {
        let h = self.held.as_mut().expect("held");
        let mut pos = 0;
        let len = h.sbuf.len();
        let mut bad = false;
        let mut fatal = None;
        let mut forward: Vec<u8> = Vec::with_capacity(len);
        loop {
            if h.skip > 0 {
                let take = h.skip.min(len - pos);
                forward.extend_from_slice(&h.sbuf[pos..pos + take]);
                pos += take;
                h.skip -= take;
                if h.skip > 0 {
                    break;
                }
                continue;
            }
            if len - pos < HEADER_LEN {
                break;
            }
            let tag = h.sbuf[pos];
            let mlen = message_len(&h.sbuf[pos..]) as usize;
            if !(4..=MAX_MESSAGE).contains(&mlen) {
                bad = true;
                break;
            }
            // Rows and COPY data are forwarded as they come, whatever their size.
            if matches!(tag, b'D' | b'd') {
                h.skip = mlen + 1;
                continue;
            }
            if len - pos < mlen + 1 {
                break;
            }
            let whole = &h.sbuf[pos..pos + 1 + mlen];
            let body = &whole[HEADER_LEN..];
            pos += mlen + 1;
            match tag {
                b'S' => {
                    if let Some((k, v)) = parse_parameter_status(body) {
                        h.conn.params.insert(k.clone(), v.clone());
                        self.params.insert(k, v);
                    }
                    forward.extend_from_slice(whole);
                    continue;
                }
                b'N' | b'A' => {
                    forward.extend_from_slice(whole);
                    continue;
                }
                b'E' => {
                    // A FATAL error ends the server connection, not the client's session: it
                    // is not forwarded, and the client hears of it as a lost connection.
                    let fields = crate::wire::postgres::error_fields(body);
                    if fields
                        .iter()
                        .any(|(k, v)| *k == b'S' && (v == "FATAL" || v == "PANIC"))
                    {
                        fatal = Some(crate::wire::postgres::error_text(body));
                        pos -= mlen + 1;
                        break;
                    }
                }
                b'Z' => {
                    h.status = body
                        .first()
                        .and_then(|&b| ReadyStatus::from_byte(b))
                        .unwrap_or(ReadyStatus::Failed);
                }
                _ => {}
            }
            due_locals(&mut h.expect, &mut forward);
            let front = match h.expect.front() {
                Some(Expect::Server { tag, swallow, .. }) => Some((*tag, *swallow)),
                _ => None,
            };
            let Some((front, swallow)) = front else {
                // Nothing expected (a server speaking out of turn): passed on.
                forward.extend_from_slice(whole);
                continue;
            };
            if tag == b'E' && !matches!(front, b'Q' | b'F' | b'S') {
                // An extended-protocol message failed: the server skips to the next Sync,
                // and so do the answers the client waits for.
                forward.extend_from_slice(whole);
                if let Some(Expect::Server {
                    forget: Some(def), ..
                }) = h.expect.pop_front()
                {
                    h.conn.statements.remove(&def);
                }
                while let Some(e) = h.expect.front() {
                    if matches!(e, Expect::Server { tag: b'S', .. }) {
                        break;
                    }
                    if let Some(Expect::Server {
                        forget: Some(def), ..
                    }) = h.expect.pop_front()
                    {
                        h.conn.statements.remove(&def);
                    }
                }
                continue;
            }
            if tag == b'Z' {
                // Completes the Query or Sync at the front (and anything left before it).
                while let Some(e) = h.expect.pop_front() {
                    match e {
                        Expect::Server {
                            tag: b'Q' | b'F' | b'S',
                            ..
                        } => break,
                        Expect::Local(bytes) => forward.extend_from_slice(&bytes),
                        Expect::Server { .. } => {}
                    }
                }
                forward.extend_from_slice(whole);
            } else if Held::completes(front, tag) {
                h.expect.pop_front();
                if !swallow {
                    forward.extend_from_slice(whole);
                }
            } else if !swallow {
                forward.extend_from_slice(whole);
            }
            due_locals(&mut h.expect, &mut forward);
        }
        h.sbuf.drain(..pos);
        if !forward.is_empty() {
            self.send(&forward).await?;
        }
        if bad {
            self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
            return self
                .server_lost("the server sent a malformed message")
                .await;
        }
        if let Some(text) = fatal {
            debug!(error = %text, "the server ended the connection");
            return self
                .server_lost(&format!("the server connection was closed ({text})"))
                .await;
        }
        let h = self.held.as_ref().expect("held");
        if self.settings.transaction
            && self.pinned.is_none()
            && h.expect.is_empty()
            && h.status == ReadyStatus::Idle
            && h.sbuf.is_empty()
            && h.skip == 0
        {
            self.hub.stats.transactions.fetch_add(1, Relaxed);
            self.release(false);
        }
        Ok(())
    }

    /// The held connection is gone (closed, broken, or its backend stopped leading): what was
    /// in flight fails with an ErrorResponse; a client idle between transactions notices
    /// nothing. Session mode ends the session: its state is gone.
    async fn server_lost(&mut self, why: &str) -> Result<(), CloseReason> {
        let Some(h) = &self.held else { return Ok(()) };
        let (pending, extended, status, midway) = (h.pending(), h.extended(), h.status, h.skip > 0);
        self.release(true);
        debug!(why, pending, "server connection lost");
        if midway {
            // Part of a message reached the client: nothing more can be said in protocol.
            return Err(CloseReason::Backend);
        }
        if !self.settings.transaction || self.pinned.is_some() {
            return Err(self
                .fatal(
                    "08006",
                    &format!("{why}: the session's server connection was closed"),
                )
                .await);
        }
        if pending > 0 || extended {
            self.hub.stats.failed_in_flight.fetch_add(1, Relaxed);
            let mut out = error_response(
                "ERROR",
                "08006",
                &format!("{why}: the transaction in flight was rolled back or may not have completed; start it again"),
            );
            for _ in 0..pending {
                out.extend_from_slice(&ready_for_query(ReadyStatus::Idle));
            }
            self.discard_until_sync = extended;
            self.send(&out).await?;
        } else if status != ReadyStatus::Idle {
            self.hub.stats.failed_in_flight.fetch_add(1, Relaxed);
            self.lost_transaction = true;
        }
        Ok(())
    }
}
