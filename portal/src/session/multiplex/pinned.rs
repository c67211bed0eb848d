//! A multiplexed client's dedicated server connection: taken when a command creates
//! per-connection state (MULTI, WATCH, SUBSCRIBE, a blocking command, SELECT, CLIENT TRACKING,
//! MONITOR, RESP3), the commands sent on it and the state they set or end followed, its
//! replies counted, and the connection given back (cleaned) once the state has ended.
//!
//! May import: `metrics`, `wire` and the rest of `multiplex`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::commands::{is, subscription_command, subscription_event, Action, PinReason};
use super::server::PinnedConn;
use super::{Session, Stop};
use crate::{
    metrics::CloseReason,
    wire::resp::{array_head, scan_reply},
};

/// A client's dedicated server connection and the state that keeps it.
pub(super) struct Pinned {
    pub(super) conn: PinnedConn,
    /// What pinned the client (the metric label).
    pub(super) reason: PinReason,
    pub(super) inbuf: Vec<u8>,
    /// Commands sent whose reply has not arrived.
    pub(super) pending: u64,
    /// Replies cannot be counted (MONITOR, CLIENT REPLY OFF, RESP3): kept until the client
    /// leaves.
    pub(super) sticky: bool,
    pub(super) multi: bool,
    pub(super) watch: bool,
    pub(super) other_db: bool,
    pub(super) tracking: bool,
    /// Subscribed to channels or patterns / to shard channels, per the latest count.
    pub(super) subscribed: [bool; 2],
    /// Subscription replies announced and not yet in.
    pub(super) sub_expected: u64,
    /// An unsubscribe-all sent, not yet answered with a count of 0.
    pub(super) unsub_all: [bool; 2],
}

impl Pinned {
    pub(super) fn holds_state(&self) -> bool {
        self.sticky
            || self.pending > 0
            || self.multi
            || self.watch
            || self.other_db
            || self.tracking
            || self.subscribed.iter().any(|&s| s)
            || self.sub_expected > 0
            || self.unsub_all.iter().any(|&s| s)
    }

    pub(super) fn in_pubsub(&self) -> bool {
        self.subscribed.iter().any(|&s| s)
            || self.sub_expected > 0
            || self.unsub_all.iter().any(|&s| s)
    }
}

/// Waits for `p`'s server to send something (forever when not pinned).
pub(super) async fn read_pinned(p: Option<&mut Pinned>) -> std::io::Result<usize> {
    match p {
        Some(p) => {
            let Pinned { conn, inbuf, .. } = p;
            if inbuf.capacity() - inbuf.len() < 4096 {
                inbuf.reserve(16 << 10);
            }
            conn.stream().read_buf(inbuf).await
        }
        None => std::future::pending().await,
    }
}

impl Session {
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
        self.pinned = Some(Pinned {
            conn,
            reason,
            inbuf: Vec::with_capacity(4096),
            pending: 0,
            sticky: false,
            multi: false,
            watch: false,
            other_db: false,
            tracking: false,
            subscribed: [false; 2],
            sub_expected: 0,
            unsub_all: [false; 2],
        });
        Ok(())
    }

    /// Queues the parsed command for the dedicated connection and follows the state it sets.
    pub(super) fn pinned_command(&mut self, action: Action, pin_out: &mut Vec<u8>) {
        let buf = &self.inbuf[self.in_start..self.in_end];
        let cmd = &self.cmd;
        let arg = |i| cmd.arg(buf, i);
        let p = self.pinned.as_mut().expect("pinned");
        pin_out.extend_from_slice(&buf[..cmd.len]);
        let name = arg(0).unwrap_or_default();
        let word = |w: &str| name.eq_ignore_ascii_case(w.as_bytes());
        if let Some((kind, replies)) = subscription_command(cmd.args.len(), arg) {
            let k = kind as usize;
            match replies {
                Some(n) => p.sub_expected += n as u64,
                None => p.unsub_all[k] = true,
            }
            self.in_start += cmd.len;
            return;
        }
        match action {
            Action::Pin(PinReason::Multi) => p.multi = true,
            Action::Pin(PinReason::Watch) => p.watch = true,
            Action::Pin(PinReason::Select) => p.other_db = true,
            Action::Pin(PinReason::Tracking) => p.tracking = true,
            Action::Pin(PinReason::Monitor | PinReason::ClientMode | PinReason::Resp3) => {
                p.sticky = true
            }
            _ => {}
        }
        if word("EXEC") || word("DISCARD") {
            p.multi = false;
            p.watch = false;
        } else if word("UNWATCH") {
            p.watch = false;
        } else if word("SELECT") && arg(1) == Some(b"0") {
            p.other_db = false;
        } else if word("CLIENT") && is(arg(1), "TRACKING") && is(arg(2), "off") {
            p.tracking = false;
        } else if word("RESET") {
            p.multi = false;
            p.watch = false;
            p.other_db = false;
            p.tracking = false;
            p.subscribed = [false; 2];
            p.unsub_all = [false; 2];
            p.sub_expected = 0;
        }
        // A sticky client's replies are not counted: CLIENT REPLY OFF/SKIP and MONITOR break
        // the one-reply-per-command rule, and its connection is never given back anyway.
        if !p.sticky {
            p.pending += 1;
        }
        self.in_start += cmd.len;
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
        if p.sticky && !p.in_pubsub() {
            self.out.extend_from_slice(&p.inbuf);
            p.inbuf.clear();
            return Ok(());
        }
        let mut pos = 0;
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
            pos += scanned.len;
            if scanned.kind == b'>' {
                continue;
            }
            if p.in_pubsub() {
                if let Some((kind, answers)) = array_head(reply)
                    .and_then(|(head, count)| subscription_event(head).map(|e| (e, count)))
                    .map(|((kind, answers), count)| (kind, answers.then_some(count)))
                {
                    if let Some(count) = answers {
                        let k = kind as usize;
                        p.sub_expected = p.sub_expected.saturating_sub(1);
                        let count = count.unwrap_or(0);
                        p.subscribed[k] = count > 0;
                        if count == 0 {
                            p.unsub_all[k] = false;
                        }
                    }
                    continue;
                }
            }
            p.pending = p.pending.saturating_sub(1);
        }
        self.out.extend_from_slice(&p.inbuf[..pos]);
        p.inbuf.drain(..pos);
        self.maybe_release();
        Ok(())
    }

    /// Gives the dedicated connection back once its state has ended.
    pub(super) fn maybe_release(&mut self) {
        let Some(p) = &self.pinned else { return };
        if p.holds_state() || !p.inbuf.is_empty() {
            return;
        }
        let p = self.pinned.take().expect("checked");
        if let Some(r) = &self.registration {
            r.on_backend(None);
        }
        self.hub.stats.pin(p.reason, -1);
        debug!(reason = p.reason.as_str(), "client unpinned");
        p.conn.release(self.ctx.clone());
    }
}
