//! The ground every integration test stands on: private temporary directories, loopback ports,
//! child processes stopped by PID, polling, the real command-line clients (psql, redis-cli, ...)
//! run against an address, and HTTP requests to an admin endpoint.
//!
//! It depends on std and tokio alone, so that the files included by path elsewhere (the TLS test
//! CA in the library's unit tests, the database servers in the operator's tests and the
//! benchmarks) can include it too.
#![allow(dead_code)]

use std::{
    ffi::OsStr,
    future::Future,
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
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

/// Polls `ready` every 50 ms, blocking, until it holds or `within` passes.
pub fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} not ready within {within:?}");
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

/// Rewrites the file a standalone portal follows (beside it, then renamed over it, so that
/// the portal never reads half of it).
pub fn rewrite_config(path: &Path, edit: impl FnOnce(String) -> String) {
    let text = edit(std::fs::read_to_string(path).unwrap());
    let tmp = path.with_extension("yaml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A loopback port that was free a moment ago, for what must be told its port before it
/// starts (a server's command line, a portal's peers); bind port 0 wherever the code allows.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `program` can be run (tests skip a server that is not installed).
pub fn installed(program: &str) -> bool {
    Path::new(program).exists()
        || std::env::var_os("PATH").is_some_and(|paths| {
            std::env::split_paths(&paths).any(|dir| dir.join(program).exists())
        })
}

/// Whether a test must skip because one of `programs` is not installed (and says which).
pub fn skip_without(programs: &[&str]) -> bool {
    let missing: Vec<_> = programs.iter().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("skipped: {missing:?} not installed");
        return true;
    }
    false
}

/// A child process, stopped by its PID when dropped: its stop signal first, SIGKILL after 5 s.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    stop_signal: &'static str,
}

impl Proc {
    /// Starts `command` (no stdin; its output discarded unless `DBPORTAL_TEST_SERVER_LOGS` is
    /// set) to be stopped with `signal` (TERM, INT, KILL).
    pub fn spawn(mut command: Command, signal: &'static str) -> Proc {
        command.stdin(Stdio::null());
        if std::env::var_os("DBPORTAL_TEST_SERVER_LOGS").is_none() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        Proc::adopt(child, signal)
    }

    /// Takes charge of a child started elsewhere (e.g. with its output piped).
    pub fn adopt(child: Child, signal: &'static str) -> Proc {
        Proc {
            child: Some(child),
            stop_signal: signal,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The child, to take its pipes.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("a process not stopped yet")
    }

    /// Sends `signal` (TERM, INT, HUP, KILL) to the process, by PID.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// Whether it has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits for the exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends the stop signal and waits for the end (SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(self.stop_signal);
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            self.kill();
        }
        self.child = None;
    }

    /// SIGKILL at once, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a client program did: (success, stdout, stderr), both trimmed.
pub type Outcome = (bool, String, String);

/// Runs a client program with `args` and `env` to its end (at most 30 s, through `timeout`).
pub fn run_blocking<A: AsRef<OsStr>>(program: &str, args: &[A], env: &[(&str, &str)]) -> Outcome {
    let mut cmd = Command::new("timeout");
    cmd.arg("30").arg(program).args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// [`run_blocking`] off the async runtime.
pub async fn run<A: AsRef<OsStr>>(program: &str, args: &[A], env: &[(&str, &str)]) -> Outcome {
    let program = program.to_string();
    let args: Vec<_> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_blocking(&program, &args, &env)
    })
    .await
    .unwrap()
}

/// psql as a user on database `postgres` at a loopback port; see [`psql`].
#[derive(Debug, Clone)]
pub struct Psql {
    conninfo: String,
    env: Vec<(String, String)>,
}

/// psql as `user` with `password` on database `postgres` at loopback `port`; more connection
/// settings with [`Psql::conninfo`], libpq variables with [`Psql::env`], then
/// [`Psql::run`] with its arguments (e.g. `-XAtq -c SQL`).
pub fn psql(port: u16, user: &str, password: &str) -> Psql {
    Psql {
        conninfo: format!("host=127.0.0.1 port={port} user={user} dbname=postgres"),
        env: vec![("PGPASSWORD".into(), password.into())],
    }
}

impl Psql {
    /// More libpq `key=value` settings (e.g. `sslmode=verify-full sslrootcert=...`); a later
    /// setting wins over an earlier one.
    pub fn conninfo(mut self, more: &str) -> Psql {
        self.conninfo.push(' ');
        self.conninfo.push_str(more);
        self
    }

    /// A libpq environment variable (PGTZ, PGOPTIONS, PGAPPNAME, ...).
    pub fn env(mut self, key: &str, value: &str) -> Psql {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs psql with `args` after the connection string, blocking.
    pub fn run_blocking(&self, args: &[&str]) -> Outcome {
        let mut all = vec![self.conninfo.as_str()];
        all.extend_from_slice(args);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        run_blocking("psql", &all, &env)
    }

    /// [`run_blocking`](Self::run_blocking) off the async runtime.
    pub async fn run(&self, args: &[&str]) -> Outcome {
        let (psql, args) = (self.clone(), args.iter().map(|a| a.to_string()));
        let args: Vec<String> = args.collect();
        tokio::task::spawn_blocking(move || {
            psql.run_blocking(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    }
}

fn redis_cli_args(port: u16, args: &[&str]) -> Vec<String> {
    let port = port.to_string();
    ["-h", "127.0.0.1", "-p", &port]
        .iter()
        .chain(args)
        .map(|a| a.to_string())
        .collect()
}

/// Runs redis-cli against loopback `port` with `args` (options such as `--tls --cacert ca`,
/// then the command), blocking.
pub fn redis_cli_blocking(port: u16, args: &[&str]) -> Outcome {
    run_blocking("redis-cli", &redis_cli_args(port, args), &[])
}

/// Runs redis-cli against loopback `port` with `args` (options such as `--tls --cacert ca`,
/// then the command).
pub async fn redis_cli(port: u16, args: &[&str]) -> Outcome {
    run("redis-cli", &redis_cli_args(port, args), &[]).await
}

/// One HTTP/1.0 request, blocking: `method path` to `addr` with the bearer `token` if any and
/// the JSON `body` (a GET without one has no body headers). The status code and the body.
pub fn http_blocking(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, STEP)?;
    s.set_read_timeout(Some(STEP))?;
    s.set_write_timeout(Some(STEP))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = if method == "GET" && body.is_empty() {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}{content}\r\n{body}"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, body.to_string()))
}

/// A request to the admin endpoint at `addr` (see [`http_blocking`]); panics when it does not
/// answer within [`STEP`].
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let (method, path) = (method.to_string(), path.to_string());
    let (token, body) = (token.map(str::to_string), body.to_string());
    tokio::task::spawn_blocking(move || {
        http_blocking(addr, &method, &path, token.as_deref(), &body)
            .unwrap_or_else(|e| panic!("admin {method} {path} on {addr}: {e}"))
    })
    .await
    .unwrap()
}

/// `GET path` on the admin endpoint: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, None, "").await
}

/// The admin endpoint's `/status`, parsed.
pub async fn status(admin: SocketAddr) -> serde_json::Value {
    let (_, body) = http_get(admin, "/status").await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The value of `name_and_labels` in `/metrics` text; panics when it is not there.
pub fn sample(text: &str, name_and_labels: &str) -> f64 {
    metric(text, name_and_labels)
        .unwrap_or_else(|| panic!("{name_and_labels} not in /metrics:\n{text}"))
}

/// The admin endpoint's `/metrics` text.
pub async fn metrics(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await.1
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
