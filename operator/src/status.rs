//! `status`: what the operator reports on a DatabasePortal, computed purely from what the
//! apply returned and what the portals report ([`crate::portals`]), then written through the
//! status subresource with server-side apply.
//!
//! May import: `error`, `names`, `conditions`, `self_signed`, `portals`, `apply` (what one
//! apply returned).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use portal::config::{DatabasePortal, DatabasePortalStatus, FieldError, ReadOnlyStatus};

use crate::apply::{Applied, CertificateState};
use crate::conditions::{reason, DEGRADED, READY};
use crate::error::{Error, Result};
use crate::names::{self, MANAGER};
use crate::portals::Aggregate;
use crate::self_signed;

/// What was observed while applying, reduced to what the status needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// From the StatefulSet; replaced by the portals' own count when they were observed.
    pub ready_portals: i32,
    /// (reason, message), most important first.
    pub degraded: Vec<(&'static str, String)>,
    /// The portal Pods' views; `None` when the Pods are not watched (yet): `leader` and
    /// `portals` are then kept as they are.
    pub portals: Option<Aggregate>,
}

impl Observation {
    pub fn from_applied(dp: &DatabasePortal, applied: &Applied) -> Self {
        let ready_portals = applied
            .stateful_set
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
            .min(dp.spec.portal.replicas);
        let mut degraded = Vec::new();
        match &applied.certificate {
            CertificateState::NotNeeded => {}
            CertificateState::CrdMissing => degraded.push((
                reason::CERT_MANAGER_MISSING,
                "cert-manager is not installed (cert-manager.io/v1 Certificate is not served): install it, or serve an existing Secret with tls.secretName; every other child is in place".to_string(),
            )),
            CertificateState::Applied(cert) if !cert.is_ready() => degraded.push((
                reason::CERTIFICATE_NOT_READY,
                format!("Certificate {} is not ready yet", cert.name_any()),
            )),
            CertificateState::Applied(_) => {}
        }
        if let Some(self_signed::Plan::Foreign(message)) = &applied.self_signed {
            degraded.push((reason::CERTIFICATE_NOT_READY, message.clone()));
        }
        if applied.pdb_skipped {
            degraded.push((
                reason::PDB_UNSUPPORTED,
                "the server serves no PodDisruptionBudget API (policy/v1 or v1beta1); none was made".to_string(),
            ));
        }
        Observation {
            ready_portals,
            degraded,
            portals: None,
        }
    }

    /// Adds what the portal Pods report: their count of ready portals replaces the
    /// StatefulSet's, and their Degraded reasons join the others by rank.
    pub fn with_portals(mut self, portals: Aggregate) -> Self {
        self.ready_portals = portals.ready_portals;
        self.degraded.extend(portals.degraded.iter().cloned());
        self.degraded.sort_by_key(|(r, _)| reason::rank(r));
        self.portals = Some(portals);
        self
    }
}

/// The status after a successful apply.
pub fn reconciled(
    dp: &DatabasePortal,
    port: u16,
    obs: &Observation,
    now: Timestamp,
) -> DatabasePortalStatus {
    let replicas = dp.spec.portal.replicas;
    let ns = dp.namespace().unwrap_or_default();
    let name = dp.name_any();
    let all_ready = obs.ready_portals >= replicas;
    let ready = if all_ready {
        (
            "True",
            reason::ALL_PORTALS_READY,
            format!("{}/{replicas} portals ready", obs.ready_portals),
        )
    } else {
        let detail = obs
            .portals
            .as_ref()
            .map(|p| p.not_ready_detail())
            .filter(|d| !d.is_empty())
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        (
            "False",
            reason::PORTALS_NOT_READY,
            format!("{}/{replicas} portals ready{detail}", obs.ready_portals),
        )
    };
    let degraded = match obs.degraded.first() {
        None => (
            "False",
            reason::AS_EXPECTED,
            "every child is in place".to_string(),
        ),
        Some((reason, _)) => (
            "True",
            *reason,
            obs.degraded
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let previous = dp.status.clone().unwrap_or_default();
    let (leader, portals) = match &obs.portals {
        Some(p) => (p.leader.clone(), p.portals.clone()),
        None => (previous.leader.clone(), previous.portals.clone()),
    };
    let read_only = dp.spec.read_only.as_ref().filter(|r| r.enabled).map(|r| {
        let serving = match &obs.portals {
            Some(p) => p.reads.clone(),
            None => previous
                .read_only
                .as_ref()
                .map(|r| r.serving.clone())
                .unwrap_or_default(),
        };
        ReadOnlyStatus {
            endpoint: format!(
                "{}.{ns}.svc:{}",
                names::portal_ro(&name),
                r.port.unwrap_or(port.saturating_add(1))
            ),
            summary: serving.join(","),
            serving,
        }
    });
    DatabasePortalStatus {
        observed_generation: dp.meta().generation,
        leader,
        ready_portals: obs.ready_portals,
        ready: format!("{}/{replicas}", obs.ready_portals),
        endpoints: (0..replicas)
            .map(|i| format!("{}.{ns}.svc:{port}", names::portal_pod(&name, i)))
            .collect(),
        read_only,
        portals,
        conditions: vec![
            condition(dp, &previous.conditions, READY, ready, now),
            condition(dp, &previous.conditions, DEGRADED, degraded, now),
        ],
    }
}

/// The status of a spec that failed validation; everything else is kept as it was.
pub fn invalid(dp: &DatabasePortal, errors: &[FieldError], now: Timestamp) -> DatabasePortalStatus {
    let previous = dp.status.clone().unwrap_or_default();
    let message = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let conditions = vec![
        condition(
            dp,
            &previous.conditions,
            READY,
            (
                "False",
                reason::INVALID_SPEC,
                format!("the spec is invalid: {message}"),
            ),
            now,
        ),
        condition(
            dp,
            &previous.conditions,
            DEGRADED,
            ("True", reason::INVALID_SPEC, message),
            now,
        ),
    ];
    DatabasePortalStatus {
        observed_generation: dp.meta().generation,
        conditions,
        ..previous
    }
}

/// A condition whose transition time moves only when its status does.
fn condition(
    dp: &DatabasePortal,
    previous: &[Condition],
    type_: &str,
    (status, reason, message): (&str, &str, String),
    now: Timestamp,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: dp.meta().generation,
        last_transition_time,
    }
}

/// The current condition `type_` of `dp`, if any.
pub fn find<'a>(dp: &'a DatabasePortal, type_: &str) -> Option<&'a Condition> {
    dp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Writes `status` through the status subresource (server-side apply, our field manager).
pub async fn write(
    client: &Client,
    dp: &DatabasePortal,
    status: &DatabasePortalStatus,
) -> Result<()> {
    let ns = dp.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<DatabasePortal> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": DatabasePortal::api_version(&()),
        "kind": DatabasePortal::kind(&()),
        "status": status,
    });
    api.patch_status(
        &dp.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Status)?;
    Ok(())
}
