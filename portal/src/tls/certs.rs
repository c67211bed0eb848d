//! Certificates: where the served pair comes from (files or PEM bytes), parsing it, checking
//! that the key matches the certificate, and building the rustls `ServerConfig` around it.
//!
//! May import: `config` and the rest of `tls`.

use std::{
    fmt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    sign::CertifiedKey,
    RootCertStore, ServerConfig,
};

use super::{provider, TlsError};
use crate::config::{Engine, TlsVersion};

/// Where a certificate chain and its key come from. Standalone portals read files; in a
/// cluster the PEM bytes of a `kubernetes.io/tls` Secret are handed over directly.
#[derive(Clone, PartialEq, Eq)]
pub enum CertSource {
    Files { cert: PathBuf, key: PathBuf },
    Pem { cert: Vec<u8>, key: Vec<u8> },
}

impl CertSource {
    pub fn files(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        CertSource::Files {
            cert: cert.into(),
            key: key.into(),
        }
    }

    /// A pair given as PEM bytes (a Secret's `tls.crt` and `tls.key`).
    pub fn from_pem(cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        CertSource::Pem {
            cert: cert.into(),
            key: key.into(),
        }
    }

    /// The current bytes of the pair: `(cert, key)`.
    pub fn read(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        match self {
            CertSource::Files { cert, key } => Ok((read_file(cert)?, read_file(key)?)),
            CertSource::Pem { cert, key } => Ok((cert.clone(), key.clone())),
        }
    }
}

impl fmt::Debug for CertSource {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertSource::Files { cert, key } => f
                .debug_struct("Files")
                .field("cert", cert)
                .field("key", key)
                .finish(),
            CertSource::Pem { cert, .. } => f
                .debug_struct("Pem")
                .field("cert_bytes", &cert.len())
                .finish_non_exhaustive(),
        }
    }
}

impl fmt::Display for CertSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertSource::Files { cert, key } => {
                write!(f, "{} + {}", cert.display(), key.display())
            }
            CertSource::Pem { .. } => f.write_str("PEM from the TLS Secret"),
        }
    }
}

/// CA bundle that client certificates must chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    File(PathBuf),
    Pem(Vec<u8>),
}

impl CaSource {
    pub fn read(&self) -> Result<Vec<u8>, TlsError> {
        match self {
            CaSource::File(path) => read_file(path),
            CaSource::Pem(bytes) => Ok(bytes.clone()),
        }
    }
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Everything the server side of TLS is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSettings {
    pub engine: Engine,
    pub min_version: TlsVersion,
    pub cert: CertSource,
    pub client_ca: Option<CaSource>,
}

impl ServerSettings {
    /// The settings of a configuration whose `tls.mode` is `terminate` and that names its
    /// certificate files (a standalone portal); `None` otherwise.
    pub fn from_config(config: &crate::config::Config) -> Option<Self> {
        let tls = &config.tls;
        if tls.mode != crate::config::TlsMode::Terminate {
            return None;
        }
        let cert = tls.cert_file.as_deref().filter(|s| !s.is_empty())?;
        let key = tls.key_file.as_deref().filter(|s| !s.is_empty())?;
        Some(ServerSettings {
            engine: config.engine,
            min_version: tls.min_version,
            cert: CertSource::files(cert, key),
            client_ca: tls
                .client_ca_file
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(|p| CaSource::File(p.into())),
        })
    }
}

/// Facts about a served certificate, for logs, `/status` and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Certificates in the chain, leaf included.
    pub chain_len: usize,
}

impl CertInfo {
    /// Seconds until the certificate expires (negative once it has).
    pub fn seconds_to_expiry(&self, now: SystemTime) -> f64 {
        match self.not_after.duration_since(now) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }

    pub fn not_after_unix(&self) -> u64 {
        unix_secs(self.not_after)
    }
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A parsed, consistent certificate chain and key.
#[derive(Clone)]
pub struct CertPair {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Parses a PEM chain and key, and checks that the key belongs to the first certificate.
/// An expired certificate is refused too: serving it would fail every verifying client.
pub fn parse_pair(cert_pem: &[u8], key_pem: &[u8], now: SystemTime) -> Result<CertPair, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::BadCertificate(
            "no CERTIFICATE block in the certificate PEM".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::BadCertificate(format!("private key PEM: {e}")))?;
    let info = cert_info(&chain[0], chain.len())?;
    if info.not_after <= now {
        return Err(TlsError::BadCertificate(format!(
            "certificate for {} expired at unix time {}",
            info.subject,
            info.not_after_unix()
        )));
    }
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadCertificate(format!("private key: {e}")))?;
    let key = CertifiedKey::new(chain, signer);
    match key.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch(info.subject));
        }
        Err(e) => return Err(TlsError::BadCertificate(e.to_string())),
    }
    Ok(CertPair {
        key: Arc::new(key),
        info,
    })
}

fn cert_info(leaf: &CertificateDer<'_>, chain_len: usize) -> Result<CertInfo, TlsError> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref())
        .map_err(|e| TlsError::BadCertificate(format!("certificate DER: {e}")))?;
    let validity = &cert.tbs_certificate.validity;
    Ok(CertInfo {
        subject: cert.tbs_certificate.subject.to_string(),
        not_before: UNIX_EPOCH + validity.not_before.to_unix_duration(),
        not_after: UNIX_EPOCH + validity.not_after.to_unix_duration(),
        chain_len,
    })
}

/// ALPN protocols the portal offers for an engine. PostgreSQL 17 direct TLS requires
/// `postgresql`; gRPC clients of etcd require `h2` (grpc-go refuses a TLS connection without
/// ALPN since 1.67), and etcd's HTTP API also takes `http/1.1` on the same port.
pub fn alpn_for(engine: Engine) -> Vec<Vec<u8>> {
    match engine {
        Engine::Postgres => vec![b"postgresql".to_vec()],
        Engine::Etcd => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Engine::Redis | Engine::Mysql | Engine::Tcp => Vec::new(),
    }
}

/// The rustls protocol versions for a minimum version: 1.2 and 1.3, or 1.3 only.
pub fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        TlsVersion::V1_2 => BOTH,
        TlsVersion::V1_3 => TLS13,
    }
}

/// Builds the server config for a pair. The provider's default suites are the safe ones
/// (AEAD only; TLS 1.2 with ECDHE only), so no suite list is needed here.
pub fn server_config(
    settings: &ServerSettings,
    pair: &CertPair,
    client_ca: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider: Arc<CryptoProvider> = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions(settings.min_version))
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| TlsError::BadCertificate(format!("client CA PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError::BadCertificate(format!("client CA: {e}")))?;
            }
            if roots.is_empty() {
                return Err(TlsError::BadCertificate(
                    "no CERTIFICATE block in the client CA PEM".into(),
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::BadCertificate(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
        pair.key.clone(),
    )));
    config.alpn_protocols = alpn_for(settings.engine);
    if settings.engine == Engine::Postgres {
        // Pooled clients keep their own records after the handshake (`records`).
        super::records::configure(&mut config);
    }
    Ok(Arc::new(config))
}

/// The raw bytes of a pair and its client CA, read once per (re)load so that what is compared
/// and what is parsed are the same bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceBytes {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

impl SourceBytes {
    pub fn read(settings: &ServerSettings) -> Result<Self, TlsError> {
        let (cert, key) = settings.cert.read()?;
        let client_ca = settings
            .client_ca
            .as_ref()
            .map(CaSource::read)
            .transpose()?;
        Ok(SourceBytes {
            cert,
            key,
            client_ca,
        })
    }
}

/// Parses the bytes and builds a server config: the one step of a (re)load.
pub fn build(
    settings: &ServerSettings,
    bytes: &SourceBytes,
    now: SystemTime,
) -> Result<(Arc<ServerConfig>, CertInfo), TlsError> {
    let pair = parse_pair(&bytes.cert, &bytes.key, now)?;
    let config = server_config(settings, &pair, bytes.client_ca.as_deref())?;
    Ok((config, pair.info))
}

/// Reads the settings' sources and builds a server config.
pub fn load(
    settings: &ServerSettings,
    now: SystemTime,
) -> Result<(Arc<ServerConfig>, CertInfo), TlsError> {
    build(settings, &SourceBytes::read(settings)?, now)
}

/// How long a certificate has left, formatted for logs (`89d 23h`).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}
