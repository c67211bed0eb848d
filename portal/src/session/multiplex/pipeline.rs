//! A shared server connection of multiplexing ([`ServerConn`]): one writer task batches the
//! queued commands of many clients into one write, one reader task finds where each reply
//! ends and hands it to the client waiting for it, through a FIFO of reply slots. A
//! connection that breaks, or whose node stops leading, fails every command in flight.
//!
//! May import: `wire` and the rest of `multiplex` below it (`conn`, `sink`, `stats`).

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore},
};
use tracing::warn;

use super::conn::ServerStream;
use super::sink::{lock, Sink};
use super::stats::MuxStats;
use crate::wire::resp::scan_reply;

/// The reply to a command in flight on a connection to a node that stopped leading.
pub const TRYAGAIN: &[u8] =
    b"-TRYAGAIN the leader changed; the command may or may not have been applied\r\n";
/// The reply to a command in flight on a server connection that broke.
pub const LOST: &[u8] =
    b"-ERR the server connection was lost; the command may or may not have been applied\r\n";

/// Commands of one client, queued for a server connection, with their places under
/// `maxInFlight`: each reply delivered gives one back, and whatever ends the request (the
/// replies in, the connection failed, the request never written) gives back the rest.
pub struct Request {
    pub data: Vec<u8>,
    pub replies: u32,
    /// Commands the server may hold without answering (scripts, functions, any command while
    /// a CLIENT PAUSE is in effect), counted in [`ServerConn::may_be_held`] (by the sender,
    /// before it queues the request) until the last reply is in.
    pub held: u32,
    pub sink: Arc<Sink>,
    pub in_flight: Option<OwnedSemaphorePermit>,
}

struct Slot {
    sink: Arc<Sink>,
    replies: u32,
    held: u32,
    in_flight: Option<OwnedSemaphorePermit>,
}

impl Slot {
    fn of(r: Request) -> Slot {
        Slot {
            sink: r.sink,
            replies: r.replies,
            held: r.held,
            in_flight: r.in_flight,
        }
    }

    /// `n` replies delivered: their places under `maxInFlight` are free.
    fn delivered(&mut self, n: u64) {
        if let Some(p) = self.in_flight.as_mut() {
            drop(p.split(n as usize));
        }
    }
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
    /// Commands queued or running on the connection that the server may hold (see
    /// [`Request::held`]).
    pub held: AtomicU32,
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

    /// Whether a command the server may hold (a script, a command under CLIENT PAUSE) is
    /// queued or running here: the server may then read nothing more from this connection
    /// for a while, answering other connections meanwhile.
    pub fn may_be_held(&self) -> bool {
        self.held.load(Relaxed) > 0
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

/// Starts the writer and reader of a new shared connection.
pub(super) fn start(
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
        held: AtomicU32::new(0),
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
    // Kept across the loop's turns: a new one would join the watch's waiters (a lock) at
    // every batch.
    let killed = killed.changed();
    tokio::pin!(killed);
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = &mut killed => break,
        };
        buf.clear();
        let mut commands = u64::from(first.replies);
        buf.extend_from_slice(&first.data);
        slots.push(Slot::of(first));
        while buf.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    commands += u64::from(r.replies);
                    buf.extend_from_slice(&r.data);
                    slots.push(Slot::of(r));
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
            biased;
            r = wr.write_all(&buf) => r.is_ok(),
            _ = &mut killed => false,
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
    let killed = killed.changed();
    tokio::pin!(killed);
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
            biased;
            r = rd.read_buf(&mut buf) => r,
            _ = &mut killed => break 'read TRYAGAIN,
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
                        // Dropped with its last places under maxInFlight.
                        let slot = current.take().expect("set above");
                        if slot.held > 0 {
                            conn.held.fetch_sub(slot.held, Relaxed);
                        }
                        slot.sink.deliver(&buf[run_start..start], run);
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
            let slot = current.as_mut().expect("a partial run has its slot");
            slot.sink.deliver(&buf[run_start..start], run);
            slot.delivered(run);
        }
    };
    conn.fail(error, current.map(|s| (s.sink, s.replies)));
}
