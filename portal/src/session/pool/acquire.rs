//! Taking a server connection for a pooled PostgreSQL client's transaction (or session) and
//! giving it back: the current pool's idle connection or its queue in the common case; else
//! choosing the backend (waiting out a failover within `pooling.queueTimeout`), dialling, and
//! the client's reported parameters set on the connection; the holder recorded where a cancel,
//! the session registry and the pool's retirement find it.
//!
//! May import: `config` and the rest of `pool`; the session's [`hub`](crate::session::hub).

use std::sync::{atomic::Ordering::Relaxed, Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::{timeout, Duration, Instant},
};

use super::conn::{self, ServerConn};
use super::held::Held;
use super::pinning;
use super::server::{CheckoutError, Grant, Pool, Turn};
use super::Client;
use crate::session::hub::first_choice;

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(super) fn hold(&mut self, mut conn: Box<ServerConn>, pool: Arc<Pool>) {
        pool.hold(&mut conn, &self.waker);
        if let Some((_, slot)) = &self.cancel {
            slot.held(&pool, conn.key);
        }
        self.hub.stats.active.fetch_add(1, Relaxed);
        pool.active.fetch_add(1, Relaxed);
        if let Some(r) = &self.registration {
            if self.reported == pool.id {
                r.on_same_backend();
            } else {
                r.on_backend(Some(&pool.backend.name));
                self.reported = pool.id;
            }
        }
        self.machine
            .acquired(std::mem::take(&mut conn.buffers.expect));
        self.held = Some(Held {
            conn,
            pool,
            skip: 0,
        });
    }

    /// Returns a connection that is not held to its pool.
    pub(super) fn give_back(&mut self, conn: Box<ServerConn>) {
        if let Some(pool) = &self.pool {
            pool.checkin(conn, self.settings.server_lifetime);
        }
    }

    /// Lets go of the held connection (to its pool, or closed when `broken`).
    pub(super) fn release(&mut self, broken: bool) {
        let expect = self.machine.released();
        if let Some(mut h) = self.held.take() {
            if let Some((_, slot)) = &self.cancel {
                slot.released();
            }
            if let Some(r) = &self.registration {
                r.on_backend(None);
            }
            self.hub.stats.active.fetch_sub(1, Relaxed);
            h.pool.active.fetch_sub(1, Relaxed);
            let read = &mut h.conn.buffers.read;
            h.conn.broken |= broken || !read.is_empty() || h.skip > 0;
            if read.capacity() > conn::Buffers::KEEP {
                *read = Vec::new();
            }
            if !h.conn.broken {
                if let Some(expect) = expect.filter(|q| q.is_empty() && q.capacity() <= 256) {
                    h.conn.buffers.expect = expect;
                }
            }
            h.pool.checkin(h.conn, self.settings.server_lifetime);
        }
    }

    /// The pool to use now: the current one while its backend takes transactions, else the
    /// routing mode's first choice, waiting up to `timeouts.connect` for one (a failover).
    async fn target(&mut self) -> Result<Arc<Pool>, (&'static str, String)> {
        if let Some(p) = &self.pool {
            if !p.is_retired() {
                return Ok(p.clone());
            }
        }
        self.pool = None;
        let backend = self.choose().await?;
        let pool = self.hub.pool(
            &backend,
            &self.database,
            &self.user,
            &self.startup,
            &self.login,
            &self.ctx,
        );
        self.pool = Some(pool.clone());
        Ok(pool)
    }

    /// The backend the routing mode chooses now, waiting up to `timeouts.connect` for one (a
    /// failover).
    pub(super) async fn choose(&self) -> Result<crate::config::Backend, (&'static str, String)> {
        match first_choice(&self.config, &self.shared, self.ip, 0).await {
            Ok(i) => Ok(self.config.backends[i].clone()),
            Err(waited) => Err((
                "08006",
                format!("no backend available (no leader within {waited:?})"),
            )),
        }
    }

    /// A server connection of the current pool, after the queue; errors as (SQLSTATE, text).
    ///
    /// A backend that cannot be reached, or takes no logins for now (57P03: shutting down,
    /// starting up, in recovery), is what a failover looks like from here: the failure is
    /// reported to the health checker and the client keeps waiting, within
    /// `pooling.queueTimeout`, for the health view to change (the backend back, or another
    /// leader), so that a transaction begun in the middle of a failover runs on the new leader
    /// instead of failing. A refused login (wrong password, no such role) fails at once.
    pub(super) async fn acquire_conn(&mut self) -> Result<Box<ServerConn>, (&'static str, String)> {
        // The common case, without a future of its own: the current pool's idle connection
        // (no wait, no clock read), or its queue (whose watchdog ends the wait at the
        // deadline: no timer per wait).
        let mut first = None;
        let mut started = None;
        if let Some(pool) = self.pool.clone() {
            let grant = match pool.turn(self.settings.queue_timeout, Some(&self.waker)) {
                Turn::Conn(c) => {
                    self.hub.stats.record_wait(Duration::ZERO);
                    return Ok(c);
                }
                Turn::Queued(waiting) => {
                    started = Some(waiting.since);
                    waiting.granted().await
                }
                Turn::Dial => {
                    started = Some(Instant::now());
                    Grant::Dial
                }
                Turn::Retired => Grant::Retired,
            };
            let got = match grant {
                Grant::Conn(c) => Ok(c),
                Grant::Timeout => Err(CheckoutError::Timeout),
                Grant::Retired => Err(CheckoutError::Retired),
                dial => Box::pin(pool.use_grant(dial, &self.ctx, &self.login)).await,
            };
            if let Ok(c) = got {
                let waited = started.map_or(Duration::ZERO, |t| t.elapsed());
                self.hub.stats.record_wait(waited);
                return Ok(c);
            }
            first = Some(got);
        }
        let started = started.unwrap_or_else(Instant::now);
        Box::pin(self.acquire_slow(started, first)).await
    }

    /// [`Client::acquire_conn`] past its common case: choosing a backend, dialling, waiting
    /// out a failover. `first` is the outcome of a checkout already tried on the current pool.
    async fn acquire_slow(
        &mut self,
        started: Instant,
        mut first: Option<Result<Box<ServerConn>, CheckoutError>>,
    ) -> Result<Box<ServerConn>, (&'static str, String)> {
        let mut health = self.shared.health.clone();
        let mut last_failure: Option<String> = None;
        let mut retired = 0;
        loop {
            health.borrow_and_update();
            let pool = match (&first, &self.pool) {
                (Some(_), Some(p)) => p.clone(),
                _ => self.target().await?,
            };
            let checked_out = match first.take() {
                Some(got) => got,
                None => {
                    let left = self
                        .settings
                        .queue_timeout
                        .saturating_sub(started.elapsed());
                    pool.checkout(&self.ctx, &self.login, left).await
                }
            };
            let failure = match checked_out {
                Ok(c) => {
                    self.hub.stats.record_wait(started.elapsed());
                    return Ok(c);
                }
                Err(CheckoutError::Timeout) => {
                    self.hub.stats.queue_timeouts.fetch_add(1, Relaxed);
                    return Err(match last_failure {
                        Some(e) => (
                            "08006",
                            format!(
                                "no server connection within pooling.queueTimeout ({:?}): {e}",
                                self.settings.queue_timeout
                            ),
                        ),
                        None => (
                            "53300",
                            format!(
                                "no server connection available within pooling.queueTimeout ({:?}): all {} of the pool are busy",
                                self.settings.queue_timeout, self.settings.pool_size
                            ),
                        ),
                    });
                }
                Err(CheckoutError::Retired) => {
                    // The pool's backend stopped leading between choosing and checking out:
                    // choose again, and after a few such turns wait for the view to settle.
                    retired += 1;
                    if retired <= 3 {
                        continue;
                    }
                    "no backend available: the leader keeps changing".to_string()
                }
                Err(CheckoutError::Dial(e)) => {
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        return Err(("28000", format!("the server refused the login: {e}")));
                    }
                    if e.kind() == std::io::ErrorKind::InvalidInput {
                        return Err(("22023", format!("invalid startup parameter: {e}")));
                    }
                    if let Some(checker) = &self.shared.checker {
                        checker.report_connect_failure(&pool.backend.name);
                    }
                    format!("the server connection to {} failed: {e}", pool.backend.name)
                }
            };
            let left = self
                .settings
                .queue_timeout
                .saturating_sub(started.elapsed());
            if left.is_zero() {
                self.hub.stats.queue_timeouts.fetch_add(1, Relaxed);
                return Err(("08006", failure));
            }
            last_failure = Some(failure);
            // Until the health view changes (the checker probes at once on a report), at most
            // a quarter of a second before trying again.
            let _ = timeout(left.min(Duration::from_millis(250)), health.changed()).await;
        }
    }

    /// Takes a server connection for the client's next transaction and gives it the client's
    /// parameters.
    pub(super) async fn acquire(&mut self) -> Result<(), (&'static str, String)> {
        let mut conn = self.acquire_conn().await?;
        let pool = self.pool.clone().expect("acquired");
        let sql = if conn::same_params(&mut self.params, &mut conn.params) {
            String::new()
        } else {
            pinning::replay_sql(&self.params, &conn.params)
        };
        if !sql.is_empty() {
            if let Err(e) = conn.run(&sql, self.config.timeouts.server).await {
                conn.broken = true;
                pool.checkin(conn, self.settings.server_lifetime);
                return Err((
                    "08006",
                    format!("the client's parameters could not be set on a server connection: {e}"),
                ));
            }
        }
        self.hold(conn, pool);
        Ok(())
    }
}
