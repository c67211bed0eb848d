//! A tiny fake Redis speaking just enough RESP for the health probes: its role, a `loading`
//! state, a forbidden `ROLE`, silence and refusal are switched by the test.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

/// How the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fake {
    Master,
    Replica,
    /// KeyDB active-active.
    ActiveReplica,
    /// Still loading its data set: `-LOADING` to PING.
    Loading,
    /// Master, but `ROLE` is refused by ACL: the probe must fall back to INFO replication.
    RoleForbidden,
    /// Accepts connections, never answers.
    Silent,
}

/// A fake Redis on a loopback port. Dropping it closes its listener (connections refused).
pub struct FakeRedis {
    pub port: u16,
    pub mode: Arc<Mutex<Fake>>,
    /// Arguments of every AUTH received.
    pub auths: Arc<Mutex<Vec<Vec<String>>>>,
    task: Option<JoinHandle<()>>,
}

impl FakeRedis {
    pub async fn start(mode: Fake) -> FakeRedis {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(mode));
        let auths = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(serve(listener, mode.clone(), auths.clone()));
        FakeRedis {
            port,
            mode,
            auths,
            task: Some(task),
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn set(&self, mode: Fake) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Closes the listener: connections are refused from now on.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(listener: TcpListener, mode: Arc<Mutex<Fake>>, auths: Arc<Mutex<Vec<Vec<String>>>>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mode = mode.clone();
        let auths = auths.clone();
        conns.spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let Ok(n) = stream.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some((args, used)) = parse_command(&buf) {
                    buf.drain(..used);
                    let m = *mode.lock().unwrap();
                    if m == Fake::Silent {
                        continue;
                    }
                    let reply = reply(m, &args, &auths);
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

fn reply(mode: Fake, args: &[String], auths: &Mutex<Vec<Vec<String>>>) -> String {
    let command = args
        .first()
        .map(|c| c.to_ascii_uppercase())
        .unwrap_or_default();
    let role = match mode {
        Fake::Replica => "slave",
        Fake::ActiveReplica => "active-replica",
        _ => "master",
    };
    match command.as_str() {
        "AUTH" => {
            auths.lock().unwrap().push(args[1..].to_vec());
            "+OK\r\n".into()
        }
        "PING" if mode == Fake::Loading => {
            "-LOADING Redis is loading the dataset in memory\r\n".into()
        }
        "PING" => "+PONG\r\n".into(),
        "ROLE" if mode == Fake::RoleForbidden => {
            "-NOPERM this user has no permissions to run the 'role' command\r\n".into()
        }
        "ROLE" if mode == Fake::Replica => {
            "*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:100\r\n".into()
        }
        "ROLE" => format!("*3\r\n${}\r\n{role}\r\n:0\r\n*0\r\n", role.len()),
        "INFO" => {
            let body = format!("# Replication\r\nrole:{role}\r\nconnected_slaves:0\r\n");
            format!("${}\r\n{body}\r\n", body.len())
        }
        _ => "+OK\r\n".into(),
    }
}

/// One command (an array of bulk strings, or an inline line) and the bytes it used.
fn parse_command(buf: &[u8]) -> Option<(Vec<String>, usize)> {
    let line_end = |from: usize| {
        buf[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    };
    if buf.first() != Some(&b'*') {
        let end = line_end(0)?;
        let line = String::from_utf8_lossy(&buf[..end]);
        return Some((line.split_whitespace().map(String::from).collect(), end + 2));
    }
    let end = line_end(0)?;
    let count: usize = std::str::from_utf8(&buf[1..end]).ok()?.parse().ok()?;
    let mut at = end + 2;
    let mut args = Vec::new();
    for _ in 0..count {
        let end = line_end(at)?;
        let len: usize = std::str::from_utf8(&buf[at + 1..end]).ok()?.parse().ok()?;
        let start = end + 2;
        if buf.len() < start + len + 2 {
            return None;
        }
        args.push(String::from_utf8_lossy(&buf[start..start + len]).into_owned());
        at = start + len + 2;
    }
    Some((args, at))
}
