//! Redis multiplexing (`pooling.mode: multiplex`): one task per client parses its commands in
//! place, answers the ones that concern only its own session (AUTH, HELLO, CLIENT ID /
//! SETNAME / GETNAME, QUIT), sends runs of plain commands as one request to a shared server
//! connection, pins the client to a dedicated connection while it holds per-connection
//! state, and sends SCRIPT KILL, FUNCTION KILL, SHUTDOWN and CLIENT UNPAUSE on a connection
//! of their own, so that they reach a server busy with a script (or holding paused commands).
//! Replies come back in order: a client sticks to one shared connection while it has commands
//! in flight, and anything the portal answers itself waits until those are in.
//!
//! This file owns the client's task: `serve`, the `Session` it runs, its loop (reading the
//! client, writing its replies, watching the drain and the health of its pinned backend) and
//! `process`, which parses and classifies each command and hands it on.
//!
//! - [`commands`]: what to do with each command (pure);
//! - `local`: the commands the portal answers itself (AUTH, HELLO, CLIENT …) and the client
//!   ids it rewrites;
//! - `send`: plain commands on a shared connection, a command alone on a connection of
//!   its own, and the backend they go to; `pinned`: the client's dedicated connection;
//! - [`server`]: the pools of server connections per backend and the [`Hub`] of them, on
//!   `pipeline` (a shared connection's writer and reader), `conn` (dialling and logging in
//!   one connection) and `sink` (where a client's replies wait);
//! - `stats`: the counters; `report`: the `/metrics` families and the `/status` part.
//!
//! The client task is one type, `Session`, whose methods are split by job over `mod.rs`,
//! `local.rs`, `send.rs` and `pinned.rs`; those call each other as one impl does. Every other
//! file imports only files below it: `commands`, `sink` and `conn` at the bottom, then
//! `stats`, `pipeline`, `server` and `report`.
//!
//! May import: `config`, `health`, `metrics`, `route`, `splice`, `tls`, `wire` and the session's
//! [`Shared`](super::Shared) and [`Admitted`](super::Admitted).

pub mod commands;
mod conn;
mod local;
mod machine;
mod pinned;
mod pipeline;
mod report;
mod send;
pub mod server;
mod sink;
mod stats;

use std::{
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{atomic::Ordering::Relaxed, Arc},
    task::Poll,
    time::Duration,
};

use tokio::{
    io::{AsyncWriteExt, ReadBuf},
    time::Instant,
};
use tracing::debug;

pub use commands::PinReason;
use commands::{classify, Local};
use conn::DialContext;
use machine::{step, Held, Step};
use pinned::{poll_pinned, Pinned};
use pipeline::ServerConn;
pub use report::{status, MultiplexCollector};
pub use server::Hub;
use sink::{ClientStream, Sink};
pub use stats::{MuxStats, BATCH_BUCKETS};

use super::{
    registry::{self, Registration},
    Admitted, Shared,
};
use crate::{
    config::{Config, Multiplex},
    health::{CredentialsSource, StandaloneCredentials},
    metrics::CloseReason,
    wire::resp::{parse_command_as, Command},
};

/// Unwritten reply bytes past which the client task stops taking more (the rest waits in its
/// sink, where `clientOutputLimit` applies).
const OUT_HIGH: usize = 256 << 10;
/// Unparsed command bytes past which the client is not read until they are handled.
const IN_HIGH: usize = 1 << 20;
/// A client's first input buffer (most commands are far shorter; an idle client keeps it),
/// and the room below which it doubles before a read.
const IN_FIRST: usize = 1024;
const IN_SPARE: usize = 512;

const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";

/// Serves one admitted client in multiplex mode until it leaves or is closed.
pub async fn serve<C: ClientStream>(admitted: Admitted<C>, shared: Shared) {
    let Admitted {
        stream: client,
        peer,
        early,
        permits,
        negotiating,
        config,
        generation,
    } = admitted;
    drop(negotiating);
    let Some(settings) = config.plane.multiplex().cloned() else {
        return;
    };
    let ip = peer.client.ip();
    debug!(generation, "multiplexed client");
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
        sink: Arc::new(Sink::new(
            settings.client_output_limit,
            client.straight(),
            shared.state.metrics.clone(),
        )),
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
        partial: false,
        quitting: false,
        fatal: None,
        registration: None,
    };
    let reason = match session.shared.sessions.register_client(&session.shared, ip) {
        Ok(registration) => {
            session.registration = Some(registration);
            session.run(client).await
        }
        // The configuration or shutdown in force already excludes the client.
        Err(reason) => reason,
    };
    if let Some(p) = session.pinned.take() {
        hub.stats.pin(p.reason, -1);
        hub.dedicated(session.id, None);
    }
    metrics.closed(reason);
    metrics.active_sessions.fetch_sub(1, Relaxed);
    hub.stats.clients.fetch_sub(1, Relaxed);
    drop(permits);
    debug!(reason = reason.as_str(), "client closed");
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
    /// The input ends with part of a command: read on, whatever its size (a command longer
    /// than `IN_HIGH` must be read whole to be handled).
    partial: bool,
    quitting: bool,
    /// A protocol error to send once the replies in flight are in; then close.
    fatal: Option<String>,
    /// The client's place in the session registry.
    registration: Option<Registration>,
}

/// What woke a client's session loop.
enum Event {
    Wrote(std::io::Result<usize>),
    Replied,
    Pinned(std::io::Result<usize>),
    Read(std::io::Result<usize>),
    Closed(CloseReason),
    /// A pinned client's health view changed (false: the channel closed).
    Health(bool),
    Idle,
}

/// Why processing stopped: the session ends.
enum Stop {
    Close(CloseReason),
}

impl Session {
    async fn run<C: ClientStream>(&mut self, client: C) -> CloseReason {
        let metrics = self.shared.state.metrics.clone();
        let mut client = client;
        let idle_timeout = self.config.timeouts.client;
        let mut last_read = Instant::now();
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        // Whether the idle timer's waker is registered for its deadline: it is polled again
        // only once that deadline is past, not at every turn.
        let mut idle_armed = false;
        let mut health = self.shared.health.clone();
        let sink = self.sink.clone();
        // The sink records the task's waker at the first poll (`Sink::replied`).
        let mut first_poll = true;
        // Replies go straight to the client's socket (`Sink::let_straight`).
        let mut straight = false;
        // Allow-list re-checks, `POST /sessions/close`, the drain and the shutdown reach the
        // client here (the registry closes every session on shutdown).
        let signal = self.registration.as_ref().map(Registration::signal);
        let closed = registry::closed(signal.as_ref());
        tokio::pin!(closed);
        loop {
            if self.in_start < self.in_end {
                if let Err(Stop::Close(reason)) = self.process().await {
                    return reason;
                }
            } else {
                // Nothing to parse (most turns: a reply came, or a write went out).
                self.blocked = false;
                self.partial = false;
                self.maybe_release();
                self.in_start = 0;
                self.in_end = 0;
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
                let _ = client.shutdown().await;
                return CloseReason::Done;
            }
            let unparsed = self.in_end - self.in_start;
            let want_read = !self.blocked
                && !self.quitting
                && self.fatal.is_none()
                && out_pending < OUT_HIGH
                && (unparsed < IN_HIGH || self.partial);
            let want_pinned = out_pending < OUT_HIGH;
            let has_pinned = self.pinned.is_some();
            if self.inbuf.len() - self.in_end < IN_SPARE {
                let size = (self.inbuf.len() * 2).max(IN_FIRST);
                self.inbuf.resize(size, 0);
            }
            let event = {
                // A pinned client's backend leaving the routable set ends it.
                let health_changed = async {
                    if has_pinned {
                        health.changed().await
                    } else {
                        std::future::pending().await
                    }
                };
                tokio::pin!(health_changed);
                let (out, out_pos) = (&self.out, self.out_pos);
                let (inbuf, in_end) = (&mut self.inbuf, self.in_end);
                let pinned = &mut self.pinned;
                let register = std::mem::take(&mut first_poll);
                // Replies may go straight to the socket while the task waits with nothing
                // of its own to write and nothing that depends on their arrival.
                let may_go_straight = want_read && out_pending == 0 && !has_pinned;
                std::future::poll_fn(|cx| {
                    if straight {
                        straight = false;
                        sink.let_straight(false);
                    }
                    if out_pending > 0 {
                        if let Poll::Ready(r) =
                            Pin::new(&mut client).poll_write(cx, &out[out_pos..])
                        {
                            return Poll::Ready(Event::Wrote(r));
                        }
                    }
                    if sink.replied(cx, register) {
                        return Poll::Ready(Event::Replied);
                    }
                    if want_pinned && has_pinned {
                        if let Poll::Ready(r) = poll_pinned(pinned.as_mut(), cx) {
                            return Poll::Ready(Event::Pinned(r));
                        }
                    }
                    if want_read {
                        let mut buf = ReadBuf::new(&mut inbuf[in_end..]);
                        if let Poll::Ready(r) = Pin::new(&mut client).poll_read(cx, &mut buf) {
                            return Poll::Ready(Event::Read(r.map(|()| buf.filled().len())));
                        }
                    }
                    if let Poll::Ready(why) = closed.as_mut().poll(cx) {
                        return Poll::Ready(Event::Closed(why));
                    }
                    if let Poll::Ready(r) = health_changed.as_mut().poll(cx) {
                        return Poll::Ready(Event::Health(r.is_ok()));
                    }
                    if !idle_armed || Instant::now() >= idle.deadline() {
                        idle_armed = true;
                        if idle.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Event::Idle);
                        }
                    }
                    if may_go_straight {
                        straight = sink.let_straight(true);
                    }
                    Poll::Pending
                })
                .await
            };
            match event {
                Event::Wrote(r) => match r {
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
                Event::Replied => {}
                Event::Pinned(r) => match r {
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
                Event::Read(r) => match r {
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
                Event::Closed(why) => {
                    debug!(
                        reason = why.as_str(),
                        "multiplexed client closed by the portal"
                    );
                    return why;
                }
                Event::Health(open) => {
                    if !open {
                        return CloseReason::Shutdown;
                    }
                    let view = health.borrow_and_update().clone();
                    if !self.pinned_backend_routable(&view) {
                        debug!("the pinned client's backend no longer takes commands");
                        return CloseReason::Backend;
                    }
                }
                Event::Idle => {
                    let next = last_read + idle_timeout;
                    if next <= Instant::now()
                        && self.idle()
                        && self.pinned.as_ref().is_none_or(|p| !p.state.holds_state())
                    {
                        return CloseReason::ClientTimeout;
                    }
                    idle.as_mut()
                        .reset(next.max(Instant::now() + Duration::from_millis(10)));
                    idle_armed = false;
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
        self.sent == self.delivered && self.pinned.as_ref().is_none_or(|p| p.state.pending == 0)
    }

    fn reply(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Handles every complete command in the input that can be handled now.
    async fn process(&mut self) -> Result<(), Stop> {
        self.blocked = false;
        self.partial = false;
        let mut pin_out: Vec<u8> = Vec::new();
        while !self.quitting && self.fatal.is_none() && self.in_start < self.in_end {
            let buf = &self.inbuf[self.in_start..self.in_end];
            match parse_command_as(buf, &mut self.cmd, self.authed) {
                Ok(true) => {}
                Ok(false) => {
                    self.partial = !buf.is_empty();
                    break;
                }
                Err(e) => {
                    debug!(error = %e, "malformed command; closing the client");
                    self.fatal = Some(e.to_string());
                    break;
                }
            }
            if self.authed {
                self.translate_client_id();
            }
            let buf = &self.inbuf[self.in_start..self.in_end];
            let argc = self.cmd.args.len();
            let action = {
                let cmd = &self.cmd;
                classify(argc, |i| cmd.arg(buf, i))
            };
            let held = match &self.pinned {
                None => Held::No,
                Some(p) if p.state.resetting.is_some() => Held::Resetting,
                Some(p) if p.state.raw => Held::Raw,
                Some(_) => Held::Counted,
            };
            let step = step(action, self.authed, held, || self.idle());
            if step == Step::Pinned {
                self.pinned_command(action, &mut pin_out);
                continue;
            }
            if !pin_out.is_empty() && step != Step::Plain {
                // Answered here, moving to a dedicated connection or sent on one of its own:
                // what was queued for the dedicated connection goes first.
                self.flush_pinned(&mut pin_out).await?;
            }
            if step == Step::Wait {
                self.blocked = true;
                break;
            }
            if step == Step::NoAuth {
                self.consume();
                self.reply(NOAUTH);
                continue;
            }
            match step {
                Step::Local(Local::Reset) if self.pinned.as_ref().is_some_and(|p| !p.state.raw) => {
                    self.consume();
                    self.reset_pinned(&mut pin_out);
                }
                Step::Local(local) => {
                    // CLIENT REPLY OFF / SKIP silence the portal's answers as the server's.
                    let quiet = self.pinned.as_mut().is_some_and(|p| match local {
                        Local::Reset => !p.state.reset_reply(),
                        _ => !p.state.local_reply(),
                    });
                    let before = self.out.len();
                    self.local(local);
                    if quiet {
                        self.out.truncate(before);
                    }
                    self.consume();
                }
                Step::Hello => {
                    if !self.hello_auth() {
                        self.consume();
                        continue;
                    }
                    if self.pinned.is_none() {
                        if let Err(e) = self.pin(PinReason::Resp3).await {
                            self.consume();
                            self.reply(format!("-ERR {e}\r\n").as_bytes());
                            continue;
                        }
                    }
                    self.hello_pinned(action, &mut pin_out);
                }
                Step::Pin(reason) => match self.pin(reason).await {
                    Ok(()) => self.pinned_command(action, &mut pin_out),
                    Err(e) => {
                        self.consume();
                        self.reply(format!("-ERR {e}\r\n").as_bytes());
                    }
                },
                Step::OutOfBand => self.out_of_band().await,
                Step::Plain => {
                    if !self.send_plain().await? {
                        self.blocked = true;
                        break;
                    }
                }
                // Handled above.
                Step::Pinned | Step::Wait | Step::NoAuth => {}
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
}
