//! The keys of the `DatabasePortal` spec that only the portal reads, left out of the CRD's
//! schema (the operator writes them into the portal's ConfigMap, a standalone portal's file
//! has them): the `peers` a PostgreSQL cancel is forwarded to, the standalone probe
//! `credentials` and the admin endpoint's `adminLimits`.
//!
//! May import: nothing outside `config`.

use serde::{Deserialize, Serialize};

use super::duration::Duration;
use super::pooling::ByteSize;

/// Another portal of the same DatabasePortal (`peers`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The portal's name (in a cluster, its Pod's).
    pub name: String,
    /// `host:port` of its listener (in a cluster, its per-portal Service).
    pub address: String,
}

/// Probe credentials of the standalone portal.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum Credentials {
    /// Given inline.
    Inline {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        password: String,
    },
    /// The path of a YAML file with `username` and `password`.
    File(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Inline { username, .. } => f
                .debug_struct("Inline")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// The admin endpoint's limits (`adminLimits`, portal only).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdminLimits {
    /// Admin connections served at once; more are closed at accept. Probes and a scraper need
    /// a handful. Default 64.
    #[serde(default = "AdminLimits::default_max_connections")]
    pub max_connections: u32,
    /// Largest request head (request line and headers); a larger one gets 431. 8Ki to 1Mi,
    /// default 16Ki.
    #[serde(default = "AdminLimits::default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Largest request body (announced or chunked); a larger one gets 413. 1Ki to 1Mi,
    /// default 64Ki.
    #[serde(default = "AdminLimits::default_max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// An admin connection is closed this long after it was accepted, busy or not (a scraper
    /// reconnects; a slow client cannot keep a place). Default 60s.
    #[serde(default = "AdminLimits::default_connection_lifetime")]
    pub connection_lifetime: Duration,
}

impl AdminLimits {
    fn default_max_connections() -> u32 {
        64
    }
    fn default_max_header_bytes() -> ByteSize {
        ByteSize(16 << 10)
    }
    fn default_max_body_bytes() -> ByteSize {
        ByteSize(64 << 10)
    }
    fn default_connection_lifetime() -> Duration {
        Duration::from_secs(60)
    }
    pub(super) fn is_default(&self) -> bool {
        *self == AdminLimits::default()
    }
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_connections: Self::default_max_connections(),
            max_header_bytes: Self::default_max_header_bytes(),
            max_body_bytes: Self::default_max_body_bytes(),
            connection_lifetime: Self::default_connection_lifetime(),
        }
    }
}
