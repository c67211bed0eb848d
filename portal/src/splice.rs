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

use std::{
    future::Future,
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use crate::metrics::{CloseReason, Direction, Metrics};

/// Size of the stack buffer one read goes into.
pub const READ_SIZE: usize = 64 * 1024;
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
/// was shut down (Ready(Ok)), or an error (Ready(Err)).
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
    let mut budget = BUDGET;
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

        let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut rb = ReadBuf::uninit(&mut stack);
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
