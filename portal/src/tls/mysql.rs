//! MySQL's TLS negotiation, which happens inside its handshake: the server greets first
//! (HandshakeV10 with capability flags), a TLS client answers with a 32-byte SSLRequest and
//! upgrades, then sends its HandshakeResponse. The portal relays the backend's greeting with
//! CLIENT_SSL set, upgrades the client itself, and goes on with the backend in plaintext or
//! TLS.
//!
//! Packet sequence ids count the packets of the connection phase. Upgrading one side and not
//! the other shifts them by one (the SSLRequest is seq 1 on one side only), so until the server
//! ends the connection phase (OK or ERR) packets are relayed one by one with the id adjusted;
//! from the command phase on, every command restarts at 0 and bytes flow untouched.
//!
//! May import: `wire` (MySQL packets) and the rest of `tls`.

use std::sync::Arc;

use rustls::{pki_types::ServerName, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{read_err, BackendConnector, MaybeTls, Rewind, TlsError};
pub use crate::wire::mysql::CLIENT_SSL;
use crate::wire::mysql::{
    self, caps_of, err_payload, set_caps, write_packet, Packet, PacketError, CLIENT_PROTOCOL_41,
    ERR_SECURE_TRANSPORT_REQUIRED, SSL_REQUEST_LEN,
};

/// Connection-phase packets are small (greeting, credentials, connect attributes); anything
/// much bigger is not a handshake.
const MAX_HANDSHAKE_PACKET: usize = 64 * 1024;
/// Rounds of the authentication exchange relayed before giving up.
const MAX_AUTH_ROUNDS: usize = 16;

/// Reads one connection-phase packet; `what` names it in errors.
async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S, what: &str) -> Result<Packet, TlsError> {
    mysql::read_packet(stream, MAX_HANDSHAKE_PACKET)
        .await
        .map_err(|e| match e {
            PacketError::Io(e) => read_err(what)(e),
            PacketError::TooLong { len } => TlsError::Malformed(format!(
                "{what}: {len} bytes is too long for a handshake packet"
            )),
        })
}

/// The offset of the lower capability flags in a HandshakeV10 payload.
fn greeting_caps_offset(payload: &[u8]) -> Result<usize, TlsError> {
    mysql::greeting_caps_offset(payload).map_err(|e| TlsError::Backend(e.to_string()))
}

/// Negotiates a MySQL connection between `client` and `backend`, both fresh TCP connections.
/// With `tls`, the client must upgrade (a client that does not is sent an ERR packet); with
/// `backend_tls`, the portal upgrades its connection to the backend. Returns both streams at
/// the start of the command phase, or, when nothing needs relaying, wherever the handshake is.
pub async fn negotiate<C, B>(
    mut client: Rewind<C>,
    mut backend: B,
    tls: Option<&Arc<ServerConfig>>,
    backend_tls: Option<(&BackendConnector, ServerName<'static>)>,
) -> Result<(MaybeTls<Rewind<C>>, MaybeTls<B>), TlsError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = read_packet(&mut backend, "MySQL server greeting")
        .await
        .map_err(|e| match e {
            TlsError::Malformed(m) => TlsError::Backend(m),
            other => other,
        })?;
    if greeting.payload.first() == Some(&0xff) {
        // The server refused us (too many connections, host blocked): the client should see why.
        write_packet(&mut client, greeting.seq, &greeting.payload).await?;
        return Err(TlsError::Backend(format!(
            "MySQL server refused the connection: {}",
            String::from_utf8_lossy(greeting.payload.get(9..).unwrap_or_default())
        )));
    }
    let offset = greeting_caps_offset(&greeting.payload)?;
    let server_caps = u16::from_le_bytes([greeting.payload[offset], greeting.payload[offset + 1]]);
    if backend_tls.is_some() && u32::from(server_caps) & CLIENT_SSL == 0 {
        return Err(TlsError::Backend(
            "the MySQL server does not offer TLS (no CLIENT_SSL in its greeting)".into(),
        ));
    }
    let client_caps = if tls.is_some() {
        server_caps | CLIENT_SSL as u16
    } else {
        server_caps & !(CLIENT_SSL as u16)
    };
    greeting.payload[offset..offset + 2].copy_from_slice(&client_caps.to_le_bytes());
    write_packet(&mut client, greeting.seq, &greeting.payload).await?;

    let first = read_packet(&mut client, "MySQL client handshake").await?;
    if first.payload.len() < SSL_REQUEST_LEN {
        return Err(TlsError::Malformed(format!(
            "MySQL handshake response of {} bytes",
            first.payload.len()
        )));
    }
    let asks_tls = caps_of(&first.payload) & CLIENT_SSL != 0;
    let (mut client, response) = match tls {
        Some(config) => {
            if !asks_tls || first.payload.len() != SSL_REQUEST_LEN {
                let message = err_payload(
                    ERR_SECURE_TRANSPORT_REQUIRED,
                    "HY000",
                    "Connections using insecure transport are prohibited: this portal requires TLS (use --ssl-mode=REQUIRED or VERIFY_IDENTITY)",
                );
                let _ = write_packet(&mut client, first.seq.wrapping_add(1), &message).await;
                let _ = client.shutdown().await;
                return Err(TlsError::TlsRequired("MySQL handshake without SSLRequest"));
            }
            let tls_client = tokio_rustls::TlsAcceptor::from(config.clone())
                .accept(client)
                .await
                .map_err(|e| TlsError::Handshake(e.to_string()))?;
            let mut client = MaybeTls::Tls(Box::new(tls_client.into()));
            let response = read_packet(&mut client, "MySQL handshake response").await?;
            if response.payload.len() < SSL_REQUEST_LEN {
                return Err(TlsError::Malformed(
                    "MySQL handshake response: truncated".into(),
                ));
            }
            (client, response)
        }
        None => {
            if asks_tls {
                return Err(TlsError::Malformed(
                    "MySQL SSLRequest although the portal offered no TLS".into(),
                ));
            }
            (MaybeTls::Plain(client), first)
        }
    };
    if caps_of(&response.payload) & CLIENT_PROTOCOL_41 == 0 {
        return Err(TlsError::Malformed(
            "MySQL client without CLIENT_PROTOCOL_41".into(),
        ));
    }

    let client_seq = response.seq;
    let mut payload = response.payload;
    let (mut backend, backend_seq) = match backend_tls {
        Some((connector, name)) => {
            let caps = caps_of(&payload) | CLIENT_SSL;
            set_caps(&mut payload, caps);
            write_packet(&mut backend, 1, &payload[..SSL_REQUEST_LEN]).await?;
            (connector.handshake(backend, name, None).await?, 2u8)
        }
        None => {
            let caps = caps_of(&payload) & !CLIENT_SSL;
            set_caps(&mut payload, caps);
            (MaybeTls::Plain(backend), 1u8)
        }
    };
    write_packet(&mut backend, backend_seq, &payload).await?;

    // Until the connection phase ends: backend id = client id + shift.
    let shift = backend_seq.wrapping_sub(client_seq);
    if shift != 0 {
        relay_auth(&mut client, &mut backend, shift).await?;
    }
    Ok((client, backend))
}

/// Relays the authentication exchange packet by packet, shifting sequence ids, until the
/// server sends OK or ERR.
async fn relay_auth<C, B>(client: &mut C, backend: &mut B, shift: u8) -> Result<(), TlsError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    for _ in 0..MAX_AUTH_ROUNDS {
        let packet = read_packet(backend, "MySQL authentication (server)")
            .await
            .map_err(|e| match e {
                TlsError::Malformed(m) => TlsError::Backend(m),
                other => other,
            })?;
        write_packet(client, packet.seq.wrapping_sub(shift), &packet.payload).await?;
        match packet.payload.as_slice() {
            // OK or ERR: the connection phase is over.
            [0x00, ..] | [0xff, ..] => return Ok(()),
            // caching_sha2_password fast-auth success: the server's OK follows at once.
            [0x01, 0x03] => continue,
            // Auth switch, more data, full-auth request: the client answers.
            _ => {
                let answer = read_packet(client, "MySQL authentication (client)").await?;
                write_packet(backend, answer.seq.wrapping_add(shift), &answer.payload).await?;
            }
        }
    }
    Err(TlsError::Malformed(
        "MySQL authentication: too many rounds".into(),
    ))
}
