//! A burst of connections from one address to a portal with no `limits` block: 2,000 clients
//! of one address open their connections at once — one application pod opening its pool,
//! many clients behind one NAT — and every one of them gets in, through each data plane: the
//! 1:1 forward and Redis multiplexing in front of a real redis-server, PostgreSQL transaction
//! pooling in front of a real PostgreSQL 15. Every client keeps its connection open until all
//! have been answered, so the 2,000 are open together.

mod common;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{oneshot, Barrier},
};

/// Clients in the burst; the default `limits.maxConnections` is 2,000.
const BURST: usize = 2000;
/// The whole burst's bound.
const WITHIN: Duration = Duration::from_secs(120);

/// The standalone portal on the file `yaml` (its `listen` and `admin` filled in) once it
/// names `leader` the leader.
async fn start_portal(yaml: &str, leader: &str) -> Standalone {
    let text = format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{yaml}");
    assert!(
        !text.contains("limits"),
        "the burst runs on the default limits"
    );
    let portal = PortalBuilder::new(&text).standalone().await;
    portal
        .wait_status("the portal's leader", Duration::from_secs(20), |s| {
            s["leader"] == leader
        })
        .await;
    portal
}

/// The sum of the samples of `name` (any labels) in the metrics text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `client(i)` for `BURST` clients at once; each holds what it returns until every client
/// has returned. How many succeeded, and the first few failures. The clients run on a runtime
/// of their own (as clients would in their own processes), so that their work — 2,000 SCRAM
/// proofs — does not starve the portal's tasks, its health checks among them.
async fn burst<F, Fut, T>(client: F) -> (usize, Vec<String>)
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
    T: Send + 'static,
{
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (done, result) = oneshot::channel();
    std::thread::spawn(move || {
        let outcome = clients.block_on(async move {
            let all_answered = Arc::new(Barrier::new(BURST));
            let mut tasks = Vec::with_capacity(BURST);
            for i in 0..BURST {
                let answered = all_answered.clone();
                let run = client(i);
                tasks.push(tokio::spawn(async move {
                    let held = tokio::time::timeout(WITHIN, run).await;
                    // Every task reaches the barrier, so that a failure does not hang the
                    // others.
                    answered.wait().await;
                    match held {
                        Ok(Ok(held)) => {
                            drop(held);
                            Ok(())
                        }
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(format!("no answer within {WITHIN:?}")),
                    }
                }));
            }
            let (mut ok, mut failures) = (0, Vec::new());
            for t in tasks {
                match t.await.unwrap() {
                    Ok(()) => ok += 1,
                    Err(e) if failures.len() < 5 => failures.push(e),
                    Err(_) => {}
                }
            }
            (ok, failures)
        });
        let _ = done.send(outcome);
    });
    tokio::time::timeout(WITHIN * 2, result)
        .await
        .expect("the burst ended")
        .expect("the clients' thread finished")
}

/// A Redis client: PING answered PONG; the connection is held.
async fn ping(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = [0u8; 7];
    s.read_exact(&mut reply)
        .await
        .map_err(|e| format!("PING: {e}"))?;
    if &reply != b"+PONG\r\n" {
        return Err(format!(
            "PING answered {:?}",
            String::from_utf8_lossy(&reply)
        ));
    }
    Ok(s)
}

async fn redis_burst(extra: &str) {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = Redis::start();
    let portal = start_portal(
        &format!(
            "engine: redis\ntls: {{mode: disabled}}\n{extra}backends:\n  - {{name: r0, address: \"{}\"}}\n",
            redis.address()
        ),
        "r0",
    )
    .await;
    let addr = portal.addr;
    let started = Instant::now();
    let (ok, failures) = burst(move |_| ping(addr)).await;
    let m = portal.metrics().await;
    assert_eq!(
        ok,
        BURST,
        "{extra}: {} of {BURST} clients failed in {:?}, e.g. {failures:?}; rejections: {}",
        BURST - ok,
        started.elapsed(),
        metric_sum(&m, "dbportal_rejections_total")
    );
    assert_eq!(metric_sum(&m, "dbportal_rejections_total"), 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_from_one_address_all_get_in_forwarded() {
    redis_burst("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_from_one_address_all_get_in_multiplexed() {
    redis_burst("pooling: {mode: multiplex}\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_from_one_address_all_get_in_pooled() {
    if skip_without(&["psql"]) {
        return;
    }
    const PW: &str = "burstpw";
    let pg = Postgres::primary(PW);
    // The clients' user has a SCRAM verifier of few iterations, stored in PostgreSQL and in
    // the portal's users file alike (as production poolers keep verifiers, not passwords):
    // each client's proof is then cheap to compute, and the burst measures the portal's
    // admission rather than 2,000 runs of PBKDF2 on this machine's two cores.
    let verifier = scram_verifier("burstapp", 16);
    pg.psql(&format!("CREATE ROLE burst LOGIN PASSWORD '{verifier}'"));
    let dir = TempDir::new("burst-users");
    let users = dir.path().join("users.yaml");
    std::fs::write(&users, format!("postgres: {PW}\nburst: \"{verifier}\"\n")).unwrap();
    let portal = start_portal(
        &format!(
            "engine: postgres\ntls: {{mode: disabled}}\nhealthCheck: {{credentials: {{username: postgres, password: {PW}}}}}\npooling: {{mode: transaction, auth: {{usersFile: {}}}}}\nbackends:\n  - {{name: pg0, address: \"{}\"}}\n",
            users.display(),
            pg.address()
        ),
        "pg0",
    )
    .await;
    let addr = portal.addr;
    let started = Instant::now();
    let (ok, failures) = burst(move |_| async move {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut config = tokio_postgres::Config::new();
        config.user("burst").password("burstapp").dbname("postgres");
        let (client, connection) = config
            .connect_raw(tcp, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("login: {e}"))?;
        let connection = tokio::spawn(connection);
        let row = client.query_one("SELECT 1", &[]).await.map_err(|e| {
            format!(
                "SELECT 1: {}",
                e.as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or(e.to_string())
            )
        })?;
        if row.get::<_, i32>(0) != 1 {
            return Err("SELECT 1 answered otherwise".to_string());
        }
        Ok((client, connection))
    })
    .await;
    let m = portal.metrics().await;
    assert_eq!(
        ok,
        BURST,
        "{} of {BURST} pooled clients failed in {:?}, e.g. {failures:?}; rejections: {}; {}",
        BURST - ok,
        started.elapsed(),
        metric_sum(&m, "dbportal_rejections_total"),
        m.lines()
            .filter(|l| l.contains("check_failures") || l.contains("leader_changes"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(metric_sum(&m, "dbportal_rejections_total"), 0.0, "{m}");
}

/// A SCRAM-SHA-256 verifier of `password` with `iterations` (PostgreSQL's stored form).
fn scram_verifier(password: &str, iterations: u32) -> String {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use ring::{digest, hmac, pbkdf2};
    let salt = *b"dbportal-burst-1";
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(iterations).unwrap(),
        &salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key.as_ref()),
        STANDARD.encode(server_key.as_ref())
    )
}
