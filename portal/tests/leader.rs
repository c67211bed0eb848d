//! Leader following through the standalone portal (real checker) in front of real Redis
//! servers on loopback: switchover, sessions cut, no writes on the demoted node, waiting for a
//! leader, split brain, and what `/status` and `/metrics` say about it.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The standalone portal in front of `backends` (r0, r1, ...) with `extra` YAML.
async fn start_portal(backends: &[&Redis], extra: &str) -> Standalone {
    let mut yaml = "engine: redis\nlisten: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntls: {mode: disabled}\nbackends:\n".to_string();
    for (i, b) in backends.iter().enumerate() {
        yaml.push_str(&format!(
            "  - {{name: r{i}, address: \"{}\"}}\n",
            b.address()
        ));
    }
    yaml.push_str(extra);
    PortalBuilder::new(&yaml).standalone().await
}

/// Sends one command on `s` and reads one reply line (enough for SET / PING / errors).
async fn command(s: &mut TcpStream, args: &[&str]) -> std::io::Result<String> {
    s.write_all(&resp(args)).await?;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"))??;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed",
        ));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// One write on a fresh connection through the portal.
async fn write_once(portal: SocketAddr, key: &str) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(portal)).await
    else {
        return false;
    };
    matches!(command(&mut s, &["SET", key, "1"]).await, Ok(r) if r == "+OK")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_cuts_sessions_and_no_write_reaches_the_demoted_node() {
    if !installed("redis-server") {
        return;
    }
    let a = Redis::start();
    let b = Redis::replica_of(a.port);
    b.wait_replicating();
    let p = start_portal(&[&a, &b], "").await;
    p.wait_status("leader r0", Duration::from_secs(5), |s| s["leader"] == "r0")
        .await;

    let mut session = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        command(&mut session, &["SET", "before", "1"])
            .await
            .unwrap(),
        "+OK"
    );
    assert_eq!(a.cli(&["GET", "before"]), "1");

    // Switchover: b is promoted, a is demoted (to a replica of nothing: its keyspace stays
    // as it is, so any write that reached it would show).
    b.cli(&["REPLICAOF", "NO", "ONE"]);
    let dead = free_port().to_string();
    a.cli(&["REPLICAOF", "127.0.0.1", &dead]);
    let keys_on_a = a.cli(&["DBSIZE"]);

    // The open session to the demoted node is cut.
    let cut = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match command(&mut session, &["PING"]).await {
                Err(_) => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the session to the demoted leader stayed open");

    // Writes through the portal succeed again, on b only.
    let started = Instant::now();
    let mut n = 0;
    for i in 0..200 {
        if write_once(p.addr, &format!("after:{i}")).await {
            n += 1;
            if n == 20 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(n, 20, "writes through the portal did not resume");
    eprintln!("writes resumed within {:?}", started.elapsed());
    assert_eq!(
        a.cli(&["DBSIZE"]),
        keys_on_a,
        "a write reached the demoted node"
    );
    assert_eq!(a.cli(&["EXISTS", "after:0", "after:1", "after:2"]), "0");
    assert!(b.cli(&["DBSIZE"]).parse::<u32>().unwrap() >= 20);

    let s = p
        .wait_status("leader r1", Duration::from_secs(3), |s| s["leader"] == "r1")
        .await;
    assert_eq!(s["leaderConflict"], false);
    let metrics = p.metrics().await;
    assert!(
        metrics.contains("dbportal_leader_changes_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dbportal_leader_sessions_cut_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_the_primary_and_clients_waiting_for_a_leader() {
    if !installed("redis-server") {
        return;
    }
    let mut a = Redis::start();
    let b = Redis::replica_of(a.port);
    b.wait_replicating();
    let p = start_portal(&[&a, &b], "timeouts: {connect: 10s}\n").await;
    p.wait_status("leader r0", Duration::from_secs(5), |s| s["leader"] == "r0")
        .await;

    a.kill();
    p.wait_status("no leader", Duration::from_secs(5), |s| {
        s["leader"].is_null()
    })
    .await;
    // A client arriving now waits for a leader instead of being refused.
    let client = tokio::spawn(write_once(p.addr, "waited"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let promoted = Instant::now();
    b.cli(&["REPLICAOF", "NO", "ONE"]);
    assert!(client.await.unwrap(), "the waiting client's write failed");
    eprintln!(
        "the waiting client wrote {:?} after the promotion",
        promoted.elapsed()
    );
    assert_eq!(b.cli(&["GET", "waited"]), "1");
    let s = p.status().await;
    assert_eq!(s["leader"], "r1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_routes_nowhere_until_resolved() {
    if !installed("redis-server") {
        return;
    }
    let a = Redis::start();
    let b = Redis::start();
    let p = start_portal(&[&a, &b], "timeouts: {connect: 500ms}\n").await;
    let s = p
        .wait_status("conflict", Duration::from_secs(5), |s| {
            s["leaderConflict"] == true
        })
        .await;
    assert!(s["leader"].is_null());
    assert!(
        !write_once(p.addr, "nowhere").await,
        "a write was routed during split brain"
    );
    assert_eq!(a.cli(&["DBSIZE"]), "0");
    assert_eq!(b.cli(&["DBSIZE"]), "0");
    let metrics = p.metrics().await;
    assert!(metrics.contains("dbportal_leader_conflict 1"), "{metrics}");

    b.cli(&["REPLICAOF", "127.0.0.1", &a.port.to_string()]);
    p.wait_status("leader r0", Duration::from_secs(5), |s| {
        s["leader"] == "r0" && s["leaderConflict"] == false
    })
    .await;
    assert!(write_once(p.addr, "resolved").await);
}

/// Reads one reply line from `s`, waiting up to `limit` (a script's reply comes late).
async fn reply_within(s: &mut TcpStream, limit: Duration) -> String {
    let mut buf = vec![0u8; 512];
    match tokio::time::timeout(limit, s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        Ok(Err(e)) => format!("read error: {e}"),
        Err(_) => "no reply".into(),
    }
}

/// A leader busy with a script or function (past `busy-reply-threshold`) answers `-BUSY`; the
/// portal keeps it up and leading, so a new client reaches it through the portal and ends the
/// script with `kill` (`SCRIPT KILL` or `FUNCTION KILL`). `setup` runs on the leader first.
async fn busy_leader_is_killable(setup: &[&str], start: &[&str], kill: &[&str]) {
    let a = Redis::start_with(&["--busy-reply-threshold", "100"]);
    let b = Redis::replica_of(a.port);
    b.wait_replicating();
    if !setup.is_empty() {
        a.cli(setup);
    }
    let p = start_portal(
        &[&a, &b],
        "healthCheck: {interval: 100ms, rise: 1, fall: 2}\ntimeouts: {check: 1s}\n",
    )
    .await;
    p.wait_status("leader r0", Duration::from_secs(5), |s| s["leader"] == "r0")
        .await;

    // The user's long script, sent through the portal; its reply comes when it ends. The loop
    // is bounded (tens of seconds at most) in case the kill never arrives.
    let mut runner = TcpStream::connect(p.addr).await.unwrap();
    runner.write_all(&resp(start)).await.unwrap();

    let s = p
        .wait_status("r0 busy", Duration::from_secs(10), |s| {
            s["backends"][0]["state"] == "busy"
        })
        .await;
    assert_eq!(s["leader"], "r0", "a busy leader stays the leader: {s:#}");
    assert_eq!(s["backends"][0]["up"], true, "{s:#}");
    assert_eq!(s["backends"][0]["role"], "leader", "{s:#}");
    assert_eq!(s["ready"], true, "{s:#}");
    let metrics = p.metrics().await;
    assert!(
        metrics.contains("dbportal_backend_caveat{backend=\"r0\",caveat=\"busy\"} 1"),
        "{metrics}"
    );

    // A new client is routed to the busy leader: it sees -BUSY, and its kill works.
    let mut user = TcpStream::connect(p.addr).await.unwrap();
    let r = command(&mut user, &["GET", "k"]).await.unwrap();
    assert!(
        r.starts_with("-BUSY"),
        "a new session reaches the busy leader: {r}"
    );
    let r = command(&mut user, kill).await.unwrap();
    assert_eq!(r, "+OK", "{kill:?} through the portal");
    let ended = reply_within(&mut runner, Duration::from_secs(5)).await;
    assert!(
        ended.starts_with('-') && ended.to_lowercase().contains("kill"),
        "the script ends, killed: {ended}"
    );
    assert_eq!(command(&mut user, &["PING"]).await.unwrap(), "+PONG");

    let s = p
        .wait_status("r0 answers normally", Duration::from_secs(5), |s| {
            s["backends"][0]["state"] == "up"
        })
        .await;
    assert_eq!(s["leader"], "r0");
    assert_eq!(s["leaderChanges"], 0, "no leader change while busy: {s:#}");
    assert_eq!(s["failovers"], 0, "{s:#}");
    assert!(s["leaderlessSince"].is_null(), "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_script_stays_reachable_so_script_kill_works() {
    if !installed("redis-server") {
        return;
    }
    busy_leader_is_killable(
        &[],
        &[
            "EVAL",
            "local i = 0 while i < 3e9 do i = i + 1 end return i",
            "0",
        ],
        &["SCRIPT", "KILL"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_function_stays_reachable_so_function_kill_works() {
    if !installed("redis-server") {
        return;
    }
    let library = "#!lua name=spinlib\nredis.register_function{function_name='spin', \
                   callback=function() local i = 0 while i < 3e9 do i = i + 1 end return i end, \
                   flags={'no-writes'}}";
    busy_leader_is_killable(
        &["FUNCTION", "LOAD", library],
        &["FCALL", "spin", "0"],
        &["FUNCTION", "KILL"],
    )
    .await;
}
