//! The portal binary: parses arguments, sets up logging and runs the portal, standalone (a
//! file) or in a cluster (a ConfigMap).
//!
//! May import: the library (`server`, `cluster::Options`, `reload`, `tls`, `logging`).

use std::path::PathBuf;

use clap::Parser;

/// dbportal's portal: a TCP proxy in front of database nodes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (YAML, the DatabasePortal spec plus listen, admin, drainTimeout). It
    /// is re-read when it changes and on SIGHUP. Without it, an embedded default serves
    /// 127.0.0.1:6380 in front of a redis-server on 127.0.0.1:6379.
    #[arg(long, env = "PORTAL_CONFIG", conflicts_with = "configmap")]
    config: Option<PathBuf>,
    /// In a cluster: the ConfigMap whose `portal.yaml` is the configuration, watched through
    /// the Kubernetes API (in-cluster credentials, or KUBECONFIG) and applied live.
    #[arg(long)]
    configmap: Option<String>,
    /// Namespace of the ConfigMap and Secrets (default: the pod's, else the kubeconfig's).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// In a cluster: the `kubernetes.io/tls` Secret with the served certificate, swapped live.
    #[arg(long, requires = "configmap")]
    tls_secret: Option<String>,
    /// In a cluster: the Secret with the probes' `username` and `password` (default: the
    /// configuration's `healthCheck.credentialsSecret`).
    #[arg(long, requires = "configmap")]
    credentials_secret: Option<String>,
    /// In a cluster: the Secret with the users clients AUTH as under Redis multiplexing, one
    /// key per user name (default: the configuration's `pooling.auth.usersSecret`).
    #[arg(long, requires = "configmap")]
    users_secret: Option<String>,
    /// In a cluster: this portal's Pod, where it reports its view in an annotation.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Validate the configuration FILE (as `--config` would load it, certificate files
    /// included) and exit: 0 and one line `... OK` on stdout, or 1 and the error naming the
    /// field on stderr.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "configmap"])]
    check: Option<PathBuf>,
    /// Log level, a tracing filter (`info`, `debug`, `warn,portal=debug`); default `RUST_LOG`,
    /// else info.
    #[arg(long, env = "DBPORTAL_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format: text (coloured only on a terminal) or json (one object per line).
    #[arg(long, env = "DBPORTAL_LOG_FORMAT", default_value = "text")]
    log_format: portal::logging::LogFormat,
}

/// `--check FILE`: what `haproxy -c` is to HAProxy.
fn check(path: &std::path::Path) -> std::process::ExitCode {
    let shown = path.display();
    let result = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read it: {e}"))
        .and_then(|text| portal::reload::parse_standalone(&text).map_err(|e| e.to_string()))
        .and_then(|config| {
            portal::tls::TlsRuntime::check(&config)
                .map(|()| config)
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(config) => {
            println!(
                "{shown}: configuration OK ({}, {} backends, listen {}, admin {}, tls {})",
                config.engine.as_str(),
                config.backends.len(),
                config.listen,
                config.admin,
                format!("{:?}", config.tls.mode).to_lowercase(),
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{shown}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    if let Some(path) = &args.check {
        return Ok(check(path));
    }
    portal::logging::init(args.log_level.as_deref(), args.log_format)?;
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
        match args.configmap {
            Some(configmap) => {
                let client = kube::Client::try_default().await?;
                let namespace = args
                    .namespace
                    .unwrap_or_else(|| client.default_namespace().to_string());
                let options = portal::cluster::Options {
                    namespace,
                    configmap,
                    tls_secret: args.tls_secret,
                    credentials_secret: args.credentials_secret,
                    users_secret: args.users_secret,
                    pod_name: args.pod_name,
                };
                portal::server::cluster(client, options, shutdown).await
            }
            None => Ok(portal::server::standalone(args.config, shutdown).await?),
        }
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}
