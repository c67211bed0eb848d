//! TLS in a running portal: the certificate store and the current [`Terminator`], following
//! configuration changes, polling the certificate files and re-reading them on SIGHUP, and
//! reporting to `/status` and `/metrics`.
//!
//! May import: `config`, `metrics` and the rest of `tls`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use super::{
    BackendConnector, CaSource, CertSource, CertStore, Reload, ServerSettings, Terminator, TlsError,
};
use crate::config::{Config, TlsMode};

/// How often the certificate files are compared with what is served.
pub const CERT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The TLS side of a running portal.
pub struct TlsRuntime {
    inner: Mutex<Inner>,
    failures: Mutex<BTreeMap<&'static str, u64>>,
}

struct Inner {
    store: Option<Arc<CertStore>>,
    /// `None` when TLS should be terminated but cannot be (no loadable certificate): new
    /// clients are then refused rather than served in plaintext.
    terminator: Option<Arc<Terminator>>,
    /// Why the terminator in force is not the configuration's.
    error: Option<String>,
    /// What the terminator was built from, to rebuild only on a relevant change.
    built_from: Option<BuildKey>,
    /// The served pair when it does not come from the configuration's files (a portal in a
    /// cluster gets it from its TLS Secret).
    cert: Option<CertSource>,
    /// The configuration applied last, to rebuild when `cert` changes.
    config: Option<Config>,
}

impl Inner {
    fn empty(cert: Option<CertSource>) -> Self {
        Inner {
            store: None,
            terminator: None,
            error: None,
            built_from: None,
            cert,
            config: None,
        }
    }

    /// The server settings of `config`, with the certificate from `cert` when one is set.
    fn settings(&self, config: &Config) -> Option<ServerSettings> {
        match &self.cert {
            Some(cert) if config.tls.mode == TlsMode::Terminate => Some(ServerSettings {
                engine: config.engine,
                min_version: config.tls.min_version,
                cert: cert.clone(),
                client_ca: config
                    .tls
                    .client_ca_file
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .map(|p| CaSource::File(p.into())),
            }),
            _ => ServerSettings::from_config(config),
        }
    }
}

impl std::fmt::Debug for TlsRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsRuntime").finish_non_exhaustive()
    }
}

/// What a terminator is built from: a change of any of it builds a new one.
type BuildKey = (
    crate::config::Engine,
    crate::config::Tls,
    std::time::Duration,
    bool,
);

fn build_key(config: &Config) -> BuildKey {
    (
        config.engine,
        config.tls.clone(),
        config.timeouts.handshake,
        config.plane.pg_pool().is_some(),
    )
}

impl TlsRuntime {
    /// The TLS runtime of a configuration; fails if the certificate cannot be loaded, so a
    /// standalone portal does not start without one.
    pub fn new(config: &Config) -> Result<Arc<Self>, TlsError> {
        let runtime = TlsRuntime {
            inner: Mutex::new(Inner::empty(None)),
            failures: Mutex::new(BTreeMap::new()),
        };
        runtime.apply(config)?;
        Ok(Arc::new(runtime))
    }

    /// Whether a configuration's TLS can be set up (certificate, key, CA files), without
    /// setting it up: a standalone portal checks this before it starts serving.
    pub fn check(config: &Config) -> Result<(), TlsError> {
        if let Some(settings) = ServerSettings::from_config(config) {
            super::certs::load(&settings, SystemTime::now())?;
        } else if config.tls.mode == TlsMode::Terminate {
            return Err(TlsError::BadCertificate(
                "tls.mode is terminate but no certificate is configured (tls.certFile, tls.keyFile)".into(),
            ));
        }
        if config.tls.mode != TlsMode::Passthrough {
            BackendConnector::from_settings(config.tls.backend.as_ref())?;
        }
        Ok(())
    }

    /// Like [`new`](Self::new), but a failure leaves the portal refusing TLS clients (logged,
    /// and shown in `/status`) instead of failing.
    pub fn new_or_closed(config: &Config) -> Arc<Self> {
        Self::new_or_closed_with(config, None)
    }

    /// Like [`new_or_closed`](Self::new_or_closed), with the served pair from `cert` (PEM from
    /// a Secret) instead of the configuration's files when it is given.
    pub fn new_or_closed_with(config: &Config, cert: Option<CertSource>) -> Arc<Self> {
        let runtime = TlsRuntime {
            inner: Mutex::new(Inner::empty(cert)),
            failures: Mutex::new(BTreeMap::new()),
        };
        if let Err(e) = runtime.apply(config) {
            tracing::error!(error = %e, "TLS cannot be set up; clients will be refused until it can");
        }
        Arc::new(runtime)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a (new) configuration. A refused change keeps what is in force and returns
    /// why; the refusal is also kept for `/status`.
    pub fn apply(&self, config: &Config) -> Result<(), TlsError> {
        let mut inner = self.lock();
        inner.config = Some(config.clone());
        let key = build_key(config);
        if inner.built_from.as_ref() == Some(&key) {
            return Ok(());
        }
        let result = self.build(&mut inner, config);
        match &result {
            Ok(()) => {
                inner.error = None;
                inner.built_from = Some(key);
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS settings refused; the previous ones stay in force");
                inner.error = Some(e.to_string());
                // Tried once; the next attempt comes with the next configuration or reload.
                inner.built_from = Some(key);
            }
        }
        result
    }

    /// A new served pair from outside the configuration (an updated TLS Secret): swapped in
    /// for new handshakes if it is good; refused otherwise (logged, shown in `/status`), and
    /// the pair in force keeps serving.
    pub fn set_cert(&self, cert: CertSource) -> Result<(), TlsError> {
        let mut inner = self.lock();
        if inner.cert.as_ref() == Some(&cert) {
            return Ok(());
        }
        let previous = inner.cert.replace(cert);
        let Some(config) = inner.config.clone() else {
            return Ok(());
        };
        match self.build(&mut inner, &config) {
            Ok(()) => {
                inner.error = None;
                inner.built_from = Some(build_key(&config));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate from the Secret refused; the previous one stays in force");
                inner.cert = previous;
                inner.error = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn build(&self, inner: &mut Inner, config: &Config) -> Result<(), TlsError> {
        let store = match inner.settings(config) {
            Some(settings) => match &inner.store {
                Some(store) if store.settings() == settings => Some(store.clone()),
                Some(store) => match store.set_settings(settings) {
                    Reload::Refused(message) => {
                        return Err(TlsError::BadCertificate(message));
                    }
                    _ => Some(store.clone()),
                },
                None => Some(CertStore::new(settings)?),
            },
            None if config.tls.mode == TlsMode::Terminate => {
                return Err(TlsError::BadCertificate(
                    "tls.mode is terminate but no certificate is configured (tls.certFile, tls.keyFile)".into(),
                ))
            }
            None => None,
        };
        let backend = match config.tls.mode {
            TlsMode::Passthrough => None,
            _ => BackendConnector::from_settings(config.tls.backend.as_ref())?,
        };
        let terminator = Terminator::new(
            config.engine,
            config.tls.mode,
            store.as_ref().map(|s| s.subscribe()),
            backend,
        )
        .with_handshake_timeout(config.timeouts.handshake)
        .with_own_records(config.plane.pg_pool().is_some());
        inner.store = store;
        inner.terminator = Some(Arc::new(terminator));
        Ok(())
    }

    /// The terminator for new connections; `None` means refuse them (TLS is required but
    /// not available).
    pub fn terminator(&self) -> Option<Arc<Terminator>> {
        self.lock().terminator.clone()
    }

    /// The certificate store, when the portal terminates TLS.
    pub fn store(&self) -> Option<Arc<CertStore>> {
        self.lock().store.clone()
    }

    /// Re-reads the certificate sources now (SIGHUP).
    pub fn reload(&self) -> Option<Reload> {
        self.store().map(|s| s.reload())
    }

    /// Counts a failed client negotiation by its reason.
    pub fn record_failure(&self, error: &TlsError) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *failures.entry(error.label()).or_insert(0) += 1;
    }

    /// Follows `config` (settings changes), polls the certificate files every `interval`
    /// and re-reads them on SIGHUP, until the task is aborted or `config`'s sender is
    /// dropped.
    pub fn spawn(
        self: &Arc<Self>,
        mut config: watch::Receiver<Arc<Config>>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let runtime = self.clone();
        tokio::spawn(async move {
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    changed = config.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let c = config.borrow_and_update().clone();
                        let _ = runtime.apply(&c);
                    }
                    _ = tick.tick() => {
                        if let Some(store) = runtime.store() {
                            let _ = tokio::task::spawn_blocking(move || store.poll()).await;
                        }
                    }
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        tracing::info!("SIGHUP: re-reading the TLS certificate");
                        if let Some(store) = runtime.store() {
                            let _ = tokio::task::spawn_blocking(move || store.reload()).await;
                        }
                    }
                }
            }
        })
    }

    /// The `tls` object of `/status`.
    pub fn status_json(&self) -> serde_json::Value {
        let inner = self.lock();
        let mode = inner.terminator.as_ref().map(|t| match t.mode() {
            TlsMode::Terminate => "terminate",
            TlsMode::Passthrough => "passthrough",
            TlsMode::Disabled => "disabled",
        });
        let mut v = serde_json::json!({
            "mode": mode,
            "available": inner.terminator.is_some(),
            "error": inner.error,
            "handshakeFailures": *self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        });
        if let Some(store) = &inner.store {
            v["certificate"] = store.status().to_json();
        }
        v
    }

    /// Client TLS negotiations that failed, by reason.
    fn failures(&self) -> BTreeMap<&'static str, u64> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The TLS families: the served certificate (when there is one), failed negotiations, refused
/// settings.
impl prometheus_client::collector::Collector for TlsRuntime {
    fn encode(&self, mut e: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use crate::metrics::{counters, flag, gauge};
        if let Some(store) = self.store() {
            store.status().encode_metrics(&mut e, SystemTime::now())?;
        }
        let failures = self.failures();
        counters(
            &mut e,
            "dbportal_tls_negotiation_failures",
            "Client TLS negotiations that failed, by reason.",
            [
                "handshake",
                "handshake_timeout",
                "tls_required",
                "malformed",
                "backend",
                "io",
            ]
            .map(|reason| {
                (
                    [("reason", reason)],
                    failures.get(reason).copied().unwrap_or(0),
                )
            }),
        )?;
        gauge(
            &mut e,
            "dbportal_tls_settings_refused",
            "Whether the latest TLS settings were refused (the previous ones stay in force).",
            flag(self.lock().error.is_some()),
        )
    }
}
