//! Health and role of the backends: the engine probes, the checker that runs them (rise/fall,
//! leader election, fast failover) and the view it publishes through a `watch` channel for the
//! data plane to route by.
//!
//! For the data plane:
//! - [`spawn_checker`] returns a [`HealthHandle`]: [`HealthHandle::view`] gives the
//!   `watch::Receiver<HealthView>`; [`HealthHandle::report_connect_failure`] tells the checker
//!   that a session could not reach a backend, which starts fast probing (cheap; call it on
//!   every failed backend connect).
//! - In `leader` routing, new sessions go to [`HealthView::usable_leader`] only; `None` (no
//!   leader, or a `conflict`) means wait for the next view, up to `timeouts.connect`.
//! - When `view.leader` changes away from a node, sessions to that node are to be cut when
//!   `closeSessionsOnLeaderChange` is on ([`HealthView::leader_name`] compares by name, which
//!   survives configuration changes that reorder the backends).
//! - `view.stats` holds the counters for `/status` and `/metrics`.
//!
//! May import: `config`, `metrics`, `tls` (the backend connector the probes share with the
//! data plane) and `wire`. Never `route`, `session`, `server` or `admin`.

mod checker;
pub mod credentials;
pub mod lag;
mod metrics;
pub mod probe;
mod state;

use std::time::{Duration, SystemTime};

pub use checker::{
    spawn_checker, CheckStat, CheckTimes, HealthHandle, FAST_INTERVAL, FAST_MODE_LIMIT,
};
pub use credentials::{CredentialsSource, ProbeCredentials, StandaloneCredentials, Users};
pub use lag::{Lag, Replicating, Replication};
pub use metrics::HealthCollector;
pub use probe::Probed;
pub use state::{elect, Election, NodeState};

/// The role a probe reported for a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// Not probed yet, or the engine has no notion of role (tcp without steps).
    #[default]
    Unknown,
    /// The node accepts writes and must be the only one that does (a Redis `master`, a
    /// PostgreSQL primary, a MySQL node with `read_only` off, a node passing custom `steps`).
    /// Two such nodes at once are a conflict.
    Leader,
    /// The node accepts writes alongside others of its kind: a KeyDB `active-replica`, an etcd
    /// member. Any of them may be the leader; the checker keeps the current one while it stays
    /// healthy, so sessions are not moved around for nothing. (etcd's own raft leader is
    /// reported beside the role, in [`BackendHealth::engine_leader`].)
    SharedLeader,
    /// A healthy node that does not accept writes.
    Replica,
}

impl Role {
    /// Lower-case name for status and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Leader => "leader",
            Role::SharedLeader => "shared-leader",
            Role::Replica => "replica",
        }
    }

    /// Whether a node with this role accepts writes.
    pub fn writable(self) -> bool {
        matches!(self, Role::Leader | Role::SharedLeader)
    }
}

/// Why a node that is up does not serve everything right now. The node stays routable and keeps
/// its role: routing around it would help nobody, and would cut users off from the commands that
/// end the condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Caveat {
    /// Redis `-BUSY`: a script or function has run past `busy-reply-threshold`
    /// (`lua-time-limit`). The server answers every command with `-BUSY` except the ones that
    /// end it (`SCRIPT KILL`, `FUNCTION KILL`, `SHUTDOWN NOSAVE`), which must reach it: so the
    /// node stays up, keeps its role (the leader stays the leader) and takes new sessions.
    Busy,
    /// Redis `-MISCONF`: the server cannot persist and refuses writes (and PING) until it can;
    /// reads still work and no other node would do better, so it stays up and keeps its role.
    Misconf,
}

impl Caveat {
    /// Lower-case name for `/status`, the pod report and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Caveat::Busy => "busy",
            Caveat::Misconf => "misconf",
        }
    }

    pub const ALL: [Caveat; 2] = [Caveat::Busy, Caveat::Misconf];
}

/// What is known of one backend, in the order of the configuration's backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub name: String,
    /// Routable: marked up by `rise` successes (or assumed up before its first probe).
    pub up: bool,
    /// The role of the latest successful probe.
    pub role: Role,
    /// Why the latest probe failed, if it did.
    pub last_error: Option<String>,
    /// Whether the engine counts the node as its own leader, where routing goes by another
    /// notion: etcd's raft leader (`Some(true)`) or a follower (`Some(false)`), from the latest
    /// successful probe, while every healthy member is a [`Role::SharedLeader`]. `None` for the
    /// other engines (their `role` says it), before the first answer and while the node is down.
    pub engine_leader: Option<bool>,
    /// Up, but not serving everything (from the latest probe).
    pub caveat: Option<Caveat>,
    /// How the node stands as a replica to read from (see [`Replicating`]): `None` for a
    /// leader, a node down, or one whose probe reads no replication (tcp, custom `steps`).
    /// The lag itself, which changes at every probe, is in [`CheckTimes`] beside the view.
    pub replicating: Option<Replicating>,
    /// When it last came back up after being down (`slowStart` ramps from here); `None`
    /// when it has been up since the portal started.
    pub up_at: Option<std::time::Instant>,
    /// When it last went up or down (for the stats page).
    pub changed_at: Option<SystemTime>,
}

/// Counters about the leader, for `/status`, `/metrics` and logs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LeaderStats {
    /// Times the leader moved to another node (the first election does not count).
    pub changes: u64,
    /// When the leader last moved (or was first elected).
    pub last_change: Option<SystemTime>,
    /// Since when there has been no usable leader (none, or a conflict); `None` while there is one.
    pub leaderless_since: Option<SystemTime>,
    /// Times a leader was found again after none was known.
    pub failovers: u64,
    /// Duration of the latest gap without a leader.
    pub last_failover: Option<Duration>,
    /// Longest gap without a leader.
    pub max_failover: Option<Duration>,
    /// Sum of all gaps without a leader (with `failovers`, a Prometheus summary).
    pub failover_total: Duration,
    /// Times a leader conflict (several nodes claiming to lead) began.
    pub conflicts: u64,
    /// Probing at [`FAST_INTERVAL`] right now (a leader was lost or a node is changing state).
    pub fast_probing: bool,
}

/// The checker's view of all backends.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HealthView {
    pub backends: Vec<BackendHealth>,
    /// Index of the node that leads; `None` when there is none, or several claim to lead
    /// (`conflict`).
    pub leader: Option<usize>,
    /// More than one healthy node claims to be the leader: route to neither.
    pub conflict: bool,
    pub stats: LeaderStats,
}

impl HealthView {
    /// The view before any probe ran: every node up, no role known.
    pub fn assume_up<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        HealthView {
            backends: names
                .into_iter()
                .map(|name| BackendHealth {
                    name: name.to_string(),
                    up: true,
                    role: Role::Unknown,
                    last_error: None,
                    engine_leader: None,
                    caveat: None,
                    replicating: None,
                    up_at: None,
                    changed_at: None,
                })
                .collect(),
            leader: None,
            conflict: false,
            stats: LeaderStats::default(),
        }
    }

    /// Health of the backend named `name`, if the view knows it.
    pub fn get(&self, name: &str) -> Option<&BackendHealth> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The usable leader: the node the checker elected, unless several claim to lead
    /// (`conflict`). The one place that decides it: routing, the cut of a demoted node's
    /// sessions, `/status`, `/metrics` and the Pod's report all ask here.
    pub fn usable_leader(&self) -> Option<&BackendHealth> {
        self.leader
            .filter(|_| !self.conflict)
            .and_then(|i| self.backends.get(i))
    }

    /// Whether the backend named `name` may take sessions: up, or not probed yet.
    pub fn is_up(&self, name: &str) -> bool {
        self.get(name).is_none_or(|b| b.up)
    }

    /// Name of the [usable leader](Self::usable_leader), if there is one.
    pub fn leader_name(&self) -> Option<&str> {
        self.usable_leader().map(|b| b.name.as_str())
    }
}

/// Starts the health checker with the standalone credentials (`healthCheck.credentials`) and
/// returns the channel its views are published on. Use [`spawn_checker`] to get a handle that
/// also takes connect-failure reports and other credential sources.
pub fn spawn(
    config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::Config>>,
) -> tokio::sync::watch::Receiver<HealthView> {
    spawn_checker(config, std::sync::Arc::new(StandaloneCredentials)).view()
}

/// What the data plane receives from the health side: the views, and the checker's handle
/// when a real checker runs (tests may drive the views by hand and have none).
#[derive(Debug)]
pub struct HealthSource {
    pub view: tokio::sync::watch::Receiver<HealthView>,
    pub checker: Option<HealthHandle>,
}

impl From<tokio::sync::watch::Receiver<HealthView>> for HealthSource {
    fn from(view: tokio::sync::watch::Receiver<HealthView>) -> Self {
        HealthSource {
            view,
            checker: None,
        }
    }
}

impl From<HealthHandle> for HealthSource {
    fn from(handle: HealthHandle) -> Self {
        HealthSource {
            view: handle.view(),
            checker: Some(handle),
        }
    }
}
