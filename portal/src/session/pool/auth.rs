//! Authentication in PostgreSQL pooling, at both ends. To a client the portal is the server:
//! it finds the user's [`Secret`] (in `pooling.auth.usersSecret` / `usersFile`, else fetched
//! with `pooling.auth.query`) and runs SCRAM-SHA-256, or md5 for a user whose secret is an
//! md5 hash. To a backend it is the client: it logs in as the same user with the [`Login`]
//! that exchange left, a password, an md5 hash, or the ClientKey a SCRAM proof revealed
//! (SCRAM passthrough: the portal never holds a password it could replay elsewhere).
//!
//! May import: `metrics`, `wire` and the rest of `pool` (`conn`, `secret`, `scram`,
//! `server`).

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use super::{
    conn::{lock, random},
    pools::PgHub,
    scram::{self, Exchange, Verifier},
    secret::{md5_salted, same, Login, Secret},
    Client, MAX_AUTH_MESSAGE,
};
use crate::{
    metrics::CloseReason,
    wire::postgres::{
        authentication, frontend::Frontend, parse_sasl_initial, AUTH_MD5, AUTH_OK, AUTH_SASL,
        AUTH_SASL_CONTINUE, AUTH_SASL_FINAL,
    },
};

/// How long a secret fetched with `pooling.auth.query` is used before it is fetched again (a
/// changed password, or a user created or dropped, takes effect within this time).
pub const FETCHED_FOR: Duration = Duration::from_secs(30);

/// The verifier of a user's password (each costs thousands of HMACs, so it is made once per
/// password and dropped when the password changes).
fn verifier(hub: &PgHub, user: &str, password: &str) -> Arc<Verifier> {
    let mut map = lock(&hub.verifiers);
    if let Some((p, v)) = map.get(user) {
        if p == password {
            return v.clone();
        }
    }
    let v = Arc::new(Verifier::new(password, &random::<16>(), scram::ITERATIONS));
    if map.len() > 10_000 {
        map.clear();
    }
    map.insert(user.to_string(), (password.to_string(), v.clone()));
    v
}

impl<C> Client<C>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Checks the client's password: SCRAM-SHA-256, or md5 for a user whose secret is an md5
    /// hash. A user the portal does not know goes through the same SCRAM exchange with a
    /// made-up verifier and fails at the proof, like a wrong password. On success the client's
    /// [`Login`] is what its server connections log in with.
    pub(super) async fn authenticate(&mut self) -> Result<(), CloseReason> {
        let secret = match self.secret().await {
            Ok(s) => s,
            Err(e) => {
                info!(user = %self.user, error = %e, "the portal cannot check this client's password; the client is refused");
                return Err(self
                    .fatal("28000", "the portal cannot check passwords now")
                    .await);
            }
        };
        match secret.as_deref() {
            Some(Secret::Md5(hash)) => {
                let hash = hash.clone();
                self.md5_exchange(&hash).await?;
                self.login = Arc::new(Login::Md5(hash));
            }
            Some(Secret::Password(p)) => {
                let v = verifier(&self.hub, &self.user, p);
                self.scram_exchange(&v, true).await?;
                self.login = Arc::new(Login::Password(p.clone()));
            }
            Some(Secret::Scram(v)) => {
                let client_key = self.scram_exchange(v, true).await?;
                self.login = Arc::new(Login::Scram {
                    client_key,
                    server_key: v.server_key,
                });
            }
            None => {
                let made_up = Verifier::new(
                    &String::from_utf8_lossy(&random::<16>()),
                    &random::<16>(),
                    scram::ITERATIONS,
                );
                self.scram_exchange(&made_up, false).await?;
            }
        }
        Ok(())
    }

    fn auth_failed(&self) -> String {
        self.hub.stats.auth_failures.fetch_add(1, Relaxed);
        format!("password authentication failed for user \"{}\"", self.user)
    }

    /// The user's secret: from `usersSecret` / `usersFile`, else from `auth.query` (cached
    /// for [`FETCHED_FOR`]). `Ok(None)`: no such user. `Err`: the secret cannot be looked up
    /// now (never quoting a password).
    async fn secret(&mut self) -> Result<Option<Arc<Secret>>, String> {
        let users = self
            .credentials
            .users(&self.settings.users_lookup())
            .map_err(|e| format!("the users of pooling.auth cannot be read: {e}"))?;
        if let Some(text) = users.as_ref().and_then(|u| u.get(&self.user)) {
            return Ok(Some(Arc::new(Secret::parse(text))));
        }
        let Some(query) = self.settings.auth_query.clone() else {
            return Ok(None);
        };
        let fresh = |hub: &PgHub, user: &str| {
            lock(&hub.fetched)
                .get(user)
                .filter(|(at, _)| at.elapsed() < FETCHED_FOR)
                .map(|(_, s)| s.clone())
        };
        if let Some(s) = fresh(&self.hub, &self.user) {
            return Ok(s);
        }
        // One query at a time per portal: a crowd of clients of one user costs one query.
        let hub = self.hub.clone();
        let _one = hub.fetching.lock().await;
        if let Some(s) = fresh(&hub, &self.user) {
            return Ok(s);
        }
        let fetched = self.fetch(&query).await?;
        let mut map = lock(&hub.fetched);
        if map.len() > 10_000 {
            map.retain(|_, (at, _)| at.elapsed() < FETCHED_FOR);
        }
        map.insert(self.user.clone(), (Instant::now(), fetched.clone()));
        Ok(fetched)
    }

    /// Runs `pooling.auth.query` for the client's user on the backend its transactions would
    /// go to, logged in as the probes are (`healthCheck.credentials`).
    async fn fetch(&mut self, query: &str) -> Result<Option<Arc<Secret>>, String> {
        let backend = self.choose().await.map_err(|(_, why)| why)?;
        let probe = self
            .credentials
            .credentials(&self.config.health)
            .map_err(|e| format!("pooling.auth.query needs the probe's credentials: {e}"))?;
        let user = probe
            .as_ref()
            .and_then(|c| c.username.clone())
            .unwrap_or_else(|| "postgres".into());
        let login = probe.map_or(Login::None, |c| Login::Password(c.password));
        let mut conn = super::conn::dial(&self.ctx, &backend, "postgres", &user, &[], &login)
            .await
            .map_err(|e| {
                format!(
                    "pooling.auth.query: logging in to {} as {user} failed: {e}",
                    backend.name
                )
            })?;
        let text = conn
            .query_one(query, &self.user, self.config.timeouts.server)
            .await
            .map_err(|e| format!("pooling.auth.query on {} failed: {e}", backend.name))?;
        debug!(user = %self.user, backend = %backend.name, found = text.is_some(), "pooling.auth.query ran");
        Ok(text
            .filter(|t| !t.is_empty())
            .map(|t| Arc::new(Secret::parse(&t))))
    }

    /// SCRAM-SHA-256 as the server with `verifier`. Returns the ClientKey the client's proof
    /// revealed; a client that is not `known` fails whatever it sends.
    async fn scram_exchange(
        &mut self,
        verifier: &Verifier,
        known: bool,
    ) -> Result<[u8; 32], CloseReason> {
        let offer = format!("{}\0\0", scram::MECHANISM);
        self.send(&authentication(AUTH_SASL, offer.as_bytes()))
            .await?;
        let (tag, body) = self.read_message(MAX_AUTH_MESSAGE).await?;
        let Some((mechanism, data)) = auth_response(tag, &body).and_then(parse_sasl_initial) else {
            return Err(self.fatal("08P01", "expected a SASLInitialResponse").await);
        };
        if mechanism != scram::MECHANISM.as_bytes() {
            let text = format!(
                "{}: SASL mechanism {:?} is not offered",
                self.auth_failed(),
                String::from_utf8_lossy(mechanism)
            );
            return Err(self.fatal("28000", &text).await);
        }
        let (exchange, server_first) = match Exchange::start(verifier, data, &random::<18>()) {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "SCRAM exchange refused");
                let text = self.auth_failed();
                return Err(self.fatal("28P01", &text).await);
            }
        };
        self.send(&authentication(AUTH_SASL_CONTINUE, server_first.as_bytes()))
            .await?;
        let (tag, body) = self.read_message(MAX_AUTH_MESSAGE).await?;
        let Some(body) = auth_response(tag, &body) else {
            return Err(self.fatal("08P01", "expected a SASLResponse").await);
        };
        match exchange.finish(verifier, body) {
            Ok((server_final, client_key)) if known => {
                let mut out = authentication(AUTH_SASL_FINAL, server_final.as_bytes());
                out.extend_from_slice(&authentication(AUTH_OK, &[]));
                self.send(&out).await?;
                Ok(client_key)
            }
            other => {
                match other {
                    Err(e) => debug!(error = %e, user = %self.user, "authentication failed"),
                    Ok(_) => {
                        debug!(user = %self.user, "authentication failed: no such user in pooling.auth")
                    }
                }
                let text = self.auth_failed();
                Err(self.fatal("28P01", &text).await)
            }
        }
    }

    /// md5 as the server, for a user whose secret is the md5 hash `hash`.
    async fn md5_exchange(&mut self, hash: &str) -> Result<(), CloseReason> {
        let salt = random::<4>();
        self.send(&authentication(AUTH_MD5, &salt)).await?;
        let (tag, body) = self.read_message(MAX_AUTH_MESSAGE).await?;
        let Some(body) = auth_response(tag, &body) else {
            return Err(self.fatal("08P01", "expected a PasswordMessage").await);
        };
        let answer = body.strip_suffix(&[0]).unwrap_or(body);
        if !same(answer, md5_salted(hash, salt).as_bytes()) {
            debug!(user = %self.user, "md5 authentication failed");
            let text = self.auth_failed();
            return Err(self.fatal("28P01", &text).await);
        }
        self.send(&authentication(AUTH_OK, &[])).await
    }
}

/// The body of an authentication answer (a `p` message), `None` for any other message.
fn auth_response(tag: u8, body: &[u8]) -> Option<&[u8]> {
    match Frontend::decode(tag, body) {
        Ok(Frontend::AuthResponse(body)) => Some(body),
        _ => None,
    }
}
