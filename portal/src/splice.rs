//! The session's byte pump: both directions in one future, half-close respected, an
//! inactivity deadline per direction, and no buffer held while a session is idle.
//!
//! Reads go into a buffer on the poll's stack, which exists only during the poll, and are
//! written straight through. Only bytes the destination cannot take at once are copied to
//! the heap, and that copy is freed as soon as it drains. An idle session therefore costs
//! its sockets, its timer and this struct, whatever the stream type (TCP, TLS, ...).
//!
//! Inactivity is tracked by storing the instant of the last progress in each direction; the
//! single timer is re-armed only when it fires, never on the data path.
//!
//! The read buffer is one initialized 64 KiB buffer per worker thread, borrowed for the
//! duration of a read and its write-through: no session owns it, and nothing is zeroed per
//! read. [`Tcp`] is the socket type the data plane reads from: a read shorter than the buffer
//! means the kernel's receive queue is drained, so it waits for the next readiness event
//! instead of issuing a read that would only return `EAGAIN`. A read into uninitialized
//! memory (the multiplexed clients' buffers) is tokio's own, which does the same and does not
//! zero the memory first; a pooled client's socket is its executor's ([`crate::exec`]),
//! which reads into an initialized buffer of its thread and copies what came.
//!
//! May import: `exec` (its socket type), `metrics`.

use std::{
    cell::RefCell,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Weak},
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

use crate::metrics::{CloseReason, Direction, Metrics};

/// Size of the buffer one read goes into.
pub const READ_SIZE: usize = 64 * 1024;

thread_local! {
    /// The read buffer of the sessions polled on this thread, allocated on first use.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's read buffer (initialized, [`READ_SIZE`] bytes).
fn with_buffer<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() != READ_SIZE {
                buf.resize(READ_SIZE, 0);
            }
            f(&mut buf)
        }
        // A pump polled from inside another one (not done by the data plane) gets its own.
        Err(_) => f(&mut vec![0; READ_SIZE]),
    })
}

/// A TCP socket as the data plane uses it: tokio's [`TcpStream`], except that a read or write
/// that moves fewer bytes than asked clears the readiness. The kernel returns a short read
/// only when the receive queue is empty (and a short write only when the send buffer is
/// full), so the next call would be `EAGAIN`; skipping it saves one system call per burst and
/// direction. The readiness snapshot is taken before the call (inside `try_io`), so an event
/// that arrives meanwhile is kept, and a peer's FIN stays visible (tokio never clears the
/// closed state).
///
/// The stream is reference-counted so that another task may write to it while this one owns
/// it ([`Tcp::writer`]: the multiplexer's readers write replies straight to an idle client);
/// every call goes through `&TcpStream`, whose readiness tokio keeps for any number of
/// callers. The socket closes when this owner drops it, unless a writer is in the middle of
/// a write (then right after it).
///
/// A pooled PostgreSQL client's socket is instead registered with its thread's executor
/// ([`Tcp::here`], [`crate::exec::Socket`]), which does the same with its own readiness.
#[derive(Debug)]
pub struct Tcp {
    io: Io,
    /// Read system calls issued, for the tests.
    #[cfg(test)]
    reads: usize,
}

#[derive(Debug)]
enum Io {
    Tokio(Arc<TcpStream>),
    Polled(Box<crate::exec::Socket>),
}

impl Tcp {
    pub fn new(stream: TcpStream) -> Tcp {
        Tcp {
            io: Io::Tokio(Arc::new(stream)),
            #[cfg(test)]
            reads: 0,
        }
    }

    /// `stream` moved to this thread's executor, if it has one (else as [`Tcp::new`]).
    pub fn here(stream: TcpStream) -> io::Result<Tcp> {
        if !crate::exec::is_here() {
            return Ok(Tcp::new(stream));
        }
        let io = match crate::exec::Socket::here(stream.into_std()?) {
            Ok(socket) => Io::Polled(Box::new(socket)),
            Err(std) => Io::Tokio(Arc::new(TcpStream::from_std(std)?)),
        };
        Ok(Tcp {
            io,
            #[cfg(test)]
            reads: 0,
        })
    }

    #[cfg(test)]
    fn get_ref(&self) -> &TcpStream {
        match &self.io {
            Io::Tokio(s) => s,
            Io::Polled(_) => panic!("a socket of the executor's"),
        }
    }

    /// The local address of the socket.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match &self.io {
            Io::Tokio(s) => s.local_addr(),
            Io::Polled(s) => s.local_addr(),
        }
    }

    /// Reads only if the runtime saw the socket readable since the last read that drained
    /// it (`WouldBlock` otherwise), registering no waker.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.io {
            Io::Tokio(s) => s.try_read(buf),
            Io::Polled(s) => s.try_read(buf),
        }
    }

    /// A handle through which another task may write while this `Tcp` lives (none for a
    /// socket of the executor's).
    pub fn writer(&self) -> Weak<TcpStream> {
        match &self.io {
            Io::Tokio(s) => Arc::downgrade(s),
            Io::Polled(_) => Weak::new(),
        }
    }

    /// Calls `io` (a read or a write of `want` bytes) once the socket is ready for
    /// `interest`, clearing the readiness after an `EAGAIN` or a short call.
    fn poll_io(
        stream: &TcpStream,
        cx: &mut Context<'_>,
        interest: Interest,
        want: usize,
        mut io: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if interest.is_readable() {
                ready!(stream.poll_read_ready(cx))?;
            } else {
                ready!(stream.poll_write_ready(cx))?;
            }
            let mut short = 0;
            // The outer `try_io` snapshots the readiness before the call and clears exactly
            // that snapshot when the closure reports `WouldBlock`, which it does after a
            // short call (keeping the count in `short`).
            let r = stream.try_io(interest, || {
                let n = io(stream)?;
                if n != 0 && n < want {
                    short = n;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match r {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if short != 0 {
                        return Poll::Ready(Ok(short));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining();
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = self.get_mut();
        match &mut this.io {
            // Into the unfilled part, initialized or not (tokio's read does not zero it
            // first); the read advances `buf`.
            Io::Tokio(s) => {
                ready!(Tcp::poll_io(s, cx, Interest::READABLE, want, |s| {
                    #[cfg(test)]
                    {
                        this.reads += 1;
                    }
                    s.try_read_buf(buf)
                }))?;
                Poll::Ready(Ok(()))
            }
            Io::Polled(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tokio(s) => {
                Tcp::poll_io(s, cx, Interest::WRITABLE, buf.len(), |s| s.try_write(buf))
            }
            Io::Polled(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tokio(s) => {
                let want = bufs.iter().map(|b| b.len()).sum();
                Tcp::poll_io(s, cx, Interest::WRITABLE, want, |s| {
                    s.try_write_vectored(bufs)
                })
            }
            Io::Polled(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            // What tokio's own shutdown does, through `&TcpStream`.
            Io::Tokio(s) => {
                Poll::Ready(socket2::SockRef::from(&**s).shutdown(std::net::Shutdown::Write))
            }
            Io::Polled(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Reads per direction per poll before yielding to other sessions.
const BUDGET: usize = 16;

/// How a splice ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached end of stream and were shut down.
    Done,
    /// No progress from the client for the client timeout.
    ClientIdle,
    /// No progress from the backend for the server timeout.
    ServerIdle,
    /// A read or write failed.
    Error(io::Error),
}

impl Outcome {
    pub fn reason(&self) -> CloseReason {
        match self {
            Outcome::Done => CloseReason::Done,
            Outcome::ClientIdle => CloseReason::ClientTimeout,
            Outcome::ServerIdle => CloseReason::ServerTimeout,
            Outcome::Error(_) => CloseReason::Error,
        }
    }
}

/// One direction's state.
#[derive(Debug)]
struct Half {
    /// Bytes read but not yet written; `None` almost always.
    pending: Option<Vec<u8>>,
    pos: usize,
    read_done: bool,
    shut_done: bool,
    need_flush: bool,
    last: Instant,
    idle: Duration,
    /// Bytes read in this direction.
    bytes: u64,
}

impl Half {
    fn new(now: Instant, idle: Duration, initial: Vec<u8>) -> Half {
        Half {
            pending: (!initial.is_empty()).then_some(initial),
            pos: 0,
            read_done: false,
            shut_done: false,
            need_flush: false,
            last: now,
            idle,
            bytes: 0,
        }
    }

    fn finished(&self) -> bool {
        self.read_done && self.shut_done
    }

    /// When this direction times out; `None` when it has finished reading and has nothing
    /// left to write.
    fn deadline(&self) -> Option<Instant> {
        let done_reading = self.read_done && self.pending.is_none();
        (!self.finished() && !done_reading).then(|| self.last + self.idle)
    }
}

pin_project! {
    /// Copies client→backend and backend→client until both are done, either fails, or one
    /// direction is idle past its timeout. Dropping it closes both streams.
    pub struct Splice<C, S> {
        client: C,
        server: S,
        c2s: Half,
        s2c: Half,
        metrics: Arc<Metrics>,
        #[pin]
        timer: Sleep,
    }
}

impl<C, S> Splice<C, S>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// `to_server` is written to the backend before anything else (a PROXY header, bytes
    /// that arrived with the client's PROXY header).
    pub fn new(
        client: C,
        server: S,
        client_idle: Duration,
        server_idle: Duration,
        to_server: Vec<u8>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let now = Instant::now();
        Splice {
            client,
            server,
            c2s: Half::new(now, client_idle, to_server),
            s2c: Half::new(now, server_idle, Vec::new()),
            metrics,
            timer: tokio::time::sleep_until(now + client_idle.min(server_idle)),
        }
    }
}

impl<C, S> Splice<C, S> {
    /// Bytes copied so far: (client to backend, backend to client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.c2s.bytes, self.s2c.bytes)
    }
}

impl<C, S> Future for Splice<C, S>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut this = self.project();
        if !this.c2s.finished() {
            let r = pump(
                cx,
                this.client,
                this.server,
                this.c2s,
                this.metrics,
                Direction::ClientToBackend,
            );
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Outcome::Error(e));
            }
        }
        if !this.s2c.finished() {
            let r = pump(
                cx,
                this.server,
                this.client,
                this.s2c,
                this.metrics,
                Direction::BackendToClient,
            );
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Outcome::Error(e));
            }
        }
        if this.c2s.finished() && this.s2c.finished() {
            return Poll::Ready(Outcome::Done);
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let c = this.c2s.deadline();
            let s = this.s2c.deadline();
            if c.is_some_and(|d| d <= now) {
                return Poll::Ready(Outcome::ClientIdle);
            }
            if s.is_some_and(|d| d <= now) {
                return Poll::Ready(Outcome::ServerIdle);
            }
            let next = match (c, s) {
                (Some(c), Some(s)) => c.min(s),
                (Some(d), None) | (None, Some(d)) => d,
                // Only shutdowns are left; they are not timed.
                (None, None) => now + Duration::from_secs(86_400),
            };
            this.timer.as_mut().reset(next);
        }
        Poll::Pending
    }
}

/// Moves bytes from `src` to `dst` until `src` would block (Pending), `src` ended and `dst`
/// was shut down (Ready(Ok)), or an error (Ready(Err)). Reads go into this thread's buffer.
fn pump<R, W>(
    cx: &mut Context<'_>,
    src: &mut R,
    dst: &mut W,
    h: &mut Half,
    metrics: &Metrics,
    dir: Direction,
) -> Poll<io::Result<()>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    with_buffer(|buf| {
        let mut budget = BUDGET;
        let mut rb = ReadBuf::new(buf);
        loop {
            if let Some(buf) = &h.pending {
                while h.pos < buf.len() {
                    let n = ready!(Pin::new(&mut *dst).poll_write(cx, &buf[h.pos..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    h.pos += n;
                    h.last = Instant::now();
                }
                h.pending = None;
                h.pos = 0;
                h.need_flush = true;
            }
            if h.read_done {
                if h.need_flush {
                    ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                    h.need_flush = false;
                }
                if !h.shut_done {
                    ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                    h.shut_done = true;
                }
                return Poll::Ready(Ok(()));
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            budget -= 1;

            rb.clear();
            match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if h.need_flush {
                        // Pending here only registers the waker; a later poll finishes it.
                        if let Poll::Ready(r) = Pin::new(&mut *dst).poll_flush(cx) {
                            r?;
                            h.need_flush = false;
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = rb.filled();
            if data.is_empty() {
                h.read_done = true;
                continue;
            }
            h.last = Instant::now();
            metrics.add_bytes(dir, data.len() as u64);
            h.bytes += data.len() as u64;
            let mut off = 0;
            while off < data.len() {
                match Pin::new(&mut *dst).poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => off += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            h.need_flush = true;
            if off < data.len() {
                // The destination is full: keep the rest (its waker is registered) and stop
                // reading until it drains.
                h.pending = Some(data[off..].to_vec());
                h.pos = 0;
                return Poll::Pending;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        tokio::io::duplex(64)
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, portal_client) = pair();
        let (portal_server, mut server) = pair();
        let metrics = Arc::new(Metrics::default());
        let splice = Splice::new(
            portal_client,
            portal_server,
            Duration::from_secs(10),
            Duration::from_secs(10),
            b"hello ".to_vec(),
            metrics.clone(),
        );
        let task = tokio::spawn(splice);
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            // The other direction still works after our FIN.
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..6], b"hello ");
        assert_eq!(&got[6..], &big[..]);
        server
            .write_all(b"reply after the client's FIN")
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after the client's FIN");
        assert!(matches!(task.await.unwrap(), Outcome::Done));
        assert_eq!(metrics.bytes(Direction::ClientToBackend), 100_000);
        assert_eq!(metrics.bytes(Direction::BackendToClient), 28);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_directions_time_out() {
        let (mut client, portal_client) = pair();
        let (portal_server, _server) = pair();
        let splice = Splice::new(
            portal_client,
            portal_server,
            Duration::from_secs(5),
            Duration::from_secs(60),
            Vec::new(),
            Arc::new(Metrics::default()),
        );
        let task = tokio::spawn(splice);
        // Activity before the deadline keeps the session; then silence ends it.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            client.write_all(b"x").await.unwrap();
        }
        let start = Instant::now();
        let outcome = task.await.unwrap();
        assert!(matches!(outcome, Outcome::ClientIdle), "{outcome:?}");
        assert!(start.elapsed() >= Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn server_silence_times_out() {
        let (_client, portal_client) = pair();
        let (portal_server, _server) = pair();
        let splice = Splice::new(
            portal_client,
            portal_server,
            Duration::from_secs(60),
            Duration::from_secs(2),
            Vec::new(),
            Arc::new(Metrics::default()),
        );
        assert!(matches!(splice.await, Outcome::ServerIdle));
    }

    async fn tcp_pair() -> (Tcp, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (Tcp::new(ours), peer)
    }

    /// Polls one read once: `None` when it is pending.
    async fn read_once(tcp: &mut Tcp, buf: &mut [u8]) -> Option<usize> {
        std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(buf);
            Poll::Ready(match Pin::new(&mut *tcp).poll_read(cx, &mut rb) {
                Poll::Ready(r) => {
                    r.unwrap();
                    Some(rb.filled().len())
                }
                Poll::Pending => None,
            })
        })
        .await
    }

    /// Reads until something arrives (bounded: a lost wake-up fails the test).
    async fn read_some(tcp: &mut Tcp, buf: &mut [u8]) -> usize {
        tokio::time::timeout(Duration::from_secs(10), tcp.read(buf))
            .await
            .expect("no wake-up after new data or FIN")
            .unwrap()
    }

    #[tokio::test]
    async fn a_short_read_waits_for_readiness_instead_of_reading_again() {
        let (mut tcp, mut peer) = tcp_pair().await;
        let mut buf = [0u8; 64];
        peer.write_all(b"0123456789").await.unwrap();
        tcp.get_ref().readable().await.unwrap();
        assert_eq!(read_once(&mut tcp, &mut buf).await, Some(10));
        assert_eq!(tcp.reads, 1);
        // Drained: the next poll waits for readiness without a system call.
        assert_eq!(read_once(&mut tcp, &mut buf).await, None);
        assert_eq!(tcp.reads, 1, "a read after a short read");
        // New data wakes the reader again.
        peer.write_all(b"more").await.unwrap();
        assert_eq!(read_some(&mut tcp, &mut buf).await, 4);
        assert_eq!(&buf[..4], b"more");
        // Data followed by FIN: the short read does not hide the end of the stream.
        peer.write_all(b"last").await.unwrap();
        peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        loop {
            let n = read_some(&mut tcp, &mut buf).await;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"last");
    }

    /// Uninitialized memory (a `Vec`'s spare capacity, as the pooled clients read into) gets
    /// the bytes as they come, a short read included, and the end of the stream after them.
    #[tokio::test]
    async fn a_read_into_spare_capacity_gets_every_byte_and_the_end() {
        let (mut tcp, mut peer) = tcp_pair().await;
        let mut got: Vec<u8> = Vec::with_capacity(64);
        peer.write_all(b"0123456789").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read_buf(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((n, &got[..]), (10, &b"0123456789"[..]));
        // Drained: the next poll waits.
        let pending = std::future::poll_fn(|cx| {
            let mut spare = [std::mem::MaybeUninit::<u8>::uninit(); 16];
            let mut rb = ReadBuf::uninit(&mut spare);
            Poll::Ready(Pin::new(&mut tcp).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        assert!(pending, "a read after a short read found data");
        peer.write_all(b"last").await.unwrap();
        peer.shutdown().await.unwrap();
        loop {
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read_buf(&mut got))
                .await
                .expect("no wake-up after new data or FIN")
                .unwrap();
            if n == 0 {
                break;
            }
        }
        assert_eq!(got, b"0123456789last");
    }

    #[tokio::test]
    async fn a_full_read_keeps_reading() {
        let (mut tcp, mut peer) = tcp_pair().await;
        peer.write_all(&[7u8; 100]).await.unwrap();
        tcp.get_ref().readable().await.unwrap();
        let mut buf = [0u8; 40];
        assert_eq!(read_once(&mut tcp, &mut buf).await, Some(40));
        assert_eq!(read_once(&mut tcp, &mut buf).await, Some(40));
        assert_eq!(read_once(&mut tcp, &mut buf).await, Some(20));
        assert_eq!(tcp.reads, 3);
        assert_eq!(read_once(&mut tcp, &mut buf).await, None);
        assert_eq!(tcp.reads, 3);
        // A FIN alone (no data) is an immediate end of stream.
        drop(peer);
        assert_eq!(read_some(&mut tcp, &mut buf).await, 0);
    }

    #[tokio::test]
    async fn splices_tcp_both_ways() {
        let (client_side, mut client) = tcp_pair().await;
        let (server_side, mut server) = tcp_pair().await;
        let metrics = Arc::new(Metrics::default());
        let task = tokio::spawn(Splice::new(
            client_side,
            server_side,
            Duration::from_secs(10),
            Duration::from_secs(10),
            Vec::new(),
            metrics.clone(),
        ));
        // Request/response rounds of odd sizes, then a bulk transfer larger than the buffer.
        for round in 1..50usize {
            let request = vec![round as u8; round * 37];
            client.write_all(&request).await.unwrap();
            let mut got = vec![0u8; request.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, request);
            server.write_all(&request[..round]).await.unwrap();
            let mut back = vec![0u8; round];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, request[..round]);
        }
        let big: Vec<u8> = (0..(3 * READ_SIZE + 123) as u32).map(|i| i as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == big, "bulk bytes differ");
        let client = writer.await.unwrap();
        drop(server);
        let outcome = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Done), "{outcome:?}");
        drop(client);
    }

    #[tokio::test]
    async fn a_failing_side_ends_the_splice() {
        let (client, portal_client) = pair();
        let (portal_server, server) = pair();
        drop(server);
        let splice = Splice::new(
            portal_client,
            portal_server,
            Duration::from_secs(60),
            Duration::from_secs(60),
            b"data for a closed peer".to_vec(),
            Arc::new(Metrics::default()),
        );
        let outcome = splice.await;
        assert!(matches!(outcome, Outcome::Error(_)), "{outcome:?}");
        drop(client);
    }
}
