//! Plain network pieces run by the tests themselves: TCP echo / named / silent / capturing
//! servers, a blackhole that never answers a connect, clients bound to chosen loopback
//! addresses, RESP commands, and a real redis-server started from async code.
#![allow(dead_code)]

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};

use super::servers::Redis;

/// A real `redis-server` on a free loopback port (see [`Redis`]), started off the runtime.
#[derive(Debug)]
pub struct RedisServer {
    pub addr: SocketAddr,
    pub redis: Redis,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let redis = tokio::task::spawn_blocking(Redis::start).await.unwrap();
        RedisServer {
            addr: SocketAddr::from(([127, 0, 0, 1], redis.port)),
            redis,
        }
    }
}

/// One command in RESP, as a client sends it.
pub fn resp(args: &[&str]) -> Vec<u8> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    req.into_bytes()
}

/// Sends one command in RESP and returns the reply's first line (`+OK`, `$3` followed by the
/// value as `$3 bar`, `:1`, `-ERR ...`).
pub async fn redis_cmd(stream: &mut TcpStream, args: &[&str]) -> std::io::Result<String> {
    stream.write_all(&resp(args)).await?;
    let line = read_line(stream).await?;
    if let Some(len) = line.strip_prefix('$') {
        let len: i64 = len.parse().unwrap_or(-1);
        if len < 0 {
            return Ok(line);
        }
        let value = read_line(stream).await?;
        return Ok(format!("{line} {value}"));
    }
    Ok(line)
}

async fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' {
            if out.last() == Some(&b'\r') {
                out.pop();
            }
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        out.push(b);
    }
}

/// A TCP server run by the test: counts accepted connections; dropping it stops it.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    async fn spawn<F, Fut>(handle: F) -> TestServer
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handle(s));
            }
        });
        TestServer {
            addr,
            accepted,
            task,
        }
    }

    /// Echoes what it reads; after the client's FIN it finishes echoing and sends its own FIN.
    pub async fn echo() -> TestServer {
        Self::spawn(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    /// Writes `name` and a newline on connect, then echoes.
    pub async fn named(name: &'static str) -> TestServer {
        Self::spawn(move |mut s| async move {
            if s.write_all(format!("{name}\n").as_bytes()).await.is_ok() {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
        })
        .await
    }

    /// Reads and discards everything, never writes; closes after the client's FIN.
    pub async fn silent() -> TestServer {
        Self::spawn(|mut s| async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await
    }

    /// Sends every connection's first `n` bytes on `tx`, then echoes.
    pub async fn capture(n: usize, tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) -> TestServer {
        Self::spawn(move |mut s| {
            let tx = tx.clone();
            async move {
                let mut buf = vec![0u8; n];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = tx.send(buf);
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            }
        })
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener that never accepts and whose queue is full, so that a new connection attempt
/// gets no answer (loopback stand-in for an unreachable node).
#[derive(Debug)]
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        // Fill the accept queue until a connect no longer completes.
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                _ => break,
            }
        }
        Blackhole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// Connects to `to` from the loopback address `from` (127.0.0.2, 127.0.0.3, ...).
pub async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let ip: IpAddr = from.parse().unwrap();
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(to).await
}

/// Whether the peer closed `stream` (EOF or reset) within `limit`, reading and discarding any
/// bytes that arrive first.
pub async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Writes `msg` and reads back exactly as many bytes (through an echo server).
pub async fn echo_roundtrip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}
