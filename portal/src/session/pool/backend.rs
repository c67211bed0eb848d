//! What the server connection a pooled PostgreSQL client holds sends back: forwarded to the
//! client in order with the portal's own answers, ReadyForQuery followed (status `I` gives the
//! connection back in transaction mode), ParameterStatus kept; a lost connection (failover)
//! fails the transaction in flight and nothing else.
//!
//! May import: `metrics`, `wire` and the rest of `pool`.

use std::sync::atomic::Ordering::Relaxed;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::timeout,
};
use tracing::debug;

use crate::{
    metrics::CloseReason,
    wire::postgres::{
        error_response, message_len, parse_parameter_status, ready_for_query, ReadyStatus,
        HEADER_LEN, MAX_MESSAGE,
    },
};

use super::held::{due_locals, Expect, Held};
use super::Client;

pub(super) enum ServerEvent {
    Data(std::io::Result<usize>),
    Retired,
}

pub(super) async fn server_event(held: Option<&mut Held>) -> ServerEvent {
    let Some(h) = held else {
        return std::future::pending().await;
    };
    if h.sbuf.capacity() - h.sbuf.len() < 4096 {
        h.sbuf.reserve(16 << 10);
    }
    tokio::select! {
        r = h.conn.stream.read_buf(&mut h.sbuf) => ServerEvent::Data(r),
        _ = h.retired.wait_for(|r| *r) => ServerEvent::Retired,
    }
}

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(super) async fn write_server(&mut self, out: &[u8]) -> Result<(), CloseReason> {
        let Some(h) = &mut self.held else {
            return Ok(());
        };
        let wrote = timeout(self.config.timeouts.server, h.conn.stream.write_all(out)).await;
        match wrote {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.server_lost("writing to the server connection failed")
                    .await
            }
        }
    }

    /// Forwards what the server sent, following ReadyForQuery, ParameterStatus and the
    /// answers the client waits for (the portal's own answers go in between, its own
    /// messages' answers are dropped); gives the connection back at the end of a transaction
    /// (transaction mode).
    pub(super) async fn server_data(&mut self) -> Result<(), CloseReason> {
        let h = self.held.as_mut().expect("held");
        let mut pos = 0;
        let len = h.sbuf.len();
        let mut bad = false;
        let mut fatal = None;
        let mut forward: Vec<u8> = Vec::with_capacity(len);
        loop {
            if h.skip > 0 {
                let take = h.skip.min(len - pos);
                forward.extend_from_slice(&h.sbuf[pos..pos + take]);
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
            let tag = h.sbuf[pos];
            let mlen = message_len(&h.sbuf[pos..]) as usize;
            if !(4..=MAX_MESSAGE).contains(&mlen) {
                bad = true;
                break;
            }
            // Rows and COPY data are forwarded as they come, whatever their size.
            if matches!(tag, b'D' | b'd') {
                h.skip = mlen + 1;
                continue;
            }
            if len - pos < mlen + 1 {
                break;
            }
            let whole = &h.sbuf[pos..pos + 1 + mlen];
            let body = &whole[HEADER_LEN..];
            pos += mlen + 1;
            match tag {
                b'S' => {
                    if let Some((k, v)) = parse_parameter_status(body) {
                        super::conn::set_param(&mut h.conn.params, k.clone(), v.clone());
                        super::conn::set_param(&mut self.params, k, v);
                    }
                    forward.extend_from_slice(whole);
                    continue;
                }
                b'N' | b'A' => {
                    forward.extend_from_slice(whole);
                    continue;
                }
                b'E' => {
                    // A FATAL error ends the server connection, not the client's session: it
                    // is not forwarded, and the client hears of it as a lost connection.
                    let fields = crate::wire::postgres::error_fields(body);
                    if fields
                        .iter()
                        .any(|(k, v)| *k == b'S' && (v == "FATAL" || v == "PANIC"))
                    {
                        fatal = Some(crate::wire::postgres::error_text(body));
                        pos -= mlen + 1;
                        break;
                    }
                }
                b'Z' => {
                    h.status = body
                        .first()
                        .and_then(|&b| ReadyStatus::from_byte(b))
                        .unwrap_or(ReadyStatus::Failed);
                }
                _ => {}
            }
            due_locals(&mut h.expect, &mut forward);
            let front = match h.expect.front() {
                Some(Expect::Server { tag, swallow, .. }) => Some((*tag, *swallow)),
                _ => None,
            };
            let Some((front, swallow)) = front else {
                // Nothing expected (a server speaking out of turn): passed on.
                forward.extend_from_slice(whole);
                continue;
            };
            if tag == b'E' && !matches!(front, b'Q' | b'F' | b'S') {
                // An extended-protocol message failed: the server skips to the next Sync,
                // and so do the answers the client waits for.
                forward.extend_from_slice(whole);
                if let Some(Expect::Server {
                    forget: Some(def), ..
                }) = h.expect.pop_front()
                {
                    h.conn.statements.remove(&def);
                }
                while let Some(e) = h.expect.front() {
                    if matches!(e, Expect::Server { tag: b'S', .. }) {
                        break;
                    }
                    if let Some(Expect::Server {
                        forget: Some(def), ..
                    }) = h.expect.pop_front()
                    {
                        h.conn.statements.remove(&def);
                    }
                }
                continue;
            }
            if tag == b'Z' {
                // Completes the Query or Sync at the front (and anything left before it).
                while let Some(e) = h.expect.pop_front() {
                    match e {
                        Expect::Server {
                            tag: b'Q' | b'F' | b'S',
                            ..
                        } => break,
                        Expect::Local(bytes) => forward.extend_from_slice(&bytes),
                        Expect::Server { .. } => {}
                    }
                }
                forward.extend_from_slice(whole);
            } else if Held::completes(front, tag) {
                h.expect.pop_front();
                if !swallow {
                    forward.extend_from_slice(whole);
                }
            } else if !swallow {
                forward.extend_from_slice(whole);
            }
            due_locals(&mut h.expect, &mut forward);
        }
        h.sbuf.drain(..pos);
        if !forward.is_empty() {
            self.send(&forward).await?;
        }
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
        if self.settings.transaction
            && self.pinned.is_none()
            && h.expect.is_empty()
            && h.status == ReadyStatus::Idle
            && h.sbuf.is_empty()
            && h.skip == 0
        {
            self.hub.stats.transactions.fetch_add(1, Relaxed);
            self.release(false);
        }
        Ok(())
    }

    /// The held connection is gone (closed, broken, or its backend stopped leading): what was
    /// in flight fails with an ErrorResponse; a client idle between transactions notices
    /// nothing. Session mode ends the session: its state is gone.
    pub(super) async fn server_lost(&mut self, why: &str) -> Result<(), CloseReason> {
        let Some(h) = &self.held else { return Ok(()) };
        let (pending, extended, status, midway) = (h.pending(), h.extended(), h.status, h.skip > 0);
        self.release(true);
        debug!(why, pending, "server connection lost");
        if midway {
            // Part of a message reached the client: nothing more can be said in protocol.
            return Err(CloseReason::Backend);
        }
        if !self.settings.transaction || self.pinned.is_some() {
            return Err(self
                .fatal(
                    "08006",
                    &format!("{why}: the session's server connection was closed"),
                )
                .await);
        }
        if pending > 0 || extended {
            self.hub.stats.failed_in_flight.fetch_add(1, Relaxed);
            let mut out = error_response(
                "ERROR",
                "08006",
                &format!("{why}: the transaction in flight was rolled back or may not have completed; start it again"),
            );
            for _ in 0..pending {
                out.extend_from_slice(&ready_for_query(ReadyStatus::Idle));
            }
            self.discard_until_sync = extended;
            self.send(&out).await?;
        } else if status != ReadyStatus::Idle {
            self.hub.stats.failed_in_flight.fetch_add(1, Relaxed);
            self.lost_transaction = true;
        }
        Ok(())
    }
}
