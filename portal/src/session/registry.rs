//! The registry of open sessions: each holds a slot and a [`Close`] handle; one task
//! ([`control_sessions`]) re-checks them all on a configuration or health change, or the drain
//! timeout, and closes those no longer admitted ([`keep_session`], a pure decision).
//!
//! Every data plane registers its clients here, so that allow-list re-checks, `POST
//! /sessions/close`, the drain and shutdown reach them all the same way. A forwarded session
//! is bound to its backend for its whole life (a leader change may cut it); a pooled or
//! multiplexed client is not (it outlives failovers) and says which backend it is on while it
//! holds a server connection there ([`Registration::on_backend`]), for closes by backend.
//!
//! May import: `allow`, `config`, `health`, `metrics` and the session's [`Shared`].

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Waker},
};

use tracing::debug;

use super::Shared;
use crate::{allow, config::Config, health::HealthView, metrics::CloseReason};

/// Whether an open session may go on under a new configuration or health view.
pub fn keep_session(
    config: &Config,
    health: &HealthView,
    client: IpAddr,
    backend: &str,
) -> Result<(), CloseReason> {
    if !allow::is_allowed(&config.allowed_cidrs, client) {
        return Err(CloseReason::Policy);
    }
    if !backend_keeps_sessions(config, health, backend) {
        return Err(CloseReason::Backend);
    }
    Ok(())
}

/// Whether sessions open on `backend` stay open. Backends marked down, or removed from the
/// configuration, keep their open sessions (they fail on their own if the node is gone). In
/// `leader` routing with `closeSessionsOnLeaderChange`, a node that is no longer the leader
/// (demoted, or one of several claiming to lead) loses its sessions at once, so no client
/// keeps writing to it.
///
/// On the read-only listener (whose view has only the nodes serving reads up, and names the
/// leader), with `closeSessionsOnLeaderChange`, sessions on the leader are cut unless it is up
/// there as the fallback; [`keep_seen`] also cuts those opened before it led, so a replica
/// just promoted loses its read sessions at once even when it becomes the fallback.
pub fn backend_keeps_sessions(config: &Config, health: &HealthView, backend: &str) -> bool {
    if config.serves_reads {
        return !config.close_sessions_on_leader_change
            || health.leader_name() != Some(backend)
            || health.is_up(backend);
    }
    if config.routing != crate::config::RoutingMode::Leader
        || !config.close_sessions_on_leader_change
    {
        return true;
    }
    health.leader_name() == Some(backend)
}

/// The open sessions, for the checks a configuration or health change makes on each of them.
/// One task ([`control_sessions`]) evaluates them all on each change; a session holds only its
/// slot and a small [`Close`] handle, not watch subscriptions of its own.
#[derive(Debug, Default)]
pub struct Sessions {
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
}

#[derive(Debug)]
struct Entry {
    client: IpAddr,
    /// A forwarded session's backend, for its whole life; `None` for a pooled or multiplexed
    /// client, whose backend of the moment is in its [`Close`].
    bound: Option<String>,
    /// See [`Seen::opened_on_leader`].
    opened_on_leader: bool,
    close: Arc<Close>,
}

/// What a decision on one open client sees.
#[derive(Clone, Copy, Debug)]
pub struct Seen<'a> {
    pub client: IpAddr,
    /// The backend it is on now, if any (a pooled client between transactions is on none).
    pub backend: Option<&'a str>,
    /// Whether the session belongs to that backend (a forwarded one): a leader change cuts it.
    pub bound: bool,
    /// A read-only listener's session bound to the node that led when it opened (the leader
    /// taken as the fallback), rather than to a replica.
    pub opened_on_leader: bool,
}

/// Whether an open client of any plane may go on: the allow-list for every one, the backend's
/// state for a session bound to it.
pub fn keep_seen(config: &Config, health: &HealthView, seen: Seen<'_>) -> Result<(), CloseReason> {
    match (seen.bound, seen.backend) {
        (true, Some(backend)) => {
            keep_session(config, health, seen.client, backend)?;
            let promoted = config.serves_reads
                && config.close_sessions_on_leader_change
                && !seen.opened_on_leader
                && health.leader_name() == Some(backend);
            if promoted {
                return Err(CloseReason::Backend);
            }
            Ok(())
        }
        _ if !allow::is_allowed(&config.allowed_cidrs, seen.client) => Err(CloseReason::Policy),
        _ => Ok(()),
    }
}

/// How the control side tells one session to close, and why.
#[derive(Debug, Default)]
pub struct Close {
    closing: AtomicBool,
    /// An unbound client holds a server connection now (of `CloseState::backend`).
    holding: AtomicBool,
    state: Mutex<CloseState>,
}

#[derive(Debug, Default)]
struct CloseState {
    reason: Option<CloseReason>,
    waker: Option<Waker>,
    /// An unbound client's backend: the last one it held a server connection of.
    backend: Option<Box<str>>,
}

impl Close {
    /// Asks the session to close with `reason` (the first reason given wins).
    pub fn close(&self, reason: CloseReason) {
        let waker = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.reason.get_or_insert(reason);
            self.closing.store(true, Ordering::Release);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// An unbound client's backend of the moment, for [`Sessions::close_where`].
    fn backend(&self) -> Option<Box<str>> {
        if !self.holding.load(Ordering::Acquire) {
            return None;
        }
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.backend.clone()
    }

    /// The reason to close, if asked; otherwise registers `cx`'s waker when `register` is set.
    fn poll_reason(&self, cx: &Context<'_>, register: bool) -> Option<CloseReason> {
        if register {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.reason.is_none() {
                st.waker = Some(cx.waker().clone());
            }
        }
        if !self.closing.load(Ordering::Acquire) {
            return None;
        }
        self.state.lock().unwrap_or_else(|e| e.into_inner()).reason
    }
}

impl Sessions {
    /// Registers an open session, unless the configuration, health view or shutdown in force
    /// already means it must close (then the reason).
    pub fn register(
        self: &Arc<Self>,
        shared: &Shared,
        client: IpAddr,
        backend: String,
    ) -> Result<Registration, CloseReason> {
        self.insert(shared, client, Some(backend))
    }

    /// Registers a pooled or multiplexed client: bound to no backend, so that only the
    /// allow-list, closes by client (or by the backend it is on at the moment) and shutdown
    /// end it.
    pub fn register_client(
        self: &Arc<Self>,
        shared: &Shared,
        client: IpAddr,
    ) -> Result<Registration, CloseReason> {
        self.insert(shared, client, None)
    }

    fn insert(
        self: &Arc<Self>,
        shared: &Shared,
        client: IpAddr,
        bound: Option<String>,
    ) -> Result<Registration, CloseReason> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: a change published before this point is seen here, one
        // published after it is applied by `control_sessions` to this entry.
        if *shared.kill.borrow() {
            return Err(CloseReason::Shutdown);
        }
        let config = shared.config.borrow();
        let health = shared.health.borrow();
        let seen = Seen {
            client,
            backend: bound.as_deref(),
            bound: bound.is_some(),
            opened_on_leader: config.serves_reads
                && bound.is_some()
                && health.leader_name() == bound.as_deref(),
        };
        keep_seen(&config, &health, seen)?;
        let close = Arc::new(Close::default());
        let entry = Some(Entry {
            client,
            opened_on_leader: seen.opened_on_leader,
            bound,
            close: close.clone(),
        });
        let key = match slots.free.pop() {
            Some(k) => {
                slots.entries[k] = entry;
                k
            }
            None => {
                slots.entries.push(entry);
                slots.entries.len() - 1
            }
        };
        Ok(Registration {
            sessions: self.clone(),
            key,
            close,
        })
    }

    /// Open sessions registered.
    pub fn len(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entries.len() - slots.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes the sessions `decide` gives a reason for; how many.
    pub fn close_where(&self, mut decide: impl FnMut(Seen<'_>) -> Option<CloseReason>) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for e in slots.entries.iter().flatten() {
            let on = match &e.bound {
                Some(_) => None,
                None => e.close.backend(),
            };
            let seen = Seen {
                client: e.client,
                backend: e.bound.as_deref().or(on.as_deref()),
                bound: e.bound.is_some(),
                opened_on_leader: e.opened_on_leader,
            };
            if let Some(why) = decide(seen) {
                e.close.close(why);
                closed += 1;
            }
        }
        closed
    }
}

/// An open session's slot in [`Sessions`], freed on drop.
#[derive(Debug)]
pub struct Registration {
    sessions: Arc<Sessions>,
    key: usize,
    close: Arc<Close>,
}

impl Registration {
    /// The reason to close, if asked; see [`Close`].
    pub(super) fn poll_reason(&self, cx: &Context<'_>, register: bool) -> Option<CloseReason> {
        self.close.poll_reason(cx, register)
    }

    /// What a task's loop waits on to learn that the session must close.
    pub fn signal(&self) -> CloseSignal {
        CloseSignal(self.close.clone())
    }

    /// An unbound client holds a server connection of `backend` now (`Some`), or none.
    pub fn on_backend(&self, backend: Option<&str>) {
        if let Some(name) = backend {
            let mut st = self.close.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.backend.as_deref() != Some(name) {
                st.backend = Some(name.into());
            }
        }
        self.close
            .holding
            .store(backend.is_some(), Ordering::Release);
    }

    /// An unbound client holds a server connection again, of the backend it named last
    /// ([`Registration::on_backend`]): an atomic store.
    pub fn on_same_backend(&self) {
        self.close.holding.store(true, Ordering::Release);
    }
}

/// A registered session's close request, for a task that keeps its [`Registration`]
/// elsewhere.
#[derive(Debug)]
pub struct CloseSignal(Arc<Close>);

/// Resolves with the reason once the session of `signal` is asked to close; never without one.
pub async fn closed(signal: Option<&CloseSignal>) -> CloseReason {
    match signal {
        Some(s) => s.closed().await,
        None => std::future::pending().await,
    }
}

impl CloseSignal {
    /// Resolves with the reason once the session is asked to close. Keep one across a loop's
    /// turns: the waker is registered at its first poll only (a task's waker does not change).
    pub fn closed(&self) -> impl std::future::Future<Output = CloseReason> + '_ {
        let mut first = true;
        std::future::poll_fn(
            move |cx| match self.0.poll_reason(cx, std::mem::take(&mut first)) {
                Some(why) => std::task::Poll::Ready(why),
                None => std::task::Poll::Pending,
            },
        )
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut slots = self
            .sessions
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slots.entries[self.key] = None;
        if slots.entries.len() == slots.free.len() + 1 {
            // The last open session: give the slots back.
            slots.entries = Vec::new();
            slots.free = Vec::new();
        } else {
            slots.free.push(self.key);
        }
    }
}

/// Applies configuration and health changes, and the drain timeout, to every open session:
/// one task for all of them. Runs until the channels close.
pub async fn control_sessions(mut shared: Shared) {
    let sessions = shared.sessions.clone();
    let (mut config_open, mut health_open, mut kill_open) = (true, true, true);
    shared.config.borrow_and_update();
    shared.health.borrow_and_update();
    shared.kill.borrow_and_update();
    loop {
        tokio::select! {
            r = shared.config.changed(), if config_open => {
                if r.is_err() { config_open = false; continue; }
            }
            r = shared.health.changed(), if health_open => {
                if r.is_err() { health_open = false; continue; }
            }
            r = shared.kill.changed(), if kill_open => {
                if r.is_err() { kill_open = false; continue; }
            }
            else => return,
        }
        if *shared.kill.borrow_and_update() {
            sessions.close_where(|_| Some(CloseReason::Shutdown));
            continue;
        }
        let config = shared.config.borrow_and_update().clone();
        let health = shared.health.borrow_and_update().clone();
        let closed = sessions.close_where(|seen| keep_seen(&config, &health, seen).err());
        if closed > 0 {
            debug!(
                closed,
                "sessions closed by a configuration or health change"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{task::Poll, time::Duration};

    use tokio::time::timeout;

    use super::*;
    use crate::session::testing::{shared, Drivers};

    #[test]
    fn keep_session_follows_the_allow_list() {
        let yaml = "engine: redis\nrouting: {mode: first}\ntls: {mode: disabled}\nbackends: [{name: a, address: \"127.0.0.1:1\"}]\nallowedCIDRs: [127.0.0.2/32]\n";
        let c = crate::config::parse_yaml(yaml).unwrap().validate().unwrap();
        let h = HealthView::default();
        assert_eq!(
            keep_session(&c, &h, "127.0.0.2".parse().unwrap(), "a"),
            Ok(())
        );
        assert_eq!(
            keep_session(&c, &h, "127.0.0.3".parse().unwrap(), "a"),
            Err(CloseReason::Policy)
        );
        assert_eq!(
            keep_session(&c, &h, "::ffff:127.0.0.2".parse().unwrap(), "a"),
            Ok(())
        );
    }

    #[test]
    fn sessions_of_a_node_that_stops_leading_are_cut() {
        let yaml = |close: bool| {
            format!("engine: redis\ntls: {{mode: disabled}}\nrouting: {{closeSessionsOnLeaderChange: {close}}}\nbackends: [{{name: a, address: \"127.0.0.1:1\"}}, {{name: b, address: \"127.0.0.1:2\"}}]\n")
        };
        let c = crate::config::parse_yaml(&yaml(true))
            .unwrap()
            .validate()
            .unwrap();
        let mut h = HealthView::assume_up(["a", "b"]);
        h.leader = Some(0);
        assert!(backend_keeps_sessions(&c, &h, "a"));
        assert!(!backend_keeps_sessions(&c, &h, "b"));
        h.conflict = true;
        h.leader = None;
        assert!(!backend_keeps_sessions(&c, &h, "a"), "a conflict cuts too");
        let keep = crate::config::parse_yaml(&yaml(false))
            .unwrap()
            .validate()
            .unwrap();
        assert!(backend_keeps_sessions(&keep, &h, "a"));
    }

    #[test]
    fn read_sessions_on_a_promoted_replica_are_cut_even_as_the_fallback() {
        let yaml = "engine: postgres\ntls: {mode: disabled}\nreadOnly: {}\nbackends: [{name: a, address: \"127.0.0.1:1\"}, {name: b, address: \"127.0.0.1:2\"}]\n";
        let c = crate::config::parse_yaml(yaml)
            .unwrap()
            .validate()
            .unwrap()
            .for_reads()
            .unwrap();
        let seen = |opened_on_leader| Seen {
            client: "127.0.0.1".parse().unwrap(),
            backend: Some("b"),
            bound: true,
            opened_on_leader,
        };
        // b, promoted, is up in the read-only view as the fallback.
        let mut h = HealthView::assume_up(["a", "b"]);
        h.leader = Some(1);
        h.backends[0].up = false;
        assert_eq!(keep_seen(&c, &h, seen(false)), Err(CloseReason::Backend));
        assert_eq!(
            keep_seen(&c, &h, seen(true)),
            Ok(()),
            "opened on the fallback"
        );
        // A replica again: both kept.
        h.leader = Some(0);
        assert_eq!(keep_seen(&c, &h, seen(false)), Ok(()));
        assert_eq!(keep_seen(&c, &h, seen(true)), Ok(()));
    }

    /// A pooled or multiplexed client follows the allow-list but not the leader, and is "on"
    /// a backend only while it holds one of its server connections.
    #[tokio::test]
    async fn unbound_clients_follow_the_allow_list_and_their_backend_of_the_moment() {
        let yaml = "engine: redis\ntls: {mode: disabled}\nbackends: [{name: a, address: \"127.0.0.1:1\"}, {name: b, address: \"127.0.0.1:2\"}]\nallowedCIDRs: [127.0.0.2/32]\n";
        let c = crate::config::parse_yaml(yaml).unwrap().validate().unwrap();
        let mut h = HealthView::assume_up(["a", "b"]);
        h.leader = Some(0);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let seen = |client: &str, backend: Option<&'static str>, bound: bool| Seen {
            client: ip(client),
            backend,
            bound,
            opened_on_leader: false,
        };
        // b stopped leading: a session bound to it is cut, a pooled client on it is not.
        assert_eq!(
            keep_seen(&c, &h, seen("127.0.0.2", Some("b"), true)),
            Err(CloseReason::Backend)
        );
        assert_eq!(
            keep_seen(&c, &h, seen("127.0.0.2", Some("b"), false)),
            Ok(())
        );
        assert_eq!(keep_seen(&c, &h, seen("127.0.0.2", None, false)), Ok(()));
        assert_eq!(
            keep_seen(&c, &h, seen("127.0.0.3", None, false)),
            Err(CloseReason::Policy)
        );

        // Routing `first` from here: the forwarded session's backend needs no leader.
        let first = crate::config::parse_yaml(
            &yaml.replace("engine: redis", "engine: redis\nrouting: {mode: first}"),
        )
        .unwrap()
        .validate()
        .unwrap();
        let (shared, _drivers) = shared(Arc::new(first));
        let sessions = shared.sessions.clone();
        let pooled = sessions.register_client(&shared, ip("127.0.0.2")).unwrap();
        let forwarded = sessions
            .register(&shared, ip("127.0.0.2"), "a".into())
            .unwrap();
        let on = |name: &'static str| {
            sessions.close_where(|s| (s.backend == Some(name)).then_some(CloseReason::Admin))
        };
        assert_eq!(
            on("b"),
            0,
            "a pooled client between transactions is on no backend"
        );
        pooled.on_backend(Some("b"));
        assert_eq!(on("b"), 1);
        pooled.on_backend(None);
        assert_eq!(on("b"), 0);
        assert_eq!(on("a"), 1, "the forwarded session stays on its backend");
        let noop = Waker::noop();
        let cx = Context::from_waker(noop);
        assert_eq!(
            pooled.close.poll_reason(&cx, false),
            Some(CloseReason::Admin)
        );
        assert_eq!(
            forwarded.close.poll_reason(&cx, false),
            Some(CloseReason::Admin)
        );
        assert_eq!(
            sessions
                .register_client(&shared, ip("127.0.0.3"))
                .unwrap_err(),
            CloseReason::Policy
        );
    }

    #[tokio::test]
    async fn a_change_closes_the_sessions_it_excludes_and_only_those() {
        let yaml = |cidrs: &str| {
            format!("engine: tcp\nport: 1\ntls: {{mode: disabled}}\nbackends: [{{name: a, address: \"127.0.0.1:1\"}}]\nallowedCIDRs: [{cidrs}]\n")
        };
        let config = |cidrs: &str| {
            Arc::new(
                crate::config::parse_yaml(&yaml(cidrs))
                    .unwrap()
                    .validate()
                    .unwrap(),
            )
        };
        let (
            shared,
            Drivers {
                config_tx,
                kill_tx,
                _health_tx: _health,
            },
        ) = shared(config("127.0.0.0/8"));
        let sessions = shared.sessions.clone();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let kept = sessions
            .register(&shared, ip("127.0.0.2"), "a".into())
            .unwrap();
        let cut = sessions
            .register(&shared, ip("127.0.0.3"), "a".into())
            .unwrap();
        let gone = sessions
            .register(&shared, ip("127.0.0.4"), "a".into())
            .unwrap();
        drop(gone);
        assert_eq!(sessions.len(), 2);
        let control = tokio::spawn(control_sessions(shared.clone()));
        // A waiting session is woken with the reason.
        let waiting = {
            let close = cut.close.clone();
            tokio::spawn(async move {
                let mut first = true;
                std::future::poll_fn(|cx| {
                    let register = std::mem::take(&mut first);
                    match close.poll_reason(cx, register) {
                        Some(why) => Poll::Ready(why),
                        None => Poll::Pending,
                    }
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        config_tx.send(config("127.0.0.2/32")).unwrap();
        let why = timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(why, CloseReason::Policy);
        let noop = Waker::noop();
        let cx = Context::from_waker(noop);
        assert_eq!(kept.close.poll_reason(&cx, false), None);
        // Registering under a configuration that excludes the client fails at once.
        assert_eq!(
            sessions
                .register(&shared, ip("127.0.0.5"), "a".into())
                .unwrap_err(),
            CloseReason::Policy
        );
        // The slot of a closed session is reused.
        drop(cut);
        let again = sessions
            .register(&shared, ip("127.0.0.2"), "a".into())
            .unwrap();
        assert_eq!(sessions.len(), 2);
        // The drain timeout closes every session.
        kill_tx.send(true).unwrap();
        for close in [&kept.close, &again.close] {
            let close = close.clone();
            let why = timeout(
                Duration::from_secs(10),
                std::future::poll_fn(move |cx| match close.poll_reason(cx, true) {
                    Some(why) => Poll::Ready(why),
                    None => Poll::Pending,
                }),
            )
            .await
            .unwrap();
            assert_eq!(why, CloseReason::Shutdown);
        }
        drop((kept, again));
        assert!(sessions.is_empty());
        control.abort();
    }
}
