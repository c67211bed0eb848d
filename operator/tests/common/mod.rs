//! The local control plane the portal's tests use too (one file for both), and helpers to
//! install the CRD and grant the operator exactly the chart's RBAC.
#![allow(dead_code)]

#[path = "../../../portal/tests/common/control_plane.rs"]
mod control_plane;
pub use control_plane::{eventually, repo_root, ControlPlane};

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

pub const OPERATOR_NAMESPACE: &str = "dbportal-system";
pub const OPERATOR_SA: &str = "dbportal-operator";

/// Creates a CRD through the API (as `kubectl create --validate=false` would) and waits until
/// it is established.
pub async fn install_crd(admin: &Client, crd: CustomResourceDefinition) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let name = crd.metadata.name.clone().unwrap();
    api.create(&PostParams::default(), &crd).await?;
    eventually("CRD established", Duration::from_secs(30), || async {
        let crd = api.get(&name).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        anyhow::ensure!(established, "not established");
        Ok(())
    })
    .await
}

/// Creates the namespace unless it exists.
pub async fn create_namespace(admin: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(admin.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        r => r.map(|_| ()).map_err(Into::into),
    }
}

fn rules(file: &str) -> anyhow::Result<Vec<PolicyRule>> {
    let path = repo_root().join("charts/dbportal/files").join(file);
    Ok(serde_norway::from_str(&std::fs::read_to_string(path)?)?)
}

/// Grants the operator identity exactly the chart's ClusterRole and leader-election Role.
pub async fn grant_chart_rbac(admin: &Client) -> anyhow::Result<()> {
    let pp = PostParams::default();
    let meta = |name: &str, ns: Option<&str>| ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        ..Default::default()
    };
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: OPERATOR_SA.into(),
        namespace: Some(OPERATOR_NAMESPACE.into()),
        ..Default::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .create(
            &pp,
            &ClusterRole {
                metadata: meta(OPERATOR_SA, None),
                rules: Some(rules("clusterrole-rules.yaml")?),
                ..Default::default()
            },
        )
        .await?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(
            &pp,
            &ClusterRoleBinding {
                metadata: meta(OPERATOR_SA, None),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: OPERATOR_SA.into(),
                },
                subjects: Some(vec![subject.clone()]),
            },
        )
        .await?;
    let le = format!("{OPERATOR_SA}-leader-election");
    Api::<Role>::namespaced(admin.clone(), OPERATOR_NAMESPACE)
        .create(
            &pp,
            &Role {
                metadata: meta(&le, Some(OPERATOR_NAMESPACE)),
                rules: Some(rules("leader-election-rules.yaml")?),
            },
        )
        .await?;
    Api::<RoleBinding>::namespaced(admin.clone(), OPERATOR_NAMESPACE)
        .create(
            &pp,
            &RoleBinding {
                metadata: meta(&le, Some(OPERATOR_NAMESPACE)),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: le.clone(),
                },
                subjects: Some(vec![subject]),
            },
        )
        .await?;
    Ok(())
}

/// CRD, operator namespace and RBAC: what `helm install` would set up.
pub async fn install(admin: &Client) -> anyhow::Result<()> {
    use kube::CustomResourceExt;
    install_crd(admin, operator::DatabasePortal::crd()).await?;
    create_namespace(admin, OPERATOR_NAMESPACE).await?;
    grant_chart_rbac(admin).await
}

/// cert-manager's Certificate CRD, from the test fixture.
pub fn cert_manager_crd() -> anyhow::Result<CustomResourceDefinition> {
    let path = repo_root().join("operator/tests/fixtures/cert-manager.io_certificates.yaml");
    Ok(serde_norway::from_str(&std::fs::read_to_string(path)?)?)
}
