//! MySQL's packet framing (a 3-byte little-endian length, a sequence id, the payload) and the
//! connection phase's few fields the portal reads or sets: the capability flags of the
//! greeting and of the client's answer, the SSLRequest's length, ERR packets.
//!
//! May import: nothing from the rest of the crate.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// CLIENT_SSL in the capability flags.
pub const CLIENT_SSL: u32 = 0x0000_0800;
/// CLIENT_PROTOCOL_41 in the capability flags.
pub const CLIENT_PROTOCOL_41: u32 = 0x0000_0200;
/// The length of an SSLRequest (HandshakeResponse41 up to the filler).
pub const SSL_REQUEST_LEN: usize = 32;
/// ER_SECURE_TRANSPORT_REQUIRED.
pub const ERR_SECURE_TRANSPORT_REQUIRED: u16 = 3159;

/// One packet: its sequence id and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub seq: u8,
    pub payload: Vec<u8>,
}

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The header announced more than the caller's limit.
    #[error("{len} bytes is too long")]
    TooLong { len: usize },
}

/// Reads one packet of at most `max_len` bytes of payload.
pub async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_len: usize,
) -> Result<Packet, PacketError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    if len > max_len {
        return Err(PacketError::TooLong { len });
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(Packet {
        seq: header[3],
        payload,
    })
}

/// Writes one packet and flushes.
pub async fn write_packet<S: AsyncWrite + Unpin>(
    stream: &mut S,
    seq: u8,
    payload: &[u8],
) -> io::Result<()> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&len.to_le_bytes()[..3]);
    out.push(seq);
    out.extend_from_slice(payload);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// An ERR packet payload (with the SQL state marker of protocol 4.1).
pub fn err_payload(code: u16, sqlstate: &str, message: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(9 + message.len());
    p.push(0xff);
    p.extend_from_slice(&code.to_le_bytes());
    p.push(b'#');
    p.extend_from_slice(sqlstate.as_bytes());
    p.extend_from_slice(message.as_bytes());
    p
}

/// Why a greeting's capability flags could not be found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GreetingError {
    #[error("greeting is not HandshakeV10 (first byte {0:?})")]
    NotV10(Option<u8>),
    #[error("greeting: unterminated server version")]
    UnterminatedVersion,
    #[error("greeting: truncated")]
    Truncated,
}

/// The offset of the lower capability flags in a HandshakeV10 payload.
pub fn greeting_caps_offset(payload: &[u8]) -> Result<usize, GreetingError> {
    if payload.first() != Some(&10) {
        return Err(GreetingError::NotV10(payload.first().copied()));
    }
    let version_end = payload[1..]
        .iter()
        .position(|&b| b == 0)
        .ok_or(GreetingError::UnterminatedVersion)?;
    // protocol, version + NUL, thread id (4), auth data part 1 (8), filler (1).
    let offset = 1 + version_end + 1 + 4 + 8 + 1;
    if payload.len() < offset + 2 {
        return Err(GreetingError::Truncated);
    }
    Ok(offset)
}

/// The capability flags of a HandshakeResponse41 (or SSLRequest) payload (none in a payload
/// shorter than the flags).
pub fn caps_of(response: &[u8]) -> u32 {
    response
        .get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Sets the capability flags of a HandshakeResponse41 (or SSLRequest) payload (a payload
/// shorter than the flags is left as it is).
pub fn set_caps(response: &mut [u8], caps: u32) {
    if let Some(flags) = response.get_mut(..4) {
        flags.copy_from_slice(&caps.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_round_trip_and_are_bounded() {
        let mut out = Vec::new();
        write_packet(&mut out, 3, b"hello").await.unwrap();
        assert_eq!(&out[..4], &[5, 0, 0, 3]);
        let p = read_packet(&mut &out[..], 64).await.unwrap();
        assert_eq!((p.seq, p.payload.as_slice()), (3, &b"hello"[..]));
        assert!(matches!(
            read_packet(&mut &out[..], 4).await,
            Err(PacketError::TooLong { len: 5 })
        ));
        assert_eq!(
            greeting_caps_offset(&[9]),
            Err(GreetingError::NotV10(Some(9)))
        );
    }
}
