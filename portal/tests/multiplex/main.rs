//! Redis multiplexing (`pooling.mode: multiplex`) through the standalone portal in front of
//! real redis-server processes on loopback, with real clients: redis-cli, redis-benchmark and
//! redis-py (Debian's python3-redis) compared with the same calls made direct; thousands of
//! clients on four server connections; a slow consumer; a malformed client; failover with idle
//! and busy clients; AUTH with ACL users; SCRIPT KILL, FUNCTION KILL and SHUTDOWN NOSAVE
//! reaching a server busy with a script on a shared connection; and what Redis' own test
//! suite found out of step, each compared with direct.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod busy;
mod clients;
mod desync;
mod failover;
mod state;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The standalone portal in front of `backends` (r0, r1, ...) with `extra` YAML (`$DIR` in it
/// names a private directory), room for thousands of clients and a fast health check unless
/// `extra` sets one.
async fn start_portal(backends: &[&Redis], extra: &str) -> Standalone {
    let dir = TempDir::new("mux-portal");
    let mut yaml = "engine: redis\nlisten: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntls: {mode: disabled}\nlimits: {maxConnections: 12000, maxNegotiating: 12000, maxNegotiatingPerClient: 0}\nbackends:\n".to_string();
    if !extra.contains("healthCheck:") {
        yaml.insert_str(0, "healthCheck: {interval: 200ms, rise: 1, fall: 1}\n");
    }
    for (i, b) in backends.iter().enumerate() {
        yaml.push_str(&format!(
            "  - {{name: r{i}, address: \"{}\"}}\n",
            b.address()
        ));
    }
    yaml.push_str(&extra.replace("$DIR", &dir.path().display().to_string()));
    PortalBuilder::new(&yaml).in_dir(dir).standalone().await
}

/// Reads until `n` complete replies are in (simple parser for the tests' replies).
async fn replies(s: &mut TcpStream, n: usize) -> std::io::Result<Vec<String>> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut out = Vec::new();
        let mut pos = 0;
        while out.len() < n {
            match portal::wire::resp::scan_reply(&buf[pos..]) {
                Ok(Some(r)) => {
                    out.push(
                        String::from_utf8_lossy(&buf[pos..pos + r.len])
                            .trim_end()
                            .to_string(),
                    );
                    pos += r.len;
                }
                _ => break,
            }
        }
        if out.len() == n {
            return Ok(out);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = vec![0u8; 65536];
        let read = tokio::time::timeout(left, s.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
        if read == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {}", String::from_utf8_lossy(&buf)),
            ));
        }
        buf.extend_from_slice(&chunk[..read]);
    }
}

async fn command(s: &mut TcpStream, args: &[&str]) -> std::io::Result<String> {
    s.write_all(&resp(args)).await?;
    Ok(replies(s, 1).await?.remove(0))
}

/// The server's clients other than the one asking (CLIENT LIST through redis-cli).
fn server_clients(redis: &Redis) -> Vec<String> {
    redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .map(str::to_string)
        .collect()
}

fn python() -> Option<PathBuf> {
    let ok = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import redis"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: /usr/bin/python3 with python3-redis not installed");
    }
    ok.then(|| PathBuf::from("/usr/bin/python3"))
}

fn script() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/multiplex/client.py").to_string()
}

const MUX: &str = "pooling: {mode: multiplex, serverConnections: 4}\n";
