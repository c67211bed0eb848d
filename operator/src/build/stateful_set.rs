//! `build::stateful_set`: the StatefulSet of the portal pods and its pod template, the
//! largest child `build` makes.
//!
//! May import: `names` (it is part of `build`, and may import what `build` may).

use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext,
    TopologySpreadConstraint, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{default_resources, tls_secret_name, Builder, ADMIN_PORT, ADMIN_TOKEN_DIR, CONTAINER};
use crate::names::{self, labels, selector_labels};

/// UID the portal runs as (the image is static and needs no user database).
const PORTAL_UID: i64 = 65532;

impl Builder<'_> {
    /// The pod template depends only on what needs new pods (image, resources, ports, TLS
    /// source, credentials Secret, service account), never on the configuration the portal
    /// reloads live.
    pub(super) fn stateful_set(&self) -> StatefulSet {
        let name = self.name();
        let spec = &self.dp.spec;
        let image = if spec.portal.image.is_empty() {
            self.settings.portal_image.clone()
        } else {
            spec.portal.image.clone()
        };
        let mut args = vec!["--configmap".to_string(), names::portal(name)];
        if let Some(secret) = tls_secret_name(self.dp) {
            args.extend(["--tls-secret".to_string(), secret]);
        }
        // The portal watches the one credentials Secret it was started with.
        if let Some(secret) = &spec.health_check.credentials_secret {
            args.extend(["--credentials-secret".to_string(), secret.clone()]);
        }
        // And the one users Secret of Redis multiplexing.
        if let Some(secret) = super::users_secret(self.dp) {
            args.extend(["--users-secret".to_string(), secret]);
        }
        // The DatabasePortal's own choice, else the operator's; a change rolls the pods.
        let level = Some(spec.portal.log_level.as_str())
            .filter(|l| !l.is_empty())
            .or(self.settings.portal_log_level.as_deref());
        if let Some(level) = level {
            args.extend(["--log-level".to_string(), level.to_string()]);
        }
        if let Some(format) = spec.portal.log_format.or(self.settings.portal_log_format) {
            args.extend(["--log-format".to_string(), format.as_str().to_string()]);
        }
        let field_env = |env: &str, path: &str| EnvVar {
            name: env.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let probe = |path: &str, period: i32, failures: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::String("admin".into()),
                ..Default::default()
            }),
            period_seconds: Some(period),
            failure_threshold: Some(failures),
            timeout_seconds: Some(1),
            ..Default::default()
        };
        let drain = spec
            .drain_timeout
            .map(|d| d.get().as_secs() as i64)
            .unwrap_or(30);
        let container = Container {
            name: CONTAINER.into(),
            image: Some(image),
            args: Some(args),
            env: Some(vec![
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
            ]),
            ports: Some(
                self.listener_ports()
                    .into_iter()
                    .map(|(port_name, port)| ContainerPort {
                        name: Some(port_name.into()),
                        container_port: port.into(),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .chain([ContainerPort {
                        name: Some("admin".into()),
                        container_port: ADMIN_PORT.into(),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    }])
                    .collect(),
            ),
            readiness_probe: Some(probe("/readyz", 2, 2)),
            liveness_probe: Some(probe("/healthz", 10, 3)),
            resources: Some(
                spec.portal
                    .resources
                    .clone()
                    .unwrap_or_else(default_resources),
            ),
            volume_mounts: Some(vec![VolumeMount {
                name: "admin-token".into(),
                mount_path: ADMIN_TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }]),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let selector = selector_labels(name);
        let pod = PodSpec {
            service_account_name: Some(names::portal(name)),
            automount_service_account_token: Some(true),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(drain + 5),
            containers: vec![container],
            volumes: Some(vec![Volume {
                name: "admin-token".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(names::admin_secret(name)),
                    default_mode: Some(0o444),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(PORTAL_UID),
                run_as_group: Some(PORTAL_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            // Preferred, not required: a single-node cluster still runs every portal.
            affinity: Some(Affinity {
                pod_anti_affinity: Some(PodAntiAffinity {
                    preferred_during_scheduling_ignored_during_execution: Some(vec![
                        WeightedPodAffinityTerm {
                            weight: 100,
                            pod_affinity_term: PodAffinityTerm {
                                topology_key: "kubernetes.io/hostname".into(),
                                label_selector: Some(LabelSelector {
                                    match_labels: Some(selector.clone()),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            },
                        },
                    ]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                max_skew: 1,
                topology_key: "topology.kubernetes.io/zone".into(),
                when_unsatisfiable: "ScheduleAnyway".into(),
                label_selector: Some(LabelSelector {
                    match_labels: Some(selector.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        StatefulSet {
            metadata: self.meta(names::portal(name)),
            spec: Some(StatefulSetSpec {
                replicas: Some(self.replicas()),
                service_name: Some(names::portal(name)),
                // Pods start together; updates still replace one pod at a time, each waiting
                // for the previous one to be ready.
                pod_management_policy: Some("Parallel".into()),
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateStatefulSetStrategy {
                        partition: Some(0),
                        ..Default::default()
                    }),
                }),
                selector: LabelSelector {
                    match_labels: Some(selector),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels(name)),
                        ..Default::default()
                    }),
                    spec: Some(pod),
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
