//! The reconciler: `validate -> build -> apply -> status` for one DatabasePortal, the error
//! policy (backoff), events, and the kube-runtime `Controller` with a watch on every child kind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::fmt::Debug;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ObjectMeta, PartialObjectMeta};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::apply::{apply, ApiSupport, CertificateState, Known};
use crate::build::{build, Settings, MANAGER};
use crate::certificate::Certificate;
use crate::metrics::Metrics;
use crate::status::{self, reason, Observation, DEGRADED};
use crate::track::{self, ChildKey, Kind, Stores, Writers};
use crate::validate::validate;
use crate::{DatabasePortal, DatabasePortalStatus, Error, Result};

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
    /// The watched children (filled by the controller's reflectors).
    pub stores: Stores,
    /// What this process last applied to each child.
    pub applied: Arc<track::Applied>,
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
        watched: Watched,
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
            stores: watched.stores,
            applied: watched.applied,
            failures: Mutex::default(),
        }
    }

    fn known(&self) -> Known<'_> {
        Known {
            stores: &self.stores,
            applied: &self.applied,
            metrics: &self.metrics,
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
        let (ctx, dp, reason, action) = (
            self.clone(),
            dp.clone(),
            reason.to_string(),
            action.to_string(),
        );
        tokio::spawn(async move { ctx.publish(&dp, type_, &reason, &action, note).await });
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

async fn reconcile_inner(dp: &DatabasePortal, ctx: &Arc<Context>) -> Result<Action> {
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
            write_status(ctx, dp, &new).await?;
            let err = Error::InvalidSpec(errors);
            ctx.metrics.failure(&err);
            let degraded = new.conditions.iter().find(|c| c.type_ == DEGRADED);
            let now_degraded = degraded.map(|c| (c.reason.clone(), c.message.clone()));
            if now_degraded != previous_degraded {
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
    let applied = apply(&ctx.client, &ctx.support, ctx.known(), &uid, &children).await?;
    let observation = Observation::from_applied(dp, &applied);
    let new = status::reconciled(dp, valid.config.port, &observation, Timestamp::now());
    write_status(ctx, dp, &new).await?;

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
    Ok(match applied.certificate {
        CertificateState::CrdMissing => Action::requeue(CERT_MANAGER_RECHECK),
        _ => Action::requeue(RESYNC),
    })
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

/// The watched children and the record of applies, shared by the controller's watches and
/// the reconciles.
#[derive(Clone)]
pub struct Watched {
    pub stores: Stores,
    pub applied: Arc<track::Applied>,
}

impl Watched {
    /// Nothing watched: every reconcile applies every child.
    pub fn none() -> Self {
        Watched {
            stores: Stores::empty(),
            applied: Arc::default(),
        }
    }
}

/// A child watch: reflects into `writer` (after `strip`), forgets the record of a deleted
/// child, backs off on its own when failing (the Certificate watch fails while cert-manager is
/// not installed), and yields the touched children for `owns_stream`.
fn child_watch<K>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    writer: Writer<K>,
    kind: Kind,
    applied: Arc<track::Applied>,
    strip: fn(&mut K),
) -> impl Stream<Item = watcher::Result<K>> + Send + 'static
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    stream
        .default_backoff()
        .modify(strip)
        .inspect(move |event| {
            if let Ok(watcher::Event::Delete(child)) = event {
                let key = ChildKey::new(
                    kind,
                    child.meta().namespace.as_deref().unwrap_or_default(),
                    child.meta().name.as_deref().unwrap_or_default(),
                );
                applied.forget(&key);
            }
        })
        .reflect(writer)
        .touched_objects()
        // Errors are retried above; passing them on would pause every trigger.
        .filter(move |r| {
            if let Err(e) = r {
                debug!(error = %e, ?kind, "child watch");
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
    support: &ApiSupport,
    concurrency: u16,
) -> (Controller<DatabasePortal>, Watched) {
    let config =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    let (stores, writers) = Stores::new(support.pdb.as_ref());
    let applied = Arc::<track::Applied>::default();
    let Writers {
        config_maps,
        service_accounts,
        roles,
        role_bindings,
        stateful_sets,
        services,
        certificates,
        pdbs,
    } = writers;
    let a = || applied.clone();
    let mut controller = Controller::new(
        api::<DatabasePortal>(client, namespace),
        watcher::Config::default(),
    )
    .owns_stream(child_watch(
        metadata::<ConfigMap>(client, namespace, &config),
        config_maps,
        Kind::ConfigMap,
        a(),
        strip_metadata,
    ))
    .owns_stream(child_watch(
        metadata::<ServiceAccount>(client, namespace, &config),
        service_accounts,
        Kind::ServiceAccount,
        a(),
        strip_metadata,
    ))
    .owns_stream(child_watch(
        metadata::<Role>(client, namespace, &config),
        roles,
        Kind::Role,
        a(),
        strip_metadata,
    ))
    .owns_stream(child_watch(
        metadata::<RoleBinding>(client, namespace, &config),
        role_bindings,
        Kind::RoleBinding,
        a(),
        strip_metadata,
    ))
    .owns_stream(child_watch(
        watcher(api::<StatefulSet>(client, namespace), config.clone()),
        stateful_sets,
        Kind::StatefulSet,
        a(),
        strip_stateful_set,
    ))
    .owns_stream(child_watch(
        metadata::<Service>(client, namespace, &config),
        services,
        Kind::Service,
        a(),
        strip_metadata,
    ))
    .owns_stream(child_watch(
        watcher(api::<Certificate>(client, namespace), config.clone()),
        certificates,
        Kind::Certificate,
        a(),
        strip_certificate,
    ));
    if let (Some(resource), Some(writer)) = (&support.pdb, pdbs) {
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
            ),
            resource.clone(),
        );
    }
    let controller = controller.with_config(ControllerConfig::default().concurrency(concurrency));
    (controller, Watched { stores, applied })
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
