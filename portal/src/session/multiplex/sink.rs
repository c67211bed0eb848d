//! Where one multiplexed client's replies wait for it ([`Sink`]): the readers of the shared
//! server connections append, the client's task takes them; and the mutex lock the
//! multiplexer's files share (a poisoned lock is taken over, its data being plain counts and
//! buffers).
//!
//! May import: nothing outside `multiplex`.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard,
    },
    task::{Context, Waker},
};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where one client's replies wait for it. Readers of server connections append; the client
/// task takes them. Never blocks a reader: past `limit` unread bytes the client is cut.
#[derive(Debug)]
pub struct Sink {
    inner: Mutex<SinkInner>,
    /// Something was delivered since the client's task last looked ([`Sink::replied`]).
    ready: AtomicBool,
    limit: usize,
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
}

impl Sink {
    pub fn new(limit: usize) -> Sink {
        Sink {
            inner: Mutex::default(),
            ready: AtomicBool::new(false),
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

    /// `replies` copies of the error reply `error`.
    pub fn fail(&self, error: &[u8], replies: u64) -> bool {
        self.deliver(&error.repeat(replies as usize), replies)
    }

    pub fn lock(&self) -> MutexGuard<'_, SinkInner> {
        lock(&self.inner)
    }
}
