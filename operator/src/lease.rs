//! Leader election through a `coordination.k8s.io/v1` Lease: one replica holds the lease and
//! runs the controller; the others wait and take over when it stops renewing.
//!
//! May import: `error`.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::error::api_code;

/// Timing of the election, as client-go's (defaults 15 s / 10 s / 2 s).
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease name, in `namespace`.
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease stays valid after its last renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    /// Time between two attempts.
    pub retry_period: Duration,
}

impl LeaseSettings {
    pub fn new(name: &str, namespace: &str, identity: &str) -> Self {
        LeaseSettings {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What to do with the lease as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Someone else holds a valid lease.
    Follow(String),
}

/// Decides from the lease as read, our identity and the time. Pure, for tests.
pub fn decide(spec: &LeaseSpec, identity: &str, now: Timestamp) -> Decision {
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into());
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(renewed) if renewed + duration > now => Decision::Follow(holder),
        _ => Decision::Acquire,
    }
}

/// The lease we write when we take or renew it.
pub fn claimed(
    previous: Option<&LeaseSpec>,
    settings: &LeaseSettings,
    now: Timestamp,
) -> LeaseSpec {
    let ours = previous
        .and_then(|p| p.holder_identity.as_deref())
        .is_some_and(|h| h == settings.identity);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(settings.lease_duration.as_secs() as i32),
        acquire_time: if ours {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

/// Runs the election until `stop` fires, publishing leadership on `leader`. On stop, a leader
/// releases the lease so a standby takes over at once.
pub async fn run(
    api: Api<Lease>,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_renewal: Option<tokio::time::Instant> = None;
    // The last failure, said once: the same failure every `retry_period` is logged at debug.
    let mut failing: Option<String> = None;
    loop {
        let now = Timestamp::now();
        let result = try_once(&api, &settings, now).await;
        if result.is_ok() {
            if let Some(previous) = failing.take() {
                info!(lease = %settings.name, namespace = %settings.namespace, %previous, "the lease can be written again");
            }
        }
        match result {
            Ok(true) => {
                if !*leader.borrow() {
                    info!(identity = %settings.identity, lease = %settings.name, "became leader");
                }
                last_renewal = Some(tokio::time::Instant::now());
                leader.send_replace(true);
            }
            Ok(false) => {
                if *leader.borrow() {
                    warn!("lost the lease to another replica");
                }
                last_renewal = None;
                leader.send_replace(false);
            }
            Err(e) => {
                let text = e.to_string();
                if failing.as_deref() == Some(text.as_str()) {
                    debug!(error = %e, "lease update failed again");
                } else if namespace_missing(&e) {
                    error!(
                        "{}",
                        namespace_missing_advice(&settings.namespace, settings.retry_period)
                    );
                } else {
                    warn!(error = %e, retry = ?settings.retry_period, "lease update failed; retrying");
                }
                failing = Some(text);
                let expired = last_renewal.is_none_or(|t| t.elapsed() >= settings.renew_deadline);
                if expired && *leader.borrow() {
                    warn!("could not renew the lease in time; stepping down");
                    leader.send_replace(false);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.retry_period) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        if let Err(e) = release(&api, &settings).await {
            warn!(error = %e, "could not release the lease");
        }
    }
}

/// The lease's namespace does not exist (the API server refuses to create an object in it).
pub fn namespace_missing(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            status.code == 404
                && status
                    .details
                    .as_ref()
                    .is_some_and(|d| d.kind == "namespaces")
        }
        _ => false,
    }
}

/// What to do when the lease namespace is missing, said once.
pub fn namespace_missing_advice(namespace: &str, retry: Duration) -> String {
    format!(
        "leader election needs its Lease in namespace {namespace:?}, which does not exist. \
         Create it (kubectl create namespace {namespace}), or pass --lease-namespace NAMESPACE \
         (env POD_NAMESPACE) naming an existing one, or --leader-election=false when only one \
         operator runs. Until then this replica waits as a standby and retries every {retry:?} \
         without repeating this message."
    )
}

/// One read-decide-write round; true when we hold the lease afterwards.
pub async fn try_once(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(&settings.name).await?;
    let Some(mut lease) = current else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..Default::default()
            },
            spec: Some(claimed(None, settings, now)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if api_code(&e) == Some(409) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    match decide(&spec, &settings.identity, now) {
        Decision::Follow(_) => Ok(false),
        Decision::Renew | Decision::Acquire => {
            lease.spec = Some(claimed(Some(&spec), settings, now));
            // The read resourceVersion stays in metadata: a concurrent writer makes this 409.
            match api
                .replace(&settings.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if api_code(&e) == Some(409) => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Gives the lease up (holder cleared), if we still hold it.
pub async fn release(api: &Api<Lease>, settings: &LeaseSettings) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    spec.acquire_time = None;
    api.replace(&settings.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            acquire_time: Some(MicroTime(at(0))),
            lease_transitions: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_lease_of_another_is_followed() {
        assert_eq!(
            decide(&held_by("b", 10), "a", at(20)),
            Decision::Follow("b".into())
        );
    }

    #[test]
    fn an_expired_or_free_lease_is_taken() {
        assert_eq!(decide(&held_by("b", 10), "a", at(26)), Decision::Acquire);
        assert_eq!(decide(&LeaseSpec::default(), "a", at(0)), Decision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed_even_when_late() {
        assert_eq!(decide(&held_by("a", 0), "a", at(100)), Decision::Renew);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let s = LeaseSettings::new("l", "ns", "a");
        let taken = claimed(Some(&held_by("b", 0)), &s, at(30));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(30))));
        let renewed = claimed(Some(&held_by("a", 0)), &s, at(30));
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(30))));
    }
}
