//! PostgreSQL's TLS negotiation, portal side: SSLRequest answered with `S`, PostgreSQL 17
//! direct TLS (ALPN `postgresql`), GSSENCRequest answered with `N`, and a FATAL ErrorResponse
//! to a plaintext startup when TLS is required. The same negotiation towards a backend is in
//! [`ssl_request`].
//!
//! May import: `wire` (PostgreSQL framing) and the rest of `tls`.

use std::sync::Arc;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{read_err, MaybeTls, Rewind, TlsError};
pub use crate::wire::postgres::error_response;
use crate::wire::postgres::{
    is_protocol_3, startup_header, CANCEL_REQUEST, CANCEL_REQUEST_LEN, GSSENC_REQUEST, MAX_STARTUP,
    REQUEST_LEN, TLS_HANDSHAKE,
};
pub(crate) use crate::wire::postgres::{ALPN, SSL_REQUEST};

/// A client may try GSSAPI, then TLS, then start up: three negotiation messages at most.
const MAX_ROUNDS: usize = 3;

/// Negotiates with a PostgreSQL client. With `tls`, SSLRequest and direct TLS are served and
/// a plaintext startup is refused with an ErrorResponse if `require_tls`; without it, TLS
/// requests are declined (`N`) and the client starts up in plaintext. Bytes read past the
/// negotiation (a startup packet's header) are replayed by the returned stream.
///
/// With `own_records`, the portal keeps the TLS records itself after the handshake
/// ([`records`](super::records)), so an idle client holds only its keys.
///
/// A plaintext CancelRequest is let through even when TLS is required: it carries only a
/// backend pid and a random key, libpq before 17 always sends it in plaintext, and refusing it
/// would leave a client unable to cancel a runaway query.
pub async fn accept<S>(
    mut stream: Rewind<S>,
    tls: Option<&Arc<ServerConfig>>,
    require_tls: bool,
    own_records: bool,
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
            let stream = handshake(stream, config, own_records).await?;
            if stream.alpn() != Some(ALPN) {
                // PostgreSQL 17 requires ALPN in direct mode, so that a TLS connection meant
                // for another protocol cannot be replayed against the database.
                return Err(TlsError::Handshake(
                    "direct TLS without ALPN \"postgresql\"".into(),
                ));
            }
            return Ok(stream);
        }
        match startup_header(&header) {
            (REQUEST_LEN, SSL_REQUEST) => match tls {
                Some(config) => {
                    // Bytes the client sent behind the SSLRequest go into the TLS decoder, never
                    // into the session as if they had come over TLS (CVE-2021-23214).
                    stream.write_all(b"S").await?;
                    stream.flush().await?;
                    return handshake(stream, config, own_records).await;
                }
                None => stream.write_all(b"N").await?,
            },
            (REQUEST_LEN, GSSENC_REQUEST) => stream.write_all(b"N").await?,
            (CANCEL_REQUEST_LEN, CANCEL_REQUEST) => {
                stream.unread(&header);
                return Ok(MaybeTls::Plain(stream));
            }
            (len, version) if is_protocol_3(version) && (8..=MAX_STARTUP).contains(&len) => {
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
    own_records: bool,
) -> Result<MaybeTls<Rewind<S>>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if own_records {
        let records = super::records::accept(stream, config.clone()).await?;
        return Ok(MaybeTls::Records(Box::new(records)));
    }
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
    stream
        .write_all(&crate::wire::postgres::ssl_request())
        .await?;
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
