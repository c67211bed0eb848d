//! What the portal knows of a user's password, by its form as PostgreSQL stores passwords
//! ([`Secret`]: the password, an md5 hash, a SCRAM verifier), and what it logs in to a backend
//! with ([`Login`]). Pure.
//!
//! May import: the rest of `pool` ([`scram`](super::scram)).

use md5::{Digest, Md5};

use super::scram::Verifier;

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
    format!("md5{}", md5_hex(&[&hash.as_bytes()[3..], &salt]))
}

/// Whether two byte strings are equal, in time that depends only on their length.
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
