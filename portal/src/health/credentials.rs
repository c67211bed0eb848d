//! Credentials of the probes: where they come from is behind [`CredentialsSource`], so the
//! standalone portal reads `healthCheck.credentials` and a portal in a cluster can serve
//! `healthCheck.credentialsSecret` from its own Secret watch.
//!
//! May import: `config` and the rest of `health`.

use std::{collections::BTreeMap, sync::Arc};

use crate::config::{Credentials, Health, Multiplex};

/// The users clients authenticate as, by name (`default` for AUTH with a password only).
pub type Users = Arc<BTreeMap<String, String>>;

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

    /// The users of `pooling.auth`: `Ok(None)` when none are configured (clients need no
    /// AUTH). This default reads `usersFile`; a portal in a cluster serves `usersSecret`.
    fn users(&self, multiplex: &Multiplex) -> Result<Option<Users>, String> {
        match &multiplex.users_file {
            Some(path) => read_users(path).map(Some),
            None if multiplex.users_secret.is_some() => {
                Err("pooling.auth.usersSecret is only served by a portal in a cluster".into())
            }
            None => Ok(None),
        }
    }
}

/// Reads a users file: a YAML map of user name to password. Errors name the path and the
/// key, never a password.
///
/// Read at every login, so that a rotated file applies to the next one: what a file gave is
/// kept with its metadata (device, inode, size, modification and change times) and given
/// again while a `stat` finds them unchanged, for at most [`USERS_KEPT_FOR`]; a login then
/// costs one `stat`, not an open, reads and a YAML parse. A Secret volume's update (a new
/// file behind the symlink) and an edit in place change the metadata; the time bound covers
/// an edit a coarse clock cannot tell from the last one.
pub fn read_users(path: &str) -> Result<Users, String> {
    let stamp = std::fs::metadata(path).ok().map(|m| stamp_of(&m));
    let now = std::time::Instant::now();
    if let Some(stamp) = stamp {
        let kept = lock_users_files();
        if let Some(k) = kept.iter().find(|k| k.path == path) {
            if k.stamp == stamp && now.duration_since(k.read_at) < USERS_KEPT_FOR {
                return Ok(k.users.clone());
            }
        }
    }
    let text = read_small(std::path::Path::new(path))?;
    let users = parse_users(&text).map_err(|why| format!("the users file {path} {why}"))?;
    if let Some(stamp) = stamp {
        let mut kept = lock_users_files();
        kept.retain(|k| k.path != path);
        if kept.len() >= USERS_FILES_KEPT {
            kept.remove(0);
        }
        kept.push(KeptUsers {
            path: path.to_string(),
            stamp,
            read_at: now,
            users: users.clone(),
        });
    }
    Ok(users)
}

/// How long a users file's parsed content is given again without reading the file.
pub const USERS_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Users files kept at once (a configuration names one; a reload may name another).
const USERS_FILES_KEPT: usize = 4;

/// A users file's metadata: (device, inode, size, mtime s, mtime ns, ctime s, ctime ns).
type Stamp = (u64, u64, u64, i64, i64, i64, i64);

fn stamp_of(m: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    (
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

struct KeptUsers {
    path: String,
    /// The metadata seen before the file was read.
    stamp: Stamp,
    read_at: std::time::Instant,
    users: Users,
}

static USERS_FILES: std::sync::Mutex<Vec<KeptUsers>> = std::sync::Mutex::new(Vec::new());

fn lock_users_files() -> std::sync::MutexGuard<'static, Vec<KeptUsers>> {
    USERS_FILES.lock().unwrap_or_else(|e| e.into_inner())
}

/// A users map from YAML text (`name: password` lines).
pub fn parse_users(text: &str) -> Result<Users, String> {
    let map: serde_norway::Mapping = serde_norway::from_str(text).map_err(|e| {
        format!(
            "is not a YAML map of user name to password (line {})",
            e.location().map_or(0, |l| l.line())
        )
    })?;
    let mut users = BTreeMap::new();
    for (k, v) in map {
        let serde_norway::Value::String(name) = k else {
            return Err("has a user name that is not a string".into());
        };
        let password = match v {
            serde_norway::Value::String(s) => s,
            serde_norway::Value::Number(n) => n.to_string(),
            _ => return Err(format!("has a password for {name:?} that is not a string")),
        };
        users.insert(name, password);
    }
    Ok(Arc::new(users))
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

/// Largest credentials file read (a password, a user name, a little YAML).
const MAX_FILE: u64 = 64 * 1024;

/// Reads credentials from `path`, in any of the forms a user or Kubernetes gives them:
/// - a directory with a `password` file and optionally a `username` file (a Secret mounted as
///   a volume: one file per key);
/// - a YAML map with `password` and optionally `username`;
/// - a file holding only the password (a single Secret key mounted with `subPath` or
///   `items`): its whole content, without a trailing newline.
///
/// Errors name the path and what is wrong, never the file's content: a password must not reach
/// `/status`, `/readyz` or the log through a parse error.
pub fn read_file(path: &str) -> Result<ProbeCredentials, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read the credentials {path}: {e}"))?;
    if meta.is_dir() {
        let dir = std::path::Path::new(path);
        let password = read_key(&dir.join("password"))?
            .ok_or_else(|| format!("the credentials directory {path} has no `password` file"))?;
        let username = read_key(&dir.join("username"))?.filter(|u| !u.is_empty());
        return Ok(ProbeCredentials { username, password });
    }
    let text = read_small(std::path::Path::new(path))?;
    parse_file(&text).map_err(|why| format!("the credentials file {path} {why}"))
}

/// The file's text: a YAML map, or the password alone.
fn parse_file(text: &str) -> Result<ProbeCredentials, String> {
    use serde_norway::Value;
    let string = |map: &serde_norway::Mapping, key: &str| -> Result<Option<String>, String> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(_) => Err(format!("has a `{key}` that is not a string")),
        }
    };
    // Only a map with `password` or `username` is read as YAML; anything else (a password
    // with a colon or a `#`, say) is the password itself.
    if let Ok(Value::Mapping(map)) = serde_norway::from_str::<Value>(text) {
        if map.contains_key("password") || map.contains_key("username") {
            let password = string(&map, "password")?
                .ok_or_else(|| "has no `password` (keys: username, password)".to_string())?;
            let username = string(&map, "username")?.filter(|u| !u.is_empty());
            return Ok(ProbeCredentials { username, password });
        }
    }
    let password = text.strip_suffix('\n').unwrap_or(text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err("is empty".into());
    }
    Ok(ProbeCredentials {
        username: None,
        password: password.to_string(),
    })
}

/// One key of a mounted Secret: `None` when the file does not exist.
fn read_key(path: &std::path::Path) -> Result<Option<String>, String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        Ok(_) => {
            let text = read_small(path)?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            Ok(Some(text.to_string()))
        }
    }
}

fn read_small(path: &std::path::Path) -> Result<String, String> {
    crate::config::read_limited(path, MAX_FILE)
        .map_err(|e| format!("cannot read the credentials {}: {e}", path.display()))
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

        // A file holding only the password (one Secret key), with or without a newline.
        std::fs::write(&path, "s3cret: with # odd: chars\n").unwrap();
        let c = StandaloneCredentials.credentials(&file).unwrap().unwrap();
        assert_eq!(
            (c.username, c.password.as_str()),
            (None, "s3cret: with # odd: chars")
        );

        // A map with `username` but no password: refused, naming the key, not the content.
        std::fs::write(&path, "username: s3cret-user\n").unwrap();
        let err = StandaloneCredentials.credentials(&file).unwrap_err();
        assert!(err.contains("password") && !err.contains("s3cret"), "{err}");
        std::fs::write(&path, "password: [s3cret]\n").unwrap();
        let err = StandaloneCredentials.credentials(&file).unwrap_err();
        assert!(err.contains("password") && !err.contains("s3cret"), "{err}");
        std::fs::write(&path, "").unwrap();
        let err = StandaloneCredentials.credentials(&file).unwrap_err();
        assert!(err.contains("empty"), "{err}");

        // A mounted Secret: a directory of keys.
        let secret = dir.join("secret");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("password"), "s3cret").unwrap();
        let mounted = health(Some(Credentials::File(secret.display().to_string())));
        let c = StandaloneCredentials
            .credentials(&mounted)
            .unwrap()
            .unwrap();
        assert_eq!((c.username, c.password.as_str()), (None, "s3cret"));
        std::fs::write(secret.join("username"), "probe\n").unwrap();
        let c = StandaloneCredentials
            .credentials(&mounted)
            .unwrap()
            .unwrap();
        assert_eq!(c.username.as_deref(), Some("probe"));
        std::fs::remove_file(secret.join("password")).unwrap();
        let err = StandaloneCredentials.credentials(&mounted).unwrap_err();
        assert!(err.contains("no `password` file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(StandaloneCredentials.credentials(&health(None)), Ok(None));
    }

    /// A users file is parsed once and given again while it is unchanged; an edit in place,
    /// a new file renamed over it (a Secret volume's update) and a second's age each make
    /// the next read see the file as it is.
    #[test]
    fn a_users_file_is_read_again_once_it_changes() {
        let dir = std::env::temp_dir().join(format!("dbportal-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users.yaml");
        let name = path.display().to_string();
        std::fs::write(&path, "app: one\n").unwrap();
        let first = read_users(&name).unwrap();
        assert_eq!(first.get("app").map(String::as_str), Some("one"));
        let again = read_users(&name).unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "unchanged: the parsed users again"
        );

        // The same length, written in place.
        std::fs::write(&path, "app: two\n").unwrap();
        let edited = read_users(&name).unwrap();
        assert_eq!(edited.get("app").map(String::as_str), Some("two"));

        // A new file renamed over it.
        let next = dir.join("users.yaml.new");
        std::fs::write(&next, "app: three\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        let renamed = read_users(&name).unwrap();
        assert_eq!(renamed.get("app").map(String::as_str), Some("three"));

        // Unchanged, but older than USERS_KEPT_FOR: read again (a new map, the same users).
        std::thread::sleep(USERS_KEPT_FOR + std::time::Duration::from_millis(50));
        let aged = read_users(&name).unwrap();
        assert!(!Arc::ptr_eq(&renamed, &aged));
        assert_eq!(aged, renamed);

        // A file gone is an error, not the users kept.
        std::fs::remove_file(&path).unwrap();
        assert!(read_users(&name).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
