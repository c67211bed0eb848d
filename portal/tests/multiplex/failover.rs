//! Failover with idle and busy clients, and commands while there is no leader.

use super::*;

/// Failover: the leader is switched over. Idle clients stay connected and their next command
/// runs on the new leader; busy clients get errors only for the commands in flight at the
/// change; nothing is written to the demoted node afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_idle_clients_and_writes_nothing_to_the_demoted_node() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let a = Redis::start();
    let b = Redis::replica_of(a.port);
    b.wait_replicating();
    let p = start_portal(&[&a, &b], MUX).await;
    p.wait_leader("r0").await;

    let mut idle = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let key = format!("idle:{i}");
        assert_eq!(command(&mut s, &["SET", &key, "a"]).await.unwrap(), "+OK");
        idle.push(s);
    }
    // Busy clients: pipelines of INCR until told to stop, counting replies by kind.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy: Vec<_> = (0..8)
        .map(|i| {
            let stop = stop.clone();
            let addr = p.addr;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let key = format!("busy:{i}");
                let (mut ok, mut errors, mut other) = (0u64, Vec::new(), Vec::new());
                let batch: Vec<u8> = (0..16).flat_map(|_| resp(&["INCR", &key])).collect();
                let started = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(30)
                {
                    s.write_all(&batch).await.unwrap();
                    for r in replies(&mut s, 16).await.unwrap() {
                        if r.starts_with(':') {
                            ok += 1;
                        } else if r.starts_with('-') {
                            errors.push(r);
                        } else {
                            other.push(r);
                        }
                    }
                }
                (ok, errors, other)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Switchover: b is promoted, a is demoted (to a replica of nothing, so that its keyspace
    // stays as it is: any write reaching it would show).
    b.cli(&["REPLICAOF", "NO", "ONE"]);
    a.cli(&["REPLICAOF", "127.0.0.1", &free_port().to_string()]);
    p.wait_leader("r1").await;
    let keys_on_a = a.cli(&["DBSIZE"]);
    let busy_on_a: Vec<String> = (0..8)
        .map(|i| a.cli(&["GET", &format!("busy:{i}")]))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total_ok = 0;
    for t in busy {
        let (ok, errors, other) = t.await.unwrap();
        total_ok += ok;
        assert!(other.is_empty(), "{other:?}");
        for e in &errors {
            // Only commands in flight at the change: TRYAGAIN, or READONLY from the demoted
            // node before the probe saw it demoted.
            assert!(
                e.starts_with("-TRYAGAIN") || e.starts_with("-READONLY"),
                "{e}"
            );
        }
    }
    assert!(total_ok > 0);

    // Idle clients: still connected, their next command runs on the new leader.
    for (i, s) in idle.iter_mut().enumerate() {
        let key = format!("idle:{i}");
        assert_eq!(
            command(s, &["SET", &key, "b"]).await.unwrap(),
            "+OK",
            "idle client {i}"
        );
    }
    assert_eq!(b.cli(&["GET", "idle:7"]), "b");
    // Nothing reached the demoted node after the change was seen.
    assert_eq!(a.cli(&["DBSIZE"]), keys_on_a);
    for (i, before) in busy_on_a.iter().enumerate() {
        assert_eq!(&a.cli(&["GET", &format!("busy:{i}")]), before);
    }
    assert_eq!(a.cli(&["GET", "idle:7"]), "a");
    let m = p.metrics().await;
    assert_eq!(
        sample(&m, "dbportal_sessions_closed_total{reason=\"backend\"}"),
        0.0,
        "no client was cut"
    );
}

/// Without a leader a command waits up to `timeouts.connect` and then gets an error reply;
/// the client stays connected, and its next command runs once a leader is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_commands_get_an_error_and_the_client_stays() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let mut redis = Redis::start();
    let p = start_portal(
        &[&redis],
        "timeouts: {connect: 1s}\npooling: {mode: multiplex}\n",
    )
    .await;
    p.wait_leader("r0").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(command(&mut s, &["SET", "a", "1"]).await.unwrap(), "+OK");

    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = p.status().await;
        if st["leader"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "the leader stayed: {st:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = command(&mut s, &["GET", "a"]).await.unwrap();
    assert!(reply.starts_with("-ERR no backend available"), "{reply}");

    redis.restart();
    p.wait_leader("r0").await;
    assert_eq!(command(&mut s, &["SET", "b", "2"]).await.unwrap(), "+OK");
    assert_eq!(redis.cli(&["GET", "b"]), "2");
}
