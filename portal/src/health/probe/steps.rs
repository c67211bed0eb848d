//! Custom send/expect probes (`healthCheck.steps`, any engine) in the manner of HAProxy's
//! `tcp-check`: each step sends its bytes, then waits until what arrived since the previous
//! match contains its `expect`, all before the probe's deadline.
//!
//! May import: `config` and the rest of `health`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{excerpt, Io, ProbeError};
use crate::config::Step;

/// Most bytes kept while waiting for one `expect`.
const MAX_BUFFER: usize = 64 * 1024;

pub(crate) async fn run(
    stream: &mut Box<dyn Io>,
    steps: &[Step],
    deadline: tokio::time::Instant,
) -> Result<(), ProbeError> {
    let mut received: Vec<u8> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        if !step.send.is_empty() {
            stream.write_all(&step.send).await?;
        }
        if step.expect.is_empty() {
            continue;
        }
        loop {
            if let Some(at) = find(&received, &step.expect) {
                received.drain(..at + step.expect.len());
                break;
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await;
            let wanted = || {
                format!(
                    "step {}: expected {:?}, received {:?}",
                    i + 1,
                    excerpt(&step.expect),
                    excerpt(&received)
                )
            };
            match read {
                Err(_) => {
                    return Err(ProbeError::Protocol(format!(
                        "{} before the deadline",
                        wanted()
                    )))
                }
                Ok(Ok(0)) => {
                    return Err(ProbeError::Protocol(format!(
                        "{} before the server closed the connection",
                        wanted()
                    )))
                }
                Ok(Ok(n)) => {
                    received.extend_from_slice(&chunk[..n]);
                    if received.len() > MAX_BUFFER {
                        let cut = received.len() - MAX_BUFFER;
                        received.drain(..cut);
                    }
                }
                Ok(Err(e)) => return Err(ProbeError::Io(format!("{}: {e}", wanted()))),
            }
        }
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn step(send: &str, expect: &str) -> Step {
        Step {
            send: send.as_bytes().to_vec(),
            expect: expect.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn matches_substrings_across_chunks() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut client: Box<dyn Io> = Box::new(client);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 6];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"PING\r\n");
            server.write_all(b"+PO").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            server.write_all(b"NG\r\n$9\r\nrole:mas").await.unwrap();
            server.write_all(b"ter\r\n").await.unwrap();
            server
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        run(
            &mut client,
            &[step("PING\r\n", "+PONG"), step("", "role:master")],
            deadline,
        )
        .await
        .unwrap();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_or_wrong_server_fails_at_the_deadline() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut client: Box<dyn Io> = Box::new(client);
        server.write_all(b"-ERR nope\r\n").await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let err = run(&mut client, &[step("PING\r\n", "+PONG")], deadline)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("-ERR nope"), "{err}");
        assert!(err.to_string().contains("before the deadline"), "{err}");
        drop(server);
    }
}
