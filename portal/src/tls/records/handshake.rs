//! The handshake of a client whose records the portal keeps: rustls' unbuffered API, fed one
//! record at a time so that it stops at the client's Finished and every later record (data
//! or a KeyUpdate in the Finished flight) is left to the record layer; then rustls' kernel
//! connection and traffic keys.
//!
//! May import: `wire` (PostgreSQL's ALPN name) and the rest of `tls`.

use std::sync::Arc;

use rustls::{
    server::UnbufferedServerConnection,
    unbuffered::{ConnectionState, EncodeError, UnbufferedStatus},
    ServerConfig, SupportedCipherSuite,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{keys::Keys, record::HEADER, Records, State};
use crate::tls::TlsError;

/// Most bytes of handshake the client may have in flight before the portal answers.
const MAX_HANDSHAKE: usize = 64 << 10;

/// The length of the first record in `buf`, if it is all there.
fn whole_record(buf: &[u8]) -> Option<usize> {
    let len = HEADER + u16::from_be_bytes([*buf.get(3)?, *buf.get(4)?]) as usize;
    (buf.len() >= len).then_some(len)
}

/// Runs the TLS handshake on `io` with rustls and returns the stream that keeps its records.
/// `config` must have been through [`super::configure`].
pub async fn accept<S>(mut io: S, config: Arc<ServerConfig>) -> Result<Records<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = |e: rustls::Error| TlsError::Handshake(e.to_string());
    let mut conn = UnbufferedServerConnection::new(config).map_err(handshake)?;
    let mut incoming = vec![0u8; 4096];
    let mut used = 0;
    // rustls sees `incoming[..fed]`: whole records, one more each time it is blocked.
    let mut fed = 0;
    let mut outgoing: Vec<u8> = Vec::new();
    let mut plain = Vec::new();
    let mut failed: Option<rustls::Error> = None;
    loop {
        // After an error rustls is asked only for the alert it queued: nothing is read again.
        let input = if failed.is_some() { 0 } else { fed };
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(&mut incoming[..input]);
        let mut blocked = false;
        match state {
            Err(e) => {
                // Send the alert rustls queued for the client (best effort), then fail.
                if failed.is_some() {
                    return Err(handshake(e));
                }
                failed = Some(e);
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                let at = outgoing.len();
                outgoing.resize(at + 512, 0);
                let n = match data.encode(&mut outgoing[at..]) {
                    Ok(n) => n,
                    Err(EncodeError::InsufficientSize(size)) => {
                        outgoing.resize(at + size.required_size, 0);
                        data.encode(&mut outgoing[at..])
                            .map_err(|e| TlsError::Handshake(e.to_string()))?
                    }
                    Err(e) => return Err(TlsError::Handshake(e.to_string())),
                };
                outgoing.truncate(at + n);
            }
            Ok(ConnectionState::TransmitTlsData(data)) => {
                io.write_all(&outgoing).await?;
                io.flush().await?;
                outgoing.clear();
                data.done();
                if let Some(e) = failed {
                    return Err(handshake(e));
                }
            }
            Ok(ConnectionState::BlockedHandshake) => {
                if let Some(e) = failed {
                    return Err(handshake(e));
                }
                blocked = true;
            }
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(handshake)?;
                    discard += record.discard;
                    plain.extend_from_slice(record.payload);
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => {
                incoming.copy_within(discard..used, 0);
                used -= discard;
                break;
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                return Err(TlsError::Handshake(
                    "the client closed during the handshake".into(),
                ))
            }
            Ok(other) => {
                return Err(TlsError::Handshake(format!(
                    "unexpected TLS state {other:?} during the handshake"
                )))
            }
        }
        if discard > 0 {
            incoming.copy_within(discard..used, 0);
            used -= discard;
            fed -= discard;
        }
        if !blocked {
            continue;
        }
        if let Some(n) = whole_record(&incoming[fed..used]) {
            fed += n;
            continue;
        }
        if used == incoming.len() {
            if incoming.len() >= MAX_HANDSHAKE {
                return Err(TlsError::Handshake(format!(
                    "more than {MAX_HANDSHAKE} bytes of handshake from the client"
                )));
            }
            incoming.resize(incoming.len() * 2, 0);
        }
        let n = io.read(&mut incoming[used..]).await?;
        if n == 0 {
            return Err(TlsError::Handshake(
                "the client closed during the handshake".into(),
            ));
        }
        used += n;
    }
    if conn.is_handshaking() {
        return Err(TlsError::Handshake(
            "the handshake did not finish before application data".into(),
        ));
    }
    let postgresql_alpn = conn.alpn_protocol() == Some(crate::wire::postgres::ALPN);
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(|e| TlsError::Handshake(format!("traffic keys: {e}")))?;
    let suite = kernel.negotiated_cipher_suite();
    let rx = Keys::new(suite, secrets.rx)?;
    let tx = Keys::new(suite, secrets.tx)?;
    // The kernel connection gives the next traffic secrets on a KeyUpdate: TLS 1.3 only.
    let kernel = matches!(suite, SupportedCipherSuite::Tls13(_)).then(|| Box::new(kernel));
    incoming.truncate(used);
    if used == 0 {
        incoming = Vec::new();
    }
    // Records that came whole with the client's Finished are opened at the first read.
    let state = State::new(rx, tx, kernel, incoming, plain, postgresql_alpn);
    Ok(Records { io, state })
}
