//! `portals`: what the portal pods say about themselves, and what the status makes of it.
//!
//! Each portal writes its view (ready, leader, backends, configStale) as JSON in the annotation
//! `dbportal.dev/report` of its own Pod; the kubelet sets the Pod's `Ready` condition from the
//! portal's `/readyz`. The operator watches the portal Pods decoded into [`PortalPod`], which
//! skips everything else of a Pod, and [`strip`] keeps only the report, the Ready condition
//! and the owning DatabasePortal's name. [`aggregate`] is pure: it turns those views into the
//! status' `portals`, `readyPortals`, `leader` and Degraded reasons.
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
//! - a missing or unreadable annotation is "no report" and the portal's `message` says which.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use portal::cluster::REPORT_ANNOTATION;
use portal::config::{PortalReport, RoutingMode};
use serde::Deserialize;

use crate::build::{names, MANAGER};
use crate::status::reason;
use crate::DatabasePortal;

/// The label naming the DatabasePortal a child belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// The role an exclusive leader is reported with.
const EXCLUSIVE_LEADER: &str = "leader";

/// Label selector of every portal Pod the operator made.
pub fn pod_selector() -> String {
    format!(
        "app.kubernetes.io/name=dbportal,app.kubernetes.io/component=portal,app.kubernetes.io/managed-by={MANAGER}"
    )
}

/// A Pod as the operator reads it: metadata and the status conditions; the rest of the Pod
/// (spec, container statuses) is skipped while decoding and never held. [`strip`] moves what
/// is read into `kept` and drops the rest: labels and annotations are maps whose smallest
/// node is half a kilobyte, several times what a portal Pod needs.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PortalPod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<PodConditions>,
    #[serde(skip)]
    pub kept: Kept,
}

/// What [`strip`] keeps of a portal Pod besides its name and namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Kept {
    /// The DatabasePortal, when the Pod's controller is its StatefulSet.
    pub instance: Option<Box<str>>,
    /// The Pod's `Ready` condition is `True`.
    pub ready: bool,
    /// The report annotation, as written.
    pub report: Option<Box<str>>,
}

/// The conditions of a Pod's status.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodConditions {
    #[serde(default)]
    pub conditions: Vec<PodCondition>,
}

/// One Pod condition: type and status only.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

impl k8s_openapi::Resource for PortalPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PortalPod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PortalPod {
    /// The Pod's `Ready` condition is `True` (of a stripped Pod).
    pub fn is_ready(&self) -> bool {
        self.kept.ready
    }

    /// The report annotation, as written (of a stripped Pod).
    pub fn report(&self) -> Option<&str> {
        self.kept.report.as_deref()
    }
}

/// Keeps what the aggregation and the trigger read: name and namespace, and in `kept` the
/// DatabasePortal (from the instance label, only when the Pod's controller is that
/// DatabasePortal's StatefulSet), the Ready condition and the report annotation. Everything
/// else is dropped: a few hundred bytes a Pod stay.
pub fn strip(pod: &mut PortalPod) {
    let meta = &mut pod.metadata;
    let instance = meta
        .labels
        .as_mut()
        .and_then(|l| l.remove(INSTANCE_LABEL))
        .filter(|instance| {
            meta.owner_references.iter().flatten().any(|o| {
                o.controller == Some(true)
                    && o.kind == "StatefulSet"
                    && o.name == names::portal(instance)
            })
        });
    let report = meta
        .annotations
        .as_mut()
        .and_then(|a| a.remove(REPORT_ANNOTATION));
    let ready = pod.status.take().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        ..ObjectMeta::default()
    };
    pod.kept = Kept {
        instance: instance.map(String::into_boxed_str),
        ready,
        report: report.map(String::into_boxed_str),
    };
}

/// The DatabasePortal a stripped portal Pod belongs to.
pub fn owner(pod: PortalPod) -> Option<ObjectRef<DatabasePortal>> {
    let namespace = pod.metadata.namespace?;
    let instance = pod.kept.instance?;
    Some(ObjectRef::new(&instance).within(&namespace))
}

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
        portals,
        leader,
        degraded,
    }
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
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use std::collections::BTreeMap;

    const BACKENDS: &[&str] = &["orders-0", "orders-1"];

    fn report(ready: bool, leader: Option<&str>, up: &[(&str, bool, &str)]) -> String {
        serde_json::json!({
            "ready": ready,
            "leader": leader,
            "backends": up.iter().map(|(n, u, r)| serde_json::json!({"name": n, "up": u, "role": r})).collect::<Vec<_>>(),
            "configStale": false,
        })
        .to_string()
    }

    /// A report of a portal that sees `leader` lead (orders-0 and orders-1 up).
    fn leads(leader: &str) -> String {
        let role = |n: &str| if n == leader { "leader" } else { "replica" };
        report(
            true,
            Some(leader),
            &[
                ("orders-0", true, role("orders-0")),
                ("orders-1", true, role("orders-1")),
            ],
        )
    }

    fn down() -> String {
        report(
            false,
            None,
            &[
                ("orders-0", false, "unknown"),
                ("orders-1", false, "unknown"),
            ],
        )
    }

    fn pod(i: i32, ready: bool, report: Option<&str>) -> (String, Option<PortalPod>) {
        let name = names::portal_pod("orders", i);
        let mut pod = PortalPod {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some("shop".into()),
                annotations: report
                    .map(|r| BTreeMap::from([(REPORT_ANNOTATION.to_string(), r.to_string())])),
                ..Default::default()
            },
            status: Some(PodConditions {
                conditions: vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                }],
            }),
            kept: Kept::default(),
        };
        strip(&mut pod);
        (name, Some(pod))
    }

    fn run(routing: RoutingMode, pods: &[(String, Option<PortalPod>)]) -> Aggregate {
        let refs: Vec<(String, Option<&PortalPod>)> =
            pods.iter().map(|(n, p)| (n.clone(), p.as_ref())).collect();
        aggregate(routing, BACKENDS, &refs)
    }

    fn reasons(a: &Aggregate) -> Vec<&'static str> {
        a.degraded.iter().map(|(r, _)| *r).collect()
    }

    #[test]
    fn ready_portals_that_agree_name_the_leader() {
        let a = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(&leads("orders-1"))),
                pod(1, true, Some(&leads("orders-1"))),
            ],
        );
        assert_eq!(a.leader, "orders-1");
        assert_eq!(a.ready_portals, 2);
        assert!(a.degraded.is_empty(), "{:?}", a.degraded);
        assert_eq!(
            a.portals,
            [
                PortalReport {
                    name: "orders-portal-0".into(),
                    ready: true,
                    leader: "orders-1".into(),
                    message: String::new()
                },
                PortalReport {
                    name: "orders-portal-1".into(),
                    ready: true,
                    leader: "orders-1".into(),
                    message: String::new()
                },
            ]
        );
    }

    #[test]
    fn a_busy_leader_stays_the_leader_and_the_message_says_so() {
        let busy = r#"{"ready":true,"leader":"orders-0","backends":[{"name":"orders-0","up":true,"role":"leader","state":"busy"},{"name":"orders-1","up":true,"role":"replica"}],"configStale":false}"#;
        let a = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(busy)),
                pod(1, true, Some(&leads("orders-0"))),
            ],
        );
        assert_eq!(a.leader, "orders-0");
        assert_eq!(a.ready_portals, 2);
        assert!(a.degraded.is_empty(), "{:?}", a.degraded);
        assert!(a.portals[0].ready);
        assert!(
            a.portals[0].message.contains("orders-0 busy"),
            "{}",
            a.portals[0].message
        );
        assert_eq!(a.portals[1].message, "");
    }

    #[test]
    fn ready_portals_that_disagree_are_degraded_and_name_no_leader() {
        let a = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(&leads("orders-0"))),
                pod(1, true, Some(&leads("orders-1"))),
            ],
        );
        assert_eq!(a.leader, "");
        assert_eq!(reasons(&a), [reason::LEADER_DISAGREEMENT]);
        let message = &a.degraded[0].1;
        assert!(
            message.contains("orders-portal-0 sees orders-0")
                && message.contains("orders-portal-1 sees orders-1"),
            "{message}"
        );
    }

    #[test]
    fn a_short_disagreement_is_no_degradation() {
        let split = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(&leads("orders-0"))),
                pod(1, true, Some(&leads("orders-1"))),
            ],
        );
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut since = None;
        let mut a = split.clone();
        assert_eq!(
            hold_disagreement(&mut a, &mut since, t0, grace),
            Some(grace)
        );
        assert!(a.degraded.is_empty());
        assert_eq!(a.leader, "", "the leader is still not agreed");
        let mut a = split.clone();
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(
            hold_disagreement(&mut a, &mut since, t1, grace),
            Some(Duration::from_secs(2))
        );
        assert!(a.degraded.is_empty());
        let mut a = split.clone();
        assert_eq!(
            hold_disagreement(&mut a, &mut since, t0 + grace, grace),
            None
        );
        assert_eq!(reasons(&a), [reason::LEADER_DISAGREEMENT]);
        // Agreement again: the clock starts over.
        let mut agreed = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(&leads("orders-1"))),
                pod(1, true, Some(&leads("orders-1"))),
            ],
        );
        assert_eq!(
            hold_disagreement(&mut agreed, &mut since, t0 + grace, grace),
            None
        );
        assert_eq!(since, None);
        let mut a = split;
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            hold_disagreement(&mut a, &mut since, later, grace),
            Some(grace)
        );
        assert_eq!(since, Some(later));
    }

    #[test]
    fn no_portal_seeing_a_leader_is_no_healthy_backend() {
        let a = run(
            RoutingMode::Leader,
            &[pod(0, false, Some(&down())), pod(1, false, Some(&down()))],
        );
        assert_eq!(a.leader, "");
        assert_eq!(a.ready_portals, 0);
        assert_eq!(reasons(&a), [reason::NO_HEALTHY_BACKEND]);
        assert!(
            a.degraded[0]
                .1
                .contains("orders-portal-0: orders-0 down, orders-1 down"),
            "{}",
            a.degraded[0].1
        );
        assert!(a.portals[0].message.contains("no routable backend"));
        // Up but all replicas: still no leader.
        let replicas = report(
            false,
            None,
            &[("orders-0", true, "replica"), ("orders-1", true, "replica")],
        );
        let a = run(
            RoutingMode::Leader,
            &[pod(0, false, Some(&replicas)), pod(1, true, None)],
        );
        assert_eq!(reasons(&a), [reason::NO_HEALTHY_BACKEND]);
        assert!(
            a.degraded[0].1.contains("orders-portal-1: no report"),
            "{}",
            a.degraded[0].1
        );
    }

    #[test]
    fn no_ready_portal_and_no_report_is_not_degraded() {
        // Pods not started yet (or not created): the Ready condition says so, nothing more.
        let a = run(
            RoutingMode::Leader,
            &[pod(0, false, None), (names::portal_pod("orders", 1), None)],
        );
        assert_eq!(a.leader, "");
        assert_eq!(a.ready_portals, 0);
        assert!(a.degraded.is_empty(), "{:?}", a.degraded);
        assert_eq!(a.portals[0].message, "Pod not Ready; no report yet");
        assert_eq!(a.portals[1].message, "no Pod");
        assert_eq!(
            a.not_ready_detail(),
            "orders-portal-0: Pod not Ready; no report yet; orders-portal-1: no Pod"
        );
    }

    #[test]
    fn one_portal_seeing_the_leader_is_enough() {
        let a = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(&leads("orders-0"))),
                pod(1, false, Some(&down())),
            ],
        );
        assert_eq!(a.leader, "orders-0");
        assert_eq!(a.ready_portals, 1);
        assert!(a.degraded.is_empty(), "{:?}", a.degraded);
    }

    #[test]
    fn a_report_of_a_pod_not_ready_is_shown_but_not_counted() {
        // The portal of pod 1 stopped after reporting orders-1: its Pod is not Ready.
        let a = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(&leads("orders-0"))),
                pod(1, false, Some(&leads("orders-1"))),
            ],
        );
        assert_eq!(a.leader, "orders-0");
        assert_eq!(a.ready_portals, 1);
        assert!(a.degraded.is_empty(), "{:?}", a.degraded);
        assert_eq!(a.portals[1].leader, "orders-1");
        assert!(!a.portals[1].ready);
        assert_eq!(a.portals[1].message, "Pod not Ready");
    }

    #[test]
    fn an_unreadable_report_is_no_report_and_says_so() {
        let a = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some("{not json")),
                pod(1, true, Some(&leads("orders-0"))),
            ],
        );
        assert_eq!(a.leader, "orders-0");
        assert_eq!(a.ready_portals, 1);
        assert!(!a.portals[0].ready);
        assert!(
            a.portals[0].message.contains("annotation is unreadable"),
            "{}",
            a.portals[0].message
        );
        // A report missing a required field is unreadable too, not a panic.
        let a = run(
            RoutingMode::Leader,
            &[pod(0, true, Some(r#"{"leader":"orders-0"}"#))],
        );
        assert!(
            a.portals[0].message.contains("ready"),
            "{}",
            a.portals[0].message
        );
        assert!(a.degraded.is_empty());
    }

    #[test]
    fn without_leader_routing_healthy_backends_count_not_leaders() {
        // tcp (routing first): no roles, no leader; healthy as long as a backend is up.
        let tcp = report(
            true,
            None,
            &[
                ("orders-0", false, "unknown"),
                ("orders-1", true, "unknown"),
            ],
        );
        let a = run(
            RoutingMode::First,
            &[pod(0, true, Some(&tcp)), pod(1, true, Some(&tcp))],
        );
        assert_eq!(a.leader, "");
        assert_eq!(a.ready_portals, 2);
        assert!(a.degraded.is_empty(), "{:?}", a.degraded);
        let a = run(
            RoutingMode::Roundrobin,
            &[pod(0, false, Some(&down())), pod(1, false, Some(&down()))],
        );
        assert_eq!(reasons(&a), [reason::NO_HEALTHY_BACKEND]);
        assert!(a.degraded[0]
            .1
            .starts_with("no portal sees a healthy backend"));
        // Different leaders do not matter to routing that ignores them.
        let a = run(
            RoutingMode::First,
            &[
                pod(0, true, Some(&leads("orders-0"))),
                pod(1, true, Some(&leads("orders-1"))),
            ],
        );
        assert_eq!(a.leader, "");
        assert!(a.degraded.is_empty(), "{:?}", a.degraded);
        // They still name an agreed leader.
        let a = run(
            RoutingMode::First,
            &[
                pod(0, true, Some(&leads("orders-1"))),
                pod(1, true, Some(&leads("orders-1"))),
            ],
        );
        assert_eq!(a.leader, "orders-1");
    }

    #[test]
    fn different_shared_leaders_are_no_conflict() {
        // etcd: every healthy member accepts writes; each portal picked one.
        let shared = |leader: &str| {
            report(
                true,
                Some(leader),
                &[
                    ("orders-0", true, "shared-leader"),
                    ("orders-1", true, "shared-leader"),
                ],
            )
        };
        let a = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(&shared("orders-1"))),
                pod(1, true, Some(&shared("orders-0"))),
            ],
        );
        assert!(a.degraded.is_empty(), "{:?}", a.degraded);
        assert_eq!(a.leader, "orders-0", "first in priority order");
    }

    #[test]
    fn a_refused_configuration_is_config_stale() {
        let mut stale: serde_json::Value = serde_json::from_str(&leads("orders-0")).unwrap();
        stale["configStale"] = true.into();
        let a = run(
            RoutingMode::Leader,
            &[
                pod(0, true, Some(&stale.to_string())),
                pod(1, true, Some(&leads("orders-0"))),
            ],
        );
        assert_eq!(a.leader, "orders-0");
        assert_eq!(reasons(&a), [reason::CONFIG_STALE]);
        assert!(a.degraded[0].1.starts_with("orders-portal-0 refused"));
        assert!(a.portals[0].ready);
        assert!(a.portals[0].message.contains("refused the configuration"));
    }

    #[test]
    fn the_portal_report_is_read_as_written() {
        // The portal's own serialization, so a renamed field fails here.
        let config = portal::reload::parse_cluster(
            "engine: redis\nbackends: [{name: a, address: \"127.0.0.1:6379\"}, {name: b, address: \"127.0.0.1:6380\"}]\n",
        )
        .unwrap();
        let mut health = portal::health::HealthView::assume_up(["a", "b"]);
        health.leader = Some(1);
        let written =
            portal::cluster::Report::new(&config, &health, &portal::reload::ReloadState::default());
        let text = serde_json::to_string(&written).unwrap();
        let read: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(read.ready, written.ready);
        assert_eq!(read.leader, written.leader);
        assert_eq!(read.config_stale, written.config_stale);
        assert_eq!(read.backends.len(), 2);
        assert_eq!(read.backends[1].name, "b");
        assert_eq!(read.backends[1].role, written.backends[1].role);
    }

    #[test]
    fn strip_keeps_the_report_ready_condition_and_owner() {
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "orders-portal-0",
                "namespace": "shop",
                "uid": "u",
                "resourceVersion": "7",
                "labels": {"app.kubernetes.io/instance": "orders", "app.kubernetes.io/name": "dbportal"},
                "annotations": {REPORT_ANNOTATION: leads("orders-0"), "other": "x"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "orders-portal", "uid": "s", "controller": true}],
                "managedFields": [{"manager": "kubelet"}]
            },
            "spec": {"containers": [{"name": "portal", "image": "x"}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
            ]}
        });
        let mut pod: PortalPod = serde_json::from_value(json).unwrap();
        assert!(!pod.is_ready(), "read once stripped");
        strip(&mut pod);
        assert!(pod.is_ready());
        assert_eq!(pod.report(), Some(leads("orders-0").as_str()));
        assert_eq!(
            pod.metadata,
            ObjectMeta {
                name: Some("orders-portal-0".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            }
        );
        assert_eq!(pod.status, None);
        let dp = owner(pod.clone()).unwrap();
        assert_eq!(
            (dp.name.as_str(), dp.namespace.as_deref()),
            ("orders", Some("shop"))
        );

        // Labels that claim a DatabasePortal whose StatefulSet does not own the Pod: no owner.
        let mut stray = PortalPod {
            metadata: ObjectMeta {
                name: Some("x".into()),
                namespace: Some("shop".into()),
                labels: Some(BTreeMap::from([(INSTANCE_LABEL.into(), "orders".into())])),
                owner_references: Some(vec![OwnerReference {
                    kind: "StatefulSet".into(),
                    name: "other-portal".into(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            status: None,
            kept: Kept::default(),
        };
        strip(&mut stray);
        assert!(!stray.is_ready());
        assert_eq!(owner(stray), None);
    }

    #[test]
    fn leader_change_notes_name_old_and_new() {
        assert_eq!(
            leader_change_note("orders-0", "orders-1"),
            "leader changed from orders-0 to orders-1"
        );
        assert_eq!(
            leader_change_note("", "orders-1"),
            "leader changed from none to orders-1"
        );
        assert_eq!(
            leader_change_note("orders-0", ""),
            "leader changed from orders-0 to none"
        );
    }
}
