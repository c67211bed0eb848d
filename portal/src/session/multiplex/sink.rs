//! Where one multiplexed client's replies wait for it ([`Sink`]): the readers of the shared
//! server connections append, the client's task takes them; and the mutex lock the
//! multiplexer's files share (a poisoned lock is taken over, its data being plain counts and
//! buffers).
//!
//! May import: nothing outside `multiplex`.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
