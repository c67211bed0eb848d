//! TLS: the served certificate and its live rotation, engine-aware termination (PostgreSQL and
//! MySQL negotiate TLS inside their own protocols), and re-encryption to the backends.
//!
//! The data plane uses one [`Terminator`] per configuration: [`Terminator::accept`] runs before a
//! backend is chosen (the TLS handshake, or PostgreSQL's SSLRequest dance), and
//! [`Terminator::connect`] after the backend's TCP connection is open (MySQL's in-protocol
//! upgrade, and TLS to the backend). Both are generic over the streams, so tests drive them
//! with in-memory pipes and real clients alike.
//!
//! May import: `config`, `metrics`, `wire`. Never `health`, `session`, `server` or
//! `admin`.

pub(crate) mod backend;
mod bytes;
mod certs;
mod mysql;
mod pg_sasl;
mod postgres;
mod records;
mod runtime;
mod store;
mod stream;
mod terminate;

use std::sync::Arc;

pub use backend::BackendConnector;
pub use bytes::{poll_read_onto, poll_read_onto_or};
pub use certs::{
    alpn_for, human_duration, load, parse_pair, server_config, CaSource, CertInfo, CertPair,
    CertSource, ServerSettings, SourceBytes,
};
pub use mysql::{negotiate as mysql_negotiate, CLIENT_SSL};
pub use postgres::{
    accept as postgres_accept, error_response as postgres_error_response,
    ssl_request as postgres_ssl_request,
};
pub use records::{record_error, RecordError};
pub use runtime::{TlsRuntime, CERT_POLL_INTERVAL};
pub use store::{CertStore, Refusal, Reload, Served, TlsStatus};
pub use stream::{MaybeTls, Rewind};
pub use terminate::{
    Accepted, Established, Negotiation, Pending, Terminator, Untouched, HANDSHAKE_TIMEOUT,
};

/// The crypto provider for every TLS config the portal builds, server and client.
///
/// ring, chosen by measurement (see `bench/TLS.md`): on this project's target (x86-64, 2 cores)
/// it did as many full handshakes per second as aws-lc-rs within noise and bulk AES-GCM within
/// a few percent, and it builds with no cmake, in a fraction of the time and binary size.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Why TLS setup or a client's TLS negotiation failed. The variant name is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("bad certificate or key: {0}")]
    BadCertificate(String),
    #[error("the private key does not match the certificate for {0}")]
    KeyMismatch(String),
    #[error("TLS negotiation did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// A client that does not use TLS where the portal requires it (it was told so).
    #[error("client did not use TLS, which this portal requires ({0})")]
    TlsRequired(&'static str),
    /// A truncated or malformed negotiation message.
    #[error("malformed {0}")]
    Malformed(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error("I/O during negotiation: {0}")]
    Io(#[from] std::io::Error),
}

impl TlsError {
    /// The variant's name, as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "read",
            TlsError::BadCertificate(_) => "bad_certificate",
            TlsError::KeyMismatch(_) => "key_mismatch",
            TlsError::HandshakeTimeout(_) => "handshake_timeout",
            TlsError::Handshake(_) => "handshake",
            TlsError::TlsRequired(_) => "tls_required",
            TlsError::Malformed(_) => "malformed",
            TlsError::Backend(_) => "backend",
            TlsError::Io(_) => "io",
        }
    }
}

/// A truncated read during negotiation is a malformed message, not an I/O failure.
pub(crate) fn read_err(what: &str) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TlsError::Malformed(format!("{what}: connection closed mid-message"))
        } else {
            TlsError::Io(e)
        }
    }
}

#[cfg(test)]
mod tests;
