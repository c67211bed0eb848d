//! One server connection of PostgreSQL pooling: dialled (TLS when `tls.backend` is on), logged
//! in as a client's user with what that client's authentication left ([`Login`]: a password,
//! an md5 hash, or SCRAM keys), and driven for the portal's own statements (SET, DISCARD ALL,
//! `auth.query`).
//!
//! May import: `config`, `splice` (its socket type), `tls`, `wire`, the rest of `pool` below it (`secret`, `scram`,
//! `statements`, `inflight`) and the session's [`hub`](crate::session::hub).

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures::FutureExt;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::timeout,
};

use super::{
    inflight::Expect,
    scram::{self, ClientExchange},
    secret::{md5_hash, md5_salted, Login},
};
use crate::{
    config::{Backend, Config},
    session::hub::{open_server_as, within_connect},
    splice::Tcp,
    tls::{BackendConnector, MaybeTls},
    wire::postgres::{
        backend::{Authentication, Backend as Message, Fields},
        error_text, frame,
        frontend::Frontend,
        query, sasl_initial, startup_message, ReadyStatus, HEADER_LEN, MAX_MESSAGE,
    },
};

/// A server connection's stream: TCP, or TLS when `tls.backend` is on; on the executor of
/// the thread that dialled it where there is one ([`Tcp::here`]).
pub type ServerStream = MaybeTls<Tcp>;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reported parameters (name to value). Shared: a client holds the map of the server
/// connection that logged it in until a value of its own differs, so thousands of idle
/// clients keep a handful of maps between them.
pub type Params = Arc<BTreeMap<String, String>>;

/// Sets `name` to `value`, copying the map first only when it is shared and the value is new.
pub fn set_param(params: &mut Params, name: String, value: String) {
    if params.get(&name) != Some(&value) {
        Arc::make_mut(params).insert(name, value);
    }
}

/// The startup parameters a server connection is opened with besides user and database
/// (sorted by name): those of the clients its pool serves (see `PgHub::pool`).
pub type Startup = Arc<[(String, String)]>;

/// Whether a client's parameters and a server connection's are the same. Equal maps held
/// apart are made one (both keep the map at the lower address), so that clients and
/// connections with the same values come to share one map and the next check of any two of
/// them compares two pointers.
pub fn same_params(client: &mut Params, server: &mut Params) -> bool {
    if Arc::ptr_eq(client, server) {
        return true;
    }
    if client != server {
        return false;
    }
    if Arc::as_ptr(client) < Arc::as_ptr(server) {
        *server = client.clone();
    } else {
        *client = server.clone();
    }
    true
}

/// One server connection, logged in as its pool's user.
pub struct ServerConn {
    pub stream: ServerStream,
    /// The values the server reported with ParameterStatus, as they are now; shared with the
    /// clients that were told the same values.
    pub params: Params,
    /// The values the server reported at login: what a new client of this connection starts
    /// from, whatever earlier clients set since.
    pub initial: Params,
    /// The server's BackendKeyData, for cancels.
    pub key: (u32, u32),
    /// The prepared statements the portal made on it.
    pub statements: super::statements::ServerStatements,
    pub(super) created: Instant,
    pub(super) last_used: Instant,
    /// The server's state is unknown (a client left mid-transaction, a read failed): close
    /// instead of reusing.
    pub broken: bool,
    /// What [`LEFTOVERS`] answered when it was new (`None`: not asked, or not answered).
    pub(super) fresh: Option<String>,
    /// Its holder's place among its pool's holders (woken when the pool is retired), while a
    /// client holds it.
    pub(super) holder: Option<usize>,
    /// Buffers that stay with the connection from holder to holder, empty between them: what
    /// is read from the server and not yet forwarded ([`Buffers::read`]), what is written to
    /// either side ([`Buffers::out`]) and the queue of what is in flight. A pooled client idles
    /// without buffers of its own, and a transaction does not take and give back buffers of
    /// the thread's spares.
    pub(super) buffers: Buffers,
}

/// A server connection's [`ServerConn::buffers`]: capacity only, between holders.
#[derive(Default)]
pub(super) struct Buffers {
    /// The server's bytes not yet forwarded to the holder.
    pub(super) read: Vec<u8>,
    pub(super) out: Vec<u8>,
    /// The holder's queue of what is in flight ([`InFlight`](super::inflight::InFlight)).
    pub(super) expect: VecDeque<Expect>,
}

impl Buffers {
    /// Larger than this, a buffer is not kept (a large message made it grow): a connection
    /// keeps at most this much per buffer between holders.
    pub(super) const KEEP: usize = 32 << 10;

    /// `buf`, emptied, kept as the buffer at `slot` unless it grew past [`Buffers::KEEP`] or
    /// `slot` has one already.
    pub(super) fn keep(slot: &mut Vec<u8>, mut buf: Vec<u8>) {
        if buf.capacity() <= Self::KEEP && slot.capacity() == 0 {
            buf.clear();
            *slot = buf;
        }
    }
}

/// The state a server session keeps through DISCARD ALL, as the server shows it: how many
/// settings are defined with a dotted name (by a library loaded with LOAD or on first use, as
/// plpgsql is; a client's `SET app.x` placeholder is not shown), and whether the session made
/// its temporary schema (` temp`). A session ends "as new" when the answer is the one of the new connection.
pub const LEFTOVERS: &str = "SELECT count(*) FILTER (WHERE name LIKE $1)::text \
     || CASE WHEN pg_my_temp_schema() <> 0 THEN ' temp' ELSE '' END FROM pg_settings";
const LEFTOVERS_PATTERN: &str = "%.%";

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("key", &self.key.0)
            .finish_non_exhaustive()
    }
}

impl ServerConn {
    /// A connection that has just logged in; `broken` when the server sent more than asked.
    pub(super) fn new(
        stream: ServerStream,
        params: BTreeMap<String, String>,
        key: (u32, u32),
        broken: bool,
    ) -> ServerConn {
        let now = Instant::now();
        let params = Arc::new(params);
        ServerConn {
            stream,
            initial: params.clone(),
            params,
            key,
            statements: Default::default(),
            created: now,
            last_used: now,
            broken,
            fresh: None,
            holder: None,
            buffers: Buffers::default(),
        }
    }

    /// Whether the server session is as it was new, as far as [`LEFTOVERS`] tells: after
    /// DISCARD ALL, what a session leaves behind that a new client would see (a library it
    /// loaded, a temporary schema) makes the connection one to close, not to reuse.
    pub async fn is_as_new(&mut self, deadline: Duration) -> bool {
        let Some(fresh) = self.fresh.clone() else {
            return true;
        };
        match self.query_one(LEFTOVERS, LEFTOVERS_PATTERN, deadline).await {
            Ok(Some(now)) => now == fresh,
            _ => false,
        }
    }

    /// Runs `sql` once with `$1` = `param` and returns the last column of its first row
    /// (`None`: no row, or NULL). An ErrorResponse comes back as `Err` with its text.
    pub async fn query_one(
        &mut self,
        sql: &str,
        param: &str,
        deadline: Duration,
    ) -> io::Result<Option<String>> {
        let work = async {
            self.stream
                .write_all(&crate::wire::postgres::query_with_param(sql, param))
                .await?;
            let mut buf = Vec::with_capacity(512);
            let (mut value, mut error, mut rows) = (None, None, 0);
            loop {
                let Some(n) = frame(&buf, 1 << 20).map_err(io::Error::other)? else {
                    if self.stream.read_buf(&mut buf).await? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the connection",
                        ));
                    }
                    continue;
                };
                let body = &buf[HEADER_LEN..n];
                match Message::decode(buf[0], body).map_err(io::Error::other)? {
                    Message::DataRow { body, .. } => {
                        rows += 1;
                        if rows == 1 {
                            let columns = crate::wire::postgres::data_row(body)
                                .ok_or_else(|| io::Error::other("malformed DataRow"))?;
                            value = columns
                                .last()
                                .copied()
                                .flatten()
                                .map(|v| String::from_utf8_lossy(v).into_owned());
                        }
                    }
                    Message::ErrorResponse(_) => error = Some(error_text(body)),
                    Message::ReadyForQuery(_) => {
                        buf.drain(..n);
                        self.broken |= !buf.is_empty();
                        return match error {
                            Some(e) => Err(io::Error::other(e)),
                            None => Ok(value),
                        };
                    }
                    _ => {}
                }
                buf.drain(..n);
            }
        };
        match timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
            }
        }
    }

    /// Whether the server closed it or sent something unasked while it was idle.
    ///
    /// Over plain TCP the socket is read only when the runtime saw it become readable since
    /// the last read, and no waker is registered (the next holder registers its own); over
    /// TLS the read goes through the TLS layer, which may consume records that carry no data.
    pub(super) fn is_stale(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match &mut self.stream {
            MaybeTls::Plain(tcp) => {
                !matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            _ => self.stream.read(&mut byte).now_or_never().is_some(),
        }
    }

    /// Runs `sql` (SET, DISCARD ALL) and reads up to its ReadyForQuery, keeping the
    /// parameters it reports. An ErrorResponse comes back as `Err` with its text.
    pub async fn run(&mut self, sql: &str, deadline: Duration) -> io::Result<()> {
        let work = async {
            self.stream.write_all(&query(sql)).await?;
            let mut buf = Vec::with_capacity(512);
            let mut error = None;
            loop {
                match frame(&buf, MAX_MESSAGE).map_err(io::Error::other)? {
                    None => {
                        if self.stream.read_buf(&mut buf).await? == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the server closed the connection",
                            ));
                        }
                    }
                    Some(n) => {
                        let body = &buf[HEADER_LEN..n];
                        match Message::decode(buf[0], body).map_err(io::Error::other)? {
                            Message::ParameterStatus { name, value } => {
                                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                                set_param(&mut self.params, text(name), text(value));
                            }
                            Message::ErrorResponse(_) => error = Some(error_text(body)),
                            Message::ReadyForQuery(status) => {
                                let idle = status == ReadyStatus::Idle;
                                buf.drain(..n);
                                if !buf.is_empty() || !idle {
                                    self.broken = true;
                                }
                                return match error {
                                    Some(e) => Err(io::Error::other(e)),
                                    None => Ok(()),
                                };
                            }
                            _ => {}
                        }
                        buf.drain(..n);
                    }
                }
            }
        };
        match timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
            }
        }
    }
}

/// What a new server connection needs besides its pool's backend, database and user.
#[derive(Clone)]
pub struct DialContext {
    pub config: Arc<Config>,
    pub connector: Option<BackendConnector>,
}

/// Opens a server connection to `backend` and logs in as `user` to `database` with `login`
/// (SCRAM-SHA-256, md5 or cleartext, as the server asks), within `timeouts.connect`.
pub async fn dial(
    ctx: &DialContext,
    backend: &Backend,
    database: &str,
    user: &str,
    startup: &[(String, String)],
    login: &Login,
) -> io::Result<ServerConn> {
    let work = async {
        let stream = open_server_as(backend, ctx.connector.as_ref(), true, Tcp::here).await?;
        log_in(stream, database, user, startup, login).await
    };
    let mut conn = within_connect(ctx.config.timeouts.connect, work).await?;
    // A server that cannot answer (not PostgreSQL's catalog) leaves `fresh` unknown: its
    // connections are reused after DISCARD ALL without the comparison.
    conn.fresh = conn
        .query_one(LEFTOVERS, LEFTOVERS_PATTERN, ctx.config.timeouts.connect)
        .await
        .ok()
        .flatten();
    conn.created = Instant::now();
    Ok(conn)
}

fn denied(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, text)
}

/// The server's ErrorResponse to a login: a refusal (wrong password, no such role) is
/// `PermissionDenied`; SQLSTATE 57P03 (shutting down, starting up, in recovery) says the
/// server takes no logins for now, which is a failover's doing, so it reads as refused the
/// way a closed port is (`ConnectionRefused`).
fn login_error(body: &[u8]) -> io::Error {
    let text = error_text(body);
    match Fields(body).sqlstate() {
        Some(b"57P03") => io::Error::new(io::ErrorKind::ConnectionRefused, text),
        // A startup parameter the server refuses (an invalid value, an unknown or protected
        // setting in `options`): the client's own doing.
        Some(s) if s.starts_with(b"22") || s.starts_with(b"42") => {
            io::Error::new(io::ErrorKind::InvalidInput, text)
        }
        _ => denied(text),
    }
}

/// Logs in to a backend on `stream` as `user` to `database`, answering the method the server
/// asks for with what `login` holds; up to the first ReadyForQuery.
pub(super) async fn log_in(
    mut stream: ServerStream,
    database: &str,
    user: &str,
    startup: &[(String, String)],
    login: &Login,
) -> io::Result<ServerConn> {
    let mut params = vec![("user", user), ("database", database)];
    params.extend(startup.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    stream.write_all(&startup_message(&params)).await?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut scram: Option<ScramSha256> = None;
    let mut passthrough: Option<ClientExchange> = None;
    let mut params = BTreeMap::new();
    let mut key = (0, 0);
    let cannot = |method: &str| {
        denied(format!(
            "the server asks for {method}, which the portal cannot answer for user \"{user}\" (it holds {})",
            match login {
                Login::None => "no password",
                Login::Password(_) => "the password",
                Login::Md5(_) => "only the md5 hash of the password",
                Login::Scram { .. } => "only SCRAM keys",
            }
        ))
    };
    loop {
        let Some(n) = frame(&buf, 1 << 20).map_err(io::Error::other)? else {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during login",
                ));
            }
            continue;
        };
        let message = buf[..n].to_vec();
        buf.drain(..n);
        let body = &message[HEADER_LEN..];
        match Message::decode(message[0], body).map_err(io::Error::other)? {
            Message::Authentication(request) => {
                let reply = match (request, login) {
                    (Authentication::Ok, _) => None,
                    (Authentication::CleartextPassword, Login::Password(p)) => {
                        Some(password_message(p))
                    }
                    (Authentication::CleartextPassword, _) => {
                        return Err(cannot("a cleartext password"))
                    }
                    (Authentication::Md5Password { salt }, Login::Password(_) | Login::Md5(_)) => {
                        let hash = match login {
                            Login::Password(p) => md5_hash(p, user),
                            Login::Md5(h) => h.clone(),
                            _ => unreachable!("matched above"),
                        };
                        Some(password_message(&md5_salted(&hash, salt)))
                    }
                    (Authentication::Md5Password { .. }, _) => return Err(cannot("md5")),
                    (
                        Authentication::Sasl { mechanisms },
                        Login::Password(_) | Login::Scram { .. },
                    ) => {
                        let offers_scram = mechanisms
                            .split(|&b| b == 0)
                            .any(|m| m == scram::MECHANISM.as_bytes());
                        if !offers_scram {
                            return Err(denied(
                                "the server offers no SASL mechanism the portal speaks".into(),
                            ));
                        }
                        // gs2 flag `n`: a TLS server that offers -PLUS accepts it, while `y`
                        // would read as a downgrade.
                        let first = match login {
                            Login::Password(p) => {
                                let s = ScramSha256::new(p.as_bytes(), ChannelBinding::unsupported());
                                let first = s.message().to_vec();
                                scram = Some(s);
                                first
                            }
                            Login::Scram {
                                client_key,
                                server_key,
                            } => {
                                let (x, first) =
                                    ClientExchange::new(*client_key, *server_key, &random::<18>());
                                passthrough = Some(x);
                                first.into_bytes()
                            }
                            _ => unreachable!("matched above"),
                        };
                        Some(sasl_initial(scram::MECHANISM, &first))
                    }
                    (Authentication::Sasl { .. }, _) => return Err(cannot("SCRAM-SHA-256")),
                    (Authentication::SaslContinue(data), _) => {
                        let last = match (&mut scram, &mut passthrough) {
                            (Some(s), _) => {
                                s.update(data)?;
                                s.message().to_vec()
                            }
                            (None, Some(x)) => x
                                .respond(data)
                                .map_err(|e| io::Error::other(e.to_string()))?
                                .into_bytes(),
                            _ => return Err(io::Error::other("SASLContinue before SASL")),
                        };
                        Some(Frontend::AuthResponse(&last).to_bytes())
                    }
                    (Authentication::SaslFinal(data), _) => {
                        match (&mut scram, &passthrough) {
                            (Some(s), _) => s.finish(data)?,
                            (None, Some(x)) => x.verify(data).map_err(|_| {
                                denied("the server's SCRAM signature is not the verifier's".into())
                            })?,
                            _ => return Err(io::Error::other("SASLFinal before SASL")),
                        }
                        None
                    }
                    (other, _) => {
                        return Err(denied(format!(
                            "the server asks for authentication method {}, which the portal does not speak",
                            other.code()
                        )))
                    }
                };
                if let Some(reply) = reply {
                    stream.write_all(&reply).await?;
                }
            }
            Message::ParameterStatus { name, value } => {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                params.insert(text(name), text(value));
            }
            Message::BackendKeyData { pid, secret } => key = (pid, secret),
            Message::ErrorResponse(_) => return Err(login_error(body)),
            Message::ReadyForQuery(_) => {
                return Ok(ServerConn::new(stream, params, key, !buf.is_empty()))
            }
            // NoticeResponse, NegotiateProtocolVersion: nothing to do.
            _ => {}
        }
    }
}

/// A PasswordMessage with `text` (a cleartext password or an md5 answer).
fn password_message(text: &str) -> Vec<u8> {
    let mut body = text.as_bytes().to_vec();
    body.push(0);
    Frontend::AuthResponse(&body).to_bytes()
}

/// `N` random bytes from the system's generator.
pub(super) fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    let _ = ring::rand::SystemRandom::new().fill(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use crate::wire::postgres::{error_response, HEADER_LEN};

    /// A server that takes no logins for now reads as refused, like a closed port, so that
    /// the client waits for the failover; a refused login stays a refusal.
    #[test]
    fn a_login_error_says_whether_to_wait() {
        let error = |sqlstate: &str| {
            let m = error_response("FATAL", sqlstate, "no");
            super::login_error(&m[HEADER_LEN..])
        };
        let shutting_down = error("57P03");
        assert_eq!(shutting_down.kind(), ErrorKind::ConnectionRefused);
        assert!(shutting_down.to_string().contains("FATAL 57P03"));
        assert_eq!(error("28P01").kind(), ErrorKind::PermissionDenied);
        assert_eq!(error("3D000").kind(), ErrorKind::PermissionDenied);
        assert_eq!(error("22023").kind(), ErrorKind::InvalidInput);
        assert_eq!(error("42704").kind(), ErrorKind::InvalidInput);
    }

    /// A buffer goes back to its connection emptied, with its capacity; one grown past the
    /// limit is dropped, and one kept already is not replaced.
    #[test]
    fn a_connection_keeps_one_emptied_buffer_of_bounded_size() {
        use super::Buffers;
        let mut slot = Vec::new();
        let mut buf = Vec::with_capacity(100);
        buf.extend_from_slice(b"left over");
        let ptr = buf.as_ptr();
        Buffers::keep(&mut slot, buf);
        assert!(slot.is_empty());
        assert_eq!(slot.as_ptr(), ptr, "the same allocation");
        Buffers::keep(&mut slot, Vec::with_capacity(10));
        assert_eq!(slot.as_ptr(), ptr, "the kept one stays");
        let mut empty = Vec::new();
        Buffers::keep(&mut empty, Vec::with_capacity(Buffers::KEEP + 1));
        assert_eq!(empty.capacity(), 0, "a grown one is dropped");
    }
}
