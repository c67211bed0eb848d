//! `names`: the names the operator and the DatabasePortal contract fix, in one place: the
//! field manager of every write, the four labels every child carries, and the children's
//! names.
//!
//! May import: nothing of the crate.

use std::collections::BTreeMap;

/// Field manager of every server-side apply the operator makes (children and status), and
/// the reporting controller of its events.
pub const MANAGER: &str = "dbportal-operator";

/// Label naming the application: always [`APP`].
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Label naming the DatabasePortal a child belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label naming the part of the application: always [`COMPONENT`].
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label naming who manages a child: always [`MANAGER`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`NAME_LABEL`].
pub const APP: &str = "dbportal";
/// Value of [`COMPONENT_LABEL`].
pub const COMPONENT: &str = "portal";

/// The four labels every child carries.
pub fn labels(instance: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(instance);
    labels.insert(MANAGED_BY_LABEL.into(), MANAGER.into());
    labels
}

/// The labels that select one DatabasePortal's portal pods.
pub fn selector_labels(instance: &str) -> BTreeMap<String, String> {
    [
        (NAME_LABEL, APP),
        (INSTANCE_LABEL, instance),
        (COMPONENT_LABEL, COMPONENT),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Label selector for every child of DatabasePortal `instance`.
pub fn children_selector(instance: &str) -> String {
    labels(instance)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Label selector for every child the operator made, of any DatabasePortal.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGER}")
}

/// ConfigMap, StatefulSet, Service for all portals, ServiceAccount, Role, RoleBinding,
/// Certificate and PodDisruptionBudget of DatabasePortal `name`.
pub fn portal(name: &str) -> String {
    format!("{name}-portal")
}

/// The Service of the read-only listener of every portal (`spec.readOnly`).
pub fn portal_ro(name: &str) -> String {
    format!("{name}-portal-ro")
}

/// Pod `i` of DatabasePortal `name` and its own Service.
pub fn portal_pod(name: &str, i: i32) -> String {
    format!("{name}-portal-{i}")
}

/// The Secret cert-manager, or the operator's own CA, writes.
pub fn tls_secret(name: &str) -> String {
    format!("{name}-portal-tls")
}

/// The operator's own CA for the DatabasePortal, when it names no certificate source.
pub fn ca_secret(name: &str) -> String {
    format!("{name}-portal-ca")
}

/// The Secret holding the bearer token of the portals' admin endpoint (key `token`).
pub fn admin_secret(name: &str) -> String {
    format!("{name}-portal-admin")
}
