//! Standalone configuration: the embedded default, loading the file, and re-reading it when
//! its content changes (polled) or on SIGHUP, publishing only configurations that validate.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{parse_yaml, Config, ConfigError};

/// The configuration used without `--config`: a redis portal on 127.0.0.1:6380 in front of
/// a local redis-server on 127.0.0.1:6379, plaintext, admin on 127.0.0.1:8404.
pub const DEFAULT_CONFIG: &str = include_str!("../examples/portal.yaml");

/// How often the file is compared with the last text read.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Outcome of configuration reloads, shown by `/status` and `/metrics`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReloadState {
    /// Where the configuration comes from (a path, "embedded default", a ConfigMap).
    pub source: String,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Whether the latest attempt succeeded.
    pub last_reload_ok: bool,
    /// Unix time of the latest configuration that was applied (or loaded at start).
    pub last_success_unix: f64,
    /// Why the latest attempt was refused; `None` once a later one succeeds.
    pub last_error: Option<String>,
    /// The fields named by `last_error`.
    pub last_error_fields: Vec<String>,
    /// The source holds a configuration that was refused: the portal serves an older one.
    pub stale: bool,
}

/// Shared handle on [`ReloadState`]; clones see the same state.
#[derive(Clone, Debug, Default)]
pub struct ReloadStatus(Arc<Mutex<ReloadState>>);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl ReloadStatus {
    /// A status for a configuration loaded from `source` just now.
    pub fn loaded(source: impl Into<String>) -> Self {
        ReloadStatus(Arc::new(Mutex::new(ReloadState {
            source: source.into(),
            last_reload_ok: true,
            last_success_unix: unix_now(),
            ..ReloadState::default()
        })))
    }

    fn with<T>(&self, f: impl FnOnce(&mut ReloadState) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn snapshot(&self) -> ReloadState {
        self.with(|s| s.clone())
    }

    /// A new configuration was applied.
    pub fn succeeded(&self) {
        self.with(|s| {
            s.reloads_ok += 1;
            s.last_reload_ok = true;
            s.last_success_unix = unix_now();
            s.last_error = None;
            s.last_error_fields.clear();
            s.stale = false;
        })
    }

    /// A new configuration was refused; the previous one keeps serving.
    pub fn failed(&self, error: &ConfigError) {
        self.with(|s| {
            s.reloads_failed += 1;
            s.last_reload_ok = false;
            s.last_error = Some(error.to_string());
            s.last_error_fields = error.fields().into_iter().map(String::from).collect();
            s.stale = true;
        })
    }

    /// The source went back to the configuration being served.
    pub fn current(&self) {
        self.with(|s| {
            s.last_reload_ok = true;
            s.last_error = None;
            s.last_error_fields.clear();
            s.stale = false;
        })
    }
}

/// Parses and validates a standalone configuration text.
pub fn parse_standalone(text: &str) -> Result<Config, ConfigError> {
    parse_yaml(text)?.validate_standalone()
}

/// Parses and validates the configuration of a portal in a cluster (a ConfigMap's
/// `portal.yaml`): the same rules as the operator's, without the standalone portal's
/// certificate files (the certificate comes from the TLS Secret).
pub fn parse_cluster(text: &str) -> Result<Config, ConfigError> {
    parse_yaml(text)?.validate()
}

/// Watches `path` until `tx` has no receivers: every [`POLL_INTERVAL`], and at once on SIGHUP,
/// the file is read and compared with `last_text`; a changed text that validates is
/// published, one that does not is refused (logged with its fields, recorded in `status`)
/// while the last good configuration keeps serving.
pub async fn watch_file(
    path: PathBuf,
    mut last_text: String,
    tx: watch::Sender<Arc<Config>>,
    status: ReloadStatus,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler; the file is still polled");
            None
        }
    };
    let mut read_error_logged = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                info!(path = %path.display(), "SIGHUP: re-reading the configuration");
            }
            _ = tx.closed() => return,
        }
        let text = match read_settled(&path).await {
            Ok(text) => {
                read_error_logged = false;
                text
            }
            Err(e) => {
                if !read_error_logged {
                    warn!(path = %path.display(), error = %e, "cannot read the configuration file; keeping the current configuration");
                    read_error_logged = true;
                }
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        last_text = text;
        apply(&last_text, &path.display().to_string(), &tx, &status);
    }
}

/// Validates `text` and publishes it on `tx` if it differs from the current configuration.
pub fn apply(
    text: &str,
    source: &str,
    tx: &watch::Sender<Arc<Config>>,
    status: &ReloadStatus,
) -> bool {
    publish(parse_standalone(text), source, tx, status)
}

/// Publishes a parsed configuration on `tx` if it differs from the current one, or records
/// and logs why it was refused (the last good configuration keeps serving). Shared by the
/// file and the ConfigMap watches.
pub fn publish(
    parsed: Result<Config, ConfigError>,
    source: &str,
    tx: &watch::Sender<Arc<Config>>,
    status: &ReloadStatus,
) -> bool {
    match parsed {
        Ok(config) => {
            let current = tx.borrow().clone();
            if *current == config {
                status.current();
                info!(
                    source,
                    "configuration unchanged in meaning; nothing to apply"
                );
                return true;
            }
            if current.listen != config.listen || current.admin != config.admin {
                warn!(
                    source,
                    listen = %config.listen,
                    admin = %config.admin,
                    "listen and admin addresses apply at the next start only"
                );
            }
            tx.send_replace(Arc::new(config));
            status.succeeded();
            info!(source, "configuration reloaded");
            true
        }
        Err(e) => {
            status.failed(&e);
            error!(
                source,
                error = %e,
                fields = ?e.fields(),
                "configuration refused; the last good configuration keeps serving"
            );
            false
        }
    }
}

/// Reads the file until two reads agree, so that a file caught mid-write is not judged.
async fn read_settled(path: &Path) -> std::io::Result<String> {
    let mut text = tokio::fs::read_to_string(path).await?;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let again = tokio::fs::read_to_string(path).await?;
        if again == text {
            break;
        }
        text = again;
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_local() {
        let c = parse_standalone(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:6380");
        assert_eq!(c.admin.to_string(), "127.0.0.1:8404");
        assert_eq!(c.backends[0].address.to_string(), "127.0.0.1:6379");
    }

    #[test]
    fn apply_refuses_and_keeps_the_last_good_one() {
        let good = parse_standalone(DEFAULT_CONFIG).unwrap();
        let (tx, rx) = watch::channel(Arc::new(good.clone()));
        let status = ReloadStatus::loaded("test");
        let bad = DEFAULT_CONFIG.replace("127.0.0.1:6379", "127.0.0.1:0");
        assert!(!apply(&bad, "test", &tx, &status));
        assert_eq!(**rx.borrow(), good);
        let s = status.snapshot();
        assert!(s.stale);
        assert_eq!(s.reloads_failed, 1);
        assert_eq!(s.last_error_fields, vec!["backends[0].address".to_string()]);
        let changed = DEFAULT_CONFIG.replace("maxConnections: 2000", "maxConnections: 10");
        assert_ne!(changed, DEFAULT_CONFIG);
        assert!(apply(&changed, "test", &tx, &status));
        assert_eq!(rx.borrow().max_connections, 10);
        let s = status.snapshot();
        assert!(!s.stale && s.last_error.is_none() && s.reloads_ok == 1);
    }
}
