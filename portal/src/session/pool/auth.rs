//! Authentication in PostgreSQL pooling, at both ends. To a client the portal is the server:
//! it finds the user's [`Secret`] (in `pooling.auth.usersSecret` / `usersFile`, else fetched
//! with `pooling.auth.query`) and runs SCRAM-SHA-256, or md5 for a user whose secret is an
//! md5 hash. To a backend it is the client: it logs in as the same user with the [`Login`]
//! that exchange left, a password, an md5 hash, or the ClientKey a SCRAM proof revealed
//! (SCRAM passthrough: the portal never holds a password it could replay elsewhere).
//!
//! May import: `config`, `health`, `metrics`, `wire` and the rest of `pool`.

use std::{
    collections::BTreeMap,
    io,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::{Duration, Instant},
};

use md5::{Digest, Md5};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use super::{
    random,
    scram::{self, ClientExchange, Exchange, Verifier},
    server::{lock, PgHub, ServerConn, ServerStream},
    Client, MAX_AUTH_MESSAGE,
};
use crate::{
    metrics::CloseReason,
    wire::postgres::{
        authentication, error_text, frame, message, parse_authentication, parse_key,
        parse_parameter_status, parse_sasl_initial, sasl_initial, startup_message, AUTH_CLEARTEXT,
        AUTH_MD5, AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL,
    },
};

/// How long a secret fetched with `pooling.auth.query` is used before it is fetched again (a
/// changed password, or a user created or dropped, takes effect within this time).
pub const FETCHED_FOR: Duration = Duration::from_secs(30);

/// What the portal knows of a user's password, by its form (as PostgreSQL stores them).
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The password itself: SCRAM-SHA-256 to the client, any method to the server.
    Password(String),
    /// `md5` and 32 hex digits, md5(password + user): md5 to the client and to the server.
    Md5(String),
    /// A SCRAM-SHA-256 verifier: SCRAM to the client; to the server with the keys the
    /// client's proof reveals.
    Scram(Verifier),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Password(_) => "Secret::Password(<redacted>)",
            Secret::Md5(_) => "Secret::Md5(<redacted>)",
            Secret::Scram(_) => "Secret::Scram(<redacted>)",
        })
    }
}

impl Secret {
    /// The secret a stored text stands for: an md5 hash, a SCRAM verifier, else a password.
    pub fn parse(text: &str) -> Secret {
        if is_md5_hash(text) {
            return Secret::Md5(text.to_ascii_lowercase());
        }
        match text
            .starts_with("SCRAM-SHA-256$")
            .then(|| Verifier::parse(text))
            .flatten()
        {
            Some(v) => Secret::Scram(v),
            None => Secret::Password(text.to_string()),
        }
    }
}

fn is_md5_hash(text: &str) -> bool {
    text.len() == 35 && text.starts_with("md5") && text[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// What the portal logs in to a backend with, as a client's user.
#[derive(Clone, Default)]
pub enum Login {
    /// No password (a server that trusts the portal).
    #[default]
    None,
    Password(String),
    Md5(String),
    Scram {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Login::None => "Login::None",
            Login::Password(_) => "Login::Password(<redacted>)",
            Login::Md5(_) => "Login::Md5(<redacted>)",
            Login::Scram { .. } => "Login::Scram(<redacted>)",
        })
    }
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// PostgreSQL's md5 form of a password: `md5` + md5(password + user).
pub fn md5_hash(password: &str, user: &str) -> String {
    format!("md5{}", md5_hex(&[password.as_bytes(), user.as_bytes()]))
}

/// The answer to an md5 challenge with `salt`, from the md5 form of the password.
pub fn md5_salted(hash: &str, salt: [u8; 4]) -> String {
    format!("md5{}", md5_hex(&[hash[3..].as_bytes(), &salt]))
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn denied(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, text)
}

/// Logs in to a backend on `stream` as `user` to `database`, answering the method the server
/// asks for with what `login` holds; up to the first ReadyForQuery.
pub(super) async fn login(
    mut stream: ServerStream,
    database: &str,
    user: &str,
    login: &Login,
) -> io::Result<ServerConn> {
    stream
        .write_all(&startup_message(&[("user", user), ("database", database)]))
        .await?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut scram: Option<ScramSha256> = None;
    let mut passthrough: Option<ClientExchange> = None;
    let mut params = BTreeMap::new();
    let mut key = (0, 0);
    let cannot = |method: &str| {
        denied(format!(
            "the server asks for {method}, which the portal cannot answer for user \"{user}\" (it holds {})",
            match login {
                Login::None => "no password",
                Login::Password(_) => "the password",
                Login::Md5(_) => "only the md5 hash of the password",
                Login::Scram { .. } => "only SCRAM keys",
            }
        ))
    };
    loop {
        let Some(n) = frame(&buf, 1 << 20).map_err(io::Error::other)? else {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during login",
                ));
            }
            continue;
        };
        let body = buf[5..n].to_vec();
        let tag = buf[0];
        buf.drain(..n);
        match tag {
            b'R' => {
                let (code, data) = parse_authentication(&body)
                    .ok_or_else(|| io::Error::other("malformed authentication request"))?;
                let reply = match (code, login) {
                    (AUTH_OK, _) => None,
                    (AUTH_CLEARTEXT, Login::Password(p)) => Some(message(b'p', &cstring(p))),
                    (AUTH_CLEARTEXT, _) => return Err(cannot("a cleartext password")),
                    (AUTH_MD5, Login::Password(_) | Login::Md5(_)) => {
                        let salt: [u8; 4] = data
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| io::Error::other("malformed md5 request"))?;
                        let hash = match login {
                            Login::Password(p) => md5_hash(p, user),
                            Login::Md5(h) => h.clone(),
                            _ => unreachable!("matched above"),
                        };
                        Some(message(b'p', &cstring(&md5_salted(&hash, salt))))
                    }
                    (AUTH_MD5, _) => return Err(cannot("md5")),
                    (AUTH_SASL, Login::Password(_) | Login::Scram { .. }) => {
                        let offers_scram = data
                            .split(|&b| b == 0)
                            .any(|m| m == scram::MECHANISM.as_bytes());
                        if !offers_scram {
                            return Err(denied(
                                "the server offers no SASL mechanism the portal speaks".into(),
                            ));
                        }
                        // gs2 flag `n`: a TLS server that offers -PLUS accepts it, while `y`
                        // would read as a downgrade.
                        let first = match login {
                            Login::Password(p) => {
                                let s = ScramSha256::new(p.as_bytes(), ChannelBinding::unsupported());
                                let first = s.message().to_vec();
                                scram = Some(s);
                                first
                            }
                            Login::Scram {
                                client_key,
                                server_key,
                            } => {
                                let (x, first) =
                                    ClientExchange::new(*client_key, *server_key, &random::<18>());
                                passthrough = Some(x);
                                first.into_bytes()
                            }
                            _ => unreachable!("matched above"),
                        };
                        Some(sasl_initial(scram::MECHANISM, &first))
                    }
                    (AUTH_SASL, _) => return Err(cannot("SCRAM-SHA-256")),
                    (AUTH_SASL_CONTINUE, _) => {
                        let last = match (&mut scram, &mut passthrough) {
                            (Some(s), _) => {
                                s.update(data)?;
                                s.message().to_vec()
                            }
                            (None, Some(x)) => x
                                .respond(data)
                                .map_err(|e| io::Error::other(e.to_string()))?
                                .into_bytes(),
                            _ => return Err(io::Error::other("SASLContinue before SASL")),
                        };
                        Some(message(b'p', &last))
                    }
                    (AUTH_SASL_FINAL, _) => {
                        match (&mut scram, &passthrough) {
                            (Some(s), _) => s.finish(data)?,
                            (None, Some(x)) => x.verify(data).map_err(|_| {
                                denied("the server's SCRAM signature is not the verifier's".into())
                            })?,
                            _ => return Err(io::Error::other("SASLFinal before SASL")),
                        }
                        None
                    }
                    (other, _) => {
                        return Err(denied(format!(
                            "the server asks for authentication method {other}, which the portal does not speak"
                        )))
                    }
                };
                if let Some(reply) = reply {
                    stream.write_all(&reply).await?;
                }
            }
            b'S' => {
                if let Some((k, v)) = parse_parameter_status(&body) {
                    params.insert(k, v);
                }
            }
            b'K' => key = parse_key(&body).unwrap_or_default(),
            b'E' => return Err(denied(error_text(&body))),
            b'Z' => return Ok(ServerConn::new(stream, params, key, !buf.is_empty())),
            // NoticeResponse, NegotiateProtocolVersion: nothing to do.
            _ => {}
        }
    }
}

fn cstring(text: &str) -> Vec<u8> {
    let mut m = text.as_bytes().to_vec();
    m.push(0);
    m
}

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
        let mut conn = super::server::dial(&self.ctx, &backend, "postgres", &user, &login)
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
        let Some((mechanism, data)) = (tag == b'p').then(|| parse_sasl_initial(&body)).flatten()
        else {
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
        if tag != b'p' {
            return Err(self.fatal("08P01", "expected a SASLResponse").await);
        }
        match exchange.finish(verifier, &body) {
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
        if tag != b'p' {
            return Err(self.fatal("08P01", "expected a PasswordMessage").await);
        }
        let answer = body.strip_suffix(&[0]).unwrap_or(&body);
        if !same(answer, md5_salted(hash, salt).as_bytes()) {
            debug!(user = %self.user, "md5 authentication failed");
            let text = self.auth_failed();
            return Err(self.fatal("28P01", &text).await);
        }
        self.send(&authentication(AUTH_OK, &[])).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_read_by_their_form() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(Secret::parse(&v), Secret::Scram(_)));
        let md5 = md5_hash("pw", "app");
        assert_eq!(Secret::parse(&md5), Secret::Md5(md5.clone()));
        assert_eq!(
            Secret::parse(&md5.to_ascii_uppercase().replacen("MD5", "md5", 1)),
            Secret::Md5(md5.clone())
        );
        for password in ["pw", "md5", "md5xyz", "SCRAM-SHA-256$broken", ""] {
            assert_eq!(Secret::parse(password), Secret::Password(password.into()));
        }
        assert!(!format!(
            "{:?} {:?}",
            Secret::parse("pw"),
            Login::Password("pw".into())
        )
        .contains("pw)"));
    }

    /// The md5 answers are libpq's (postgres-protocol computes them the way libpq does).
    #[test]
    fn md5_answers_match_libpq() {
        let salt = [1, 2, 3, 4];
        let libpq = postgres_protocol::authentication::md5_hash(b"app", b"s3cret", salt);
        assert_eq!(md5_salted(&md5_hash("s3cret", "app"), salt), libpq);
        assert_ne!(md5_salted(&md5_hash("wrong", "app"), salt), libpq);
    }
}
