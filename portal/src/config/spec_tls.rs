//! The TLS part of the `DatabasePortal` spec: towards clients (`tls`) and towards the
//! database nodes (`tls.backend`), with the cert-manager issuer a certificate may come from.
//!
//! May import: nothing but the rest of `config`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// TLS between clients and the portal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// terminate: the portal serves TLS (engine-aware for PostgreSQL and MySQL); passthrough:
    /// bytes pass untouched; disabled: plaintext. Default terminate.
    #[serde(default)]
    pub mode: TlsMode,
    /// The cert-manager issuer that signs the portal's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
    /// An existing `kubernetes.io/tls` Secret to serve instead of a cert-manager certificate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_name: String,
    /// Extra DNS names for the certificate; the portal Services' names are always included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// Lowest TLS version accepted: "1.2" (default) or "1.3".
    #[serde(default)]
    pub min_version: TlsVersion,
    /// TLS from the portal to the database nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendTls>,
    /// Standalone portal only: PEM certificate chain file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub cert_file: Option<String>,
    /// Standalone portal only: PEM private key file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub key_file: Option<String>,
    /// Standalone portal only: PEM CA bundle; when set, clients must present a certificate
    /// signed by it.
    #[serde(
        default,
        rename = "clientCAFile",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(skip)]
    pub client_ca_file: Option<String>,
}

/// How the portal treats TLS from clients.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The portal terminates TLS (default).
    #[default]
    Terminate,
    /// Bytes pass untouched end to end.
    Passthrough,
    /// Plaintext.
    Disabled,
}

/// Lowest accepted TLS version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

/// A cert-manager issuer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct IssuerRef {
    /// Name of the Issuer or ClusterIssuer.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Issuer (same namespace, default) or ClusterIssuer.
    #[serde(default)]
    pub kind: IssuerKind,
    /// API group of the issuer. Default cert-manager.io.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Kind of a cert-manager issuer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum IssuerKind {
    /// A namespaced Issuer.
    #[default]
    Issuer,
    /// A cluster-wide ClusterIssuer.
    ClusterIssuer,
}

/// TLS from the portal to the database nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackendTls {
    /// Encrypt the portal's connections to the nodes (PostgreSQL: by SSLRequest).
    #[serde(default)]
    pub enabled: bool,
    /// PEM CA bundle that signs the nodes' certificates (default: the system's roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Name to verify in the nodes' certificates (default: the host of each address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Skip verification of the nodes' certificates. Default false; for tests only.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}
