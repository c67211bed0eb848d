//! One pool of PostgreSQL pooling ([`Pool`]): the server connections to one backend for one
//! database, user and startup parameters, opened and logged in as the client's user; their
//! FIFO queue of waiting clients, whose deadlines one watchdog task per pool keeps; the
//! holders of its connections, woken when it is retired (its backend no longer takes
//! transactions: a demoted leader). The pools of a portal are in [`pools`](super::pools).
//!
//! May import: `config` and the rest of `pool` below it (`conn`, `secret`, `stats`).

use std::{
    collections::VecDeque,
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    task::Waker,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::debug;

use super::conn::{dial, lock, DialContext, ServerConn, Startup};
use super::secret::Login;
use super::stats::PoolStats;
use crate::config::Backend;

/// A slot taken to open a connection: given back ([`Pool::closed_one`]) when dropped, unless
/// the connection was opened ([`Slot::keep`]).
struct Slot<'a>(Option<&'a Pool>);

impl Slot<'_> {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.0 {
            pool.closed_one();
        }
    }
}

/// A checkout queued for a grant ([`Pool::turn`]). Dropped with a grant in it (the client
/// left at that moment), the grant goes back: a connection is closed and its slot, like a
/// slot to dial, is given to the next waiter, so no slot is lost.
pub struct Waiting<'a> {
    pool: &'a Pool,
    rx: oneshot::Receiver<Grant>,
    /// When it queued.
    pub since: tokio::time::Instant,
}

impl Waiting<'_> {
    /// The grant, when it comes; [`Grant::Timeout`] once the deadline given to
    /// [`Pool::turn`] passes (the pool's watchdog sends it: no timer per wait).
    pub async fn granted(mut self) -> Grant {
        self.pool.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let got = (&mut self.rx).await;
        self.pool.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        got.unwrap_or(Grant::Retired)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Conn(mut conn)) => {
                let mut g = lock(&self.pool.inner);
                g.drop_holder(&mut conn);
                drop(conn);
                self.pool
                    .stats
                    .server_closed
                    .fetch_add(1, Ordering::Relaxed);
                g.closed_one();
            }
            Ok(Grant::Dial) => self.pool.closed_one(),
            Ok(Grant::Retired | Grant::Timeout) | Err(_) => {}
        }
    }
}

/// What a waiting client is given.
pub enum Grant {
    Conn(Box<ServerConn>),
    /// A slot to open a connection of its own (one closed, or a dial failed).
    Dial,
    /// The pool was retired (its backend stopped leading): choose again.
    Retired,
    /// Its deadline passed first.
    Timeout,
}

/// A checkout's first step ([`Pool::turn`]): a connection at once, a slot to dial, or a
/// place in the queue.
pub enum Turn<'a> {
    Conn(Box<ServerConn>),
    Dial,
    Queued(Waiting<'a>),
    Retired,
}

/// A queued checkout: where its grant goes, and when it stops waiting.
struct Waiter {
    tx: oneshot::Sender<Grant>,
    deadline: tokio::time::Instant,
    /// Its task, recorded as the holder of the connection it is given.
    waker: Option<Waker>,
}

#[derive(Default)]
struct Inner {
    /// Boxed: a connection moves between the idle list, the grants and its holders, and a
    /// pointer moves for less than the connection does.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConn>>,
    /// Connections open or being opened (idle + held + dialling).
    open: usize,
    waiters: VecDeque<Waiter>,
    /// The deadline the queue's watchdog sleeps until, if any: a waiter with an earlier one
    /// wakes it.
    watched: Option<tokio::time::Instant>,
    /// The tasks of the clients holding one of its connections, woken when it is retired
    /// (a free place is `None`; [`Pool::hold`] gives the index).
    holders: Vec<Option<Waker>>,
    free_holders: Vec<usize>,
}

impl Inner {
    /// Records `waker` as a holder's: its place.
    fn add_holder(&mut self, waker: &Waker) -> usize {
        match self.free_holders.pop() {
            Some(i) => {
                self.holders[i] = Some(waker.clone());
                i
            }
            None => {
                self.holders.push(Some(waker.clone()));
                self.holders.len() - 1
            }
        }
    }

    /// The holder of a connection coming back, forgotten.
    fn drop_holder(&mut self, conn: &mut ServerConn) {
        if let Some(i) = conn.holder.take() {
            if self.holders.get_mut(i).and_then(Option::take).is_some() {
                self.free_holders.push(i);
            }
        }
    }

    /// A slot freed (a connection closed, a dial failed): the first waiter may open one.
    fn closed_one(&mut self) {
        self.open -= 1;
        while let Some(w) = self.waiters.pop_front() {
            if w.tx.send(Grant::Dial).is_ok() {
                self.open += 1;
                break;
            }
        }
    }
}

/// Why a client got no server connection.
#[derive(Debug)]
pub enum CheckoutError {
    /// `queueTimeout` ran out.
    Timeout,
    /// The pool's backend stopped taking transactions: choose another.
    Retired,
    /// Opening a connection failed (the server's error text, or the network's).
    Dial(io::Error),
}

/// The server connections to one backend for one database and user.
pub struct Pool {
    /// Unique among the pools of the process (from 1).
    pub id: u64,
    pub backend: Backend,
    pub database: String,
    pub user: String,
    /// The startup parameters its connections are opened with (its clients').
    pub startup: Startup,
    size: usize,
    inner: Mutex<Inner>,
    /// Wakes the queue's watchdog ([`queue_watchdog`]) when a client queues and it is not
    /// watching.
    watchdog: Arc<tokio::sync::Notify>,
    /// Set once, when the backend stops taking transactions; the holders are woken then.
    retired: AtomicBool,
    /// Clients holding one of its connections now.
    pub active: AtomicU64,
    stats: Arc<PoolStats>,
    /// What the pool's own connections (minIdle) log in with: the last client's.
    login: Mutex<Arc<Login>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("backend", &self.backend.name)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A new pool, and the watchdog of its queue.
    pub(super) fn new(
        backend: &Backend,
        database: &str,
        user: &str,
        startup: &Startup,
        size: usize,
        stats: Arc<PoolStats>,
        login: &Arc<Login>,
    ) -> Arc<Pool> {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let pool = Arc::new(Pool {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            backend: backend.clone(),
            database: database.into(),
            user: user.into(),
            startup: startup.clone(),
            size,
            inner: Mutex::default(),
            watchdog: Arc::default(),
            retired: AtomicBool::new(false),
            active: AtomicU64::new(0),
            stats,
            login: Mutex::new(login.clone()),
        });
        tokio::spawn(queue_watchdog(Arc::downgrade(&pool), pool.watchdog.clone()));
        pool
    }

    /// How many connections it may open.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// What its own connections (minIdle) log in with from now: the last client's.
    pub(super) fn use_login(&self, login: &Arc<Login>) {
        *lock(&self.login) = login.clone();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Records the task of a client that holds `conn` now, to be woken if the pool is
    /// retired (a connection taken without [`Pool::turn`]'s waker: a new one).
    pub fn hold(&self, conn: &mut ServerConn, waker: &Waker) {
        if conn.holder.is_none() {
            conn.holder = Some(lock(&self.inner).add_holder(waker));
        }
    }

    /// (open, idle) connections.
    pub fn counts(&self) -> (usize, usize) {
        let g = lock(&self.inner);
        (g.open, g.idle.len())
    }

    pub fn waiting(&self) -> usize {
        lock(&self.inner).waiters.len()
    }

    /// A server connection: an idle one, a new one while the pool has room, else the first
    /// one given back after every client queued before (within `queue`).
    pub async fn checkout(
        self: &Arc<Self>,
        ctx: &DialContext,
        login: &Login,
        queue: Duration,
    ) -> Result<Box<ServerConn>, CheckoutError> {
        let grant = match self.turn(queue, None) {
            Turn::Conn(c) => return Ok(c),
            Turn::Retired => return Err(CheckoutError::Retired),
            Turn::Dial => Grant::Dial,
            Turn::Queued(waiting) => waiting.granted().await,
        };
        self.use_grant(grant, ctx, login).await
    }

    /// A checkout's first step, without waiting: an idle connection, else a slot to dial
    /// while the pool has room, else a place in the FIFO queue for at most `queue`.
    /// `waker` (the client's task) is recorded as the holder of the connection it gets.
    /// The clock is read only to queue.
    pub fn turn(&self, queue: Duration, waker: Option<&Waker>) -> Turn<'_> {
        let (rx, since, wake) = {
            let mut g = lock(&self.inner);
            if self.is_retired() {
                return Turn::Retired;
            }
            if let Some(mut c) = self.pop_idle(&mut g) {
                if let Some(w) = waker {
                    c.holder = Some(g.add_holder(w));
                }
                return Turn::Conn(c);
            }
            if g.open < self.size {
                g.open += 1;
                return Turn::Dial;
            }
            let (tx, rx) = oneshot::channel();
            let since = tokio::time::Instant::now();
            let deadline = since + queue;
            g.waiters.push_back(Waiter {
                tx,
                deadline,
                waker: waker.cloned(),
            });
            let wake = g.watched.is_none_or(|until| deadline < until);
            if wake {
                g.watched = Some(deadline);
            }
            (rx, since, wake)
        };
        if wake {
            self.watchdog.notify_one();
        }
        Turn::Queued(Waiting {
            pool: self,
            rx,
            since,
        })
    }

    /// What a grant becomes: its connection, a connection dialled in its slot, or the error.
    pub async fn use_grant(
        self: &Arc<Self>,
        grant: Grant,
        ctx: &DialContext,
        login: &Login,
    ) -> Result<Box<ServerConn>, CheckoutError> {
        match grant {
            Grant::Conn(c) => Ok(c),
            Grant::Retired => Err(CheckoutError::Retired),
            Grant::Timeout => Err(CheckoutError::Timeout),
            Grant::Dial => {
                // The slot goes back if the dial fails or the checkout is dropped during it
                // (the client's handshake deadline, the client gone).
                let slot = Slot(Some(self));
                // Boxed: a dial is rare, and its state would otherwise widen every
                // transaction's wait for a connection.
                match Box::pin(dial(
                    ctx,
                    &self.backend,
                    &self.database,
                    &self.user,
                    &self.startup,
                    login,
                ))
                .await
                {
                    Ok(c) => {
                        slot.keep();
                        self.stats.server_opened.fetch_add(1, Ordering::Relaxed);
                        Ok(Box::new(c))
                    }
                    Err(e) => {
                        self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
                        drop(slot);
                        Err(CheckoutError::Dial(e))
                    }
                }
            }
        }
    }

    /// Sends [`Grant::Timeout`] to the waiters whose deadline is past; the next deadline, if
    /// any waits (the watchdog then sleeps until it).
    fn expire_waiters(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let mut g = lock(&self.inner);
        // Not only at the front: a checkout may queue with less time left than those before
        // it (one that already waited out a failover).
        let mut i = 0;
        while i < g.waiters.len() {
            if g.waiters[i].deadline <= now {
                if let Some(w) = g.waiters.remove(i) {
                    let _ = w.tx.send(Grant::Timeout);
                }
            } else {
                i += 1;
            }
        }
        let next = g.waiters.iter().map(|w| w.deadline).min();
        g.watched = next;
        next
    }

    /// The most recently used idle connection that is not stale; the others on the way are
    /// closed. (Age is not read here: a connection past `serverLifetime` is closed when it
    /// is given back, and while idle by the pool's upkeep within a second.)
    fn pop_idle(&self, g: &mut Inner) -> Option<Box<ServerConn>> {
        while let Some(mut c) = g.idle.pop() {
            if c.is_stale() {
                g.open -= 1;
                self.stats.server_closed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            return Some(c);
        }
        None
    }

    /// A slot freed (a connection closed, a dial failed): the first waiter may open one.
    fn closed_one(&self) {
        lock(&self.inner).closed_one();
    }

    /// Gives a connection back: to the first waiting client (its holder now), else to the
    /// idle list. A broken one, one past `serverLifetime` or of a retired pool is closed.
    pub fn checkin(&self, mut conn: Box<ServerConn>, lifetime: Duration) {
        let now = Instant::now();
        let close =
            conn.broken || self.is_retired() || now.duration_since(conn.created) >= lifetime;
        let mut g = lock(&self.inner);
        g.drop_holder(&mut conn);
        if close {
            drop(conn);
            self.stats.server_closed.fetch_add(1, Ordering::Relaxed);
            g.closed_one();
            return;
        }
        conn.last_used = now;
        while let Some(w) = g.waiters.pop_front() {
            if let Some(waker) = &w.waker {
                conn.holder = Some(g.add_holder(waker));
            }
            match w.tx.send(Grant::Conn(conn)) {
                Ok(()) => return,
                Err(Grant::Conn(mut c)) => {
                    g.drop_holder(&mut c);
                    conn = c;
                }
                Err(_) => unreachable!("sent a connection"),
            }
        }
        g.idle.push(conn);
    }

    /// Closes connections idle past `idle_timeout` or older than `lifetime`; opens new ones
    /// while fewer than `min_idle` are idle and the pool has room.
    pub(super) async fn maintain(
        self: &Arc<Self>,
        ctx: &DialContext,
        settings: &crate::config::PgPool,
    ) {
        let (closed, want) = {
            let mut g = lock(&self.inner);
            let before = g.idle.len();
            g.idle.retain(|c| {
                c.last_used.elapsed() < settings.server_idle_timeout
                    && c.created.elapsed() < settings.server_lifetime
            });
            let closed = before - g.idle.len();
            g.open -= closed;
            let want = settings
                .min_idle
                .saturating_sub(g.idle.len())
                .min(self.size - g.open);
            g.open += want;
            (closed, want)
        };
        if closed > 0 {
            self.stats
                .server_closed
                .fetch_add(closed as u64, Ordering::Relaxed);
            debug!(pool = ?self, closed, "idle server connections closed");
        }
        let login = lock(&self.login).clone();
        for _ in 0..want {
            match dial(
                ctx,
                &self.backend,
                &self.database,
                &self.user,
                &self.startup,
                &login,
            )
            .await
            {
                Ok(c) => {
                    self.stats.server_opened.fetch_add(1, Ordering::Relaxed);
                    self.checkin(Box::new(c), settings.server_lifetime);
                }
                Err(e) => {
                    self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
                    self.closed_one();
                    debug!(error = %e, "minIdle: a server connection could not be opened");
                    break;
                }
            }
        }
    }

    /// Closes every idle connection and tells the holders and the waiters to leave.
    pub(super) fn retire(&self) {
        let mut g = lock(&self.inner);
        self.retired.store(true, Ordering::Release);
        for w in g.holders.iter().flatten() {
            w.wake_by_ref();
        }
        let idle = std::mem::take(&mut g.idle);
        g.open -= idle.len();
        self.stats
            .server_closed
            .fetch_add(idle.len() as u64, Ordering::Relaxed);
        for w in std::mem::take(&mut g.waiters) {
            let _ = w.tx.send(Grant::Retired);
        }
        drop(g);
        self.watchdog.notify_one();
    }
}

/// Ends the waits of a pool's queue at their deadlines (`pooling.queueTimeout`): one task per
/// pool, asleep until the first deadline while clients wait, or until a client queues with
/// an earlier one. Ends with the pool (dropped or retired).
async fn queue_watchdog(pool: Weak<Pool>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { break };
            if pool.is_retired() {
                break;
            }
            pool.expire_waiters(tokio::time::Instant::now())
        };
        match next {
            Some(deadline) => tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = wake.notified() => {}
            },
            None => wake.notified().await,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Its watchdog waits for a queued client: let it see the pool gone.
        self.watchdog.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::super::pools::PgHub;
    use super::*;
    use tokio::time::timeout;

    /// A pool of one connection to a backend that accepts and never answers (every dial
    /// hangs), with what its checkouts need; the task accepting for that backend.
    async fn silent_pool() -> (
        Arc<Pool>,
        DialContext,
        Arc<Login>,
        Arc<PgHub>,
        tokio::task::JoinHandle<()>,
    ) {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let yaml = format!("engine: postgres\ntls: {{mode: disabled}}\nbackends: [{{name: a, address: \"{addr}\"}}]\npooling: {{mode: transaction, poolSize: 1, auth: {{usersFile: /nonexistent}}}}\n");
        let config = Arc::new(
            crate::config::parse_yaml(&yaml)
                .unwrap()
                .validate()
                .unwrap(),
        );
        let ctx = DialContext {
            config: config.clone(),
            connector: None,
        };
        let hub = Arc::new(PgHub::default());
        let login = Arc::new(Login::default());
        let pool = hub.pool(
            &config.backends[0],
            "db",
            "app",
            &Startup::from([]),
            &login,
            &ctx,
        );
        (pool, ctx, login, hub, accepting)
    }

    /// A checkout dropped while it dials (the client's handshake deadline, the client gone)
    /// gives its slot back: a pool of one then lets the next checkout dial at once instead of
    /// queueing behind a slot no connection will fill. So does a grant sent to a checkout that
    /// is dropped before it takes it.
    #[tokio::test]
    async fn a_checkout_dropped_mid_dial_or_granted_gives_its_slot_back() {
        // A backend that accepts and never answers: every dial hangs.
        let (pool, ctx, login, _hub, accepting) = silent_pool().await;
        let short = Duration::from_millis(200);
        for _ in 0..3 {
            let dialling = timeout(short, pool.checkout(&ctx, &login, Duration::from_secs(5)));
            assert!(dialling.await.is_err(), "the dial should hang");
            assert_eq!(
                pool.counts(),
                (0, 0),
                "the dropped dial's slot is free again"
            );
        }
        // A waiter dropped after a slot was granted to it: the slot goes to the next one.
        let checkout = |pool: Arc<Pool>| {
            let (ctx, login) = (ctx.clone(), login.clone());
            tokio::spawn(async move {
                let _ = pool.checkout(&ctx, &login, Duration::from_secs(30)).await;
            })
        };
        let first = checkout(pool.clone());
        while pool.counts().0 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let waiter = checkout(pool.clone());
        while pool.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The dialling checkout is dropped: its slot is granted to the waiter, which is
        // dropped in turn; the slot must come back to the pool.
        first.abort();
        waiter.abort();
        let _ = first.await;
        let _ = waiter.await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.counts() != (0, 0) {
            assert!(
                Instant::now() < deadline,
                "a slot was lost: {:?}",
                pool.counts()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        accepting.abort();
    }

    /// The queue's waits end at their own deadlines, without a timer each: a waiter that
    /// queues behind a longer wait, with a shorter deadline, still gets its Timeout on time
    /// (it wakes the watchdog, asleep until the longer one), and the longer one goes on
    /// waiting. A retired pool tells its waiters to choose again.
    #[tokio::test]
    async fn queued_checkouts_end_at_their_own_deadlines() {
        // A backend that accepts and never answers: the one dial hangs and holds the slot.
        let (pool, ctx, login, _hub, accepting) = silent_pool().await;
        let checkout = |queue: Duration| {
            let (pool, ctx, login) = (pool.clone(), ctx.clone(), login.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let got = pool.checkout(&ctx, &login, queue).await;
                (got.map(|_| ()), started.elapsed())
            })
        };
        let dialling = checkout(Duration::from_secs(60));
        while pool.counts().0 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let long = checkout(Duration::from_secs(30));
        while pool.waiting() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let short = checkout(Duration::from_millis(200));
        let (got, waited) = timeout(Duration::from_secs(10), short)
            .await
            .expect("the short wait ended")
            .unwrap();
        assert!(matches!(got, Err(CheckoutError::Timeout)), "{got:?}");
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "ended after {waited:?}"
        );
        assert!(!long.is_finished(), "the longer wait goes on");
        assert_eq!(pool.waiting(), 1);
        pool.retire();
        let (got, _) = timeout(Duration::from_secs(5), long)
            .await
            .expect("the retired pool's waiter was told")
            .unwrap();
        assert!(matches!(got, Err(CheckoutError::Retired)), "{got:?}");
        dialling.abort();
        accepting.abort();
    }
}
