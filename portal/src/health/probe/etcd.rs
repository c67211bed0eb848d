//! The etcd probe: `GET /health` over HTTP/1.1 (HTTPS with backend TLS). Every healthy member
//! serves reads and writes (etcd forwards proposals to its raft leader), so a healthy member
//! is a [`Role::SharedLeader`]: in `leader` routing the checker keeps sessions on one healthy
//! member and moves them only when it fails.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{excerpt, Io, ProbeError};
use crate::{config::Address, health::Role};

const MAX_RESPONSE: u64 = 64 * 1024;

pub(crate) async fn probe(stream: &mut Box<dyn Io>, address: &Address) -> Result<Role, ProbeError> {
    let host = match address.ip() {
        Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{}", address.port),
        _ => format!("{}:{}", address.host, address.port),
    };
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dbportal-probe\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    (&mut *stream)
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .await?;
    judge(&response)
}

fn judge(response: &[u8]) -> Result<Role, ProbeError> {
    let text = String::from_utf8_lossy(response);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| {
            ProbeError::Protocol(format!("not an HTTP response: {}", excerpt(response)))
        })?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let healthy = body
        .replace([' ', '\n', '\r', '\t'], "")
        .contains("\"health\":\"true\"");
    match (status, healthy) {
        ("200", true) => Ok(Role::SharedLeader),
        _ => Err(ProbeError::Protocol(format!(
            "/health answered {status}: {}",
            excerpt(body.trim().as_bytes())
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_health() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"health\":\"true\",\"reason\":\"\"}";
        assert_eq!(judge(ok), Ok(Role::SharedLeader));
        let bad = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}";
        let err = judge(bad).unwrap_err().to_string();
        assert!(
            err.contains("503") && err.contains("RAFT NO LEADER"),
            "{err}"
        );
        assert!(judge(b"+PONG\r\n").is_err());
    }
}
