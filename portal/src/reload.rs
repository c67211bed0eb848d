//! Standalone configuration: the embedded default, loading the file, and re-reading it when a
//! write to it completes (inotify: close after write, or a rename onto it as editors and
//! ConfigMap volumes do), on SIGHUP, or when polling finds it changed and then stable;
//! publishing only configurations that validate.
//!
//! A file is never applied mid-write: the part written so far can be a valid configuration
//! (one that admits everyone, if `allowedCIDRs` comes last). Atomic replacement (write a
//! temporary file, rename it onto the configuration) is the supported way to change it.
//!
//! May import: `config`, `metrics`.

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

/// A change that only polling saw (no inotify event: a filesystem without inotify, a missed
/// event) is applied once the file has kept the same content this long and no writer is known
/// to have it open.
pub const POLL_STABLE: Duration = Duration::from_secs(5);

/// The largest configuration accepted: a ConfigMap holds at most 1 MiB, and a larger file is
/// refused before it is read whole.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a configuration file of at most [`MAX_CONFIG_BYTES`] (a ConfigMap's limit).
pub fn read_config(path: &Path) -> std::io::Result<String> {
    crate::config::read_limited(path, MAX_CONFIG_BYTES)
}

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

/// Watches `path` until `tx` has no receivers. A write that completes (inotify close-after-
/// write on the file, a rename onto it or onto a ConfigMap volume's `..data`) and SIGHUP
/// re-read the file at once; polling every [`POLL_INTERVAL`] catches what events miss, but
/// applies a change only once it has been stable for [`POLL_STABLE`] with no writer holding
/// the file. A changed text that validates is published; one that does not is refused (logged
/// with its fields, recorded in `status`) while the last good configuration keeps serving.
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
            warn!(error = %e, "cannot install the SIGHUP handler; the file is still watched");
            None
        }
    };
    let mut events = match FileEvents::start(&path) {
        Ok(events) => Some(events),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot watch the configuration file with inotify; changes are applied once the file has been stable for {POLL_STABLE:?}");
            None
        }
    };
    let mut read_error_logged = false;
    // A writer has the file open (modified, not closed yet), as far as inotify tells.
    let mut writing = false;
    // A change that polling saw, and since when it has been the file's content.
    let mut seen: Option<(String, tokio::time::Instant)> = None;
    loop {
        let complete = tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                info!(path = %path.display(), "SIGHUP: re-reading the configuration");
                true
            }
            event = async { match events.as_mut() { Some(e) => e.next().await, None => std::future::pending().await } } => match event {
                Some(FileEvent::Modified) => {
                    writing = true;
                    continue;
                }
                Some(FileEvent::Complete) => {
                    writing = false;
                    true
                }
                None => {
                    warn!(path = %path.display(), "the inotify watch ended; changes are applied once the file has been stable for {POLL_STABLE:?}");
                    events = None;
                    writing = false;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        let text = match read_config(&path) {
            Ok(text) => {
                read_error_logged = false;
                text
            }
            Err(e) => {
                if !read_error_logged {
                    read_error_logged = true;
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        // Too large, or not text: refused like an invalid configuration.
                        let source = path.display().to_string();
                        let error = ConfigError::Read {
                            path: source.clone(),
                            source: e,
                        };
                        publish(Err(error), &source, &tx, &status);
                    } else {
                        warn!(path = %path.display(), error = %e, "cannot read the configuration file; keeping the current configuration");
                    }
                }
                continue;
            }
        };
        if text == last_text {
            seen = None;
            continue;
        }
        if !complete {
            let now = tokio::time::Instant::now();
            match &seen {
                Some((t, since)) if *t == text => {
                    if writing || now.duration_since(*since) < POLL_STABLE {
                        continue;
                    }
                }
                _ => {
                    seen = Some((text, now));
                    continue;
                }
            }
            info!(path = %path.display(), "the configuration file changed without a completed write being seen; applying it after {POLL_STABLE:?} without change");
        }
        seen = None;
        last_text = text;
        apply(&last_text, &path.display().to_string(), &tx, &status);
    }
}

/// What inotify says about the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileEvent {
    /// Written to, and still open: a write is under way.
    Modified,
    /// A write completed: closed after writing, or renamed into place (the file, or the
    /// `..data` link of a ConfigMap volume).
    Complete,
}

/// The inotify watch on the configuration file's directory (files replaced by rename keep
/// being watched), filtered to the file's own name and `..data`.
struct FileEvents {
    stream: inotify::EventStream<Vec<u8>>,
    name: std::ffi::OsString,
}

impl FileEvents {
    fn start(path: &Path) -> std::io::Result<FileEvents> {
        use inotify::{Inotify, WatchMask};
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("the path names no file"))?
            .to_os_string();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let inotify = Inotify::init()?;
        inotify.watches().add(
            &dir,
            WatchMask::MODIFY | WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE,
        )?;
        let stream = inotify.into_event_stream(vec![0u8; 4096])?;
        Ok(FileEvents { stream, name })
    }

    /// The next event about the file; `None` when the watch ended.
    async fn next(&mut self) -> Option<FileEvent> {
        use futures::StreamExt;
        use inotify::EventMask;
        loop {
            let event = match self.stream.next().await? {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "reading inotify events failed");
                    return None;
                }
            };
            let Some(name) = event.name.as_deref() else {
                continue;
            };
            if name != self.name.as_os_str() && name != "..data" {
                continue;
            }
            if event
                .mask
                .intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO)
            {
                return Some(FileEvent::Complete);
            }
            if event.mask.intersects(EventMask::MODIFY | EventMask::CREATE) {
                return Some(FileEvent::Modified);
            }
        }
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

/// The reload families, from the [`ReloadStatus`] at scrape time.
#[derive(Debug)]
pub struct ReloadCollector(pub ReloadStatus);

impl prometheus_client::collector::Collector for ReloadCollector {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::{counters, flag, gauge};
        let reload = self.0.snapshot();
        counters(
            &mut e,
            "dbportal_config_reloads",
            "Configuration reloads, by result.",
            [
                ([("result", "ok")], reload.reloads_ok),
                ([("result", "failed")], reload.reloads_failed),
            ],
        )?;
        gauge(
            &mut e,
            "dbportal_config_last_reload_successful",
            "Whether the latest configuration reload succeeded.",
            flag(reload.last_reload_ok),
        )?;
        gauge(
            &mut e,
            "dbportal_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration applied.",
            reload.last_success_unix,
        )?;
        gauge(
            &mut e,
            "dbportal_config_stale",
            "1 when the newest configuration was refused and an older one is serving.",
            flag(reload.stale),
        )
    }
}

/// The tasks that follow a configuration's sources (a file, a ConfigMap, Secrets) and the
/// sender they publish on; the tasks stop when this is dropped.
#[derive(Debug, Default)]
pub struct Following {
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub sender: Option<watch::Sender<Arc<Config>>>,
}

impl Drop for Following {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_config_refuses_large_and_binary_files() {
        let dir = std::env::temp_dir().join(format!("dbportal-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("portal.yaml");
        std::fs::write(&path, DEFAULT_CONFIG).unwrap();
        assert_eq!(read_config(&path).unwrap(), DEFAULT_CONFIG);
        let mut big = DEFAULT_CONFIG.to_string();
        big.push_str(&"#".repeat(MAX_CONFIG_BYTES as usize));
        std::fs::write(&path, big).unwrap();
        let e = read_config(&path).unwrap_err();
        assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");
        std::fs::write(&path, b"engine: redis\n\xff\n").unwrap();
        let e = read_config(&path).unwrap_err();
        assert!(e.to_string().contains("offset 14"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
