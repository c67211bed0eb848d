//! RESP, the Redis serialization protocol: commands written as arrays of bulk strings, an
//! incremental reader of replies (nested arrays included) bounded in size and depth, and the
//! multiplexer's hot-path framing: [`parse_command`] (a client's commands, in place, without
//! copying) and [`scan_reply`] (where one reply ends, RESP2 and RESP3, without parsing it).
//!
//! May import: nothing from the rest of the crate.

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use super::excerpt;

/// Longest reply read (INFO replication with many replicas stays far below).
const MAX_REPLY: usize = 1 << 20;

/// A RESP (2) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Why a reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    #[error("{0}")]
    Io(String),
    /// Not RESP, too large, too deep, or the connection closed.
    #[error("{0}")]
    Protocol(String),
}

impl From<std::io::Error> for RespError {
    fn from(e: std::io::Error) -> Self {
        RespError::Io(e.to_string())
    }
}

/// Appends a command as a RESP array of bulk strings.
pub fn encode(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one reply (nested arrays included, bounded in size).
pub async fn read_reply<R: tokio::io::AsyncBufRead + Unpin + Send>(
    reader: &mut R,
) -> Result<Reply, RespError> {
    let mut budget = MAX_REPLY;
    read_value(reader, &mut budget, 0).await
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin + Send>(
    reader: &mut R,
    budget: &mut usize,
) -> Result<Vec<u8>, RespError> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(*budget as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(RespError::Protocol(
            "the server closed the connection".into(),
        ));
    }
    *budget = budget.saturating_sub(n);
    if !line.ends_with(b"\r\n") {
        return Err(RespError::Protocol(format!(
            "not a RESP reply: {}",
            excerpt(&line)
        )));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn read_value<'a, R: tokio::io::AsyncBufRead + Unpin + Send + 'a>(
    reader: &'a mut R,
    budget: &'a mut usize,
    depth: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, RespError>> + Send + 'a>> {
    Box::pin(async move {
        if depth > 8 {
            return Err(RespError::Protocol("reply nested too deeply".into()));
        }
        let line = read_line(reader, budget).await?;
        let (kind, rest) = line
            .split_first()
            .ok_or_else(|| RespError::Protocol("empty reply line".into()))?;
        let text = String::from_utf8_lossy(rest).into_owned();
        let number = || {
            text.parse::<i64>()
                .map_err(|_| RespError::Protocol(format!("bad length in {}", excerpt(&line))))
        };
        match kind {
            b'+' => Ok(Reply::Simple(text.clone())),
            b'-' => Ok(Reply::Error(text.clone())),
            b':' => Ok(Reply::Integer(number()?)),
            b'$' => {
                let len = number()?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let len = len as usize;
                if len + 2 > *budget {
                    return Err(RespError::Protocol("reply too large".into()));
                }
                let mut data = vec![0; len + 2];
                reader.read_exact(&mut data).await?;
                *budget -= len + 2;
                data.truncate(len);
                Ok(Reply::Bulk(Some(data)))
            }
            b'*' => {
                let len = number()?;
                if len < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::new();
                for _ in 0..len {
                    items.push(read_value(reader, budget, depth + 1).await?);
                }
                Ok(Reply::Array(Some(items)))
            }
            _ => Err(RespError::Protocol(format!(
                "not a RESP reply: {}",
                excerpt(&line)
            ))),
        }
    })
}

/// Longest bulk argument of a command (Redis' own `proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 << 20;
/// Most arguments in one command (Redis': `INT_MAX`).
pub const MAX_ARGS: i64 = i32::MAX as i64;
/// Longest inline command without its newline, and longest length line (Redis'
/// `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 << 10;
/// Before AUTH, Redis takes at most this many arguments, and bulk strings at most this long.
const UNAUTH_ARGS: i64 = 10;
const UNAUTH_BULK: usize = 16384;

/// Why a client's bytes are not a command, in Redis' own words (its reply is `-ERR` and
/// this text, after which it closes the connection), naming the byte where one is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct CommandError(pub String);

fn refuse<T>(what: impl Into<String>) -> Result<T, CommandError> {
    Err(CommandError(what.into()))
}

/// Where each argument of one command lies: in the buffer it was parsed from (a RESP array),
/// or, for an inline command, in the command's own copy of its unquoted arguments.
#[derive(Debug, Default, Clone)]
pub struct Command {
    /// Bytes the command takes in the buffer (its whole frame).
    pub len: usize,
    /// `start..end` of each argument, the name first.
    pub args: Vec<(usize, usize)>,
    /// An inline command's arguments, unquoted; `args` index into it when `inline`.
    unquoted: Vec<u8>,
    inline: bool,
}

impl Command {
    /// Argument `i` within `buf` (the buffer given to [`parse_command`]).
    pub fn arg<'a>(&'a self, buf: &'a [u8], i: usize) -> Option<&'a [u8]> {
        let src = if self.inline { &self.unquoted[..] } else { buf };
        self.args.get(i).map(|&(s, e)| &src[s..e])
    }

    /// Whether it came as an inline command (a line of words) rather than a RESP array.
    pub fn is_inline(&self) -> bool {
        self.inline
    }
}

/// Parses one complete command of a logged-in client at the start of `buf`; see
/// [`parse_command_as`].
pub fn parse_command(buf: &[u8], cmd: &mut Command) -> Result<bool, CommandError> {
    parse_command_as(buf, cmd, true)
}

/// Parses one complete command at the start of `buf` into `cmd` (its argument list reused, so
/// the hot path allocates nothing): `Ok(true)` when one is there, `Ok(false)` when more bytes
/// are needed. It reads exactly what Redis' `processMultibulkBuffer` and
/// `processInlineBuffer` read, and refuses what they refuse with their error text, so that a
/// command forwarded to a shared server connection is the same command there, with one
/// reply: RESP arrays of bulk strings (`*0` and negative counts are a command with no
/// arguments, which Redis skips) and inline commands split as `sdssplitargs` splits them,
/// quotes and escapes included. A line search stops at a NUL byte, as Redis' `strchr` does.
/// `authed`: whether the client has logged in (before, Redis refuses more than 10 arguments
/// and bulk strings over 16 KiB).
pub fn parse_command_as(buf: &[u8], cmd: &mut Command, authed: bool) -> Result<bool, CommandError> {
    cmd.args.clear();
    cmd.unquoted.clear();
    cmd.inline = false;
    cmd.len = 0;
    let Some(&first) = buf.first() else {
        return Ok(false);
    };
    if first != b'*' {
        return parse_inline(buf, cmd);
    }
    let (cr, count) = match digits_to_cr(buf, 1) {
        Some(found) => found,
        None => {
            let Some(cr) = find(buf, 0, b'\r') else {
                if buf.len() > MAX_INLINE {
                    return refuse("too big mbulk count string");
                }
                return Ok(false);
            };
            (cr, string2ll(&buf[1..cr]))
        }
    };
    if cr + 2 > buf.len() {
        return Ok(false);
    }
    let count = match count {
        Some(n) if n <= MAX_ARGS => n,
        _ => return refuse("invalid multibulk length"),
    };
    if count > UNAUTH_ARGS && !authed {
        return refuse("unauthenticated multibulk length");
    }
    // Redis skips the byte after CR unread, whatever it is: so does this.
    let mut pos = cr + 2;
    for _ in 0..count.max(0) {
        let (cr, len) = match digits_to_cr(buf, pos + 1).filter(|_| buf[pos] == b'$') {
            Some(found) => found,
            None => {
                let Some(cr) = find(buf, pos, b'\r') else {
                    if buf.len() - pos > MAX_INLINE {
                        return refuse("too big bulk count string");
                    }
                    return Ok(false);
                };
                (cr, None)
            }
        };
        if cr + 2 > buf.len() {
            return Ok(false);
        }
        if buf[pos] != b'$' {
            return refuse(format!("expected '$', got '{}'", shown(buf[pos])));
        }
        let len = match len.or_else(|| string2ll(&buf[pos + 1..cr])) {
            Some(n) if (0..=MAX_BULK as i64).contains(&n) => n as usize,
            _ => return refuse("invalid bulk length"),
        };
        if len > UNAUTH_BULK && !authed {
            return refuse("unauthenticated bulk length");
        }
        let start = cr + 2;
        // The two bytes after the data are skipped unread, as Redis does.
        if buf.len() - start < len + 2 {
            return Ok(false);
        }
        cmd.args.push((start, start + len));
        pos = start + len + 2;
    }
    cmd.len = pos;
    Ok(true)
}

fn parse_inline(buf: &[u8], cmd: &mut Command) -> Result<bool, CommandError> {
    let Some(nl) = find(buf, 0, b'\n') else {
        if buf.len() > MAX_INLINE {
            return refuse("too big inline request");
        }
        return Ok(false);
    };
    let end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    if split_args(&buf[..end], &mut cmd.unquoted, &mut cmd.args).is_none() {
        return refuse("unbalanced quotes in request");
    }
    cmd.inline = true;
    cmd.len = nl + 1;
    Ok(true)
}

/// The first `stop` byte in `buf` from `from`, as Redis' `strchr` on its query buffer finds
/// it: a NUL byte ends the search.
/// The common case of a count line, read in one pass: from `from`, 1 to 18 decimal digits
/// without a leading zero (or a lone `0`) then CR. Returns the CR's place and the number, as
/// `find` and `string2ll` would; `None` for anything else (a partial line included), which
/// the general path then handles.
#[inline]
fn digits_to_cr(buf: &[u8], from: usize) -> Option<(usize, Option<i64>)> {
    let rest = buf.get(from..)?;
    let (&first, _) = rest.split_first()?;
    if !first.is_ascii_digit() {
        return None;
    }
    let mut v: i64 = i64::from(first - b'0');
    for (i, &b) in rest.iter().enumerate().skip(1).take(18) {
        if b == b'\r' {
            return (first != b'0' || i == 1).then_some((from + i, Some(v)));
        }
        if i == 18 || !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(b - b'0');
    }
    None
}

fn find(buf: &[u8], from: usize, stop: u8) -> Option<usize> {
    let i = buf[from..].iter().position(|&b| b == stop || b == 0)?;
    (buf[from + i] == stop).then_some(from + i)
}

/// A byte in an error reply, as Redis writes it with `%c` (CR and LF made spaces), non-printing
/// bytes escaped.
fn shown(b: u8) -> String {
    match b {
        b'\r' | b'\n' => " ".into(),
        0x20..=0x7e => (b as char).to_string(),
        _ => format!("\\x{b:02x}"),
    }
}

/// A decimal number as Redis' `string2ll` reads it: optional `-`, no `+`, no leading zeros,
/// no blanks, within i64.
fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if !matches!(digits.first(), Some(b'1'..=b'9')) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        i64::try_from(-i128::from(v)).ok()
    } else {
        i64::try_from(v).ok()
    }
}

/// Splits an inline command line into arguments exactly as Redis' `sdssplitargs` does: words
/// between blanks; "double quotes" with `\xHH`, `\n`, `\r`, `\t`, `\b`, `\a` and `\<any>`
/// escapes; 'single quotes' with `\'`; a quote may open mid-word; a closing quote must be
/// followed by a blank or the end. `None`: unbalanced quotes. Arguments are appended to
/// `out`, their places to `args`.
fn split_args(line: &[u8], out: &mut Vec<u8>, args: &mut Vec<(usize, usize)>) -> Option<()> {
    // The line as the C string Redis reads: past its end, NUL.
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let hex = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
    let mut p = 0;
    loop {
        while at(p) != 0 && space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Some(());
        }
        let start = out.len();
        let (mut inq, mut insq, mut done) = (false, false, false);
        while !done {
            let c = at(p);
            if inq {
                if c == b'\\'
                    && at(p + 1) == b'x'
                    && at(p + 2).is_ascii_hexdigit()
                    && at(p + 3).is_ascii_hexdigit()
                {
                    out.push(hex(at(p + 2)) * 16 + hex(at(p + 3)));
                    p += 3;
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    out.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(p + 1) != 0 && !space(at(p + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    out.push(c);
                }
            } else if insq {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    out.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !space(at(p + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    out.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    _ => out.push(c),
                }
            }
            if at(p) != 0 {
                p += 1;
            }
        }
        args.push((start, out.len()));
    }
}

/// Most elements of one aggregate reply [`scan_reply`] takes.
const MAX_AGGREGATE: u64 = 16 << 20;

/// One complete reply found by [`scan_reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Bytes the reply takes.
    pub len: usize,
    /// Its type byte (`>` is a RESP3 push, not a reply to a command).
    pub kind: u8,
}

/// Where the first reply in `buf` ends (RESP2 and RESP3 types, nested aggregates included,
/// iteratively so depth costs nothing): `Ok(None)` when it is not complete yet.
pub fn scan_reply(buf: &[u8]) -> Result<Option<Scanned>, RespError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    // Elements still to read; u64 so that hostile counts cannot overflow before the check.
    let mut pending: u64 = 1;
    let mut pos = 0;
    while pending > 0 {
        let Some(&t) = buf.get(pos) else {
            return Ok(None);
        };
        let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
            if buf.len() - pos > MAX_REPLY {
                return Err(RespError::Protocol("reply line too long".into()));
            }
            return Ok(None);
        };
        let line_end = pos + nl + 1;
        if nl < 2 || buf[line_end - 2] != b'\r' {
            return Err(RespError::Protocol(format!(
                "reply line at byte {pos} does not end with CRLF"
            )));
        }
        let body = &buf[pos + 1..line_end - 2];
        let number = || -> Result<i64, RespError> {
            std::str::from_utf8(body)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| {
                    RespError::Protocol(format!("bad length {} at byte {pos}", excerpt(body)))
                })
        };
        match t {
            b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {
                pending -= 1;
                pos = line_end;
            }
            b'$' | b'!' | b'=' => {
                let n = number()?;
                pending -= 1;
                if n < 0 {
                    pos = line_end;
                } else if n as u64 > MAX_BULK as u64 {
                    return Err(RespError::Protocol(format!(
                        "bulk reply of {n} bytes at byte {pos}"
                    )));
                } else {
                    let end = line_end + n as usize + 2;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    pos = end;
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = number()?;
                pending -= 1;
                if n > 0 {
                    let n = n as u64;
                    if n > MAX_AGGREGATE {
                        return Err(RespError::Protocol(format!(
                            "aggregate of {n} elements at byte {pos}"
                        )));
                    }
                    pending += match t {
                        b'%' => 2 * n,
                        // An attribute map comes before the reply it annotates.
                        b'|' => 2 * n + 1,
                        _ => n,
                    };
                } else if t == b'|' {
                    pending += 1;
                }
                pos = line_end;
            }
            _ => {
                return Err(RespError::Protocol(format!(
                    "not a RESP reply at byte {pos}: {}",
                    excerpt(&buf[pos..line_end.min(pos + 16)])
                )))
            }
        }
    }
    Ok(Some(Scanned { len: pos, kind }))
}

/// For a complete array reply (RESP2 `*` or RESP3 push `>`) whose first element is a bulk
/// string: that string, and the third element when it is an integer. This is how a pub/sub
/// event reads: `["unsubscribe", channel, count]`, `["message", channel, payload]`.
pub fn array_head(reply: &[u8]) -> Option<(&[u8], Option<i64>)> {
    if !matches!(reply.first(), Some(b'*' | b'>')) {
        return None;
    }
    let nl = reply.iter().position(|&b| b == b'\n')?;
    let count: usize = std::str::from_utf8(reply.get(1..nl.checked_sub(1)?)?)
        .ok()?
        .parse()
        .ok()?;
    if count == 0 {
        return None;
    }
    let mut pos = nl + 1;
    let first = scan_reply(&reply[pos..]).ok()??;
    let item = &reply[pos..pos + first.len];
    if first.kind != b'$' {
        return None;
    }
    let head_end = item.iter().position(|&b| b == b'\n')? + 1;
    let head = item.get(head_end..item.len() - 2)?;
    pos += first.len;
    if count < 3 {
        return Some((head, None));
    }
    let second = scan_reply(&reply[pos..]).ok()??;
    pos += second.len;
    let third = scan_reply(&reply[pos..]).ok()??;
    let number = (third.kind == b':')
        .then(|| {
            std::str::from_utf8(&reply[pos + 1..pos + third.len - 2])
                .ok()?
                .parse()
                .ok()
        })
        .flatten();
    Some((head, number))
}

#[cfg(test)]
mod tests {
    use tokio::io::BufReader;

    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Reply, RespError> {
        let mut reader = BufReader::new(bytes);
        read_reply(&mut reader).await
    }

    #[tokio::test]
    async fn parses_replies() {
        assert_eq!(parse(b"+PONG\r\n").await, Ok(Reply::Simple("PONG".into())));
        assert_eq!(
            parse(b"*3\r\n$6\r\nmaster\r\n:10\r\n*0\r\n").await,
            Ok(Reply::Array(Some(vec![
                Reply::Bulk(Some(b"master".to_vec())),
                Reply::Integer(10),
                Reply::Array(Some(vec![])),
            ])))
        );
        assert_eq!(parse(b"$-1\r\n").await, Ok(Reply::Bulk(None)));
        assert!(parse(b"HTTP/1.1 400\r\n").await.is_err());
        assert!(parse(b"$5\r\nab").await.is_err());
        assert!(parse(b"").await.is_err());
    }

    /// The one-pass count reader says what `find` then `string2ll` say, wherever it answers:
    /// every line of up to four bytes over digits, signs, CR, NUL and a letter, and the
    /// lengths around its 18-digit limit.
    #[test]
    fn counts_read_in_one_pass_agree_with_the_general_path() {
        let alphabet = b"019-\r\0a";
        let mut lines: Vec<Vec<u8>> = vec![Vec::new()];
        for len in 1..=4 {
            let mut next = Vec::new();
            for line in lines.iter().filter(|l| l.len() == len - 1) {
                for &b in alphabet {
                    let mut l = line.clone();
                    l.push(b);
                    next.push(l);
                }
            }
            lines.extend(next);
        }
        for digits in 17..=20 {
            let mut l = vec![b'9'; digits];
            l.push(b'\r');
            lines.push(l);
        }
        let mut answered = 0;
        for line in &lines {
            let mut buf = b"$".to_vec();
            buf.extend_from_slice(line);
            if let Some((cr, n)) = digits_to_cr(&buf, 1) {
                answered += 1;
                assert_eq!(find(&buf, 0, b'\r'), Some(cr), "{line:?}");
                assert_eq!(string2ll(&buf[1..cr]), n, "{line:?}");
            }
        }
        assert!(
            answered > 20,
            "the one-pass reader answered only {answered} lines"
        );
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&mut out, &["AUTH", "pw"]);
        assert_eq!(out, b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n");
    }

    fn command(bytes: &[u8]) -> Result<Option<Vec<Vec<u8>>>, CommandError> {
        let mut cmd = Command::default();
        Ok(parse_command(bytes, &mut cmd)?.then(|| {
            (0..cmd.args.len())
                .map(|i| cmd.arg(bytes, i).unwrap().to_vec())
                .collect()
        }))
    }

    #[test]
    fn commands_parse_in_place() {
        let mut out = Vec::new();
        encode(&mut out, &["SET", "k", "v a l"]);
        let n = out.len();
        out.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        let mut cmd = Command::default();
        assert!(parse_command(&out, &mut cmd).unwrap());
        assert_eq!(cmd.len, n);
        assert_eq!(cmd.arg(&out, 2), Some(&b"v a l"[..]));
        assert_eq!(
            command(b"GET  key\r\n").unwrap(),
            Some(vec![b"GET".to_vec(), b"key".to_vec()])
        );
        assert_eq!(command(b"\r\n").unwrap(), Some(vec![]));
        for partial in [&b"*2\r\n$3\r\nGET\r\n$3\r\nke"[..], b"*2\r", b"*", b"GET k"] {
            assert_eq!(command(partial).unwrap(), None, "{partial:?}");
        }
        for (bad, needle) in [
            (&b"*1\r\n:3\r\n"[..], "expected '$', got ':'"),
            (b"*1\r\nfoo\r\n", "expected '$', got 'f'"),
            (b"*x\r\n", "invalid multibulk length"),
            (b"*03\r\n", "invalid multibulk length"),
            (b"*3000000000\r\n", "invalid multibulk length"),
            (b"*1\r\n$-1\r\n", "invalid bulk length"),
            (b"*1\r\n$blabla\r\n", "invalid bulk length"),
            (b"*1\r\n$999999999999\r\n", "invalid bulk length"),
            (b"set \"\"\"k\"\"\" v\r\n", "unbalanced quotes in request"),
            (b"get \"k\r\n", "unbalanced quotes in request"),
            (b"get 'k'x\r\n", "unbalanced quotes in request"),
        ] {
            let err = command(bad).unwrap_err().to_string();
            assert!(err.starts_with("Protocol error: "), "{bad:?}: {err}");
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
        // Before AUTH, Redis' smaller limits.
        let mut cmd = Command::default();
        let many = format!("*11\r\n{}", "$1\r\nx\r\n".repeat(11));
        assert!(parse_command(many.as_bytes(), &mut cmd).unwrap());
        let err = parse_command_as(many.as_bytes(), &mut cmd, false).unwrap_err();
        assert!(err.0.contains("unauthenticated multibulk length"), "{err}");
        // Too long without the byte that ends it: refused past 64 KiB, as Redis does.
        let mut long = vec![b'x'; MAX_INLINE + 1];
        assert!(command(&long)
            .unwrap_err()
            .0
            .contains("too big inline request"));
        long[0] = b'*';
        assert!(command(&long)
            .unwrap_err()
            .0
            .contains("too big mbulk count string"));
        // A NUL ends Redis' search for the end of a line: the line never completes.
        assert_eq!(command(b"GET a\x00b\r\nPING\r\n").unwrap(), None);
        // The bytes after a bulk string are skipped unread, as Redis skips them.
        assert_eq!(
            command(b"*1\r\n$4\r\nPINGxx").unwrap(),
            Some(vec![b"PING".to_vec()])
        );
    }

    #[test]
    fn inline_commands_split_as_redis_splits_them() {
        let cases: [(&[u8], &[&[u8]]); 9] = [
            (b"set k v\r\n", &[b"set", b"k", b"v"]),
            (b"  get\t k  \n", &[b"get", b"k"]),
            (b"set \"a b\" 'c d'\r\n", &[b"set", b"a b", b"c d"]),
            (b"set \"\\x41\\n\\\"\" x\r\n", &[b"set", b"A\n\"", b"x"]),
            (b"set 'it\\'s' x\r\n", &[b"set", b"it's", b"x"]),
            (b"set ab\"c d\" x\r\n", &[b"set", b"abc d", b"x"]),
            (b"set \"\" x\r\n", &[b"set", b"", b"x"]),
            (b"\r\n", &[]),
            (b"   \n", &[]),
        ];
        for (line, want) in cases {
            let got = command(line).unwrap().expect("complete");
            let want: Vec<Vec<u8>> = want.iter().map(|a| a.to_vec()).collect();
            assert_eq!(got, want, "{}", excerpt(line));
            let mut cmd = Command::default();
            parse_command(line, &mut cmd).unwrap();
            assert!(cmd.is_inline());
            assert_eq!(cmd.len, line.len());
        }
    }

    #[test]
    fn replies_are_scanned_whole() {
        let cases: [&[u8]; 9] = [
            b"+OK\r\n",
            b"-ERR x\r\n",
            b":12\r\n",
            b"$-1\r\n",
            b"$5\r\nhe\r\no\r\n",
            b"*2\r\n*1\r\n:1\r\n$1\r\nx\r\n",
            b"%1\r\n+a\r\n:1\r\n",
            b"|1\r\n+ttl\r\n:3\r\n+val\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
        ];
        for case in cases {
            let mut buf = case.to_vec();
            buf.extend_from_slice(b"+NEXT\r\n");
            let s = scan_reply(&buf).unwrap().unwrap();
            assert_eq!(s.len, case.len(), "{}", excerpt(case));
            assert_eq!(s.kind, case[0]);
            for cut in 0..case.len() {
                assert_eq!(scan_reply(&case[..cut]).unwrap(), None, "{}", excerpt(case));
            }
        }
        assert!(scan_reply(b"HTTP/1.1 200\r\n").is_err());
        assert!(scan_reply(b"$x\r\n").is_err());
    }

    #[test]
    fn pubsub_events_are_read() {
        assert_eq!(
            array_head(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nc\r\n:0\r\n"),
            Some((&b"unsubscribe"[..], Some(0)))
        );
        assert_eq!(
            array_head(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n"),
            Some((&b"message"[..], None))
        );
        assert_eq!(
            array_head(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
            Some((&b"pong"[..], None))
        );
        assert_eq!(array_head(b"+OK\r\n"), None);
        assert_eq!(array_head(b"*0\r\n"), None);
    }

    /// A small deterministic generator (xorshift), so the property tests need no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random bytes, and random RESP-like bytes, never make the parsers panic, and whatever
    /// they accept lies within the buffer.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"*$:+-%>|_#,(!=~0123456789\r\n\r\nabc ";
        let mut cmd = Command::default();
        for round in 0..20_000 {
            let len = rng.below(64);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if round % 2 == 0 {
                        rng.next() as u8
                    } else {
                        alphabet[rng.below(alphabet.len())]
                    }
                })
                .collect();
            if let Ok(true) = parse_command(&bytes, &mut cmd) {
                assert!(cmd.len <= bytes.len());
                assert!(cmd.args.iter().all(|&(s, e)| s <= e && e <= cmd.len));
            }
            if let Ok(Some(s)) = scan_reply(&bytes) {
                assert!(s.len <= bytes.len() && s.len > 0);
                let _ = array_head(&bytes[..s.len]);
            }
        }
    }

    /// Encoded commands parse back to their arguments whatever the split points: a prefix is
    /// incomplete, never an error, and the whole gives back every argument.
    #[test]
    fn commands_round_trip_at_every_split() {
        let mut rng = Rng(42);
        let mut cmd = Command::default();
        for _ in 0..500 {
            let argc = 1 + rng.below(5);
            let args: Vec<String> = (0..argc)
                .map(|_| {
                    (0..rng.below(12))
                        .map(|_| (b' ' + rng.below(94) as u8) as char)
                        .collect()
                })
                .collect();
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut bytes = Vec::new();
            encode(&mut bytes, &refs);
            for cut in 0..bytes.len() {
                assert_eq!(parse_command(&bytes[..cut], &mut cmd), Ok(false));
            }
            assert_eq!(parse_command(&bytes, &mut cmd), Ok(true));
            assert_eq!(cmd.len, bytes.len());
            for (i, a) in args.iter().enumerate() {
                assert_eq!(cmd.arg(&bytes, i), Some(a.as_bytes()));
            }
            // The same bytes as a server's reply (an array of bulk strings): one reply.
            assert_eq!(
                scan_reply(&bytes).unwrap().map(|s| s.len),
                Some(bytes.len())
            );
        }
    }
}
