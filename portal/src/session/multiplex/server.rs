//! The server side of multiplexing: per backend a pool ([`BackendPool`]) of a few shared
//! server connections (see `pipeline`) and of dedicated connections for pinned clients
//! ([`PinnedConn`], cleaned by `conn::clean` before they serve anyone else); and the [`Hub`]
//! of one portal's pools, with the task that retires the pools of a backend that may no
//! longer take commands (a demoted leader).
//!
//! May import: `config`, `health` and the rest of `multiplex` below it (`commands`, `conn`,
//! `pipeline`, `sink`, `stats`); from `session`, what retires the pools on a route change.

use std::{
    collections::HashMap,
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    sync::{watch, Notify},
    time::timeout,
};
use tracing::{debug, info};

use super::commands::pause;
use super::conn::{clean, dial, server_id, DialContext, ServerStream};
use super::pipeline::{start, ServerConn, TRYAGAIN};
use super::sink::lock;
use super::stats::MuxStats;
use crate::{
    config::{Backend, Config},
    health::HealthView,
};

/// The server connections of one backend.
pub struct BackendPool {
    pub name: Arc<str>,
    /// `name/address`: what routing decides on.
    base: String,
    backend: Backend,
    shared: Vec<Mutex<Option<Arc<ServerConn>>>>,
    opening: Vec<tokio::sync::Mutex<()>>,
    /// Idle dedicated connections, with their server-side ids.
    idle_pinned: Mutex<Vec<(ServerStream, u64)>>,
    /// Dedicated connections open (idle or held).
    pinned_open: AtomicUsize,
    pinned_freed: Notify,
    retired: AtomicBool,
    stats: Arc<MuxStats>,
}

impl std::fmt::Debug for BackendPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendPool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl BackendPool {
    /// Shared connections alive now.
    pub fn alive(&self) -> usize {
        self.shared
            .iter()
            .filter(|s| lock(s).as_ref().is_some_and(|c| !c.is_dead()))
            .count()
    }

    pub fn in_flight(&self) -> usize {
        self.shared
            .iter()
            .filter_map(|s| lock(s).clone())
            .map(|c| c.in_flight())
            .sum()
    }

    pub fn pinned_open(&self) -> usize {
        self.pinned_open.load(Relaxed)
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    /// Shared connection `i % serverConnections`, opened if it is not (or no longer) alive;
    /// or, when that one carries a command the server may hold (a script or function, any
    /// command under CLIENT PAUSE), the next one that does not. A server busy with a script
    /// reads nothing more from its connection and answers the others `-BUSY`; a paused one
    /// holds a write but answers reads on other connections: as it does for direct clients,
    /// a client with nothing in flight is not queued behind what may not end before it gets
    /// an answer.
    pub async fn shared(
        self: &Arc<Self>,
        i: usize,
        ctx: &DialContext,
        max_in_flight: usize,
    ) -> io::Result<Arc<ServerConn>> {
        let n = self.shared.len();
        let i = (0..n)
            .map(|k| (i + k) % n)
            .find(|&j| {
                lock(&self.shared[j])
                    .as_ref()
                    .is_none_or(|c| c.is_dead() || !c.may_be_held())
            })
            .unwrap_or(i % n);
        if let Some(c) = lock(&self.shared[i]).as_ref().filter(|c| !c.is_dead()) {
            return Ok(c.clone());
        }
        let _opening = self.opening[i].lock().await;
        if let Some(c) = lock(&self.shared[i]).as_ref().filter(|c| !c.is_dead()) {
            return Ok(c.clone());
        }
        if self.is_retired() {
            return Err(io::Error::other("the backend no longer takes commands"));
        }
        let stream = dial(ctx, &self.backend).await?;
        let conn = start(stream, self.name.clone(), max_in_flight, self.stats.clone());
        if self.is_retired() {
            conn.fail(TRYAGAIN, None);
            return Err(io::Error::other("the backend no longer takes commands"));
        }
        self.stats.server_connections_opened.fetch_add(1, Relaxed);
        debug!(backend = %self.name, slot = i, "shared server connection open");
        *lock(&self.shared[i]) = Some(conn.clone());
        Ok(conn)
    }

    /// A dedicated connection for a pinned client: an idle one, a new one within `max`, or
    /// the next one freed within `wait`.
    pub async fn take_pinned(
        self: &Arc<Self>,
        ctx: &DialContext,
        max: usize,
        wait: Duration,
    ) -> io::Result<PinnedConn> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.pinned_freed.notified();
            if self.is_retired() {
                return Err(io::Error::other("the backend no longer takes commands"));
            }
            if let Some((stream, id)) = lock(&self.idle_pinned).pop() {
                return Ok(PinnedConn {
                    stream: Some(stream),
                    server_id: id,
                    targeted: Arc::default(),
                    pool: self.clone(),
                });
            }
            let open = self.pinned_open.load(Relaxed);
            if open < max
                && self
                    .pinned_open
                    .compare_exchange(open, open + 1, Relaxed, Relaxed)
                    .is_ok()
            {
                // Holds the place: dropped on a failed dial, it frees it.
                let mut conn = PinnedConn {
                    stream: None,
                    server_id: 0,
                    targeted: Arc::default(),
                    pool: self.clone(),
                };
                let mut stream = dial(ctx, &self.backend).await?;
                conn.server_id = server_id(&mut stream, ctx.config.timeouts.connect).await?;
                conn.stream = Some(stream);
                return Ok(conn);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no dedicated server connection free within {wait:?} (pooling.queueTimeout)"),
                ));
            }
        }
    }

    /// Stops using this backend: shared connections fail their commands in flight with
    /// `error`, idle dedicated ones close. New connections open lazily when it is routable
    /// again.
    pub fn retire(&self, error: &[u8]) {
        for slot in &self.shared {
            if let Some(conn) = lock(slot).take() {
                conn.fail(error, None);
            }
        }
        let idle = std::mem::take(&mut *lock(&self.idle_pinned));
        self.pinned_open.fetch_sub(idle.len(), Relaxed);
        self.pinned_freed.notify_waiters();
    }

    fn revive(&self) {
        self.retired.store(false, Relaxed);
    }
}

/// A dedicated server connection held by a pinned client; closing it (dropping) frees its
/// place, [`PinnedConn::release`] cleans it for the next client.
pub struct PinnedConn {
    stream: Option<ServerStream>,
    /// Its CLIENT ID on the server: what the client's own id stands for in the commands that
    /// name a client (CLIENT TRACKING … REDIRECT, CLIENT UNBLOCK, CLIENT KILL ID).
    pub server_id: u64,
    /// Another client's tracking was redirected to it: closed afterwards, not reused, so that
    /// no later client gets those invalidations.
    pub targeted: Arc<AtomicBool>,
    pool: Arc<BackendPool>,
}

impl std::fmt::Debug for PinnedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedConn")
            .field("backend", &self.pool.name)
            .finish_non_exhaustive()
    }
}

impl PinnedConn {
    pub fn stream(&mut self) -> &mut ServerStream {
        self.stream
            .as_mut()
            .expect("a held connection has its stream")
    }

    pub fn backend(&self) -> &Arc<str> {
        &self.pool.name
    }

    /// Cleans the connection (see `conn::clean`; `unread`: what was read of it and not passed
    /// on) and gives it back to the pool; a connection that does not come out clean is closed
    /// instead.
    pub fn release(mut self, ctx: DialContext, unread: Vec<u8>) {
        if self.targeted.load(Relaxed) {
            return;
        }
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        let id = self.server_id;
        let pool = self.pool.clone();
        // The place stays counted while the connection is cleaned; `self` no longer holds it.
        std::mem::forget(self);
        tokio::spawn(async move {
            let creds = ctx.credentials().ok().flatten();
            let cleaned = timeout(
                ctx.config.timeouts.connect,
                clean(&mut stream, &creds, unread),
            )
            .await;
            if matches!(cleaned, Ok(Ok(()))) && !pool.is_retired() {
                pool.stats.pinned_reused.fetch_add(1, Relaxed);
                lock(&pool.idle_pinned).push((stream, id));
            } else {
                debug!(backend = %pool.name, "a dedicated connection did not clean up; closed");
                pool.pinned_open.fetch_sub(1, Relaxed);
            }
            pool.pinned_freed.notify_one();
        });
    }
}

impl Drop for PinnedConn {
    fn drop(&mut self) {
        self.pool.pinned_open.fetch_sub(1, Relaxed);
        self.pool.pinned_freed.notify_one();
    }
}

/// The id a command naming a client gets for a client with no dedicated connection: valid
/// where Redis reads a client id (1 to `LONG_MAX`), so that the rest of the command is checked
/// as direct, and held by no server connection (Redis counts its ids up from 1).
pub const NO_CLIENT: u64 = i64::MAX as u64;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Redirect targets remembered for [`Hub::rename_client`].
const MAX_REDIRECTS: usize = 1 << 16;

/// The multiplexer of one portal: its pools by backend, and the task that retires the pools
/// of backends that may no longer take commands (a demoted leader).
#[derive(Debug, Default)]
pub struct Hub {
    pools: Mutex<HashMap<String, Arc<BackendPool>>>,
    /// Pinned clients by the id the portal gave them: their dedicated connection's id on the
    /// server, and its `targeted` flag.
    dedicated: Mutex<HashMap<u64, (u64, Arc<AtomicBool>)>>,
    /// The clients tracking was redirected to: the portal's id by the server's (which Redis
    /// never gives twice, so an old entry cannot mislead), at most `MAX_REDIRECTS`.
    redirects: Mutex<HashMap<u64, u64>>,
    pub stats: Arc<MuxStats>,
    next_client: AtomicU64,
    /// When the latest CLIENT PAUSE sent through the portal ends, in milliseconds since the
    /// Unix epoch (0: none, or CLIENT UNPAUSE since).
    paused_until: AtomicU64,
    watching: crate::session::hub::RouteWatch,
}

impl Hub {
    pub fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Relaxed) + 1
    }

    /// Client `id` holds `conn` (or, `None`, no dedicated connection any more).
    pub fn dedicated(&self, id: u64, conn: Option<&PinnedConn>) {
        let mut d = lock(&self.dedicated);
        match conn {
            Some(c) => d.insert(id, (c.server_id, c.targeted.clone())),
            None => d.remove(&id),
        };
    }

    /// Follows CLIENT PAUSE and CLIENT UNPAUSE (`argc` arguments, `args(i)`) as they are sent.
    pub fn note_pause<'a>(&self, argc: usize, args: impl Fn(usize) -> Option<&'a [u8]>) {
        match pause(argc, args) {
            Some(Some(ms)) => {
                let until = now_ms().saturating_add(ms);
                self.paused_until.fetch_max(until, Relaxed);
            }
            Some(None) => self.paused_until.store(0, Relaxed),
            None => {}
        }
    }

    /// Whether a CLIENT PAUSE sent through the portal may be in effect.
    pub fn paused(&self) -> bool {
        let until = self.paused_until.load(Relaxed);
        until != 0 && now_ms() <= until
    }

    /// The server-side id that client `id` stands for in a command naming a client: its
    /// dedicated connection's, marked `targeted` when `redirect` (tracking goes there);
    /// [`NO_CLIENT`] for a client without one.
    pub fn server_id_of(&self, id: u64, redirect: bool) -> u64 {
        match lock(&self.dedicated).get(&id) {
            Some((server, targeted)) => {
                if redirect {
                    targeted.store(true, Relaxed);
                    let mut r = lock(&self.redirects);
                    if r.len() >= MAX_REDIRECTS {
                        r.clear();
                    }
                    r.insert(*server, id);
                }
                *server
            }
            None => NO_CLIENT,
        }
    }

    /// Writes `reply` (to CLIENT GETREDIR or CLIENT TRACKINGINFO) to `out` with the redirect
    /// target named by the id the portal gave it instead of the server's, as the client named
    /// it in CLIENT TRACKING … REDIRECT.
    pub fn rename_client(&self, reply: &[u8], out: &mut Vec<u8>) {
        const KEY: &[u8] = b"$8\r\nredirect\r\n";
        let at = if reply.first() == Some(&b':') {
            Some(0)
        } else {
            reply
                .windows(KEY.len())
                .position(|w| w == KEY)
                .map(|i| i + KEY.len())
                .filter(|&i| reply.get(i) == Some(&b':'))
        };
        let renamed = at.and_then(|at| {
            let end = at + reply[at..].iter().position(|&b| b == b'\r')?;
            let server: u64 = std::str::from_utf8(&reply[at + 1..end])
                .ok()?
                .parse()
                .ok()?;
            let id = *lock(&self.redirects).get(&server)?;
            Some((at, end, id))
        });
        match renamed {
            Some((at, end, id)) => {
                out.extend_from_slice(&reply[..=at]);
                out.extend_from_slice(id.to_string().as_bytes());
                out.extend_from_slice(&reply[end..]);
            }
            None => out.extend_from_slice(reply),
        }
    }

    /// The pool of `backend` (by name and address, so a changed address gets a new one).
    ///
    /// The shared connections are per data-plane thread (`shared: true`, `server_connections`
    /// of them on the calling thread): their reader then wakes clients of its own thread, with
    /// no wake-up crossing threads per reply. Dedicated connections are one pool for all.
    pub fn pool(
        &self,
        backend: &Backend,
        shared: bool,
        server_connections: usize,
    ) -> Arc<BackendPool> {
        let base = format!("{}/{}", backend.name, backend.address);
        let key = if shared {
            format!("{base}@{:?}", std::thread::current().id())
        } else {
            base.clone()
        };
        let server_connections = if shared { server_connections } else { 0 };
        let mut pools = lock(&self.pools);
        let pool = pools.entry(key).or_insert_with(|| {
            Arc::new(BackendPool {
                name: backend.name.as_str().into(),
                base,
                backend: backend.clone(),
                shared: (0..server_connections).map(|_| Mutex::new(None)).collect(),
                opening: (0..server_connections)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                idle_pinned: Mutex::default(),
                pinned_open: AtomicUsize::new(0),
                pinned_freed: Notify::new(),
                retired: AtomicBool::new(false),
                stats: self.stats.clone(),
            })
        });
        pool.revive();
        pool.clone()
    }

    /// Every pool, for metrics and status.
    pub fn pools(&self) -> Vec<Arc<BackendPool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// Starts (once) the task that retires the pools of backends no longer routable.
    pub fn watch(
        self: &Arc<Self>,
        config: watch::Receiver<Arc<Config>>,
        health: watch::Receiver<HealthView>,
    ) {
        self.watching
            .start(self, config, health, Self::retire_unroutable);
    }

    /// Retires every pool whose backend may not take commands under `config` and `view`.
    /// Administrative states (drain, maint) do not retire a pool: like open sessions, the
    /// commands in flight finish; new commands go elsewhere (`Client::target`).
    pub fn retire_unroutable(&self, config: &Config, view: &HealthView) {
        let eligible = crate::session::hub::routable_bases(config, view);
        let waiting = config.routing == crate::config::RoutingMode::Leader && eligible.is_empty();
        for pool in lock(&self.pools).values() {
            if eligible.contains(&pool.base) || pool.is_retired() {
                continue;
            }
            // Without a leader (failover under way) the old one is retired all the same: it
            // may be the demoted node, and nothing may be written to it.
            pool.retired.store(true, Relaxed);
            info!(backend = %pool.name, leaderless = waiting, "backend no longer takes commands: its server connections are replaced");
            pool.retire(TRYAGAIN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_targets_are_named_by_the_portal_ids() {
        let hub = Hub::default();
        lock(&hub.redirects).insert(41, 7);
        let renamed = |reply: &[u8]| {
            let mut out = Vec::new();
            hub.rename_client(reply, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(renamed(b":41\r\n"), ":7\r\n");
        // Not a target the portal redirected to (-1: none, 0: the client itself).
        assert_eq!(renamed(b":-1\r\n"), ":-1\r\n");
        assert_eq!(renamed(b":0\r\n"), ":0\r\n");
        assert_eq!(renamed(b":42\r\n"), ":42\r\n");
        let resp2 = b"*6\r\n$5\r\nflags\r\n*2\r\n$2\r\non\r\n$6\r\nnoloop\r\n$8\r\nredirect\r\n:41\r\n$8\r\nprefixes\r\n*0\r\n";
        assert_eq!(
            renamed(resp2),
            "*6\r\n$5\r\nflags\r\n*2\r\n$2\r\non\r\n$6\r\nnoloop\r\n$8\r\nredirect\r\n:7\r\n$8\r\nprefixes\r\n*0\r\n"
        );
        let resp3 = b"%3\r\n$5\r\nflags\r\n~1\r\n$2\r\non\r\n$8\r\nredirect\r\n:41\r\n$8\r\nprefixes\r\n*1\r\n$8\r\nredirect\r\n";
        assert_eq!(
            renamed(resp3),
            "%3\r\n$5\r\nflags\r\n~1\r\n$2\r\non\r\n$8\r\nredirect\r\n:7\r\n$8\r\nprefixes\r\n*1\r\n$8\r\nredirect\r\n"
        );
    }
}
