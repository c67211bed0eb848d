//! `apply`: server-side apply of every child with one field manager (skipped for a child
//! nobody touched since this process applied the same object, see `track`), and removal of
//! the children the spec no longer needs (found in the watched children, confirmed by owner).
//!
//! May import: `error`, `names`, `certificate`, `self_signed`, `admin_token`, `build`, `track`, `watches`
//! (the stores), `metrics`.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Instant;

use futures::future::try_join_all;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams,
};
use kube::{Client, Resource, ResourceExt};
use serde::{de::DeserializeOwned, Serialize};
use tracing::{debug, info};

use crate::admin_token;
use crate::build::Children;
use crate::certificate::Certificate;
use crate::error::{api_code, Error, Result};
use crate::metrics::Metrics;
use crate::names::MANAGER;
use crate::self_signed;
use crate::track::{fields_of, hash_of, verdict, ChildKey, Kind, Ledger, Recheck, Record, Verdict};
use crate::watches::Stores;

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
    /// What became of the operator's own certificate, when the spec asks for it.
    pub self_signed: Option<self_signed::Plan>,
}

fn params() -> PatchParams {
    // Force: fields someone edited by hand are taken back.
    PatchParams::apply(MANAGER).force()
}

/// What the operator knows without asking: the watched children and its own last applies.
#[derive(Clone, Copy)]
pub struct Known<'a> {
    pub stores: &'a Stores,
    pub ledger: &'a Ledger,
    pub metrics: &'a Metrics,
    /// When to look again at children left to a lagging watch.
    pub recheck: &'a Recheck,
}

impl Known<'_> {
    /// The hash of `object` when it must be applied, `None` when the watched child is still
    /// what the last apply of this same object returned.
    fn needs_apply<T: Serialize>(&self, key: &ChildKey, object: &T) -> Option<u64> {
        let hash = hash_of(object);
        let last = self.ledger.get(key);
        let observed = self.stores.resource_version(key);
        let verdict = verdict(last.as_ref(), hash, observed.as_deref(), Instant::now());
        if let Verdict::Lagging(after) = verdict {
            self.recheck.within(after);
        }
        let apply = verdict == Verdict::Apply;
        self.metrics.child_apply(key.kind, apply);
        apply.then_some(hash)
    }

    fn record(&self, key: ChildKey, hash: u64, returned: &ObjectMeta) {
        // The watch may have delivered the apply before its response arrived.
        let seen = returned.resource_version.is_some()
            && self.stores.resource_version(&key) == returned.resource_version;
        match returned.resource_version.clone() {
            Some(resource_version) => self.ledger.record(
                key,
                Record {
                    hash,
                    resource_version,
                    at: Instant::now(),
                    seen,
                    fields: fields_of(returned),
                },
            ),
            None => self.ledger.forget(&key),
        }
    }
}

/// Server-side apply of `object`, unless nothing changed since the last one (`Ok(None)`).
async fn ssa<K>(
    client: &Client,
    known: Known<'_>,
    kind: Kind,
    namespace: &str,
    object: &K,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = object.name_any();
    let key = ChildKey::new(kind, namespace, &name);
    let Some(hash) = known.needs_apply(&key, object) else {
        return Ok(None);
    };
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let applied = api
        .patch(&name, &params(), &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply {
            kind: K::kind(&()).to_string(),
            name,
            source,
        })?;
    known.record(key, hash, applied.meta());
    Ok(Some(applied))
}

/// Like [`ssa`], but returns the object (as applied, or as watched when left alone).
async fn ssa_observed<K>(
    client: &Client,
    known: Known<'_>,
    kind: Kind,
    namespace: &str,
    object: &K,
    watched: impl Fn() -> Option<Arc<K>>,
) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    if let Some(applied) = ssa(client, known, kind, namespace, object).await? {
        return Ok(applied);
    }
    if let Some(watched) = watched() {
        return Ok((*watched).clone());
    }
    let key = ChildKey::new(kind, namespace, &object.name_any());
    if known.ledger.lagging(&key) {
        // Created moments ago and not delivered by the watch yet: the desired object, without
        // status, stands in for it.
        return Ok(object.clone());
    }
    // Gone from the store since the check: apply it again.
    known.ledger.forget(&key);
    ssa(client, known, kind, namespace, object)
        .await?
        .ok_or(Error::MissingObjectKey("metadata.resourceVersion"))
}

/// Applies every child of one DatabasePortal and removes the ones it no longer needs. Children
/// nobody changed since this process last applied them are left alone.
pub async fn apply(
    client: &Client,
    support: &ApiSupport,
    known: Known<'_>,
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
        self_signed,
        pdb,
        network_policy,
        admin_secret,
    } = children;

    // Independent objects, applied concurrently; the StatefulSet controller retries pods
    // whose ServiceAccount is not there yet.
    let rbac = async {
        ssa(client, known, Kind::ServiceAccount, ns, service_account).await?;
        ssa(client, known, Kind::Role, ns, role).await?;
        ssa(client, known, Kind::RoleBinding, ns, role_binding).await
    };
    let services_applied = try_join_all(
        services
            .iter()
            .map(|s| ssa(client, known, Kind::Service, ns, s)),
    );
    let stateful_set_applied =
        ssa_observed(client, known, Kind::StatefulSet, ns, stateful_set, || {
            known.stores.stateful_set(ns, &stateful_set.name_any())
        });
    let pdb_applied = async {
        let Some(resource) = &support.pdb else {
            return Ok(true);
        };
        let mut value = serde_json::to_value(pdb).map_err(|e| Error::Serialize {
            kind: "PodDisruptionBudget",
            message: e.to_string(),
        })?;
        value["apiVersion"] = resource.api_version.clone().into();
        let name = pdb.name_any();
        let key = ChildKey::new(Kind::PodDisruptionBudget, ns, &name);
        let Some(hash) = known.needs_apply(&key, &value) else {
            return Ok(false);
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, resource);
        let applied = api
            .patch(&name, &params(), &Patch::Apply(&value))
            .await
            .map_err(|source| Error::Apply {
                kind: "PodDisruptionBudget".into(),
                name,
                source,
            })?;
        known.record(key, hash, applied.meta());
        Ok(false)
    };
    let certificate_applied = async {
        match certificate {
            None => {
                remove_orphan_certificates(client, known, ns, owner_uid).await?;
                Ok(CertificateState::NotNeeded)
            }
            Some(cert) => {
                let watched = || known.stores.certificate(ns, &cert.name_any());
                match ssa_observed(client, known, Kind::Certificate, ns, cert, watched).await {
                    Ok(applied) => Ok(CertificateState::Applied(Box::new(applied))),
                    Err(e) if e.api_code() == Some(404) => Ok(CertificateState::CrdMissing),
                    Err(e) => Err(e),
                }
            }
        }
    };
    let self_signed_applied = async {
        match self_signed {
            Some(wanted) => self_signed::ensure(client, owner_uid, wanted)
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    let network_policy_applied = async {
        match network_policy {
            Some(policy) => ssa(client, known, Kind::NetworkPolicy, ns, policy)
                .await
                .map(drop),
            None => remove_orphan_network_policies(client, known, ns, owner_uid).await,
        }
    };
    let (_, _, _, stateful_set, _, pdb_skipped, certificate, self_signed, _) = futures::try_join!(
        ssa(client, known, Kind::ConfigMap, ns, config_map),
        admin_token::ensure(client, admin_secret),
        rbac,
        stateful_set_applied,
        services_applied,
        pdb_applied,
        certificate_applied,
        self_signed_applied,
        network_policy_applied,
    )?;
    remove_orphan_services(client, known, ns, owner_uid, services).await?;
    Ok(Applied {
        stateful_set,
        certificate,
        pdb_skipped,
        self_signed,
    })
}

fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// Per-portal Services above `replicas` (after the spec shrank), found in the watched Services
/// (one the watch has not reported yet is removed when it does, as that triggers a reconcile).
async fn remove_orphan_services(
    client: &Client,
    known: Known<'_>,
    ns: &str,
    owner_uid: &str,
    wanted: &[Service],
) -> Result<()> {
    let stale: Vec<String> = known
        .stores
        .services
        .state()
        .iter()
        .filter(|svc| svc.namespace().as_deref() == Some(ns) && owned_by(&svc.metadata, owner_uid))
        .map(|svc| svc.name_any())
        .filter(|name| !wanted.iter().any(|w| w.name_any() == *name))
        .collect();
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    for name in stale {
        info!(service = %name, "removing Service the spec no longer needs");
        delete(&api, &name).await.map_err(|source| Error::Cleanup {
            kind: "Service",
            source,
        })?;
        known
            .ledger
            .forget(&ChildKey::new(Kind::Service, ns, &name));
    }
    Ok(())
}

/// Removes the NetworkPolicy of this owner (the operator runs with `--network-policy=false`
/// now, after making one).
async fn remove_orphan_network_policies(
    client: &Client,
    known: Known<'_>,
    ns: &str,
    owner_uid: &str,
) -> Result<()> {
    let stale = owned_names(&known.stores.network_policies.state(), ns, owner_uid);
    remove_children::<NetworkPolicy>(client, known, ns, Kind::NetworkPolicy, stale).await
}

/// A Certificate left from when TLS used cert-manager (found in the watched Certificates;
/// none while cert-manager is not installed).
async fn remove_orphan_certificates(
    client: &Client,
    known: Known<'_>,
    ns: &str,
    owner_uid: &str,
) -> Result<()> {
    let stale = owned_names(&known.stores.certificates.state(), ns, owner_uid);
    remove_children::<Certificate>(client, known, ns, Kind::Certificate, stale).await
}

/// Names of the watched objects in `ns` that `owner_uid` controls.
fn owned_names<K: Resource>(watched: &[Arc<K>], ns: &str, owner_uid: &str) -> Vec<String> {
    watched
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(ns) && owned_by(c.meta(), owner_uid))
        .map(|c| c.name_any())
        .collect()
}

/// Deletes the children `names` of one kind that the spec no longer needs, and forgets them.
async fn remove_children<K>(
    client: &Client,
    known: Known<'_>,
    ns: &str,
    kind: Kind,
    names: Vec<String>,
) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    for name in names {
        info!(kind = kind.as_str(), name = %name, "removing a child the spec no longer needs");
        delete(&api, &name).await.map_err(|source| Error::Cleanup {
            kind: kind.as_str(),
            source,
        })?;
        known.ledger.forget(&ChildKey::new(kind, ns, &name));
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
