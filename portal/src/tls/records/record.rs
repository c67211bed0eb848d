//! One TLS record after the handshake: its framing (header, size limits), its opening and
//! sealing through rustls' `MessageDecrypter` / `MessageEncrypter`, and what its content type
//! allows; the refusal that names the alert a fault is answered with.
//!
//! May import: the rest of `tls` only.

use std::{fmt, io};

use rustls::{
    crypto::cipher::{
        InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks,
        OutboundPlainMessage,
    },
    AlertDescription, ContentType, Error, PeerMisbehaved, ProtocolVersion,
};

/// Record header: type, legacy version, length.
pub(super) const HEADER: usize = 5;
/// Most plaintext in one record (2^14, RFC 8446 5.1, RFC 5246 6.2.1).
pub(super) const MAX_PLAIN: usize = 1 << 14;
/// Most ciphertext in one record: 2^14 + 256 in TLS 1.3 (RFC 8446 5.2), 2^14 + 2048 in TLS
/// 1.2 (RFC 5246 6.2.3).
pub(super) fn max_cipher(tls13: bool) -> usize {
    MAX_PLAIN + if tls13 { 256 } else { 2048 }
}

pub(super) const KEY_UPDATE: u8 = 24;
pub(super) const WARNING: u8 = 1;
pub(super) const FATAL: u8 = 2;

/// Why a client's TLS connection ended in its record layer: a record the portal refused (the
/// alert it sent before closing), or a fatal alert the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// The alert sent (`sent`) or received.
    pub alert: AlertDescription,
    /// `true`: the portal refused what the client sent and told it with `alert`.
    pub sent: bool,
    pub why: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sent {
            write!(f, "{} (alert {:?} sent)", self.why, self.alert)
        } else {
            write!(f, "{}", self.why)
        }
    }
}

impl std::error::Error for RecordError {}

impl RecordError {
    pub(super) fn io(&self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self.clone())
    }
}

/// The portal refuses a record: `alert` goes to the client, then the connection ends.
pub(super) fn refuse(alert: AlertDescription, why: impl Into<String>) -> RecordError {
    RecordError {
        alert,
        sent: true,
        why: why.into(),
    }
}

/// The error a read returns when the record layer ended for `e`.
pub fn record_error(e: &io::Error) -> Option<&RecordError> {
    e.get_ref()?.downcast_ref()
}

/// The length of the first record in `buf` if it is all there; a refusal for a header the
/// protocol does not allow (an unknown version, a record longer than the version allows).
pub(super) fn frame(buf: &[u8], tls13: bool) -> Result<Option<usize>, RecordError> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    if buf[1] != 3 {
        return Err(refuse(
            AlertDescription::DecodeError,
            format!("TLS record with version byte {:#04x}", buf[1]),
        ));
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if len > max_cipher(tls13) {
        return Err(refuse(
            AlertDescription::RecordOverflow,
            format!(
                "TLS record of {len} bytes (at most {} in TLS 1.{})",
                max_cipher(tls13),
                if tls13 { 3 } else { 2 }
            ),
        ));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

/// What one record held.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Content<'a> {
    Data(&'a [u8]),
    /// An alert: its level and description.
    Alert(u8, u8),
    /// TLS 1.3 handshake bytes (a KeyUpdate, maybe a fragment of one).
    Handshake(&'a [u8]),
}

/// Opens one whole record (header and payload) in place with `dec` at sequence number `seq`:
/// rustls checks the tag, removes TLS 1.3 padding and limits the plaintext to 2^14; the type
/// is then one a connection after its handshake may carry.
pub(super) fn open<'a>(
    dec: &mut dyn MessageDecrypter,
    seq: u64,
    tls13: bool,
    record: &'a mut [u8],
) -> Result<Content<'a>, RecordError> {
    let (header, payload) = record.split_at_mut(HEADER);
    let typ = ContentType::from(header[0]);
    if tls13 && typ != ContentType::ApplicationData {
        return Err(refuse(
            AlertDescription::UnexpectedMessage,
            format!(
                "TLS 1.3 record of type {} after the handshake (only application_data, 23)",
                header[0]
            ),
        ));
    }
    let version = ProtocolVersion::from(u16::from_be_bytes([header[1], header[2]]));
    let plain = dec
        .decrypt(InboundOpaqueMessage::new(typ, version, payload), seq)
        .map_err(|e| match e {
            Error::DecryptError => refuse(
                AlertDescription::BadRecordMac,
                "TLS record from the client failed to decrypt (bad_record_mac)",
            ),
            Error::PeerSentOversizedRecord => refuse(
                AlertDescription::RecordOverflow,
                "TLS record from the client with more than 2^14 bytes of plaintext",
            ),
            Error::PeerMisbehaved(PeerMisbehaved::IllegalMiddleboxChangeCipherSpec) => refuse(
                AlertDescription::UnexpectedMessage,
                "TLS 1.3 change_cipher_spec after the handshake",
            ),
            e => refuse(
                AlertDescription::UnexpectedMessage,
                format!("TLS record from the client refused: {e}"),
            ),
        })?;
    content(plain.typ, plain.payload, tls13)
}

/// What a record of type `typ` may carry after the handshake.
fn content(typ: ContentType, body: &[u8], tls13: bool) -> Result<Content<'_>, RecordError> {
    match typ {
        ContentType::ApplicationData => Ok(Content::Data(body)),
        ContentType::Alert => match body {
            [level, description] => Ok(Content::Alert(*level, *description)),
            _ => Err(refuse(
                AlertDescription::DecodeError,
                format!("TLS alert of {} bytes", body.len()),
            )),
        },
        ContentType::Handshake if tls13 && body.is_empty() => Err(refuse(
            AlertDescription::UnexpectedMessage,
            "empty TLS handshake record",
        )),
        ContentType::Handshake if tls13 => Ok(Content::Handshake(body)),
        ContentType::Handshake => Err(refuse(
            AlertDescription::UnexpectedMessage,
            "TLS renegotiation is not supported",
        )),
        ContentType::ChangeCipherSpec => Err(refuse(
            AlertDescription::UnexpectedMessage,
            "TLS change_cipher_spec after the handshake",
        )),
        other => Err(refuse(
            AlertDescription::UnexpectedMessage,
            format!("TLS record of unexpected type {}", u8::from(other)),
        )),
    }
}

/// What a TLS 1.3 handshake message read after the handshake asks for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Handshake {
    /// More bytes are needed.
    Partial,
    /// A whole KeyUpdate (`true`: the client asks for the portal's keys to change too) that
    /// ends its record, as a key change must (RFC 8446 5.1).
    KeyUpdate(bool),
}

/// Reads the handshake bytes `hs` gathered so far, which end where a record ended.
pub(super) fn handshake(hs: &[u8]) -> Result<Handshake, RecordError> {
    let [kind, a, b, c, rest @ ..] = hs else {
        return Ok(Handshake::Partial);
    };
    if *kind != KEY_UPDATE {
        return Err(refuse(
            AlertDescription::UnexpectedMessage,
            format!("TLS handshake message {kind} after the handshake (only KeyUpdate, 24)"),
        ));
    }
    if [*a, *b, *c] != [0, 0, 1] {
        return Err(refuse(
            AlertDescription::DecodeError,
            "malformed TLS 1.3 KeyUpdate",
        ));
    }
    match rest {
        [] => Ok(Handshake::Partial),
        [request @ (0 | 1)] => Ok(Handshake::KeyUpdate(*request == 1)),
        [_, _, ..] => Err(refuse(
            AlertDescription::UnexpectedMessage,
            "TLS 1.3 KeyUpdate not at the end of its record",
        )),
        [_] => Err(refuse(
            AlertDescription::IllegalParameter,
            "TLS 1.3 KeyUpdate with an invalid request_update",
        )),
    }
}

/// Seals `plain` (at most 2^14 bytes, in slices) as one record of type `typ` with `enc` at
/// sequence number `seq`, appended to `out`.
pub(super) fn seal(
    enc: &mut dyn MessageEncrypter,
    seq: u64,
    typ: ContentType,
    plain: &[&[u8]],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let record = enc
        .encrypt(
            OutboundPlainMessage {
                typ,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::new(plain),
            },
            seq,
        )
        .map_err(|e| io::Error::other(format!("sealing a TLS record: {e}")))?
        .encode();
    if out.is_empty() {
        *out = record;
    } else {
        out.extend_from_slice(&record);
    }
    Ok(())
}
