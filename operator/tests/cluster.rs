//! The operator against a real kube-apiserver, etcd and kube-controller-manager (Kubernetes
//! 1.20, started privately for this test binary), running with exactly the chart's RBAC.

mod common;
#[path = "../../portal/tests/common/harness.rs"]
mod harness;
#[path = "../../portal/tests/common/servers.rs"]
mod servers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::{eventually, ControlPlane, OPERATOR_NAMESPACE};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use operator::apply::ApiSupport;
use operator::certificate::Certificate;
use operator::DatabasePortal;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(60);

struct RunningOperator {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), operator::RunError>>,
    http: SocketAddr,
}

impl RunningOperator {
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task).await???;
        Ok(())
    }
}

async fn start_operator(plane: &ControlPlane, identity: &str) -> anyhow::Result<RunningOperator> {
    let client = plane.operator().await?;
    let args = <operator::Args as clap::Parser>::try_parse_from([
        "operator",
        "--leader-election=true",
        "--lease-namespace",
        OPERATOR_NAMESPACE,
        "--identity",
        identity,
        "--portal-image",
        "example.test/portal:test",
        "--namespace",
        "",
    ])?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(operator::run(client, args, listener, async move {
        let _ = stopped.await;
    }));
    Ok(RunningOperator {
        stop: Some(stop),
        task,
        http,
    })
}

fn portal(ns: &str, spec: serde_json::Value) -> DatabasePortal {
    let mut base = json!({
        "apiVersion": "dbportal.dev/v1alpha1",
        "kind": "DatabasePortal",
        "metadata": {"name": "orders", "namespace": ns},
        "spec": {
            "engine": "redis",
            "backends": [
                {"name": "orders-0", "address": "orders-0.orders-db.shop.svc:6379"},
                {"name": "orders-1", "address": "orders-1.orders-db.shop.svc:6379"}
            ],
            "tls": {"mode": "disabled"}
        }
    });
    for (k, v) in spec.as_object().unwrap() {
        base["spec"][k] = v.clone();
    }
    serde_json::from_value(base).unwrap()
}

async fn create(admin: &Client, dp: &DatabasePortal) -> anyhow::Result<DatabasePortal> {
    let ns = dp.namespace().unwrap();
    common::create_namespace(admin, &ns).await?;
    Ok(Api::<DatabasePortal>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), dp)
        .await?)
}

async fn patch_spec(
    admin: &Client,
    ns: &str,
    spec: serde_json::Value,
) -> anyhow::Result<DatabasePortal> {
    Ok(Api::<DatabasePortal>::namespaced(admin.clone(), ns)
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await?)
}

/// Waits until the operator reported on `generation`.
async fn observed(admin: &Client, ns: &str, generation: i64) -> anyhow::Result<DatabasePortal> {
    let api = Api::<DatabasePortal>::namespaced(admin.clone(), ns);
    eventually(
        &format!("{ns}: status for generation {generation}"),
        WAIT,
        || async {
            let dp = api.get("orders").await?;
            let seen = dp.status.as_ref().and_then(|s| s.observed_generation);
            ensure!(seen == Some(generation), "observedGeneration {seen:?}");
            Ok(dp)
        },
    )
    .await
}

fn condition(dp: &DatabasePortal, type_: &str) -> (String, String, String) {
    dp.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

fn check_meta(kind: &str, meta: &ObjectMeta, dp: &DatabasePortal) -> anyhow::Result<()> {
    let labels = meta.labels.clone().unwrap_or_default();
    let expected: BTreeMap<String, String> = [
        ("app.kubernetes.io/name", "dbportal"),
        ("app.kubernetes.io/instance", "orders"),
        ("app.kubernetes.io/component", "portal"),
        ("app.kubernetes.io/managed-by", "dbportal-operator"),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect();
    for (k, v) in &expected {
        ensure!(
            labels.get(k) == Some(v),
            "{kind}: label {k} is {:?}",
            labels.get(k)
        );
    }
    let owners = meta.owner_references.clone().unwrap_or_default();
    ensure!(
        owners.iter().any(|o| o.uid == dp.uid().unwrap()
            && o.controller == Some(true)
            && o.kind == "DatabasePortal"),
        "{kind}: no controller owner reference to the DatabasePortal: {owners:?}"
    );
    Ok(())
}

async fn events(admin: &Client, ns: &str, reason: &str) -> anyhow::Result<Vec<Event>> {
    let list = Api::<Event>::namespaced(admin.clone(), ns)
        .list(&Default::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("orders")
        })
        .collect())
}

async fn gone<K>(api: &Api<K>, name: &str) -> anyhow::Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    ensure!(api.get_opt(name).await?.is_none(), "{name} still exists");
    Ok(())
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The contract's example (TLS from a cert-manager issuer) while cert-manager is absent:
/// every other child per the contract, condition CertManagerMissing.
async fn children_and_status(admin: Client) -> anyhow::Result<()> {
    let ns = "alpha";
    let dp = create(
        &admin,
        &portal(
            ns,
            json!({
                "allowedCIDRs": ["10.0.0.0/8", "2001:db8::/32"],
                "tls": {"mode": "terminate", "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}, "dnsNames": ["orders.example.com"]}
            }),
        ),
    )
    .await?;
    let dp_status = observed(&admin, ns, 1).await?;
    let status = dp_status.status.clone().unwrap();
    ensure!(status.ready == "0/2", "ready {}", status.ready);
    ensure!(status.ready_portals == 0);
    ensure!(
        status.endpoints
            == [
                "orders-portal-0.alpha.svc:6379",
                "orders-portal-1.alpha.svc:6379"
            ],
        "endpoints {:?}",
        status.endpoints
    );
    let degraded = condition(&dp_status, "Degraded");
    ensure!(
        degraded.0 == "True" && degraded.1 == "CertManagerMissing",
        "Degraded {degraded:?}"
    );
    let ready = condition(&dp_status, "Ready");
    ensure!(
        ready.0 == "False" && ready.1 == "PortalsNotReady",
        "Ready {ready:?}"
    );

    let cm = Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    check_meta("ConfigMap", &cm.metadata, &dp)?;
    let text = &cm.data.as_ref().unwrap()["portal.yaml"];
    let spec = portal::config::parse_yaml(text)?;
    spec.validate()?;
    ensure!(spec.allowed_cidrs == dp.spec.allowed_cidrs);

    let sts = Api::<StatefulSet>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    check_meta("StatefulSet", &sts.metadata, &dp)?;
    let sts_spec = sts.spec.unwrap();
    ensure!(sts_spec.replicas == Some(2));
    let pod = sts_spec.template.spec.unwrap();
    ensure!(pod.service_account_name.as_deref() == Some("orders-portal"));
    ensure!(pod.containers[0].image.as_deref() == Some("example.test/portal:test"));

    let services = Api::<Service>::namespaced(admin.clone(), ns);
    for name in ["orders-portal", "orders-portal-0", "orders-portal-1"] {
        let svc = services
            .get(name)
            .await
            .with_context(|| format!("Service {name}"))?;
        check_meta("Service", &svc.metadata, &dp)?;
        let spec = svc.spec.unwrap();
        ensure!(spec.ports.unwrap()[0].port == 6379);
        let selector = spec.selector.unwrap();
        if name != "orders-portal" {
            ensure!(
                selector
                    .get("statefulset.kubernetes.io/pod-name")
                    .map(String::as_str)
                    == Some(name)
            );
        }
    }
    let sa = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    check_meta("ServiceAccount", &sa.metadata, &dp)?;
    let role = Api::<Role>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    check_meta("Role", &role.metadata, &dp)?;
    let rb = Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    check_meta("RoleBinding", &rb.metadata, &dp)?;

    // Kubernetes 1.20 serves PodDisruptionBudgets only as policy/v1beta1.
    let support = ApiSupport::discover(&admin).await?;
    let pdb_resource = support.pdb.context("no PodDisruptionBudget API")?;
    ensure!(pdb_resource.version == "v1beta1", "{pdb_resource:?}");
    let pdb = Api::<DynamicObject>::namespaced_with(admin.clone(), ns, &pdb_resource)
        .get("orders-portal")
        .await?;
    check_meta("PodDisruptionBudget", &pdb.metadata, &dp)?;
    ensure!(pdb.data["spec"]["maxUnavailable"] == 1, "{:?}", pdb.data);

    let policy = Api::<NetworkPolicy>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    check_meta("NetworkPolicy", &policy.metadata, &dp)?;
    let ingress = policy
        .spec
        .as_ref()
        .and_then(|s| s.ingress.clone())
        .unwrap_or_default();
    ensure!(ingress.len() == 2, "{ingress:?}");

    eventually("Created event", WAIT, || async {
        ensure!(
            !events(&admin, ns, "Created").await?.is_empty(),
            "no Created event"
        );
        ensure!(
            !events(&admin, ns, "CertManagerMissing").await?.is_empty(),
            "no CertManagerMissing event"
        );
        Ok(())
    })
    .await
}

/// Deleting or editing a child by hand is undone.
async fn children_are_restored(admin: Client) -> anyhow::Result<()> {
    let ns = "bravo";
    create(&admin, &portal(ns, json!({}))).await?;
    observed(&admin, ns, 1).await?;
    let services = Api::<Service>::namespaced(admin.clone(), ns);
    let old = services.get("orders-portal-0").await?.uid();
    services
        .delete("orders-portal-0", &DeleteParams::default())
        .await?;
    eventually("Service orders-portal-0 recreated", WAIT, || async {
        let svc = services.get("orders-portal-0").await?;
        ensure!(svc.uid() != old, "still the old one");
        Ok(())
    })
    .await?;

    let cms = Api::<ConfigMap>::namespaced(admin.clone(), ns);
    let original = cms.get("orders-portal").await?.data;
    cms.patch(
        "orders-portal",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"portal.yaml": "not: [valid"}})),
    )
    .await?;
    eventually("ConfigMap restored", WAIT, || async {
        ensure!(
            cms.get("orders-portal").await?.data == original,
            "not restored"
        );
        Ok(())
    })
    .await?;

    let sts = Api::<StatefulSet>::namespaced(admin.clone(), ns);
    sts.delete("orders-portal", &DeleteParams::default())
        .await?;
    eventually("StatefulSet recreated", WAIT, || async {
        let s = sts.get("orders-portal").await?;
        ensure!(s.metadata.deletion_timestamp.is_none(), "being deleted");
        Ok(())
    })
    .await?;

    // Opening the admin port to everyone by hand is undone.
    let policies = Api::<NetworkPolicy>::namespaced(admin.clone(), ns);
    policies
        .patch(
            "orders-portal",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ingress": [{}]}})),
        )
        .await?;
    eventually("NetworkPolicy restored", WAIT, || async {
        let p = policies.get("orders-portal").await?;
        let ingress = p.spec.and_then(|s| s.ingress).unwrap_or_default();
        ensure!(
            ingress.len() == 2 && ingress[1].from.is_some(),
            "{ingress:?}"
        );
        Ok(())
    })
    .await?;

    let roles = Api::<Role>::namespaced(admin.clone(), ns);
    roles
        .patch(
            "orders-portal",
            &PatchParams::default(),
            &Patch::Merge(json!({"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]})),
        )
        .await?;
    eventually("Role rules restored", WAIT, || async {
        let rules = roles.get("orders-portal").await?.rules.unwrap_or_default();
        ensure!(
            rules.iter().all(|r| r.resource_names.is_some()),
            "{rules:?}"
        );
        Ok(())
    })
    .await
}

/// A spec change rewrites the ConfigMap only; shrinking removes the extra Service.
async fn spec_edit_keeps_the_pods(admin: Client) -> anyhow::Result<()> {
    let ns = "charlie";
    create(&admin, &portal(ns, json!({"allowedCIDRs": ["10.0.0.0/8"]}))).await?;
    observed(&admin, ns, 1).await?;
    let sts_api = Api::<StatefulSet>::namespaced(admin.clone(), ns);
    let before = sts_api.get("orders-portal").await?;

    patch_spec(
        &admin,
        ns,
        json!({"allowedCIDRs": ["192.168.0.0/16"], "timeouts": {"client": "1h"}}),
    )
    .await?;
    let cms = Api::<ConfigMap>::namespaced(admin.clone(), ns);
    eventually("ConfigMap carries the new CIDR", WAIT, || async {
        let cm = cms.get("orders-portal").await?;
        let text = cm
            .data
            .unwrap_or_default()
            .remove("portal.yaml")
            .unwrap_or_default();
        let spec = portal::config::parse_yaml(&text)?;
        ensure!(
            spec.allowed_cidrs == ["192.168.0.0/16"],
            "{:?}",
            spec.allowed_cidrs
        );
        Ok(())
    })
    .await?;
    observed(&admin, ns, 2).await?;
    let after = sts_api.get("orders-portal").await?;
    ensure!(
        before.spec.as_ref().unwrap().template == after.spec.as_ref().unwrap().template,
        "the pod template changed"
    );
    ensure!(
        before.metadata.generation == after.metadata.generation,
        "the StatefulSet changed"
    );
    eventually("Updated event", WAIT, || async {
        ensure!(
            !events(&admin, ns, "Updated").await?.is_empty(),
            "no Updated event"
        );
        Ok(())
    })
    .await?;

    patch_spec(&admin, ns, json!({"portal": {"replicas": 1}})).await?;
    let dp = observed(&admin, ns, 3).await?;
    ensure!(dp.status.unwrap().endpoints == ["orders-portal-0.charlie.svc:6379"]);
    let services = Api::<Service>::namespaced(admin.clone(), ns);
    eventually("Service orders-portal-1 removed", WAIT, || {
        gone(&services, "orders-portal-1")
    })
    .await?;
    ensure!(services.get_opt("orders-portal-0").await?.is_some());
    let replicas = sts_api.get("orders-portal").await?.spec.unwrap().replicas;
    ensure!(replicas == Some(1), "replicas {replicas:?}");
    Ok(())
}

/// A spec the schema accepts but that cannot work: InvalidSpec, a Warning, no child.
async fn invalid_spec(admin: Client) -> anyhow::Result<()> {
    let ns = "delta";
    create(
        &admin,
        &portal(ns, json!({"allowedCIDRs": ["10.0.0.0/8", "10.0.0.0/99"]})),
    )
    .await?;
    let dp = observed(&admin, ns, 1).await?;
    let degraded = condition(&dp, "Degraded");
    ensure!(
        degraded.0 == "True" && degraded.1 == "InvalidSpec",
        "{degraded:?}"
    );
    ensure!(
        degraded.2.contains("allowedCIDRs[1]"),
        "message {:?}",
        degraded.2
    );
    ensure!(condition(&dp, "Ready").0 == "False");
    ensure!(Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .get_opt("orders-portal")
        .await?
        .is_none());
    ensure!(Api::<StatefulSet>::namespaced(admin.clone(), ns)
        .get_opt("orders-portal")
        .await?
        .is_none());
    ensure!(Api::<Service>::namespaced(admin.clone(), ns)
        .list(&Default::default())
        .await?
        .items
        .is_empty());
    eventually("InvalidSpec warning", WAIT, || async {
        let warnings = events(&admin, ns, "InvalidSpec").await?;
        ensure!(
            warnings
                .iter()
                .any(|e| e.type_.as_deref() == Some("Warning")),
            "no warning"
        );
        Ok(())
    })
    .await?;

    patch_spec(&admin, ns, json!({"allowedCIDRs": ["10.0.0.0/8"]})).await?;
    let dp = observed(&admin, ns, 2).await?;
    ensure!(
        condition(&dp, "Degraded").0 == "False",
        "{:?}",
        condition(&dp, "Degraded")
    );
    ensure!(Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .get_opt("orders-portal")
        .await?
        .is_some());
    Ok(())
}

/// Deleting the DatabasePortal lets the garbage collector remove every child.
async fn garbage_collection(admin: Client) -> anyhow::Result<()> {
    let ns = "echo";
    create(&admin, &portal(ns, json!({}))).await?;
    observed(&admin, ns, 1).await?;
    Api::<DatabasePortal>::namespaced(admin.clone(), ns)
        .delete("orders", &DeleteParams::default())
        .await?;
    let support = ApiSupport::discover(&admin).await?;
    let pdbs =
        Api::<DynamicObject>::namespaced_with(admin.clone(), ns, support.pdb.as_ref().unwrap());
    eventually("children garbage-collected", WAIT, || async {
        gone(
            &Api::<ConfigMap>::namespaced(admin.clone(), ns),
            "orders-portal",
        )
        .await?;
        gone(
            &Api::<StatefulSet>::namespaced(admin.clone(), ns),
            "orders-portal",
        )
        .await?;
        gone(
            &Api::<ServiceAccount>::namespaced(admin.clone(), ns),
            "orders-portal",
        )
        .await?;
        gone(&Api::<Role>::namespaced(admin.clone(), ns), "orders-portal").await?;
        gone(
            &Api::<RoleBinding>::namespaced(admin.clone(), ns),
            "orders-portal",
        )
        .await?;
        gone(&pdbs, "orders-portal").await?;
        let services = Api::<Service>::namespaced(admin.clone(), ns);
        for s in ["orders-portal", "orders-portal-0", "orders-portal-1"] {
            gone(&services, s).await?;
        }
        Ok(())
    })
    .await
}

/// TLS from an existing Secret needs no cert-manager.
async fn tls_from_a_secret(admin: Client) -> anyhow::Result<()> {
    let ns = "foxtrot";
    create(
        &admin,
        &portal(
            ns,
            json!({"tls": {"mode": "terminate", "secretName": "mine"}}),
        ),
    )
    .await?;
    let dp = observed(&admin, ns, 1).await?;
    ensure!(
        condition(&dp, "Degraded").1 == "AsExpected",
        "{:?}",
        condition(&dp, "Degraded")
    );
    let readable = readable_secrets(&admin, ns).await?;
    ensure!(readable == ["mine"], "{readable:?}");
    Ok(())
}

/// The Secrets the portal's Role lets it read, sorted.
async fn readable_secrets(admin: &Client, ns: &str) -> anyhow::Result<Vec<String>> {
    let role = Api::<Role>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    let mut readable: Vec<String> = role
        .rules
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.resources.as_deref() == Some(&["secrets".to_string()][..]))
        .flat_map(|r| r.resource_names.unwrap_or_default())
        .collect();
    readable.sort();
    Ok(readable)
}

/// cert-manager installed later: the Certificate appears; TLS turned off: it goes.
async fn cert_manager_appears(admin: Client) -> anyhow::Result<()> {
    common::install_crd(&admin, common::cert_manager_crd()?).await?;
    let ns = "alpha";
    let certs = Api::<Certificate>::namespaced(admin.clone(), ns);
    let cert = eventually("Certificate created", WAIT, || async {
        Ok(certs.get("orders-portal").await?)
    })
    .await?;
    ensure!(cert.spec.secret_name == "orders-portal-tls");
    for name in [
        "orders-portal",
        "orders-portal-1.alpha.svc.cluster.local",
        "orders-portal-0.alpha.svc",
        "orders.example.com",
    ] {
        ensure!(
            cert.spec.dns_names.iter().any(|n| n == name),
            "{name} not in {:?}",
            cert.spec.dns_names
        );
    }
    let api = Api::<DatabasePortal>::namespaced(admin.clone(), ns);
    eventually("condition CertificateNotReady", WAIT, || async {
        let dp = api.get("orders").await?;
        let degraded = condition(&dp, "Degraded");
        ensure!(degraded.1 == "CertificateNotReady", "{degraded:?}");
        Ok(())
    })
    .await?;
    patch_spec(
        &admin,
        ns,
        json!({"tls": {"mode": "disabled", "issuerRef": null, "dnsNames": null}}),
    )
    .await?;
    eventually("Certificate removed", WAIT, || {
        gone(&certs, "orders-portal")
    })
    .await?;
    let dp = observed(&admin, ns, 2).await?;
    ensure!(
        condition(&dp, "Degraded").1 == "AsExpected",
        "{:?}",
        condition(&dp, "Degraded")
    );
    Ok(())
}

/// A portal's report as the portal writes it on its Pod.
fn report(ready: bool, leader: Option<&str>, up: bool) -> String {
    let role = |b: &str| match leader {
        Some(l) if l == b => "leader",
        _ if up => "replica",
        _ => "unknown",
    };
    json!({
        "ready": ready,
        "leader": leader,
        "backends": [
            {"name": "orders-0", "up": up, "role": role("orders-0")},
            {"name": "orders-1", "up": up, "role": role("orders-1")}
        ],
        "configStale": false
    })
    .to_string()
}

/// Does what the kubelet and the portal of Pod `name` would: sets its Ready condition and
/// its report annotation.
async fn portal_says(
    pods: &Api<Pod>,
    name: &str,
    pod_ready: bool,
    report: &str,
) -> anyhow::Result<()> {
    let ready = if pod_ready { "True" } else { "False" };
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": ready}]}})),
    )
    .await
    .with_context(|| format!("Ready condition of {name}"))?;
    pods.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"dbportal.dev/report": report}}})),
    )
    .await
    .with_context(|| format!("report of {name}"))?;
    Ok(())
}

/// Polls (every 25 ms) until the status satisfies `check`; returns it and the time taken.
async fn status_until(
    api: &Api<DatabasePortal>,
    what: &str,
    check: impl Fn(&DatabasePortal) -> anyhow::Result<()>,
) -> anyhow::Result<(DatabasePortal, Duration)> {
    let started = std::time::Instant::now();
    loop {
        let dp = api.get("orders").await?;
        match check(&dp) {
            Ok(()) => return Ok((dp, started.elapsed())),
            Err(e) if started.elapsed() > WAIT => {
                return Err(e.context(format!("{what}: not within {WAIT:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

fn leader_is(dp: &DatabasePortal, leader: &str, ready: i32) -> anyhow::Result<()> {
    let s = dp.status.as_ref().context("no status")?;
    ensure!(
        s.leader == leader && s.ready_portals == ready,
        "leader {:?}, readyPortals {}, portals {:?}, conditions {:?}",
        s.leader,
        s.ready_portals,
        s.portals,
        s.conditions
    );
    Ok(())
}

/// The `kubectl get dbp` row of `orders`: (column name, cell) pairs.
async fn printed_row(admin: &Client, ns: &str) -> anyhow::Result<Vec<(String, String)>> {
    let request = http::Request::get(format!(
        "/apis/dbportal.dev/v1alpha1/namespaces/{ns}/databaseportals/orders"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())?;
    let table: serde_json::Value = serde_json::from_str(&admin.request_text(request).await?)?;
    let columns = table["columnDefinitions"]
        .as_array()
        .context("no columns")?
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string());
    let cells = table["rows"][0]["cells"]
        .as_array()
        .context("no row")?
        .iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| c.to_string())
        });
    Ok(columns.zip(cells).collect())
}

/// `readOnly`: the read-only Service and port on every portal Service, the StatefulSet's
/// container and the NetworkPolicy; `status.readOnly` from the portals' reports (the test plays
/// kubelet and portal), shown by `kubectl get`; off again, the Service goes.
async fn read_only_service_and_status(admin: Client) -> anyhow::Result<()> {
    let ns = "mike";
    create(&admin, &portal(ns, json!({"readOnly": {"maxLag": "5s"}}))).await?;
    observed(&admin, ns, 1).await?;
    let services = Api::<Service>::namespaced(admin.clone(), ns);
    let ports = |svc: &Service| -> Vec<(String, i32)> {
        svc.spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| (p.name.clone().unwrap_or_default(), p.port))
            .collect()
    };
    let ro = services.get("orders-portal-ro").await?;
    ensure!(
        ports(&ro) == [("portal-ro".to_string(), 6380)],
        "{:?}",
        ports(&ro)
    );
    let own = services.get("orders-portal-0").await?;
    ensure!(
        ports(&own)
            == [
                ("portal".to_string(), 6379),
                ("portal-ro".to_string(), 6380)
            ],
        "{:?}",
        ports(&own)
    );
    let both = services.get("orders-portal").await?;
    ensure!(
        ports(&both) == [("portal".to_string(), 6379)],
        "{:?}",
        ports(&both)
    );
    let sts = Api::<StatefulSet>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    let container_ports: Vec<i32> = sts
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| {
            p.containers[0]
                .ports
                .iter()
                .flatten()
                .map(|p| p.container_port)
                .collect()
        })
        .unwrap_or_default();
    ensure!(container_ports.contains(&6380), "{container_ports:?}");
    let policy = Api::<NetworkPolicy>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    let open = serde_json::to_value(&policy.spec)?["ingress"][0]["ports"].to_string();
    ensure!(open.contains("6379") && open.contains("6380"), "{open}");

    // Both portals ready, each serving reads with orders-1.
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    let api = Api::<DatabasePortal>::namespaced(admin.clone(), ns);
    let (p0, p1) = ("orders-portal-0", "orders-portal-1");
    eventually("the StatefulSet's Pods", WAIT, || async {
        pods.get(p0).await?;
        pods.get(p1).await?;
        Ok(())
    })
    .await?;
    let mut reads: serde_json::Value = serde_json::from_str(&report(true, Some("orders-0"), true))?;
    reads["reads"] = json!(["orders-1"]);
    portal_says(&pods, p0, true, &reads.to_string()).await?;
    portal_says(&pods, p1, true, &reads.to_string()).await?;
    let (dp, _) = status_until(&api, "status.readOnly", |dp| {
        let s = dp.status.as_ref().context("no status")?;
        let ro = s.read_only.as_ref().context("no status.readOnly")?;
        ensure!(ro.serving == ["orders-1"], "{ro:?}");
        ensure!(
            ro.endpoint == format!("orders-portal-ro.{ns}.svc:6380"),
            "{ro:?}"
        );
        Ok(())
    })
    .await?;
    ensure!(dp.status.unwrap().read_only.unwrap().summary == "orders-1");
    let row = printed_row(&admin, ns).await?;
    ensure!(
        row.iter().any(|(c, v)| c == "Reads" && v == "orders-1"),
        "kubectl get dbp row {row:?}"
    );

    // Turned off: the Service goes, the per-portal Services lose the port.
    patch_spec(&admin, ns, json!({"readOnly": {"enabled": false}})).await?;
    observed(&admin, ns, 2).await?;
    eventually(
        "the read-only Service removed and its port",
        WAIT,
        || async {
            gone(&services, "orders-portal-ro").await?;
            let own = services.get("orders-portal-0").await?;
            ensure!(ports(&own).len() == 1, "{:?}", ports(&own));
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// The status follows what the portals report on their Pods (the test plays kubelet and
/// portal: no Pod runs here): leader, portals, readyPortals, LeaderDisagreement,
/// NoHealthyBackend, and one LeaderChanged event per change.
async fn portal_reports(admin: Client) -> anyhow::Result<()> {
    let ns = "hotel";
    create(&admin, &portal(ns, json!({}))).await?;
    observed(&admin, ns, 1).await?;
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    let api = Api::<DatabasePortal>::namespaced(admin.clone(), ns);
    let (p0, p1) = ("orders-portal-0", "orders-portal-1");
    eventually("the StatefulSet's Pods", WAIT, || async {
        pods.get(p0).await?;
        pods.get(p1).await?;
        Ok(())
    })
    .await?;

    // Pods without a report: not ready, not degraded, no leader.
    let (dp, _) = status_until(&api, "portals listed", |dp| {
        let s = dp.status.as_ref().context("no status")?;
        ensure!(s.portals.len() == 2, "portals {:?}", s.portals);
        Ok(())
    })
    .await?;
    let status = dp.status.clone().unwrap();
    ensure!(status.leader.is_empty() && status.ready == "0/2");
    ensure!(
        status.portals[0].message.contains("no report yet"),
        "{:?}",
        status.portals
    );
    ensure!(
        condition(&dp, "Degraded").1 == "AsExpected",
        "{:?}",
        condition(&dp, "Degraded")
    );

    // Both see orders-0.
    let leads0 = report(true, Some("orders-0"), true);
    portal_says(&pods, p0, true, &leads0).await?;
    portal_says(&pods, p1, true, &leads0).await?;
    let (dp, took) =
        status_until(&api, "leader orders-0", |dp| leader_is(dp, "orders-0", 2)).await?;
    eprintln!("portal_reports: both reports -> status.leader in {took:.0?}");
    let status = dp.status.clone().unwrap();
    ensure!(status.ready == "2/2", "ready {}", status.ready);
    ensure!(
        status
            .portals
            .iter()
            .map(|p| (p.name.as_str(), p.ready, p.leader.as_str()))
            .collect::<Vec<_>>()
            == [(p0, true, "orders-0"), (p1, true, "orders-0")],
        "portals {:?}",
        status.portals
    );
    ensure!(
        condition(&dp, "Ready").0 == "True",
        "{:?}",
        condition(&dp, "Ready")
    );
    ensure!(
        condition(&dp, "Degraded").1 == "AsExpected",
        "{:?}",
        condition(&dp, "Degraded")
    );
    let row = printed_row(&admin, ns).await?;
    ensure!(
        row.iter().any(|(c, v)| c == "Leader" && v == "orders-0")
            && row.iter().any(|(c, v)| c == "Ready" && v == "2/2"),
        "kubectl get dbp row {row:?}"
    );

    // A reconcile with nothing new (an unrelated annotation) announces nothing.
    pods.patch(
        p0,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"example.test/touch": "1"}}})),
    )
    .await?;

    // Failover: both see orders-1; one event per change.
    let leads1 = report(true, Some("orders-1"), true);
    let changed = std::time::Instant::now();
    portal_says(&pods, p0, true, &leads1).await?;
    portal_says(&pods, p1, true, &leads1).await?;
    status_until(&api, "leader orders-1", |dp| leader_is(dp, "orders-1", 2)).await?;
    eprintln!(
        "portal_reports: failover reports -> status.leader in {:.0?}",
        changed.elapsed()
    );

    // They disagree.
    portal_says(&pods, p0, true, &leads0).await?;
    let (dp, _) = status_until(&api, "LeaderDisagreement", |dp| {
        leader_is(dp, "", 2)?;
        ensure!(
            condition(dp, "Degraded").1 == "LeaderDisagreement",
            "{:?}",
            condition(dp, "Degraded")
        );
        Ok(())
    })
    .await?;
    let message = condition(&dp, "Degraded").2;
    ensure!(
        message.contains("orders-portal-0 sees orders-0")
            && message.contains("orders-portal-1 sees orders-1"),
        "message {message:?}"
    );

    // Nothing is healthy: the portals say so and their Pods are not Ready.
    let down = report(false, None, false);
    portal_says(&pods, p0, false, &down).await?;
    portal_says(&pods, p1, false, &down).await?;
    let (dp, _) = status_until(&api, "NoHealthyBackend", |dp| {
        leader_is(dp, "", 0)?;
        ensure!(
            condition(dp, "Degraded").1 == "NoHealthyBackend",
            "{:?}",
            condition(dp, "Degraded")
        );
        Ok(())
    })
    .await?;
    ensure!(condition(&dp, "Ready").0 == "False");

    // An unreadable report counts as none; the other portal leads the status.
    portal_says(&pods, p0, true, "{not json").await?;
    portal_says(&pods, p1, true, &leads1).await?;
    let (dp, _) = status_until(&api, "leader orders-1 again", |dp| {
        leader_is(dp, "orders-1", 1)
    })
    .await?;
    let status = dp.status.clone().unwrap();
    ensure!(
        !status.portals[0].ready && status.portals[0].message.contains("unreadable"),
        "portals {:?}",
        status.portals
    );
    ensure!(
        condition(&dp, "Degraded").1 == "AsExpected",
        "{:?}",
        condition(&dp, "Degraded")
    );

    // One LeaderChanged event per change of status.leader, none repeated: in time order,
    // each starts where the previous one ended (the test's Pods change one at a time, so
    // the status passes through the states in between).
    eventually("LeaderChanged events", WAIT, || async {
        let mut events = events(&admin, ns, "LeaderChanged").await?;
        events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        let mut changes = Vec::new();
        for e in &events {
            ensure!(e.type_.as_deref() == Some("Normal"), "{e:?}");
            ensure!(e.series.is_none(), "repeated: {e:?}");
            let note = e.note.as_deref().unwrap_or_default();
            let (from, to) = note
                .strip_prefix("leader changed from ")
                .and_then(|rest| rest.split_once(" to "))
                .with_context(|| format!("note {note:?}"))?;
            changes.push((from.to_string(), to.to_string()));
        }
        ensure!(changes.len() >= 4, "changes {changes:?}");
        ensure!(
            changes[0] == ("none".into(), "orders-0".into()),
            "changes {changes:?}"
        );
        for pair in changes.windows(2) {
            ensure!(pair[0].1 == pair[1].0, "not a chain: {changes:?}");
        }
        ensure!(
            changes.last().unwrap().1 == "orders-1",
            "changes {changes:?}"
        );
        for seen in ["orders-0", "orders-1", "none"] {
            ensure!(
                changes.iter().any(|(_, to)| to == seen),
                "never to {seen}: {changes:?}"
            );
        }
        Ok(())
    })
    .await
}

/// A counter of the operator's `/metrics` (the sum of its series matching `series`).
async fn counter(operator: SocketAddr, series: &str) -> anyhow::Result<f64> {
    let text = http_get(operator, "/metrics").await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A write by someone else that leaves the operator's fields alone (an annotation of their
/// own) is not applied over; one that takes over a field of the operator's is undone.
async fn others_writes(admin: Client, operator: SocketAddr) -> anyhow::Result<()> {
    const SENT: &str = r#"dbportal_operator_child_applies_total{kind="ConfigMap",result="sent"}"#;
    const RECONCILES: &str = "dbportal_operator_reconciles_total";
    let ns = "bravo";
    let cms = Api::<ConfigMap>::namespaced(admin.clone(), ns);
    let someone_else = PatchParams {
        field_manager: Some("someone-else".into()),
        ..PatchParams::default()
    };
    // Another writer's merge patch of the ConfigMap's metadata.
    let write_metadata = |metadata: serde_json::Value| {
        let (cms, params) = (cms.clone(), someone_else.clone());
        async move {
            let patch = Patch::Merge(json!({ "metadata": metadata }));
            cms.patch("orders-portal", &params, &patch).await
        }
    };
    let sent = counter(operator, SENT).await?;
    let reconciles = counter(operator, RECONCILES).await?;
    write_metadata(json!({"annotations": {"example.com/note": "mine"}})).await?;
    eventually("a reconcile after the annotation", WAIT, || async {
        ensure!(
            counter(operator, RECONCILES).await? > reconciles,
            "none yet"
        );
        Ok(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = counter(operator, SENT).await?;
    ensure!(
        after == sent,
        "the ConfigMap was applied again ({sent} -> {after} applies) after a write that left the operator's fields alone"
    );
    let cm = cms.get("orders-portal").await?;
    ensure!(
        cm.annotations().get("example.com/note").map(String::as_str) == Some("mine"),
        "the other writer's annotation is gone: {:?}",
        cm.annotations()
    );

    write_metadata(json!({"labels": {"app.kubernetes.io/name": "taken"}})).await?;
    eventually("the operator's label restored", WAIT, || async {
        let cm = cms.get("orders-portal").await?;
        let label = cm.labels().get("app.kubernetes.io/name").cloned();
        ensure!(label.as_deref() != Some("taken"), "still taken: {label:?}");
        Ok(())
    })
    .await?;
    let after = counter(operator, SENT).await?;
    ensure!(after > sent, "restored without an apply counted ({after})");
    Ok(())
}

/// The minimal DatabasePortal (no `tls`, so terminate with no certificate source) on a
/// cluster without cert-manager: the operator's own CA signs the portals' certificate.
async fn minimal_portal_gets_a_certificate(admin: Client) -> anyhow::Result<()> {
    let ns = "kilo";
    let mut dp = portal(ns, json!({}));
    dp.spec.tls = Default::default();
    create(&admin, &dp).await?;
    let dp = match observed(&admin, ns, 1).await {
        Ok(dp) => dp,
        Err(e) => {
            let failed = events(&admin, ns, "ReconcileFailed").await?;
            let notes: Vec<_> = failed.iter().filter_map(|e| e.note.clone()).collect();
            return Err(e.context(format!("reconcile failures: {notes:?}")));
        }
    };
    let degraded = condition(&dp, "Degraded");
    ensure!(degraded.1 != "InvalidSpec", "{degraded:?}");
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), ns);
    let data = |s: &k8s_openapi::api::core::v1::Secret, key: &str| -> Vec<u8> {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .unwrap_or_default()
    };
    let ca = secrets.get("orders-portal-ca").await?;
    let tls = secrets.get("orders-portal-tls").await?;
    check_meta("CA Secret", &ca.metadata, &dp)?;
    check_meta("TLS Secret", &tls.metadata, &dp)?;
    ensure!(tls.type_.as_deref() == Some("kubernetes.io/tls"));
    let ca_cert = data(&ca, "ca.crt");
    ensure!(!ca_cert.is_empty() && data(&tls, "ca.crt") == ca_cert);
    let served = |tls: &k8s_openapi::api::core::v1::Secret| -> anyhow::Result<String> {
        let pair = portal::tls::parse_pair(
            &data(tls, "tls.crt"),
            &data(tls, "tls.key"),
            std::time::SystemTime::now(),
        )?;
        Ok(pair.info.subject.clone())
    };
    let subject = served(&tls)?;
    ensure!(subject.contains("orders-portal.kilo.svc"), "{subject}");
    // The portals serve it; their Role reads it, not the CA.
    let sts = Api::<StatefulSet>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    let args = sts.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    ensure!(
        args.windows(2)
            .any(|w| w[0] == "--tls-secret" && w[1] == "orders-portal-tls"),
        "{args:?}"
    );
    let readable = readable_secrets(&admin, ns).await?;
    ensure!(readable == ["orders-portal-tls"], "{readable:?}");

    // A third portal needs its name in the certificate: issued again, same CA.
    patch_spec(&admin, ns, json!({"portal": {"replicas": 3}})).await?;
    observed(&admin, ns, 2).await?;
    let tls2 = secrets.get("orders-portal-tls").await?;
    ensure!(data(&tls2, "ca.crt") == ca_cert, "the CA changed");
    ensure!(
        data(&tls2, "tls.crt") != data(&tls, "tls.crt"),
        "not issued again"
    );
    let names = String::from_utf8_lossy(&data(&tls2, "tls.crt")).into_owned();
    ensure!(!names.is_empty());
    // Deleted by hand: back at the next reconcile, under the same CA.
    secrets
        .delete("orders-portal-tls", &DeleteParams::default())
        .await?;
    Api::<DatabasePortal>::namespaced(admin.clone(), ns)
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"poke": "1"}}})),
        )
        .await?;
    eventually("the certificate is back", WAIT, || async {
        let tls3 = secrets.get("orders-portal-tls").await?;
        ensure!(data(&tls3, "ca.crt") == ca_cert, "another CA");
        served(&tls3)?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// The operator binary, started as a user would, its stderr collected.
struct OperatorProcess {
    child: Option<std::process::Child>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl OperatorProcess {
    fn spawn(plane: &ControlPlane, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_as(&plane.operator_kubeconfig, args)
    }

    fn spawn_as(kubeconfig: &std::path::Path, args: &[&str]) -> anyhow::Result<Self> {
        use std::io::Read;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_operator"))
            .args([
                "--metrics-address",
                "127.0.0.1:0",
                "--portal-image",
                "example.test/portal:test",
            ])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .env_remove("DBPORTAL_LOG_FORMAT")
            .env_remove("POD_NAMESPACE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut pipe = child.stderr.take().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(OperatorProcess {
            child: Some(child),
            stderr,
        })
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM by PID; the exit status and how long it took (a process still running after
    /// 20 s is killed when `self` drops).
    async fn terminate(mut self) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let child = self.child.as_mut().unwrap();
        let started = std::time::Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill failed");
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > Duration::from_secs(20) {
                anyhow::bail!("still running 20 s after SIGTERM; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM within this, exit status 0.
const PROMPT_EXIT: Duration = Duration::from_secs(5);

async fn exits_promptly(op: OperatorProcess, what: &str) -> anyhow::Result<String> {
    let stderr = op.stderr.clone();
    let (status, took) = op.terminate().await?;
    // The reader thread drains what the process wrote before it exited.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = stderr.lock().unwrap().clone();
    ensure!(
        status.success() && took <= PROMPT_EXIT,
        "{what}: SIGTERM gave {status} after {took:.1?}; log:\n{log}"
    );
    eprintln!("ok: {what}: exit 0 {took:.1?} after SIGTERM");
    Ok(log)
}

/// `--leader-election=false`: the binary reconciles (in its own namespace), logs plain text
/// on a pipe, and stops at SIGTERM.
async fn binary_without_leader_election(plane: &ControlPlane, admin: Client) -> anyhow::Result<()> {
    let ns = "india";
    let op = OperatorProcess::spawn(plane, &["--leader-election=false", "--namespace", ns])?;
    create(&admin, &portal(ns, json!({}))).await?;
    observed(&admin, ns, 1)
        .await
        .with_context(|| format!("no reconcile; log:\n{}", op.log()))?;
    ensure!(Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .get_opt("orders-portal")
        .await?
        .is_some());
    let policies = Api::<NetworkPolicy>::namespaced(admin.clone(), ns);
    ensure!(policies.get_opt("orders-portal").await?.is_some());
    let log = exits_promptly(op, "--leader-election=false").await?;
    ensure!(!log.contains('\u{1b}'), "ANSI escapes on a pipe:\n{log}");
    ensure!(log.contains(" INFO "), "no plain text lines:\n{log}");

    // Restarted with `--network-policy=false`: the NetworkPolicy made before is removed.
    let op = OperatorProcess::spawn(
        plane,
        &[
            "--leader-election=false",
            "--network-policy=false",
            "--namespace",
            ns,
        ],
    )?;
    eventually("NetworkPolicy removed", WAIT, || async {
        ensure!(
            policies.get_opt("orders-portal").await?.is_none(),
            "still there; log:\n{}",
            op.log()
        );
        Ok(())
    })
    .await?;
    exits_promptly(op, "--network-policy=false").await?;
    Ok(())
}

/// Leader election on: the binary takes the lease, reconciles, logs JSON lines when asked,
/// and at SIGTERM releases the lease and exits.
async fn binary_with_leader_election(plane: &ControlPlane, admin: Client) -> anyhow::Result<()> {
    let ns = "juliet";
    let lease = "sigterm-test";
    let op = OperatorProcess::spawn(
        plane,
        &[
            "--leader-election=true",
            "--lease-namespace",
            OPERATOR_NAMESPACE,
            "--lease-name",
            lease,
            "--identity",
            "binary",
            "--namespace",
            ns,
            "--log-format",
            "json",
        ],
    )?;
    create(&admin, &portal(ns, json!({}))).await?;
    observed(&admin, ns, 1)
        .await
        .with_context(|| format!("no reconcile; log:\n{}", op.log()))?;
    let leases = Api::<Lease>::namespaced(admin.clone(), OPERATOR_NAMESPACE);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    ensure!(holder(leases.get(lease).await?) == "binary");
    let log = exits_promptly(op, "--leader-election=true").await?;
    ensure!(
        holder(leases.get(lease).await?).is_empty(),
        "lease not released"
    );
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON line: {line}"))?;
        ensure!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    ensure!(log.contains("became leader"), "{log}");
    Ok(())
}

/// Out of cluster (a user's own, admin, credentials) with the lease namespace missing: one
/// clear message saying what to do, not a warning per retry; SIGTERM still stops the standby
/// at once.
async fn binary_lease_namespace_missing(plane: &ControlPlane) -> anyhow::Result<()> {
    let op = OperatorProcess::spawn_as(
        &plane.admin_kubeconfig,
        &[
            "--leader-election=true",
            "--lease-namespace",
            "nowhere",
            "--namespace",
            "nowhere",
        ],
    )?;
    // Three retries (every 2 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let log = exits_promptly(op, "standby without a lease namespace").await?;
    let advice = log
        .lines()
        .filter(|l| l.contains("kubectl create namespace nowhere"))
        .count();
    ensure!(advice == 1, "advice given {advice} times:\n{log}");
    for hint in ["--lease-namespace", "--leader-election=false"] {
        ensure!(log.contains(hint), "no {hint}:\n{log}");
    }
    ensure!(
        !log.contains("lease update failed"),
        "repeated warnings:\n{log}"
    );
    Ok(())
}

/// psql through `port` as `user`: its output, or its error.
async fn psql_via(port: u16, user: &str, password: &str, sql: &str) -> anyhow::Result<String> {
    let (user, password, sql) = (user.to_string(), password.to_string(), sql.to_string());
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", &user])
            .args(["-d", "postgres", "-XAtq", "-c", &sql])
            .env("PGPASSWORD", &password)
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGSSLMODE", "disable")
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
    .await?
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// PostgreSQL pooling along the operator's path: the DatabasePortal names a users Secret and
/// a probe-credentials Secret; the operator writes them into the ConfigMap (with the peers)
/// and the pod's arguments, and lets the portal's ServiceAccount read those two Secrets and no
/// other. A portal run as that ServiceAccount (impersonated) from the operator's configuration
/// (a copy with loopback listeners, since the pod's own addresses are for a pod) reads both
/// Secrets through the API and pools a real PostgreSQL's clients with them; a password
/// changed in the Secret and the database is the one that works next.
async fn pooling_reads_the_secrets_it_is_given(
    plane: &ControlPlane,
    admin: Client,
) -> anyhow::Result<()> {
    if harness::skip_without(&[&format!("{}/postgres", servers::PG_BIN), "psql"]) {
        return Ok(());
    }
    let ns = "lima";
    let pg = tokio::task::spawn_blocking(|| {
        let pg = servers::Postgres::primary("pgpw");
        pg.psql("CREATE ROLE app LOGIN PASSWORD 'apppw'");
        pg
    })
    .await?;
    common::create_namespace(&admin, ns).await?;
    let secrets = Api::<Secret>::namespaced(admin.clone(), ns);
    for s in [
        secret("orders-users", &[("app", "apppw")]),
        secret(
            "orders-probe",
            &[("username", "postgres"), ("password", "pgpw")],
        ),
        secret("unrelated", &[("x", "y")]),
    ] {
        secrets.create(&PostParams::default(), &s).await?;
    }
    let port = harness::free_port();
    let dp = portal(
        ns,
        json!({
            "engine": "postgres",
            "port": port,
            "backends": [{"name": "pg0", "address": pg.address()}],
            "pooling": {"mode": "transaction", "poolSize": 2, "auth": {"usersSecret": "orders-users"}},
            "healthCheck": {"credentialsSecret": "orders-probe"}
        }),
    );
    create(&admin, &dp).await?;
    let dp = observed(&admin, ns, 1).await?;
    ensure!(
        condition(&dp, "Degraded").1 == "AsExpected",
        "{:?}",
        condition(&dp, "Degraded")
    );

    // What the operator wrote: the ConfigMap, the pod's arguments, the Role.
    let cm = Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("portal.yaml"))
        .context("no portal.yaml")?
        .clone();
    let config = portal::config::parse_yaml(&text)?
        .validate()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let pool = config.plane.pg_pool().context("no pooling")?;
    ensure!(pool.transaction && pool.pool_size == 2, "{text}");
    ensure!(
        pool.users_secret.as_deref() == Some("orders-users"),
        "{text}"
    );
    ensure!(
        config.health.credentials_secret.as_deref() == Some("orders-probe"),
        "{text}"
    );
    let yaml: serde_norway::Value = serde_norway::from_str(&text)?;
    let peers: Vec<(String, String)> = yaml["peers"]
        .as_sequence()
        .context("no peers")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["address"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    ensure!(
        peers
            == vec![
                (
                    "orders-portal-0".to_string(),
                    format!("orders-portal-0.{ns}.svc:{port}")
                ),
                (
                    "orders-portal-1".to_string(),
                    format!("orders-portal-1.{ns}.svc:{port}")
                ),
            ],
        "peers {peers:?}"
    );
    let sts = Api::<StatefulSet>::namespaced(admin.clone(), ns)
        .get("orders-portal")
        .await?;
    let args = sts
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.args)
        .context("no container args")?;
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    ensure!(
        arg("--users-secret").as_deref() == Some("orders-users")
            && arg("--credentials-secret").as_deref() == Some("orders-probe"),
        "args {args:?}"
    );
    let readable = readable_secrets(&admin, ns).await?;
    ensure!(
        readable == ["orders-probe", "orders-users"],
        "the portal may read {readable:?}"
    );

    // The portal as the operator's ServiceAccount.
    let mut kc = kube::config::Kubeconfig::read_from(&plane.admin_kubeconfig)?;
    for auth in &mut kc.auth_infos {
        if let Some(info) = auth.auth_info.as_mut() {
            info.impersonate = Some(format!("system:serviceaccount:{ns}:orders-portal"));
        }
    }
    let sa =
        Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?;
    let denied = Api::<Secret>::namespaced(sa.clone(), ns)
        .get("unrelated")
        .await;
    ensure!(
        matches!(&denied, Err(kube::Error::Api(e)) if e.code == 403),
        "the portal's identity read an unrelated Secret: {denied:?}"
    );
    // The operator's configuration with loopback listeners, in a ConfigMap of its own that the
    // ServiceAccount may read as well.
    let (listen, admin_port) = (harness::free_port(), harness::free_port());
    let token = std::env::temp_dir().join(format!("dbportal-lima-token-{}", std::process::id()));
    std::fs::write(&token, "india-token\n")?;
    let mut local = yaml.clone();
    local["listen"] = format!("127.0.0.1:{listen}").into();
    local["admin"] = format!("127.0.0.1:{admin_port}").into();
    local["adminTokenFile"] = token.display().to_string().into();
    let local_cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("orders-portal-local".into()),
            ..Default::default()
        },
        data: Some([("portal.yaml".to_string(), serde_norway::to_string(&local)?)].into()),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &local_cm)
        .await?;
    let meta = |name: &str| ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    };
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta("local-copy"),
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["configmaps".into()]),
                    resource_names: Some(vec!["orders-portal-local".into()]),
                    verbs: vec!["get".into(), "list".into(), "watch".into()],
                    ..Default::default()
                }]),
            },
        )
        .await?;
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta("local-copy"),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "local-copy".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "orders-portal".into(),
                    namespace: Some(ns.into()),
                    ..Default::default()
                }]),
            },
        )
        .await?;
    let options = portal::cluster::Options {
        namespace: ns.into(),
        configmap: "orders-portal-local".into(),
        tls_secret: None,
        credentials_secret: arg("--credentials-secret"),
        users_secret: arg("--users-secret"),
        pod_name: None,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(portal::server::cluster(sa, options, async {
        let _ = stopped.await;
    }));
    let result = async {
        let who = eventually("a pooled login with the Secret's password", WAIT, || {
            psql_via(listen, "app", "apppw", "SELECT current_user")
        })
        .await?;
        ensure!(who == "app", "{who}");
        let wrong = psql_via(listen, "app", "nope", "SELECT 1").await;
        ensure!(
            wrong.as_ref().is_err_and(|e| e.to_string().contains("password")),
            "{wrong:?}"
        );
        // A new password in the database and the Secret: the portal follows the Secret.
        pg.psql("ALTER ROLE app PASSWORD 'newpw'");
        secrets
            .patch(
                "orders-users",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"app": "newpw"}})),
            )
            .await?;
        eventually("the Secret's new password", WAIT, || {
            psql_via(listen, "app", "newpw", "SELECT 1")
        })
        .await?;
        ensure!(psql_via(listen, "app", "apppw", "SELECT 1").await.is_err());
        let backends = pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
        );
        ensure!(backends.parse::<usize>()? <= 2, "{backends} backends");
        Ok(())
    }
    .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    let _ = std::fs::remove_file(&token);
    result
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = std::time::Instant::now();
    let out = f.await;
    (out, started.elapsed())
}

async fn lease_holder(admin: &Client) -> anyhow::Result<String> {
    let lease = Api::<Lease>::namespaced(admin.clone(), OPERATOR_NAMESPACE)
        .get("dbportal-operator")
        .await?;
    Ok(lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default())
}

#[test]
fn operator_on_a_real_apiserver() {
    let plane = ControlPlane::start("operator").expect("control plane");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let admin = plane.admin().await?;
        common::install(&admin).await?;
        // The binary in each mode, before the in-process operators (which watch every
        // namespace) start.
        let (a, b, c) = tokio::join!(
            timed(binary_without_leader_election(&plane, admin.clone())),
            timed(binary_with_leader_election(&plane, admin.clone())),
            timed(binary_lease_namespace_missing(&plane)),
        );
        let mut failures = Vec::new();
        for (name, r) in [
            ("binary_without_leader_election", a),
            ("binary_with_leader_election", b),
            ("binary_lease_namespace_missing", c),
        ] {
            match r {
                (Ok(()), took) => eprintln!("ok: {name} ({took:.1?})"),
                (Err(e), _) => failures.push(format!("{name}: {e:#}")),
            }
        }
        let primary = start_operator(&plane, "primary").await?;
        eventually("primary leads", WAIT, || async {
            ensure!(lease_holder(&admin).await? == "primary", "not yet");
            Ok(())
        })
        .await?;
        let standby = start_operator(&plane, "standby").await?;

        let (a, b, c, d, e, f, g, h, i, j) = tokio::join!(
            timed(minimal_portal_gets_a_certificate(admin.clone())),
            timed(children_and_status(admin.clone())),
            timed(children_are_restored(admin.clone())),
            timed(spec_edit_keeps_the_pods(admin.clone())),
            timed(invalid_spec(admin.clone())),
            timed(garbage_collection(admin.clone())),
            timed(tls_from_a_secret(admin.clone())),
            timed(portal_reports(admin.clone())),
            timed(pooling_reads_the_secrets_it_is_given(&plane, admin.clone())),
            timed(read_only_service_and_status(admin.clone())),
        );
        for (name, r) in [
            ("minimal_portal_gets_a_certificate", a),
            ("children_and_status", b),
            ("children_are_restored", c),
            ("spec_edit_keeps_the_pods", d),
            ("invalid_spec", e),
            ("garbage_collection", f),
            ("tls_from_a_secret", g),
            ("portal_reports", h),
            ("pooling_reads_the_secrets_it_is_given", i),
            ("read_only_service_and_status", j),
        ] {
            match r {
                (Ok(()), took) => eprintln!("ok: {name} ({took:.1?})"),
                (Err(e), _) => failures.push(format!("{name}: {e:#}")),
            }
        }
        match timed(cert_manager_appears(admin.clone())).await {
            (Ok(()), took) => eprintln!("ok: cert_manager_appears ({took:.1?})"),
            (Err(e), _) => failures.push(format!("cert_manager_appears: {e:#}")),
        }
        match timed(others_writes(admin.clone(), primary.http)).await {
            (Ok(()), took) => eprintln!("ok: others_writes ({took:.1?})"),
            (Err(e), _) => failures.push(format!("others_writes: {e:#}")),
        }

        let metrics = http_get(primary.http, "/metrics").await?;
        let healthz = http_get(primary.http, "/healthz").await?;
        let readyz = http_get(primary.http, "/readyz").await?;
        if !(metrics.contains("dbportal_operator_reconciles_total")
            && metrics
                .contains(r#"dbportal_operator_reconcile_failures_total{error="InvalidSpec"}"#)
            && metrics.contains("dbportal_operator_reconcile_duration_seconds_bucket")
            && metrics.contains("dbportal_operator_leader 1")
            && healthz.starts_with("HTTP/1.1 200")
            && readyz.starts_with("HTTP/1.1 200"))
        {
            failures.push(format!("metrics endpoint: {metrics}"));
        }
        let standby_metrics = http_get(standby.http, "/metrics").await?;
        if !standby_metrics.contains("dbportal_operator_leader 0") {
            failures.push(format!("the standby leads too: {standby_metrics}"));
        }

        // Leader election: the standby takes over when the primary stops.
        let takeover = std::time::Instant::now();
        ensure!(lease_holder(&admin).await? == "primary");
        primary.stop().await?;
        eventually("standby takes over", WAIT, || async {
            ensure!(lease_holder(&admin).await? == "standby", "not yet");
            Ok(())
        })
        .await?;
        create(&admin, &portal("golf", json!({}))).await?;
        observed(&admin, "golf", 1)
            .await
            .context("the new leader reconciles")?;
        eprintln!("ok: leader_election_takeover ({:.1?})", takeover.elapsed());
        standby.stop().await?;
        ensure!(failures.is_empty(), "\n{}", failures.join("\n"));
        Ok::<(), anyhow::Error>(())
    });
    drop(runtime);
    drop(plane);
    if let Err(e) = result {
        panic!("{e:#}");
    }
}
