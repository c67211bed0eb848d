//! The operator's binary: `operator crd` prints the CRD, `operator` runs the operator.
//!
//! May import: the library's root only (`run`, `Args`, `crd_yaml`, …).

use clap::Parser;
use operator::{Args, Command};

/// One worker thread: the operator waits on the API server (one converged 300
/// DatabasePortals as fast as two in `bench/operator.sh`), and each further thread costs
/// memory (its own malloc arena); the default, one per core, grows with the node.
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Crd) = args.command {
        print!("{}", operator::crd_yaml());
        return Ok(());
    }
    operator::init_tracing(args.log_level.as_deref(), args.log_format)?;
    let shutdown = operator::shutdown_signal();
    let client = kube::Client::try_default().await?;
    let http = tokio::net::TcpListener::bind(args.metrics_address).await?;
    operator::run(client, args, http, shutdown).await?;
    Ok(())
}
