//! The pools of one portal ([`PgHub`]): found or made per backend, database, user and
//! startup parameters, kept up (idle timeout, lifetime, minIdle) and forgotten when unused,
//! retired when their backend stops taking transactions; with the clients' cancel keys and
//! where each one's cancel goes now ([`CancelSlot`]), and the verifiers and secrets of
//! `pooling.auth`.
//!
//! May import: `config`, `health` and the rest of `pool` below it (`conn`, `secret`, `scram`,
//! `server`, `stats`); the session's [`hub`](crate::session::hub).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::info;

use super::conn::{lock, DialContext, Startup};
use super::secret::{Login, Secret};
use super::server::Pool;
use super::stats::PoolStats;
use crate::{
    config::{Backend, Config},
    health::HealthView,
};

/// Backend (name/address), database, user, startup parameters.
type PoolKey = (String, String, String, Startup);

/// The server connection a client's cancel goes to: the server's key while the client holds
/// one of its pool's connections (0: none held; no server gives pid 0), and that pool, written
/// only when it changes, so that taking and giving back a connection costs two atomic stores.
#[derive(Debug, Default)]
pub struct CancelSlot {
    key: AtomicU64,
    pool_id: AtomicU64,
    pool: Mutex<Option<Arc<Pool>>>,
}

impl CancelSlot {
    /// The client holds a connection of `pool` whose server gave `key`.
    pub fn held(&self, pool: &Arc<Pool>, key: (u32, u32)) {
        if self.pool_id.load(Ordering::Relaxed) != pool.id {
            *lock(&self.pool) = Some(pool.clone());
            self.pool_id.store(pool.id, Ordering::Relaxed);
        }
        let packed = (u64::from(key.0) << 32) | u64::from(key.1);
        self.key.store(packed, Ordering::Release);
    }

    /// The client holds none now.
    pub fn released(&self) {
        self.key.store(0, Ordering::Release);
    }

    /// Where a cancel goes now: the pool and the server's key, if a connection is held.
    pub fn target(&self) -> Option<(Arc<Pool>, (u32, u32))> {
        let packed = self.key.load(Ordering::Acquire);
        if packed == 0 {
            return None;
        }
        let pool = lock(&self.pool).clone()?;
        Some((pool, ((packed >> 32) as u32, packed as u32)))
    }
}

/// The pools of one portal, the pool watcher, and the clients' own keys for BackendKeyData.
#[derive(Debug, Default)]
pub struct PgHub {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    pub stats: Arc<PoolStats>,
    watching: crate::session::hub::RouteWatch,
    pub(super) next_pid: AtomicU64,
    /// The keys given to clients (BackendKeyData), and where their cancels go.
    pub(super) cancels: Mutex<HashMap<(u32, u32), Arc<CancelSlot>>>,
    /// Keys of cancels this portal sent to a peer lately, with when: one that comes back is
    /// dropped (peers whose lists disagree for a moment cannot bounce it for ever).
    pub(super) sent_to_peers: Mutex<HashMap<(u32, u32), Instant>>,
    /// SCRAM verifiers made from the users' passwords, by user, with the password they were
    /// made from.
    pub(super) verifiers: Mutex<HashMap<String, (String, Arc<super::scram::Verifier>)>>,
    /// Secrets fetched with `pooling.auth.query`, by user, with when (`None`: no such user).
    pub(super) fetched: Mutex<HashMap<String, Fetched>>,
    /// Held while `pooling.auth.query` runs: one at a time.
    pub(super) fetching: tokio::sync::Mutex<()>,
}

/// A secret fetched with `pooling.auth.query`, with when (`None`: no such user).
pub(super) type Fetched = (Instant, Option<Arc<Secret>>);

impl PgHub {
    /// The pool of `backend` (by name and address), `database` and `user`; a retired one is
    /// replaced. `login` is what the pool's own connections (minIdle) log in with from now.
    pub fn pool(
        self: &Arc<Self>,
        backend: &Backend,
        database: &str,
        user: &str,
        startup: &Startup,
        login: &Arc<Login>,
        ctx: &DialContext,
    ) -> Arc<Pool> {
        let Some(settings) = ctx.config.plane.pg_pool().cloned() else {
            unreachable!("pooling is configured")
        };
        let key = (
            format!("{}/{}", backend.name, backend.address),
            database.to_string(),
            user.to_string(),
            startup.clone(),
        );
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.get(&key) {
            if !p.is_retired() && p.size() == settings.pool_size {
                p.use_login(login);
                return p.clone();
            }
        }
        let pool = Pool::new(
            backend,
            database,
            user,
            startup,
            settings.pool_size,
            self.stats.clone(),
            login,
        );
        if let Some(old) = pools.insert(key.clone(), pool.clone()) {
            old.retire();
        }
        // The pool's upkeep: idle timeout, lifetime, minIdle; ends when the pool is retired
        // or dropped, or forgotten once no client uses it and it has no connection left (pools
        // come and go with the startup parameters of the clients).
        let weak: Weak<Pool> = Arc::downgrade(&pool);
        let hub = Arc::downgrade(self);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { break };
                if pool.is_retired() {
                    break;
                }
                pool.maintain(&ctx, &settings).await;
                if settings.min_idle == 0 && pool.counts().0 == 0 {
                    if let Some(hub) = hub.upgrade() {
                        if hub.forget_unused(&key, pool) {
                            break;
                        }
                    }
                }
            }
        });
        pool
    }

    /// Removes the pool of `key` if it is `pool` and nothing but the map and the caller hold
    /// it (no client uses it); whether it was removed.
    fn forget_unused(&self, key: &PoolKey, pool: Arc<Pool>) -> bool {
        let mut pools = lock(&self.pools);
        let ours = pools.get(key).is_some_and(|p| Arc::ptr_eq(p, &pool));
        // The map's reference and `pool`: no client holds it.
        if ours && Arc::strong_count(&pool) == 2 {
            pools.remove(key);
            return true;
        }
        false
    }

    /// Every pool, for metrics and status.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
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

    /// Retires every pool whose backend may not take transactions under `config` and `view`.
    /// Without a leader (failover under way) the old one is retired all the same: it may be
    /// the demoted node, and nothing may be written to it.
    pub fn retire_unroutable(&self, config: &Config, view: &HealthView) {
        let eligible = crate::session::hub::routable_bases(config, view);
        let mut pools = lock(&self.pools);
        pools.retain(|key, pool| {
            if eligible.contains(&key.0) {
                return true;
            }
            info!(backend = %pool.backend.name, database = %pool.database, user = %pool.user, "backend no longer takes transactions: its pooled server connections are closed");
            pool.retire();
            false
        });
    }
}
