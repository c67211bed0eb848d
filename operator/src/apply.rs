//! `apply`: server-side apply of every child with one field manager, and removal of the
//! children the spec no longer needs (found by label, confirmed by owner).

use std::fmt::Debug;

use futures::future::try_join_all;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Client, Resource, ResourceExt};
use serde::{de::DeserializeOwned, Serialize};
use tracing::{debug, info};

use crate::build::{children_selector, Children, MANAGER};
use crate::certificate::Certificate;
use crate::error::api_code;
use crate::{Error, Result};

/// Which optional APIs the server serves, found once at start.
#[derive(Clone, Debug, Default)]
pub struct ApiSupport {
    /// policy/v1 PodDisruptionBudget, or policy/v1beta1 on servers older than 1.21;
    /// `None` when neither is served.
    pub pdb: Option<ApiResource>,
}

impl ApiSupport {
    /// Asks the server which PodDisruptionBudget version it serves (newest first).
    pub async fn discover(client: &Client) -> Result<Self, kube::Error> {
        for version in ["v1", "v1beta1"] {
            match client
                .list_api_group_resources(&format!("policy/{version}"))
                .await
            {
                Ok(list)
                    if list
                        .resources
                        .iter()
                        .any(|r| r.name == "poddisruptionbudgets") =>
                {
                    info!(version, "PodDisruptionBudgets served as policy/{version}");
                    return Ok(ApiSupport {
                        pdb: Some(pdb_resource(version)),
                    });
                }
                Ok(_) => {}
                Err(e) if api_code(&e) == Some(404) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ApiSupport { pdb: None })
    }
}

/// The PodDisruptionBudget resource in policy `version`.
pub fn pdb_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", version, "PodDisruptionBudget"),
        "poddisruptionbudgets",
    )
}

/// What became of the Certificate.
#[derive(Clone, Debug)]
pub enum CertificateState {
    /// TLS does not use cert-manager.
    NotNeeded,
    /// The cert-manager.io/v1 Certificate API is not served (cert-manager not installed).
    CrdMissing,
    /// Applied; as the server returned it (with status).
    Applied(Box<Certificate>),
}

/// What the server returned from an apply, for the status.
#[derive(Clone, Debug)]
pub struct Applied {
    pub stateful_set: StatefulSet,
    pub certificate: CertificateState,
    /// The server serves no PodDisruptionBudget API, so none was made.
    pub pdb_skipped: bool,
}

fn params() -> PatchParams {
    // Force: fields someone edited by hand are taken back.
    PatchParams::apply(MANAGER).force()
}

async fn ssa<K>(client: &Client, namespace: &str, object: &K) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.name_any();
    api.patch(&name, &params(), &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply {
            kind: K::kind(&()).to_string(),
            name,
            source,
        })
}

/// Applies every child of one DatabasePortal and removes the ones it no longer needs.
pub async fn apply(
    client: &Client,
    support: &ApiSupport,
    owner_uid: &str,
    children: &Children,
) -> Result<Applied> {
    let ns = children
        .config_map
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let ns = ns.as_str();
    let Children {
        config_map,
        service_account,
        role,
        role_binding,
        stateful_set,
        services,
        certificate,
        pdb,
    } = children;

    // Independent objects, applied concurrently; the StatefulSet controller retries pods
    // whose ServiceAccount is not there yet.
    let rbac = async {
        ssa(client, ns, service_account).await?;
        ssa(client, ns, role).await?;
        ssa(client, ns, role_binding).await
    };
    let services_applied = try_join_all(services.iter().map(|s| ssa(client, ns, s)));
    let pdb_applied = async {
        let Some(resource) = &support.pdb else {
            return Ok(true);
        };
        let mut value = serde_json::to_value(pdb).map_err(|e| Error::Serialize {
            kind: "PodDisruptionBudget",
            message: e.to_string(),
        })?;
        value["apiVersion"] = resource.api_version.clone().into();
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
        let name = pdb.name_any();
        api.patch(&name, &params(), &Patch::Apply(&value))
            .await
            .map_err(|source| Error::Apply {
                kind: "PodDisruptionBudget".into(),
                name,
                source,
            })?;
        Ok(false)
    };
    let certificate_applied = async {
        match certificate {
            None => {
                remove_orphan_certificates(client, ns, owner_uid, config_map.labels()).await?;
                Ok(CertificateState::NotNeeded)
            }
            Some(cert) => match ssa(client, ns, cert).await {
                Ok(applied) => Ok(CertificateState::Applied(Box::new(applied))),
                Err(e) if e.api_code() == Some(404) => Ok(CertificateState::CrdMissing),
                Err(e) => Err(e),
            },
        }
    };
    let (_, _, stateful_set, applied_services, pdb_skipped, certificate) = futures::try_join!(
        ssa(client, ns, config_map),
        rbac,
        ssa(client, ns, stateful_set),
        services_applied,
        pdb_applied,
        certificate_applied,
    )?;
    remove_orphan_services(
        client,
        ns,
        owner_uid,
        &applied_services,
        config_map.labels(),
    )
    .await?;
    Ok(Applied {
        stateful_set,
        certificate,
        pdb_skipped,
    })
}

fn instance(labels: &std::collections::BTreeMap<String, String>) -> &str {
    labels
        .get("app.kubernetes.io/instance")
        .map(String::as_str)
        .unwrap_or_default()
}

fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Per-portal Services above `replicas` (after the spec shrank).
async fn remove_orphan_services(
    client: &Client,
    ns: &str,
    owner_uid: &str,
    wanted: &[Service],
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let cleanup = |source| Error::Cleanup {
        kind: "Service",
        source,
    };
    let lp = ListParams::default().labels(&children_selector(instance(labels)));
    let existing = api.list_metadata(&lp).await.map_err(cleanup)?;
    for svc in existing {
        let name = svc.name_any();
        if owned_by(&svc.metadata, owner_uid) && !wanted.iter().any(|w| w.name_any() == name) {
            info!(service = %name, "removing Service the spec no longer needs");
            delete(&api, &name).await.map_err(cleanup)?;
        }
    }
    Ok(())
}

/// A Certificate left from when TLS used cert-manager.
async fn remove_orphan_certificates(
    client: &Client,
    ns: &str,
    owner_uid: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let api: Api<Certificate> = Api::namespaced(client.clone(), ns);
    let cleanup = |source| Error::Cleanup {
        kind: "Certificate",
        source,
    };
    let lp = ListParams::default().labels(&children_selector(instance(labels)));
    let existing = match api.list_metadata(&lp).await {
        Ok(list) => list,
        // cert-manager is not installed, so there is nothing to remove.
        Err(e) if api_code(&e) == Some(404) => return Ok(()),
        Err(e) => return Err(cleanup(e)),
    };
    for cert in existing {
        if owned_by(&cert.metadata, owner_uid) {
            info!(certificate = %cert.name_any(), "removing Certificate the spec no longer needs");
            delete(&api, &cert.name_any()).await.map_err(cleanup)?;
        }
    }
    Ok(())
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(e) if api_code(&e) == Some(404) => {
            debug!(name, "already gone");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
