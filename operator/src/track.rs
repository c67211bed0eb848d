//! `track`: what the operator knows about the children without asking the API server.
//!
//! The controller watches every child kind through reflectors (metadata only, except
//! StatefulSets and Certificates, whose status the DatabasePortal status needs), and
//! [`Applied`] remembers, per child, a hash of the object last applied and the
//! `resourceVersion` the server returned. A child whose desired object has not changed and
//! whose watched `resourceVersion` is still the one the apply returned is left alone: nobody
//! touched it since. Any edit changes the `resourceVersion`, a deletion removes it from the
//! store, and a restarted operator remembers nothing, so each of those leads to an apply.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ApiResource, DynamicObject, PartialObjectMeta};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::Resource;
use serde::Serialize;

use crate::certificate::Certificate;
use crate::portals::PortalPod;

/// Every kind of child.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    ConfigMap,
    ServiceAccount,
    Role,
    RoleBinding,
    StatefulSet,
    Service,
    Certificate,
    PodDisruptionBudget,
}

/// One child: kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChildKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ChildKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        ChildKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// What the operator last applied to one child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Hash of the desired object as sent.
    pub hash: u64,
    /// `metadata.resourceVersion` of the object the apply returned.
    pub resource_version: String,
}

/// Whether a child must be applied: unless the operator applied this very desired object
/// (`desired_hash`) and the watched object (`observed`, its `resourceVersion`, `None` when
/// the store does not hold it) is still the one that apply returned.
pub fn must_apply(last: Option<&Record>, desired_hash: u64, observed: Option<&str>) -> bool {
    match (last, observed) {
        (Some(last), Some(observed)) => {
            last.hash != desired_hash || last.resource_version != observed
        }
        // Never applied by this process, or deleted (or not seen by the watch yet).
        _ => true,
    }
}

/// Hash of an object as it would be sent.
pub fn hash_of<T: Serialize>(object: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    // Serializing a typed object cannot fail; an empty hash would only force an apply.
    serde_json::to_vec(object)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// The last apply of every child, shared by all reconciles.
#[derive(Debug, Default)]
pub struct Applied(Mutex<HashMap<ChildKey, Record>>);

impl Applied {
    pub fn get(&self, key: &ChildKey) -> Option<Record> {
        self.0.lock().unwrap().get(key).cloned()
    }
    pub fn record(&self, key: ChildKey, record: Record) {
        self.0.lock().unwrap().insert(key, record);
    }
    pub fn forget(&self, key: &ChildKey) {
        self.0.lock().unwrap().remove(key);
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hash: u64, rv: &str) -> Record {
        Record {
            hash,
            resource_version: rv.into(),
        }
    }

    #[test]
    fn an_untouched_child_is_not_applied_again() {
        assert!(!must_apply(Some(&record(7, "100")), 7, Some("100")));
    }

    #[test]
    fn a_child_never_applied_by_this_process_is_applied() {
        // Operator restart: nothing remembered, even if the store holds the child.
        assert!(must_apply(None, 7, Some("100")));
        assert!(must_apply(None, 7, None));
    }

    #[test]
    fn a_deleted_child_is_applied() {
        assert!(must_apply(Some(&record(7, "100")), 7, None));
    }

    #[test]
    fn an_edited_child_is_applied() {
        // Someone else changed it (hand edit, another controller): new resourceVersion.
        assert!(must_apply(Some(&record(7, "100")), 7, Some("105")));
        // The store has not seen the last apply yet: applying again is harmless.
        assert!(must_apply(Some(&record(7, "100")), 7, Some("99")));
    }

    #[test]
    fn a_changed_desired_object_is_applied() {
        assert!(must_apply(Some(&record(7, "100")), 8, Some("100")));
    }

    #[test]
    fn the_hash_follows_the_content() {
        let a = serde_json::json!({"data": {"portal.yaml": "a"}});
        let b = serde_json::json!({"data": {"portal.yaml": "b"}});
        assert_eq!(hash_of(&a), hash_of(&a.clone()));
        assert_ne!(hash_of(&a), hash_of(&b));
    }

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
