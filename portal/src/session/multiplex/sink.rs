//! Where one multiplexed client's replies wait for it ([`Sink`]): the readers of the shared
//! server connections append, the client's task takes them; or, while the task waits with
//! nothing of its own to write, the readers write them straight to the client's socket (no
//! wake-up of the task per reply); and the mutex lock the multiplexer's files share (a
//! poisoned lock is taken over, its data being plain counts and buffers).
//!
//! May import: `metrics`, `splice` and `tls` (the client's stream).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    task::{Context, Waker},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    metrics::{Direction, Metrics},
    splice::Tcp,
    tls::MaybeTls,
};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A multiplexed client's stream: plain TCP lets the shared connections' readers write
/// replies to it straight (see `sink`); TLS does not.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn straight(&self) -> Option<Weak<TcpStream>> {
        None
    }
}

impl ClientStream for Tcp {
    fn straight(&self) -> Option<Weak<TcpStream>> {
        Some(self.writer())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientStream for MaybeTls<S> {}

/// Where one client's replies wait for it. Readers of server connections append; the client
/// task takes them. Never blocks a reader: past `limit` unread bytes the client is cut.
#[derive(Debug)]
pub struct Sink {
    inner: Mutex<SinkInner>,
    /// Something was delivered since the client's task last looked ([`Sink::replied`]).
    ready: AtomicBool,
    limit: usize,
    /// The client's socket (plain TCP only), for replies written straight.
    straight: Option<Weak<TcpStream>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
pub struct SinkInner {
    pub buf: Vec<u8>,
    /// Replies received for this client (including error replies made up for it).
    pub delivered: u64,
    /// The client left more than `limit` bytes unread: it is to be closed.
    pub cut: bool,
    /// The client's task, woken by a delivery (registered once: a task's waker does not
    /// change).
    waker: Option<Waker>,
    /// Replies go straight to the client's socket: set by its task as it goes to wait with
    /// nothing of its own to write (and nothing waits here), taken back whenever the task
    /// runs, or by a reply the socket did not take whole ([`Sink::let_straight`]).
    open: bool,
}

impl Sink {
    pub fn new(limit: usize, straight: Option<Weak<TcpStream>>, metrics: Arc<Metrics>) -> Sink {
        Sink {
            inner: Mutex::default(),
            ready: AtomicBool::new(false),
            limit,
            straight,
            metrics,
        }
    }

    /// Appends `replies` replies (`bytes`), or writes them straight to the client while its
    /// task lets them (what the socket does not take waits here, and the task is woken).
    /// Returns true when this cuts the client.
    pub fn deliver(&self, bytes: &[u8], replies: u64) -> bool {
        let mut g = lock(&self.inner);
        g.delivered += replies;
        let mut bytes = bytes;
        if g.open {
            let n = self.write_straight(bytes);
            if n == bytes.len() {
                return false;
            }
            g.open = false;
            bytes = &bytes[n..];
        }
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
        self.ready.store(true, Ordering::Release);
        if let Some(w) = &g.waker {
            w.wake_by_ref();
        }
        cut_now
    }

    /// Whether something was delivered since the last call (which the client's task makes
    /// with `register` at its first poll, recording its waker for the deliveries to come):
    /// an atomic swap, no waiter list to join at every turn.
    pub fn replied(&self, cx: &Context<'_>, register: bool) -> bool {
        if register {
            lock(&self.inner).waker = Some(cx.waker().clone());
        }
        self.ready.swap(false, Ordering::AcqRel)
    }

    /// Writes what the client's socket takes now, without waiting.
    fn write_straight(&self, bytes: &[u8]) -> usize {
        let Some(stream) = self.straight.as_ref().and_then(Weak::upgrade) else {
            return 0;
        };
        let mut done = 0;
        while done < bytes.len() {
            match stream.try_write(&bytes[done..]) {
                Ok(n) if n > 0 => done += n,
                _ => break,
            }
        }
        if done > 0 {
            self.metrics
                .add_bytes(Direction::BackendToClient, done as u64);
        }
        done
    }

    /// Lets replies go straight to the client's socket, or takes that back. The client's
    /// task lets them only while it waits with nothing of its own to write, and takes it
    /// back whenever it runs, so that a straight reply never overtakes what it writes. True
    /// when they now go straight (never while replies wait here).
    pub fn let_straight(&self, open: bool) -> bool {
        let mut g = lock(&self.inner);
        g.open = open && self.straight.is_some() && g.buf.is_empty() && !g.cut;
        g.open
    }

    /// `replies` copies of the error reply `error`.
    pub fn fail(&self, error: &[u8], replies: u64) -> bool {
        self.deliver(&error.repeat(replies as usize), replies)
    }

    pub fn lock(&self) -> MutexGuard<'_, SinkInner> {
        lock(&self.inner)
    }
}
