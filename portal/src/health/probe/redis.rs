//! The Redis probe (also KeyDB and Valkey): AUTH, PING, ROLE (or INFO replication).
//!
//! A hand-written RESP exchange: the probe needs four commands and the replies' first words,
//! which a full client crate (connection managers, pools, a wide type system) would not make
//! clearer, only heavier.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{excerpt, Io, ProbeError, Probed};
use crate::health::{Caveat, ProbeCredentials, Role};

/// Longest reply the probe reads (INFO replication with many replicas stays far below).
const MAX_REPLY: usize = 1 << 20;

/// A RESP reply, as far as the probe cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

pub(crate) async fn probe(
    stream: &mut Box<dyn Io>,
    credentials: Option<&ProbeCredentials>,
) -> Result<Probed, ProbeError> {
    let mut request = Vec::new();
    if let Some(c) = credentials {
        match &c.username {
            Some(user) => encode(&mut request, &["AUTH", user, &c.password]),
            None => encode(&mut request, &["AUTH", &c.password]),
        }
    }
    encode(&mut request, &["PING"]);
    encode(&mut request, &["ROLE"]);
    stream.write_all(&request).await?;
    let mut reader = BufReader::new(stream);

    if credentials.is_some() {
        match read_reply(&mut reader).await? {
            Reply::Simple(_) => {}
            Reply::Error(e) => {
                return Err(ProbeError::Auth(e));
            }
            other => return Err(unexpected("AUTH", &other)),
        }
    }
    let caveat = match read_reply(&mut reader).await? {
        Reply::Simple(s) if s.eq_ignore_ascii_case("PONG") => None,
        Reply::Error(e) => match caveat_of(&e) {
            Some(Caveat::Busy) => {
                // ROLE gets -BUSY too; read it so that the exchange ends cleanly.
                let _ = read_reply(&mut reader).await;
                return Ok(Probed::busy());
            }
            Some(c) => Some(c),
            None => return Err(error_reply("PING", e)),
        },
        other => return Err(unexpected("PING", &other)),
    };
    let role = match read_reply(&mut reader).await? {
        Reply::Array(Some(items)) => match items.first() {
            Some(Reply::Bulk(Some(role))) => role_of(&String::from_utf8_lossy(role)),
            Some(Reply::Simple(role)) => role_of(role),
            _ => Err(ProbeError::Protocol(format!(
                "ROLE answered an array without a role: {items:?}"
            ))),
        },
        // A script started between PING and ROLE.
        Reply::Error(e) if caveat_of(&e) == Some(Caveat::Busy) => return Ok(Probed::busy()),
        // ROLE unknown (renamed, an old server) or not permitted (ACL): ask INFO instead.
        Reply::Error(e) if e.starts_with("LOADING") => Err(ProbeError::Loading),
        Reply::Error(_) => {
            let mut request = Vec::new();
            encode(&mut request, &["INFO", "replication"]);
            reader.get_mut().write_all(&request).await?;
            match read_reply(&mut reader).await? {
                Reply::Bulk(Some(info)) => {
                    let info = String::from_utf8_lossy(&info);
                    let role = info
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("role:"))
                        .ok_or_else(|| {
                            ProbeError::Protocol("INFO replication has no role: line".into())
                        })?;
                    role_of(role)
                }
                Reply::Error(e) if caveat_of(&e) == Some(Caveat::Busy) => return Ok(Probed::busy()),
                Reply::Error(e) => Err(error_reply("INFO replication", e)),
                other => Err(unexpected("INFO replication", &other)),
            }
        }
        other => Err(unexpected("ROLE", &other)),
    }?;
    Ok(Probed {
        caveat,
        ..role.into()
    })
}

/// The error replies that mean "alive, with a caveat" rather than "down". Each reply the probe
/// can meet is decided on purpose:
/// - `-BUSY`: a long script or function; the node is alive and keeps its role (see
///   [`Caveat::Busy`]).
/// - `-MISCONF`: cannot persist, refuses writes and PING; still the leader, reads work.
/// - `-LOADING`: not here: the node cannot serve until its data set is loaded (down).
/// - `-MASTERDOWN`: not here: a replica with `replica-serve-stale-data no` that has lost its
///   master refuses reads, so it is down for the modes that read from replicas (it never leads).
/// - `-NOAUTH` / `-WRONGPASS`: not here: a credentials problem, reported as such.
fn caveat_of(error: &str) -> Option<Caveat> {
    if error.starts_with("BUSY ") || error == "BUSY" {
        Some(Caveat::Busy)
    } else if error.starts_with("MISCONF") {
        Some(Caveat::Misconf)
    } else {
        None
    }
}

fn role_of(role: &str) -> Result<Role, ProbeError> {
    match role.trim() {
        "master" => Ok(Role::Leader),
        "active-replica" => Ok(Role::SharedLeader),
        "slave" | "replica" => Ok(Role::Replica),
        other => Err(ProbeError::Protocol(format!(
            "unexpected role {other:?} (a sentinel?)"
        ))),
    }
}

fn error_reply(command: &str, error: String) -> ProbeError {
    if error.starts_with("LOADING") {
        ProbeError::Loading
    } else if error.starts_with("NOAUTH") || error.starts_with("WRONGPASS") {
        ProbeError::Auth(error)
    } else if error.starts_with("MASTERDOWN") {
        ProbeError::Protocol(format!(
            "{command} answered -{error} (a replica that lost its master and does not serve \
             stale data: down until it resynchronises)"
        ))
    } else {
        ProbeError::Protocol(format!("{command} answered -{error}"))
    }
}

fn unexpected(command: &str, reply: &Reply) -> ProbeError {
    ProbeError::Protocol(format!("{command} answered {reply:?}"))
}

/// Appends a command as a RESP array of bulk strings.
pub(crate) fn encode(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one reply (nested arrays included, bounded in size).
pub(crate) async fn read_reply<R: tokio::io::AsyncBufRead + Unpin + Send>(
    reader: &mut R,
) -> Result<Reply, ProbeError> {
    let mut budget = MAX_REPLY;
    read_value(reader, &mut budget, 0).await
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin + Send>(
    reader: &mut R,
    budget: &mut usize,
) -> Result<Vec<u8>, ProbeError> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(*budget as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(ProbeError::Protocol(
            "the server closed the connection".into(),
        ));
    }
    *budget = budget.saturating_sub(n);
    if !line.ends_with(b"\r\n") {
        return Err(ProbeError::Protocol(format!(
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
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, ProbeError>> + Send + 'a>> {
    Box::pin(async move {
        if depth > 8 {
            return Err(ProbeError::Protocol("reply nested too deeply".into()));
        }
        let line = read_line(reader, budget).await?;
        let (kind, rest) = line
            .split_first()
            .ok_or_else(|| ProbeError::Protocol("empty reply line".into()))?;
        let text = String::from_utf8_lossy(rest).into_owned();
        let number = || {
            text.parse::<i64>()
                .map_err(|_| ProbeError::Protocol(format!("bad length in {}", excerpt(&line))))
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
                    return Err(ProbeError::Protocol("reply too large".into()));
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
            _ => Err(ProbeError::Protocol(format!(
                "not a RESP reply: {}",
                excerpt(&line)
            ))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Reply, ProbeError> {
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
    fn roles() {
        assert_eq!(role_of("master"), Ok(Role::Leader));
        assert_eq!(role_of("slave"), Ok(Role::Replica));
        assert_eq!(role_of("active-replica"), Ok(Role::SharedLeader));
        assert!(role_of("sentinel").is_err());
        assert_eq!(
            error_reply("PING", "LOADING Redis is loading".into()),
            ProbeError::Loading
        );
        assert_eq!(
            caveat_of("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."),
            Some(Caveat::Busy)
        );
        assert_eq!(caveat_of("BUSYKEY Target key name already exists."), None);
        assert_eq!(
            caveat_of("MISCONF Redis is configured to save RDB snapshots"),
            Some(Caveat::Misconf)
        );
        assert_eq!(caveat_of("MASTERDOWN Link with MASTER is down"), None);
        assert!(matches!(
            error_reply("PING", "NOAUTH Authentication required.".into()),
            ProbeError::Auth(_)
        ));
    }
}
