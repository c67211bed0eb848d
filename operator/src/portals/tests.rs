//! The aggregation of the portals' reports, and the pod view it reads.

use super::*;
use crate::names::{self, INSTANCE_LABEL};
use crate::pods::{owner, strip, Kept, PodCondition, PodConditions};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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
                message: String::new(),
                backends: Vec::new(),
            },
            PortalReport {
                name: "orders-portal-1".into(),
                ready: true,
                leader: "orders-1".into(),
                message: String::new(),
                backends: Vec::new(),
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
fn a_drained_backend_shows_in_the_portals_status() {
    let drained = r#"{"ready":true,"leader":"orders-0","backends":[{"name":"orders-0","up":true,"role":"leader"},{"name":"orders-1","up":true,"role":"replica","adminState":"drain"}],"configStale":false}"#;
    let a = run(
        RoutingMode::Roundrobin,
        &[
            pod(0, true, Some(drained)),
            pod(1, true, Some(&leads("orders-0"))),
        ],
    );
    assert_eq!(a.ready_portals, 2);
    assert_eq!(
        a.portals[0].backends,
        [PortalBackendState {
            name: "orders-1".into(),
            state: "drain".into()
        }]
    );
    assert!(
        a.portals[0].message.contains("orders-1 drain"),
        "{}",
        a.portals[0].message
    );
    assert!(a.portals[1].backends.is_empty());
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
    let control = portal::control::Control::default();
    control.set_state("a", Some(portal::config::BackendState::Maint));
    let written = portal::cluster::Report::new(
        &config,
        &health,
        &control.current(),
        &portal::reload::ReloadState::default(),
    );
    let text = serde_json::to_string(&written).unwrap();
    let read: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(read.ready, written.ready);
    assert_eq!(read.leader, written.leader);
    assert_eq!(read.config_stale, written.config_stale);
    assert_eq!(read.backends.len(), 2);
    assert_eq!(read.backends[1].name, "b");
    assert_eq!(read.backends[1].role, written.backends[1].role);
    assert_eq!(read.backends[0].admin_state.as_deref(), Some("maint"));
    assert_eq!(read.backends[1].admin_state, None);
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

#[test]
fn reads_are_the_backends_every_ready_portal_serves_reads_with() {
    let with_reads = |reads: &[&str]| {
        let mut v: serde_json::Value = serde_json::from_str(&leads("orders-0")).unwrap();
        v["reads"] = serde_json::json!(reads);
        v.to_string()
    };
    let (a, b) = (
        with_reads(&["orders-1"]),
        with_reads(&["orders-0", "orders-1"]),
    );
    let pods = [pod(0, true, Some(&a)), pod(1, true, Some(&b))];
    let refs: Vec<(String, Option<&PortalPod>)> =
        pods.iter().map(|(n, p)| (n.clone(), p.as_ref())).collect();
    let agg = aggregate(RoutingMode::Leader, BACKENDS, &refs);
    assert_eq!(agg.reads, ["orders-1"], "the ones both agree on");

    // A portal not ready does not count; none reporting reads: none.
    let pods = [pod(0, true, Some(&b)), pod(1, false, Some(&a))];
    let refs: Vec<(String, Option<&PortalPod>)> =
        pods.iter().map(|(n, p)| (n.clone(), p.as_ref())).collect();
    assert_eq!(
        aggregate(RoutingMode::Leader, BACKENDS, &refs).reads,
        ["orders-0", "orders-1"]
    );
    let plain = leads("orders-0");
    let pods = [pod(0, true, Some(&plain))];
    let refs: Vec<(String, Option<&PortalPod>)> =
        pods.iter().map(|(n, p)| (n.clone(), p.as_ref())).collect();
    assert!(aggregate(RoutingMode::Leader, BACKENDS, &refs)
        .reads
        .is_empty());
}
