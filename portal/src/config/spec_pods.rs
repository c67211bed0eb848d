//! The portal pods of the `DatabasePortal` spec (`spec.portal`): how many, their image and
//! resources, the type of their Services, their logs.
//!
//! May import: nothing outside `config`.

use k8s_openapi::api::core::v1::ResourceRequirements;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The portal pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortalPods {
    /// Number of portal pods, each with its own Service and connection string. Default 2.
    #[serde(default = "PortalPods::default_replicas")]
    #[schemars(range(min = 1, max = 8))]
    pub replicas: i32,
    /// Portal image; default: the operator's own matching portal image.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// Compute resources of the portal container. Default: requests cpu 50m, memory 64Mi;
    /// limit memory 64Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Type of the portal Services: ClusterIP (default), NodePort or LoadBalancer.
    #[serde(default)]
    pub service_type: ServiceType,
    /// Log level of the portals, a tracing filter: `info`, `debug`, `warn,portal=debug`.
    /// Default: the operator's `--portal-log-level`, else info.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log_level: String,
    /// Log format of the portals: text or json (one JSON object per line). Default: the
    /// operator's `--portal-log-format`, else text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// One log line per closed session (client, backend, duration, bytes each way, close
    /// reason), at info, in the log format above. Default true.
    #[serde(
        default = "PortalPods::default_access_log",
        skip_serializing_if = "PortalPods::is_default_access_log"
    )]
    pub access_log: bool,
}

/// Format of log lines: text (human-readable, coloured only on a terminal) or json (one
/// JSON object per line).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl PortalPods {
    fn default_replicas() -> i32 {
        2
    }
    fn default_access_log() -> bool {
        true
    }
    fn is_default_access_log(on: &bool) -> bool {
        *on
    }
}

impl Default for PortalPods {
    fn default() -> Self {
        PortalPods {
            replicas: Self::default_replicas(),
            image: String::new(),
            resources: None,
            service_type: ServiceType::default(),
            log_level: String::new(),
            log_format: None,
            access_log: true,
        }
    }
}

/// Type of the portal Services.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}
