//! Health probes and the checker against real servers on loopback (Redis, PostgreSQL, MariaDB,
//! etcd) and small fakes (KeyDB roles, a loading node, custom steps).

#[path = "../common/mod.rs"]
mod common;

mod backend_tls;
mod fakes;
mod real_servers;
mod replication;

use common::tls as tlsca;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::fake_redis::{Fake, FakeRedis};
use common::*;
use portal::{
    config::{Address, Config},
    health::{
        probe::{probe, probe_node, ProbeError, ProbeSettings},
        spawn_checker, HealthHandle, HealthView, ProbeCredentials, Role, StandaloneCredentials,
    },
};
use tokio::sync::watch;

/// A validated configuration for `engine` with these backends and extra YAML (plaintext
/// clients unless `extra` has a `tls:` of its own).
fn config(engine: &str, backends: &[String], extra: &str) -> Config {
    let tls = if extra.contains("tls:") {
        ""
    } else {
        "tls: {mode: disabled}\n"
    };
    let mut yaml = format!("engine: {engine}\nport: 7000\n{tls}backends:\n");
    for (i, b) in backends.iter().enumerate() {
        yaml.push_str(&format!("  - {{name: n{i}, address: \"{b}\"}}\n"));
    }
    yaml.push_str(extra);
    portal::config::parse_yaml(&yaml)
        .and_then(|s| s.validate())
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn settings(config: &Config, creds: Option<ProbeCredentials>) -> ProbeSettings {
    ProbeSettings::new(config, Arc::new(creds))
}

fn creds(user: Option<&str>, password: &str) -> Option<ProbeCredentials> {
    Some(ProbeCredentials {
        username: user.map(String::from),
        password: password.into(),
    })
}

fn addr(a: &str) -> Address {
    a.parse().unwrap()
}

async fn probe_one(
    config: &Config,
    creds: Option<ProbeCredentials>,
    a: &str,
) -> Result<Role, ProbeError> {
    probe(&settings(config, creds), &addr(a)).await
}

/// Waits until the published view satisfies `ok`.
async fn wait_view(
    rx: &mut watch::Receiver<HealthView>,
    within: Duration,
    what: &str,
    ok: impl Fn(&HealthView) -> bool,
) -> HealthView {
    let seen = match tokio::time::timeout(within, rx.wait_for(|v| ok(v))).await {
        Ok(Ok(v)) => Some(v.clone()),
        _ => None,
    };
    seen.unwrap_or_else(|| {
        panic!(
            "{what} not seen within {within:?}; last view: {:#?}",
            *rx.borrow()
        )
    })
}

fn start(config: Config) -> (watch::Sender<Arc<Config>>, HealthHandle) {
    let (tx, rx) = watch::channel(Arc::new(config));
    let handle = spawn_checker(rx, Arc::new(StandaloneCredentials));
    (tx, handle)
}
