//! TLS from the portal to the database nodes (`tls.backend`): a rustls client with the
//! configured CA bundle or the system's roots, the configured server name or each node's host,
//! and an explicit, test-only way to skip verification.
//!
//! May import: `config` and the rest of `tls`.

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{provider, MaybeTls, TlsError};
use crate::config::BackendTls;

/// Connects the portal's side of TLS to a backend.
#[derive(Clone)]
pub struct BackendConnector {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for BackendConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConnector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl BackendConnector {
    /// The connector for `tls.backend`, or `None` when it is absent or not enabled.
    ///
    /// Without `caFile` the system's roots are used (read by `rustls-native-certs` from the
    /// usual bundle paths and `SSL_CERT_FILE`/`SSL_CERT_DIR`); the portal does not carry its
    /// own copy of the web PKI roots, since database nodes are rarely signed by a public CA.
    pub fn from_settings(settings: Option<&BackendTls>) -> Result<Option<Self>, TlsError> {
        let Some(settings) = settings.filter(|s| s.enabled) else {
            return Ok(None);
        };
        let config = client_config(settings)?;
        let server_name = settings
            .server_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                ServerName::try_from(s.to_string()).map_err(|e| {
                    TlsError::BadCertificate(format!("tls.backend.serverName {s:?}: {e}"))
                })
            })
            .transpose()?;
        Ok(Some(BackendConnector {
            config: Arc::new(config),
            server_name,
        }))
    }

    /// A connector trusting the CA certificates in `ca_pem` (tests, Secrets).
    pub fn from_ca_pem(ca_pem: &[u8], server_name: Option<&str>) -> Result<Self, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?
            .with_root_certificates(roots_from_pem(ca_pem)?)
            .with_no_client_auth();
        Ok(BackendConnector {
            config: Arc::new(config),
            server_name: server_name
                .map(|s| ServerName::try_from(s.to_string()))
                .transpose()
                .map_err(|e| TlsError::BadCertificate(e.to_string()))?,
        })
    }

    /// The name to verify for a node whose address has host `host`: the configured
    /// `serverName`, else the host itself (DNS name or IP literal).
    pub fn server_name_for(&self, host: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string())
            .map_err(|e| TlsError::Backend(format!("{host:?} is not a TLS server name: {e}")))
    }

    /// The TLS handshake on an open connection. `alpn`, when given, is offered alone (the
    /// protocol the client chose, so both legs speak the same one).
    pub async fn handshake<S>(
        &self,
        stream: S,
        name: ServerName<'static>,
        alpn: Option<&[u8]>,
    ) -> Result<MaybeTls<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = match alpn {
            None => self.config.clone(),
            Some(proto) => {
                let mut config = (*self.config).clone();
                config.alpn_protocols = vec![proto.to_vec()];
                Arc::new(config)
            }
        };
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .map_err(|e| TlsError::Backend(format!("TLS handshake: {e}")))?;
        Ok(MaybeTls::Tls(Box::new(tls.into())))
    }
}

/// The rustls client configuration `tls.backend` describes: the CA file's roots, the system's
/// roots, or no verification (`insecureSkipVerify`). Shared by the data plane and the probes.
pub(crate) fn client_config(settings: &BackendTls) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let config = if settings.insecure_skip_verify {
        tracing::warn!("tls.backend.insecureSkipVerify: backend certificates are not verified");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification))
            .with_no_client_auth()
    } else {
        let roots = match &settings.ca_file {
            Some(path) if !path.is_empty() => {
                let pem = std::fs::read(path).map_err(|e| TlsError::Read {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                roots_from_pem(&pem)?
            }
            _ => system_roots()?,
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(config)
}

fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::BadCertificate(format!("backend CA PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::BadCertificate(format!("backend CA: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::BadCertificate(
            "no CERTIFICATE block in the backend CA PEM".into(),
        ));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::BadCertificate(format!(
            "tls.backend: no caFile and no system CA certificates found ({} errors)",
            found.errors.len()
        )));
    }
    Ok(roots)
}

/// `insecureSkipVerify`: any certificate is accepted, but the handshake signatures are still
/// checked so the session keys are at least bound to the presented key.
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
