//! One TLS record: found whole in a buffer, opened in place, sealed; what a record may hold
//! after the handshake and the error that names what it may not.
//!
//! May import: the rest of `tls` only.

use std::io;

use ring::aead;

use super::keys::Keys;

/// Record header: type, legacy version, length.
pub(super) const HEADER: usize = 5;
/// The AEAD tag of every suite offered.
const TAG: usize = 16;
/// Most plaintext in one record (2^14).
pub(super) const MAX_PLAIN: usize = 1 << 14;
/// Most ciphertext in one record: TLS 1.3 allows 2^14 + 256, TLS 1.2 2^14 + 2048.
const MAX_CIPHER: usize = MAX_PLAIN + 2048;

const CHANGE_CIPHER_SPEC: u8 = 20;
pub(super) const ALERT: u8 = 21;
pub(super) const HANDSHAKE: u8 = 22;
pub(super) const APPLICATION_DATA: u8 = 23;
pub(super) const KEY_UPDATE: u8 = 24;
pub(super) const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;

pub(super) fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// What one record held, once opened.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Opened {
    /// Application data at this range of the record's payload.
    Data(std::ops::Range<usize>),
    /// close_notify: the client sends no more.
    Closed,
    /// A TLS 1.3 KeyUpdate; `true` if the client asks for the portal's keys to change too.
    KeyUpdate(bool),
    /// A record with nothing for the reader (an empty fragment, user_canceled).
    Nothing,
}

/// Opens one record in place. `record` is the whole record (header and payload); the
/// plaintext range returned is within it.
pub(super) fn open(
    keys: &mut Keys,
    key: &aead::LessSafeKey,
    record: &mut [u8],
) -> io::Result<Opened> {
    let typ = record[0];
    let len = u16::from_be_bytes([record[3], record[4]]) as usize;
    debug_assert_eq!(record.len(), HEADER + len);
    if keys.seq == u64::MAX {
        return Err(invalid("TLS record sequence number exhausted"));
    }
    let explicit = keys.aead.explicit_nonce(keys.tls13);
    if len < explicit + TAG {
        return Err(invalid(format!(
            "TLS record of {len} bytes, shorter than its nonce and tag"
        )));
    }
    let mut nonce = keys.nonce();
    let (header, payload) = record.split_at_mut(HEADER);
    let (plain_at, sealed) = if keys.tls13 {
        if typ != APPLICATION_DATA {
            return Err(invalid(format!(
                "TLS 1.3 record of type {typ} after the handshake (only application_data, 23)"
            )));
        }
        (HEADER, &mut payload[..])
    } else {
        if explicit > 0 {
            nonce[..4].copy_from_slice(&keys.iv[..4]);
            nonce[4..].copy_from_slice(&payload[..8]);
        }
        (HEADER + explicit, &mut payload[explicit..])
    };
    let aad_tls12;
    let aad: &[u8] = if keys.tls13 {
        header
    } else {
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&keys.seq.to_be_bytes());
        aad[8..11].copy_from_slice(&header[..3]);
        aad[11..].copy_from_slice(&((sealed.len() - TAG) as u16).to_be_bytes());
        aad_tls12 = aad;
        &aad_tls12
    };
    let plain_len = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad),
            sealed,
        )
        .map_err(|_| invalid("TLS record from the client failed to decrypt (bad_record_mac)"))?
        .len();
    keys.seq += 1;
    let (typ, plain) = if keys.tls13 {
        // TLSInnerPlaintext: content, the real type, zero padding.
        let inner = &record[plain_at..plain_at + plain_len];
        let Some(end) = inner.iter().rposition(|&b| b != 0) else {
            return Err(invalid("TLS 1.3 record with no content type"));
        };
        (inner[end], plain_at..plain_at + end)
    } else {
        (typ, plain_at..plain_at + plain_len)
    };
    let body = &record[plain.clone()];
    match typ {
        APPLICATION_DATA if body.is_empty() => Ok(Opened::Nothing),
        APPLICATION_DATA => Ok(Opened::Data(plain)),
        ALERT => match body {
            [_, CLOSE_NOTIFY] => Ok(Opened::Closed),
            [_, USER_CANCELED] => Ok(Opened::Nothing),
            [_, description] => Err(invalid(format!("TLS alert {description} from the client"))),
            _ => Err(invalid(format!("TLS alert of {} bytes", body.len()))),
        },
        HANDSHAKE if keys.tls13 => match body {
            [KEY_UPDATE, 0, 0, 1, request @ (0 | 1)] => Ok(Opened::KeyUpdate(*request == 1)),
            [KEY_UPDATE, ..] => Err(invalid("malformed TLS 1.3 KeyUpdate")),
            [kind, ..] => Err(invalid(format!(
                "TLS handshake message {kind} after the handshake (only KeyUpdate, 24)"
            ))),
            [] => Err(invalid("empty TLS handshake record")),
        },
        HANDSHAKE => Err(invalid("TLS renegotiation is not supported")),
        CHANGE_CIPHER_SPEC => Err(invalid("TLS change_cipher_spec after the handshake")),
        other => Err(invalid(format!("TLS record of unknown type {other}"))),
    }
}

/// Seals `plain` (at most 2^14 bytes) as one record of type `typ`, appended to `out`.
pub(super) fn seal(
    keys: &mut Keys,
    key: &aead::LessSafeKey,
    typ: u8,
    plain: &[&[u8]],
    out: &mut Vec<u8>,
) {
    let plain_len: usize = plain.iter().map(|p| p.len()).sum();
    debug_assert!(plain_len <= MAX_PLAIN);
    let explicit = keys.aead.explicit_nonce(keys.tls13);
    let inner = plain_len + usize::from(keys.tls13);
    let len = explicit + inner + TAG;
    let start = out.len();
    let outer = if keys.tls13 { APPLICATION_DATA } else { typ };
    out.reserve(HEADER + len);
    out.push(outer);
    out.extend_from_slice(&[3, 3]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    let nonce = keys.nonce();
    if explicit > 0 {
        out.extend_from_slice(&nonce[4..]);
    }
    let body_at = out.len();
    for p in plain {
        out.extend_from_slice(p);
    }
    if keys.tls13 {
        out.push(typ);
    }
    let mut aad = [0u8; 13];
    let aad: &[u8] = if keys.tls13 {
        aad[..HEADER].copy_from_slice(&out[start..start + HEADER]);
        &aad[..HEADER]
    } else {
        aad[..8].copy_from_slice(&keys.seq.to_be_bytes());
        aad[8] = typ;
        aad[9..11].copy_from_slice(&[3, 3]);
        aad[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
        &aad
    };
    let tag = key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(aad),
            &mut out[body_at..],
        )
        .expect("a record's plaintext is within the AEAD's limit");
    out.extend_from_slice(tag.as_ref());
    keys.seq += 1;
}

/// The length of the first record in `buf` if it is all there; an error for a record the
/// protocol does not allow.
pub(super) fn complete_record(buf: &[u8]) -> io::Result<Option<usize>> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if len > MAX_CIPHER {
        return Err(invalid(format!(
            "TLS record of {len} bytes (at most {MAX_CIPHER})"
        )));
    }
    if buf[1] != 3 {
        return Err(invalid(format!(
            "TLS record with version byte {:#04x}",
            buf[1]
        )));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}
