//! PostgreSQL's frontend/backend framing: the untyped startup-phase packets (StartupMessage,
//! SSLRequest, GSSENCRequest, CancelRequest) and their codes, the typed messages (a tag byte,
//! then a length that counts itself), the limits the server applies, and the few messages the
//! portal reads or writes itself (AuthenticationSASL's code, ReadyForQuery, ErrorResponse).
//!
//! May import: nothing from the rest of the crate.

/// The request code of an SSLRequest.
pub const SSL_REQUEST: u32 = 80_877_103;
/// The request code of a GSSENCRequest.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// The request code of a CancelRequest.
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.0, the version of a StartupMessage.
pub const PROTOCOL_3_0: u32 = 196_608;
/// The length of an SSLRequest or a GSSENCRequest.
pub const REQUEST_LEN: u32 = 8;
/// The length of a CancelRequest.
pub const CANCEL_REQUEST_LEN: u32 = 16;
/// The server's cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP: u32 = 10_000;
/// The first byte of a TLS handshake record: a PostgreSQL 17 client in direct TLS mode.
pub const TLS_HANDSHAKE: u8 = 0x16;
/// The ALPN protocol of PostgreSQL 17's direct TLS.
pub const ALPN: &[u8] = b"postgresql";
/// The header of a typed message: tag and length.
pub const HEADER_LEN: usize = 5;
/// The authentication code of AuthenticationSASL in an `R` message.
pub const AUTH_SASL: u32 = 10;

/// The length and code of a startup-phase packet's first eight bytes.
pub fn startup_header(header: &[u8; 8]) -> (u32, u32) {
    (
        u32::from_be_bytes([header[0], header[1], header[2], header[3]]),
        u32::from_be_bytes([header[4], header[5], header[6], header[7]]),
    )
}

/// Whether `code` is a protocol 3 version number (a StartupMessage, not a request code).
pub fn is_protocol_3(code: u32) -> bool {
    code >> 16 == 3
}

/// An SSLRequest packet.
pub fn ssl_request() -> [u8; 8] {
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&REQUEST_LEN.to_be_bytes());
    request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
    request
}

/// The length field of a typed message whose header (at least [`HEADER_LEN`] bytes) starts
/// `head`; it counts itself, not the tag.
pub fn message_len(head: &[u8]) -> u32 {
    u32::from_be_bytes([head[1], head[2], head[3], head[4]])
}

/// A typed message: `tag`, the length, `body`.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + HEADER_LEN);
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An ErrorResponse message.
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
    self::message(b'E', &body)
}

/// The transaction status a ReadyForQuery (`Z`) message reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

/// The tag of ReadyForQuery.
pub const READY_FOR_QUERY: u8 = b'Z';

impl ReadyStatus {
    /// The status of a complete ReadyForQuery message; `None` if `message` is not one.
    pub fn of(message: &[u8]) -> Option<ReadyStatus> {
        match message {
            [READY_FOR_QUERY, 0, 0, 0, 5, status] => ReadyStatus::from_byte(*status),
            _ => None,
        }
    }

    pub fn from_byte(b: u8) -> Option<ReadyStatus> {
        match b {
            b'I' => Some(ReadyStatus::Idle),
            b'T' => Some(ReadyStatus::InTransaction),
            b'E' => Some(ReadyStatus::Failed),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            ReadyStatus::Idle => b'I',
            ReadyStatus::InTransaction => b'T',
            ReadyStatus::Failed => b'E',
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_codes_and_messages() {
        let (len, code) = startup_header(&ssl_request());
        assert_eq!((len, code), (8, SSL_REQUEST));
        assert!(is_protocol_3(PROTOCOL_3_0));
        assert!(!is_protocol_3(CANCEL_REQUEST));
        let e = error_response("FATAL", "28000", "no");
        assert_eq!(e[0], b'E');
        assert_eq!(message_len(&e) as usize + 1, e.len());
        let z = message(READY_FOR_QUERY, b"T");
        assert_eq!(ReadyStatus::of(&z), Some(ReadyStatus::InTransaction));
        assert_eq!(ReadyStatus::of(&message(b'Z', b"x")), None);
        assert_eq!(ReadyStatus::Idle.as_byte(), b'I');
    }
}
