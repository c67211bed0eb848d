//! Operating a portal the way HAProxy users do: per-backend weights, backups, connection caps
//! with a queue, runtime drain/maint/weight through the admin endpoint (behind its token), the
//! stats page in a real browser, and the access log. Real redis-server backends on loopback.

#[path = "../common/mod.rs"]
mod common;

mod balancing;
mod reporting;
mod runtime;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const TOKEN: &str = "s3cret-token-0123456789";

/// Opens a session and checks that a real Redis answers through it.
async fn session(portal: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(portal).await.unwrap();
    assert_eq!(redis_cmd(&mut s, &["PING"]).await.unwrap(), "+PONG");
    s
}

/// Sessions each backend has taken so far (from `/status`).
async fn totals(portal: &Portal) -> HashMap<String, u64> {
    let status = portal.status().await;
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["sessionsTotal"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn backend<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap()
}

async fn redis_backends(n: usize) -> Vec<RedisServer> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(RedisServer::start().await);
    }
    v
}

/// `backends:` lines for `servers` named b0, b1, ... with `extra[i]` appended to each.
fn backends_yaml(mode: &str, servers: &[RedisServer], extra: &[&str], more: &str) -> String {
    let mut y = format!("engine: redis\nport: 7000\ntls: {{mode: disabled}}\nlisten: \"127.0.0.1:0\"\nadmin: \"127.0.0.1:0\"\ndrainTimeout: 1s\nrouting: {{mode: {mode}}}\nbackends:\n");
    for (i, s) in servers.iter().enumerate() {
        y.push_str(&format!(
            "  - {{name: b{i}, address: \"{}\"{}}}\n",
            s.addr,
            extra.get(i).copied().unwrap_or("")
        ));
    }
    y.push_str(more);
    y.push('\n');
    y
}
