//! What a PostgreSQL server sends, typed: [`Backend`], decoded from a framed message's tag and
//! body without copying (its variants hold slices of the body), and encoded back for the
//! messages the portal writes as the server. A tag the decoder does not know is kept as
//! [`Backend::Other`]; a known tag whose body is truncated or too long is refused with a
//! [`FrameError::Malformed`] naming the tag and the length.
//!
//! May import: nothing from the rest of the crate.

use super::{encode_framed, malformed, put_cstr, FrameError, Reader, ReadyStatus};

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const DATA_ROW: u8 = b'D';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const NO_DATA: u8 = b'n';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

/// An authentication request (`R`), by its code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authentication<'a> {
    /// 0: logged in.
    Ok,
    /// 3: a cleartext password, please.
    CleartextPassword,
    /// 5: the md5 of the password with this salt, please.
    Md5Password { salt: [u8; 4] },
    /// 10: SASL, with these mechanisms (each NUL-terminated, then a final NUL).
    Sasl { mechanisms: &'a [u8] },
    /// 11: the server's SASL challenge.
    SaslContinue(&'a [u8]),
    /// 12: the server's last SASL message.
    SaslFinal(&'a [u8]),
    /// Another method (Kerberos, GSSAPI, SSPI…), with its data.
    Other { code: u32, data: &'a [u8] },
}

impl Authentication<'_> {
    /// The request's code.
    pub fn code(&self) -> u32 {
        match self {
            Authentication::Ok => super::AUTH_OK,
            Authentication::CleartextPassword => super::AUTH_CLEARTEXT,
            Authentication::Md5Password { .. } => super::AUTH_MD5,
            Authentication::Sasl { .. } => super::AUTH_SASL,
            Authentication::SaslContinue(_) => super::AUTH_SASL_CONTINUE,
            Authentication::SaslFinal(_) => super::AUTH_SASL_FINAL,
            Authentication::Other { code, .. } => *code,
        }
    }
}

/// The fields of an ErrorResponse or a NoticeResponse: a code byte and a NUL-terminated text
/// each, then a final NUL (checked when decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields<'a>(pub &'a [u8]);

impl<'a> Fields<'a> {
    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            let (&code, after) = rest.split_first()?;
            if code == 0 {
                return None;
            }
            let (text, after) = super::cstr(after)?;
            rest = after;
            Some((code, text))
        })
    }

    /// The text of the field `code` (`S` severity, `C` SQLSTATE, `M` message…).
    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        self.iter().find(|(c, _)| *c == code).map(|(_, t)| t)
    }

    /// The SQLSTATE (field `C`).
    pub fn sqlstate(&self) -> Option<&'a [u8]> {
        self.get(b'C')
    }

    /// Whether the severity is FATAL or PANIC: the server ends the connection.
    pub fn is_fatal(&self) -> bool {
        matches!(self.get(b'S'), Some(b"FATAL" | b"PANIC"))
    }
}

/// The body of CopyInResponse, CopyOutResponse and CopyBothResponse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyFormat<'a> {
    /// 0 text, 1 binary.
    pub format: u8,
    /// The column formats: an Int16 each.
    pub columns: &'a [u8],
}

/// A message from a server, borrowing its body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend<'a> {
    /// `R`.
    Authentication(Authentication<'a>),
    /// `S`: a reported parameter's value.
    ParameterStatus { name: &'a [u8], value: &'a [u8] },
    /// `K`: the key of a CancelRequest.
    BackendKeyData { pid: u32, secret: u32 },
    /// `Z`: ready for the next query, with the transaction status.
    ReadyForQuery(ReadyStatus),
    /// `E`.
    ErrorResponse(Fields<'a>),
    /// `N`.
    NoticeResponse(Fields<'a>),
    /// `C`: a statement's completion tag (`SELECT 1`, `COMMIT`…), without its NUL.
    CommandComplete { tag: &'a [u8] },
    /// `I`: the answer to an empty query.
    EmptyQueryResponse,
    /// `T`: the columns of the rows to come; `body` as sent (checked for shape).
    RowDescription { fields: u16, body: &'a [u8] },
    /// `D`: a row; `body` as sent (checked for shape).
    DataRow { columns: u16, body: &'a [u8] },
    /// `t`: the parameter types of a statement, an Int32 each.
    ParameterDescription { types: &'a [u8] },
    /// `n`: a statement or portal that returns no rows.
    NoData,
    /// `1`.
    ParseComplete,
    /// `2`.
    BindComplete,
    /// `3`.
    CloseComplete,
    /// `s`: an Execute stopped at its row limit.
    PortalSuspended,
    /// `G`: COPY FROM STDIN starts.
    CopyInResponse(CopyFormat<'a>),
    /// `H`: COPY TO STDOUT starts.
    CopyOutResponse(CopyFormat<'a>),
    /// `W`: COPY BOTH (replication) starts.
    CopyBothResponse(CopyFormat<'a>),
    /// `d`: COPY TO STDOUT data.
    CopyData(&'a [u8]),
    /// `c`: the end of COPY TO STDOUT data.
    CopyDone,
    /// `A`: a NOTIFY.
    NotificationResponse {
        pid: u32,
        channel: &'a [u8],
        payload: &'a [u8],
    },
    /// `V`: a function call's result, `None` for NULL.
    FunctionCallResponse { value: Option<&'a [u8]> },
    /// `v`: the newest minor version the server speaks and the protocol options it does not
    /// know (each NUL-terminated, after their Int32 count).
    NegotiateProtocolVersion { minor: u32, options: &'a [u8] },
    /// A tag this decoder does not know, passed on as it is.
    Other { tag: u8, body: &'a [u8] },
}

/// Whether a message with `tag` may be forwarded as it comes, before it is complete: the
/// rows and COPY data, whatever their size, that nothing depends on.
pub fn is_streamed(tag: u8) -> bool {
    matches!(tag, DATA_ROW | COPY_DATA)
}

fn copy_format<'a>(r: &mut Reader<'a>) -> Result<CopyFormat<'a>, &'static str> {
    let format = r.u8()?;
    let columns = r.rest.get(2..).unwrap_or_default();
    r.counted(2)?;
    r.end()?;
    Ok(CopyFormat { format, columns })
}

impl<'a> Backend<'a> {
    /// The message of `tag` with `body` (after the length).
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Backend<'a>, FrameError> {
        let mut r = Reader { rest: body };
        let r = &mut r;
        let empty = |r: &mut Reader<'_>, m: Backend<'a>| r.end().map(|()| m);
        let decoded = match tag {
            AUTHENTICATION => (|| {
                let code = r.u32()?;
                let data = r.rest;
                Ok(Backend::Authentication(match code {
                    super::AUTH_OK => {
                        r.end()?;
                        Authentication::Ok
                    }
                    super::AUTH_CLEARTEXT => {
                        r.end()?;
                        Authentication::CleartextPassword
                    }
                    super::AUTH_MD5 => {
                        let salt = r.bytes(4)?;
                        r.end()?;
                        Authentication::Md5Password {
                            salt: [salt[0], salt[1], salt[2], salt[3]],
                        }
                    }
                    super::AUTH_SASL => {
                        while !r.cstr()?.is_empty() {}
                        r.end()?;
                        Authentication::Sasl { mechanisms: data }
                    }
                    super::AUTH_SASL_CONTINUE => Authentication::SaslContinue(data),
                    super::AUTH_SASL_FINAL => Authentication::SaslFinal(data),
                    code => Authentication::Other { code, data },
                }))
            })(),
            PARAMETER_STATUS => (|| {
                let name = r.cstr()?;
                let value = r.cstr()?;
                r.end()?;
                Ok(Backend::ParameterStatus { name, value })
            })(),
            BACKEND_KEY_DATA => (|| {
                let pid = r.u32()?;
                let secret = r.u32()?;
                r.end()?;
                Ok(Backend::BackendKeyData { pid, secret })
            })(),
            READY_FOR_QUERY => (|| {
                let status =
                    ReadyStatus::from_byte(r.u8()?).ok_or("a status other than I, T or E")?;
                r.end()?;
                Ok(Backend::ReadyForQuery(status))
            })(),
            ERROR_RESPONSE | NOTICE_RESPONSE => (|| {
                while r.u8()? != 0 {
                    r.cstr()?;
                }
                r.end()?;
                Ok(if tag == ERROR_RESPONSE {
                    Backend::ErrorResponse(Fields(body))
                } else {
                    Backend::NoticeResponse(Fields(body))
                })
            })(),
            COMMAND_COMPLETE => r
                .cstr()
                .and_then(|tag| r.end().map(|()| Backend::CommandComplete { tag })),
            ROW_DESCRIPTION => (|| {
                let fields = r.u16()?;
                for _ in 0..fields {
                    r.cstr()?;
                    r.bytes(18)?;
                }
                r.end()?;
                Ok(Backend::RowDescription { fields, body })
            })(),
            DATA_ROW => (|| {
                let columns = r.u16()?;
                for _ in 0..columns {
                    r.value()?;
                }
                r.end()?;
                Ok(Backend::DataRow { columns, body })
            })(),
            PARAMETER_DESCRIPTION => (|| {
                let types = r.rest.get(2..).unwrap_or_default();
                r.counted(4)?;
                r.end()?;
                Ok(Backend::ParameterDescription { types })
            })(),
            EMPTY_QUERY_RESPONSE => empty(r, Backend::EmptyQueryResponse),
            NO_DATA => empty(r, Backend::NoData),
            PARSE_COMPLETE => empty(r, Backend::ParseComplete),
            BIND_COMPLETE => empty(r, Backend::BindComplete),
            CLOSE_COMPLETE => empty(r, Backend::CloseComplete),
            PORTAL_SUSPENDED => empty(r, Backend::PortalSuspended),
            COPY_DONE => empty(r, Backend::CopyDone),
            COPY_IN_RESPONSE => copy_format(r).map(Backend::CopyInResponse),
            COPY_OUT_RESPONSE => copy_format(r).map(Backend::CopyOutResponse),
            COPY_BOTH_RESPONSE => copy_format(r).map(Backend::CopyBothResponse),
            COPY_DATA => Ok(Backend::CopyData(body)),
            NOTIFICATION_RESPONSE => (|| {
                let pid = r.u32()?;
                let channel = r.cstr()?;
                let payload = r.cstr()?;
                r.end()?;
                Ok(Backend::NotificationResponse {
                    pid,
                    channel,
                    payload,
                })
            })(),
            FUNCTION_CALL_RESPONSE => (|| {
                let value = r.value()?;
                r.end()?;
                Ok(Backend::FunctionCallResponse { value })
            })(),
            NEGOTIATE_PROTOCOL_VERSION => (|| {
                let minor = r.u32()?;
                let options = r.rest;
                let n = r.u32()?;
                for _ in 0..n {
                    r.cstr()?;
                }
                r.end()?;
                Ok(Backend::NegotiateProtocolVersion { minor, options })
            })(),
            tag => Ok(Backend::Other { tag, body }),
        };
        decoded.map_err(|what| malformed(tag, body, what))
    }

    /// The message's tag.
    pub fn tag(&self) -> u8 {
        match self {
            Backend::Authentication(_) => AUTHENTICATION,
            Backend::ParameterStatus { .. } => PARAMETER_STATUS,
            Backend::BackendKeyData { .. } => BACKEND_KEY_DATA,
            Backend::ReadyForQuery(_) => READY_FOR_QUERY,
            Backend::ErrorResponse(_) => ERROR_RESPONSE,
            Backend::NoticeResponse(_) => NOTICE_RESPONSE,
            Backend::CommandComplete { .. } => COMMAND_COMPLETE,
            Backend::EmptyQueryResponse => EMPTY_QUERY_RESPONSE,
            Backend::RowDescription { .. } => ROW_DESCRIPTION,
            Backend::DataRow { .. } => DATA_ROW,
            Backend::ParameterDescription { .. } => PARAMETER_DESCRIPTION,
            Backend::NoData => NO_DATA,
            Backend::ParseComplete => PARSE_COMPLETE,
            Backend::BindComplete => BIND_COMPLETE,
            Backend::CloseComplete => CLOSE_COMPLETE,
            Backend::PortalSuspended => PORTAL_SUSPENDED,
            Backend::CopyInResponse(_) => COPY_IN_RESPONSE,
            Backend::CopyOutResponse(_) => COPY_OUT_RESPONSE,
            Backend::CopyBothResponse(_) => COPY_BOTH_RESPONSE,
            Backend::CopyData(_) => COPY_DATA,
            Backend::CopyDone => COPY_DONE,
            Backend::NotificationResponse { .. } => NOTIFICATION_RESPONSE,
            Backend::FunctionCallResponse { .. } => FUNCTION_CALL_RESPONSE,
            Backend::NegotiateProtocolVersion { .. } => NEGOTIATE_PROTOCOL_VERSION,
            Backend::Other { tag, .. } => *tag,
        }
    }

    /// Appends the message (tag, length, body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        encode_framed(out, self.tag(), |out| match *self {
            Backend::Authentication(a) => {
                out.extend_from_slice(&a.code().to_be_bytes());
                match a {
                    Authentication::Ok | Authentication::CleartextPassword => {}
                    Authentication::Md5Password { salt } => out.extend_from_slice(&salt),
                    Authentication::Sasl { mechanisms: data }
                    | Authentication::SaslContinue(data)
                    | Authentication::SaslFinal(data)
                    | Authentication::Other { data, .. } => out.extend_from_slice(data),
                }
            }
            Backend::ParameterStatus { name, value } => {
                put_cstr(out, name);
                put_cstr(out, value);
            }
            Backend::BackendKeyData { pid, secret } => {
                out.extend_from_slice(&pid.to_be_bytes());
                out.extend_from_slice(&secret.to_be_bytes());
            }
            Backend::ReadyForQuery(status) => out.push(status.as_byte()),
            Backend::CommandComplete { tag } => put_cstr(out, tag),
            Backend::CopyInResponse(c)
            | Backend::CopyOutResponse(c)
            | Backend::CopyBothResponse(c) => {
                out.push(c.format);
                out.extend_from_slice(&((c.columns.len() / 2) as u16).to_be_bytes());
                out.extend_from_slice(c.columns);
            }
            Backend::ParameterDescription { types } => {
                out.extend_from_slice(&((types.len() / 4) as u16).to_be_bytes());
                out.extend_from_slice(types);
            }
            Backend::NotificationResponse {
                pid,
                channel,
                payload,
            } => {
                out.extend_from_slice(&pid.to_be_bytes());
                put_cstr(out, channel);
                put_cstr(out, payload);
            }
            Backend::FunctionCallResponse { value } => match value {
                Some(v) => {
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            },
            Backend::NegotiateProtocolVersion { minor, options } => {
                out.extend_from_slice(&minor.to_be_bytes());
                out.extend_from_slice(options);
            }
            Backend::EmptyQueryResponse
            | Backend::NoData
            | Backend::ParseComplete
            | Backend::BindComplete
            | Backend::CloseComplete
            | Backend::PortalSuspended
            | Backend::CopyDone => {}
            Backend::ErrorResponse(Fields(body))
            | Backend::NoticeResponse(Fields(body))
            | Backend::RowDescription { body, .. }
            | Backend::DataRow { body, .. }
            | Backend::CopyData(body)
            | Backend::Other { body, .. } => out.extend_from_slice(body),
        });
    }

    /// The message as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::postgres::{
        authentication, backend_key_data, error_response, frame, parameter_status, ready_for_query,
        HEADER_LEN, MAX_MESSAGE,
    };

    fn decoded(bytes: &[u8]) -> Backend<'_> {
        let n = frame(bytes, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        Backend::decode(bytes[0], &bytes[HEADER_LEN..]).unwrap()
    }

    /// Every variant decodes from what it encodes to, and encodes to the same bytes.
    #[test]
    fn every_variant_round_trips() {
        let fields = b"SERROR\0C42601\0Msyntax\0\0";
        let row_description = b"\0\x01id\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0";
        let format = CopyFormat {
            format: 0,
            columns: &[0, 0, 0, 0],
        };
        let all = [
            Backend::Authentication(Authentication::Ok),
            Backend::Authentication(Authentication::CleartextPassword),
            Backend::Authentication(Authentication::Md5Password { salt: [1, 2, 3, 4] }),
            Backend::Authentication(Authentication::Sasl {
                mechanisms: b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
            }),
            Backend::Authentication(Authentication::SaslContinue(b"r=abc,s=xyz,i=4096")),
            Backend::Authentication(Authentication::SaslFinal(b"v=abc")),
            Backend::Authentication(Authentication::Other { code: 7, data: b"" }),
            Backend::ParameterStatus {
                name: b"TimeZone",
                value: b"UTC",
            },
            Backend::BackendKeyData { pid: 7, secret: 9 },
            Backend::ReadyForQuery(ReadyStatus::Idle),
            Backend::ReadyForQuery(ReadyStatus::InTransaction),
            Backend::ReadyForQuery(ReadyStatus::Failed),
            Backend::ErrorResponse(Fields(fields)),
            Backend::NoticeResponse(Fields(b"SNOTICE\0Mhello\0\0")),
            Backend::CommandComplete { tag: b"SELECT 1" },
            Backend::EmptyQueryResponse,
            Backend::RowDescription {
                fields: 1,
                body: row_description,
            },
            Backend::DataRow {
                columns: 2,
                body: b"\0\x02\0\0\0\x011\xff\xff\xff\xff",
            },
            Backend::ParameterDescription {
                types: &[0, 0, 0, 23],
            },
            Backend::NoData,
            Backend::ParseComplete,
            Backend::BindComplete,
            Backend::CloseComplete,
            Backend::PortalSuspended,
            Backend::CopyInResponse(format),
            Backend::CopyOutResponse(format),
            Backend::CopyBothResponse(CopyFormat {
                format: 1,
                columns: &[],
            }),
            Backend::CopyData(b"1\tone\n"),
            Backend::CopyDone,
            Backend::NotificationResponse {
                pid: 42,
                channel: b"jobs",
                payload: b"go",
            },
            Backend::FunctionCallResponse { value: Some(b"1") },
            Backend::FunctionCallResponse { value: None },
            Backend::NegotiateProtocolVersion {
                minor: 0,
                options: b"\0\0\0\x01_pq_.x\0",
            },
            Backend::Other {
                tag: b'~',
                body: b"\x01",
            },
        ];
        for m in all {
            let bytes = m.to_bytes();
            assert_eq!(decoded(&bytes), m, "{bytes:?}");
        }
        // The messages the portal writes with its own helpers read back as what they say.
        assert_eq!(
            decoded(&ready_for_query(ReadyStatus::Failed)),
            Backend::ReadyForQuery(ReadyStatus::Failed)
        );
        assert_eq!(
            decoded(&parameter_status("a", "b")),
            Backend::ParameterStatus {
                name: b"a",
                value: b"b"
            }
        );
        assert_eq!(
            decoded(&backend_key_data(1, 2)),
            Backend::BackendKeyData { pid: 1, secret: 2 }
        );
        assert_eq!(
            decoded(&authentication(super::super::AUTH_SASL_FINAL, b"v=x")),
            Backend::Authentication(Authentication::SaslFinal(b"v=x"))
        );
        let fatal = error_response("FATAL", "57P01", "bye");
        let Backend::ErrorResponse(f) = decoded(&fatal) else {
            panic!("not an error");
        };
        assert!(f.is_fatal());
        assert_eq!(f.sqlstate(), Some(&b"57P01"[..]));
        assert_eq!(f.iter().count(), 4);
        assert!(!Fields(fields).is_fatal());
        assert!(is_streamed(b'D') && is_streamed(b'd') && !is_streamed(b'C'));
    }

    /// A truncated or overlong body of a known tag is refused, naming the tag and the length.
    #[test]
    fn malformed_bodies_are_refused_with_tag_and_length() {
        let cases: [(u8, &[u8]); 17] = [
            (b'R', b"\0\0"),
            (b'R', b"\0\0\0\0x"),
            (b'R', b"\0\0\0\x05\x01\x02"),
            (b'R', b"\0\0\0\x0aSCRAM-SHA-256\0"),
            (b'S', b"TimeZone\0UTC"),
            (b'K', b"\0\0\0\x01\0\0\0\x02\0"),
            (b'Z', b""),
            (b'Z', b"X"),
            (b'Z', b"II"),
            (b'E', b"SERROR\0"),
            (b'C', b"SELECT 1"),
            (b'T', b"\0\x01id\0\0\0"),
            (b'D', b"\0\x01\0\0\0\x05ab"),
            (b'1', b"\0"),
            (b'G', b"\0\0\x02\0\0"),
            (b'A', b"\0\0\0\x01jobs\0"),
            (b'V', b"\0\0\0\x05a"),
        ];
        for (tag, body) in cases {
            let err = Backend::decode(tag, body).unwrap_err();
            let text = err.to_string();
            let len = (body.len() + 4).to_string();
            assert!(
                text.contains(&format!("{:?}", tag as char)) && text.contains(&len),
                "{text}"
            );
        }
        assert_eq!(
            Backend::decode(b'~', b"\0"),
            Ok(Backend::Other {
                tag: b'~',
                body: b"\0"
            })
        );
    }
}
