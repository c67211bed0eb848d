//! The server side of multiplexing: per backend a few shared server connections, each with
//! one writer task (it batches the queued commands of many clients into one write) and one
//! reader task (it finds where each reply ends and hands it to the client waiting for it,
//! through a FIFO of reply slots); and a small pool of dedicated connections for pinned
//! clients, cleaned with RESET (then AUTH) before they serve anyone else; and a connection of
//! its own for a command that must reach a server busy with a script. Also the counters
//! `/metrics` and `/status` read.
//!
//! May import: `config`, `health`, `metrics`, `route`, `tls`, `wire` and the rest of
//! `multiplex`.

use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, watch, Notify, Semaphore},
    time::timeout,
};
use tracing::{debug, info, warn};

use super::commands::PinReason;
use crate::{
    config::{Backend, Config},
    health::{CredentialsSource, HealthView, ProbeCredentials},
    tls::{BackendConnector, MaybeTls},
    wire::resp::{encode, scan_reply},
};

/// A server connection: TCP, or TLS when `tls.backend` is on.
pub type ServerStream = MaybeTls<TcpStream>;

/// The reply to a command in flight on a connection to a node that stopped leading.
pub const TRYAGAIN: &[u8] =
    b"-TRYAGAIN the leader changed; the command may or may not have been applied\r\n";
/// The reply to a command in flight on a server connection that broke.
pub const LOST: &[u8] =
    b"-ERR the server connection was lost; the command may or may not have been applied\r\n";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where one client's replies wait for it. Readers of server connections append; the client
/// task takes them. Never blocks a reader: past `limit` unread bytes the client is cut.
#[derive(Debug)]
pub struct Sink {
    inner: Mutex<SinkInner>,
    pub notify: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
pub struct SinkInner {
    pub buf: Vec<u8>,
    /// Replies received for this client (including error replies made up for it).
    pub delivered: u64,
    /// The client left more than `limit` bytes unread: it is to be closed.
    pub cut: bool,
}

impl Sink {
    pub fn new(limit: usize) -> Sink {
        Sink {
            inner: Mutex::default(),
            notify: Notify::new(),
            limit,
        }
    }

    /// Appends `replies` replies (`bytes`). Returns true when this cuts the client.
    pub fn deliver(&self, bytes: &[u8], replies: u64) -> bool {
        let mut g = lock(&self.inner);
        g.delivered += replies;
        let mut cut_now = false;
        if !g.cut {
            if g.buf.len() + bytes.len() > self.limit {
                g.cut = true;
                g.buf = Vec::new();
                cut_now = true;
            } else {
                g.buf.extend_from_slice(bytes);
            }
        }
        drop(g);
        self.notify.notify_one();
        cut_now
    }

    /// `replies` copies of the error reply `error`.
    pub fn fail(&self, error: &[u8], replies: u64) -> bool {
        self.deliver(&error.repeat(replies as usize), replies)
    }

    pub fn lock(&self) -> MutexGuard<'_, SinkInner> {
        lock(&self.inner)
    }
}

/// Commands of one client, queued for a server connection.
pub struct Request {
    pub data: Vec<u8>,
    pub replies: u32,
    pub sink: Arc<Sink>,
}

struct Slot {
    sink: Arc<Sink>,
    replies: u32,
}

#[derive(Default)]
struct Fifo {
    slots: VecDeque<Slot>,
    dead: bool,
}

/// One shared server connection.
pub struct ServerConn {
    pub backend: Arc<str>,
    tx: mpsc::UnboundedSender<Request>,
    /// One permit per command that may be in flight (`maxInFlight`).
    pub permits: Arc<Semaphore>,
    max_in_flight: usize,
    dead: AtomicBool,
    fifo: Mutex<Fifo>,
    kill: watch::Sender<bool>,
    stats: Arc<MuxStats>,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("backend", &self.backend)
            .field("dead", &self.is_dead())
            .finish_non_exhaustive()
    }
}

impl ServerConn {
    pub fn is_dead(&self) -> bool {
        self.dead.load(Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.permits.available_permits())
    }

    /// Queues `request`; when the connection is gone the request comes back.
    pub fn send(&self, request: Request) -> Result<(), Request> {
        if self.is_dead() {
            return Err(request);
        }
        self.tx.send(request).map_err(|e| e.0)
    }

    /// Marks the connection dead: nothing more is written to it, and every command in flight
    /// gets `error` as its reply.
    pub fn fail(&self, error: &[u8], current: Option<(Arc<Sink>, u32)>) {
        let slots = {
            let mut fifo = lock(&self.fifo);
            let first = !fifo.dead;
            fifo.dead = true;
            self.dead.store(true, Relaxed);
            if first {
                self.stats.server_connections_closed.fetch_add(1, Relaxed);
            }
            std::mem::take(&mut fifo.slots)
        };
        self.permits.close();
        let _ = self.kill.send(true);
        let mut failed = 0u64;
        if let Some((sink, n)) = current {
            failed += u64::from(n);
            sink.fail(error, u64::from(n));
        }
        for slot in slots {
            failed += u64::from(slot.replies);
            slot.sink.fail(error, u64::from(slot.replies));
        }
        self.stats.replies_failed.fetch_add(failed, Relaxed);
    }
}

/// What a new server connection needs: where, TLS, and the probe credentials to log in with.
#[derive(Clone)]
pub struct DialContext {
    pub config: Arc<Config>,
    pub connector: Option<BackendConnector>,
    pub credentials: Arc<dyn CredentialsSource>,
}

impl DialContext {
    fn credentials(&self) -> Result<Option<ProbeCredentials>, String> {
        self.credentials.credentials(&self.config.health)
    }
}

/// The AUTH (and nothing else when there are no credentials) a server connection logs in with.
fn login(creds: &Option<ProbeCredentials>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(c) = creds {
        match &c.username {
            Some(user) => encode(&mut out, &["AUTH", user, &c.password]),
            None => encode(&mut out, &["AUTH", &c.password]),
        }
    }
    out
}

/// Reads `n` replies and checks none is an error (the login's, RESET's).
async fn expect_ok(stream: &mut ServerStream, n: usize) -> io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    let mut seen = 0;
    let mut pos = 0;
    while seen < n {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection during login",
            ));
        }
        while let Some(s) = scan_reply(&buf[pos..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        {
            if s.kind == b'-' {
                let text = String::from_utf8_lossy(&buf[pos + 1..pos + s.len - 2]).into_owned();
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, text));
            }
            pos += s.len;
            seen += 1;
        }
    }
    Ok(())
}

/// Opens and logs in one server connection to `backend`, within `timeouts.connect`.
pub async fn dial(ctx: &DialContext, backend: &Backend) -> io::Result<ServerStream> {
    let deadline = ctx.config.timeouts.connect;
    let work = async {
        let tcp = match backend.address.ip() {
            Some(ip) => TcpStream::connect((ip, backend.address.port)).await?,
            None => {
                TcpStream::connect((backend.address.host.as_str(), backend.address.port)).await?
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut stream = match &ctx.connector {
            None => MaybeTls::Plain(tcp),
            Some(connector) => {
                let name = connector
                    .server_name_for(&backend.address.host)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                connector
                    .handshake(tcp, name, None)
                    .await
                    .map_err(|e| io::Error::other(e.to_string()))?
            }
        };
        let creds = ctx.credentials().map_err(io::Error::other)?;
        let auth = login(&creds);
        if !auth.is_empty() {
            stream.write_all(&auth).await?;
            expect_ok(&mut stream, 1).await?;
        }
        Ok(stream)
    };
    timeout(deadline, work).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {deadline:?}"),
        ))
    })
}

/// Sends `command` (one, whole) on `stream`, a connection opened for it alone, and returns
/// its reply within `deadline`; `None` when the server closes the connection instead, as a
/// SHUTDOWN that succeeds does. The connection is closed afterwards.
pub async fn send_alone(
    mut stream: ServerStream,
    command: &[u8],
    deadline: Duration,
) -> io::Result<Option<Vec<u8>>> {
    let exchange = async {
        stream.write_all(command).await?;
        let mut buf = Vec::with_capacity(256);
        loop {
            if let Some(s) = scan_reply(&buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            {
                buf.truncate(s.len);
                return Ok(Some(buf));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(None);
            }
        }
    };
    timeout(deadline, exchange).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no reply within {deadline:?}"),
        ))
    })
}

/// The server connections of one backend.
pub struct BackendPool {
    pub name: Arc<str>,
    /// `name/address`: what routing decides on.
    base: String,
    backend: Backend,
    shared: Vec<Mutex<Option<Arc<ServerConn>>>>,
    opening: Vec<tokio::sync::Mutex<()>>,
    idle_pinned: Mutex<Vec<ServerStream>>,
    /// Dedicated connections open (idle or held).
    pinned_open: AtomicUsize,
    pinned_freed: Notify,
    retired: AtomicBool,
    stats: Arc<MuxStats>,
}

impl std::fmt::Debug for BackendPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendPool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl BackendPool {
    /// Shared connections alive now.
    pub fn alive(&self) -> usize {
        self.shared
            .iter()
            .filter(|s| lock(s).as_ref().is_some_and(|c| !c.is_dead()))
            .count()
    }

    pub fn in_flight(&self) -> usize {
        self.shared
            .iter()
            .filter_map(|s| lock(s).clone())
            .map(|c| c.in_flight())
            .sum()
    }

    pub fn pinned_open(&self) -> usize {
        self.pinned_open.load(Relaxed)
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    /// Shared connection `i % serverConnections`, opened if it is not (or no longer) alive.
    pub async fn shared(
        self: &Arc<Self>,
        i: usize,
        ctx: &DialContext,
        max_in_flight: usize,
    ) -> io::Result<Arc<ServerConn>> {
        let i = i % self.shared.len();
        if let Some(c) = lock(&self.shared[i]).as_ref().filter(|c| !c.is_dead()) {
            return Ok(c.clone());
        }
        let _opening = self.opening[i].lock().await;
        if let Some(c) = lock(&self.shared[i]).as_ref().filter(|c| !c.is_dead()) {
            return Ok(c.clone());
        }
        if self.is_retired() {
            return Err(io::Error::other("the backend no longer takes commands"));
        }
        let stream = dial(ctx, &self.backend).await?;
        let conn = start(stream, self.name.clone(), max_in_flight, self.stats.clone());
        if self.is_retired() {
            conn.fail(TRYAGAIN, None);
            return Err(io::Error::other("the backend no longer takes commands"));
        }
        self.stats.server_connections_opened.fetch_add(1, Relaxed);
        debug!(backend = %self.name, slot = i, "shared server connection open");
        *lock(&self.shared[i]) = Some(conn.clone());
        Ok(conn)
    }

    /// A dedicated connection for a pinned client: an idle one, a new one within `max`, or
    /// the next one freed within `wait`.
    pub async fn take_pinned(
        self: &Arc<Self>,
        ctx: &DialContext,
        max: usize,
        wait: Duration,
    ) -> io::Result<PinnedConn> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.pinned_freed.notified();
            if self.is_retired() {
                return Err(io::Error::other("the backend no longer takes commands"));
            }
            if let Some(stream) = lock(&self.idle_pinned).pop() {
                return Ok(PinnedConn {
                    stream: Some(stream),
                    pool: self.clone(),
                });
            }
            let open = self.pinned_open.load(Relaxed);
            if open < max
                && self
                    .pinned_open
                    .compare_exchange(open, open + 1, Relaxed, Relaxed)
                    .is_ok()
            {
                // Holds the place: dropped on a failed dial, it frees it.
                let mut conn = PinnedConn {
                    stream: None,
                    pool: self.clone(),
                };
                conn.stream = Some(dial(ctx, &self.backend).await?);
                return Ok(conn);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no dedicated server connection free within {wait:?} (pooling.queueTimeout)"),
                ));
            }
        }
    }

    /// Stops using this backend: shared connections fail their commands in flight with
    /// `error`, idle dedicated ones close. New connections open lazily when it is routable
    /// again.
    pub fn retire(&self, error: &[u8]) {
        for slot in &self.shared {
            if let Some(conn) = lock(slot).take() {
                conn.fail(error, None);
            }
        }
        let idle = std::mem::take(&mut *lock(&self.idle_pinned));
        self.pinned_open.fetch_sub(idle.len(), Relaxed);
        self.pinned_freed.notify_waiters();
    }

    fn revive(&self) {
        self.retired.store(false, Relaxed);
    }
}

/// A dedicated server connection held by a pinned client; closing it (dropping) frees its
/// place, [`PinnedConn::release`] cleans it for the next client.
pub struct PinnedConn {
    stream: Option<ServerStream>,
    pool: Arc<BackendPool>,
}

impl std::fmt::Debug for PinnedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedConn")
            .field("backend", &self.pool.name)
            .finish_non_exhaustive()
    }
}

impl PinnedConn {
    pub fn stream(&mut self) -> &mut ServerStream {
        self.stream
            .as_mut()
            .expect("a held connection has its stream")
    }

    pub fn backend(&self) -> &Arc<str> {
        &self.pool.name
    }

    /// Cleans the connection with RESET (then AUTH again) and gives it back to the pool; a
    /// connection that does not answer both is closed instead.
    pub fn release(mut self, ctx: DialContext) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        let pool = self.pool.clone();
        // The place stays counted while the connection is cleaned; `self` no longer holds it.
        std::mem::forget(self);
        tokio::spawn(async move {
            let creds = ctx.credentials().ok().flatten();
            let mut out = Vec::new();
            encode(&mut out, &["RESET"]);
            let auth = login(&creds);
            let replies = 1 + usize::from(!auth.is_empty());
            out.extend_from_slice(&auth);
            let clean = timeout(ctx.config.timeouts.connect, async {
                stream.write_all(&out).await?;
                expect_ok(&mut stream, replies).await
            })
            .await;
            if matches!(clean, Ok(Ok(()))) && !pool.is_retired() {
                pool.stats.pinned_reused.fetch_add(1, Relaxed);
                lock(&pool.idle_pinned).push(stream);
            } else {
                debug!(backend = %pool.name, "a dedicated connection did not clean up; closed");
                pool.pinned_open.fetch_sub(1, Relaxed);
            }
            pool.pinned_freed.notify_one();
        });
    }
}

impl Drop for PinnedConn {
    fn drop(&mut self) {
        self.pool.pinned_open.fetch_sub(1, Relaxed);
        self.pool.pinned_freed.notify_one();
    }
}

/// Starts the writer and reader of a new shared connection.
fn start(
    stream: ServerStream,
    backend: Arc<str>,
    max_in_flight: usize,
    stats: Arc<MuxStats>,
) -> Arc<ServerConn> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (kill, killed) = watch::channel(false);
    let conn = Arc::new(ServerConn {
        backend,
        tx,
        permits: Arc::new(Semaphore::new(max_in_flight)),
        max_in_flight,
        dead: AtomicBool::new(false),
        fifo: Mutex::default(),
        kill,
        stats,
    });
    let (rd, wr) = tokio::io::split(stream);
    tokio::spawn(writer(conn.clone(), rx, wr, killed.clone()));
    tokio::spawn(reader(conn.clone(), rd, killed));
    conn
}

/// Largest batch written at once.
const BATCH_BYTES: usize = 256 << 10;

async fn writer(
    conn: Arc<ServerConn>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    mut wr: tokio::io::WriteHalf<ServerStream>,
    mut killed: watch::Receiver<bool>,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut slots: Vec<Slot> = Vec::new();
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = killed.changed() => break,
        };
        buf.clear();
        let mut commands = u64::from(first.replies);
        buf.extend_from_slice(&first.data);
        slots.push(Slot {
            sink: first.sink,
            replies: first.replies,
        });
        while buf.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    commands += u64::from(r.replies);
                    buf.extend_from_slice(&r.data);
                    slots.push(Slot {
                        sink: r.sink,
                        replies: r.replies,
                    });
                }
                Err(_) => break,
            }
        }
        {
            // Checked under the FIFO's lock: once a connection is marked dead (its node
            // demoted) no batch is written to it.
            let mut fifo = lock(&conn.fifo);
            if fifo.dead {
                drop(fifo);
                for slot in slots.drain(..) {
                    slot.sink.fail(TRYAGAIN, u64::from(slot.replies));
                }
                break;
            }
            fifo.slots.extend(slots.drain(..));
        }
        conn.stats.record_batch(commands);
        let wrote = tokio::select! {
            r = wr.write_all(&buf) => r.is_ok(),
            _ = killed.changed() => false,
        };
        if !wrote {
            break;
        }
    }
    conn.fail(LOST, None);
    rx.close();
    while let Ok(r) = rx.try_recv() {
        r.sink.fail(TRYAGAIN, u64::from(r.replies));
    }
}

async fn reader(
    conn: Arc<ServerConn>,
    mut rd: tokio::io::ReadHalf<ServerStream>,
    mut killed: watch::Receiver<bool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut start = 0;
    let mut current: Option<Slot> = None;
    let error = 'read: loop {
        if start == buf.len() {
            buf.clear();
            start = 0;
        } else if start > 32 << 10 {
            buf.drain(..start);
            start = 0;
        }
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = killed.changed() => break 'read TRYAGAIN,
        };
        match read {
            Ok(0) | Err(_) => break LOST,
            Ok(_) => {}
        }
        let mut run_start = start;
        let mut run: u64 = 0;
        loop {
            if current.is_none() {
                if run > 0 {
                    run_start = start;
                    run = 0;
                }
                current = lock(&conn.fifo).slots.pop_front();
                if current.is_none() {
                    if start < buf.len() {
                        warn!(backend = %conn.backend, "a reply arrived that no command asked for; closing the server connection");
                        break 'read LOST;
                    }
                    break;
                }
            }
            let slot = current.as_mut().expect("set above");
            match scan_reply(&buf[start..]) {
                Ok(Some(s)) => {
                    start += s.len;
                    run += 1;
                    slot.replies -= 1;
                    if slot.replies == 0 {
                        let slot = current.take().expect("set above");
                        slot.sink.deliver(&buf[run_start..start], run);
                        conn.permits.add_permits(run as usize);
                        run = 0;
                        run_start = start;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(backend = %conn.backend, error = %e, "unreadable reply; closing the server connection");
                    break 'read LOST;
                }
            }
        }
        if run > 0 {
            let slot = current.as_ref().expect("a partial run has its slot");
            slot.sink.deliver(&buf[run_start..start], run);
            conn.permits.add_permits(run as usize);
        }
    };
    conn.fail(error, current.map(|s| (s.sink, s.replies)));
}

/// Counters of the multiplexer, read by `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct MuxStats {
    pub clients: AtomicI64,
    pub commands: AtomicU64,
    pub batches: AtomicU64,
    /// Batches of at most 1, 2, 4, … 512 commands, and more.
    pub batch_buckets: [AtomicU64; BATCH_BUCKETS.len() + 1],
    pub pinned: [AtomicI64; PinReason::ALL.len()],
    pub pins: [AtomicU64; PinReason::ALL.len()],
    pub pinned_reused: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub malformed: AtomicU64,
    pub replies_failed: AtomicU64,
    pub server_connections_opened: AtomicU64,
    pub server_connections_closed: AtomicU64,
    /// Commands sent on a server connection opened for them alone (SCRIPT KILL, FUNCTION
    /// KILL, SHUTDOWN).
    pub out_of_band: AtomicU64,
}

/// Upper bounds of the batch size histogram's buckets.
pub const BATCH_BUCKETS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

impl MuxStats {
    fn record_batch(&self, commands: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.commands.fetch_add(commands, Relaxed);
        let i = BATCH_BUCKETS
            .iter()
            .position(|&b| commands <= b)
            .unwrap_or(BATCH_BUCKETS.len());
        self.batch_buckets[i].fetch_add(1, Relaxed);
    }

    pub fn pin(&self, reason: PinReason, delta: i64) {
        let i = PinReason::ALL
            .iter()
            .position(|&r| r == reason)
            .expect("listed");
        self.pinned[i].fetch_add(delta, Relaxed);
        if delta > 0 {
            self.pins[i].fetch_add(1, Relaxed);
        }
    }
}

/// The multiplexer of one portal: its pools by backend, and the task that retires the pools
/// of backends that may no longer take commands (a demoted leader).
#[derive(Debug, Default)]
pub struct Hub {
    pools: Mutex<HashMap<String, Arc<BackendPool>>>,
    pub stats: Arc<MuxStats>,
    next_client: AtomicU64,
    watching: OnceLock<()>,
}

impl Hub {
    pub fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Relaxed) + 1
    }

    /// The pool of `backend` (by name and address, so a changed address gets a new one).
    ///
    /// The shared connections are per data-plane thread (`shared: true`, `server_connections`
    /// of them on the calling thread): their reader then wakes clients of its own thread, with
    /// no wake-up crossing threads per reply. Dedicated connections are one pool for all.
    pub fn pool(
        &self,
        backend: &Backend,
        shared: bool,
        server_connections: usize,
    ) -> Arc<BackendPool> {
        let base = format!("{}/{}", backend.name, backend.address);
        let key = if shared {
            format!("{base}@{:?}", std::thread::current().id())
        } else {
            base.clone()
        };
        let server_connections = if shared { server_connections } else { 0 };
        let mut pools = lock(&self.pools);
        let pool = pools.entry(key).or_insert_with(|| {
            Arc::new(BackendPool {
                name: backend.name.as_str().into(),
                base,
                backend: backend.clone(),
                shared: (0..server_connections).map(|_| Mutex::new(None)).collect(),
                opening: (0..server_connections)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                idle_pinned: Mutex::default(),
                pinned_open: AtomicUsize::new(0),
                pinned_freed: Notify::new(),
                retired: AtomicBool::new(false),
                stats: self.stats.clone(),
            })
        });
        pool.revive();
        pool.clone()
    }

    /// Every pool, for metrics and status.
    pub fn pools(&self) -> Vec<Arc<BackendPool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// Starts (once) the task that retires the pools of backends no longer routable.
    pub fn watch(
        self: &Arc<Self>,
        config: watch::Receiver<Arc<Config>>,
        health: watch::Receiver<HealthView>,
    ) {
        if self.watching.set(()).is_err() {
            return;
        }
        crate::session::on_route_change(self, config, health, Self::retire_unroutable);
    }

    /// Retires every pool whose backend may not take commands under `config` and `view`.
    /// Administrative states (drain, maint) do not retire a pool: like open sessions, the
    /// commands in flight finish; new commands go elsewhere (`Client::target`).
    pub fn retire_unroutable(&self, config: &Config, view: &HealthView) {
        let eligible = crate::session::routable_bases(config, view);
        let waiting = config.routing == crate::config::RoutingMode::Leader && eligible.is_empty();
        for pool in lock(&self.pools).values() {
            if eligible.contains(&pool.base) || pool.is_retired() {
                continue;
            }
            // Without a leader (failover under way) the old one is retired all the same: it
            // may be the demoted node, and nothing may be written to it.
            pool.retired.store(true, Relaxed);
            info!(backend = %pool.name, leaderless = waiting, "backend no longer takes commands: its server connections are replaced");
            pool.retire(TRYAGAIN);
        }
    }
}
