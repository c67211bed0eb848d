//! What a pooled PostgreSQL client sends: each complete message is decoded and handed to the
//! client's [`Machine`](super::machine::Machine), which says what goes to the server
//! connection the client holds, what the portal answers itself, and when to take a server
//! connection; this file does the reading, the writing and the waiting.
//!
//! May import: `metrics`, `wire` and the rest of `pool`.

use std::sync::atomic::Ordering::Relaxed;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use crate::{
    metrics::CloseReason,
    wire::postgres::{
        frame,
        frontend::{starts_with_sync, Frontend},
        FrameError, HEADER_LEN, MAX_MESSAGE,
    },
};

use super::conn::Buffers;
use super::machine::{ClientStep, Out};
use super::spare;
use super::Client;

/// The server-bound bytes written in one go at most, before reading on.
const SERVER_BATCH: usize = 64 << 10;

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Handles every complete message the client sent.
    pub(super) async fn process(&mut self) -> Result<(), CloseReason> {
        if self.cin.len() < HEADER_LEN {
            return Ok(());
        }
        let cin = std::mem::take(&mut self.cin);
        let mut pos = 0;
        // The server-bound bytes go into the held connection's buffer (taken when one is
        // acquired); the portal's own answers are rare: their buffer is made when one comes.
        let mut out = Out {
            server: self.out_buffer(),
            client: Vec::new(),
        };
        let mut result = self.process_from(&cin, &mut pos, &mut out).await;
        self.cin = cin;
        self.cin.drain(..pos);
        self.count();
        if result.is_ok() && !out.server.is_empty() {
            result = self.write_server(&out.server).await;
        }
        match &mut self.held {
            Some(h) => Buffers::keep(&mut h.conn.buffers.out, out.server),
            None => spare::give_bytes(out.server),
        }
        spare::give_bytes(out.client);
        result
    }

    /// The held connection's buffer for what goes out, if a connection is held.
    fn out_buffer(&mut self) -> Vec<u8> {
        self.held
            .as_mut()
            .map(|h| std::mem::take(&mut h.conn.buffers.out))
            .unwrap_or_default()
    }

    /// The messages of `cin` from `pos` on, as far as they are complete; `out.server` holds
    /// what is not yet written to the server.
    async fn process_from(
        &mut self,
        cin: &[u8],
        pos: &mut usize,
        out: &mut Out,
    ) -> Result<(), CloseReason> {
        loop {
            let decoded = frame(&cin[*pos..], MAX_MESSAGE).and_then(|n| {
                n.map(|n| {
                    let raw = &cin[*pos..*pos + n];
                    Frontend::decode(raw[0], &raw[HEADER_LEN..]).map(|m| (n, raw, m))
                })
                .transpose()
            });
            let (n, raw, msg) = match decoded {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.malformed(e, &out.server).await),
            };
            let then_sync = starts_with_sync(&cin[*pos + n..]);
            let conn = self.held.as_mut().map(|h| &mut h.conn.statements);
            let mut step = self.machine.on_client(msg, raw, then_sync, conn, out);
            if step == ClientStep::Acquire {
                // Answers already due go out before the wait for a connection.
                self.send_answers(out).await?;
                match self.acquire().await {
                    Ok(()) => {
                        if out.server.capacity() == 0 {
                            out.server = self.out_buffer();
                        }
                        let conn = self.held.as_mut().map(|h| &mut h.conn.statements);
                        step = self.machine.on_client(msg, raw, then_sync, conn, out);
                    }
                    Err((sqlstate, text)) if sqlstate == "53300" => {
                        return Err(self.fatal(sqlstate, &text).await)
                    }
                    Err((sqlstate, text)) => {
                        self.machine
                            .refuse(msg, "ERROR", sqlstate, &text, &mut out.client);
                        step = ClientStep::Next;
                    }
                }
            }
            match step {
                ClientStep::Next | ClientStep::Acquire => *pos += n,
                ClientStep::NextWithSync => *pos += n + HEADER_LEN,
                ClientStep::Terminate => {
                    if !out.server.is_empty() {
                        let _ = self.write_server(&out.server).await;
                    }
                    return Err(CloseReason::Done);
                }
            }
            self.send_answers(out).await?;
            if out.server.len() >= SERVER_BATCH {
                self.write_server(&out.server).await?;
                out.server.clear();
            }
        }
    }

    /// Sends the portal's own answers gathered in `out`.
    async fn send_answers(&mut self, out: &mut Out) -> Result<(), CloseReason> {
        if !out.client.is_empty() {
            self.send(&out.client).await?;
            out.client.clear();
        }
        Ok(())
    }

    /// A message that is not PostgreSQL's: what came before it goes to the server, then the
    /// client is closed.
    async fn malformed(&mut self, e: FrameError, server: &[u8]) -> CloseReason {
        self.hub.stats.protocol_errors.fetch_add(1, Relaxed);
        debug!(error = %e, "malformed message; closing the client");
        if !server.is_empty() {
            let _ = self.write_server(server).await;
        }
        self.fatal("08P01", &format!("invalid message: {e}")).await
    }

    /// Adds the machine's counters to the pool's statistics.
    pub(super) fn count(&mut self) {
        let tally = std::mem::take(&mut self.machine.tally);
        let stats = &self.hub.stats;
        for (counter, n) in [
            (&stats.queries, tally.queries),
            (&stats.prepared_hits, tally.prepared_hits),
            (&stats.prepared_misses, tally.prepared_misses),
            (&stats.failed_in_flight, tally.failed_in_flight),
        ] {
            if n > 0 {
                counter.fetch_add(n, Relaxed);
            }
        }
        if let Some(reason) = tally.pinned {
            stats.pin(reason, 1);
            info!(
                reason = reason.as_str(),
                user = %self.user,
                "client pinned to its server connection until it disconnects: its session state cannot move to another one"
            );
        }
    }
}
