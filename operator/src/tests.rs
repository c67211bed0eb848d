//! Unit tests of `validate`, `build` and `status`, fed by inline YAML.
//!
//! Tests sit on top of every layer and may import any module.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use crate::build::{build, Children, Settings, ADMIN_PORT, CONFIG_KEY};
use crate::conditions::reason;
use crate::fixtures::{from_yaml, orders, PortalFixture};
use crate::names;
use crate::status::{self, Observation};
use crate::validate::validate;
use crate::{DatabasePortal, Error};
use portal::config::LogFormat;

fn children(dp: &DatabasePortal) -> Children {
    let valid = validate(dp).unwrap();
    build(dp, &valid, &Settings::default()).unwrap()
}

fn invalid_fields(dp: &DatabasePortal) -> Vec<String> {
    match validate(dp) {
        Err(Error::InvalidSpec(errors)) => errors.into_iter().map(|e| e.field).collect(),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
}

fn every_meta(c: &Children) -> Vec<(&'static str, &kube::api::ObjectMeta)> {
    let mut all: Vec<(&'static str, &kube::api::ObjectMeta)> = vec![
        ("ConfigMap", c.config_map.meta()),
        ("ServiceAccount", c.service_account.meta()),
        ("Role", c.role.meta()),
        ("RoleBinding", c.role_binding.meta()),
        ("StatefulSet", c.stateful_set.meta()),
        ("PodDisruptionBudget", c.pdb.meta()),
    ];
    all.extend(c.services.iter().map(|s| ("Service", s.meta())));
    all.extend(c.certificate.iter().map(|s| ("Certificate", s.meta())));
    all.extend(c.network_policy.iter().map(|p| ("NetworkPolicy", p.meta())));
    all.push(("Secret", &c.admin_secret));
    all
}

#[test]
fn the_contract_example_is_valid() {
    let valid = validate(&orders()).unwrap();
    assert_eq!(valid.name, "orders");
    assert_eq!(valid.namespace, "shop");
    assert_eq!(valid.config.port, 6379);
}

#[test]
fn a_bad_cidr_is_invalid_spec_naming_the_field() {
    let dp = orders().patch_spec(r#"allowedCIDRs: ["10.0.0.0/8", "10.0.0.0/99"]"#);
    assert_eq!(invalid_fields(&dp), ["allowedCIDRs[1]"]);
}

#[test]
fn a_bad_address_is_invalid_spec_naming_the_field() {
    let dp = orders()
        .patch_spec(r#"backends: [{name: a, address: "a:6379"}, {name: b, address: "b:99999"}]"#);
    assert_eq!(invalid_fields(&dp), ["backends[1].address"]);
}

#[test]
fn proxy_accept_without_trusted_peers_is_invalid_spec_on_every_kubernetes() {
    // The CRD carries no CEL rule for this (servers before 1.25 do not enforce one): the
    // operator is what refuses it, naming the field.
    let dp = orders().patch_spec("proxyProtocol: {accept: true}");
    assert_eq!(invalid_fields(&dp), ["proxyProtocol.trustedCIDRs"]);
    let dp = orders().patch_spec(r#"proxyProtocol: {accept: true, trustedCIDRs: ["10.0.0.0/24"]}"#);
    assert!(validate(&dp).is_ok());
    let crd = crate::crd_yaml();
    assert!(
        !crd.contains("x-kubernetes-validations"),
        "a CEL rule is back in the CRD"
    );
}

#[test]
fn terminate_without_a_certificate_source_gets_the_operators_own_ca() {
    // Terminate is the default mode: the minimal DatabasePortal.
    let dp = from_yaml(
        r#"
metadata: {name: cache, namespace: shop, uid: u1}
spec: {engine: redis, backends: [{name: a, address: "a:6379"}]}
"#,
    );
    let c = children(&dp);
    assert!(c.certificate.is_none());
    let own = c.self_signed.expect("the operator's own certificate");
    assert_eq!(own.ca_secret.name.as_deref(), Some("cache-portal-ca"));
    assert_eq!(own.tls_secret.name.as_deref(), Some("cache-portal-tls"));
    assert_eq!(own.ca_name, "shop/cache dbportal CA");
    assert_eq!(own.dns_names[0], "cache-portal.shop.svc");
    for name in [
        "cache-portal",
        "cache-portal-0.shop.svc.cluster.local",
        "cache-portal-1.shop",
    ] {
        assert!(own.dns_names.contains(&name.to_string()), "{name}");
    }
    for meta in [&own.ca_secret, &own.tls_secret] {
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(meta.owner_references.as_ref().unwrap()[0].uid, "u1");
        assert_eq!(
            meta.labels.as_ref().unwrap()["app.kubernetes.io/instance"],
            "cache"
        );
    }
    // The portals serve it, and their Role reads it, not the CA.
    let args = portal_args(&dp, &Settings::default());
    assert_eq!(
        args,
        [
            "--configmap",
            "cache-portal",
            "--tls-secret",
            "cache-portal-tls"
        ]
    );
    let secrets: Vec<String> = c
        .role
        .rules
        .unwrap()
        .into_iter()
        .filter(|r| r.resources.as_deref() == Some(&["secrets".to_string()][..]))
        .flat_map(|r| r.resource_names.unwrap())
        .collect();
    assert_eq!(secrets, ["cache-portal-tls"]);
    // An issuer, a Secret of the user's, or no TLS: no CA of the operator's.
    assert!(children(&orders()).self_signed.is_none());
    assert!(children(&dp.clone().with_tls_secret("mine"))
        .self_signed
        .is_none());
    assert!(children(&dp.with_tls_disabled()).self_signed.is_none());
}

#[test]
fn every_problem_is_reported_at_once() {
    let dp = orders().patch_spec(r#"{allowedCIDRs: ["nope"], port: 0, portal: {logLevel: "x=y"}}"#);
    let fields = invalid_fields(&dp);
    for f in ["allowedCIDRs[0]", "port", "portal.logLevel"] {
        assert!(
            fields.contains(&f.to_string()),
            "{f} missing from {fields:?}"
        );
    }
}

#[test]
fn names_that_cannot_make_service_names_are_invalid() {
    let mut dp = orders();
    dp.metadata.name = Some("a".repeat(46));
    assert_eq!(invalid_fields(&dp), ["metadata.name"]);
    dp.metadata.name = Some("1orders".into());
    assert_eq!(invalid_fields(&dp), ["metadata.name"]);
    dp.metadata.name = Some("a".repeat(45));
    assert!(validate(&dp).is_ok());
}

#[test]
fn every_child_has_its_contract_name() {
    let c = children(&orders());
    assert_eq!(c.config_map.name_any(), "orders-portal");
    assert_eq!(c.stateful_set.name_any(), "orders-portal");
    assert_eq!(c.service_account.name_any(), "orders-portal");
    assert_eq!(c.role.name_any(), "orders-portal");
    assert_eq!(c.role_binding.name_any(), "orders-portal");
    assert_eq!(c.pdb.name_any(), "orders-portal");
    assert_eq!(c.certificate.as_ref().unwrap().name_any(), "orders-portal");
    assert_eq!(
        c.network_policy.as_ref().unwrap().name_any(),
        "orders-portal"
    );
    let services: Vec<_> = c.services.iter().map(|s| s.name_any()).collect();
    assert_eq!(
        services,
        ["orders-portal", "orders-portal-0", "orders-portal-1"]
    );
}

#[test]
fn every_child_has_the_labels_owner_and_namespace() {
    let dp = orders();
    let c = children(&dp);
    let expected: BTreeMap<String, String> = [
        ("app.kubernetes.io/name", "dbportal"),
        ("app.kubernetes.io/instance", "orders"),
        ("app.kubernetes.io/component", "portal"),
        ("app.kubernetes.io/managed-by", "dbportal-operator"),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect();
    let all = every_meta(&c);
    assert_eq!(all.len(), 12);
    for (kind, meta) in all {
        assert_eq!(meta.labels.as_ref(), Some(&expected), "{kind}");
        assert_eq!(meta.namespace.as_deref(), Some("shop"), "{kind}");
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1, "{kind}");
        let o = &owners[0];
        assert_eq!(
            (o.api_version.as_str(), o.kind.as_str()),
            ("dbportal.dev/v1alpha1", "DatabasePortal")
        );
        assert_eq!(o.name, "orders");
        assert_eq!(o.uid, dp.uid().unwrap());
        assert_eq!(o.controller, Some(true), "{kind}");
    }
}

fn port_of(s: &Service) -> (i32, Option<IntOrString>) {
    let p = &s.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    (p.port, p.target_port.clone())
}

#[test]
fn services_select_their_portal_on_the_engine_port() {
    let c = children(&orders());
    for svc in &c.services {
        assert_eq!(
            port_of(svc),
            (6379, Some(IntOrString::String("portal".into())))
        );
        assert_eq!(
            svc.spec.as_ref().unwrap().type_.as_deref(),
            Some("ClusterIP")
        );
    }
    let both = c.services[0]
        .spec
        .as_ref()
        .unwrap()
        .selector
        .as_ref()
        .unwrap();
    assert!(!both.contains_key("statefulset.kubernetes.io/pod-name"));
    assert_eq!(both["app.kubernetes.io/instance"], "orders");
    for i in 0..2 {
        let sel = c.services[i + 1]
            .spec
            .as_ref()
            .unwrap()
            .selector
            .as_ref()
            .unwrap();
        assert_eq!(
            sel["statefulset.kubernetes.io/pod-name"],
            format!("orders-portal-{i}")
        );
        assert_eq!(sel["app.kubernetes.io/instance"], "orders");
    }
    let tcp = from_yaml(
        r#"
metadata: {name: raw, namespace: ns, uid: u}
spec: {engine: tcp, port: 7000, backends: [{name: a, address: "a:7"}], tls: {mode: disabled}, portal: {serviceType: LoadBalancer}}
"#,
    );
    let c = children(&tcp);
    assert_eq!(port_of(&c.services[1]).0, 7000);
    assert_eq!(
        c.services[1].spec.as_ref().unwrap().type_.as_deref(),
        Some("LoadBalancer")
    );
}

#[test]
fn replicas_make_one_service_each() {
    let c = children(&orders().with_replicas(3));
    assert_eq!(c.services.len(), 4);
    assert_eq!(c.services[3].name_any(), "orders-portal-2");
    assert_eq!(c.stateful_set.spec.as_ref().unwrap().replicas, Some(3));
}

#[test]
fn the_configmap_round_trips_into_the_portal_config() {
    let dp = orders();
    let c = children(&dp);
    let text = &c.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let spec = portal::config::parse_yaml(text).unwrap();
    let config = spec.validate().unwrap();
    assert_eq!(config.listen.to_string(), "0.0.0.0:6379");
    assert_eq!(config.admin.port(), ADMIN_PORT);
    assert_eq!(config.allowed_cidrs.len(), 2);
    let mut expected = dp.spec.clone();
    expected.listen = Some("0.0.0.0:6379".into());
    expected.admin = Some(format!("0.0.0.0:{ADMIN_PORT}"));
    expected.admin_token_file = Some("/var/run/dbportal/admin/token".into());
    assert_eq!(spec, expected);
    assert_eq!(
        config.admin_token_file.as_deref(),
        Some(std::path::Path::new("/var/run/dbportal/admin/token"))
    );
}

#[test]
fn the_admin_token_secret_is_mounted_where_the_configmap_says() {
    let dp = orders();
    let c = children(&dp);
    assert_eq!(c.admin_secret.name.as_deref(), Some("orders-portal-admin"));
    let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "admin-token")
        .unwrap();
    assert_eq!(
        volume.secret.unwrap().secret_name.as_deref(),
        Some("orders-portal-admin")
    );
    let mount = pod.containers[0]
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| m.name == "admin-token")
        .unwrap();
    assert_eq!(mount.read_only, Some(true));
    let file = format!("{}/{}", mount.mount_path, crate::admin_token::KEY);
    assert!(c.config_map.data.unwrap()[CONFIG_KEY].contains(&format!("adminTokenFile: {file}")));
    // spec.backends[].state goes to the portals through the ConfigMap.
    let mut dp = orders();
    dp.spec.backends[1].state = portal::config::BackendState::Drain;
    dp.spec.backends[1].weight = 3;
    let text = &children(&dp).config_map.data.unwrap()[CONFIG_KEY];
    let config = portal::config::parse_yaml(text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(
        config.backends[1].state,
        portal::config::BackendState::Drain
    );
    assert_eq!(config.backends[1].weight, 3);
}

#[test]
fn pooling_goes_through_the_configmap_and_its_users_secret_is_readable() {
    let dp = orders().patch_spec(
        "pooling: {mode: multiplex, serverConnections: 2, maxInFlight: 64, clientOutputLimit: 1Mi, queueTimeout: 2s, auth: {usersSecret: orders-users}}",
    );
    let c = children(&dp);
    let text = &c.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let config = portal::config::parse_yaml(text)
        .unwrap()
        .validate()
        .unwrap();
    let m = config
        .plane
        .multiplex()
        .cloned()
        .expect("multiplex in the portal's configuration");
    assert_eq!(
        (m.server_connections, m.max_in_flight, m.client_output_limit),
        (2, 64, 1 << 20)
    );
    assert_eq!(m.queue_timeout, std::time::Duration::from_secs(2));
    assert_eq!(m.users_secret.as_deref(), Some("orders-users"));
    assert_eq!(config.spec.pooling, dp.spec.pooling);
    assert!(config.peers.is_empty(), "{:?}", config.peers);

    // The portal watches the users Secret, and its Role lets it read that Secret.
    let args = c
        .stateful_set
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(args[args.len() - 2..], ["--users-secret", "orders-users"]);
    let rules = c.role.rules.unwrap();
    let secrets = rules
        .iter()
        .find(|r| r.resources.as_deref() == Some(&["secrets".to_string()][..]))
        .unwrap();
    assert!(secrets
        .resource_names
        .as_ref()
        .unwrap()
        .contains(&"orders-users".to_string()));

    // Without multiplexing, or without a users Secret: no such argument, no such rule.
    for other in [
        orders().patch_spec("pooling: {mode: none, auth: {usersSecret: orders-users}}"),
        orders().patch_spec("pooling: {mode: multiplex}"),
        orders(),
    ] {
        let c = children(&other);
        let args = c
            .stateful_set
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap();
        assert!(!args.contains(&"--users-secret".to_string()), "{args:?}");
        let names: Vec<String> = c
            .role
            .rules
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_names.clone().unwrap_or_default())
            .collect();
        assert!(!names.contains(&"orders-users".to_string()), "{names:?}");
    }
}

#[test]
fn postgres_transaction_pooling_goes_through_the_configmap_and_its_users_secret_is_readable() {
    let dp = orders().patch_spec(
        "engine: postgres\npooling: {mode: transaction, poolSize: 5, minIdle: 1, queueTimeout: 2s, serverIdleTimeout: 1m, serverLifetime: 30m, maxPreparedStatements: 50, auth: {usersSecret: orders-users}}",
    );
    let c = children(&dp);
    let text = &c.config_map.data.as_ref().unwrap()[CONFIG_KEY];
    let config = portal::config::parse_yaml(text)
        .unwrap()
        .validate()
        .unwrap();
    let p = config
        .plane
        .pg_pool()
        .cloned()
        .expect("pooling in the portal's configuration");
    assert!(p.transaction);
    assert_eq!(
        (p.pool_size, p.min_idle, p.max_prepared_statements),
        (5, 1, 50)
    );
    assert_eq!(p.queue_timeout, std::time::Duration::from_secs(2));
    assert_eq!(p.users_secret.as_deref(), Some("orders-users"));
    assert_eq!(config.spec.pooling, dp.spec.pooling);
    // Every portal is a peer, by its own Service, for cancels that reach the other pod.
    let peers: Vec<_> = config
        .peers
        .iter()
        .map(|(name, address)| format!("{name}={address}"))
        .collect();
    assert_eq!(
        peers,
        [
            "orders-portal-0=orders-portal-0.shop.svc:5432",
            "orders-portal-1=orders-portal-1.shop.svc:5432"
        ]
    );
    let args = c
        .stateful_set
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(args[args.len() - 2..], ["--users-secret", "orders-users"]);
    let rules = c.role.rules.unwrap();
    assert!(rules
        .iter()
        .flat_map(|r| r.resource_names.clone().unwrap_or_default())
        .any(|n| n == "orders-users"));
}

#[test]
fn postgres_pooling_on_another_engine_or_without_users_is_refused_naming_the_field() {
    for engine in ["mysql", "etcd", "tcp", "redis"] {
        let dp = orders().patch_spec(&format!(
            "engine: {engine}\npooling: {{mode: transaction, auth: {{usersSecret: u}}}}"
        ));
        assert!(
            invalid_fields(&dp).contains(&"pooling.mode".to_string()),
            "{engine}"
        );
    }
    let dp = orders().patch_spec("engine: postgres\npooling: {mode: session}");
    assert_eq!(invalid_fields(&dp), ["pooling.auth"]);
}

#[test]
fn multiplex_on_another_engine_is_refused_naming_the_field() {
    let dp = orders().patch_spec("engine: postgres\npooling: {mode: multiplex}");
    assert_eq!(invalid_fields(&dp), ["pooling.mode"]);
}

#[test]
fn a_config_only_change_leaves_the_pod_template_alone() {
    let before = children(&orders());
    let after = children(&orders().patch_spec(
        r#"
allowedCIDRs: ["192.168.0.0/16"]
backends: [{name: x, address: "x:6379"}]
timeouts: {client: 1h}
limits: {maxConnections: 10}
routing: {mode: first}
healthCheck: {interval: 5s, steps: [{send: "PING\r\n", expect: "+PONG"}]}
tls: {dnsNames: [other.example.com]}
"#,
    ));
    assert_ne!(before.config_map.data, after.config_map.data);
    assert_eq!(
        before.stateful_set.spec.as_ref().unwrap().template,
        after.stateful_set.spec.as_ref().unwrap().template
    );
    // A change that needs new pods does change it.
    let image = children(&orders().patch_spec("portal: {image: example/portal:2}"));
    assert_ne!(
        before.stateful_set.spec.as_ref().unwrap().template,
        image.stateful_set.spec.as_ref().unwrap().template
    );
}

#[test]
fn the_statefulset_runs_the_portals_safely() {
    let c = children(&orders());
    let sts = c.stateful_set.spec.as_ref().unwrap();
    assert_eq!(sts.replicas, Some(2));
    assert_eq!(sts.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(
        sts.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let selector = sts.selector.match_labels.as_ref().unwrap();
    let template_labels = sts
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    for (k, v) in selector {
        assert_eq!(template_labels.get(k), Some(v));
    }
    let pod = sts.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("orders-portal"));
    let anti = pod
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let term = &anti
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        term.pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(Settings::default().portal_image.as_str())
    );
    assert_eq!(
        container.args.as_deref().unwrap(),
        [
            "--configmap",
            "orders-portal",
            "--tls-secret",
            "orders-portal-tls"
        ]
    );
    let env: Vec<_> = container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e.name.as_str(),
                e.value_from
                    .as_ref()
                    .unwrap()
                    .field_ref
                    .as_ref()
                    .unwrap()
                    .field_path
                    .as_str(),
            )
        })
        .collect();
    assert_eq!(
        env,
        [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace")
        ]
    );
    let ready = container
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    assert_eq!(ready.port, IntOrString::String("admin".into()));
    let live = container
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/healthz"));
    let ports: Vec<_> = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [("portal".to_string(), 6379), ("admin".to_string(), 8404)]
    );
    let res = container.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "50m");
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "64Mi");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "64Mi");
    assert!(!res.limits.as_ref().unwrap().contains_key("cpu"));
    // Images and resources from the spec win.
    let custom = children(
        &orders().patch_spec("portal: {image: example/p:1, resources: {limits: {memory: 128Mi}}}"),
    );
    let c = &custom
        .stateful_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(c.image.as_deref(), Some("example/p:1"));
    assert_eq!(
        c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
        "128Mi"
    );
}

#[test]
fn the_certificate_names_every_portal_service() {
    let c = children(&orders());
    let cert = c.certificate.unwrap();
    assert_eq!(cert.spec.secret_name, "orders-portal-tls");
    assert_eq!(cert.spec.issuer_ref.name, "letsencrypt");
    assert_eq!(cert.spec.issuer_ref.kind.as_deref(), Some("ClusterIssuer"));
    assert_eq!(
        cert.spec.issuer_ref.group.as_deref(),
        Some("cert-manager.io")
    );
    let mut expected = Vec::new();
    for svc in ["orders-portal", "orders-portal-0", "orders-portal-1"] {
        expected.extend([
            svc.to_string(),
            format!("{svc}.shop"),
            format!("{svc}.shop.svc"),
            format!("{svc}.shop.svc.cluster.local"),
        ]);
    }
    expected.push("orders.example.com".into());
    assert_eq!(cert.spec.dns_names, expected);
}

#[test]
fn no_certificate_without_cert_manager_tls() {
    assert!(children(&orders().with_tls_disabled())
        .certificate
        .is_none());
    let mine = orders().with_tls_secret("mine");
    assert!(children(&mine).certificate.is_none());
    assert_eq!(
        portal_args(&mine, &Settings::default()),
        ["--configmap", "orders-portal", "--tls-secret", "mine"]
    );
    assert_eq!(
        portal_args(&orders().with_tls_disabled(), &Settings::default()),
        ["--configmap", "orders-portal"]
    );
}

#[test]
fn the_pdb_allows_one_portal_down() {
    let c = children(&orders());
    let spec = c.pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        spec.selector.unwrap().match_labels.unwrap()["app.kubernetes.io/instance"],
        "orders"
    );
}

#[test]
fn the_network_policy_opens_the_database_port_and_keeps_the_admin_port_for_scrapers() {
    let c = children(&orders().with_tls_disabled());
    let spec = c.network_policy.unwrap().spec.unwrap();
    assert_eq!(
        spec.pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/instance"],
        "orders"
    );
    assert_eq!(spec.policy_types.unwrap(), ["Ingress"]);
    let rules = spec.ingress.unwrap();
    assert_eq!(rules.len(), 2);
    let port = |r: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        r.ports.as_ref().unwrap()[0].port.clone()
    };
    // The database port: everyone (the portal's allow-list decides).
    assert_eq!(port(&rules[0]), Some(IntOrString::Int(6379)));
    assert!(rules[0].from.is_none());
    // The admin port: only pods labelled as scrapers, in any namespace.
    assert_eq!(
        port(&rules[1]),
        Some(IntOrString::Int(i32::from(ADMIN_PORT)))
    );
    let from = rules[1].from.as_ref().unwrap();
    assert_eq!(from.len(), 1);
    assert_eq!(
        from[0].namespace_selector,
        Some(Default::default()),
        "any namespace"
    );
    assert_eq!(
        from[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["app.kubernetes.io/name"],
        "prometheus"
    );

    let dp = orders().with_tls_disabled();
    let valid = validate(&dp).unwrap();
    let own = Settings {
        admin_allowed_from: [("team".to_string(), "observability".to_string())].into(),
        ..Settings::default()
    };
    let rules = build(&dp, &valid, &own)
        .unwrap()
        .network_policy
        .unwrap()
        .spec
        .unwrap()
        .ingress
        .unwrap();
    assert_eq!(
        rules[1].from.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["team"],
        "observability"
    );
    let off = Settings {
        network_policy: false,
        ..Settings::default()
    };
    assert!(build(&dp, &valid, &off).unwrap().network_policy.is_none());
}

#[test]
fn the_portal_role_reaches_its_own_objects_only() {
    let dp = orders().patch_spec("healthCheck: {credentialsSecret: orders-probe}");
    let c = children(&dp);
    let rules = c.role.rules.unwrap();
    let find = |res: &str| {
        rules
            .iter()
            .find(|r| r.resources.as_deref() == Some(&[res.to_string()][..]))
            .unwrap()
    };
    let cm = find("configmaps");
    assert_eq!(cm.resource_names.as_deref().unwrap(), ["orders-portal"]);
    assert_eq!(cm.verbs, ["get", "list", "watch"]);
    let secrets = find("secrets");
    assert_eq!(
        secrets.resource_names.as_deref().unwrap(),
        ["orders-portal-tls", "orders-probe"]
    );
    assert_eq!(secrets.verbs, ["get", "list", "watch"]);
    let pods = find("pods");
    assert_eq!(
        pods.resource_names.as_deref().unwrap(),
        ["orders-portal-0", "orders-portal-1"]
    );
    assert_eq!(pods.verbs, ["get", "patch"]);
    assert_eq!(rules.len(), 3);
    for r in &rules {
        assert!(r.resource_names.as_ref().is_some_and(|n| !n.is_empty()));
        assert_eq!(r.api_groups.as_deref().unwrap(), [""]);
    }
    let rb = c.role_binding;
    assert_eq!(rb.role_ref.name, "orders-portal");
    assert_eq!(rb.role_ref.kind, "Role");
    let subject = &rb.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", "orders-portal")
    );
    assert_eq!(subject.namespace.as_deref(), Some("shop"));
    // No TLS, no credentials: no Secret at all.
    let rules = children(&orders().with_tls_disabled()).role.rules.unwrap();
    assert!(rules
        .iter()
        .all(|r| r.resources.as_deref() != Some(&["secrets".to_string()][..])));
}

#[test]
fn status_reports_endpoints_readiness_and_degradation() {
    let dp = orders().with_generation(3);
    let now = Timestamp::now();
    let obs = Observation {
        ready_portals: 1,
        degraded: vec![],
        portals: None,
    };
    let s = status::reconciled(&dp, 6379, &obs, now);
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!(s.ready, "1/2");
    assert_eq!(s.ready_portals, 1);
    assert_eq!(
        s.endpoints,
        [
            "orders-portal-0.shop.svc:6379",
            "orders-portal-1.shop.svc:6379"
        ]
    );
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reason::PORTALS_NOT_READY)
    );
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", reason::AS_EXPECTED)
    );

    let obs = Observation {
        ready_portals: 2,
        degraded: vec![(reason::CERT_MANAGER_MISSING, "install it".into())],
        portals: None,
    };
    let mut dp2 = dp.clone();
    dp2.status = Some(s.clone());
    let later = now + k8s_openapi::jiff::SignedDuration::from_secs(60);
    let s2 = status::reconciled(&dp2, 6379, &obs, later);
    assert_eq!(s2.ready, "2/2");
    let ready = s2.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "True");
    assert_eq!(ready.last_transition_time.0, later);
    let degraded = s2
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", reason::CERT_MANAGER_MISSING)
    );
    // Unchanged conditions keep their transition time.
    let mut dp3 = dp.clone();
    dp3.status = Some(s2.clone());
    let s3 = status::reconciled(
        &dp3,
        6379,
        &obs,
        later + k8s_openapi::jiff::SignedDuration::from_secs(60),
    );
    assert_eq!(s3.conditions, s2.conditions);
}

fn portal_args(dp: &DatabasePortal, settings: &Settings) -> Vec<String> {
    let valid = validate(dp).unwrap();
    build(dp, &valid, settings)
        .unwrap()
        .stateful_set
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap()
}

#[test]
fn portal_log_level_and_format_come_from_the_spec_else_the_operator() {
    let dp = orders().with_tls_disabled();
    let plain = ["--configmap", "orders-portal"];
    assert_eq!(portal_args(&dp, &Settings::default()), plain);
    let operator = Settings {
        portal_log_level: Some("debug".into()),
        portal_log_format: Some(LogFormat::Json),
        ..Settings::default()
    };
    assert_eq!(
        portal_args(&dp, &operator),
        [
            &plain[..],
            &["--log-level", "debug", "--log-format", "json"]
        ]
        .concat()
    );
    let own = dp.patch_spec("portal: {logLevel: 'warn,portal::health=debug', logFormat: text}");
    assert_eq!(
        portal_args(&own, &operator),
        [
            &plain[..],
            &[
                "--log-level",
                "warn,portal::health=debug",
                "--log-format",
                "text"
            ]
        ]
        .concat()
    );
    let bad = orders().patch_spec("portal: {logLevel: 'portal=loud'}");
    assert_eq!(invalid_fields(&bad), ["portal.logLevel"]);
}

#[test]
fn the_portal_watches_the_credentials_secret_it_is_given() {
    let dp = orders().patch_spec("healthCheck: {credentialsSecret: orders-probe}");
    let args = children(&dp)
        .stateful_set
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(
        args,
        [
            "--configmap",
            "orders-portal",
            "--tls-secret",
            "orders-portal-tls",
            "--credentials-secret",
            "orders-probe"
        ]
    );
}

#[test]
fn status_takes_leader_and_portals_from_the_reports() {
    use crate::portals::Aggregate;
    use portal::config::PortalReport;

    let mut dp = orders().with_generation(2);
    dp.status = Some(crate::DatabasePortalStatus {
        leader: "orders-0".into(),
        ..Default::default()
    });
    let now = Timestamp::now();
    let entry = |i: i32, ready: bool, leader: &str, message: &str| PortalReport {
        name: names::portal_pod("orders", i),
        ready,
        leader: leader.into(),
        message: message.into(),
        backends: Vec::new(),
    };
    let aggregate = Aggregate {
        portals: vec![
            entry(0, true, "orders-1", ""),
            entry(1, false, "", "Pod not Ready; no report yet"),
        ],
        ready_portals: 1,
        leader: "orders-1".into(),
        degraded: vec![(reason::CONFIG_STALE, "orders-portal-0 refused".into())],
        reads: Vec::new(),
    };
    let obs = Observation {
        ready_portals: 2,
        degraded: vec![(reason::PDB_UNSUPPORTED, "no PDB".into())],
        portals: None,
    }
    .with_portals(aggregate.clone());
    let s = status::reconciled(&dp, 6379, &obs, now);
    assert_eq!(s.leader, "orders-1");
    assert_eq!(s.portals, aggregate.portals);
    // The portals' count, not the StatefulSet's.
    assert_eq!((s.ready_portals, s.ready.as_str()), (1, "1/2"));
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        ready.message,
        "1/2 portals ready (orders-portal-1: Pod not Ready; no report yet)"
    );
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(
        degraded.reason,
        reason::CONFIG_STALE,
        "ranked before the PDB"
    );
    assert_eq!(degraded.message, "orders-portal-0 refused; no PDB");

    // A disagreement outranks the certificate; no view of the Pods keeps leader and portals.
    let obs = Observation {
        ready_portals: 0,
        degraded: vec![(reason::CERTIFICATE_NOT_READY, "cert".into())],
        portals: None,
    }
    .with_portals(Aggregate {
        degraded: vec![(reason::LEADER_DISAGREEMENT, "split".into())],
        ..Default::default()
    });
    assert_eq!(obs.degraded[0].0, reason::LEADER_DISAGREEMENT);
    let obs = Observation {
        ready_portals: 2,
        degraded: vec![],
        portals: None,
    };
    let s = status::reconciled(&dp, 6379, &obs, now);
    assert_eq!((s.leader.as_str(), s.ready_portals), ("orders-0", 2));
}

#[test]
fn invalid_status_names_the_field_and_keeps_the_rest() {
    let dp = orders().patch_spec(r#"allowedCIDRs: ["10.0.0.0/99"]"#);
    let Err(Error::InvalidSpec(errors)) = validate(&dp) else {
        panic!()
    };
    let s = status::invalid(&dp, &errors, Timestamp::now());
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        degraded.message.contains("allowedCIDRs[0]"),
        "{}",
        degraded.message
    );
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.status, "False");
}

#[test]
fn the_committed_crd_is_current() {
    let committed = include_str!("../../crds/databaseportal.yaml");
    assert_eq!(
        crate::crd_yaml(),
        committed,
        "run `cargo run -p dbportal-operator -- crd > crds/databaseportal.yaml`"
    );
}

#[test]
fn the_chart_carries_the_same_crd() {
    let chart = include_str!("../../charts/dbportal/crds/databaseportal.yaml");
    assert_eq!(
        chart,
        include_str!("../../crds/databaseportal.yaml"),
        "copy crds/databaseportal.yaml into charts/dbportal/crds/"
    );
}

#[test]
fn names_follow_the_contract() {
    assert_eq!(names::portal("orders"), "orders-portal");
    assert_eq!(names::portal_pod("orders", 1), "orders-portal-1");
    assert_eq!(names::tls_secret("orders"), "orders-portal-tls");
    assert_eq!(names::admin_secret("orders"), "orders-portal-admin");
}

#[test]
fn read_only_adds_a_port_to_the_pods_and_services_and_a_service_of_its_own() {
    let dp = orders().patch_spec("readOnly: {maxLag: 2s}");
    let c = children(&dp);
    let names: Vec<String> = c.services.iter().map(|s| s.name_any()).collect();
    assert_eq!(
        names,
        [
            "orders-portal",
            "orders-portal-0",
            "orders-portal-1",
            "orders-portal-ro"
        ]
    );
    let ports = |s: &Service| -> Vec<(Option<String>, i32)> {
        s.spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone(), p.port))
            .collect()
    };
    let main = (Some("portal".to_string()), 6379);
    let reads = (Some("portal-ro".to_string()), 6380);
    assert_eq!(ports(&c.services[0]), std::slice::from_ref(&main));
    assert_eq!(ports(&c.services[1]), [main.clone(), reads.clone()]);
    assert_eq!(ports(&c.services[3]), std::slice::from_ref(&reads));
    let ro = c.services[3].spec.as_ref().unwrap();
    assert!(!ro
        .selector
        .as_ref()
        .unwrap()
        .contains_key(crate::build::POD_NAME_LABEL));
    assert_eq!(
        ro.ports.as_ref().unwrap()[0].target_port,
        Some(IntOrString::String("portal-ro".into()))
    );
    let pod = c.stateful_set.spec.unwrap().template.spec.unwrap();
    let container_ports: Vec<(Option<String>, i32)> = pod.containers[0]
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone(), p.container_port))
        .collect();
    assert_eq!(
        container_ports,
        [main, reads, (Some("admin".into()), i32::from(ADMIN_PORT))]
    );
    let policy = c.network_policy.unwrap().spec.unwrap().ingress.unwrap();
    let open: Vec<_> = policy[0]
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.port.clone())
        .collect();
    assert_eq!(
        open,
        [Some(IntOrString::Int(6379)), Some(IntOrString::Int(6380))]
    );
    assert!(
        policy[0].from.is_none(),
        "open to every client, as the main port"
    );

    // The certificate names the read-only Service too; the ConfigMap carries readOnly.
    let dns = c.certificate.unwrap().spec.dns_names;
    assert!(
        dns.contains(&"orders-portal-ro.shop.svc".to_string()),
        "{dns:?}"
    );
    let text = &c.config_map.data.unwrap()[CONFIG_KEY];
    let config = portal::config::parse_yaml(text)
        .unwrap()
        .validate()
        .unwrap();
    let ro = config.read_only.expect("readOnly in the ConfigMap");
    assert_eq!(
        (ro.port, ro.max_lag),
        (6380, std::time::Duration::from_secs(2))
    );

    // A port of its own; off: no Service, no port.
    let c = children(&orders().patch_spec("readOnly: {port: 7000}"));
    assert_eq!(
        ports(&c.services[3]),
        [(Some("portal-ro".to_string()), 7000)]
    );
    let c = children(&orders().patch_spec("readOnly: {enabled: false}"));
    assert_eq!(c.services.len(), 3);
    assert_eq!(ports(&c.services[1]).len(), 1);
}

#[test]
fn a_read_only_port_that_clashes_is_invalid_naming_the_field() {
    let dp = orders().patch_spec("readOnly: {port: 6379}");
    assert_eq!(invalid_fields(&dp), ["readOnly.port"]);
    let dp = orders().patch_spec("engine: tcp\nport: 7000\nreadOnly: {}");
    assert_eq!(invalid_fields(&dp), ["readOnly"]);
}

#[test]
fn status_reports_the_read_only_endpoint_and_who_serves_it() {
    use crate::portals::Aggregate;

    let dp = orders().patch_spec("readOnly: {}").with_generation(1);
    let obs = Observation {
        ready_portals: 2,
        degraded: vec![],
        portals: None,
    }
    .with_portals(Aggregate {
        ready_portals: 2,
        leader: "orders-0".into(),
        reads: vec!["orders-1".into()],
        ..Default::default()
    });
    let s = status::reconciled(&dp, 6379, &obs, Timestamp::now());
    let ro = s.read_only.clone().expect("status.readOnly");
    assert_eq!(ro.endpoint, "orders-portal-ro.shop.svc:6380");
    assert_eq!(
        (ro.serving, ro.summary.as_str()),
        (vec!["orders-1".to_string()], "orders-1")
    );

    // Without a view of the Pods, the last one is kept; without readOnly, none.
    let mut dp2 = dp.clone();
    dp2.status = Some(s);
    let obs = Observation {
        ready_portals: 2,
        degraded: vec![],
        portals: None,
    };
    let s = status::reconciled(&dp2, 6379, &obs, Timestamp::now());
    assert_eq!(s.read_only.unwrap().summary, "orders-1");
    assert!(status::reconciled(&orders(), 6379, &obs, Timestamp::now())
        .read_only
        .is_none());
    let crd = crate::crd_yaml();
    assert!(crd.contains(".status.readOnly.summary"), "a printer column");
}
