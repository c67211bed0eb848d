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
/// Most arguments in one command.
pub const MAX_ARGS: usize = 1 << 20;
/// Longest inline command (a line of words, as typed into telnet).
pub const MAX_INLINE: usize = 64 << 10;

/// Why a client's bytes are not a command: names what and where, never echoes much.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct CommandError(pub String);

/// Where each argument of one command lies in the buffer it was parsed from.
#[derive(Debug, Default, Clone)]
pub struct Command {
    /// Bytes the command takes in the buffer (its whole frame).
    pub len: usize,
    /// `start..end` of each argument, the name first.
    pub args: Vec<(usize, usize)>,
}

impl Command {
    /// Argument `i` within `buf` (the buffer given to [`parse_command`]).
    pub fn arg<'a>(&self, buf: &'a [u8], i: usize) -> Option<&'a [u8]> {
        self.args.get(i).map(|&(s, e)| &buf[s..e])
    }
}

/// Parses one complete command at the start of `buf` into `cmd` (its argument list reused, so
/// the hot path allocates nothing): `Ok(true)` when one is there, `Ok(false)` when more bytes
/// are needed. Understands RESP arrays of bulk strings and inline commands. An empty inline
/// line is a command with no arguments (Redis skips it).
pub fn parse_command(buf: &[u8], cmd: &mut Command) -> Result<bool, CommandError> {
    cmd.args.clear();
    cmd.len = 0;
    let Some(&first) = buf.first() else {
        return Ok(false);
    };
    if first != b'*' {
        return parse_inline(buf, cmd);
    }
    let Some((count, mut pos)) = number_line(buf, 1, "multibulk length")? else {
        return Ok(false);
    };
    if count > MAX_ARGS as i64 {
        return Err(CommandError(format!(
            "invalid multibulk length {count} (at most {MAX_ARGS})"
        )));
    }
    for _ in 0..count.max(0) {
        match buf.get(pos) {
            None => return Ok(false),
            Some(b'$') => {}
            Some(&b) => {
                return Err(CommandError(format!(
                    "expected '$' at byte {pos}, got {}",
                    super::excerpt(&[b])
                )))
            }
        }
        let Some((len, start)) = number_line(buf, pos + 1, "bulk length")? else {
            return Ok(false);
        };
        if len < 0 || len as u64 > MAX_BULK as u64 {
            return Err(CommandError(format!(
                "invalid bulk length {len} at byte {pos} (0 to {MAX_BULK})"
            )));
        }
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return Ok(false);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(CommandError(format!(
                "bulk string at byte {start} does not end with CRLF"
            )));
        }
        cmd.args.push((start, end));
        pos = end + 2;
    }
    cmd.len = pos;
    Ok(true)
}

fn parse_inline(buf: &[u8], cmd: &mut Command) -> Result<bool, CommandError> {
    let Some(nl) = buf.iter().take(MAX_INLINE + 1).position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Err(CommandError(format!(
                "inline command longer than {MAX_INLINE} bytes"
            )));
        }
        return Ok(false);
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let mut i = 0;
    while i < line_end {
        while i < line_end && buf[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < line_end && !buf[i].is_ascii_whitespace() {
            i += 1;
        }
        if i > start {
            if buf[start] == b'"' || buf[start] == b'\'' {
                return Err(CommandError(
                    "quoted inline arguments are not supported; send RESP arrays".into(),
                ));
            }
            cmd.args.push((start, i));
        }
    }
    cmd.len = nl + 1;
    Ok(true)
}

/// The decimal number ending in CRLF at `at`, and the position after it; `None` if incomplete.
fn number_line(buf: &[u8], at: usize, what: &str) -> Result<Option<(i64, usize)>, CommandError> {
    let mut value: i64 = 0;
    let mut negative = false;
    let mut i = at;
    loop {
        let Some(&b) = buf.get(i) else {
            if i - at > 20 {
                return Err(CommandError(format!("{what} at byte {at} is too long")));
            }
            return Ok(None);
        };
        match b {
            b'0'..=b'9' if i - at < 20 => {
                value = value
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(i64::from(b - b'0')))
                    .ok_or_else(|| CommandError(format!("{what} at byte {at} is too large")))?;
            }
            b'-' if i == at => negative = true,
            b'\r' if i > at + usize::from(negative) => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((if negative { -value } else { value }, i + 2))),
                    Some(_) => Err(CommandError(format!(
                        "{what} at byte {at} is not followed by CRLF"
                    ))),
                };
            }
            _ => {
                return Err(CommandError(format!(
                    "invalid {what}: unexpected {} at byte {i}",
                    super::excerpt(&[b])
                )))
            }
        }
        i += 1;
    }
}

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
                    if n > MAX_ARGS as u64 * 16 {
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
            (&b"*1\r\n:3\r\n"[..], "expected '$' at byte 4"),
            (b"*x\r\n", "unexpected x at byte 1"),
            (b"*1\r\n$-1\r\n", "invalid bulk length -1"),
            (
                b"*1\r\n$999999999999\r\n",
                "invalid bulk length 999999999999",
            ),
            (b"*1\r\n$3\r\nGETxx", "does not end with CRLF"),
            (b"*99999999\r\n", "invalid multibulk length"),
            (b"\"quoted\"\r\n", "quoted"),
        ] {
            let err = command(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?}: {err}");
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
