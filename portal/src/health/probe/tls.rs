//! TLS from the probes to the backends (`tls.backend`): rustls with the configured CA bundle or
//! the system's roots, and an adapter so tokio-postgres can use it.
//!
//! May import: `config`, `tls` (its backend connector) and the rest of `health`.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::ProbeError;
use crate::config::{Address, BackendTls as Spec};

/// A TLS client for the backends, built from `tls.backend`.
#[derive(Clone)]
pub struct BackendTls {
    pub spec: Spec,
    connector: TlsConnector,
}

impl BackendTls {
    /// Builds the client; the error names what could not be loaded.
    pub fn new(spec: &Spec) -> Result<Self, String> {
        let config = crate::tls::backend::client_config(spec).map_err(|e| e.to_string())?;
        Ok(BackendTls {
            spec: spec.clone(),
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    fn server_name(&self, address: &Address) -> Result<ServerName<'static>, ProbeError> {
        let name = self.spec.server_name.as_deref().unwrap_or(&address.host);
        ServerName::try_from(name.to_string())
            .map_err(|e| ProbeError::Tls(format!("server name {name:?}: {e}")))
    }

    /// TLS handshake over `stream` to the node at `address`.
    pub async fn connect<S>(&self, address: &Address, stream: S) -> Result<TlsStream<S>, ProbeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self.server_name(address)?;
        self.connector
            .connect(name, stream)
            .await
            .map_err(|e| ProbeError::Tls(e.to_string()))
    }

    /// The adapter tokio-postgres takes (it sends SSLRequest, then hands us the stream).
    pub fn postgres(&self, address: &Address) -> Result<PostgresTls, ProbeError> {
        Ok(PostgresTls {
            connector: self.connector.clone(),
            name: self.server_name(address)?,
        })
    }
}

/// rustls for tokio-postgres.
pub struct PostgresTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for PostgresTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PostgresTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = self.connector.connect(self.name, stream).await?;
            Ok(PostgresTlsStream(stream))
        })
    }
}

/// A TLS stream for tokio-postgres (no channel binding: SCRAM-SHA-256 without `-PLUS`).
pub struct PostgresTlsStream<S>(TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PostgresTlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PostgresTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PostgresTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
