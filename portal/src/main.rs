//! The portal binary: parses arguments, sets up logging and runs the standalone portal.

use std::path::PathBuf;

use clap::Parser;

/// dbportal's portal: a TCP proxy in front of database nodes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (YAML, the DatabasePortal spec plus listen, admin, drainTimeout). It
    /// is re-read when it changes and on SIGHUP. Without it, an embedded default serves
    /// 127.0.0.1:6380 in front of a redis-server on 127.0.0.1:6379.
    #[arg(long, env = "PORTAL_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = async {
            if let Err(e) = portal::server::shutdown_signal().await {
                tracing::error!(error = %e, "no signal handler; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        };
        portal::server::standalone(args.config, shutdown).await
    })?;
    Ok(())
}
