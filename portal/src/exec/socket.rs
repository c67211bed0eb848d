//! The executor's sockets ([`Socket`]) and its poller's registrations ([`Poller`]): a socket
//! is registered with the poller of the thread that made it, and the poller's events mark it
//! ready and wake the future waiting on it, whichever thread that future is polled on.
//!
//! A direction stays ready until a call comes back short or would block, as
//! [`crate::splice::Tcp`]'s do: a read shorter than asked means the kernel's queue is drained,
//! so the next read waits for an event instead of returning `EAGAIN`.
//!
//! May import: nothing of the portal.

use std::{
    cell::RefCell,
    io::{self, IoSlice, Read, Write},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering::SeqCst},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
};

use mio::{Events, Interest, Token};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::error;

/// What one read goes into before it is copied to the caller's buffer (initialized once per
/// thread: a read into the caller's uninitialized memory would need `unsafe`).
const CHUNK: usize = 16 * 1024;

thread_local! {
    /// The poller of this thread's executor, while it runs.
    static HERE: RefCell<Option<Arc<Poller>>> = const { RefCell::new(None) };
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A lock whose holder's panic does not poison it for the others.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An executor's poller as every thread reaches it: its registry and the state of each
/// socket registered with it, by token.
pub(super) struct Poller {
    registry: mio::Registry,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    states: Vec<Option<Arc<IoState>>>,
    free: Vec<usize>,
}

impl Poller {
    pub(super) fn new(registry: mio::Registry) -> Poller {
        Poller {
            registry,
            slots: Mutex::new(Slots::default()),
        }
    }

    /// Makes `poller` this thread's (`None`: none).
    pub(super) fn install(poller: Option<Arc<Poller>>) {
        HERE.with(|h| *h.borrow_mut() = poller);
    }

    /// Marks the sockets of `events` ready and wakes the futures waiting on them.
    pub(super) fn dispatch(&self, events: &Events) {
        let slots = lock(&self.slots);
        for event in events.iter() {
            let Some(Some(state)) = slots.states.get(event.token().0) else {
                continue;
            };
            let failed = event.is_error();
            if event.is_readable() || event.is_read_closed() || failed {
                state.read.signal(event.is_read_closed() || failed);
            }
            if event.is_writable() || event.is_write_closed() || failed {
                state.write.signal(event.is_write_closed() || failed);
            }
        }
    }
}

/// One direction of a socket as the poller reports it: a count of its events, whether the
/// peer closed it (or it failed), and the waker of the future waiting for the next event.
///
/// The end stays visible once reported: a FIN that comes with the last bytes is one event,
/// and the read of those bytes comes back short, which would otherwise wait for an event that
/// already came.
#[derive(Default)]
struct Side {
    events: AtomicU32,
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Side {
    fn signal(&self, closed: bool) {
        if closed {
            self.closed.store(true, SeqCst);
        }
        self.events.fetch_add(1, SeqCst);
        if let Some(w) = lock(&self.waker).as_ref() {
            w.wake_by_ref();
        }
    }
}

#[derive(Default)]
struct IoState {
    read: Side,
    write: Side,
}

/// What the socket's owner knows of one direction: ready until a call comes back short or
/// would block, then ready again once the poller counted an event after the last one seen.
#[derive(Debug, Clone, Copy)]
struct Readiness {
    ready: bool,
    seen: u32,
}

impl Readiness {
    fn poll(&mut self, side: &Side, cx: &mut Context<'_>) -> Poll<()> {
        if self.ready {
            return Poll::Ready(());
        }
        let fresh = |r: &mut Readiness| {
            let e = side.events.load(SeqCst);
            if e != r.seen {
                r.seen = e;
                r.ready = true;
            }
            r.ready || side.closed.load(SeqCst)
        };
        if fresh(self) {
            return Poll::Ready(());
        }
        {
            let mut w = lock(&side.waker);
            match w.as_ref() {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        // An event counted between the first look and the waker's registration woke no one.
        if fresh(self) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A TCP socket registered with the poller of the executor of the thread that made it.
pub struct Socket {
    stream: mio::net::TcpStream,
    state: Arc<IoState>,
    token: usize,
    poller: Arc<Poller>,
    read: Readiness,
    write: Readiness,
    /// Read system calls issued, for the tests.
    #[cfg(test)]
    pub(super) reads: usize,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Socket {
    /// `stream` (nonblocking) registered with this thread's executor's poller; given back
    /// where the thread has none.
    pub fn here(stream: std::net::TcpStream) -> Result<Socket, std::net::TcpStream> {
        let Some(poller) = HERE.with(|h| h.borrow().clone()) else {
            return Err(stream);
        };
        let state = Arc::new(IoState::default());
        let token = {
            let mut slots = lock(&poller.slots);
            match slots.free.pop() {
                Some(t) => {
                    slots.states[t] = Some(state.clone());
                    t
                }
                None => {
                    slots.states.push(Some(state.clone()));
                    slots.states.len() - 1
                }
            }
        };
        let mut stream = mio::net::TcpStream::from_std(stream);
        if let Err(e) = poller.registry.register(
            &mut stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            error!(error = %e, "a socket could not be registered with the executor's poller");
            let mut slots = lock(&poller.slots);
            slots.states[token] = None;
            slots.free.push(token);
            return Err(stream.into());
        }
        let fresh = Readiness {
            ready: true,
            seen: 0,
        };
        Ok(Socket {
            stream,
            state,
            token,
            poller,
            read: fresh,
            write: fresh,
            #[cfg(test)]
            reads: 0,
        })
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.local_addr()
    }

    /// Reads only if the poller reported the socket readable since the last read that drained
    /// it (`WouldBlock` otherwise, without a system call), registering no waker.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.read.ready {
            let e = self.state.read.events.load(SeqCst);
            if e == self.read.seen && !self.state.read.closed.load(SeqCst) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.read = Readiness {
                ready: true,
                seen: e,
            };
        }
        match self.stream.read(buf) {
            Ok(n) => {
                if n != 0 && n < buf.len() {
                    self.read.ready = false;
                }
                Ok(n)
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.read.ready = false;
                }
                Err(e)
            }
        }
    }

    /// Calls `io` once the direction is ready; a call that moves fewer bytes than `want`
    /// (the kernel's queue is drained, or its buffer full) or would block ends the readiness.
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        reading: bool,
        want: usize,
        mut io: impl FnMut(&mut mio::net::TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            let (readiness, side) = if reading {
                (&mut self.read, &self.state.read)
            } else {
                (&mut self.write, &self.state.write)
            };
            if readiness.poll(side, cx).is_pending() {
                return Poll::Pending;
            }
            #[cfg(test)]
            if reading {
                self.reads += 1;
            }
            match io(&mut self.stream) {
                Ok(n) => {
                    if n != 0 && n < want {
                        readiness.ready = false;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => readiness.ready = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = self.poller.registry.deregister(&mut self.stream);
        let mut slots = lock(&self.poller.slots);
        slots.states[self.token] = None;
        slots.free.push(self.token);
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining().min(CHUNK);
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = self.get_mut();
        if this.read.poll(&this.state.read, cx).is_pending() {
            return Poll::Pending;
        }
        BUFFER.with(|cell| {
            let mut chunk = cell.borrow_mut();
            if chunk.len() != CHUNK {
                chunk.resize(CHUNK, 0);
            }
            let n = std::task::ready!(
                this.poll_io(cx, true, want, |s| { s.read(&mut chunk[..want]) })
            )?;
            buf.put_slice(&chunk[..n]);
            Poll::Ready(Ok(()))
        })
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_io(cx, false, buf.len(), |s| s.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let want = bufs.iter().map(|b| b.len()).sum();
        self.get_mut()
            .poll_io(cx, false, want, |s| s.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.shutdown(std::net::Shutdown::Write))
    }
}
