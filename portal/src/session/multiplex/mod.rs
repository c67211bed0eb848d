//! Redis multiplexing (`pooling.mode: multiplex`): one task per client parses its commands in
//! place, answers the ones that concern only its own session (AUTH, HELLO, CLIENT ID /
//! SETNAME / GETNAME, QUIT), sends runs of plain commands as one request to a shared server
//! connection, pins the client to a dedicated connection while it holds per-connection
//! state, and sends SCRIPT KILL, FUNCTION KILL and SHUTDOWN on a connection of their own, so
//! that they reach a server busy with a script. Replies come back in order: a client sticks to one shared connection while it has
//! commands in flight, and anything the portal answers itself waits until those are in.
//!
//! - [`commands`]: what to do with each command (pure);
//! - [`server`]: the shared connections, the dedicated pool, the counters;
//! - [`report`]: the `/metrics` families and the `/status` part.
//!
//! May import: `admission`, `config`, `health`, `metrics`, `route`, `tls`, `wire` and the
//! session's [`Shared`](super::Shared).

pub mod commands;
mod report;
pub mod server;

use std::{
    net::IpAddr,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tracing::debug;

pub use commands::PinReason;
use commands::{classify, is, subscription_command, subscription_event, Action, Local};
pub use report::{status, MultiplexCollector};
use server::{DialContext, PinnedConn, Request, ServerConn, Sink};
pub use server::{Hub, MuxStats, BATCH_BUCKETS};

use super::Shared;
use crate::{
    admission::{ClientPermit, ConnectionPermit, NegotiationPermit},
    config::{Config, Multiplex},
    health::{CredentialsSource, StandaloneCredentials, Users},
    metrics::CloseReason,
    route,
    wire::resp::{array_head, parse_command, scan_reply, Command},
};

/// Unwritten reply bytes past which the client task stops taking more (the rest waits in its
/// sink, where `clientOutputLimit` applies).
const OUT_HIGH: usize = 256 << 10;
/// Unparsed command bytes past which the client is not read until they are handled.
const IN_HIGH: usize = 1 << 20;

const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";

/// Serves one admitted client in multiplex mode until it leaves or is closed.
pub async fn serve<C>(
    client: C,
    early: Vec<u8>,
    ip: IpAddr,
    permits: (ConnectionPermit, ClientPermit),
    negotiating: NegotiationPermit,
    config: Arc<Config>,
    shared: Shared,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    drop(negotiating);
    let Some(settings) = config.multiplex.clone() else {
        return;
    };
    let hub = shared.mux.clone();
    hub.watch(shared.config.clone(), shared.health.clone());
    let credentials: Arc<dyn CredentialsSource> = match &shared.checker {
        Some(c) => c.credentials(),
        None => Arc::new(StandaloneCredentials),
    };
    let connector = shared.tls.terminator().and_then(|t| t.backend().cloned());
    let metrics = shared.state.metrics.clone();
    metrics.sessions.fetch_add(1, Relaxed);
    metrics.active_sessions.fetch_add(1, Relaxed);
    hub.stats.clients.fetch_add(1, Relaxed);
    let users = match credentials.users(&settings) {
        Ok(u) => u,
        Err(e) => {
            debug!(error = %e, "the users of pooling.auth cannot be read; AUTH fails");
            Some(Arc::default())
        }
    };
    let mut session = Session {
        id: hub.next_client_id(),
        ip,
        sink: Arc::new(Sink::new(settings.client_output_limit)),
        settings,
        ctx: DialContext {
            config: config.clone(),
            connector,
            credentials,
        },
        config,
        shared,
        hub: hub.clone(),
        authed: users.is_none(),
        name: None,
        sent: 0,
        delivered: 0,
        current: None,
        pinned: None,
        in_end: early.len(),
        inbuf: early,
        in_start: 0,
        out: Vec::new(),
        out_pos: 0,
        cmd: Command::default(),
        blocked: false,
        quitting: false,
        fatal: None,
    };
    let reason = session.run(client).await;
    if let Some(p) = session.pinned.take() {
        hub.stats.pin(p.reason, -1);
    }
    metrics.closed(reason);
    metrics.active_sessions.fetch_sub(1, Relaxed);
    hub.stats.clients.fetch_sub(1, Relaxed);
    drop(permits);
    debug!(reason = reason.as_str(), "client closed");
}

/// A client's dedicated server connection and the state that keeps it.
struct Pinned {
    conn: PinnedConn,
    /// What pinned the client (the metric label).
    reason: PinReason,
    inbuf: Vec<u8>,
    /// Commands sent whose reply has not arrived.
    pending: u64,
    /// Replies cannot be counted (MONITOR, CLIENT REPLY OFF, RESP3): kept until the client
    /// leaves.
    sticky: bool,
    multi: bool,
    watch: bool,
    other_db: bool,
    tracking: bool,
    /// Subscribed to channels or patterns / to shard channels, per the latest count.
    subscribed: [bool; 2],
    /// Subscription replies announced and not yet in.
    sub_expected: u64,
    /// An unsubscribe-all sent, not yet answered with a count of 0.
    unsub_all: [bool; 2],
}

impl Pinned {
    fn holds_state(&self) -> bool {
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

    fn in_pubsub(&self) -> bool {
        self.subscribed.iter().any(|&s| s)
            || self.sub_expected > 0
            || self.unsub_all.iter().any(|&s| s)
    }
}

struct Session {
    id: u64,
    ip: IpAddr,
    settings: Multiplex,
    config: Arc<Config>,
    shared: Shared,
    hub: Arc<Hub>,
    ctx: DialContext,
    authed: bool,
    name: Option<Vec<u8>>,
    sink: Arc<Sink>,
    /// Commands sent to shared connections, and replies received for them.
    sent: u64,
    delivered: u64,
    current: Option<Arc<ServerConn>>,
    pinned: Option<Pinned>,
    /// The client's bytes: `in_start..in_end` not handled yet. Its whole length is
    /// initialized (zeroed once as it grows), so a read never clears it first.
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    out: Vec<u8>,
    out_pos: usize,
    cmd: Command,
    /// A command waits for the replies in flight before it.
    blocked: bool,
    quitting: bool,
    /// A protocol error to send once the replies in flight are in; then close.
    fatal: Option<String>,
}

/// Why processing stopped: the session ends.
enum Stop {
    Close(CloseReason),
}

/// Waits for `p`'s server to send something (forever when not pinned).
async fn read_pinned(p: Option<&mut Pinned>) -> std::io::Result<usize> {
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
    async fn run<C>(&mut self, client: C) -> CloseReason
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let metrics = self.shared.state.metrics.clone();
        let (mut rd, mut wr) = tokio::io::split(client);
        let idle_timeout = self.config.timeouts.client;
        let mut last_read = Instant::now();
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let mut kill = self.shared.kill.clone();
        let mut health = self.shared.health.clone();
        // Futures kept across the loop's turns: registering a waiter anew on every turn costs
        // a lock each (the drain's watch is shared by every session).
        let killed = kill.changed();
        tokio::pin!(killed);
        let sink = self.sink.clone();
        let replied = sink.notify.notified();
        tokio::pin!(replied);
        loop {
            match self.process().await {
                Ok(()) => {}
                Err(Stop::Close(reason)) => return reason,
            }
            if !self.pull_sink(false) {
                self.hub.stats.slow_consumers.fetch_add(1, Relaxed);
                debug!(
                    limit = self.settings.client_output_limit,
                    "client cut: it left more than pooling.clientOutputLimit of replies unread"
                );
                return CloseReason::Error;
            }
            if let Some(msg) = self.fatal.take() {
                if self.idle() {
                    self.hub.stats.malformed.fetch_add(1, Relaxed);
                    self.out.extend_from_slice(b"-ERR ");
                    self.out.extend_from_slice(msg.as_bytes());
                    self.out.extend_from_slice(b"\r\n");
                    self.quitting = true;
                } else {
                    self.fatal = Some(msg);
                }
            }
            let out_pending = self.out.len() - self.out_pos;
            if self.quitting && out_pending == 0 && self.idle() {
                let _ = wr.shutdown().await;
                return CloseReason::Done;
            }
            let unparsed = self.in_end - self.in_start;
            let want_read = !self.blocked
                && !self.quitting
                && self.fatal.is_none()
                && out_pending < OUT_HIGH
                && unparsed < IN_HIGH;
            let want_pinned = out_pending < OUT_HIGH;
            let has_pinned = self.pinned.is_some();
            if self.inbuf.len() - self.in_end < 2048 {
                let size = (self.inbuf.len() * 2).max(4096);
                self.inbuf.resize(size, 0);
            }
            tokio::select! {
                biased;
                r = wr.write(&self.out[self.out_pos..]), if out_pending > 0 => match r {
                    Ok(0) | Err(_) => return CloseReason::Error,
                    Ok(n) => {
                        metrics.add_bytes(crate::metrics::Direction::BackendToClient, n as u64);
                        self.out_pos += n;
                        if self.out_pos == self.out.len() {
                            self.out.clear();
                            self.out_pos = 0;
                        }
                    }
                },
                _ = &mut replied => replied.set(sink.notify.notified()),
                r = read_pinned(self.pinned.as_mut()), if want_pinned && has_pinned => match r {
                    Ok(0) | Err(_) => {
                        debug!("the dedicated server connection closed");
                        return CloseReason::Error;
                    }
                    Ok(_) => {
                        if let Err(Stop::Close(reason)) = self.pinned_replies() {
                            return reason;
                        }
                    }
                },
                r = rd.read(&mut self.inbuf[self.in_end..]), if want_read => match r {
                    Ok(0) => {
                        self.quitting = true;
                        if self.idle() || self.pinned.is_some() {
                            return CloseReason::Done;
                        }
                    }
                    Err(_) => return CloseReason::Error,
                    Ok(n) => {
                        self.in_end += n;
                        metrics.add_bytes(crate::metrics::Direction::ClientToBackend, n as u64);
                        last_read = Instant::now();
                    }
                },
                _ = &mut killed => return CloseReason::Shutdown,
                r = health.changed(), if has_pinned => {
                    if r.is_err() {
                        return CloseReason::Shutdown;
                    }
                    let backend = self.pinned.as_ref().map(|p| p.conn.backend().clone());
                    let view = health.borrow_and_update().clone();
                    let config = self.shared.config.borrow().clone();
                    let overrides = self.shared.state.control.current();
                    let still = route::eligible(&config, &view, &overrides)
                        .iter()
                        .any(|&i| Some(config.backends[i].name.as_str()) == backend.as_deref());
                    if !still {
                        debug!("the pinned client's backend no longer takes commands");
                        return CloseReason::Backend;
                    }
                }
                _ = &mut idle => {
                    let next = last_read + idle_timeout;
                    if next <= Instant::now() && self.idle() && self.pinned.as_ref().is_none_or(|p| !p.holds_state()) {
                        return CloseReason::ClientTimeout;
                    }
                    idle.as_mut().reset(next.max(Instant::now() + Duration::from_millis(10)));
                }
            }
        }
    }

    /// Moves replies from the sink to the output (all of them when `all`, else while the
    /// output is small). False when the client was cut.
    fn pull_sink(&mut self, all: bool) -> bool {
        if !all && self.out.len() - self.out_pos >= OUT_HIGH {
            return !self.sink.lock().cut;
        }
        let mut g = self.sink.lock();
        if g.cut {
            return false;
        }
        self.delivered = g.delivered;
        if !g.buf.is_empty() {
            if self.out.is_empty() {
                std::mem::swap(&mut self.out, &mut g.buf);
                self.out_pos = 0;
            } else {
                self.out.extend_from_slice(&g.buf);
                g.buf.clear();
            }
        }
        true
    }

    /// Nothing in flight: every reply sent for is in the output.
    fn idle(&mut self) -> bool {
        self.pull_sink(true);
        self.sent == self.delivered && self.pinned.as_ref().is_none_or(|p| p.pending == 0)
    }

    fn reply(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Handles every complete command in the input that can be handled now.
    async fn process(&mut self) -> Result<(), Stop> {
        self.blocked = false;
        let mut pin_out: Vec<u8> = Vec::new();
        while !self.quitting && self.fatal.is_none() {
            let buf = &self.inbuf[self.in_start..self.in_end];
            match parse_command(buf, &mut self.cmd) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    debug!(error = %e, "malformed command; closing the client");
                    self.fatal = Some(e.to_string());
                    break;
                }
            }
            let argc = self.cmd.args.len();
            let action = {
                let cmd = &self.cmd;
                classify(argc, |i| cmd.arg(buf, i))
            };
            let gate = !self.authed
                && !matches!(
                    action,
                    Action::Local(Local::Auth | Local::Hello | Local::Quit | Local::Reset)
                        | Action::Pin(PinReason::Resp3)
                );
            let forwarded_while_pinned = !matches!(action, Action::Local(_))
                || matches!(action, Action::Local(Local::Reset | Local::SelectZero));
            if self.pinned.is_some() && !gate && forwarded_while_pinned {
                self.pinned_command(action, &mut pin_out);
                continue;
            }
            if gate
                || matches!(
                    action,
                    Action::Local(_) | Action::Pin(_) | Action::OutOfBand
                )
            {
                // Answered here, moving to a dedicated connection or sent on one of its own:
                // after every reply in flight, so replies stay in order.
                if !pin_out.is_empty() {
                    self.flush_pinned(&mut pin_out).await?;
                }
                if !self.idle() {
                    self.blocked = true;
                    break;
                }
            }
            if gate {
                self.consume();
                self.reply(NOAUTH);
                continue;
            }
            match action {
                Action::Local(local) => {
                    self.local(local);
                    self.consume();
                }
                Action::Pin(reason) => {
                    if reason == PinReason::Resp3 && !self.hello_auth() {
                        self.consume();
                        continue;
                    }
                    match self.pin(reason).await {
                        Ok(()) => {
                            if reason == PinReason::Resp3 {
                                // The client's credentials stay here: the server sees HELLO 3.
                                pin_out.extend_from_slice(b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n");
                                let p = self.pinned.as_mut().expect("just pinned");
                                p.sticky = true;
                                self.consume();
                            } else {
                                self.pinned_command(action, &mut pin_out);
                            }
                        }
                        Err(e) => {
                            self.consume();
                            self.reply(format!("-ERR {e}\r\n").as_bytes());
                        }
                    }
                }
                Action::OutOfBand => self.out_of_band().await,
                Action::Plain => {
                    if !self.send_plain().await? {
                        self.blocked = true;
                        break;
                    }
                }
            }
        }
        if !pin_out.is_empty() {
            self.flush_pinned(&mut pin_out).await?;
        }
        self.maybe_release();
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        } else if self.in_start > 64 << 10 {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        Ok(())
    }

    /// Drops the parsed command from the input.
    fn consume(&mut self) {
        self.in_start += self.cmd.len;
    }

    fn arg(&self, i: usize) -> Option<&[u8]> {
        self.cmd.arg(&self.inbuf[self.in_start..], i)
    }

    /// Sends the run of plain commands that starts at the parsed one as one request. False
    /// when it must wait for the replies in flight on a connection that went away.
    async fn send_plain(&mut self) -> Result<bool, Stop> {
        let start = self.in_start;
        let mut end = start + self.cmd.len;
        let mut count: u32 = 1;
        let max = self.settings.max_in_flight as u32;
        while count < max {
            let buf = &self.inbuf[end..self.in_end];
            match parse_command(buf, &mut self.cmd) {
                Ok(true) => {}
                _ => break,
            }
            let cmd = &self.cmd;
            if classify(cmd.args.len(), |i| cmd.arg(buf, i)) != Action::Plain {
                break;
            }
            end += cmd.len;
            count += 1;
        }
        let conn = match self.conn().await {
            Ok(Some(conn)) => conn,
            Ok(None) => return Ok(false),
            Err(why) => {
                self.in_start = end;
                let error = format!("-ERR {why}\r\n");
                self.reply(&error.repeat(count as usize).into_bytes());
                return Ok(true);
            }
        };
        self.in_start = end;
        let data = self.inbuf[start..end].to_vec();
        if let Ok(permits) = conn.permits.clone().acquire_many_owned(count).await {
            permits.forget();
        }
        self.sent += u64::from(count);
        let request = Request {
            data,
            replies: count,
            sink: self.sink.clone(),
        };
        if let Err(r) = conn.send(request) {
            r.sink.fail(server::TRYAGAIN, u64::from(count));
        }
        Ok(true)
    }

    /// Sends the parsed command on a server connection opened for it alone, to the backend
    /// this client's commands go to, and answers with its reply. A server busy with a script
    /// reads nothing more from the connection running it, which may be the shared connection
    /// this client uses: SCRIPT KILL, FUNCTION KILL and SHUTDOWN NOSAVE queued there would wait
    /// for the script they are meant to end. A SHUTDOWN that succeeds closes the connection
    /// without a reply: the client is closed too, as Redis would close it.
    async fn out_of_band(&mut self) {
        let command = self.inbuf[self.in_start..self.in_start + self.cmd.len].to_vec();
        self.consume();
        let backend = match self.target().await {
            Ok(i) => self.config.backends[i].clone(),
            Err(why) => return self.reply(format!("-ERR {why}\r\n").as_bytes()),
        };
        let failed = |e: std::io::Error| {
            format!(
                "-ERR the server connection to {} failed: {e}\r\n",
                backend.name
            )
        };
        let stream = match server::dial(&self.ctx, &backend).await {
            Ok(stream) => stream,
            Err(e) => {
                if let Some(checker) = &self.shared.checker {
                    checker.report_connect_failure(&backend.name);
                }
                return self.reply(failed(e).as_bytes());
            }
        };
        self.hub.stats.out_of_band.fetch_add(1, Relaxed);
        match server::send_alone(stream, &command, self.config.timeouts.server).await {
            Ok(Some(reply)) => self.reply(&reply),
            Ok(None) => {
                debug!(backend = %backend.name, "the server closed the connection of a command sent alone; closing the client");
                self.quitting = true;
            }
            Err(e) => self.reply(failed(e).as_bytes()),
        }
    }

    /// The backend to send to now: the leader (or the routing mode's first choice), waiting
    /// up to `timeouts.connect` for one.
    async fn target(&mut self) -> Result<usize, String> {
        let config = self.config.clone();
        let mut health = self.shared.health.clone();
        let overrides = self.shared.state.control.current();
        let order = |view: &crate::health::HealthView| {
            let eligible = route::eligible(&config, view, &overrides);
            let weights = route::weights(&config, view, &overrides, std::time::Instant::now());
            route::order(
                config.routing,
                &eligible,
                self.ip,
                self.id as usize,
                |i| weights[i],
                |_| 0,
            )
            .first()
            .copied()
        };
        let now = order(&health.borrow_and_update());
        if let Some(i) = now {
            return Ok(i);
        }
        let waited = tokio::time::timeout(
            config.timeouts.connect,
            health.wait_for(|v| order(v).is_some()),
        )
        .await;
        match waited {
            Ok(Ok(view)) => order(&view).ok_or_else(|| "no backend available".to_string()),
            _ => Err(format!(
                "no backend available (no leader within {:?}); the command was not applied",
                config.timeouts.connect
            )),
        }
    }

    /// The shared connection to send on: the current one while it lives (replies in order),
    /// else a new choice once nothing is in flight. `Ok(None)`: wait for replies first.
    async fn conn(&mut self) -> Result<Option<Arc<ServerConn>>, String> {
        if let Some(c) = &self.current {
            if !c.is_dead() {
                return Ok(Some(c.clone()));
            }
        }
        if !self.idle() {
            return Ok(None);
        }
        self.current = None;
        let i = self.target().await?;
        let backend = self.config.backends[i].clone();
        let pool = self
            .hub
            .pool(&backend, true, per_thread(self.settings.server_connections));
        let conn = pool
            .shared(self.id as usize, &self.ctx, self.settings.max_in_flight)
            .await
            .map_err(|e| {
                if let Some(checker) = &self.shared.checker {
                    checker.report_connect_failure(&backend.name);
                }
                format!("the server connection to {} failed: {e}", backend.name)
            })?;
        self.current = Some(conn.clone());
        Ok(Some(conn))
    }

    /// Takes a dedicated connection for `reason`.
    async fn pin(&mut self, reason: PinReason) -> Result<(), String> {
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
    fn pinned_command(&mut self, action: Action, pin_out: &mut Vec<u8>) {
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

    async fn flush_pinned(&mut self, pin_out: &mut Vec<u8>) -> Result<(), Stop> {
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
    fn pinned_replies(&mut self) -> Result<(), Stop> {
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
    fn maybe_release(&mut self) {
        let Some(p) = &self.pinned else { return };
        if p.holds_state() || !p.inbuf.is_empty() {
            return;
        }
        let p = self.pinned.take().expect("checked");
        self.hub.stats.pin(p.reason, -1);
        debug!(reason = p.reason.as_str(), "client unpinned");
        p.conn.release(self.ctx.clone());
    }

    /// Checks HELLO's AUTH option, answering the error itself. True when the client may go on.
    fn hello_auth(&mut self) -> bool {
        let mut i = 2;
        let mut auth = None;
        while let Some(a) = self.arg(i) {
            if a.eq_ignore_ascii_case(b"AUTH") {
                auth = Some((self.arg(i + 1), self.arg(i + 2)));
                i += 3;
            } else {
                i += 2;
            }
        }
        match auth {
            Some((Some(user), Some(pass))) => {
                let (user, pass) = (user.to_vec(), pass.to_vec());
                let reply = self.check(&user, &pass);
                if reply != b"+OK\r\n" {
                    self.reply(reply);
                    return false;
                }
                true
            }
            Some(_) => {
                self.reply(b"-ERR Syntax error in HELLO option 'auth'\r\n");
                false
            }
            None if !self.authed => {
                self.reply(b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n");
                false
            }
            None => true,
        }
    }

    /// Checks a user's password against `pooling.auth`.
    fn check(&mut self, user: &[u8], pass: &[u8]) -> &'static [u8] {
        let users: Option<Users> = match self.ctx.credentials.users(&self.settings) {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "the users of pooling.auth cannot be read");
                return b"-ERR the portal cannot check passwords now\r\n";
            }
        };
        let Some(users) = users else {
            return b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n";
        };
        let ok = std::str::from_utf8(user)
            .ok()
            .and_then(|u| users.get(u))
            .is_some_and(|p| constant_time_eq(p.as_bytes(), pass));
        if ok {
            self.authed = true;
            b"+OK\r\n"
        } else {
            WRONGPASS
        }
    }

    /// Answers a command that concerns only this client's session.
    fn local(&mut self, local: Local) {
        let argc = self.cmd.args.len();
        match local {
            Local::Nothing => {}
            Local::Auth => {
                let (user, pass) = match argc {
                    2 => (
                        b"default".to_vec(),
                        self.arg(1).unwrap_or_default().to_vec(),
                    ),
                    3 => (
                        self.arg(1).unwrap_or_default().to_vec(),
                        self.arg(2).unwrap_or_default().to_vec(),
                    ),
                    _ => {
                        self.reply(b"-ERR wrong number of arguments for 'auth' command\r\n");
                        return;
                    }
                };
                let reply = self.check(&user, &pass);
                self.reply(reply);
            }
            Local::Hello => {
                if let Some(v) = self.arg(1) {
                    if v != b"2" && !v.eq_ignore_ascii_case(b"AUTH") {
                        self.reply(b"-NOPROTO unsupported protocol version\r\n");
                        return;
                    }
                }
                if !self.hello_auth() {
                    return;
                }
                let mut i = 2;
                while let Some(a) = self.arg(i) {
                    if a.eq_ignore_ascii_case(b"SETNAME") {
                        self.name = self.arg(i + 1).map(<[u8]>::to_vec);
                        i += 2;
                    } else {
                        i += if a.eq_ignore_ascii_case(b"AUTH") {
                            3
                        } else {
                            2
                        };
                    }
                }
                let version = env!("CARGO_PKG_VERSION");
                let id = self.id.to_string();
                let mut r = Vec::new();
                r.extend_from_slice(b"*14\r\n$6\r\nserver\r\n$8\r\ndbportal\r\n$7\r\nversion\r\n");
                r.extend_from_slice(format!("${}\r\n{version}\r\n", version.len()).as_bytes());
                r.extend_from_slice(b"$5\r\nproto\r\n:2\r\n$2\r\nid\r\n");
                r.extend_from_slice(format!(":{id}\r\n").as_bytes());
                r.extend_from_slice(b"$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n");
                self.reply(&r);
            }
            Local::ClientId => {
                let r = format!(":{}\r\n", self.id);
                self.reply(r.as_bytes());
            }
            Local::ClientSetName => match self.arg(2).map(<[u8]>::to_vec) {
                Some(name) if argc == 3 && !name.iter().any(|b| *b <= b' ' || *b > b'~') => {
                    self.name = (!name.is_empty()).then_some(name);
                    self.reply(b"+OK\r\n");
                }
                Some(_) if argc == 3 => self.reply(
                    b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n",
                ),
                _ => self.reply(b"-ERR wrong number of arguments for 'client|setname' command\r\n"),
            },
            Local::ClientGetName => match self.name.clone() {
                Some(name) => {
                    let mut r = format!("${}\r\n", name.len()).into_bytes();
                    r.extend_from_slice(&name);
                    r.extend_from_slice(b"\r\n");
                    self.reply(&r);
                }
                None => self.reply(b"$-1\r\n"),
            },
            Local::ClientSetInfo | Local::SelectZero => self.reply(b"+OK\r\n"),
            Local::Reset => {
                self.name = None;
                self.authed = self
                    .ctx
                    .credentials
                    .users(&self.settings)
                    .is_ok_and(|u| u.is_none());
                self.reply(b"+RESET\r\n");
            }
            Local::Quit => {
                self.reply(b"+OK\r\n");
                self.quitting = true;
            }
        }
    }
}

/// Shared connections per data-plane thread: `serverConnections` spread over the threads
/// (one each at least), so that the portal holds about `serverConnections` in all.
fn per_thread(server_connections: usize) -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS.get_or_init(|| {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    });
    server_connections.div_ceil(threads).max(1)
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
