//! What the floors share (`src/main.rs` on tokio, `src/bin/floor-loop.rs` on one mio event
//! loop, `src/bin/floor-exec.rs` on an executor of its own): the message framing, the
//! greeting a client gets, and a blocking login to the server (done before the floor serves,
//! so it is not counted).
//!
//! The framing is written here rather than taken from the portal's `wire` module: the floors
//! depend on nothing of the portal, so that they count a runtime and an idle list alone and
//! build in seconds.

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use bytes::BytesMut;
use postgres_protocol::{
    authentication::sasl::{ChannelBinding, ScramSha256},
    message::frontend,
};

/// The length of the message at the start of `buf` (tag included), once all of it is there.
pub fn complete(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    let n = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize + 1;
    (buf.len() >= n).then_some(n)
}

/// The end of the reply in `buf` from `from` on: just past the ReadyForQuery that says no
/// transaction is open, if it is there; else where to look from next time.
pub fn reply_end(buf: &[u8], mut from: usize) -> Result<usize, usize> {
    while let Some(m) = complete(&buf[from..]) {
        from += m;
        if buf[from - m] == b'Z' && buf[from - 1] == b'I' {
            return Ok(from);
        }
    }
    Err(from)
}

pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// What a client gets after its startup packet: AuthenticationOk, a few parameters, a key
/// and ReadyForQuery.
pub fn greeting() -> Vec<u8> {
    let mut out = message(b'R', &0u32.to_be_bytes());
    for (name, value) in [
        ("server_version", "15"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        out.extend(message(b'S', format!("{name}\0{value}\0").as_bytes()));
    }
    out.extend(message(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    out.extend(message(b'Z', b"I"));
    out
}

/// A server connection to 127.0.0.1:`port` as user and database `bench`, logged in with
/// SCRAM-SHA-256 (blocking).
pub fn login(port: u16, password: &str) -> std::io::Result<TcpStream> {
    let invalid = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    let mut out = BytesMut::new();
    frontend::startup_message([("user", "bench"), ("database", "bench")], &mut out)?;
    stream.write_all(&out)?;
    let (mut buf, mut scram) = (Vec::new(), None);
    loop {
        let n = loop {
            if let Some(n) = complete(&buf) {
                break n;
            }
            let mut chunk = [0; 4096];
            match stream.read(&mut chunk)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                k => buf.extend_from_slice(&chunk[..k]),
            }
        };
        let m: Vec<u8> = buf.drain(..n).collect();
        let body = &m[5..];
        match m[0] {
            b'R' => {
                let mut out = BytesMut::new();
                match u32::from_be_bytes([body[0], body[1], body[2], body[3]]) {
                    0 => {}
                    10 => {
                        let s =
                            ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| invalid(&"SASL out of order"))?;
                        s.update(&body[4..])?;
                        frontend::sasl_response(s.message(), &mut out)?;
                    }
                    12 => scram
                        .as_mut()
                        .ok_or_else(|| invalid(&"SASL out of order"))?
                        .finish(&body[4..])?,
                    other => return Err(invalid(&format!("authentication method {other}"))),
                }
                stream.write_all(&out)?;
            }
            b'E' => return Err(invalid(&String::from_utf8_lossy(body))),
            b'Z' if buf.is_empty() => return Ok(stream),
            _ => {}
        }
    }
}

/// The arguments the floors take: (listen port, server port, password, pool size).
pub fn args() -> (u16, u16, String, usize) {
    let args: Vec<String> = std::env::args().collect();
    let parsed = match &args[..] {
        [_, listen, server, password, size] => listen
            .parse()
            .ok()
            .zip(server.parse().ok())
            .zip(size.parse().ok())
            .map(|((l, s), n)| (l, s, password.clone(), n)),
        _ => None,
    };
    parsed.unwrap_or_else(|| {
        eprintln!(
            "usage: {} LISTEN_PORT SERVER_PORT PASSWORD POOL_SIZE",
            args[0]
        );
        std::process::exit(2)
    })
}
