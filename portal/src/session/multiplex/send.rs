//! Where a multiplexed client's commands are sent: a run of plain commands as one request on
//! the shared server connection the client sticks to while replies are in flight (or a new
//! one once none are), a command that must reach a server busy with a script on a connection
//! opened for it alone, and the backend both go to (the leader, or the routing mode's first
//! choice).
//!
//! May import: `wire`, the rest of `multiplex` and the session's [`hub`](crate::session::hub).

use std::sync::{atomic::Ordering::Relaxed, Arc};

use tracing::debug;

use super::commands::{classify, client_id_arg, runs_script, Action};
use super::conn::{dial, send_alone};
use super::pipeline::{ServerConn, TRYAGAIN};
use super::{Session, Stop};
use crate::{session::hub::first_choice, wire::resp::parse_command};

impl Session {
    /// Sends the run of plain commands that starts at the parsed one as one request. False
    /// when it must wait for the replies in flight on a connection that went away.
    pub(super) async fn send_plain(&mut self) -> Result<bool, Stop> {
        let start = self.in_start;
        let mut end = start + self.cmd.len;
        let mut count: u32 = 1;
        // While a CLIENT PAUSE sent through the portal lasts, any command may be held.
        let paused = self.hub.paused();
        let held_first = self.arg(0).is_some_and(runs_script);
        let cmd = &self.cmd;
        let buf = &self.inbuf[start..self.in_end];
        self.hub.note_pause(cmd.args.len(), |i| cmd.arg(buf, i));
        let mut held = u32::from(paused || held_first);
        let max = self.settings.max_in_flight as u32;
        while count < max && end < self.in_end {
            let buf = &self.inbuf[end..self.in_end];
            match parse_command(buf, &mut self.cmd) {
                Ok(true) => {}
                _ => break,
            }
            let cmd = &self.cmd;
            // A command naming a client is rewritten first, on its own turn.
            if classify(cmd.args.len(), |i| cmd.arg(buf, i)) != Action::Plain
                || client_id_arg(cmd.args.len(), |i| cmd.arg(buf, i)).is_some()
            {
                break;
            }
            self.hub.note_pause(cmd.args.len(), |i| cmd.arg(buf, i));
            held += u32::from(paused || cmd.arg(buf, 0).is_some_and(runs_script));
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
        // Waits while maxInFlight commands are in flight; a connection gone meanwhile (or
        // before) fails the commands.
        self.sent += u64::from(count);
        if !conn
            .send(&self.inbuf[start..end], count, held, &self.sink)
            .await
        {
            self.sink.fail(TRYAGAIN, u64::from(count));
        }
        Ok(true)
    }

    /// Sends the parsed command on a server connection opened for it alone, to the backend
    /// this client's commands go to, and answers with its reply. A server busy with a script
    /// reads nothing more from the connection running it, which may be the shared connection
    /// this client uses: SCRIPT KILL, FUNCTION KILL and SHUTDOWN NOSAVE queued there would wait
    /// for the script they are meant to end (and CLIENT UNPAUSE for the commands a pause
    /// holds). A SHUTDOWN that succeeds closes the connection without a reply: the client is
    /// closed too, as Redis would close it.
    pub(super) async fn out_of_band(&mut self) {
        let command = self.inbuf[self.in_start..self.in_start + self.cmd.len].to_vec();
        let buf = &self.inbuf[self.in_start..self.in_end];
        let cmd = &self.cmd;
        self.hub.note_pause(cmd.args.len(), |i| cmd.arg(buf, i));
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
        let stream = match dial(&self.ctx, &backend).await {
            Ok(stream) => stream,
            Err(e) => {
                if let Some(checker) = &self.shared.checker {
                    checker.report_connect_failure(&backend.name);
                }
                return self.reply(failed(e).as_bytes());
            }
        };
        self.hub.stats.out_of_band.fetch_add(1, Relaxed);
        match send_alone(stream, &command, self.config.timeouts.server).await {
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
    pub(super) async fn target(&mut self) -> Result<usize, String> {
        first_choice(&self.config, &self.shared, self.ip, self.id as usize)
            .await
            .map_err(|waited| {
                format!("no backend available (no leader within {waited:?}); the command was not applied")
            })
    }

    /// The shared connection to send on: the current one while it lives (replies in order),
    /// else a new choice once nothing is in flight; a new choice too when the current one
    /// carries a command the server may hold and nothing of this client is in flight (see
    /// `BackendPool::shared`). `Ok(None)`: wait for replies first.
    pub(super) async fn conn(&mut self) -> Result<Option<Arc<ServerConn>>, String> {
        if let Some(c) = self.current.clone() {
            if !c.is_dead() && (!c.may_be_held() || !self.idle()) {
                return Ok(Some(c));
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
