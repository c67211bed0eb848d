//! The reconciler: `validate -> build -> apply -> status` for one DatabasePortal, the error
//! policy (backoff), events, and the kube-runtime `Controller` with a watch on every child kind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::apply::{apply, ApiSupport, CertificateState};
use crate::build::{build, Settings, MANAGER};
use crate::certificate::Certificate;
use crate::metrics::Metrics;
use crate::status::{self, reason, Observation, DEGRADED};
use crate::validate::validate;
use crate::{DatabasePortal, Error, Result};

/// Requeue of a healthy DatabasePortal: a safety net; watches do the real work.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Requeue while cert-manager is missing, to notice when it is installed.
pub const CERT_MANAGER_RECHECK: Duration = Duration::from_secs(10);

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub support: ApiSupport,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        support: ApiSupport,
        metrics: Metrics,
        identity: &str,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(identity.into()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            support,
            metrics,
            failures: Mutex::default(),
        }
    }

    async fn publish(
        &self,
        dp: &DatabasePortal,
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
        if let Err(e) = self.recorder.publish(&event, &dp.object_ref(&())).await {
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

async fn reconcile_inner(dp: &DatabasePortal, ctx: &Context) -> Result<Action> {
    if dp.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove every child.
        return Ok(Action::await_change());
    }
    let previous_degraded =
        status::find(dp, DEGRADED).map(|c| (c.reason.clone(), c.message.clone()));
    let valid = match validate(dp) {
        Ok(valid) => valid,
        Err(Error::InvalidSpec(errors)) => {
            let new = status::invalid(dp, &errors, Timestamp::now());
            status::write(&ctx.client, dp, &new).await?;
            let err = Error::InvalidSpec(errors);
            ctx.metrics.failure(&err);
            let degraded = new.conditions.iter().find(|c| c.type_ == DEGRADED);
            let now_degraded = degraded.map(|c| (c.reason.clone(), c.message.clone()));
            if now_degraded != previous_degraded {
                warn!(portal = %key(dp), %err, "invalid spec; no child touched");
                ctx.publish(
                    dp,
                    EventType::Warning,
                    reason::INVALID_SPEC,
                    "Validate",
                    err.to_string(),
                )
                .await;
            }
            // Permanent until the spec changes, which the watch reports.
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    let uid = dp.uid().ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let children = build(dp, &valid, &ctx.settings)?;
    let applied = apply(&ctx.client, &ctx.support, &uid, &children).await?;
    let observation = Observation::from_applied(dp, &applied);
    let new = status::reconciled(dp, valid.config.port, &observation, Timestamp::now());
    status::write(&ctx.client, dp, &new).await?;

    let observed = dp.status.as_ref().and_then(|s| s.observed_generation);
    if observed.is_none() {
        info!(portal = %key(dp), "created portal children");
        let note =
            format!(
            "created ConfigMap, StatefulSet ({} portals), {} Services, RBAC, PodDisruptionBudget{}",
            dp.spec.portal.replicas,
            children.services.len(),
            if children.certificate.is_some() { ", Certificate" } else { "" }
        );
        ctx.publish(dp, EventType::Normal, "Created", "Create", note)
            .await;
    } else if observed != dp.meta().generation {
        info!(portal = %key(dp), generation = ?dp.meta().generation, "applied spec change");
        let note = format!(
            "applied generation {}",
            dp.meta().generation.unwrap_or_default()
        );
        ctx.publish(dp, EventType::Normal, "Updated", "Update", note)
            .await;
    }
    if let Some((reason, message)) = observation.degraded.first() {
        if previous_degraded.as_ref().map(|(r, _)| r.as_str()) != Some(*reason) {
            warn!(portal = %key(dp), reason, "degraded: {message}");
            ctx.publish(dp, EventType::Warning, reason, "Reconcile", message.clone())
                .await;
        }
    }
    Ok(match applied.certificate {
        CertificateState::CrdMissing => Action::requeue(CERT_MANAGER_RECHECK),
        _ => Action::requeue(RESYNC),
    })
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
    tokio::spawn(async move {
        ctx.publish(
            &dp,
            EventType::Warning,
            "ReconcileFailed",
            "Reconcile",
            note,
        )
        .await;
    });
    Action::requeue(delay)
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

/// The controller: DatabasePortals, and every child kind, so a deleted or edited child is
/// put back. `namespace` None watches all namespaces.
pub fn controller(
    client: &Client,
    namespace: Option<&str>,
    support: &ApiSupport,
    concurrency: u16,
) -> Controller<DatabasePortal> {
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let mut controller = Controller::new(
        api::<DatabasePortal>(client, namespace),
        watcher::Config::default(),
    )
    .owns(api::<ConfigMap>(client, namespace), children.clone())
    .owns(api::<ServiceAccount>(client, namespace), children.clone())
    .owns(api::<Role>(client, namespace), children.clone())
    .owns(api::<RoleBinding>(client, namespace), children.clone())
    .owns(api::<StatefulSet>(client, namespace), children.clone())
    .owns(api::<Service>(client, namespace), children.clone())
    // Fails (and retries with backoff) while cert-manager is not installed.
    .owns(api::<Certificate>(client, namespace), children.clone());
    if let Some(resource) = &support.pdb {
        let pdbs = match namespace {
            Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, resource),
            None => Api::<DynamicObject>::all_with(client.clone(), resource),
        };
        controller = controller.owns_with(pdbs, resource.clone(), children);
    }
    controller.with_config(ControllerConfig::default().concurrency(concurrency))
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
