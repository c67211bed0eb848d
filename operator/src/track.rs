//! `track`: the ledger of what the operator applied, and the pure decision whether a child
//! must be applied again. Holds no store and makes no API call.
//!
//! The child watches (`watches`) hold every child kind (metadata only, except
//! StatefulSets and Certificates, whose status the DatabasePortal status needs), and the
//! [`Ledger`] remembers, per child, a hash of the object last applied and the
//! `resourceVersion` the server returned. A child whose desired object has not changed and
//! whose watched `resourceVersion` is still the one the apply returned is left alone: nobody
//! touched it since. Any edit changes the `resourceVersion`, a deletion removes it from the
//! store, and a restarted operator remembers nothing, so each of those leads to an apply.
//! Until the watch delivers the operator's own apply, the store shows the child as it was
//! before (or not at all): that is the watch lagging, not an edit, and the child is left
//! alone for up to [`WATCH_LAG_LIMIT`] (the delivery triggers the next reconcile).
//!
//! May import: `names`.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::api::ObjectMeta;
use serde::Serialize;

use crate::names::MANAGER;

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
    NetworkPolicy,
}

impl Kind {
    /// The Kubernetes kind's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Role => "Role",
            Kind::RoleBinding => "RoleBinding",
            Kind::StatefulSet => "StatefulSet",
            Kind::Service => "Service",
            Kind::Certificate => "Certificate",
            Kind::PodDisruptionBudget => "PodDisruptionBudget",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
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
    /// When the apply returned.
    pub at: Instant,
    /// Whether the watch has delivered that `resourceVersion` yet.
    pub seen: bool,
    /// [`fields_of`] the object the apply returned: the fields this operator owns.
    pub fields: u64,
}

/// How long the operator trusts that a watched child differing from its last apply is only
/// the watch lagging behind that apply. The watch delivers every change in order, so an edit
/// or a deletion made after the apply arrives after it; only a watch that restarted (and
/// relisted past the apply) can skip it, and such a child is applied once this has passed.
pub const WATCH_LAG_LIMIT: Duration = Duration::from_secs(10);

/// What to do with one child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it.
    Apply,
    /// The watched child is what the last apply of this same object returned.
    Current,
    /// The watch has not delivered the last apply yet; look again after this long at most.
    Lagging(Duration),
}

/// Whether a child must be applied: not when the operator applied this very desired object
/// (`desired_hash`) and the watched object (`observed`, its `resourceVersion`, `None` when
/// the store does not hold it) is still the one that apply returned, nor while the watch has
/// not delivered that apply yet (for up to [`WATCH_LAG_LIMIT`]).
pub fn verdict(
    last: Option<&Record>,
    desired_hash: u64,
    observed: Option<&str>,
    now: Instant,
) -> Verdict {
    let Some(last) = last else {
        // Never applied by this process (or a restart, or deleted).
        return Verdict::Apply;
    };
    if last.hash != desired_hash {
        return Verdict::Apply;
    }
    if observed == Some(last.resource_version.as_str()) {
        return Verdict::Current;
    }
    // Someone else changed or deleted it, unless the watch is still behind the apply.
    let waited = now.saturating_duration_since(last.at);
    if !last.seen && waited < WATCH_LAG_LIMIT {
        return Verdict::Lagging(WATCH_LAG_LIMIT - waited);
    }
    Verdict::Apply
}

/// Hash of the fields this operator owns in an object, from its `managedFields` entry (set
/// of fields, API version, operation; not the time). Anyone else's write that touched one of
/// them took it over and changed the entry; writes elsewhere leave it as it was.
pub fn fields_of(meta: &ObjectMeta) -> u64 {
    let mut hasher = DefaultHasher::new();
    for entry in meta.managed_fields.iter().flatten() {
        if entry.manager.as_deref() == Some(MANAGER) {
            entry.operation.hash(&mut hasher);
            entry.api_version.hash(&mut hasher);
            entry.subresource.hash(&mut hasher);
            serde_json::to_vec(&entry.fields_v1)
                .unwrap_or_default()
                .hash(&mut hasher);
        }
    }
    hasher.finish()
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

/// The soonest one reconcile must look again at the children it left to a lagging watch.
#[derive(Debug, Default)]
pub struct Recheck(Mutex<Option<Duration>>);

impl Recheck {
    pub fn within(&self, after: Duration) {
        let mut soonest = self.0.lock().unwrap();
        *soonest = Some(soonest.map_or(after, |s| s.min(after)));
    }
    pub fn get(&self) -> Option<Duration> {
        *self.0.lock().unwrap()
    }
}

/// The ledger: the last apply of every child, shared by all reconciles and followed by the
/// child watches.
#[derive(Debug, Default)]
pub struct Ledger(Mutex<HashMap<ChildKey, Record>>);

impl Ledger {
    pub fn get(&self, key: &ChildKey) -> Option<Record> {
        self.0.lock().unwrap().get(key).cloned()
    }
    pub fn record(&self, key: ChildKey, record: Record) {
        self.0.lock().unwrap().insert(key, record);
    }
    /// The watch delivered `resource_version` of `key`, whose fields owned by this operator
    /// hash to `fields`; the store still holds the version before it (`stored`). The last
    /// apply's own version: the watch has caught up with it. A later version that left the
    /// operator's fields as the apply did (another controller wrote a status, the token
    /// controller a ServiceAccount's secrets): adopted as current, so it is not applied again.
    /// (The apply's response and the watch race: the watch may deliver the apply's version
    /// before the record is made, so a store holding it counts as delivered.)
    pub fn observe(
        &self,
        key: &ChildKey,
        resource_version: &str,
        fields: u64,
        stored: Option<&str>,
    ) {
        if let Some(record) = self.0.lock().unwrap().get_mut(key) {
            if record.resource_version == resource_version {
                record.seen = true;
            } else if (record.seen || stored == Some(record.resource_version.as_str()))
                && record.fields == fields
            {
                record.resource_version = resource_version.to_string();
                record.seen = true;
            }
        }
    }
    /// Applied by this process, and the watch has not delivered that apply yet.
    pub fn lagging(&self, key: &ChildKey) -> bool {
        self.0.lock().unwrap().get(key).is_some_and(|r| !r.seen)
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};
    use k8s_openapi::jiff::Timestamp;

    fn record(hash: u64, rv: &str, seen: bool, at: Instant) -> Record {
        Record {
            hash,
            resource_version: rv.into(),
            at,
            seen,
            fields: 1,
        }
    }

    fn must_apply(last: Option<&Record>, hash: u64, observed: Option<&str>, now: Instant) -> bool {
        verdict(last, hash, observed, now) == Verdict::Apply
    }

    /// Whether a child applied just now as "100" with hash 7 (`seen` by the watch or not)
    /// must be applied for `hash` while the store holds `observed`.
    fn must_apply_now(seen: bool, hash: u64, observed: Option<&str>) -> bool {
        let now = Instant::now();
        must_apply(Some(&record(7, "100", seen, now)), hash, observed, now)
    }

    /// Records of a child of `kind` just applied as "100" with hash 7, not yet seen by the
    /// watch; its key; the time of the apply.
    fn just_applied(kind: Kind) -> (Ledger, ChildKey, Instant) {
        let ledger = Ledger::default();
        let key = ChildKey::new(kind, "ns", "db-portal");
        let now = Instant::now();
        ledger.record(key.clone(), record(7, "100", false, now));
        (ledger, key, now)
    }

    #[test]
    fn an_untouched_child_is_not_applied_again() {
        let now = Instant::now();
        let last = record(7, "100", true, now);
        assert_eq!(verdict(Some(&last), 7, Some("100"), now), Verdict::Current);
        // Even before the watch reported it: the store already holds the applied version.
        let unseen = record(7, "100", false, now);
        assert_eq!(
            verdict(Some(&unseen), 7, Some("100"), now),
            Verdict::Current
        );
    }

    #[test]
    fn a_child_never_applied_by_this_process_is_applied() {
        // Operator restart: nothing remembered, even if the store holds the child.
        let now = Instant::now();
        assert!(must_apply(None, 7, Some("100"), now));
        assert!(must_apply(None, 7, None, now));
    }

    #[test]
    fn a_deleted_child_is_applied() {
        // The watch delivered the apply, then the deletion.
        assert!(must_apply_now(true, 7, None));
    }

    #[test]
    fn an_edited_child_is_applied() {
        // Someone else changed it after the watch delivered the apply: new resourceVersion.
        assert!(must_apply_now(true, 7, Some("105")));
    }

    #[test]
    fn a_child_the_watch_has_not_caught_up_with_waits_for_it() {
        let applied = Instant::now();
        let last = record(7, "100", false, applied);
        // The store still holds the version before the apply, or nothing yet (a creation).
        let later = applied + Duration::from_secs(3);
        assert_eq!(
            verdict(Some(&last), 7, Some("99"), later),
            Verdict::Lagging(WATCH_LAG_LIMIT - Duration::from_secs(3))
        );
        assert!(matches!(
            verdict(Some(&last), 7, None, later),
            Verdict::Lagging(_)
        ));
        // Past the limit (a restarted watch may have skipped the apply): applied again.
        let late = applied + WATCH_LAG_LIMIT;
        assert!(must_apply(Some(&last), 7, Some("99"), late));
        assert!(must_apply(Some(&last), 7, None, late));
    }

    #[test]
    fn a_changed_desired_object_is_applied_at_once() {
        assert!(must_apply_now(true, 8, Some("100")));
        assert!(must_apply_now(false, 8, Some("99")));
    }

    #[test]
    fn the_watch_delivering_the_apply_marks_it_seen() {
        let (ledger, key, now) = just_applied(Kind::ConfigMap);
        ledger.observe(&key, "99", 1, None);
        assert!(
            !ledger.get(&key).unwrap().seen,
            "an older version is not the apply"
        );
        ledger.observe(&key, "100", 1, Some("99"));
        assert!(ledger.get(&key).unwrap().seen);
        // Seen, then edited: applied at once, however recent the apply.
        assert!(must_apply(ledger.get(&key).as_ref(), 7, Some("101"), now));
    }

    #[test]
    fn a_write_that_left_the_operators_fields_alone_is_adopted() {
        let (ledger, key, now) = just_applied(Kind::StatefulSet);
        // Not before the watch delivered the apply itself (an older version is not adopted).
        ledger.observe(&key, "99", 1, None);
        assert_eq!(ledger.get(&key).unwrap().resource_version, "100");
        ledger.observe(&key, "100", 1, Some("99"));
        // A status write by the controller manager: same owned fields.
        ledger.observe(&key, "104", 1, Some("100"));
        assert_eq!(
            verdict(ledger.get(&key).as_ref(), 7, Some("104"), now),
            Verdict::Current
        );
        // A hand edit took over one of the operator's fields: applied.
        ledger.observe(&key, "109", 2, Some("104"));
        assert!(must_apply(ledger.get(&key).as_ref(), 7, Some("109"), now));
    }

    #[test]
    fn an_apply_delivered_before_its_record_counts_as_delivered() {
        // The watch delivered "100" (now in the store) before the apply's response was
        // recorded, so the record was never marked; the next write is still judged by fields.
        let (ledger, key, now) = just_applied(Kind::ConfigMap);
        ledger.observe(&key, "104", 1, Some("100"));
        assert_eq!(
            verdict(ledger.get(&key).as_ref(), 7, Some("104"), now),
            Verdict::Current
        );
        // Not when the store holds something else (the watch has not caught up).
        ledger.record(key.clone(), record(7, "200", false, now));
        ledger.observe(&key, "150", 1, Some("104"));
        assert_eq!(ledger.get(&key).unwrap().resource_version, "200");
    }

    fn entry(manager: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Apply".into()),
            api_version: Some("v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..ManagedFieldsEntry::default()
        }
    }

    #[test]
    fn owned_fields_hash_follows_only_the_operators_entry() {
        let ours = entry(MANAGER, serde_json::json!({"f:metadata": {"f:labels": {}}}));
        let theirs = entry(
            "kube-controller-manager",
            serde_json::json!({"f:secrets": {}}),
        );
        let meta = |entries: Vec<ManagedFieldsEntry>| ObjectMeta {
            managed_fields: Some(entries),
            ..ObjectMeta::default()
        };
        let alone = fields_of(&meta(vec![ours.clone()]));
        assert_eq!(alone, fields_of(&meta(vec![ours.clone(), theirs.clone()])));
        let mut later = ours.clone();
        later.time = Some(Time(Timestamp::now()));
        assert_eq!(alone, fields_of(&meta(vec![later, theirs])));
        let taken = entry(MANAGER, serde_json::json!({"f:metadata": {}}));
        assert_ne!(alone, fields_of(&meta(vec![taken])));
    }

    #[test]
    fn the_hash_follows_the_content() {
        let a = serde_json::json!({"data": {"portal.yaml": "a"}});
        let b = serde_json::json!({"data": {"portal.yaml": "b"}});
        assert_eq!(hash_of(&a), hash_of(&a.clone()));
        assert_ne!(hash_of(&a), hash_of(&b));
    }
}
