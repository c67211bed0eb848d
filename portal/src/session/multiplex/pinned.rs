//! A multiplexed client's dedicated server connection: taken when a command creates
//! per-connection state (MULTI, WATCH, SUBSCRIBE, a blocking command, SELECT, CLIENT TRACKING,
//! MONITOR, RESP3), the commands sent on it and the state they set or end followed, its
//! replies counted, and the connection given back (cleaned) once the state has ended.
//!
//! May import: `health`, `metrics`, `route`, `wire` and the rest of `multiplex`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::commands::{Action, PinReason};
use super::machine::PinState;
use super::server::PinnedConn;
use super::{Session, Stop};
use crate::{health::HealthView, metrics::CloseReason, route, wire::resp::scan_reply};

/// CLIENT REPLY SKIP, sent just before the command it silences.
const SKIP: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n";
const RESET: &[u8] = b"*1\r\n$5\r\nRESET\r\n";

/// A client's dedicated server connection and the state that keeps it.
pub(super) struct Pinned {
    pub(super) conn: PinnedConn,
    /// What pinned the client (the metric label).
    pub(super) reason: PinReason,
    pub(super) inbuf: Vec<u8>,
    pub(super) state: PinState,
}

/// Polls `p`'s server for what it sends, onto its buffer (pending for ever when not pinned).
pub(super) fn poll_pinned(
    p: Option<&mut Pinned>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<usize>> {
    match p {
        Some(p) => {
            let Pinned { conn, inbuf, .. } = p;
            if inbuf.capacity() - inbuf.len() < 4096 {
                inbuf.reserve(16 << 10);
            }
            let read = std::pin::pin!(conn.stream().read_buf(inbuf));
            std::future::Future::poll(read, cx)
        }
        None => std::task::Poll::Pending,
    }
}

impl Session {
    /// Whether the backend of the client's dedicated connection still takes commands in the
    /// health `view` (with the configuration and overrides in force).
    pub(super) fn pinned_backend_routable(&self, view: &HealthView) -> bool {
        let backend = self.pinned.as_ref().map(|p| p.conn.backend().clone());
        let config = self.shared.config.borrow().clone();
        let overrides = self.shared.state.control.current();
        route::eligible(&config, view, &overrides)
            .iter()
            .any(|&i| Some(config.backends[i].name.as_str()) == backend.as_deref())
    }

    /// Takes a dedicated connection for `reason`.
    pub(super) async fn pin(&mut self, reason: PinReason) -> Result<(), String> {
        let i = self.target().await?;
        let backend = self.config.backends[i].clone();
        let pool = self.hub.pool(&backend, false, 0);
        let conn = pool
            .take_pinned(
                &self.ctx,
                self.config.max_connections as usize,
                self.settings.queue_timeout,
            )
            .await
            .map_err(|e| format!("no dedicated server connection: {e}"))?;
        self.hub.stats.pin(reason, 1);
        debug!(reason = reason.as_str(), backend = %backend.name, "client pinned");
        if let Some(r) = &self.registration {
            r.on_backend(Some(&backend.name));
        }
        self.hub.dedicated(self.id, Some(&conn));
        self.pinned = Some(Pinned {
            conn,
            reason,
            inbuf: Vec::with_capacity(4096),
            state: PinState::default(),
        });
        Ok(())
    }

    /// Queues the parsed command for the dedicated connection and follows the state it sets.
    pub(super) fn pinned_command(&mut self, action: Action, pin_out: &mut Vec<u8>) {
        let buf = &self.inbuf[self.in_start..self.in_end];
        let cmd = &self.cmd;
        let p = self.pinned.as_mut().expect("pinned");
        self.in_start += cmd.len;
        self.hub.note_pause(cmd.args.len(), |i| cmd.arg(buf, i));
        if p.state.hold_skip(cmd.args.len(), |i| cmd.arg(buf, i)) {
            return;
        }
        if p.state.send_held_skip() {
            pin_out.extend_from_slice(SKIP);
        }
        pin_out.extend_from_slice(&buf[..cmd.len]);
        p.state
            .on_command(action, cmd.args.len(), |i| cmd.arg(buf, i));
    }

    /// Sends HELLO on the dedicated connection with the protocol version alone (its AUTH was
    /// checked here; SETNAME names the client here, as CLIENT SETNAME does), and follows the
    /// protocol it sets.
    pub(super) fn hello_pinned(&mut self, action: Action, pin_out: &mut Vec<u8>) {
        self.hello_setname();
        let mut words: Vec<Vec<u8>> = vec![b"HELLO".to_vec()];
        words.extend(self.arg(1).map(<[u8]>::to_vec));
        let p = self.pinned.as_mut().expect("pinned");
        if p.state.send_held_skip() {
            pin_out.extend_from_slice(SKIP);
        }
        pin_out.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
        for w in &words {
            pin_out.extend_from_slice(format!("${}\r\n", w.len()).as_bytes());
            pin_out.extend_from_slice(w);
            pin_out.extend_from_slice(b"\r\n");
        }
        p.state
            .on_command(action, words.len(), |i| words.get(i).map(Vec::as_slice));
        self.consume();
    }

    /// RESET of a pinned client, with nothing in flight: sent on the dedicated connection,
    /// whose replies pass until its `+RESET` (messages and pushes sent before it included);
    /// then the connection ends (`pinned_replies`), cleaned and logged in again before anyone
    /// else gets it, and the client's next commands go where any client's go.
    pub(super) fn reset_pinned(&mut self, pin_out: &mut Vec<u8>) {
        let p = self.pinned.as_mut().expect("pinned");
        let answered = p.state.reset_reply();
        p.state.resetting = Some(answered);
        pin_out.extend_from_slice(RESET);
        self.reset_session();
    }

    pub(super) async fn flush_pinned(&mut self, pin_out: &mut Vec<u8>) -> Result<(), Stop> {
        let p = self.pinned.as_mut().expect("pinned");
        let wrote = tokio::time::timeout(
            self.config.timeouts.server,
            p.conn.stream().write_all(pin_out),
        )
        .await;
        pin_out.clear();
        match wrote {
            Ok(Ok(())) => Ok(()),
            _ => Err(Stop::Close(CloseReason::Error)),
        }
    }

    /// Replies from the dedicated connection: to the output, counted to know when the
    /// state ends.
    pub(super) fn pinned_replies(&mut self) -> Result<(), Stop> {
        let p = self.pinned.as_mut().expect("pinned");
        if p.state.raw {
            self.out.extend_from_slice(&p.inbuf);
            p.inbuf.clear();
            return Ok(());
        }
        let mut pos = 0;
        // Passed on up to here (a reply naming a client goes out rewritten).
        let mut passed = 0;
        loop {
            let scanned = match scan_reply(&p.inbuf[pos..]) {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "unreadable reply on a dedicated connection");
                    return Err(Stop::Close(CloseReason::Error));
                }
            };
            let reply = &p.inbuf[pos..pos + scanned.len];
            if let Some(answered) = p.state.resetting {
                // Nothing but RESET is owed: the first `+RESET` is its answer.
                if reply == b"+RESET\r\n" {
                    let end = pos + scanned.len;
                    self.out.extend_from_slice(&p.inbuf[passed..pos]);
                    if answered {
                        self.out.extend_from_slice(reply);
                    }
                    p.inbuf.drain(..end);
                    self.unpin();
                    return Ok(());
                }
            } else if p.state.on_reply(scanned.kind, reply) {
                self.out.extend_from_slice(&p.inbuf[passed..pos]);
                self.hub.rename_client(reply, &mut self.out);
                passed = pos + scanned.len;
            }
            pos += scanned.len;
        }
        self.out.extend_from_slice(&p.inbuf[passed..pos]);
        p.inbuf.drain(..pos);
        self.maybe_release();
        Ok(())
    }

    /// Gives the dedicated connection back once its state has ended.
    pub(super) fn maybe_release(&mut self) {
        let Some(p) = &self.pinned else { return };
        if p.state.holds_state() || !p.inbuf.is_empty() {
            return;
        }
        self.unpin();
    }

    /// Ends the dedicated connection, whatever state it holds (at RESET): one whose state
    /// lasts as long as the client (MONITOR, a replica, RESP3, …) is closed; any other is
    /// cleaned and given back.
    pub(super) fn unpin(&mut self) {
        let Some(p) = self.pinned.take() else { return };
        if let Some(r) = &self.registration {
            r.on_backend(None);
        }
        self.hub.stats.pin(p.reason, -1);
        self.hub.dedicated(self.id, None);
        debug!(reason = p.reason.as_str(), "client unpinned");
        if p.state.sticky || p.state.raw {
            return;
        }
        p.conn.release(self.ctx.clone(), p.inbuf);
    }
}
