//! `build`: turns a validated DatabasePortal into every child object, without touching the
//! network. Names and labels follow the DatabasePortal contract (README). The StatefulSet and
//! its pod template, the largest child, are in `build/stateful_set.rs`.
//!
//! May import: `error`, `names`, `certificate`, `self_signed`, `validate`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, ResourceRequirements, Service, ServiceAccount, ServicePort, ServiceSpec,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use portal::config::{DatabasePortal, DatabasePortalSpec, IssuerKind, LogFormat, TlsMode};

use crate::certificate::{Certificate, CertificateIssuerRef, CertificateSpec, SecretTemplate};
use crate::error::{Error, Result};
use crate::names::{self, labels, selector_labels, MANAGER, NAME_LABEL};
use crate::self_signed::SelfSigned;
use crate::validate::Validated;

mod stateful_set;

/// ConfigMap key holding the portal configuration.
pub const CONFIG_KEY: &str = "portal.yaml";
/// Port of the portal's HTTP admin endpoint (`/healthz`, `/readyz`, `/metrics`, `/status`).
pub const ADMIN_PORT: u16 = 8404;
/// Where the portal container finds the admin token (the Secret `<name>-portal-admin`,
/// mounted read-only; the kubelet refreshes it when the Secret changes).
pub const ADMIN_TOKEN_DIR: &str = "/var/run/dbportal/admin";
/// The file in [`ADMIN_TOKEN_DIR`] and the key of the Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";
/// Name of the read-only listener's port on the portal container and its Services.
pub const READ_ONLY_PORT_NAME: &str = "portal-ro";
/// Label the StatefulSet controller puts on each pod, used by the per-portal Services.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// Name of the portal container.
pub const CONTAINER: &str = "portal";

/// What `build` needs from the operator's own settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Portal image used when `spec.portal.image` is empty.
    pub portal_image: String,
    /// Portal log level when `spec.portal.logLevel` is empty; `None`: the portal's default.
    pub portal_log_level: Option<String>,
    /// Portal log format when `spec.portal.logFormat` is absent; `None`: the portal's default.
    pub portal_log_format: Option<LogFormat>,
    /// Make a NetworkPolicy per DatabasePortal (`--network-policy`).
    pub network_policy: bool,
    /// Pods (any namespace) allowed to reach the admin port (`--admin-allowed-from`).
    pub admin_allowed_from: BTreeMap<String, String>,
}

impl Settings {
    /// The portal image published with this operator's version.
    pub fn default_portal_image() -> String {
        format!("ghcr.io/dbportal/portal:{}", env!("CARGO_PKG_VERSION"))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            portal_image: Self::default_portal_image(),
            portal_log_level: None,
            portal_log_format: None,
            network_policy: true,
            admin_allowed_from: [(NAME_LABEL.to_string(), "prometheus".to_string())].into(),
        }
    }
}

/// Every child of one DatabasePortal. `apply` names each field, so none is forgotten.
#[derive(Clone, Debug)]
pub struct Children {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub stateful_set: StatefulSet,
    /// The Service for all portals first, then one per portal, then with `spec.readOnly` the
    /// read-only Service for all portals (`<name>-portal-ro`).
    pub services: Vec<Service>,
    /// Only when TLS is terminated with a cert-manager issuer.
    pub certificate: Option<Certificate>,
    /// Only when TLS is terminated with neither an issuer nor a Secret: the operator's own CA
    /// and certificate (see `self_signed`).
    pub self_signed: Option<SelfSigned>,
    /// Typed as policy/v1; applied as whichever policy version the server serves.
    pub pdb: PodDisruptionBudget,
    /// Who may reach the portal pods' ports; `None` when `--network-policy=false`.
    pub network_policy: Option<NetworkPolicy>,
    /// The Secret of the admin endpoint's bearer token: its name and owner; the token itself
    /// is made once by `apply` and kept.
    pub admin_secret: ObjectMeta,
}

/// The TLS Secret the portal serves, if it terminates TLS.
pub fn tls_secret_name(dp: &DatabasePortal) -> Option<String> {
    let tls = &dp.spec.tls;
    match tls.mode {
        TlsMode::Terminate if !tls.secret_name.is_empty() => Some(tls.secret_name.clone()),
        // From cert-manager, or from the operator's own CA.
        TlsMode::Terminate => Some(names::tls_secret(&dp.name())),
        _ => None,
    }
}

trait NameOf {
    fn name(&self) -> String;
}
impl NameOf for DatabasePortal {
    fn name(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
}

/// Every child object of `dp`.
pub fn build(dp: &DatabasePortal, valid: &Validated, settings: &Settings) -> Result<Children> {
    let owner = dp
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let b = Builder {
        dp,
        valid,
        settings,
        owner,
    };
    Ok(Children {
        config_map: b.config_map()?,
        service_account: ServiceAccount {
            metadata: b.meta(names::portal(&valid.name)),
            ..Default::default()
        },
        role: b.role(),
        role_binding: b.role_binding(),
        stateful_set: b.stateful_set(),
        services: b.services(),
        certificate: b.certificate(),
        self_signed: b.self_signed(),
        pdb: b.pdb(),
        network_policy: settings.network_policy.then(|| b.network_policy()),
        admin_secret: b.meta(names::admin_secret(&valid.name)),
    })
}

struct Builder<'a> {
    dp: &'a DatabasePortal,
    valid: &'a Validated,
    settings: &'a Settings,
    owner: OwnerReference,
}

impl Builder<'_> {
    fn name(&self) -> &str {
        &self.valid.name
    }

    fn meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.valid.namespace.clone()),
            labels: Some(labels(self.name())),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    fn replicas(&self) -> i32 {
        self.dp.spec.portal.replicas
    }

    /// The portals a PostgreSQL cancel may need to reach (session and transaction pooling):
    /// every portal's own Service.
    fn peers(&self) -> Vec<portal::config::Peer> {
        if self.valid.config.plane.pg_pool().is_none() {
            return Vec::new();
        }
        (0..self.replicas())
            .map(|i| {
                let name = names::portal_pod(self.name(), i);
                portal::config::Peer {
                    address: format!(
                        "{name}.{}.svc:{}",
                        self.valid.namespace, self.valid.config.port
                    ),
                    name,
                }
            })
            .collect()
    }

    fn config_map(&self) -> Result<ConfigMap> {
        let text =
            portal_yaml(&self.dp.spec, self.valid.config.port, self.peers()).map_err(|e| {
                Error::Serialize {
                    kind: "ConfigMap",
                    message: e.to_string(),
                }
            })?;
        let header = format!(
            "# Written by {MANAGER} from DatabasePortal {}/{}; edit the DatabasePortal instead.\n",
            self.valid.namespace,
            self.name()
        );
        Ok(ConfigMap {
            metadata: self.meta(names::portal(self.name())),
            data: Some([(CONFIG_KEY.to_string(), header + &text)].into()),
            ..Default::default()
        })
    }

    fn role(&self) -> Role {
        let name = self.name();
        let mut secrets: Vec<String> = tls_secret_name(self.dp).into_iter().collect();
        if let Some(creds) = &self.dp.spec.health_check.credentials_secret {
            if !secrets.contains(creds) {
                secrets.push(creds.clone());
            }
        }
        if let Some(users) = users_secret(self.dp) {
            if !secrets.contains(&users) {
                secrets.push(users);
            }
        }
        let rule = |resource: &str, verbs: &[&str], names: Vec<String>| PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec![resource.to_string()]),
            resource_names: Some(names),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            ..Default::default()
        };
        let mut rules = vec![rule(
            "configmaps",
            &["get", "list", "watch"],
            vec![names::portal(name)],
        )];
        if !secrets.is_empty() {
            rules.push(rule("secrets", &["get", "list", "watch"], secrets));
        }
        // Each portal reports its own view on its own Pod.
        rules.push(rule(
            "pods",
            &["get", "patch"],
            (0..self.replicas())
                .map(|i| names::portal_pod(name, i))
                .collect(),
        ));
        Role {
            metadata: self.meta(names::portal(name)),
            rules: Some(rules),
        }
    }

    fn role_binding(&self) -> RoleBinding {
        let name = names::portal(self.name());
        RoleBinding {
            metadata: self.meta(name.clone()),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: name.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name,
                namespace: Some(self.valid.namespace.clone()),
                ..Default::default()
            }]),
        }
    }

    /// The ports of the portal container and its Services: the main listener, then the
    /// read-only one (`spec.readOnly`); (name, port).
    fn listener_ports(&self) -> Vec<(&'static str, u16)> {
        let mut ports = vec![("portal", self.valid.config.port)];
        if let Some(ro) = &self.valid.config.read_only {
            ports.push((READ_ONLY_PORT_NAME, ro.port));
        }
        ports
    }

    fn services(&self) -> Vec<Service> {
        let service = |name: String, pod: Option<String>, ports: &[(&str, u16)]| {
            let mut selector = selector_labels(self.name());
            if let Some(pod) = pod {
                selector.insert(POD_NAME_LABEL.into(), pod);
            }
            Service {
                metadata: self.meta(name),
                spec: Some(ServiceSpec {
                    type_: Some(self.dp.spec.portal.service_type.as_str().into()),
                    selector: Some(selector),
                    ports: Some(
                        ports
                            .iter()
                            .map(|&(port_name, port)| ServicePort {
                                name: Some(port_name.into()),
                                protocol: Some("TCP".into()),
                                port: port.into(),
                                target_port: Some(IntOrString::String(port_name.into())),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        let all = self.listener_ports();
        let main = &all[..1];
        let mut services: Vec<Service> =
            std::iter::once(service(names::portal(self.name()), None, main))
                .chain((0..self.replicas()).map(|i| {
                    let pod = names::portal_pod(self.name(), i);
                    service(pod.clone(), Some(pod), &all)
                }))
                .collect();
        if all.len() > 1 {
            services.push(service(names::portal_ro(self.name()), None, &all[1..]));
        }
        services
    }

    /// Every portal Service's names (short, with namespace, `.svc`, `.svc.cluster.local`),
    /// then `tls.dnsNames`.
    fn dns_names(&self) -> Vec<String> {
        let mut dns_names = Vec::new();
        for service in self.services() {
            let short = service.metadata.name.unwrap_or_default();
            let ns = &self.valid.namespace;
            for name in [
                short.clone(),
                format!("{short}.{ns}"),
                format!("{short}.{ns}.svc"),
                format!("{short}.{ns}.svc.cluster.local"),
            ] {
                if !dns_names.contains(&name) {
                    dns_names.push(name);
                }
            }
        }
        for extra in &self.dp.spec.tls.dns_names {
            if !dns_names.contains(extra) {
                dns_names.push(extra.clone());
            }
        }
        dns_names
    }

    fn self_signed(&self) -> Option<SelfSigned> {
        let tls = &self.dp.spec.tls;
        if tls.mode != TlsMode::Terminate || tls.issuer_ref.is_some() || !tls.secret_name.is_empty()
        {
            return None;
        }
        let mut dns_names = self.dns_names();
        // The Service for all portals, fully qualified within the cluster, names the
        // certificate.
        if let Some(i) = dns_names.iter().position(|n| n.ends_with(".svc")) {
            let first = dns_names.remove(i);
            dns_names.insert(0, first);
        }
        Some(SelfSigned {
            ca_secret: self.meta(names::ca_secret(self.name())),
            tls_secret: self.meta(names::tls_secret(self.name())),
            ca_name: format!("{}/{} dbportal CA", self.valid.namespace, self.name()),
            dns_names,
        })
    }

    fn certificate(&self) -> Option<Certificate> {
        let tls = &self.dp.spec.tls;
        let issuer = match (&tls.mode, &tls.issuer_ref) {
            (TlsMode::Terminate, Some(issuer)) if tls.secret_name.is_empty() => issuer,
            _ => return None,
        };
        let dns_names = self.dns_names();
        Some(Certificate {
            metadata: self.meta(names::portal(self.name())),
            spec: CertificateSpec {
                secret_name: names::tls_secret(self.name()),
                dns_names,
                issuer_ref: CertificateIssuerRef {
                    name: issuer.name.clone(),
                    kind: Some(
                        match issuer.kind {
                            IssuerKind::Issuer => "Issuer",
                            IssuerKind::ClusterIssuer => "ClusterIssuer",
                        }
                        .into(),
                    ),
                    group: Some(
                        issuer
                            .group
                            .clone()
                            .unwrap_or_else(|| "cert-manager.io".into()),
                    ),
                },
                secret_template: Some(SecretTemplate {
                    labels: labels(self.name()),
                }),
            },
            status: None,
        })
    }

    /// The database ports (the main listener's and the read-only one's) are open to every
    /// client (the portal's own allow-list decides, on the address it sees); the admin port only to the scrapers named by the operator's settings.
    /// Traffic from the pod's own node (the kubelet's probes) is always allowed by
    /// NetworkPolicy, so readiness and liveness probes keep working.
    fn network_policy(&self) -> NetworkPolicy {
        let port = |p: u16| NetworkPolicyPort {
            port: Some(IntOrString::Int(i32::from(p))),
            protocol: Some("TCP".into()),
            ..Default::default()
        };
        NetworkPolicy {
            metadata: self.meta(names::portal(self.name())),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(self.name())),
                    ..Default::default()
                }),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![
                    NetworkPolicyIngressRule {
                        ports: Some(
                            self.listener_ports()
                                .into_iter()
                                .map(|(_, p)| port(p))
                                .collect(),
                        ),
                        from: None,
                    },
                    NetworkPolicyIngressRule {
                        ports: Some(vec![port(ADMIN_PORT)]),
                        from: Some(vec![NetworkPolicyPeer {
                            namespace_selector: Some(LabelSelector::default()),
                            pod_selector: Some(LabelSelector {
                                match_labels: Some(self.settings.admin_allowed_from.clone()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }]),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn pdb(&self) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: self.meta(names::portal(self.name())),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector_labels(self.name())),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Requests cpu 50m, memory 64Mi; limit memory 64Mi.
pub fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_string(), Quantity("50m".into())),
                ("memory".to_string(), Quantity("64Mi".into())),
            ]
            .into(),
        ),
        limits: Some([("memory".to_string(), Quantity("64Mi".into()))].into()),
        ..Default::default()
    }
}

/// The Secret with the users clients log in as (Redis multiplexing's AUTH, PostgreSQL session
/// and transaction pooling), if the spec names one.
pub fn users_secret(dp: &DatabasePortal) -> Option<String> {
    use portal::config::PoolingMode;
    dp.spec
        .pooling
        .as_ref()
        .filter(|p| {
            matches!(
                p.mode,
                PoolingMode::Multiplex | PoolingMode::Session | PoolingMode::Transaction
            )
        })
        .and_then(|p| p.auth.users_secret.clone())
}

/// The portal's configuration file: the spec plus what an in-cluster portal needs
/// (`listen`, `admin`, `adminTokenFile`, `peers`). `portal::config::parse_yaml` reads it back
/// to the same spec.
pub fn portal_yaml(
    spec: &DatabasePortalSpec,
    port: u16,
    peers: Vec<portal::config::Peer>,
) -> Result<String, serde_norway::Error> {
    let mut spec = spec.clone();
    spec.peers = peers;
    spec.listen = Some(format!("0.0.0.0:{port}"));
    spec.admin = Some(format!("0.0.0.0:{ADMIN_PORT}"));
    spec.admin_token_file = Some(format!("{ADMIN_TOKEN_DIR}/{ADMIN_TOKEN_KEY}"));
    serde_norway::to_string(&spec)
}
