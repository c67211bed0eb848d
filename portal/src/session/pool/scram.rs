//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL runs it, both sides of it. As the server,
//! the portal checks a client's proof against a verifier (made from the user's password, or
//! fetched from the database by `pooling.auth.query`) and learns the client's ClientKey from
//! the proof; as a client, it logs in to a backend with that ClientKey and the verifier's
//! ServerKey (SCRAM passthrough), so it never needs the password itself. Channel binding is
//! not offered (the portal's TLS is not the backend's), so gs2 flags `n` and `y` are accepted
//! and `p` is refused. Pure functions over bytes, with the randomness passed in.
//!
//! May import: nothing of the crate.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ring::{digest, hmac, pbkdf2};

/// The mechanism the portal offers.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// PostgreSQL's default iteration count.
pub const ITERATIONS: u32 = 4096;

/// What the server keeps of a password: salt, iterations, StoredKey and ServerKey.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    tag.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn sha256(data: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// The password as SCRAM hashes it: SASLprep'd when that succeeds, else the raw bytes (as
/// PostgreSQL and libpq do).
fn prepared(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

impl Verifier {
    /// The verifier of `password` with this salt and iteration count.
    pub fn new(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations.max(1)).expect("at least 1"),
            salt,
            &prepared(password),
            &mut salted,
        );
        let client_key = hmac(&salted, b"Client Key");
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// A verifier in PostgreSQL's text form (`SCRAM-SHA-256$4096:salt$StoredKey:ServerKey`).
    pub fn parse(text: &str) -> Option<Verifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// Why an exchange failed. The client is told only that authentication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("the client asked for channel binding, which the portal does not offer")]
    ChannelBinding,
    #[error("wrong password (the client's proof does not match)")]
    Proof,
}

/// An exchange after the client's first message.
#[derive(Debug)]
pub struct Exchange {
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl Exchange {
    /// Reads the client-first-message and answers with the server-first-message.
    /// `server_nonce` is random bytes of the caller's.
    pub fn start(
        verifier: &Verifier,
        client_first: &[u8],
        server_nonce: &[u8],
    ) -> Result<(Exchange, String), ScramError> {
        let text = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first-message is not UTF-8"))?;
        let (flag, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("no gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("unknown gs2 channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Malformed(
                "authorization identity is not supported",
            ));
        }
        let gs2_header = format!("{flag},{authzid},");
        // n=<user>,r=<nonce>[,extensions]: PostgreSQL ignores the user here (the startup's
        // counts), and so does the portal.
        let mut parts = bare.split(',');
        let user = parts.next().unwrap_or("");
        if !user.starts_with("n=") {
            return Err(ScramError::Malformed("no user name attribute"));
        }
        let client_nonce = parts
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no client nonce"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("invalid client nonce"));
        }
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            Exchange {
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                gs2_header,
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final-message. On success: the server-final-message and the
    /// client's ClientKey (recovered from its proof).
    pub fn finish(
        self,
        verifier: &Verifier,
        client_final: &[u8],
    ) -> Result<(String, [u8; 32]), ScramError> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Malformed("client-final-message is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|c| c.strip_prefix("c="))
            .ok_or(ScramError::Malformed("no channel binding attribute"))?;
        if B64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed(
                "channel binding does not match the gs2 header",
            ));
        }
        let nonce = attrs
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no nonce"))?;
        if nonce != self.nonce {
            return Err(ScramError::Malformed("the nonce is not the server's"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("the proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let computed = sha256(&client_key);
        let diff = computed
            .iter()
            .zip(&verifier.stored_key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

/// The client's side of an exchange with a backend, knowing the ClientKey and ServerKey (not
/// the password): what SCRAM passthrough logs in with.
#[derive(Debug)]
pub struct ClientExchange {
    client_key: [u8; 32],
    server_key: [u8; 32],
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl ClientExchange {
    /// The exchange and its client-first-message. `nonce` is random bytes of the caller's.
    pub fn new(client_key: [u8; 32], server_key: [u8; 32], nonce: &[u8]) -> (Self, String) {
        let nonce = B64.encode(nonce);
        // The user is the startup's; PostgreSQL ignores this one.
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}");
        (
            ClientExchange {
                client_key,
                server_key,
                client_first_bare,
                nonce,
                auth_message: None,
            },
            first,
        )
    }

    /// Reads the server-first-message and answers with the client-final-message.
    pub fn respond(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(server_first)
            .map_err(|_| ScramError::Malformed("server-first-message is not UTF-8"))?;
        let nonce = text
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no server nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Malformed(
                "the server's nonce does not extend ours",
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac(&sha256(&self.client_key), auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for i in 0..32 {
            proof[i] = self.client_key[i] ^ signature[i];
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message: the server knew the ServerKey.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let auth_message = self.auth_message.as_ref().ok_or(ScramError::Malformed(
            "server-final-message before server-first",
        ))?;
        let text = std::str::from_utf8(server_final)
            .map_err(|_| ScramError::Malformed("server-final-message is not UTF-8"))?;
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v.trim_end()).ok())
            .ok_or(ScramError::Malformed("no server signature"))?;
        let expected = hmac(&self.server_key, auth_message.as_bytes());
        let diff = expected
            .iter()
            .zip(signature.iter().chain(std::iter::repeat(&0)))
            .fold((signature.len() != 32) as u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::Proof);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// The portal's server side against the SCRAM client tokio-postgres uses.
    fn run(password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = Verifier::new(password, b"0123456789abcdef", ITERATIONS);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) =
            Exchange::start(&verifier, client.message(), b"server-nonce-bytes")?;
        client.update(server_first.as_bytes()).unwrap();
        let (server_final, _) = exchange.finish(&verifier, client.message())?;
        client.finish(server_final.as_bytes()).unwrap();
        Ok(())
    }

    #[test]
    fn a_real_client_logs_in_and_a_wrong_password_fails() {
        run("s3cret", "s3cret").unwrap();
        run("pässwörd", "pässwörd").unwrap();
        assert_eq!(run("s3cret", "wrong"), Err(ScramError::Proof));
    }

    /// Passthrough: the key a real client's proof reveals logs in to a second server that
    /// holds the same verifier, and that server's signature checks out; a wrong ServerKey is
    /// caught.
    #[test]
    fn the_recovered_client_key_logs_in_elsewhere() {
        let verifier =
            Verifier::parse(&postgres_protocol::password::scram_sha_256(b"s3cret")).unwrap();
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let (exchange, server_first) =
            Exchange::start(&verifier, client.message(), b"nonce-one").unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let (_, client_key) = exchange.finish(&verifier, client.message()).unwrap();

        for (server_key, ok) in [(verifier.server_key, true), ([7u8; 32], false)] {
            let (mut ours, first) = ClientExchange::new(client_key, server_key, b"nonce-two");
            let (backend, server_first) =
                Exchange::start(&verifier, first.as_bytes(), b"nonce-three").unwrap();
            let last = ours.respond(server_first.as_bytes()).unwrap();
            let (server_final, key) = backend.finish(&verifier, last.as_bytes()).unwrap();
            assert_eq!(key, client_key);
            assert_eq!(ours.verify(server_final.as_bytes()).is_ok(), ok);
        }
        let (mut ours, _) = ClientExchange::new([1; 32], [2; 32], b"n");
        assert!(ours.respond(b"r=other,s=c2FsdA==,i=4096").is_err());
        assert!(ours.verify(b"v=AAAA").is_err());
    }

    #[test]
    fn postgres_verifier_text_parses() {
        let text = postgres_protocol::password::scram_sha_256(b"s3cret");
        let v = Verifier::parse(&text).unwrap();
        assert_eq!(v, Verifier::new("s3cret", &v.salt, v.iterations));
        assert!(Verifier::parse("md5abc").is_none());
    }

    #[test]
    fn malformed_messages_are_refused() {
        let v = Verifier::new("x", b"salt", 1);
        for bad in [
            &b""[..],
            b"n",
            b"p=tls-server-end-point,,n=,r=abc",
            b"n,a=admin,n=,r=abc",
            b"n,,r=abc",
            b"n,,n=,r=",
            b"\xff",
        ] {
            assert!(Exchange::start(&v, bad, b"s").is_err(), "{bad:?}");
        }
        let (ex, _) = Exchange::start(&v, b"n,,n=,r=abc", b"s").unwrap();
        assert!(ex.finish(&v, b"c=biws,r=other,p=AAAA").is_err());
    }
}
