//! `pods`: the portal Pod as the operator reads it. The Pods are decoded into [`PortalPod`],
//! which skips everything but metadata and status conditions, and [`strip`] keeps only the
//! report annotation, the Ready condition and the owning DatabasePortal's name (a few hundred
//! bytes a Pod). [`owner`] maps a Pod to its DatabasePortal for the watch's trigger.
//! Their test is in `portals/tests.rs`, next to the aggregation of the reports they carry.
//!
//! May import: `names`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use portal::cluster::REPORT_ANNOTATION;
use portal::config::DatabasePortal;
use serde::Deserialize;

use crate::names::{
    self, APP, COMPONENT, COMPONENT_LABEL, INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGER, NAME_LABEL,
};

/// Label selector of every portal Pod the operator made.
pub fn pod_selector() -> String {
    format!("{NAME_LABEL}={APP},{COMPONENT_LABEL}={COMPONENT},{MANAGED_BY_LABEL}={MANAGER}")
}

/// A Pod as the operator reads it: metadata and the status conditions; the rest of the Pod
/// (spec, container statuses) is skipped while decoding and never held. [`strip`] moves what
/// is read into `kept` and drops the rest: labels and annotations are maps whose smallest
/// node is half a kilobyte, several times what a portal Pod needs.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PortalPod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<PodConditions>,
    #[serde(skip)]
    pub kept: Kept,
}

/// What [`strip`] keeps of a portal Pod besides its name and namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Kept {
    /// The DatabasePortal, when the Pod's controller is its StatefulSet.
    pub instance: Option<Box<str>>,
    /// The Pod's `Ready` condition is `True`.
    pub ready: bool,
    /// The report annotation, as written.
    pub report: Option<Box<str>>,
}

/// The conditions of a Pod's status.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodConditions {
    #[serde(default)]
    pub conditions: Vec<PodCondition>,
}

/// One Pod condition: type and status only.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

impl k8s_openapi::Resource for PortalPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for PortalPod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl PortalPod {
    /// The Pod's `Ready` condition is `True` (of a stripped Pod).
    pub fn is_ready(&self) -> bool {
        self.kept.ready
    }

    /// The report annotation, as written (of a stripped Pod).
    pub fn report(&self) -> Option<&str> {
        self.kept.report.as_deref()
    }
}

/// Keeps what the aggregation and the trigger read: name and namespace, and in `kept` the
/// DatabasePortal (from the instance label, only when the Pod's controller is that
/// DatabasePortal's StatefulSet), the Ready condition and the report annotation. Everything
/// else is dropped: a few hundred bytes a Pod stay.
pub fn strip(pod: &mut PortalPod) {
    let meta = &mut pod.metadata;
    let instance = meta
        .labels
        .as_mut()
        .and_then(|l| l.remove(INSTANCE_LABEL))
        .filter(|instance| {
            meta.owner_references.iter().flatten().any(|o| {
                o.controller == Some(true)
                    && o.kind == "StatefulSet"
                    && o.name == names::portal(instance)
            })
        });
    let report = meta
        .annotations
        .as_mut()
        .and_then(|a| a.remove(REPORT_ANNOTATION));
    let ready = pod.status.take().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        ..ObjectMeta::default()
    };
    pod.kept = Kept {
        instance: instance.map(String::into_boxed_str),
        ready,
        report: report.map(String::into_boxed_str),
    };
}

/// The DatabasePortal a stripped portal Pod belongs to.
pub fn owner(pod: PortalPod) -> Option<ObjectRef<DatabasePortal>> {
    let namespace = pod.metadata.namespace?;
    let instance = pod.kept.instance?;
    Some(ObjectRef::new(&instance).within(&namespace))
}
