//! Starting a portal for a test, from its YAML: [`PortalBuilder`] runs it in-process with a
//! health view the test controls ([`Portal`]), in-process as the standalone portal runs, its
//! file followed and the real health checker ([`Standalone`]), or as the built binary
//! ([`PortalProcess`]). Every handle knows its client and admin addresses: the listeners are
//! bound before the portal is told about them (port 0 in the YAML) or read from its log.
#![allow(dead_code)]

use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use portal::{config::Config, health::HealthView, reload::ReloadStatus};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};

use super::harness::{metrics, status, within, Proc, TempDir, STEP};

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

/// `yaml` parsed as the standalone portal parses its file; panics naming the error.
pub fn config(yaml: &str) -> Config {
    portal::reload::parse_standalone(yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"))
}

/// A portal to start from its YAML.
#[derive(Debug)]
pub struct PortalBuilder {
    yaml: String,
    file: Option<PathBuf>,
    dir: Option<TempDir>,
    args: Vec<OsString>,
    health: Option<(watch::Sender<HealthView>, watch::Receiver<HealthView>)>,
}

impl PortalBuilder {
    pub fn new(yaml: &str) -> PortalBuilder {
        PortalBuilder {
            yaml: yaml.to_string(),
            file: None,
            dir: None,
            args: Vec::new(),
            health: None,
        }
    }

    /// Writes the configuration to `path`, which the test may rewrite later, rather than into
    /// a private directory of the handle (file-based portals only).
    pub fn file(mut self, path: &Path) -> PortalBuilder {
        self.file = Some(path.to_path_buf());
        self
    }

    /// Writes the configuration as `portal.yaml` in `dir` (where the test keeps other files
    /// the configuration names), which the handle keeps until it is dropped.
    pub fn in_dir(mut self, dir: TempDir) -> PortalBuilder {
        self.dir = Some(dir);
        self
    }

    /// More command-line arguments for the binary (e.g. `--log-format json`).
    pub fn args<A: AsRef<std::ffi::OsStr>>(mut self, args: &[A]) -> PortalBuilder {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// The in-process portal's health view from `health_rx` (e.g. the real checker's), with
    /// `health` kept in the handle; without it every backend is reported up.
    pub fn health(
        mut self,
        health: watch::Sender<HealthView>,
        health_rx: watch::Receiver<HealthView>,
    ) -> PortalBuilder {
        self.health = Some((health, health_rx));
        self
    }

    /// The configuration file (the one given to [`file`](Self::file), else `portal.yaml` in
    /// the directory given to [`in_dir`](Self::in_dir) or in a new private one), written,
    /// and the directory to keep.
    fn write_file(&mut self, tag: &str) -> (PathBuf, Option<TempDir>) {
        let dir = match (&self.file, self.dir.take()) {
            (Some(_), dir) => dir,
            (None, dir) => Some(dir.unwrap_or_else(|| TempDir::new(tag))),
        };
        let path = match (&self.file, &dir) {
            (Some(path), _) => path.clone(),
            (None, dir) => dir.as_ref().unwrap().path().join("portal.yaml"),
        };
        std::fs::write(&path, &self.yaml).unwrap();
        (path, dir)
    }

    /// The serving loop in-process on loopback port 0, with the configuration and the health
    /// view in the test's hands.
    pub async fn start(self) -> Portal {
        let config = config(&self.yaml);
        let (health, health_rx) = self.health.unwrap_or_else(|| {
            watch::channel(HealthView::assume_up(
                config.backends.iter().map(|b| b.name.as_str()),
            ))
        });
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

    /// The standalone portal in-process: its configuration from a file it follows, the real
    /// health checker, listening where the file says (port 0 for a free one).
    pub async fn standalone(mut self) -> Standalone {
        let (path, dir) = self.write_file("portal");
        let started = portal::standalone::start(Some(path.clone()))
            .await
            .unwrap_or_else(|e| panic!("the portal did not start: {e}\n{}", self.yaml));
        let addr = started.listener.local_addr().unwrap();
        let admin = started.admin.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            portal::server::run(
                started.listener,
                started.admin,
                started.config,
                started.health,
                started.reload,
                async {
                    let _ = stopped.await;
                },
            )
            .await;
            drop(started.following);
        });
        Standalone {
            addr,
            admin,
            path,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// The built `portal` binary with `--config` on the file (and [`args`](Self::args)).
    pub fn spawn(mut self) -> PortalProcess {
        let (path, dir) = self.write_file("portal-bin");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portal"));
        cmd.arg("--config").arg(&path).args(&self.args);
        let mut p = PortalProcess::spawn_command(cmd);
        p.path = Some(path);
        p._dir = dir;
        p
    }
}

/// The portal's serving loop in-process, with a health view the test controls.
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
        PortalBuilder::new(yaml).start().await
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
        metrics(self.admin).await
    }

    pub async fn status(&self) -> serde_json::Value {
        status(self.admin).await
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

/// The standalone portal in-process (see [`PortalBuilder::standalone`]); dropping it stops it.
#[derive(Debug)]
pub struct Standalone {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The configuration file it follows.
    pub path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _dir: Option<TempDir>,
}

impl Standalone {
    /// The directory of its configuration file.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap()
    }

    pub async fn status(&self) -> serde_json::Value {
        status(self.admin).await
    }

    pub async fn metrics(&self) -> String {
        metrics(self.admin).await
    }

    /// Waits up to `limit` for `/status` to satisfy `ok`, and returns it.
    pub async fn wait_status(
        &self,
        what: &str,
        limit: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status().await;
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what} not seen: {s:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits up to 10 s for `/status` to name `name` the leader.
    pub async fn wait_leader(&self, name: &str) {
        self.wait_status(&format!("leader {name}"), Duration::from_secs(10), |s| {
            s["leader"] == name
        })
        .await;
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The built `portal` binary; its output is kept in `log` and scanned for the "portal
/// listening" line to learn its addresses. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct PortalProcess {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// The configuration file, when started from one by [`PortalBuilder::spawn`].
    pub path: Option<PathBuf>,
    _dir: Option<TempDir>,
}

impl PortalProcess {
    /// The binary with `--config path` (a file the test writes and rewrites itself).
    pub fn spawn(config: &Path) -> PortalProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portal"));
        cmd.arg("--config").arg(config);
        Self::spawn_command(cmd)
    }

    /// The binary as `cmd` sets it up (arguments, environment), logging at info.
    pub fn spawn_command(mut cmd: Command) -> PortalProcess {
        let child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut proc = Proc::adopt(child, "KILL");
        let stdout = proc.child().stdout.take().unwrap();
        let stderr = proc.child().stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
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
            path: None,
            _dir: None,
        }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub async fn status(&self) -> serde_json::Value {
        status(self.admin).await
    }

    pub async fn metrics(&self) -> String {
        metrics(self.admin).await
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
