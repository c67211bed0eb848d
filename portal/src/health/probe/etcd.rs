//! The etcd probe: the member's status (`POST /v3/maintenance/status` through etcd's gRPC
//! gateway) and `GET /health`, pipelined on one HTTP/1.1 connection (HTTPS with backend TLS).
//!
//! Every healthy member serves reads and writes (etcd forwards proposals to its raft leader), so
//! a healthy member is a [`Role::SharedLeader`]: in `leader` routing the checker keeps sessions
//! on one healthy member and moves them only when it fails. The status adds what `/health`
//! alone does not say, and makes a member unhealthy when it reports errors (alarms such as
//! `NOSPACE` or `CORRUPT`), has no raft leader, or is a learner (which serves no clients).
//! Whether the member is etcd's own raft leader is reported beside the role
//! ([`Probed::engine_leader`]); routing does not use it. Its `raftIndex` is the member's
//! replication position: replicas' lag is measured against the raft leader's. An etcd whose gateway does not serve
//! the status (disabled, or older than the `/v3` paths) is judged by `/health` alone.
//!
//! May import: `config` and the rest of `health`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{excerpt, Io, ProbeError, Probed};
use crate::{
    config::Address,
    health::{Replication, Role},
};

/// Most bytes read for both answers.
const MAX_RESPONSE: usize = 64 * 1024;

pub(crate) async fn probe(
    stream: &mut Box<dyn Io>,
    address: &Address,
) -> Result<Probed, ProbeError> {
    let host = match address.ip() {
        Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{}", address.port),
        _ => format!("{}:{}", address.host, address.port),
    };
    let request = format!(
        "POST /v3/maintenance/status HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dbportal-probe\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}\
         GET /health HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dbportal-probe\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(answers) = two_responses(&received, false)? {
            return judge(&answers.0, &answers.1);
        }
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            // A TLS peer closing without close_notify: judge what arrived.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return match two_responses(&received, true)? {
                Some(answers) => judge(&answers.0, &answers.1),
                None => Err(ProbeError::Protocol(format!(
                    "the connection closed before both HTTP answers arrived: {}",
                    excerpt(&received)
                ))),
            };
        }
        received.extend_from_slice(&chunk[..n]);
        if received.len() > MAX_RESPONSE {
            return Err(ProbeError::Protocol(format!(
                "answers longer than {MAX_RESPONSE} bytes"
            )));
        }
    }
}

/// One HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    status: u16,
    body: String,
}

/// The status and health responses, once both are complete (`eof`: no more bytes will come,
/// so a body without a length ends here).
fn two_responses(bytes: &[u8], eof: bool) -> Result<Option<(Response, Response)>, ProbeError> {
    let Some((first, used)) = response(bytes, false)? else {
        if eof && bytes.is_empty() {
            return Err(ProbeError::Protocol(
                "the member closed the connection without answering".into(),
            ));
        }
        if eof {
            return Err(ProbeError::Protocol(format!(
                "the connection closed before the member status was complete: {}",
                excerpt(bytes)
            )));
        }
        return Ok(None);
    };
    Ok(response(&bytes[used..], eof)?.map(|(second, _)| (first, second)))
}

/// Parses one response from the start of `bytes`: `None` while incomplete, else the response
/// and the bytes it took.
fn response(bytes: &[u8], eof: bool) -> Result<Option<(Response, usize)>, ProbeError> {
    let Some(head_end) = find(bytes, b"\r\n\r\n") else {
        if eof && !bytes.is_empty() {
            return Err(not_http(bytes));
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| not_http(bytes))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| ProbeError::Protocol(format!("bad Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let rest = &bytes[head_end + 4..];
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if chunked {
        return Ok(dechunk(rest)?.map(|(body, used)| {
            (
                Response {
                    status,
                    body: text(&body),
                },
                head_end + 4 + used,
            )
        }));
    }
    match length {
        Some(n) if rest.len() >= n => Ok(Some((
            Response {
                status,
                body: text(&rest[..n]),
            },
            head_end + 4 + n,
        ))),
        Some(_) => Ok(None),
        None if eof => Ok(Some((
            Response {
                status,
                body: text(rest),
            },
            bytes.len(),
        ))),
        None => Ok(None),
    }
}

/// A chunked body: `None` while incomplete, else the body and the bytes it took.
fn dechunk(mut bytes: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ProbeError> {
    let total = bytes.len();
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(bytes, b"\r\n") else {
            return Ok(None);
        };
        let size_text = String::from_utf8_lossy(&bytes[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ProbeError::Protocol(format!("bad chunk size {size_text:?}")))?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            let Some(end) = find(bytes, b"\r\n") else {
                return Ok(None);
            };
            let mut rest = &bytes[end + 2..];
            if end > 0 {
                let Some(trailers_end) = find(bytes, b"\r\n\r\n") else {
                    return Ok(None);
                };
                rest = &bytes[trailers_end + 4..];
            }
            return Ok(Some((body, total - rest.len())));
        }
        if bytes.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&bytes[..size]);
        bytes = &bytes[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn not_http(bytes: &[u8]) -> ProbeError {
    ProbeError::Protocol(format!("not an HTTP response: {}", excerpt(bytes)))
}

/// A uint64 of the gateway's JSON (a string, or a number from other encoders).
fn id(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Judges the member from its status and `/health` answers.
fn judge(status: &Response, health: &Response) -> Result<Probed, ProbeError> {
    let (engine_leader, position) = match status.status {
        200 => {
            let (leader, position) = judge_status(&status.body)?;
            (Some(leader), position)
        }
        // No gateway, or paths of another etcd version: `/health` alone decides.
        404 | 405 | 501 => (None, None),
        code => {
            return Err(ProbeError::Protocol(format!(
                "member status answered {code}: {}",
                excerpt(status.body.trim().as_bytes())
            )))
        }
    };
    let healthy = health
        .body
        .replace([' ', '\n', '\r', '\t'], "")
        .contains("\"health\":\"true\"");
    if health.status != 200 || !healthy {
        return Err(ProbeError::Protocol(format!(
            "/health answered {}: {}",
            health.status,
            excerpt(health.body.trim().as_bytes())
        )));
    }
    Ok(Probed {
        engine_leader,
        replication: Replication {
            position,
            ..Replication::default()
        },
        ..Role::SharedLeader.into()
    })
}

/// The member's status: `Ok(whether it is the raft leader)` when it may serve, else why not.
/// Whether the member is the raft leader, and its raft index.
fn judge_status(body: &str) -> Result<(bool, Option<u64>), ProbeError> {
    let status: serde_json::Value = serde_json::from_str(body).map_err(|e| {
        ProbeError::Protocol(format!(
            "member status is not JSON ({e}): {}",
            excerpt(body.as_bytes())
        ))
    })?;
    let errors: Vec<String> = status
        .get("errors")
        .and_then(|e| e.as_array())
        .map(|a| {
            a.iter()
                .map(|e| {
                    e.as_str()
                        .map_or_else(|| e.to_string(), |s| s.trim().into())
                })
                .collect()
        })
        .unwrap_or_default();
    let reported = if errors.is_empty() {
        String::new()
    } else {
        format!(" ({})", errors.join("; "))
    };
    let leader = id(status.get("leader")).filter(|l| l != "0");
    let Some(leader) = leader else {
        return Err(ProbeError::Protocol(format!(
            "member status: no raft leader{reported}"
        )));
    };
    if !errors.is_empty() {
        return Err(ProbeError::Protocol(format!(
            "member status reports errors: {}",
            errors.join("; ")
        )));
    }
    if status.get("isLearner").and_then(|l| l.as_bool()) == Some(true) {
        return Err(ProbeError::Protocol(
            "member is a raft learner (it serves no clients)".into(),
        ));
    }
    let member = id(status.get("header").and_then(|h| h.get("member_id")));
    // The gateway writes 64-bit integers as JSON strings.
    let index = id(status.get("raftIndex")).and_then(|i| i.parse::<u64>().ok());
    Ok((member.as_deref() == Some(leader.as_str()), index))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/1.1 answer with a Content-Length.
    fn http(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn status_ok(leader: &str) -> String {
        http(
            "200 OK",
            &format!("{{\"header\":{{\"cluster_id\":\"1\",\"member_id\":\"42\"}},\"version\":\"3.4.23\",\"leader\":\"{leader}\"}}"),
        )
    }

    fn health_ok() -> String {
        http("200 OK", "{\"health\":\"true\"}")
    }

    fn both(status: &str, health: &str) -> Result<Probed, ProbeError> {
        let bytes = format!("{status}{health}");
        match two_responses(bytes.as_bytes(), true)? {
            Some((s, h)) => judge(&s, &h),
            None => Err(ProbeError::Protocol("incomplete".into())),
        }
    }

    #[test]
    fn judges_status_and_health() {
        assert_eq!(
            both(&status_ok("42"), &health_ok()),
            Ok(Probed {
                engine_leader: Some(true),
                ..Role::SharedLeader.into()
            })
        );
        assert_eq!(
            both(&status_ok("43"), &health_ok()).unwrap().engine_leader,
            Some(false)
        );
        let indexed = http(
            "200 OK",
            "{\"header\":{\"member_id\":\"42\"},\"leader\":\"43\",\"raftIndex\":\"1207\"}",
        );
        assert_eq!(
            both(&indexed, &health_ok()).unwrap().replication.position,
            Some(1207)
        );
        let err = both(&status_ok("0"), &health_ok()).unwrap_err().to_string();
        assert!(err.contains("no raft leader"), "{err}");

        let alarm = http(
            "200 OK",
            "{\"header\":{\"member_id\":\"42\"},\"leader\":\"42\",\"errors\":[\"memberID:42 alarm:NOSPACE \"]}",
        );
        let err = both(&alarm, &health_ok()).unwrap_err().to_string();
        assert!(err.contains("alarm:NOSPACE"), "{err}");
        let learner = http(
            "200 OK",
            "{\"header\":{\"member_id\":\"42\"},\"leader\":\"7\",\"isLearner\":true}",
        );
        let err = both(&learner, &health_ok()).unwrap_err().to_string();
        assert!(err.contains("learner"), "{err}");

        let bad = http(
            "503 Service Unavailable",
            "{\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}",
        );
        let err = both(&status_ok("42"), &bad).unwrap_err().to_string();
        assert!(
            err.contains("503") && err.contains("RAFT NO LEADER"),
            "{err}"
        );
        let err = both(&http("500 Internal Server Error", "boom"), &health_ok())
            .unwrap_err()
            .to_string();
        assert!(err.contains("member status answered 500"), "{err}");
    }

    #[test]
    fn without_the_gateway_health_alone_decides() {
        let missing = http("404 Not Found", "not found");
        assert_eq!(both(&missing, &health_ok()), Ok(Role::SharedLeader.into()));
    }

    #[test]
    fn parses_chunked_and_partial_answers() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"hea\r\nC\r\nlth\":\"true\"}\r\n0\r\n\r\n";
        let bytes = format!("{}{chunked}", status_ok("42"));
        let (_, h) = two_responses(bytes.as_bytes(), false).unwrap().unwrap();
        assert_eq!(h.body, "{\"health\":\"true\"}");
        // Cut anywhere, it is incomplete, not an error.
        for cut in 0..bytes.len() {
            assert_eq!(two_responses(&bytes.as_bytes()[..cut], false), Ok(None));
        }
        // A body without a length ends at the end of the stream.
        let no_length = "HTTP/1.1 200 OK\r\n\r\n{\"health\":\"true\"}";
        assert!(both(&status_ok("42"), no_length).is_ok());
        assert!(both("+PONG\r\n", "").is_err());
        assert!(both("+PONG\r\n\r\n", "").is_err());
    }
}
