//! dbportal's operator: reconciles each DatabasePortal into its portal pods, Services,
//! ConfigMap, Certificate, RBAC and PodDisruptionBudget, and reports status.

pub use portal::config::{DatabasePortal, DatabasePortalSpec, DatabasePortalStatus};

/// The CRD as YAML, exactly as committed in `crds/databaseportal.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&DatabasePortal::crd()).expect("the CRD serializes")
}
