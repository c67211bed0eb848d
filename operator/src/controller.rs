//! The reconciler: `validate -> build -> apply -> status` for one DatabasePortal, the error
//! policy (backoff), the events, and running the kube-runtime `Controller` that `watches`
//! builds. What this process remembers between reconciles of one DatabasePortal (the last
//! status written, since when its portals disagree, its failures) lives here.
//!
//! May import: every module below it (`validate`, `build`, `apply`, `status`, `portals`,
//! `pods`, `watches`, `track`, `metrics`, `conditions`, `names`, `error`). Only the crate
//! root imports it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as EventsV1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use portal::config::{DatabasePortal, DatabasePortalStatus};
use tracing::{debug, info, warn};

use crate::apply::{apply, ApiSupport, CertificateState, Known};
use crate::build::{build, Settings};
use crate::conditions::{reason, DEGRADED};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::names::{self, MANAGER};
use crate::pods::PortalPod;
use crate::portals::{self, Aggregate};
use crate::status::{self, Observation};
use crate::track::{self, Ledger, Recheck};
use crate::validate::{validate, Validated};
use crate::watches::{Stores, Watched};

/// Requeue of a healthy DatabasePortal: a safety net; watches do the real work.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Requeue while cert-manager is missing, to notice when it is installed.
pub const CERT_MANAGER_RECHECK: Duration = Duration::from_secs(10);
/// How long after a start reconciles wait for the first listing of the portal Pods, so the
/// status is never computed from an empty view (which would announce a lost leader).
pub const PODS_LISTED_WAIT: Duration = Duration::from_secs(10);
/// Requeue when the portal Pods were not listed in time.
pub const PODS_RECHECK: Duration = Duration::from_secs(5);

/// What this process last wrote in a DatabasePortal's status: the reconcile after a status
/// write may still read the older status from the watch, and must not announce the same
/// change twice.
#[derive(Clone, Debug, PartialEq)]
struct Written {
    leader: String,
    /// The Degraded condition's reason and a hash of its message.
    degraded: Option<(String, u64)>,
}

fn degraded_of(conditions: &[Condition]) -> Option<(String, u64)> {
    conditions
        .iter()
        .find(|c| c.type_ == DEGRADED)
        .map(|c| (c.reason.clone(), track::hash_of(&c.message)))
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub support: ApiSupport,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Who publishes events (the recorder's reporter).
    reporter: Reporter,
    /// The watched children (filled by the controller's reflectors).
    pub stores: Stores,
    /// What this process last applied to each child.
    pub ledger: Arc<Ledger>,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Per DatabasePortal UID, what this process last wrote in its status.
    written: Mutex<HashMap<String, Written>>,
    /// Per DatabasePortal UID, since when its ready portals disagree on the leader.
    disagreeing: Mutex<HashMap<String, Instant>>,
    /// Until when reconciles wait for the first listing of the portal Pods.
    pods_listed_by: Instant,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        support: ApiSupport,
        metrics: Metrics,
        identity: &str,
        watched: Watched,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(identity.into()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            settings,
            support,
            metrics,
            stores: watched.stores,
            ledger: watched.ledger,
            failures: Mutex::default(),
            written: Mutex::default(),
            disagreeing: Mutex::default(),
            pods_listed_by: Instant::now() + PODS_LISTED_WAIT,
        }
    }

    /// The leader and Degraded condition last written for `dp`: this process's record, else
    /// the status as read.
    fn last_written(&self, dp: &DatabasePortal) -> Written {
        let uid = dp.uid().unwrap_or_default();
        if let Some(w) = self.written.lock().unwrap().get(&uid) {
            return w.clone();
        }
        Written {
            leader: dp
                .status
                .as_ref()
                .map(|s| s.leader.clone())
                .unwrap_or_default(),
            degraded: degraded_of(dp.status.as_ref().map_or(&[], |s| &s.conditions)),
        }
    }

    fn record_written(&self, dp: &DatabasePortal, new: &DatabasePortalStatus) {
        let written = Written {
            leader: new.leader.clone(),
            degraded: degraded_of(&new.conditions),
        };
        self.written
            .lock()
            .unwrap()
            .insert(dp.uid().unwrap_or_default(), written);
    }

    /// The portal Pods' views of `dp`: `Ok(None)` when no Pod is watched (tests without
    /// watches), `Err(())` when the Pods have not been listed yet.
    async fn portal_views(
        &self,
        dp: &DatabasePortal,
        valid: &Validated,
    ) -> std::result::Result<Option<Aggregate>, ()> {
        let wait = self
            .pods_listed_by
            .saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, self.stores.pods.wait_until_ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Ok(None),
            Err(_) => return Err(()),
        }
        let pods: Vec<(String, Option<Arc<PortalPod>>)> = (0..dp.spec.portal.replicas)
            .map(|i| {
                let name = names::portal_pod(&valid.name, i);
                let pod = self.stores.pod(&valid.namespace, &name);
                (name, pod)
            })
            .collect();
        let pods: Vec<(String, Option<&PortalPod>)> = pods
            .iter()
            .map(|(name, pod)| (name.clone(), pod.as_deref()))
            .collect();
        let backends: Vec<&str> = valid
            .config
            .backends
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        Ok(Some(portals::aggregate(
            valid.config.routing,
            &backends,
            &pods,
        )))
    }

    /// Holds back a disagreement younger than [`portals::DISAGREEMENT_GRACE`]; returns when
    /// to look again.
    fn hold_disagreement(
        &self,
        dp: &DatabasePortal,
        aggregate: &mut Aggregate,
    ) -> Option<Duration> {
        let uid = dp.uid().unwrap_or_default();
        let mut disagreeing = self.disagreeing.lock().unwrap();
        let mut since = disagreeing.get(&uid).copied();
        let recheck = portals::hold_disagreement(
            aggregate,
            &mut since,
            Instant::now(),
            portals::DISAGREEMENT_GRACE,
        );
        match since {
            Some(t) => disagreeing.insert(uid, t),
            None => disagreeing.remove(&uid),
        };
        recheck
    }

    fn known<'a>(&'a self, recheck: &'a Recheck) -> Known<'a> {
        Known {
            stores: &self.stores,
            ledger: &self.ledger,
            metrics: &self.metrics,
            recheck,
        }
    }

    /// Publishes an event without holding up the reconcile.
    fn publish_later(
        self: &Arc<Self>,
        dp: &DatabasePortal,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        // Only the reference waits for the API server, not the whole object.
        let (ctx, reference, reason, action) = (
            self.clone(),
            dp.object_ref(&()),
            reason.to_string(),
            action.to_string(),
        );
        tokio::spawn(async move { ctx.publish(&reference, type_, &reason, &action, note).await });
    }

    /// Publishes an event of its own without holding up the reconcile. The recorder folds
    /// events of one reason about one object into a series that keeps the first note; a
    /// change (old and new leader) needs its own note, so this one is never folded.
    fn publish_distinct_later(self: &Arc<Self>, dp: &DatabasePortal, reason: &str, note: String) {
        let now = Timestamp::now();
        let reference = dp.object_ref(&());
        let event = EventsV1 {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", dp.name_any(), now.as_nanosecond())),
                namespace: dp.namespace(),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Normal".into()),
            reason: Some(reason.into()),
            action: Some("Observe".into()),
            note: Some(note),
            regarding: Some(reference),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..EventsV1::default()
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            let ns = event.metadata.namespace.clone().unwrap_or_default();
            let api: Api<EventsV1> = Api::namespaced(client, &ns);
            if let Err(e) = api.create(&Default::default(), &event).await {
                warn!(error = %e, "could not publish event");
            }
        });
    }

    async fn publish(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, reference).await {
            warn!(error = %e, "could not publish event");
        }
    }
}

fn key(dp: &DatabasePortal) -> String {
    format!("{}/{}", dp.namespace().unwrap_or_default(), dp.name_any())
}

/// Delay after `attempts` consecutive failures: 1 s doubling up to 5 min.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// Reconciles one DatabasePortal.
pub async fn reconcile(dp: Arc<DatabasePortal>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconcile_started();
    let result = reconcile_inner(&dp, &ctx).await;
    ctx.metrics.reconcile_finished(started.elapsed());
    if result.is_ok() {
        ctx.failures.lock().unwrap().remove(&key(&dp));
    }
    result
}

async fn reconcile_inner(dp: &DatabasePortal, ctx: &Arc<Context>) -> Result<Action> {
    if dp.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove every child.
        let uid = dp.uid().unwrap_or_default();
        ctx.written.lock().unwrap().remove(&uid);
        ctx.disagreeing.lock().unwrap().remove(&uid);
        return Ok(Action::await_change());
    }
    let previous = ctx.last_written(dp);
    let previous_degraded = previous.degraded.clone();
    let valid = match validate(dp) {
        Ok(valid) => valid,
        Err(Error::InvalidSpec(errors)) => {
            let new = status::invalid(dp, &errors, Timestamp::now());
            write_status(ctx, dp, &new).await?;
            ctx.record_written(dp, &new);
            let err = Error::InvalidSpec(errors);
            ctx.metrics.failure(&err);
            if degraded_of(&new.conditions) != previous_degraded {
                warn!(portal = %key(dp), %err, "invalid spec; no child touched");
                ctx.publish_later(
                    dp,
                    EventType::Warning,
                    reason::INVALID_SPEC,
                    "Validate",
                    err.to_string(),
                );
            }
            // Permanent until the spec changes, which the watch reports.
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let uid = dp.uid().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let children = build(dp, &valid, &ctx.settings)?;
    let lagging = Recheck::default();
    let applied = apply(
        &ctx.client,
        &ctx.support,
        ctx.known(&lagging),
        &uid,
        &children,
    )
    .await?;
    let mut observation = Observation::from_applied(dp, &applied);
    let views = ctx.portal_views(dp, &valid).await;
    let mut recheck = None;
    if let Ok(Some(mut aggregate)) = views.clone() {
        recheck = ctx.hold_disagreement(dp, &mut aggregate);
        observation = observation.with_portals(aggregate);
    }
    let new = status::reconciled(dp, valid.config.port, &observation, Timestamp::now());
    write_status(ctx, dp, &new).await?;
    ctx.record_written(dp, &new);
    if observation.portals.is_some() && new.leader != previous.leader {
        let note = portals::leader_change_note(&previous.leader, &new.leader);
        info!(portal = %key(dp), "{note}");
        ctx.publish_distinct_later(dp, reason::LEADER_CHANGED, note);
    }

    let observed = dp.status.as_ref().and_then(|s| s.observed_generation);
    if observed.is_none() {
        info!(portal = %key(dp), "created portal children");
        let tls = match (&children.certificate, &children.self_signed) {
            (Some(_), _) => ", Certificate".to_string(),
            (None, Some(own)) => format!(
                ", a CA of its own and the certificate it signs (Secrets {}, {})",
                own.ca_secret.name.as_deref().unwrap_or_default(),
                own.tls_secret.name.as_deref().unwrap_or_default()
            ),
            (None, None) => String::new(),
        };
        let note = format!(
            "created ConfigMap, StatefulSet ({} portals), {} Services, RBAC, PodDisruptionBudget{tls}",
            dp.spec.portal.replicas,
            children.services.len(),
        );
        ctx.publish_later(dp, EventType::Normal, "Created", "Create", note);
    } else if observed != dp.meta().generation {
        info!(portal = %key(dp), generation = ?dp.meta().generation, "applied spec change");
        let note = format!(
            "applied generation {}",
            dp.meta().generation.unwrap_or_default()
        );
        ctx.publish_later(dp, EventType::Normal, "Updated", "Update", note);
    }
    if let Some((reason, message)) = observation.degraded.first() {
        if previous_degraded.as_ref().map(|(r, _)| r.as_str()) != Some(*reason) {
            warn!(portal = %key(dp), reason, "degraded: {message}");
            ctx.publish_later(dp, EventType::Warning, reason, "Reconcile", message.clone());
        }
    }
    let next = match (applied.certificate, views) {
        (CertificateState::CrdMissing, _) => CERT_MANAGER_RECHECK,
        (_, Err(())) => PODS_RECHECK,
        _ => RESYNC,
    };
    let soonest = [recheck, lagging.get()]
        .into_iter()
        .flatten()
        .fold(next, Duration::min);
    Ok(Action::requeue(soonest))
}

/// Writes `new` unless it is the status the DatabasePortal already has (condition transition
/// times only move when a condition's status does, so an unchanged status compares equal).
async fn write_status(
    ctx: &Context,
    dp: &DatabasePortal,
    new: &DatabasePortalStatus,
) -> Result<()> {
    let changed = dp.status.as_ref() != Some(new);
    ctx.metrics.status_write(changed);
    if !changed {
        return Ok(());
    }
    status::write(&ctx.client, dp, new).await
}

/// Transient errors: requeue with a per-object exponential backoff, count, and tell the user.
pub fn error_policy(dp: Arc<DatabasePortal>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(error);
    let attempts = {
        let mut failures = ctx.failures.lock().unwrap();
        let n = failures.entry(key(&dp)).or_default();
        *n += 1;
        *n
    };
    let delay = backoff(attempts);
    warn!(portal = %key(&dp), %error, attempts, ?delay, "reconcile failed; retrying");
    let note = error.to_string();
    let reference = dp.object_ref(&());
    tokio::spawn(async move {
        ctx.publish(
            &reference,
            EventType::Warning,
            "ReconcileFailed",
            "Reconcile",
            note,
        )
        .await;
    });
    Action::requeue(delay)
}

/// Runs the controller until `stop` resolves.
pub async fn run_controller(
    controller: Controller<DatabasePortal>,
    ctx: Arc<Context>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    controller
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(portal = %object.name, "reconciled"),
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(e) => debug!(error = %e, "controller"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
