//! dbportal's operator: reconciles each DatabasePortal into its portal pods, Services,
//! ConfigMap, Certificate, RBAC and PodDisruptionBudget, and reports status.
#![forbid(unsafe_code)]

pub mod apply;
pub mod args;
pub mod build;
pub mod certificate;
pub mod controller;
pub mod error;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod portals;
pub mod status;
pub mod track;
pub mod validate;

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
use tracing::info;

pub use args::{Args, Command};
pub use error::{Error, Result};
pub use portal::config::{DatabasePortal, DatabasePortalSpec, DatabasePortalStatus};

/// The CRD as YAML, exactly as committed in `crds/databaseportal.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&DatabasePortal::crd()).expect("the CRD serializes")
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

    let support = apply::ApiSupport::discover(&client).await?;
    let identity = args.identity();
    readiness.set(true);

    let (leader_tx, mut leader_rx) = watch::channel(!args.leader_election);
    let election = args.leader_election.then(|| {
        let settings =
            lease::LeaseSettings::new(&args.lease_name, &args.lease_namespace, &identity);
        let api: Api<Lease> = Api::namespaced(client.clone(), &args.lease_namespace);
        tokio::spawn(lease::run(api, settings, leader_tx, stop_rx.clone()))
    });

    let mut stop = stop_rx.clone();
    tokio::select! {
        _ = async { let _ = leader_rx.wait_for(|l| *l).await; } => {}
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            if let Some(e) = election { let _ = e.await; }
            return Ok(());
        }
    }
    info!(%identity, namespace = args.watch_namespace().unwrap_or("(all)"), "leading; starting the controller");
    metrics.set_leader(true);

    let (controller, watched) =
        controller::controller(&client, args.watch_namespace(), &support, args.concurrency);
    let ctx = Arc::new(controller::Context::new(
        client.clone(),
        args.settings(),
        support.clone(),
        metrics.clone(),
        &identity,
        watched,
    ));
    let (mut stop2, mut leader2) = (stop_rx.clone(), leader_rx.clone());
    let stopping = async move {
        tokio::select! {
            _ = async { let _ = stop2.wait_for(|s| *s).await; } => {}
            _ = async { let _ = leader2.wait_for(|l| !*l).await; } => {}
        }
    };
    controller::run_controller(controller, ctx, stopping).await;
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

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
