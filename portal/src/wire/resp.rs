//! RESP, the Redis serialization protocol: commands written as arrays of bulk strings, and an
//! incremental reader of replies (nested arrays included) bounded in size and depth.
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
}
