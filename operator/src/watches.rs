//! `watches`: the operator's view of the cluster, kept by watches rather than asked for. The
//! kube-runtime `Controller` with its watch on the DatabasePortals, on every child kind
//! (reflected into [`Stores`], reduced to what is read, and followed by the [`Ledger`] of the
//! operator's own applies) and on the portal Pods (whose reports trigger a reconcile).
//!
//! May import: `names`, `certificate`, `pods`, `track`.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, PartialObjectMeta};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource};
use portal::config::DatabasePortal;
use serde::de::DeserializeOwned;
use tracing::debug;

use crate::certificate::Certificate;
use crate::names;
use crate::pods::{self, PortalPod};
use crate::track::{fields_of, ChildKey, Kind, Ledger};

/// Metadata-only store of one child kind.
pub type MetaStore<K> = Store<PartialObjectMeta<K>>;

/// Reflector stores of every child kind (filled by the controller's watches).
#[derive(Clone)]
pub struct Stores {
    pub config_maps: MetaStore<ConfigMap>,
    pub service_accounts: MetaStore<ServiceAccount>,
    pub roles: MetaStore<Role>,
    pub role_bindings: MetaStore<RoleBinding>,
    /// Full objects (spec and managed fields dropped): the status gives `readyPortals`.
    pub stateful_sets: Store<StatefulSet>,
    pub services: MetaStore<Service>,
    /// Full objects (managed fields dropped): the status gives readiness.
    pub certificates: Store<Certificate>,
    /// PodDisruptionBudgets in the served policy version.
    pub pdbs: Option<(MetaStore<DynamicObject>, ApiResource)>,
    pub network_policies: MetaStore<NetworkPolicy>,
    /// The portal Pods, reduced to their report and Ready condition (`portals::strip`).
    pub pods: Store<PortalPod>,
}

/// The write halves of [`Stores`], for the controller's reflectors.
pub struct Writers {
    pub config_maps: Writer<PartialObjectMeta<ConfigMap>>,
    pub service_accounts: Writer<PartialObjectMeta<ServiceAccount>>,
    pub roles: Writer<PartialObjectMeta<Role>>,
    pub role_bindings: Writer<PartialObjectMeta<RoleBinding>>,
    pub stateful_sets: Writer<StatefulSet>,
    pub services: Writer<PartialObjectMeta<Service>>,
    pub certificates: Writer<Certificate>,
    pub pdbs: Option<Writer<PartialObjectMeta<DynamicObject>>>,
    pub network_policies: Writer<PartialObjectMeta<NetworkPolicy>>,
    pub pods: Writer<PortalPod>,
}

impl Stores {
    /// Empty stores and their writers; `pdb` is the PodDisruptionBudget resource served.
    pub fn new(pdb: Option<&ApiResource>) -> (Stores, Writers) {
        let writers = Writers {
            config_maps: Writer::default(),
            service_accounts: Writer::default(),
            roles: Writer::default(),
            role_bindings: Writer::default(),
            stateful_sets: Writer::default(),
            services: Writer::default(),
            certificates: Writer::default(),
            pdbs: pdb.map(|r| Writer::new(r.clone())),
            network_policies: Writer::default(),
            pods: Writer::default(),
        };
        let stores = Stores {
            config_maps: writers.config_maps.as_reader(),
            service_accounts: writers.service_accounts.as_reader(),
            roles: writers.roles.as_reader(),
            role_bindings: writers.role_bindings.as_reader(),
            stateful_sets: writers.stateful_sets.as_reader(),
            services: writers.services.as_reader(),
            certificates: writers.certificates.as_reader(),
            pdbs: writers
                .pdbs
                .as_ref()
                .zip(pdb)
                .map(|(w, r)| (w.as_reader(), r.clone())),
            network_policies: writers.network_policies.as_reader(),
            pods: writers.pods.as_reader(),
        };
        (stores, writers)
    }

    /// Stores nothing ever fills: every child is applied, no portal Pod is seen.
    pub fn empty() -> Stores {
        Stores::new(None).0
    }

    /// The watched `resourceVersion` of a child, if the store holds it.
    pub fn resource_version(&self, key: &ChildKey) -> Option<String> {
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        match key.kind {
            Kind::ConfigMap => version(&self.config_maps, &(), ns, name),
            Kind::ServiceAccount => version(&self.service_accounts, &(), ns, name),
            Kind::Role => version(&self.roles, &(), ns, name),
            Kind::RoleBinding => version(&self.role_bindings, &(), ns, name),
            Kind::StatefulSet => version(&self.stateful_sets, &(), ns, name),
            Kind::Service => version(&self.services, &(), ns, name),
            Kind::Certificate => version(&self.certificates, &(), ns, name),
            Kind::PodDisruptionBudget => {
                let (store, resource) = self.pdbs.as_ref()?;
                version(store, resource, ns, name)
            }
            Kind::NetworkPolicy => version(&self.network_policies, &(), ns, name),
        }
    }

    pub fn stateful_set(&self, ns: &str, name: &str) -> Option<Arc<StatefulSet>> {
        get(&self.stateful_sets, &(), ns, name)
    }

    pub fn certificate(&self, ns: &str, name: &str) -> Option<Arc<Certificate>> {
        get(&self.certificates, &(), ns, name)
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Arc<PortalPod>> {
        get(&self.pods, &(), ns, name)
    }
}

fn get<K>(store: &Store<K>, dt: &K::DynamicType, ns: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    store.get(&ObjectRef::new_with(name, dt.clone()).within(ns))
}

fn version<K>(store: &Store<K>, dt: &K::DynamicType, ns: &str, name: &str) -> Option<String>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    get(store, dt, ns, name)?.meta().resource_version.clone()
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = ()>,
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The watched children and the record of applies, shared by the controller's watches and
/// the reconciles.
#[derive(Clone)]
pub struct Watched {
    pub stores: Stores,
    pub ledger: Arc<Ledger>,
}

impl Watched {
    /// Nothing watched: every reconcile applies every child.
    pub fn none() -> Self {
        Watched {
            stores: Stores::empty(),
            ledger: Arc::default(),
        }
    }
}

/// A child watch: reflects into `writer` (after `strip`), follows the records of the
/// operator's applies (its own version delivered, a later version leaving its fields alone
/// adopted, a deleted child forgotten), backs off on its own when failing (the Certificate
/// watch fails while cert-manager is not installed), and yields the touched children for
/// `owns_stream`.
fn child_watch<K>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    writer: Writer<K>,
    kind: Kind,
    ledger: Arc<Ledger>,
    strip: fn(&mut K),
    dyntype: K::DynamicType,
) -> impl Stream<Item = watcher::Result<K>> + Send + 'static
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    // Before `strip` drops the managed fields, and before the store holds the event.
    let store = writer.as_reader();
    let follow = move |event: &watcher::Result<watcher::Event<K>>| {
        let key = |child: &K| {
            ChildKey::new(
                kind,
                child.meta().namespace.as_deref().unwrap_or_default(),
                child.meta().name.as_deref().unwrap_or_default(),
            )
        };
        match event {
            Ok(watcher::Event::Delete(child)) => ledger.forget(&key(child)),
            Ok(watcher::Event::Apply(child) | watcher::Event::InitApply(child)) => {
                if let Some(rv) = child.meta().resource_version.as_deref() {
                    let stored = store.get(&ObjectRef::from_obj_with(child, dyntype.clone()));
                    let stored = stored
                        .as_ref()
                        .and_then(|s| s.meta().resource_version.as_deref());
                    ledger.observe(&key(child), rv, fields_of(child.meta()), stored);
                }
            }
            _ => {}
        }
    };
    reflected(stream.inspect(follow), writer, strip, kind)
}

/// A watch reflected into `writer` after `strip`, backing off on its own, yielding the
/// touched objects (errors are logged: passed on, they would pause every trigger).
fn reflected<K>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    writer: Writer<K>,
    strip: fn(&mut K),
    what: impl Debug + Send + 'static,
) -> impl Stream<Item = watcher::Result<K>> + Send + 'static
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    stream
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        .touched_objects()
        .filter(move |r| {
            if let Err(e) = r {
                debug!(error = %e, ?what, "watch");
            }
            futures::future::ready(r.is_ok())
        })
}

/// Keeps only what the skip decision, the cleanup and the owner triggers read: name,
/// namespace, `resourceVersion`, owner references (10,000 children stay a few MiB).
fn keep_identity(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        resource_version: meta.resource_version.take(),
        owner_references: meta.owner_references.take(),
        ..ObjectMeta::default()
    };
}

fn strip_metadata<K>(object: &mut PartialObjectMeta<K>) {
    object.types = None;
    keep_identity(&mut object.metadata);
}

/// Only the StatefulSet's status is read from the store.
fn strip_stateful_set(sts: &mut StatefulSet) {
    keep_identity(&mut sts.metadata);
    sts.spec = None;
}

/// The Certificate's spec and status are small; its status gives readiness.
fn strip_certificate(cert: &mut Certificate) {
    keep_identity(&mut cert.metadata);
}

fn metadata<K>(
    client: &Client,
    namespace: Option<&str>,
    config: &watcher::Config,
) -> impl Stream<Item = watcher::Result<watcher::Event<PartialObjectMeta<K>>>> + Send + 'static
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    watcher(
        api::<PartialObjectMeta<K>>(client, namespace),
        config.clone(),
    )
}

/// The controller: DatabasePortals, and every child kind, so a deleted or edited child is
/// put back; the child watches fill the stores returned in [`Watched`]. `namespace` None
/// watches all namespaces.
pub fn controller(
    client: &Client,
    namespace: Option<&str>,
    pdb: Option<&ApiResource>,
    concurrency: u16,
) -> (Controller<DatabasePortal>, Watched) {
    let config = watcher::Config::default().labels(&names::managed_selector());
    let (stores, writers) = Stores::new(pdb);
    let ledger = Arc::<Ledger>::default();
    let Writers {
        config_maps,
        service_accounts,
        roles,
        role_bindings,
        stateful_sets,
        services,
        certificates,
        pdbs,
        network_policies,
        pods,
    } = writers;
    let a = || ledger.clone();
    // The DatabasePortals' store without their managed fields, which nothing reads;
    // errors pass on to the controller as with its own watch.
    let portals = Writer::<DatabasePortal>::default();
    let portal_store = portals.as_reader();
    let portal_watch = watcher(
        api::<DatabasePortal>(client, namespace),
        watcher::Config::default(),
    )
    .modify(|dp| dp.metadata.managed_fields = None)
    .reflect(portals)
    .applied_objects();
    let mut controller = Controller::for_stream(portal_watch, portal_store)
        .owns_stream(child_watch(
            metadata::<ConfigMap>(client, namespace, &config),
            config_maps,
            Kind::ConfigMap,
            a(),
            strip_metadata,
            (),
        ))
        .owns_stream(child_watch(
            metadata::<ServiceAccount>(client, namespace, &config),
            service_accounts,
            Kind::ServiceAccount,
            a(),
            strip_metadata,
            (),
        ))
        .owns_stream(child_watch(
            metadata::<Role>(client, namespace, &config),
            roles,
            Kind::Role,
            a(),
            strip_metadata,
            (),
        ))
        .owns_stream(child_watch(
            metadata::<RoleBinding>(client, namespace, &config),
            role_bindings,
            Kind::RoleBinding,
            a(),
            strip_metadata,
            (),
        ))
        .owns_stream(child_watch(
            watcher(api::<StatefulSet>(client, namespace), config.clone()),
            stateful_sets,
            Kind::StatefulSet,
            a(),
            strip_stateful_set,
            (),
        ))
        .owns_stream(child_watch(
            metadata::<Service>(client, namespace, &config),
            services,
            Kind::Service,
            a(),
            strip_metadata,
            (),
        ))
        .owns_stream(child_watch(
            watcher(api::<Certificate>(client, namespace), config.clone()),
            certificates,
            Kind::Certificate,
            a(),
            strip_certificate,
            (),
        ))
        .owns_stream(child_watch(
            metadata::<NetworkPolicy>(client, namespace, &config),
            network_policies,
            Kind::NetworkPolicy,
            a(),
            strip_metadata,
            (),
        ));
    // A portal's report (or its Pod's readiness) changed: reconcile its DatabasePortal.
    let pod_config = watcher::Config::default().labels(&pods::pod_selector());
    controller = controller.watches_stream(
        reflected(
            watcher(api::<PortalPod>(client, namespace), pod_config),
            pods,
            pods::strip,
            "portal pods",
        ),
        pods::owner,
    );
    if let (Some(resource), Some(writer)) = (pdb, pdbs) {
        let pdbs = match namespace {
            Some(ns) => Api::<PartialObjectMeta<DynamicObject>>::namespaced_with(
                client.clone(),
                ns,
                resource,
            ),
            None => Api::<PartialObjectMeta<DynamicObject>>::all_with(client.clone(), resource),
        };
        controller = controller.owns_stream_with(
            child_watch(
                watcher(pdbs, config),
                writer,
                Kind::PodDisruptionBudget,
                a(),
                strip_metadata,
                resource.clone(),
            ),
            resource.clone(),
        );
    }
    let controller = controller.with_config(ControllerConfig::default().concurrency(concurrency));
    (controller, Watched { stores, ledger })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_stores_hold_nothing() {
        let stores = Stores::empty();
        for kind in [Kind::ConfigMap, Kind::Service, Kind::PodDisruptionBudget] {
            assert_eq!(
                stores.resource_version(&ChildKey::new(kind, "ns", "x")),
                None
            );
        }
    }
}
