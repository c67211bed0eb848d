//! The portal library's error type.
//!
//! May import: `config`, `tls` (the errors it wraps).

use std::{io, net::SocketAddr};

use crate::config::ConfigError;

/// What stops the portal from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration was refused; the message names the field.
    #[error("configuration from {origin} refused: {source}")]
    Config {
        origin: String,
        #[source]
        source: ConfigError,
    },
    /// A listening socket could not be opened.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// TLS could not be set up (certificate, key, CA files).
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A signal handler could not be installed.
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        #[source]
        source: io::Error,
    },
}
