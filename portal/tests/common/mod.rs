//! Shared helpers for the portal's integration tests: the portal in-process on port 0, the
//! portal binary, a real redis-server, plain TCP echo / silent / blackhole servers, clients bound
//! to chosen loopback addresses, and a tiny HTTP GET for the admin endpoint.
//!
//! Everything listens on loopback ports chosen by the kernel, works in private temporary
//! directories, and stops what it started by PID or by dropping its task.
#![allow(dead_code)]

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use portal::{config::Config, health::HealthView, reload::ReloadStatus};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{oneshot, watch},
    task::JoinHandle,
};

/// Generous bound for one network step of a test (a loaded 2-core machine is slow).
pub const STEP: Duration = Duration::from_secs(15);

/// Awaits `f` within [`STEP`] or panics naming `what`.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {STEP:?}"))
}

/// Polls `check` every 20 ms until it is true, for at most `limit`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dbportal-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `name` atomically (temporary file, then rename) and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port that was free a moment ago (prefer binding port 0 where the code allows it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed by its PID when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends `signal` (TERM, INT, HUP, KILL) to this process, by PID.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status();
    }

    /// Waits for the exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A real `redis-server` on a free loopback port, without persistence, in a private directory.
#[derive(Debug)]
pub struct RedisServer {
    pub addr: SocketAddr,
    _dir: TempDir,
    _proc: Proc,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let dir = TempDir::new("redis");
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (Debian package redis-server)");
            let mut proc = Proc(child);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if proc.0.try_wait().unwrap().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    if redis_cmd(&mut s, &["PING"])
                        .await
                        .is_ok_and(|r| r == "+PONG")
                    {
                        return RedisServer {
                            addr,
                            _dir: dir,
                            _proc: proc,
                        };
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            proc.signal("KILL");
        }
        panic!("redis-server did not start");
    }
}

/// Sends one command in RESP and returns the reply's first line (`+OK`, `$3` followed by the
/// value as `$3 bar`, `:1`, `-ERR ...`).
pub async fn redis_cmd(stream: &mut TcpStream, args: &[&str]) -> std::io::Result<String> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(req.as_bytes()).await?;
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

/// `GET path` over HTTP/1.0: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    within("admin GET", async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        (status, body)
    })
    .await
}

/// The value of the Prometheus sample `name_and_labels` (as written, e.g.
/// `dbportal_rejections_total{reason="limit"}`) in `/metrics` text.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A plaintext portal configuration for `engine` in front of `backends` (name, address) on
/// loopback port 0, with `extra` YAML appended (and `drainTimeout: 1s` unless it sets one).
pub fn yaml(engine: &str, backends: &[(&str, SocketAddr)], extra: &str) -> String {
    let mut y = format!("engine: {engine}\nport: 7000\ntls: {{mode: disabled}}\nlisten: \"127.0.0.1:0\"\nadmin: \"127.0.0.1:0\"\nbackends:\n");
    for (name, addr) in backends {
        y.push_str(&format!("  - {{name: {name}, address: \"{addr}\"}}\n"));
    }
    y.push_str(extra);
    y.push('\n');
    if !extra.contains("drainTimeout") {
        // Tests stop portals with sessions still open; do not wait the default 30 s.
        y.push_str("drainTimeout: 1s\n");
    }
    y
}

pub fn config(yaml: &str) -> Config {
    portal::reload::parse_standalone(yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"))
}

/// The portal in-process, on loopback port 0, with a health view the test controls.
#[derive(Debug)]
pub struct Portal {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config: watch::Sender<Arc<Config>>,
    pub health: watch::Sender<HealthView>,
    pub reload: ReloadStatus,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Portal {
    /// Starts with `yaml`; every backend is reported up.
    pub async fn start(yaml: &str) -> Portal {
        let config = config(yaml);
        let view = HealthView::assume_up(config.backends.iter().map(|b| b.name.as_str()));
        let (health, health_rx) = watch::channel(view);
        Self::start_with(config, health, health_rx).await
    }

    /// Starts with `config` and a health view from `health_rx` (e.g. the real checker's).
    pub async fn start_with(
        config: Config,
        health: watch::Sender<HealthView>,
        health_rx: watch::Receiver<HealthView>,
    ) -> Portal {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = watch::channel(Arc::new(config));
        let reload = ReloadStatus::loaded("test");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(portal::server::run(
            listener,
            admin,
            rx,
            health_rx,
            reload.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        Portal {
            addr,
            admin: admin_addr,
            config: tx,
            health,
            reload,
            shutdown: Some(stop),
            task: Some(task),
        }
    }

    /// Applies `yaml` as a reload would (refused if invalid); returns whether it was applied.
    pub fn reload(&self, yaml: &str) -> bool {
        portal::reload::apply(yaml, "test", &self.config, &self.reload)
    }

    /// Follows `path` like the standalone portal (poll + SIGHUP), starting from `text`.
    pub fn watch_file(&self, path: PathBuf, text: String) -> JoinHandle<()> {
        tokio::spawn(portal::reload::watch_file(
            path,
            text,
            self.config.clone(),
            self.reload.clone(),
        ))
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").await.1
    }

    pub async fn status(&self) -> serde_json::Value {
        serde_json::from_str(&http_get(self.admin, "/status").await.1).unwrap()
    }

    /// Shuts down (drain per the configuration) and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            within("portal shutdown", t).await.unwrap();
        }
    }
}

impl Drop for Portal {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The built `portal` binary with `--config path`; its stderr is scanned for the
/// "portal listening" line to learn its ports.
#[derive(Debug)]
pub struct PortalProcess {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl PortalProcess {
    pub fn spawn(config: &Path) -> PortalProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portal"));
        cmd.arg("--config").arg(config);
        Self::spawn_command(cmd)
    }

    /// The built `portal` binary as `cmd` sets it up (arguments, environment), logging at info.
    pub fn spawn_command(mut cmd: Command) -> PortalProcess {
        let child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut proc = Proc(child);
        let stdout = proc.0.stdout.take().unwrap();
        let stderr = proc.0.stderr.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let log = log.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let plain = strip_ansi(&line);
                    if plain.contains("portal listening") {
                        let _ = tx.send(plain.clone());
                    }
                    log.lock().unwrap().push(plain);
                }
            });
        }
        let line = rx
            .recv_timeout(STEP)
            .unwrap_or_else(|_| panic!("the portal did not start: {:?}", log.lock().unwrap()));
        // A text line (`listen=127.0.0.1:1`) or a JSON one (`"listen":"127.0.0.1:1"`).
        let field = |key: &str| -> SocketAddr {
            let (start, end) = match line.find(&format!("{key}=")) {
                Some(i) => (i + key.len() + 1, [' '].as_slice()),
                None => (
                    line.find(&format!("\"{key}\":\"")).unwrap() + key.len() + 4,
                    ['"'].as_slice(),
                ),
            };
            line[start..].split(end).next().unwrap().parse().unwrap()
        };
        PortalProcess {
            addr: field("listen"),
            admin: field("admin"),
            proc,
            log,
        }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
