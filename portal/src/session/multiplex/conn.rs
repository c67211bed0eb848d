//! One server connection of multiplexing, opened: dialled (TLS when `tls.backend` is on) and
//! logged in with the probe credentials within `timeouts.connect`; a dedicated connection
//! cleaned for its next client; and a command sent alone on a connection opened for it.
//!
//! May import: `config`, `health`, `tls`, `wire` and the session's [`hub`](crate::session::hub).

use std::{
    io,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use crate::{
    config::{Backend, Config},
    health::{CredentialsSource, ProbeCredentials},
    session::hub::{open_server, within_connect},
    tls::{BackendConnector, MaybeTls},
    wire::resp::{encode, scan_reply},
};

/// A server connection: TCP, or TLS when `tls.backend` is on.
pub type ServerStream = MaybeTls<TcpStream>;

/// What a new server connection needs: where, TLS, and the probe credentials to log in with.
#[derive(Clone)]
pub struct DialContext {
    pub config: Arc<Config>,
    pub connector: Option<BackendConnector>,
    pub credentials: Arc<dyn CredentialsSource>,
}

impl DialContext {
    pub(super) fn credentials(&self) -> Result<Option<ProbeCredentials>, String> {
        self.credentials.credentials(&self.config.health)
    }
}

/// The AUTH (and nothing else when there are no credentials) a server connection logs in with.
pub(super) fn login(creds: &Option<ProbeCredentials>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(c) = creds {
        match &c.username {
            Some(user) => encode(&mut out, &["AUTH", user, &c.password]),
            None => encode(&mut out, &["AUTH", &c.password]),
        }
    }
    out
}

/// Reads `n` replies and checks none is an error (the login's, RESET's).
pub(super) async fn expect_ok(stream: &mut ServerStream, n: usize) -> io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    let mut seen = 0;
    let mut pos = 0;
    while seen < n {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection during login",
            ));
        }
        while let Some(s) = scan_reply(&buf[pos..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        {
            if s.kind == b'-' {
                let text = String::from_utf8_lossy(&buf[pos + 1..pos + s.len - 2]).into_owned();
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, text));
            }
            pos += s.len;
            seen += 1;
        }
    }
    Ok(())
}

/// Cleans a dedicated connection for its next client: RESET (which ends every state a client
/// can leave on a connection, and logs it out), the login again, then ECHO of a token no
/// earlier reply carries. `unread` holds what was read of the connection and not passed on
/// (part of a reply). Whatever arrives before RESET's reply (a message or a push sent after
/// the client's last reply) is dropped; the connection is clean when RESET, the login and
/// the ECHO answer, in that order, and nothing follows them.
pub(super) async fn clean(
    stream: &mut ServerStream,
    creds: &Option<ProbeCredentials>,
    unread: Vec<u8>,
) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let token = format!(
        "dbportal-clean-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Relaxed)
    );
    let mut out = Vec::new();
    encode(&mut out, &["RESET"]);
    let auth = login(creds);
    out.extend_from_slice(&auth);
    encode(&mut out, &["ECHO", &token]);
    stream.write_all(&out).await?;
    let echo = format!("${}\r\n{token}\r\n", token.len());
    let mut expected: Vec<&[u8]> = vec![b"+RESET\r\n"];
    if !auth.is_empty() {
        expected.push(b"+OK\r\n");
    }
    expected.push(echo.as_bytes());
    let unclean = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let mut buf = unread;
    let mut pos = 0;
    let mut matched = 0;
    loop {
        while let Some(s) =
            scan_reply(&buf[pos..]).map_err(|e| unclean(&format!("cleaning: {e}")))?
        {
            let reply = &buf[pos..pos + s.len];
            pos += s.len;
            if reply == expected[matched] {
                matched += 1;
            } else if matched > 0 || s.kind == b'-' || reply == echo.as_bytes() {
                // Before RESET's answer only messages and pushes may come.
                return Err(unclean("RESET or the login failed"));
            }
            if matched == expected.len() {
                return match pos == buf.len() {
                    true => Ok(()),
                    false => Err(unclean("a reply after the cleaning's last")),
                };
            }
        }
        if buf.len() > MAX_UNREAD {
            return Err(unclean("too much unread before RESET's reply"));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection while it was cleaned",
            ));
        }
    }
}

/// Most bytes read while cleaning a dedicated connection before its RESET answers.
const MAX_UNREAD: usize = 4 << 20;

/// Opens and logs in one server connection to `backend`, within `timeouts.connect`.
pub async fn dial(ctx: &DialContext, backend: &Backend) -> io::Result<ServerStream> {
    let work = async {
        let mut stream = open_server(backend, ctx.connector.as_ref(), false).await?;
        let creds = ctx.credentials().map_err(io::Error::other)?;
        let auth = login(&creds);
        if !auth.is_empty() {
            stream.write_all(&auth).await?;
            expect_ok(&mut stream, 1).await?;
        }
        Ok(stream)
    };
    within_connect(ctx.config.timeouts.connect, work).await
}

/// The server's id of `stream` (CLIENT ID), within `deadline`.
pub(super) async fn server_id(stream: &mut ServerStream, deadline: Duration) -> io::Result<u64> {
    let ask = async {
        stream
            .write_all(b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n")
            .await?;
        let mut buf = Vec::with_capacity(32);
        loop {
            if let Some(s) = scan_reply(&buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            {
                return std::str::from_utf8(&buf[1..s.len - 2])
                    .ok()
                    .filter(|_| s.kind == b':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "CLIENT ID"));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "CLIENT ID"));
            }
        }
    };
    timeout(deadline, ask)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "CLIENT ID")))
}

/// Sends `command` (one, whole) on `stream`, a connection opened for it alone, and returns
/// its reply within `deadline`; `None` when the server closes the connection instead, as a
/// SHUTDOWN that succeeds does. The connection is closed afterwards.
pub async fn send_alone(
    mut stream: ServerStream,
    command: &[u8],
    deadline: Duration,
) -> io::Result<Option<Vec<u8>>> {
    let exchange = async {
        stream.write_all(command).await?;
        let mut buf = Vec::with_capacity(256);
        loop {
            if let Some(s) = scan_reply(&buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            {
                buf.truncate(s.len);
                return Ok(Some(buf));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(None);
            }
        }
    };
    timeout(deadline, exchange).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no reply within {deadline:?}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::wire::resp::parse_command;

    /// A server that first sends `before`, then answers RESET, AUTH and ECHO as `answer`
    /// says, then sends `after`; and the portal's side of the connection.
    async fn scripted(
        before: &'static [u8],
        answer: fn(&[Vec<u8>]) -> Vec<u8>,
        after: &'static [u8],
    ) -> ServerStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(before).await.unwrap();
            let mut buf = Vec::new();
            let mut cmd = crate::wire::resp::Command::default();
            let mut pos = 0;
            let mut echoed = false;
            while !echoed && s.read_buf(&mut buf).await.unwrap_or(0) > 0 {
                while parse_command(&buf[pos..], &mut cmd).unwrap() {
                    let args: Vec<Vec<u8>> = (0..cmd.args.len())
                        .map(|i| cmd.arg(&buf[pos..], i).unwrap().to_vec())
                        .collect();
                    pos += cmd.len;
                    echoed |= args[0] == b"ECHO";
                    s.write_all(&answer(&args)).await.unwrap();
                }
            }
            s.write_all(after).await.unwrap();
            // Held open until the portal's side closes.
            let _ = s.read(&mut [0u8; 16]).await;
        });
        MaybeTls::Plain(TcpStream::connect(addr).await.unwrap())
    }

    fn redis(args: &[Vec<u8>]) -> Vec<u8> {
        match args[0].as_slice() {
            b"RESET" => b"+RESET\r\n".to_vec(),
            b"AUTH" => b"+OK\r\n".to_vec(),
            _ => {
                let mut r = format!("${}\r\n", args[1].len()).into_bytes();
                r.extend_from_slice(&args[1]);
                r.extend_from_slice(b"\r\n");
                r
            }
        }
    }

    fn creds() -> Option<ProbeCredentials> {
        Some(ProbeCredentials {
            username: None,
            password: "pw".into(),
        })
    }

    async fn cleaned(stream: &mut ServerStream, unread: &[u8]) -> io::Result<()> {
        timeout(
            Duration::from_secs(5),
            clean(stream, &creds(), unread.to_vec()),
        )
        .await
        .expect("cleaned within 5 s")
    }

    #[tokio::test]
    async fn what_arrives_before_reset_answers_is_dropped() {
        // A message and a push that arrived after the client's last reply, the end of a
        // message read in part, then the answers.
        let mut s = scripted(
            b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n>2\r\n$10\r\ninvalidate\r\n*0\r\n",
            redis,
            b"",
        )
        .await;
        cleaned(&mut s, b"").await.unwrap();
        let mut s = scripted(b"$2\r\nhi\r\n", redis, b"").await;
        cleaned(&mut s, b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n")
            .await
            .unwrap();
        // Nothing is left to read: the next client's first reply is its own.
        let mut rest = [0u8; 64];
        let left = timeout(Duration::from_millis(200), s.read(&mut rest)).await;
        assert!(left.is_err(), "{left:?}");
    }

    #[tokio::test]
    async fn a_connection_that_does_not_come_out_clean_is_refused() {
        // RESET refused, the login refused, a reply after the ECHO's: each is not clean.
        let mut s = scripted(
            b"",
            |a| match a[0].as_slice() {
                b"RESET" => b"-ERR unknown command 'RESET'\r\n".to_vec(),
                _ => redis(a),
            },
            b"",
        )
        .await;
        assert!(cleaned(&mut s, b"").await.is_err());
        let mut s = scripted(
            b"",
            |a| match a[0].as_slice() {
                b"AUTH" => b"-WRONGPASS invalid username-password pair\r\n".to_vec(),
                _ => redis(a),
            },
            b"",
        )
        .await;
        assert!(cleaned(&mut s, b"").await.is_err());
        // The stray reply comes in the same write as the ECHO's answer.
        let mut s = scripted(
            b"",
            |a| {
                let mut r = redis(a);
                if a[0] == b"ECHO" {
                    r.extend_from_slice(b"+STRAY\r\n");
                }
                r
            },
            b"",
        )
        .await;
        assert!(cleaned(&mut s, b"").await.is_err());
        // An answer that is not RESP.
        let mut s = scripted(b"hello\r\n", redis, b"").await;
        assert!(cleaned(&mut s, b"").await.is_err());
    }
}
