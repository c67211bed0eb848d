//! PostgreSQL's frontend/backend framing: the untyped startup-phase packets (StartupMessage,
//! SSLRequest, GSSENCRequest, CancelRequest) and their codes, the typed messages (a tag byte,
//! then a length that counts itself), the limits the server applies, and the few messages the
//! portal reads or writes itself (AuthenticationSASL's code, ReadyForQuery, ErrorResponse),
//! and what a pooler needs to speak as the server: the startup parameters, the authentication
//! exchange, ParameterStatus, BackendKeyData, the framing of a stream of typed messages.
//! The typed messages themselves, decoded without copying: [`frontend`] (what a client
//! sends) and [`backend`] (what a server sends); a tag means one thing from a client and
//! another from a server (`S` is Sync one way, ParameterStatus the other).
//!
//! May import: nothing from the rest of the crate.

pub mod backend;
pub mod frontend;

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

/// The largest typed message accepted from a peer (PostgreSQL's own limit, 1 GiB).
pub const MAX_MESSAGE: usize = 1 << 30;
/// AuthenticationOk.
pub const AUTH_OK: u32 = 0;
/// AuthenticationCleartextPassword.
pub const AUTH_CLEARTEXT: u32 = 3;
/// AuthenticationMD5Password.
pub const AUTH_MD5: u32 = 5;
/// AuthenticationSASLContinue.
pub const AUTH_SASL_CONTINUE: u32 = 11;
/// AuthenticationSASLFinal.
pub const AUTH_SASL_FINAL: u32 = 12;

/// A malformed message, named by what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message {tag:?} has length {len} (must be 4 to {max})", tag = *tag as char)]
    Length { tag: u8, len: u64, max: usize },
    #[error("{0}")]
    Body(String),
    #[error("message {tag:?} of length {len} is malformed: {what}", tag = *tag as char)]
    Malformed {
        tag: u8,
        len: usize,
        what: &'static str,
    },
}

/// The size of the complete typed message at the start of `buf`: `Ok(None)` until it is all
/// there; `Err` for a length below 4 or above `max`.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = message_len(head) as usize;
    if len < 4 || len > max {
        return Err(FrameError::Length {
            tag: head[0],
            len: len as u64,
            max,
        });
    }
    Ok((buf.len() > len).then_some(len + 1))
}

/// A typed message's body, read in order: each step fails with what was expected.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn cstr(&mut self) -> Result<&'a [u8], &'static str> {
        let (s, rest) = cstr(self.rest).ok_or("a string without its NUL")?;
        self.rest = rest;
        Ok(s)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.rest.len() < n {
            return Err("the body ends early");
        }
        let (b, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A value with an Int32 length before it, -1 for NULL.
    fn value(&mut self) -> Result<Option<&'a [u8]>, &'static str> {
        match self.u32()? as i32 {
            -1 => Ok(None),
            n if n < 0 => Err("a negative value length"),
            n => self.bytes(n as usize).map(Some),
        }
    }

    /// Items of `size` bytes after their Int16 count; the count.
    fn counted(&mut self, size: usize) -> Result<u16, &'static str> {
        let n = self.u16()?;
        self.bytes(size * n as usize)?;
        Ok(n)
    }

    fn end(&self) -> Result<(), &'static str> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err("bytes after the end of the body")
        }
    }
}

/// The error of a malformed body.
fn malformed(tag: u8, body: &[u8], what: &'static str) -> FrameError {
    FrameError::Malformed {
        tag,
        len: body.len() + 4,
        what,
    }
}

/// The NUL-terminated string at the start of `buf` and what follows it.
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = memchr::memchr(0, buf)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// The parameters of a StartupMessage's body (after length and version): name/value pairs,
/// each NUL-terminated, then a final NUL. Errors name the byte offset.
pub fn startup_params(body: &[u8]) -> Result<Vec<(String, String)>, FrameError> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let at = body.len() - rest.len();
        let (name, after) = cstr(rest).ok_or_else(|| {
            FrameError::Body(format!(
                "startup packet: unterminated parameter name at byte {}",
                at + 8
            ))
        })?;
        if name.is_empty() {
            if !after.is_empty() {
                return Err(FrameError::Body(format!(
                    "startup packet: {} bytes after the final NUL",
                    after.len()
                )));
            }
            return Ok(out);
        }
        let (value, after) = cstr(after).ok_or_else(|| {
            FrameError::Body(format!(
                "startup packet: unterminated value of {:?}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let text = |b: &[u8]| {
            String::from_utf8(b.to_vec()).map_err(|_| {
                FrameError::Body(format!(
                    "startup packet: parameter at byte {} is not UTF-8",
                    at + 8
                ))
            })
        };
        out.push((text(name)?, text(value)?));
        rest = after;
    }
}

/// A StartupMessage (protocol 3.0) with these parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    out.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in params {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out.push(0);
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// An authentication request (`R`) with `code` and `data`.
pub fn authentication(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    message(b'R', &body)
}

/// The code and data of an authentication request's body.
pub fn parse_authentication(body: &[u8]) -> Option<(u32, &[u8])> {
    let code = body.get(..4)?;
    Some((
        u32::from_be_bytes([code[0], code[1], code[2], code[3]]),
        &body[4..],
    ))
}

/// The mechanism and data of a SASLInitialResponse's body.
pub fn parse_sasl_initial(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mechanism, rest) = cstr(body)?;
    let len = rest.get(..4)?;
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let data = &rest[4..];
    match len {
        -1 => Some((mechanism, &[])),
        n if n >= 0 && n as usize == data.len() => Some((mechanism, data)),
        _ => None,
    }
}

/// A SASLInitialResponse (`p`).
pub fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(data.len() as u32).to_be_bytes());
    body.extend_from_slice(data);
    message(b'p', &body)
}

/// A ParameterStatus (`S`).
pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    body.push(0);
    message(b'S', &body)
}

/// Name and value of a ParameterStatus body.
pub fn parse_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let (name, rest) = cstr(body)?;
    let (value, _) = cstr(rest)?;
    Some((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// A BackendKeyData (`K`).
pub fn backend_key_data(pid: u32, secret: u32) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend_from_slice(&secret.to_be_bytes());
    message(b'K', &body)
}

/// Process id and secret of a BackendKeyData body (or of a CancelRequest's last 8 bytes).
pub fn parse_key(body: &[u8]) -> Option<(u32, u32)> {
    let b = body.get(..8)?;
    Some((
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    ))
}

/// A CancelRequest for a server's key.
pub fn cancel_request(pid: u32, secret: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&CANCEL_REQUEST_LEN.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..].copy_from_slice(&secret.to_be_bytes());
    out
}

/// A ReadyForQuery (`Z`).
pub fn ready_for_query(status: ReadyStatus) -> [u8; 6] {
    [READY_FOR_QUERY, 0, 0, 0, 5, status.as_byte()]
}

/// A simple Query (`Q`).
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Parse, Bind (one text parameter), Execute and Sync of an unnamed statement: `sql` run once
/// with `$1` = `param`, its rows in text.
pub fn query_with_param(sql: &str, param: &str) -> Vec<u8> {
    let mut parse = vec![0u8];
    parse.extend_from_slice(sql.as_bytes());
    parse.extend_from_slice(&[0, 0, 0]);
    let mut bind = vec![0u8, 0, 0, 0, 0, 1];
    bind.extend_from_slice(&(param.len() as u32).to_be_bytes());
    bind.extend_from_slice(param.as_bytes());
    bind.extend_from_slice(&[0, 0]);
    let mut out = message(b'P', &parse);
    out.extend_from_slice(&message(b'B', &bind));
    out.extend_from_slice(&message(b'E', &[0, 0, 0, 0, 0]));
    out.extend_from_slice(&message(b'S', &[]));
    out
}

/// The columns of a DataRow (`D`) body, `None` for NULL; `None` for a malformed body.
pub fn data_row(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let count = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut rest = &body[2..];
    let mut out = Vec::with_capacity(count.into());
    for _ in 0..count {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
        } else {
            let len = len as usize;
            out.push(Some(rest.get(..len)?));
            rest = &rest[len..];
        }
    }
    rest.is_empty().then_some(out)
}

/// The fields of an ErrorResponse or NoticeResponse body: code byte and text.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((&code, after)) = rest.split_first() {
        if code == 0 {
            break;
        }
        let Some((text, after)) = cstr(after) else {
            break;
        };
        out.push((code, String::from_utf8_lossy(text).into_owned()));
        rest = after;
    }
    out
}

/// `SQLSTATE: message` of an ErrorResponse body, for logs and errors.
pub fn error_text(body: &[u8]) -> String {
    let fields = error_fields(body);
    let get = |c: u8| {
        fields
            .iter()
            .find(|(k, _)| *k == c)
            .map_or("", |(_, v)| v.as_str())
    };
    format!("{} {}: {}", get(b'S'), get(b'C'), get(b'M'))
}

/// Appends a typed message: `tag`, its length (patched once `body` has written the rest),
/// then what `body` writes.
pub(crate) fn encode_framed(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.push(tag);
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

/// Appends `s` and its terminating NUL.
pub(crate) fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_with_a_parameter_and_data_rows() {
        let m = query_with_param("SELECT $1", "u");
        let mut tags = Vec::new();
        let mut rest = &m[..];
        while let Some(n) = frame(rest, 1 << 10).unwrap() {
            tags.push(rest[0]);
            rest = &rest[n..];
        }
        assert_eq!((tags, rest.len()), (b"PBES".to_vec(), 0));
        let row = [0, 2, 0, 0, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(data_row(&row), Some(vec![Some(&b"ab"[..]), None]));
        for bad in [
            &row[..1],
            &row[..7],
            &[0, 1, 0, 0, 0, 9, 1][..],
            &[0, 0, 1][..],
        ] {
            assert_eq!(data_row(bad), None, "{bad:?}");
        }
    }

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

    #[test]
    fn pooler_messages_round_trip() {
        let startup = startup_message(&[("user", "alice"), ("database", "shop")]);
        let (len, version) = startup_header(startup[..8].try_into().unwrap());
        assert_eq!((len as usize, version), (startup.len(), PROTOCOL_3_0));
        let params = startup_params(&startup[8..]).unwrap();
        assert_eq!(params[1], ("database".into(), "shop".into()));
        let err = startup_params(b"user\0alice").unwrap_err().to_string();
        assert!(err.contains("unterminated value"), "{err}");
        let err = startup_params(b"user\0a\0\0x").unwrap_err().to_string();
        assert!(err.contains("after the final NUL"), "{err}");
        let s = parameter_status("TimeZone", "UTC");
        assert_eq!(frame(&s, MAX_MESSAGE), Ok(Some(s.len())));
        assert_eq!(frame(&s[..s.len() - 1], MAX_MESSAGE), Ok(None));
        assert_eq!(
            parse_parameter_status(&s[5..]),
            Some(("TimeZone".into(), "UTC".into()))
        );
        let k = backend_key_data(7, 9);
        assert_eq!(parse_key(&k[5..]), Some((7, 9)));
        assert_eq!(parse_key(&cancel_request(7, 9)[8..]), Some((7, 9)));
        let p = sasl_initial("SCRAM-SHA-256", b"n,,n=,r=abc");
        let (m, d) = parse_sasl_initial(&p[5..]).unwrap();
        assert_eq!((m, d), (&b"SCRAM-SHA-256"[..], &b"n,,n=,r=abc"[..]));
        let e = error_response("FATAL", "53300", "too many");
        assert_eq!(error_text(&e[5..]), "FATAL 53300: too many");
        let r = authentication(AUTH_SASL_FINAL, b"v=x");
        assert_eq!(
            parse_authentication(&r[5..]),
            Some((AUTH_SASL_FINAL, &b"v=x"[..]))
        );
        assert!(frame(&[b'Q', 0, 0, 0, 3], MAX_MESSAGE).is_err());
        assert!(frame(&[b'Q', 0x7f, 0, 0, 0], 1 << 20).is_err());
        assert_eq!(ready_for_query(ReadyStatus::Idle), *b"Z\0\0\0\x05I");
    }

    /// A tiny deterministic generator (xorshift), so the property test needs no crate.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn random_bytes_and_splits_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let valid: Vec<u8> = [
            query("SELECT 1"),
            parameter_status("a", "b"),
            error_response("ERROR", "42000", "x"),
            ready_for_query(ReadyStatus::InTransaction).to_vec(),
        ]
        .concat();
        for round in 0..3000 {
            let len = (rng(&mut seed) % 64) as usize;
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| rng(&mut seed) as u8).collect()
            } else {
                let mut v = valid.clone();
                for _ in 0..(rng(&mut seed) % 4) {
                    let i = (rng(&mut seed) as usize) % v.len();
                    v[i] = rng(&mut seed) as u8;
                }
                v
            };
            let cut = (rng(&mut seed) as usize) % (bytes.len() + 1);
            bytes.truncate(cut.max(bytes.len() / 2));
            // Walk the stream as the pooler does; any split point must be safe.
            let mut at = 0;
            while let Ok(Some(n)) = frame(&bytes[at..], 1 << 16) {
                let body = &bytes[at + 5..at + n];
                let _ = parse_parameter_status(body);
                let _ = error_fields(body);
                let _ = parse_sasl_initial(body);
                let _ = parse_authentication(body);
                let _ = parse_key(body);
                let _ = ReadyStatus::of(&bytes[at..at + n]);
                at += n;
            }
            let _ = startup_params(&bytes);
        }
    }
}
