//! Redis: a primary and two replicas.

use super::*;

/// The port of the server `redis-cli` reached through `port` (a new connection each time).
async fn server_port(port: u16) -> String {
    let (ok, out, err) = redis_cli(port, &["CONFIG", "GET", "port"]).await;
    assert!(ok, "redis-cli through {port}: {err}");
    out.lines().nth(1).unwrap_or("").trim().to_string()
}

/// A primary and two replicas, both replicating from it.
fn primary_and_two_replicas() -> (Redis, Redis, Redis) {
    let primary = Redis::start();
    let r1 = Redis::replica_of(primary.port);
    let r2 = Redis::replica_of(primary.port);
    r1.wait_replicating();
    r2.wait_replicating();
    (primary, r1, r2)
}

fn ports(servers: &[&Redis]) -> Vec<String> {
    servers.iter().map(|r| r.port.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reads_go_to_linked_replicas_and_follow_a_promotion() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let (mut primary, r1, r2) = primary_and_two_replicas();
    let backends = [
        ("r0", loopback(primary.port)),
        ("r1", loopback(r1.port)),
        ("r2", loopback(r2.port)),
    ];
    let portal = ReadPortal::start("redis", &backends, "maxLag: 5s", "").await;
    portal
        .wait_serving(&["r1", "r2"], Duration::from_secs(10))
        .await;
    let ro = portal.reads.port();

    // Reads spread over both replicas, never the primary; the main listener reaches the primary.
    let seen = answers(8, || server_port(ro)).await;
    assert_eq!(seen, set(&ports(&[&r1, &r2])));
    assert_eq!(
        server_port(portal.addr.port()).await,
        primary.port.to_string()
    );

    // A write through the read-only listener is refused by the replica itself.
    let (_, out, _) = redis_cli(ro, &["SET", "k", "v"]).await;
    assert!(out.contains("READONLY"), "{out}");

    // A replica whose link is cut leaves the set; restored, it returns.
    let dead = free_port().to_string();
    r2.cli(&["REPLICAOF", "127.0.0.1", &dead]);
    portal.wait_serving(&["r1"], Duration::from_secs(10)).await;
    assert_eq!(answers(4, || server_port(ro)).await, set(&ports(&[&r1])));
    let s = portal.status().await;
    let r2_status = &s["backends"][2]["replication"];
    assert_eq!(r2_status["state"], "broken", "{s:#}");
    r2.cli(&["REPLICAOF", "127.0.0.1", &primary.port.to_string()]);
    portal
        .wait_serving(&["r1", "r2"], Duration::from_secs(15))
        .await;
    let m = portal.metrics().await;
    assert!(
        metric(&m, "dbportal_backend_replication_lag_bytes{backend=\"r1\"}").is_some(),
        "{m}"
    );

    // A promotion: r1 leads, r2 follows it; r1 moves from the read-only listener to the main.
    primary.kill();
    r1.cli(&["REPLICAOF", "NO", "ONE"]);
    r2.cli(&["REPLICAOF", "127.0.0.1", &r1.port.to_string()]);
    portal.wait_leader("r1").await;
    portal.wait_serving(&["r2"], Duration::from_secs(15)).await;
    assert_eq!(server_port(portal.addr.port()).await, r1.port.to_string());
    assert_eq!(answers(4, || server_port(ro)).await, set(&ports(&[&r2])));

    // No replica qualifies: the leader serves reads (fallbackToLeader defaults to true)...
    r2.cli(&["REPLICAOF", "127.0.0.1", &dead]);
    portal.wait_serving(&["r1"], Duration::from_secs(10)).await;
    assert_eq!(answers(2, || server_port(ro)).await, set(&ports(&[&r1])));

    // ...and without the fallback, a client is told so in Redis' words.
    let strict = ReadPortal::start("redis", &backends, "fallbackToLeader: false", "").await;
    strict.wait_leader("r1").await;
    strict.wait_serving(&[], Duration::from_secs(10)).await;
    let (_, out, err) = redis_cli(strict.reads.port(), &["GET", "k"]).await;
    assert!(
        out.contains("LOADING") && out.contains("readOnly.maxLag"),
        "{out} {err}"
    );

    // The former primary, back as a replica of r1, joins the set once its link is up.
    primary.restart_with(&["--replicaof", "127.0.0.1", &r1.port.to_string()]);
    primary.wait_replicating();
    portal.wait_serving(&["r0"], Duration::from_secs(15)).await;
    strict.wait_serving(&["r0"], Duration::from_secs(15)).await;
    let (_, port, _) = redis_cli(strict.reads.port(), &["CONFIG", "GET", "port"]).await;
    assert_eq!(
        port.lines().nth(1).map(str::trim),
        Some(primary.port.to_string().as_str())
    );
}

/// The `tcp_port` of the server a multiplexed client's `INFO server` ran on.
async fn info_port(s: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    s.write_all(&resp(&["INFO", "server"])).await?;
    let mut r = tokio::io::BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).await?;
    let len: usize = head
        .trim_end()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not a bulk reply: {head:?}")))?;
    let mut body = vec![0u8; len + 2];
    r.read_exact(&mut body).await?;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix("tcp_port:"))
        .map(|p| p.trim().to_string())
        .ok_or_else(|| std::io::Error::other("no tcp_port"))
}

/// Each client's next command, retried (bounded) while the change is in flight; every answer
/// must come on the same connection.
async fn ports_of(clients: &mut [tokio::net::TcpStream], want: &BTreeSet<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = BTreeSet::new();
        for c in clients.iter_mut() {
            match tokio::time::timeout(Duration::from_secs(5), info_port(c)).await {
                Ok(Ok(port)) => {
                    seen.insert(port);
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Other => {}
                other => panic!("a multiplexed client lost its connection: {other:?}"),
            }
        }
        if &seen == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "answers from {seen:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Multiplexed clients on the read-only listener stay connected while the replica set changes
/// (a promotion, then no replica left and the leader as the fallback); their commands run on
/// the backends serving reads at the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_multiplexed_reads_stay_connected_through_a_promotion() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let (mut primary, r1, r2) = primary_and_two_replicas();
    let backends = [
        ("r0", loopback(primary.port)),
        ("r1", loopback(r1.port)),
        ("r2", loopback(r2.port)),
    ];
    let mux = "pooling: {mode: multiplex, serverConnections: 2}";
    let portal = ReadPortal::start("redis", &backends, "", mux).await;
    portal
        .wait_serving(&["r1", "r2"], Duration::from_secs(10))
        .await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(tokio::net::TcpStream::connect(portal.reads).await.unwrap());
    }
    // Reads on the replicas only (each client's commands may go to either).
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        for c in clients.iter_mut() {
            seen.insert(info_port(c).await.unwrap());
        }
    }
    assert_eq!(seen, set(&ports(&[&r1, &r2])));

    // r1 promoted, r2 follows it: the clients' reads go to r2.
    primary.kill();
    r1.cli(&["REPLICAOF", "NO", "ONE"]);
    r2.cli(&["REPLICAOF", "127.0.0.1", &r1.port.to_string()]);
    portal.wait_leader("r1").await;
    portal.wait_serving(&["r2"], Duration::from_secs(15)).await;
    ports_of(&mut clients, &set(&ports(&[&r2]))).await;

    // r2's link cut: no replica; the leader takes the same clients' reads.
    r2.cli(&["REPLICAOF", "127.0.0.1", &free_port().to_string()]);
    portal.wait_serving(&["r1"], Duration::from_secs(10)).await;
    ports_of(&mut clients, &set(&ports(&[&r1]))).await;
    assert_eq!(
        portal.status().await["readOnly"]["serving"],
        serde_json::json!(["r1"])
    );
}
