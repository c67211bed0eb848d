//! PostgreSQL's TLS negotiation, portal side: SSLRequest answered with `S`, PostgreSQL 17
//! direct TLS (ALPN `postgresql`), GSSENCRequest answered with `N`, and a FATAL ErrorResponse
//! to a plaintext startup when TLS is required. The same negotiation towards a backend is in
//! [`ssl_request`].

use std::sync::Arc;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{read_err, MaybeTls, Rewind, TlsError};

pub(crate) const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// The first byte of a TLS handshake record: a PostgreSQL 17 client in direct TLS mode.
const TLS_HANDSHAKE: u8 = 0x16;
pub(crate) const ALPN: &[u8] = b"postgresql";
/// A client may try GSSAPI, then TLS, then start up: three negotiation messages at most.
const MAX_ROUNDS: usize = 3;
/// The server's cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
const MAX_STARTUP: u32 = 10_000;

/// Negotiates with a PostgreSQL client. With `tls`, SSLRequest and direct TLS are served and
/// a plaintext startup is refused with an ErrorResponse if `require_tls`; without it, TLS
/// requests are declined (`N`) and the client starts up in plaintext. Bytes read past the
/// negotiation (a startup packet's header) are replayed by the returned stream.
///
/// A plaintext CancelRequest is let through even when TLS is required: it carries only a
/// backend pid and a random key, libpq before 17 always sends it in plaintext, and refusing it
/// would leave a client unable to cancel a runaway query.
pub async fn accept<S>(
    mut stream: Rewind<S>,
    tls: Option<&Arc<ServerConfig>>,
    require_tls: bool,
) -> Result<MaybeTls<Rewind<S>>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..MAX_ROUNDS {
        let mut header = [0u8; 8];
        stream
            .read_exact(&mut header)
            .await
            .map_err(read_err("PostgreSQL startup packet"))?;
        if header[0] == TLS_HANDSHAKE {
            let Some(config) = tls else {
                return Err(TlsError::Malformed(
                    "PostgreSQL direct TLS to a portal without TLS".into(),
                ));
            };
            stream.unread(&header);
            let stream = handshake(stream, config).await?;
            if stream.alpn() != Some(ALPN) {
                // PostgreSQL 17 requires ALPN in direct mode, so that a TLS connection meant
                // for another protocol cannot be replayed against the database.
                return Err(TlsError::Handshake(
                    "direct TLS without ALPN \"postgresql\"".into(),
                ));
            }
            return Ok(stream);
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let code = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        match (len, code) {
            (8, SSL_REQUEST) => match tls {
                Some(config) => {
                    // Bytes the client sent behind the SSLRequest go into the TLS decoder, never
                    // into the session as if they had come over TLS (CVE-2021-23214).
                    stream.write_all(b"S").await?;
                    stream.flush().await?;
                    return handshake(stream, config).await;
                }
                None => stream.write_all(b"N").await?,
            },
            (8, GSSENC_REQUEST) => stream.write_all(b"N").await?,
            (16, CANCEL_REQUEST) => {
                stream.unread(&header);
                return Ok(MaybeTls::Plain(stream));
            }
            (len, version) if version >> 16 == 3 && (8..=MAX_STARTUP).contains(&len) => {
                if require_tls {
                    let message = error_response(
                        "FATAL",
                        "28000",
                        "this portal requires TLS: connect with sslmode=require (or verify-full)",
                    );
                    // Best effort: the client may already be gone.
                    let _ = stream.write_all(&message).await;
                    let _ = stream.flush().await;
                    let _ = stream.shutdown().await;
                    return Err(TlsError::TlsRequired("PostgreSQL plaintext startup"));
                }
                stream.unread(&header);
                return Ok(MaybeTls::Plain(stream));
            }
            (len, code) => {
                return Err(TlsError::Malformed(format!(
                    "PostgreSQL startup packet (length {len}, code {code})"
                )))
            }
        }
        stream.flush().await?;
    }
    Err(TlsError::Malformed(
        "PostgreSQL negotiation: too many requests before startup".into(),
    ))
}

async fn handshake<S>(
    stream: Rewind<S>,
    config: &Arc<ServerConfig>,
) -> Result<MaybeTls<Rewind<S>>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls = tokio_rustls::TlsAcceptor::from(config.clone())
        .accept(stream)
        .await
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    Ok(MaybeTls::Tls(Box::new(tls.into())))
}

/// Asks a PostgreSQL server to switch to TLS; `Ok` once it answered `S` (the TLS handshake is
/// the caller's).
pub async fn ssl_request<S>(stream: &mut S) -> Result<(), TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8u32.to_be_bytes());
    request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    stream.write_all(&request).await?;
    stream.flush().await?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(|e| TlsError::Backend(format!("no answer to SSLRequest: {e}")))?;
    match answer[0] {
        b'S' => Ok(()),
        b'N' => Err(TlsError::Backend(
            "the PostgreSQL server does not accept TLS (answered N to SSLRequest)".into(),
        )),
        other => Err(TlsError::Backend(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

/// A PostgreSQL ErrorResponse message.
pub fn error_response(severity: &str, sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + message.len());
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', sqlstate),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    out
}
