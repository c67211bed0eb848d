//! Streams after negotiation: plain or TLS, and a stream that first replays bytes the
//! negotiation had to read (a PostgreSQL startup packet's header, a ClientHello's first bytes).
//!
//! May import: the rest of `tls` only.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::bytes::drain_into;

/// A stream after negotiation: untouched, or wrapped in TLS (server or client side).
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::TlsStream<S>>),
    /// TLS whose records the portal keeps after rustls' handshake (pooled PostgreSQL clients).
    Records(Box<super::records::Records<S>>),
}

impl<S> std::fmt::Debug for MaybeTls<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaybeTls::Plain(_) => f.write_str("Plain"),
            MaybeTls::Tls(tls) => {
                let (_, conn) = tls.get_ref();
                write!(
                    f,
                    "Tls({:?}, alpn {:?})",
                    conn.protocol_version(),
                    conn.alpn_protocol().map(String::from_utf8_lossy)
                )
            }
            MaybeTls::Records(r) => write!(
                f,
                "Records({:?}, alpn {:?})",
                r.protocol_version(),
                r.alpn().map(String::from_utf8_lossy)
            ),
        }
    }
}

impl<S> MaybeTls<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_) | MaybeTls::Records(_))
    }

    /// The negotiated TLS version, for logs and metrics.
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(tls) => tls.get_ref().1.protocol_version(),
            MaybeTls::Records(r) => Some(r.protocol_version()),
        }
    }

    /// The negotiated ALPN protocol.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(tls) => tls.get_ref().1.alpn_protocol(),
            MaybeTls::Records(r) => r.alpn(),
        }
    }

    /// The SNI name a TLS client asked for.
    pub fn sni(&self) -> Option<&str> {
        match self {
            MaybeTls::Tls(tls) => match tls.as_ref() {
                tokio_rustls::TlsStream::Server(s) => s.get_ref().1.server_name(),
                tokio_rustls::TlsStream::Client(_) => None,
            },
            MaybeTls::Plain(_) | MaybeTls::Records(_) => None,
        }
    }

    /// The transport underneath.
    pub fn get_ref(&self) -> &S {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(tls) => tls.get_ref().0,
            MaybeTls::Records(r) => r.get_ref(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Records(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Records(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            MaybeTls::Records(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
            MaybeTls::Records(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Records(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Records(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A stream whose first reads return `prefix`, then the inner stream's bytes. Writes go
/// straight through.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(inner: S) -> Self {
        Rewind {
            prefix: Vec::new(),
            pos: 0,
            inner,
        }
    }

    pub fn with_prefix(inner: S, prefix: Vec<u8>) -> Self {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// Puts `bytes` back in front of what is still to be replayed.
    pub fn unread(&mut self, bytes: &[u8]) {
        let mut prefix = Vec::with_capacity(bytes.len() + self.prefix.len() - self.pos);
        prefix.extend_from_slice(bytes);
        prefix.extend_from_slice(&self.prefix[self.pos..]);
        self.prefix = prefix;
        self.pos = 0;
    }

    /// Bytes still to be replayed.
    pub fn pending(&self) -> &[u8] {
        &self.prefix[self.pos..]
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner stream and the bytes not replayed yet.
    pub fn into_parts(mut self) -> (S, Vec<u8>) {
        self.prefix.drain(..self.pos);
        (self.inner, self.prefix)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            drain_into(&mut this.prefix, &mut this.pos, buf);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
