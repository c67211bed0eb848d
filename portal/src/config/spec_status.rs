//! The status of a `DatabasePortal`, as the operator writes it: the leader the ready portals
//! agree on, the endpoints, the read-only endpoint and who serves it, each portal's own report
//! and the conditions.
//!
//! May import: nothing outside `config`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// What the operator reports about a DatabasePortal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabasePortalStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The backend that the ready portals agree leads ("" when none).
    #[serde(default)]
    pub leader: String,
    /// Number of portal pods that are ready.
    #[serde(default)]
    pub ready_portals: i32,
    /// Ready portals over desired portals, as "2/2".
    #[serde(default)]
    pub ready: String,
    /// One connection string per portal Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// With `spec.readOnly`: the read-only endpoint and the backends serving it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<ReadOnlyStatus>,
    /// What each portal reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub portals: Vec<PortalReport>,
    /// Ready, and Degraded with a reason (LeaderDisagreement, NoHealthyBackend,
    /// CertificateNotReady, CertManagerMissing, InvalidSpec, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The read-only connection string (`spec.readOnly`) and who serves it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadOnlyStatus {
    /// The Service `<name>-portal-ro`, as host:port.
    pub endpoint: String,
    /// The backends every ready portal sends reads to: the replicas within
    /// `readOnly.maxLag`, or the leader when none is and `fallbackToLeader` allows (empty when
    /// no backend takes reads).
    #[serde(default)]
    pub serving: Vec<String>,
    /// The same, comma-separated ("" when none), for `kubectl get`.
    #[serde(default)]
    pub summary: String,
}

/// One portal's own view.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct PortalReport {
    /// Name of the portal pod.
    pub name: String,
    /// Whether the portal is ready (has a configuration and a routable backend).
    #[serde(default)]
    pub ready: bool,
    /// The leader this portal sees ("" when none).
    #[serde(default)]
    pub leader: String,
    /// Why the portal is not ready, or what else is wrong with it ("" when nothing).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The backends this portal gives no new sessions to by administrative state (drain or
    /// maint, from `spec.backends[].state` or the portal's admin endpoint); ready ones are not
    /// listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<PortalBackendState>,
}

/// A backend's administrative state as one portal applies it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct PortalBackendState {
    /// Name of the backend.
    pub name: String,
    /// drain or maint.
    pub state: String,
}

/// Conditions as a list keyed by type, so server-side apply merges them by type.
fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}
