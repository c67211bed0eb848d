use clap::Parser;
use operator::{Args, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Crd) = args.command {
        print!("{}", operator::crd_yaml());
        return Ok(());
    }
    operator::init_tracing();
    let client = kube::Client::try_default().await?;
    let http = tokio::net::TcpListener::bind(args.metrics_address).await?;
    operator::run(client, args, http, operator::shutdown_signal()).await?;
    Ok(())
}
