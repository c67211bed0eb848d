//! The served certificate and its live rotation: a `watch` channel holds the current server
//! config; a reload that fails leaves the old one serving and is reported (log, metric,
//! `/status`).
//!
//! May import: `metrics` and the rest of `tls`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::ServerConfig;
use tokio::sync::watch;

use super::{
    certs::{self, CertInfo, ServerSettings, SourceBytes},
    TlsError,
};

/// What new handshakes use: a snapshot taken per connection. Open sessions keep the config
/// they were accepted with, so a rotation never touches them.
#[derive(Clone)]
pub struct Served {
    pub config: Arc<ServerConfig>,
    pub info: CertInfo,
    /// When this pair was loaded.
    pub loaded_at: SystemTime,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("info", &self.info)
            .field("loaded_at", &self.loaded_at)
            .finish_non_exhaustive()
    }
}

/// The last refused reload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub at: SystemTime,
    /// The error's variant name, as a metric label.
    pub reason: &'static str,
    pub message: String,
}

/// The store's state for `/status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsStatus {
    pub source: String,
    pub subject: String,
    pub not_after_unix: u64,
    pub loaded_at_unix: u64,
    pub reloads_ok: u64,
    pub reloads_refused: u64,
    /// The last refused reload, cleared by the next good one.
    pub last_refusal: Option<Refusal>,
}

impl TlsStatus {
    /// The JSON object for `/status`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "source": self.source,
            "subject": self.subject,
            "notAfter": self.not_after_unix,
            "loadedAt": self.loaded_at_unix,
            "reloadsOk": self.reloads_ok,
            "reloadsRefused": self.reloads_refused,
            "lastRefusal": self.last_refusal.as_ref().map(|r| serde_json::json!({
                "at": certs::unix_secs(r.at),
                "reason": r.reason,
                "message": r.message,
            })),
        })
    }

    /// The certificate's families: its expiry and its reloads.
    pub fn encode_metrics(
        &self,
        e: &mut prometheus_client::encoding::DescriptorEncoder,
        now: SystemTime,
    ) -> std::fmt::Result {
        use crate::metrics::{counters, flag, gauge};
        let expiry = self.not_after_unix as i64 - certs::unix_secs(now) as i64;
        gauge(
            e,
            "dbportal_tls_certificate_expiry_seconds",
            "Seconds until the served TLS certificate expires.",
            expiry,
        )?;
        gauge(
            e,
            "dbportal_tls_certificate_not_after_seconds",
            "Expiry of the served TLS certificate, unix time.",
            self.not_after_unix,
        )?;
        counters(
            e,
            "dbportal_tls_reloads",
            "Certificate reloads by result.",
            [
                ([("result", "ok")], self.reloads_ok),
                ([("result", "refused")], self.reloads_refused),
            ],
        )?;
        gauge(
            e,
            "dbportal_tls_reload_refused",
            "Whether the latest certificate reload was refused (the previous certificate is still served).",
            flag(self.last_refusal.is_some()),
        )
    }
}

struct Inner {
    settings: ServerSettings,
    status: TlsStatus,
    /// What the sources held at the last reload, so an unchanged source is not rebuilt and a
    /// broken one is reported once, not at every poll.
    seen: Snapshot,
    /// Sources that failed once at a poll: reported only if they are still the same at the
    /// next poll, so a certificate written a moment before its key is not a refusal.
    pending_failure: Option<Snapshot>,
}

/// The sources' bytes, or why they could not be read.
type Snapshot = Result<SourceBytes, String>;

/// Holds the served certificate and publishes it on a `watch` channel.
pub struct CertStore {
    tx: watch::Sender<Arc<Served>>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("served", &self.tx.borrow().info)
            .finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The sources are as they were.
    Unchanged,
    /// A new pair is served.
    Swapped,
    /// The new sources failed once; they are checked again at the next poll.
    Deferred,
    /// The new sources were refused; the previous pair keeps serving.
    Refused(String),
}

impl CertStore {
    /// Loads the first pair. A portal that cannot load its certificate does not start.
    pub fn new(settings: ServerSettings) -> Result<Arc<Self>, TlsError> {
        let now = SystemTime::now();
        let bytes = SourceBytes::read(&settings)?;
        let (config, info) = certs::build(&settings, &bytes, now)?;
        tracing::info!(
            source = %settings.cert,
            subject = %info.subject,
            expires_in = %certs::human_duration(info.not_after.duration_since(now).unwrap_or_default()),
            "TLS certificate loaded"
        );
        let status = TlsStatus {
            source: settings.cert.to_string(),
            subject: info.subject.clone(),
            not_after_unix: info.not_after_unix(),
            loaded_at_unix: certs::unix_secs(now),
            ..TlsStatus::default()
        };
        let (tx, _) = watch::channel(Arc::new(Served {
            config,
            info,
            loaded_at: now,
        }));
        Ok(Arc::new(CertStore {
            tx,
            inner: Mutex::new(Inner {
                settings,
                status,
                seen: Ok(bytes),
                pending_failure: None,
            }),
        }))
    }

    /// A receiver of the served pair; each new handshake takes `borrow().clone()`.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Served>> {
        self.tx.subscribe()
    }

    /// The pair served now.
    pub fn current(&self) -> Arc<Served> {
        self.tx.borrow().clone()
    }

    pub fn status(&self) -> TlsStatus {
        self.lock().status.clone()
    }

    pub fn settings(&self) -> ServerSettings {
        self.lock().settings.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Re-reads the sources now (SIGHUP, a configuration reload) and swaps in the new pair if
    /// it is good. A failure is final at once: the operator asked for this reload.
    pub fn reload(&self) -> Reload {
        self.reload_inner(true, None)
    }

    /// New settings (other files, a new minimum version, PEM from an updated Secret): built
    /// and swapped in if good, refused otherwise (the old settings and pair stay).
    pub fn set_settings(&self, settings: ServerSettings) -> Reload {
        self.reload_inner(true, Some(settings))
    }

    /// A poll of the watcher: a failure counts only once the same bytes fail twice.
    pub fn poll(&self) -> Reload {
        self.reload_inner(false, None)
    }

    fn reload_inner(&self, forced: bool, new_settings: Option<ServerSettings>) -> Reload {
        let mut inner = self.lock();
        let settings = new_settings.unwrap_or_else(|| inner.settings.clone());
        let settings_changed = settings != inner.settings;
        let now = SystemTime::now();
        let read = SourceBytes::read(&settings);
        let snapshot: Snapshot = read.as_ref().map(Clone::clone).map_err(ToString::to_string);
        if !forced && !settings_changed && inner.seen == snapshot {
            return Reload::Unchanged;
        }
        match read.and_then(|bytes| certs::build(&settings, &bytes, now)) {
            Ok((config, info)) => {
                tracing::info!(
                    source = %settings.cert,
                    subject = %info.subject,
                    expires_in = %certs::human_duration(info.not_after.duration_since(now).unwrap_or_default()),
                    "TLS certificate swapped in for new handshakes"
                );
                inner.seen = snapshot;
                inner.pending_failure = None;
                inner.status.source = settings.cert.to_string();
                inner.status.subject = info.subject.clone();
                inner.status.not_after_unix = info.not_after_unix();
                inner.status.loaded_at_unix = certs::unix_secs(now);
                inner.status.reloads_ok += 1;
                inner.status.last_refusal = None;
                inner.settings = settings;
                self.tx.send_replace(Arc::new(Served {
                    config,
                    info,
                    loaded_at: now,
                }));
                Reload::Swapped
            }
            Err(e) => {
                if !forced && inner.pending_failure.as_ref() != Some(&snapshot) {
                    inner.pending_failure = Some(snapshot);
                    return Reload::Deferred;
                }
                let message = e.to_string();
                tracing::warn!(
                    source = %settings.cert,
                    error = %message,
                    "TLS certificate reload refused; the previous certificate is still served"
                );
                // Settings are kept as they were: a refused change is not half applied. The
                // sources of the current settings are marked seen so they are not retried at
                // every poll.
                if !settings_changed {
                    inner.seen = snapshot;
                }
                inner.pending_failure = None;
                inner.status.reloads_refused += 1;
                inner.status.last_refusal = Some(Refusal {
                    at: now,
                    reason: e.label(),
                    message: message.clone(),
                });
                Reload::Refused(message)
            }
        }
    }

    /// Polls the sources every `interval` until the returned task is aborted or the store is
    /// dropped. Files are compared by content, so atomic renames and Kubernetes' symlink swaps
    /// are seen as well as writes in place.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { break };
                // Small files; reading them on a blocking thread keeps the runtime responsive
                // when a mount is slow.
                let _ = tokio::task::spawn_blocking(move || store.poll()).await;
            }
        })
    }
}
