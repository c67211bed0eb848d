//! `portals`: what the status makes of the portal pods' reports. Each portal writes its view
//! (ready, leader, backends, configStale) as JSON in the annotation `dbportal.dev/report` of
//! its own Pod; the kubelet sets the Pod's `Ready` condition from the portal's `/readyz`; the
//! operator reads both from the stripped Pods of [`crate::pods`]. [`aggregate`] is pure: it
//! turns those views into the status' `portals`, `readyPortals`, `leader` and Degraded
//! reasons.
//!
//! Rules (also in the operator's README):
//! - a portal is ready when its Pod is `Ready` and its report says `ready`; a Pod not `Ready`
//!   may carry a report its portal wrote before it stopped, so its leader is shown in `portals`
//!   but never counted;
//! - `leader` is the backend every ready portal names; "" when no portal is ready, when they
//!   name none, or when they disagree. Engines whose members all accept writes (etcd) report
//!   them as `shared-leader`: portals that picked different shared leaders are not in conflict,
//!   and `leader` is the first of them in `spec.backends` order;
//! - `Degraded`/`LeaderDisagreement` when ready portals name different leaders (routing mode
//!   `leader` only: other modes do not route by the leader);
//! - `Degraded`/`NoHealthyBackend` when at least one portal has reported and no reporting
//!   portal sees a leader (routing mode `leader`) or any backend up (other modes). Reports of
//!   Pods that are not `Ready` count here: a portal without a backend is never `Ready`. No
//!   report at all (Pods not started yet) is `Ready: False` only, not this;
//! - `Degraded`/`ConfigStale` when a portal refused the configuration in its ConfigMap and
//!   serves an older one;
//! - a missing or unreadable annotation is "no report" and the portal's `message` says which;
//! - `readOnly.serving` is the backends every ready portal sends reads to (the replicas within
//!   `maxLag`, or the leader as the fallback), in `spec.backends` order.
//!
//! May import: `conditions`, `pods`.

use std::time::{Duration, Instant};

use portal::cluster::REPORT_ANNOTATION;
use portal::config::{PortalBackendState, PortalReport, RoutingMode};
use serde::Deserialize;

use crate::conditions::reason;
use crate::pods::PortalPod;

/// The role an exclusive leader is reported with.
const EXCLUSIVE_LEADER: &str = "leader";

/// A portal's report as the portal writes it (`portal::cluster::Report`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub ready: bool,
    #[serde(default)]
    pub leader: Option<String>,
    #[serde(default)]
    pub backends: Vec<BackendReport>,
    #[serde(default)]
    pub config_stale: bool,
    /// With `readOnly`: the backends serving the read-only listener.
    #[serde(default)]
    pub reads: Option<Vec<String>>,
}

/// One backend as a portal sees it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct BackendReport {
    pub name: String,
    #[serde(default)]
    pub up: bool,
    #[serde(default)]
    pub role: String,
    /// `busy` or `misconf` while the backend is up but answers with a caveat (a long Redis
    /// script, a server that cannot persist); absent otherwise.
    #[serde(default)]
    pub state: Option<String>,
    /// `drain` or `maint` (from `spec.backends[].state` or the portal's admin endpoint);
    /// absent when ready.
    #[serde(default, rename = "adminState")]
    pub admin_state: Option<String>,
}

impl Report {
    /// The role this portal reports for backend `name`.
    fn role_of(&self, name: &str) -> Option<&str> {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.role.as_str())
    }

    /// Whether this portal sees something to route to: a leader in routing mode `leader`, any
    /// backend up in the others.
    fn sees_healthy(&self, routing: RoutingMode) -> bool {
        match routing {
            RoutingMode::Leader => self.leader.is_some(),
            _ => self.backends.iter().any(|b| b.up),
        }
    }

    /// "orders-0 down, orders-1 up (replica)".
    fn backends_summary(&self) -> String {
        if self.backends.is_empty() {
            return "no backend".into();
        }
        self.backends
            .iter()
            .map(|b| match (b.up, b.role.as_str()) {
                (false, _) => format!("{} down", b.name),
                (true, "" | "unknown") => format!("{} up", b.name),
                (true, role) => format!("{} up ({role})", b.name),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What one portal Pod gives.
#[derive(Clone, Debug, PartialEq)]
enum View {
    NoPod,
    NoReport,
    Unreadable(String),
    Report(Report),
}

fn view(pod: Option<&PortalPod>) -> View {
    let Some(pod) = pod else {
        return View::NoPod;
    };
    match pod.report() {
        None => View::NoReport,
        Some(text) => match serde_json::from_str::<Report>(text) {
            Ok(report) => View::Report(report),
            Err(e) => View::Unreadable(e.to_string()),
        },
    }
}

/// The portals' views aggregated for the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Aggregate {
    /// One entry per desired portal, in ordinal order.
    pub portals: Vec<PortalReport>,
    pub ready_portals: i32,
    /// The backend the ready portals agree leads, "" when none.
    pub leader: String,
    /// (reason, message) of what is wrong in the portals' views.
    pub degraded: Vec<(&'static str, String)>,
    /// The backends every ready portal with a read-only listener sends reads to, in
    /// `spec.backends` order; empty when none is ready or they share none.
    pub reads: Vec<String>,
}

impl Aggregate {
    /// "orders-portal-1: Pod not Ready; orders-portal-2: no Pod" for the portals not ready.
    pub fn not_ready_detail(&self) -> String {
        self.portals
            .iter()
            .filter(|p| !p.ready)
            .map(|p| format!("{}: {}", p.name, p.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Aggregates the portal Pods `pods` (name and the Pod, if it exists, one per desired portal)
/// of a DatabasePortal routing with `routing` over `backends` (names, in priority order).
pub fn aggregate(
    routing: RoutingMode,
    backends: &[&str],
    pods: &[(String, Option<&PortalPod>)],
) -> Aggregate {
    let mut portals = Vec::with_capacity(pods.len());
    // (portal, its report) of the ready portals, and of every portal with a report.
    let mut ready: Vec<(&str, Report)> = Vec::new();
    let mut reporting: Vec<(&str, Report)> = Vec::new();
    let mut unreporting: Vec<&str> = Vec::new();
    for (name, pod) in pods {
        let pod_ready = pod.is_some_and(PortalPod::is_ready);
        let v = view(*pod);
        let mut why = Vec::new();
        if let Some(pod) = pod {
            if !pod.is_ready() {
                why.push("Pod not Ready".to_string());
            }
        }
        let mut states = Vec::new();
        let (is_ready, leader) = match &v {
            View::NoPod => {
                why.push("no Pod".into());
                (false, String::new())
            }
            View::NoReport => {
                why.push("no report yet".into());
                (false, String::new())
            }
            View::Unreadable(e) => {
                why.push(format!(
                    "its {REPORT_ANNOTATION} annotation is unreadable ({e}); taken as no report"
                ));
                (false, String::new())
            }
            View::Report(r) => {
                if !r.ready {
                    why.push(format!("no routable backend: {}", r.backends_summary()));
                }
                for b in r.backends.iter().filter(|b| b.up) {
                    match b.state.as_deref() {
                        Some("busy") => why.push(format!(
                            "{} busy running a script or function (kept in rotation so that \
                             SCRIPT KILL or FUNCTION KILL reach it)",
                            b.name
                        )),
                        Some(state) => why.push(format!("{} {state}", b.name)),
                        None => {}
                    }
                }
                for b in &r.backends {
                    if let Some(state) = &b.admin_state {
                        why.push(format!("{} {state}", b.name));
                        states.push(PortalBackendState {
                            name: b.name.clone(),
                            state: state.clone(),
                        });
                    }
                }
                if r.config_stale {
                    why.push(
                        "refused the configuration in its ConfigMap; serves an older one".into(),
                    );
                }
                (pod_ready && r.ready, r.leader.clone().unwrap_or_default())
            }
        };
        match v {
            View::Report(r) => {
                if is_ready {
                    ready.push((name, r.clone()));
                }
                reporting.push((name, r));
            }
            _ => unreporting.push(name),
        }
        portals.push(PortalReport {
            name: name.clone(),
            ready: is_ready,
            leader,
            message: why.join("; "),
            backends: states,
        });
    }

    let mut degraded = Vec::new();
    let leader = agreed_leader(routing, backends, &ready, &mut degraded);

    if !reporting.is_empty() && reporting.iter().all(|(_, r)| !r.sees_healthy(routing)) {
        let what = match routing {
            RoutingMode::Leader => "no portal sees a leader",
            _ => "no portal sees a healthy backend",
        };
        let mut seen: Vec<String> = reporting
            .iter()
            .map(|(p, r)| format!("{p}: {}", r.backends_summary()))
            .collect();
        seen.extend(unreporting.iter().map(|p| format!("{p}: no report")));
        degraded.push((
            reason::NO_HEALTHY_BACKEND,
            format!("{what} ({})", seen.join("; ")),
        ));
    }

    let stale: Vec<&str> = reporting
        .iter()
        .filter(|(_, r)| r.config_stale)
        .map(|(p, _)| *p)
        .collect();
    if !stale.is_empty() {
        degraded.push((
            reason::CONFIG_STALE,
            format!(
                "{} refused the configuration in the ConfigMap and serve an older one (the portal log names the field)",
                stale.join(", ")
            ),
        ));
    }

    Aggregate {
        ready_portals: ready.len() as i32,
        reads: agreed_reads(backends, &ready),
        portals,
        leader,
        degraded,
    }
}

/// The backends that every ready portal reporting a read-only listener serves reads with.
fn agreed_reads(backends: &[&str], ready: &[(&str, Report)]) -> Vec<String> {
    let sets: Vec<&Vec<String>> = ready.iter().filter_map(|(_, r)| r.reads.as_ref()).collect();
    if sets.is_empty() {
        return Vec::new();
    }
    backends
        .iter()
        .filter(|b| sets.iter().all(|s| s.iter().any(|n| n == *b)))
        .map(|b| b.to_string())
        .collect()
}

/// The leader the ready portals agree on; pushes LeaderDisagreement when they do not.
fn agreed_leader(
    routing: RoutingMode,
    backends: &[&str],
    ready: &[(&str, Report)],
    degraded: &mut Vec<(&'static str, String)>,
) -> String {
    let Some((_, first)) = ready.first() else {
        return String::new();
    };
    if ready.iter().all(|(_, r)| r.leader == first.leader) {
        return first.leader.clone().unwrap_or_default();
    }
    // Different shared leaders (every member accepts writes) are no conflict.
    let shared = ready.iter().all(|(_, r)| {
        r.leader
            .as_deref()
            .is_some_and(|l| r.role_of(l).is_some_and(|role| role != EXCLUSIVE_LEADER))
    });
    if shared {
        return backends
            .iter()
            .find(|b| ready.iter().any(|(_, r)| r.leader.as_deref() == Some(**b)))
            .map(|b| b.to_string())
            .unwrap_or_default();
    }
    if routing == RoutingMode::Leader {
        let seen = ready
            .iter()
            .map(|(p, r)| format!("{p} sees {}", r.leader.as_deref().unwrap_or("none")))
            .collect::<Vec<_>>()
            .join(", ");
        degraded.push((
            reason::LEADER_DISAGREEMENT,
            format!("the ready portals disagree on the leader: {seen}"),
        ));
    }
    String::new()
}

/// How long the ready portals may disagree on the leader before it is a degradation: in a
/// switchover each portal sees the new leader at its own next probes (a second or two apart).
pub const DISAGREEMENT_GRACE: Duration = Duration::from_secs(5);

/// Holds back `LeaderDisagreement` until the disagreement has lasted `grace` (`since`: when
/// it began, kept by the caller between reconciles). Returns how long until it counts, while
/// it is held back.
pub fn hold_disagreement(
    aggregate: &mut Aggregate,
    since: &mut Option<Instant>,
    now: Instant,
    grace: Duration,
) -> Option<Duration> {
    let disagree = aggregate
        .degraded
        .iter()
        .any(|(r, _)| *r == reason::LEADER_DISAGREEMENT);
    if !disagree {
        *since = None;
        return None;
    }
    let lasted = now.saturating_duration_since(*since.get_or_insert(now));
    if lasted >= grace {
        return None;
    }
    aggregate
        .degraded
        .retain(|(r, _)| *r != reason::LEADER_DISAGREEMENT);
    Some(grace - lasted)
}

/// The note of a LeaderChanged event: "leader changed from orders-0 to orders-1" (an empty
/// name is "none").
pub fn leader_change_note(old: &str, new: &str) -> String {
    let name = |s: &str| {
        if s.is_empty() {
            "none".to_string()
        } else {
            s.to_string()
        }
    };
    format!("leader changed from {} to {}", name(old), name(new))
}

#[cfg(test)]
mod tests;
