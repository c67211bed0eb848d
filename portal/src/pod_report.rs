//! What a portal in a cluster says about itself on its own Pod: a [`Report`] (ready, the
//! leader it sees, its backends with their health and administrative state, whether its
//! configuration is stale) in an annotation, patched when it changes. The operator reads it
//! into the DatabasePortal's status.
//!
//! May import: `config`, `control`, `health`, `reload`, `route`.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::{BackendState, Config},
    control::Overrides,
    health::HealthView,
    reload::{self, ReloadStatus},
    route,
};

/// The annotation of the portal's own Pod that carries its [`Report`] (JSON).
pub const REPORT_ANNOTATION: &str = "dbportal.dev/report";
/// The least time between two patches of the report.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// What a portal reports about itself on its Pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// A configuration is served and some backend is routable.
    pub ready: bool,
    /// The leader this portal sees (none while there is a conflict).
    pub leader: Option<String>,
    pub backends: Vec<BackendReport>,
    /// The ConfigMap holds a configuration that was refused; an older one is served.
    pub config_stale: bool,
    /// With `readOnly`: the backends serving the read-only listener now (the replicas within
    /// `maxLag`, or the leader as the fallback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reads: Option<Vec<String>>,
}

/// One backend as a portal sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendReport {
    pub name: String,
    pub up: bool,
    pub role: &'static str,
    /// `busy` or `misconf` while an up backend answers with a caveat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// `drain` or `maint` (from the configuration or the admin endpoint); absent when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_state: Option<&'static str>,
}

impl Report {
    /// The report of a portal serving `config` with the health view `health`.
    pub fn new(
        config: &Config,
        health: &HealthView,
        overrides: &Overrides,
        reload: &reload::ReloadState,
    ) -> Self {
        let admin_state = |name: &str| {
            config
                .backends
                .iter()
                .find(|b| b.name == name)
                .map(|b| overrides.state(b))
                .filter(|s| !s.is_ready())
                .map(BackendState::as_str)
        };
        Report {
            ready: !route::eligible(config, health, overrides).is_empty(),
            leader: health.leader_name().map(str::to_string),
            backends: health
                .backends
                .iter()
                .map(|b| BackendReport {
                    name: b.name.clone(),
                    up: b.up,
                    role: b.role.as_str(),
                    state: b.caveat.filter(|_| b.up).map(|c| c.as_str()),
                    admin_state: admin_state(&b.name),
                })
                .collect(),
            config_stale: reload.stale,
            reads: config
                .read_only
                .as_ref()
                .map(|_| route::serving_reads(config, health, overrides)),
        }
    }
}

/// Patches the portal's [`Report`] onto its Pod whenever it changes, at most once per
/// [`REPORT_INTERVAL`]; a failed patch is retried at the next interval.
pub async fn report(
    pods: Api<Pod>,
    pod: String,
    mut config: watch::Receiver<Arc<Config>>,
    mut health: watch::Receiver<HealthView>,
    mut overrides: watch::Receiver<Arc<Overrides>>,
    status: ReloadStatus,
) {
    let mut sent: Option<Report> = None;
    let mut failing = false;
    loop {
        let now = {
            let c = config.borrow_and_update().clone();
            let h = health.borrow_and_update().clone();
            let o = overrides.borrow_and_update().clone();
            Report::new(&c, &h, &o, &status.snapshot())
        };
        if sent.as_ref() != Some(&now) {
            match patch_report(&pods, &pod, &now).await {
                Ok(()) => {
                    if failing {
                        info!(pod = %pod, "reporting on the Pod again");
                    }
                    failing = false;
                    sent = Some(now);
                }
                Err(e) => {
                    if !failing {
                        warn!(pod = %pod, error = %e, "cannot report on the Pod; retrying");
                    }
                    failing = true;
                }
            }
        }
        tokio::time::sleep(REPORT_INTERVAL).await;
        // Wake on a change, or after an interval (the reload status has no notification).
        tokio::select! {
            r = config.changed() => if r.is_err() { return },
            r = health.changed() => if r.is_err() { return },
            r = overrides.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(REPORT_INTERVAL) => {}
        }
    }
}

async fn patch_report(pods: &Api<Pod>, pod: &str, report: &Report) -> anyhow::Result<()> {
    let value = serde_json::to_string(report)?;
    let patch = serde_json::json!({ "metadata": { "annotations": { REPORT_ANNOTATION: value } } });
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patching Pod {pod}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Control;

    #[test]
    fn report_names_the_leader_unless_in_conflict() {
        let config = reload::parse_cluster(
            "engine: redis\nbackends: [{name: a, address: \"127.0.0.1:6379\"}, {name: b, address: \"127.0.0.1:6380\"}]\n",
        )
        .unwrap();
        let mut view = HealthView::assume_up(["a", "b"]);
        view.leader = Some(1);
        let state = reload::ReloadState::default();
        let r = Report::new(&config, &view, &Overrides::default(), &state);
        assert_eq!(r.leader.as_deref(), Some("b"));
        assert!(r.ready);
        view.conflict = true;
        assert_eq!(
            Report::new(&config, &view, &Overrides::default(), &state).leader,
            None
        );
        let json = serde_json::to_value(Report::new(&config, &view, &Overrides::default(), &state))
            .unwrap();
        assert_eq!(json["backends"][0]["role"], "unknown");
        assert!(json.get("configStale").is_some());
        assert!(
            json["backends"][0].get("state").is_none(),
            "no caveat, no state"
        );

        // A busy leader is reported as such, and still as the leader; a down node never is.
        view.conflict = false;
        view.backends[1].caveat = Some(crate::health::Caveat::Busy);
        view.backends[0].caveat = Some(crate::health::Caveat::Misconf);
        view.backends[0].up = false;
        let json = serde_json::to_value(Report::new(&config, &view, &Overrides::default(), &state))
            .unwrap();
        assert_eq!(json["leader"], "b");
        assert_eq!(json["backends"][1]["state"], "busy");
        assert!(json["backends"][0].get("state").is_none());
        assert!(
            json["backends"][1].get("adminState").is_none(),
            "ready is not reported"
        );

        // A drained leader: reported, and the portal has nothing to route new sessions to.
        let control = Control::default();
        control.set_state("b", Some(BackendState::Drain));
        let r = Report::new(&config, &view, &control.current(), &state);
        assert!(!r.ready);
        let json = serde_json::to_value(r).unwrap();
        assert_eq!(json["backends"][1]["adminState"], "drain");
    }
}
