//! The checker: one probing task per backend, and one task that owns every node's rise/fall
//! state, elects the leader, decides when to probe fast, and publishes a [`HealthView`] on
//! every change.
//!
//! May import: `config` and the rest of `health`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

use super::{
    credentials::CredentialsSource,
    lag::{Lag, Replicating, Trail},
    probe::{probe_node, ProbeError, ProbeSettings, Probed},
    state::{elect, NodeState},
    BackendHealth, Caveat, HealthView, LeaderStats, Role,
};
use crate::config::{Address, Backend, Config, RoutingMode};

/// Probe interval while a leader is being sought or a node is changing state (HAProxy's
/// `fastinter`).
pub const FAST_INTERVAL: Duration = Duration::from_millis(100);
/// Fast probing stops after this long even if things have not settled (every node down, say);
/// the next trigger starts it again.
pub const FAST_MODE_LIMIT: Duration = Duration::from_secs(30);

/// The data plane's handle on the checker. Cheap to clone.
#[derive(Clone, Debug)]
pub struct HealthHandle {
    view: watch::Receiver<HealthView>,
    reports: mpsc::Sender<String>,
    checks: Arc<CheckTimes>,
    credentials: Arc<dyn CredentialsSource>,
}

impl std::fmt::Debug for dyn CredentialsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialsSource")
    }
}

/// Counts and durations of each backend's health checks, and the replication lag they
/// measured, by name. Kept beside the view, not in it: a view is published (and every open
/// session re-checked) only when health changes, not at each probe.
#[derive(Debug, Default)]
pub struct CheckTimes(std::sync::Mutex<std::collections::BTreeMap<String, CheckStat>>);

/// One backend's checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStat {
    pub checks: u64,
    pub failures: u64,
    /// Sum of the checks' durations.
    pub total: Duration,
    /// The latest check's duration.
    pub last: Duration,
    /// The replication lag of a replica that is up (`None` for a leader, a node down, or an
    /// engine that reads none).
    pub lag: Option<Lag>,
}

impl CheckTimes {
    fn record(&self, name: &str, took: Duration, ok: bool) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let s = map.entry(name.to_string()).or_default();
        s.checks += 1;
        s.failures += u64::from(!ok);
        s.total += took;
        s.last = took;
    }

    fn set_lag(&self, name: &str, lag: Option<Lag>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(name).map(|s| s.lag) != Some(lag) {
            map.entry(name.to_string()).or_default().lag = lag;
        }
    }

    /// The checks of `name` so far.
    pub fn get(&self, name: &str) -> CheckStat {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(name).copied().unwrap_or_default()
    }
}

impl HealthHandle {
    /// Counts and durations of the health checks, per backend.
    pub fn checks(&self) -> Arc<CheckTimes> {
        self.checks.clone()
    }

    /// The views the checker publishes; the current one is there at once.
    pub fn view(&self) -> watch::Receiver<HealthView> {
        self.view.clone()
    }

    /// The source of the probes' credentials (and of the users clients authenticate as), which
    /// the data plane's own server connections log in with too.
    pub fn credentials(&self) -> Arc<dyn CredentialsSource> {
        self.credentials.clone()
    }

    /// A session could not connect to `backend` (or its connection broke): probe every node
    /// fast until things settle. Never blocks; reports beyond a small queue are dropped, one
    /// is enough.
    pub fn report_connect_failure(&self, backend: &str) {
        let _ = self.reports.try_send(backend.to_string());
    }
}

/// Starts the checker for the configurations published on `config`, with probe credentials
/// from `credentials`. It follows configuration changes (unchanged backends keep their state)
/// and stops when `config`'s sender is dropped.
pub fn spawn_checker(
    mut config: watch::Receiver<Arc<Config>>,
    credentials: Arc<dyn CredentialsSource>,
) -> HealthHandle {
    let initial = config.borrow_and_update().clone();
    let (view_tx, view) = watch::channel(HealthView::assume_up(
        initial.backends.iter().map(|b| b.name.as_str()),
    ));
    let (reports_tx, reports_rx) = mpsc::channel(16);
    let (results_tx, results_rx) = mpsc::channel(64);
    let settings = Arc::new(ProbeSettings::new(&initial, credentials.clone()));
    let (settings_tx, _) = watch::channel(settings);
    let (fast_tx, _) = watch::channel(false);
    let checks = Arc::new(CheckTimes::default());
    let handle_credentials = credentials.clone();
    let mut checker = Checker {
        checks: checks.clone(),
        config: initial.clone(),
        credentials,
        slots: Vec::new(),
        next_id: 0,
        settings_tx,
        fast_tx,
        fast_until: None,
        fast_since: Instant::now(),
        results_tx,
        view_tx,
        leader: None,
        had_leader: false,
        conflict: false,
        stats: LeaderStats::default(),
        trail: Trail::default(),
    };
    checker.slots = initial
        .backends
        .iter()
        .map(|b| checker.new_slot(b.clone()))
        .collect();
    tokio::spawn(async move {
        checker.run(&mut config, results_rx, reports_rx).await;
    });
    HealthHandle {
        view,
        reports: reports_tx,
        checks,
        credentials: handle_credentials,
    }
}

/// One backend and its probing task (aborted when the slot is dropped).
struct Slot {
    backend: Backend,
    id: u64,
    state: NodeState,
    /// When its latest probe result arrived.
    probed_at: Option<Instant>,
    /// When it last came back up after being down (slow start ramps from here).
    up_at: Option<std::time::Instant>,
    /// When it last went up or down.
    changed_at: Option<SystemTime>,
    task: JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A probe's slot id, how long it took, and what it found.
type ProbeResult = (u64, Duration, Result<Probed, ProbeError>);

struct Checker {
    checks: Arc<CheckTimes>,
    config: Arc<Config>,
    credentials: Arc<dyn CredentialsSource>,
    slots: Vec<Slot>,
    next_id: u64,
    settings_tx: watch::Sender<Arc<ProbeSettings>>,
    fast_tx: watch::Sender<bool>,
    fast_until: Option<Instant>,
    /// When fast probing last started: it ends only once every node answered since then.
    fast_since: Instant,
    results_tx: mpsc::Sender<ProbeResult>,
    view_tx: watch::Sender<HealthView>,
    /// Name of the current leader (names survive reordering of the backends).
    leader: Option<String>,
    had_leader: bool,
    conflict: bool,
    stats: LeaderStats,
    /// The positions of the node replicas are measured against (see [`Self::reference`]).
    trail: Trail,
}

impl Checker {
    async fn run(
        &mut self,
        config: &mut watch::Receiver<Arc<Config>>,
        mut results: mpsc::Receiver<ProbeResult>,
        mut reports: mpsc::Receiver<String>,
    ) {
        let mut reports_open = true;
        loop {
            let fast_until = self.fast_until;
            tokio::select! {
                changed = config.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let new = config.borrow_and_update().clone();
                    self.apply_config(new);
                }
                Some((id, took, result)) = results.recv() => {
                    if let Some(slot) = self.slots.iter().find(|s| s.id == id) {
                        self.checks.record(&slot.backend.name, took, result.is_ok());
                    }
                    self.on_result(id, result)
                }
                report = reports.recv(), if reports_open => match report {
                    Some(backend) => self.on_report(&backend),
                    None => reports_open = false,
                },
                _ = tokio::time::sleep_until(fast_until.unwrap_or_else(Instant::now)), if fast_until.is_some() => {
                    tracing::debug!("fast probing stops after {FAST_MODE_LIMIT:?} without settling");
                    self.fast_until = None;
                    self.fast_tx.send_replace(false);
                }
            }
            self.update();
        }
        self.slots.clear();
    }

    fn new_slot(&mut self, backend: Backend) -> Slot {
        self.next_id += 1;
        let id = self.next_id;
        let task = tokio::spawn(prober(
            id,
            backend.address.clone(),
            self.settings_tx.subscribe(),
            self.fast_tx.subscribe(),
            self.results_tx.clone(),
        ));
        Slot {
            backend,
            id,
            state: NodeState::default(),
            probed_at: None,
            up_at: None,
            changed_at: None,
            task,
        }
    }

    fn apply_config(&mut self, new: Arc<Config>) {
        let settings = Arc::new(ProbeSettings::new(&new, self.credentials.clone()));
        let same_probe = self.settings_tx.borrow().same_probe(&settings);
        self.settings_tx.send_replace(settings);
        let mut old: Vec<Option<Slot>> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(Some)
            .collect();
        let mut slots = Vec::with_capacity(new.backends.len());
        for backend in &new.backends {
            let kept = old
                .iter_mut()
                .find(|s| {
                    s.as_ref()
                        .is_some_and(|s| same_probe && s.backend.probes_like(backend))
                })
                .and_then(Option::take);
            slots.push(match kept {
                Some(mut slot) => {
                    // Weight, state and limits do not change what is probed.
                    slot.backend = backend.clone();
                    slot
                }
                None => {
                    tracing::info!(backend = %backend.name, address = %backend.address, "probing new backend");
                    self.new_slot(backend.clone())
                }
            });
        }
        for gone in old.into_iter().flatten() {
            tracing::info!(backend = %gone.backend.name, "backend removed or changed; its probe stops");
        }
        self.slots = slots;
        self.config = new;
    }

    fn on_result(&mut self, id: u64, result: Result<Probed, ProbeError>) {
        let (rise, fall) = (self.config.health.rise, self.config.health.fall);
        let Some(index) = self.slots.iter().position(|s| s.id == id) else {
            return; // a removed backend's last probe
        };
        let is_leader = self.leader.as_deref() == Some(self.slots[index].backend.name.as_str());
        if let Ok(probed) = &result {
            if let Some(position) = probed.replication.position.filter(|_| reference(probed)) {
                let name = self.slots[index].backend.name.clone();
                self.trail.record(&name, Instant::now(), position);
            }
        }
        let slot = &mut self.slots[index];
        slot.probed_at = Some(Instant::now());
        let before = slot.state.clone();
        let name = slot.backend.name.clone();
        let lost_leadership = match result {
            Ok(probed) => {
                let caveat = probed.caveat;
                slot.state.alive(probed, rise);
                if caveat != before.caveat {
                    match caveat {
                        Some(c) => {
                            tracing::warn!(backend = %name, state = c.as_str(), "backend up but {}", match c {
                                Caveat::Busy => "busy running a script or function: kept in rotation, with its role, so that SCRIPT KILL / FUNCTION KILL reach it",
                                Caveat::Misconf => "cannot persist and refuses writes (-MISCONF): kept in rotation",
                            })
                        }
                        None => tracing::info!(backend = %name, "backend answers normally again"),
                    }
                }
                let role = slot.state.role;
                if before.role != role && !before.unconfirmed {
                    tracing::info!(backend = %name, from = before.role.as_str(), to = role.as_str(), "role changed");
                }
                if slot.state.engine_leader == Some(true) && before.engine_leader != Some(true) {
                    tracing::info!(backend = %name, "the engine's own leader (etcd: raft leader)");
                }
                is_leader && !role.writable()
            }
            Err(error) => {
                let error = error.to_string();
                if before.last_error.as_deref() != Some(error.as_str()) {
                    tracing::debug!(backend = %name, %error, "probe failed");
                }
                slot.state.failure(error, fall);
                is_leader
            }
        };
        if before.up != slot.state.up {
            slot.changed_at = Some(SystemTime::now());
            if slot.state.up && !before.unconfirmed {
                slot.up_at = Some(std::time::Instant::now());
            }
        }
        let state = &slot.state;
        if before.up != state.up || before.unconfirmed {
            if state.up {
                tracing::info!(backend = %name, role = state.role.as_str(), "backend up");
            } else {
                tracing::warn!(backend = %name, error = state.last_error.as_deref().unwrap_or(""), "backend down");
            }
        }
        if lost_leadership {
            self.start_fast(&format!("the leader {name} failed a probe or stepped down"));
        }
    }

    fn on_report(&mut self, backend: &str) {
        if self.fast_until.is_none() {
            self.start_fast(&format!("a session could not connect to {backend}"));
        }
    }

    fn start_fast(&mut self, why: &str) {
        if self.fast_until.is_none() {
            tracing::info!("fast probing every {FAST_INTERVAL:?}: {why}");
        }
        self.fast_since = Instant::now();
        self.fast_until = Some(Instant::now() + FAST_MODE_LIMIT);
        self.fast_tx.send_replace(true);
    }

    /// Elects, counts, decides on fast probing and publishes the view if anything changed.
    fn update(&mut self) {
        let states: Vec<NodeState> = self.slots.iter().map(|s| s.state.clone()).collect();
        let current = self
            .leader
            .as_deref()
            .and_then(|l| self.slots.iter().position(|s| s.backend.name == l));
        let election = elect(&states, current);
        let leader = election.leader.map(|i| self.slots[i].backend.name.clone());
        let now = SystemTime::now();

        if election.conflict != self.conflict {
            self.conflict = election.conflict;
            let claimants: Vec<&str> = self
                .slots
                .iter()
                .filter(|s| s.state.up && s.state.role == Role::Leader)
                .map(|s| s.backend.name.as_str())
                .collect();
            if election.conflict {
                self.stats.conflicts += 1;
                tracing::error!(
                    ?claimants,
                    "leader conflict: several nodes claim to lead; routing to none of them"
                );
            } else {
                tracing::info!("leader conflict resolved");
            }
        }
        if leader != self.leader {
            match (&self.leader, &leader) {
                (_, Some(new)) => {
                    if self.had_leader {
                        self.stats.changes += 1;
                    }
                    self.stats.last_change = Some(now);
                    let gap = self
                        .stats
                        .leaderless_since
                        .take()
                        .map(|since| now.duration_since(since).unwrap_or_default());
                    if let Some(gap) = gap {
                        self.stats.failovers += 1;
                        self.stats.last_failover = Some(gap);
                        self.stats.max_failover = self.stats.max_failover.max(Some(gap));
                        self.stats.failover_total += gap;
                    }
                    tracing::warn!(leader = %new, previous = self.leader.as_deref().unwrap_or(""), without_leader = ?gap, "new leader");
                    self.had_leader = true;
                }
                (Some(old), None) => {
                    self.stats.leaderless_since = Some(now);
                    tracing::warn!(previous = %old, conflict = election.conflict, "no leader");
                    self.start_fast("no leader");
                }
                (None, None) => {}
            }
            self.leader = leader;
        }

        if self.fast_until.is_some() && self.settled(election.leader.is_some()) {
            tracing::info!(
                "fast probing stops: {}",
                match &self.leader {
                    Some(l) => format!("leader {l}"),
                    None => "every node settled".into(),
                }
            );
            self.fast_until = None;
            self.fast_tx.send_replace(false);
        }
        self.stats.fast_probing = self.fast_until.is_some();

        let now = Instant::now();
        let max_lag = self.max_lag();
        let view = HealthView {
            backends: self
                .slots
                .iter()
                .map(|s| BackendHealth {
                    replicating: self.replicating(s, now, max_lag),
                    name: s.backend.name.clone(),
                    up: s.state.up,
                    role: s.state.role,
                    last_error: s.state.last_error.clone(),
                    engine_leader: s.state.engine_leader,
                    caveat: s.state.caveat,
                    up_at: s.up_at,
                    changed_at: s.changed_at,
                })
                .collect(),
            leader: election.leader,
            conflict: election.conflict,
            stats: self.stats.clone(),
        };
        self.view_tx.send_if_modified(|v| {
            if *v == view {
                false
            } else {
                *v = view;
                true
            }
        });
    }

    /// `readOnly.maxLag`: the bound a replica's lag must keep to serve reads.
    fn max_lag(&self) -> Option<Duration> {
        self.config.read_only.as_ref().map(|r| r.max_lag)
    }

    /// How `slot` stands as a replica to read from, its lag recorded beside the view.
    fn replicating(
        &self,
        slot: &Slot,
        now: Instant,
        max_lag: Option<Duration>,
    ) -> Option<Replicating> {
        let state = &slot.state;
        let replica = state.up
            && !state.unconfirmed
            && match state.role {
                Role::Replica => true,
                // etcd: every member serves reads, measured against the raft leader.
                Role::SharedLeader => state.replication.position.is_some(),
                Role::Leader | Role::Unknown => false,
            };
        if !replica {
            self.checks.set_lag(&slot.backend.name, None);
            return None;
        }
        let lag = self.trail.lag(&state.replication, now);
        self.checks.set_lag(&slot.backend.name, Some(lag));
        Some(Replicating::judge(&lag, max_lag))
    }

    /// Every node answered since fast probing started, none is on its way up or down, and a
    /// leader is known where one is needed.
    fn settled(&self, have_leader: bool) -> bool {
        let transitioning = self.slots.iter().any(|s| {
            s.state.unconfirmed
                || s.state.failing()
                || s.state.rising()
                || s.probed_at.is_none_or(|at| at < self.fast_since)
        });
        let need_leader = self.config.routing == RoutingMode::Leader
            || self.slots.iter().any(|s| s.state.role.writable());
        !transitioning && (have_leader || !need_leader)
    }
}

/// Whether replicas are measured against the positions of the node `probed` describes: the
/// engine's own leader where it names one (etcd's raft leader), else the writable leader.
fn reference(probed: &Probed) -> bool {
    match probed.engine_leader {
        Some(own) => own,
        None => probed.role == Role::Leader,
    }
}

/// Probes one backend forever: every `healthCheck.interval` from the start of the previous
/// probe, or every [`FAST_INTERVAL`] while fast probing is on (switching at once).
async fn prober(
    id: u64,
    address: Address,
    settings: watch::Receiver<Arc<ProbeSettings>>,
    mut fast: watch::Receiver<bool>,
    results: mpsc::Sender<ProbeResult>,
) {
    loop {
        let current = settings.borrow().clone();
        let start = Instant::now();
        let result = probe_node(&current, &address).await;
        if results.send((id, start.elapsed(), result)).await.is_err() {
            return;
        }
        let normal = current.health.interval;
        let fast_interval = FAST_INTERVAL.min(normal);
        let mut next = start
            + if *fast.borrow_and_update() {
                fast_interval
            } else {
                normal
            };
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                changed = fast.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *fast.borrow_and_update() {
                        next = next.min(start + fast_interval);
                    }
                }
            }
        }
    }
}
