//! The portal in a cluster: its configuration comes from a ConfigMap (key `portal.yaml`) and its
//! certificate from a `kubernetes.io/tls` Secret, both watched through the Kubernetes API and
//! applied live with the same validation and keep-last-good rule as the standalone file; probe
//! credentials may come from a Secret too. The portal reports its own view (ready, leader,
//! backends) in an annotation of its own Pod ([`pod_report`](crate::pod_report)).
//!
//! Watches select one object by name (`metadata.name=NAME`), which a Role limited to that
//! object by `resourceNames` allows for `list` and `watch`. On API outages the portal keeps
//! serving what it has; the watches reconnect with kube's default backoff.
//!
//! Prepares what the serving loop serves, as `standalone` does from a file.
//!
//! May import: `admission` (the listeners), `config`, `control`, `health`, `pod_report`,
//! `reload`, `tls`.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
};

use futures::{stream::BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{error, info, warn};

use crate::{
    config::{Config, ConfigError, DataPlane, FieldError, Health, Multiplex},
    control::Control,
    health::{
        self, CredentialsSource, HealthHandle, ProbeCredentials, StandaloneCredentials, Users,
    },
    reload::{self, Following, ReloadStatus},
    tls::{CertSource, TlsRuntime},
};

/// The ConfigMap key holding the configuration.
pub const CONFIG_KEY: &str = "portal.yaml";

pub use crate::pod_report::{BackendReport, Report, REPORT_ANNOTATION, REPORT_INTERVAL};
/// Where a portal in a cluster finds its configuration, certificate and identity.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub namespace: String,
    /// The ConfigMap with the configuration under [`CONFIG_KEY`].
    pub configmap: String,
    /// The `kubernetes.io/tls` Secret with the served pair (`tls.crt`, `tls.key`).
    pub tls_secret: Option<String>,
    /// The Secret with the probes' `username` and `password`; without it, the one named by the
    /// first configuration's `healthCheck.credentialsSecret`, if any.
    pub credentials_secret: Option<String>,
    /// The Secret with the users of Redis multiplexing (`pooling.auth.usersSecret`), one key
    /// per user name; without it, the one the first configuration names, if any.
    pub users_secret: Option<String>,
    /// The portal's own Pod, where it reports its view; no report without it.
    pub pod_name: Option<String>,
}

/// A portal in a cluster ready to serve.
#[derive(Debug)]
pub struct Cluster {
    pub listener: TcpListener,
    pub admin: TcpListener,
    pub config: watch::Receiver<Arc<Config>>,
    pub health: HealthHandle,
    pub reload: ReloadStatus,
    /// The runtime overrides of backends (the admin endpoint's), reported on the Pod.
    pub control: Control,
    pub tls: Arc<TlsRuntime>,
    /// The watches of the ConfigMap and the Secrets, and the Pod's report; they stop when
    /// dropped.
    pub following: Following,
}

type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// A watch of the one object named `name`, reconnecting with kube's default backoff; the
/// first event after a failure is logged, so an outage's end shows in the log as its start does.
fn watch_named<K>(api: Api<K>, name: &str) -> Events<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let object = format!("{} {name}", K::kind(&()));
    watcher(api, config)
        .default_backoff()
        .scan(false, move |failing, event| {
            if event.is_ok() && *failing {
                info!(object = %object, "watch restored");
            }
            *failing = event.is_err();
            futures::future::ready(Some(event))
        })
        .boxed()
}

/// An error with its causes, outermost first: "failed to start watching object: ...: Connection refused".
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// What an event says about the watched object.
enum Change<K> {
    Applied(K),
    Deleted,
    /// The initial listing is complete.
    Listed,
}

/// The next change of the watched object; watch errors are logged (the stream retries with
/// backoff). `None` only if the stream ends.
async fn next_change<K>(events: &mut Events<K>, what: &str) -> Option<Change<K>> {
    loop {
        match events.next().await? {
            Ok(watcher::Event::Apply(k) | watcher::Event::InitApply(k)) => {
                return Some(Change::Applied(k))
            }
            Ok(watcher::Event::Delete(_)) => return Some(Change::Deleted),
            Ok(watcher::Event::InitDone) => return Some(Change::Listed),
            Ok(watcher::Event::Init) => {}
            Err(e) => {
                warn!(object = what, error = %causes(&e), "watch failed; keeping the current state and retrying with backoff");
            }
        }
    }
}

/// The object as the initial listing has it (`None`: it does not exist yet).
async fn initial<K>(events: &mut Events<K>, what: &str) -> Option<K> {
    let mut current = None;
    loop {
        match next_change(events, what).await {
            Some(Change::Applied(k)) => current = Some(k),
            Some(Change::Deleted) => current = None,
            Some(Change::Listed) | None => return current,
        }
    }
}

/// The configuration text of the ConfigMap.
fn config_text(cm: &ConfigMap) -> Result<String, ConfigError> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_KEY))
        .cloned()
        .ok_or_else(|| {
            ConfigError::Parse(FieldError {
                field: CONFIG_KEY.into(),
                message: format!("the ConfigMap has no key {CONFIG_KEY}"),
            })
        })?;
    if text.len() as u64 > reload::MAX_CONFIG_BYTES {
        return Err(ConfigError::Parse(FieldError {
            field: CONFIG_KEY.into(),
            message: format!("larger than {} bytes", reload::MAX_CONFIG_BYTES),
        }));
    }
    Ok(text)
}

/// The pair of a TLS Secret.
fn secret_cert(secret: &Secret) -> Result<CertSource, String> {
    let data = secret.data.as_ref();
    let get = |key: &str| {
        data.and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| format!("the Secret has no {key}"))
    };
    Ok(CertSource::from_pem(get("tls.crt")?, get("tls.key")?))
}

/// Probe credentials from a Secret's `username` (optional) and `password`.
fn secret_credentials(secret: &Secret) -> Result<ProbeCredentials, String> {
    let data = secret.data.as_ref();
    let get = |key: &str| {
        data.and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let password = get("password").ok_or("the credentials Secret has no password")?;
    Ok(ProbeCredentials {
        username: get("username").filter(|u| !u.is_empty()),
        password,
    })
}

/// The users of `pooling.auth.usersSecret`: each key a user name, its value the password.
fn secret_users(secret: &Secret) -> Result<Users, String> {
    let users: std::collections::BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    if users.is_empty() {
        return Err("the users Secret has no keys (one per user name)".into());
    }
    Ok(Arc::new(users))
}

/// Probe credentials (and the users of Redis multiplexing) kept current by watches of their
/// Secrets.
#[derive(Debug)]
pub struct SecretCredentials {
    secret: Option<String>,
    current: Mutex<Result<ProbeCredentials, String>>,
    users_secret: Option<String>,
    users: Mutex<Result<Users, String>>,
}

impl SecretCredentials {
    fn new(secret: Option<String>) -> Self {
        let why = match &secret {
            Some(name) => format!("the credentials Secret {name} was not found"),
            None => "no credentials Secret is watched".into(),
        };
        SecretCredentials {
            secret,
            current: Mutex::new(Err(why)),
            users_secret: None,
            users: Mutex::new(Err("no users Secret is watched".into())),
        }
    }

    fn with_users(mut self, secret: Option<String>) -> Self {
        if let Some(name) = &secret {
            self.users = Mutex::new(Err(format!("the users Secret {name} was not found")));
        }
        self.users_secret = secret;
        self
    }

    fn set(&self, value: Result<ProbeCredentials, String>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    fn set_users(&self, value: Result<Users, String>) {
        *self.users.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

impl CredentialsSource for SecretCredentials {
    fn credentials(&self, health: &Health) -> Result<Option<ProbeCredentials>, String> {
        match &health.credentials_secret {
            Some(name) if self.secret.as_ref() == Some(name) => self
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .map(Some),
            Some(name) => Err(format!(
                "the credentials Secret {name} is not watched by this portal (it watches {})",
                self.secret.as_deref().unwrap_or("none")
            )),
            None => StandaloneCredentials.credentials(health),
        }
    }

    fn users(&self, multiplex: &Multiplex) -> Result<Option<Users>, String> {
        match &multiplex.users_secret {
            Some(name) if self.users_secret.as_ref() == Some(name) => self
                .users
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .map(Some),
            Some(name) => Err(format!(
                "the users Secret {name} is not watched by this portal (it watches {})",
                self.users_secret.as_deref().unwrap_or("none")
            )),
            None => StandaloneCredentials.users(multiplex),
        }
    }
}

/// A ConfigMap's configuration, with this portal's name among its `peers`: its Pod's.
fn parse(text: &str, pod: &Option<String>) -> Result<Config, crate::config::ConfigError> {
    let mut config = reload::parse_cluster(text)?;
    if config.name.is_none() {
        config.name.clone_from(pod);
    }
    Ok(config)
}

/// Starts a portal in a cluster: waits for a valid configuration in the ConfigMap (`None` if
/// `shutdown` resolves first), listens on its addresses, and follows the ConfigMap, the Secrets
/// and its own health, reporting on its Pod.
pub async fn start(
    client: Client,
    options: Options,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Option<Cluster>> {
    let ns = options.namespace.clone();
    let source = format!("ConfigMap {ns}/{}", options.configmap);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // The first valid configuration: nothing can be served before it.
    let pod = options.pod_name.clone();
    let mut cm_events = watch_named(configmaps, &options.configmap);
    let startup = async {
        loop {
            match next_change(&mut cm_events, &source).await {
                Some(Change::Applied(cm)) => {
                    match config_text(&cm).and_then(|t| parse(&t, &pod).map(|c| (c, t))) {
                        Ok(found) => return Ok(found),
                        Err(e) => error!(
                            source = %source,
                            error = %e,
                            fields = ?e.fields(),
                            "configuration refused; waiting for a valid one"
                        ),
                    }
                }
                Some(Change::Deleted) => warn!(source = %source, "the ConfigMap was deleted"),
                Some(Change::Listed) => {
                    info!(source = %source, "waiting for the ConfigMap to hold a valid configuration")
                }
                None => anyhow::bail!("the watch of {source} ended"),
            }
        }
    };
    let (config, mut last_text) = tokio::select! {
        r = startup => r?,
        _ = &mut shutdown => return Ok(None),
    };

    // The Secrets as they are now; a missing one is picked up when it appears.
    let mut tls_events = options
        .tls_secret
        .as_ref()
        .map(|name| (name.clone(), watch_named(secrets.clone(), name)));
    let mut cert = None;
    if let Some((name, events)) = tls_events.as_mut() {
        let what = format!("Secret {ns}/{name}");
        match initial(events, &what).await.map(|s| secret_cert(&s)) {
            Some(Ok(c)) => cert = Some(c),
            Some(Err(e)) => warn!(secret = %what, error = %e, "TLS Secret refused"),
            None => warn!(secret = %what, "the TLS Secret does not exist yet"),
        }
    }
    let creds_name = options
        .credentials_secret
        .clone()
        .or_else(|| config.health.credentials_secret.clone());
    let users_name = options
        .users_secret
        .clone()
        .or_else(|| match &config.plane {
            DataPlane::Multiplex(m) => m.users_secret.clone(),
            DataPlane::Pool(p) => p.users_secret.clone(),
            DataPlane::Forward => None,
        });
    let credentials =
        Arc::new(SecretCredentials::new(creds_name.clone()).with_users(users_name.clone()));
    let mut users_events = users_name
        .as_ref()
        .map(|name| (name.clone(), watch_named(secrets.clone(), name)));
    if let Some((name, events)) = users_events.as_mut() {
        let what = format!("Secret {ns}/{name}");
        if let Some(s) = initial(events, &what).await {
            credentials.set_users(secret_users(&s));
        }
    }
    let mut creds_events = creds_name
        .as_ref()
        .map(|name| (name.clone(), watch_named(secrets.clone(), name)));
    if let Some((name, events)) = creds_events.as_mut() {
        let what = format!("Secret {ns}/{name}");
        if let Some(s) = initial(events, &what).await {
            credentials.set(secret_credentials(&s));
        }
    }

    let (listener, admin) = crate::admission::bind(&config).await?;
    info!(
        config = %source,
        listen = %config.listen,
        admin = %config.admin,
        engine = config.engine.as_str(),
        backends = config.backends.len(),
        "portal listening"
    );
    let tls = TlsRuntime::new_or_closed_with(&config, cert);
    let status = ReloadStatus::loaded(source.clone());
    let (tx, rx) = watch::channel(Arc::new(config));
    let checker = health::spawn_checker(rx.clone(), credentials.clone());
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();

    // Follow the ConfigMap.
    {
        let status = status.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let change = tokio::select! {
                    c = next_change(&mut cm_events, &source) => c,
                    _ = tx.closed() => return,
                };
                match change {
                    Some(Change::Applied(cm)) => match config_text(&cm) {
                        Ok(text) if text == last_text => {}
                        Ok(text) => {
                            reload::publish(parse(&text, &pod), &source, &tx, &status);
                            last_text = text;
                        }
                        Err(e) => {
                            last_text.clear();
                            reload::publish(Err(e), &source, &tx, &status);
                        }
                    },
                    Some(Change::Deleted) => warn!(
                        source = %source,
                        "the ConfigMap was deleted; keeping the current configuration"
                    ),
                    Some(Change::Listed) => {}
                    None => return,
                }
            }
        }));
    }
    // Follow the TLS Secret.
    if let Some((name, mut events)) = tls_events {
        let tls = tls.clone();
        let what = format!("Secret {ns}/{name}");
        tasks.push(tokio::spawn(async move {
            while let Some(change) = next_change(&mut events, &what).await {
                match change {
                    Change::Applied(secret) => match secret_cert(&secret) {
                        Ok(cert) => {
                            let _ = tls.set_cert(cert);
                        }
                        Err(e) => warn!(secret = %what, error = %e, "TLS Secret refused; the certificate in force keeps serving"),
                    },
                    Change::Deleted => warn!(secret = %what, "the TLS Secret was deleted; the certificate in force keeps serving"),
                    Change::Listed => {}
                }
            }
        }));
    }
    // Follow the credentials Secret.
    if let Some((name, mut events)) = creds_events {
        let credentials = credentials.clone();
        let what = format!("Secret {ns}/{name}");
        tasks.push(tokio::spawn(async move {
            while let Some(change) = next_change(&mut events, &what).await {
                match change {
                    Change::Applied(secret) => credentials.set(secret_credentials(&secret)),
                    Change::Deleted => {
                        credentials.set(Err(format!("the credentials {what} was deleted")))
                    }
                    Change::Listed => {}
                }
            }
        }));
    }
    // Follow the users Secret.
    if let Some((name, mut events)) = users_events {
        let credentials = credentials.clone();
        let what = format!("Secret {ns}/{name}");
        tasks.push(tokio::spawn(async move {
            while let Some(change) = next_change(&mut events, &what).await {
                match change {
                    Change::Applied(secret) => credentials.set_users(secret_users(&secret)),
                    Change::Deleted => {
                        credentials.set_users(Err(format!("the users {what} was deleted")))
                    }
                    Change::Listed => {}
                }
            }
        }));
    }
    // Report on the Pod.
    let control = Control::default();
    match &options.pod_name {
        Some(pod) => {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            tasks.push(tokio::spawn(crate::pod_report::report(
                pods,
                pod.clone(),
                rx.clone(),
                checker.view(),
                control.subscribe(),
                status.clone(),
            )));
        }
        None => info!("no pod name (POD_NAME): the portal does not report its view"),
    }

    Ok(Some(Cluster {
        listener,
        admin,
        config: rx,
        health: checker,
        reload: status,
        control,
        tls,
        following: Following {
            tasks,
            sender: None,
        },
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_lists_each_cause_once() {
        let inner =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let outer = anyhow::Error::new(inner).context("failed to start watching object");
        let text = super::causes(outer.as_ref());
        assert_eq!(text, "failed to start watching object: connection refused");
    }

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_configmap_without_the_key_is_refused_naming_it() {
        let e = config_text(&ConfigMap::default()).unwrap_err();
        assert_eq!(e.fields(), vec![CONFIG_KEY]);
    }

    #[test]
    fn tls_secret_needs_both_keys() {
        assert!(secret_cert(&secret(&[("tls.crt", "x")])).is_err());
        assert_eq!(
            secret_cert(&secret(&[("tls.crt", "c"), ("tls.key", "k")])).unwrap(),
            CertSource::from_pem("c", "k")
        );
    }

    #[test]
    fn users_come_from_the_watched_secret_only() {
        let config = crate::config::parse_yaml(
            "engine: redis\nbackends: [{name: a, address: \"127.0.0.1:6379\"}]\npooling: {mode: multiplex, auth: {usersSecret: users}}\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        let m = config.plane.multiplex().cloned().unwrap();
        let source = SecretCredentials::new(None).with_users(Some("users".into()));
        assert!(source
            .users(&m)
            .unwrap_err()
            .contains("users was not found"));
        source.set_users(secret_users(&secret(&[("default", "pw"), ("alice", "a")])));
        let users = source.users(&m).unwrap().unwrap();
        assert_eq!(users.get("alice").map(String::as_str), Some("a"));
        assert_eq!(users.len(), 2);
        let other = SecretCredentials::new(None).with_users(Some("others".into()));
        assert!(other.users(&m).unwrap_err().contains("not watched"));
        assert!(secret_users(&secret(&[])).is_err());
    }

    #[test]
    fn credentials_come_from_the_watched_secret_only() {
        let config = reload::parse_cluster(
            "engine: redis\nbackends: [{name: a, address: \"127.0.0.1:6379\"}]\nhealthCheck: {credentialsSecret: creds}\n",
        )
        .unwrap();
        let source = SecretCredentials::new(Some("creds".into()));
        assert!(source.credentials(&config.health).is_err());
        source.set(secret_credentials(&secret(&[("password", "pw")])));
        let creds = source.credentials(&config.health).unwrap().unwrap();
        assert_eq!((creds.username, creds.password.as_str()), (None, "pw"));
        let other = SecretCredentials::new(Some("other".into()));
        assert!(other.credentials(&config.health).is_err());
        assert!(secret_credentials(&secret(&[("username", "u")])).is_err());
    }
}
