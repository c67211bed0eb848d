//! A shared server connection of multiplexing ([`ServerConn`]): clients queue their commands
//! in its `Queue` (bytes appended to one buffer, a reply slot each, room taken under
//! `maxInFlight`), one writer task writes whatever has gathered in one write, one reader task
//! finds where each reply ends and hands it to the client waiting for it. A connection that
//! breaks, or whose node stops leading, fails every command in flight.
//!
//! One lock covers the queue: a client's request is appended under it (no channel, no copy
//! of its own, no semaphore), the writer swaps the gathered bytes out under it, the reader
//! takes the next slot and gives back room under it.
//!
//! May import: `wire` and the rest of `multiplex` below it (`conn`, `sink`, `stats`).

use std::{
    collections::VecDeque,
    future::{poll_fn, Future},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};
use tracing::warn;

use super::conn::ServerStream;
use super::sink::{lock, Sink};
use super::stats::MuxStats;
use crate::wire::resp::scan_reply;

/// The reply to a command in flight on a connection to a node that stopped leading, and to
/// a command queued but not written when its connection ended.
pub const TRYAGAIN: &[u8] =
    b"-TRYAGAIN the leader changed; the command may or may not have been applied\r\n";
/// The reply to a command in flight on a server connection that broke.
pub const LOST: &[u8] =
    b"-ERR the server connection was lost; the command may or may not have been applied\r\n";

/// Where the replies to one client's run of commands go.
struct Slot {
    sink: Arc<Sink>,
    replies: u32,
    /// Commands the server may hold without answering (scripts, functions, any command while
    /// a CLIENT PAUSE is in effect), counted in [`ServerConn::may_be_held`] until the last
    /// reply is in.
    held: u32,
}

/// What is queued on a connection, under its one lock.
#[derive(Default)]
struct Queue {
    /// Commands not written yet, of the last `unwritten` slots.
    out: Vec<u8>,
    out_commands: u64,
    /// Every request queued or written and not fully answered, in order.
    slots: VecDeque<Slot>,
    /// The last slots whose bytes are still in `out`.
    unwritten: usize,
    /// Commands queued or awaiting replies (at most `maxInFlight`).
    in_flight: usize,
    /// Clients waiting for room under `maxInFlight`, first come first served.
    waiting: VecDeque<(u64, Waker)>,
    tickets: u64,
    /// The writer, asleep until something is queued.
    writer: Option<Waker>,
    dead: bool,
}

impl Queue {
    /// Appends a request whose room is taken; returns the writer's waker if it sleeps.
    fn push(&mut self, data: &[u8], count: u32, held: u32, sink: &Arc<Sink>) -> Option<Waker> {
        self.out.extend_from_slice(data);
        self.out_commands += u64::from(count);
        self.unwritten += 1;
        self.slots.push_back(Slot {
            sink: sink.clone(),
            replies: count,
            held,
        });
        self.writer.take()
    }

    /// `n` commands answered: their room under `maxInFlight` is free. Returns the first
    /// waiting client's waker, if one waits.
    fn release(&mut self, n: usize) -> Option<Waker> {
        self.in_flight -= n;
        self.waiting.front().map(|(_, w)| w.clone())
    }
}

/// One shared server connection.
pub struct ServerConn {
    pub backend: Arc<str>,
    max_in_flight: usize,
    dead: AtomicBool,
    /// Commands queued or running on the connection that the server may hold (see
    /// `Slot::held`).
    pub held: AtomicU32,
    /// `in_flight` of the queue, for the metrics (read without the lock).
    in_flight: AtomicUsize,
    queue: Mutex<Queue>,
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
        self.in_flight.load(Relaxed)
    }

    /// Queues `count` commands (`data`) whose replies go to `sink`, `held` of them commands
    /// the server may hold, once `maxInFlight` leaves room for them (waiting behind the
    /// clients that waited first). False when the connection is gone: nothing was queued.
    pub async fn send(&self, data: &[u8], count: u32, held: u32, sink: &Arc<Sink>) -> bool {
        match self.enqueue(data, count, held, sink, false) {
            Some(queued) => queued,
            None => {
                let room = Room {
                    conn: self,
                    count,
                    ticket: None,
                };
                room.await && self.enqueue(data, count, held, sink, true) == Some(true)
            }
        }
    }

    /// Queues a request under one lock, and wakes the writer: true when queued, false when
    /// the connection is gone; `None` when it must wait for room first (no room taken yet,
    /// `has_room` false, and others waiting or `maxInFlight` reached).
    fn enqueue(
        &self,
        data: &[u8],
        count: u32,
        held: u32,
        sink: &Arc<Sink>,
        has_room: bool,
    ) -> Option<bool> {
        let writer = {
            let mut q = lock(&self.queue);
            if q.dead {
                return Some(false);
            }
            if !has_room {
                if !(q.waiting.is_empty() && self.fits(&q, count)) {
                    return None;
                }
                q.in_flight += count as usize;
            }
            self.record(&q, held);
            q.push(data, count, held, sink)
        };
        if let Some(w) = writer {
            w.wake();
        }
        Some(true)
    }

    fn fits(&self, q: &Queue, count: u32) -> bool {
        q.in_flight == 0 || q.in_flight + count as usize <= self.max_in_flight
    }

    fn record(&self, q: &Queue, held: u32) {
        if held > 0 {
            // Counted before it is queued, so that a client choosing a connection after this
            // one passes this connection over (see `BackendPool::shared`).
            self.held.fetch_add(held, Relaxed);
        }
        self.in_flight.store(q.in_flight, Relaxed);
    }

    /// `n` commands answered: their room is free. Returns the first waiting client's waker.
    fn give_back(&self, q: &mut Queue, n: usize) -> Option<Waker> {
        if n == 0 || q.dead {
            return None;
        }
        let waiting = q.release(n);
        self.in_flight.store(q.in_flight, Relaxed);
        waiting
    }

    /// Marks the connection dead: nothing more is written to it; every command written gets
    /// `error` as its reply (`current`: the request the reader was answering), every command
    /// not written yet TRYAGAIN, and every client waiting for room is told.
    pub fn fail(&self, error: &[u8], current: Option<(Arc<Sink>, u32)>) {
        let (slots, unwritten, waiting, writer) = {
            let mut q = lock(&self.queue);
            let first = !q.dead;
            q.dead = true;
            self.dead.store(true, Relaxed);
            if first {
                self.stats.server_connections_closed.fetch_add(1, Relaxed);
            }
            q.out = Vec::new();
            q.in_flight = 0;
            self.in_flight.store(0, Relaxed);
            let unwritten = std::mem::take(&mut q.unwritten);
            (
                std::mem::take(&mut q.slots),
                unwritten,
                std::mem::take(&mut q.waiting),
                q.writer.take(),
            )
        };
        let _ = self.kill.send(true);
        for (_, w) in waiting {
            w.wake();
        }
        if let Some(w) = writer {
            w.wake();
        }
        let mut failed = 0u64;
        if let Some((sink, n)) = current {
            failed += u64::from(n);
            sink.fail(error, u64::from(n));
        }
        let written = slots.len() - unwritten;
        for (i, slot) in slots.into_iter().enumerate() {
            if slot.held > 0 {
                self.held.fetch_sub(slot.held, Relaxed);
            }
            failed += u64::from(slot.replies);
            let reply = if i < written { error } else { TRYAGAIN };
            slot.sink.fail(reply, u64::from(slot.replies));
        }
        self.stats.replies_failed.fetch_add(failed, Relaxed);
    }
}

/// A client's wait for room under `maxInFlight`: ready with true once the room is taken (the
/// commands counted in flight), false when the connection died. Leaving the line (the client
/// closed) lets the next one in.
struct Room<'a> {
    conn: &'a ServerConn,
    count: u32,
    ticket: Option<u64>,
}

impl Future for Room<'_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let this = self.get_mut();
        let mut q = lock(&this.conn.queue);
        if q.dead {
            this.ticket = None;
            return Poll::Ready(false);
        }
        let first = q.waiting.front().map(|&(t, _)| t);
        let turn = match this.ticket {
            None => first.is_none(),
            Some(t) => first == Some(t),
        };
        if turn && this.conn.fits(&q, this.count) {
            q.in_flight += this.count as usize;
            if this.ticket.take().is_some() {
                q.waiting.pop_front();
            }
            // The next in line may fit too.
            let next = q.waiting.front().map(|(_, w)| w.clone());
            drop(q);
            if let Some(w) = next {
                w.wake();
            }
            return Poll::Ready(true);
        }
        match this.ticket {
            Some(t) => {
                if let Some(entry) = q.waiting.iter_mut().find(|(id, _)| *id == t) {
                    entry.1.clone_from(cx.waker());
                }
            }
            None => {
                q.tickets += 1;
                let t = q.tickets;
                q.waiting.push_back((t, cx.waker().clone()));
                this.ticket = Some(t);
            }
        }
        Poll::Pending
    }
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        let Some(t) = self.ticket else { return };
        let mut q = lock(&self.conn.queue);
        let was_first = q.waiting.front().is_some_and(|&(id, _)| id == t);
        q.waiting.retain(|&(id, _)| id != t);
        let next = was_first
            .then(|| q.waiting.front().map(|(_, w)| w.clone()))
            .flatten();
        drop(q);
        if let Some(w) = next {
            w.wake();
        }
    }
}

/// Starts the writer and reader of a new shared connection.
pub(super) fn start(
    stream: ServerStream,
    backend: Arc<str>,
    max_in_flight: usize,
    stats: Arc<MuxStats>,
) -> Arc<ServerConn> {
    let (kill, killed) = watch::channel(false);
    let conn = Arc::new(ServerConn {
        backend,
        max_in_flight,
        dead: AtomicBool::new(false),
        held: AtomicU32::new(0),
        in_flight: AtomicUsize::new(0),
        queue: Mutex::default(),
        kill,
        stats,
    });
    let (rd, wr) = tokio::io::split(stream);
    tokio::spawn(writer(conn.clone(), wr, killed.clone()));
    tokio::spawn(reader(conn.clone(), rd, killed));
    conn
}

async fn writer(
    conn: Arc<ServerConn>,
    mut wr: tokio::io::WriteHalf<ServerStream>,
    mut killed: watch::Receiver<bool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    // Kept across the loop's turns: a new one would join the watch's waiters (a lock) at
    // every batch.
    let killed = killed.changed();
    tokio::pin!(killed);
    loop {
        // Everything gathered since the last write, swapped out under the lock. Checked
        // there: once a connection is marked dead (its node demoted) nothing more is written.
        let commands = poll_fn(|cx| {
            let mut q = lock(&conn.queue);
            if q.dead {
                return Poll::Ready(None);
            }
            if q.out.is_empty() {
                if !q.writer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    q.writer = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            buf.clear();
            std::mem::swap(&mut buf, &mut q.out);
            q.unwritten = 0;
            Poll::Ready(Some(std::mem::take(&mut q.out_commands)))
        });
        let commands = tokio::select! {
            biased;
            c = commands => match c { Some(c) => c, None => break },
            _ = &mut killed => break,
        };
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
        // Commands answered whose room under maxInFlight is not given back yet: given back
        // with the next slot's taking, under the same lock.
        let mut answered = 0usize;
        loop {
            if current.is_none() {
                if run > 0 {
                    run_start = start;
                    run = 0;
                }
                let (next, waiting) = {
                    let mut q = lock(&conn.queue);
                    let waiting = conn.give_back(&mut q, std::mem::take(&mut answered));
                    // A slot whose bytes are not written yet has no reply coming.
                    let next = (q.slots.len() > q.unwritten)
                        .then(|| q.slots.pop_front())
                        .flatten();
                    (next, waiting)
                };
                if let Some(w) = waiting {
                    w.wake();
                }
                current = next;
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
                        if slot.held > 0 {
                            conn.held.fetch_sub(slot.held, Relaxed);
                        }
                        slot.sink.deliver(&buf[run_start..start], run);
                        answered += run as usize;
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
            answered += run as usize;
        }
        if answered > 0 {
            let waiting = conn.give_back(&mut lock(&conn.queue), answered);
            if let Some(w) = waiting {
                w.wake();
            }
        }
    };
    conn.fail(error, current.map(|s| (s.sink, s.replies)));
}
