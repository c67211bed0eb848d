//! One server connection of multiplexing, opened: dialled (TLS when `tls.backend` is on) and
//! logged in with the probe credentials within `timeouts.connect`; and a command sent alone on
//! a connection opened for it.
//!
//! May import: `config`, `health`, `tls`, `wire` and the session's [`hub`](crate::session::hub).

use std::{io, sync::Arc, time::Duration};

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
