//! Balancing: weights under roundrobin, source and leastconn, backups, and connection caps
//! spilling over, queueing and timing out.

use super::*;

/// Each backend `b<i>` took its weight's share of `total` sessions, within `tolerance`.
fn assert_shares(got: &HashMap<String, u64>, weights: &[u64], total: u64, tolerance: u64) {
    let sum: u64 = weights.iter().sum();
    for (i, w) in weights.iter().enumerate() {
        let expect = total * w / sum;
        let n = got[&format!("b{i}")];
        assert!(
            n.abs_diff(expect) <= tolerance,
            "b{i}: {n} sessions, expected {expect} ± {tolerance}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_honoured_by_roundrobin_source_and_leastconn() {
    let servers = redis_backends(3).await;
    let weights = [1u64, 2, 5];
    let extra = [", weight: 1", ", weight: 2", ", weight: 5"];

    // Round robin: 1,000 sessions, one after the other.
    let portal = Portal::start(&backends_yaml("roundrobin", &servers, &extra, "")).await;
    for _ in 0..1000 {
        drop(session(portal.addr).await);
    }
    let got = totals(&portal).await;
    println!("roundrobin 1:2:5 over 1000 sessions: {got:?}");
    assert_shares(&got, &weights, 1000, 25);
    portal.stop().await;

    // Source: 1,000 client addresses (127.0.x.y), each sticking to its backend.
    let portal = Portal::start(&backends_yaml("source", &servers, &extra, "")).await;
    for k in 0..1000u32 {
        let from = format!("127.0.{}.{}", 1 + k / 250, 1 + k % 250);
        let mut s = connect_from(&from, portal.addr).await.unwrap();
        assert_eq!(redis_cmd(&mut s, &["PING"]).await.unwrap(), "+PONG");
    }
    let got = totals(&portal).await;
    println!("source 1:2:5 over 1000 clients: {got:?}");
    assert_shares(&got, &weights, 1000, 60);
    portal.stop().await;

    // Leastconn: 80 sessions held open spread as sessions per unit of weight.
    let portal = Portal::start(&backends_yaml("leastconn", &servers, &extra, "")).await;
    let mut open = Vec::new();
    for _ in 0..80 {
        open.push(session(portal.addr).await);
    }
    let status = portal.status().await;
    for (i, w) in weights.iter().enumerate() {
        let n = backend(&status, &format!("b{i}"))["activeSessions"]
            .as_u64()
            .unwrap();
        assert!(n.abs_diff(80 * w / 8) <= 1, "b{i}: {n} open");
    }

    // A runtime weight replaces the configured one for the next sessions.
    let dir = TempDir::new("weights-token");
    let token = dir.write("token", TOKEN);
    drop(open);
    portal.stop().await;
    let yaml = backends_yaml(
        "roundrobin",
        &servers,
        &extra,
        &format!("adminTokenFile: {}", token.display()),
    );
    let portal = Portal::start(&yaml).await;
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/weight",
        Some(TOKEN),
        r#"{"weight": 5}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    for _ in 0..600 {
        drop(session(portal.addr).await);
    }
    let got = totals(&portal).await;
    println!("roundrobin 5:2:5 over 600 sessions: {got:?}");
    assert!(got["b0"].abs_diff(250) <= 20, "{got:?}");
    assert!(got["b1"].abs_diff(100) <= 20, "{got:?}");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_sessions_only_when_no_other_backend_is_up() {
    let servers = redis_backends(3).await;
    let yaml = backends_yaml("roundrobin", &servers, &["", "", ", backup: true"], "");
    let portal = Portal::start(&yaml).await;
    let names = |p: &Portal| {
        let p = p.health.borrow().clone();
        p
    };
    for _ in 0..20 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b2"], 0, "the backup took sessions");
    // b0 down: b1 alone, still not the backup.
    let mut view = names(&portal);
    view.backends[0].up = false;
    portal.health.send_replace(view.clone());
    for _ in 0..10 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b2"], 0);
    // Both down: the backup serves.
    view.backends[1].up = false;
    portal.health.send_replace(view.clone());
    for _ in 0..10 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b2"], 10);
    // One back: the backup takes no new sessions.
    view.backends[1].up = true;
    portal.health.send_replace(view);
    for _ in 0..10 {
        drop(session(portal.addr).await);
    }
    let got = totals(&portal).await;
    assert_eq!(got["b2"], 10, "{got:?}");
    assert_eq!(got["b1"], 30, "{got:?}");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_spills_to_the_next_backend_then_queues_then_times_out() {
    let servers = redis_backends(2).await;
    let yaml = backends_yaml(
        "first",
        &servers,
        &[", maxConnections: 2", ", maxConnections: 1"],
        "timeouts: {connect: 1500ms}",
    );
    let portal = Portal::start(&yaml).await;
    let a = session(portal.addr).await;
    let b = session(portal.addr).await;
    // b0 is full: the next session goes to b1.
    let c = session(portal.addr).await;
    let status = portal.status().await;
    assert_eq!(backend(&status, "b0")["activeSessions"], 2);
    assert_eq!(backend(&status, "b1")["activeSessions"], 1);
    assert_eq!(backend(&status, "b0")["sessionsMax"], 2);

    // Both full: the next one waits in the queue, and gets through when a place frees.
    let admin = portal.admin;
    let waiting = tokio::spawn(async move {
        let mut s = TcpStream::connect(portal.addr).await.unwrap();
        let r = redis_cmd(&mut s, &["PING"]).await;
        (s, r)
    });
    let mut queued = 0;
    for _ in 0..100 {
        let st: serde_json::Value =
            serde_json::from_str(&http_get(admin, "/status").await.1).unwrap();
        queued = st["queue"]["waiting"].as_u64().unwrap();
        if queued == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(queued, 1, "the fourth session waits");
    assert_eq!(
        metric(&portal.metrics().await, "dbportal_queue_length"),
        Some(1.0)
    );
    drop(a);
    let (d, reply) = within("the queued session", waiting).await.unwrap();
    assert_eq!(reply.unwrap(), "+PONG");

    // Full again: a queued session gives up after timeouts.connect.
    let mut late = TcpStream::connect(portal.addr).await.unwrap();
    let _ = late.write_all(b"*1\r\n$4\r\nPING\r\n").await;
    let mut buf = [0u8; 16];
    let n = within("queue timeout", late.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply");
    let m = portal.metrics().await;
    assert_eq!(metric(&m, "dbportal_queue_timeouts_total"), Some(1.0));
    assert_eq!(
        metric(&m, "dbportal_backend_sessions_limit{backend=\"b0\"}"),
        Some(2.0)
    );
    drop((b, c, d));
    portal.stop().await;
}
