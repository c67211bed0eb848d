//! The read-only listener (`readOnly`): what its sessions run by, and its refusal.
//!
//! Its sessions go through the same intake, admission and planes as the main listener's, on a
//! [`Shared`] of their own ([`for_reads`]): the same admission state (limits count both
//! listeners), TLS runtime, checker and kill switch; a registry and pools of their own; and two
//! channels that follow the main ones — each configuration's [`Config::for_reads`] (readOnly's
//! routing) and each health view's [`route::read_only_view`] (only the replicas that qualify are
//! up, or the leader as the fallback; recomputed on administrative state changes too). The planes need not know they serve reads.
//!
//! When nothing may take reads (no replica qualifies and `fallbackToLeader` is off, or the
//! listener was turned off by a reload), a new client is refused in its engine's own words
//! ([`refusal`], [`answer`]): PostgreSQL ErrorResponse 57P03, Redis `-LOADING`, a MySQL error
//! packet, etcd HTTP 503 or an HTTP/2 GOAWAY. Never a silent close.
//!
//! May import: `config`, `health`, `route`, `wire` and the session's [`Shared`].

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
    time::timeout,
};

use super::Shared;
use crate::{
    config::{Config, Engine},
    health::HealthView,
    route,
    wire::postgres,
};

/// The configuration the read-only listener serves by, under the main configuration `main`.
/// A reload that removes `readOnly` keeps the listener (its port is bound at start) but
/// without `read_only`, so that new clients are refused.
fn derive(main: &Config) -> Config {
    main.for_reads().unwrap_or_else(|| Config {
        serves_reads: true,
        read_only: None,
        ..main.clone()
    })
}

/// What the read-only listener's sessions share, following `main`'s configuration and health
/// channels until the returned value's channels are all dropped or `main`'s senders close.
pub fn for_reads(main: &Shared) -> Shared {
    let first = derive(&main.config.borrow());
    let mut control = main.state.control.subscribe();
    let first_view =
        route::read_only_view(&first, &main.health.borrow(), &control.borrow_and_update());
    let (config_tx, config) = watch::channel(Arc::new(first));
    let (health_tx, health) = watch::channel(first_view);
    let mut main_config = main.config.clone();
    let mut main_health = main.health.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = main_config.changed() => if r.is_err() { break },
                r = main_health.changed() => if r.is_err() { break },
                r = control.changed() => if r.is_err() { break },
                _ = config_tx.closed() => break,
            }
            let c = derive(&main_config.borrow_and_update());
            let overrides = control.borrow_and_update().clone();
            let v = route::read_only_view(&c, &main_health.borrow_and_update(), &overrides);
            config_tx.send_if_modified(|old| {
                let changed = **old != c;
                if changed {
                    *old = Arc::new(c);
                }
                changed
            });
            health_tx.send_if_modified(|old| {
                let changed = *old != v;
                if changed {
                    *old = v;
                }
                changed
            });
        }
    });
    Shared {
        state: main.state.clone(),
        sessions: Arc::default(),
        config,
        health,
        checker: main.checker.clone(),
        kill: main.kill.clone(),
        tls: main.tls.clone(),
        mux: Arc::default(),
        pg: Arc::default(),
        reads: None,
    }
}

/// Why a new client of the read-only listener must be refused now, if it must: the listener
/// is off, or no backend may take its reads and `fallbackToLeader` is off.
pub fn refusal(config: &Config, shared: &Shared) -> Option<&'static str> {
    if !config.serves_reads {
        return None;
    }
    let Some(ro) = &config.read_only else {
        return Some("the read-only listener is turned off (readOnly)");
    };
    let view: HealthView = shared.health.borrow().clone();
    let overrides = shared.state.control.current();
    if ro.fallback_to_leader || !route::eligible(config, &view, &overrides).is_empty() {
        return None;
    }
    Some("no replica is within readOnly.maxLag, and readOnly.fallbackToLeader is off")
}

/// Most bytes read of what a refused client sends first.
const FIRST_BYTES: usize = 16 * 1024;

/// Answers a refused client of `engine` on `stream` (after TLS, where the engine's TLS comes
/// first) with the engine's own error saying `why`, within `deadline`, then closes.
pub async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    engine: Engine,
    mut stream: S,
    why: &str,
    deadline: Duration,
) {
    let _ = timeout(deadline, async {
        let reply = match engine {
            // MySQL: the server speaks first; an error in place of the greeting, as a server
            // with no room does (no SQL state before the handshake).
            Engine::Mysql => {
                let mut payload = vec![0xff];
                payload.extend_from_slice(&ER_UNKNOWN_ERROR.to_le_bytes());
                payload.extend_from_slice(why.as_bytes());
                let mut packet = (payload.len() as u32).to_le_bytes()[..3].to_vec();
                packet.push(0);
                packet.extend_from_slice(&payload);
                packet
            }
            Engine::Postgres => {
                let Some(code) = startup_code(&mut stream).await else {
                    return;
                };
                if code == CANCEL_REQUEST {
                    return;
                }
                postgres::error_response("FATAL", "57P03", why)
            }
            // Read what the client sends first, so that our answer is not lost in a reset
            // caused by its unread bytes.
            Engine::Redis => {
                first_bytes(&mut stream).await;
                format!("-LOADING {why}\r\n").into_bytes()
            }
            Engine::Etcd | Engine::Tcp => {
                let first = first_bytes(&mut stream).await;
                if first.starts_with(b"PRI * HTTP/2.0") {
                    http2_goaway(why)
                } else {
                    format!(
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{why}\n",
                        why.len() + 1
                    )
                    .into_bytes()
                }
            }
        };
        let _ = stream.write_all(&reply).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
        // What the client still sends (the rest of a request read in part) is read and
        // dropped until it closes: closing with unread bytes would reset the connection, and
        // the reset can take the answer with it before the client reads it.
        let mut rest = [0u8; 1024];
        while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// MySQL's ER_UNKNOWN_ERROR: the error a refused read-only client gets.
const ER_UNKNOWN_ERROR: u16 = 1105;
/// The code of a PostgreSQL CancelRequest: no answer is expected.
const CANCEL_REQUEST: u32 = 80_877_102;

/// Reads a PostgreSQL startup packet; its code (protocol version, or a request's).
async fn startup_code<S: AsyncRead + Unpin>(stream: &mut S) -> Option<u32> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await.ok()?;
    let (len, code) = postgres::startup_header(&header);
    let rest = (len as usize).checked_sub(8)?.min(FIRST_BYTES);
    let mut body = vec![0u8; rest];
    stream.read_exact(&mut body).await.ok()?;
    Some(code)
}

async fn first_bytes<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut buf = vec![0u8; FIRST_BYTES];
    let n = stream.read(&mut buf).await.unwrap_or(0);
    buf.truncate(n);
    buf
}

/// An HTTP/2 server preface (empty SETTINGS) and a GOAWAY (REFUSED_STREAM) whose debug data
/// says `why`.
fn http2_goaway(why: &str) -> Vec<u8> {
    let frame = |kind: u8, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, 0, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    };
    let mut goaway = vec![0, 0, 0, 0, 0, 0, 0, 7];
    goaway.extend_from_slice(why.as_bytes());
    let mut out = frame(4, &[]);
    out.extend(frame(7, &goaway));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answered(engine: Engine, client_sends: &[u8]) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(client_sends).await.unwrap();
        let refusing = tokio::spawn(answer(engine, server, "no replica", Duration::from_secs(5)));
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        client.shutdown().await.unwrap();
        refusing.await.unwrap();
        out
    }

    /// A request whose body comes after the portal answered its head: the client can still
    /// send it and read the answer (the portal reads what follows until the client closes,
    /// instead of closing on unread bytes, which resets the connection).
    #[tokio::test]
    async fn the_answer_outlives_the_rest_of_the_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client
            .write_all(b"POST /v3/maintenance/status HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        let refusing = tokio::spawn(answer(
            Engine::Etcd,
            server,
            "no replica",
            Duration::from_secs(5),
        ));
        // The body in two writes, after the answer: a socket closed with unread bytes resets
        // the connection at the first, and the second then fails.
        for part in [b"{", b"}"] {
            tokio::time::sleep(Duration::from_millis(150)).await;
            client
                .write_all(part)
                .await
                .expect("the body written, not refused by a reset");
        }
        let mut out = Vec::new();
        client
            .read_to_end(&mut out)
            .await
            .expect("the answer, not a reset");
        assert!(out.starts_with(b"HTTP/1.1 503 "), "{out:?}");
        drop(client);
        refusing.await.unwrap();
    }

    #[tokio::test]
    async fn each_engine_refuses_in_its_own_words() {
        let startup = postgres::startup_message(&[("user", "app")]);
        let pg = answered(Engine::Postgres, &startup).await;
        assert_eq!(pg[0], b'E');
        let fields = postgres::error_fields(&pg[5..]);
        assert!(fields.contains(&(b'C', "57P03".into())), "{fields:?}");
        assert!(fields.contains(&(b'M', "no replica".into())), "{fields:?}");

        let cancel = postgres::cancel_request(1, 2);
        assert!(answered(Engine::Postgres, &cancel).await.is_empty());

        let redis = answered(Engine::Redis, b"*1\r\n$4\r\nPING\r\n").await;
        assert_eq!(redis, b"-LOADING no replica\r\n");

        let my = answered(Engine::Mysql, b"").await;
        assert_eq!(&my[3..5], &[0, 0xff], "sequence 0, an ERR packet");
        assert_eq!(u16::from_le_bytes([my[5], my[6]]), ER_UNKNOWN_ERROR);
        assert!(my.ends_with(b"no replica"));

        let http1 = answered(Engine::Etcd, b"GET /health HTTP/1.1\r\n\r\n").await;
        assert!(http1.starts_with(b"HTTP/1.1 503 "), "{http1:?}");
        let h2 = answered(Engine::Etcd, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        assert_eq!(&h2[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0], "SETTINGS first");
        assert_eq!(h2[12], 7, "then GOAWAY");
        assert!(h2.ends_with(b"no replica"));
    }
}
