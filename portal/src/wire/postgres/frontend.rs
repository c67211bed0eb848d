//! What a PostgreSQL client sends once logged in (and its authentication answers), typed:
//! [`Frontend`], decoded from a framed message's tag and body without copying (its variants
//! hold slices of the body), and encoded back for the messages the portal writes itself.
//! A tag the decoder does not know is kept as [`Frontend::Other`]; a known tag whose body is
//! truncated or too long is refused with a [`FrameError::Malformed`] naming the tag and the
//! length.
//!
//! May import: nothing from the rest of the crate.

use super::{encode_framed, malformed, put_cstr, FrameError, Reader};

/// The tag of Query.
const QUERY: u8 = b'Q';
/// The tag of Parse.
const PARSE: u8 = b'P';
/// The tag of Bind.
const BIND: u8 = b'B';
/// The tag of Describe.
const DESCRIBE: u8 = b'D';
/// The tag of Execute.
const EXECUTE: u8 = b'E';
/// The tag of Close.
const CLOSE: u8 = b'C';
/// The tag of Sync.
const SYNC: u8 = b'S';
/// The tag of Flush.
const FLUSH: u8 = b'H';
/// The tag of Terminate.
const TERMINATE: u8 = b'X';
/// The tag of CopyData (either direction).
const COPY_DATA: u8 = b'd';
/// The tag of CopyDone (either direction).
const COPY_DONE: u8 = b'c';
/// The tag of CopyFail.
const COPY_FAIL: u8 = b'f';
/// The tag of FunctionCall.
const FUNCTION_CALL: u8 = b'F';
/// The tag of PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse.
const AUTH_RESPONSE: u8 = b'p';

/// A complete Sync message.
const SYNC_MESSAGE: [u8; 5] = [SYNC, 0, 0, 0, 4];

/// What a Describe or Close names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// `S`: a prepared statement.
    Statement,
    /// `P`: a portal.
    Portal,
}

impl TargetKind {
    fn from_byte(b: u8) -> Option<TargetKind> {
        match b {
            b'S' => Some(TargetKind::Statement),
            b'P' => Some(TargetKind::Portal),
            _ => None,
        }
    }

    fn as_byte(self) -> u8 {
        match self {
            TargetKind::Statement => b'S',
            TargetKind::Portal => b'P',
        }
    }
}

/// A message from a client, borrowing its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend<'a> {
    /// `Q`: a simple query; `sql` without its NUL.
    Query { sql: &'a [u8] },
    /// `P`: a statement to prepare. `definition` is the body after the name (the query, its
    /// NUL, the parameter count and types), `query` the SQL within it.
    Parse {
        name: &'a [u8],
        query: &'a [u8],
        definition: &'a [u8],
    },
    /// `B`: a portal bound to a statement; `rest` is the body after the statement's name
    /// (parameter formats, values, result formats).
    Bind {
        portal: &'a [u8],
        statement: &'a [u8],
        rest: &'a [u8],
    },
    /// `D`: describe a statement or a portal.
    Describe { kind: TargetKind, name: &'a [u8] },
    /// `E`: run a portal, `max_rows` 0 for all of them.
    Execute { portal: &'a [u8], max_rows: u32 },
    /// `C`: close a statement or a portal.
    Close { kind: TargetKind, name: &'a [u8] },
    /// `S`: the end of an extended-protocol sequence.
    Sync,
    /// `H`: send what is pending, without ending the sequence.
    Flush,
    /// `X`: the client leaves.
    Terminate,
    /// `d`: COPY FROM STDIN data.
    CopyData(&'a [u8]),
    /// `c`: the end of COPY FROM STDIN data.
    CopyDone,
    /// `f`: COPY FROM STDIN abandoned, with the client's reason.
    CopyFail { message: &'a [u8] },
    /// `F`: the fast-path function call interface; `body` as sent (checked for shape).
    FunctionCall { body: &'a [u8] },
    /// `p`: an authentication answer (PasswordMessage, SASLInitialResponse, SASLResponse,
    /// GSSResponse: which one only the exchange in progress says).
    AuthResponse(&'a [u8]),
    /// A tag this decoder does not know, kept for the server to judge.
    Other { tag: u8, body: &'a [u8] },
}

/// The parameter formats, values and result formats of a Bind.
fn bind_rest(r: &mut Reader<'_>) -> Result<(), &'static str> {
    r.counted(2)?;
    let values = r.u16()?;
    for _ in 0..values {
        r.value()?;
    }
    r.counted(2)?;
    r.end()
}

impl<'a> Frontend<'a> {
    /// The message of `tag` with `body` (after the length).
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Frontend<'a>, FrameError> {
        let mut r = Reader { rest: body };
        let r = &mut r;
        let decoded = match tag {
            QUERY => r
                .cstr()
                .and_then(|sql| r.end().map(|()| Frontend::Query { sql })),
            PARSE => (|| {
                let name = r.cstr()?;
                let definition = r.rest;
                let query = r.cstr()?;
                r.counted(4)?;
                r.end()?;
                Ok(Frontend::Parse {
                    name,
                    query,
                    definition,
                })
            })(),
            BIND => (|| {
                let portal = r.cstr()?;
                let statement = r.cstr()?;
                let rest = r.rest;
                bind_rest(r)?;
                Ok(Frontend::Bind {
                    portal,
                    statement,
                    rest,
                })
            })(),
            DESCRIBE | CLOSE => (|| {
                let kind = TargetKind::from_byte(r.u8()?).ok_or("a target other than S or P")?;
                let name = r.cstr()?;
                r.end()?;
                Ok(if tag == DESCRIBE {
                    Frontend::Describe { kind, name }
                } else {
                    Frontend::Close { kind, name }
                })
            })(),
            EXECUTE => (|| {
                let portal = r.cstr()?;
                let max_rows = r.u32()?;
                r.end()?;
                Ok(Frontend::Execute { portal, max_rows })
            })(),
            SYNC => r.end().map(|()| Frontend::Sync),
            FLUSH => r.end().map(|()| Frontend::Flush),
            TERMINATE => r.end().map(|()| Frontend::Terminate),
            COPY_DONE => r.end().map(|()| Frontend::CopyDone),
            COPY_DATA => Ok(Frontend::CopyData(body)),
            COPY_FAIL => r
                .cstr()
                .and_then(|message| r.end().map(|()| Frontend::CopyFail { message })),
            FUNCTION_CALL => (|| {
                r.u32()?;
                r.counted(2)?;
                let args = r.u16()?;
                for _ in 0..args {
                    r.value()?;
                }
                r.u16()?;
                r.end()?;
                Ok(Frontend::FunctionCall { body })
            })(),
            AUTH_RESPONSE => Ok(Frontend::AuthResponse(body)),
            tag => Ok(Frontend::Other { tag, body }),
        };
        decoded.map_err(|what| malformed(tag, body, what))
    }

    /// The message's tag.
    pub fn tag(&self) -> u8 {
        match self {
            Frontend::Query { .. } => QUERY,
            Frontend::Parse { .. } => PARSE,
            Frontend::Bind { .. } => BIND,
            Frontend::Describe { .. } => DESCRIBE,
            Frontend::Execute { .. } => EXECUTE,
            Frontend::Close { .. } => CLOSE,
            Frontend::Sync => SYNC,
            Frontend::Flush => FLUSH,
            Frontend::Terminate => TERMINATE,
            Frontend::CopyData(_) => COPY_DATA,
            Frontend::CopyDone => COPY_DONE,
            Frontend::CopyFail { .. } => COPY_FAIL,
            Frontend::FunctionCall { .. } => FUNCTION_CALL,
            Frontend::AuthResponse(_) => AUTH_RESPONSE,
            Frontend::Other { tag, .. } => *tag,
        }
    }

    /// Appends the message (tag, length, body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_framed(out, self.tag(), |out| match *self {
            Frontend::Query { sql } => put_cstr(out, sql),
            Frontend::Parse {
                name, definition, ..
            } => {
                put_cstr(out, name);
                out.extend_from_slice(definition);
            }
            Frontend::Bind {
                portal,
                statement,
                rest,
            } => {
                put_cstr(out, portal);
                put_cstr(out, statement);
                out.extend_from_slice(rest);
            }
            Frontend::Describe { kind, name } | Frontend::Close { kind, name } => {
                out.push(kind.as_byte());
                put_cstr(out, name);
            }
            Frontend::Execute { portal, max_rows } => {
                put_cstr(out, portal);
                out.extend_from_slice(&max_rows.to_be_bytes());
            }
            Frontend::Sync | Frontend::Flush | Frontend::Terminate | Frontend::CopyDone => {}
            Frontend::CopyFail { message } => put_cstr(out, message),
            Frontend::CopyData(body)
            | Frontend::FunctionCall { body }
            | Frontend::AuthResponse(body)
            | Frontend::Other { body, .. } => out.extend_from_slice(body),
        });
    }

    /// The message as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// The SQL a Query runs or a Parse prepares.
    pub fn sql(&self) -> Option<&'a [u8]> {
        match *self {
            Frontend::Query { sql } => Some(sql),
            Frontend::Parse { query, .. } => Some(query),
            _ => None,
        }
    }
}

/// Whether `buf` starts with a Sync message.
pub fn starts_with_sync(buf: &[u8]) -> bool {
    buf.starts_with(&SYNC_MESSAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::postgres::{frame, query, query_with_param, HEADER_LEN, MAX_MESSAGE};

    fn decoded(bytes: &[u8]) -> Frontend<'_> {
        let n = frame(bytes, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        Frontend::decode(bytes[0], &bytes[HEADER_LEN..]).unwrap()
    }

    /// Every variant decodes from what it encodes to, and encodes to the same bytes.
    #[test]
    fn every_variant_round_trips() {
        let bind_rest = [
            0, 1, 0, 0, 0, 2, 0, 0, 0, 1, b'7', 0xff, 0xff, 0xff, 0xff, 0, 0,
        ];
        let call = [0, 0, 0, 42, 0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 1];
        let all = [
            Frontend::Query { sql: b"SELECT 1" },
            Frontend::Parse {
                name: b"s1",
                query: b"SELECT $1",
                definition: b"SELECT $1\0\0\x01\0\0\0\x17",
            },
            Frontend::Bind {
                portal: b"",
                statement: b"s1",
                rest: &bind_rest,
            },
            Frontend::Describe {
                kind: TargetKind::Statement,
                name: b"s1",
            },
            Frontend::Describe {
                kind: TargetKind::Portal,
                name: b"",
            },
            Frontend::Execute {
                portal: b"p",
                max_rows: 10,
            },
            Frontend::Close {
                kind: TargetKind::Statement,
                name: b"s1",
            },
            Frontend::Sync,
            Frontend::Flush,
            Frontend::Terminate,
            Frontend::CopyData(b"1\tone\n"),
            Frontend::CopyDone,
            Frontend::CopyFail { message: b"stop" },
            Frontend::FunctionCall { body: &call },
            Frontend::AuthResponse(b"secret\0"),
            Frontend::Other {
                tag: b'z',
                body: b"?",
            },
        ];
        for m in all {
            let bytes = m.to_bytes();
            assert_eq!(decoded(&bytes), m, "{bytes:?}");
        }
        assert_eq!(
            decoded(&query("SELECT 2")),
            Frontend::Query { sql: b"SELECT 2" }
        );
        assert_eq!(decoded(&query("SELECT 2")).sql(), Some(&b"SELECT 2"[..]));
        let extended = query_with_param("SELECT $1", "u");
        let mut tags = Vec::new();
        let mut rest = &extended[..];
        while let Some(n) = frame(rest, MAX_MESSAGE).unwrap() {
            tags.push(decoded(&rest[..n]).tag());
            rest = &rest[n..];
        }
        assert_eq!(tags, b"PBES");
        assert!(starts_with_sync(&Frontend::Sync.to_bytes()));
        assert!(!starts_with_sync(&Frontend::Flush.to_bytes()));
    }

    /// A truncated or overlong body of a known tag is refused, naming the tag and the length.
    #[test]
    fn malformed_bodies_are_refused_with_tag_and_length() {
        let cases: [(u8, &[u8]); 14] = [
            (b'Q', b"SELECT 1"),
            (b'Q', b"SELECT 1\0x"),
            (b'P', b"s1\0SELECT 1\0\0\x01"),
            (b'P', b"s1\0SELECT 1\0\0\0\0"),
            (b'B', b"\0s1\0\0\0\0\x01\0\0\0\x09ab"),
            (b'D', b"Xs1\0"),
            (b'C', b"S"),
            (b'E', b"\0\0\0"),
            (b'S', b"\0"),
            (b'H', b"x"),
            (b'X', b"x"),
            (b'c', b"x"),
            (b'f', b"oops"),
            (b'F', &[0, 0, 0, 1, 0, 0, 0, 1]),
        ];
        for (tag, body) in cases {
            let err = Frontend::decode(tag, body).unwrap_err();
            let text = err.to_string();
            let len = (body.len() + 4).to_string();
            assert!(
                text.contains(&format!("{:?}", tag as char)) && text.contains(&len),
                "{text}"
            );
        }
        // A value of length -1 is NULL; any other negative length is malformed.
        assert!(Frontend::decode(b'B', b"\0\0\0\0\0\x01\xff\xff\xff\xff\0\0").is_ok());
        assert!(Frontend::decode(b'B', b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0").is_err());
        // Unknown tags and the bodies the decoder does not read are kept as they are.
        assert_eq!(
            Frontend::decode(b'~', b"\0\0"),
            Ok(Frontend::Other {
                tag: b'~',
                body: b"\0\0"
            })
        );
        assert_eq!(Frontend::decode(b'p', b""), Ok(Frontend::AuthResponse(b"")));
    }
}
