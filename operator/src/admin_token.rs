//! `admin_token`: the Secret `<name>-portal-admin` holding the bearer token that the portals'
//! admin endpoint asks of state-changing requests (drain, maint, weight, cut sessions). The
//! operator makes it once, with 32 random bytes as hex, and never rewrites a token that is
//! there: a user may rotate it by writing the Secret (the kubelet refreshes the mounted file,
//! and the portal reads it at each request). It is owned by the DatabasePortal, so it goes
//! with it.
//!
//! To keep a reconcile free of extra API calls, a Secret known to exist is checked again only
//! after [`RECHECK`]; one deleted by hand comes back within that time.
//!
//! May import: `error`, `names`.

use std::{
    collections::HashMap,
    io::Read,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use tracing::info;

use crate::error::{Error, Result};
use crate::names::MANAGER;

/// Key of the token in the Secret.
pub const KEY: &str = "token";
/// How long a Secret seen is trusted to be there.
pub const RECHECK: Duration = Duration::from_secs(600);

static SEEN: Mutex<Option<HashMap<(String, String), Instant>>> = Mutex::new(None);

/// A new token: 32 random bytes, hex.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `secret` holds a usable token.
pub fn has_token(secret: &Secret) -> bool {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY))
        .is_some_and(|v| !v.0.iter().all(u8::is_ascii_whitespace))
}

/// Makes the Secret `meta` names, with a new token, unless it exists with one.
pub async fn ensure(client: &Client, meta: &ObjectMeta) -> Result<()> {
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let key = (ns.clone(), name.clone());
    {
        let seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if seen
            .as_ref()
            .and_then(|m| m.get(&key))
            .is_some_and(|at| at.elapsed() < RECHECK)
        {
            return Ok(());
        }
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let fail = |source| Error::Apply {
        kind: "Secret".into(),
        name: name.clone(),
        source,
    };
    let existing = api.get_opt(&name).await.map_err(fail)?;
    match existing {
        Some(s) if has_token(&s) => {}
        other => {
            let token = new_token().map_err(|e| Error::Serialize {
                kind: "Secret",
                message: format!("no random bytes for the admin token: {e}"),
            })?;
            let secret = Secret {
                metadata: meta.clone(),
                type_: Some("Opaque".into()),
                data: Some([(KEY.to_string(), ByteString(token.into_bytes()))].into()),
                ..Default::default()
            };
            if other.is_some() {
                // There without a token: the operator's apply fills it in.
                api.patch(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&secret),
                )
                .await
                .map_err(fail)?;
            } else {
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => {}
                    // Made meanwhile (another reconcile): theirs stays.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(fail(e)),
                }
            }
            info!(secret = %name, namespace = %ns, "made the portals' admin token");
        }
    }
    SEEN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key, Instant::now());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn an_empty_token_is_no_token() {
        let with = |v: &[u8]| Secret {
            data: Some([(KEY.to_string(), ByteString(v.to_vec()))].into()),
            ..Default::default()
        };
        assert!(has_token(&with(b"abc")));
        assert!(!has_token(&with(b"")));
        assert!(!has_token(&with(b" \n")));
        assert!(!has_token(&Secret::default()));
    }
}
