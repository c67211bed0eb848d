//! What the server connection a pooled PostgreSQL client holds sends back: framed, rows and
//! COPY data streamed through as they come, each other message decoded and handed to the
//! client's [`Machine`](super::machine::Machine), which says what reaches the client;
//! ParameterStatus kept; the connection given back when the machine says a transaction ended
//! (transaction mode); a lost connection (failover, or its pool retired) reported to the
//! machine.
//!
//! May import: `metrics`, `wire` and the rest of `pool`.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::Ordering::Relaxed,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::timeout,
};
use tracing::debug;

use crate::{
    metrics::CloseReason,
    wire::postgres::{
        backend::{is_streamed, Backend},
        error_text, message_len, HEADER_LEN, MAX_MESSAGE,
    },
};

use super::conn::Buffers;
use super::held::Held;
use super::machine::{Lost, ServerStep};
use super::spare;
use super::Client;

pub(super) enum ServerEvent {
    Data(std::io::Result<usize>),
    Retired,
}

/// Polls the held connection (none: pending for ever) for the server's next bytes, onto its
/// buffer. The pool wakes its holders when it is retired ([`Pool::hold`](super::server::Pool)),
/// so the retirement is a flag read here, not a future set up at every turn.
pub(super) fn poll_server(held: Option<&mut Held>, cx: &mut Context<'_>) -> Poll<ServerEvent> {
    let Some(h) = held else {
        return Poll::Pending;
    };
    if h.pool.is_retired() {
        return Poll::Ready(ServerEvent::Retired);
    }
    if h.conn.buffers.read.capacity() - h.conn.buffers.read.len() < 4096 {
        if h.conn.buffers.read.capacity() == 0 {
            h.conn.buffers.read = spare::bytes();
        }
        h.conn.buffers.read.reserve(16 << 10);
    }
    let read = std::pin::pin!(h.conn.stream.read_buf(&mut h.conn.buffers.read));
    read.poll(cx).map(ServerEvent::Data)
}

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(super) async fn write_server(&mut self, out: &[u8]) -> Result<(), CloseReason> {
        let Some(h) = &mut self.held else {
            return Ok(());
        };
        // The common case: the socket takes it all at once, and no timer is set.
        let stream = &mut h.conn.stream;
        let first = std::future::poll_fn(|cx| match Pin::new(&mut *stream).poll_write(cx, out) {
            Poll::Pending => Poll::Ready(Ok(0)),
            done => done,
        })
        .await;
        let wrote = match first {
            Ok(n) if n == out.len() => Ok(Ok(())),
            Ok(n) => timeout(self.config.timeouts.server, stream.write_all(&out[n..])).await,
            Err(e) => Ok(Err(e)),
        };
        match wrote {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.server_lost("writing to the server connection failed")
                    .await
            }
        }
    }

    /// Forwards what the server sent as the machine says, keeping the parameters it reports;
    /// gives the connection back at the end of a transaction (transaction mode).
    ///
    /// Rows, COPY data and the messages the machine lets pass ([`Machine::passes_through`])
    /// go out as they came, without a copy when nothing of the machine's is mixed in: most
    /// replies are written to the client straight from the read buffer.
    ///
    /// [`Machine::passes_through`]: super::machine::Machine::passes_through
    pub(super) async fn server_data(&mut self) -> Result<(), CloseReason> {
        let h = self.held.as_mut().expect("held");
        let mut pos = 0;
        let len = h.conn.buffers.read.len();
        let mut bad = false;
        let mut fatal = None;
        // What the machine wrote, after the bytes passed on before it; `sbuf[run..pos]` is
        // passed on as it is, after `forward`.
        let mut forward = std::mem::take(&mut h.conn.buffers.out);
        let mut run = 0;
        loop {
            if h.skip > 0 {
                let take = h.skip.min(len - pos);
                pos += take;
                h.skip -= take;
                if h.skip > 0 {
                    break;
                }
                continue;
            }
            if len - pos < HEADER_LEN {
                break;
            }
            let tag = h.conn.buffers.read[pos];
            let mlen = message_len(&h.conn.buffers.read[pos..]) as usize;
            if !(4..=MAX_MESSAGE).contains(&mlen) {
                bad = true;
                break;
            }
            // Rows and COPY data are forwarded as they come, whatever their size.
            if is_streamed(tag) {
                h.skip = mlen + 1;
                continue;
            }
            if len - pos < mlen + 1 {
                break;
            }
            if self.machine.passes_through(tag) {
                pos += mlen + 1;
                continue;
            }
            let whole = &h.conn.buffers.read[pos..pos + 1 + mlen];
            let body = &whole[HEADER_LEN..];
            let Ok(msg) = Backend::decode(tag, body) else {
                bad = true;
                break;
            };
            if let Backend::ParameterStatus { name, value } = msg {
                let (k, v) = (
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                );
                super::conn::set_param(&mut h.conn.params, k.clone(), v.clone());
                super::conn::set_param(&mut self.params, k, v);
            }
            // The machine's output goes after what is passed on before it; when that output is
            // the message itself (a ReadyForQuery as the server sent it), it is passed on too,
            // and the reply may still be written from the read buffer.
            let before = forward.len();
            let step = self
                .machine
                .on_server(msg, whole, &mut h.conn.statements, &mut forward);
            if step == ServerStep::Next && before == 0 && forward[..] == *whole {
                forward.clear();
                pos += mlen + 1;
                continue;
            }
            if run < pos {
                forward.splice(
                    before..before,
                    h.conn.buffers.read[run..pos].iter().copied(),
                );
            }
            run = pos;
            match step {
                ServerStep::Next => {
                    pos += mlen + 1;
                    run = pos;
                }
                ServerStep::Ended => {
                    // Left unread: the connection is not given back.
                    fatal = Some(error_text(body));
                    break;
                }
            }
        }
        // Written from the read buffer, taken out of `held` meanwhile.
        let mut sbuf = std::mem::take(&mut h.conn.buffers.read);
        let sent = if forward.is_empty() {
            if run < pos {
                self.send(&sbuf[run..pos]).await
            } else {
                Ok(())
            }
        } else {
            forward.extend_from_slice(&sbuf[run..pos]);
            self.send(&forward).await
        };
        sbuf.drain(..pos);
        match &mut self.held {
            Some(h) => {
                h.conn.buffers.read = sbuf;
                Buffers::keep(&mut h.conn.buffers.out, forward);
            }
            None => spare::give_bytes(forward),
        }
        sent?;
        if bad {
            self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
            return self
                .server_lost("the server sent a malformed message")
                .await;
        }
        if let Some(text) = fatal {
            debug!(error = %text, "the server ended the connection");
            return self
                .server_lost(&format!("the server connection was closed ({text})"))
                .await;
        }
        let h = self.held.as_ref().expect("held");
        if self.machine.release_due() && h.conn.buffers.read.is_empty() && h.skip == 0 {
            self.hub.stats.transactions.fetch_add(1, Relaxed);
            self.release(false);
        }
        Ok(())
    }

    /// The held connection is gone (closed, broken, or its backend stopped leading): the
    /// machine says what the client hears of it.
    pub(super) async fn server_lost(&mut self, why: &str) -> Result<(), CloseReason> {
        let Some(h) = &self.held else { return Ok(()) };
        let midway = h.skip > 0;
        let mut out = Vec::new();
        let lost = self.machine.on_server_lost(why, midway, &mut out);
        self.release(true);
        self.count();
        debug!(why, "server connection lost");
        match lost {
            Lost::Close => Err(CloseReason::Backend),
            Lost::Fatal(text) => Err(self.fatal("08006", &text).await),
            Lost::Continue if out.is_empty() => Ok(()),
            Lost::Continue => self.send(&out).await,
        }
    }
}
