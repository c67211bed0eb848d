//! Credentials of the probes: where they come from is behind [`CredentialsSource`], so the
//! standalone portal reads `healthCheck.credentials` and a portal in a cluster can serve
//! `healthCheck.credentialsSecret` from its own Secret watch.

use crate::config::{Credentials, Health};

/// A user name (optional for Redis) and password for a probe's login.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ProbeCredentials {
    #[serde(default)]
    pub username: Option<String>,
    pub password: String,
}

impl std::fmt::Debug for ProbeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Resolves the credentials of the probes. Called before every probe, so an implementation
/// should answer from memory (a cache kept current by a watch) or from a small local file.
pub trait CredentialsSource: Send + Sync + 'static {
    /// `Ok(None)`: probe without credentials. `Err`: the probe fails with this reason.
    fn credentials(&self, health: &Health) -> Result<Option<ProbeCredentials>, String>;
}

/// The standalone portal's credentials: inline, or a YAML file with `username` and `password`
/// read at each probe (so a rotated file applies without a restart). `credentialsSecret` is
/// ignored here: only a portal in a cluster can read a Secret.
#[derive(Clone, Copy, Debug, Default)]
pub struct StandaloneCredentials;

impl CredentialsSource for StandaloneCredentials {
    fn credentials(&self, health: &Health) -> Result<Option<ProbeCredentials>, String> {
        match &health.credentials {
            None => Ok(None),
            Some(Credentials::Inline { username, password }) => Ok(Some(ProbeCredentials {
                username: username.clone().filter(|u| !u.is_empty()),
                password: password.clone(),
            })),
            Some(Credentials::File(path)) => read_file(path).map(Some),
        }
    }
}

/// Reads a credentials file: YAML with `password` and optionally `username`.
pub fn read_file(path: &str) -> Result<ProbeCredentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the credentials file {path}: {e}"))?;
    let mut creds: ProbeCredentials = serde_yaml::from_str(&text).map_err(|e| {
        format!("the credentials file {path} needs `password` (and optionally `username`): {e}")
    })?;
    creds.username = creds.username.filter(|u| !u.is_empty());
    Ok(creds)
}

/// Fixed credentials, for tests and for callers that resolved them already.
impl CredentialsSource for Option<ProbeCredentials> {
    fn credentials(&self, _: &Health) -> Result<Option<ProbeCredentials>, String> {
        Ok(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(credentials: Option<Credentials>) -> Health {
        Health {
            interval: std::time::Duration::from_secs(1),
            rise: 2,
            fall: 3,
            credentials_secret: None,
            credentials,
            steps: Vec::new(),
        }
    }

    #[test]
    fn inline_and_file() {
        let inline = health(Some(Credentials::Inline {
            username: None,
            password: "pw".into(),
        }));
        let c = StandaloneCredentials.credentials(&inline).unwrap().unwrap();
        assert_eq!((c.username, c.password.as_str()), (None, "pw"));

        let dir = std::env::temp_dir().join(format!("dbportal-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("probe.yaml");
        std::fs::write(&path, "username: probe\npassword: s3cret\n").unwrap();
        let file = health(Some(Credentials::File(path.display().to_string())));
        let c = StandaloneCredentials.credentials(&file).unwrap().unwrap();
        assert_eq!(c.username.as_deref(), Some("probe"));
        assert_eq!(c.password, "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));

        std::fs::write(&path, "user: probe\n").unwrap();
        let err = StandaloneCredentials.credentials(&file).unwrap_err();
        assert!(err.contains("password"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(StandaloneCredentials.credentials(&health(None)), Ok(None));
    }
}
