//! dbportal's operator: reconciles each DatabasePortal into its portal pods, Services,
//! ConfigMap, Certificate, RBAC and PodDisruptionBudget, and reports status.
//!
//! The crate root owns `run`: the HTTP endpoint, leader election and the controller while
//! this replica leads. It sits on top, and no module but the tests imports it (modules name
//! each other by path, `crate::error::Error`, never the root's re-exports). The layers,
//! bottom up, are drawn in the README.
//!
//! May import: `apply`, `args`, `controller`, `error`, `http`, `lease`, `metrics`,
//! `watches`: any module.
#![forbid(unsafe_code)]

pub mod admin_token;
pub mod apply;
pub mod args;
pub mod build;
pub mod certificate;
pub mod conditions;
pub mod controller;
pub mod error;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod names;
pub mod pods;
pub mod portals;
pub mod self_signed;
pub mod status;
pub mod track;
pub mod validate;
pub mod watches;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod mock_tests;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

pub use args::{Args, Command};
pub use error::{Error, Result};
pub use portal::config::{DatabasePortal, DatabasePortalSpec, DatabasePortalStatus};

/// The CRD as YAML, exactly as committed in `crds/databaseportal.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_norway::to_string(&DatabasePortal::crd()).expect("the CRD serializes")
}

/// Why the operator stopped other than by its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("lost the leader-election lease")]
    LostLeadership,
}

/// Runs the operator until `shutdown` resolves: the HTTP endpoint on `http`, leader election
/// (if enabled) and the controller while this replica leads.
pub async fn run(
    client: Client,
    args: Args,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let metrics = metrics::Metrics::default();
    let readiness = http::Readiness::default();
    let server = tokio::spawn(http::serve(http, metrics.clone(), readiness.clone()));
    let _server = AbortOnDrop(server);

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        stop_tx.send_replace(true);
    });

    // A stop while the API server is still being reached ends the run at once.
    let mut stop = stop_rx.clone();
    let support = tokio::select! {
        support = apply::ApiSupport::discover(&client) => support?,
        _ = async { let _ = stop.wait_for(|s| *s).await; } => return Ok(()),
    };
    let identity = args.identity();
    readiness.set(true);

    let (leader_tx, mut leader_rx) = watch::channel(!args.leader_election);
    // Without an election the sender stays here for the whole run: a dropped sender would end
    // every wait on the channel at once, and with it the controller.
    let (election, _leader_tx) = if args.leader_election {
        let settings =
            lease::LeaseSettings::new(&args.lease_name, &args.lease_namespace, &identity);
        let api: Api<Lease> = Api::namespaced(client.clone(), &args.lease_namespace);
        let task = tokio::spawn(lease::run(api, settings, leader_tx, stop_rx.clone()));
        (Some(task), None)
    } else {
        (None, Some(leader_tx))
    };

    let mut stop = stop_rx.clone();
    // Leading means the election said so: its channel closing (the election ended, as it does
    // at a stop) is not leadership.
    let leading = async {
        if leader_rx.wait_for(|l| *l).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        biased;
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            if let Some(e) = election { let _ = e.await; }
            return Ok(());
        }
        _ = leading => {}
    }
    info!(%identity, namespace = args.watch_namespace().unwrap_or("(all)"), "leading; starting the controller");
    metrics.set_leader(true);

    let (controller, watched) = watches::controller(
        &client,
        args.watch_namespace(),
        support.pdb.as_ref(),
        args.concurrency,
    );
    let ctx = Arc::new(controller::Context::new(
        client.clone(),
        args.settings(),
        support.clone(),
        metrics.clone(),
        &identity,
        watched,
    ));
    let (mut stop2, mut leader2) = (stop_rx.clone(), leader_rx.clone());
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let stopping = async move {
        tokio::select! {
            _ = async { let _ = stop2.wait_for(|s| *s).await; } => {}
            _ = async { let _ = leader2.wait_for(|l| !*l).await; } => {}
        }
        stopping_tx.send_replace(true);
    };
    // Reconciles in flight get `SHUTDOWN_GRACE` to finish; a reconcile waiting on a slow API
    // server must not keep the process from exiting.
    let grace = async move {
        let mut stopping = stopping_rx;
        let _ = stopping.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        _ = controller::run_controller(controller, ctx, stopping) => {}
        _ = grace => warn!(grace = ?SHUTDOWN_GRACE, "reconciles still running; stopping without them"),
    }
    metrics.set_leader(false);
    if let Some(e) = election {
        if !*stop_rx.borrow() {
            e.abort();
            return Err(RunError::LostLeadership);
        }
        let _ = e.await;
    }
    Ok(())
}

/// How long reconciles in flight may take to finish once the operator stops.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled, so a signal that arrives during start-up is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received; stopping"),
            _ = int.recv() => info!("SIGINT received; stopping"),
        }
    }
}

/// Logs to stderr: `level` (a tracing filter such as `info` or `operator=debug`), else
/// `RUST_LOG`, else info; text (ANSI colours only on a terminal) or JSON lines.
pub fn init_tracing(
    level: Option<&str>,
    format: portal::config::LogFormat,
) -> Result<(), portal::logging::LogError> {
    portal::logging::init(level, format)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
